"""Tests of msisynth.geometry.transforms against SimpleITK's resampler and algebraic identities."""

import numpy as np
import pytest
import SimpleITK as sitk

from msisynth import errors
from msisynth.geometry import transforms
from msisynth.geometry.transforms import AffineTransform, warp_image, warp_msi
from msisynth.types import MSIImage

PARAMS = np.array([0.3, 0.08, -0.05, 0.04, 3.5, -2.25], np.float32)


def _smooth_image(seed, shape):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
  img = np.zeros(shape, np.float32)
  for _ in range(6):
    cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
    s = rng.uniform(2, 6)
    img += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
  return img


def _sitk_warp(moving, transform, fixed_shape, fixed_px, moving_px, interpolator, cval=0.0):
  img = sitk.GetImageFromArray(np.asarray(moving), isVector=np.ndim(moving) == 3)
  img.SetSpacing((moving_px[1], moving_px[0]))
  ref = sitk.Image([int(fixed_shape[1]), int(fixed_shape[0])], sitk.sitkFloat32)
  ref.SetSpacing((fixed_px[1], fixed_px[0]))
  tx = sitk.AffineTransform(2)
  m = np.asarray(transform.matrix, np.float64)
  tx.SetMatrix(m[:2, :2].ravel().tolist())
  tx.SetTranslation(m[:2, 2].tolist())
  out = sitk.Resample(img, ref, tx, interpolator, cval, img.GetPixelID())
  return sitk.GetArrayFromImage(out)


def test_params_roundtrip_and_identities():
  center = np.array([12.0, 7.5])
  t = AffineTransform.from_params(PARAMS, center)
  np.testing.assert_allclose(t.to_params(center), PARAMS, atol=1e-5)
  pts = np.random.default_rng(0).uniform(-20, 50, size=(10, 2)).astype(np.float32)
  np.testing.assert_allclose(t.inverse().apply(t.apply(pts)), pts, atol=1e-4)
  np.testing.assert_allclose(t.compose(t.inverse()).matrix, np.eye(3), atol=1e-5)
  u = AffineTransform.from_params([-0.1, 0.0, 0.1, 0.0, 1.0, 2.0], [0.0, 0.0])
  # compose applies `other` first.
  np.testing.assert_allclose(t.compose(u).apply(pts), t.apply(u.apply(pts)), atol=1e-4)
  np.testing.assert_allclose(AffineTransform.identity().apply(pts), pts)
  # The centre maps to centre + translation.
  np.testing.assert_allclose(t.apply(center), center + PARAMS[4:], atol=1e-5)
  assert float(t.determinant) == pytest.approx(np.exp(PARAMS[1] + PARAMS[2]), rel=1e-5)
  m = AffineTransform.mirror("x", center)
  assert float(m.determinant) == pytest.approx(-1.0)
  np.testing.assert_allclose(m.apply(center), center)
  assert transforms.rotation_deg(AffineTransform.from_params([np.pi / 2, 0, 0, 0, 0, 0])) == pytest.approx(90, abs=1e-4)


def test_constrain_params():
  rigid = transforms.constrain_params(PARAMS, "rigid")
  np.testing.assert_allclose(rigid, [PARAMS[0], 0, 0, 0, *PARAMS[4:]])
  sim = transforms.constrain_params(PARAMS, "similarity")
  assert sim[1] == pytest.approx(sim[2]) and sim[3] == 0
  np.testing.assert_allclose(transforms.constrain_params(PARAMS, "affine"), PARAMS)
  with pytest.raises(errors.ConfigError):
    transforms.constrain_params(PARAMS, "projective")


@pytest.mark.parametrize("fixed_px,moving_px", [((1.0, 1.0), (1.0, 1.0)), ((1.0, 1.5), (2.0, 2.0))])
def test_warp_linear_matches_simpleitk(fixed_px, moving_px):
  moving = _smooth_image(1, (40, 36))
  fixed_shape = (45, 50)
  center = transforms.image_center_um(fixed_shape, fixed_px)
  t = AffineTransform.from_params(PARAMS, center)
  ours = np.asarray(warp_image(moving, t, fixed_shape, fixed_pixel_size_um=fixed_px, moving_pixel_size_um=moving_px))
  ref = _sitk_warp(moving, t, fixed_shape, fixed_px, moving_px, sitk.sitkLinear)
  assert ours.shape == ref.shape == fixed_shape
  # Same interpolation rule, half-pixel border band included. Coordinates are float32 here and double in ITK, so
  # values agree to 1e-5 (the image is in [0, ~2]); a pixel right on the inside/outside edge may still differ.
  diff = np.abs(ours - ref)
  assert np.mean(diff < 1e-4) > 0.999
  inner = (ours > 0) & (ref > 0)
  assert inner.sum() > 200
  np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-5)


def test_warp_nearest_keeps_labels_and_dtype():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 7, size=(30, 34)).astype(np.int32)
  fixed_shape = (33, 31)
  t = AffineTransform.from_params([0.21, 0.05, 0.02, 0.01, 1.3, -0.7], transforms.image_center_um(fixed_shape))
  ours = np.asarray(warp_image(labels, t, fixed_shape, order=0, cval=-1))
  ref = _sitk_warp(labels, t, fixed_shape, (1.0, 1.0), (1.0, 1.0), sitk.sitkNearestNeighbor, cval=-1)
  assert ours.dtype == np.int32
  assert set(np.unique(ours)) <= set(range(-1, 7))
  assert np.mean(ours == ref) > 0.999
  mask = rng.random((30, 34)) > 0.5
  warped_mask = np.asarray(warp_image(mask, t, fixed_shape, order=0, cval=False))
  assert warped_mask.dtype == bool


def test_warp_cube_in_chunks_matches_per_channel(monkeypatch):
  cube = np.stack([_smooth_image(s, (20, 24)) for s in range(5)], axis=-1)
  t = AffineTransform.from_params([0.1, 0.0, 0.05, 0.0, 2.0, 1.0], [10.0, 9.0])
  whole = np.asarray(warp_image(cube, t, (22, 21), moving_pixel_size_um=(1.0, 1.2)))
  monkeypatch.setattr(transforms, "_CHUNK_BYTES", 22 * 21 * 4 * 2)  # two channels a chunk: 2 + 2 + 1 padded
  chunked = np.asarray(warp_image(cube, t, (22, 21), moving_pixel_size_um=(1.0, 1.2)))
  one = np.asarray(warp_image(cube[..., 3], t, (22, 21), moving_pixel_size_um=(1.0, 1.2)))
  np.testing.assert_allclose(chunked, whole, atol=1e-6)
  np.testing.assert_allclose(whole[..., 3], one, atol=1e-6)
  ref = _sitk_warp(cube, t, (22, 21), (1.0, 1.0), (1.0, 1.2), sitk.sitkLinear)
  inner = (whole > 0) & (ref > 0)
  np.testing.assert_allclose(whole[inner], ref[inner], atol=1e-4)


def test_identity_warp_is_exact_and_shift_moves_content():
  img = _smooth_image(3, (16, 18))
  out = warp_image(img, AffineTransform.identity(), img.shape)
  np.testing.assert_allclose(out, img, atol=1e-6)
  # T(x) = x + (2, 3) µm: output pixel (r, c) = moving (r + 3, c + 2).
  shift = AffineTransform.from_params([0, 0, 0, 0, 2.0, 3.0])
  out = np.asarray(warp_image(img, shift, img.shape))
  np.testing.assert_allclose(out[:10, :12], img[3:13, 2:14], atol=1e-6)
  assert np.all(out[-3:, :] == 0)


def test_warp_msi_carries_cube_and_mask():
  cube = np.stack([_smooth_image(s, (12, 10)) for s in range(3)], axis=-1)
  mask = np.ones((12, 10), bool)
  mask[:, :2] = False
  msi = MSIImage(
    cube=cube, mz=np.array([100.0, 200.0, 300.0]), mask=mask, pixel_size_um=(10.0, 10.0), metadata={"simulated": True}
  )
  t = AffineTransform.identity()
  out = warp_msi(msi, t, (60, 50), 2.0)
  assert out.cube.shape == (60, 50, 3) and out.mask.shape == (60, 50)
  assert out.pixel_size_um == (2.0, 2.0)
  assert out.metadata["simulated"] and out.metadata["warped_to"]["shape"] == [60, 50]
  # Histology pixel (r, c) sits at MSI index (r / 5, c / 5).
  np.testing.assert_allclose(out.cube[10, 15], cube[2, 3], atol=1e-5)
  assert not out.mask[10, 5] and out.mask[10, 15]
  with pytest.raises(errors.ConfigError):
    warp_msi(MSIImage(cube=cube, mz=msi.mz, mask=mask), t, (60, 50), 2.0)


def test_bad_arguments_raise_config_error():
  img = np.zeros((5, 5), np.float32)
  with pytest.raises(errors.ConfigError):
    warp_image(img, AffineTransform.identity(), (5, 5), order=3)
  with pytest.raises(errors.ConfigError):
    warp_image(img, AffineTransform.identity(), (5, 5), fixed_pixel_size_um=-1.0)
  with pytest.raises(errors.ConfigError):
    warp_image(np.zeros(5), AffineTransform.identity(), (5, 5))
  with pytest.raises(errors.ConfigError):
    AffineTransform.from_matrix(np.eye(4))
