"""Tests of dense displacement fields read back as transforms (`msisynth.register.field`)."""

import numpy as np
import pytest
import SimpleITK as sitk
from scenes import blob_image

import msisynth
from msisynth import errors
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import bspline as bs
from msisynth.register import field as fd
from msisynth.register import transform_io

FIXED_SHAPE, FIXED_PX, MOVING_PX = (30, 40), (1.0, 1.5), (1.25, 1.0)
AFFINE = AffineTransform.from_params([0.08, 0.04, -0.02, 0.01, 2.0, -1.0], tf.image_center_um(FIXED_SHAPE, FIXED_PX))


def _bspline(scale=1.2, seed=0):
  t = bs.BSplineTransform.for_image(FIXED_SHAPE, (7.0, 9.0), fixed_pixel_size_um=FIXED_PX, affine=AFFINE)
  c = np.random.default_rng(seed).normal(size=t.coefficients.shape) * scale
  return bs.BSplineTransform.create(AFFINE, c, np.asarray(t.grid_origin_um), np.asarray(t.grid_spacing_um))


def _inner_points(n=300, seed=1):
  # Between the outermost pixel centres, where the field is bilinear.
  hi = [(FIXED_SHAPE[1] - 1) * FIXED_PX[1], (FIXED_SHAPE[0] - 1) * FIXED_PX[0]]
  return np.random.default_rng(seed).uniform([0.0, 0.0], hi, size=(n, 2))


@pytest.mark.parametrize("name", ["field.npy", "field.nii.gz", "field.mha"])
def test_saved_field_reads_back_as_the_same_map(tmp_path, name):
  t = _bspline()
  path = transform_io.save_displacement_field(tmp_path / name, t, FIXED_SHAPE, FIXED_PX)
  back = msisynth.load_displacement_field(path, pixel_size_um=FIXED_PX)
  assert isinstance(back, msisynth.DisplacementFieldTransform)
  grid = np.asarray(tf.fixed_grid_um(FIXED_SHAPE, FIXED_PX))
  np.testing.assert_allclose(back.apply(grid), t.apply(grid), atol=1e-3)  # exact at the pixel centres
  # Between the centres the field is bilinear: close to the smooth map it samples (µm, well under a pixel).
  p = _inner_points()
  assert np.max(np.abs(np.asarray(back.apply(p)) - np.asarray(t.apply(p)))) < 0.05
  # Written again on its own grid, it is the same field.
  again = transform_io.save_displacement_field(tmp_path / ("again_" + name), back, FIXED_SHAPE, FIXED_PX)
  np.testing.assert_allclose(msisynth.load_displacement_field(again, pixel_size_um=FIXED_PX).field, back.field,
                             atol=1e-5)  # fmt: skip


def test_warp_through_a_loaded_field_equals_simpleitk_through_the_same_file(tmp_path):
  path = transform_io.save_displacement_field(tmp_path / "field.nii.gz", _bspline(1.5), FIXED_SHAPE, FIXED_PX)
  t = fd.load_displacement_field(path)
  moving = blob_image((32, 44), n_blobs=8)
  image = sitk.GetImageFromArray(moving)
  image.SetSpacing((MOVING_PX[1], MOVING_PX[0]))
  reference = sitk.Image([FIXED_SHAPE[1], FIXED_SHAPE[0]], sitk.sitkFloat32)
  reference.SetSpacing((FIXED_PX[1], FIXED_PX[0]))
  itk = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
  ref = sitk.GetArrayFromImage(sitk.Resample(image, reference, itk, sitk.sitkLinear, 0.0))
  ours = np.asarray(tf.warp_image(moving, t, FIXED_SHAPE, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX))
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  # Points through SimpleITK's transform, inside and outside the field (identity there).
  pts = np.concatenate([_inner_points(50), [[-30.0, 5.0], [200.0, 200.0]]])
  itk_pts = np.array([itk.TransformPoint(tuple(map(float, p))) for p in pts])
  np.testing.assert_allclose(np.asarray(t.apply(pts)), itk_pts, atol=1e-3)


def test_field_edges_inverse_and_a_whole_msi_cube():
  rng = np.random.default_rng(0)
  d = rng.normal(size=(12, 16, 2)).astype(np.float32)
  t = fd.DisplacementFieldTransform.create(d, 2.0, origin_um=(1.0, 3.0))
  np.testing.assert_allclose(t.displacement([[1.0 + 2 * 5, 3.0 + 2 * 7]]), d[7:8, 5], atol=1e-6)
  # Beyond the outermost centres (within half a pixel): the edge value; beyond the extent: no displacement.
  np.testing.assert_allclose(t.displacement([[0.2, 3.0]]), d[0:1, 0], atol=1e-6)
  np.testing.assert_allclose(t.displacement([[-5.0, 3.0], [1.0, 100.0]]), 0.0)
  # The inverse undoes the map (|∇d| < 1 here: steps of at most ~1.5 µm per 2 µm pixel).
  small = fd.DisplacementFieldTransform.create(0.3 * d, 2.0, origin_um=(1.0, 3.0))
  p = rng.uniform([2.0, 4.0], [28.0, 24.0], size=(100, 2))
  np.testing.assert_allclose(small.inverse().apply(small.apply(p)), p, atol=1e-3)
  # A many-channel cube warps through it channel by channel.
  cube = rng.random((10, 14, 5)).astype(np.float32)
  warped = np.asarray(tf.warp_image(cube, small, (12, 16), fixed_pixel_size_um=2.0, moving_pixel_size_um=2.0))
  single = np.asarray(tf.warp_image(cube[..., 3], small, (12, 16), fixed_pixel_size_um=2.0, moving_pixel_size_um=2.0))
  np.testing.assert_allclose(warped[..., 3], single, atol=1e-6)


def test_bad_field_files_are_refused_with_their_names(tmp_path):
  with pytest.raises(errors.ConfigError, match="pixel_size_um"):
    np.save(tmp_path / "f.npy", np.zeros((4, 5, 2), np.float32))
    fd.load_displacement_field(tmp_path / "f.npy")
  np.save(tmp_path / "bad.npy", np.zeros((4, 5, 3), np.float32))
  with pytest.raises(errors.DataError, match="bad.npy"):
    fd.load_displacement_field(tmp_path / "bad.npy", pixel_size_um=1.0)
  nan = np.zeros((4, 5, 2), np.float32)
  nan[1, 1, 0] = np.nan
  np.save(tmp_path / "nan.npy", nan)
  with pytest.raises(errors.DataError, match="nan.npy.*NaN"):
    fd.load_displacement_field(tmp_path / "nan.npy", pixel_size_um=1.0)
  (tmp_path / "junk.nii").write_bytes(b"not an image")
  with pytest.raises(errors.DataError, match="junk.nii"):
    fd.load_displacement_field(tmp_path / "junk.nii")
  scalar = sitk.GetImageFromArray(np.zeros((4, 5), np.float32))
  sitk.WriteImage(scalar, str(tmp_path / "scalar.mha"))
  with pytest.raises(errors.DataError, match="scalar.mha.*2-component"):
    fd.load_displacement_field(tmp_path / "scalar.mha")
  with pytest.raises(errors.DataError, match="no such"):
    fd.load_displacement_field(tmp_path / "missing.nii.gz")
  with pytest.raises(errors.ConfigError, match="suffix|npy"):
    fd.load_displacement_field(tmp_path / "field.png")
  vec = sitk.GetImageFromArray(np.zeros((4, 5, 2)), isVector=True)
  vec.SetSpacing((2.0, 3.0))
  sitk.WriteImage(vec, str(tmp_path / "v.mha"))
  with pytest.raises(errors.ConfigError, match="disagrees"):
    fd.load_displacement_field(tmp_path / "v.mha", pixel_size_um=1.0)
  np.testing.assert_allclose(fd.load_displacement_field(tmp_path / "v.mha", pixel_size_um=(3.0, 2.0)).pixel_size_um,
                             [2.0, 3.0])  # fmt: skip


def test_regions_carried_through_a_field_match_the_affine_it_samples(tmp_path):
  from msisynth import regions

  # Histology (fixed) 60 × 80 at 1 µm; MSI (moving) 20 × 26 at 3 µm; the map a mild affine, as a field on the
  # histology grid.
  center = tf.image_center_um((60, 80), 1.0)
  affine = AffineTransform.from_params([0.05, 0.03, -0.01, 0.02, 3.0, -2.0], center)
  path = transform_io.save_displacement_field(tmp_path / "f.npy", affine, (60, 80), 1.0)
  field = fd.load_displacement_field(path, pixel_size_um=1.0)
  labels = np.zeros((60, 80), np.int32)
  labels[10:40, 15:50] = 1
  labels[35:55, 45:75] = 2
  kw = dict(histology_pixel_size_um=1.0, msi_pixel_size_um=3.0)
  by_affine, _ = regions.regions_to_msi(labels, affine, (20, 26), **kw)
  by_field, names = regions.regions_to_msi(labels, field, (20, 26), **kw)
  assert names == {1: "region 1", 2: "region 2"}
  assert set(np.unique(by_field)) == {0, 1, 2}
  assert np.mean(by_field == by_affine) > 0.97  # a few boundary MSI pixels may tip
