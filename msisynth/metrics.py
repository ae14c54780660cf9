"""Image similarity metrics for evaluating synthetic histology: MI (bits), normalised MI, SSIM and PSNR.

Layout: images are (H, W) or (H, W, C), or a batch (B, H, W, C); a batch gives one value per image. Histology
RGB is float32 in [0, 1] (see docs/architecture.md), so `max_val` defaults to 1.0. Every metric takes an
optional `mask`, (H, W) or (B, H, W), True where a pixel counts (for instance the tissue), and is a pure
function: `jax.typing.ArrayLike` in, `jax.Array` out, usable under `jax.jit` with the keyword options static.

The histogram measures (`mutual_information`, `normalized_mutual_information`) compare grey levels: an RGB
input is converted to luminance first with the ITU-R BT.709 weights that `skimage.color.rgb2gray` uses,
Y = 0.2125 R + 0.7154 G + 0.0721 B. These are evaluation metrics on hard-binned histograms; the
differentiable (Parzen window) MI that drives registration lives in `msisynth.register.similarity`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import chex
import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from msisynth import errors

# ITU-R BT.709 luma weights, as in skimage.color.rgb2gray.
LUMINANCE_WEIGHTS = (0.2125, 0.7154, 0.0721)

# SSIM window of Wang et al. (2004): an 11 x 11 Gaussian with sigma 1.5 (what skimage's gaussian_weights=True
# with sigma=1.5 and the default truncate=3.5 gives).
SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5


def _as_batch(x: jax.typing.ArrayLike, name: str) -> tuple[jax.Array, bool]:
  """Returns `x` as a float32 (B, H, W, C) batch and whether the input was a batch."""
  x = jnp.asarray(x)
  chex.assert_rank(x, {2, 3, 4}, custom_message=f"{name} must be (H, W), (H, W, C) or (B, H, W, C)")
  batched = x.ndim == 4
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim == 3:
    x = x[None]
  return x.astype(jnp.float32), batched


def _as_batch_mask(mask: jax.typing.ArrayLike | None, shape: Sequence[int]) -> jax.Array:
  """Returns `mask` as bool (B, H, W) for images of batch shape `shape` = (B, H, W, C); all True when None."""
  b, h, w = shape[:3]
  if mask is None:
    return jnp.ones((b, h, w), dtype=bool)
  mask = jnp.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1 and mask.shape[:2] == (h, w):
    mask = mask[..., 0]
  if mask.shape not in ((h, w), (b, h, w)):
    raise errors.ConfigError(f"mask shape {mask.shape} fits neither the image (H, W) = {(h, w)} nor {(b, h, w)}")
  return jnp.broadcast_to(mask.astype(bool), (b, h, w))


def _unbatch(values: jax.Array, batched: bool) -> jax.Array:
  return values if batched else values[0]


def _check_pair(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array, bool]:
  chex.assert_equal_shape([a, b], custom_message="the two images must have the same shape")
  a, batched = _as_batch(a, "a")
  b, _ = _as_batch(b, "b")
  return a, b, batched


def to_grey(image: jax.typing.ArrayLike) -> jax.Array:
  """Converts (..., H, W, C) images to grey levels (..., H, W).

  One channel is returned as it is; three channels (RGB) become their luminance
  Y = 0.2125 R + 0.7154 G + 0.0721 B (ITU-R BT.709, as `skimage.color.rgb2gray`).

  Args:
    image: (..., H, W, 1) or (..., H, W, 3) float array.

  Returns:
    The (..., H, W) grey-level image, float32.

  Raises:
    ConfigError: when the image has neither 1 nor 3 channels.
  """
  image = jnp.asarray(image, dtype=jnp.float32)
  if image.shape[-1] == 1:
    return image[..., 0]
  if image.shape[-1] == 3:
    return image @ jnp.asarray(LUMINANCE_WEIGHTS, dtype=jnp.float32)
  raise errors.ConfigError(
    f"histogram metrics need grey-level (1 channel) or RGB (3 channels) images, got {image.shape[-1]} channels"
  )


def _bin_index(x: jax.Array, mask: jax.Array, bins: int, value_range: tuple[float, float] | None) -> jax.Array:
  """Bin of each pixel of one (H, W) image, over `value_range` or the min/max of the pixels inside `mask`.

  Bins are equal-width and half-open except the last, which holds its upper edge (as `numpy.histogram`);
  values outside `value_range` fall into the end bins.
  """
  if value_range is None:
    lo = jnp.min(jnp.where(mask, x, jnp.inf))
    hi = jnp.max(jnp.where(mask, x, -jnp.inf))
  else:
    lo, hi = (jnp.float32(v) for v in value_range)
  width = hi - lo
  # A constant image (zero width) puts every pixel in bin 0.
  scale = jnp.where(width > 0, bins / jnp.where(width > 0, width, 1.0), 0.0)
  index = jnp.floor((x - lo) * scale)
  return jnp.clip(index, 0, bins - 1).astype(jnp.int32)


def _joint_histogram(
  a: jax.Array, b: jax.Array, mask: jax.Array, bins: int, value_range: tuple[float, float] | None
) -> jax.Array:
  """Joint probability table (bins, bins) of two (H, W) grey images over the pixels inside `mask`."""
  ia = _bin_index(a, mask, bins, value_range)
  ib = _bin_index(b, mask, bins, value_range)
  counts = jnp.bincount((ia * bins + ib).ravel(), weights=mask.ravel().astype(jnp.float32), length=bins * bins)
  total = jnp.sum(counts)
  # An empty mask gives a table of NaN, hence NaN metrics, rather than a division error.
  return (counts / jnp.where(total > 0, total, jnp.nan)).reshape(bins, bins)


def _entropy_bits(p: jax.Array) -> jax.Array:
  """Shannon entropy in bits of the probability table `p` (any shape), with 0 log 0 = 0."""
  safe = jnp.where(p > 0, p, 1.0)
  # NaN (from an empty mask) is kept so that it reaches the result.
  return -jnp.sum(jnp.where(p > 0, p * jnp.log2(safe), jnp.where(jnp.isnan(p), jnp.nan, 0.0)))


def _marginal_and_joint_entropies(p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return _entropy_bits(jnp.sum(p, axis=1)), _entropy_bits(jnp.sum(p, axis=0)), _entropy_bits(p)


def _check_histogram_options(bins: int, value_range) -> tuple[float, float] | None:
  if not isinstance(bins, (int, np.integer)) or bins < 2:
    raise errors.ConfigError(f"bins must be an integer >= 2, got {bins!r}")
  if value_range is None:
    return None
  if len(value_range) != 2 or not float(value_range[1]) > float(value_range[0]):
    raise errors.ConfigError(f"value_range must be (low, high) with high > low, got {value_range!r}")
  return float(value_range[0]), float(value_range[1])


@functools.partial(jax.jit, static_argnames=("bins", "value_range", "normalized"))
def _histogram_metric(a, b, mask, *, bins, value_range, normalized):
  def one(a_i, b_i, m_i):
    h_a, h_b, h_ab = _marginal_and_joint_entropies(_joint_histogram(a_i, b_i, m_i, bins, value_range))
    # MI >= 0; the clamp removes float32 rounding below zero (a constant image gives exactly 0).
    return (h_a + h_b) / h_ab if normalized else jnp.maximum(h_a + h_b - h_ab, 0.0)

  return jax.vmap(one)(to_grey(a), to_grey(b), mask)


def _histogram_metric_of(a, b, mask, bins, value_range, *, normalized: bool) -> jax.Array:
  """MI (or NMI when `normalized`) of two images or batches after the checks of the public functions."""
  value_range = _check_histogram_options(bins, value_range)
  a, b, batched = _check_pair(a, b)
  mask = _as_batch_mask(mask, a.shape)
  values = _histogram_metric(a, b, mask, bins=int(bins), value_range=value_range, normalized=normalized)
  return _unbatch(values, batched)


def mutual_information(
  a: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  *,
  bins: int = 32,
  mask: jax.typing.ArrayLike | None = None,
  value_range: tuple[float, float] | None = None,
) -> jax.Array:
  """Mutual information in bits between the grey levels of two images, from their joint histogram.

  MI(A, B) = H(A) + H(B) - H(A, B), with the entropies (base 2) of a `bins` x `bins` joint histogram of equal-
  width bins. RGB images are compared by luminance (see the module docstring), so MI of an image with itself is
  the entropy of its grey-level histogram. This is the evaluation metric used to compare synthetic and real
  H&E; it is not differentiable.

  Args:
    a: first image, (H, W), (H, W, C) or (B, H, W, C) with C = 1 or 3.
    b: second image, the same shape as `a`.
    bins: number of histogram bins per image.
    mask: optional (H, W) or (B, H, W) boolean mask; only pixels where it is True are counted.
    value_range: (low, high) of the bins for both images (for instance (0, 1) for histology); values outside
      fall in the end bins. When None, each image's bins span its own minimum to maximum inside the mask
      (as `numpy.histogram2d` does).

  Returns:
    MI in bits: a scalar, or (B,) for a batch. NaN when the mask is empty.

  Raises:
    ConfigError: for a bad `bins`, `value_range`, channel count or mask shape.
  """
  return _histogram_metric_of(a, b, mask, bins, value_range, normalized=False)


def normalized_mutual_information(
  a: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  *,
  bins: int = 100,
  mask: jax.typing.ArrayLike | None = None,
  value_range: tuple[float, float] | None = None,
) -> jax.Array:
  """Normalised mutual information (H(A) + H(B)) / H(A, B) of the grey levels of two images (Studholme 1999).

  The definition and the default of 100 bins are those of `skimage.metrics.normalized_mutual_information`: it
  runs from 1 (independent) to 2 (one image a function of the other) and does not depend on the log base.
  RGB images are compared by luminance (see the module docstring).

  Args:
    a: first image, (H, W), (H, W, C) or (B, H, W, C) with C = 1 or 3.
    b: second image, the same shape as `a`.
    bins: number of histogram bins per image.
    mask: optional (H, W) or (B, H, W) boolean mask; only pixels where it is True are counted.
    value_range: (low, high) of the bins for both images; None spans each image's own minimum to maximum.

  Returns:
    NMI: a scalar, or (B,) for a batch. NaN when the mask is empty or both images are constant.

  Raises:
    ConfigError: for a bad `bins`, `value_range`, channel count or mask shape.
  """
  return _histogram_metric_of(a, b, mask, bins, value_range, normalized=True)


@functools.partial(jax.jit, static_argnames=("max_val",))
def _masked_ssim(a, b, mask, *, max_val):
  ssim_map = dm_pix.ssim(
    a, b, max_val=max_val, filter_size=SSIM_FILTER_SIZE, filter_sigma=SSIM_FILTER_SIGMA, return_map=True
  )
  # dm_pix keeps only windows lying wholly inside the image: the map is (B, H - 10, W - 10, C), indexed by the
  # window's top-left corner. A window counts when all its pixels are inside the mask, so pixels outside the
  # mask never change the value.
  inside = jax.lax.reduce_window(
    mask.astype(jnp.float32), 1.0, jax.lax.min, (1, SSIM_FILTER_SIZE, SSIM_FILTER_SIZE), (1, 1, 1), "VALID"
  )
  weights = inside[..., None] * jnp.ones_like(ssim_map)
  return jnp.sum(ssim_map * weights, axis=(1, 2, 3)) / jnp.sum(weights, axis=(1, 2, 3))


def ssim(
  a: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  *,
  max_val: float = 1.0,
  mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Structural similarity (Wang et al. 2004) with an 11 x 11 Gaussian window of sigma 1.5, via `dm_pix.ssim`.

  The value is the mean of the SSIM map over windows lying wholly inside the image, averaged over channels:
  the same as `skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=max_val, channel_axis=-1)`. With a mask, only windows whose 121
  pixels all lie inside the mask are averaged, so pixels outside the mask never affect the result.

  Args:
    a: first image, (H, W), (H, W, C) or (B, H, W, C), H and W at least 11.
    b: second image, the same shape as `a`.
    max_val: the data range (1.0 for images in [0, 1]; 2.0 for network tensors in [-1, 1]).
    mask: optional (H, W) or (B, H, W) boolean mask.

  Returns:
    SSIM: a scalar, or (B,) for a batch. NaN when no whole window fits inside the mask.

  Raises:
    ConfigError: when the image is smaller than the window or the mask shape does not fit.
  """
  a, b, batched = _check_pair(a, b)
  if min(a.shape[1:3]) < SSIM_FILTER_SIZE:
    raise errors.ConfigError(
      f"SSIM needs images of at least {SSIM_FILTER_SIZE} x {SSIM_FILTER_SIZE}, got {a.shape[1:3]}"
    )
  mask = _as_batch_mask(mask, a.shape)
  return _unbatch(_masked_ssim(a, b, mask, max_val=float(max_val)), batched)


@functools.partial(jax.jit, static_argnames=("max_val",))
def _masked_psnr(a, b, mask, *, max_val):
  weights = mask[..., None].astype(jnp.float32) * jnp.ones_like(a)
  mse = jnp.sum(jnp.square(a - b) * weights, axis=(1, 2, 3)) / jnp.sum(weights, axis=(1, 2, 3))
  return 10.0 * jnp.log10(max_val**2 / mse)


def psnr(
  a: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  *,
  max_val: float = 1.0,
  mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Peak signal-to-noise ratio in dB, 10 log10(max_val**2 / MSE), the MSE over all channels of masked pixels.

  Args:
    a: first image, (H, W), (H, W, C) or (B, H, W, C).
    b: second image, the same shape as `a`.
    max_val: the data range (1.0 for images in [0, 1]).
    mask: optional (H, W) or (B, H, W) boolean mask.

  Returns:
    PSNR in dB: a scalar, or (B,) for a batch. +inf for identical images, NaN for an empty mask.

  Raises:
    ConfigError: when the mask shape does not fit.
  """
  a, b, batched = _check_pair(a, b)
  mask = _as_batch_mask(mask, a.shape)
  return _unbatch(_masked_psnr(a, b, mask, max_val=float(max_val)), batched)


# ------------------------------------------------------------------------------------------ bias-corrected MI

# The fewest pixels per joint-histogram cell (on average) for which a hard-histogram MI is computed at all. Below
# about 4 pixels per cell the plug-in MI is dominated by its bias (for independent images it is about
# (bins - 1)² / (2 N ln 2) bits); `mutual_information_corrected` refuses such regions instead of reporting bias.
MIN_PIXELS_PER_CELL = 4.0

MI_CORRECTIONS = ("miller_madow", "permutation", "none")


def mi_min_pixels(bins: int, pixels_per_cell: float = MIN_PIXELS_PER_CELL) -> int:
  """The fewest masked pixels `mutual_information_corrected` accepts for a `bins` x `bins` joint histogram."""
  return int(math.ceil(pixels_per_cell * bins * bins))


def _histogram_counts(a: np.ndarray, b: np.ndarray, bins: int, value_range) -> np.ndarray:
  """Joint counts (bins, bins) of two 1-D float arrays, equal-width bins as `_bin_index` (end bins hold outliers)."""

  def index(x):
    lo, hi = (float(x.min()), float(x.max())) if value_range is None else value_range
    width = hi - lo
    if width <= 0:
      return np.zeros(x.shape, np.int64)
    return np.clip(np.floor((x - lo) * (bins / width)), 0, bins - 1).astype(np.int64)

  return np.bincount(index(a) * bins + index(b), minlength=bins * bins).reshape(bins, bins).astype(np.float64)


def _plugin_mi_bits(counts: np.ndarray) -> float:
  n = counts.sum()
  p = counts / n

  def h(q):
    q = q[q > 0]
    return float(-np.sum(q * np.log2(q)))

  return h(p.sum(axis=1)) + h(p.sum(axis=0)) - h(p)


def _miller_madow_bits(counts: np.ndarray) -> float:
  """The Miller–Madow bias of the plug-in MI in bits: [(m_ab − 1) − (m_a − 1) − (m_b − 1)] / (2 N ln 2).

  Each plug-in entropy falls short by (m − 1) / (2 N ln 2) bits, m its number of occupied cells; MI = H_a + H_b −
  H_ab therefore exceeds its target by this amount.
  """
  n = counts.sum()
  m_a = np.count_nonzero(counts.sum(axis=1))
  m_b = np.count_nonzero(counts.sum(axis=0))
  m_ab = np.count_nonzero(counts)
  return float(((m_ab - 1) - (m_a - 1) - (m_b - 1)) / (2.0 * n * math.log(2.0)))


def mutual_information_corrected(
  a: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  *,
  bins: int = 16,
  mask: jax.typing.ArrayLike | None = None,
  value_range: tuple[float, float] | None = (0.0, 1.0),
  correction: str = "miller_madow",
  n_permutations: int = 20,
  seed: int = 0,
  pixels_per_cell: float = MIN_PIXELS_PER_CELL,
  where: str = "",
) -> dict[str, float]:
  """Bias-corrected mutual information in bits between the grey levels of two images (one pair, not a batch).

  The plug-in MI of a `bins` x `bins` hard histogram over N pixels overestimates the true MI by about
  (bins − 1)² / (2 N ln 2) bits for independent images: on a 32 × 32-bin histogram of 700 pixels that is 0.99 bits,
  larger than the differences it is used to rank. This estimator
    - refuses regions with fewer than `pixels_per_cell` · bins² pixels (DataError), and
    - subtracts an estimate of the bias: "miller_madow" (the Miller–Madow correction of each entropy, the number of
      occupied cells minus one over 2 N ln 2), or "permutation" (the mean plug-in MI of `n_permutations` copies of
      the pair with `b`'s pixels shuffled inside the mask: the MI of independent images with the same marginals).
  The result may be slightly negative for independent images; it is not clamped, so that means over cases stay
  unbiased. RGB is compared by luminance (BT.709, see the module docstring).

  Args:
    a: (H, W) or (H, W, C) image, C = 1 or 3.
    b: the same shape.
    bins: bins per image (equal width over `value_range`).
    mask: optional (H, W) bool; only these pixels count.
    value_range: (low, high) of the bins; None spans each image's own range.
    correction: "miller_madow", "permutation" or "none" (the plug-in value).
    n_permutations: permutations of the null ("permutation" only).
    seed: seed of the permutations.
    pixels_per_cell: the least mean number of pixels per joint cell.
    where: a name for the region, used in error messages.

  Returns:
    {"mi_bits": corrected MI, "plugin_bits": the uncorrected MI, "bias_bits": what was subtracted, "n_pixels",
     "bins"}.

  Raises:
    ConfigError: for bad options or shapes.
    DataError: when the region is too small for the histogram or the images are not finite.
  """
  if correction not in MI_CORRECTIONS:
    raise errors.ConfigError(f"correction must be one of {MI_CORRECTIONS}, got {correction!r}")
  value_range = _check_histogram_options(bins, value_range)
  a = np.asarray(to_grey(jnp.asarray(a, jnp.float32)[..., None] if np.ndim(a) == 2 else a), np.float64)
  b = np.asarray(to_grey(jnp.asarray(b, jnp.float32)[..., None] if np.ndim(b) == 2 else b), np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise errors.ConfigError(f"mutual_information_corrected takes two images of one (H, W) shape, got {a.shape}, "
                             f"{b.shape}")  # fmt: skip
  m = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
  if m.shape != a.shape:
    raise errors.ConfigError(f"mask shape {m.shape} does not fit the images {a.shape}")
  x, y = a[m], b[m]
  label = f"{where}: " if where else ""
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise errors.DataError(f"{label}MI of non-finite images")
  need = mi_min_pixels(bins, pixels_per_cell)
  if x.size < need:
    raise errors.DataError(
      f"{label}{x.size} pixels are too few for a {bins} x {bins}-bin MI (at least {need} = {pixels_per_cell:g} per "
      "cell); use fewer bins or a larger region"
    )
  counts = _histogram_counts(x, y, int(bins), value_range)
  plugin = _plugin_mi_bits(counts)
  if correction == "miller_madow":
    bias = _miller_madow_bits(counts)
  elif correction == "permutation":
    rng = np.random.default_rng(seed)
    bias = float(np.mean([_plugin_mi_bits(_histogram_counts(x, rng.permutation(y), int(bins), value_range))
                          for _ in range(int(n_permutations))]))  # fmt: skip
  else:
    bias = 0.0
  return {"mi_bits": plugin - bias, "plugin_bits": plugin, "bias_bits": bias, "n_pixels": int(x.size),
          "bins": int(bins)}  # fmt: skip


def gaussian_mi_bits(rho: float) -> float:
  """The mutual information in bits of two unit Gaussians with correlation `rho`: −½ log2(1 − ρ²)."""
  return -0.5 * math.log2(1.0 - rho * rho)


# ------------------------------------------------------------------------------- a distributional measure (KID)

# The fixed feature network of `texture_features`: one convolution layer with a fixed filter bank (no trained
# weights, nothing to download), |response|, and per-patch pooling. The bank: Gaussian derivative filters
# (first order in x and y, second order xx, yy, xy) at the scales below, in pixels of the image given.
TEXTURE_SCALES = (1.0, 2.0, 4.0)


def _gaussian_derivative_responses(grey: np.ndarray, sigma: float) -> list[np.ndarray]:
  """|Responses| of the scale-normalised Gaussian derivatives d/dx, d/dy, d²/dx², d²/dy², d²/dxdy at `sigma`."""
  from scipy import ndimage

  orders = ((0, 1), (1, 0), (0, 2), (2, 0), (1, 1))
  return [np.abs(ndimage.gaussian_filter(grey, sigma, order=o, mode="reflect")) * sigma ** sum(o) for o in orders]


def texture_features(image: np.ndarray, *, patch_size: int = 32, stride: int | None = None,
                     mask: np.ndarray | None = None, min_mask_fraction: float = 0.5) -> np.ndarray:  # fmt: skip
  """Texture and colour features of the patches of one RGB image: what KID compares.

  Per `patch_size`² patch (stride `stride`, default the patch size) with at least `min_mask_fraction` of its
  pixels in `mask`: the mean and standard deviation of each RGB channel, and for the luminance the mean absolute
  response to each filter of a fixed Gaussian-derivative bank (`TEXTURE_SCALES`, 5 filters per scale) and its
  standard deviation. 6 + 2·15 = 36 features. The bank is fixed and shipped as code, so the measure is
  reproducible anywhere.

  Args:
    image: (H, W, 3) float RGB in [0, 1].
    patch_size: patch side in pixels.
    stride: step between patches; default `patch_size`.
    mask: optional (H, W) bool.
    min_mask_fraction: the least share of a patch inside the mask.

  Returns:
    (N, 36) float64 features, N the number of patches kept.

  Raises:
    ConfigError: for a bad image shape.
  """
  image = np.asarray(image, np.float64)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise errors.ConfigError(f"texture_features takes (H, W, 3) RGB, got shape {image.shape}")
  stride = int(stride or patch_size)
  grey = image @ np.asarray(LUMINANCE_WEIGHTS)
  responses = [r for s in TEXTURE_SCALES for r in _gaussian_derivative_responses(grey, s)]
  stack = np.concatenate([image, np.stack(responses, axis=-1)], axis=-1)
  m = np.ones(image.shape[:2], bool) if mask is None else np.asarray(mask, bool)
  # Masked patch sums by integral images: the mean and std of each feature over a patch's masked pixels.
  w = m.astype(np.float64)[..., None]

  def box(x):
    c = np.pad(np.cumsum(np.cumsum(x, axis=0), axis=1), ((1, 0), (1, 0), (0, 0)))
    p = patch_size
    return c[p:, p:] - c[:-p, p:] - c[p:, :-p] + c[:-p, :-p]

  n = box(w)[::stride, ::stride]
  s1 = box(stack * w)[::stride, ::stride]
  s2 = box(stack * stack * w)[::stride, ::stride]
  keep = n[..., 0] >= min_mask_fraction * patch_size * patch_size
  count = np.maximum(n[keep], 1.0)
  mean = s1[keep] / count
  std = np.sqrt(np.maximum(s2[keep] / count - mean * mean, 0.0))
  feats = np.concatenate([mean, std], axis=-1)
  return np.asarray(feats, np.float64).reshape(-1, 2 * stack.shape[-1])


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, *, scale: np.ndarray | None = None) -> float:
  """Unbiased squared MMD with KID's cubic polynomial kernel k(x, y) = (x·y / d + 1)³ (Bińkowski et al. 2018).

  Features are standardised by `scale` ((2, d): mean and std) first, by default those of both sets pooled, so
  that every feature weighs alike. 0 in expectation when both sets come from one distribution; it can
  be slightly negative.

  Args:
    features_a: (n, d) features of the synthetic images (n >= 2).
    features_b: (m, d) features of the real images (m >= 2).
    scale: optional (2, d) mean and std to standardise with.

  Returns:
    The KID estimate (unitless).

  Raises:
    DataError: with fewer than 2 feature vectors on a side or non-finite features.
  """
  x, y = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if len(x) < 2 or len(y) < 2:
    raise errors.DataError(f"KID needs at least 2 patches per side, got {len(x)} and {len(y)}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise errors.DataError("KID of non-finite features")
  if scale is None:
    both = np.concatenate([x, y])
    scale = np.stack([both.mean(axis=0), both.std(axis=0)])
  mu, sd = scale
  # A feature (nearly) constant over both sets carries no information: a floor keeps it from dominating.
  sd = np.maximum(sd, 1e-3 * max(float(np.median(sd)), 1e-12) + 1e-9)
  x, y = (x - mu) / sd, (y - mu) / sd
  d = x.shape[1]

  def k(u, v):
    return (u @ v.T / d + 1.0) ** 3

  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  n, m = len(x), len(y)
  return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2.0 * kxy.mean())  # fmt: skip


def texture_kid(fake: np.ndarray, real: np.ndarray, *, mask: np.ndarray | None = None, patch_size: int = 32,
                stride: int | None = None, max_patches: int = 1000) -> dict[str, float]:  # fmt: skip
  """KID between the texture features (`texture_features`) of the patches of a synthetic and a real image.

  Unlike SSIM, which a blurred prediction can maximise, this compares the *distributions* of patch texture and
  colour: a blurred synthetic image has too little filter energy and scores badly.

  Args:
    fake: (H, W, 3) synthetic RGB in [0, 1].
    real: (H, W, 3) real RGB in [0, 1].
    mask: optional (H, W) bool (patches at least half inside count).
    patch_size: patch side in pixels.
    stride: step between patches (default the patch size: disjoint patches).
    max_patches: at most this many patches per side, evenly spaced in raster order (KID's subset size).

  Returns:
    {"kid": the estimate, "n_patches": patches per side}.

  Raises:
    DataError: when fewer than 2 patches fit inside the mask.
  """
  fa = texture_features(fake, patch_size=patch_size, stride=stride, mask=mask)
  fb = texture_features(real, patch_size=patch_size, stride=stride, mask=mask)
  if len(fb) > max_patches:
    keep = np.linspace(0, len(fb) - 1, int(max_patches)).round().astype(int)
    fa, fb = fa[keep], fb[keep]
  return {"kid": kernel_distance(fa, fb), "n_patches": int(len(fb))}
