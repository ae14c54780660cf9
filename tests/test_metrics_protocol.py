"""Tests of the bias-corrected MI and the texture KID in msisynth.metrics, on inputs with known answers."""

import numpy as np
import pytest
from scipy import ndimage, stats

from msisynth import errors, metrics


def _gaussian_pair(rho, n, seed=0):
  """Two images whose pixels are correlated unit Gaussians mapped to [0, 1] by the normal CDF (MI unchanged)."""
  z = np.random.default_rng(seed).multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=(n, n))
  return stats.norm.cdf(z[..., 0]), stats.norm.cdf(z[..., 1])


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6])
def test_corrected_mi_matches_the_gaussian_formula(rho):
  a, b = _gaussian_pair(rho, 200)
  truth = metrics.gaussian_mi_bits(rho)
  for correction in ("miller_madow", "permutation"):
    r = metrics.mutual_information_corrected(a, b, bins=16, correction=correction, n_permutations=5)
    # 16 equal-probability bins lose a little information at rho = 0.6 (discretisation), hence the tolerance.
    assert r["mi_bits"] == pytest.approx(truth, abs=0.025), correction
    assert r["n_pixels"] == 40_000 and r["bins"] == 16


def test_correction_removes_most_of_the_small_sample_bias():
  a, b = _gaussian_pair(0.0, 32, seed=3)  # 1,024 pixels, 8 bins: 16 per cell
  plugin = metrics.mutual_information_corrected(a, b, bins=8, correction="none")["mi_bits"]
  mm = metrics.mutual_information_corrected(a, b, bins=8, correction="miller_madow")
  perm = metrics.mutual_information_corrected(a, b, bins=8, correction="permutation", n_permutations=20)
  # The plug-in bias of independent images is about (bins - 1)^2 / (2 N ln 2) = 0.035 bits.
  assert plugin > 0.02
  assert abs(mm["mi_bits"]) < plugin / 3 and abs(perm["mi_bits"]) < plugin / 3
  assert mm["plugin_bits"] == pytest.approx(plugin) and mm["bias_bits"] > 0


def test_region_too_small_for_the_histogram_is_refused():
  a, b = _gaussian_pair(0.5, 30)
  assert metrics.mi_min_pixels(16) == 1024
  with pytest.raises(errors.DataError, match="too few for a 16 x 16-bin MI"):
    metrics.mutual_information_corrected(a, b, bins=16, where="tile 3")
  mask = np.zeros((30, 30), bool)
  mask[:10] = True
  with pytest.raises(errors.DataError, match="tile 3"):
    metrics.mutual_information_corrected(a, b, bins=4, mask=mask[:, :], where="tile 3", pixels_per_cell=40)


def test_non_finite_images_and_bad_options_raise():
  a, b = _gaussian_pair(0.5, 40)
  b[3, 3] = np.nan
  with pytest.raises(errors.DataError, match="non-finite"):
    metrics.mutual_information_corrected(a, b, bins=4)
  with pytest.raises(errors.ConfigError):
    metrics.mutual_information_corrected(a, a, bins=4, correction="ksg?")


def test_rgb_is_compared_by_luminance():
  a, b = _gaussian_pair(0.6, 64)
  rgb = np.repeat(a[..., None], 3, axis=-1)
  grey = metrics.mutual_information_corrected(a, b, bins=8)["mi_bits"]
  assert metrics.mutual_information_corrected(rgb, b, bins=8)["mi_bits"] == pytest.approx(grey, abs=1e-5)


def _texture(seed, n=96):
  rng = np.random.default_rng(seed)
  img = ndimage.gaussian_filter(rng.random((n, n, 3)), (1, 1, 0))
  return np.clip((img - img.min()) / (img.max() - img.min()), 0, 1)


def test_texture_kid_is_near_zero_for_one_distribution_and_large_for_blur():
  real, same = _texture(0), _texture(1)
  blurred = ndimage.gaussian_filter(same, (3, 3, 0))
  k_same = metrics.texture_kid(same, real, patch_size=16)
  k_blur = metrics.texture_kid(blurred, real, patch_size=16)
  assert k_same["n_patches"] == 36
  assert abs(k_same["kid"]) < 0.1 * k_blur["kid"]
  assert k_blur["kid"] > 0.5


def test_texture_features_shape_and_mask():
  img = _texture(2, 64)
  mask = np.zeros((64, 64), bool)
  mask[:32] = True
  f = metrics.texture_features(img, patch_size=16, mask=mask)
  assert f.shape == (8, 36)
  with pytest.raises(errors.DataError, match="at least 2 patches"):
    metrics.kernel_distance(f[:1], f)
