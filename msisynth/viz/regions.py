"""Figures of annotated regions on MSI: region outlines over an ion image, and per-region mean spectra.

Images are (H, W) row-major (row = y, column = x); axes are in µm when the MSI pixel size is known, else in
pixels. Figures are built on `matplotlib.figure.Figure` (no pyplot state), so they can be made in threads and
saved with `fig.savefig`. Simulated data say "(simulated)" in every title.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.colors
import matplotlib.lines
import matplotlib.patches
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from msisynth import errors
from msisynth.regions import RegionStats
from msisynth.types import MSIImage

_SIMULATED = " (simulated)"


def region_colors(names: Mapping[int, str], colors: Mapping[int, object] | None = None) -> dict[int, tuple]:
  """One distinct RGBA colour per region label, taking given colours first.

  Args:
    names: {label: name} of the regions.
    colors: optional {label: colour} (any matplotlib colour, or (r, g, b) in 0-255 as QuPath gives).

  Returns:
    {label: RGBA tuple in [0, 1]}.
  """
  palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
  out = {}
  for i, label in enumerate(names):
    color = None if colors is None else colors.get(label)
    if color is None:
      out[label] = palette(i % palette.N)
    elif isinstance(color, (tuple, list)) and len(color) == 3 and max(color) > 1:
      out[label] = matplotlib.colors.to_rgba(np.asarray(color, dtype=float) / 255.0)
    else:
      out[label] = matplotlib.colors.to_rgba(color)
  return out


def plot_regions_on_ion_image(
  msi: MSIImage,
  labels_msi: np.ndarray,
  names: Mapping[int, str],
  mz: float,
  *,
  tol: float = 0.0,
  tol_unit: str = "da",
  colors: Mapping[int, object] | None = None,
  fill_alpha: float = 0.25,
  cmap: str = "magma",
  title: str | None = None,
  ax: Axes | None = None,
) -> Figure:
  """Draws region outlines (and a light fill) over an ion image, with a legend giving each region's pixel count.

  Args:
    msi: the MSI image.
    labels_msi: int (H, W) labels on the MSI grid (0 = unlabelled), e.g. from `regions_to_msi`.
    names: {label: name} of the regions to draw.
    mz: the ion's m/z; the ion image is `msi.ion_image(mz, tol, tol_unit)`. Unmeasured pixels are left blank.
    tol: m/z window half-width (0: nearest channel).
    tol_unit: "da" or "ppm".
    colors: optional {label: colour}; others come from a qualitative palette.
    fill_alpha: opacity of the region fill (0 for outlines only).
    cmap: colour map of the ion image.
    title: the title; None writes the m/z. "(simulated)" is appended for simulated data.
    ax: axes to draw into; None makes a new figure.

  Returns:
    The figure.

  Raises:
    ConfigError: when the label image does not match the MSI image.
    DataError: when no channel lies in the m/z window.
  """
  labels_msi = np.asarray(labels_msi)
  if labels_msi.shape != msi.shape:
    raise errors.ConfigError(f"label image shape {labels_msi.shape} != MSI image shape {msi.shape}")
  fig, ax = _figure(ax, figsize=(6.4, 5.0))
  ion = np.asarray(msi.ion_image(mz, tol, tol_unit), dtype=np.float64)
  ion = np.where(msi.mask, ion, np.nan)
  height, width = msi.shape
  if msi.pixel_size_um is not None:
    py, px = msi.pixel_size_um
    unit = "µm"
  else:
    py, px = 1.0, 1.0
    unit = "pixels"
  # Pixel centres sit at c * px, r * py, so the image spans half a pixel beyond them.
  extent = (-0.5 * px, (width - 0.5) * px, (height - 0.5) * py, -0.5 * py)
  image = ax.imshow(ion, cmap=cmap, extent=extent, interpolation="nearest")
  fig.colorbar(image, ax=ax, label="intensity")

  palette = region_colors(names, colors)
  xs = np.arange(width) * px
  ys = np.arange(height) * py
  handles = []
  for label, name in names.items():
    region = labels_msi == label
    color = palette[label]
    n_measured = int(np.count_nonzero(region & msi.mask))
    if np.any(region):
      if fill_alpha > 0:
        overlay = np.zeros((height, width, 4))
        overlay[region] = (*color[:3], fill_alpha)
        ax.imshow(overlay, extent=extent, interpolation="nearest")
      # Outline on the pixel boundaries: contour at level 0.5 a 2x-upsampled mask, padded with one empty
      # sub-sample on each side so that regions touching the image edge close along it.
      fine = np.pad(np.kron(region.astype(float), np.ones((2, 2))), 1)
      fine_x = _fine_axis(xs, px)
      fine_y = _fine_axis(ys, py)
      ax.contour(fine_x, fine_y, fine, levels=[0.5], colors=[color], linewidths=1.5)
    handles.append(
      matplotlib.patches.Patch(facecolor=(*color[:3], 0.6), edgecolor=color, label=f"{name} (n={n_measured})")
    )
  if handles:
    ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.8)
  ax.set_xlim(extent[0], extent[1])
  ax.set_ylim(extent[2], extent[3])
  ax.set_xlabel(f"x ({unit})")
  ax.set_ylabel(f"y ({unit})")
  ax.set_title(_title(title if title is not None else f"m/z {mz:.4f} with regions", msi.metadata.get("simulated")))
  return fig


def plot_region_spectra(
  stats: RegionStats,
  *,
  regions: Sequence[str] | None = None,
  show_std: bool = True,
  colors: Mapping[int, object] | None = None,
  title: str | None = None,
  ax: Axes | None = None,
) -> Figure:
  """Plots each region's mean spectrum, with a ±1 standard deviation band.

  Args:
    stats: from `msisynth.regions.region_statistics`.
    regions: names of the regions to plot; None plots every region with measured pixels.
    show_std: draw the ±1 standard deviation band.
    colors: optional {label: colour}; others come from a qualitative palette.
    title: the title; None writes "Mean spectrum per region". "(simulated)" is appended for simulated data.
    ax: axes to draw into; None makes a new figure.

  Returns:
    The figure.

  Raises:
    ConfigError: for a region name that is not in `stats`.
  """
  known = stats.region_names()
  if regions is not None:
    missing = [name for name in regions if name not in known]
    if missing:
      raise errors.ConfigError(f"regions {missing} are not in the statistics (known: {known})")
  fig, ax = _figure(ax, figsize=(8.0, 4.0))
  palette = region_colors(stats.names, colors)
  # A line spectrum for a few channels, a continuous trace for a profile-like axis.
  as_sticks = stats.mz.size <= 64
  for i, label in enumerate(stats.labels):
    name = stats.names[int(label)]
    if (regions is not None and name not in regions) or stats.n_pixels[i] == 0:
      continue
    color = palette[int(label)]
    mean = stats.mean[i]
    legend = f"{name} (n={int(stats.n_pixels[i])})"
    if as_sticks:
      ax.plot(stats.mz, mean, marker="o", markersize=3, linestyle="-", linewidth=0.8, color=color, label=legend)
    else:
      ax.plot(stats.mz, mean, linewidth=0.8, color=color, label=legend)
    if show_std and np.any(np.isfinite(stats.std[i])):
      std = np.nan_to_num(stats.std[i])
      ax.fill_between(stats.mz, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
  handles = [h for h in ax.get_lines() if isinstance(h, matplotlib.lines.Line2D) and not h.get_label().startswith("_")]
  if handles:
    ax.legend(fontsize="small")
  ax.set_xlabel("m/z")
  ax.set_ylabel("mean intensity")
  ax.set_title(_title(title if title is not None else "Mean spectrum per region", stats.simulated))
  return fig


def _figure(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
  if ax is not None:
    return ax.figure, ax
  fig = Figure(figsize=figsize, layout="constrained")
  return fig, fig.add_subplot()


def _fine_axis(centres: np.ndarray, step: float) -> np.ndarray:
  """Sub-sample coordinates of a 2x-upsampled, 1-padded axis; level 0.5 falls on the pixel boundaries."""
  inner = np.repeat(centres, 2) + np.tile([-0.25, 0.25], centres.size) * step
  return np.concatenate([[inner[0] - 0.5 * step], inner, [inner[-1] + 0.5 * step]])


def _title(text: str, simulated) -> str:
  return text + _SIMULATED if simulated and "simulated" not in text.lower() else text
