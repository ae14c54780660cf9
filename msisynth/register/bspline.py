"""Deformable registration: a cubic B-spline free-form deformation refining an affine registration.

The transform (FIXED → MOVING, µm; docs/architecture.md) is

  T(x) = A (x + d(x)) + b,

with (A, b) the affine registration and d a cubic B-spline displacement field in the FIXED image's space:
d(x) = Σ_ij c_ij β(u_x - i) β(u_y - j), where u = (x - grid_origin) / grid_spacing is the continuous control-grid
index of x, node (i, j) (column i, row j) lies at grid_origin + (i·h_x, j·h_y), β is the cubic B-spline and the
coefficients c_ij are displacements (x, y) in µm. This is ITK's composite of an `AffineTransform` and a
`BSplineTransform` of order 3 (the B-spline applied first), written by
`msisynth.register.transform_io.save_itk_transform`: the grid origin, spacing and size are ITK's FixedParameters,
and like ITK the displacement is 0 where a point's index lies outside [1, n - 2] on either axis (n nodes).

A grid built for an image (`BSplineTransform.for_image`) covers its extent, from the edge of pixel (0, 0) at
(-px/2, -py/2) over ceil(extent / spacing) cells of exactly the requested spacing, with one node beyond each
edge, as ITK's B-spline grids do.

`register_deformable(fixed, moving, affine)` optimises the coefficients by gradient descent (Adam with one
second moment shared by all coefficients, so that a step follows the gradient's direction) on the
similarity the affine stage uses (`msisynth.register.similarity`: Parzen MI, NMI, NCC or MSE) plus a bending-energy
penalty, coarse to fine: at level l (coarsest first) the images are smoothed and subsampled to pixels about 2^l
times the working pixel size and the control spacing is 2^l times the final one; each level starts from the
previous level's deformation, refined exactly onto the finer grid (B-spline subdivision). Every level pads its
arrays (samples, moving image, control grid) to the finest level's shapes, so a registration compiles once and
registrations of same-shaped images reuse that compilation.

Bending energy: the mean over the grid's domain of |∂²d/∂x²|² + 2 |∂²d/∂x∂y|² + |∂²d/∂y²|² (d in µm), times the
square of the final control spacing, which makes it dimensionless (about (displacement / spacing)² for a
deformation varying over a few control spacings). It is computed exactly from the coefficients (Gram matrices of
the B-spline's derivatives).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from msisynth import errors
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import optimize
from msisynth.register import similarity as sim

SIMILARITIES = optimize.SIMILARITIES
# Fixed-point steps of the inverse map; each one divides the error by about 1 / max |∇d| (a few per digit).
_INVERSE_STEPS = 30
# Points per chunk when mapping many points through the B-spline (bounds the gathers' intermediates).
_POINT_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- the cubic B-spline


def _bspline(t):
  """The cubic B-spline β(t) (support (-2, 2)) and its first two derivatives, as a tuple."""
  a = jnp.abs(t)
  inner = a < 1.0
  b = jnp.clip(2.0 - a, 0.0, None)
  value = jnp.where(inner, 2.0 / 3.0 - a * a + 0.5 * a**3, b**3 / 6.0)
  first = jnp.where(inner, -2.0 * t + 1.5 * t * a, -jnp.sign(t) * b * b / 2.0)
  second = jnp.where(inner, -2.0 + 3.0 * a, b)
  return value, first, second


def _np_bspline(t, derivative):
  a = np.abs(t)
  inner = a < 1.0
  b = np.clip(2.0 - a, 0.0, None)
  if derivative == 0:
    return np.where(inner, 2.0 / 3.0 - a * a + 0.5 * a**3, b**3 / 6.0)
  if derivative == 1:
    return np.where(inner, -2.0 * t + 1.5 * t * a, -np.sign(t) * b * b / 2.0)
  return np.where(inner, -2.0 + 3.0 * a, b)


def _spline_sum(coefficients: jax.Array, u: jax.Array) -> jax.Array:
  """Σ_ij c_ij β(u_x - i) β(u_y - j) at continuous grid indices u (..., 2) (x, y); (2, ny, nx) coefficients.

  Nodes beyond the array read as their nearest node; they only ever carry zero weight for points inside the
  grid's valid region. Returns (..., 2).
  """
  ny, nx = coefficients.shape[1], coefficients.shape[2]
  start = jnp.floor(u) - 1.0
  offsets = jnp.arange(4, dtype=jnp.float32)
  nodes = start[..., None] + offsets  # (..., 2, 4)
  weights = _bspline(u[..., None] - nodes)[0]
  ix = jnp.clip(nodes[..., 0, :].astype(jnp.int32), 0, nx - 1)
  iy = jnp.clip(nodes[..., 1, :].astype(jnp.int32), 0, ny - 1)
  flat = coefficients.reshape(2, ny * nx)
  total = jnp.zeros((*u.shape[:-1], 2), jnp.float32)
  for a in range(4):  # one row of 4 nodes at a time keeps the gathers small
    idx = iy[..., a, None] * nx + ix  # (..., 4)
    values = jnp.moveaxis(flat[:, idx], 0, -1)  # (..., 4, 2)
    total = total + weights[..., 1, a, None] * jnp.sum(values * weights[..., 0, :, None], axis=-2)
  return total


def _basis_matrix(positions, origin, spacing, size, derivative=0):
  """(P, size) NumPy matrix of the 1-D B-spline basis (or a derivative, per grid index) at positions (µm)."""
  u = (np.asarray(positions, np.float64) - origin) / spacing
  return _np_bspline(u[:, None] - np.arange(size)[None, :], derivative)


def _gram_matrices(size: int, cells: int) -> np.ndarray:
  """(3, size, size) ∫ β^(k)(u - i) β^(k)(u - j) du over the valid index range [1, cells + 1], for k = 0, 1, 2.

  Gauss–Legendre with 4 points per cell is exact: the products are polynomials of degree ≤ 6 on each cell.
  """
  nodes, weights = np.polynomial.legendre.leggauss(4)
  u = (np.arange(1, cells + 1)[:, None] + 0.5 + 0.5 * nodes[None, :]).ravel()
  w = np.tile(0.5 * weights, cells)
  out = np.empty((3, size, size))
  for k in range(3):
    basis = _np_bspline(u[:, None] - np.arange(size)[None, :], k)
    out[k] = basis.T @ (basis * w[:, None])
  return out


def _refinement_matrix(size_fine: int, size_coarse: int) -> np.ndarray:
  """(size_fine, size_coarse) map of coefficients from a grid to one of half the spacing (exact subdivision).

  With the coarse grid's origin one fine spacing below the fine grid's, coarse node i lies at fine node 2i - 1,
  and β(t) = Σ_k s_k β(2t - k) with s = (1, 4, 6, 4, 1) / 8 for k = -2 … 2.
  """
  s = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 8.0
  out = np.zeros((size_fine, size_coarse))
  for i in range(size_coarse):
    for k in range(-2, 3):
      j = 2 * i + k - 1
      if 0 <= j < size_fine:
        out[j, i] = s[k + 2]
  return out


# ------------------------------------------------------------------------------------------------ the transform


def _spacing_xy(spacing_um, name="grid_spacing_um") -> tuple[float, float]:
  sy, sx = tf.pixel_size_yx(spacing_um, name)
  return sx, sy


def grid_for_domain(
  domain_origin_um: Sequence[float], domain_size_um: Sequence[float], spacing_um
) -> tuple[tuple[int, int], tuple[float, float], tuple[float, float]]:
  """The control grid covering a rectangle: ((ny, nx) nodes, origin (x, y) µm, spacing (x, y) µm).

  Args:
    domain_origin_um: (x, y) of the rectangle's lower corner, µm.
    domain_size_um: (width, height) µm.
    spacing_um: control-point spacing, µm, float or (y, x).

  Returns:
    ceil(size / spacing) cells (at least 1) of exactly that spacing, from the domain's origin, plus one node beyond
    each edge: n = cells + 3 nodes per axis, the first one spacing before the origin.
  """
  hx, hy = _spacing_xy(spacing_um)
  cells = [max(1, math.ceil(float(s) / h - 1e-9)) for s, h in zip(domain_size_um, (hx, hy))]
  origin = (float(domain_origin_um[0]) - hx, float(domain_origin_um[1]) - hy)
  return (cells[1] + 3, cells[0] + 3), origin, (hx, hy)


def image_domain_um(shape: Sequence[int], pixel_size_um=1.0) -> tuple[tuple[float, float], tuple[float, float]]:
  """(origin (x, y), size (width, height)) µm of an image's extent: pixel edges, from (-px/2, -py/2)."""
  py, px = tf.pixel_size_yx(pixel_size_um)
  return (-0.5 * px, -0.5 * py), (int(shape[1]) * px, int(shape[0]) * py)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["affine", "coefficients", "grid_origin_um", "grid_spacing_um"],
  meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class BSplineTransform:
  """A FIXED → MOVING map T(x) = A (x + d(x)) + b: an affine after a cubic B-spline displacement (µm).

  A JAX pytree; the control grid's size is the coefficients' shape. See the module docstring for d.

  Attributes:
    affine: the `AffineTransform` (A, b), applied after the displacement.
    coefficients: (2, ny, nx) float32 control-point displacements in µm, [0] along x and [1] along y; node
      [:, j, i] (row j, column i) lies at grid_origin_um + (i·h_x, j·h_y).
    grid_origin_um: (2,) (x, y) µm of node (0, 0), in the fixed image's space.
    grid_spacing_um: (2,) (h_x, h_y) µm between nodes.
  """

  affine: AffineTransform
  coefficients: jax.Array
  grid_origin_um: jax.Array
  grid_spacing_um: jax.Array

  @classmethod
  def create(
    cls,
    affine: AffineTransform,
    coefficients: jax.typing.ArrayLike,
    grid_origin_um: Sequence[float],
    grid_spacing_um: Sequence[float],
  ) -> BSplineTransform:
    """A transform from its parts, checked.

    Args:
      affine: the affine applied after the displacement.
      coefficients: (2, ny, nx) displacements (x, y) µm, ny, nx ≥ 4.
      grid_origin_um: (x, y) of node (0, 0), µm.
      grid_spacing_um: (h_x, h_y) µm, positive.

    Raises:
      ConfigError: for a bad shape or spacing.
    """
    if not isinstance(affine, AffineTransform):
      raise errors.ConfigError(f"affine must be an AffineTransform, got {type(affine).__name__}")
    c = jnp.asarray(coefficients, jnp.float32)
    if c.ndim != 3 or c.shape[0] != 2 or min(c.shape[1:]) < 4:
      raise errors.ConfigError(f"coefficients must be (2, ny, nx) with ny, nx >= 4, got shape {c.shape}")
    origin = np.asarray(grid_origin_um, np.float64).reshape(-1)
    spacing = np.asarray(grid_spacing_um, np.float64).reshape(-1)
    if origin.size != 2 or spacing.size != 2 or not np.all(np.isfinite(origin)) or np.any(~(spacing > 0)):
      raise errors.ConfigError(f"need a finite (x, y) origin and positive spacing, got {origin} and {spacing}")
    return cls(affine, c, jnp.asarray(origin, jnp.float32), jnp.asarray(spacing, jnp.float32))

  @classmethod
  def for_image(
    cls,
    fixed_shape: Sequence[int],
    grid_spacing_um,
    *,
    fixed_pixel_size_um=1.0,
    affine: AffineTransform | None = None,
  ) -> BSplineTransform:
    """The zero displacement on a grid of the given spacing covering a fixed image (see the module docstring).

    Args:
      fixed_shape: (H, W) of the fixed image.
      grid_spacing_um: control-point spacing, µm, float or (y, x).
      fixed_pixel_size_um: fixed pixel size, float or (y, x).
      affine: the affine part; the identity when None.

    Returns:
      The transform, equal to `affine` everywhere.
    """
    origin, size = image_domain_um(fixed_shape, fixed_pixel_size_um)
    shape, grid_origin, spacing = grid_for_domain(origin, size, grid_spacing_um)
    affine = AffineTransform.identity() if affine is None else affine
    return cls.create(affine, jnp.zeros((2, *shape), jnp.float32), grid_origin, spacing)

  @property
  def grid_shape(self) -> tuple[int, int]:
    """(ny, nx) control nodes."""
    return int(self.coefficients.shape[1]), int(self.coefficients.shape[2])

  def grid_index(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """Continuous control-grid indices (x, y) of fixed-space points (..., 2) µm."""
    return (jnp.asarray(points_xy_um, jnp.float32) - self.grid_origin_um) / self.grid_spacing_um

  def displacement(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """d(x): the B-spline displacement (..., 2) µm at fixed-space points (..., 2) µm; 0 outside the grid."""
    return _displacement(self, jnp.asarray(points_xy_um, jnp.float32))

  def apply(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """Maps fixed-space points (N, 2) or (..., 2) µm to the moving space: A (x + d(x)) + b."""
    return _apply(self, jnp.asarray(points_xy_um, jnp.float32))

  def apply_grid(self, shape: Sequence[int], pixel_size_um=1.0) -> jax.Array:
    """T at every pixel centre of a grid, (H, W, 2) µm; separable, so cheaper than `apply` on many points.

    Args:
      shape: (H, W) of the grid (static under `jit`).
      pixel_size_um: its pixel size, float or (y, x) (static under `jit`).
    """
    return _apply_grid(self, (int(shape[0]), int(shape[1])), tf.pixel_size_yx(pixel_size_um))

  def inverse(self) -> InverseBSplineTransform:
    """The inverse map (MOVING → FIXED), solved numerically point by point (see `InverseBSplineTransform`)."""
    return InverseBSplineTransform(self, AffineTransform.identity())

  def with_affine(self, affine: AffineTransform) -> BSplineTransform:
    """The same displacement after another affine."""
    return BSplineTransform(affine, self.coefficients, self.grid_origin_um, self.grid_spacing_um)

  def refine(self) -> BSplineTransform:
    """The same map on a grid of half the spacing over the same domain (exact B-spline subdivision)."""
    ny, nx = self.grid_shape
    spacing = np.asarray(self.grid_spacing_um, np.float64)
    origin = np.asarray(self.grid_origin_um, np.float64) + spacing / 2.0
    ry = _refinement_matrix(2 * (ny - 3) + 3, ny)
    rx = _refinement_matrix(2 * (nx - 3) + 3, nx)
    c = np.einsum("yj,kji,xi->kyx", ry, np.asarray(self.coefficients, np.float64), rx)
    return BSplineTransform.create(self.affine, c, origin, spacing / 2.0)

  def bending_energy(self, reference_spacing_um: float | None = None) -> jax.Array:
    """The bending energy of d (see the module docstring), dimensionless.

    Args:
      reference_spacing_um: the length whose square makes it dimensionless; the geometric mean of this grid's
        spacing when None.
    """
    ny, nx = self.grid_shape
    hx, hy = (float(v) for v in np.asarray(self.grid_spacing_um))
    ref = math.sqrt(hx * hy) if reference_spacing_um is None else float(reference_spacing_um)
    gx = jnp.asarray(_gram_matrices(nx, nx - 3), jnp.float32)
    gy = jnp.asarray(_gram_matrices(ny, ny - 3), jnp.float32)
    return _bending(self.coefficients, gx, gy, jnp.asarray(_bending_factors(hx, hy, nx - 3, ny - 3, ref)))

  def jacobian_determinant(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """det(I + ∇d) at fixed-space points (..., 2) µm: ≤ 0 where the displacement folds the image."""
    return _jacobian_determinant(self, jnp.asarray(points_xy_um, jnp.float32))

  def displacement_field(self, shape: Sequence[int], pixel_size_um=1.0) -> np.ndarray:
    """T(x) - x at every pixel centre of a fixed grid, (H, W, 2) float32 µm, components (x, y).

    This is the FIXED → MOVING map as ITK's `DisplacementFieldTransform` holds it: a moving image resampled at
    x + field(x) gives the same warp as this transform (see `transform_io.save_displacement_field`).
    """
    py, px = tf.pixel_size_yx(pixel_size_um)
    mapped = _apply_grid(self, (int(shape[0]), int(shape[1])), (py, px))
    return np.asarray(mapped - tf.fixed_grid_um(shape, (py, px)), np.float32)


# The methods' bodies are jitted (once per shape): run eagerly, their dozens of small operations would each
# dispatch on their own; inside another `jit` they are inlined.


@jax.jit
def _displacement(transform: BSplineTransform, points: jax.Array) -> jax.Array:
  u = transform.grid_index(points)
  ny, nx = transform.grid_shape
  limit = jnp.array([nx - 2, ny - 2], jnp.float32)
  valid = jnp.all((u >= 1.0) & (u <= limit), axis=-1, keepdims=True)
  return jnp.where(valid, _spline_sum(transform.coefficients, u), 0.0)


@jax.jit
def _apply(transform: BSplineTransform, points: jax.Array) -> jax.Array:
  return transform.affine.apply(points + _displacement(transform, points))


@jax.jit
def _jacobian_determinant(transform: BSplineTransform, points: jax.Array) -> jax.Array:
  u = transform.grid_index(points)
  ny, nx = transform.grid_shape
  limit = jnp.array([nx - 2, ny - 2], jnp.float32)
  valid = jnp.all((u >= 1.0) & (u <= limit), axis=-1)
  gradient = _spline_gradient(transform.coefficients, u, transform.grid_spacing_um)  # (..., component, axis)
  det = (1.0 + gradient[..., 0, 0]) * (1.0 + gradient[..., 1, 1]) - gradient[..., 0, 1] * gradient[..., 1, 0]
  return jnp.where(valid, det, 1.0)


def _spline_gradient(coefficients, u, spacing):
  """∂d_k/∂x_a (..., 2, 2) at grid indices u (..., 2), from the B-spline's derivative."""
  ny, nx = coefficients.shape[1], coefficients.shape[2]
  start = jnp.floor(u) - 1.0
  nodes = start[..., None] + jnp.arange(4, dtype=jnp.float32)
  value, first, _ = _bspline(u[..., None] - nodes)
  ix = jnp.clip(nodes[..., 0, :].astype(jnp.int32), 0, nx - 1)
  iy = jnp.clip(nodes[..., 1, :].astype(jnp.int32), 0, ny - 1)
  c = coefficients[:, iy[..., :, None], ix[..., None, :]]  # (2, ..., 4 (y), 4 (x))
  dx = jnp.sum(c * (value[..., 1, :, None] * first[..., 0, None, :]), axis=(-2, -1)) / spacing[0]
  dy = jnp.sum(c * (first[..., 1, :, None] * value[..., 0, None, :]), axis=(-2, -1)) / spacing[1]
  return jnp.moveaxis(jnp.stack([dx, dy], axis=-1), 0, -2)


def _bending_factors(hx, hy, cells_x, cells_y, reference):
  # ∂/∂x = (1/h_x) ∂/∂u; du dv = dx dy / (h_x h_y); the mean divides by the area cells_x h_x · cells_y h_y.
  area = cells_x * cells_y
  return np.array([1.0 / hx**4, 2.0 / (hx * hx * hy * hy), 1.0 / hy**4], np.float32) * (reference**2 / area)


@jax.jit
def _bending(coefficients, gram_x, gram_y, factors):
  """Σ_k Σ_terms factor · <C_k, G_y C_k G_x> for (∂xx, ∂xy, ∂yy) = (Gx2·Gy0, Gx1·Gy1, Gx0·Gy2)."""
  hp = jax.lax.Precision.HIGHEST
  terms = ((2, 0), (1, 1), (0, 2))
  total = jnp.float32(0.0)
  for (kx, ky), f in zip(terms, (factors[0], factors[1], factors[2])):
    prod = jnp.einsum("jm,kmn,ni->kji", gram_y[ky], coefficients, gram_x[kx], precision=hp)
    total = total + f * jnp.sum(coefficients * prod)
  return total


@functools.partial(jax.jit, static_argnames=("shape", "pixel_size_um"))
def _apply_grid(transform: BSplineTransform, shape: tuple[int, int], pixel_size_um: tuple[float, float]):
  (py, px), (h, w) = pixel_size_um, shape
  ny, nx = transform.grid_shape
  ux = (jnp.arange(w, dtype=jnp.float32) * px - transform.grid_origin_um[0]) / transform.grid_spacing_um[0]
  uy = (jnp.arange(h, dtype=jnp.float32) * py - transform.grid_origin_um[1]) / transform.grid_spacing_um[1]
  # Outside the valid region a whole basis row is 0, which zeroes the displacement as `displacement` does.
  bx = jnp.where(((ux >= 1.0) & (ux <= nx - 2))[:, None], _bspline(ux[:, None] - jnp.arange(nx))[0], 0.0)
  by = jnp.where(((uy >= 1.0) & (uy <= ny - 2))[:, None], _bspline(uy[:, None] - jnp.arange(ny))[0], 0.0)
  hp = jax.lax.Precision.HIGHEST
  d = jnp.einsum("rj,kji,ci->rck", by, transform.coefficients, bx, precision=hp)
  return transform.affine.apply(tf.fixed_grid_um((h, w), (py, px)) + d)


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["forward", "pre"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class InverseBSplineTransform:
  """The inverse of a `BSplineTransform` (MOVING → FIXED), after an optional affine `pre`: x ↦ T⁻¹(pre(x)).

  T⁻¹(y) solves A (x + d(x)) + b = y by the fixed-point iteration x ← z - d(x), z = A⁻¹(y - b), which converges
  wherever |∇d| < 1 (no folding), to float32 precision in `_INVERSE_STEPS` steps when |∇d| ≤ 0.5. While iterating,
  d is extended beyond the grid by its value at the nearest point of the grid's valid region (ITK's transform is
  the identity there, which would make points near the edge of the domain map onto points outside it); a point
  whose inverse lies inside the valid region gets exactly T⁻¹.

  Attributes:
    forward: the transform inverted.
    pre: an affine applied first (for `compose`).
  """

  forward: BSplineTransform
  pre: AffineTransform

  def apply(self, points_xy_um: jax.typing.ArrayLike) -> jax.Array:
    """Maps points (..., 2) µm of the moving space to the fixed space."""
    return _inverse_apply(self, jnp.asarray(points_xy_um, jnp.float32))

  def compose(self, other: AffineTransform) -> InverseBSplineTransform:
    """self ∘ other: `other` (an affine) applied first."""
    return InverseBSplineTransform(self.forward, self.pre.compose(other))

  def inverse(self) -> BSplineTransform:
    """The forward transform (only when no `pre` affine was composed).

    Raises:
      ConfigError: when an affine was composed.
    """
    if not np.allclose(np.asarray(self.pre.matrix), np.eye(3)):
      raise errors.ConfigError("the inverse of a composed inverse B-spline transform is not a BSplineTransform")
    return self.forward


@jax.jit
def _inverse_apply(inverse: InverseBSplineTransform, points: jax.Array) -> jax.Array:
  z = inverse.forward.affine.inverse().apply(inverse.pre.apply(points))
  f = inverse.forward
  ny, nx = f.grid_shape
  limit = jnp.array([nx - 2, ny - 2], jnp.float32)

  def step(_, x):
    return z - _spline_sum(f.coefficients, jnp.clip(f.grid_index(x), 1.0, limit))

  return jax.lax.fori_loop(0, _INVERSE_STEPS, step, z)


def apply_points(transform, points_xy_um) -> np.ndarray:
  """Any transform (affine, B-spline or inverse) applied to (N, 2) points, float64 NumPy, in chunks.

  Affine maps are applied in float64; the others in float32 (as their warps are).
  """
  p = np.asarray(points_xy_um, np.float64)
  if isinstance(transform, AffineTransform):
    m = np.asarray(transform.matrix, np.float64)
    return p @ m[:2, :2].T + m[:2, 2]
  flat = p.reshape(-1, 2)
  out = [np.asarray(transform.apply(jnp.asarray(flat[i : i + _POINT_CHUNK], jnp.float32)), np.float64)
         for i in range(0, len(flat), _POINT_CHUNK)]  # fmt: skip
  return (np.concatenate(out) if out else np.zeros((0, 2))).reshape(p.shape)


def is_deformable(transform) -> bool:
  """Whether a transform is a B-spline (or its inverse) rather than an affine map."""
  return isinstance(transform, BSplineTransform | InverseBSplineTransform)


def affine_part(transform) -> AffineTransform:
  """The affine part of a transform: itself for an `AffineTransform`, `affine` for a `BSplineTransform`."""
  if isinstance(transform, AffineTransform):
    return transform
  if isinstance(transform, BSplineTransform):
    return transform.affine
  raise errors.ConfigError(f"expected an AffineTransform or a BSplineTransform, got {type(transform).__name__}")


# ------------------------------------------------------------------------------------------------- registration


@dataclasses.dataclass(frozen=True)
class DeformableConfig:
  """Options of `register_deformable`.

  Attributes:
    grid_spacing_um: final control-point spacing, µm, float or (y, x); None: an eighth of the fixed image's
      shorter side.
    levels: coarse-to-fine levels; level l (0 = finest) has pixels about 2^l times the working pixel size and a
      control spacing 2^l times the final one.
    similarity: "mi" (Parzen mutual information), "nmi", "ncc" or "mse", as in `RegistrationConfig`.
    bins: histogram bins for MI/NMI.
    kernel: Parzen kernel, "bspline" or "gaussian".
    bending_weight: weight of the bending energy (dimensionless; see the module docstring) against the similarity
      (bits for MI; NCC in [-1, 1]; MSE in squared intensity units).
    working_pixel_size_um: finest pixel size registered at, µm; None: the finer of the two images'.
    max_iterations: Adam steps per level, an int or one per level (coarse → fine).
    learning_rate: first Adam step in level pixels of control-point displacement; cosine-decayed over a level to
      `learning_rate * final_learning_rate_fraction`.
    final_learning_rate_fraction: see `learning_rate`.
    tolerance: relative improvement of the loss that resets the `patience` counter.
    patience: steps without such improvement after which a level stops.
    max_samples: fixed-image pixels drawn (once per level, without replacement) for the similarity; all when the
      level has fewer.
    seed: seed of that sampling.
    min_jacobian: warn when det(I + ∇d) falls below this anywhere on the fixed grid's samples (≤ 0 is a fold).
    intensity_percentiles: the MI's histogram range, as in `RegistrationConfig`.
  """

  grid_spacing_um: float | tuple[float, float] | None = None
  levels: int = 3
  similarity: str = "mi"
  bins: int = 32
  kernel: str = "bspline"
  bending_weight: float = 0.3
  working_pixel_size_um: float | None = None
  max_iterations: int | tuple[int, ...] = 100
  learning_rate: float = 0.5
  final_learning_rate_fraction: float = 0.05
  tolerance: float = 1e-5
  patience: int = 20
  max_samples: int | None = 32768
  seed: int = 0
  min_jacobian: float = 0.1
  intensity_percentiles: tuple[float, float] = (0.5, 99.5)

  def __post_init__(self):
    optimize.check_measure(self.similarity, self.kernel)
    object.__setattr__(self, "intensity_percentiles", optimize.check_percentiles(self.intensity_percentiles))
    if self.levels < 1 or self.bins < 4 or self.patience < 1:
      raise errors.ConfigError("levels and patience must be >= 1 and bins >= 4")
    its = self.iterations_per_level()
    if len(its) != self.levels or min(its) < 1:
      raise errors.ConfigError(f"max_iterations must be a positive int or {self.levels} of them (coarse → fine)")
    if self.grid_spacing_um is not None:
      tf.pixel_size_yx(self.grid_spacing_um, "grid_spacing_um")
    if not self.bending_weight >= 0 or not self.learning_rate > 0:
      raise errors.ConfigError("bending_weight must be >= 0 and learning_rate > 0")
    if self.max_samples is not None and self.max_samples < 16:
      raise errors.ConfigError("max_samples must be >= 16 (or None)")
    if self.working_pixel_size_um is not None and not self.working_pixel_size_um > 0:
      raise errors.ConfigError(f"working_pixel_size_um must be > 0, got {self.working_pixel_size_um}")

  def iterations_per_level(self) -> tuple[int, ...]:
    """Adam steps at each level, coarse → fine."""
    if isinstance(self.max_iterations, int):
      return (int(self.max_iterations),) * self.levels
    return tuple(int(i) for i in self.max_iterations)


@dataclasses.dataclass(frozen=True)
class DeformableResult:
  """What `register_deformable` found.

  Attributes:
    transform: the FIXED → MOVING `BSplineTransform` (the affine given, after the displacement found).
    metric: similarity at the finest level with the deformation (bits for MI; MSE is a distance).
    metric_affine: the same with the affine alone, on the same samples.
    metric_name: "mi", "nmi", "ncc" or "mse".
    bending_energy: the final bending energy (dimensionless).
    iterations: Adam steps per level, coarse → fine.
    converged: whether the finest level stopped by tolerance rather than by its iteration limit.
    grid_shapes: (ny, nx) control nodes per level, coarse → fine.
    max_displacement_um: the largest |d(x)| over the finest level's samples, µm (fixed space).
    mean_displacement_um: the mean |d(x)| there.
    min_jacobian: the smallest det(I + ∇d) there (≤ 0: the deformation folds).
    warnings: messages about the result, also issued with `warnings.warn`.
  """

  transform: BSplineTransform
  metric: float
  metric_affine: float
  metric_name: str
  bending_energy: float
  iterations: tuple[int, ...]
  converged: bool
  grid_shapes: tuple[tuple[int, int], ...]
  max_displacement_um: float
  mean_displacement_um: float
  min_jacobian: float
  warnings: tuple[str, ...]


def deformable_summary(result: DeformableResult) -> dict[str, Any]:
  """A JSON-serialisable summary of a deformable result (no coefficients)."""
  t = result.transform
  return {
    "metric_name": result.metric_name,
    "metric": result.metric,
    "metric_affine": result.metric_affine,
    "bending_energy": result.bending_energy,
    "iterations": list(result.iterations),
    "converged": result.converged,
    "grid_shapes": [list(s) for s in result.grid_shapes],
    "grid_spacing_um": np.asarray(t.grid_spacing_um, np.float64).tolist(),
    "grid_origin_um": np.asarray(t.grid_origin_um, np.float64).tolist(),
    "max_displacement_um": result.max_displacement_um,
    "mean_displacement_um": result.mean_displacement_um,
    "min_jacobian": result.min_jacobian,
    "warnings": list(result.warnings),
  }


def _global_adam(b1=0.9, b2=0.999, eps=1e-8) -> optax.GradientTransformation:
  """Adam whose second moment is one number for all coefficients, so that a step keeps the gradient's direction.

  Plain Adam normalises every coefficient by its own gradient history: nodes over featureless tissue or
  background, whose gradients are tiny and noisy, then move as far per step as the nodes over structure, and
  the deformation folds (it did on 1 of 5 semi-synthetic cases, and on none with this variant).
  """

  def init(params):
    return (jnp.zeros_like(params), jnp.float32(0.0), jnp.int32(0))

  def update(grad, state, params=None):
    m, v, count = state
    count = count + 1
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * jnp.mean(grad * grad)
    m_hat = m / (1 - b1**count)
    v_hat = v / (1 - b2**count)
    return m_hat / (jnp.sqrt(v_hat) + eps), (m, v, count)

  return optax.GradientTransformation(init, update)


class _Options(NamedTuple):
  similarity: str
  bins: int
  kernel: str


def _level_metric(coefficients, data, opts: _Options):
  """(similarity, per-sample displacement (N, 2)) of one level's samples with these coefficients."""
  u = (data["points"] - data["grid_origin"]) / data["grid_spacing"]
  d = _spline_sum(coefficients, u)
  m = data["affine"]
  q = (data["points"] + d) @ m[:2, :2].T + m[:2, 2]
  rows, cols = q[:, 1] / data["moving_px"][0], q[:, 0] / data["moving_px"][1]
  both, inside = tf.sample_linear(data["moving"], rows, cols, data["moving_hw"])
  w = data["weights"] * inside.astype(jnp.float32) * both[:, 1]
  values = both[:, 0]
  if opts.similarity in ("mi", "nmi"):
    wm = sim.parzen_weights(values, data["moving_range"], bins=opts.bins, kernel=opts.kernel)
    joint = sim.histogram_from_weights(data["fixed_parzen"], wm, w)
    value = sim.mi_from_histogram(joint) if opts.similarity == "mi" else sim.nmi_from_histogram(joint)
  elif opts.similarity == "ncc":
    value = sim.ncc_from_values(data["values"], values, w)
  else:
    value = sim.mse_from_values(data["values"], values, w)
  return value, d


def _level_loss(coefficients, data, opts: _Options):
  value, _ = _level_metric(coefficients, data, opts)
  similarity_loss = value if opts.similarity == "mse" else -value
  bending = _bending(coefficients, data["gram_x"], data["gram_y"], data["bending_factors"])
  return similarity_loss + data["bending_weight"] * bending


def _diagnostics(coefficients, data, opts: _Options):
  """(similarity, |d| per sample, det(I + ∇d) per sample) at the level's samples."""
  value, d = _level_metric(coefficients, data, opts)
  u = (data["points"] - data["grid_origin"]) / data["grid_spacing"]
  g = _spline_gradient(coefficients, u, data["grid_spacing"])
  det = (1.0 + g[:, 0, 0]) * (1.0 + g[:, 1, 1]) - g[:, 0, 1] * g[:, 1, 0]
  return value, jnp.linalg.norm(d, axis=-1), det


@functools.partial(jax.jit, static_argnames=("opts",))
def _run_level(coefficients0, data, hyper, opts: _Options):
  """Adam on one level from (2, ny, nx) coefficients (µm).

  Returns (best coefficients, steps, converged, diagnostics of the best coefficients, similarity with the affine
  alone); the diagnostics come from the same compilation, so a level compiles once.
  """
  data = dict(data)
  if opts.similarity in ("mi", "nmi"):
    data["fixed_parzen"] = sim.parzen_weights(data["values"], data["fixed_range"], bins=opts.bins, kernel=opts.kernel)
  scale = data["coefficient_scale"]
  optimiser = _global_adam()
  grad_fn = jax.value_and_grad(lambda z: _level_loss(coefficients0 + z * scale, data, opts))
  total = jnp.maximum(hyper["iterations"], 1).astype(jnp.float32)

  def cond(state):
    step, _, _, _, _, since = state
    return (step < hyper["iterations"]) & (since < hyper["patience"])

  def body(state):
    step, z, opt_state, best_loss, best_z, since = state
    loss, grad = grad_fn(z)
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    improved = loss < best_loss - hyper["tolerance"] * jnp.maximum(jnp.abs(best_loss), 1e-6)
    better = loss < best_loss
    best_z = jnp.where(better, z, best_z)
    best_loss = jnp.where(better, loss, best_loss)
    since = jnp.where(improved, 0, since + 1)
    frac = hyper["final_fraction"]
    lr = hyper["learning_rate"] * (frac + (1 - frac) * 0.5 * (1 + jnp.cos(jnp.pi * step / total)))
    updates, opt_state = optimiser.update(grad, opt_state, z)
    return step + 1, z - lr * updates, opt_state, best_loss, best_z, since

  z0 = jnp.zeros_like(coefficients0)
  state = (jnp.int32(0), z0, optimiser.init(z0), jnp.float32(jnp.inf), z0, jnp.int32(0))
  steps, z, _, best_loss, best_z, since = jax.lax.while_loop(cond, body, state)
  last = _level_loss(coefficients0 + z * scale, data, opts)
  best_z = jnp.where(last < best_loss, z, best_z)
  best = coefficients0 + best_z * scale
  affine_only, _ = _level_metric(jnp.zeros_like(best), data, opts)
  return best, steps, since >= hyper["patience"], _diagnostics(best, data, opts), affine_only


def _prepare(image, mask, name):
  grey = optimize.to_grey(image)
  if not np.all(np.isfinite(grey)):
    raise errors.DataError(f"the {name} image has NaN or infinite values")
  if mask is None:
    weights = np.ones(grey.shape, np.float32)
  else:
    weights = np.asarray(mask).astype(np.float32)
    if weights.shape != grey.shape:
      raise errors.ConfigError(f"{name} mask shape {weights.shape} != image shape {grey.shape}")
  return grey, weights


def register_deformable(
  fixed: jax.typing.ArrayLike,
  moving: jax.typing.ArrayLike,
  affine: AffineTransform,
  *,
  fixed_pixel_size_um=1.0,
  moving_pixel_size_um=1.0,
  fixed_mask: jax.typing.ArrayLike | None = None,
  moving_mask: jax.typing.ArrayLike | None = None,
  config: DeformableConfig | None = None,
) -> DeformableResult:
  """Refines an affine registration with a cubic B-spline displacement, coarse to fine.

  Args:
    fixed: (H, W) or (H, W, C) fixed image (RGB converted to grey by luminance, as `register` does).
    moving: (H', W') or (H', W', C) moving image.
    affine: the FIXED → MOVING affine registration (µm), e.g. `register(...).transform`.
    fixed_pixel_size_um: fixed pixel size, float or (y, x).
    moving_pixel_size_um: moving pixel size, float or (y, x).
    fixed_mask: optional (H, W) weights of the fixed pixels that count.
    moving_mask: optional (H', W') weights of the moving pixels that count.
    config: options; `DeformableConfig()` when None.

  Returns:
    A `DeformableResult` whose transform is a `BSplineTransform` on a grid of `config.grid_spacing_um` covering the
    fixed image.

  Raises:
    ConfigError: for bad shapes, options or pixel sizes, or an affine that is not one (3, 3) `AffineTransform`.
    DataError: for NaN/infinite images.
    RegistrationError: when an image is constant or its mask empty, or the optimisation gives non-finite values.
  """
  config = config or DeformableConfig()
  if not isinstance(affine, AffineTransform) or affine.matrix.shape != (3, 3):
    raise errors.ConfigError("affine must be a single AffineTransform with a (3, 3) matrix")
  if not np.all(np.isfinite(np.asarray(affine.matrix))):
    raise errors.ConfigError("the affine transform is not finite")
  fixed_px = tf.pixel_size_yx(fixed_pixel_size_um, "fixed_pixel_size_um")
  moving_px = tf.pixel_size_yx(moving_pixel_size_um, "moving_pixel_size_um")
  f_grey, f_mask = _prepare(fixed, fixed_mask, "fixed")
  m_grey, m_mask = _prepare(moving, moving_mask, "moving")
  if min(f_grey.shape) < 4 or min(m_grey.shape) < 4:
    raise errors.ConfigError(f"images must be at least 4 × 4, got {f_grey.shape} and {m_grey.shape}")
  for name, grey, weights in (("fixed", f_grey, f_mask), ("moving", m_grey, m_mask)):
    sel = grey[weights > 0]
    if sel.size == 0 or np.ptp(sel) == 0:
      raise errors.RegistrationError(f"the {name} image is constant or its mask is empty: nothing to register")

  origin, size = image_domain_um(f_grey.shape, fixed_px)
  if config.grid_spacing_um is None:
    spacing = (min(size) / 8.0,) * 2
  else:
    sy, sx = tf.pixel_size_yx(config.grid_spacing_um, "grid_spacing_um")
    spacing = (sx, sy)
  levels = config.levels
  gf, gm = math.sqrt(fixed_px[0] * fixed_px[1]), math.sqrt(moving_px[0] * moving_px[1])
  base = config.working_pixel_size_um or min(gf, gm)
  rng = np.random.default_rng(config.seed)
  max_samples = config.max_samples or 2**62

  # Per level (coarse → fine): images, grid, samples; then everything padded to the largest shapes.
  plans = []
  for level in range(levels - 1, -1, -1):
    sf = max(1, int(round(base * 2**level / gf)))
    sm = max(1, int(round(base * 2**level / gm)))
    level_spacing = (spacing[0] * 2**level, spacing[1] * 2**level)
    shape, grid_origin, _ = grid_for_domain(origin, size, (level_spacing[1], level_spacing[0]))
    f_img, f_w = optimize.shrink_image(f_grey, sf), optimize.shrink_image(f_mask, sf)
    m_img, m_w = optimize.shrink_image(m_grey, sm), optimize.shrink_image(m_mask, sm)
    h, w = f_img.shape
    n = h * w
    idx = np.sort(rng.choice(n, size=max_samples, replace=False)) if n > max_samples else np.arange(n)
    plans.append(dict(sf=sf, sm=sm, spacing=level_spacing, grid_shape=shape, grid_origin=grid_origin,
                      f_img=f_img, f_w=f_w, m_img=m_img, m_w=m_w, idx=idx))  # fmt: skip
  num_points = max(p["idx"].size for p in plans)
  moving_pad = tuple(max(p["m_img"].shape[i] for p in plans) for i in range(2))
  grid_pad = tuple(max(p["grid_shape"][i] for p in plans) for i in range(2))
  reference = math.sqrt(spacing[0] * spacing[1])
  opts = _Options(config.similarity, config.bins, config.kernel)
  matrix = np.asarray(affine.matrix, np.float32)
  its = config.iterations_per_level()

  def level_data(p):
    f_img, f_w, m_img, m_w, idx = p["f_img"], p["f_w"], p["m_img"], p["m_w"], p["idx"]
    w = f_img.shape[1]
    rows, cols = idx // w, idx % w
    pad = num_points - idx.size
    lpf = (fixed_px[0] * p["sf"], fixed_px[1] * p["sf"])
    points = np.stack([cols * lpf[1], rows * lpf[0]], axis=1).astype(np.float32)
    # Padding samples sit on the first real sample (inside the grid) with zero weight.
    points = np.concatenate([points, np.repeat(points[:1], pad, axis=0)])
    values = np.pad(f_img[rows, cols], (0, pad))
    weights = np.pad(f_w[rows, cols], (0, pad))
    mh, mw = m_img.shape
    pad_m = ((0, moving_pad[0] - mh), (0, moving_pad[1] - mw))
    ny, nx = p["grid_shape"]
    gx = np.zeros((3, grid_pad[1], grid_pad[1]), np.float32)
    gy = np.zeros((3, grid_pad[0], grid_pad[0]), np.float32)
    gx[:, :nx, :nx] = _gram_matrices(nx, nx - 3)
    gy[:, :ny, :ny] = _gram_matrices(ny, ny - 3)
    hx, hy = p["spacing"]
    return {
      "points": points,
      "values": values.astype(np.float32),
      "weights": weights.astype(np.float32),
      "fixed_range": optimize._range(values, weights, config.intensity_percentiles),
      "moving": np.stack([np.pad(m_img, pad_m), np.pad(m_w, pad_m)], axis=-1).astype(np.float32),
      "moving_hw": np.array([mh, mw], np.int32),
      "moving_range": optimize._range(m_img.ravel(), m_w.ravel(), config.intensity_percentiles),
      "moving_px": np.array([moving_px[0] * p["sm"], moving_px[1] * p["sm"]], np.float32),
      "affine": matrix,
      "grid_origin": np.asarray(p["grid_origin"], np.float32),
      "grid_spacing": np.asarray(p["spacing"], np.float32),
      "gram_x": gx,
      "gram_y": gy,
      "bending_factors": _bending_factors(hx, hy, nx - 3, ny - 3, reference),
      "bending_weight": np.float32(config.bending_weight),
      "coefficient_scale": np.float32(math.sqrt(lpf[0] * lpf[1])),
    }

  coefficients = np.zeros((2, *plans[0]["grid_shape"]), np.float64)
  iterations, converged, data = [], False, None
  for level, p in enumerate(plans):
    if level > 0:
      prev = plans[level - 1]["grid_shape"]
      ry = _refinement_matrix(p["grid_shape"][0], prev[0])
      rx = _refinement_matrix(p["grid_shape"][1], prev[1])
      coefficients = np.einsum("yj,kji,xi->kyx", ry, coefficients, rx)
    data = level_data(p)
    padded = np.zeros((2, *grid_pad), np.float32)
    padded[:, : p["grid_shape"][0], : p["grid_shape"][1]] = coefficients
    hyper = {
      "iterations": jnp.int32(its[level]),
      "patience": jnp.int32(config.patience),
      "tolerance": jnp.float32(config.tolerance),
      "learning_rate": jnp.float32(config.learning_rate),
      "final_fraction": jnp.float32(config.final_learning_rate_fraction),
    }
    out, steps, done, diagnostics, value_affine = _run_level(jnp.asarray(padded), data, hyper, opts)
    out = np.asarray(out, np.float64)
    if not np.all(np.isfinite(out)):
      raise errors.RegistrationError(f"deformable registration diverged at level {level} (non-finite coefficients)")
    coefficients = out[:, : p["grid_shape"][0], : p["grid_shape"][1]]
    iterations.append(int(steps))
    converged = bool(done)

  final = plans[-1]
  value, norms, det = diagnostics
  live = data["weights"] > 0
  norms, det = np.asarray(norms)[live], np.asarray(det)[live]
  transform = BSplineTransform.create(affine, coefficients, final["grid_origin"], final["spacing"])
  bending = float(transform.bending_energy(reference))
  min_det = float(det.min()) if det.size else 1.0
  notes = []
  if min_det < config.min_jacobian:
    notes.append(f"the deformation nearly folds or folds the fixed image: det(I + ∇d) reaches {min_det:.3g} "
                 f"(< {config.min_jacobian}); raise bending_weight or grid_spacing_um")  # fmt: skip
  better = float(value) < float(value_affine) if config.similarity == "mse" else float(value) > float(value_affine)
  if not better:
    notes.append(f"the deformation did not improve the {config.similarity} over the affine alone "
                 f"({float(value):.4g} vs {float(value_affine):.4g})")  # fmt: skip
  for note in notes:
    warnings.warn(note, UserWarning, stacklevel=2)
  return DeformableResult(
    transform=transform,
    metric=float(value),
    metric_affine=float(value_affine),
    metric_name=config.similarity,
    bending_energy=bending,
    iterations=tuple(iterations),
    converged=converged,
    grid_shapes=tuple(tuple(int(v) for v in p["grid_shape"]) for p in plans),
    max_displacement_um=float(norms.max()) if norms.size else 0.0,
    mean_displacement_um=float(norms.mean()) if norms.size else 0.0,
    min_jacobian=min_det,
    warnings=tuple(notes),
  )
