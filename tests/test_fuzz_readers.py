"""The imzML and image readers on damaged files: each outcome is the right data or msisynth's own error.

First the damage seen in practice, one regression test each (an imzML cut after a </spectrum> and closed, float64
intensities beyond float32, a PNG with a short but valid image stream, a JPEG cut and closed with an
end-of-image marker); then seeded fuzzing: truncations, cut XML and bit flips of small files.
"""

import io
import pathlib
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from pyimzml.ImzMLWriter import ImzMLWriter

from msisynth import errors
from msisynth import io as msi_io
from msisynth.io import imzml, integrity

SEED = 20240614


def _write_imzml(path, shape=(20, 20), mode="processed", intensity_dtype=np.float32, intensity=None):
  rng = np.random.default_rng(0)
  mz_axis = np.linspace(100, 200, 8)
  with ImzMLWriter(str(path), mode=mode, mz_dtype=np.float64, intensity_dtype=intensity_dtype) as writer:
    for y in range(1, shape[0] + 1):
      for x in range(1, shape[1] + 1):
        values = rng.uniform(1, 10, mz_axis.size) if intensity is None else np.full(mz_axis.size, intensity)
        writer.addSpectrum(mz_axis, values.astype(intensity_dtype), (x, y))
  return pathlib.Path(path)


def _cut_after_spectrum(path, keep):
  """The XML cut after the `keep`-th </spectrum> and closed properly (a well-formed but shortened file)."""
  text = path.read_text(encoding="ISO-8859-1")
  ends = [m.end() for m in re.finditer("</spectrum>", text)]
  path.write_text(text[: ends[keep - 1]] + "\n</spectrumList></run></mzML>\n", encoding="ISO-8859-1")


# ----------------------------------------------------------------------------------------------------------------
# Regressions.


def test_imzml_cut_after_a_spectrum_is_refused(tmp_path):
  path = _write_imzml(tmp_path / "cut.imzML")
  assert imzml.read_imzml(path, progress=False).mask.sum() == 400
  _cut_after_spectrum(path, 199)
  for parser in ("auto", "pyimzml"):
    with pytest.raises(errors.ImzMLError, match=r'count="400"> declares 400 spectra but the file lists 199'):
      imzml._open_index(path, parser=parser)
  with pytest.raises(errors.ImzMLError, match="declares 400 spectra"):
    imzml.read_imzml(path, progress=False)


def test_intensities_beyond_float32_raise_or_clip(tmp_path):
  path = _write_imzml(tmp_path / "big.imzML", shape=(2, 3), mode="continuous", intensity_dtype=np.float64,
                      intensity=1e39)  # fmt: skip
  with pytest.raises(errors.ImzMLError, match=r"position \(x=1, y=1\): intensities exceed the float32 range"):
    imzml.read_imzml(path, progress=False)
  msi = imzml.read_imzml(path, progress=False, overflow="clip")
  assert np.isfinite(msi.cube).all() and msi.cube.max() == np.finfo(np.float32).max
  with pytest.raises(errors.ConfigError, match="overflow"):
    imzml.read_imzml(path, overflow="ignore")


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
@pytest.mark.parametrize("channels", ["bins", "windows"])
def test_sums_beyond_float32_raise_or_clip_in_processed_files(tmp_path, order, channels):
  # Each value fits float32; two of them in one channel do not. Sorted spectra take the kernels' fast path,
  # unsorted ones the general one; both check what they write.
  order = [0, 1, 2] if order == "sorted" else [0, 2, 1]
  mz = np.array([150.0, 150.0001, 180.0])[order]
  path = tmp_path / "sums.imzML"
  with np.errstate(over="ignore"), ImzMLWriter(str(path), mode="processed", mz_dtype=np.float64,
                                               intensity_dtype=np.float32) as writer:  # the writer sums in float32
    for x in (1, 2, 3):
      values = np.array([1.0, 1.0, 1.0] if x != 2 else [3e38, 3e38, 1.0], np.float32)[order]
      writer.addSpectrum(mz, values, (x, 1))
  kwargs = {"bin_width": 100.0} if channels == "bins" else {"mz_values": [150.0, 180.0], "tol": 100.0}
  with pytest.raises(errors.ImzMLError, match=r"position \(x=2, y=1\): intensities exceed the float32 range"):
    imzml.read_imzml(path, progress=False, **kwargs)
  msi = imzml.read_imzml(path, progress=False, overflow="clip", **kwargs)
  assert np.isfinite(msi.cube).all() and msi.cube[0, 1].max() == np.finfo(np.float32).max
  assert msi.cube[0, 0].max() == 2.0 and msi.cube[0, 2].max() == 2.0


def test_float64_image_beyond_float32_is_refused(tmp_path):
  import tifffile

  tifffile.imwrite(tmp_path / "big.tif", np.full((8, 8), 1e39))
  with pytest.raises(errors.ImageReadError, match="exceed the float32 range"):
    msi_io.read_image(tmp_path / "big.tif")


def _chunk(kind, data):
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _rgb(shape=(40, 48)):
  yy, xx = np.mgrid[: shape[0], : shape[1]]
  return np.stack([xx * 5 % 256, yy * 6 % 256, (xx + yy) * 3 % 256], -1).astype(np.uint8)


def test_png_with_a_short_but_valid_image_stream_is_refused(tmp_path):
  image = _rgb()
  raw = b"".join(b"\x00" + row.tobytes() for row in image)
  ihdr = struct.pack(">IIBBBBB", image.shape[1], image.shape[0], 8, 2, 0, 0, 0)
  signature = b"\x89PNG\r\n\x1a\n"
  whole = signature + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
  (tmp_path / "whole.png").write_bytes(whole)
  np.testing.assert_array_equal(msi_io.read_image(tmp_path / "whole.png"), image / np.float32(255))
  short = signature + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw[: 2 * len(raw) // 40]))
  (tmp_path / "short.png").write_bytes(short + _chunk(b"IEND", b""))
  with pytest.raises(errors.ImageReadError, match="short.png: PNG image data holds .* rows are missing"):
    msi_io.read_image(tmp_path / "short.png")
  with pytest.raises(errors.ImageReadError, match="short.png"):
    msi_io.read_histology(tmp_path / "short.png")


@pytest.mark.parametrize("options", [{}, {"subsampling": 0}, {"restart_marker_rows": 1}, {"optimize": True}])
def test_jpeg_cut_and_closed_with_an_end_marker_is_refused(tmp_path, options):
  buffer = io.BytesIO()
  Image.fromarray(_rgb((64, 80))).save(buffer, format="JPEG", quality=90, **options)
  jpeg = buffer.getvalue()
  (tmp_path / "whole.jpg").write_bytes(jpeg)
  assert msi_io.read_histology(tmp_path / "whole.jpg").shape == (64, 80, 3)
  (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2] + b"\xff\xd9")
  with pytest.raises(errors.ImageReadError, match=r"cut.jpg: JPEG is cut short .* ends after \d+ of \d+ blocks"):
    msi_io.read_histology(tmp_path / "cut.jpg")


@pytest.mark.parametrize("grey", [False, True])
def test_progressive_jpeg_cut_between_scans_and_closed_is_refused(tmp_path, grey):
  image = _rgb((64, 80))
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if grey else image).save(buffer, format="JPEG", quality=90, progressive=True)
  jpeg = buffer.getvalue()
  (tmp_path / "whole.jpg").write_bytes(jpeg)
  integrity.check_jpeg(tmp_path / "whole.jpg")
  assert msi_io.read_histology(tmp_path / "whole.jpg").shape[:2] == (64, 80)
  # Cut after the first scans (the DC and first AC bands), before the refinements, and closed: Pillow decodes it.
  sos = [m.start() for m in re.finditer(b"\xff\xda", jpeg)]
  assert len(sos) >= 3
  cut = jpeg[: sos[2]] + b"\xff\xd9"
  (tmp_path / "cut.jpg").write_bytes(cut)
  with Image.open(tmp_path / "cut.jpg") as im:
    im.load()  # no error from the decoder itself
  with pytest.raises(errors.ImageReadError, match=r"cut.jpg: progressive JPEG ends before its scans refine"):
    msi_io.read_histology(tmp_path / "cut.jpg")
  # Cut without the end marker: refused too.
  (tmp_path / "open.jpg").write_bytes(jpeg[: sos[2]])
  with pytest.raises(errors.ImageReadError, match="open.jpg"):
    msi_io.read_histology(tmp_path / "open.jpg")


def test_jpeg_check_without_numba_agrees(tmp_path, monkeypatch):
  buffer = io.BytesIO()
  Image.fromarray(_rgb((32, 40))).save(buffer, format="JPEG", quality=80)
  jpeg = buffer.getvalue()
  (tmp_path / "whole.jpg").write_bytes(jpeg)
  (tmp_path / "cut.jpg").write_bytes(jpeg[: 2 * len(jpeg) // 3] + b"\xff\xd9")
  monkeypatch.setattr(integrity, "_unit_counter", lambda: None)
  integrity.check_jpeg(tmp_path / "whole.jpg")
  with pytest.raises(errors.ImageReadError, match="cut short"):
    integrity.check_jpeg(tmp_path / "cut.jpg")


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing.


def _outcome(read):
  """The array read, or None when msisynth refused the file with its own error; anything else fails the test."""
  try:
    return read()
  except errors.MSISynthError:
    return None


def _flip(data: bytes, rng, n=1, allowed=None) -> bytes:
  data = bytearray(data)
  positions = np.arange(len(data)) if allowed is None else np.asarray(allowed)
  for pos in rng.choice(positions, size=n, replace=False):
    data[pos] ^= 1 << int(rng.integers(8))
  return bytes(data)


@pytest.fixture(scope="module")
def imzml_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fuzz_imzml")
  files = {}
  for mode in ("continuous", "processed"):
    path = _write_imzml(folder / f"{mode}.imzML", shape=(5, 6), mode=mode)
    files[mode] = (path.read_bytes(), path.with_suffix(".ibd").read_bytes(), imzml.read_imzml(path, progress=False))
  return files


def _read_pair(folder, xml: bytes, ibd: bytes):
  path = folder / "fuzz.imzML"
  path.write_bytes(xml)
  path.with_suffix(".ibd").write_bytes(ibd)
  return _outcome(lambda: imzml.read_imzml(path, progress=False))


def _same(msi, reference) -> bool:
  return (
    msi.cube.shape == reference.cube.shape
    and np.array_equal(msi.cube, reference.cube)
    and np.array_equal(msi.mz, reference.mz)
    and np.array_equal(msi.mask, reference.mask)
  )


# The characters of an imzML file whose change alters no value: markup and names, not numbers or identifiers.
_STRUCTURE = re.compile(rb"[<>/=\"a-zA-Z ]")


@pytest.mark.parametrize("mode", ["continuous", "processed"])
def test_fuzz_imzml(imzml_files, tmp_path, mode):
  xml, ibd, reference = imzml_files[mode]
  rng = np.random.default_rng([SEED, mode == "processed"])
  # Markup characters inside <spectrumList>, outside attribute values (a changed value is other data, not damage).
  start = xml.index(b"<spectrumList")
  values = [range(m.start(1), m.end(1)) for m in re.finditer(rb'value="([^"]*)"', xml)]
  in_value = np.zeros(len(xml), bool)
  for span in values:
    in_value[list(span)] = True
  markup = [i for i in range(start, len(xml)) if not in_value[i] and _STRUCTURE.match(xml[i : i + 1])]
  text = xml.decode("ISO-8859-1")
  spectrum_ends = [m.end() for m in re.finditer("</spectrum>", text)]
  cases = []
  cases += [("ibd cut", xml, ibd[: int(rng.integers(0, len(ibd)))]) for _ in range(12)]
  cases += [("xml cut", xml[: int(rng.integers(0, len(xml)))], ibd) for _ in range(12)]
  for keep in rng.choice(len(spectrum_ends) - 1, size=6, replace=False):
    closed = text[: spectrum_ends[keep]] + "\n</spectrumList></run></mzML>\n"
    cases.append(("xml cut and closed", closed.encode("ISO-8859-1"), ibd))
  cases += [("xml markup flipped", _flip(xml, rng, allowed=markup), ibd) for _ in range(24)]
  cases += [("ibd uuid flipped", xml, _flip(ibd, rng, allowed=range(16))) for _ in range(4)]
  wrong = []
  for what, x, b in cases:
    msi = _read_pair(tmp_path, x, b)
    if msi is not None and not _same(msi, reference):
      wrong.append(what)
  assert not wrong, f"read silently wrong data: {wrong}"


def _encoded(fmt: str, folder: pathlib.Path) -> bytes:
  image = np.clip(_rgb((48, 56)).astype(int) + np.random.default_rng(1).integers(-20, 20, (48, 56, 3)), 0, 255)
  image = image.astype(np.uint8)
  buffer = io.BytesIO()
  if fmt == "tif":
    import tifffile

    tifffile.imwrite(buffer, image, photometric="rgb", rowsperstrip=8)
  elif fmt == "tif_deflate":
    import tifffile

    tifffile.imwrite(buffer, image, photometric="rgb", rowsperstrip=8, compression="zlib")
  elif fmt == "tif_float":
    path = folder / "written.tif"
    msi_io.write_image(path, image.astype(np.float32) / 255)  # msisynth's own writer: one strip
    return path.read_bytes()
  elif fmt == "jpg":
    Image.fromarray(image).save(buffer, format="JPEG", quality=85)
  else:
    Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["png", "jpg", "tif", "tif_deflate", "tif_float"])
def test_fuzz_images(tmp_path, fmt):
  data = _encoded(fmt, tmp_path)
  suffix = ".tif" if fmt.startswith("tif") else f".{fmt}"
  path = tmp_path / f"image{suffix}"
  path.write_bytes(data)
  reference = msi_io.read_image(path)
  rng = np.random.default_rng([SEED, len(fmt), len(data)])
  cases = [("cut", data[: int(rng.integers(1, len(data)))]) for _ in range(30)]
  if fmt == "jpg":
    cases += [("cut and closed", data[: int(rng.integers(2, len(data) - 2))] + b"\xff\xd9") for _ in range(20)]
  if fmt == "png":
    iend = _chunk(b"IEND", b"")
    cases += [("cut and closed", data[: int(rng.integers(8, len(data) - 12))] + iend) for _ in range(20)]
    # Every PNG chunk carries a CRC: any flipped bit is detectable.
    cases += [("bit flipped", _flip(data, rng)) for _ in range(30)]
  wrong = []
  for what, damaged in cases:
    path.write_bytes(damaged)
    image = _outcome(lambda: msi_io.read_image(path))
    if image is not None and not (image.shape == reference.shape and np.array_equal(image, reference)):
      wrong.append(what)
  assert not wrong, f"read silently wrong pixels: {wrong}"
