"""Grids: where an image's pixels are in physical space, and the rules that change a grid.

Every array with a physical size travels with a `Grid`: its shape (H, W), its pixel size (y, x) in µm and its
origin, the physical (x, y) µm of the centre of pixel (0, 0), as an ITK image has size, spacing and origin. Pixel
(r, c) of a grid has its centre at (x, y) = origin + (c·px, r·py) µm (docs/architecture.md). msisynth's images all
have origin (0, 0); a transform, not an origin, says how two images lie relative to each other.

The rules that every stage shares live here, once:
- `pixel_size_yx`: the one parser of a pixel size (a number or a (y, x) pair, µm);
- `Grid.at_pixel_size` / `shape_at_pixel_size`: the grid covering the same field of view at another pixel size
  (round(H·p/q) × round(W·p/q) pixels, pixel (0, 0) kept in place), as `msisynth.io.resample_to_pixel_size`
  resamples;
- `Grid.upsampled` / `upsample_grid`: the grid of a generator trained on an upsampled MSI grid (factor u):
  ((H - 1)·u + 1, (W - 1)·u + 1) pixels of pixel size / u, pixel (0, 0) kept in place. The factor is recorded
  where the upsampling happens (`config.data.upsample`, saved with the checkpoint; `Synthesizer.upsample`) and
  read from there, never inferred from an array's shape;
- `working_pixel_size_um`: the pixel size MSI → histology registration works at (a quarter of the MSI pixel,
  never finer than the histology).

This module is NumPy-only: `msisynth.io` uses it without importing JAX. The affine transforms and the warping
(JAX) are `msisynth.geometry.transforms`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
from absl import logging

from msisynth import errors

PixelSize = tuple[float, float]

# The H&E registration copy of an MSI section is this fraction of the MSI pixel by default: fine enough that the
# synthetic H&E's detail (a generator upsampling by u <= 4 draws it at MSI pixel / u) is not lost, coarse enough
# that registering a whole slide stays cheap.
WORKING_FRACTION_OF_MSI_PIXEL = 0.25


def pixel_size_yx(pixel_size_um, name: str = "pixel_size_um") -> PixelSize:
  """A pixel size given as a number or a (y, x) pair, as (py, px) floats in µm: the one parser of msisynth.

  Args:
    pixel_size_um: a positive number (square pixels) or a (y, x) pair of positive numbers.
    name: what the value is, for the error message (a flag or argument name).

  Returns:
    (py, px) in µm.

  Raises:
    ConfigError: when it is missing, not one or two finite positive numbers.
  """
  if pixel_size_um is None:
    raise errors.ConfigError(f"{name} is required (a positive number or a (y, x) pair, µm)")
  try:
    arr = np.asarray(pixel_size_um, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError):
    arr = np.zeros(0)
  if arr.size == 1:
    arr = np.repeat(arr, 2)
  if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
    raise errors.ConfigError(f"{name} must be a positive number or a (y, x) pair, got {pixel_size_um!r}")
  return float(arr[0]), float(arr[1])


def same_pixel_size(a, b) -> bool:
  """Whether two pixel sizes are equal (to 1e-9 relative)."""
  return bool(np.allclose(pixel_size_yx(a), pixel_size_yx(b), rtol=1e-9, atol=0.0))


def shape_at_pixel_size(shape: Sequence[int], from_pixel_size_um, to_pixel_size_um) -> tuple[int, int]:
  """(H', W') of the grid covering the field of view of an (H, W) grid at another pixel size.

  H' = max(1, round(H·fy/ty)) and likewise W': the rule of `msisynth.io.resample_to_pixel_size`.
  """
  fy, fx = pixel_size_yx(from_pixel_size_um, "from_pixel_size_um")
  ty, tx = pixel_size_yx(to_pixel_size_um, "to_pixel_size_um")
  return max(1, round(int(shape[0]) * fy / ty)), max(1, round(int(shape[1]) * fx / tx))


def check_upsample(upsample) -> int:
  """An upsampling factor as an int >= 1.

  Raises:
    ConfigError: when it is not an integer >= 1.
  """
  try:
    ok = int(upsample) == upsample and upsample >= 1
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise errors.ConfigError(f"upsample must be an integer >= 1, got {upsample!r}")
  return int(upsample)


def upsampled_shape(shape: Sequence[int], upsample: int) -> tuple[int, int]:
  """((H - 1)·u + 1, (W - 1)·u + 1): the shape of an (H, W) grid upsampled by u with pixel (0, 0) in place."""
  u = check_upsample(upsample)
  return (int(shape[0]) - 1) * u + 1, (int(shape[1]) - 1) * u + 1


@dataclasses.dataclass(frozen=True)
class Grid:
  """Where an image's pixels are: shape, pixel size and origin (ITK's size, spacing and origin).

  Attributes:
    shape: (H, W) in pixels.
    pixel_size_um: (y, x) pixel size in µm (a number is taken as square pixels).
    origin_um: (x, y) µm of the centre of pixel (0, 0).
  """

  shape: tuple[int, int]
  pixel_size_um: PixelSize
  origin_um: tuple[float, float] = (0.0, 0.0)

  def __post_init__(self):
    shape = tuple(int(v) for v in tuple(self.shape)[:2])
    if len(shape) != 2 or min(shape) < 1:
      raise errors.ConfigError(f"a grid's shape must be two positive integers, got {self.shape!r}")
    origin = tuple(float(v) for v in self.origin_um)
    if len(origin) != 2 or not np.all(np.isfinite(origin)):
      raise errors.ConfigError(f"a grid's origin must be two finite numbers (x, y) µm, got {self.origin_um!r}")
    object.__setattr__(self, "shape", shape)
    object.__setattr__(self, "pixel_size_um", pixel_size_yx(self.pixel_size_um))
    object.__setattr__(self, "origin_um", origin)

  @classmethod
  def of(cls, image, pixel_size_um, origin_um=(0.0, 0.0)) -> Grid:
    """The grid of an (H, W, ...) array (or of a shape) with the given pixel size."""
    shape = image if isinstance(image, tuple | list) else np.shape(image)
    return cls(tuple(shape[:2]), pixel_size_um, origin_um)

  def at_pixel_size(self, pixel_size_um) -> Grid:
    """The grid covering the same field of view at another pixel size, pixel (0, 0) kept in place."""
    return Grid(shape_at_pixel_size(self.shape, self.pixel_size_um, pixel_size_um), pixel_size_um, self.origin_um)

  def upsampled(self, upsample: int) -> Grid:
    """The grid with u× smaller pixels whose first and last pixel centres are this grid's (see `upsample_grid`)."""
    u = check_upsample(upsample)
    py, px = self.pixel_size_um
    return Grid(upsampled_shape(self.shape, u), (py / u, px / u), self.origin_um)

  @property
  def extent_um(self) -> tuple[float, float]:
    """(width, height) µm from the first to the last pixel centre."""
    return (self.shape[1] - 1) * self.pixel_size_um[1], (self.shape[0] - 1) * self.pixel_size_um[0]

  @property
  def center_um(self) -> tuple[float, float]:
    """(x, y) µm of the midpoint of the corner pixel centres."""
    w, h = self.extent_um
    return self.origin_um[0] + w / 2.0, self.origin_um[1] + h / 2.0

  def pixel_to_um(self, points_px) -> np.ndarray:
    """(N, 2) (column, row) pixel coordinates → (N, 2) (x, y) µm."""
    p = np.asarray(points_px, np.float64)
    return p * np.array([self.pixel_size_um[1], self.pixel_size_um[0]]) + np.asarray(self.origin_um)

  def um_to_pixel(self, points_um) -> np.ndarray:
    """(N, 2) (x, y) µm → (N, 2) continuous (column, row) pixel coordinates."""
    p = np.asarray(points_um, np.float64) - np.asarray(self.origin_um)
    return p / np.array([self.pixel_size_um[1], self.pixel_size_um[0]])


def _interpolation_matrix(n_in: int, upsample: int, mode: str) -> np.ndarray:
  """(n_out, n_in) weights taking n_in samples to the grid i / upsample, i < (n_in - 1)·upsample + 1."""
  n_out = (n_in - 1) * upsample + 1
  pos = np.arange(n_out) / upsample
  weights = np.zeros((n_out, n_in), np.float32)
  if mode == "nearest":
    weights[np.arange(n_out), np.minimum(np.floor(pos + 0.5).astype(int), n_in - 1)] = 1
    return weights
  lo = np.minimum(np.floor(pos).astype(int), max(n_in - 2, 0))
  frac = pos - lo
  weights[np.arange(n_out), lo] += 1 - frac
  weights[np.arange(n_out), np.minimum(lo + 1, n_in - 1)] += frac
  return weights


def upsample_grid(image: np.ndarray, upsample: int, mode: str = "bilinear") -> np.ndarray:
  """Resamples an MSI-grid image onto the grid with `upsample`× smaller pixels and the same origin.

  The output pixel i lies at MSI pixel position i / upsample, so pixel (0, 0) stays at the origin (the centre of
  MSI pixel (0, 0)) and the last output pixel is the last MSI pixel centre: an (H, W) image becomes
  ((H - 1)·u + 1, (W - 1)·u + 1) (`Grid.upsampled`).

  Args:
    image: (H, W) or (H, W, C) array on the MSI grid.
    upsample: integer factor u >= 1.
    mode: "bilinear" or "nearest" (labels and masks keep their dtype with "nearest").

  Returns:
    The upsampled image.

  Raises:
    ConfigError: for a bad factor or mode.
  """
  u = check_upsample(upsample)
  if mode not in ("bilinear", "nearest"):
    raise errors.ConfigError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
  image = np.asarray(image)
  if u == 1:
    return image
  rows = _interpolation_matrix(image.shape[0], u, mode)
  cols = _interpolation_matrix(image.shape[1], u, mode)
  if mode == "nearest":
    return image[np.argmax(rows, axis=1)][:, np.argmax(cols, axis=1)]
  # Separable: rows first, then columns (two matrix products, not one four-index contraction).
  out = np.tensordot(rows, image.astype(np.float32), axes=(1, 0))
  out = np.moveaxis(np.tensordot(cols, out, axes=(1, 1)), 0, 1)
  return out.astype(np.float32)


def working_pixel_size_um(msi_pixel_size_um, histology_pixel_size_um, registration_pixel_size_um=None) -> PixelSize:
  """The pixel size MSI → histology registration works at: the one rule of the library.

  Args:
    msi_pixel_size_um: MSI pixel size, a number or (y, x).
    histology_pixel_size_um: histology pixel size, a number or (y, x).
    registration_pixel_size_um: an asked-for working pixel size, or None for `WORKING_FRACTION_OF_MSI_PIXEL` of
      the MSI pixel.

  Returns:
    (y, x) µm, never finer than the histology pixel (resampling cannot sharpen a histology image).

  Raises:
    ConfigError: for a bad pixel size.
  """
  msi = pixel_size_yx(msi_pixel_size_um, "msi_pixel_size_um")
  he = pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  if registration_pixel_size_um is None:
    wanted = (msi[0] * WORKING_FRACTION_OF_MSI_PIXEL, msi[1] * WORKING_FRACTION_OF_MSI_PIXEL)
  else:
    wanted = pixel_size_yx(registration_pixel_size_um, "registration_pixel_size_um")
    if wanted[0] < he[0] or wanted[1] < he[1]:
      logging.warning("registration pixel size %s µm is finer than the H&E's %s µm; using the H&E's", wanted, he)
  return max(wanted[0], he[0]), max(wanted[1], he[1])


def renamed_argument(value, old_value, name: str, old_name: str):
  """`value`, or `old_value` passed under a deprecated keyword `old_name` (with a DeprecationWarning).

  Raises:
    ConfigError: when both are given.
  """
  if old_value is None:
    return value
  if value is not None:
    raise errors.ConfigError(f"give {name} only ({old_name} is its deprecated name)")
  warnings.warn(f"{old_name} is deprecated; use {name}", DeprecationWarning, stacklevel=3)
  return old_value
