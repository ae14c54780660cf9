"""Image helpers of the evaluations: one PCA, the TIC image, NCC, grey levels and block reduction.

Layout: images (H, W) or (H, W, C) float; masks (H, W) bool; MSI as `msisynth.MSIImage`.
"""

from __future__ import annotations

import math

import numpy as np

from msisynth import errors


def principal_components(x: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
  """The first `k` principal component scores of an (H, W, C) image, fitted on the pixels inside `mask`.

  Components beyond C are copies of the first (so k = 3 always gives an RGB-shaped result).

  Raises:
    DataError: when the mask selects fewer than 2 pixels.
  """
  x = np.asarray(x, np.float64)
  m = np.asarray(mask, bool)
  pixels = x[m] if m.any() else x.reshape(-1, x.shape[-1])
  if len(pixels) < 2:
    raise errors.DataError(f"PCA needs at least 2 pixels, got {len(pixels)}")
  mean = pixels.mean(axis=0)
  _, _, vt = np.linalg.svd(pixels - mean, full_matrices=False)
  scores = (x - mean) @ vt[:k].T
  if scores.shape[-1] < k:
    scores = np.concatenate([scores, np.repeat(scores[..., :1], k - scores.shape[-1], axis=-1)], axis=-1)
  return scores


def scale_percentiles(scores: np.ndarray, mask: np.ndarray, lo: float = 1, hi: float = 99) -> np.ndarray:
  """Each channel of `scores` mapped to [0, 1] by its `lo`-`hi` percentiles inside `mask`, clipped."""
  m = np.asarray(mask, bool)
  ref = scores[m] if m.any() else scores.reshape(-1, scores.shape[-1])
  a, b = np.percentile(ref, lo, axis=0), np.percentile(ref, hi, axis=0)
  return np.clip((scores - a) / np.maximum(b - a, 1e-12), 0, 1)


def msi_rgb(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The first three principal components of an (H, W, k) MSI as RGB in [0, 1] (1st-99th percentile)."""
  return scale_percentiles(principal_components(x, mask, 3), mask)


def first_pc(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The first principal component of an (H, W, k) image in [0, 1] (1st-99th percentile), float32."""
  return scale_percentiles(principal_components(x, mask, 1), mask)[..., 0].astype(np.float32)


def tic_image(msi) -> np.ndarray:
  """The TIC image of an MSIImage scaled to [0, 1] by its 99th percentile over the measured pixels, float32."""
  tic = np.asarray(msi.cube, np.float64).sum(axis=-1)
  top = float(np.percentile(tic[msi.mask], 99)) if msi.mask.any() else float(tic.max())
  return np.clip(tic / max(top, 1e-12), 0, 1).astype(np.float32)


def grey_mean(image: np.ndarray) -> np.ndarray:
  """Grey level as the mean of the channels (for microscopy, whose channels are not RGB)."""
  image = np.asarray(image, np.float32)
  return image.mean(axis=-1) if image.ndim == 3 else image


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  """Normalised cross-correlation of two images over `mask`."""
  a, b = a[mask].astype(np.float64), b[mask].astype(np.float64)
  a, b = a - a.mean(), b - b.mean()
  return float(np.sum(a * b) / max(math.sqrt(np.sum(a * a) * np.sum(b * b)), 1e-12))


def block_reduce(image: np.ndarray, factor: int) -> np.ndarray:
  """Block mean of an (H, W, C) image by an integer factor (area-preserving reduction; the remainder is cut)."""
  if factor == 1:
    return image
  h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
  return image[:h, :w].reshape(h // factor, factor, w // factor, factor, -1).mean(axis=(1, 3))
