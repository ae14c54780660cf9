"""Affine registration by gradient descent on a similarity measure, coarse to fine, with restarts.

`register(fixed, moving)` returns the FIXED → MOVING `AffineTransform` (µm) that maximises the similarity of the
fixed image and the moving image resampled at T(x_fixed) (docs/architecture.md). Images are (H, W) grey or
(H, W, 3) RGB (converted to grey by luminance) or (H, W, C) (channel mean), any float or integer dtype.

How it works:
- A Gaussian pyramid (`levels`, default 3): at level l the images are smoothed (σ = shrink/2 pixels) and
  subsampled so that their pixel size is about `base · 2^l`, with base the finer of the two pixel sizes (or
  `working_pixel_size_um`); a pixel keeps its centre, so physical coordinates hold at every level.
- Starts: translation from the centres of mass of the two images, rotation 0 and the principal-axes angle (and
  that + 180°), optionally with every 90° rotation and a mirror (`flips_and_rot90`). The weights of the moments
  are the masks when given, else |intensity - background| with the background the median of the border pixels
  (so a bright slide background does not count as tissue).
- At the coarsest level every start is optimised at once (the candidates are one array axis, so their Parzen
  histograms come from one matrix product); the best `num_candidates` go on to the finer levels. Each level is
  one jitted `jax.lax.while_loop` of Adam steps on the loss (-MI, -NMI, -NCC or MSE) over a fixed random sample of
  fixed-grid pixels (`max_samples`); levels share padded array shapes so that they reuse one compilation.
  `register_batch` maps the same level function over pairs with `jax.vmap`. Parameters are optimised in scaled
  units, one unit moving the fixed image's edge by about one level pixel (rotation, log-scales and shear divided
  by the image radius, translation by the pixel size), so that one learning rate suits all of them.
- Stopping: after `max_iterations` steps, or when the loss has not improved by `tolerance` (relative) for
  `patience` steps (then the level has converged). The best parameters seen are kept.
- The best candidate by the final similarity is returned. The spread of the candidates whose similarity is
  within `candidate_margin` of the best (their transforms disagree on where the fixed image's corners go) is the
  `uncertainty_um`; above `uncertainty_warn_px` fixed pixels a warning is issued.

Mirrors: a mirror start is T = P ∘ D with D a reflection about the fixed image's centre and P a proper affine
map, so det(T) < 0. A result is refused with `RegistrationError` when det(P) ≤ 0, when P's singular values
leave [min_scale, max_scale], or when it is not finite; a negative det(T) is accepted only when it comes from a
mirror start (det(P) is what is checked then).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage as ndi

from msisynth import errors, geometry
from msisynth.metrics import LUMINANCE_WEIGHTS
from msisynth.register import similarity as sim
from msisynth.register import transforms as tf
from msisynth.register.transforms import AffineTransform

_log = logging.getLogger(__name__)

SIMILARITIES = ("mi", "nmi", "ncc", "mse")
# One grey conversion in the library: ITU-R BT.709 luminance, as `msisynth.metrics.to_grey`.
_LUMINANCE = np.asarray(LUMINANCE_WEIGHTS, np.float32)


@dataclasses.dataclass(frozen=True)
class RegistrationConfig:
  """Options of `register`.

  Attributes:
    similarity: "mi" (Parzen mutual information, default; multimodal), "nmi", "ncc" or "mse" (single-modality,
      e.g. synthetic H&E → real H&E).
    kind: "affine", "similarity" or "rigid" (the parameters fixed in optimisation).
    bins: histogram bins for MI/NMI.
    kernel: Parzen kernel, "bspline" or "gaussian".
    levels: pyramid levels (coarse → fine); level l has pixels about 2^l times the base.
    working_pixel_size_um: finest pixel size registration works at (µm); None: the finer of the two images'.
      Set it to a few µm for large histology against coarse MSI.
    max_iterations: Adam steps per level, an int or one per level (coarse → fine); None: 80 at the finest level,
      100 at the next and 150 at the coarser ones.
    learning_rate: first Adam step, in level pixels of displacement at the image edge; cosine-decayed over the
      level to `learning_rate * final_learning_rate_fraction`.
    final_learning_rate_fraction: see `learning_rate`.
    tolerance: relative improvement of the loss that resets the `patience` counter.
    patience: steps without such improvement after which a level stops (converged).
    max_samples: fixed-grid pixels drawn (once per level, without replacement) for the similarity; all pixels
      when the level has fewer.
    seed: seed of the pixel sampling.
    principal_axes: add the principal-axes rotation (and + 180°) to the starts.
    start_rotations_deg: rotation offsets (degrees) added to every base start angle.
    flips_and_rot90: also start from 90°, 180°, 270° and from the mirror image at each of those; chosen by the
      similarity. Turn on when a section may be flipped or turned (MSI ↔ histology).
    num_candidates: starts kept after the coarsest level and reported in `RegistrationResult.candidates`.
    candidate_margin: candidates whose similarity is within this fraction of the best count into the uncertainty.
    uncertainty_warn_px: warn when the uncertainty exceeds this many fixed pixels.
    min_scale: smallest singular value of the (non-mirror) linear part accepted.
    max_scale: largest singular value accepted.
    min_overlap: warn when less than this fraction of the fixed image (its mask) maps inside the moving image.
  """

  similarity: str = "mi"
  kind: str = "affine"
  bins: int = 32
  kernel: str = "bspline"
  levels: int = 3
  working_pixel_size_um: float | None = None
  max_iterations: int | tuple[int, ...] | None = None
  learning_rate: float = 0.5
  final_learning_rate_fraction: float = 0.05
  tolerance: float = 1e-5
  patience: int = 20
  max_samples: int | None = 16384
  seed: int = 0
  principal_axes: bool = True
  start_rotations_deg: tuple[float, ...] = (0.0,)
  flips_and_rot90: bool = False
  num_candidates: int = 3
  candidate_margin: float = 0.05
  uncertainty_warn_px: float = 3.0
  min_scale: float = 0.2
  max_scale: float = 5.0
  min_overlap: float = 0.2

  def __post_init__(self):
    if self.similarity not in SIMILARITIES:
      raise errors.ConfigError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
    if self.kind not in tf.KINDS:
      raise errors.ConfigError(f"kind must be one of {tf.KINDS}, got {self.kind!r}")
    if self.kernel not in sim.KERNELS:
      raise errors.ConfigError(f"kernel must be one of {sim.KERNELS}, got {self.kernel!r}")
    if self.levels < 1 or self.bins < 4 or self.num_candidates < 1 or self.patience < 1:
      raise errors.ConfigError("levels, num_candidates and patience must be >= 1 and bins >= 4")
    if len(self.iterations_per_level()) != self.levels or min(self.iterations_per_level()) < 1:
      raise errors.ConfigError(f"max_iterations must be a positive int or {self.levels} of them (coarse → fine)")
    if not 0 < self.min_scale < 1 < self.max_scale:
      raise errors.ConfigError(f"need 0 < min_scale < 1 < max_scale, got {self.min_scale}, {self.max_scale}")
    if self.learning_rate <= 0 or self.max_samples is not None and self.max_samples < 16:
      raise errors.ConfigError("learning_rate must be > 0 and max_samples >= 16 (or None)")
    if self.working_pixel_size_um is not None and self.working_pixel_size_um <= 0:
      raise errors.ConfigError(f"working_pixel_size_um must be > 0, got {self.working_pixel_size_um}")

  def iterations_per_level(self) -> tuple[int, ...]:
    """Adam steps at each level, coarse → fine."""
    if self.max_iterations is None:
      return tuple(80 if level == 0 else 100 if level == 1 else 150 for level in range(self.levels - 1, -1, -1))
    if isinstance(self.max_iterations, int):
      return (int(self.max_iterations),) * self.levels
    return tuple(int(i) for i in self.max_iterations)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One restart's result.

  Attributes:
    transform: FIXED → MOVING transform.
    metric: its similarity at the finest level (bits for MI; MSE is a distance).
    start: how it started, e.g. "rotation 90°, mirror x".
    mirrored: whether the start had a mirror.
  """

  transform: AffineTransform
  metric: float
  start: str
  mirrored: bool


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
  """What `register` found.

  Attributes:
    transform: FIXED → MOVING `AffineTransform` in µm.
    metric: final similarity of the chosen candidate on the finest level's sample (bits for MI).
    metric_name: the similarity ("mi", "nmi", "ncc", "mse").
    iterations: Adam steps run per level (coarse → fine) for the chosen candidate.
    converged: whether the finest level stopped by tolerance rather than by its iteration limit.
    candidates: the restarts carried to the finest level, best first (the chosen one is candidates[0]).
    uncertainty_um: the largest distance (fixed µm) between where the chosen transform and any candidate within
      `candidate_margin` of it send the fixed image's corners; 0 when no other candidate is that close.
    overlap: fraction of the fixed sample weight that maps inside the moving image.
    start: the chosen start.
    warnings: messages about the result (large uncertainty, small overlap), also issued with `warnings.warn`.
    fixed_shape: (H, W) of the fixed image.
    moving_shape: (H, W) of the moving image.
    fixed_pixel_size_um: (y, x) µm.
    moving_pixel_size_um: (y, x) µm.
  """

  transform: AffineTransform
  metric: float
  metric_name: str
  iterations: tuple[int, ...]
  converged: bool
  candidates: tuple[Candidate, ...]
  uncertainty_um: float
  overlap: float
  start: str
  warnings: tuple[str, ...]
  fixed_shape: tuple[int, int]
  moving_shape: tuple[int, int]
  fixed_pixel_size_um: tuple[float, float]
  moving_pixel_size_um: tuple[float, float]

  @property
  def mirrored(self) -> bool:
    """True when the transform includes a reflection (det < 0)."""
    return self.candidates[0].mirrored


# --------------------------------------------------------------------------------------------- image preparation
# Pyramids and moments are computed on the host (NumPy/SciPy): they run once per registration, and compiling them
# for every image shape would cost more than running them.


def to_grey(image: jax.typing.ArrayLike) -> np.ndarray:
  """(H, W) float32 grey levels: (H, W) as is, RGB by BT.709 luminance (`msisynth.metrics.to_grey`), other
  channel counts by their mean.

  Raises:
    ConfigError: when the image is not (H, W) or (H, W, C).
  """
  img = np.asarray(image)
  if img.ndim == 2:
    return img.astype(np.float32)
  if img.ndim != 3:
    raise errors.ConfigError(f"an image must be (H, W) or (H, W, C), got shape {img.shape}")
  img = img.astype(np.float32)
  if img.shape[2] == 3:
    return img @ _LUMINANCE
  return img.mean(axis=2)


def shrink_image(image: np.ndarray, factor: int) -> np.ndarray:
  """Smooths (σ = factor / 2 pixels) and keeps every `factor`-th pixel, starting at pixel 0, of an (H, W) image.

  Pixel (r, c) of the result is pixel (factor·r, factor·c) of the input, so with pixel size factor·p the physical
  coordinates are unchanged.
  """
  image = np.asarray(image, np.float32)
  if factor <= 1:
    return image
  return ndi.gaussian_filter(image, factor / 2.0, mode="nearest", truncate=3.0)[::factor, ::factor]


def _shrink_factors(levels, fixed_px, moving_px, working_px):
  gf, gm = math.sqrt(fixed_px[0] * fixed_px[1]), math.sqrt(moving_px[0] * moving_px[1])
  base = working_px if working_px is not None else min(gf, gm)
  out = []
  for level in range(levels - 1, -1, -1):
    target = base * 2**level
    out.append((max(1, int(round(target / gf))), max(1, int(round(target / gm)))))
  return out


# -------------------------------------------------------------------------------------------------- initialisation


def _moment_weights(grey, mask):
  if mask is not None:
    return np.asarray(mask, np.float64)
  border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
  return np.abs(grey - np.median(border)).astype(np.float64)


def _moments(weights, pixel_size):
  """Centre of mass (x, y) µm and principal-axis angle (rad) of a weight image."""
  h, w = weights.shape
  py, px = pixel_size
  yy, xx = np.meshgrid(np.arange(h) * py, np.arange(w) * px, indexing="ij")
  total = max(weights.sum(), 1e-12)
  cx, cy = (weights * xx).sum() / total, (weights * yy).sum() / total
  dx, dy = xx - cx, yy - cy
  cxx, cyy, cxy = ((weights * v).sum() / total for v in (dx * dx, dy * dy, dx * dy))
  return np.array([cx, cy]), 0.5 * math.atan2(2 * cxy, cxx - cyy)


class _Start(NamedTuple):
  rotation: float  # radians added to the base angle
  use_axes: bool  # base angle = principal-axes angle difference (else 0)
  mirrored: bool
  label: str


def _starts(config: RegistrationConfig, initial: bool) -> list[_Start]:
  if initial:
    return [_Start(0.0, False, False, "initial transform")]
  starts = []
  mirrors = (False, True) if config.flips_and_rot90 else (False,)
  quarter = (0, 90, 180, 270) if config.flips_and_rot90 else (0,)
  for mirrored in mirrors:
    tag = ", mirror x" if mirrored else ""
    for offset in config.start_rotations_deg:
      for q in quarter:
        starts.append(_Start(math.radians(q + offset), False, mirrored, f"rotation {q + offset:g}°{tag}"))
      if config.principal_axes:
        for q in (0, 180):
          starts.append(_Start(math.radians(q + offset), True, mirrored, f"principal axes + {q + offset:g}°{tag}"))
  return starts


def _mirror_matrix(center):
  return np.array([[-1.0, 0.0, 2 * center[0]], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _initial_params(fixed_w, moving_w, fixed_px, moving_px, center, starts):
  """(K, 6) parameters and (K, 3, 3) mirrors for one image pair."""
  com_f, ang_f = _moments(fixed_w, fixed_px)
  com_m, ang_m = _moments(moving_w, moving_px)
  params, mirrors = [], []
  for s in starts:
    d = _mirror_matrix(center) if s.mirrored else np.eye(3)
    fixed_angle = -ang_f if s.mirrored else ang_f
    rot = s.rotation + (ang_m - fixed_angle if s.use_axes else 0.0)
    lin = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    t = com_m - center - lin @ ((d @ np.append(com_f, 1.0))[:2] - center)
    params.append([rot, 0.0, 0.0, 0.0, t[0], t[1]])
    mirrors.append(d)
  return np.asarray(params, np.float32), np.asarray(mirrors, np.float32)


# ------------------------------------------------------------------------------------------------- optimisation


class _LevelOptions(NamedTuple):
  similarity: str
  kind: str
  bins: int
  kernel: str


def _transform(params, mirror, center, kind):
  return AffineTransform(AffineTransform.from_params(tf.constrain_params(params, kind), center).matrix @ mirror)


def _similarities(params, mirrors, data, opts: _LevelOptions):
  """(similarity, overlap), each (K,), of K candidates on one level's sample.

  Candidates are an explicit leading axis rather than a `vmap`: the K Parzen histograms then come from one plain
  matrix product, (B, N) @ (N, K·B), which runs several times faster on a CPU than K batched products.
  """
  mats = jax.vmap(lambda p, m: _transform(p, m, data["center"], opts.kind).matrix)(params, mirrors)
  q = jnp.einsum("nj,kij->kni", data["points"], mats[:, :2, :2]) + mats[:, None, :2, 2]
  rows, cols = q[..., 1] / data["moving_px"][0], q[..., 0] / data["moving_px"][1]
  # The moving image and its mask are the two channels of one array: one gather for both.
  both, inside = tf.sample_linear(data["moving"], rows, cols, data["moving_hw"])
  values = both[..., 0]
  w = data["weights"][None, :] * inside.astype(jnp.float32) * both[..., 1]
  total = jnp.sum(w, axis=1)
  overlap = total / jnp.maximum(jnp.sum(data["weights"]), 1e-12)
  if opts.similarity in ("mi", "nmi"):
    num, k = values.shape[1], values.shape[0]
    wm = sim.parzen_weights(values.T, data["moving_range"], bins=opts.bins, kernel=opts.kernel) * w.T[..., None]
    joint = jnp.matmul(data["fixed_parzen"].T, wm.reshape(num, k * opts.bins), precision=jax.lax.Precision.HIGHEST)
    joint = jnp.transpose(joint.reshape(opts.bins, k, opts.bins), (1, 0, 2)) / jnp.maximum(total, 1e-12)[:, None, None]
    measure = sim.mi_from_histogram if opts.similarity == "mi" else sim.nmi_from_histogram
    value = jax.vmap(measure)(joint)
  elif opts.similarity == "ncc":
    value = jax.vmap(sim.ncc_from_values, in_axes=(None, 0, 0))(data["values"], values, w)
  else:
    value = jax.vmap(sim.mse_from_values, in_axes=(None, 0, 0))(data["values"], values, w)
  return value, overlap


def _losses(params, mirrors, data, opts):
  value, _ = _similarities(params, mirrors, data, opts)
  return value if opts.similarity == "mse" else -value


def _optimise(params0, mirrors, data, hyper, opts: _LevelOptions):
  """Adam from (K, 6) params0 on one level; per candidate: (params, similarity, overlap, steps, converged) of its
  best step. A candidate stops when its loss has not improved for `patience` steps; the loop ends when all have."""
  optimiser = optax.scale_by_adam()
  scale = data["param_scale"]

  def total_loss(z):
    losses = _losses(params0 + z * scale, mirrors, data, opts)
    return jnp.sum(losses), losses  # candidates are independent: each one's gradient is its own

  grad_fn = jax.value_and_grad(total_loss, has_aux=True)
  z0 = jnp.zeros_like(params0)
  k = params0.shape[0]
  total = jnp.maximum(hyper["iterations"], 1).astype(jnp.float32)

  def cond(state):
    step, _, _, _, _, since, _ = state
    return (step < hyper["iterations"]) & jnp.any(since < hyper["patience"])

  def body(state):
    step, z, opt_state, best_loss, best_z, since, steps = state
    active = since < hyper["patience"]
    (_, loss), grad = grad_fn(z)
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    improved = loss < best_loss - hyper["tolerance"] * jnp.maximum(jnp.abs(best_loss), 1e-6)
    better = active & (loss < best_loss)
    best_z = jnp.where(better[:, None], z, best_z)
    best_loss = jnp.where(better, loss, best_loss)
    since = jnp.where(active & improved, 0, since + 1)
    # Cosine decay from learning_rate to learning_rate * final_fraction over the level's iterations.
    frac = hyper["final_fraction"]
    lr = hyper["learning_rate"] * (frac + (1 - frac) * 0.5 * (1 + jnp.cos(jnp.pi * step / total)))
    updates, opt_state = optimiser.update(grad, opt_state, z)
    z = jnp.where(active[:, None], z - lr * updates, z)
    return step + 1, z, opt_state, best_loss, best_z, since, steps + active.astype(jnp.int32)

  inf = jnp.full((k,), jnp.inf, jnp.float32)
  zeros = jnp.zeros((k,), jnp.int32)
  state = (jnp.int32(0), z0, optimiser.init(z0), inf, z0, zeros, zeros)
  _, z, _, best_loss, best_z, since, steps = jax.lax.while_loop(cond, body, state)
  # The last iterate has not been scored yet.
  best_z = jnp.where((_losses(params0 + z * scale, mirrors, data, opts) < best_loss)[:, None], z, best_z)
  params = params0 + best_z * scale
  value, overlap = _similarities(params, mirrors, data, opts)
  return params, value, overlap, steps, since >= hyper["patience"]


@functools.partial(jax.jit, static_argnames=("opts",))
def _run_level(params, mirrors, data, hyper, opts: _LevelOptions):
  """Optimises (B, K, 6) params of B pairs × K candidates; every array of `data` has a leading pair axis B."""
  data = dict(data)
  if opts.similarity in ("mi", "nmi"):
    parzen = functools.partial(sim.parzen_weights, bins=opts.bins, kernel=opts.kernel)
    data["fixed_parzen"] = jax.vmap(parzen)(data["values"], data["fixed_range"])
  if params.shape[0] == 1:  # one pair: no batched gathers or products, quicker to compile and to run
    out = _optimise(params[0], mirrors[0], jax.tree.map(lambda x: x[0], data), hyper, opts)
    return jax.tree.map(lambda x: x[None], out)
  return jax.vmap(_optimise, in_axes=(0, 0, 0, None, None))(params, mirrors, data, hyper, opts)


def _range(values, weights):
  sel = values[weights > 0.5]
  if sel.size == 0:
    return np.array([0.0, 1.0], np.float32)
  lo, hi = float(sel.min()), float(sel.max())
  return np.array([lo, hi if hi > lo else lo + 1.0], np.float32)


def _level_data(pyr, level, num_points, moving_pad, fixed_px, moving_px, factors, center, radius, rng, max_samples):
  """Pair-batched level data (NumPy), padded to shapes shared by every level: `num_points` fixed samples (zero
  weight beyond the level's own) and moving images padded to `moving_pad`."""
  f_img, f_mask, m_img, m_mask = pyr
  sf, sm = factors
  batch, h, w = f_img.shape
  lpf = (fixed_px[0] * sf, fixed_px[1] * sf)
  lpm = (moving_px[0] * sm, moving_px[1] * sm)
  n = h * w
  idx = np.sort(rng.choice(n, size=max_samples, replace=False)) if n > max_samples else np.arange(n)
  rows, cols = idx // w, idx % w
  pad = num_points - idx.size
  points = np.stack([cols * lpf[1], rows * lpf[0]], axis=1).astype(np.float32)
  points = np.concatenate([points, np.zeros((pad, 2), np.float32)])
  values = np.pad(f_img[:, rows, cols], ((0, 0), (0, pad)))
  weights = np.pad(f_mask[:, rows, cols], ((0, 0), (0, pad)))
  mh, mw = m_img.shape[1:]
  pad_m = ((0, 0), (0, moving_pad[0] - mh), (0, moving_pad[1] - mw))
  level_px = math.sqrt(lpf[0] * lpf[1])
  rel = level_px / radius
  return {
    "points": np.broadcast_to(points, (batch, *points.shape)),
    "values": values,
    "weights": weights,
    "fixed_range": np.stack([_range(v, wt) for v, wt in zip(values, weights)]),
    "moving": np.stack([np.pad(m_img, pad_m), np.pad(m_mask, pad_m)], axis=-1),
    "moving_hw": np.broadcast_to(np.array([mh, mw], np.int32), (batch, 2)),
    "moving_range": np.stack([_range(m.ravel(), mm.ravel()) for m, mm in zip(m_img, m_mask)]),
    "moving_px": np.broadcast_to(np.asarray(lpm, np.float32), (batch, 2)),
    "center": np.broadcast_to(np.asarray(center, np.float32), (batch, 2)),
    "param_scale": np.broadcast_to(np.array([rel, rel, rel, rel, level_px, level_px], np.float32), (batch, 6)),
  }


# ---------------------------------------------------------------------------------------------------- checking


def _check_transform(t: AffineTransform, mirror: np.ndarray, config: RegistrationConfig) -> str | None:
  """Why a transform is refused, or None."""
  m = np.asarray(t.matrix, np.float64)
  if not np.all(np.isfinite(m)):
    return "the transform is not finite"
  mirrored = np.linalg.det(mirror[:2, :2]) < 0
  proper = m @ np.linalg.inv(mirror)
  det = np.linalg.det(proper[:2, :2])
  if np.linalg.det(m[:2, :2]) <= 0 and not mirrored:
    return f"the transform has determinant {np.linalg.det(m[:2, :2]):.3g} <= 0 without a mirror start"
  if det <= 0:
    return f"the non-mirror part has determinant {det:.3g} <= 0"
  sv = np.linalg.svd(proper[:2, :2], compute_uv=False)
  if sv.min() < config.min_scale or sv.max() > config.max_scale:
    return f"scales {sv.min():.3g}–{sv.max():.3g} leave [{config.min_scale}, {config.max_scale}]"
  return None


def _corner_spread_um(best: AffineTransform, others: Sequence[AffineTransform], corners: np.ndarray) -> float:
  inv = np.linalg.inv(np.asarray(best.matrix, np.float64))
  hom = np.concatenate([corners, np.ones((len(corners), 1))], axis=1)
  spread = 0.0
  for t in others:
    back = (inv @ np.asarray(t.matrix, np.float64) @ hom.T).T[:, :2]
    spread = max(spread, float(np.max(np.linalg.norm(back - corners, axis=1))))
  return spread


# ------------------------------------------------------------------------------------------------------- public


def _prepare_stack(images, masks, name):
  grey = np.stack([to_grey(im) for im in images])
  if masks is None:
    mask = np.ones(grey.shape, np.float32)
  else:
    mask = np.stack([np.asarray(m).astype(np.float32) for m in masks])
    if mask.shape != grey.shape:
      raise errors.ConfigError(f"{name} mask shape {mask.shape[1:]} != image shape {grey.shape[1:]}")
  if not np.all(np.isfinite(grey)):
    raise errors.DataError(f"the {name} image has NaN or infinite values")
  return grey, mask


def _register_stack(fixed_list, moving_list, fixed_masks, moving_masks, fixed_px, moving_px, config, initial,
                    on_failure):  # fmt: skip
  fixed_px = tf.pixel_size_yx(fixed_px, "fixed_pixel_size_um")
  moving_px = tf.pixel_size_yx(moving_px, "moving_pixel_size_um")
  fixed, fmask = _prepare_stack(fixed_list, fixed_masks, "fixed")
  moving, mmask = _prepare_stack(moving_list, moving_masks, "moving")
  if min(fixed.shape[1:]) < 4 or min(moving.shape[1:]) < 4:
    raise errors.ConfigError(f"images must be at least 4 × 4, got {fixed.shape[1:]} and {moving.shape[1:]}")
  batch = fixed.shape[0]
  center = np.asarray(tf.image_center_um(fixed.shape[1:], fixed_px), np.float64)
  factors = _shrink_factors(config.levels, fixed_px, moving_px, config.working_pixel_size_um)
  rng = np.random.default_rng(config.seed)
  pyramids = []
  for sf, sm in factors:
    pyramids.append(tuple(np.stack([shrink_image(im, f) for im in stack])
                          for stack, f in ((fixed, sf), (fmask, sf), (moving, sm), (mmask, sm))))  # fmt: skip

  # Starts, from moments of the coarsest level (cheap and smooth).
  starts = _starts(config, initial is not None)
  f0, fm0, m0, mm0 = pyramids[0]
  lpf0 = (fixed_px[0] * factors[0][0], fixed_px[1] * factors[0][0])
  lpm0 = (moving_px[0] * factors[0][1], moving_px[1] * factors[0][1])
  params, mirrors = [], []
  for b in range(batch):
    fw = _moment_weights(f0[b], None if fixed_masks is None else fm0[b])
    mw = _moment_weights(m0[b], None if moving_masks is None else mm0[b])
    for name, weights in (("fixed", fw), ("moving", mw)):
      if weights.sum() <= 1e-6 * weights.size:
        raise errors.RegistrationError(
          f"the {name} image of pair {b} is constant or its mask is empty: nothing to register"
        )
    if initial is None:
      p, d = _initial_params(fw, mw, lpf0, lpm0, center, starts)
    else:
      m = np.asarray(initial.matrix, np.float64)
      d = _mirror_matrix(center) if np.linalg.det(m[:2, :2]) < 0 else np.eye(3)
      p = AffineTransform(jnp.asarray(m @ np.linalg.inv(d), jnp.float32)).to_params(center)
      p, d = np.asarray(p, np.float32)[None], np.asarray(d, np.float32)[None]
    params.append(p)
    mirrors.append(d)
  params, mirrors = jnp.asarray(np.stack(params)), jnp.asarray(np.stack(mirrors))
  order = np.broadcast_to(np.arange(len(starts)), (batch, len(starts)))

  # Levels share padded shapes (sample count, moving image size) so that each number of candidates compiles
  # once; coarse levels of small images then carry zero-weight padding samples, cheap next to a compilation. When
  # the coarsest level runs more starts than are kept it compiles on its own anyway, so it keeps its own sample.
  max_samples = config.max_samples or 2**62
  level_points = [min(p[0].shape[1] * p[0].shape[2], max_samples) for p in pyramids]
  own_first = len(starts) > config.num_candidates and len(pyramids) > 1
  shared_points = max(level_points[1:]) if own_first else max(level_points)
  moving_pad = tuple(max(p[2].shape[1 + i] for p in pyramids) for i in range(2))
  radius = max(0.5 * math.hypot(fixed.shape[2] * fixed_px[1], fixed.shape[1] * fixed_px[0]), 1e-6)
  opts = _LevelOptions(config.similarity, config.kind, config.bins, config.kernel)
  its = config.iterations_per_level()
  iterations = []
  for level, level_factors in enumerate(factors):
    num_points = level_points[0] if level == 0 and own_first else shared_points
    data = _level_data(pyramids[level], level, num_points, moving_pad, fixed_px, moving_px, level_factors, center,
                       radius, rng, max_samples)  # fmt: skip
    hyper = {
      "iterations": jnp.int32(its[level]),
      "patience": jnp.int32(config.patience),
      "tolerance": jnp.float32(config.tolerance),
      "learning_rate": jnp.float32(config.learning_rate),
      "final_fraction": jnp.float32(config.final_learning_rate_fraction),
    }
    params, metrics, overlaps, steps, converged = _run_level(params, mirrors, data, hyper, opts)
    iterations.append(np.asarray(steps))
    if level == 0 and params.shape[1] > config.num_candidates:
      score = np.asarray(metrics) if config.similarity == "mse" else -np.asarray(metrics)
      keep = np.argsort(np.where(np.isfinite(score), score, np.inf), axis=1, kind="stable")[:, : config.num_candidates]
      params = jnp.take_along_axis(params, jnp.asarray(keep)[..., None], axis=1)
      mirrors = jnp.take_along_axis(mirrors, jnp.asarray(keep)[..., None, None], axis=1)
      order = np.take_along_axis(order, keep, axis=1)
      iterations = [np.take_along_axis(iterations[0], keep, axis=1)]
      # With a single level these are the final values, so they must follow the kept starts too.
      metrics, overlaps, converged = (np.take_along_axis(np.asarray(v), keep, axis=1)
                                      for v in (metrics, overlaps, converged))
  metrics, overlaps, converged = np.asarray(metrics), np.asarray(overlaps), np.asarray(converged)
  params, mirrors = np.asarray(params), np.asarray(mirrors, np.float64)
  iterations = np.stack(iterations, axis=-1)  # (B, K, levels)

  corners = np.asarray(tf.image_corners_um(fixed.shape[1:], fixed_px), np.float64)
  results = []
  for b in range(batch):
    score = metrics[b] if config.similarity == "mse" else -metrics[b]
    rank = np.argsort(np.where(np.isfinite(score), score, np.inf), kind="stable")
    cands = []
    for k in rank:
      t = _transform(jnp.asarray(params[b, k]), jnp.asarray(mirrors[b, k], jnp.float32), center, config.kind)
      s = starts[order[b, k]]
      cands.append(Candidate(transform=t, metric=float(metrics[b, k]), start=s.label, mirrored=s.mirrored))
    best_k = rank[0]
    best = cands[0]
    problem = None if np.isfinite(best.metric) else "the similarity is not finite"
    problem = problem or _check_transform(best.transform, mirrors[b, best_k], config)
    if problem is not None:
      msg = f"registration of pair {b} refused: {problem} (start {best.start}, {config.similarity} {best.metric:.4g})"
      if on_failure == "raise":
        raise errors.RegistrationError(msg)
      _log.warning(msg)
      results.append(None)
      continue
    margin = config.candidate_margin * max(abs(best.metric), 1e-12)
    close = [c.transform for c in cands[1:] if abs(c.metric - best.metric) <= margin]
    uncertainty = _corner_spread_um(best.transform, close, corners)
    notes = []
    limit_um = config.uncertainty_warn_px * math.sqrt(fixed_px[0] * fixed_px[1])
    if uncertainty > limit_um:
      notes.append(f"uncertain registration: candidates within {config.candidate_margin:.0%} of the best "
                   f"{config.similarity} disagree by up to {uncertainty:.1f} µm at the image corners "
                   f"(> {limit_um:.1f} µm)")  # fmt: skip
    if not bool(converged[b, best_k]):
      _log.info("finest level stopped at its iteration limit (%d steps)", its[-1])
    if overlaps[b, best_k] < config.min_overlap:
      notes.append(f"only {overlaps[b, best_k]:.0%} of the fixed image maps inside the moving image")
    for note in notes:
      warnings.warn(note, UserWarning, stacklevel=3)
    results.append(
      RegistrationResult(
        transform=best.transform,
        metric=best.metric,
        metric_name=config.similarity,
        iterations=tuple(int(i) for i in iterations[b, best_k]),
        converged=bool(converged[b, best_k]),
        candidates=tuple(cands),
        uncertainty_um=uncertainty,
        overlap=float(overlaps[b, best_k]),
        start=best.start,
        warnings=tuple(notes),
        fixed_shape=tuple(int(v) for v in fixed.shape[1:]),
        moving_shape=tuple(int(v) for v in moving.shape[1:]),
        fixed_pixel_size_um=fixed_px,
        moving_pixel_size_um=moving_px,
      )
    )
  return results


def register(
  fixed: jax.typing.ArrayLike,
  moving: jax.typing.ArrayLike,
  *,
  fixed_pixel_size_um=1.0,
  moving_pixel_size_um=1.0,
  fixed_mask: jax.typing.ArrayLike | None = None,
  moving_mask: jax.typing.ArrayLike | None = None,
  config: RegistrationConfig | None = None,
  initial_transform: AffineTransform | None = None,
) -> RegistrationResult:
  """Finds the FIXED → MOVING affine transform (µm) that best aligns `moving` to `fixed`.

  Args:
    fixed: (H, W) or (H, W, C) fixed image (e.g. real H&E).
    moving: (H', W') or (H', W', C) moving image (e.g. synthetic H&E on the MSI grid).
    fixed_pixel_size_um: fixed pixel size, float or (y, x).
    moving_pixel_size_um: moving pixel size, float or (y, x).
    fixed_mask: optional (H, W) weights (bool or [0, 1]) of the fixed pixels that count.
    moving_mask: optional (H', W') weights of the moving pixels that count.
    config: options; `RegistrationConfig()` when None.
    initial_transform: start from this transform alone (no moments, no restarts).

  Returns:
    A `RegistrationResult`.

  Raises:
    ConfigError: for bad shapes, options or pixel sizes.
    DataError: for NaN/infinite images.
    RegistrationError: when an image is constant (or its mask empty), or the result is degenerate (see module).
  """
  config = config or RegistrationConfig()
  return _register_stack([fixed], [moving], None if fixed_mask is None else [fixed_mask],
                         None if moving_mask is None else [moving_mask], fixed_pixel_size_um, moving_pixel_size_um,
                         config, initial_transform, "raise")[0]  # fmt: skip


def register_batch(
  fixed_stack: jax.typing.ArrayLike,
  moving_stack: jax.typing.ArrayLike,
  *,
  fixed_pixel_size_um=1.0,
  moving_pixel_size_um=1.0,
  fixed_masks: jax.typing.ArrayLike | None = None,
  moving_masks: jax.typing.ArrayLike | None = None,
  config: RegistrationConfig | None = None,
  on_failure: str = "raise",
) -> list[RegistrationResult | None]:
  """Registers many same-shape pairs at once (`jax.vmap` over pairs); pair i gives what `register` would.

  Args:
    fixed_stack: (N, H, W) or (N, H, W, C) fixed images.
    moving_stack: (N, H', W') or (N, H', W', C) moving images.
    fixed_pixel_size_um: pixel size shared by the fixed images.
    moving_pixel_size_um: pixel size shared by the moving images.
    fixed_masks: optional (N, H, W) weights.
    moving_masks: optional (N, H', W') weights.
    config: options.
    on_failure: "raise" (RegistrationError for the first refused pair) or "none" (None in its place).

  Returns:
    One `RegistrationResult` (or None) per pair.

  Raises:
    ConfigError: for bad shapes or options.
    RegistrationError: see `register`.
  """
  if on_failure not in ("raise", "none"):
    raise errors.ConfigError(f"on_failure must be 'raise' or 'none', got {on_failure!r}")
  fixed_stack, moving_stack = np.asarray(fixed_stack), np.asarray(moving_stack)
  if fixed_stack.ndim not in (3, 4) or len(fixed_stack) != len(moving_stack) or len(fixed_stack) == 0:
    raise errors.ConfigError(
      f"need stacks of equal length N ≥ 1 of (H, W[, C]) images, got {fixed_stack.shape} and {moving_stack.shape}"
    )
  config = config or RegistrationConfig()
  return _register_stack(list(fixed_stack), list(moving_stack), None if fixed_masks is None else list(fixed_masks),
                         None if moving_masks is None else list(moving_masks), fixed_pixel_size_um,
                         moving_pixel_size_um, config, None, on_failure)  # fmt: skip


def register_msi_to_histology(
  histology: jax.typing.ArrayLike,
  synthetic_he: jax.typing.ArrayLike,
  *,
  histology_pixel_size_um,
  msi_pixel_size_um,
  histology_mask: jax.typing.ArrayLike | None = None,
  msi_mask: jax.typing.ArrayLike | None = None,
  config: RegistrationConfig | None = None,
) -> RegistrationResult:
  """Registers synthetic H&E (on the MSI grid, moving) to real H&E (fixed), allowing flips and 90° turns.

  The default configuration differs from `register`'s: `flips_and_rot90=True` (a section may be mounted turned or
  face down), similarity "mi", and `working_pixel_size_um` from `msisynth.geometry.working_pixel_size_um` (a
  quarter of the MSI pixel, never finer than the histology; the rule `msisynth.pipeline` uses). Carry the MSI
  with `warp_msi(msi, result.transform, histology.shape[:2],
  histology_pixel_size_um)`.

  Args:
    histology: (H, W, 3) RGB (or grey) histology, fixed.
    synthetic_he: (h, w, 3) synthetic H&E on the MSI grid, moving.
    histology_pixel_size_um: histology pixel size, float or (y, x).
    msi_pixel_size_um: MSI pixel size, float or (y, x).
    histology_mask: optional tissue mask on the histology grid.
    msi_mask: optional measured-pixel mask on the MSI grid.
    config: options replacing the defaults above.

  Returns:
    A `RegistrationResult` whose transform maps histology µm → MSI µm.

  Raises:
    ConfigError, DataError, RegistrationError: see `register`.
  """
  if config is None:
    working = max(geometry.working_pixel_size_um(msi_pixel_size_um, histology_pixel_size_um))
    config = RegistrationConfig(flips_and_rot90=True, working_pixel_size_um=working)
  return register(histology, synthetic_he, fixed_pixel_size_um=histology_pixel_size_um,
                  moving_pixel_size_um=msi_pixel_size_um, fixed_mask=histology_mask, moving_mask=msi_mask,
                  config=config)  # fmt: skip


def result_summary(result: RegistrationResult) -> dict[str, Any]:
  """A JSON-serialisable summary of a result (matrix, metric, convergence, uncertainty, candidates)."""
  return {
    "matrix_fixed_to_moving_um": np.asarray(result.transform.matrix, np.float64).tolist(),
    "metric_name": result.metric_name,
    "metric": result.metric,
    "iterations": list(result.iterations),
    "converged": result.converged,
    "uncertainty_um": result.uncertainty_um,
    "overlap": result.overlap,
    "start": result.start,
    "mirrored": result.mirrored,
    "rotation_deg": tf.rotation_deg(result.transform),
    "warnings": list(result.warnings),
    "candidates": [
      {"metric": c.metric, "start": c.start, "matrix": np.asarray(c.transform.matrix, np.float64).tolist()}
      for c in result.candidates
    ],
  }
