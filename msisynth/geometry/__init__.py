"""Image geometry: grids of known pixel size, the affine transforms between them, and warping.

The foundation every stage (io, data, simulate, regions, register, pipeline, viz) builds on; it imports nothing of
msisynth but `errors` and `types`.
- `msisynth.geometry.grid` (NumPy): `Grid` (shape, pixel size (y, x) µm, origin), the one pixel-size parser
  `pixel_size_yx`, the one rule for a field of view at another pixel size (`shape_at_pixel_size`), upsampling
  (`upsample_grid`) and the registration's working pixel size (`working_pixel_size_um`).
- `msisynth.geometry.transforms` (JAX): `AffineTransform` (FIXED → MOVING, µm), its parameters, and the
  resampling of images and MSI cubes (`warp_image`, `warp_msi`).

Conventions (docs/architecture.md): pixel (r, c) has its centre at (x, y) = origin + (c·px, r·py) µm; points are
(x, y) µm; a transform maps a point of the fixed image's space to the moving image's (ITK's convention).

The grid names are loaded with the package; the transform names on first use, so `import msisynth.geometry` stays
NumPy-only and `msisynth.io` can use it without importing JAX.
"""

import importlib

from msisynth.geometry.grid import (
  WORKING_FRACTION_OF_MSI_PIXEL,
  Grid,
  PixelSize,
  check_upsample,
  pixel_size_yx,
  renamed_argument,
  same_pixel_size,
  shape_at_pixel_size,
  upsample_grid,
  upsampled_shape,
  working_pixel_size_um,
)

# The transforms and warping (msisynth.geometry.transforms, JAX), loaded on first use.
_TRANSFORM_NAMES = (
  "AffineTransform",
  "constrain_params",
  "fixed_grid_um",
  "image_center_um",
  "image_corners_um",
  "rotation_deg",
  "sample_linear",
  "sample_nearest",
  "warp_image",
  "warp_msi",
)

__all__ = [
  "WORKING_FRACTION_OF_MSI_PIXEL",
  "Grid",
  "PixelSize",
  "check_upsample",
  "pixel_size_yx",
  "renamed_argument",
  "same_pixel_size",
  "shape_at_pixel_size",
  "upsample_grid",
  "upsampled_shape",
  "working_pixel_size_um",
  *_TRANSFORM_NAMES,
]


def __getattr__(name: str):
  if name in _TRANSFORM_NAMES:
    return getattr(importlib.import_module("msisynth.geometry.transforms"), name)
  if name == "transforms":
    return importlib.import_module("msisynth.geometry.transforms")
  raise AttributeError(f"module 'msisynth.geometry' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_TRANSFORM_NAMES) | {"transforms"})
