"""Dense displacement fields as FIXED → MOVING transforms: T(x) = x + d(x), d sampled on a grid (µm).

A field written by `save_displacement_field`, or one from another tool (ANTs, elastix's `transformix -def all`,
SimpleITK) saved as an ITK vector image, is read back by `load_displacement_field` as a
`DisplacementFieldTransform`, which `warp_image`, `warp_msi`, the regions, the landmark errors and the exports
accept like any other transform.

Between the grid's pixel centres d is bilinear. Within the grid's extent but beyond the outermost centres (half a
pixel at each edge) d is that of the nearest centre, and outside the extent d = 0 (the identity), as in ITK's
`DisplacementFieldTransform` with its linear interpolator, so a SimpleITK resampling through the same file gives
the same image.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msisynth import errors
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.register.transform_io import _FIELD_SUFFIXES

_INVERSE_STEPS = 30


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["field", "origin_um", "pixel_size_um"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class DisplacementFieldTransform:
  """A FIXED → MOVING map x ↦ x + d(x) with d given at the pixel centres of a grid in the fixed space (µm).

  A JAX pytree.

  Attributes:
    field: (H, W, 2) float32 displacements in µm, [..., 0] along x and [..., 1] along y; pixel (r, c) lies at
      origin_um + (c·px, r·py).
    origin_um: (2,) (x, y) µm of pixel (0, 0)'s centre.
    pixel_size_um: (2,) (px, py) µm, x first.
  """

  field: jax.Array
  origin_um: jax.Array
  pixel_size_um: jax.Array

  @classmethod
  def create(cls, field: jax.typing.ArrayLike, pixel_size_um=1.0, origin_um: Sequence[float] = (0.0, 0.0)):
    """A transform from a (H, W, 2) field (x, y µm) on a grid of `pixel_size_um` (float or (y, x)), checked.

    Raises:
      ConfigError: for a bad shape, pixel size or origin, or a field that is not finite.
    """
    d = np.asarray(field, np.float32)
    if d.ndim != 3 or d.shape[2] != 2 or min(d.shape[:2]) < 1:
      raise errors.ConfigError(f"a displacement field must be (H, W, 2), got shape {d.shape}")
    if not np.all(np.isfinite(d)):
      raise errors.ConfigError("the displacement field is not finite")
    py, px = tf.pixel_size_yx(pixel_size_um, "pixel_size_um")
    origin = np.asarray(origin_um, np.float32)
    if origin.shape != (2,) or not np.all(np.isfinite(origin)):
      raise errors.ConfigError(f"origin_um must be two finite numbers (x, y), got {origin_um!r}")
    return cls(jnp.asarray(d), jnp.asarray(origin), jnp.asarray([px, py], jnp.float32))

  @property
  def affine(self) -> AffineTransform:
    """The identity: a field has no separate affine part (it is in the displacements)."""
    return AffineTransform.identity()

  def displacement(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """d at points (..., 2) µm (see the module for the edges)."""
    return _displacement(self, jnp.asarray(points_xy_um, jnp.float32))

  def apply(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """Maps points (..., 2) µm of the fixed space to the moving space."""
    p = jnp.asarray(points_xy_um, jnp.float32)
    return p + _displacement(self, p)

  def displacement_field(self, shape: Sequence[int], pixel_size_um=1.0) -> np.ndarray:
    """T(x) - x at the pixel centres of a (H, W) grid of `pixel_size_um` from the origin: (H, W, 2) float32 µm."""
    grid = tf.fixed_grid_um((int(shape[0]), int(shape[1])), tf.pixel_size_yx(pixel_size_um, "pixel_size_um"))
    return np.asarray(self.displacement(grid), np.float32)

  def inverse(self) -> InverseDisplacementFieldTransform:
    """MOVING → FIXED, solved per point (see `InverseDisplacementFieldTransform`)."""
    return InverseDisplacementFieldTransform(self)

  def compose(self, other: AffineTransform) -> ComposedTransform:
    """self ∘ other: `other` (an affine) applied first."""
    return ComposedTransform(self, other)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["forward"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class InverseDisplacementFieldTransform:
  """The inverse of a `DisplacementFieldTransform`: y ↦ x with x + d(x) = y, by the fixed-point iteration
  x ← y - d(x) (`_INVERSE_STEPS` steps), which converges where |∇d| < 1 (no folding)."""

  forward: DisplacementFieldTransform

  def apply(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """Maps points (..., 2) µm of the moving space to the fixed space."""
    return _inverse_apply(self.forward, jnp.asarray(points_xy_um, jnp.float32))

  def inverse(self) -> DisplacementFieldTransform:
    return self.forward

  def compose(self, other: AffineTransform) -> ComposedTransform:
    """self ∘ other: `other` (an affine) applied first."""
    return ComposedTransform(self, other)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["outer", "pre"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ComposedTransform:
  """outer ∘ pre: a field transform (or its inverse) after an affine `pre`, as the warps compose them."""

  outer: DisplacementFieldTransform | InverseDisplacementFieldTransform
  pre: AffineTransform

  def apply(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    return self.outer.apply(self.pre.apply(jnp.asarray(points_xy_um, jnp.float32)))

  def compose(self, other: AffineTransform) -> ComposedTransform:
    return ComposedTransform(self.outer, self.pre.compose(other))


@jax.jit
def _displacement(t: DisplacementFieldTransform, points: jax.Array) -> jax.Array:
  idx = (points - t.origin_um) / t.pixel_size_um  # (..., 2) continuous (col, row)
  # Clamped neighbours beyond the outermost centres give the edge value; outside the extent, no displacement.
  d, inside = tf.sample_linear(t.field, idx[..., 1], idx[..., 0])
  return jnp.where(inside[..., None], d, 0.0)


@jax.jit
def _inverse_apply(t: DisplacementFieldTransform, points: jax.Array) -> jax.Array:
  return jax.lax.fori_loop(0, _INVERSE_STEPS, lambda _, x: points - _displacement(t, x), points)


def load_displacement_field(path: str | os.PathLike, *, pixel_size_um=None) -> DisplacementFieldTransform:
  """Reads a dense displacement field (FIXED → MOVING, µm) as a transform.

  `.npy`: a (H, W, 2) float array as `save_displacement_field` writes it ([..., 0] along x, [..., 1] along y, at
  the pixel centres from 0); give its grid's `pixel_size_um`. `.nii`, `.nii.gz`, `.mha`, `.nrrd`: a 2-D ITK vector
  image of 2 components; its spacing and origin are read from the file (`pixel_size_um`, if given, must agree).

  Args:
    path: the file.
    pixel_size_um: the field grid's pixel size, float or (y, x); needed for `.npy`.

  Returns:
    A `DisplacementFieldTransform`.

  Raises:
    DataError: when the file is missing or cannot be read, or its contents are not a 2-D field of 2 components,
      or its direction is not the identity.
    ConfigError: for an unknown suffix, a missing or disagreeing pixel size.
  """
  path = pathlib.Path(path)
  name = path.name.lower()
  if not (name.endswith(".npy") or name.endswith(_FIELD_SUFFIXES)):
    raise errors.ConfigError(f"a displacement field is read from .npy or one of {_FIELD_SUFFIXES}, got {path.name}")
  if not path.is_file():
    raise errors.DataError(f"{path}: no such displacement field file")
  if name.endswith(".npy"):
    if pixel_size_um is None:
      raise errors.ConfigError(f"{path}: a .npy field carries no pixel size; give pixel_size_um")
    try:
      field = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise errors.DataError(f"{path}: not a readable .npy array ({e})") from e
    if field.ndim != 3 or field.shape[2] != 2 or not np.issubdtype(field.dtype, np.floating):
      raise errors.DataError(f"{path}: expected a float (H, W, 2) displacement field, got {field.dtype} {field.shape}")
    if not np.all(np.isfinite(field)):
      raise errors.DataError(f"{path}: the displacement field has NaN or infinite values")
    return DisplacementFieldTransform.create(field, pixel_size_um)
  import SimpleITK as sitk

  try:
    image = sitk.ReadImage(str(path))
  except RuntimeError as e:
    raise errors.DataError(f"{path}: not a readable ITK image ({str(e).strip().splitlines()[-1]})") from e
  if image.GetDimension() != 2 or image.GetNumberOfComponentsPerPixel() != 2:
    raise errors.DataError(f"{path}: expected a 2-D image of 2-component vectors, got a {image.GetDimension()}-D "
                           f"image of {image.GetNumberOfComponentsPerPixel()} components")  # fmt: skip
  if not np.allclose(image.GetDirection(), (1.0, 0.0, 0.0, 1.0), atol=1e-6):
    raise errors.DataError(f"{path}: the field's direction {image.GetDirection()} is not the identity; resample it "
                           "onto an axis-aligned grid first")  # fmt: skip
  field = sitk.GetArrayFromImage(image).astype(np.float32)  # (H, W, 2), x first
  if not np.all(np.isfinite(field)):
    raise errors.DataError(f"{path}: the displacement field has NaN or infinite values")
  px, py = image.GetSpacing()
  if pixel_size_um is not None and not np.allclose(tf.pixel_size_yx(pixel_size_um), (py, px), rtol=1e-5):
    raise errors.ConfigError(f"{path}: its spacing (y, x) = ({py}, {px}) µm disagrees with pixel_size_um "
                             f"{pixel_size_um!r}")  # fmt: skip
  return DisplacementFieldTransform.create(field, (py, px), image.GetOrigin())
