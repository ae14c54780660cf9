"""Tests of msisynth.preprocess against NumPy references and hand-computed values."""

import json

import jax
import numpy as np
import pytest
import scipy.optimize

from msisynth import errors
from msisynth import preprocess as pp
from msisynth.types import MSIImage


def _cube(seed, shape=(6, 7, 12)):
  """A sparse-ish non-negative cube with one all-zero pixel at (1, 2)."""
  rng = np.random.default_rng(seed)
  cube = rng.gamma(2.0, 1.0, shape) * (rng.random(shape) < 0.7)
  cube[1, 2] = 0.0
  return cube.astype(np.float32)


def _msi(seed, mz=None, source="section.imzML", shape=(6, 7, 12), **metadata):
  cube = _cube(seed, shape)
  mask = np.ones(shape[:2], bool)
  mask[0, :2] = False
  cube[~mask] = 0.0
  mz = np.linspace(300.0, 400.0, shape[2]) if mz is None else mz
  return MSIImage(cube, mz, mask, pixel_size_um=(10.0, 10.0), metadata={"source": source, **metadata})


# -- normalisation -------------------------------------------------------------------------------------------------


def test_tic_rms_normalize_match_numpy_and_leave_zero_pixels_zero():
  x = _cube(0)
  tic = x.sum(-1, keepdims=True)
  rms = np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True))
  with np.errstate(invalid="ignore", divide="ignore"):
    want_tic = np.where(tic > 0, x / tic, 0.0)
    want_rms = np.where(rms > 0, x / rms, 0.0)
  got_tic = np.asarray(pp.tic_normalize(x))
  got_rms = np.asarray(pp.rms_normalize(x, scale=2.0))
  np.testing.assert_allclose(got_tic, want_tic, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_rms, 2.0 * want_rms, rtol=1e-5, atol=1e-7)
  for got in (got_tic, got_rms):
    assert np.all(np.isfinite(got))
    assert np.all(got[1, 2] == 0.0)
  np.testing.assert_allclose(got_tic.sum(-1)[x.sum(-1) > 0], 1.0, rtol=1e-5)


def test_median_normalize_uses_median_of_nonzero_intensities():
  x = np.array([[0.0, 2.0, 0.0, 4.0, 6.0], [1.0, 0.0, 3.0, 0.0, 0.0], [0.0] * 5, [8.0, 8.0, 8.0, 2.0, 0.0]])
  medians = np.array([4.0, 2.0, 0.0, 8.0])  # odd count, even count (1, 3), none, even count (2, 8, 8, 8)
  got = np.asarray(pp.median_normalize(x))
  want = np.where(medians[:, None] > 0, x / np.where(medians > 0, medians, 1.0)[:, None], 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.all(np.isfinite(got))


def test_normalize_mask_zeroes_other_pixels_and_shapes_are_kept():
  x = _cube(1)
  mask = np.zeros(x.shape[:2], bool)
  mask[2:4, 3:] = True
  for method in pp.NORMALIZATIONS:
    got = np.asarray(pp.normalize(x, method, mask))
    assert got.shape == x.shape
    assert np.all(got[~mask] == 0.0)
  np.testing.assert_array_equal(np.asarray(pp.normalize(x, "none", mask))[mask], x[mask])
  spectra = x.reshape(-1, x.shape[-1])
  np.testing.assert_allclose(
    np.asarray(pp.tic_normalize(spectra, mask.reshape(-1))).reshape(x.shape), np.asarray(pp.tic_normalize(x, mask))
  )


def test_normalize_rejects_bad_input():
  with pytest.raises(errors.DataError, match="negative"):
    pp.tic_normalize(-np.ones((2, 3)))
  with pytest.raises(errors.DataError, match="NaN"):
    pp.rms_normalize(np.array([[1.0, np.nan]]))
  with pytest.raises(errors.ConfigError, match="mask shape"):
    pp.tic_normalize(np.ones((2, 3, 4)), np.ones((3, 2), bool))
  with pytest.raises(errors.ConfigError):
    pp.tic_normalize(np.ones(5))
  with pytest.raises(errors.ConfigError, match="normalization"):
    pp.normalize(np.ones((2, 3)), "l2")


# -- hotspots, mean spectrum, peaks --------------------------------------------------------------------------------


def test_remove_hotspots_clips_at_numpy_quantile_of_masked_pixels():
  x = _cube(2)
  x[3, 3, 5] = 1000.0  # a hotspot
  mask = np.ones(x.shape[:2], bool)
  mask[0] = False
  clipped, thresholds = pp.remove_hotspots(x, 0.9, mask, nonzero=False, return_thresholds=True)
  want_t = np.quantile(x[mask].astype(np.float64), 0.9, axis=0)
  np.testing.assert_allclose(np.asarray(thresholds), want_t, rtol=1e-5)
  want = np.where(mask[..., None], np.minimum(x, want_t), 0.0)
  np.testing.assert_allclose(np.asarray(clipped), want, rtol=1e-5)
  assert float(np.asarray(clipped)[3, 3, 5]) < 1000.0
  # Stored thresholds applied to other data.
  y = _cube(3)
  np.testing.assert_allclose(np.asarray(pp.clip_hotspots(y, thresholds)), np.minimum(y, want_t), rtol=1e-5)
  with pytest.raises(errors.ConfigError):
    pp.remove_hotspots(x, 0.0)
  with pytest.raises(errors.DataError, match="no pixels"):
    pp.remove_hotspots(x, 0.99, np.zeros(x.shape[:2], bool))


def test_mean_spectrum_over_mask():
  x = _cube(4)
  mask = np.random.default_rng(0).random(x.shape[:2]) < 0.5
  np.testing.assert_allclose(np.asarray(pp.mean_spectrum(x, mask)), x[mask].mean(0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(pp.mean_spectrum(x)), x.reshape(-1, 12).mean(0), rtol=1e-5)


def test_pick_peaks_top_n_local_maxima_sorted_by_mz():
  mz = np.arange(100.0, 112.0)
  y = np.array([5, 1, 0, 3, 9, 3, 0, 4, 4, 2, 7, 8])
  # Maxima: 0 (edge, 5), 4 (9), 7-8 flat top -> 7 (4), 11 (edge, 8). Strongest 3: 4, 11, 0.
  np.testing.assert_array_equal(pp.pick_peaks(mz, y, 3), [0, 4, 11])
  np.testing.assert_array_equal(pp.pick_peaks(mz, y, 10), [0, 4, 7, 11])
  # Bins: peaks closer than 4 channels to a stronger one go (7 is 4 from 11, kept; 0 is 4 from 4, kept).
  np.testing.assert_array_equal(pp.pick_peaks(mz, y, 10, min_distance_bins=5), [4, 11])
  # Da and ppm (1 Da at m/z 104 is ~9615 ppm).
  np.testing.assert_array_equal(pp.pick_peaks(mz, y, 10, min_distance_da=4.5), [4, 11])
  np.testing.assert_array_equal(pp.pick_peaks(mz, y, 10, min_distance_ppm=4.5 / 104 * 1e6), [4, 11])
  # A feature axis: channels further apart than the distance are not neighbours, so each can be a peak.
  features = np.array([100.0, 150.0, 150.001, 200.0, 250.0])
  intensity = np.array([1.0, 2.0, 3.0, 5.0, 4.0])
  np.testing.assert_array_equal(pp.pick_peaks(features, intensity, 10, min_distance_ppm=20), [0, 2, 3, 4])
  np.testing.assert_array_equal(pp.pick_peaks(features, intensity, 10), [3])
  assert pp.pick_peaks(mz, np.zeros(12), 3).size == 0
  assert pp.pick_peaks(mz, y, 10, min_intensity=6).tolist() == [4, 11]
  with pytest.raises(errors.ConfigError):
    pp.pick_peaks(mz[::-1], y, 3)


# -- PCA -------------------------------------------------------------------------------------------------------


def _low_rank(seed, n=300, c=40, rank=5):
  rng = np.random.default_rng(seed)
  scales = np.array([10.0, 6.0, 3.0, 1.5, 0.8])[:rank]
  x = (rng.normal(size=(n, rank)) * scales) @ np.linalg.qr(rng.normal(size=(c, rank)))[0].T
  return (x + 0.05 * rng.normal(size=(n, c)) + 3.0).astype(np.float32)


def test_pca_full_matches_numpy_svd():
  x = _low_rank(0)
  res = pp.pca(x, 4, method="full")
  xc = x.astype(np.float64) - x.mean(0)
  _, s, vt = np.linalg.svd(xc, full_matrices=False)
  np.testing.assert_allclose(np.asarray(res.mean), x.mean(0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(res.explained_variance_ratio), s[:4] ** 2 / (s**2).sum(), rtol=1e-4)
  comp = np.asarray(res.components)
  np.testing.assert_allclose(np.abs(comp @ vt[:4].T), np.eye(4), atol=1e-4)  # same axes up to sign
  # Sign convention: the largest-|loading| entry of each axis is positive.
  assert np.all(comp[np.arange(4), np.abs(comp).argmax(1)] > 0)
  np.testing.assert_allclose(np.asarray(res.scores), xc @ comp.T, atol=1e-3)
  assert res.scores.shape == (300, 4)


def test_pca_with_mask_full_and_randomized_agree_with_numpy():
  x = _low_rank(1)
  mask = np.random.default_rng(1).random(300) < 0.8
  xm = x[mask].astype(np.float64)
  xc = xm - xm.mean(0)
  _, s, vt = np.linalg.svd(xc, full_matrices=False)
  for method in ("full", "randomized"):
    res = pp.pca(x, 4, mask=mask, method=method, key=jax.random.key(3))
    assert np.all(np.asarray(res.scores)[~mask] == 0.0)
    comp = np.asarray(res.components)
    # The subspaces agree: the singular values of V_numpy^T V are the cosines of the principal angles.
    cosines = np.linalg.svd(vt[:4] @ comp.T, compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(res.explained_variance_ratio), s[:4] ** 2 / (s**2).sum(), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(res.scores)[mask], xc @ comp.T, atol=1e-3)
  # The cube layout gives the same as its spectra.
  cube = pp.pca(x.reshape(20, 15, 40), 4, mask=mask.reshape(20, 15), method="full")
  assert cube.scores.shape == (20, 15, 4)
  np.testing.assert_allclose(np.asarray(cube.scores).reshape(300, 4), np.asarray(res.scores), atol=1e-3)


def test_pca_with_fewer_pixels_than_channels_matches_numpy_svd():
  x = _low_rank(3)[:9]  # 9 pixels, 40 channels: the rank of the centred data is at most 8
  res = pp.pca(x, 9, method="full")
  xc = x.astype(np.float64) - x.mean(0)
  _, s, vt = np.linalg.svd(xc, full_matrices=False)
  comp = np.asarray(res.components)
  np.testing.assert_allclose(np.abs(comp[:4] @ vt[:4].T), np.eye(4), atol=1e-3)
  np.testing.assert_allclose(np.asarray(res.explained_variance_ratio)[:4], s[:4] ** 2 / (s**2).sum(), rtol=1e-3)
  assert np.all(comp[8] == 0.0)  # beyond the rank
  assert np.all(np.isfinite(np.asarray(res.scores)))


def test_pca_is_reproducible_and_validates():
  x = _low_rank(2)
  a = pp.pca(x, 4, method="randomized", key=jax.random.key(0))
  b = pp.pca(x, 4, method="randomized", key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a.components), np.asarray(b.components))
  with pytest.raises(errors.ConfigError, match="k must"):
    pp.pca(x, 41)
  with pytest.raises(errors.ConfigError, match="method"):
    pp.pca(x, 2, method="arpack")
  with pytest.raises(errors.DataError, match="no pixels"):
    pp.pca(x, 2, mask=np.zeros(300, bool))


def test_pca_on_real_mouse_brain_ion_images(shared_data):
  images = np.load(shared_data / "mouse_brain_abeta" / "ion_images.npy", mmap_mode="r")
  x = np.array(images[::4, ::4], dtype=np.float32)
  measured = ~np.isnan(x).any(-1)  # NaN marks pixels outside the acquisition
  x[~measured] = 0.0
  res = pp.pca(x, 2, mask=measured)
  spectra = x[measured].astype(np.float64)
  _, s, vt = np.linalg.svd(spectra - spectra.mean(0), full_matrices=False)
  np.testing.assert_allclose(np.abs(np.asarray(res.components) @ vt[:2].T), np.eye(2), atol=1e-3)
  np.testing.assert_allclose(np.asarray(res.explained_variance_ratio), s[:2] ** 2 / (s**2).sum(), rtol=1e-3)


# -- NMF -------------------------------------------------------------------------------------------------------


def _nonneg_low_rank(seed, n=42, c=5, k=2):
  rng = np.random.default_rng(seed)
  return (rng.random((n, k)) @ rng.random((k, c))).astype(np.float32)


def test_nmf_decreases_error_and_factors_are_nonnegative():
  x = _nonneg_low_rank(0).reshape(6, 7, 5)
  w, h, err = map(np.asarray, pp.nmf(x, 2, seed=1))
  assert w.shape == (6, 7, 2) and h.shape == (2, 5) and err.shape == (200,)
  assert np.all(w >= 0) and np.all(h >= 0)
  np.testing.assert_allclose(h.max(1), 1.0, rtol=1e-6)
  assert np.all(np.diff(err) <= 1e-4 * err[0])  # non-increasing up to float32 rounding
  assert err[-1] < 0.1 * err[0]
  recon = np.linalg.norm(x.reshape(-1, 5) - w.reshape(-1, 2) @ h)
  np.testing.assert_allclose(err[-1], recon, rtol=1e-3)
  assert recon < 0.05 * np.linalg.norm(x)


def test_nmf_mask_and_errors():
  x = _nonneg_low_rank(1).reshape(6, 7, 5)
  mask = np.ones((6, 7), bool)
  mask[:, :2] = False
  w = np.asarray(pp.nmf(x, 2, mask=mask).w)
  assert np.all(w[~mask] == 0.0) and np.any(w[mask] > 0)
  with pytest.raises(errors.DataError, match="negative"):
    pp.nmf(x - 1.0, 2)


def test_nmf_transform_matches_nonnegative_least_squares():
  rng = np.random.default_rng(2)
  h = rng.random((3, 15)).astype(np.float32)
  x = (rng.random((8, 3)) @ h + 0.01 * rng.random((8, 15))).astype(np.float32)
  w = np.asarray(pp.nmf_transform(x, h, n_iter=3000))
  want = np.stack([scipy.optimize.nnls(h.T.astype(np.float64), row.astype(np.float64))[0] for row in x])
  np.testing.assert_allclose(w, want, atol=2e-3)
  # A pixel's weights depend on that pixel alone.
  np.testing.assert_allclose(np.asarray(pp.nmf_transform(x[:3], h, n_iter=3000)), w[:3], rtol=1e-5, atol=1e-7)


# -- scaling ---------------------------------------------------------------------------------------------------


def test_scale_to_range_matches_formula_and_sets_lo_off_mask():
  x = _cube(5)
  x[..., 0] = 2.0  # a constant channel: a step, never NaN
  mask = np.ones(x.shape[:2], bool)
  mask[4:] = False
  y, (a, b) = pp.scale_to_range(x, quantiles=(0.05, 0.9), mask=mask, return_bounds=True)
  y = np.asarray(y)
  qa, qb = np.quantile(x[mask].astype(np.float64), [0.05, 0.9], axis=0)
  np.testing.assert_allclose(np.asarray(a), qa, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(b), qb, rtol=1e-5)
  with np.errstate(invalid="ignore", divide="ignore"):
    want = -1.0 + 2.0 * np.clip((x - qa) / (qb - qa), 0.0, 1.0)
  np.testing.assert_allclose(y[mask][:, 1:], want[mask][:, 1:], atol=1e-5)
  assert np.all(y[mask][:, 0] == -1.0)
  assert np.all(y[~mask] == -1.0)
  assert np.all(np.isfinite(y)) and y.min() >= -1.0 and y.max() <= 1.0
  z = np.asarray(pp.scale_to_range(x, 0.0, 1.0))
  assert z.min() == 0.0 and z.max() == 1.0
  with pytest.raises(errors.ConfigError):
    pp.scale_to_range(x, quantiles=(0.9, 0.1))


# -- MSIPreprocessor -------------------------------------------------------------------------------------------


def _by_hand(p, msi):
  """The stored transform applied with NumPy, from the stored state (PCA, TIC, hotspot clipping, sqrt)."""
  x = msi.cube.astype(np.float64)
  tic = x.sum(-1, keepdims=True)
  x = np.where(tic > 0, x / np.where(tic > 0, tic, 1.0), 0.0)
  x = np.minimum(x, p.hotspot_thresholds)
  x = np.sqrt(x)  # the default variance transform
  f = (x - p.mean) @ p.components.T
  y = -1.0 + 2.0 * np.clip((f - p.scale_lo) / (p.scale_hi - p.scale_lo), 0.0, 1.0)
  return np.where(msi.mask[..., None], y, -1.0)


def test_preprocessor_applies_stored_state_to_a_second_section():
  train, other = _msi(0, source="train.imzML"), _msi(1, source="other.imzML")
  p = pp.MSIPreprocessor(pp.PreprocessConfig(n_components=3, hotspot_quantile=0.95))
  out_train = p.fit_transform(train)
  assert out_train.shape == (6, 7, 3) and out_train.dtype == np.float32
  assert out_train.min() >= -1.0 and out_train.max() <= 1.0
  assert np.all(out_train[~train.mask] == -1.0)
  np.testing.assert_allclose(out_train, _by_hand(p, train), atol=1e-4)
  out_other = p.transform(other)
  np.testing.assert_allclose(out_other, _by_hand(p, other), atol=1e-4)
  refit = pp.MSIPreprocessor(p.config).fit_transform(other)
  assert np.abs(refit - out_other).max() > 0.05
  assert p.fitted_on == "train.imzML"
  mz, tol, unit = p.required_mz()
  np.testing.assert_array_equal(mz, train.mz)
  assert (tol, unit) == (10.0, "ppm")


@pytest.mark.parametrize(
  "config",
  [
    pp.PreprocessConfig(n_components=3),
    pp.PreprocessConfig(channels="peaks", n_peaks=5, normalization="median", reduction="nmf", n_components=2),
    pp.PreprocessConfig(channels="mz", mz_values=(300.0, 350.0), tol=5.0, tol_unit="da", reduction="none"),
  ],
  ids=["pca", "peaks-nmf", "mz-none"],
)
def test_preprocessor_round_trip_gives_identical_output(config, tmp_path):
  train, other = _msi(2), _msi(3, source="other.imzML")
  p = pp.MSIPreprocessor(config).fit(train)
  d = json.loads(json.dumps(p.to_dict()))
  assert d["format"] == pp.PREPROCESSOR_FORMAT and d["version"] == pp.PREPROCESSOR_VERSION
  assert set(d) == {"format", "version", "config", "state"}
  q = pp.MSIPreprocessor.from_dict(d)
  path = p.save(tmp_path / "sub" / "preprocessor.json")
  r = pp.MSIPreprocessor.load(path)
  want = p.transform(other)
  for restored in (q, r):
    np.testing.assert_array_equal(restored.transform(other), want)
    np.testing.assert_array_equal(restored.mz, p.mz)
  assert want.shape[-1] == p.num_output_channels
  np.testing.assert_array_equal(p.fit_transform(train), p.transform(train))
  with pytest.raises(errors.ConfigError, match="exists"):
    p.save(path)
  p.save(path, overwrite=True)


def test_preprocessor_maps_channels_onto_a_different_mz_axis():
  train = _msi(4)
  p = pp.MSIPreprocessor(pp.PreprocessConfig(channels="peaks", n_peaks=4, tol=5.0, reduction="none")).fit(train)
  want = p.transform(train)
  # Shifted by 2 ppm: the nearest channels within 5 ppm.
  shifted = MSIImage(train.cube, train.mz * (1 + 2e-6), train.mask, metadata={"source": "shifted.imzML"})
  np.testing.assert_array_equal(p.transform(shifted), want)
  # Each channel split in two bins 1 ppm either side, half the intensity each: summed back.
  half = train.cube / 2
  split_mz = np.stack([train.mz * (1 - 1e-6), train.mz * (1 + 1e-6)], -1).reshape(-1)
  split = MSIImage(np.repeat(half, 2, axis=-1), split_mz, train.mask, metadata={"source": "split.imzML"})
  np.testing.assert_allclose(p.transform(split), want, atol=1e-6)


def test_preprocessor_all_channels_caps_tolerance_at_half_the_spacing():
  train = _msi(8, mz=np.array([300.0, 300.004, 300.010, 350.0, 360.0, 370.0, 380.0, 390.0, 400.0, 410.0, 420.0, 430.0]))
  p = pp.MSIPreprocessor(pp.PreprocessConfig(n_components=2, tol=50.0)).fit(train)
  mz, tol, unit = p.required_mz()
  assert unit == "ppm" and tol <= 0.5 * (mz[1] - mz[0]) / mz[1] * 1e6 < 50.0
  # Each stored channel takes exactly its own channel of the fitted file.
  np.testing.assert_array_equal(p.select_channels(train), train.cube)


def test_preprocessor_on_real_imzml_gives_the_same_from_a_subset_read(shared_data):
  from msisynth.io import read_imzml

  path = shared_data / "imzml" / "pym2aia" / "test.imzML"
  full = read_imzml(path, progress=False)
  p = pp.MSIPreprocessor(pp.PreprocessConfig(channels="peaks", n_peaks=8, reduction="pca", n_components=2))
  want = p.fit_transform(full)
  mz, tol, unit = p.required_mz()
  subset = read_imzml(path, mz_values=mz, tol=tol, tol_unit=unit, progress=False)
  np.testing.assert_allclose(p.transform(subset), want, atol=1e-5)
  assert p.fitted_on == str(path)
  assert np.all(want[~full.mask] == -1.0) and np.all(np.isfinite(want))


def test_preprocessor_raises_naming_file_and_missing_mz():
  train = _msi(5)
  p = pp.MSIPreprocessor(pp.PreprocessConfig(n_components=3)).fit(train)
  mz = train.mz.copy()
  mz[-3:] += 1.0  # the last three channels moved far outside 10 ppm
  new = MSIImage(train.cube, mz, train.mask, metadata={"source": "/data/new_section.imzML"})
  with pytest.raises(errors.DataError, match="new_section.imzML") as info:
    p.transform(new)
  assert info.value.path == "/data/new_section.imzML"
  assert "3 of the 12" in str(info.value)
  for value in train.mz[-3:]:
    assert f"{value:.4f}" in str(info.value)


def test_preprocessor_zero_tic_pixels_give_no_nan():
  msi = _msi(6)
  msi.cube[2:4] = 0.0  # measured but empty spectra
  for normalization in pp.NORMALIZATIONS:
    out = pp.MSIPreprocessor(pp.PreprocessConfig(normalization=normalization, n_components=3)).fit_transform(msi)
    assert np.all(np.isfinite(out))
    assert np.all(out[2:4] == out[2, 0])  # all empty pixels map to the same point


def test_preprocessor_errors():
  msi = _msi(7)
  with pytest.raises(errors.ConfigError, match="not fitted"):
    pp.MSIPreprocessor().transform(msi)
  with pytest.raises(errors.ConfigError, match="normalization"):
    pp.PreprocessConfig(normalization="l1")
  with pytest.raises(errors.ConfigError, match="mz_values"):
    pp.PreprocessConfig(channels="mz")
  with pytest.raises(errors.ConfigError, match="overlap"):
    pp.PreprocessConfig(channels="mz", mz_values=(300.0, 300.001), tol=10.0)
  with pytest.raises(errors.ConfigError, match="n_components"):
    pp.MSIPreprocessor(pp.PreprocessConfig(n_components=20)).fit(msi)
  bad = MSIImage(msi.cube - 5.0, msi.mz, msi.mask, metadata={"source": "neg.imzML"})
  with pytest.raises(errors.DataError, match="neg.imzML"):
    pp.MSIPreprocessor().fit(bad)
  with pytest.raises(errors.ConfigError, match="version"):
    pp.MSIPreprocessor.from_dict({**pp.MSIPreprocessor().to_dict(), "version": 99})


# -- hotspots of localised ions, variance transforms, sparse input -------------------------------------------------


def test_hotspot_quantile_is_over_pixels_where_the_ion_is_present():
  x = _cube(4)
  mask = np.ones(x.shape[:2], bool)
  thresholds = np.asarray(pp.hotspot_thresholds(x, 0.9, mask))
  for c in range(x.shape[-1]):
    column = x[..., c][mask]
    np.testing.assert_allclose(thresholds[c], np.quantile(column[column != 0], 0.9), rtol=1e-6)
  empty = np.zeros((4, 4, 2), np.float32)
  empty[..., 1] = 1.0
  t = np.asarray(pp.hotspot_thresholds(empty, 0.99))
  assert t[0] == np.finfo(np.float32).max and t[1] == 1.0


def test_an_ion_in_half_a_percent_of_the_tissue_survives_default_preprocessing():
  """A 0.5 % patch (50 of 10,000 pixels) of a localised ion keeps its contrast through the default steps."""
  rng = np.random.default_rng(0)
  h = w = 100
  cube = rng.gamma(5.0, 1.0, (h, w, 6)).astype(np.float32)
  cube[..., 5] = 0.0
  cube[40:45, 60:70, 5] = 100.0  # the localised ion: 50 pixels
  msi = MSIImage(cube, np.linspace(500.0, 600.0, 6), np.ones((h, w), bool), metadata={"source": "patch.imzML"})
  # The old rule (zeros included) erased it.
  old = np.asarray(pp.remove_hotspots(cube, 0.99, nonzero=False))
  assert not old[..., 5].any()
  config = pp.PreprocessConfig(reduction="none")  # every other option at its default
  out = pp.MSIPreprocessor(config).fit_transform(msi)[..., 5]
  inside = out[40:45, 60:70]
  outside = np.delete(out.reshape(-1), (np.arange(40, 45)[:, None] * w + np.arange(60, 70)).reshape(-1))
  assert inside.min() > 0.9 and outside.max() == -1.0
  clipped = np.asarray(pp.remove_hotspots(cube, 0.99))[..., 5]
  assert clipped[40:45, 60:70].min() == 100.0


def test_variance_transforms():
  x = _cube(5)
  mask = np.ones(x.shape[:2], bool)
  mask[0] = False
  np.testing.assert_allclose(np.asarray(pp.stabilize_variance(x, "sqrt", mask=mask))[mask], np.sqrt(x[mask]), rtol=1e-6)
  s = pp.fit_variance_scale(x, "log1p", mask)
  np.testing.assert_allclose(s, [np.median(x[mask][x[mask] > 0])], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(pp.stabilize_variance(x, "log1p", s, mask))[mask], np.log1p(x[mask] / s),
                             rtol=1e-5)
  s = pp.fit_variance_scale(x, "pareto", mask)
  np.testing.assert_allclose(s, np.sqrt(x[mask].std(axis=0)), rtol=1e-5)
  y = np.asarray(pp.stabilize_variance(x, "pareto", s, mask))
  np.testing.assert_allclose(y[mask], x[mask] / s, rtol=1e-5)
  assert not y[~mask].any()
  with pytest.raises(errors.ConfigError):
    pp.stabilize_variance(x, "pareto")
  with pytest.raises(errors.DataError):
    pp.stabilize_variance(-x - 1, "sqrt")
  with pytest.raises(errors.ConfigError):
    pp.PreprocessConfig(variance="cube-root")


@pytest.mark.parametrize("variance", ["sqrt", "log1p", "pareto"])
def test_preprocessor_variance_round_trip(variance):
  train, other = _msi(6), _msi(7, source="other.imzML")
  p = pp.MSIPreprocessor(pp.PreprocessConfig(n_components=2, variance=variance)).fit(train)
  q = pp.MSIPreprocessor.from_dict(json.loads(json.dumps(p.to_dict())))
  np.testing.assert_array_equal(p.transform(other), q.transform(other))
  # Descriptions from before the option existed read back as no transform.
  d = p.to_dict()
  del d["config"]["variance"]
  d["state"]["variance_scale"] = None
  assert pp.MSIPreprocessor.from_dict(d).config.variance == "none"


def test_preprocessor_fits_from_sparse_data():
  from msisynth.io.sparse import SparseMSI

  msi = _msi(8, mz=np.array([300.0, 300.5, 301.0, 350.0, 351.0, 352.0, 400.0, 401.0, 402.0, 450.0, 451.0, 452.0]))
  sparse = SparseMSI.from_msi(msi)
  config = pp.PreprocessConfig(channels="mz", mz_values=(300.0, 350.0, 400.0, 450.0), tol=0.1, tol_unit="da",
                               n_components=2)  # fmt: skip
  dense = pp.MSIPreprocessor(config).fit(msi)
  from_sparse = pp.MSIPreprocessor(config).fit(sparse)
  np.testing.assert_allclose(from_sparse.transform(msi), dense.transform(msi), atol=1e-5)
  np.testing.assert_allclose(from_sparse.transform(sparse), dense.transform(msi), atol=1e-5)
  peaks = pp.MSIPreprocessor(pp.PreprocessConfig(channels="peaks", n_peaks=3, tol=0.1, tol_unit="da",
                                                 n_components=2)).fit(sparse)  # fmt: skip
  assert peaks.mz.size == 3 and set(peaks.mz) <= set(msi.mz.round(6))
  with pytest.raises(errors.ConfigError, match="dense"):
    pp.MSIPreprocessor(pp.PreprocessConfig()).fit(sparse)
