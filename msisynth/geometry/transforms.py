"""Affine transforms in physical space and image resampling (warping).

Conventions (docs/architecture.md): pixel (r, c) of an image with pixel size (py, px) µm has its centre at
(x, y) = (c·px, r·py) µm; points are (x, y) in µm; an `AffineTransform` holds a 3×3 homogeneous matrix that maps a
point of the FIXED image's space to the MOVING image's space (ITK's convention), so resampling the moving image
onto the fixed grid samples the moving image at T(x_fixed).

Images are (H, W) or (H, W, C) arrays, row = y, column = x. Interpolation follows ITK's resampler so that results
can be checked against SimpleITK: a point is inside an image when its continuous index lies in
[-0.5, size - 0.5) on both axes; bilinear interpolation clamps neighbours to the image there; points outside get
`cval`; nearest neighbour rounds half up (floor(i + 0.5)).

Parameters (`from_params`, `to_params`) are a vector of six numbers,
`[rotation (rad), log_scale_x, log_scale_y, shear, translation_x (µm), translation_y (µm)]`, taken about a centre
c (normally the fixed image's centre): x_moving = A (x - c) + c + t with A = R(rotation) · [[1, shear], [0, 1]] ·
diag(exp(log_scale_x), exp(log_scale_y)). Every 2×2 matrix with a positive determinant has exactly one such
decomposition (a QR factorisation), so `to_params` inverts `from_params`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msisynth import errors
from msisynth.geometry.grid import pixel_size_yx  # noqa: F401 (the one parser; callers use tf.pixel_size_yx)
from msisynth.types import MSIImage

KINDS = ("rigid", "similarity", "affine")
NUM_PARAMS = 6
PARAM_NAMES = ("rotation_rad", "log_scale_x", "log_scale_y", "shear", "translation_x_um", "translation_y_um")

# Bytes of output per chunk of channels when warping a cube; bounds the intermediates of the gather.
_CHUNK_BYTES = 256 * 2**20


@functools.partial(jax.tree_util.register_dataclass, data_fields=["matrix"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class AffineTransform:
  """A 2-D affine map between physical spaces (µm), FIXED → MOVING.

  It is a JAX pytree (its one leaf is `matrix`), so it passes through `jit`, `vmap` and `grad`; a vmapped
  function returning transforms gives one whose matrix is (K, 3, 3).

  Attributes:
    matrix: (3, 3) float32 homogeneous matrix; [x_m, y_m, 1] = matrix @ [x_f, y_f, 1] in µm.
  """

  matrix: jax.Array

  @classmethod
  def identity(cls) -> AffineTransform:
    """The identity map."""
    return cls(jnp.eye(3, dtype=jnp.float32))

  @classmethod
  def from_matrix(cls, matrix: jax.typing.ArrayLike) -> AffineTransform:
    """A transform from a (3, 3) homogeneous matrix or a (2, 3) [A | b] matrix, in µm.

    Raises:
      ConfigError: when the matrix is not (3, 3) or (2, 3).
    """
    m = jnp.asarray(matrix, dtype=jnp.float32)
    if m.shape == (2, 3):
      m = jnp.concatenate([m, jnp.array([[0.0, 0.0, 1.0]], jnp.float32)], axis=0)
    if m.shape[-2:] != (3, 3):
      raise errors.ConfigError(f"an affine matrix must be (3, 3) or (2, 3), got shape {m.shape}")
    return cls(m)

  @classmethod
  def from_linear(cls, linear: jax.typing.ArrayLike, translation_um: jax.typing.ArrayLike) -> AffineTransform:
    """x_moving = linear @ x_fixed + translation_um (ITK's matrix and offset).

    Args:
      linear: (2, 2) matrix acting on (x, y) µm.
      translation_um: (2,) offset (x, y) in µm.

    Returns:
      The transform.
    """
    a = jnp.asarray(linear, jnp.float32)
    b = jnp.asarray(translation_um, jnp.float32)
    top = jnp.concatenate([a, b[:, None]], axis=1)
    return cls(jnp.concatenate([top, jnp.array([[0.0, 0.0, 1.0]], jnp.float32)], axis=0))

  @classmethod
  def from_params(cls, params: jax.typing.ArrayLike, center_um: jax.typing.ArrayLike = (0.0, 0.0)) -> AffineTransform:
    """The transform of a parameter vector about a centre (see the module docstring).

    Args:
      params: (6,) `[rotation (rad), log_scale_x, log_scale_y, shear, translation_x (µm), translation_y (µm)]`.
      center_um: (2,) centre (x, y) in µm of the rotation, scaling and shear; the fixed image's centre.

    Returns:
      The transform; differentiable in `params`.
    """
    p = jnp.asarray(params, jnp.float32)
    c = jnp.asarray(center_um, jnp.float32)
    cos, sin = jnp.cos(p[0]), jnp.sin(p[0])
    sx, sy = jnp.exp(p[1]), jnp.exp(p[2])
    # R @ [[1, k], [0, 1]] @ diag(sx, sy) = R @ [[sx, k sy], [0, sy]]
    a = jnp.stack(
      [
        jnp.stack([cos * sx, (cos * p[3] - sin) * sy]),
        jnp.stack([sin * sx, (sin * p[3] + cos) * sy]),
      ]
    )
    b = c + p[4:6] - a @ c
    return cls.from_linear(a, b)

  @classmethod
  def mirror(cls, axis: str, center_um: jax.typing.ArrayLike = (0.0, 0.0)) -> AffineTransform:
    """A reflection about a centre: axis "x" mirrors x (a horizontal flip), "y" mirrors y (a vertical flip).

    Raises:
      ConfigError: for another axis.
    """
    if axis not in ("x", "y"):
      raise errors.ConfigError(f"mirror axis must be 'x' or 'y', got {axis!r}")
    d = jnp.array([-1.0, 1.0] if axis == "x" else [1.0, -1.0], jnp.float32)
    c = jnp.asarray(center_um, jnp.float32)
    return cls.from_linear(jnp.diag(d), c - d * c)

  @property
  def linear(self) -> jax.Array:
    """The (2, 2) linear part A."""
    return self.matrix[..., :2, :2]

  @property
  def translation(self) -> jax.Array:
    """The (2,) offset b in µm (x_moving = A x_fixed + b)."""
    return self.matrix[..., :2, 2]

  @property
  def determinant(self) -> jax.Array:
    """det(A): negative for a mirror, the area ratio moving/fixed otherwise."""
    return jnp.linalg.det(self.linear)

  def to_params(self, center_um: jax.typing.ArrayLike = (0.0, 0.0)) -> jax.Array:
    """The parameter vector of this transform about a centre; the inverse of `from_params`.

    Args:
      center_um: (2,) centre (x, y) in µm.

    Returns:
      (6,) parameters. NaN log-scales when det(A) <= 0 (a mirror has no such parameters).
    """
    a = self.linear
    c = jnp.asarray(center_um, jnp.float32)
    rotation = jnp.arctan2(a[1, 0], a[0, 0])
    sx = jnp.hypot(a[0, 0], a[1, 0])
    cos, sin = jnp.cos(rotation), jnp.sin(rotation)
    u = jnp.array([[cos, sin], [-sin, cos]]) @ a  # R^T A = [[sx, k sy], [0, sy]]
    sy = u[1, 1]
    t = self.translation - c + a @ c
    return jnp.stack([rotation, jnp.log(sx), jnp.log(sy), u[0, 1] / sy, t[0], t[1]])

  def compose(self, other: AffineTransform) -> AffineTransform:
    """self ∘ other: the map x ↦ self(other(x)); `other` is applied first.

    With T1: A → B and T2: B → C, `T2.compose(T1)` maps A → C.
    """
    return AffineTransform(self.matrix @ other.matrix)

  def inverse(self) -> AffineTransform:
    """The inverse map (MOVING → FIXED for a registration result)."""
    return AffineTransform(jnp.linalg.inv(self.matrix))

  def apply(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """Maps points.

    Args:
      points_xy_um: (N, 2) or (2,) points (x, y) in µm of the fixed space.

    Returns:
      Points of the same shape in the moving space, µm.
    """
    p = jnp.asarray(points_xy_um, jnp.float32)
    return p @ self.linear.T + self.translation


def constrain_params(params: jax.typing.ArrayLike, kind: str) -> jax.Array:
  """Projects a parameter vector onto a transform family.

  "rigid" keeps rotation and translation (scales and shear 0); "similarity" also keeps one isotropic scale (the
  mean of the two log-scales) and no shear; "affine" keeps everything. Optimising the projected vector fixes the
  dropped parameters (their gradient is zero).

  Args:
    params: (..., 6) parameter vectors.
    kind: "rigid", "similarity" or "affine".

  Returns:
    The projected parameters, same shape.

  Raises:
    ConfigError: for an unknown kind.
  """
  p = jnp.asarray(params, jnp.float32)
  if kind == "affine":
    return p
  if kind == "similarity":
    s = 0.5 * (p[..., 1] + p[..., 2])
    return jnp.stack([p[..., 0], s, s, jnp.zeros_like(s), p[..., 4], p[..., 5]], axis=-1)
  if kind == "rigid":
    z = jnp.zeros_like(p[..., 0])
    return jnp.stack([p[..., 0], z, z, z, p[..., 4], p[..., 5]], axis=-1)
  raise errors.ConfigError(f"transform kind must be one of {KINDS}, got {kind!r}")


def image_center_um(shape: Sequence[int], pixel_size_um=1.0) -> jax.Array:
  """The physical centre (x, y) µm of an image of `shape` (H, W, ...): the midpoint of its corner pixel centres."""
  py, px = pixel_size_yx(pixel_size_um)
  return jnp.array([(shape[1] - 1) * px / 2.0, (shape[0] - 1) * py / 2.0], jnp.float32)


def image_corners_um(shape: Sequence[int], pixel_size_um=1.0) -> jax.Array:
  """The four corner pixel centres (x, y) µm of an image of `shape`, as a (4, 2) array."""
  py, px = pixel_size_yx(pixel_size_um)
  w, h = (shape[1] - 1) * px, (shape[0] - 1) * py
  return jnp.array([[0.0, 0.0], [w, 0.0], [0.0, h], [w, h]], jnp.float32)


def fixed_grid_um(fixed_shape: Sequence[int], fixed_pixel_size_um=1.0) -> jax.Array:
  """The pixel centres of a grid as an (H, W, 2) array of (x, y) µm."""
  py, px = pixel_size_yx(fixed_pixel_size_um)
  h, w = int(fixed_shape[0]), int(fixed_shape[1])
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) * py, jnp.arange(w, dtype=jnp.float32) * px, indexing="ij")
  return jnp.stack([xx, yy], axis=-1)


def sample_linear(
  image: jax.Array, rows: jax.Array, cols: jax.Array, valid_shape: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Bilinear samples of an image at continuous indices, ITK style; differentiable in `rows` and `cols`.

  Args:
    image: (H, W) or (H, W, C).
    rows: continuous row indices, any shape S.
    cols: continuous column indices, shape S.
    valid_shape: optional (2,) int (h, w) <= (H, W): treat the image as its top-left h × w block (the rest is
      padding), which lets images of several sizes share one compiled shape.

  Returns:
    (values, inside): values of shape S (+ (C,)), float; inside (shape S, bool) is True where the point lies in
    [-0.5, h - 0.5) × [-0.5, w - 0.5). Values outside are those of the clamped neighbours; callers mask them.
  """
  h, w = (image.shape[0], image.shape[1]) if valid_shape is None else (valid_shape[0], valid_shape[1])
  inside = (rows >= -0.5) & (rows < h - 0.5) & (cols >= -0.5) & (cols < w - 0.5)
  r0 = jnp.floor(rows)
  c0 = jnp.floor(cols)
  fr = rows - r0
  fc = cols - c0
  r0i = r0.astype(jnp.int32)
  c0i = c0.astype(jnp.int32)
  ra = jnp.clip(r0i, 0, h - 1)
  rb = jnp.clip(r0i + 1, 0, h - 1)
  ca = jnp.clip(c0i, 0, w - 1)
  cb = jnp.clip(c0i + 1, 0, w - 1)
  img = image.astype(jnp.promote_types(image.dtype, jnp.float32))
  if image.ndim == 3:
    return _blend_channels(img[ra, ca], img[ra, cb], img[rb, ca], img[rb, cb], fr, fc), inside
  top = img[ra, ca] * (1 - fc) + img[ra, cb] * fc
  bottom = img[rb, ca] * (1 - fc) + img[rb, cb] * fc
  return top * (1 - fr) + bottom * fr, inside


@jax.custom_vjp
def _blend_channels(v00, v01, v10, v11, fr, fc):
  """Bilinear blend of the four (S, C) corner values with (S,) fractions. Its gradient in the fractions sums over
  the channels one slice at a time: the reduction over a short last axis that autodiff produces compiled to a
  kernel on the CPU that took most of a registration step's time."""
  fr, fc = fr[..., None], fc[..., None]
  return (v00 * (1 - fc) + v01 * fc) * (1 - fr) + (v10 * (1 - fc) + v11 * fc) * fr


def _blend_fwd(v00, v01, v10, v11, fr, fc):
  return _blend_channels(v00, v01, v10, v11, fr, fc), (v00, v01, v10, v11, fr, fc)


def _blend_bwd(res, g):
  v00, v01, v10, v11, fr, fc = res
  r, c = fr[..., None], fc[..., None]
  d_fr = d_fc = 0.0
  for i in range(g.shape[-1]):
    gi = g[..., i]
    top = v00[..., i] * (1 - fc) + v01[..., i] * fc
    bottom = v10[..., i] * (1 - fc) + v11[..., i] * fc
    d_fr = d_fr + gi * (bottom - top)
    d_fc = d_fc + gi * ((v01[..., i] - v00[..., i]) * (1 - fr) + (v11[..., i] - v10[..., i]) * fr)
  return (g * (1 - c) * (1 - r), g * c * (1 - r), g * (1 - c) * r, g * c * r,
          jnp.broadcast_to(d_fr, fr.shape), jnp.broadcast_to(d_fc, fc.shape))  # fmt: skip


_blend_channels.defvjp(_blend_fwd, _blend_bwd)


def sample_nearest(image: jax.Array, rows: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Nearest-neighbour samples (rounding half up, as ITK), keeping the image dtype.

  Args:
    image: (H, W) or (H, W, C).
    rows: continuous row indices, any shape S.
    cols: continuous column indices, shape S.

  Returns:
    (values, inside) as in `sample_linear`.
  """
  h, w = image.shape[0], image.shape[1]
  ri = jnp.floor(rows + 0.5).astype(jnp.int32)
  ci = jnp.floor(cols + 0.5).astype(jnp.int32)
  inside = (ri >= 0) & (ri < h) & (ci >= 0) & (ci < w)
  return image[jnp.clip(ri, 0, h - 1), jnp.clip(ci, 0, w - 1)], inside


def _moving_indices(transform, fixed_shape, fixed_pixel_size_um, moving_pixel_size_um):
  if isinstance(transform, AffineTransform):
    grid = fixed_grid_um(fixed_shape, fixed_pixel_size_um)
    mapped = grid @ transform.linear.T + transform.translation
  elif hasattr(transform, "apply_grid"):  # separable deformable maps (BSplineTransform) evaluate a grid faster
    mapped = transform.apply_grid(fixed_shape, fixed_pixel_size_um)
  else:
    mapped = transform.apply(fixed_grid_um(fixed_shape, fixed_pixel_size_um))
  pym, pxm = moving_pixel_size_um
  return mapped[..., 1] / pym, mapped[..., 0] / pxm


@functools.partial(jax.jit, static_argnames=("fixed_shape", "fixed_pixel_size_um", "moving_pixel_size_um", "order"))
def _warp_chunk(moving, transform, cval, *, fixed_shape, fixed_pixel_size_um, moving_pixel_size_um, order):
  rows, cols = _moving_indices(transform, fixed_shape, fixed_pixel_size_um, moving_pixel_size_um)
  if order == 0:
    values, inside = sample_nearest(moving, rows, cols)
  else:
    values, inside = sample_linear(moving, rows, cols)
  if moving.ndim == 3:
    inside = inside[..., None]
  return jnp.where(inside, values, jnp.asarray(cval).astype(values.dtype))


def _check_transform(transform) -> None:
  """Accepts one AffineTransform, or any FIXED → MOVING pytree transform with an `apply(points_xy_um)` method
  (`msisynth.register.bspline.BSplineTransform` and its inverse)."""
  if isinstance(transform, AffineTransform):
    if transform.matrix.shape != (3, 3):
      raise errors.ConfigError("transform must be a single AffineTransform with a (3, 3) matrix")
  elif not callable(getattr(transform, "apply", None)):
    raise errors.ConfigError(
      f"transform must be an AffineTransform or a BSplineTransform, got {type(transform).__name__}"
    )


def warp_image(
  moving: jax.typing.ArrayLike,
  transform: AffineTransform,
  fixed_shape: Sequence[int],
  *,
  fixed_pixel_size_um=1.0,
  moving_pixel_size_um=1.0,
  order: int = 1,
  cval: float = 0.0,
) -> jax.Array:
  """Resamples a moving image onto the fixed grid through a FIXED → MOVING transform.

  Output pixel (r, c) is the moving image sampled at T((c·px_f, r·py_f)) divided by the moving pixel size, i.e.
  what SimpleITK's `Resample(moving, reference=fixed, transform)` gives with spacing = pixel sizes and origin 0.

  Args:
    moving: (H, W) or (H, W, C) image; a whole MSI cube is fine (channels are warped in chunks).
    transform: FIXED → MOVING `AffineTransform` in µm, or a deformable `BSplineTransform` (or its inverse).
    fixed_shape: (H, W) of the output grid (extra entries are ignored).
    fixed_pixel_size_um: fixed pixel size, float or (y, x).
    moving_pixel_size_um: moving pixel size, float or (y, x).
    order: 1 bilinear (intensities; float output) or 0 nearest (labels and masks; the dtype is kept).
    cval: value outside the moving image.

  Returns:
    (H_f, W_f) or (H_f, W_f, C) array.

  Raises:
    ConfigError: for a bad order, shape or pixel size.
  """
  if order not in (0, 1):
    raise errors.ConfigError(f"order must be 0 (nearest) or 1 (bilinear), got {order!r}")
  moving = jnp.asarray(moving)
  if moving.ndim not in (2, 3):
    raise errors.ConfigError(f"moving image must be (H, W) or (H, W, C), got shape {moving.shape}")
  if len(fixed_shape) < 2 or min(int(fixed_shape[0]), int(fixed_shape[1])) < 1:
    raise errors.ConfigError(f"fixed_shape must be (H, W), got {fixed_shape!r}")
  _check_transform(transform)
  fixed_shape = (int(fixed_shape[0]), int(fixed_shape[1]))
  kwargs = dict(
    fixed_shape=fixed_shape,
    fixed_pixel_size_um=pixel_size_yx(fixed_pixel_size_um, "fixed_pixel_size_um"),
    moving_pixel_size_um=pixel_size_yx(moving_pixel_size_um, "moving_pixel_size_um"),
    order=order,
  )
  cval = jnp.asarray(cval)
  if moving.ndim == 2:
    return _warp_chunk(moving, transform, cval, **kwargs)
  num_channels = moving.shape[2]
  per_channel = fixed_shape[0] * fixed_shape[1] * max(moving.dtype.itemsize, 4)
  chunk = max(1, min(num_channels, _CHUNK_BYTES // max(per_channel, 1)))
  if chunk >= num_channels:
    return _warp_chunk(moving, transform, cval, **kwargs)
  # Equal chunks keep one compiled shape; the last one is padded.
  pieces = []
  for start in range(0, num_channels, chunk):
    part = moving[:, :, start : start + chunk]
    n = part.shape[2]
    if n < chunk:
      part = jnp.pad(part, ((0, 0), (0, 0), (0, chunk - n)))
    pieces.append(_warp_chunk(part, transform, cval, **kwargs)[:, :, :n])
  return jnp.concatenate(pieces, axis=2)


def warp_msi(
  msi: MSIImage,
  transform: AffineTransform,
  fixed_shape: Sequence[int],
  fixed_pixel_size_um,
  *,
  moving_pixel_size_um=None,
  order: int = 1,
) -> MSIImage:
  """Carries a whole MSI image (every channel and the mask) into the fixed (histology) space.

  Args:
    msi: the moving MSI image.
    transform: FIXED (histology) → MOVING (MSI) transform in µm, as `register` returns (or a `BSplineTransform`
      from `register_deformable`).
    fixed_shape: (H, W) of the histology grid.
    fixed_pixel_size_um: histology pixel size, float or (y, x).
    moving_pixel_size_um: MSI pixel size; defaults to `msi.pixel_size_um`.
    order: interpolation of the cube (1 bilinear, 0 nearest); the mask always uses nearest neighbour.

  Returns:
    An MSIImage on the histology grid: float32 cube (0 outside the MSI), the warped mask, the histology pixel size
    and the metadata of `msi` plus "warped_to" (shape, pixel size and matrix).

  Raises:
    ConfigError: when no MSI pixel size is known.
  """
  if moving_pixel_size_um is None:
    moving_pixel_size_um = msi.pixel_size_um
  if moving_pixel_size_um is None:
    raise errors.ConfigError("the MSI has no pixel size; pass moving_pixel_size_um")
  fy, fx = pixel_size_yx(fixed_pixel_size_um, "fixed_pixel_size_um")
  kwargs = dict(fixed_pixel_size_um=(fy, fx), moving_pixel_size_um=moving_pixel_size_um)
  cube = warp_image(msi.cube.astype(np.float32), transform, fixed_shape, order=order, **kwargs)
  mask = warp_image(msi.mask, transform, fixed_shape, order=0, cval=False, **kwargs)
  metadata = dict(msi.metadata)
  affine = transform if isinstance(transform, AffineTransform) else getattr(transform, "affine", None)
  metadata["warped_to"] = {
    "shape": [int(fixed_shape[0]), int(fixed_shape[1])],
    "pixel_size_um": [fy, fx],
    "matrix_fixed_to_moving_um": None if affine is None else np.asarray(affine.matrix, np.float64).tolist(),
  }
  if not isinstance(transform, AffineTransform):
    metadata["warped_to"]["deformable"] = type(transform).__name__
  return MSIImage(
    cube=np.asarray(cube, np.float32), mz=msi.mz, mask=np.asarray(mask), pixel_size_um=(fy, fx), metadata=metadata
  )


def rotation_deg(transform: AffineTransform) -> float:
  """The rotation angle (degrees) of a transform's linear part, for reports."""
  a = np.asarray(transform.linear, np.float64)
  if np.linalg.det(a) < 0:
    a = a @ np.diag([-1.0, 1.0])
  return math.degrees(math.atan2(a[1, 0], a[0, 0]))
