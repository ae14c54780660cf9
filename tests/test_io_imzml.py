"""imzML reading and writing, checked against pyimzml's own reader on the shipped files and on generated ones."""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from pyimzml.ImzMLParser import ImzMLParser
from pyimzml.ImzMLWriter import ImzMLWriter

from msisynth import errors
from msisynth.io import imzml
from msisynth.types import MSIImage

SHIPPED = [
  "galaxyp/Combat_40pixel.imzML",
  "galaxyp/spatial_DGMM_input.imzML",
  "metaspace/Untreated_3_434_tiny.imzML",
  "pyimzml/Example_Continuous.imzML",
  "pyimzml/Example_Processed.imzML",
  "pym2aia/test.imzML",
]
DECLARED_MODE = {
  "galaxyp/Combat_40pixel.imzML": "continuous",
  "galaxyp/spatial_DGMM_input.imzML": "continuous",
  "metaspace/Untreated_3_434_tiny.imzML": "processed",
  "pyimzml/Example_Continuous.imzML": "continuous",
  "pyimzml/Example_Processed.imzML": "processed",
  "pym2aia/test.imzML": "continuous",
}


def _spectra(path):
  """(x, y, mz float64, intensity float64) of every spectrum, by pyimzml."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    parser = ImzMLParser(str(path), parse_lib="ElementTree")
  out = []
  for i, (x, y, _) in enumerate(parser.coordinates):
    mz, intensity = parser.getspectrum(i)
    out.append((x, y, mz.astype(np.float64), intensity.astype(np.float64)))
  parser.m.close()
  return out


def _pixel(msi, x, y):
  x0, y0 = msi.metadata["coordinate_offset"]
  return msi.cube[y - y0, x - x0]


def _reference_bins(msi, mz, intensity):
  """np.histogram over the regular bin axis, restricted to the bins the reader kept (the non-empty ones)."""
  binning = msi.metadata["binning"]
  edges = imzml.mz_bin_edges(*binning["mz_range"], binning["bin_width"], binning["bin_unit"])
  full = np.histogram(mz, edges, weights=intensity)[0]
  kept = np.isin(np.round(0.5 * (edges[:-1] + edges[1:]), 6), np.round(msi.mz, 6))
  assert kept.sum() == msi.num_channels
  assert not full[~kept].any(), "a dropped bin held intensity"
  return full[kept]


def _write(path, spectra, mode="processed", mz_dtype=np.float64):
  """Writes [(x, y, mz, intensity), ...] with pyimzml's writer."""
  with ImzMLWriter(str(path), mode=mode, mz_dtype=mz_dtype, intensity_dtype=np.float32) as writer:
    for x, y, mz, intensity in spectra:
      writer.addSpectrum(np.asarray(mz, np.float64), np.asarray(intensity, np.float32), (x, y))
  return pathlib.Path(path)


def _copy(shared_data, name, tmp_path):
  src = shared_data / "imzml" / name
  dst = tmp_path / src.name
  shutil.copy(src, dst)
  shutil.copy(src.with_suffix(".ibd"), dst.with_suffix(".ibd"))
  return dst


@pytest.fixture
def small_processed(tmp_path):
  rng = np.random.default_rng(0)
  spectra = []
  for y in range(1, 4):
    for x in range(1, 5):
      if (x, y) == (3, 2):
        continue  # a hole
      mz = np.sort(rng.uniform(100, 200, 30))
      spectra.append((x + 10, y + 20, mz, rng.random(30) * 100))
  return _write(tmp_path / "small.imzML", spectra), spectra


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_match_pyimzml(shared_data, name):
  path = shared_data / "imzml" / name
  # "every_bin": every non-empty 10 ppm bin, which np.histogram reproduces exactly.
  msi = imzml.read_imzml(path, channels="every_bin", progress=False)
  spectra = _spectra(path)
  xs = np.array([s[0] for s in spectra])
  ys = np.array([s[1] for s in spectra])
  assert msi.shape == (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
  assert msi.metadata["coordinate_offset"] == [xs.min(), ys.min()]
  assert msi.mask.sum() == len(spectra) == msi.metadata["num_spectra"]
  assert msi.metadata["mode"] == msi.metadata["declared_mode"] == DECLARED_MODE[name]
  assert msi.cube.dtype == np.float32
  assert not msi.cube[~msi.mask].any()
  json.dumps(msi.metadata)  # metadata must stay JSON-serialisable
  for x, y, mz, intensity in spectra:
    assert _pixel(msi, x, y).shape == (msi.num_channels,)
    if msi.metadata["mode"] == "continuous":
      np.testing.assert_array_equal(msi.mz, mz)
      np.testing.assert_array_equal(_pixel(msi, x, y), intensity.astype(np.float32))
    else:
      expected = _reference_bins(msi, mz, intensity)
      np.testing.assert_allclose(_pixel(msi, x, y), expected, rtol=1e-5, atol=1e-6 * expected.max())
      assert _pixel(msi, x, y).sum() == pytest.approx(intensity.sum(), rel=1e-5)


@pytest.mark.parametrize("name", SHIPPED)
def test_fast_index_equals_pyimzml_index(shared_data, name):
  path = shared_data / "imzml" / name
  fast = imzml._open_index(path)
  reference = imzml._open_index(path, parser="pyimzml")
  for field in ("coords", "mz_offsets", "mz_lengths", "intensity_offsets", "intensity_lengths"):
    np.testing.assert_array_equal(getattr(fast, field), getattr(reference, field))


def test_processed_binning_in_da_matches_add_at(shared_data):
  path = shared_data / "imzml" / "metaspace" / "Untreated_3_434_tiny.imzML"
  msi = imzml.read_imzml(path, bin_width=0.25, bin_unit="da", mz_range=(300, 900), keep_empty_bins=True, progress=False)
  assert np.allclose(np.diff(msi.mz), 0.25)
  assert msi.mz[0] == pytest.approx(300.125)
  for x, y, mz, intensity in _spectra(path):
    expected = np.zeros(msi.num_channels)
    keep = (mz >= 300) & (mz < 300 + 0.25 * msi.num_channels)
    np.add.at(expected, np.floor((mz[keep] - 300) / 0.25).astype(int), intensity[keep])
    np.testing.assert_allclose(_pixel(msi, x, y), expected, rtol=1e-5, atol=1e-6 * expected.max())


def test_metadata_and_pixel_size(shared_data):
  msi = imzml.read_imzml(shared_data / "imzml/pyimzml/Example_Continuous.imzML", progress=False)
  assert msi.pixel_size_um == (100.0, 100.0)
  assert msi.metadata["polarity"] == "negative"
  assert msi.metadata["spectrum_type"] == "profile"
  assert msi.metadata["source"].endswith("Example_Continuous.imzML")
  assert imzml.read_imzml(shared_data / "imzml/pym2aia/test.imzML", progress=False).pixel_size_um == (20.0, 20.0)
  meta = imzml.read_imzml(shared_data / "imzml/metaspace/Untreated_3_434_tiny.imzML", progress=False)
  assert meta.pixel_size_um is None


@pytest.mark.parametrize("name", SHIPPED)
def test_imzml_info(shared_data, name):
  path = shared_data / "imzml" / name
  info = imzml.imzml_info(path)
  spectra = _spectra(path)
  msi = imzml.read_imzml(path, mz_values=[500.0], progress=False)
  assert info["shape"] == msi.shape
  assert info["num_spectra"] == len(spectra)
  assert info["mode"] == DECLARED_MODE[name]
  assert info["mz_range"] == (min(s[2].min() for s in spectra), max(s[2].max() for s in spectra))
  if info["mode"] == "continuous":
    assert info["num_channels"] == spectra[0][2].size
  else:
    assert info["peaks_per_spectrum"]["max"] == max(s[2].size for s in spectra)


def test_range_subset_equals_slicing_full_read(shared_data):
  path = shared_data / "imzml/pyimzml/Example_Continuous.imzML"
  full = imzml.read_imzml(path, progress=False)
  part = imzml.read_imzml(path, mz_range=(300.0, 400.0), progress=False)
  keep = (full.mz >= 300) & (full.mz <= 400)
  np.testing.assert_array_equal(part.mz, full.mz[keep])
  np.testing.assert_array_equal(part.cube, full.cube[..., keep])
  np.testing.assert_array_equal(part.mask, full.mask)


@pytest.mark.parametrize("name", ["pyimzml/Example_Continuous.imzML", "pym2aia/test.imzML"])
def test_value_subset_equals_window_sums_of_full_read(shared_data, name):
  path = shared_data / "imzml" / name
  full = imzml.read_imzml(path, progress=False)
  values = full.mz[[10, 11, 500, 2000]] + 0.01  # 10 and 11 give overlapping windows
  part = imzml.read_imzml(path, mz_values=values, tol=0.5, tol_unit="da", progress=False)
  np.testing.assert_array_equal(part.mz, values)
  for k, value in enumerate(values):
    np.testing.assert_allclose(part.cube[..., k], full.ion_image(value, 0.5, "da"), rtol=1e-6)
  ion = imzml.read_ion_image(path, values[2], tol=0.5, tol_unit="da", progress=False)
  np.testing.assert_array_equal(ion.cube[..., 0], part.cube[..., 2])


def test_processed_value_windows_match_reference(shared_data):
  path = shared_data / "imzml/metaspace/Untreated_3_434_tiny.imzML"
  values = np.array([300.0, 300.001, 798.5432, 1000.0])  # first two overlap at 10 ppm
  msi = imzml.read_imzml(path, mz_values=values, tol=10, progress=False)
  for x, y, mz, intensity in _spectra(path):
    expected = [intensity[np.abs(mz - v) <= v * 10e-6].sum() for v in values]
    np.testing.assert_allclose(_pixel(msi, x, y), expected, rtol=1e-6)
  assert msi.cube[..., 2].max() > 0


def test_ion_image_reads_only_its_bytes(shared_data, monkeypatch):
  path = shared_data / "imzml/pyimzml/Example_Continuous.imzML"
  read_bytes = []
  original = imzml._read_exact

  def counting(fh, offset, out):
    read_bytes.append(memoryview(out).nbytes)
    return original(fh, offset, out)

  monkeypatch.setattr(imzml, "_read_exact", counting)
  msi = imzml.read_ion_image(path, 400.0, tol=100, progress=False)
  assert msi.num_channels == 1
  # The shared m/z axis (8399 float32) once, then at most two float32 channels of each of the 9 pixels.
  assert read_bytes[0] == 8399 * 4
  assert sum(read_bytes[1:]) <= 9 * 2 * 4


def test_chunking_and_threads_do_not_change_the_result(small_processed):
  path, _ = small_processed
  reference = imzml.read_imzml(path, bin_width=50, num_threads=1, progress=False)
  for chunk in (1, 3):
    other = imzml.read_imzml(path, bin_width=50, chunk_spectra=chunk, num_threads=2, progress=False)
    np.testing.assert_allclose(other.cube, reference.cube, rtol=1e-6)


@pytest.mark.parametrize("mz_dtype", [np.float64, np.float32])
def test_first_and_last_mz_by_pread_equal_the_memory_map(tmp_path, monkeypatch, mz_dtype):
  from msisynth.io import _engine, _ibd

  rng = np.random.default_rng(3)
  spectra = [(x, 1, np.sort(rng.uniform(100, 900, n)), rng.random(n)) for x, n in ((1, 5), (2, 1), (3, 40))]
  index = imzml._open_index(_write(tmp_path / "ends.imzML", spectra, mz_dtype=mz_dtype))
  ids = np.array([2, 0, 1])
  expected = np.array([[s[2][0], s[2][-1]] for s in (spectra[i] for i in ids)]).astype(mz_dtype)
  np.testing.assert_array_equal(_engine.mz_extremes(index, ids), expected)
  monkeypatch.setattr(_ibd, "PREAD", None)  # no pread (Windows): through the memory map
  np.testing.assert_array_equal(_engine.mz_extremes(index, ids), expected)


def test_generated_processed_file_with_hole(small_processed):
  path, spectra = small_processed
  msi = imzml.read_imzml(path, bin_width=1, bin_unit="da", progress=False)
  assert msi.shape == (3, 4) and msi.metadata["coordinate_offset"] == [11, 21]
  assert not msi.mask[1, 2] and msi.mask.sum() == 11
  for x, y, mz, intensity in spectra:
    expected = _reference_bins(msi, mz, intensity.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(_pixel(msi, x, y), expected, rtol=1e-5)


def _random_msi(seed=0, shape=(5, 6), channels=12):
  rng = np.random.default_rng(seed)
  cube = rng.random(shape + (channels,)).astype(np.float32)
  cube[cube < 0.6] = 0  # sparse, as centroided data are
  mask = rng.random(shape) > 0.2
  mask[0, 0] = mask[-1, -1] = True  # keep the bounding box
  cube[~mask] = 0
  cube[-1, -1] = 0  # a measured pixel without any signal
  mz = np.sort(rng.uniform(100, 1000, channels))
  return MSIImage(cube, mz, mask, pixel_size_um=(10.0, 20.0), metadata={"coordinate_offset": [5, 7]})


@pytest.mark.parametrize("mode", ["continuous", "processed"])
def test_write_read_round_trip(tmp_path, mode):
  msi = _random_msi()
  path = imzml.write_imzml(tmp_path / "round.imzML", msi, mode=mode, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["round.ibd", "round.imzML"]
  kwargs = {} if mode == "continuous" else {"mz_values": msi.mz, "tol": 0.0, "tol_unit": "da"}
  back = imzml.read_imzml(path, progress=False, **kwargs)
  assert back.metadata["mode"] == mode
  np.testing.assert_array_equal(back.mz, msi.mz)
  np.testing.assert_array_equal(back.mask, msi.mask)
  np.testing.assert_array_equal(back.cube, msi.cube)
  assert back.pixel_size_um == (10.0, 20.0)
  assert back.metadata["coordinate_offset"] == [5, 7]


def test_round_trip_of_a_shipped_file(shared_data, tmp_path):
  msi = imzml.read_imzml(shared_data / "imzml/galaxyp/Combat_40pixel.imzML", progress=False)
  path = imzml.write_imzml(tmp_path / "copy.imzML", msi, progress=False)
  back = imzml.read_imzml(path, progress=False)
  np.testing.assert_array_equal(back.cube, msi.cube)
  np.testing.assert_array_equal(back.mask, msi.mask)
  assert back.metadata["coordinate_offset"] == msi.metadata["coordinate_offset"]


def test_write_refuses_to_overwrite(tmp_path):
  msi = _random_msi()
  path = imzml.write_imzml(tmp_path / "a.imzML", msi, progress=False)
  with pytest.raises(errors.ConfigError, match="overwrite"):
    imzml.write_imzml(path, msi, progress=False)
  msi.cube[0, 0, :] = 7.0
  imzml.write_imzml(path, msi, overwrite=True, progress=False)
  assert imzml.read_imzml(path, progress=False).cube[0, 0, 0] == 7.0
  with pytest.raises(errors.ConfigError, match="mode"):
    imzml.write_imzml(tmp_path / "b.imzML", msi, mode="auto")
  with pytest.raises(errors.ConfigError, match=".imzML"):
    imzml.write_imzml(tmp_path / "b.txt", msi)


def test_missing_ibd(shared_data, tmp_path):
  path = _copy(shared_data, "pyimzml/Example_Continuous.imzML", tmp_path)
  path.with_suffix(".ibd").unlink()
  with pytest.raises(errors.ImzMLError, match=r"Example_Continuous\.ibd.*missing") as info:
    imzml.read_imzml(path, progress=False)
  assert info.value.path == str(path)


def test_truncated_ibd(shared_data, tmp_path):
  path = _copy(shared_data, "pyimzml/Example_Processed.imzML", tmp_path)
  ibd = path.with_suffix(".ibd")
  ibd.write_bytes(ibd.read_bytes()[:-1000])
  with pytest.raises(errors.ImzMLError, match=r"spectrum 8 at imzML position \(x=3, y=3\).*truncated"):
    imzml.read_imzml(path, progress=False)
  with pytest.raises(errors.ImzMLError, match="truncated"):
    imzml.imzml_info(path)


def test_malformed_xml(shared_data, tmp_path):
  path = _copy(shared_data, "pyimzml/Example_Continuous.imzML", tmp_path)
  text = path.read_text(encoding="ISO-8859-1")
  path.write_text(text.replace("<fileDescription>", "<fileDescription", 1), encoding="ISO-8859-1")
  with pytest.raises(errors.ImzMLError, match="well-formed") as info:
    imzml.read_imzml(path, progress=False)
  assert str(path) in str(info.value)
  # Cut inside the spectrum list: the header parses, the spectrum list does not.
  path.write_text(text[: int(len(text) * 0.8)], encoding="ISO-8859-1")
  with pytest.raises(errors.ImzMLError, match="spectrum list"):
    imzml.read_imzml(path, progress=False)


def test_not_imzml(tmp_path):
  png = tmp_path / "image.imzML"
  png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
  png.with_suffix(".ibd").write_bytes(bytes(64))
  with pytest.raises(errors.ImzMLError, match="well-formed"):
    imzml.read_imzml(png, progress=False)
  other = tmp_path / "other.imzML"
  other.write_text('<?xml version="1.0"?><html><body>hello</body></html>')
  other.with_suffix(".ibd").write_bytes(bytes(64))
  with pytest.raises(errors.ImzMLError, match="not an imzML file"):
    imzml.read_imzml(other, progress=False)
  with pytest.raises(errors.ImzMLError, match="no such file"):
    imzml.read_imzml(tmp_path / "absent.imzML", progress=False)


def test_unsorted_mz_is_read_not_refused(tmp_path):
  """Unsorted m/z arrays are valid data (tests/test_io_imzml_quirks.py checks them in detail)."""
  spectra = [(1, 1, [100.0, 101.0, 102.0], [1, 2, 3]), (2, 1, [100.0, 102.0, 101.0], [1, 3, 2])]
  path = _write(tmp_path / "unsorted.imzML", spectra)
  msi = imzml.read_imzml(path, bin_width=0.5, bin_unit="da", progress=False)
  np.testing.assert_array_equal(msi.cube[0, 0], msi.cube[0, 1])


def test_nan_intensities(tmp_path):
  spectra = [(1, 1, [100.0, 101.0], [1.0, 2.0]), (1, 2, [100.0, 101.0], [np.nan, 4.0])]
  path = _write(tmp_path / "nan.imzML", spectra)
  with pytest.raises(errors.ImzMLError, match=r"\(x=1, y=2\).*NaN"):
    imzml.read_imzml(path, bin_width=1, bin_unit="da", progress=False)
  msi = imzml.read_imzml(path, bin_width=1, bin_unit="da", nan_policy="zero", progress=False)
  np.testing.assert_array_equal(msi.cube[1, 0], [0.0, 4.0])
  np.testing.assert_array_equal(msi.cube[0, 0], [1.0, 2.0])
  continuous = _write(tmp_path / "nan_c.imzML", spectra, mode="continuous")
  with pytest.raises(errors.ImzMLError, match=r"\(x=1, y=2\).*NaN"):
    imzml.read_imzml(continuous, progress=False)


def _empty_spectra(path, which):
  """Sets the array lengths of the given spectra (0-based) to 0 in the XML."""
  text = path.read_text(encoding="ISO-8859-1")
  parts = re.split(r"(?=<spectrum )", text)
  for i in which:
    parts[i + 1] = re.sub(r'(name="external array length" value=")\d+', r"\g<1>0", parts[i + 1])
  path.write_text("".join(parts), encoding="ISO-8859-1")


@pytest.mark.parametrize("mode", ["processed", "continuous"])
def test_empty_spectra_are_measured_zeros(tmp_path, mode):
  spectra = [(1, 1, [100.0, 101.0], [1.0, 2.0]), (2, 1, [100.0, 101.0], [3.0, 4.0]), (3, 1, [100.0, 101.0], [5.0, 6.0])]
  path = _write(tmp_path / "empty.imzML", spectra, mode=mode)
  _empty_spectra(path, [1])
  msi = imzml.read_imzml(path, bin_width=1, bin_unit="da", progress=False)
  assert msi.mask.all()
  np.testing.assert_array_equal(msi.cube[0, :, 0], [1.0, 0.0, 5.0])
  assert imzml.imzml_info(path)["num_empty_spectra"] == 1
  _empty_spectra(path, [0, 1, 2])
  with pytest.raises(errors.ImzMLError, match="every spectrum is empty"):
    imzml.read_imzml(path, progress=False)


def test_uuid_mismatch(shared_data, tmp_path):
  path = _copy(shared_data, "pyimzml/Example_Continuous.imzML", tmp_path)
  ibd = path.with_suffix(".ibd")
  data = bytearray(ibd.read_bytes())
  data[0] ^= 0xFF
  ibd.write_bytes(bytes(data))
  with pytest.raises(errors.ImzMLError, match="UUID"):
    imzml.read_imzml(path, progress=False)
  assert imzml.read_imzml(path, check_uuid=False, progress=False).shape == (3, 3)


def test_duplicate_positions_and_3d(tmp_path):
  dup = _write(tmp_path / "dup.imzML", [(1, 1, [100.0], [1.0]), (1, 1, [100.0], [2.0])])
  with pytest.raises(errors.ImzMLError, match="share this pixel"):
    imzml.read_imzml(dup, progress=False)
  path = tmp_path / "three_d.imzML"
  with ImzMLWriter(str(path), mode="processed") as writer:
    for z in (1, 2):
      writer.addSpectrum(np.array([100.0, 200.0]), np.array([z, 10.0 * z], np.float32), (1, 1, z))
  with pytest.raises(errors.ImzMLError, match="z="):
    imzml.read_imzml(path, progress=False)
  msi = imzml.read_imzml(path, z=2, mz_values=[100.0, 200.0], tol=0, tol_unit="da", progress=False)
  np.testing.assert_array_equal(msi.cube[0, 0], [2.0, 20.0])


def test_unusual_xml_layout_falls_back_to_the_xml_parser(shared_data, tmp_path):
  path = _copy(shared_data, "pyimzml/Example_Processed.imzML", tmp_path)
  text = path.read_text(encoding="ISO-8859-1")
  # Same document with the value attribute before the accession: valid XML the fast scanner does not read.
  swapped = re.sub(
    r'<cvParam (cvRef="IMS" )?accession="([^"]+)"(.*?) value="([^"]*)"', r'<cvParam value="\4" \1accession="\2"\3', text
  )
  assert swapped != text
  path.write_text(swapped, encoding="ISO-8859-1")
  assert imzml._scan_spectrum_list(path, imzml._parse_header(path)) is None
  reference = imzml.read_imzml(shared_data / "imzml/pyimzml/Example_Processed.imzML", bin_width=100, progress=False)
  np.testing.assert_array_equal(imzml.read_imzml(path, bin_width=100, progress=False).cube, reference.cube)


def test_argument_validation(shared_data):
  path = shared_data / "imzml/pyimzml/Example_Continuous.imzML"
  for kwargs in (
    {"bin_width": -1},
    {"mz_values": [100], "mz_range": (1, 2)},
    {"tol_unit": "percent"},
    {"mz_range": (5, 1)},
    {"nan_policy": "ignore"},
    {"mz_values": [100, 100]},
    {"chunk_spectra": 0},
  ):
    with pytest.raises(errors.ConfigError):
      imzml.read_imzml(path, progress=False, **kwargs)
  with pytest.raises(errors.ConfigError, match="GiB"):
    imzml.read_imzml(path, bin_width=0.001, max_cube_gib=1e-3, progress=False)
  with pytest.raises(errors.ImzMLError, match="no channel"):
    imzml.read_imzml(path, mz_range=(5000, 6000), progress=False)
  with pytest.raises(errors.ConfigError):
    imzml.mz_bin_edges(100, 50, 10)


def test_bin_edges():
  edges = imzml.mz_bin_edges(100.0, 200.0, 1000.0, "ppm")
  np.testing.assert_allclose(edges[1:] / edges[:-1], 1.001)
  assert edges[0] == 100.0 and edges[-2] <= 200.0 < edges[-1]
  da = imzml.mz_bin_edges(100.0, 101.0, 0.5, "da")
  np.testing.assert_allclose(da, [100.0, 100.5, 101.0, 101.5])


def test_io_does_not_import_jax_or_matplotlib():
  code = (
    "import sys, msisynth.io, msisynth.datasets; print(sorted(m for m in ('jax', 'matplotlib') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_processed_binning_drops_only_empty_bins(tmp_path):
  """Centroided processed data: only bins some spectrum reaches become channels, unless keep_empty_bins."""
  spectra = [(1, 1, [100.0, 150.0, 200.0], [1.0, 2.0, 3.0]), (2, 1, [150.0, 250.0], [4.0, 5.0])]
  path = _write(tmp_path / "centroided.imzML", spectra)
  compact = imzml.read_imzml(path, channels="every_bin", progress=False)
  full = imzml.read_imzml(path, keep_empty_bins=True, progress=False)
  assert compact.num_channels == 4
  assert full.num_channels > 1000
  assert compact.metadata["binning"]["empty_bins_dropped"] == full.num_channels - 4
  occupied = full.cube.any(axis=(0, 1))
  np.testing.assert_array_equal(compact.mz, full.mz[occupied])
  np.testing.assert_array_equal(compact.cube, full.cube[..., occupied])
