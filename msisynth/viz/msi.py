"""Figures of MSI data: ion images, PCA scores, the mean spectrum.

Every function builds a `matplotlib.figure.Figure` drawn by the Agg canvas without touching pyplot's global
state (no backend switch, nothing left open), so it works the same in scripts, tests and notebooks. Images are
(H, W) or (H, W, k) like every image in msisynth (row = y, column = x); unmeasured pixels are drawn grey.
Figures of simulated data say "(simulated)" in their title (see docs/architecture.md).
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from msisynth import errors, geometry, outputs, preprocess
from msisynth.types import MSIImage

UNMEASURED_GREY = 0.75
"""Grey level of unmeasured pixels."""


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _with_simulated(title: str, simulated: bool) -> str:
  if simulated and "simulated" not in title.lower():
    return f"{title} (simulated)"
  return title


def _check_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
  if mask is None:
    return np.ones(shape, dtype=bool)
  mask = np.asarray(mask, dtype=bool)
  if mask.shape != shape:
    raise errors.ConfigError(f"mask shape {mask.shape} != image shape {shape}")
  return mask


def _masked_cmap(name: str):
  return matplotlib.colormaps[name].with_extremes(bad=str(UNMEASURED_GREY))


def _default_channels(msi: MSIImage, n: int) -> np.ndarray:
  """The `n` strongest peaks of the mean spectrum, topped up with the most intense channels if there are fewer."""
  spectrum = msi.cube[msi.mask].mean(axis=0) if msi.mask.any() else np.zeros(msi.num_channels)
  chosen = list(preprocess.pick_peaks(msi.mz, spectrum, n))
  for idx in np.argsort(-spectrum, kind="stable"):
    if len(chosen) >= min(n, msi.num_channels):
      break
    if idx not in chosen:
      chosen.append(int(idx))
  return np.sort(np.asarray(chosen, dtype=np.int64))


def plot_ion_images(
  msi: MSIImage,
  mz_values: Sequence[float] | None = None,
  *,
  n: int = 6,
  ncols: int = 3,
  title: str | None = None,
  quantile: float = 0.99,
  cmap: str = "viridis",
) -> Figure:
  """Ion images in a grid, each clipped at its hotspot quantile, with a colour bar.

  Args:
    msi: the MSI image.
    mz_values: m/z values to show (the nearest channel of each); None shows the `n` strongest peaks of the mean
      spectrum of the measured pixels.
    n: how many ion images when `mz_values` is None, >= 1.
    ncols: panels per row, >= 1.
    title: figure title; None names the source file. "(simulated)" is added for simulated data.
    quantile: per-image display maximum, as a quantile of the measured pixels (hotspot clipping), in (0, 1].
    cmap: Matplotlib colour map name.

  Returns:
    The figure: one image axes and one colour-bar axes per ion image. Panel titles give each channel's m/z.

  Raises:
    ConfigError: on invalid options.
    DataError: naming the file, when a requested m/z lies outside the image's m/z axis.
  """
  if not isinstance(msi, MSIImage):
    raise errors.ConfigError(f"expected an MSIImage, got {type(msi).__name__}")
  if int(n) < 1 or int(ncols) < 1 or not 0 < float(quantile) <= 1:
    raise errors.ConfigError(f"need n >= 1, ncols >= 1 and 0 < quantile <= 1, got {n}, {ncols}, {quantile}")
  source = msi.metadata.get("source")
  if mz_values is None:
    channels = _default_channels(msi, int(n))
  else:
    wanted = np.asarray(mz_values, dtype=np.float64).reshape(-1)
    if wanted.size == 0:
      raise errors.ConfigError("mz_values is empty")
    spacing = float(np.median(np.diff(msi.mz))) if msi.num_channels > 1 else 0.5
    outside = wanted[(wanted < msi.mz[0] - spacing) | (wanted > msi.mz[-1] + spacing)]
    if outside.size:
      raise errors.DataError(
        f"m/z {', '.join(f'{v:.4f}' for v in outside)} outside the m/z axis {msi.mz[0]:.4f}-{msi.mz[-1]:.4f}",
        source,
      )
    channels = np.argmin(np.abs(msi.mz[None, :] - wanted[:, None]), axis=1)

  count = len(channels)
  ncols = min(int(ncols), count)
  nrows = -(-count // ncols)
  fig = _new_figure(3.4 * ncols, 3.0 * nrows + 0.4)
  mask = msi.mask
  color_map = _masked_cmap(cmap)
  for i, channel in enumerate(channels):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    image = msi.cube[..., channel].astype(np.float64)
    measured = image[mask]
    low = min(0.0, float(measured.min())) if measured.size else 0.0
    high = float(np.quantile(measured, quantile)) if measured.size else 1.0
    if not high > low:
      high = low + 1.0
    shown = ax.imshow(np.ma.masked_array(image, ~mask), cmap=color_map, vmin=low, vmax=high, interpolation="nearest")
    ax.set_title(f"m/z {msi.mz[channel]:.4f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(shown, ax=ax, shrink=0.8)
  if title is None:
    title = "Ion images" + (f": {os.path.basename(str(source))}" if source else "")
    title += f" (clipped at the {100 * quantile:g}th percentile)"
  fig.suptitle(_with_simulated(title, bool(msi.metadata.get("simulated", False))))
  return fig


def _unit_range(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Scales an image so its 1st-99th percentiles over `mask` span [0, 1], clipping."""
  inside = values[mask]
  lo, hi = np.quantile(inside, [0.01, 0.99]) if inside.size else (0.0, 1.0)
  return np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)


def plot_pca(
  scores: np.ndarray,
  explained_variance_ratio: np.ndarray,
  *,
  title: str | None = None,
  mask: np.ndarray | None = None,
  simulated: bool = False,
) -> Figure:
  """PCA score images: the first three components as an RGB composite, each component, and a scree plot.

  Args:
    scores: (H, W, k) score images (e.g. `msisynth.preprocess.pca(cube, k).scores`).
    explained_variance_ratio: (k,) share of variance of each component.
    title: figure title; "(simulated)" is added when `simulated`.
    mask: bool (H, W) measured pixels; the others are grey. None: every pixel.
    simulated: whether the data are simulated.

  Returns:
    The figure: k + 2 axes (composite, k components, scree).

  Raises:
    ConfigError: when the shapes do not match.
  """
  scores = np.asarray(scores, dtype=np.float64)
  ratio = np.asarray(explained_variance_ratio, dtype=np.float64).reshape(-1)
  if scores.ndim != 3 or scores.shape[-1] < 1 or ratio.shape != (scores.shape[-1],):
    raise errors.ConfigError(
      f"scores must be (H, W, k) and explained_variance_ratio (k,), got {scores.shape} and {ratio.shape}"
    )
  k = scores.shape[-1]
  mask = _check_mask(mask, scores.shape[:2])
  panels = k + 2
  ncols = min(4, panels)
  nrows = -(-panels // ncols)
  fig = _new_figure(3.4 * ncols, 3.0 * nrows + 0.4)

  ax = fig.add_subplot(nrows, ncols, 1)
  rgb = np.zeros(scores.shape[:2] + (3,))
  for c in range(min(3, k)):
    rgb[..., c] = _unit_range(scores[..., c], mask)
  rgb[~mask] = UNMEASURED_GREY
  ax.imshow(rgb, interpolation="nearest")
  ax.set_title("PC1-3 as RGB" if k >= 3 else f"PC1-{k} as RGB", fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])

  color_map = _masked_cmap("RdBu_r")
  for c in range(k):
    ax = fig.add_subplot(nrows, ncols, c + 2)
    inside = np.abs(scores[..., c][mask])
    limit = float(np.quantile(inside, 0.99)) if inside.size else 1.0
    limit = limit if limit > 0 else 1.0
    image = np.ma.masked_array(scores[..., c], ~mask)
    ax.imshow(image, cmap=color_map, vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_title(f"PC{c + 1} ({100 * ratio[c]:.1f} %)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])

  ax = fig.add_subplot(nrows, ncols, k + 2)
  positions = np.arange(1, k + 1)
  ax.bar(positions, 100 * ratio, color="tab:blue", label="component")
  ax.step(positions, 100 * np.cumsum(ratio), where="mid", color="tab:orange", label="cumulative")
  ax.set_xticks(positions)
  ax.set_xlabel("component")
  ax.set_ylabel("explained variance (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=8)
  ax.set_title("scree", fontsize=9)
  fig.suptitle(_with_simulated(title or "PCA of MSI", simulated))
  return fig


def plot_mean_spectrum(
  mz: np.ndarray,
  spectrum: np.ndarray,
  peaks: np.ndarray | None = None,
  *,
  title: str | None = None,
  simulated: bool = False,
  n_labels: int = 10,
) -> Figure:
  """A (mean) spectrum, with picked peaks marked and the strongest labelled with their m/z.

  Args:
    mz: (C,) m/z axis.
    spectrum: (C,) intensities.
    peaks: optional indices into `mz` (e.g. from `msisynth.preprocess.pick_peaks`).
    title: figure title; "(simulated)" is added when `simulated`.
    simulated: whether the data are simulated.
    n_labels: how many of the strongest peaks get an m/z label.

  Returns:
    The figure, one axes.

  Raises:
    ConfigError: when the shapes do not match or a peak index is out of range.
  """
  mz = np.asarray(mz, dtype=np.float64).reshape(-1)
  spectrum = np.asarray(spectrum, dtype=np.float64).reshape(-1)
  if mz.shape != spectrum.shape or mz.size == 0:
    raise errors.ConfigError(f"mz {mz.shape} and spectrum {spectrum.shape} must be matching non-empty 1-D arrays")
  fig = _new_figure(8.0, 3.2)
  ax = fig.add_subplot(1, 1, 1)
  ax.plot(mz, spectrum, lw=0.8, color="tab:blue")
  if peaks is not None:
    peaks = np.asarray(peaks, dtype=np.int64).reshape(-1)
    if peaks.size and (peaks.min() < 0 or peaks.max() >= mz.size):
      raise errors.ConfigError(f"peak indices must lie in [0, {mz.size}), got {peaks.min()}..{peaks.max()}")
    ax.plot(mz[peaks], spectrum[peaks], "v", color="tab:red", ms=4, label=f"{peaks.size} peaks")
    # Label the strongest peaks, skipping any too close to a labelled one for the text to be readable.
    span = max(float(mz[-1] - mz[0]), 1e-12)
    labelled: list[float] = []
    for p in peaks[np.argsort(-spectrum[peaks], kind="stable")]:
      if len(labelled) >= int(n_labels):
        break
      if any(abs(mz[p] - q) < 0.02 * span for q in labelled):
        continue
      labelled.append(float(mz[p]))
      ax.annotate(
        f"{mz[p]:.2f}", (mz[p], spectrum[p]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7
      )
    ax.legend(fontsize=8)
  ax.set_xlabel("m/z")
  ax.set_ylabel("mean intensity")
  ax.set_title(_with_simulated(title or "Mean spectrum", simulated))
  return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120, *, overwrite: bool = False) -> pathlib.Path:
  """Writes a figure (format from the file extension), creating parent folders, then closes it.

  Args:
    fig: the figure.
    path: output file, e.g. "figures/ion_images.png".
    dpi: resolution, > 0.
    overwrite: replace an existing file.

  Returns:
    The path written.

  Raises:
    ConfigError: when `fig` is not a figure or dpi <= 0.
    OutputExistsError: the file exists and `overwrite` is False.
  """
  if not isinstance(fig, Figure):
    raise errors.ConfigError(f"expected a matplotlib Figure, got {type(fig).__name__}")
  if not dpi > 0:
    raise errors.ConfigError(f"dpi must be > 0, got {dpi}")
  path = outputs.save_figure(fig, path, dpi=dpi, overwrite=overwrite)
  # A figure made through pyplot is registered there; release it. Figures made here are not, and are freed
  # with their last reference.
  if "matplotlib.pyplot" in sys.modules:
    sys.modules["matplotlib.pyplot"].close(fig)
  return path


def plot_msi_histology_pairs(
  pairs: Sequence[tuple[str, np.ndarray, MSIImage, float]],
  *,
  histology_pixel_sizes_um: Sequence[float | None] | None = None,
  quantile: float = 0.99,
  title: str | None = "Real MSI ↔ histology pairs",
) -> Figure:
  """One row per pair: the histology image, the MSI's total ion count (TIC) and one ion image, side by side.

  Axes are in µm where the pixel size is known (MSI `pixel_size_um`, `histology_pixel_sizes_um`), in pixels
  otherwise; the images are not registered to each other.

  Args:
    pairs: (name, histology RGB (H, W, 3) in [0, 1], MSI, m/z of the ion image) for each row.
    histology_pixel_sizes_um: the histology pixel size of each pair (µm), or None entries where unknown.
    quantile: display maximum of the TIC and ion images, as a quantile of the measured pixels, in (0, 1].
    title: figure title (None: none). "(simulated)" is added when any MSI is simulated.

  Returns:
    The figure: three image axes per row.

  Raises:
    ConfigError: on invalid arguments.
  """
  if not pairs:
    raise errors.ConfigError("pairs is empty")
  if not 0 < float(quantile) <= 1:
    raise errors.ConfigError(f"quantile must be in (0, 1], got {quantile}")
  sizes = list(histology_pixel_sizes_um) if histology_pixel_sizes_um is not None else [None] * len(pairs)
  if len(sizes) != len(pairs):
    raise errors.ConfigError(f"{len(sizes)} histology pixel sizes for {len(pairs)} pairs")
  fig = _new_figure(12.0, 3.3 * len(pairs) + 0.4)
  simulated = False

  def extent(shape, pixel_size):
    if pixel_size is None:
      return None, "pixels"
    py, px = geometry.pixel_size_yx(pixel_size)
    h, w = shape[:2]
    return (-0.5 * px, (w - 0.5) * px, (h - 0.5) * py, -0.5 * py), "µm"

  def clipped(image, mask):
    measured = image[mask]
    high = float(np.quantile(measured, quantile)) if measured.size else 1.0
    return np.ma.masked_array(image, ~mask), (0.0, high if high > 0 else 1.0)

  for row, ((name, histology, msi, mz), size) in enumerate(zip(pairs, sizes)):
    if not isinstance(msi, MSIImage):
      raise errors.ConfigError(f"{name}: expected an MSIImage, got {type(msi).__name__}")
    histology = np.asarray(histology)
    if histology.ndim != 3 or histology.shape[2] != 3:
      raise errors.ConfigError(f"{name}: histology must be (H, W, 3), got {histology.shape}")
    simulated |= bool(msi.metadata.get("simulated", False))
    channel = int(np.argmin(np.abs(msi.mz - float(mz))))
    tic = msi.cube.sum(axis=2, dtype=np.float64)
    panels = [
      (np.clip(histology, 0, 1), None, f"{name}: histology", size),
      (*clipped(tic, msi.mask), f"{name}: MSI TIC", msi.pixel_size_um),
      (*clipped(msi.cube[..., channel].astype(np.float64), msi.mask), f"{name}: m/z {msi.mz[channel]:.4f}",
       msi.pixel_size_um),
    ]  # fmt: skip
    for col, (image, limits, label, pixel_size) in enumerate(panels):
      ax = fig.add_subplot(len(pairs), 3, 3 * row + col + 1)
      box, unit = extent(image.shape, pixel_size)
      kwargs = {} if limits is None else {"cmap": _masked_cmap("viridis"), "vmin": limits[0], "vmax": limits[1]}
      ax.imshow(image, extent=box, interpolation="nearest" if limits is not None else "antialiased", **kwargs)
      ax.set_title(label, fontsize=9)
      ax.set_xlabel(unit, fontsize=8)
      ax.tick_params(labelsize=7)
  if title:
    fig.suptitle(_with_simulated(title, simulated))
  return fig
