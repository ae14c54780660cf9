"""How `read_imzml` chooses the channels of a processed file by default (channels="auto", "peaks" or "bins").

One pass over the data sums every peak onto a fine geometric axis (`FINE_BIN_PPM` ppm bins over the data's m/z
range): per bin, the summed intensity, the number of pixels present, and the sum of m/z x intensity. Peaks are
picked on the mean spectrum (`msisynth.peaks.pick_peaks_mean`), and their median width (FWHM, ppm) is the
resolution of the data. Then:

- "bins": bins of that width (a whole number of fine bins, at least `MIN_BIN_PPM`), empty ones dropped;
- "peaks": one channel per picked peak (the `max_channels` strongest), integrating the peak's window;
- "auto": "bins" when that gives at most `max_channels` channels (data with few distinct m/z, such as feature
  lists), otherwise "peaks".

The second pass bins the spectra onto the chosen channels. Both passes stream the .ibd, so memory is the output
cube plus the fine axis (four float64 values per fine bin).
"""

from __future__ import annotations

import math

import numpy as np
from absl import logging

from msisynth import errors, peaks
from msisynth.io import _engine

FINE_BIN_PPM = 2.0
MIN_BIN_PPM = 2.0
# The fine axis never exceeds this many bins (it widens instead): 4 float64 arrays of 2^23 = 256 MB.
_MAX_FINE_BINS = 1 << 23

DEFAULT_PEAK_OPTIONS = {
  "smooth_sigma": 1.0,
  "snr": 3.0,
  "min_pixel_fraction": 0.01,
  "deisotope_peaks": False,
  "window_fwhm": 1.0,
}


def choose_channels(index, selected, *, channels, max_channels, mz_range, nan_policy, progress, options, check_size,
                    check_range=False):  # fmt: skip
  """Returns (KernelAxis, channel m/z, binning metadata) for a processed file."""
  from msisynth.io import imzml  # the bin plans live there

  opts = dict(DEFAULT_PEAK_OPTIONS)
  unknown = set(options or {}) - set(opts)
  if unknown:
    raise errors.ConfigError(f"unknown peak_options {sorted(unknown)}; known: {sorted(opts)}")
  opts.update(options or {})
  if mz_range is None:
    lo, hi = imzml._data_mz_range(index, selected)
  else:
    lo, hi = mz_range
  fine_ppm = FINE_BIN_PPM
  while math.log(hi / lo) / math.log1p(fine_ppm * 1e-6) > _MAX_FINE_BINS:
    fine_ppm *= 2
  fine = imzml._BinPlan.create(lo, hi, fine_ppm, "ppm", data_range=mz_range is None)
  fine_edges = fine.edges()
  hist = _engine.histogram_processed(
    index, selected, _engine.KernelAxis.bins(fine_edges),
    nan_policy=nan_policy, show_progress=progress,
  )  # fmt: skip
  if check_range and hist.unsorted:
    raise imzml._MzOutsideRange()  # unsorted m/z arrays: the range from first/last values may be too narrow
  num_pixels = int(np.count_nonzero(index.intensity_lengths[selected] > 0))
  centres = hist.centres
  mean = hist.total / max(num_pixels, 1)
  found = peaks.pick_peaks_mean(
    centres, mean, smooth_sigma=opts["smooth_sigma"], snr=opts["snr"], pixel_counts=hist.count,
    num_pixels=max(num_pixels, 1), min_pixel_fraction=opts["min_pixel_fraction"], top_n=max_channels,
    deisotope_peaks=opts["deisotope_peaks"], window_fwhm=opts["window_fwhm"], mz_weighted=hist.mz_sum,
    totals=hist.total,
  )  # fmt: skip
  width = found.median_fwhm_ppm()
  if not np.isfinite(width):
    width = imzml.DEFAULT_BIN_WIDTH_PPM
  width = max(width, MIN_BIN_PPM, fine_ppm)
  factor = max(1, int(round(width / fine_ppm)))
  coarse_edges = fine_edges[::factor]
  if coarse_edges[-1] < fine_edges[-1]:
    coarse_edges = np.concatenate([coarse_edges, fine_edges[-1:]])
  occupied_fine = hist.count > 0
  occupied = np.add.reduceat(occupied_fine, np.arange(0, occupied_fine.size, factor)) > 0
  bin_ppm = factor * fine_ppm
  base = {
    "channels": channels,
    "max_channels": int(max_channels),
    "peak_width_ppm": float(width),
    "fine_bin_ppm": float(fine_ppm),
    "mz_range": [float(lo), float(hi)],
  }
  use_bins = channels == "bins" or (channels == "auto" and int(occupied.sum()) <= max_channels)
  if use_bins:
    if channels == "bins" and occupied.sum() > max_channels:
      logging.warning(
        "%s: %d occupied bins of %g ppm exceed max_channels=%d", index.path.name, int(occupied.sum()), bin_ppm,
        max_channels,
      )  # fmt: skip
    check_size(int(occupied.sum()))
    remap = np.where(occupied, np.cumsum(occupied) - 1, -1)
    axis = _engine.KernelAxis.bins(coarse_edges, clip=fine.data_range, remap=remap)
    mz = (0.5 * (coarse_edges[:-1] + coarse_edges[1:]))[occupied]
    binning = {**base, "method": "bins", "bin_width": float(bin_ppm), "bin_unit": "ppm",
               "empty_bins_dropped": int(occupied.size - occupied.sum())}  # fmt: skip
    logging.info(
      "%s: processed data binned at the data's peak width, %g ppm: %d non-empty bins (channels=%r)",
      index.path.name, bin_ppm, mz.size, channels,
    )  # fmt: skip
    return axis, mz, binning
  if len(found) == 0:
    raise errors.ImzMLError(
      "no peak of the mean spectrum passes the peak-picking thresholds "
      f"(snr={opts['snr']}, min_pixel_fraction={opts['min_pixel_fraction']}); lower them with peak_options, or "
      "pass bin_width or channels='every_bin'",
      index.path,
    )
  if len(found) > max_channels:
    found = found.select(np.sort(np.argsort(-found.intensity, kind="stable")[:max_channels]))
  # Window edges: whole fine bins from the peak's first to its last channel.
  lo_idx = np.searchsorted(centres, found.lower)
  hi_idx = np.searchsorted(centres, found.upper)
  lows = fine_edges[lo_idx]
  highs = np.nextafter(fine_edges[hi_idx + 1], -np.inf)
  order = np.argsort(found.mz, kind="stable")
  mz = found.mz[order]
  keep = np.concatenate([[True], np.diff(mz) > 0])  # MSIImage needs strictly increasing m/z
  order, mz = order[keep], mz[keep]
  check_size(mz.size)
  axis = _engine.KernelAxis.windows(lows[order], highs[order])
  binning = {**base, "method": "peaks", "num_peaks": int(mz.size), "snr": float(opts["snr"]),
             "min_pixel_fraction": float(opts["min_pixel_fraction"]), "smooth_sigma": float(opts["smooth_sigma"]),
             "deisotoped": bool(opts["deisotope_peaks"]),
             "window_lows": lows[order].tolist(), "window_highs": highs[order].tolist()}  # fmt: skip
  logging.info(
    "%s: processed data read as %d peaks of the mean spectrum (data's peak width %.3g ppm; snr >= %g, in >= %g of "
    "the pixels; channels=%r)", index.path.name, mz.size, width, opts["snr"], opts["min_pixel_fraction"], channels,
  )  # fmt: skip
  return axis, mz, binning
