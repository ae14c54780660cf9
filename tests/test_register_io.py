"""Tests of transform files (JSON, ITK .tfm read back by SimpleITK) and of landmark files and TRE."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from checks import assert_refused_naming_the_file
from scenes import blob_image

from msisynth import errors
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import evaluate, transform_io

FIXED_PX, MOVING_PX = (1.0, 1.5), (2.0, 2.0)
FIXED_SHAPE = (40, 36)
TRANSFORM = AffineTransform.from_params([0.25, 0.1, -0.05, 0.02, 3.0, -1.5], tf.image_center_um(FIXED_SHAPE, FIXED_PX))


def test_json_roundtrip_and_no_overwrite(tmp_path):
  path = tmp_path / "t.json"
  transform_io.save_transform_json(path, TRANSFORM, fixed_pixel_size_um=FIXED_PX, moving_pixel_size_um=MOVING_PX,
                                   fixed_shape=FIXED_SHAPE, moving_shape=(30, 30), fixed_name="he.png",
                                   moving_name="msi.imzML", metadata={"metric": np.float32(1.5)})  # fmt: skip
  loaded, doc = transform_io.load_transform_json(path, with_info=True)
  np.testing.assert_allclose(loaded.matrix, TRANSFORM.matrix, atol=1e-6)
  assert doc["fixed"] == {"name": "he.png", "shape": [40, 36], "pixel_size_um": [1.0, 1.5]}
  assert doc["metadata"]["metric"] == 1.5
  # The pixel-index matrix maps (col, row) of the fixed image to (col, row) of the moving image.
  px = np.asarray(doc["matrix_fixed_px_to_moving_px"])
  col_row = np.array([5.0, 7.0, 1.0])
  um = np.asarray(TRANSFORM.apply([5.0 * FIXED_PX[1], 7.0 * FIXED_PX[0]]))
  np.testing.assert_allclose((px @ col_row)[:2], um / np.array([MOVING_PX[1], MOVING_PX[0]]), atol=1e-5)
  with pytest.raises(errors.DataError, match="exists"):
    transform_io.save_transform_json(path, TRANSFORM)
  transform_io.save_transform_json(path, AffineTransform.identity(), overwrite=True)
  np.testing.assert_allclose(transform_io.load_transform_json(path).matrix, np.eye(3))
  (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(errors.DataError, match="format"):
    transform_io.load_transform_json(tmp_path / "bad.json")
  with pytest.raises(errors.DataError):
    transform_io.load_transform_json(tmp_path / "missing.json")


@pytest.mark.parametrize("center", [(0.0, 0.0), (17.5, 29.25)])
def test_itk_file_resamples_like_warp_image(tmp_path, center):
  path = transform_io.save_itk_transform(tmp_path / "t.tfm", TRANSFORM, center_um=center)
  itk = sitk.ReadTransform(str(path))
  moving = blob_image((30, 32))
  image = sitk.GetImageFromArray(moving)
  image.SetSpacing((MOVING_PX[1], MOVING_PX[0]))
  reference = sitk.Image([FIXED_SHAPE[1], FIXED_SHAPE[0]], sitk.sitkFloat32)
  reference.SetSpacing((FIXED_PX[1], FIXED_PX[0]))
  ref = sitk.GetArrayFromImage(sitk.Resample(image, reference, itk, sitk.sitkLinear, 0.0))
  ours = np.asarray(tf.warp_image(moving, TRANSFORM, FIXED_SHAPE, fixed_pixel_size_um=FIXED_PX,
                                  moving_pixel_size_um=MOVING_PX))  # fmt: skip
  assert np.mean(np.abs(ours - ref) < 1e-4) > 0.999
  # Points map alike, and the file reads back to the same transform.
  pts = np.array([[0.0, 0.0], [10.0, 20.0], [33.0, 5.5]])
  np.testing.assert_allclose([itk.TransformPoint(p.tolist()) for p in pts], TRANSFORM.apply(pts), atol=1e-4)
  np.testing.assert_allclose(transform_io.load_itk_transform(path).matrix, TRANSFORM.matrix, atol=1e-5)
  with pytest.raises(errors.DataError, match="exists"):
    transform_io.save_itk_transform(path, TRANSFORM)


def test_reads_itk_files_written_by_simpleitk(tmp_path):
  itk = sitk.AffineTransform(2)
  itk.SetMatrix([1.1, 0.2, -0.1, 0.9])
  itk.SetTranslation([3.0, -2.0])
  itk.SetCenter([5.0, 6.0])
  sitk.WriteTransform(itk, str(tmp_path / "s.tfm"))
  loaded = transform_io.load_itk_transform(tmp_path / "s.tfm")
  pts = np.array([[0.0, 0.0], [12.0, -4.0]])
  np.testing.assert_allclose(loaded.apply(pts), [itk.TransformPoint(p.tolist()) for p in pts], atol=1e-5)
  (tmp_path / "euler.tfm").write_text("#Insight Transform File V1.0\nTransform: Euler2DTransform_double_2_2\n"
                                      "Parameters: 0 0 0\nFixedParameters: 0 0\n")  # fmt: skip
  with pytest.raises(errors.DataError, match="Euler2D"):
    transform_io.load_itk_transform(tmp_path / "euler.tfm")


def test_landmarks_csv_in_um_and_pixels(tmp_path):
  um = tmp_path / "um.csv"
  um.write_text("id,fixed_x,fixed_y,moving_x,moving_y\na,1,2,3,4\nb,5.5,6,7,8\n")
  np.testing.assert_allclose(evaluate.load_landmarks_csv(um), [[1, 2, 3, 4], [5.5, 6, 7, 8]])
  px = tmp_path / "px.csv"
  px.write_text("fixed_x_px,fixed_y_px,moving_x,moving_y\n2,3,10,20\n")
  np.testing.assert_allclose(evaluate.load_landmarks_csv(px, fixed_pixel_size_um=(0.5, 2.0)), [[4, 1.5, 10, 20]])
  with pytest.raises(errors.ConfigError, match="fixed_pixel_size_um"):
    evaluate.load_landmarks_csv(px)
  written = evaluate.save_landmarks_csv(tmp_path / "w.csv", np.array([[1.0, 2.0, 3.0, 4.0]]))
  np.testing.assert_allclose(evaluate.read_landmarks_csv(written), [[1, 2, 3, 4]])
  with pytest.raises(errors.DataError, match="exists"):
    evaluate.save_landmarks_csv(written, np.zeros((1, 4)))


@pytest.mark.parametrize(
  "text,match",
  [
    ("a,b\n1,2\n", "needs columns"),
    ("fixed_x,fixed_y,moving_x,moving_y\n1,2,x,4\n", "not a number"),
    ("fixed_x,fixed_y,moving_x,moving_y\n1,2,3\n", "not a number"),
    ("fixed_x,fixed_y,moving_x,moving_y\n", "no landmarks"),
    ("fixed_x,fixed_y,moving_x,moving_y\n1,2,3,nan\n", "non-finite"),
  ],
)
def test_malformed_landmarks_raise_data_error_naming_the_file(tmp_path, text, match):
  assert_refused_naming_the_file(evaluate.load_landmarks_csv, tmp_path / "bad.csv", text, match)
  with pytest.raises(errors.DataError):
    evaluate.load_landmarks_csv(tmp_path / "missing.csv")


def test_target_registration_error():
  fixed = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
  shift = AffineTransform.from_params([0, 0, 0, 0, 3.0, 4.0])
  moving = fixed + [3.0, 4.0]
  tre = evaluate.target_registration_error(shift, fixed, moving, pixel_size_um=2.0)
  assert tre["mean_um"] == pytest.approx(0.0, abs=1e-5) and tre["n"] == 4
  tre = evaluate.target_registration_error(AffineTransform.identity(), fixed, moving, pixel_size_um=2.0)
  assert tre["mean_um"] == pytest.approx(5.0) and tre["mean_px"] == pytest.approx(2.5)
  assert tre["max_um"] == pytest.approx(5.0) and tre["per_point"].shape == (4,)
  err = evaluate.transform_error(shift, AffineTransform.identity(), (20, 20), 1.0)
  assert err["mean_px"] == pytest.approx(5.0, rel=1e-5)
  with pytest.raises(errors.ConfigError):
    evaluate.target_registration_error(shift, fixed, moving[:2])
