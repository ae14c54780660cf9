"""Peak picking (`msisynth.peaks`) on spectra with known peaks, noise and isotope envelopes."""

import numpy as np
import pytest

from msisynth import errors, peaks

SPACING = peaks.ISOTOPE_SPACING_DA


def _profile(axis, centres, heights, fwhm_ppm):
  y = np.zeros_like(axis)
  for c, h in zip(centres, heights):
    sigma = fwhm_ppm * 1e-6 * c / 2.3548
    y += h * np.exp(-0.5 * ((axis - c) / sigma) ** 2)
  return y


def _axis(lo=400.0, hi=900.0, ppm=2.0):
  return lo * np.exp(np.arange(int(np.log(hi / lo) / np.log1p(ppm * 1e-6))) * np.log1p(ppm * 1e-6))


def test_known_peaks_in_noise_are_found_with_centroid_and_width():
  rng = np.random.default_rng(0)
  axis = _axis()
  centres = np.array([450.25, 520.5, 610.75, 700.1, 850.3])
  heights = np.array([50.0, 20.0, 35.0, 12.0, 40.0])
  y = _profile(axis, centres, heights, 30.0) + rng.normal(1.0, 0.5, axis.size).clip(0)
  found = peaks.pick_peaks_mean(axis, y, smooth_sigma=2.0, snr=5.0)
  assert len(found) == 5
  np.testing.assert_allclose(found.mz, centres, rtol=3e-6)
  np.testing.assert_allclose(found.fwhm_ppm, 30.0, rtol=0.15)
  assert np.all(found.snr >= 5.0)
  assert np.all(found.lower < found.mz) and np.all(found.mz < found.upper)
  assert np.all(found.upper[:-1] < found.lower[1:])  # windows never overlap
  # A weaker threshold also picks noise; top_n keeps the strongest.
  top = peaks.pick_peaks_mean(axis, y, smooth_sigma=2.0, snr=5.0, top_n=2)
  np.testing.assert_allclose(top.mz, [450.25, 850.3], atol=0.01)


def test_noise_alone_gives_few_peaks_and_snr_threshold_matters():
  rng = np.random.default_rng(1)
  axis = _axis()
  y = rng.normal(1.0, 0.1, axis.size)
  baseline, noise = peaks.mad_noise(y)
  assert baseline == pytest.approx(1.0, abs=0.01) and noise == pytest.approx(0.1, rel=0.05)
  assert len(peaks.pick_peaks_mean(axis, y, smooth_sigma=0.0, snr=6.0)) == 0
  assert len(peaks.pick_peaks_mean(axis, y, smooth_sigma=0.0, snr=1.0)) > 100


def test_min_pixel_fraction_drops_peaks_in_few_pixels():
  axis = _axis()
  y = _profile(axis, [500.0, 600.0], [10.0, 10.0], 20.0)
  counts = np.zeros(axis.size, np.int64)
  counts[np.argmin(np.abs(axis - 500.0))] = 100  # present in every pixel
  counts[np.argmin(np.abs(axis - 600.0))] = 2  # in 2 % of them
  found = peaks.pick_peaks_mean(axis, y, pixel_counts=counts, num_pixels=100, min_pixel_fraction=0.05)
  np.testing.assert_allclose(found.mz, [500.0], atol=0.005)
  assert found.pixel_fraction[0] == 1.0


def test_deisotoping_keeps_monoisotopic_peaks_of_envelopes():
  axis = _axis(ppm=1.0)
  # Two envelopes (charge 1) with decreasing isotopes, and an unrelated peak 0.5 Da above one of them.
  mono = [500.3, 760.5]
  centres, heights = [], []
  for m, h in zip(mono, [100.0, 80.0]):
    for k, ratio in enumerate([1.0, 0.3, 0.06]):
      centres.append(m + k * SPACING)
      heights.append(h * ratio)
  centres.append(600.0)
  heights.append(30.0)
  y = _profile(axis, centres, heights, 15.0)
  everything = peaks.pick_peaks_mean(axis, y, snr=3.0)
  assert len(everything) == 7
  kept = peaks.pick_peaks_mean(axis, y, snr=3.0, deisotope_peaks=True)
  np.testing.assert_allclose(kept.mz, [500.3, 600.0, 760.5], atol=0.005)
  # A peak one spacing above a weaker one is not its isotope.
  mask = peaks.deisotope(np.array([500.0, 500.0 + SPACING]), np.array([10.0, 100.0]))
  np.testing.assert_array_equal(mask, [True, True])
  # Charge 2 spacings only with charges=(1, 2).
  z2 = np.array([500.0, 500.0 + SPACING / 2])
  np.testing.assert_array_equal(peaks.deisotope(z2, np.array([10.0, 5.0])), [True, True])
  np.testing.assert_array_equal(peaks.deisotope(z2, np.array([10.0, 5.0]), charges=(1, 2)), [True, False])


def test_per_pixel_pick_align_filter():
  rng = np.random.default_rng(2)
  ions = np.array([300.1, 420.2, 555.5])
  spectra = []
  for p in range(40):
    mz = list(ions * (1 + rng.normal(0, 2e-6, 3)))
    intensity = [100.0, 60.0, 80.0]
    if p < 4:  # a rare ion, in 10 % of the pixels
      mz.append(700.7)
      intensity.append(90.0)
    mz += list(rng.uniform(250, 800, 30))
    intensity += list(rng.random(30))
    order = np.argsort(mz)
    spectra.append((np.asarray(mz)[order], np.asarray(intensity)[order]))
  indptr = np.concatenate([[0], np.cumsum([m.size for m, _ in spectra])])
  mz = np.concatenate([m for m, _ in spectra])
  intensity = np.concatenate([v for _, v in spectra])
  found = peaks.pick_peaks_per_pixel(indptr, mz, intensity, snr=5.0, align_tol_ppm=10.0, min_pixel_fraction=0.05)
  np.testing.assert_allclose(found.mz, [300.1, 420.2, 555.5, 700.7], atol=0.002)
  np.testing.assert_allclose(found.pixel_fraction, [1.0, 1.0, 1.0, 0.1])
  common = peaks.pick_peaks_per_pixel(indptr, mz, intensity, snr=5.0, min_pixel_fraction=0.5)
  assert len(common) == 3
  top = peaks.pick_peaks_per_pixel(indptr, mz, intensity, snr=5.0, top_n=1)
  np.testing.assert_allclose(top.mz, [300.1], atol=0.002)


def test_bad_input():
  axis = _axis()
  with pytest.raises(errors.ConfigError):
    peaks.pick_peaks_mean(axis, np.zeros(3))
  with pytest.raises(errors.DataError):
    peaks.pick_peaks_mean(axis[:3], np.array([1.0, np.nan, 1.0]))
  with pytest.raises(errors.ConfigError):
    peaks.pick_peaks_mean(axis[:3], np.ones(3), top_n=0)
  with pytest.raises(errors.ConfigError):
    peaks.pick_peaks_per_pixel(np.array([1, 2]), np.ones(2), np.ones(2))
