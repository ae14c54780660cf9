"""A closed-form baseline: ridge regression from hand-made MSI features to RGB, pixel by pixel.

Features per pixel of the pair grid: the k network-input channels, the same smoothed at σ = 1, 2 and 4 MSI pixels,
the gradient magnitude of each smoothed channel at σ = 2, and a constant: 5k + 1 features. A network that does not
beat this on a benchmark has not shown that it learned more than a smooth, local colour map.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from msisynth import errors


def ridge_features(msi_input: np.ndarray, upsample: int) -> np.ndarray:
  """(H, W, 5k + 1) features of an (H, W, k) network input on a grid upsampled by `upsample`."""
  x = np.asarray(msi_input, np.float64)
  feats = [x]
  for s in (1, 2, 4):
    feats.append(ndimage.gaussian_filter(x, (s * upsample, s * upsample, 0), mode="nearest"))
  smooth = feats[2]
  grad = np.sqrt(ndimage.sobel(smooth, axis=0) ** 2 + ndimage.sobel(smooth, axis=1) ** 2)
  feats.append(grad)
  feats.append(np.ones(x.shape[:2] + (1,)))
  return np.concatenate(feats, axis=-1)


def fit_ridge(pairs, upsample: int, *, alpha: float = 1.0, max_pixels: int = 200_000, seed: int = 0) -> np.ndarray:
  """Ridge weights (F, 3) from the masked pixels of `pairs` (subsampled to `max_pixels`), closed form.

  Raises:
    DataError: when the pairs hold no masked pixel.
  """
  rng = np.random.default_rng(seed)
  xs, ys = [], []
  for p in pairs:
    f = ridge_features(p.msi, upsample)
    m = np.asarray(p.mask, bool)
    xs.append(f[m])
    ys.append(np.asarray(p.histology, np.float64)[m])
  x, y = np.concatenate(xs), np.concatenate(ys)
  if len(x) == 0:
    raise errors.DataError("ridge baseline: no masked pixels to fit on")
  if len(x) > max_pixels:
    keep = rng.choice(len(x), max_pixels, replace=False)
    x, y = x[keep], y[keep]
  reg = alpha * np.eye(x.shape[1])
  reg[-1, -1] = 0.0  # the intercept is not shrunk
  return np.linalg.solve(x.T @ x + reg, x.T @ y)


def predict_ridge(weights: np.ndarray, msi_input: np.ndarray, upsample: int) -> np.ndarray:
  """(H, W, 3) RGB in [0, 1] predicted from an (H, W, k) network input."""
  return np.clip(ridge_features(msi_input, upsample) @ weights, 0, 1).astype(np.float32)
