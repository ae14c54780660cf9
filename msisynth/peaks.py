"""Peak picking as MSI practitioners do it: on the mean spectrum, or per pixel with alignment and filtering.

Two routes, NumPy and numba only (no JAX), so the imzML reader can use them:

- `pick_peaks_mean`: on one (mean) spectrum on a fine m/z axis. Optional Gaussian smoothing; a noise level from
  the median absolute deviation (MAD); local maxima whose signal-to-noise ratio reaches `snr`; optionally a
  minimum fraction of pixels in which the ion is present (from per-channel pixel counts); optional removal of
  isotope peaks (de-isotoping); optionally only the `top_n` strongest. Each peak gets a centroid m/z, a width
  (FWHM, ppm) and an integration window that never overlaps its neighbours'.
- `pick_peaks_per_pixel`: Cardinal's processed-data convention, `peakPick -> peakAlign -> peakFilter`: peaks are
  picked in every pixel's own spectrum (SNR against that spectrum's MAD noise), the picked m/z values of all
  pixels are aligned into reference peaks (clusters whose neighbouring m/z differ by at most `align_tol_ppm`),
  and reference peaks found in fewer than `min_pixel_fraction` of the pixels are dropped.

Where msisynth differs from Cardinal (`Cardinal::peakPick`, `peakAlign`, `peakFilter`, version 3):

- Noise: one MAD of the whole spectrum (`1.4826 * median(|y - median(y)|)`, over the nonzero channels when most
  channels are zero, as for centroided data on a fine axis), not Cardinal's default sliding-window "quant"
  estimate, so a strongly varying baseline should be removed first.
- Alignment: single-linkage clustering of all picked m/z values within `align_tol_ppm` (each cluster's reference
  m/z is the intensity-weighted mean), not Cardinal's alignment to the local maxima of the mean spectrum (its
  default `ref`); the two agree when the ions are further apart than the tolerance.
- De-isotoping (Cardinal has none in peakPick): a peak is an isotope of a lighter one when it lies
  1.003355 / z Da above it (z = 1, or 1 and 2 with `isotope_charges=(1, 2)`) within `isotope_tol_ppm`, and is
  weaker than `isotope_max_ratio(m/z)` times it (the M+1/M ratio of averagine-like composition, 0.00055 per Da,
  with a factor of 2 slack); chains (M+1, M+2, ...) are followed.
"""

from __future__ import annotations

import dataclasses

import numba as nb
import numpy as np

from msisynth import errors

ISOTOPE_SPACING_DA = 1.003355  # 13C - 12C
_MAD_SCALE = 1.4826


@dataclasses.dataclass(frozen=True)
class Peaks:
  """Picked peaks, sorted by m/z.

  Attributes:
    mz: (K,) float64 centroid m/z.
    intensity: (K,) float64 height of the peak in the (smoothed) spectrum it was picked on.
    snr: (K,) signal-to-noise ratio.
    lower: (K,) lower edge of the integration window (m/z), inclusive.
    upper: (K,) upper edge of the integration window (m/z), inclusive; windows do not overlap.
    fwhm_ppm: (K,) full width at half maximum in ppm (NaN where it could not be measured).
    pixel_fraction: (K,) fraction of pixels in which the peak is present, or None.
    noise: the noise level used.
    method: "mean" or "per_pixel".
  """

  mz: np.ndarray
  intensity: np.ndarray
  snr: np.ndarray
  lower: np.ndarray
  upper: np.ndarray
  fwhm_ppm: np.ndarray
  pixel_fraction: np.ndarray | None
  noise: float
  method: str

  def __len__(self) -> int:
    return int(self.mz.size)

  def select(self, keep: np.ndarray) -> Peaks:
    """The peaks at the given indices or boolean mask."""
    pf = None if self.pixel_fraction is None else self.pixel_fraction[keep]
    return dataclasses.replace(
      self, mz=self.mz[keep], intensity=self.intensity[keep], snr=self.snr[keep], lower=self.lower[keep],
      upper=self.upper[keep], fwhm_ppm=self.fwhm_ppm[keep], pixel_fraction=pf,
    )  # fmt: skip

  def median_fwhm_ppm(self) -> float:
    """Median peak width (ppm) over the peaks whose width was measured, NaN when none was."""
    w = self.fwhm_ppm[np.isfinite(self.fwhm_ppm)]
    return float(np.median(w)) if w.size else float("nan")


def check_spectrum(mz, spectrum) -> tuple[np.ndarray, np.ndarray]:
  """(mz, spectrum) as float64 after the checks every peak picker makes.

  Raises:
    ConfigError: mismatched or empty arrays, or an m/z axis that is not strictly increasing.
    DataError: NaN or Inf in the spectrum.
  """
  mz = np.asarray(mz, dtype=np.float64)
  y = np.asarray(spectrum, dtype=np.float64)
  if mz.ndim != 1 or y.shape != mz.shape or mz.size == 0:
    raise errors.ConfigError(f"mz and spectrum must be matching non-empty 1-D arrays, got {mz.shape}, {y.shape}")
  if mz.size > 1 and not np.all(np.diff(mz) > 0):
    raise errors.ConfigError("mz must be strictly increasing")
  if not np.all(np.isfinite(y)):
    raise errors.DataError("spectrum holds NaN or Inf values")
  return mz, y


def mad_noise(y: np.ndarray) -> tuple[float, float]:
  """(baseline, noise): the median and 1.4826 x MAD of y, over its nonzero entries when most entries are zero."""
  y = np.asarray(y, np.float64)
  values = y
  if np.count_nonzero(y) < 0.5 * y.size:
    values = y[y != 0]
  if values.size == 0:
    return 0.0, 0.0
  baseline = float(np.median(values))
  noise = _MAD_SCALE * float(np.median(np.abs(values - baseline)))
  if noise == 0.0:
    positive = np.abs(values[values != baseline])
    noise = float(positive.min()) if positive.size else 0.0
  return baseline, noise


def gaussian_smooth(y: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian smoothing with a standard deviation of `sigma` channels (truncated at 4 sigma); sigma 0: a copy."""
  y = np.asarray(y, np.float64)
  if sigma <= 0 or y.size < 3:
    return y.copy()
  half = max(1, int(np.ceil(4 * sigma)))
  x = np.arange(-half, half + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  kernel /= kernel.sum()
  return np.convolve(y, kernel, mode="same")


def _local_maxima(y: np.ndarray) -> np.ndarray:
  """Indices of strict local maxima (middle of flat tops), ends counting as lower neighbours."""
  if y.size == 0:
    return np.zeros(0, np.int64)
  change = np.flatnonzero(np.diff(y) != 0) + 1
  starts = np.concatenate([[0], change])
  ends = np.concatenate([change, [y.size]]) - 1
  values = y[starts]
  left = np.concatenate([[True], values[:-1] < values[1:]])
  right = np.concatenate([values[1:] < values[:-1], [True]])
  top = left & right
  return ((starts[top] + ends[top]) // 2).astype(np.int64)


def isotope_max_ratio(mz: np.ndarray | float) -> np.ndarray:
  """Largest M+1/M intensity ratio accepted for an isotope peak at a given monoisotopic m/z (2 x 0.00055 x m/z,
  at least 0.5)."""
  return np.maximum(0.5, 2 * 0.00055 * np.asarray(mz, np.float64))


def deisotope(
  mz: np.ndarray, intensity: np.ndarray, *, tol_ppm: float = 10.0, charges: tuple[int, ...] = (1,)
) -> np.ndarray:
  """Boolean mask of the peaks that are not isotope peaks of a lighter peak (see the module docstring).

  Args:
    mz: (K,) sorted m/z.
    intensity: (K,) heights.
    tol_ppm: tolerance on the isotope spacing, ppm of the isotope's m/z.
    charges: charge states whose spacings (1.003355 / z) are tried.

  Returns:
    bool (K,): True for monoisotopic (or unrelated) peaks.
  """
  mz = np.asarray(mz, np.float64)
  intensity = np.asarray(intensity, np.float64)
  keep = np.ones(mz.size, bool)
  for i in range(mz.size):
    # A peak already marked as an isotope still anchors the next one of its chain (M+1 -> M+2).
    for z in charges:
      target = mz[i] + ISOTOPE_SPACING_DA / z
      half = tol_ppm * 1e-6 * target
      lo, hi = np.searchsorted(mz, [target - half, target + half + 1e-12])
      if hi <= lo:
        continue
      j = lo + int(np.argmin(np.abs(mz[lo:hi] - target)))
      if intensity[j] <= isotope_max_ratio(mz[i]) * intensity[i]:
        keep[j] = False
  return keep


@nb.njit(cache=True)
def _windows(axis: np.ndarray, y: np.ndarray, tops: np.ndarray, baseline: float) -> tuple[np.ndarray, ...]:
  """FWHM (ppm, NaN when a side never falls to half height before the next top) and valley bounds of each top.

  The valley between two neighbouring tops is the lowest point between them (nearest this top on ties).
  """
  n = y.size
  k = tops.size
  fwhm = np.full(k, np.nan)
  valley_lo = np.zeros(k, np.int64)
  valley_hi = np.full(k, n - 1, np.int64)
  for t in range(k):
    i = tops[t]
    a = tops[t - 1] if t > 0 else 0
    b = tops[t + 1] if t + 1 < k else n - 1
    if t > 0:
      best = i
      for j in range(i, a - 1, -1):
        if y[j] < y[best]:
          best = j
      valley_lo[t] = best
    if t + 1 < k:
      best = i
      for j in range(i, b + 1):
        if y[j] < y[best]:
          best = j
      valley_hi[t] = best
    half = baseline + 0.5 * (y[i] - baseline)
    jl = -1
    for j in range(i, a - 1, -1):
      if y[j] < half:
        jl = j
        break
    jr = -1
    for j in range(i, b + 1):
      if y[j] < half:
        jr = j
        break
    if jl >= 0 and jr >= 0:
      # Linear interpolation of the half-maximum crossings.
      xl = axis[jl] + (half - y[jl]) / (y[jl + 1] - y[jl]) * (axis[jl + 1] - axis[jl])
      xr = axis[jr] + (half - y[jr]) / (y[jr - 1] - y[jr]) * (axis[jr - 1] - axis[jr])
      fwhm[t] = (xr - xl) / axis[i] * 1e6
  return fwhm, valley_lo, valley_hi


def pick_peaks_mean(
  mz: np.ndarray,
  spectrum: np.ndarray,
  *,
  smooth_sigma: float = 1.0,
  snr: float = 3.0,
  pixel_counts: np.ndarray | None = None,
  num_pixels: int | None = None,
  min_pixel_fraction: float = 0.0,
  top_n: int | None = None,
  deisotope_peaks: bool = False,
  isotope_tol_ppm: float = 10.0,
  isotope_charges: tuple[int, ...] = (1,),
  window_fwhm: float = 1.0,
  mz_weighted: np.ndarray | None = None,
  totals: np.ndarray | None = None,
) -> Peaks:
  """Picks peaks on one spectrum (typically the mean spectrum of a section on a fine axis).

  Steps: Gaussian smoothing (`smooth_sigma` channels); baseline and noise from the median and MAD
  (`mad_noise`); local maxima of the smoothed spectrum with (height - baseline) / noise >= `snr`; with
  `pixel_counts`, those present in at least `min_pixel_fraction` of `num_pixels` pixels (the counts summed over
  the peak's window); optionally de-isotoping (`deisotope`); optionally the `top_n` highest. The integration
  window of a peak extends `window_fwhm` FWHM either side of the top, never past the valley to a neighbouring
  local maximum; the centroid is the intensity-weighted mean m/z in the window (of `mz_weighted / totals`, the
  per-channel sums of m/z x intensity and of intensity, when given: the exact centroid of the raw peaks).

  Args:
    mz: (C,) strictly increasing m/z axis (channel centres).
    spectrum: (C,) intensities.
    smooth_sigma: Gaussian standard deviation in channels (0: no smoothing).
    snr: minimum signal-to-noise ratio.
    pixel_counts: (C,) pixels in which each channel is nonzero, or None.
    num_pixels: the number of pixels `pixel_counts` counts out of (needed with `pixel_counts`).
    min_pixel_fraction: in [0, 1].
    top_n: keep at most this many (the highest), or None.
    deisotope_peaks: remove isotope peaks.
    isotope_tol_ppm: tolerance of the isotope spacing.
    isotope_charges: charges tried when de-isotoping.
    window_fwhm: half-width of the integration window, in FWHMs.
    mz_weighted: (C,) per-channel sum of m/z x intensity, or None.
    totals: (C,) per-channel sum of intensity matching `mz_weighted`, or None.

  Returns:
    `Peaks` (method "mean").

  Raises:
    ConfigError: on mismatched shapes or invalid options.
    DataError: on NaN/Inf in the spectrum.
  """
  axis, y0 = check_spectrum(mz, spectrum)
  if smooth_sigma < 0 or snr < 0 or not 0 <= min_pixel_fraction <= 1 or window_fwhm <= 0:
    raise errors.ConfigError(
      f"need smooth_sigma >= 0, snr >= 0, 0 <= min_pixel_fraction <= 1, window_fwhm > 0; got {smooth_sigma}, "
      f"{snr}, {min_pixel_fraction}, {window_fwhm}"
    )
  if top_n is not None and int(top_n) < 1:
    raise errors.ConfigError(f"top_n must be >= 1 or None, got {top_n}")
  if pixel_counts is not None and (num_pixels is None or int(num_pixels) < 1):
    raise errors.ConfigError("pixel_counts needs num_pixels >= 1")
  y = gaussian_smooth(y0, smooth_sigma)
  baseline, noise = mad_noise(y)
  tops = _local_maxima(y)
  tops = tops[y[tops] > baseline]
  ratio = (y[tops] - baseline) / noise if noise > 0 else np.full(tops.size, np.inf)
  tops = tops[ratio >= snr]
  if top_n is not None and tops.size > 20 * int(top_n):
    # Only the strongest can end up among the top N; valleys between them are still found correctly.
    tops = np.sort(tops[np.argsort(-y[tops], kind="stable")[: 20 * int(top_n)]])
  empty = Peaks(*(np.zeros(0) for _ in range(6)), None if pixel_counts is None else np.zeros(0), noise, "mean")
  if tops.size == 0:
    return empty
  fwhm, valley_lo, valley_hi = _windows(axis, y, tops.astype(np.int64), float(baseline))
  centre = axis[tops]
  reach = np.where(np.isfinite(fwhm), window_fwhm * fwhm * 1e-6 * centre, 0.0)
  step_lo = np.where(tops > 0, centre - axis[np.maximum(tops - 1, 0)], 0.0)
  reach_lo = np.maximum(reach, 0.5 * step_lo)
  lo_idx = np.maximum(np.searchsorted(axis, centre - reach_lo, side="left"), valley_lo)
  hi_idx = np.minimum(np.searchsorted(axis, centre + np.maximum(reach, 0.5 * step_lo), side="right") - 1, valley_hi)
  # Neighbouring windows meet at most at a shared valley channel: give it to the higher peak's neighbour rule by
  # moving the upper bound of the left peak one channel in.
  clash = hi_idx[:-1] >= lo_idx[1:]
  hi_idx[:-1][clash] = lo_idx[1:][clash] - 1
  hi_idx = np.maximum(hi_idx, lo_idx)
  lower = axis[lo_idx]
  upper = axis[hi_idx]
  cs = np.concatenate([[0.0], np.cumsum(y0)])
  if mz_weighted is not None and totals is not None:
    cw = np.concatenate([[0.0], np.cumsum(np.asarray(mz_weighted, np.float64))])
    ct = np.concatenate([[0.0], np.cumsum(np.asarray(totals, np.float64))])
  else:
    cw = np.concatenate([[0.0], np.cumsum(axis * y0)])
    ct = cs
  num = cw[hi_idx + 1] - cw[lo_idx]
  den = ct[hi_idx + 1] - ct[lo_idx]
  cent = np.where(den > 0, num / np.where(den > 0, den, 1.0), centre)
  cent = np.clip(cent, lower, upper)
  pixel_fraction = None
  if pixel_counts is not None:
    cc = np.concatenate([[0], np.cumsum(np.asarray(pixel_counts, np.float64))])
    pixel_fraction = np.minimum((cc[hi_idx + 1] - cc[lo_idx]) / int(num_pixels), 1.0)
  peaks = Peaks(cent, y[tops], (y[tops] - baseline) / noise if noise > 0 else np.full(tops.size, np.inf), lower,
                upper, fwhm, pixel_fraction, noise, "mean")  # fmt: skip
  if pixel_fraction is not None and min_pixel_fraction > 0:
    peaks = peaks.select(pixel_fraction >= min_pixel_fraction)
  if deisotope_peaks and len(peaks):
    peaks = peaks.select(deisotope(peaks.mz, peaks.intensity, tol_ppm=isotope_tol_ppm, charges=isotope_charges))
  if top_n is not None and len(peaks) > int(top_n):
    strongest = np.sort(np.argsort(-peaks.intensity, kind="stable")[: int(top_n)])
    peaks = peaks.select(strongest)
  return peaks


def _pixel_peaks(mz: np.ndarray, intensity: np.ndarray, snr: float, profile: bool) -> np.ndarray:
  """Indices of one spectrum's entries picked as peaks (SNR against its own MAD noise)."""
  if mz.size == 0:
    return np.zeros(0, np.int64)
  candidates = _local_maxima(intensity) if profile else np.flatnonzero(intensity > 0)
  baseline, noise = mad_noise(intensity)
  if noise <= 0:
    return candidates[intensity[candidates] > baseline]
  return candidates[(intensity[candidates] - baseline) / noise >= snr]


def align_peaks(
  mz: np.ndarray, intensity: np.ndarray, pixel: np.ndarray, num_pixels: int, tol_ppm: float
) -> tuple[np.ndarray, ...]:
  """Clusters picked peaks of many pixels: neighbours (in sorted m/z) within `tol_ppm` share a cluster.

  Returns:
    (reference m/z (intensity-weighted mean), lowest m/z, highest m/z, mean intensity over `num_pixels`,
    fraction of pixels present) per cluster.
  """
  order = np.argsort(mz, kind="stable")
  m, v, p = mz[order], intensity[order], pixel[order]
  if m.size == 0:
    return tuple(np.zeros(0) for _ in range(5))
  new = np.concatenate([[True], np.diff(m) > tol_ppm * 1e-6 * m[1:]])
  label = np.cumsum(new) - 1
  k = int(label[-1]) + 1
  weight = np.bincount(label, v, k)
  ref = np.bincount(label, v * m, k) / np.where(weight > 0, weight, 1.0)
  ref = np.where(weight > 0, ref, np.bincount(label, m, k) / np.bincount(label, None, k))
  lo = m[new]
  hi = m[np.concatenate([np.flatnonzero(new)[1:] - 1, [m.size - 1]])]
  pairs = np.unique(label.astype(np.int64) * (int(p.max()) + 1) + p)
  present = np.bincount(pairs // (int(p.max()) + 1), minlength=k)
  return ref, lo, hi, weight / num_pixels, present / num_pixels


def pick_peaks_per_pixel(
  indptr: np.ndarray,
  mz: np.ndarray,
  intensity: np.ndarray,
  *,
  snr: float = 3.0,
  profile: bool = False,
  align_tol_ppm: float = 10.0,
  min_pixel_fraction: float = 0.01,
  top_n: int | None = None,
  deisotope_peaks: bool = False,
  isotope_tol_ppm: float = 10.0,
  isotope_charges: tuple[int, ...] = (1,),
) -> Peaks:
  """Cardinal's peakPick -> peakAlign -> peakFilter on CSR spectra (see the module docstring for differences).

  Args:
    indptr: (N + 1,) CSR row pointers (pixel i holds entries indptr[i]:indptr[i + 1]).
    mz: m/z of the entries, sorted within each pixel.
    intensity: intensities of the entries.
    snr: minimum signal-to-noise ratio within each pixel's spectrum (noise: that spectrum's MAD).
    profile: the spectra are profiles: pick local maxima first (centroided spectra: every nonzero entry is a
      candidate).
    align_tol_ppm: alignment tolerance between neighbouring picked m/z values.
    min_pixel_fraction: drop reference peaks present in fewer pixels than this fraction.
    top_n: keep at most this many (highest mean intensity), or None.
    deisotope_peaks: remove isotope peaks of the reference peaks.
    isotope_tol_ppm: tolerance of the isotope spacing.
    isotope_charges: charges tried when de-isotoping.

  Returns:
    `Peaks` (method "per_pixel"): reference m/z, mean intensity over all pixels, windows spanning each cluster's
    picked m/z values, pixel fractions; `snr` holds the mean intensity over the noise level of the mean
    per-pixel noise, `fwhm_ppm` the cluster's spread (ppm).

  Raises:
    ConfigError: on invalid options or arrays.
  """
  indptr = np.asarray(indptr, np.int64)
  if indptr.ndim != 1 or indptr.size < 2 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
    raise errors.ConfigError("indptr must be a non-decreasing (N + 1,) array starting at 0")
  if not 0 <= min_pixel_fraction <= 1 or snr < 0 or align_tol_ppm <= 0:
    raise errors.ConfigError("need snr >= 0, align_tol_ppm > 0 and 0 <= min_pixel_fraction <= 1")
  n = indptr.size - 1
  picked_mz, picked_int, picked_px, noises = [], [], [], []
  for p in range(n):
    a, b = int(indptr[p]), int(indptr[p + 1])
    m = np.asarray(mz[a:b], np.float64)
    v = np.asarray(intensity[a:b], np.float64)
    idx = _pixel_peaks(m, v, snr, profile)
    if idx.size:
      picked_mz.append(m[idx])
      picked_int.append(v[idx])
      picked_px.append(np.full(idx.size, p, np.int64))
    if b > a:
      noises.append(mad_noise(v)[1])
  if not picked_mz:
    return Peaks(*(np.zeros(0) for _ in range(6)), np.zeros(0), 0.0, "per_pixel")
  ref, lo, hi, mean_int, fraction = align_peaks(
    np.concatenate(picked_mz), np.concatenate(picked_int), np.concatenate(picked_px), n, align_tol_ppm
  )
  noise = float(np.mean(noises)) if noises else 0.0
  spread = (hi - lo) / ref * 1e6
  peaks = Peaks(ref, mean_int, mean_int / noise if noise > 0 else np.full(ref.size, np.inf), lo, hi, spread,
                fraction, noise, "per_pixel")  # fmt: skip
  peaks = peaks.select(fraction >= min_pixel_fraction)
  if deisotope_peaks and len(peaks):
    peaks = peaks.select(deisotope(peaks.mz, peaks.intensity, tol_ppm=isotope_tol_ppm, charges=isotope_charges))
  if top_n is not None and len(peaks) > int(top_n):
    peaks = peaks.select(np.sort(np.argsort(-peaks.intensity, kind="stable")[: int(top_n)]))
  return peaks
