"""Tests of msisynth.register.optimize: recovery of known transforms on small generated images.

Every test uses a 128 × 128 fixed image at 1 µm/px and a 64 × 64 moving image at 2 µm/px with the same options,
so the jitted level functions compile once and are reused.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msisynth import errors
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import optimize as opt

FIXED_SHAPE, FIXED_PX = (128, 128), 1.0
MOVING_SHAPE, MOVING_PX = (64, 64), 2.0
CENTER = np.asarray(tf.image_center_um(FIXED_SHAPE, FIXED_PX))
CONFIG = opt.RegistrationConfig(max_samples=2048, max_iterations=(80, 40, 30))


def scene(x_um, y_um, seed=0):
  """A smooth tissue-like pattern: an elliptical section with blobs inside, on a dark background."""
  rng = np.random.default_rng(seed)
  v = np.zeros_like(x_um)
  for _ in range(25):
    cx, cy, s, a = rng.uniform(20, 108), rng.uniform(20, 108), rng.uniform(3, 10), rng.uniform(0.3, 1)
    v += a * np.exp(-((x_um - cx) ** 2 + (y_um - cy) ** 2) / (2 * s * s))
  section = 1 / (1 + np.exp(((x_um - 64) ** 2 / 45**2 + (y_um - 64) ** 2 / 30**2 - 1) * 8))
  return (v + section).astype(np.float32)


def make_pair(true: AffineTransform, pattern=scene):
  """Fixed image of `pattern` and a moving image such that moving(T(x)) = fixed(x)."""
  yy, xx = np.mgrid[: FIXED_SHAPE[0], : FIXED_SHAPE[1]].astype(np.float32)
  fixed = pattern(xx * FIXED_PX, yy * FIXED_PX)
  ym, xm = np.mgrid[: MOVING_SHAPE[0], : MOVING_SHAPE[1]].astype(np.float32)
  back = np.asarray(true.inverse().apply(np.stack([xm.ravel() * MOVING_PX, ym.ravel() * MOVING_PX], 1)))
  moving = pattern(back[:, 0], back[:, 1]).reshape(MOVING_SHAPE)
  return fixed, moving


def grid_error_px(found: AffineTransform, true: AffineTransform) -> np.ndarray:
  """Distance (fixed pixels) between where the two transforms send every fixed pixel centre."""
  yy, xx = np.mgrid[: FIXED_SHAPE[0], : FIXED_SHAPE[1]].astype(np.float32)
  pts = np.stack([xx.ravel(), yy.ravel()], 1) * FIXED_PX
  return np.linalg.norm(np.asarray(found.apply(pts)) - np.asarray(true.apply(pts)), axis=1) / FIXED_PX


TRUE_AFFINE = AffineTransform.from_params([np.deg2rad(10), np.log(1.1), np.log(1.08), 0.03, 5.0, -4.0], CENTER)


@pytest.fixture(scope="module")
def affine_case():
  fixed, moving = make_pair(TRUE_AFFINE)
  result = opt.register(fixed, moving, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX, config=CONFIG)
  return fixed, moving, result


def test_recovers_known_affine_across_pixel_sizes(affine_case):
  fixed, moving, result = affine_case
  err = grid_error_px(result.transform, TRUE_AFFINE)
  assert err.max() < 1.0, err.max()
  assert len(result.iterations) == 3 and all(i > 0 for i in result.iterations)
  assert isinstance(result.converged, bool)
  assert result.metric_name == "mi" and result.metric > 1.0
  assert result.candidates[0].transform is result.transform
  assert result.uncertainty_um < 3.0 and not result.warnings
  assert result.fixed_shape == FIXED_SHAPE and result.moving_shape == MOVING_SHAPE
  assert 0.7 < result.overlap <= 1.0
  # The found transform scores at least as well as the true one on the resampled images.
  from msisynth.register.similarity import mutual_information

  def mi(t):
    warped = tf.warp_image(moving, t, FIXED_SHAPE, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX)
    return float(mutual_information(fixed[8:-8, 8:-8], warped[8:-8, 8:-8]))

  assert mi(result.transform) > mi(AffineTransform.identity()) + 0.5
  assert mi(result.transform) > mi(TRUE_AFFINE) - 0.05


@pytest.mark.parametrize(
  "name,true",
  [
    ("rot90", AffineTransform.from_params([np.pi / 2, 0, 0, 0, 3.0, -2.0], CENTER)),
    (
      "flip",
      AffineTransform.from_params([0.05, 0, 0, 0, -2.0, 3.0], CENTER).compose(AffineTransform.mirror("y", CENTER)),
    ),
  ],
)
def test_recovers_rot90_and_flip_with_flip_starts(name, true):
  fixed, moving = make_pair(true)
  config = dataclasses.replace(CONFIG, flips_and_rot90=True)
  result = opt.register(fixed, moving, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX, config=config)
  assert grid_error_px(result.transform, true).max() < 1.0, name
  assert result.mirrored == (name == "flip")
  assert (float(result.transform.determinant) < 0) == (name == "flip")
  assert len(result.candidates) == config.num_candidates


def test_symmetric_image_reports_large_uncertainty():
  def rings(x, y):
    r = np.hypot(x - 63.5, y - 63.5)
    return (np.cos(r / 4.0) * np.exp(-((r / 40) ** 2))).astype(np.float32)

  fixed, moving = make_pair(AffineTransform.identity(), pattern=rings)
  config = dataclasses.replace(CONFIG, flips_and_rot90=True)
  with pytest.warns(UserWarning, match="uncertain registration"):
    result = opt.register(fixed, moving, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX, config=config)
  assert result.uncertainty_um > 3.0 and result.warnings


def test_degenerate_results_are_refused(affine_case):
  fixed, moving, _ = affine_case
  tight = dataclasses.replace(CONFIG, max_scale=1.05)  # the true scale is 1.1: refuse rather than return it
  with pytest.raises(errors.RegistrationError, match="scales"):
    opt.register(fixed, moving, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX, config=tight)
  with pytest.raises(errors.RegistrationError, match="constant"):
    opt.register(np.ones(FIXED_SHAPE), moving, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX)
  with pytest.raises(errors.DataError):
    opt.register(np.full(FIXED_SHAPE, np.nan), moving)
  with pytest.raises(errors.ConfigError):
    opt.RegistrationConfig(similarity="cc")
  with pytest.raises(errors.ConfigError):
    opt.RegistrationConfig(levels=2, max_iterations=(1, 2, 3))


def test_mirror_check_uses_the_non_mirror_part():
  config = opt.RegistrationConfig()
  mirror = np.asarray(AffineTransform.mirror("x", CENTER).matrix, np.float64)
  flipped = AffineTransform.from_params([0.1, 0.0, 0.0, 0.0, 1.0, 2.0], CENTER).compose(AffineTransform(mirror))
  assert opt._check_transform(flipped, mirror, config) is None
  assert "without a mirror start" in opt._check_transform(flipped, np.eye(3), config)
  squashed = AffineTransform.from_params([0.0, np.log(0.1), 0.0, 0.0, 0.0, 0.0], CENTER)
  assert "scales" in opt._check_transform(squashed, np.eye(3), config)


@pytest.mark.parametrize("vmap", [False, True])
def test_register_batch_agrees_with_one_by_one(affine_case, vmap, monkeypatch):
  monkeypatch.setattr(opt, "_vmap_pairs", lambda: vmap)
  fixed, moving, single = affine_case
  other_true = AffineTransform.from_params([-0.12, 0.05, 0.0, 0.0, -3.0, 6.0], CENTER)
  fixed2, moving2 = make_pair(other_true)
  results = opt.register_batch(np.stack([fixed, fixed2]), np.stack([moving, moving2]), fixed_pixel_size_um=FIXED_PX,
                               moving_pixel_size_um=MOVING_PX, config=CONFIG)  # fmt: skip
  assert len(results) == 2
  # Batched and single runs compile differently, so allow float-level drift in the optimiser's path.
  assert grid_error_px(results[0].transform, single.transform).max() < 0.1
  assert grid_error_px(results[1].transform, other_true).max() < 1.0
  assert results[0].metric == pytest.approx(single.metric, rel=1e-3)


def test_ncc_rigid_from_initial_transform_with_masks():
  true = AffineTransform.from_params([0.08, 0, 0, 0, 4.0, 3.0], CENTER)
  fixed, moving = make_pair(true)
  fixed_mask = np.zeros(FIXED_SHAPE, bool)
  fixed_mask[10:-10, 10:-10] = True
  config = dataclasses.replace(CONFIG, similarity="ncc", kind="rigid")
  result = opt.register(fixed, moving, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX,
                        fixed_mask=fixed_mask, moving_mask=np.ones(MOVING_SHAPE, bool), config=config,
                        initial_transform=AffineTransform.from_params([0, 0, 0, 0, 2.0, 1.0], CENTER))  # fmt: skip
  assert grid_error_px(result.transform, true).max() < 1.0
  assert result.metric > 0.95 and result.start == "initial transform"
  params = np.asarray(result.transform.to_params(CENTER))
  np.testing.assert_allclose(params[1:4], 0.0, atol=1e-6)  # rigid: no scale, no shear


def test_msi_to_histology_defaults_turn_on_flips(monkeypatch):
  seen = {}

  class Stop(Exception):
    pass

  def fake(fixed, moving, **kw):
    seen.update(kw)
    raise Stop

  monkeypatch.setattr(opt, "register", fake)
  with pytest.raises(Stop):
    opt.register_msi_to_histology(np.zeros((8, 8, 3)), np.zeros((4, 4, 3)), histology_pixel_size_um=0.5,
                                  msi_pixel_size_um=20.0)  # fmt: skip
  config = seen["config"]
  assert config.flips_and_rot90 and config.similarity == "mi"
  assert config.working_pixel_size_um == pytest.approx(5.0)  # a quarter of the MSI pixel (geometry)
  assert seen["fixed_pixel_size_um"] == (0.5, 0.5) and seen["moving_pixel_size_um"] == (20.0, 20.0)


def test_single_level_with_more_starts_than_candidates_reports_consistent_candidates():
  """One pyramid level with flip/90° starts pruned to fewer candidates: the result must follow the kept starts."""
  from scipy import ndimage

  rng = np.random.default_rng(3)
  fixed = ndimage.gaussian_filter(rng.random((48, 48)), 3).astype(np.float32)
  fixed[8:20, 6:30] += 1.0  # an asymmetric block, so the mirror start is clearly best
  moving = np.ascontiguousarray(fixed[:, ::-1])
  config = opt.RegistrationConfig(levels=1, flips_and_rot90=True, num_candidates=2, max_iterations=30)
  result = opt.register(fixed, moving, config=config)
  assert len(result.candidates) == 2
  assert result.metric == pytest.approx(result.candidates[0].metric)
  assert result.candidates[0].mirrored


def test_step_indices_are_uniform_in_range_and_change_with_step_and_key():
  from msisynth.register.optimize import _step_indices

  key = jnp.asarray(np.asarray(jax.random.key_data(jax.random.PRNGKey(3))))
  pool = jnp.int32(1000)
  draws = [np.asarray(_step_indices(key, jnp.int32(s), 2048, pool)) for s in range(50)]
  flat = np.concatenate(draws)
  assert flat.min() >= 0 and flat.max() < 1000
  counts = np.bincount(flat, minlength=1000)
  expected = flat.size / 1000
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 1000 + 5 * np.sqrt(2 * 1000)  # chi-square with 999 degrees of freedom, far in its tail
  assert np.mean(draws[0] == draws[1]) < 0.01  # successive steps draw afresh
  other = np.asarray(_step_indices(key + 1, jnp.int32(0), 2048, pool))
  assert np.mean(other == draws[0]) < 0.01  # another key, other draws
  np.testing.assert_array_equal(draws[7], np.asarray(_step_indices(key, jnp.int32(7), 2048, pool)))  # repeatable
  # Draws of neighbouring counters are not correlated.
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.02
