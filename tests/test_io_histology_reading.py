"""Histology reading as slide scanners write it: compressed TIFFs, pyramids, recorded pixel sizes, huge images."""

import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from msisynth import errors
from msisynth.io import histology


def _rgb(h=48, w=64, seed=0):
  """A smooth RGB image (compresses like tissue; JPEG keeps it close)."""
  yy, xx = np.mgrid[0:h, 0:w]
  rng = np.random.default_rng(seed)
  base = np.stack([np.sin(xx / 7.0 + k) * np.cos(yy / 5.0 - k) for k in range(3)], axis=-1)
  return np.clip(127 + 100 * base + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("compression", ["lzw", "zlib", "jpeg", "jpeg2000"])
def test_compressed_tiffs_read(tmp_path, compression):
  rgb = _rgb()
  path = tmp_path / f"{compression}.tif"
  try:
    tifffile.imwrite(path, rgb, photometric="rgb", compression=compression)
  except Exception as e:  # an imagecodecs build without this encoder
    pytest.skip(f"cannot write {compression} here: {e}")
  with tifffile.TiffFile(path) as tif:
    assert tif.pages[0].compression.name.lower().startswith(compression[:4]) or compression == "zlib"
  he = histology.read_histology(path)
  assert he.shape == (48, 64, 3) and he.dtype == np.float32
  if compression in ("lzw", "zlib"):
    np.testing.assert_array_equal(he, rgb / np.float32(255))
  else:
    assert np.abs(he - rgb / 255.0).mean() < 0.03
  np.testing.assert_array_equal(histology.read_image(path), he)


def _pyramid(path, full, *, pixel_size_um=0.5, compression="zlib", name="slide", objective=None):
  """An OME-TIFF with two sub-resolutions (1/2, 1/4) in SubIFDs, tiled."""
  kwargs = {"photometric": "rgb", "tile": (16, 16), "compression": compression}
  metadata = {"axes": "YXS", "PhysicalSizeX": pixel_size_um, "PhysicalSizeY": pixel_size_um, "Name": name}
  with tifffile.TiffWriter(path, ome=True) as tw:
    tw.write(full, subifds=2, metadata=metadata, **kwargs)
    tw.write(full[::2, ::2], subfiletype=1, **kwargs)
    tw.write(full[::4, ::4], subfiletype=1, **kwargs)
  if objective is not None:
    # Add an instrument with the objective, as microscope software does.
    with tifffile.TiffFile(path) as tif:
      xml = tif.ome_metadata
    instrument = (f'<Instrument ID="Instrument:0"><Objective ID="Objective:0" NominalMagnification="{objective}"/>'
                  '</Instrument>')  # fmt: skip
    xml = xml.replace("<Image ", instrument + "<Image ", 1)
    xml = xml.replace("<Pixels ", '<InstrumentRef ID="Instrument:0"/><Pixels ', 1)
    tifffile.tiffcomment(path, xml.encode())
  return path


def test_pyramidal_tiff_reads_only_the_level_it_needs(tmp_path, monkeypatch):
  full = _rgb(128, 192)
  path = _pyramid(tmp_path / "slide.ome.tif", full)
  decoded = []
  original = tifffile.TiffPageSeries.asarray

  def recording(self, *args, **kwargs):
    decoded.append(tuple(self.shape))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", recording)
  # 2 µm from a 0.5 µm base: the 1/4 level (2 µm) exactly, nothing larger decoded, no resampling.
  he = histology.read_histology(path, pixel_size_um=2.0)
  assert decoded == [(32, 48, 3)]
  np.testing.assert_array_equal(he, full[::4, ::4] / np.float32(255))
  # 1.5 µm: the 1/2 level (1 µm, the coarsest not coarser than asked), downsampled to 1.5 µm.
  decoded.clear()
  he = histology.read_histology(path, pixel_size_um=1.5)
  assert decoded == [(64, 96, 3)]
  expected = histology.resample_to_pixel_size(full[::2, ::2].astype(np.float32) / 255, 1.0, 1.5)
  assert he.shape == expected.shape == (43, 64, 3)
  np.testing.assert_allclose(he, expected, atol=1e-5)
  # The user's pixel size wins over the file's: said to be 0.25 µm, the 1/4 level is then 1 µm.
  decoded.clear()
  he = histology.read_histology(path, pixel_size_um=1.0, image_pixel_size_um=0.25)
  assert decoded == [(32, 48, 3)]
  # Without a target pixel size: the full image, as before.
  np.testing.assert_array_equal(histology.read_histology(path), full / np.float32(255))


def test_recorded_pixel_sizes(tmp_path):
  rgb = _rgb(16, 16)
  assert histology.histology_pixel_size_um(_pyramid(tmp_path / "ome.tif", rgb, pixel_size_um=0.25)) == (0.25, 0.25)
  cm = tmp_path / "cm.tif"
  tifffile.imwrite(cm, rgb, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.4), resolutionunit="CENTIMETER")
  assert histology.histology_pixel_size_um(cm) == pytest.approx((0.4, 0.5))
  screen = tmp_path / "screen.tif"  # 96 dpi: a screen default, not a physical size
  tifffile.imwrite(screen, rgb, photometric="rgb", resolution=(96, 96), resolutionunit="INCH")
  assert histology.histology_pixel_size_um(screen) is None
  png = tmp_path / "plain.png"
  Image.fromarray(rgb).save(png, dpi=(72, 72))
  assert histology.histology_pixel_size_um(png) is None
  with pytest.raises(errors.ConfigError, match="image_pixel_size_um"):
    histology.read_histology(png, pixel_size_um=2.0)
  out = histology.read_histology(png, pixel_size_um=2.0, image_pixel_size_um=1.0)
  assert out.shape == (8, 8, 3)


def test_implausible_recorded_pixel_size_warns(tmp_path):
  """As the msight H&E: 0.17 µm recorded, a 2x objective named; a 2x objective cannot give 0.17 µm pixels."""
  rgb = _rgb(16, 16)
  named = _pyramid(tmp_path / "named.ome.tif", rgb, pixel_size_um=0.17, name="Bladder_H&E_2X_2msExposure.tif")
  with pytest.warns(histology.PixelSizeWarning, match=r"0\.17 µm.*2x objective \(in the image name\)"):
    assert histology.histology_pixel_size_um(named) == (0.17, 0.17)
  objective = _pyramid(tmp_path / "objective.ome.tif", rgb, pixel_size_um=5.0, objective=40)
  with pytest.warns(histology.PixelSizeWarning, match="40x objective"):
    histology.histology_pixel_size_um(objective)
  fine = _pyramid(tmp_path / "fine.ome.tif", rgb, pixel_size_um=0.25, name="slide 40x", objective=40)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert histology.histology_pixel_size_um(fine) == (0.25, 0.25)


def test_huge_png_gets_a_clear_message(tmp_path, monkeypatch):
  path = tmp_path / "huge.png"
  Image.fromarray(_rgb(64, 64)).save(path)
  monkeypatch.setattr(histology, "_available_bytes", lambda: 10_000)
  for kwargs in ({}, {"pixel_size_um": 4.0, "image_pixel_size_um": 1.0}):
    with pytest.raises(errors.ImageReadError, match=r"64 x 64 PNG.*cannot be decoded in parts.*pyramidal TIFF"):
      histology.read_histology(path, **kwargs)
  # A decoder running out of memory anyway: still the library's error, never a bare MemoryError.
  monkeypatch.setattr(histology, "_available_bytes", lambda: None)

  def out_of_memory(_):
    raise MemoryError

  monkeypatch.setattr(histology, "_read_pillow", out_of_memory)
  with pytest.raises(errors.ImageReadError, match="not enough memory"):
    histology.read_histology(path)
  with pytest.raises(errors.ImageReadError, match="not enough memory"):
    histology.read_histology(path, pixel_size_um=4.0, image_pixel_size_um=1.0)


def test_huge_single_level_tiff_is_reduced_through_a_memory_map(tmp_path, monkeypatch):
  full = _rgb(96, 128)
  path = tmp_path / "flat.tif"
  tifffile.imwrite(path, full, photometric="rgb", compression="lzw", rowsperstrip=8)
  expected = histology.read_histology(path, pixel_size_um=4.0, image_pixel_size_um=1.0)
  monkeypatch.setattr(histology, "_MEMMAP_BYTES", 0)
  monkeypatch.setattr(histology, "_available_bytes", lambda: 1000)
  seen = []
  original = tifffile.TiffPageSeries.asarray

  def recording(self, *args, **kwargs):
    seen.append(kwargs.get("out"))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", recording)
  got = histology.read_histology(path, pixel_size_um=4.0, image_pixel_size_um=1.0)
  assert seen == ["memmap"]
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert got.shape == (24, 32, 3)
  # Full resolution does not fit: the message points at pixel_size_um.
  with pytest.raises(errors.ImageReadError, match="pass pixel_size_um="):
    histology.read_histology(path)


def test_downsampled_png_equals_resampled_full_read(tmp_path):
  path = tmp_path / "slide.png"
  Image.fromarray(_rgb(128, 160)).save(path)
  expected = histology.resample_to_pixel_size(histology.read_histology(path), 1.0, 4.0)
  reduced = histology.read_histology(path, pixel_size_um=4.0, image_pixel_size_um=1.0)
  assert reduced.shape == (32, 40, 3)
  np.testing.assert_allclose(reduced, expected, atol=1e-6)
