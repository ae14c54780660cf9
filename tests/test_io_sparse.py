"""Sparse CSR spectra (`msisynth.io.sparse`), the default channels of processed files, and coordinate / size checks."""

import pathlib

import numpy as np
import pytest
from pyimzml.ImzMLWriter import ImzMLWriter

from msisynth import errors
from msisynth.io import imzml, sparse
from msisynth.types import MSIImage

IONS = np.array([300.1, 450.2, 600.3, 800.4])


def _write(path, spectra, mode="processed"):
  with ImzMLWriter(str(path), mode=mode, mz_dtype=np.float64, intensity_dtype=np.float32) as writer:
    for x, y, mz, intensity in spectra:
      writer.addSpectrum(np.asarray(mz, np.float64), np.asarray(intensity, np.float32), (x, y))
  return pathlib.Path(path)


def _centroided(tmp_path, height=6, width=8, noise_peaks=30, seed=0, name="c.imzML"):
  """Four ions in every pixel (2 ppm m/z jitter) plus random noise peaks."""
  rng = np.random.default_rng(seed)
  spectra = []
  for y in range(height):
    for x in range(width):
      mz = np.concatenate([IONS * (1 + rng.normal(0, 2e-6, IONS.size)), rng.uniform(250, 850, noise_peaks)])
      intensity = np.concatenate([[100, 50, 80, 60], rng.random(noise_peaks) * 5])
      order = np.argsort(mz)
      spectra.append((x + 1, y + 1, mz[order], intensity[order]))
  return _write(tmp_path / name, spectra), spectra


def test_sparse_read_holds_every_peak_and_matches_the_reader(tmp_path):
  path, spectra = _centroided(tmp_path)
  s = sparse.read_imzml_sparse(path, progress=False)
  assert s.num_pixels == len(spectra) and s.nnz == sum(len(m) for _, _, m, _ in spectra)
  assert s.shape == (6, 8) and s.mask.all()
  for i, (x, y, mz, intensity) in enumerate(spectra):
    a, b = s.indptr[i], s.indptr[i + 1]
    assert (s.rows[i], s.cols[i]) == (y - 1, x - 1)
    np.testing.assert_array_equal(s.mz[a:b], mz)
    np.testing.assert_allclose(s.intensity[a:b], intensity.astype(np.float32))
  # Memory about the .ibd's (m/z float64 + intensity float32 per peak, plus small per-pixel arrays).
  assert s.mz.nbytes + s.intensity.nbytes == path.with_suffix(".ibd").stat().st_size - 16
  # Binning onto any axis equals np.histogram per pixel and the dense reader.
  edges = np.linspace(250.0, 850.0, 61)
  dense = s.bin(edges=edges, drop_empty=False)
  for x, y, mz, intensity in spectra:
    np.testing.assert_allclose(dense.cube[y - 1, x - 1], np.histogram(mz, edges, weights=intensity)[0], rtol=1e-5)
  read = imzml.read_imzml(path, bin_width=100.0, progress=False)
  np.testing.assert_allclose(s.bin(bin_width=100.0).cube, read.cube, rtol=1e-6)
  np.testing.assert_array_equal(s.bin(bin_width=100.0).mz, read.mz)


def test_sparse_spectra_ion_images_and_tic(tmp_path):
  path, spectra = _centroided(tmp_path)
  s = sparse.read_imzml_sparse(path, progress=False)
  tic = s.tic()
  for x, y, mz, intensity in spectra:
    assert tic[y - 1, x - 1] == pytest.approx(intensity.sum(), rel=1e-5)
    window = np.abs(mz - 450.2) <= 450.2 * 10e-6
    assert s.ion_image(450.2, 10, "ppm")[y - 1, x - 1] == pytest.approx(intensity[window].sum(), rel=1e-6)
  spec = s.spectra(bin_width=5.0)
  assert spec.total.sum() == pytest.approx(sum(i.sum() for *_, i in spectra), rel=1e-6)
  np.testing.assert_allclose(spec.mean, spec.total / s.num_pixels)
  around = s.spectra(edges=np.array([300.0, 300.2, 450.0, 450.4, 600.0, 600.6, 800.0, 800.8]))
  np.testing.assert_array_equal(around.pixel_count[::2], s.num_pixels)  # each ion is in every pixel
  # The largest per-pixel value of each bin: the ion, plus any noise peak of that pixel in the same bin (< 5 each).
  assert np.all(around.maximum[::2] >= [100, 50, 80, 60]) and np.all(around.maximum[::2] < [110, 60, 90, 70])
  mz, mean = s.mean_spectrum(edges=np.array([300.0, 300.2, 450.0, 450.4]))
  np.testing.assert_allclose(mean[::2], [100.0, 50.0], atol=1.0)  # the ions, plus the odd noise peak


def test_sparse_peak_picking_and_dense_channels(tmp_path):
  path, spectra = _centroided(tmp_path)
  s = sparse.read_imzml_sparse(path, progress=False)
  peaks = s.pick_peaks(min_pixel_fraction=0.5)
  np.testing.assert_allclose(peaks.mz, IONS, atol=0.003)  # exact centroids of the raw peaks
  assert np.all(peaks.pixel_fraction == 1.0)
  msi = s.to_msi(peaks=peaks)
  assert msi.cube.shape == (6, 8, 4)
  np.testing.assert_allclose(msi.cube[..., 0], 100.0)
  per_pixel = s.pick_peaks("per_pixel", snr=3, min_pixel_fraction=0.5)
  np.testing.assert_allclose(per_pixel.mz, IONS, atol=0.003)
  windows = s.to_msi([300.1, 800.4], tol=10, tol_unit="ppm")
  np.testing.assert_allclose(windows.cube[..., 1], 60.0)
  with pytest.raises(errors.ConfigError):
    s.to_msi([300.1], peaks=peaks)
  with pytest.raises(errors.ConfigError, match="max_cube_gib"):
    s.bin(bin_width=0.001, bin_unit="da", drop_empty=False, max_cube_gib=1e-6)


def test_sparse_from_dense_round_trip():
  rng = np.random.default_rng(1)
  cube = (rng.random((3, 4, 5)) * (rng.random((3, 4, 5)) < 0.5)).astype(np.float32)
  mask = np.ones((3, 4), bool)
  mask[0, 0] = False
  cube[0, 0] = 0
  msi = MSIImage(cube, np.array([100.0, 200.0, 300.0, 400.0, 500.0]), mask)
  s = sparse.SparseMSI.from_msi(msi)
  assert s.nnz == np.count_nonzero(cube) and s.num_pixels == 11
  back = s.to_msi(msi.mz, tol=0.5, tol_unit="da")
  np.testing.assert_array_equal(back.cube, cube)
  np.testing.assert_array_equal(back.mask, mask)


def test_sparse_sums_beyond_float32_are_refused():
  # Two peaks of 3e38 in one bin sum past the float32 range of a dense cube.
  intensity = np.array([3e38, 3e38, 1.0, 1.0], np.float32)
  s = sparse.SparseMSI(np.array([0, 3, 4]), np.array([150.0, 150.0001, 180.0, 150.0]), intensity, np.array([0, 0]),
                       np.array([0, 1]), (1, 2))  # fmt: skip
  with pytest.raises(errors.DataError, match="the sums of 1 pixel"):
    s.bin(bin_width=100.0)
  with pytest.raises(errors.DataError, match="exceed the float32 range"):
    s.to_msi([150.0], tol=100.0)
  assert s.to_msi([180.0], tol=100.0).cube[0, 0, 0] == 1.0


def test_default_processed_read_picks_peaks_within_max_channels(tmp_path):
  path, _ = _centroided(tmp_path, noise_peaks=60)
  msi = imzml.read_imzml(path, progress=False)
  b = msi.metadata["binning"]
  assert b["channels"] == "auto" and b["method"] in ("peaks", "bins") and b["peak_width_ppm"] > 0
  assert msi.num_channels <= imzml.DEFAULT_MAX_CHANNELS
  capped = imzml.read_imzml(path, max_channels=4, progress=False)
  assert capped.metadata["binning"]["method"] == "peaks"
  np.testing.assert_allclose(capped.mz, IONS, atol=0.003)
  np.testing.assert_allclose(capped.cube[..., 0], 100.0, rtol=1e-5)
  # The old behaviour by name: every non-empty 10 ppm bin.
  every = imzml.read_imzml(path, channels="every_bin", progress=False)
  assert every.metadata["binning"]["bin_width"] == 10.0 and every.num_channels > msi.num_channels


def test_default_read_bins_feature_lists_at_the_data_resolution(tmp_path):
  """Few distinct m/z values (a feature list): binning at the estimated peak width keeps them all."""
  spectra = [(x + 1, y + 1, IONS, [1.0, 2.0, 3.0, 4.0]) for y in range(3) for x in range(3)]
  path = _write(tmp_path / "features.imzML", spectra)
  msi = imzml.read_imzml(path, progress=False)
  assert msi.metadata["binning"]["method"] == "bins"
  assert msi.num_channels == 4
  np.testing.assert_allclose(msi.cube[0, 0], [1, 2, 3, 4])
  np.testing.assert_allclose(msi.mz, IONS, rtol=5e-6)


def test_default_read_of_a_large_processed_file_stays_small(tmp_path):
  """A tiny version of the 120 x 120 x 1,500-peak case: the cube has at most max_channels channels."""
  rng = np.random.default_rng(2)
  spectra = [(x + 1, y + 1, np.sort(rng.uniform(100, 1000, 300)), rng.random(300))
             for y in range(12) for x in range(12)]  # fmt: skip
  path = _write(tmp_path / "random.imzML", spectra)
  msi = imzml.read_imzml(path, max_channels=200, progress=False)
  assert msi.num_channels <= 200
  with pytest.raises(errors.ConfigError, match="max_cube_gib"):
    imzml.read_imzml(path, channels="every_bin", keep_empty_bins=True, max_cube_gib=0.01, progress=False)
  assert imzml.read_imzml(path, channels="every_bin", max_cube_gib=None, progress=False).num_channels > 200


def test_outlying_spectrum_is_refused_or_cropped(tmp_path):
  spectra = [(x + 1, y + 1, [100.0, 200.0], [1.0, 2.0]) for y in range(3) for x in range(3)]
  spectra.append((100000, 2, [100.0], [5.0]))
  path = _write(tmp_path / "outlier.imzML", spectra)
  with pytest.raises(errors.ImzMLError, match=r"spectrum 9 at imzML position \(x=100000, y=2\)"):
    imzml.read_imzml(path, progress=False)
  with pytest.raises(errors.ImzMLError, match="outlying"):
    sparse.read_imzml_sparse(path, progress=False)
  msi = imzml.read_imzml(path, outliers="crop", channels="every_bin", progress=False)
  assert msi.shape == (3, 3) and msi.metadata["dropped_spectra"] == [9]
  # Scattered spectra with no bulk to crop to are refused either way.
  scattered = [(1, 1, [100.0], [1.0]), (500, 1, [100.0], [1.0]), (1, 500, [100.0], [1.0])]
  path = _write(tmp_path / "scattered.imzML", scattered)
  with pytest.raises(errors.ImzMLError, match="cover only"):
    imzml.read_imzml(path, outliers="crop", progress=False)


def _patch_length(path, value):
  text = path.read_text(encoding="ISO-8859-1")
  patched = text.replace('name="external array length" value="2"', f'name="external array length" value="{value}"', 1)
  assert patched != text
  path.write_text(patched, encoding="ISO-8859-1")


@pytest.mark.parametrize("value", [2**62, 2**63 - 1, 2**64 + 5, -(2**62)])
def test_huge_lengths_give_an_imzml_error_not_an_overflow(tmp_path, value):
  spectra = [(x + 1, 1, [100.0, 200.0], [1.0, 2.0]) for x in range(3)]
  path = _write(tmp_path / "huge.imzML", spectra)
  _patch_length(path, value)
  for reader in (imzml.read_imzml, imzml.imzml_info, sparse.read_imzml_sparse):
    with pytest.raises(errors.ImzMLError):
      reader(path)


def test_readers_run_in_several_threads_at_once(tmp_path):
  """The compiled kernels are launched from several Python threads (as batch registration does)."""
  import concurrent.futures

  path, _ = _centroided(tmp_path)
  reference = imzml.read_imzml(path, bin_width=50.0, progress=False)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda _: imzml.read_imzml(path, bin_width=50.0, progress=False), range(8)))
    infos = list(pool.map(lambda _: imzml.imzml_info(path), range(8)))
  for msi in results:
    np.testing.assert_array_equal(msi.cube, reference.cube)
  assert all(info["mz_range"] == infos[0]["mz_range"] for info in infos)
