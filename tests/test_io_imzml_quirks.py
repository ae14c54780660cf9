"""Real exporters' imzML quirks, each reproduced in a tiny file the test writes itself.

Unsorted m/z arrays (both modes) and exactly repeated m/z values, cvParams inside <binaryDataArray> that
override the referenceable param groups, zlib-compressed arrays, and a file declared continuous whose spectra
carry axes of their own. The expected values come from the spectra as written, summed by hand.
"""

import logging
import pathlib
import re
import uuid
import zlib

import numpy as np
import pytest

from msisynth import errors
from msisynth.io import imzml

_PRECISION = {np.dtype("<f4"): ("MS:1000521", "32-bit float"), np.dtype("<f8"): ("MS:1000523", "64-bit float")}


def _cv(acc: str, name: str, value: str | None = None) -> str:
  ref = acc.split(":")[0]
  val = "" if value is None else f' value="{value}"'
  return f'<cvParam cvRef="{ref}" accession="{acc}" name="{name}"{val}/>'


def write_raw(
  path,
  spectra,
  *,
  mode="processed",
  mz_dtype="<f8",
  intensity_dtype="<f4",
  group_mz_dtype=None,
  inline_precision=False,
  no_groups=False,
  zlib_arrays=False,
  zlib_in_group=False,
  share_axis=None,
):
  """Writes an imzML/ibd pair by hand: [(x, y, mz, intensity), ...].

  Args:
    mode: the declared mode ("continuous" or "processed").
    group_mz_dtype: the number format the m/z group declares (default `mz_dtype`); with `inline_precision`, each
      m/z array also declares `mz_dtype` inline, which must win.
    no_groups: no referenceable param groups; every array declares its type and format inline.
    zlib_arrays: zlib-compress every array; declared inline, or in the groups with `zlib_in_group`.
    share_axis: store one m/z array for all spectra (default: when mode is continuous).
  """
  path = pathlib.Path(path)
  mz_dtype, intensity_dtype = np.dtype(mz_dtype), np.dtype(intensity_dtype)
  group_mz_dtype = mz_dtype if group_mz_dtype is None else np.dtype(group_mz_dtype)
  share_axis = mode == "continuous" if share_axis is None else share_axis
  file_id = uuid.uuid4()
  ibd = bytearray(file_id.bytes)
  shared = None

  def store(values, dtype):
    raw = np.asarray(values, dtype).tobytes()
    if zlib_arrays:
      raw = zlib.compress(raw)
    ibd.extend(raw)
    return len(ibd) - len(raw), len(raw)

  def array_xml(kind, offset, length, encoded, dtype, group_dtype):
    acc, name = _PRECISION[dtype]
    inline = []
    if no_groups:
      inline.append(_cv("MS:1000514", "m/z array") if kind == "mz" else _cv("MS:1000515", "intensity array"))
      inline.append(_cv(acc, name))
    elif inline_precision and kind == "mz":
      inline.append(_cv(acc, name))
    if zlib_arrays and not zlib_in_group:
      inline.append(_cv("MS:1000574", "zlib compression"))
    ref = "" if no_groups else f'<referenceableParamGroupRef ref="{kind}Array"/>'
    return (
      f'<binaryDataArray encodedLength="0">{ref}{"".join(inline)}'
      + _cv("IMS:1000102", "external offset", offset)
      + _cv("IMS:1000103", "external array length", length)
      + _cv("IMS:1000104", "external encoded length", encoded)
      + "<binary/></binaryDataArray>"
    )

  body = []
  for i, (x, y, mz, intensity) in enumerate(spectra):
    if share_axis and shared is not None:
      mz_at = shared
    else:
      mz_at = store(mz, mz_dtype)
      shared = mz_at if share_axis else None
    int_at = store(intensity, intensity_dtype)
    body.append(
      f'<spectrum id="Scan={i + 1}" index="{i}" defaultArrayLength="0"><scanList count="1"><scan>'
      + _cv("IMS:1000050", "position x", x)
      + _cv("IMS:1000051", "position y", y)
      + '</scan></scanList><binaryDataArrayList count="2">'
      + array_xml("mz", mz_at[0], len(mz), mz_at[1], mz_dtype, group_mz_dtype)
      + array_xml("intensity", int_at[0], len(intensity), int_at[1], intensity_dtype, intensity_dtype)
      + "</binaryDataArrayList></spectrum>"
    )

  def group(kind, dtype):
    acc, name = _PRECISION[dtype]
    array = _cv("MS:1000514", "m/z array") if kind == "mz" else _cv("MS:1000515", "intensity array")
    compression = _cv("MS:1000574", "zlib compression") if zlib_arrays and zlib_in_group else ""
    return f'<referenceableParamGroup id="{kind}Array">{array}{_cv(acc, name)}{compression}</referenceableParamGroup>'

  groups = "" if no_groups else (
    '<referenceableParamGroupList count="2">' + group("mz", group_mz_dtype) + group("intensity", intensity_dtype)
    + "</referenceableParamGroupList>"
  )
  mode_cv = _cv("IMS:1000030", "continuous") if mode == "continuous" else _cv("IMS:1000031", "processed")
  xml = (
    '<?xml version="1.0" encoding="ISO-8859-1"?>\n'
    '<mzML xmlns="http://psi.hupo.org/ms/mzml" version="1.1">\n'
    '<cvList count="2"><cv id="MS" fullName="PSI-MS" version="4.1.0" URI="http://purl.obolibrary.org/obo/ms.obo"/>'
    '<cv id="IMS" fullName="Imaging MS" version="1.1.0" URI="http://www.maldi-msi.org/download/imzml/imagingMS.obo"/>'
    "</cvList>\n"
    f"<fileDescription><fileContent>{mode_cv}"
    + _cv("IMS:1000080", "universally unique identifier", "{" + str(file_id) + "}")
    + f"</fileContent></fileDescription>\n{groups}\n"
    '<run id="run" defaultInstrumentConfigurationRef="ic">\n'
    f'<spectrumList count="{len(spectra)}" defaultDataProcessingRef="dp">\n'
    + "\n".join(body)
    + "\n</spectrumList></run></mzML>\n"
  )
  path.write_text(xml, encoding="ISO-8859-1")
  path.with_suffix(".ibd").write_bytes(bytes(ibd))
  return path


def _window_sums(spectra, centres, tol_da):
  """Per spectrum, the sum of intensities with |mz - centre| <= tol_da, for each centre."""
  out = []
  for _, _, mz, intensity in spectra:
    mz, intensity = np.asarray(mz, np.float64), np.asarray(intensity, np.float64)
    out.append([intensity[np.abs(mz - c) <= tol_da].sum() for c in centres])
  return np.array(out)


UNSORTED = [
  # Extremes in the middle of the arrays (first and last values are not the range), and an exact repeat.
  (1, 1, [150.0, 100.0, 300.0, 120.0], [1.0, 2.0, 3.0, 4.0]),
  (2, 1, [200.0, 120.0, 120.0, 180.0], [5.0, 6.0, 7.0, 8.0]),
  (1, 2, [110.0, 290.0], [9.0, 10.0]),
]


def test_unsorted_processed_spectra_read_as_sorted(tmp_path, caplog):
  path = write_raw(tmp_path / "unsorted.imzML", UNSORTED)
  ordered = [(x, y, np.sort(mz), np.asarray(i)[np.argsort(mz, kind="stable")]) for x, y, mz, i in UNSORTED]
  reference = write_raw(tmp_path / "sorted.imzML", ordered)
  with caplog.at_level(logging.WARNING):
    msi = imzml.read_imzml(path, bin_width=1.0, bin_unit="da", progress=False)
  assert "2 of 3 spectra have m/z arrays that are not sorted" in caplog.text
  expected = imzml.read_imzml(reference, bin_width=1.0, bin_unit="da", progress=False)
  assert msi.metadata["binning"]["mz_range"] == [100.0, 300.0]  # the true range, not first/last values
  np.testing.assert_array_equal(msi.mz, expected.mz)
  np.testing.assert_array_equal(msi.cube, expected.cube)
  assert msi.metadata["binning"]["unsorted_spectra"] == 2
  # The repeated m/z 120 of spectrum (2, 1) lands in one channel holding both intensities.
  k = int(np.argmin(np.abs(msi.mz - 120.5)))
  assert msi.cube[0, 1, k] == 13.0
  # Default ppm bins, kept empty bins and window sums agree with the sorted file too.
  for kwargs in ({}, {"keep_empty_bins": True, "bin_width": 2.0, "bin_unit": "da"}):
    a = imzml.read_imzml(path, progress=False, **kwargs)
    b = imzml.read_imzml(reference, progress=False, **kwargs)
    np.testing.assert_array_equal(a.cube, b.cube)
  centres = [100.0, 120.0, 300.0]
  windows = imzml.read_imzml(path, mz_values=centres, tol=0.01, tol_unit="da", progress=False)
  x0, y0 = windows.metadata["coordinate_offset"]
  got = np.array([windows.cube[y - y0, x - x0] for x, y, _, _ in UNSORTED])
  np.testing.assert_allclose(got, _window_sums(UNSORTED, centres, 0.01))


def test_unsorted_shared_axis_is_permuted_once_and_repeats_merged(tmp_path, caplog):
  axis = [300.0, 100.0, 200.0, 200.0, 400.0, 150.0]
  spectra = [(x, 1, axis, np.arange(6, dtype=np.float32) + 10 * x) for x in (1, 2, 3)]
  path = write_raw(tmp_path / "continuous.imzML", spectra, mode="continuous")
  with caplog.at_level(logging.WARNING):
    msi = imzml.read_imzml(path, progress=False)
  assert "fails to increase at 3 places: 2 decreases, 1 repeats" in caplog.text and "200.0000" in caplog.text
  assert msi.metadata["mode"] == "continuous"
  np.testing.assert_array_equal(msi.mz, [100.0, 150.0, 200.0, 300.0, 400.0])
  for x in (1, 2, 3):
    i = np.arange(6) + 10.0 * x  # intensities in file order: 300, 100, 200, 200, 400, 150
    np.testing.assert_array_equal(msi.cube[0, x - 1], [i[1], i[5], i[2] + i[3], i[0], i[4]])
  # Subsets and windows are taken on the sorted axis.
  sub = imzml.read_imzml(path, mz_range=(140, 250), progress=False)
  np.testing.assert_array_equal(sub.mz, [150.0, 200.0])
  np.testing.assert_array_equal(sub.cube, msi.cube[..., 1:3])
  ion = imzml.read_ion_image(path, 200.0, tol=0.5, tol_unit="da", progress=False)
  np.testing.assert_array_equal(ion.cube[..., 0], msi.cube[..., 2])
  binned = imzml.read_imzml(path, bin_width=100.0, bin_unit="da", progress=False)
  np.testing.assert_allclose(binned.cube.sum(axis=2), msi.cube.sum(axis=2))
  assert imzml.imzml_info(path)["mz_range"] == (100.0, 400.0)


@pytest.mark.parametrize("mode", ["processed", "continuous"])
@pytest.mark.parametrize("bad", [np.nan, 0.0, -5.0])
def test_nan_and_non_positive_mz_name_the_spectrum(tmp_path, mode, bad):
  spectra = [(1, 1, [100.0, 101.0], [1.0, 2.0]), (2, 1, [100.0, bad], [3.0, 4.0])]
  if mode == "continuous":
    spectra = [(x, 1, [100.0, bad], i) for x, _, _, i in spectra]
  path = write_raw(tmp_path / "bad.imzML", spectra, mode=mode)
  position = r"\(x=1, y=1\)" if mode == "continuous" else r"\(x=2, y=1\)"
  what = "NaN" if np.isnan(bad) else "<= 0"
  with pytest.raises(errors.ImzMLError, match=position + ".*" + what):
    imzml.read_imzml(path, bin_width=1.0, bin_unit="da", progress=False)


SPECTRA = [
  (1, 1, [100.0, 100.25, 250.5], [1.0, 2.0, 3.0]),
  (2, 1, [100.25, 300.125], [4.0, 5.0]),
  (1, 2, [100.0, 100.25, 250.5, 300.125], [6.0, 7.0, 8.0, 9.0]),
]


@pytest.mark.parametrize(
  "options",
  [
    {"inline_precision": True, "group_mz_dtype": "<f4"},  # the group says 32-bit, every array says 64-bit
    {"no_groups": True},  # no groups at all: type and format inline
    {"zlib_arrays": True},  # zlib declared inside each array
    {"zlib_arrays": True, "zlib_in_group": True},  # zlib declared in the groups
    {"zlib_arrays": True, "inline_precision": True, "group_mz_dtype": "<f4"},
  ],
)
@pytest.mark.parametrize("mode", ["processed", "continuous"])
def test_per_array_cvparams_and_zlib_read_as_plain(tmp_path, options, mode):
  spectra = SPECTRA
  if mode == "continuous":
    spectra = [(x, y, SPECTRA[2][2], np.arange(4.0) + x + y) for x, y, _, _ in SPECTRA]
  plain = write_raw(tmp_path / "plain.imzML", spectra, mode=mode)
  quirky = write_raw(tmp_path / "quirky.imzML", spectra, mode=mode, **options)
  index = imzml._open_index(quirky)
  assert index.header.mz_dtype == np.dtype("<f8")
  assert index.continuous == (mode == "continuous")
  expected = imzml.read_imzml(plain, bin_width=0.5, bin_unit="da", progress=False)
  got = imzml.read_imzml(quirky, bin_width=0.5, bin_unit="da", progress=False)
  np.testing.assert_array_equal(got.mz, expected.mz)
  np.testing.assert_array_equal(got.cube, expected.cube)
  np.testing.assert_array_equal(got.mask, expected.mask)
  centres = [100.25, 300.125]
  ion = imzml.read_imzml(quirky, mz_values=centres, tol=0.01, tol_unit="da", progress=False)
  x0, y0 = ion.metadata["coordinate_offset"]
  np.testing.assert_allclose([ion.cube[y - y0, x - x0] for x, y, _, _ in spectra], _window_sums(spectra, centres, 0.01))
  info = imzml.imzml_info(quirky)
  assert info["mz_range"] == imzml.imzml_info(plain)["mz_range"]


def test_zlib_temporary_copy_is_removed(tmp_path):
  path = write_raw(tmp_path / "z.imzML", SPECTRA, zlib_arrays=True)
  index = imzml._open_index(path)
  copy = index.ibd_path
  assert copy.is_file() and copy.parent != tmp_path
  del index
  import gc

  gc.collect()
  assert not copy.parent.exists()


def test_corrupt_zlib_array_names_the_spectrum(tmp_path):
  path = write_raw(tmp_path / "z.imzML", SPECTRA, zlib_arrays=True)
  text = path.read_text(encoding="ISO-8859-1")
  spectrum = re.split(r"(?=<spectrum )", text)[2]
  offset = int(re.search(r'external offset" value="(\d+)"', spectrum).group(1))
  ibd = bytearray(path.with_suffix(".ibd").read_bytes())
  ibd[offset : offset + 4] = b"\x00\x00\x00\x00"
  path.with_suffix(".ibd").write_bytes(bytes(ibd))
  with pytest.raises(errors.ImzMLError, match=r"\(x=2, y=1\).*zlib"):
    imzml.read_imzml(path, progress=False)


def test_declared_continuous_with_copies_of_one_axis_is_continuous(tmp_path):
  axis = [100.0, 200.0, 300.0]
  spectra = [(x, 1, axis, [x, 2.0 * x, 3.0 * x]) for x in (1, 2, 3, 4)]
  path = write_raw(tmp_path / "copies.imzML", spectra, mode="continuous", share_axis=False)
  index = imzml._open_index(path)
  assert np.unique(index.mz_offsets).size == 4 and index.continuous
  msi = imzml.read_imzml(path, progress=False)
  assert msi.metadata["mode"] == "continuous"
  np.testing.assert_array_equal(msi.cube[0, :, 2], [3.0, 6.0, 9.0, 12.0])


def test_shifted_axis_in_a_continuous_file_is_read_as_processed(tmp_path, caplog):
  """Only one spectrum of many has its own (shifted) axis; the old 3-probe check (first, middle, last) missed it."""
  axis = np.array([100.0, 200.0, 300.0])
  spectra = [(x, 1, axis + (0.5 if x == 2 else 0.0), [1.0, 2.0, 3.0]) for x in range(1, 8)]
  path = write_raw(tmp_path / "shifted.imzML", spectra, mode="continuous", share_axis=False)
  with caplog.at_level(logging.WARNING):
    msi = imzml.read_imzml(path, mz_values=[100.0, 100.5], tol=0.01, tol_unit="da", progress=False)
  assert "declared continuous, but 1 of 7 spectra have m/z axes of their own" in caplog.text
  assert "(x=2, y=1)" in caplog.text
  assert msi.metadata["mode"] == "processed" and msi.metadata["declared_mode"] == "continuous"
  np.testing.assert_array_equal(msi.cube[0, :, 0], [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  np.testing.assert_array_equal(msi.cube[0, :, 1], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_every_reader_reads_the_scils_export():
  """The real SCiLS Lab export (msight_bladder), when a local copy exists: every reader reads it."""
  from msisynth import datasets

  try:
    folder = datasets.msight_bladder_dir(download=False)
  except errors.DataError as e:
    pytest.skip(str(e))
  path = folder / "prostate_example.imzML"
  info = imzml.imzml_info(path)
  assert info["mode"] == "continuous" and info["shape"] == (163, 274) and info["num_spectra"] == 33035
  assert info["mz_range"] == pytest.approx((631.104, 1979.033), abs=1e-3)
  ion = imzml.read_ion_image(path, 1450.5458, tol=1, tol_unit="ppm", progress=False)
  msi = imzml.read_imzml(path, mz_range=(1450.5, 1450.6), progress=False)
  assert msi.num_channels == 1 and msi.mz[0] == pytest.approx(1450.5458, abs=1e-4)
  np.testing.assert_array_equal(ion.cube, msi.cube)
  assert ion.mask.sum() == 33035
