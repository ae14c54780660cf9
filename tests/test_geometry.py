"""Tests of msisynth.geometry: the one pixel-size parser, the grid rules and the working-pixel rule."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

import msisynth as ms
from msisynth import errors, geometry
from msisynth import io as msi_io


@pytest.mark.parametrize(
  "value, expected", [(2, (2.0, 2.0)), (2.5, (2.5, 2.5)), ((1, 3), (1.0, 3.0)), ([4.0], (4.0, 4.0)),
                      (np.array([0.5, 0.25]), (0.5, 0.25))]  # fmt: skip
)
def test_pixel_size_yx_accepts_a_number_or_a_pair(value, expected):
  assert geometry.pixel_size_yx(value) == expected


@pytest.mark.parametrize("value", [None, 0, -1, (1, 2, 3), (1, 0), float("nan"), "abc", ()])
def test_pixel_size_yx_refuses_anything_else_naming_the_argument(value):
  with pytest.raises(errors.ConfigError, match="msi_pixel_size_um"):
    geometry.pixel_size_yx(value, "msi_pixel_size_um")


def test_field_of_view_rule_is_the_resampler_s():
  image = np.random.default_rng(0).random((37, 50, 3)).astype(np.float32)
  for to_px in (0.7, 2.0, (3.0, 1.5), 10.0, 100.0):
    grid = geometry.Grid.of(image, 1.0).at_pixel_size(to_px)
    assert grid.shape == msi_io.resample_to_pixel_size(image, 1.0, to_px).shape[:2]
    assert grid.pixel_size_um == geometry.pixel_size_yx(to_px) and grid.origin_um == (0.0, 0.0)


def test_upsampled_grid_keeps_its_first_and_last_pixel_centres():
  grid = geometry.Grid((5, 8), (20.0, 10.0))
  up = grid.upsampled(4)
  assert up.shape == (17, 29) == geometry.upsample_grid(np.zeros((5, 8)), 4).shape
  assert up.pixel_size_um == (5.0, 2.5)
  assert up.extent_um == grid.extent_um and up.center_um == grid.center_um
  assert grid.upsampled(1) == grid
  with pytest.raises(errors.ConfigError, match="upsample"):
    grid.upsampled(1.5)


def test_grid_points_round_trip_and_bad_grids_are_refused():
  grid = geometry.Grid((10, 20), (2.0, 3.0), origin_um=(5.0, -1.0))
  px = np.array([[0.0, 0.0], [19.0, 9.0], [2.5, 4.0]])
  um = grid.pixel_to_um(px)
  np.testing.assert_allclose(um[1], [5.0 + 19 * 3.0, -1.0 + 9 * 2.0])
  np.testing.assert_allclose(grid.um_to_pixel(um), px)
  with pytest.raises(errors.ConfigError):
    geometry.Grid((0, 4), 1.0)
  with pytest.raises(errors.ConfigError):
    geometry.Grid((4, 4), -1.0)


def test_working_pixel_rule():
  assert geometry.working_pixel_size_um(20.0, 0.5) == (5.0, 5.0)  # a quarter of the MSI pixel
  assert geometry.working_pixel_size_um(20.0, 8.0) == (8.0, 8.0)  # never finer than the histology
  assert geometry.working_pixel_size_um((20.0, 40.0), 1.0) == (5.0, 10.0)
  assert geometry.working_pixel_size_um(20.0, 0.5, registration_pixel_size_um=2.0) == (2.0, 2.0)


def test_renamed_argument_warns_and_refuses_both():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert geometry.renamed_argument(None, 3.0, "histology_pixel_size_um", "he_pixel_size_um") == 3.0
  assert any(issubclass(w.category, DeprecationWarning) for w in caught)
  assert geometry.renamed_argument(2.0, None, "histology_pixel_size_um", "he_pixel_size_um") == 2.0
  with pytest.raises(errors.ConfigError, match="histology_pixel_size_um only"):
    geometry.renamed_argument(2.0, 3.0, "histology_pixel_size_um", "he_pixel_size_um")


def test_transforms_are_re_exported_and_geometry_stays_numpy_only():
  from msisynth.geometry import transforms

  assert geometry.AffineTransform is transforms.AffineTransform and geometry.warp_msi is transforms.warp_msi
  assert transforms.pixel_size_yx is geometry.pixel_size_yx
  assert ms.register.AffineTransform is transforms.AffineTransform and ms.register.warp_image is transforms.warp_image
  code = "import sys, msisynth.geometry, msisynth.io; print(int('jax' in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
  assert out == ["0"]


def test_geometry_imports_no_later_stage():
  code = (
    "import sys, msisynth.geometry.transforms; "
    "print(sorted(m for m in sys.modules if m.startswith('msisynth.') and not m.startswith('msisynth.geometry')))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
  assert out == "['msisynth.errors', 'msisynth.types']"


def test_register_transforms_is_a_deprecated_alias():
  with pytest.warns(DeprecationWarning):
    sys.modules.pop("msisynth.register.transforms", None)
    import msisynth.register.transforms as old
  from msisynth.geometry import transforms

  assert old is transforms and old.warp_msi is geometry.warp_msi
