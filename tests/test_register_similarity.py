"""Tests of msisynth.register.similarity against numpy histograms and scikit-image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.metrics import normalized_mutual_information as skimage_nmi

from msisynth import errors
from msisynth.geometry.transforms import sample_linear
from msisynth.register import similarity as sim


def _field(seed, shape=(256, 256), sigma=4.0):
  a = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
  return ((a - a.min()) / (a.max() - a.min())).astype(np.float32)


def _pairs():
  rng = np.random.default_rng(1)
  a = _field(0)
  return a, {
    "monotone": np.sqrt(a) + 0.05 * rng.standard_normal(a.shape),
    "shifted": ndi.shift(a, (3, 2)) * 0.7 + 0.1 * rng.standard_normal(a.shape),
    "inverted": 1 - a + 0.02 * rng.standard_normal(a.shape),
  }


def _numpy_mi_bits(x, y, bins):
  h, _, _ = np.histogram2d(x.ravel(), y.ravel(), bins=bins)
  p = h / h.sum()
  outer = np.outer(p.sum(1), p.sum(0))
  nz = p > 0
  return float(np.sum(p[nz] * np.log2(p[nz] / outer[nz])))


def _numpy_parzen_mi_bits(x, y, bins, weights):
  """Mattes' estimator written plainly: scatter each sample's 4 × 4 B-spline weights into the histogram."""

  def coords(v, w):
    lo, hi = v[w > 0].min(), v[w > 0].max()
    return 1.0 + (v - lo) / (hi - lo) * (bins - 3)

  def bspline(d):
    d = np.abs(d)
    return np.where(d < 1, (4 - 6 * d**2 + 3 * d**3) / 6, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))

  x, y, weights = x.ravel().astype(np.float64), y.ravel().astype(np.float64), weights.ravel().astype(np.float64)
  u, v = coords(x, weights), coords(y, weights)
  joint = np.zeros((bins, bins))
  for i in range(-1, 3):
    bi = np.floor(u).astype(int) + i
    for j in range(-1, 3):
      bj = np.floor(v).astype(int) + j
      ok = (bi >= 0) & (bi < bins) & (bj >= 0) & (bj < bins)
      np.add.at(joint, (bi[ok], bj[ok]), (weights * bspline(u - bi) * bspline(v - bj))[ok])
  p = joint / joint.sum()
  outer = np.outer(p.sum(1), p.sum(0))
  nz = p > 0
  return float(np.sum(p[nz] * np.log2(p[nz] / outer[nz])))


def test_parzen_mi_matches_plain_numpy_estimator_with_mask():
  a = _field(3, (48, 40))
  b = np.cos(3 * a) + 0.1 * np.random.default_rng(0).standard_normal(a.shape)
  mask = np.zeros(a.shape, bool)
  mask[5:40, 3:30] = True
  for bins in (32,):
    ours = float(sim.mutual_information(a, b, bins=bins, mask=mask))
    ref = _numpy_parzen_mi_bits(a, b, bins, mask)
    assert ours == pytest.approx(ref, rel=1e-4)
  # Masked-out pixels do not count.
  c = np.where(mask, b, 1e3)
  assert float(sim.mutual_information(a, c, bins=32, mask=mask)) == pytest.approx(ours, rel=1e-5)


@pytest.mark.parametrize("kernel", ["bspline", "gaussian"])
def test_mi_and_nmi_agree_with_histogram_references(kernel):
  a, pairs = _pairs()
  for name, b in pairs.items():
    mi = float(sim.mutual_information(a, b, bins=64, kernel=kernel))
    ref = _numpy_mi_bits(a, b, 62)
    # Tolerance stated in the docstring: within 12 % below the plain 62-bin histogram MI.
    assert 0.88 * ref <= mi <= 1.001 * ref, name
    nmi = float(sim.normalized_mutual_information(a, b, bins=64, kernel=kernel))
    ref_nmi = skimage_nmi(a, b, bins=62)
    assert 0.97 * ref_nmi <= nmi <= 1.001 * ref_nmi, name
  # Independent images: close to 0 bits and NMI close to 1.
  noise = np.random.default_rng(5).random(a.shape)
  assert float(sim.mutual_information(a, noise, bins=32, kernel=kernel)) < 0.01
  assert float(sim.normalized_mutual_information(a, noise, bins=32, kernel=kernel)) < 1.002


def test_identical_images_and_sampling():
  a = _field(4, (64, 64))
  h = float(sim.entropies_from_histogram(sim.joint_histogram(a, a, bins=32))[0])
  assert float(sim.mutual_information(a, a, bins=32)) <= h + 1e-4
  assert float(sim.normalized_mutual_information(a, a, bins=32)) > 1.35  # Parzen smoothing keeps it below 2
  full = float(sim.mutual_information(a, a**2, bins=32))
  sampled = float(sim.mutual_information(a, a**2, bins=32, sample=2000, key=jax.random.key(0)))
  assert sampled == pytest.approx(full, rel=0.1)
  with pytest.raises(errors.ConfigError):
    sim.mutual_information(a, a, sample=100)
  with pytest.raises(errors.ConfigError):
    sim.mutual_information(a, a[:10])
  with pytest.raises(errors.ConfigError):
    sim.mutual_information(a, a, kernel="box")


def test_ncc_and_mse_against_numpy():
  a = _field(6, (32, 32))
  b = 2 * a + 0.3 + 0.05 * np.random.default_rng(2).standard_normal(a.shape)
  mask = np.ones(a.shape, bool)
  mask[:8] = False
  assert float(sim.ncc(a, b)) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-5)
  assert float(sim.ncc(a, b, mask=mask)) == pytest.approx(np.corrcoef(a[8:].ravel(), b[8:].ravel())[0, 1], abs=1e-5)
  assert float(sim.mse(a, b, mask=mask)) == pytest.approx(np.mean((a[8:] - b[8:]) ** 2), rel=1e-5)
  assert float(sim.ncc(a, 1 - a)) == pytest.approx(-1.0, abs=1e-5)


def test_gradients_point_back_to_alignment():
  """Moving = fixed shifted by (+2.5, -1.5) px; at zero every measure's gradient in the shift points to it."""
  fixed = _field(7, (72, 72), sigma=3.0)
  true_shift = np.array([2.5, -1.5], np.float32)  # (x, y) pixels
  rows, cols = np.mgrid[:72, :72].astype(np.float32)
  moving, _ = sample_linear(jnp.asarray(fixed), rows - true_shift[1], cols - true_shift[0])
  inner = np.zeros(fixed.shape, np.float32)
  inner[8:-8, 8:-8] = 1
  frange, mrange = sim.intensity_range(fixed), sim.intensity_range(moving)

  def similarities(shift):
    warped, _ = sample_linear(moving, rows + shift[1], cols + shift[0])
    ranges = {"fixed_range": frange, "moving_range": mrange, "mask": inner}
    return jnp.stack(
      [
        sim.mutual_information(fixed, warped, bins=32, **ranges),
        sim.mutual_information(fixed, warped, bins=32, kernel="gaussian", **ranges),
        sim.normalized_mutual_information(fixed, warped, **ranges),
        sim.ncc(fixed, warped, mask=inner),
        -sim.mse(fixed, warped, mask=inner),
      ]
    )

  @jax.jit  # one compilation for every measure
  def check(shift):
    return jax.jacobian(similarities)(jnp.zeros(2)), jax.vmap(similarities)(jnp.stack([jnp.zeros(2), shift]))

  jac, values = (np.asarray(v) for v in check(jnp.asarray(true_shift)))
  assert np.all(np.isfinite(jac))
  np.testing.assert_array_equal(np.sign(jac), np.tile([1, -1], (5, 1)))
  assert np.all(values[1] > values[0])


def test_bspline_joint_counts_equals_dense_product_with_its_gradients():
  # The written-out gradient (four taps per sample) against autodiff of the dense construction it replaces,
  # including coordinates on bin centres and at both ends of the range.
  rng = np.random.default_rng(3)
  bins, n, k = 12, 300, 3
  fixed_parzen = sim.parzen_weights(jnp.asarray(rng.uniform(0, 1, n), jnp.float32), jnp.array([0.0, 1.0]), bins=bins)
  coords = jnp.asarray(rng.uniform(1, bins - 2, (k, n)), jnp.float32)
  coords = coords.at[0, :4].set(jnp.array([1.0, 5.0, bins - 2.0, 7.5]))
  weights = jnp.asarray(rng.uniform(0, 1, (k, n)), jnp.float32)

  def dense(fp, u, w):
    wm = sim._cubic_bspline(u[..., None] - jnp.arange(bins, dtype=jnp.float32)) * w[..., None]
    return jnp.einsum("ni,knj->kij", fp, wm, precision=jax.lax.Precision.HIGHEST)

  got = sim.bspline_joint_counts(fixed_parzen, coords, weights)
  want = dense(fixed_parzen, coords, weights)
  assert got.shape == (k, bins, bins)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  probe = jnp.asarray(rng.normal(size=(k, bins, bins)), jnp.float32)
  g_got = jax.grad(lambda *a: jnp.sum(sim.bspline_joint_counts(*a) * probe), argnums=(0, 1, 2))(
    fixed_parzen, coords, weights)
  g_want = jax.grad(lambda *a: jnp.sum(dense(*a) * probe), argnums=(0, 1, 2))(fixed_parzen, coords, weights)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(g_got[1]).max()) > 0.1  # the coordinate gradient is not trivially zero


def test_sample_linear_channel_gradient_matches_autodiff():
  # Multi-channel bilinear sampling has a written-out gradient in the sample positions and the image.
  rng = np.random.default_rng(4)
  image = jnp.asarray(rng.uniform(size=(9, 11, 2)), jnp.float32)
  rows = jnp.asarray(rng.uniform(-0.4, 8.4, 40), jnp.float32)
  cols = jnp.asarray(rng.uniform(-0.4, 10.4, 40), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(40, 2)), jnp.float32)

  def reference(img, r, c):
    return jnp.stack([sample_linear(img[..., i], r, c)[0] for i in range(2)], -1)

  got = sample_linear(image, rows, cols)[0]
  np.testing.assert_allclose(got, reference(image, rows, cols), rtol=1e-6, atol=1e-6)
  g_got = jax.grad(lambda *a: jnp.sum(sample_linear(*a)[0] * probe), argnums=(0, 1, 2))(image, rows, cols)
  g_want = jax.grad(lambda *a: jnp.sum(reference(*a) * probe), argnums=(0, 1, 2))(image, rows, cols)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
