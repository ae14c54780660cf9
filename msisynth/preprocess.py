"""MSI preprocessing: normalisation, hotspot removal, peak picking, PCA, NMF, scaling, and `MSIPreprocessor`.

Layouts: a cube is (H, W, C) (row = y, column = x, as every image in msisynth); spectra are (N, C). Every array
function here accepts either layout, as NumPy or JAX arrays, with an optional `mask` of the pixels to use: bool
(H, W) for a cube, (N,) for spectra, True where a pixel counts (usually the measured pixels or the tissue).
Statistics (quantiles, means, bases) are fitted on masked pixels only, and per-pixel outputs outside the mask
are 0 (`lo` for `scale_to_range`), so unmeasured pixels never carry values. Array functions compute in float32
with JAX (quantiles with NumPy, whose selection is much faster than a sort) and return `jax.Array`s of the input's
layout; `pick_peaks` returns NumPy indices.

`MSIPreprocessor` is the MSI -> network-input transform of the pipeline, fitted on one section and applied
unchanged to others: channel selection (every channel, top-N peaks of the mean spectrum, or given m/z values),
per-pixel normalisation, hotspot clipping, a PCA or NMF basis, and a per-channel scaling to [-1, 1]. Its state
is NumPy arrays only; `to_dict` / `from_dict` (and `save` / `load` as JSON) carry it beside a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from msisynth import errors, outputs
from msisynth.peaks import check_spectrum
from msisynth.types import MSIImage

NORMALIZATIONS = ("tic", "rms", "median", "none")
REDUCTIONS = ("pca", "nmf", "none")
CHANNEL_MODES = ("all", "peaks", "mz")
PCA_METHODS = ("auto", "full", "randomized")
VARIANCE_TRANSFORMS = ("none", "sqrt", "log1p", "pareto")
TOL_UNITS = ("ppm", "da")

# `pca(method="auto")` uses the randomised solver once the smaller side of the data exceeds this many rows or
# channels; below it a full SVD is fast and exact.
_AUTO_RANDOMIZED_MIN_SIZE = 500

# Guards the multiplicative NMF updates against 0 / 0 where a factor row or column has died out.
_NMF_EPS = 1e-12

PREPROCESSOR_FORMAT = "msisynth.MSIPreprocessor"
PREPROCESSOR_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Input handling. Inputs are checked with NumPy (no compilation), then each public function runs one jitted core
# that takes the mask as an array, so a function compiles once per input shape whatever the mask.


def _check(
  x: jax.typing.ArrayLike,
  mask: jax.typing.ArrayLike | None,
  name: str = "x",
  nonnegative: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Checks `x` (cube or spectra) and its mask; returns them as NumPy arrays, the mask bool of `x`'s pixels.

  Args:
    x: the data.
    mask: the pixel mask or None (all pixels).
    name: what to call `x` in messages.
    nonnegative: when set, the operation that needs non-negative values (named in the message).

  Raises:
    ConfigError: when `x` is not (H, W, C) or (N, C), or the mask does not fit it.
    DataError: when `x` holds NaN or Inf, or negative values where `nonnegative` is set.
  """
  xn = np.asarray(x)
  if xn.ndim not in (2, 3):
    raise errors.ConfigError(f"{name} must be a cube (H, W, C) or spectra (N, C), got shape {xn.shape}")
  if xn.size == 0:
    raise errors.ConfigError(f"{name} has no pixels or no channels: shape {xn.shape}")
  if xn.dtype.kind not in "biuf":
    # Other real types (bfloat16 from JAX) convert; complex numbers, strings and objects do not.
    try:
      if xn.dtype.kind in "cOSUM":
        raise TypeError
      xn = xn.astype(np.float32)
    except (TypeError, ValueError):
      raise errors.ConfigError(f"{name} must hold real numbers, got dtype {xn.dtype}") from None
  if not np.isfinite(xn).all():
    raise errors.DataError(f"{name} holds NaN or Inf values")
  if nonnegative and (xn < 0).any():
    raise errors.DataError(f"{nonnegative} needs non-negative intensities, but {name} has negative values")
  spatial = xn.shape[:-1]
  if mask is None:
    return xn, np.ones(spatial, dtype=bool)
  m = np.asarray(mask)
  if m.shape != spatial:
    raise errors.ConfigError(f"mask shape {m.shape} does not match the pixels of {name}, shape {spatial}")
  return xn, m.astype(bool)


def _require_pixels(m: np.ndarray, what: str) -> int:
  n = int(m.sum())
  if n == 0:
    raise errors.DataError(f"the mask selects no pixels to {what}")
  return n


def _rows(x: jax.Array) -> jax.Array:
  """(..., C) -> float32 (N, C); inside jitted cores."""
  return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def _layout(y: jax.Array, x: jax.Array) -> jax.Array:
  """(N, k) -> `x`'s pixel layout with k channels; inside jitted cores."""
  return y.reshape(*x.shape[:-1], y.shape[-1])


def _quantile_pair(x: np.ndarray, m: np.ndarray, q_lo: float, q_hi: float, what: str) -> tuple[jax.Array, jax.Array]:
  """Per-channel (q_lo, q_hi) quantiles of the masked pixels, linear interpolation as `numpy.quantile`."""
  _require_pixels(m, what)
  # NumPy's selection (introselect) is an order of magnitude faster than XLA's full sort on the CPU.
  rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
  lo, hi = np.quantile(rows if m.all() else rows[m.reshape(-1)], [q_lo, q_hi], axis=0)
  return jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Per-pixel normalisation.


def _median_nonzero(x2: jax.Array) -> jax.Array:
  """Per-row median of the nonzero entries of a non-negative (N, C) array; 0 for all-zero rows."""
  nonzero = x2 > 0
  count = jnp.sum(nonzero, axis=1)
  ordered = jnp.sort(jnp.where(nonzero, x2, jnp.inf), axis=1)
  lo = jnp.maximum((count - 1) // 2, 0)
  hi = count // 2
  take = lambda i: jnp.take_along_axis(ordered, i[:, None], axis=1)[:, 0]
  return jnp.where(count > 0, 0.5 * (take(lo) + take(hi)), 0.0)


def _pixel_level(x2: jax.Array, method: jax.Array) -> jax.Array:
  """Per-row level that a normalisation divides by; `method` indexes `NORMALIZATIONS`."""
  return lax.switch(
    method,
    [
      lambda x2: jnp.sum(x2, axis=1),
      lambda x2: jnp.sqrt(jnp.mean(jnp.square(x2), axis=1)),
      _median_nonzero,
      lambda x2: jnp.ones(x2.shape[0], jnp.float32),
    ],
    x2,
  )


@jax.jit
def _normalize_core(x: jax.Array, mask: jax.Array, method: jax.Array, scale: jax.Array) -> jax.Array:
  # The method is an operand, not a static argument, so the four normalisations share one compilation.
  x2 = _rows(x)
  level = _pixel_level(x2, method)
  # Pixels with no signal (level 0), or outside the mask, become all zero rather than 0 / 0.
  ok = (level > 0) & mask.reshape(-1)
  inv = jnp.where(ok, scale / jnp.where(ok, level, 1.0), 0.0)
  return _layout(x2 * inv[:, None], x)


def _normalize(xn: np.ndarray, m: np.ndarray, method: str, scale: float = 1.0) -> jax.Array:
  return _normalize_core(xn, m, jnp.int32(NORMALIZATIONS.index(method)), jnp.float32(scale))


def tic_normalize(
  x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None = None, *, scale: float = 1.0
) -> jax.Array:
  """Total-ion-count normalisation: divides each spectrum by the sum of its intensities.

  Args:
    x: non-negative cube (H, W, C) or spectra (N, C).
    mask: pixels to normalise, (H, W) or (N,); others become all zero. None: every pixel.
    scale: the total each normalised spectrum sums to.

  Returns:
    float32 array of `x`'s shape whose spectra sum to `scale`; spectra with zero TIC stay all zero.

  Raises:
    ConfigError: on a wrong shape or mask.
    DataError: on NaN/Inf or negative intensities.
  """
  xn, m = _check(x, mask, nonnegative="TIC normalisation")
  return _normalize(xn, m, "tic", scale)


def rms_normalize(
  x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None = None, *, scale: float = 1.0
) -> jax.Array:
  """Root-mean-square normalisation: divides each spectrum by sqrt(mean over channels of intensity²).

  Args:
    x: cube (H, W, C) or spectra (N, C).
    mask: pixels to normalise, (H, W) or (N,); others become all zero. None: every pixel.
    scale: the RMS of each normalised spectrum.

  Returns:
    float32 array of `x`'s shape; all-zero spectra stay all zero.

  Raises:
    ConfigError: on a wrong shape or mask.
    DataError: on NaN/Inf.
  """
  xn, m = _check(x, mask)
  return _normalize(xn, m, "rms", scale)


def median_normalize(
  x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None = None, *, scale: float = 1.0
) -> jax.Array:
  """Median normalisation: divides each spectrum by the median of its nonzero intensities.

  MSI spectra (centroided, or binned from processed-mode files) are mostly zeros, so the plain median would be
  zero for most pixels; the median of the nonzero intensities is the robust per-pixel level instead.

  Args:
    x: non-negative cube (H, W, C) or spectra (N, C).
    mask: pixels to normalise, (H, W) or (N,); others become all zero. None: every pixel.
    scale: the nonzero median of each normalised spectrum.

  Returns:
    float32 array of `x`'s shape; all-zero spectra stay all zero.

  Raises:
    ConfigError: on a wrong shape or mask.
    DataError: on NaN/Inf or negative intensities.
  """
  xn, m = _check(x, mask, nonnegative="median normalisation")
  return _normalize(xn, m, "median", scale)


def normalize(x: jax.typing.ArrayLike, method: str, mask: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Applies the named per-pixel normalisation: "tic", "rms", "median" or "none" (mask only).

  Args:
    x: cube (H, W, C) or spectra (N, C).
    method: one of `NORMALIZATIONS`.
    mask: pixels to keep, (H, W) or (N,); others become all zero. None: every pixel.

  Returns:
    float32 array of `x`'s shape.

  Raises:
    ConfigError: on an unknown method, a wrong shape or mask.
    DataError: on NaN/Inf (or negative intensities for "tic" and "median").
  """
  if method not in NORMALIZATIONS:
    raise errors.ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
  needs = {"tic": "TIC normalisation", "median": "median normalisation"}.get(method)
  xn, m = _check(x, mask, nonnegative=needs)
  return _normalize(xn, m, method)


# ----------------------------------------------------------------------------------------------------------------
# Hotspots, spectra, peaks.


def _check_quantile(q: float, name: str) -> float:
  if not 0.0 <= float(q) <= 1.0:
    raise errors.ConfigError(f"{name} must lie in [0, 1], got {q}")
  return float(q)


def hotspot_thresholds(
  x: jax.typing.ArrayLike,
  quantile: float = 0.99,
  mask: jax.typing.ArrayLike | None = None,
  *,
  nonzero: bool = True,
) -> jax.Array:
  """Per-channel intensity quantile over the masked pixels where the ion is present: the clip level of hotspot
  removal.

  With `nonzero` (the default) the quantile of each channel is taken over the masked pixels where that channel is
  nonzero, so an ion present in only a small part of the tissue (a plaque, a drug, a tumour margin) keeps its
  contrast: with zeros included, any ion present in under 1 - `quantile` of the pixels gets a threshold of 0 and
  would be erased. A channel that is zero everywhere gets the largest float32 (it clips nothing elsewhere).

  Args:
    x: cube (H, W, C) or spectra (N, C).
    quantile: in (0, 1]; linear interpolation between order statistics, as `numpy.quantile`.
    mask: pixels to fit on, (H, W) or (N,). None: every pixel.
    nonzero: take the quantile over the nonzero values only; False: over every masked pixel, zeros included.

  Returns:
    float32 (C,) thresholds.

  Raises:
    ConfigError: on a quantile outside (0, 1], a wrong shape or mask.
    DataError: on NaN/Inf or an empty mask.
  """
  if not 0.0 < float(quantile) <= 1.0:
    raise errors.ConfigError(f"hotspot quantile must lie in (0, 1], got {quantile}")
  xn, m = _check(x, mask)
  if not nonzero:
    return _quantile_pair(xn, m, float(quantile), float(quantile), "fit hotspot thresholds")[0]
  _require_pixels(m, "fit hotspot thresholds")
  rows = np.asarray(xn, dtype=np.float32).reshape(-1, xn.shape[-1])
  columns = np.ascontiguousarray((rows if m.all() else rows[m.reshape(-1)]).T)
  out = np.full(columns.shape[0], np.finfo(np.float32).max, np.float32)
  for j, column in enumerate(columns):
    present = column[column != 0]
    if present.size:
      out[j] = np.quantile(present, float(quantile))
  return jnp.asarray(out)


@jax.jit
def _clip_core(x: jax.Array, mask: jax.Array, thresholds: jax.Array) -> jax.Array:
  return jnp.where(mask[..., None], jnp.minimum(x.astype(jnp.float32), thresholds), 0.0)


def clip_hotspots(
  x: jax.typing.ArrayLike, thresholds: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None = None
) -> jax.Array:
  """Clips each channel at its threshold (from `hotspot_thresholds`, of this or another section).

  Args:
    x: cube (H, W, C) or spectra (N, C).
    thresholds: (C,) upper clip level of each channel.
    mask: pixels to keep, (H, W) or (N,); others become all zero. None: every pixel.

  Returns:
    float32 array of `x`'s shape.

  Raises:
    ConfigError: when `thresholds` is not (C,), or on a wrong shape or mask.
    DataError: on NaN/Inf.
  """
  xn, m = _check(x, mask)
  t = np.asarray(thresholds, dtype=np.float32)
  if t.shape != (xn.shape[-1],):
    raise errors.ConfigError(f"thresholds must have shape ({xn.shape[-1]},), got {t.shape}")
  return _clip_core(xn, m, t)


def remove_hotspots(
  x: jax.typing.ArrayLike,
  quantile: float = 0.99,
  mask: jax.typing.ArrayLike | None = None,
  *,
  nonzero: bool = True,
  return_thresholds: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Hotspot removal: clips each channel at its `quantile` over the masked pixels where it is present.

  Args:
    x: cube (H, W, C) or spectra (N, C).
    quantile: in (0, 1]; 0.99 clips the brightest 1 % of the pixels where each ion is present.
    mask: pixels to fit on and keep, (H, W) or (N,); others become all zero. None: every pixel.
    nonzero: quantiles over the nonzero values (see `hotspot_thresholds`); False: zeros included.
    return_thresholds: also return the fitted (C,) thresholds, for `clip_hotspots` on other data.

  Returns:
    The clipped float32 array of `x`'s shape, and the thresholds when `return_thresholds`.

  Raises:
    ConfigError: on a quantile outside (0, 1], a wrong shape or mask.
    DataError: on NaN/Inf or an empty mask.
  """
  thresholds = hotspot_thresholds(x, quantile, mask, nonzero=nonzero)
  clipped = clip_hotspots(x, thresholds, mask)
  return (clipped, thresholds) if return_thresholds else clipped


# ----------------------------------------------------------------------------------------------------------------
# Variance stabilisation (before PCA / NMF).


def fit_variance_scale(
  x: jax.typing.ArrayLike, method: str, mask: jax.typing.ArrayLike | None = None
) -> np.ndarray | None:
  """The fitted state of a variance-stabilising transform (see `stabilize_variance`).

  Returns:
    "pareto": float32 (C,) sqrt of each channel's standard deviation over the masked pixels (1 where it is 0);
    "log1p": float32 (1,) median of the nonzero masked intensities (1 when there are none); "sqrt", "none": None.

  Raises:
    ConfigError: on an unknown method, a wrong shape or mask.
    DataError: on NaN/Inf, or an empty mask.
  """
  if method not in VARIANCE_TRANSFORMS:
    raise errors.ConfigError(f"variance must be one of {VARIANCE_TRANSFORMS}, got {method!r}")
  if method in ("none", "sqrt"):
    return None
  xn, m = _check(x, mask)
  _require_pixels(m, "fit the variance transform on")
  rows = np.asarray(xn, np.float32).reshape(-1, xn.shape[-1])[m.reshape(-1)]
  if method == "pareto":
    sd = rows.std(axis=0, dtype=np.float64)
    return np.where(sd > 0, np.sqrt(sd), 1.0).astype(np.float32)
  present = rows[rows != 0]
  return np.asarray([np.median(present) if present.size else 1.0], np.float32)


def stabilize_variance(
  x: jax.typing.ArrayLike,
  method: str,
  scale: jax.typing.ArrayLike | None = None,
  mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Variance-stabilising transform of intensities, applied before PCA / NMF.

  - "sqrt": sqrt(x), the Anscombe-like transform for counts (Poisson noise: variance ~ mean);
  - "log1p": log(1 + x / s) with s the median nonzero intensity of the fitted section (`scale`, shape (1,));
  - "pareto": x / sqrt(sd_c), each channel divided by the square root of its standard deviation (`scale` (C,),
    van den Berg et al. 2006): a middle way between no scaling and unit variance, so weak ions count without
    their noise being blown up;
  - "none": x.

  Args:
    x: non-negative cube (H, W, C) or spectra (N, C) ("pareto" and "none" also accept negative values).
    method: one of `VARIANCE_TRANSFORMS`.
    scale: the state from `fit_variance_scale` ("log1p", "pareto").
    mask: pixels to transform; others become 0. None: every pixel.

  Returns:
    float32 array of `x`'s shape.

  Raises:
    ConfigError: on an unknown method, a missing or mis-shaped scale, a wrong shape or mask.
    DataError: on NaN/Inf, or negative values for "sqrt" and "log1p".
  """
  if method not in VARIANCE_TRANSFORMS:
    raise errors.ConfigError(f"variance must be one of {VARIANCE_TRANSFORMS}, got {method!r}")
  needs = {"sqrt": "the sqrt transform", "log1p": "the log1p transform"}.get(method)
  xn, m = _check(x, mask, nonnegative=needs)
  c = xn.shape[-1]
  if method in ("log1p", "pareto"):
    want = (c,) if method == "pareto" else (1,)
    s = None if scale is None else np.asarray(scale, np.float32)
    if s is None or s.shape != want or not np.all(s > 0):
      raise errors.ConfigError(f"the {method} transform needs a positive scale of shape {want} (fit_variance_scale)")
  else:
    s = np.ones(1, np.float32)
  return _stabilize_core(xn, m, jnp.int32(VARIANCE_TRANSFORMS.index(method)), s)


@jax.jit
def _stabilize_core(x, mask, method, scale):
  x2 = _rows(x)
  y = lax.switch(
    method,
    [
      lambda v: v,
      lambda v: jnp.sqrt(v),
      lambda v: jnp.log1p(v / scale),
      lambda v: v / scale,
    ],
    x2,
  )
  return _layout(jnp.where(mask.reshape(-1)[:, None], y, 0.0), x)


@jax.jit
def _mean_core(x: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask.reshape(-1)
  return jnp.sum(jnp.where(m[:, None], _rows(x), 0.0), axis=0) / jnp.sum(m)


def mean_spectrum(x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Mean spectrum over the masked pixels.

  Args:
    x: cube (H, W, C) or spectra (N, C).
    mask: pixels to average, (H, W) or (N,). None: every pixel.

  Returns:
    float32 (C,).

  Raises:
    ConfigError: on a wrong shape or mask.
    DataError: on NaN/Inf or an empty mask.
  """
  xn, m = _check(x, mask)
  _require_pixels(m, "average")
  return _mean_core(xn, m)


def _local_maxima(y: np.ndarray, connected: np.ndarray) -> np.ndarray:
  """Indices of local maxima of a 1-D array, the middle of each flat top.

  `connected[i]` says whether channels i and i + 1 are neighbours; a missing neighbour (at the ends of the axis
  or across a gap) counts as lower.
  """
  change = np.flatnonzero((np.diff(y) != 0) | ~connected) + 1
  starts = np.concatenate([[0], change])
  ends = np.concatenate([change, [y.size]]) - 1
  values = y[starts]
  linked = connected[starts[1:] - 1]
  left_lower = np.concatenate([[True], ~linked | (values[:-1] < values[1:])])
  right_lower = np.concatenate([~linked | (values[1:] < values[:-1]), [True]])
  top = left_lower & right_lower
  return (starts[top] + ends[top]) // 2


def pick_peaks(
  mz: np.ndarray | Sequence[float],
  spectrum: jax.typing.ArrayLike,
  n_peaks: int,
  *,
  min_distance_ppm: float | None = None,
  min_distance_da: float | None = None,
  min_distance_bins: int = 1,
  min_intensity: float = 0.0,
) -> np.ndarray:
  """Top-N local maxima of a (mean) spectrum, with non-maximum suppression.

  A local maximum is a channel (the middle one of a flat top) higher than both neighbours. A missing neighbour
  counts as lower: at the ends of the axis, and, when a distance in m/z is given, across a gap of at least that
  distance, so that on a centroided or feature-list axis each isolated channel can be a peak. Maxima are taken
  strongest first; a maximum closer than the minimum distance to one already taken is dropped. Distances are in
  channels (`min_distance_bins`: indices i, j conflict when |i - j| < bins), or in m/z: Da, or ppm of the
  higher m/z of the two. Fewer than `n_peaks` indices come back when the spectrum has fewer peaks.

  Args:
    mz: (C,) strictly increasing m/z axis.
    spectrum: (C,) intensities, typically `mean_spectrum` of normalised data.
    n_peaks: how many peaks to return, >= 1.
    min_distance_ppm: minimum separation in ppm (exclusive with `min_distance_da`).
    min_distance_da: minimum separation in Da.
    min_distance_bins: minimum separation in channels, >= 1 (1: any two distinct maxima).
    min_intensity: peaks must be strictly above this.

  Returns:
    int64 NumPy indices into `mz`, sorted by m/z.

  Raises:
    ConfigError: on mismatched shapes, a non-increasing m/z axis or invalid options.
    DataError: on NaN/Inf in the spectrum.
  """
  mz, y = check_spectrum(mz, spectrum)
  if int(n_peaks) < 1:
    raise errors.ConfigError(f"n_peaks must be >= 1, got {n_peaks}")
  if min_distance_ppm is not None and min_distance_da is not None:
    raise errors.ConfigError("give at most one of min_distance_ppm and min_distance_da")
  for name, value in (("min_distance_ppm", min_distance_ppm), ("min_distance_da", min_distance_da)):
    if value is not None and value < 0:
      raise errors.ConfigError(f"{name} must be >= 0, got {value}")
  if int(min_distance_bins) < 1:
    raise errors.ConfigError(f"min_distance_bins must be >= 1, got {min_distance_bins}")

  gaps = np.diff(mz)
  connected = np.ones(gaps.shape, dtype=bool)
  if min_distance_ppm:
    connected = gaps < min_distance_ppm * 1e-6 * mz[1:]
  elif min_distance_da:
    connected = gaps < min_distance_da
  candidates = _local_maxima(y, connected)
  candidates = candidates[y[candidates] > min_intensity]
  # Strongest first; ties go to the lower m/z so the result does not depend on sort stability.
  candidates = candidates[np.lexsort((candidates, -y[candidates]))]
  taken: list[int] = []
  for i in candidates:
    if len(taken) == n_peaks:
      break
    t = np.asarray(taken, dtype=np.int64)
    if t.size:
      conflict = np.abs(t - i) < min_distance_bins
      if min_distance_ppm is not None:
        conflict |= np.abs(mz[t] - mz[i]) < min_distance_ppm * 1e-6 * np.maximum(mz[t], mz[i])
      if min_distance_da is not None:
        conflict |= np.abs(mz[t] - mz[i]) < min_distance_da
      if conflict.any():
        continue
    taken.append(int(i))
  return np.sort(np.asarray(taken, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------
# PCA.


class PCAResult(NamedTuple):
  """What `pca` returns.

  Attributes:
    scores: (H, W, k) or (N, k) projections of the centred data on the components; 0 outside the mask.
    components: (k, C) orthonormal principal axes, strongest first; each axis's largest-|loading| entry > 0.
    mean: (C,) mean spectrum of the masked pixels, subtracted before projecting.
    explained_variance_ratio: (k,) share of the total variance of the masked pixels along each axis.
  """

  scores: jax.Array
  components: jax.Array
  mean: jax.Array
  explained_variance_ratio: jax.Array


def _randomized_svd(key: jax.Array, xc: jax.Array, k: int, n_oversamples: int, n_iter: int):
  # Halko, Martinsson & Tropp (2011), algorithms 4.4 and 5.1: a Gaussian sketch of the range, refined by power
  # iterations re-orthonormalised at every half step so the small singular values are not lost to rounding.
  size = min(k + n_oversamples, *xc.shape)
  omega = jax.random.normal(key, (xc.shape[1], size), dtype=xc.dtype)
  q, _ = jnp.linalg.qr(xc @ omega)

  def power_step(_, q):
    z, _ = jnp.linalg.qr(xc.T @ q)
    q, _ = jnp.linalg.qr(xc @ z)
    return q

  q = lax.fori_loop(0, n_iter, power_step, q)
  _, s, vt = jnp.linalg.svd(q.T @ xc, full_matrices=False)
  return s[:k], vt[:k]


def _exact_pca(xc: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Squared singular values (k,) and right singular vectors (k, C) of centred data, by eigendecomposition.

  The eigendecomposition of the (C, C) scatter matrix (or, with fewer rows than channels, of the (N, N) Gram
  matrix) is many times faster than XLA's CPU SVD of a tall matrix; eigenvalues carry float32 rounding of
  about 1e-7 of the largest.
  """
  n, c = xc.shape
  if n >= c:
    evals, evecs = jnp.linalg.eigh(xc.T @ xc)
    s2 = jnp.maximum(evals[::-1][:k], 0.0)
    return s2, evecs[:, ::-1][:, :k].T
  evals, evecs = jnp.linalg.eigh(xc @ xc.T)
  s2 = jnp.maximum(evals[::-1][:k], 0.0)
  u = evecs[:, ::-1][:, :k]
  # v = X^T u / s; directions beyond the rank of the data are left as zeros. Their eigenvalues are float32
  # rounding (about 1e-7 of the largest), so the cut is on the variance, at 1e-6 of the largest.
  s = jnp.sqrt(s2)
  ok = s2 > s2[0] * 1e-6
  vt = jnp.where(ok[:, None], (xc.T @ u).T / jnp.where(ok, s, 1.0)[:, None], 0.0)
  return s2, vt


def _orient(components: jax.Array) -> jax.Array:
  """Flips each row so that its largest-magnitude entry is positive (a reproducible sign)."""
  idx = jnp.argmax(jnp.abs(components), axis=1)
  sign = jnp.sign(jnp.take_along_axis(components, idx[:, None], axis=1))
  return components * jnp.where(sign == 0, 1.0, sign)


def _project(x2: jax.Array, m: jax.Array, components: jax.Array, mean: jax.Array) -> jax.Array:
  return jnp.where(m[:, None], (x2 - mean) @ components.T, 0.0)


@functools.partial(jax.jit, static_argnames=("k", "method", "n_oversamples", "n_iter"))
def _pca_core(key, x, mask, k: int, method: str, n_oversamples: int, n_iter: int) -> PCAResult:
  x2, m = _rows(x), mask.reshape(-1)
  mean = jnp.sum(jnp.where(m[:, None], x2, 0.0), axis=0) / jnp.sum(m)
  # Rows outside the mask are zero after centring: they change neither the singular values nor the axes.
  xc = jnp.where(m[:, None], x2 - mean, 0.0)
  if method == "full":
    s2, vt = _exact_pca(xc, k)
  else:
    s, vt = _randomized_svd(key, xc, k, n_oversamples, n_iter)
    s2 = jnp.square(s)
  components = _orient(vt)
  total = jnp.sum(jnp.square(xc))
  ratio = jnp.where(total > 0, s2 / jnp.where(total > 0, total, 1.0), 0.0)
  return PCAResult(_layout(_project(x2, m, components, mean), x), components, mean, ratio)


def pca(
  x: jax.typing.ArrayLike,
  k: int,
  *,
  mask: jax.typing.ArrayLike | None = None,
  method: str = "auto",
  key: jax.Array | None = None,
  n_oversamples: int = 10,
  n_iter: int = 4,
) -> PCAResult:
  """Principal component analysis of spectra, fitted on the masked pixels.

  "full" eigendecomposes the scatter matrix of the centred data (the Gram matrix when there are fewer pixels than
  channels): the same axes as an SVD, many times faster than XLA's CPU SVD, and accurate in float32 for
  components whose variance is above about 1e-6 of the largest; directions beyond the rank of the data come out
  as zeros. "randomized" is a randomised range finder with `n_iter` power iterations (Halko et al. 2011),
  accurate for the leading components when the singular values decay, and much cheaper when both the pixel
  count and the channel count are large. "auto" picks "randomized" when both the masked pixel count and the
  channel count exceed 500 and k + n_oversamples is under half the smaller of them.

  Args:
    x: cube (H, W, C) or spectra (N, C).
    k: number of components, 1 <= k <= min(masked pixels, C).
    mask: pixels to fit on, (H, W) or (N,); their scores are computed, the others' are 0. None: every pixel.
    method: "auto", "full" or "randomized".
    key: JAX PRNG key of the random sketch ("randomized" only); None uses `jax.random.key(0)`.
    n_oversamples: extra sketch columns beyond k.
    n_iter: power iterations.

  Returns:
    A `PCAResult` (scores in `x`'s layout with k channels, components, mean, explained_variance_ratio).

  Raises:
    ConfigError: on an invalid k, method or option, a wrong shape or mask.
    DataError: on NaN/Inf or an empty mask.
  """
  if method not in PCA_METHODS:
    raise errors.ConfigError(f"method must be one of {PCA_METHODS}, got {method!r}")
  if int(n_oversamples) < 0 or int(n_iter) < 0:
    raise errors.ConfigError(f"n_oversamples and n_iter must be >= 0, got {n_oversamples}, {n_iter}")
  xn, m = _check(x, mask)
  n, c = _require_pixels(m, "fit PCA on"), xn.shape[-1]
  if not 1 <= int(k) <= min(n, c):
    raise errors.ConfigError(f"k must lie in [1, min(pixels, channels)] = [1, {min(n, c)}], got {k}")
  k = int(k)
  if method == "auto":
    small = min(n, c)
    method = "randomized" if small > _AUTO_RANDOMIZED_MIN_SIZE and k + n_oversamples < small // 2 else "full"
  key = jax.random.key(0) if key is None else key
  return _pca_core(key, xn, m, k, method, int(n_oversamples), int(n_iter))


@jax.jit
def _project_core(x, mask, components, mean):
  return _layout(_project(_rows(x), mask.reshape(-1), components, mean), x)


def pca_transform(
  x: jax.typing.ArrayLike,
  components: jax.typing.ArrayLike,
  mean: jax.typing.ArrayLike,
  *,
  mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Projects spectra on a fitted basis: (x - mean) @ components.T.

  Args:
    x: cube (H, W, C) or spectra (N, C).
    components: (k, C) basis (from `pca`).
    mean: (C,) mean subtracted first.
    mask: pixels to project, (H, W) or (N,); the others' scores are 0. None: every pixel.

  Returns:
    float32 scores, (H, W, k) or (N, k).

  Raises:
    ConfigError: when the basis does not match the channels of `x`, or on a wrong shape or mask.
    DataError: on NaN/Inf.
  """
  xn, m = _check(x, mask)
  comp = np.asarray(components, dtype=np.float32)
  mu = np.asarray(mean, dtype=np.float32)
  c = xn.shape[-1]
  if comp.ndim != 2 or comp.shape[1] != c or mu.shape != (c,):
    raise errors.ConfigError(f"components {comp.shape} and mean {mu.shape} do not fit data with {c} channels")
  return _project_core(xn, m, comp, mu)


# ----------------------------------------------------------------------------------------------------------------
# NMF.


class NMFResult(NamedTuple):
  """What `nmf` returns.

  Attributes:
    w: (H, W, k) or (N, k) non-negative pixel weights; 0 outside the mask.
    h: (k, C) non-negative component spectra, each scaled to a maximum of 1, strongest component first.
    reconstruction_error: (n_iter,) Frobenius norm ||X - W H|| over the masked pixels after each iteration.
  """

  w: jax.Array
  h: jax.Array
  reconstruction_error: jax.Array


@functools.partial(jax.jit, static_argnames=("n_iter",))
def _nmf_core(x: jax.Array, mask: jax.Array, w: jax.Array, h: jax.Array, n_iter: int) -> NMFResult:
  m = mask.reshape(-1)[:, None]
  x2 = jnp.where(m, _rows(x), 0.0)
  # The starts are uniform in [0, 1), scaled so W H matches the data's mean level. Rows outside the mask start
  # (and so stay) at zero: they take no part in the fit.
  level = jnp.sqrt(jnp.sum(x2) / (jnp.sum(m) * x2.shape[1] * h.shape[0]))
  w, h = jnp.where(m, level * w, 0.0), level * h

  # Lee & Seung (2001) multiplicative updates for the Frobenius loss: no step increases ||X - WH||.
  def step(carry, _):
    w, h = carry
    h = h * (w.T @ x2) / (w.T @ w @ h + _NMF_EPS)
    w = w * (x2 @ h.T) / (w @ (h @ h.T) + _NMF_EPS)
    return (w, h), jnp.linalg.norm(x2 - w @ h)

  (w, h), err = lax.scan(step, (w, h), None, length=n_iter)
  peak = jnp.max(h, axis=1)
  peak = jnp.where(peak > 0, peak, 1.0)
  h, w = h / peak[:, None], w * peak[None, :]
  order = jnp.argsort(-(jnp.sum(w, axis=0) * jnp.sum(h, axis=1)), stable=True)
  return NMFResult(_layout(w[:, order], x), h[order], err)


def nmf(
  x: jax.typing.ArrayLike,
  k: int,
  *,
  n_iter: int = 200,
  seed: int = 0,
  mask: jax.typing.ArrayLike | None = None,
) -> NMFResult:
  """Non-negative matrix factorisation X ≈ W H of the masked spectra by multiplicative updates (jitted).

  The factors start from uniform noise (NumPy, from `seed`) scaled to the data's mean level, as
  scikit-learn's "random" init, run `n_iter` Lee-Seung updates, and are then normalised so every row of H
  peaks at 1 (W absorbing the scale) and ordered by each component's share of the total intensity, strongest
  first.

  Args:
    x: non-negative cube (H, W, C) or spectra (N, C).
    k: number of components, >= 1.
    n_iter: multiplicative update iterations, >= 1.
    seed: NumPy seed of the initialisation.
    mask: pixels to fit on, (H, W) or (N,); the others' weights are 0. None: every pixel.

  Returns:
    An `NMFResult` (w in `x`'s layout with k channels, h, reconstruction_error per iteration).

  Raises:
    ConfigError: on an invalid k or n_iter, a wrong shape or mask.
    DataError: on NaN/Inf, negative intensities or an empty mask.
  """
  if int(k) < 1 or int(n_iter) < 1:
    raise errors.ConfigError(f"k and n_iter must be >= 1, got {k}, {n_iter}")
  xn, m = _check(x, mask, nonnegative="NMF")
  _require_pixels(m, "fit NMF on")
  rng = np.random.default_rng(seed)
  n_pixels, n_channels = m.size, xn.shape[-1]
  w0 = rng.random((n_pixels, int(k)), dtype=np.float32)
  h0 = rng.random((int(k), n_channels), dtype=np.float32)
  return _nmf_core(xn, m, w0, h0, int(n_iter))


@functools.partial(jax.jit, static_argnames=("n_iter",))
def _nmf_weights_core(x: jax.Array, mask: jax.Array, h: jax.Array, n_iter: int) -> jax.Array:
  x2 = _rows(x)
  hht = h @ h.T
  xht = x2 @ h.T
  # A per-pixel start (each pixel's mean level spread over the components) keeps every pixel's weights a
  # function of that pixel alone, so a pixel's output does not depend on the rest of the section.
  w0 = jnp.mean(x2, axis=1, keepdims=True) / (h.shape[0] * jnp.maximum(jnp.mean(h), _NMF_EPS))
  w0 = jnp.broadcast_to(w0, (x2.shape[0], h.shape[0]))
  w = lax.fori_loop(0, n_iter, lambda _, w: w * xht / (w @ hht + _NMF_EPS), w0)
  return _layout(jnp.where(mask.reshape(-1)[:, None], w, 0.0), x)


def nmf_transform(
  x: jax.typing.ArrayLike,
  h: jax.typing.ArrayLike,
  *,
  n_iter: int = 200,
  mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Non-negative weights W of spectra on fixed NMF components H (min ||X - W H||, W >= 0).

  W starts, for each pixel, from its mean intensity spread evenly over the components and runs `n_iter`
  multiplicative updates with H fixed, so the result is deterministic and a pixel's weights depend on that
  pixel's spectrum only.

  Args:
    x: non-negative cube (H, W, C) or spectra (N, C).
    h: (k, C) non-negative components (from `nmf`).
    n_iter: multiplicative update iterations, >= 1.
    mask: pixels to solve for, (H, W) or (N,); the others' weights are 0. None: every pixel.

  Returns:
    float32 weights, (H, W, k) or (N, k).

  Raises:
    ConfigError: when `h` does not match the channels of `x`, on n_iter < 1, a wrong shape or mask.
    DataError: on NaN/Inf or negative values in `x` or `h`.
  """
  if int(n_iter) < 1:
    raise errors.ConfigError(f"n_iter must be >= 1, got {n_iter}")
  xn, m = _check(x, mask, nonnegative="NMF")
  hh = np.asarray(h, dtype=np.float32)
  if hh.ndim != 2 or hh.shape[1] != xn.shape[-1]:
    raise errors.ConfigError(f"h of shape {hh.shape} does not fit data with {xn.shape[-1]} channels")
  _check(hh, None, "h", nonnegative="NMF")
  return _nmf_weights_core(xn, m, hh, int(n_iter))


# ----------------------------------------------------------------------------------------------------------------
# Scaling.


def fit_range(
  x: jax.typing.ArrayLike,
  quantiles: tuple[float, float] = (0.01, 0.99),
  mask: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-channel low and high quantiles over the masked pixels, the input range of `apply_range`.

  Args:
    x: cube (H, W, C) or spectra (N, C).
    quantiles: (low, high) with 0 <= low < high <= 1.
    mask: pixels to fit on, (H, W) or (N,). None: every pixel.

  Returns:
    float32 (C,) lows and (C,) highs.

  Raises:
    ConfigError: on invalid quantiles, a wrong shape or mask.
    DataError: on NaN/Inf or an empty mask.
  """
  if len(quantiles) != 2:
    raise errors.ConfigError(f"quantiles must be a (low, high) pair, got {quantiles}")
  q_lo = _check_quantile(quantiles[0], "low quantile")
  q_hi = _check_quantile(quantiles[1], "high quantile")
  if not q_lo < q_hi:
    raise errors.ConfigError(f"quantiles must satisfy low < high, got {quantiles}")
  xn, m = _check(x, mask)
  return _quantile_pair(xn, m, q_lo, q_hi, "fit the scaling on")


@jax.jit
def _range_core(x, mask, in_lo, in_hi, lo, hi):
  x2 = _rows(x)
  width = in_hi - in_lo
  # An empty input range (a constant channel) becomes a step instead of 0 / 0.
  unit = jnp.where(width > 0, (x2 - in_lo) / jnp.where(width > 0, width, 1.0), jnp.where(x2 > in_lo, 1.0, 0.0))
  y = lo + (hi - lo) * jnp.clip(unit, 0.0, 1.0)
  return _layout(jnp.where(mask.reshape(-1)[:, None], y, lo), x)


def apply_range(
  x: jax.typing.ArrayLike,
  in_lo: jax.typing.ArrayLike,
  in_hi: jax.typing.ArrayLike,
  lo: float = -1.0,
  hi: float = 1.0,
  *,
  mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Maps each channel's [in_lo, in_hi] linearly onto [lo, hi], clipping outside.

  A channel whose range is empty (in_hi == in_lo) becomes a step: `lo` at or below in_lo, `hi` above it.

  Args:
    x: cube (H, W, C) or spectra (N, C).
    in_lo: (C,) input value mapped to `lo`.
    in_hi: (C,) input value mapped to `hi`, >= in_lo.
    lo: output low, < hi.
    hi: output high.
    mask: pixels to map, (H, W) or (N,); the others are set to `lo`. None: every pixel.

  Returns:
    float32 array of `x`'s shape with values in [lo, hi].

  Raises:
    ConfigError: on mismatched ranges, lo >= hi, a wrong shape or mask.
    DataError: on NaN/Inf.
  """
  if not float(lo) < float(hi):
    raise errors.ConfigError(f"lo must be < hi, got {lo}, {hi}")
  xn, m = _check(x, mask)
  a = np.asarray(in_lo, dtype=np.float32)
  b = np.asarray(in_hi, dtype=np.float32)
  c = xn.shape[-1]
  if a.shape != (c,) or b.shape != (c,):
    raise errors.ConfigError(f"in_lo {a.shape} and in_hi {b.shape} must both be ({c},)")
  if np.any(b < a) or not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise errors.ConfigError("in_lo and in_hi must be finite with in_hi >= in_lo in every channel")
  return _range_core(xn, m, a, b, jnp.float32(lo), jnp.float32(hi))


def scale_to_range(
  x: jax.typing.ArrayLike,
  lo: float = -1.0,
  hi: float = 1.0,
  *,
  quantiles: tuple[float, float] = (0.01, 0.99),
  mask: jax.typing.ArrayLike | None = None,
  return_bounds: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Scales each channel so its `quantiles` over the masked pixels map to [lo, hi], clipping outside.

  Args:
    x: cube (H, W, C) or spectra (N, C).
    lo: output low (and the value of pixels outside the mask).
    hi: output high, > lo.
    quantiles: (low, high) input quantiles with 0 <= low < high <= 1.
    mask: pixels to fit on and map, (H, W) or (N,). None: every pixel.
    return_bounds: also return the fitted ((C,) lows, (C,) highs) for `apply_range` on other data.

  Returns:
    float32 array of `x`'s shape in [lo, hi], and the fitted bounds when `return_bounds`.

  Raises:
    ConfigError: on invalid quantiles or range, a wrong shape or mask.
    DataError: on NaN/Inf or an empty mask.
  """
  bounds = fit_range(x, quantiles, mask)
  y = apply_range(x, *bounds, lo, hi, mask=mask)
  return (y, bounds) if return_bounds else y


# ----------------------------------------------------------------------------------------------------------------
# The fitted MSI -> network-input transform.


@dataclasses.dataclass
class PreprocessConfig:
  """Options of `MSIPreprocessor`.

  Attributes:
    channels: "all" (every channel of the section it is fitted on), "peaks" (the `n_peaks` strongest local
      maxima of the mean normalised spectrum, at least 2 * `tol` apart) or "mz" (the values in `mz_values`).
    n_peaks: number of peaks for channels="peaks".
    mz_values: m/z values for channels="mz".
    tol: half-width of the m/z window, > 0, that maps a stored channel onto a file's m/z axis. With
      channels="all" it is capped at half the channel spacing of the fitted file, so that each window holds
      exactly one of its channels; `required_mz()` reports the tolerance in use.
    tol_unit: "ppm" or "da".
    mz_mapping: "sum" adds every channel within the window (an ion image, as `msisynth.io.read_imzml` with
      `mz_values` does), "nearest" takes the nearest channel if it lies in the window.
    normalization: "tic", "rms", "median" (of nonzero intensities) or "none"; computed over the selected
      channels only, so a file read with just `required_mz()` gives the same result.
    hotspot_quantile: per-channel clip quantile in (0, 1], or None for no clipping.
    hotspot_nonzero: take each channel's clip quantile over the pixels where the ion is present (nonzero), so
      ions present in a small part of the tissue keep their contrast (see `hotspot_thresholds`).
    variance: variance-stabilising transform after clipping, before the reduction (not applied with
      reduction="none"): "none", "sqrt", "log1p" or "pareto" (see `stabilize_variance`). The default, "sqrt",
      was chosen by measurement on the real sections shipped with msisynth (`benchmarks/measure_variance.py`,
      results in benchmarks/results/variance.json): with TIC normalisation, hotspot clipping and PCA(3), the
      spatial coherence of the PC images (correlation of neighbouring pixels) was 0.936 / 0.952 / 0.949 / 0.952
      for none / sqrt / log1p / pareto on the msight MALDI-TOF section (421 ions), 0.171 / 0.230 / 0.225 /
      0.171 on the mouse-brain amyloid-beta images, and sqrt also fitted the registered msiFlow microscopy best
      (R^2 0.004, against 0.002 with no transform; all options are near zero there). sqrt is best or tied best
      on each, spreads the PCA loadings over 31 ions instead of 9 on msight, and needs no fitted state.
    reduction: "pca", "nmf" or "none".
    n_components: k, the number of output channels of "pca" and "nmf".
    scale_quantiles: per-output-channel (low, high) quantiles mapped to [-1, 1].
    pca_method: "auto", "full" or "randomized" (see `pca`).
    nmf_iter: multiplicative update iterations, for fitting NMF and for solving new pixels' weights.
    seed: seed of the randomised PCA sketch and the NMF initialisation.
  """

  channels: str = "all"
  n_peaks: int = 100
  mz_values: tuple[float, ...] | None = None
  tol: float = 10.0
  tol_unit: str = "ppm"
  mz_mapping: str = "sum"
  normalization: str = "tic"
  hotspot_quantile: float | None = 0.99
  hotspot_nonzero: bool = True
  variance: str = "sqrt"
  reduction: str = "pca"
  n_components: int = 3
  scale_quantiles: tuple[float, float] = (0.01, 0.99)
  pca_method: str = "auto"
  nmf_iter: int = 200
  seed: int = 0

  def __post_init__(self):
    def bad(message):
      raise errors.ConfigError(f"PreprocessConfig: {message}")

    if self.channels not in CHANNEL_MODES:
      bad(f"channels must be one of {CHANNEL_MODES}, got {self.channels!r}")
    if self.mz_values is not None:
      self.mz_values = tuple(float(v) for v in np.asarray(self.mz_values, dtype=np.float64).reshape(-1))
    if self.channels == "mz":
      if not self.mz_values:
        bad('channels="mz" needs mz_values')
      values = np.asarray(self.mz_values)
      if not np.all(np.diff(values) > 0) or values.min() <= 0:
        bad(f"mz_values must be positive and strictly increasing, got {self.mz_values}")
      if float(self.tol) > 0 and self.tol_unit in TOL_UNITS:
        half = _half_window(values, float(self.tol), self.tol_unit)
        close = np.flatnonzero(np.diff(values) <= half[:-1] + half[1:])
        if close.size:
          bad(
            f"the ±{self.tol:g} {self.tol_unit} windows of mz_values {values[close[0]]} and "
            f"{values[close[0] + 1]} overlap, so they would share channels; drop one or lower tol"
          )
    if self.channels == "peaks" and int(self.n_peaks) < 1:
      bad(f"n_peaks must be >= 1, got {self.n_peaks}")
    if not float(self.tol) > 0:
      bad(f"tol must be > 0, got {self.tol}")
    if self.tol_unit not in TOL_UNITS:
      bad(f"tol_unit must be one of {TOL_UNITS}, got {self.tol_unit!r}")
    if self.mz_mapping not in ("sum", "nearest"):
      bad(f"mz_mapping must be 'sum' or 'nearest', got {self.mz_mapping!r}")
    if self.normalization not in NORMALIZATIONS:
      bad(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
    if self.hotspot_quantile is not None and not 0 < float(self.hotspot_quantile) <= 1:
      bad(f"hotspot_quantile must lie in (0, 1] or be None, got {self.hotspot_quantile}")
    if self.reduction not in REDUCTIONS:
      bad(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
    if self.variance not in VARIANCE_TRANSFORMS:
      bad(f"variance must be one of {VARIANCE_TRANSFORMS}, got {self.variance!r}")
    if self.reduction != "none" and int(self.n_components) < 1:
      bad(f"n_components must be >= 1, got {self.n_components}")
    self.scale_quantiles = tuple(float(q) for q in self.scale_quantiles)
    if len(self.scale_quantiles) != 2 or not 0 <= self.scale_quantiles[0] < self.scale_quantiles[1] <= 1:
      bad(f"scale_quantiles must be (low, high) with 0 <= low < high <= 1, got {self.scale_quantiles}")
    if self.pca_method not in PCA_METHODS:
      bad(f"pca_method must be one of {PCA_METHODS}, got {self.pca_method!r}")
    if int(self.nmf_iter) < 1:
      bad(f"nmf_iter must be >= 1, got {self.nmf_iter}")

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable options."""
    d = dataclasses.asdict(self)
    d["mz_values"] = None if self.mz_values is None else list(self.mz_values)
    d["scale_quantiles"] = list(self.scale_quantiles)
    return d


def _half_window(mz: np.ndarray, tol: float, unit: str) -> np.ndarray:
  return tol * mz * 1e-6 if unit == "ppm" else np.full_like(mz, tol)


def _effective_tol(config: PreprocessConfig, mz: np.ndarray) -> float:
  """`config.tol`, capped for channels="all" so that the window of each channel of `mz` holds only that one."""
  tol = float(config.tol)
  if config.channels != "all" or mz.size < 2:
    return tol
  gaps = np.diff(mz)
  if config.tol_unit == "ppm":
    # Each window's half-width is tol * m/z * 1e-6: bound it by the gap to the neighbour on either side.
    cap = 0.5 * float(np.min(gaps / mz[1:])) * 1e6
  else:
    cap = 0.5 * float(np.min(gaps))
  # Just under half, so that the windows of neighbouring channels do not touch.
  return min(tol, float(np.nextafter(cap, 0.0)))


def _f32_list(a: np.ndarray | None) -> list | None:
  return None if a is None else np.asarray(a, dtype=np.float32).tolist()


def _array(value, dtype, name: str, ndim: int) -> np.ndarray | None:
  if value is None:
    return None
  a = np.asarray(value, dtype=dtype)
  if a.ndim != ndim:
    raise errors.ConfigError(f"preprocessor state {name!r} must have {ndim} dimensions, got shape {a.shape}")
  return a


@dataclasses.dataclass(eq=False)
class MSIPreprocessor:
  """The MSI -> network-input transform, fitted on one section and applied unchanged to any other.

  Steps, in order: (1) channel selection — each stored m/z is mapped onto the section's m/z axis within
  `config.tol` (see `PreprocessConfig.mz_mapping`); (2) per-pixel normalisation over those channels;
  (3) hotspot clipping at per-channel thresholds, then the variance-stabilising transform; (4) projection on a
  PCA basis (after subtracting the mean), NMF weights on fixed components, or nothing; (5) per-channel linear
  scaling of the stored quantile range to [-1, 1] with clipping. Unmeasured pixels (`MSIImage.mask` False) are -1.

  `fit` learns the state below from one section; `transform` applies that state and never refits. The state is
  NumPy only, and `to_dict` / `from_dict` round-trip it exactly.

  Attributes:
    config: the options.
    mz: (C,) float64 stored channel m/z values.
    hotspot_thresholds: (C,) float32 clip levels after normalisation, or None.
    variance_scale: the state of the variance transform (`fit_variance_scale`), or None.
    mean: (C,) float32 PCA mean, or None.
    components: (k, C) float32 PCA axes or NMF component spectra, or None for reduction="none".
    explained_variance_ratio: (k,) float32 of the PCA fit, or None.
    scale_lo: (k,) float32 feature value mapped to -1.
    scale_hi: (k,) float32 feature value mapped to +1.
    fitted_on: `metadata["source"]` of the fitted section, or None.
    fitted_on_simulated: whether that section was simulated.
  """

  config: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
  mz: np.ndarray | None = None
  hotspot_thresholds: np.ndarray | None = None
  variance_scale: np.ndarray | None = None
  mean: np.ndarray | None = None
  components: np.ndarray | None = None
  explained_variance_ratio: np.ndarray | None = None
  scale_lo: np.ndarray | None = None
  scale_hi: np.ndarray | None = None
  fitted_on: str | None = None
  fitted_on_simulated: bool = False

  # -- properties ------------------------------------------------------------------------------------------------

  @property
  def is_fitted(self) -> bool:
    return self.mz is not None and self.scale_lo is not None

  @property
  def num_output_channels(self) -> int:
    """k, the channel count of `transform`'s output."""
    self._check_fitted()
    return int(self.scale_lo.shape[0])

  def required_mz(self) -> tuple[np.ndarray, float, str]:
    """The m/z values a section must cover, with the tolerance in use and its unit ("ppm" or "da").

    A caller can read only these from an imzML, `read_imzml(path, mz_values=mz, tol=tol, tol_unit=unit)`, and
    `transform` gives the same result on that as on the whole file (with mz_mapping="sum").

    Raises:
      ConfigError: when not fitted.
    """
    self._check_fitted()
    return self.mz.copy(), self.tol, self.config.tol_unit

  @property
  def tol(self) -> float:
    """The tolerance in use: `config.tol`, capped for channels="all" at half the spacing of the stored m/z."""
    self._check_fitted()
    return _effective_tol(self.config, self.mz)

  # -- fitting and applying ----------------------------------------------------------------------------------------

  def fit(self, msi: MSIImage | Any, mask: np.ndarray | None = None) -> MSIPreprocessor:
    """Fits channel m/z, hotspot thresholds, basis and output scaling on one section.

    A `msisynth.io.SparseMSI` (processed data too large for a dense cube of every bin) works too, with
    channels="peaks" (peaks of its mean spectrum, `SparseMSI.pick_peaks`: smoothing, MAD noise, SNR, present in
    >= 1 % of the pixels, the `n_peaks` strongest, at least 2 * `tol` apart; picked on the raw rather than the
    normalised mean spectrum) or channels="mz": only those channels are made dense (`SparseMSI.to_msi` with
    `tol`), then fitted as an `MSIImage`.

    Args:
      msi: the section, an `MSIImage` or a `SparseMSI`.
      mask: optional bool (H, W) restricting the pixels fitted on (e.g. tissue), intersected with `msi.mask`.

    Returns:
      self, fitted. A fit that raises leaves it unfitted.

    Raises:
      ConfigError: when `mask` has the wrong shape, or k exceeds the channels or pixels available.
      DataError: naming the file, when the section has no usable pixels, NaN/Inf or negative intensities
        where the options need non-negative ones, no peaks, or an m/z outside its axis.
    """
    cfg = self.config
    chosen_mz = None
    if _is_sparse(msi):
      msi, chosen_mz = self._dense_from_sparse(msi)
    source = self._check_msi(msi)
    fit_mask = msi.mask.copy()
    if mask is not None:
      mask = np.asarray(mask, dtype=bool)
      if mask.shape != msi.mask.shape:
        raise errors.ConfigError(f"fit mask shape {mask.shape} != image shape {msi.mask.shape}")
      fit_mask &= mask
    if not fit_mask.any():
      raise errors.DataError("no measured pixels to fit the preprocessing on", source)

    # A fit that fails part way leaves the preprocessor unfitted rather than with a mix of old and new state.
    self.mz = self.hotspot_thresholds = self.mean = self.components = self.explained_variance_ratio = None
    self.variance_scale = None
    self.scale_lo = self.scale_hi = self.fitted_on = None
    with _data_errors_from(source):
      if chosen_mz is not None:
        mz = chosen_mz
      elif cfg.channels == "all":
        mz = msi.mz.copy()
      elif cfg.channels == "mz":
        mz = np.asarray(cfg.mz_values, dtype=np.float64)
      else:
        spectrum = mean_spectrum(normalize(msi.cube, cfg.normalization, msi.mask), fit_mask)
        distance = {"min_distance_ppm" if cfg.tol_unit == "ppm" else "min_distance_da": 2 * cfg.tol}
        peaks = pick_peaks(msi.mz, np.asarray(spectrum), cfg.n_peaks, **distance)
        if peaks.size == 0:
          raise errors.DataError("the mean spectrum has no peaks to select channels from", source)
        mz = msi.mz[peaks]
      self.mz = mz
      self.fitted_on = source
      self.fitted_on_simulated = bool(msi.metadata.get("simulated", False))

      x = self._normalized(msi)
      if cfg.hotspot_quantile is not None:
        self.hotspot_thresholds = np.asarray(
          hotspot_thresholds(x, cfg.hotspot_quantile, fit_mask, nonzero=cfg.hotspot_nonzero), np.float32
        )
        x = clip_hotspots(x, self.hotspot_thresholds, msi.mask)
      if self._stabilizes:
        self.variance_scale = fit_variance_scale(x, cfg.variance, fit_mask)
        x = stabilize_variance(x, cfg.variance, self.variance_scale, msi.mask)

      n_fit, n_channels = int(fit_mask.sum()), int(mz.size)
      if cfg.reduction != "none" and cfg.n_components > (
        n_channels if cfg.reduction == "nmf" else min(n_fit, n_channels)
      ):
        raise errors.ConfigError(
          f"n_components={cfg.n_components} exceeds what {n_channels} channels and {n_fit} pixels allow "
          f"(fitting {source})"
        )
      if cfg.reduction == "pca":
        result = pca(x, cfg.n_components, mask=fit_mask, method=cfg.pca_method, key=jax.random.key(cfg.seed))
        self.mean = np.asarray(result.mean, np.float32)
        self.components = np.asarray(result.components, np.float32)
        self.explained_variance_ratio = np.asarray(result.explained_variance_ratio, np.float32)
      elif cfg.reduction == "nmf":
        result = nmf(x, cfg.n_components, n_iter=cfg.nmf_iter, seed=cfg.seed, mask=fit_mask)
        self.components = np.asarray(result.h, np.float32)

      # The scaling is fitted on exactly what `transform` computes, so fit_transform == transform on this section.
      features = self._features(x, msi.mask)
      lo, hi = fit_range(features, cfg.scale_quantiles, fit_mask)
      self.scale_lo, self.scale_hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    return self

  def transform(self, msi: MSIImage) -> np.ndarray:
    """Applies the stored transform to a section (never refits).

    Args:
      msi: any section whose m/z axis covers every stored channel within the tolerance.

    Returns:
      float32 (H, W, k) in [-1, 1]; unmeasured pixels are -1.

    Raises:
      ConfigError: when not fitted.
      DataError: naming the file, when stored m/z values have no channel within the tolerance (listing them),
        or the cube holds NaN/Inf or negative intensities where the options need non-negative ones.
    """
    self._check_fitted()
    if _is_sparse(msi):
      mz, tol, unit = self.required_mz()
      msi = msi.to_msi(mz, tol, unit, max_cube_gib=None)
    source = self._check_msi(msi)
    with _data_errors_from(source):
      x = self._normalized(msi)
      if self.hotspot_thresholds is not None:
        x = clip_hotspots(x, self.hotspot_thresholds, msi.mask)
      if self._stabilizes:
        x = stabilize_variance(x, self.config.variance, self.variance_scale, msi.mask)
      features = self._features(x, msi.mask)
      out = apply_range(features, self.scale_lo, self.scale_hi, -1.0, 1.0, mask=msi.mask)
    return np.asarray(out, dtype=np.float32)

  def fit_transform(self, msi: MSIImage, mask: np.ndarray | None = None) -> np.ndarray:
    """`fit(msi, mask)` then `transform(msi)`."""
    return self.fit(msi, mask).transform(msi)

  def select_channels(self, msi: MSIImage) -> np.ndarray:
    """The stored channels read from a section: (H, W, C) float32, before normalisation.

    Raises:
      ConfigError: when not fitted.
      DataError: naming the file and the missing m/z values, when some stored channel has no channel of the
        section within the tolerance.
    """
    self._check_fitted()
    return self._select(msi, self._check_msi(msi))

  # -- internals ---------------------------------------------------------------------------------------------------

  @property
  def _stabilizes(self) -> bool:
    """The variance transform prepares a reduction; without one the channels are scaled as they are."""
    return self.config.variance != "none" and self.config.reduction != "none"

  def _check_fitted(self) -> None:
    if not self.is_fitted:
      raise errors.ConfigError("MSIPreprocessor is not fitted: call fit() or load a fitted state")

  def _dense_from_sparse(self, sparse) -> tuple[MSIImage, np.ndarray]:
    """The channels to fit on, made dense from a SparseMSI: (MSIImage of those channels, their m/z)."""
    cfg = self.config
    source = sparse.metadata.get("source")
    if cfg.channels == "all":
      raise errors.ConfigError(
        'channels="all" needs a dense MSIImage; fit a SparseMSI with channels="peaks" or channels="mz"'
      )
    if cfg.channels == "mz":
      mz = np.asarray(cfg.mz_values, dtype=np.float64)
    else:
      found = sparse.pick_peaks(top_n=None)
      if len(found) == 0:
        raise errors.DataError("the mean spectrum has no peaks to select channels from", source)
      order = np.argsort(-found.intensity, kind="stable")
      taken: list[float] = []
      for i in order.tolist():
        m = float(found.mz[i])
        half = _half_window(np.asarray([m]), 2 * cfg.tol, cfg.tol_unit)[0]
        if all(abs(m - t) >= half for t in taken):
          taken.append(m)
        if len(taken) == cfg.n_peaks:
          break
      mz = np.sort(np.asarray(taken))
    return sparse.to_msi(mz, cfg.tol, cfg.tol_unit, max_cube_gib=None), mz

  @staticmethod
  def _check_msi(msi: MSIImage) -> str | None:
    if not isinstance(msi, MSIImage):
      raise errors.ConfigError(f"expected an MSIImage, got {type(msi).__name__}")
    return msi.metadata.get("source")

  def _select(self, msi: MSIImage, source: str | None) -> np.ndarray:
    cfg = self.config
    axis = msi.mz
    tol = _effective_tol(cfg, self.mz)
    half = _half_window(self.mz, tol, cfg.tol_unit)
    left = np.searchsorted(axis, self.mz - half, side="left")
    right = np.searchsorted(axis, self.mz + half, side="right")
    missing = right <= left
    if missing.any():
      values = ", ".join(f"{v:.4f}" for v in self.mz[missing][:20])
      more = f" and {int(missing.sum()) - 20} more" if missing.sum() > 20 else ""
      span = f"{axis[0]:.4f}-{axis[-1]:.4f}" if axis.size else "empty"
      raise errors.DataError(
        f"{int(missing.sum())} of the {self.mz.size} m/z channels the preprocessing was fitted on have no "
        f"channel within ±{tol:g} {cfg.tol_unit} in this file (its m/z axis spans {span}): {values}{more}",
        source,
      )
    cube = msi.cube
    if cfg.mz_mapping == "nearest" or np.all(right - left == 1):
      # Some channel lies in every window, so the nearest channel of the whole axis lies in the window too.
      upper = (
        np.clip(np.searchsorted(axis, self.mz), 1, axis.size - 1)
        if axis.size > 1
        else np.zeros(self.mz.size, dtype=np.int64)
      )
      lower = np.maximum(upper - 1, 0)
      nearest = np.where(np.abs(axis[upper] - self.mz) < np.abs(axis[lower] - self.mz), upper, lower)
      return np.asarray(cube[..., nearest], dtype=np.float32)
    out = np.empty(cube.shape[:2] + (self.mz.size,), dtype=np.float32)
    for j, (a, b) in enumerate(zip(left, right)):
      out[..., j] = cube[..., a:b].sum(axis=-1, dtype=np.float64) if b - a > 1 else cube[..., a]
    return out

  def _normalized(self, msi: MSIImage) -> jax.Array:
    return normalize(self._select(msi, msi.metadata.get("source")), self.config.normalization, msi.mask)

  def _features(self, x: jax.Array, mask: np.ndarray) -> jax.Array:
    if self.config.reduction == "pca":
      return pca_transform(x, self.components, self.mean, mask=mask)
    if self.config.reduction == "nmf":
      return nmf_transform(x, self.components, n_iter=self.config.nmf_iter, mask=mask)
    return x

  # -- serialisation ---------------------------------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable description: format, version, config, and the fitted state (None before fitting).

    Arrays become (nested) lists of Python floats that convert back to the same float32/float64 values.
    """
    state = None
    if self.is_fitted:
      state = {
        "mz": np.asarray(self.mz, np.float64).tolist(),
        "hotspot_thresholds": _f32_list(self.hotspot_thresholds),
        "variance_scale": _f32_list(self.variance_scale),
        "mean": _f32_list(self.mean),
        "components": _f32_list(self.components),
        "explained_variance_ratio": _f32_list(self.explained_variance_ratio),
        "scale_lo": _f32_list(self.scale_lo),
        "scale_hi": _f32_list(self.scale_hi),
        "fitted_on": self.fitted_on,
        "fitted_on_simulated": bool(self.fitted_on_simulated),
      }
    return {
      "format": PREPROCESSOR_FORMAT,
      "version": PREPROCESSOR_VERSION,
      "config": self.config.to_dict(),
      "state": state,
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> MSIPreprocessor:
    """Rebuilds a preprocessor from `to_dict`'s output.

    Raises:
      ConfigError: when `d` is not a preprocessor description of a known version, or its state is inconsistent.
    """
    if not isinstance(d, dict) or d.get("format") != PREPROCESSOR_FORMAT:
      raise errors.ConfigError(f"not an MSIPreprocessor description (format {PREPROCESSOR_FORMAT!r} expected)")
    if d.get("version") != PREPROCESSOR_VERSION:
      raise errors.ConfigError(
        f"MSIPreprocessor description version {d.get('version')!r} is not supported (this is version "
        f"{PREPROCESSOR_VERSION})"
      )
    try:
      # Descriptions written before these options existed meant the behaviour of that time.
      config = PreprocessConfig(**{"variance": "none", "hotspot_nonzero": False, **d["config"]})
    except (KeyError, TypeError) as e:
      raise errors.ConfigError(f"invalid MSIPreprocessor config: {e}") from e
    self = cls(config=config)
    state = d.get("state")
    if state is None:
      return self
    try:
      self.mz = _array(state["mz"], np.float64, "mz", 1)
      self.hotspot_thresholds = _array(state.get("hotspot_thresholds"), np.float32, "hotspot_thresholds", 1)
      self.variance_scale = _array(state.get("variance_scale"), np.float32, "variance_scale", 1)
      self.mean = _array(state.get("mean"), np.float32, "mean", 1)
      self.components = _array(state.get("components"), np.float32, "components", 2)
      self.explained_variance_ratio = _array(
        state.get("explained_variance_ratio"), np.float32, "explained_variance_ratio", 1
      )
      self.scale_lo = _array(state["scale_lo"], np.float32, "scale_lo", 1)
      self.scale_hi = _array(state["scale_hi"], np.float32, "scale_hi", 1)
      self.fitted_on = state.get("fitted_on")
      self.fitted_on_simulated = bool(state.get("fitted_on_simulated", False))
    except (KeyError, TypeError, ValueError) as e:
      raise errors.ConfigError(f"invalid MSIPreprocessor state: {e}") from e
    self._check_state()
    return self

  def _check_state(self) -> None:
    c = self.mz.size
    k = self.scale_lo.size
    problems = []
    if self.hotspot_thresholds is not None and self.hotspot_thresholds.shape != (c,):
      problems.append(f"hotspot_thresholds {self.hotspot_thresholds.shape} != ({c},)")
    want = {"pareto": (c,), "log1p": (1,)}.get(self.config.variance) if self._stabilizes else None
    got = None if self.variance_scale is None else self.variance_scale.shape
    if got != want:
      problems.append(f"variance_scale {got} != {want} for variance={self.config.variance!r}")
    if self.config.reduction in ("pca", "nmf"):
      if self.components is None or self.components.shape != (k, c):
        problems.append(f"components {None if self.components is None else self.components.shape} != ({k}, {c})")
    elif k != c:
      problems.append(f"scale_lo has {k} entries but there are {c} channels")
    if self.config.reduction == "pca" and (self.mean is None or self.mean.shape != (c,)):
      problems.append(f"mean {None if self.mean is None else self.mean.shape} != ({c},)")
    if self.scale_hi.shape != (k,):
      problems.append(f"scale_hi {self.scale_hi.shape} != ({k},)")
    if problems:
      raise errors.ConfigError("inconsistent MSIPreprocessor state: " + "; ".join(problems))

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Writes `to_dict()` as JSON.

    Args:
      path: the JSON file; parent folders are created.
      overwrite: replace an existing file.

    Returns:
      The path written.

    Raises:
      OutputExistsError: when the file exists and `overwrite` is False.
    """
    path = outputs.refuse_existing(path, overwrite=overwrite)
    outputs.atomic_write(path, json.dumps(self.to_dict()))
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> MSIPreprocessor:
    """Reads a preprocessor written by `save`.

    Raises:
      DataError: naming the file, when it is missing, not JSON, or not a valid preprocessor description.
    """
    path = pathlib.Path(path)
    try:
      d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise errors.DataError(f"cannot read a preprocessor description: {e}", path) from e
    try:
      return cls.from_dict(d)
    except errors.ConfigError as e:
      raise errors.DataError(str(e), path) from e


def _is_sparse(x) -> bool:
  # Checked by duck type, so that preprocess does not import msisynth.io.
  return all(hasattr(x, a) for a in ("indptr", "to_msi", "pick_peaks")) and not isinstance(x, MSIImage)


@contextlib.contextmanager
def _data_errors_from(source: str | None):
  """Adds the file name to DataErrors that the array functions raise without one."""
  try:
    yield
  except errors.DataError as e:
    if e.path is None and source:
      raise errors.DataError(str(e), source) from e
    raise
