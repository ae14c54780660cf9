"""Affine registration by gradient descent on a similarity measure, coarse to fine, with restarts.

`register(fixed, moving)` returns the FIXED → MOVING `AffineTransform` (µm) that maximises the similarity of the
fixed image and the moving image resampled at T(x_fixed) (docs/architecture.md). Images are (H, W) grey or
(H, W, 3) RGB (converted to grey by luminance) or (H, W, C) (channel mean), any float or integer dtype.

How it works:
- A Gaussian pyramid (`levels`; by default as many as bring the images to about 96 px across): at level l the
  images are smoothed (σ = shrink/2 pixels) and subsampled so that their pixel size is about `base · 2^l`, with
  base the working pixel size; a pixel keeps its centre, so physical coordinates hold at every level.
- The coarsest level optimises a similarity transform (`coarse_kind`), the finer ones the full affine map.
- Starts: translation from the centres of mass of the two images, rotation 0 and the principal-axes angle (and
  that + 180°), optionally with every 90° rotation and a mirror (`flips_and_rot90`). The weights of the moments
  are the masks when given, else |intensity - background| with the background the median of the border pixels
  (so a bright slide background does not count as tissue).
- At the coarsest level every start is optimised at once (the candidates are one array axis, so their Parzen
  histograms come from one matrix product); the best `num_candidates` go on to the finer levels. Each level is
  one jitted `jax.lax.while_loop` of Adam steps on the loss (-MI, -NMI, -NCC or MSE) over a fixed random sample of
  fixed-grid pixels (`max_samples`); levels share padded array shapes so that they reuse one compilation. The MI's
  histogram spans the 0.5-99.5 percentiles of each image's intensities (`intensity_percentiles`), so that a few
  hotspots do not squeeze the tissue into a few bins.
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
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.metrics import LUMINANCE_WEIGHTS
from msisynth.register import similarity as sim

_log = logging.getLogger(__name__)

SIMILARITIES = ("mi", "nmi", "ncc", "mse")
# One grey conversion in the library: ITU-R BT.709 luminance, as `msisynth.metrics.to_grey`.
_LUMINANCE = np.asarray(LUMINANCE_WEIGHTS, np.float32)


def check_measure(similarity: str, kernel: str) -> None:
  """Refuses an unknown similarity or Parzen kernel (the options `register` and `register_deformable` share).

  Raises:
    ConfigError: naming the bad option.
  """
  if similarity not in SIMILARITIES:
    raise errors.ConfigError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
  if kernel not in sim.KERNELS:
    raise errors.ConfigError(f"kernel must be one of {sim.KERNELS}, got {kernel!r}")


@dataclasses.dataclass(frozen=True)
class RegistrationConfig:
  """Options of `register`.

  Attributes:
    similarity: "mi" (Parzen mutual information, default; multimodal), "nmi", "ncc" or "mse" (single-modality,
      e.g. synthetic H&E → real H&E).
    kind: "affine", "similarity" or "rigid" (the parameters fixed in optimisation).
    coarse_kind: the family optimised at the coarsest level when it has fewer parameters than `kind` (default
      "similarity": rotation, one scale, translation), the finer levels then free the rest. With an affine map at
      the coarsest level, where the images show little more than the tissue's outline, a stretched or sheared map
      that lays a cut tissue outline over the whole other section can score higher than the truth. None: `kind`.
    bins: histogram bins for MI/NMI.
    kernel: Parzen kernel, "bspline" or "gaussian".
    levels: pyramid levels (coarse → fine); level l has pixels about 2^l times the base. None (default): as many
      as bring the coarsest level's larger image to at most `coarsest_size_px` pixels across (at least 2), so that
      the capture range in pixels of the coarsest level is the same at every image size.
    coarsest_size_px: see `levels`.
    working_pixel_size_um: finest pixel size registration works at (µm); None: the finer of the two images',
      or half the coarser one's when that is larger (finer detail is in one image only).
    max_iterations: Adam steps per level, an int or one per level (coarse → fine); None: 300 at the finest level
      and 100 at the others.
    learning_rate: first Adam step, in level pixels of displacement at the image edge; cosine-decayed over the
      level to `learning_rate * final_learning_rate_fraction`.
    final_learning_rate_fraction: see `learning_rate`.
    tolerance: relative improvement of the loss that resets the `patience` counter.
    patience: steps without such improvement after which a level stops (converged). The default is long: the loss
      is stochastic and nearly flat along anisotropy and shear, and a short patience (20) stopped the finest
      level after 34–77 of its steps while it was still moving.
    max_samples: fixed-grid pixels drawn anew at every step (with replacement) from the level's pool for the
      similarity's gradient; None: `sample_pool`.
    coarsest_samples: samples per step at the coarsest level, where every start is optimised (None: `max_samples`).
    sample_pool: fixed-grid pixels of each level (drawn once, without replacement; all when the level has
      fewer; raised to `max_samples` when smaller) that the steps draw from and that final similarities are
      measured on. Every level and image shape uses pools of this size (zero-weight padding), so that the sample
      count never causes a recompilation.
    outside_bin: MI/NMI count fixed samples that map outside the moving image (or its mask) in an extra moving
      bin, and normalise by all fixed samples, so that shrinking the overlap cannot raise the similarity (it
      loses the information of the samples that leave). False (default): the classic estimate over the overlap
      alone. The outside bin rewards a larger overlap, which is wrong where the moving field truly covers only a
      part of the fixed tissue (an MSI field that cuts the section): there a map that spreads the moving image over
      the whole tissue scores higher than the truth. The success test's overlap check guards against a shrunk
      overlap instead.
    seed: seed of the pixel sampling.
    principal_axes: add the principal-axes rotation (and + 180°) to the starts.
    start_rotations_deg: rotation offsets (degrees) added to every base start angle.
    start_scales: isotropic scales (of the fixed → moving map, relative to the moments' estimate) to start from;
      the default 0.8, 1 and 1.25 cover the scale range 0.7–1.4 that one start at 1 does not capture.
    start_offsets_um: (x, y) µm shifts of the fixed image's centre of mass that every start is also tried at
      (a translation search, e.g. for a small MSI region somewhere on a large histology image).
    moment_scale: start from the scale that matches the spread (second moments) of the two images' weights,
      rather than 1 (pixel sizes are then only a first guess).
    flips_and_rot90: also start from 90°, 180°, 270° and from the mirror image at each of those; chosen by the
      similarity. Turn on when a section may be flipped or turned (MSI ↔ histology).
    turn_margin: a turned (|rotation| > 45°) or mirrored candidate is chosen over the best unturned one only when
      its similarity is higher by more than this fraction; otherwise the unturned one is chosen and the result
      says so (`RegistrationResult.turn_ambiguous`).
    num_candidates: starts kept after the coarsest level and reported in `RegistrationResult.candidates`.
    candidate_margin: candidates whose similarity is within this fraction of the best and whose transform differs
      (by more than `uncertainty_warn_px`) make the result ambiguous; their spread is `uncertainty_um`.
    uncertainty_warn_px: warn when the uncertainty exceeds this many fixed pixels.
    min_scale: smallest singular value of the (non-mirror) linear part accepted.
    max_scale: largest singular value accepted.
    min_overlap: warn when less than this fraction of the fixed image (its mask) maps inside the moving image
      and less than this fraction of the moving image (its mask) is covered by the fixed one.
    fail_overlap: below this overlap (both ways) the result is a failure.
    min_gain: the success test: the similarity must fall by at least this fraction of itself when the result is
      misaligned by a shift of 1/32 of the half-diagonal of the smaller image (the moving one mapped into the
      fixed space, or the fixed one) along ±x and ±y: a true alignment is a sharp optimum, a chance one is not.
      MI and NMI are measured with the outside bin for this test (see `outside_bin`), whatever the optimisation
      used, so that a shift that moves tissue out of the field costs the information it loses.
    min_mask_pixels: a fixed or moving mask (or weight image) with fewer pixels is refused.
    match_resolution: at levels where one image's pixels are coarser than the other's (MSI beside histology),
      smooth the finer image to the coarser one's resolution (σ of half a pixel each; see `_match_resolution`).
      On generated MSI-like cases (of a generator since corrected, whose tissue was too large) this halved the
      scale at which the MI of all pixels peaks (1.4 % → 0.7 % too small a moving image), but it did not raise
      the success rate there or on the real pairs (docs/results.md, section 10), so it is off by default.
    intensity_percentiles: (low, high) percentiles of each image's intensities (within its mask) that span the
      MI's histogram; values beyond fall in the end bins. (0, 100) is the full range, where a few MSI hotspots
      squeeze the tissue into a few bins: on 40 generated MSI-like cases (256²–2048²) the default (0.5, 99.5)
      raised the successes from 25 to 32 and removed the false alarms (3 of 65 → 0 of 72 correct cases;
      docs/results.md, section 10).
    finest_repeats: run the finest level this many times from the same candidates, each with a sample pool and
      step draws of its own, and keep the median of the parameters. The optimum of one run belongs to its random
      pool; at 1024² and above that moves MSI-like results by a few pixels (docs/results.md, section 10). Each
      repeat costs one more finest level.
  """

  similarity: str = "mi"
  kind: str = "affine"
  coarse_kind: str | None = "similarity"
  bins: int = 32
  kernel: str = "bspline"
  levels: int | None = None
  coarsest_size_px: int = 96
  working_pixel_size_um: float | None = None
  max_iterations: int | tuple[int, ...] | None = None
  learning_rate: float = 0.5
  final_learning_rate_fraction: float = 0.01
  tolerance: float = 1e-5
  patience: int = 100
  max_samples: int | None = 2048
  coarsest_samples: int | None = None
  sample_pool: int = 16384
  outside_bin: bool = False
  seed: int = 0
  principal_axes: bool = True
  start_rotations_deg: tuple[float, ...] = (0.0,)
  start_scales: tuple[float, ...] = (0.8, 1.0, 1.25)
  start_offsets_um: tuple[tuple[float, float], ...] = ((0.0, 0.0),)
  moment_scale: bool = False
  flips_and_rot90: bool = False
  turn_margin: float = 0.05
  num_candidates: int = 3
  candidate_margin: float = 0.02
  uncertainty_warn_px: float = 3.0
  min_scale: float = 0.2
  max_scale: float = 5.0
  min_overlap: float = 0.2
  fail_overlap: float = 0.02
  min_gain: float = 0.09
  min_mask_pixels: int = 64
  match_resolution: bool = False
  intensity_percentiles: tuple[float, float] = (0.5, 99.5)
  finest_repeats: int = 1

  def __post_init__(self):
    check_measure(self.similarity, self.kernel)
    if self.kind not in tf.KINDS:
      raise errors.ConfigError(f"kind must be one of {tf.KINDS}, got {self.kind!r}")
    if self.coarse_kind is not None and self.coarse_kind not in tf.KINDS:
      raise errors.ConfigError(f"coarse_kind must be None or one of {tf.KINDS}, got {self.coarse_kind!r}")
    if self.levels is not None and self.levels < 1 or self.bins < 4 or self.num_candidates < 1 or self.patience < 1:
      raise errors.ConfigError("levels, num_candidates and patience must be >= 1 and bins >= 4")
    if isinstance(self.max_iterations, tuple | list):
      if self.levels is not None and len(self.max_iterations) != self.levels or min(self.max_iterations) < 1:
        raise errors.ConfigError(f"max_iterations must be a positive int or {self.levels} of them (coarse → fine)")
    elif self.max_iterations is not None and self.max_iterations < 1:
      raise errors.ConfigError("max_iterations must be >= 1")
    if not 0 < self.min_scale < 1 < self.max_scale:
      raise errors.ConfigError(f"need 0 < min_scale < 1 < max_scale, got {self.min_scale}, {self.max_scale}")
    if self.max_samples is None:  # all of the pool at every step
      object.__setattr__(self, "max_samples", int(self.sample_pool))
    if self.learning_rate <= 0 or self.max_samples < 16:
      raise errors.ConfigError("learning_rate must be > 0 and max_samples >= 16")
    if self.coarsest_samples is not None and self.coarsest_samples < 16:
      raise errors.ConfigError(f"coarsest_samples must be None or >= 16, got {self.coarsest_samples}")
    largest_draw = max(self.max_samples, self.coarsest_samples or 0)
    if self.sample_pool < largest_draw:  # a pool at least as large as one step's draw
      object.__setattr__(self, "sample_pool", int(largest_draw))
    if self.working_pixel_size_um is not None and self.working_pixel_size_um <= 0:
      raise errors.ConfigError(f"working_pixel_size_um must be > 0, got {self.working_pixel_size_um}")
    object.__setattr__(self, "intensity_percentiles", check_percentiles(self.intensity_percentiles))
    if not isinstance(self.finest_repeats, int) or self.finest_repeats < 1:
      raise errors.ConfigError(f"finest_repeats must be an int >= 1, got {self.finest_repeats!r}")
    if self.coarsest_size_px < 16 or not self.start_scales or min(self.start_scales) <= 0:
      raise errors.ConfigError("coarsest_size_px must be >= 16 and start_scales positive")

  def num_levels(self, extent_px: float = 0.0) -> int:
    """Pyramid levels for images whose larger side spans `extent_px` working pixels (see `levels`)."""
    if self.levels is not None:
      return int(self.levels)
    if isinstance(self.max_iterations, tuple | list):
      return len(self.max_iterations)
    return max(2, 1 + math.ceil(math.log2(max(extent_px, 1.0) / self.coarsest_size_px)))

  def iterations_per_level(self, levels: int | None = None) -> tuple[int, ...]:
    """Adam steps at each level, coarse → fine."""
    levels = self.num_levels() if levels is None else levels
    if self.max_iterations is None:
      return tuple(300 if level == 0 else 100 for level in range(levels - 1, -1, -1))
    if isinstance(self.max_iterations, int):
      return (int(self.max_iterations),) * levels
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

  @property
  def turned(self) -> bool:
    """Mirrored, or turned by more than 45°."""
    return self.mirrored or abs(tf.rotation_deg(self.transform)) > 45.0


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
  """What `register` found.

  Attributes:
    transform: FIXED → MOVING `AffineTransform` in µm.
    metric: final similarity of the chosen candidate on the finest level's sample (bits for MI).
    metric_name: the similarity ("mi", "nmi", "ncc", "mse").
    iterations: Adam steps run per level (coarse → fine) for the chosen candidate.
    converged: whether the finest level stopped by tolerance rather than by its iteration limit.
    candidates: the restarts carried to the finest level, the chosen one first.
    uncertainty_um: the largest distance (fixed µm) between where the chosen transform and any candidate within
      `candidate_margin` of it send the fixed image's corners; 0 when no other candidate is that close.
    overlap: fraction of the fixed sample weight that maps inside the moving image (its mask).
    start: the chosen start.
    warnings: messages about the result (failure, ambiguity, small overlap), also issued with `warnings.warn`.
    fixed_shape: (H, W) of the fixed image.
    moving_shape: (H, W) of the moving image.
    fixed_pixel_size_um: (y, x) µm.
    moving_pixel_size_um: (y, x) µm.
    success: the registration's own verdict: the similarity stands clearly above that of the same pair
      misaligned (`gain` ≥ `min_gain`), the overlap is not near zero, and the transform is valid. False comes
      with a warning saying why.
    gain: 1 - (mean similarity of the result slightly misaligned, see `min_gain`) / (its similarity), both as the
      success test measures them (MI/NMI with the outside bin, on the finest level's pool); for MSE
      1 - (its MSE) / (that misaligned). The success test uses it for MI and NMI only (NCC and MSE vary too
      smoothly with a shift for one threshold to suit them).
    moving_overlap: fraction of the moving image (its mask) covered by the fixed image (its mask).
    agreement: fraction of the candidates that reached the chosen transform (within `uncertainty_warn_px`).
    turn_ambiguous: a turned or mirrored candidate scored within `turn_margin` of the best unturned one, and the
      unturned one was chosen (or, with no unturned candidate close, the turned one was, by too small a margin).
    notes: other facts about the run (e.g. the tissue crop or scale search of `register_msi_to_histology`).
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
  success: bool = True
  gain: float = float("nan")
  moving_overlap: float = float("nan")
  agreement: float = float("nan")
  turn_ambiguous: bool = False
  notes: dict = dataclasses.field(default_factory=dict)

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


def _pyramid(image: np.ndarray, factors: Sequence[int]) -> dict[int, np.ndarray]:
  """`shrink_image(image, f)` for each factor, each level made from the largest finer one whose factor divides
  it (σ² adding up to about that of the direct filter), so that a large image is filtered at full size once."""
  out = {1: np.asarray(image, np.float32)}
  if out[1].size and out[1].min() == out[1].max():  # a constant (a mask of ones when none is given) stays so
    return {f: out[1][::f, ::f] for f in {1, *factors}}
  for f in sorted(set(factors)):
    if f in out:
      continue
    base = max(g for g in out if f % g == 0)
    step = f // base
    # Smoothing σ_f = f/2 in full pixels; the base already has σ_b = base/2 (0 for the image itself).
    have = 0.0 if base == 1 else base / 2.0
    sigma = math.sqrt(max((f / 2.0) ** 2 - have**2, 0.0)) / base
    src = out[base]
    out[f] = ndi.gaussian_filter(src, sigma, mode="nearest", truncate=3.0)[::step, ::step] if step > 1 else src
  return out


def _geo(px) -> float:
  return math.sqrt(px[0] * px[1])


def _match_resolution(fixed, moving, fixed_level_px, moving_level_px):
  """Smooths the (B, H, W) level images of the finer grid to the resolution of the coarser one.

  A level image is taken to resolve about half its pixel (σ = px / 2: the pixel's own area, about px / √12, and the
  bilinear interpolation of the samples, px / √6, add up to about that). When one grid is coarser, as an MSI grid
  is beside histology at the finest levels, the blurred image's copies of the sharper image's features are larger,
  and MI gains by drawing the blurred image smaller. The finer image is smoothed by the Gaussian that brings it to
  the coarser one's σ.
  """
  ratio = moving_level_px / fixed_level_px
  if abs(ratio - 1.0) < 1e-3:
    return fixed, moving
  finer, coarser = (fixed, moving) if ratio > 1 else (moving, fixed)
  r = max(ratio, 1.0 / ratio)
  sigma = 0.5 * math.sqrt(r * r - 1.0)  # in the finer image's level pixels
  smoothed = np.stack([ndi.gaussian_filter(im, sigma, mode="nearest", truncate=3.0) for im in finer])
  return (smoothed, coarser) if ratio > 1 else (coarser, smoothed)


def _working_px(gf, gm, working_px):
  # Detail finer than half the coarser image's pixel is in one image only: registering there adds noise and time.
  return working_px if working_px is not None else max(min(gf, gm), max(gf, gm) / 2.0)


def _shrink_factors(levels, fixed_px, moving_px, working_px):
  gf, gm = _geo(fixed_px), _geo(moving_px)
  base = _working_px(gf, gm, working_px)
  out = []
  for level in range(levels - 1, -1, -1):
    target = base * 2**level
    out.append((max(1, int(round(target / gf))), max(1, int(round(target / gm)))))
  return out


def _extent_px(fixed_shape, moving_shape, fixed_px, moving_px, working_px):
  gf, gm = _geo(fixed_px), _geo(moving_px)
  base = _working_px(gf, gm, working_px)
  return max(max(fixed_shape) * gf, max(moving_shape) * gm) / base


def _bucket(n: int) -> int:
  """The smallest of 2^k and 1.5 · 2^k (at least 16) that holds n: padded sizes that many shapes share."""
  k = 16
  while True:
    if n <= k:
      return k
    if n <= k * 3 // 2:
      return k * 3 // 2
    k *= 2


# -------------------------------------------------------------------------------------------------- initialisation


def _moment_weights(grey, mask):
  if mask is not None:
    return np.asarray(mask, np.float64)
  border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
  return np.abs(grey - np.median(border)).astype(np.float64)


def _moments(weights, pixel_size):
  """Centre of mass (x, y) µm, principal-axis angle (rad) and RMS radius (µm) of a weight image."""
  h, w = weights.shape
  py, px = pixel_size
  yy, xx = np.meshgrid(np.arange(h) * py, np.arange(w) * px, indexing="ij")
  total = max(weights.sum(), 1e-12)
  cx, cy = (weights * xx).sum() / total, (weights * yy).sum() / total
  dx, dy = xx - cx, yy - cy
  cxx, cyy, cxy = ((weights * v).sum() / total for v in (dx * dx, dy * dy, dx * dy))
  return np.array([cx, cy]), 0.5 * math.atan2(2 * cxy, cxx - cyy), math.sqrt(max(cxx + cyy, 1e-12))


class _Start(NamedTuple):
  rotation: float  # radians added to the base angle
  use_axes: bool  # base angle = principal-axes angle difference (else 0)
  mirrored: bool
  scale: float  # relative to the base scale
  label: str
  offset: tuple[float, float] = (0.0, 0.0)  # µm added to the fixed centre of mass


def _starts(config: RegistrationConfig, initial: bool) -> list[_Start]:
  if initial:
    return [_Start(0.0, False, False, 1.0, "initial transform")]
  starts = []
  mirrors = (False, True) if config.flips_and_rot90 else (False,)
  quarter = (0, 90, 180, 270) if config.flips_and_rot90 else (0,)
  for scale in config.start_scales:
    stag = "" if scale == 1.0 else f", scale ×{scale:g}"
    for mirrored in mirrors:
      tag = (", mirror x" if mirrored else "") + stag
      for offset in config.start_rotations_deg:
        for q in quarter:
          starts.append(_Start(math.radians(q + offset), False, mirrored, scale, f"rotation {q + offset:g}°{tag}"))
        if config.principal_axes:
          for q in (0, 180):
            starts.append(_Start(math.radians(q + offset), True, mirrored, scale,
                                 f"principal axes + {q + offset:g}°{tag}"))  # fmt: skip
  if len(config.start_offsets_um) > 1 or tuple(config.start_offsets_um[0]) != (0.0, 0.0):
    starts = [s._replace(offset=(float(o[0]), float(o[1])), label=f"{s.label}, at {o[0]:+.0f}, {o[1]:+.0f} µm")
              for o in config.start_offsets_um for s in starts]  # fmt: skip
  return starts


def _mirror_matrix(center):
  return np.array([[-1.0, 0.0, 2 * center[0]], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _initial_params(fixed_w, moving_w, fixed_px, moving_px, center, starts, moment_scale):
  """(K, 6) parameters and (K, 3, 3) mirrors for one image pair."""
  com_f, ang_f, rad_f = _moments(fixed_w, fixed_px)
  com_m, ang_m, rad_m = _moments(moving_w, moving_px)
  base_scale = rad_m / rad_f if moment_scale else 1.0
  params, mirrors = [], []
  for s in starts:
    d = _mirror_matrix(center) if s.mirrored else np.eye(3)
    fixed_angle = -ang_f if s.mirrored else ang_f
    rot = s.rotation + (ang_m - fixed_angle if s.use_axes else 0.0)
    scale = base_scale * s.scale
    lin = scale * np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    t = com_m - center - lin @ ((d @ np.append(com_f + np.asarray(s.offset), 1.0))[:2] - center)
    params.append([rot, math.log(scale), math.log(scale), 0.0, t[0], t[1]])
    mirrors.append(d)
  return np.asarray(params, np.float32), np.asarray(mirrors, np.float32)


# ------------------------------------------------------------------------------------------------- optimisation


class _LevelOptions(NamedTuple):
  similarity: str
  kind: str
  bins: int
  kernel: str
  outside_bin: bool
  samples: int


def _transform(params, mirror, center, kind):
  return AffineTransform(AffineTransform.from_params(tf.constrain_params(params, kind), center).matrix @ mirror)


@functools.partial(jax.jit, static_argnames=("kind",))
def _matrices(params, mirrors, center, kind):
  """(B, K, 3, 3) FIXED → MOVING matrices of (B, K, 6) params and (B, K, 3, 3) mirrors, in one call."""
  one = lambda p, m: _transform(p, m, center, kind).matrix  # noqa: E731
  return jax.vmap(jax.vmap(one))(params, mirrors)


def _similarities(params, mirrors, data, opts: _LevelOptions):
  """(similarity, overlap), each (K,), of K candidates on one level's sample."""
  mats = jax.vmap(lambda p, m: _transform(p, m, data["center"], opts.kind).matrix)(params, mirrors)
  return _similarities_of_matrices(mats, data, opts)


def _similarities_of_matrices(mats, data, opts: _LevelOptions):
  """(similarity, overlap), each (K,), of K (3, 3) FIXED → MOVING matrices on one level's sample.

  Candidates are an explicit leading axis rather than a `vmap`: the K Parzen histograms then come from one plain
  matrix product, (B, N) @ (N, K·B), which runs several times faster on a CPU than K batched products. With
  `outside_bin` a fixed sample's weight is split between the moving Parzen bins (its part inside the moving image
  and mask) and one extra "outside" bin (the rest), and the histogram is normalised by the fixed weight alone.
  """
  q = jnp.einsum("nj,kij->kni", data["points"], mats[:, :2, :2]) + mats[:, None, :2, 2]
  rows, cols = q[..., 1] / data["moving_px"][0], q[..., 0] / data["moving_px"][1]
  # The moving image and its mask are the two channels of one array: one gather for both.
  both, inside = tf.sample_linear(data["moving"], rows, cols, data["moving_hw"])
  values = both[..., 0]
  fixed_w = data["weights"][None, :]
  w = fixed_w * inside.astype(jnp.float32) * both[..., 1]
  total = jnp.sum(w, axis=1)
  fixed_total = jnp.maximum(jnp.sum(data["weights"]), 1e-12)
  overlap = total / fixed_total
  if opts.similarity in ("mi", "nmi"):
    num, k = values.shape[1], values.shape[0]
    if opts.kernel == "bspline":
      joint = sim.bspline_joint_counts(data["fixed_parzen"], sim.bin_coordinates(values, data["moving_range"],
                                                                                 opts.bins), w)  # fmt: skip
    else:
      wm = sim.parzen_weights(values.T, data["moving_range"], bins=opts.bins, kernel=opts.kernel) * w.T[..., None]
      joint = jnp.matmul(data["fixed_parzen"].T, wm.reshape(num, k * opts.bins), precision=sim.matmul_precision())
      joint = jnp.transpose(joint.reshape(opts.bins, k, opts.bins), (1, 0, 2))
    if opts.outside_bin:
      outside = jnp.matmul(fixed_w - w, data["fixed_parzen"], precision=sim.matmul_precision())  # (K, B)
      joint = jnp.concatenate([joint, outside[..., None]], axis=-1)
      norm = jnp.broadcast_to(fixed_total, (k,))
    else:
      norm = jnp.maximum(total, 1e-12)
    joint = joint / norm[:, None, None]
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


_SAMPLED_KEYS = ("points", "values", "weights", "fixed_parzen")


def _mix32(x):
  # The "lowbias32" integer finaliser (two xor-shift-multiply rounds): every output bit depends on every input bit.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _step_indices(key, step, num, pool_size):
  """`num` indices into a pool of `pool_size` for one Adam step, drawn with replacement from a counter-based hash
  of the (uint32 pair) key, the step and the draw number. Elementwise integer arithmetic: `jax.random` on the CPU
  runs the threefry rounds as a rolled XLA loop, which took a quarter of a registration step. The modulo bias is
  below pool_size / 2³² (4e-6 for the default pool)."""
  key = key.astype(jnp.uint32)
  counter = jnp.arange(num, dtype=jnp.uint32) + jnp.uint32(num) * step.astype(jnp.uint32)
  x = _mix32(_mix32(counter ^ key[0]) ^ key[1])
  return (x % jnp.maximum(pool_size, 1).astype(jnp.uint32)).astype(jnp.int32)


def _optimise(params0, mirrors, data, hyper, opts: _LevelOptions):
  """Adam from (K, 6) params0 on one level; per candidate: (params, similarity, overlap, steps, converged).

  Each step draws `opts.samples` fixed samples anew from the level's pool (as elastix does), so that the optimum
  is not that of one particular sample; the result is the last iterate, and its similarity is measured on the
  whole pool. A candidate stops when a running mean of its loss has not improved for `patience` steps; the loop
  ends when all have.
  """
  optimiser = optax.scale_by_adam()
  scale = data["param_scale"]
  pool = {key: data[key] for key in _SAMPLED_KEYS if key in data}

  def total_loss(z, sample):
    losses = _losses(params0 + z * scale, mirrors, {**data, **sample}, opts)
    return jnp.sum(losses), losses  # candidates are independent: each one's gradient is its own

  grad_fn = jax.value_and_grad(total_loss, has_aux=True)
  z0 = jnp.zeros_like(params0)
  k = params0.shape[0]
  total = jnp.maximum(hyper["iterations"], 1).astype(jnp.float32)

  def cond(state):
    step, _, _, _, _, since, _ = state
    return (step < hyper["iterations"]) & jnp.any(since < hyper["patience"])

  def body(state):
    step, z, opt_state, avg_loss, best_avg, since, steps = state
    active = since < hyper["patience"]
    idx = _step_indices(data["key"], step, opts.samples, data["pool_size"])
    sample = {key: v[idx] for key, v in pool.items()}
    (_, loss), grad = grad_fn(z, sample)
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    avg_loss = jnp.where(step == 0, loss, 0.8 * avg_loss + 0.2 * loss)
    improved = (step == 0) | (avg_loss < best_avg - hyper["tolerance"] * jnp.maximum(jnp.abs(best_avg), 1e-6))
    best_avg = jnp.where(active & improved, avg_loss, best_avg)
    since = jnp.where(active & improved, 0, since + 1)
    # Cosine decay from learning_rate to learning_rate * final_fraction over the level's iterations.
    frac = hyper["final_fraction"]
    lr = hyper["learning_rate"] * (frac + (1 - frac) * 0.5 * (1 + jnp.cos(jnp.pi * step / total)))
    updates, opt_state = optimiser.update(grad, opt_state, z)
    z = jnp.where(active[:, None], z - lr * updates, z)
    return step + 1, z, opt_state, avg_loss, best_avg, since, steps + active.astype(jnp.int32)

  inf = jnp.full((k,), jnp.inf, jnp.float32)
  zeros = jnp.zeros((k,), jnp.int32)
  state = (jnp.int32(0), z0, optimiser.init(z0), inf, inf, zeros, zeros)
  _, z, _, _, _, since, steps = jax.lax.while_loop(cond, body, state)
  params = params0 + z * scale
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


@functools.partial(jax.jit, static_argnames=("opts",))
def _evaluate(mats, data, opts: _LevelOptions):
  """(similarity, overlap), each (B, K), of (B, K, 3, 3) matrices on pair-batched level data."""
  data = dict(data)
  if opts.similarity in ("mi", "nmi"):
    parzen = functools.partial(sim.parzen_weights, bins=opts.bins, kernel=opts.kernel)
    data["fixed_parzen"] = jax.vmap(parzen)(data["values"], data["fixed_range"])
  return jax.vmap(_similarities_of_matrices, in_axes=(0, 0, None))(mats, data, opts)


def check_percentiles(percentiles) -> tuple[float, float]:
  """`intensity_percentiles` as floats; ConfigError unless 0 <= low < high <= 100."""
  try:
    lo, hi = (float(v) for v in percentiles)
  except (TypeError, ValueError):
    raise errors.ConfigError(f"intensity_percentiles must be (low, high), got {percentiles!r}") from None
  if not 0.0 <= lo < hi <= 100.0:
    raise errors.ConfigError(f"intensity_percentiles must be (low, high) with 0 <= low < high <= 100, got "
                             f"{percentiles!r}")  # fmt: skip
  return lo, hi


def _range(values, weights, percentiles=(0.0, 100.0)):
  """The histogram's intensity range: these percentiles of the values of weight > 0.5 (values beyond fall in the
  end bins); a constant image gets (v, v + 1)."""
  sel = values[weights > 0.5]
  if sel.size == 0:
    return np.array([0.0, 1.0], np.float32)
  lo, hi = (float(v) for v in np.percentile(sel, percentiles))
  if hi <= lo:  # most values equal (a mask of ones): the full range instead
    lo, hi = float(sel.min()), float(sel.max())
  return np.array([lo, hi if hi > lo else lo + 1.0], np.float32)


def _level_data(pyr, num_points, moving_pad, fixed_px, moving_px, factors, center, radius, rng, percentiles):
  """Pair-batched level data (NumPy), padded to shapes that every level and many image shapes share:
  `num_points` fixed samples (zero weight beyond the level's own) and moving images padded to `moving_pad`."""
  f_img, f_mask, m_img, m_mask = pyr
  sf, sm = factors
  batch, h, w = f_img.shape
  lpf = (fixed_px[0] * sf, fixed_px[1] * sf)
  lpm = (moving_px[0] * sm, moving_px[1] * sm)
  n = h * w
  if n > num_points:
    # Draw where the fixed weight is positive (a mask may cover a small part of a large image), all pairs alike.
    support = np.flatnonzero(f_mask.max(axis=0).ravel() > 0)
    pool = support if support.size > num_points else np.arange(n)
    idx = np.sort(rng.choice(pool, size=num_points, replace=False))
  else:
    idx = np.arange(n)
  rows, cols = idx // w, idx % w
  pad = num_points - idx.size
  pool_size = np.full((batch,), idx.size, np.int32)
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
    "pool_size": pool_size,
    "values": values,
    "weights": weights,
    "fixed_range": np.stack([_range(v, wt, percentiles) for v, wt in zip(values, weights)]),
    "moving": np.stack([np.pad(m_img, pad_m), np.pad(m_mask, pad_m)], axis=-1),
    "moving_hw": np.broadcast_to(np.array([mh, mw], np.int32), (batch, 2)),
    "moving_range": np.stack([_range(m.ravel(), mm.ravel(), percentiles) for m, mm in zip(m_img, m_mask)]),
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


def _corner_distances_um(best: AffineTransform, others: Sequence[AffineTransform], corners: np.ndarray) -> np.ndarray:
  """For each other transform, the largest distance (fixed µm) at the corners between it and `best`."""
  inv = np.linalg.inv(np.asarray(best.matrix, np.float64))
  hom = np.concatenate([corners, np.ones((len(corners), 1))], axis=1)
  out = []
  for t in others:
    back = (inv @ np.asarray(t.matrix, np.float64) @ hom.T).T[:, :2]
    out.append(float(np.max(np.linalg.norm(back - corners, axis=1))))
  return np.asarray(out, np.float64)


_MISALIGN_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)


def _misaligned(matrix: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
  """(4·F + 2, 3, 3): the transform composed with shifts of the fixed space by each fraction F of its half-diagonal
  along ±x and ±y, and with turns of ±20° about its centre."""
  out = []
  for frac in _MISALIGN_FRACTIONS:
    d = radius * frac
    for dx, dy in ((d, 0), (-d, 0), (0, d), (0, -d)):
      s = np.eye(3)
      s[:2, 2] = (dx, dy)
      out.append(matrix @ s)
  for ang in (20.0, -20.0):
    a = math.radians(ang)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    s = np.eye(3)
    s[:2, :2] = r
    s[:2, 2] = center - r @ center
    out.append(matrix @ s)
  return np.stack(out)


# ------------------------------------------------------------------------------------------------------- public


def _prepare_stack(images, masks, name, min_pixels, first_pair=0):
  grey = np.stack([to_grey(im) for im in images])
  if masks is None:
    mask = np.ones(grey.shape, np.float32)
  else:
    mask = np.stack([np.asarray(m).astype(np.float32) for m in masks])
    if mask.shape != grey.shape:
      raise errors.ConfigError(f"{name} mask shape {mask.shape[1:]} != image shape {grey.shape[1:]}")
    for b, m in enumerate(mask):
      count = int(np.count_nonzero(m > 0))
      if 0 < count < min_pixels:
        raise errors.RegistrationError(
          f"the {name} mask of pair {first_pair + b} has {count} pixels (< {min_pixels}): too few to register")
  if not np.all(np.isfinite(grey)):
    raise errors.DataError(f"the {name} image has NaN or infinite values")
  return grey, mask


def _turn_class(c: Candidate) -> tuple[bool, int]:
  return c.mirrored, int(round(tf.rotation_deg(c.transform) / 90.0)) % 4


def _is_unturned(params_row: np.ndarray, mirror: np.ndarray) -> bool:
  rot = (float(params_row[0]) + math.pi) % (2 * math.pi) - math.pi
  return np.linalg.det(mirror[:2, :2]) > 0 and abs(rot) <= math.pi / 4


def _level_kind(config: RegistrationConfig, level: int, levels: int) -> str:
  """The transform family optimised at a level (0 = coarsest): `coarse_kind` below the finest level, when it has
  fewer parameters than `kind`."""
  order = {kind: i for i, kind in enumerate(("rigid", "similarity", "affine"))}
  coarse = config.coarse_kind
  if level > 0 or levels == 1 or coarse is None or order[coarse] >= order[config.kind]:
    return config.kind
  return coarse


def _repeat_finest(params, mirrors, make_data, hyper, opts, repeats):
  """The finest level run `repeats` times from the same candidates, each time on `make_data(rep)` (a pool and step
  draws of its own); the parameters' median over the runs, its similarity measured on the last run's pool."""
  runs = []
  for rep in range(repeats):
    data = make_data(rep)
    runs.append(_run_level(params, mirrors, data, hyper, opts))
  params = jnp.median(jnp.stack([r[0] for r in runs]), axis=0)
  metrics, overlaps = _evaluate(_matrices(params, mirrors, data["center"][0], opts.kind), data, opts)
  steps = sum(np.asarray(r[3]) for r in runs)
  converged = np.all(np.stack([np.asarray(r[4]) for r in runs]), axis=0)
  return params, metrics, overlaps, steps, converged, data


def _register_stack(fixed_list, moving_list, fixed_masks, moving_masks, fixed_px, moving_px, config, initial,
                    on_failure, first_pair=0):  # fmt: skip
  fixed_px = tf.pixel_size_yx(fixed_px, "fixed_pixel_size_um")
  moving_px = tf.pixel_size_yx(moving_px, "moving_pixel_size_um")
  fixed, fmask = _prepare_stack(fixed_list, fixed_masks, "fixed", config.min_mask_pixels, first_pair)
  moving, mmask = _prepare_stack(moving_list, moving_masks, "moving", config.min_mask_pixels, first_pair)
  if min(fixed.shape[1:]) < 4 or min(moving.shape[1:]) < 4:
    raise errors.ConfigError(f"images must be at least 4 × 4, got {fixed.shape[1:]} and {moving.shape[1:]}")
  batch = fixed.shape[0]
  center = np.asarray(tf.image_center_um(fixed.shape[1:], fixed_px), np.float64)
  levels = config.num_levels(_extent_px(fixed.shape[1:], moving.shape[1:], fixed_px, moving_px,
                                        config.working_pixel_size_um))  # fmt: skip
  factors = _shrink_factors(levels, fixed_px, moving_px, config.working_pixel_size_um)
  its = config.iterations_per_level(levels)
  if len(its) != levels:
    raise errors.ConfigError(f"max_iterations must be a positive int or {levels} of them (coarse → fine)")
  rng = np.random.default_rng(config.seed)
  fixed_pyr = [(_pyramid(im, [f for f, _ in factors]), _pyramid(m, [f for f, _ in factors]))
               for im, m in zip(fixed, fmask)]  # fmt: skip
  moving_pyr = [(_pyramid(im, [f for _, f in factors]), _pyramid(m, [f for _, f in factors]))
                for im, m in zip(moving, mmask)]  # fmt: skip
  pyramids = []
  for sf, sm in factors:
    f_img, m_img = np.stack([p[0][sf] for p in fixed_pyr]), np.stack([p[0][sm] for p in moving_pyr])
    if config.match_resolution:
      f_img, m_img = _match_resolution(f_img, m_img, _geo(fixed_px) * sf, _geo(moving_px) * sm)
    pyramids.append((f_img, np.stack([p[1][sf] for p in fixed_pyr]), m_img, np.stack([p[1][sm] for p in moving_pyr])))

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
          f"the {name} image of pair {first_pair + b} is constant or its mask is empty: nothing to register"
        )
    if initial is None:
      p, d = _initial_params(fw, mw, lpf0, lpm0, center, starts, config.moment_scale)
    else:
      m = np.asarray(initial.matrix, np.float64)
      d = _mirror_matrix(center) if np.linalg.det(m[:2, :2]) < 0 else np.eye(3)
      p = AffineTransform(jnp.asarray(m @ np.linalg.inv(d), jnp.float32)).to_params(center)
      p, d = np.asarray(p, np.float32)[None], np.asarray(d, np.float32)[None]
    params.append(p)
    mirrors.append(d)
  params, mirrors = jnp.asarray(np.stack(params)), jnp.asarray(np.stack(mirrors))
  order = np.broadcast_to(np.arange(len(starts)), (batch, len(starts)))

  # Every level and every image shape in a bucket share array shapes (sample count, padded moving image), so a
  # folder of differently shaped sections compiles once per number of candidates rather than once per shape.
  side = _bucket(max(max(p[2].shape[1:]) for p in pyramids))
  moving_pad = (side, side)
  radius = max(0.5 * math.hypot(fixed.shape[2] * fixed_px[1], fixed.shape[1] * fixed_px[0]), 1e-6)
  opts = _LevelOptions(config.similarity, config.kind, config.bins, config.kernel, config.outside_bin,
                       config.max_samples)
  iterations = []
  kinds = [_level_kind(config, level, levels) for level in range(levels)]
  for level, level_factors in enumerate(factors):
    if level > 0 and kinds[level] != kinds[level - 1]:  # start from what the last level found
      params = tf.constrain_params(params, kinds[level - 1])

    def make_data(rep, level=level, level_factors=level_factors):
      """The level's pool (a new draw from `rng` at each call) and its step keys (rep: a repeat of the level)."""
      data = _level_data(pyramids[level], config.sample_pool, moving_pad, fixed_px, moving_px, level_factors,
                         center, radius, rng, config.intensity_percentiles)  # fmt: skip
      data["key"] = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(
        config.seed * 1000 + 17 * level + b + 7919 * rep))) for b in range(batch)])  # fmt: skip
      return data

    hyper = {
      "iterations": jnp.int32(its[level]),
      "patience": jnp.int32(config.patience),
      "tolerance": jnp.float32(config.tolerance),
      "learning_rate": jnp.float32(config.learning_rate),
      "final_fraction": jnp.float32(config.final_learning_rate_fraction),
    }
    samples = config.coarsest_samples if level == 0 and config.coarsest_samples else config.max_samples
    level_opts = opts._replace(kind=kinds[level], samples=samples)
    if level == levels - 1 and config.finest_repeats > 1:
      params, metrics, overlaps, steps, converged, data = _repeat_finest(params, mirrors, make_data, hyper, level_opts,
                                                                         config.finest_repeats)  # fmt: skip
    else:
      data = make_data(0)
      params, metrics, overlaps, steps, converged = _run_level(params, mirrors, data, hyper, level_opts)
    iterations.append(np.asarray(steps))
    if level == 0 and params.shape[1] > config.num_candidates:
      score = np.asarray(metrics) if config.similarity == "mse" else -np.asarray(metrics)
      rank = np.argsort(np.where(np.isfinite(score), score, np.inf), axis=1, kind="stable")
      keep = rank[:, : config.num_candidates].copy()
      # Keep the best unturned candidate too, so that a turn has to beat it at the finest level.
      p_np, d_np = np.asarray(params), np.asarray(mirrors)
      for b in range(batch):
        flat = [k for k in rank[b] if _is_unturned(p_np[b, k], d_np[b, k])]
        if flat and flat[0] not in keep[b]:
          keep[b, -1] = flat[0]
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
  limit_um = config.uncertainty_warn_px * math.sqrt(fixed_px[0] * fixed_px[1])
  higher_better = config.similarity != "mse"
  matrices = np.asarray(_matrices(jnp.asarray(params), jnp.asarray(mirrors, jnp.float32),
                                  jnp.asarray(center, jnp.float32), config.kind))  # fmt: skip
  chosen, cand_lists = [], []
  for b in range(batch):
    score = -metrics[b] if higher_better else metrics[b]
    rank = np.argsort(np.where(np.isfinite(score), score, np.inf), kind="stable")
    cands = []
    for k in rank:
      t = AffineTransform(jnp.asarray(matrices[b, k]))
      s = starts[order[b, k]]
      cands.append(Candidate(transform=t, metric=float(metrics[b, k]), start=s.label, mirrored=s.mirrored))
    pick, ambiguous = 0, False
    margin_of = lambda ref: config.turn_margin * max(abs(ref), 1e-12)  # noqa: E731
    if cands[0].turned and np.isfinite(cands[0].metric):
      flat = [i for i, c in enumerate(cands) if not c.turned and np.isfinite(c.metric)]
      if flat:
        gap = (cands[0].metric - cands[flat[0]].metric) * (1 if higher_better else -1)
        if gap <= margin_of(cands[flat[0]].metric):
          pick, ambiguous = flat[0], True
    if not ambiguous:
      others = [c for c in cands[1:] if _turn_class(c) != _turn_class(cands[0]) and np.isfinite(c.metric)]
      if others and abs(cands[0].metric - others[0].metric) <= margin_of(cands[0].metric):
        ambiguous = True
    cands.insert(0, cands.pop(pick))
    chosen.append((rank[pick], ambiguous))
    cand_lists.append(cands)

  # The success test: the same pair misaligned, on the finest level's sample.
  moving_radius = 0.5 * math.hypot(moving.shape[2] * moving_px[1], moving.shape[1] * moving_px[0])
  mats = []
  for c in cand_lists:
    m = np.asarray(c[0].transform.matrix, np.float64)
    scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))
    mats.append(np.concatenate([m[None], _misaligned(m, center, min(radius, moving_radius / max(scale, 1e-12)))]))
  mats = np.stack(mats)
  # MI/NMI with the outside bin here whatever the optimisation used: a shift that moves tissue out of the field then
  # costs what it loses, so a true alignment stands out as sharply as in the verdict's calibration.
  mis_values, _ = _evaluate(jnp.asarray(mats, jnp.float32), data, opts._replace(outside_bin=True))
  mis_values = np.asarray(mis_values, np.float64)
  fixed_area = fmask.reshape(batch, -1).sum(axis=1) * fixed_px[0] * fixed_px[1]
  moving_area = mmask.reshape(batch, -1).sum(axis=1) * moving_px[0] * moving_px[1]

  results = []
  for b in range(batch):
    cands = cand_lists[b]
    best_k, turn_ambiguous = chosen[b]
    best = cands[0]
    problem = None if np.isfinite(best.metric) else "the similarity is not finite"
    problem = problem or _check_transform(best.transform, mirrors[b, best_k], config)
    if problem is not None:
      msg = (f"registration of pair {first_pair + b} refused: {problem} (start {best.start}, "
             f"{config.similarity} {best.metric:.4g})")  # fmt: skip
      if on_failure == "raise":
        raise errors.RegistrationError(msg)
      _log.warning(msg)
      results.append(None)
      continue
    dist = _corner_distances_um(best.transform, [c.transform for c in cands[1:]], corners)
    margin = config.candidate_margin * max(abs(best.metric), 1e-12)
    close = [d for c, d in zip(cands[1:], dist) if abs(c.metric - best.metric) <= margin and d > limit_um]
    uncertainty = max(close, default=0.0)
    agreement = (1 + int(np.sum(dist <= limit_um))) / len(cands)
    at_result = float(mis_values[b][0])
    per = mis_values[b][1 : 1 + 4 * len(_MISALIGN_FRACTIONS)].reshape(len(_MISALIGN_FRACTIONS), 4).mean(axis=1)
    mis = float(per[0])
    if higher_better:
      gain = 1.0 - mis / at_result if at_result > 0 else -np.inf
    else:
      gain = 1.0 - at_result / mis if mis > 0 else 0.0
    overlap = float(overlaps[b, best_k])
    det = abs(float(np.linalg.det(np.asarray(best.transform.matrix, np.float64)[:2, :2])))
    moving_overlap = min(1.0, overlap * fixed_area[b] * det / max(moving_area[b], 1e-12))
    notes, failures = [], []
    if config.similarity in ("mi", "nmi") and gain < config.min_gain:
      failures.append(f"the {config.similarity} is only {gain:.1%} above that of the same pair misaligned "
                      f"(< {config.min_gain:.0%}): the images may be unrelated or the optimum wrong")  # fmt: skip
    if max(overlap, moving_overlap) < config.fail_overlap:
      failures.append(f"the images barely overlap ({overlap:.1%} of the fixed, {moving_overlap:.1%} of the moving)")
    success = not failures
    if failures:
      notes.append("registration failed: " + "; ".join(failures))
    if uncertainty > limit_um:
      notes.append(f"uncertain registration: candidates within {config.candidate_margin:.0%} of the best "
                   f"{config.similarity} disagree by up to {uncertainty:.1f} µm at the image corners "
                   f"(> {limit_um:.1f} µm)")  # fmt: skip
    if turn_ambiguous:
      notes.append(f"turn or mirror ambiguous: candidates of another orientation score within "
                   f"{config.turn_margin:.0%}; chose {best.start!r} (unturned preferred)")  # fmt: skip
    if not bool(converged[b, best_k]):
      _log.info("finest level stopped at its iteration limit (%d steps)", its[-1])
    if success and max(overlap, moving_overlap) < config.min_overlap:
      notes.append(f"only {overlap:.0%} of the fixed image maps inside the moving image "
                   f"and {moving_overlap:.0%} of the moving image is covered")  # fmt: skip
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
        uncertainty_um=float(uncertainty),
        overlap=overlap,
        start=best.start,
        warnings=tuple(notes),
        fixed_shape=tuple(int(v) for v in fixed.shape[1:]),
        moving_shape=tuple(int(v) for v in moving.shape[1:]),
        fixed_pixel_size_um=fixed_px,
        moving_pixel_size_um=moving_px,
        success=success,
        gain=float(gain),
        moving_overlap=float(moving_overlap),
        agreement=float(agreement),
        turn_ambiguous=bool(turn_ambiguous),
        notes={"levels": levels, "mean_misaligned_metric": mis,
               "misaligned_by_fraction": [float(v) for v in per]},
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


def _vmap_pairs() -> bool:
  """Whether `register_batch` maps its level functions over the pairs (on an accelerator) or runs them in turn."""
  return jax.default_backend() != "cpu"


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
  """Registers many same-shape pairs: at once (`jax.vmap` over pairs) on an accelerator, one after the other on a
  CPU (where that is faster); pair i gives what `register` would.

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
  fixed_list, moving_list = list(fixed_stack), list(moving_stack)
  fixed_masks = None if fixed_masks is None else list(fixed_masks)
  moving_masks = None if moving_masks is None else list(moving_masks)

  def run(pairs: slice) -> list[RegistrationResult | None]:
    return _register_stack(fixed_list[pairs], moving_list[pairs], None if fixed_masks is None else fixed_masks[pairs],
                           None if moving_masks is None else moving_masks[pairs], fixed_pixel_size_um,
                           moving_pixel_size_um, config, None, on_failure, first_pair=pairs.start or 0)  # fmt: skip

  if _vmap_pairs():
    return run(slice(None))
  # On a CPU the pairs' arithmetic is the cost and a vmapped level runs slower than the pairs one by one
  # (docs/results.md, section 10), so the pairs go through the single-pair path in turn.
  return [result for b in range(len(fixed_list)) for result in run(slice(b, b + 1))]


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache, so that a new process reuses the registration's compiled
  level functions rather than compiling them again (the cold start of a command-line run).

  Args:
    path: cache folder; default `$MSISYNTH_JAX_CACHE` or `~/.cache/msisynth/jax`.

  Returns:
    The cache folder.
  """
  import os

  folder = path or os.environ.get("MSISYNTH_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                          "msisynth", "jax")  # fmt: skip
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder


def tissue_crop(histology: np.ndarray, *, margin_px: float = 0.0, max_fraction: float = 0.6) -> tuple[int, ...] | None:
  """The part of a histology image that holds its tissue: (row0, row1, col0, col1), or None to keep it all.

  The tissue is found by `msisynth.tissue.tissue_crop` (the section's components, with labels, pen, debris and
  slide edges left out); its box is grown by 15 % of its size and by `margin_px` on every side. None when the
  image is not RGB, shows no tissue, or the crop would keep more than `max_fraction` of the image.

  Args:
    histology: (H, W, 3) RGB histology (float in [0, 1] or uint8).
    margin_px: extra margin in histology pixels (e.g. half the MSI field).
    max_fraction: largest fraction of the image area worth cropping to.
  """
  from msisynth import tissue as msi_tissue

  img = np.asarray(histology)
  if img.ndim != 3 or img.shape[2] < 3:
    return None
  img = img[..., :3]
  if img.dtype != np.uint8:
    img = np.clip(np.asarray(img, np.float32), 0.0, 1.0)
  h, w = img.shape[:2]
  try:
    found = msi_tissue.tissue_crop(img, pixel_size_um=1.0, margin_um=0.0)
  except errors.MSISynthError:  # no tissue found
    return None
  r0, c0, r1, c1 = found.box_px
  gr, gc = 0.15 * (r1 - r0) + margin_px, 0.15 * (c1 - c0) + margin_px
  r0, r1 = max(0, int(r0 - gr)), min(h, int(math.ceil(r1 + gr)))
  c0, c1 = max(0, int(c0 - gc)), min(w, int(math.ceil(c1 + gc)))
  if (r1 - r0) * (c1 - c0) > max_fraction * h * w:
    return None
  return r0, r1, c0, c1


def _translation_grid(fixed_mask_or_image, fixed_px, moving_extent_um, limit=3):
  """Shifts (µm) of the fixed centre of mass spread over the fixed tissue, when the moving field is small."""
  weights = np.asarray(fixed_mask_or_image, np.float64)
  rows, cols = np.nonzero(weights > 0)
  if rows.size == 0:
    return ((0.0, 0.0),)
  ys, xs = rows * fixed_px[0], cols * fixed_px[1]
  com = np.array([np.average(xs, weights=weights[rows, cols]), np.average(ys, weights=weights[rows, cols])])
  out = []
  axes = []
  for lo, hi, extent in ((xs.min(), xs.max(), moving_extent_um[0]), (ys.min(), ys.max(), moving_extent_um[1])):
    span = hi - lo
    n = int(min(limit, max(1, math.ceil(span / max(extent, 1e-9) - 0.2))))
    axes.append(np.linspace(lo + span / (2 * n), hi - span / (2 * n), n) if n > 1 else np.array([(lo + hi) / 2]))
  if len(axes[0]) == 1 and len(axes[1]) == 1:
    return ((0.0, 0.0),)
  for y in axes[1]:
    for x in axes[0]:
      out.append((float(x - com[0]), float(y - com[1])))
  return tuple(out)


def register_msi_to_histology(
  histology: jax.typing.ArrayLike,
  synthetic_he: jax.typing.ArrayLike,
  *,
  histology_pixel_size_um,
  msi_pixel_size_um,
  histology_mask: jax.typing.ArrayLike | None = None,
  msi_mask: jax.typing.ArrayLike | None = None,
  config: RegistrationConfig | None = None,
  crop_to_tissue: bool = True,
  pixel_size_uncertain: bool = False,
) -> RegistrationResult:
  """Registers an MSI image (synthetic H&E, or an image made from the MSI, on the MSI grid; moving) to histology
  (fixed), allowing flips and 90° turns.

  The default configuration differs from `register`'s: `flips_and_rot90=True` (a section may be mounted turned or
  face down), and `working_pixel_size_um` from `msisynth.geometry.working_pixel_size_um` (a quarter of the MSI
  pixel, never finer than the histology; the rule `msisynth.pipeline` uses). Before registering:
  - with `crop_to_tissue` (default) and RGB histology, the histology is cropped to its tissue (`tissue_crop`:
    the largest tissue components, with labels, debris and slide edges left out), so that a small section on a
    large slide fills the field; the crop is in `result.notes["tissue_crop"]` and the returned transform maps
    the whole histology's µm (as if not cropped);
  - when the MSI field is smaller than the histology's tissue, the starts are also tried at up to 3 × 3 positions
    spread over the tissue (`start_offsets_um`), so that the MSI region can be found anywhere on it;
  - with `pixel_size_uncertain`, the starts also search the scale: from the ratio of the two images' spreads
    (`moment_scale`) times 0.7, 1 and 1.4, with scales from 0.05 to 20 accepted.
  Carry the MSI with `warp_msi(msi, result.transform, histology.shape[:2], histology_pixel_size_um)`.

  Args:
    histology: (H, W, 3) RGB (or grey) histology, fixed.
    synthetic_he: (h, w, 3) synthetic H&E, or (h, w) an MSI image (TIC, an ion, a principal component), moving.
    histology_pixel_size_um: histology pixel size, float or (y, x).
    msi_pixel_size_um: MSI pixel size, float or (y, x).
    histology_mask: optional tissue mask on the histology grid.
    msi_mask: optional measured-pixel mask on the MSI grid (the region of interest the MSI was acquired in).
    config: options replacing the defaults above (the crop, translation and scale searches still apply).
    crop_to_tissue: crop the histology to its tissue first (see above).
    pixel_size_uncertain: search the scale too (see above).

  Returns:
    A `RegistrationResult` whose transform maps histology µm → MSI µm.

  Raises:
    ConfigError, DataError, RegistrationError: see `register`.
  """
  py, px = tf.pixel_size_yx(msi_pixel_size_um, "msi_pixel_size_um")
  hy, hx = tf.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  if config is None:
    working = max(geometry.working_pixel_size_um(msi_pixel_size_um, histology_pixel_size_um))
    config = RegistrationConfig(flips_and_rot90=True, working_pixel_size_um=working)
  histology = np.asarray(histology)
  moving = np.asarray(synthetic_he)
  notes = {}
  crop = None
  if crop_to_tissue:
    msi_extent_px = 0.5 * max(moving.shape[0] * py / hy, moving.shape[1] * px / hx)
    crop = tissue_crop(histology, margin_px=0.25 * msi_extent_px)
  full_shape = histology.shape[:2]
  if crop is not None:
    r0, r1, c0, c1 = crop
    histology = histology[r0:r1, c0:c1]
    if histology_mask is not None:
      histology_mask = np.asarray(histology_mask)[r0:r1, c0:c1]
    notes["tissue_crop"] = {"rows": [r0, r1], "cols": [c0, c1]}
  changes = {}
  if pixel_size_uncertain:
    changes.update(moment_scale=True, start_scales=(0.7, 1.0, 1.4), min_scale=min(config.min_scale, 0.05),
                   max_scale=max(config.max_scale, 20.0))  # fmt: skip
    notes["scale_search"] = True
  if tuple(config.start_offsets_um) == ((0.0, 0.0),):
    moving_extent = (moving.shape[1] * px, moving.shape[0] * py)
    if histology_mask is not None:
      weights = np.asarray(histology_mask, np.float64)
    else:
      from msisynth.io.histology import tissue_mask

      rgb = histology[..., :3] if histology.ndim == 3 and histology.shape[2] >= 3 else None
      if rgb is not None and rgb.dtype != np.uint8:
        rgb = np.clip(rgb.astype(np.float32), 0.0, 1.0)
      weights = tissue_mask(rgb) if rgb is not None else np.ones(histology.shape[:2])
    offsets = _translation_grid(weights, (hy, hx), moving_extent)
    if len(offsets) > 1:
      changes.update(start_offsets_um=offsets, principal_axes=False)
      notes["translation_search_starts"] = len(offsets)
  if changes:
    config = dataclasses.replace(config, **changes)
  result = register(histology, moving, fixed_pixel_size_um=(hy, hx), moving_pixel_size_um=(py, px),
                    fixed_mask=histology_mask, moving_mask=msi_mask, config=config)  # fmt: skip
  if crop is None:
    return dataclasses.replace(result, notes={**result.notes, **notes})
  # The crop's pixel (0, 0) is the full image's (r0, c0): x_crop = x_full - offset.
  shift = np.eye(3)
  shift[:2, 2] = (-crop[2] * hx, -crop[0] * hy)

  def uncrop(t):
    return AffineTransform(jnp.asarray(np.asarray(t.matrix, np.float64) @ shift, jnp.float32))

  cands = tuple(dataclasses.replace(c, transform=uncrop(c.transform)) for c in result.candidates)
  return dataclasses.replace(result, transform=cands[0].transform, candidates=cands, fixed_shape=tuple(full_shape),
                             notes={**result.notes, **notes})  # fmt: skip


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
    "success": result.success,
    "gain": result.gain,
    "moving_overlap": result.moving_overlap,
    "agreement": result.agreement,
    "turn_ambiguous": result.turn_ambiguous,
    "notes": result.notes,
    "candidates": [
      {"metric": c.metric, "start": c.start, "matrix": np.asarray(c.transform.matrix, np.float64).tolist()}
      for c in result.candidates
    ],
  }
