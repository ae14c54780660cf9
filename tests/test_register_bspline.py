"""Tests of the B-spline deformable transform, its registration, and its ITK and displacement-field export."""

import numpy as np
import pytest
import SimpleITK as sitk
from scenes import blob_image, square_annotation

from msisynth import errors
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import bspline as bs
from msisynth.register import cases, optimize, transform_io
from msisynth.types import MSIImage

FIXED_SHAPE, FIXED_PX, MOVING_PX = (30, 40), (1.0, 1.5), (1.25, 1.0)
AFFINE = AffineTransform.from_params([0.1, 0.05, -0.02, 0.01, 2.0, -1.0], tf.image_center_um(FIXED_SHAPE, FIXED_PX))


def _transform(scale=1.0, seed=0, spacing=(7.0, 9.0)):
  """A B-spline on a grid covering the fixed image, with random coefficients (µm) times `scale`."""
  t = bs.BSplineTransform.for_image(FIXED_SHAPE, spacing, fixed_pixel_size_um=FIXED_PX, affine=AFFINE)
  c = np.random.default_rng(seed).normal(size=t.coefficients.shape) * scale
  return bs.BSplineTransform.create(AFFINE, c, np.asarray(t.grid_origin_um), np.asarray(t.grid_spacing_um))


def _sitk_image(array, pixel_size):
  image = sitk.GetImageFromArray(array)
  image.SetSpacing((pixel_size[1], pixel_size[0]))
  return image


def _sitk_resample(moving, itk_transform):
  reference = sitk.Image([FIXED_SHAPE[1], FIXED_SHAPE[0]], sitk.sitkFloat32)
  reference.SetSpacing((FIXED_PX[1], FIXED_PX[0]))
  out = sitk.Resample(_sitk_image(moving, MOVING_PX), reference, itk_transform, sitk.sitkLinear, 0.0)
  return sitk.GetArrayFromImage(out)


def _fixed_points(n=400, seed=1):
  # Inside the fixed image's extent, where ITK's B-spline is defined.
  hi = [FIXED_SHAPE[1] * FIXED_PX[1] - FIXED_PX[1], FIXED_SHAPE[0] * FIXED_PX[0] - FIXED_PX[0]]
  return np.random.default_rng(seed).uniform([-0.5 * FIXED_PX[1], -0.5 * FIXED_PX[0]], hi, size=(n, 2))


# ------------------------------------------------------------------------------------------------ the transform


def test_grid_covers_the_fixed_image_with_the_given_spacing():
  t = bs.BSplineTransform.for_image(FIXED_SHAPE, (7.0, 9.0), fixed_pixel_size_um=FIXED_PX)
  # x extent 40 · 1.5 = 60 µm in ceil(60 / 9) = 7 cells; y extent 30 µm in ceil(30 / 7) = 5 cells; + 3 nodes.
  assert t.grid_shape == (8, 10)
  np.testing.assert_allclose(t.grid_spacing_um, [9.0, 7.0])
  np.testing.assert_allclose(t.grid_origin_um, [-0.75 - 9.0, -0.5 - 7.0])
  np.testing.assert_allclose(t.apply(_fixed_points()), _fixed_points(), atol=1e-5)


def test_points_map_like_simpleitk_composite():
  t = _transform(scale=2.0)
  ny, nx = t.grid_shape
  spline = sitk.BSplineTransform(2, 3)
  spline.SetFixedParameters([nx, ny, *np.asarray(t.grid_origin_um, float), *np.asarray(t.grid_spacing_um, float),
                             1.0, 0.0, 0.0, 1.0])  # fmt: skip
  spline.SetParameters(np.asarray(t.coefficients, np.float64).ravel().tolist())
  m = np.asarray(AFFINE.matrix, np.float64)
  affine = sitk.AffineTransform(2)
  affine.SetMatrix(m[:2, :2].ravel().tolist())
  affine.SetTranslation(m[:2, 2].tolist())
  composite = sitk.CompositeTransform([affine, spline])
  pts = np.concatenate([_fixed_points(), [[-5.0, -20.0], [80.0, 3.0]]])  # two outside the grid: no displacement
  expected = np.array([composite.TransformPoint(p.tolist()) for p in pts])
  np.testing.assert_allclose(t.apply(pts), expected, atol=1e-4)
  np.testing.assert_allclose(bs.apply_points(t, pts), expected, atol=1e-4)


def test_grid_evaluation_refinement_and_inverse():
  t = _transform(scale=2.0)
  grid = np.asarray(tf.fixed_grid_um(FIXED_SHAPE, FIXED_PX))
  np.testing.assert_allclose(t.apply_grid(FIXED_SHAPE, FIXED_PX), t.apply(grid), atol=1e-4)
  fine = t.refine()
  assert fine.grid_shape == (2 * (8 - 3) + 3, 2 * (10 - 3) + 3)
  np.testing.assert_allclose(fine.apply(_fixed_points()), t.apply(_fixed_points()), atol=1e-4)
  np.testing.assert_allclose(fine.bending_energy(9.0), t.bending_energy(9.0), rtol=1e-4)
  small = _transform(scale=0.5)
  pts = _fixed_points()
  np.testing.assert_allclose(small.inverse().apply(small.apply(pts)), pts, atol=1e-3)
  shift = AffineTransform.from_linear(np.eye(2), [1.0, -2.0])
  moved = np.asarray(small.apply(pts)) - [1.0, -2.0]
  np.testing.assert_allclose(small.inverse().compose(shift).apply(moved), pts, atol=1e-3)


def test_bending_energy_and_jacobian_match_numerical_derivatives():
  t = _transform(scale=2.0)
  (ny, nx), (hx, hy) = t.grid_shape, np.asarray(t.grid_spacing_um, np.float64)
  ox, oy = np.asarray(t.grid_origin_um, np.float64)
  n = 600  # midpoint rule over the grid's valid domain
  xs = ox + hx + (np.arange(n) + 0.5) / n * (nx - 3) * hx
  ys = oy + hy + (np.arange(n) + 0.5) / n * (ny - 3) * hy
  c = np.asarray(t.coefficients, np.float64)

  def basis(pos, origin, h, size, k):
    return bs._basis_matrix(pos, origin, h, size, k) / h**k

  bx = [basis(xs, ox, hx, nx, k) for k in range(3)]
  by = [basis(ys, oy, hy, ny, k) for k in range(3)]
  energy = sum(np.mean((by[0] @ c[k] @ bx[2].T) ** 2 + 2 * (by[1] @ c[k] @ bx[1].T) ** 2
                       + (by[2] @ c[k] @ bx[0].T) ** 2) for k in range(2))  # fmt: skip
  np.testing.assert_allclose(float(t.bending_energy(3.0)), energy * 9.0, rtol=1e-4)
  # det(I + ∇d) against central differences of d in float64.
  i, j = np.arange(0, n, 97), np.arange(0, n, 89)
  pts = np.stack([xs[i], ys[j]], axis=-1)
  jac = np.stack([np.stack([(by[0][j] * (c[k] @ bx[1][i].T).T).sum(1), (by[1][j] * (c[k] @ bx[0][i].T).T).sum(1)], -1)
                  for k in range(2)], axis=1)  # fmt: skip
  det = np.linalg.det(np.eye(2) + jac)
  np.testing.assert_allclose(t.jacobian_determinant(pts), det, atol=1e-4)


def test_constant_coefficients_are_a_translation_inside_the_grid():
  t = bs.BSplineTransform.for_image(FIXED_SHAPE, 8.0, fixed_pixel_size_um=FIXED_PX, affine=AFFINE)
  c = np.zeros(t.coefficients.shape)
  c[0], c[1] = 2.5, -1.5
  t = bs.BSplineTransform.create(AFFINE, c, np.asarray(t.grid_origin_um), np.asarray(t.grid_spacing_um))
  pts = _fixed_points()
  np.testing.assert_allclose(t.apply(pts), AFFINE.apply(pts + [2.5, -1.5]), atol=1e-4)
  assert float(t.bending_energy()) == pytest.approx(0.0, abs=1e-6)


def test_bad_transforms_are_refused():
  with pytest.raises(errors.ConfigError, match="coefficients"):
    bs.BSplineTransform.create(AFFINE, np.zeros((2, 3, 5)), (0.0, 0.0), (1.0, 1.0))
  with pytest.raises(errors.ConfigError, match="spacing"):
    bs.BSplineTransform.create(AFFINE, np.zeros((2, 5, 5)), (0.0, 0.0), (1.0, 0.0))
  with pytest.raises(errors.ConfigError, match="grid_spacing_um"):
    bs.DeformableConfig(grid_spacing_um=-1.0)
  with pytest.raises(errors.ConfigError, match="similarity"):
    bs.DeformableConfig(similarity="cc")
  with pytest.raises(errors.ConfigError, match="transform"):
    tf.warp_image(np.zeros((4, 4)), "not a transform", (4, 4))


# -------------------------------------------------------------------------------------------------- export


def test_itk_composite_file_resamples_like_warp_image_and_reads_back(tmp_path):
  t = _transform(scale=1.5)
  path = transform_io.save_itk_transform(tmp_path / "t.tfm", t, center_um=(20.0, 15.0))
  text = path.read_text()
  assert text.index("AffineTransform_double_2_2") < text.index("BSplineTransform_double_2_2")
  itk = sitk.ReadTransform(str(path))
  moving = blob_image((32, 44), n_blobs=8)
  ref = _sitk_resample(moving, itk)
  ours = np.asarray(tf.warp_image(moving, t, FIXED_SHAPE, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX))
  assert np.mean(np.abs(ours - ref) < 1e-4) > 0.999
  np.testing.assert_allclose(ours, ref, atol=1e-3)  # a point exactly on the moving image's edge may differ
  pts = _fixed_points()
  np.testing.assert_allclose([itk.TransformPoint(p.tolist()) for p in pts], t.apply(pts), atol=1e-4)
  back = transform_io.load_itk_transform(path)
  assert isinstance(back, bs.BSplineTransform)
  np.testing.assert_allclose(back.apply(pts), t.apply(pts), atol=1e-4)
  # What SimpleITK writes reads back too.
  sitk.WriteTransform(itk, str(tmp_path / "s.tfm"))
  np.testing.assert_allclose(transform_io.load_itk_transform(tmp_path / "s.tfm").apply(pts), t.apply(pts), atol=1e-4)
  with pytest.raises(errors.DataError, match="exists"):
    transform_io.save_itk_transform(path, t)


def test_json_roundtrip_of_a_bspline(tmp_path):
  t = _transform(scale=1.0)
  path = transform_io.save_transform_json(tmp_path / "t.json", t, fixed_pixel_size_um=FIXED_PX)
  back, doc = transform_io.load_transform_json(path, with_info=True)
  assert isinstance(back, bs.BSplineTransform) and doc["bspline"]["grid_shape_yx"] == list(t.grid_shape)
  np.testing.assert_allclose(back.coefficients, t.coefficients)
  np.testing.assert_allclose(doc["matrix_fixed_to_moving_um"], AFFINE.matrix, atol=1e-6)


@pytest.mark.parametrize("name", ["field.nii.gz", "field.mha"])
def test_displacement_field_resamples_like_warp_image(tmp_path, name):
  t = _transform(scale=1.5)
  npy = transform_io.save_displacement_field(tmp_path / "field.npy", t, FIXED_SHAPE, FIXED_PX)
  field = np.load(npy)
  grid = np.asarray(tf.fixed_grid_um(FIXED_SHAPE, FIXED_PX))
  assert field.shape == (*FIXED_SHAPE, 2) and field.dtype == np.float32
  np.testing.assert_allclose(field + grid, t.apply(grid), atol=1e-4)
  path = transform_io.save_displacement_field(tmp_path / name, t, FIXED_SHAPE, FIXED_PX)
  itk = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
  moving = blob_image((32, 44), n_blobs=8)
  ref = _sitk_resample(moving, itk)
  ours = np.asarray(tf.warp_image(moving, t, FIXED_SHAPE, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX))
  assert np.mean(np.abs(ours - ref) < 1e-4) > 0.999
  with pytest.raises(errors.DataError, match="exists"):
    transform_io.save_displacement_field(path, t, FIXED_SHAPE, FIXED_PX)
  with pytest.raises(errors.ConfigError, match="npy"):
    transform_io.save_displacement_field(tmp_path / "field.png", t, FIXED_SHAPE, FIXED_PX)


# ----------------------------------------------------------------------------------------------- registration


def test_deformable_recovers_a_smooth_deformation_the_affine_cannot():
  fixed, moving, true_map = cases.deformed_pair(1)
  affine = optimize.register(fixed, moving, config=optimize.RegistrationConfig(similarity="mi")).transform
  affine_error = cases.map_error_px(affine, true_map)
  result = bs.register_deformable(fixed, moving, affine, config=bs.DeformableConfig(grid_spacing_um=16.0))
  assert affine_error > 3.0
  assert cases.map_error_px(result.transform, true_map) < 1.0
  assert result.metric > result.metric_affine and result.min_jacobian > 0 and not result.warnings
  assert result.grid_shapes == ((5, 5), (6, 6), (9, 9)) and len(result.iterations) == 3
  assert 1.0 < result.max_displacement_um < 30.0
  assert bs.deformable_summary(result)["grid_spacing_um"] == [16.0, 16.0]
  # An MSI cube carried through the deformable transform lands on the fixed image.
  cube = np.stack([moving, 1 - moving], axis=-1)
  msi = MSIImage(cube=cube, mz=np.array([100.0, 200.0]), mask=np.ones(moving.shape, bool), pixel_size_um=(1.0, 1.0))
  warped = tf.warp_msi(msi, result.transform, fixed.shape, 1.0)
  assert warped.cube.shape == (*fixed.shape, 2) and warped.metadata["warped_to"]["deformable"] == "BSplineTransform"
  inner = (slice(8, -8), slice(8, -8))
  assert np.mean(np.abs(warped.cube[inner][..., 0] - fixed[inner])) < 0.5 * np.mean(
    np.abs(np.asarray(tf.warp_image(moving, affine, fixed.shape))[inner] - fixed[inner])
  )


def test_register_deformable_refuses_bad_input():
  fixed, moving, _ = cases.deformed_pair(1, 32, amplitude_px=0.0)
  with pytest.raises(errors.RegistrationError, match="constant"):
    bs.register_deformable(np.ones((32, 32)), moving, AffineTransform.identity())
  with pytest.raises(errors.ConfigError, match="AffineTransform"):
    bs.register_deformable(fixed, moving, np.eye(3))
  with pytest.raises(errors.DataError, match="NaN"):
    bad = fixed.copy()
    bad[0, 0] = np.nan
    bs.register_deformable(bad, moving, AffineTransform.identity())


# ------------------------------------------------------------------------------------------ annotation transfer


def test_regions_follow_a_deformable_transform():
  from msisynth import regions as R

  labels_hist, regions = square_annotation()
  kwargs = dict(histology_pixel_size_um=2.0, msi_pixel_size_um=20.0)
  affine = AffineTransform.from_linear(np.eye(2), [-100.0, -50.0])
  grid = bs.BSplineTransform.for_image(labels_hist.shape, 100.0, fixed_pixel_size_um=2.0, affine=affine)
  # Constant coefficients: a translation by (30, -20) µm before the affine, inside the histology image.
  c = np.zeros(grid.coefficients.shape)
  c[0], c[1] = 30.0, -20.0
  shifted = bs.BSplineTransform.create(affine, c, np.asarray(grid.grid_origin_um), np.asarray(grid.grid_spacing_um))
  same = AffineTransform.from_linear(np.eye(2), [-70.0, -70.0])
  for what in (regions, labels_hist):
    for method in ("majority", "nearest"):
      expected, _ = R.regions_to_msi(what, same, (24, 32), method=method, **kwargs)
      got, _ = R.regions_to_msi(what, shifted, (24, 32), method=method, **kwargs)
      np.testing.assert_array_equal(got, expected, err_msg=f"{type(what).__name__} {method}")
  # A genuine deformation: polygons and the majority vote agree but for a few boundary pixels, and both moved.
  c = np.random.default_rng(0).normal(size=grid.coefficients.shape) * 15.0
  bent = bs.BSplineTransform.create(affine, c, np.asarray(grid.grid_origin_um), np.asarray(grid.grid_spacing_um))
  from_polygons, _ = R.regions_to_msi(regions, bent, (24, 32), **kwargs)
  from_labels, _ = R.regions_to_msi(labels_hist, bent, (24, 32), **kwargs)
  unbent, _ = R.regions_to_msi(regions, affine, (24, 32), **kwargs)
  area = np.count_nonzero(from_polygons)
  assert 70 <= area <= 130  # the 200 µm square is 100 MSI pixels; the deformation changes its area a little
  assert np.count_nonzero(from_polygons != from_labels) <= 0.1 * area
  assert np.count_nonzero(from_polygons != unbent) > 0


def test_tre_through_a_deformable_transform():
  from msisynth.register import evaluate

  t = _transform(scale=1.0)
  pts = _fixed_points(10)
  tre = evaluate.target_registration_error(t, pts, np.asarray(t.apply(pts)) + [3.0, 4.0], 1.0)
  assert tre["mean_um"] == pytest.approx(5.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------- pipeline


def test_pipeline_with_deformable_refinement(shared_data, tmp_path):
  from simulated_sections import CROP, HE_PX, MSI_PX, READ, REGISTRATION, he_crop, perfect_synthesizer, write_section

  from msisynth import io as msi_io
  from msisynth import pipeline

  folder = tmp_path / "section"
  write_section(folder, he_crop(shared_data), mirrored=False, seed=0)
  inputs = pipeline.SectionInputs(msi=folder / "simulated_msi.imzML", histology=folder / "he.png",
                                  histology_pixel_size_um=HE_PX, read_options=READ, simulated=True,
                                  landmarks=folder / "landmarks.csv")  # fmt: skip
  config = bs.DeformableConfig(levels=1, max_iterations=20, max_samples=2048)
  out = tmp_path / "report"
  result = pipeline.process_section(inputs, perfect_synthesizer, registration_config=REGISTRATION, deformable=True,
                                    bspline_spacing_um=300.0, deformable_config=config, out_dir=out,
                                    figures=False)  # fmt: skip
  assert isinstance(result.transform, bs.BSplineTransform)
  np.testing.assert_allclose(result.transform.grid_spacing_um, [300.0, 300.0])
  # The synthesizer is perfect: the deformation stays small and the landmarks stay put.
  assert result.metrics["deformable"]["max_displacement_um"] < 0.5 * MSI_PX
  assert result.tre["mean_px"] < 0.5
  # The cube went through the deformable transform, and the report holds it for ITK.
  msi = msi_io.read_imzml(folder / "simulated_msi.imzML", **READ)
  cube = np.load(out / "msi_in_histology_space.npy", mmap_mode="r")
  np.testing.assert_allclose(cube, tf.warp_msi(msi, result.transform, CROP, HE_PX).cube, rtol=1e-5, atol=1e-4)
  assert isinstance(transform_io.load_itk_transform(out / "transform.tfm"), bs.BSplineTransform)
  assert isinstance(transform_io.load_transform_json(out / "transform.json"), bs.BSplineTransform)
  assert "B-spline" in (out / "report.md").read_text()


def test_spatialdata_export_keeps_the_bspline_field():
  from msisynth import export

  t = _transform(scale=1.0)
  he = np.stack([blob_image(FIXED_SHAPE, n_blobs=8)] * 3, axis=-1) / 2
  cube = np.stack([blob_image((12, 16), n_blobs=8), blob_image((12, 16), 1, n_blobs=8)], -1)
  msi = MSIImage(cube=cube, mz=np.array([100.0, 200.0]), mask=np.ones((12, 16), bool), pixel_size_um=(2.5, 2.5))
  sdata = export.to_spatialdata(he, FIXED_PX, msi, t, deformation_pixel_size_um=FIXED_PX)
  field = np.asarray(sdata.images["deformation_um"].values)  # (2, H, W): dx, dy at the fixed pixel centres
  np.testing.assert_allclose(np.moveaxis(field, 0, -1), t.displacement_field(FIXED_SHAPE, FIXED_PX), atol=1e-5)
