"""Figures of registration results: checkerboards, colour overlays and landmarks.

Every function builds a `matplotlib.figure.Figure` drawn by the Agg canvas without touching pyplot's global state.
Images are (H, W) grey or (H, W, 3) RGB arrays on one grid (the fixed grid once warped); each is scaled to [0, 1]
for display by its 1st and 99th percentiles. With `pixel_size_um` the axes are in µm, else in pixels. Figures of
simulated data say "(simulated)" in their title (`simulated=True`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from msisynth import errors
from msisynth.geometry.transforms import AffineTransform, pixel_size_yx


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _title(title: str | None, default: str, simulated: bool) -> str:
  text = default if title is None else title
  if simulated and "simulated" not in text.lower():
    text = f"{text} (simulated)"
  return text


def _display(image) -> np.ndarray:
  """(H, W, 3) float in [0, 1] for display."""
  img = np.asarray(image, np.float64)
  if img.ndim == 3 and img.shape[2] == 1:
    img = img[..., 0]
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=2)
  if img.ndim != 3 or img.shape[2] != 3:
    raise errors.ConfigError(f"an image to show must be (H, W), (H, W, 1) or (H, W, 3), got shape {img.shape}")
  finite = img[np.isfinite(img)]
  if finite.size == 0:
    return np.zeros(img.shape)
  lo, hi = np.percentile(finite, [1, 99])
  if hi <= lo:
    lo, hi = float(finite.min()), float(finite.max()) if finite.max() > finite.min() else float(finite.min()) + 1
  return np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0, 1)


def _grey(image) -> np.ndarray:
  return _display(image).mean(axis=2)


def _same_shape(a, b, names=("fixed", "warped")):
  if np.shape(a)[:2] != np.shape(b)[:2]:
    raise errors.ConfigError(f"{names[0]} and {names[1]} must share a grid, got {np.shape(a)} and {np.shape(b)}")


def _extent(shape, pixel_size_um):
  if pixel_size_um is None:
    return None, "x (pixels)", "y (pixels)"
  py, px = pixel_size_yx(pixel_size_um)
  # Pixel centres at (c·px, r·py): edges half a pixel out.
  return [-0.5 * px, (shape[1] - 0.5) * px, (shape[0] - 0.5) * py, -0.5 * py], "x (µm)", "y (µm)"


def _show(ax, image, pixel_size_um, title):
  extent, xlabel, ylabel = _extent(image.shape, pixel_size_um)
  ax.imshow(image, extent=extent, interpolation="nearest")
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)


def checkerboard(fixed, warped, tiles: int = 8) -> np.ndarray:
  """Interleaves two images on one grid in a `tiles` × `tiles` checkerboard (fixed in the top-left tile).

  Args:
    fixed: (H, W) or (H, W, 3) image.
    warped: image of the same height and width (the moving image resampled onto the fixed grid).
    tiles: tiles along each side.

  Returns:
    (H, W, 3) float64 in [0, 1], each image scaled for display.

  Raises:
    ConfigError: when the grids differ or tiles < 1.
  """
  _same_shape(fixed, warped)
  if tiles < 1:
    raise errors.ConfigError(f"tiles must be >= 1, got {tiles}")
  a, b = _display(fixed), _display(warped)
  h, w = a.shape[:2]
  rows = (np.arange(h) * tiles // h)[:, None]
  cols = (np.arange(w) * tiles // w)[None, :]
  pick = ((rows + cols) % 2 == 1)[..., None]
  return np.where(pick, b, a)


def overlay(fixed, warped, *, invert: bool | None = None) -> np.ndarray:
  """A magenta (fixed) / green (warped) composite: aligned structure is grey-white, misalignment coloured.

  Args:
    fixed: (H, W) or (H, W, 3) image.
    warped: image on the same grid.
    invert: draw dark structure bright (brightfield images such as H&E on a white slide); None decides from the
      fixed image's border (bright border → invert).

  Returns:
    (H, W, 3) float64 in [0, 1].
  """
  _same_shape(fixed, warped)
  a, b = _grey(fixed), _grey(warped)
  if invert is None:
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    invert = bool(np.median(border) > 0.5)
  if invert:
    a, b = 1 - a, 1 - b
  return np.stack([a, b, a], axis=-1)


def plot_checkerboard(fixed, warped, *, tiles: int = 8, title: str | None = None, pixel_size_um=None,
                      simulated: bool = False) -> Figure:  # fmt: skip
  """A checkerboard of the fixed image and the warped moving image.

  Args:
    fixed: (H, W) or (H, W, 3) image.
    warped: image on the same grid.
    tiles: tiles along each side.
    title: figure title.
    pixel_size_um: fixed pixel size for µm axes (float or (y, x)); pixels when None.
    simulated: add "(simulated)" to the title.

  Returns:
    The figure.
  """
  board = checkerboard(fixed, warped, tiles)
  fig = _new_figure(6, 6 * board.shape[0] / max(board.shape[1], 1) + 0.6)
  _show(fig.add_subplot(), board, pixel_size_um, _title(title, "Checkerboard: fixed / warped moving", simulated))
  return fig


def plot_checkerboard_before_after(fixed, moving_resampled_before, warped_after, *, tiles: int = 8,
                                   titles: Sequence[str] = ("Before registration", "After registration"),
                                   pixel_size_um=None, simulated: bool = False) -> Figure:  # fmt: skip
  """Checkerboards before (moving resampled with the identity or the initial transform) and after registration.

  Args:
    fixed: (H, W) or (H, W, 3) image.
    moving_resampled_before: the moving image on the fixed grid before registration.
    warped_after: the moving image on the fixed grid through the registration's transform.
    tiles: tiles along each side.
    titles: the two panel titles.
    pixel_size_um: fixed pixel size for µm axes; pixels when None.
    simulated: add "(simulated)" to the titles.

  Returns:
    The figure.
  """
  before = checkerboard(fixed, moving_resampled_before, tiles)
  after = checkerboard(fixed, warped_after, tiles)
  fig = _new_figure(11, 5.5 * before.shape[0] / max(before.shape[1], 1) + 0.8)
  axes = fig.subplots(1, 2)
  for ax, board, title in zip(axes, (before, after), titles):
    _show(ax, board, pixel_size_um, _title(title, title, simulated))
  return fig


def plot_overlay(fixed, warped, *, title: str | None = None, pixel_size_um=None, invert: bool | None = None,
                 simulated: bool = False) -> Figure:  # fmt: skip
  """The magenta/green overlay of `overlay` as a figure.

  Args:
    fixed: (H, W) or (H, W, 3) image (magenta).
    warped: image on the same grid (green).
    title: figure title.
    pixel_size_um: fixed pixel size for µm axes; pixels when None.
    invert: see `overlay`.
    simulated: add "(simulated)" to the title.

  Returns:
    The figure.
  """
  composite = overlay(fixed, warped, invert=invert)
  fig = _new_figure(6, 6 * composite.shape[0] / max(composite.shape[1], 1) + 0.6)
  _show(fig.add_subplot(), composite, pixel_size_um,
        _title(title, "Overlay: fixed (magenta), warped moving (green)", simulated))  # fmt: skip
  return fig


def plot_landmarks(fixed, moving, fixed_points_um, moving_points_um, *, transform: AffineTransform | None = None,
                   fixed_pixel_size_um=1.0, moving_pixel_size_um=1.0, title: str | None = None,
                   simulated: bool = False) -> Figure:  # fmt: skip
  """Landmarks on both images, and with a transform their residuals in the fixed image.

  Left: the fixed image with its landmarks (circles) and, given `transform` (FIXED → MOVING), the moving landmarks
  carried into the fixed image by its inverse (crosses) joined to their matches. Right: the moving image with its
  landmarks.

  Args:
    fixed: (H, W) or (H, W, 3) fixed image.
    moving: (H', W') or (H', W', 3) moving image.
    fixed_points_um: (N, 2) (x, y) µm in the fixed image.
    moving_points_um: (N, 2) matching (x, y) µm in the moving image.
    transform: optional registration result.
    fixed_pixel_size_um: fixed pixel size, float or (y, x).
    moving_pixel_size_um: moving pixel size, float or (y, x).
    title: figure title.
    simulated: add "(simulated)" to the title.

  Returns:
    The figure.

  Raises:
    ConfigError: when the point arrays are not (N, 2) of one N.
  """
  f = np.asarray(fixed_points_um, np.float64)
  m = np.asarray(moving_points_um, np.float64)
  if f.ndim != 2 or f.shape[1] != 2 or f.shape != m.shape:
    raise errors.ConfigError(f"landmarks must be two (N, 2) arrays of one N, got {f.shape} and {m.shape}")
  fig = _new_figure(11, 5.5)
  ax_f, ax_m = fig.subplots(1, 2)
  _show(ax_f, _display(fixed), fixed_pixel_size_um, "Fixed")
  _show(ax_m, _display(moving), moving_pixel_size_um, "Moving")
  ax_f.plot(f[:, 0], f[:, 1], "o", mfc="none", mec="tab:cyan", label="fixed landmarks")
  ax_m.plot(m[:, 0], m[:, 1], "o", mfc="none", mec="tab:orange", label="moving landmarks")
  if transform is not None:
    if isinstance(transform, AffineTransform):
      inv = np.linalg.inv(np.asarray(transform.matrix, np.float64))
      back = m @ inv[:2, :2].T + inv[:2, 2]
    else:  # a deformable transform: its inverse is solved numerically
      back = np.asarray(transform.inverse().apply(m), np.float64)
    ax_f.plot(back[:, 0], back[:, 1], "x", color="tab:orange", label="moving landmarks, registered")
    for p, q in zip(f, back):
      ax_f.plot([p[0], q[0]], [p[1], q[1]], "-", color="yellow", lw=1)
  for ax in (ax_f, ax_m):
    ax.legend(loc="lower right", fontsize="small")
  fig.suptitle(_title(title, "Landmarks", simulated))
  return fig
