"""Figures of training progress: image grids of MSI input, real H&E and synthetic H&E.

Layout: NHWC arrays in [-1, 1] (network tensors), as the training loop holds them.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from msisynth import errors, outputs


def msi_preview(msi: np.ndarray) -> np.ndarray:
  """An RGB preview in [0, 1] of MSI network inputs: the first three channels, or the first one in grey.

  Args:
    msi: (..., H, W, k) in [-1, 1].

  Returns:
    (..., H, W, 3) float32 in [0, 1].
  """
  msi = np.asarray(msi, np.float32)
  rgb = msi[..., :3] if msi.shape[-1] >= 3 else np.repeat(msi[..., :1], 3, axis=-1)
  return np.clip((rgb + 1.0) / 2.0, 0.0, 1.0)


def image_grid(msi: np.ndarray, real: np.ndarray, fake: np.ndarray, max_items: int = 4) -> np.ndarray:
  """A (rows·H, 3·W, 3) image: per row the MSI preview, the real and the synthetic H&E.

  Args:
    msi: (B, H, W, k) MSI in [-1, 1].
    real: (B, H, W, 3) real H&E in [-1, 1].
    fake: (B', H, W, 3) synthetic H&E in [-1, 1]; rows = min(B, B', max_items).
    max_items: at most this many rows.

  Returns:
    float32 RGB in [0, 1].

  Raises:
    ConfigError: when the spatial shapes differ.
  """
  msi, real, fake = (np.asarray(a, np.float32) for a in (msi, real, fake))
  if not (msi.shape[1:3] == real.shape[1:3] == fake.shape[1:3]):
    raise errors.ConfigError(f"image grid needs one patch size, got {msi.shape}, {real.shape}, {fake.shape}")
  n = min(len(msi), len(real), len(fake), max_items)
  rows = [
    np.concatenate([msi_preview(msi[i]), np.clip((real[i] + 1) / 2, 0, 1), np.clip((fake[i] + 1) / 2, 0, 1)], axis=1)
    for i in range(n)
  ]
  return np.concatenate(rows, axis=0)


def save_image_grid(
  path: str | os.PathLike,
  msi: np.ndarray,
  real: np.ndarray,
  fake: np.ndarray,
  *,
  max_items: int = 4,
  title: str | None = None,
  target_name: str = "H&E",
) -> None:
  """Saves `image_grid` as a PNG with column titles (MSI, real and synthetic target).

  Args:
    path: output .png; its folder is created.
    msi, real, fake: see `image_grid`.
    max_items: at most this many rows.
    title: figure title (say "simulated" for simulated data).
    target_name: what the network synthesises ("H&E", or "microscopy" for the msiFlow pair).
  """
  grid = image_grid(msi, real, fake, max_items)
  os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
  height, width = grid.shape[:2]
  scale = 4.0 / max(width, 1)
  # A bare Figure (no pyplot) draws with Agg and leaves the user's backend and open figures alone.
  fig = Figure(figsize=(max(4.0, width * scale * 1.5), max(1.5, height * scale * 1.5) + 0.5))
  ax = fig.subplots()
  ax.imshow(grid, interpolation="nearest")
  ax.set_xticks([width * (i + 0.5) / 3 for i in range(3)])
  ax.set_xticklabels(["MSI (first channels)", f"real {target_name}", f"synthetic {target_name}"])
  ax.set_yticks([])
  if title:
    ax.set_title(title)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=100)
