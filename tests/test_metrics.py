"""Tests of msisynth.metrics against scikit-image and NumPy references.

Tolerances: SSIM, NMI and PSNR agree with scikit-image to 1e-5 (absolute; float32 here, float64 there);
MI agrees with a NumPy float64 histogram MI to 1e-5 bits.
"""

import jax
import numpy as np
import pytest
import skimage.color
import skimage.metrics
from absl.testing import parameterized

from msisynth import errors, metrics

TOL = 1e-5
# Few distinct shapes, so that the tests compile few programs.
GREY, RGB = (24, 28), (24, 28, 3)


def _pair(seed, shape, noise=0.2):
  rng = np.random.default_rng(seed)
  a = rng.random(shape).astype(np.float32)
  b = np.clip(a + noise * rng.standard_normal(shape), 0.0, 1.0).astype(np.float32)
  return a, b


def _numpy_mi_bits(a, b, bins, mask=None, value_range=None):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if mask is not None:
    a, b = a[mask], b[mask]
  a, b = a.ravel(), b.ravel()
  ranges = [value_range or (a.min(), a.max()), value_range or (b.min(), b.max())]
  joint, _, _ = np.histogram2d(a, b, bins=bins, range=ranges)
  p = joint / joint.sum()

  def entropy(q):
    q = q[q > 0]
    return -np.sum(q * np.log2(q))

  return entropy(p.sum(1)) + entropy(p.sum(0)) - entropy(p)


def _skimage_ssim(a, b, data_range=1.0, full=False):
  return skimage.metrics.structural_similarity(
    a,
    b,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=data_range,
    channel_axis=-1 if a.ndim == 3 else None,
    full=full,
  )


class SSIMTest(parameterized.TestCase):
  @parameterized.parameters((GREY,), (RGB,))
  def test_matches_skimage(self, shape):
    a, b = _pair(0, shape)
    np.testing.assert_allclose(metrics.ssim(a, b), _skimage_ssim(a, b), atol=TOL)

  def test_data_range(self):
    a, b = _pair(1, GREY)
    a, b = 2 * a - 1, 2 * b - 1
    np.testing.assert_allclose(metrics.ssim(a, b, max_val=2.0), _skimage_ssim(a, b, data_range=2.0), atol=TOL)

  def test_batch_gives_per_image_values(self):
    a, b = _pair(2, (3,) + RGB)
    values = metrics.ssim(a, b)
    self.assertEqual(values.shape, (3,))
    for i in range(3):
      np.testing.assert_allclose(values[i], _skimage_ssim(a[i], b[i]), atol=TOL)

  def test_identical_is_one(self):
    a, _ = _pair(3, RGB)
    np.testing.assert_allclose(metrics.ssim(a, a), 1.0, atol=1e-6)

  def test_mask_averages_windows_inside_mask(self):
    a, b = _pair(4, GREY)
    mask = np.zeros(GREY, bool)
    mask[2:22, 8:28] = True
    # Reference: skimage's map (indexed by window centre), averaged where the whole 11 x 11 window is in the mask.
    _, ssim_map = _skimage_ssim(a, b, full=True)
    centres = np.zeros_like(mask)
    centres[7:17, 13:23] = True
    np.testing.assert_allclose(metrics.ssim(a, b, mask=mask), ssim_map[centres].mean(), atol=TOL)

  def test_change_outside_mask_does_not_change_value(self):
    a, b = _pair(5, RGB)
    mask = np.zeros(GREY, bool)
    mask[4:20, 2:20] = True
    b2 = b.copy()
    b2[~mask] = np.random.default_rng(0).random(b2[~mask].shape)
    self.assertEqual(float(metrics.ssim(a, b, mask=mask)), float(metrics.ssim(a, b2, mask=mask)))
    self.assertNotEqual(float(metrics.ssim(a, b)), float(metrics.ssim(a, b2)))

  def test_too_small_raises(self):
    with self.assertRaises(errors.ConfigError):
      metrics.ssim(np.zeros((8, 20)), np.zeros((8, 20)))


class PSNRTest(parameterized.TestCase):
  @parameterized.parameters((GREY,), (RGB,))
  def test_matches_skimage(self, shape):
    a, b = _pair(6, shape)
    expected = skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
    np.testing.assert_allclose(metrics.psnr(a, b), expected, atol=TOL)

  def test_mask(self):
    a, b = _pair(7, RGB)
    mask = np.random.default_rng(1).random(GREY) > 0.5
    expected = skimage.metrics.peak_signal_noise_ratio(a[mask], b[mask], data_range=1.0)
    np.testing.assert_allclose(metrics.psnr(a, b, mask=mask), expected, atol=TOL)
    b2 = b.copy()
    b2[~mask] = 0.0
    self.assertEqual(float(metrics.psnr(a, b, mask=mask)), float(metrics.psnr(a, b2, mask=mask)))

  def test_identical_is_inf(self):
    a, _ = _pair(8, GREY)
    self.assertEqual(float(metrics.psnr(a, a)), np.inf)


class HistogramMetricsTest(parameterized.TestCase):
  @parameterized.parameters((32, None), (16, (0.0, 1.0)))
  def test_mi_matches_numpy(self, bins, value_range):
    a, b = _pair(9, GREY, noise=0.3)
    expected = _numpy_mi_bits(a, b, bins, value_range=value_range)
    np.testing.assert_allclose(metrics.mutual_information(a, b, bins=bins, value_range=value_range), expected, atol=TOL)

  def test_mi_rgb_uses_luminance(self):
    a, b = _pair(10, RGB)
    expected = _numpy_mi_bits(skimage.color.rgb2gray(a), skimage.color.rgb2gray(b), 32)
    np.testing.assert_allclose(metrics.mutual_information(a, b), expected, atol=TOL)

  def test_mi_with_itself_is_entropy(self):
    a, _ = _pair(11, GREY)
    counts, _ = np.histogram(a, bins=32)
    p = counts[counts > 0] / counts.sum()
    np.testing.assert_allclose(metrics.mutual_information(a, a), -np.sum(p * np.log2(p)), atol=TOL)
    # A constant image carries no information.
    self.assertEqual(float(metrics.mutual_information(np.ones(GREY), a)), 0.0)

  def test_mi_of_independent_images_is_small(self):
    rng = np.random.default_rng(12)
    a, b = rng.random((2, 4) + GREY)  # a batch of 4 pairs: 2688 pixel pairs
    self.assertLess(float(metrics.mutual_information(a.reshape(96, 28), b.reshape(96, 28), bins=4)), 0.01)

  def test_mi_mask(self):
    a, b = _pair(13, GREY, noise=0.3)
    mask = np.random.default_rng(2).random(GREY) > 0.4
    expected = _numpy_mi_bits(a, b, 32, mask=mask)
    np.testing.assert_allclose(metrics.mutual_information(a, b, mask=mask), expected, atol=TOL)
    a2, b2 = a.copy(), b.copy()
    a2[~mask], b2[~mask] = 5.0, -3.0  # also outside the range of the masked pixels
    for fn in (metrics.mutual_information, metrics.normalized_mutual_information):
      self.assertEqual(float(fn(a, b, mask=mask)), float(fn(a2, b2, mask=mask)))
    self.assertTrue(np.isnan(metrics.mutual_information(a, b, mask=np.zeros(GREY, bool))))

  @parameterized.parameters((100,), (20,))
  def test_nmi_matches_skimage(self, bins):
    a, b = _pair(14, GREY, noise=0.3)
    expected = skimage.metrics.normalized_mutual_information(a, b, bins=bins)
    np.testing.assert_allclose(metrics.normalized_mutual_information(a, b, bins=bins), expected, atol=TOL)

  def test_nmi_rgb_matches_skimage_on_luminance(self):
    a, b = _pair(15, RGB)
    expected = skimage.metrics.normalized_mutual_information(
      skimage.color.rgb2gray(a), skimage.color.rgb2gray(b), bins=100
    )
    np.testing.assert_allclose(metrics.normalized_mutual_information(a, b), expected, atol=TOL)
    np.testing.assert_allclose(metrics.normalized_mutual_information(a, a), 2.0, atol=TOL)

  def test_batch_and_jit(self):
    a, b = _pair(16, (4,) + RGB)
    mask = np.random.default_rng(3).random((4,) + GREY) > 0.3
    batched = metrics.mutual_information(a, b, mask=mask)
    jitted = jax.jit(lambda x, y, m: metrics.mutual_information(x, y, mask=m))(a, b, mask)
    self.assertEqual(batched.shape, (4,))
    for i in range(4):
      np.testing.assert_allclose(batched[i], metrics.mutual_information(a[i], b[i], mask=mask[i]), atol=TOL)
    np.testing.assert_allclose(jitted, batched, atol=TOL)

  def test_bad_arguments(self):
    a = np.zeros((6, 6, 3), np.float32)
    with self.assertRaises(errors.ConfigError):
      metrics.mutual_information(a, a, bins=1)
    with self.assertRaises(errors.ConfigError):
      metrics.mutual_information(a, a, value_range=(1.0, 0.0))
    with self.assertRaises(errors.ConfigError):
      metrics.mutual_information(np.zeros((6, 6, 4)), np.zeros((6, 6, 4)))
    with self.assertRaises(errors.ConfigError):
      metrics.psnr(a, a, mask=np.ones((5, 6), bool))
    with pytest.raises(AssertionError):
      metrics.psnr(a, a[:5])
