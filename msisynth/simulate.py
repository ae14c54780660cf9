"""Semi-synthetic MSI simulated from a real H&E image, with a known misalignment.

No public MSI section with its H&E image is available to msisynth's demos, so training and registration are also
shown on *semi-synthetic* pairs: a real H&E scan, and an MSI acquisition simulated from it by the model below.
Everything this module returns is labelled `metadata["simulated"] = True`.

Coordinates follow docs/architecture.md: images are row-major, pixel (r, c) of an image with pixel size (py, px)
µm has its centre at (x, y) = (c·px, r·py) µm, and points are (x, y) in µm.

The model
---------
Let I be the H&E image (H, W, 3) in [0, 1] with pixel size `histology_pixel_size_um` = h µm, and a =
`msi_pixel_size_um` the MSI pixel size (10–50 µm for MALDI/DESI).

1. **Stains and tissue.** t(x) = `he_tissue_mask(I)` (`msisynth.io.tissue_mask`, small parts dropped). Colour
   deconvolution (`msisynth.io.he_deconvolve`) gives hematoxylin and eosin optical densities; each is divided by
   its 99th percentile inside the tissue, clipped to [0, 1.5] and set to 0 off tissue: h(x), e(x).
2. **Tissue classes.** The stain densities, smoothed (σ = 1.5 H&E pixels), are clustered by k-means into
   `n_classes` tissue classes (or assigned to the nearest of given `class_centroids`, e.g. from
   `fit_class_centroids` on several slides, which keeps classes consistent across slides), numbered 1..K by
   increasing hematoxylin; class 0 is the background (off tissue). Soft memberships m_0..m_K are the one-hot
   class maps smoothed by σ = 1 H&E pixel.
3. **Latent chemistry.** `n_latent` smooth random fields z_l in [0, 1] (white noise low-pass filtered at
   `latent_length_um`), multiplied by the tissue membership 1 − m_0: chemistry that the H&E does not show, so that
   the MSI holds information beyond the stains (as real MSI does).
4. **Channels.** With the feature vector f(x) = [h, e, m_0, ..., m_K, z_1, ..., z_L], channel j is the nonlinear
   mixture
       a_j(x) = w_j · f(x),     y_j(x) = A_j · (softplus(s_j (a_j(x) − o_j)) / softplus(s_j (1 − o_j)))^γ_j
   with non-negative weights w_j, threshold o_j ∈ [0.05, 0.5], sharpness s_j ∈ [4, 12], exponent γ_j ∈ [0.6, 2]
   and amplitude A_j (log-normal, median `intensity` counts). Channels come in kinds, drawn with fixed proportions:
   `matrix` (matrix/background ions, high off tissue and suppressed on it), `ubiquitous` (all tissue classes),
   `class` (one tissue class), `nuclei` (hematoxylin), `eosin` (eosin), `latent` (one latent field inside tissue).
   The m/z of the channels are evenly spread over `mz_range` with a random jitter below half the spacing (distinct
   and strictly increasing; no isotope patterns). The weights, thresholds, exponents, amplitudes and m/z (the
   "chemistry") are drawn from `chemistry_seed`, so that slides simulated with the same `chemistry_seed` share one
   chemistry (what training across slides needs).
5. **Instrument.** The MSI frame has its own µm coordinates; MSI pixel (r, c) is centred at p = (c·a_x, r·a_y). The
   ground truth maps the H&E (fixed) frame to the MSI (moving) frame:
       the MSI at p shows the H&E tissue at  q = T⁻¹(p − u(p)),
   with T the affine ground truth (`SimulatedMSI.transform`, fixed → moving as in ITK) and u a smooth displacement
   in the MSI frame (µm, `SimulatedMSI.displacement`). Equivalently the H&E point q appears in the MSI at the p
   solving p = T(q) + u(p) (`SimulatedMSI.fixed_to_moving`; a fixed-point iteration, which converges because
   |∇u| < 0.5 is enforced). The measured abundance is the channel integrated over the MSI pixel's square and
   blurred by the instrument, sampled at the pixel centre:
       Y_j(p) = (K * y_j)(T⁻¹(p − u(p))),    K = G_psf * B,
   G_psf a Gaussian of FWHM `psf_fwhm_um` (the laser/spray spot; default the pixel size) and B the box of the MSI
   pixel (area integration), both divided by the scale √|det A| of T to express them in H&E µm. The box is taken
   axis-aligned in the H&E frame, which ignores the small rotation, shear and local deformation of the pixel
   square (≤ `max_rotation_deg`; its effect is far below the point spread). Between H&E pixels y is interpolated
   bilinearly; outside the H&E image the tissue is background.
6. **Noise** (`NoiseModel`; per pixel p and channel j):
       λ_jp = η_p · Y_j(p) + b_j,    η_p = exp(σ_s ζ_p + σ_r ε_p − (σ_s² + σ_r²)/2)
   (ionisation efficiency: ζ a smooth unit-variance field of length `ionisation_length_um`, ε white, so the TIC
   varies smoothly and from pixel to pixel), b_j ~ `baseline`·Exp(1) counts (chemical noise floor), and the
   measured counts X_jp ~ Poisson(λ_jp · G_jp), G_jp ~ Gamma(k, 1/k) with k = `gamma_shape` (multiplicative,
   overdispersed counting noise). Hotspots: a fraction `hotspot_fraction` of the (pixel, channel) entries is set
   to U(`hotspot_factor`) × that channel's 99.9th percentile. Missing pixels: a fraction `missing_fraction` of the
   pixels and `missing_lines` whole rows (scan lines) are not measured (mask False, spectrum 0).

The misalignment `"random"` draws a rotation θ ∈ ±`max_rotation_deg`, isotropic scale exp(U(±log(1 +
`max_scale`))), shear ∈ ±`max_shear`, all about the centre of the H&E image, then places the transformed H&E
footprint at a random offset in [0, `max_translation_um`] (plus the deformation amplitude) inside the MSI
acquisition rectangle, whose far side has a random margin of the same size. The MSI grid always starts at µm
(0, 0) of the MSI frame and extends to cover the transformed H&E footprint.

The benchmark: MSI of a neighbouring section (`simulate_benchmark_case`)
-----------------------------------------------------------------------
The model above simulates the MSI from the very H&E it is registered to: every channel is a function of that
section's stain densities, with the same geometry and a sharp tissue outline. On such pairs a closed-form ridge
regression matches pix2pix and every registration route, direct ones included, lands within about 0.2 MSI px: they
cannot separate methods. `simulate_benchmark_case` makes a harder, still SIMULATED, case closer to real practice:
1. **A neighbouring section.** The MSI is simulated (model above) from a *neighbour* of the H&E I: I warped by a
   smooth elastic field e (Gaussian-filtered white noise, largest displacement `elastic_um`), with `n_tears` local
   tissue losses (smooth blobs inside the tissue set to the background colour) and `n_folds` folds (a band of
   tissue whose optical density doubles). The registration ground truth is the affine T alone (H&E µm → MSI µm);
   e is anatomy, not misalignment, so even a perfect affine leaves |e| of residual at the tissue.
2. **A weak tissue outline.** Off-tissue pixels receive `outline_leak` × the mean on-tissue spectrum (analyte
   delocalisation, a matrix background) and on-tissue pixels the same share of the off-tissue mean, times a
   smooth random field: the TIC no longer outlines the tissue sharply.
3. **A polygonal region of interest.** Only pixels inside a random star-shaped polygon (`roi_vertices` vertices
   around the tissue centre, radii `roi_radius` × the tissue's extent) are acquired, as in the msight data; the
   rest are unmeasured (mask False, spectrum 0).
4. **Slide-to-slide stain variation.** The H&E the MSI is registered to (and trained against) is re-stained: its
   optical density is multiplied by a random 3 × 3 matrix near the identity (`stain_jitter`) and scaled by a random
   overall density, per slide.
5. **Isotope patterns and m/z drift.** Every simulated ion gets its M+1 and M+2 isotope peaks (m/z + 1.00336 and
   + 2.00671; relative abundances λ and λ²/2 with λ = 0.011 · m/z / 14, the ¹³C count of a CH₂-rich ion), and each
   channel is integrated over a bin of ± `bin_ppm` ppm around its nominal m/z while the instrument's calibration
   drifts smoothly over the slide by d(p) (up to `drift_ppm` ppm, plus a term linear in m/z): a Gaussian peak of
   σ = `peak_sigma_ppm` ppm keeps the share Φ((b − d)/σ) − Φ((−b − d)/σ) of its ions in the bin.
6. **Resolution.** The MSI pixel is `msi_pixel_size_um` (20-50 µm) and the H&E keeps its own pixel
   (`histology_pixel_size_um`, 2-5 µm): pairs built at the H&E pixel make synthesis one-to-many (texture the MSI cannot
   see).
Everything returned is labelled simulated (`metadata["simulated"]` True, `BenchmarkCase.simulated`).

Pixel size of the shipped slides. The H&E PNGs in the shared data are reduced scans whose true pixel size is
not recorded; a tissue section a few mm across spans a few hundred of their pixels. The pixel size is therefore
a parameter; the demos assume a nominal h = 5 µm with a = 20 µm, i.e. 4 H&E pixels per MSI pixel. With the point
spread and the latent length given in µm, the result depends on these µm choices, not on the true scan resolution.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage, special
from scipy.cluster import vq

from msisynth import errors, geometry, outputs, progress
from msisynth import io as msi_io
from msisynth.geometry.transforms import AffineTransform
from msisynth.types import MSIImage

CHANNEL_KINDS = ("matrix", "ubiquitous", "class", "nuclei", "eosin", "latent")
_KIND_PROPORTIONS = (0.06, 0.24, 0.30, 0.15, 0.10, 0.15)

# Independent random streams, one per part of the model, so that changing e.g. the noise does not change the
# tissue classes drawn from the same seed.
_STREAM_CLASSES, _STREAM_LATENT, _STREAM_MISALIGN, _STREAM_DEFORM, _STREAM_NOISE, _STREAM_LANDMARKS = range(6)
_STREAM_CHEMISTRY = 100


@dataclasses.dataclass(frozen=True)
class NoiseModel:
  """Acquisition noise of the simulated MSI (step 6 of the model in the module docstring).

  Attributes:
    ionisation_smooth_sd: standard deviation of the smooth log ionisation efficiency (TIC variation).
    ionisation_random_sd: standard deviation of the pixel-to-pixel log ionisation efficiency.
    ionisation_length_um: length scale (Gaussian σ, µm) of the smooth ionisation efficiency field.
    baseline: mean chemical noise floor per channel (counts; each channel draws its own from Exp).
    counting: "poisson" for Poisson counts (times the gamma factor), or None for expected values (times the gamma
      factor).
    gamma_shape: shape k of the multiplicative Gamma(k, 1/k) noise (mean 1, relative sd 1/√k); None to omit.
    hotspot_fraction: fraction of (pixel, channel) entries made hotspots.
    hotspot_factor: (low, high) range of hotspot intensity relative to the channel's 99.9th percentile.
    missing_fraction: fraction of pixels not measured.
    missing_lines: number of whole rows not measured.
  """

  ionisation_smooth_sd: float = 0.25
  ionisation_random_sd: float = 0.15
  ionisation_length_um: float = 150.0
  baseline: float = 2.0
  counting: str | None = "poisson"
  gamma_shape: float | None = 20.0
  hotspot_fraction: float = 1e-4
  hotspot_factor: tuple[float, float] = (3.0, 20.0)
  missing_fraction: float = 0.015
  missing_lines: int = 0

  @classmethod
  def none(cls) -> NoiseModel:
    """No noise at all: the MSI holds the expected abundances Y_j(p), every pixel measured."""
    return cls(
      ionisation_smooth_sd=0.0,
      ionisation_random_sd=0.0,
      baseline=0.0,
      counting=None,
      gamma_shape=None,
      hotspot_fraction=0.0,
      missing_fraction=0.0,
      missing_lines=0,
    )

  def __post_init__(self):
    if self.counting not in ("poisson", None):
      raise errors.ConfigError(f"NoiseModel.counting must be 'poisson' or None, got {self.counting!r}")
    if self.gamma_shape is not None and self.gamma_shape <= 0:
      raise errors.ConfigError(f"NoiseModel.gamma_shape must be positive or None, got {self.gamma_shape}")
    if not 0 <= self.missing_fraction < 1 or not 0 <= self.hotspot_fraction < 1:
      raise errors.ConfigError("NoiseModel.missing_fraction and hotspot_fraction must lie in [0, 1)")
    if min(self.ionisation_smooth_sd, self.ionisation_random_sd, self.baseline, self.missing_lines) < 0:
      raise errors.ConfigError("NoiseModel standard deviations, baseline and missing_lines must be >= 0")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SmoothDisplacement:
  """A smooth displacement u(p) = Σ_m amplitudes_m · cos(2π wavevectors_m · p + phases_m), p in µm.

  Attributes:
    wavevectors: (M, 2) spatial frequencies (x, y) in cycles per µm.
    phases: (M,) phases in radians.
    amplitudes: (M, 2) displacement (x, y) amplitude of each term, µm.
  """

  wavevectors: np.ndarray
  phases: np.ndarray
  amplitudes: np.ndarray

  def __call__(self, points_um: np.ndarray) -> np.ndarray:
    """The displacement (x, y) µm at points (..., 2) (x, y) µm."""
    points = np.asarray(points_um, dtype=np.float64)
    arg = 2 * np.pi * points @ self.wavevectors.T + self.phases
    return np.cos(arg) @ self.amplitudes

  def max_gradient(self) -> float:
    """An upper bound of the spectral norm of the Jacobian of u (the Lipschitz constant)."""
    return float(np.sum(2 * np.pi * np.linalg.norm(self.wavevectors, axis=1) * np.linalg.norm(self.amplitudes, axis=1)))

  def to_dict(self) -> dict[str, Any]:
    return {
      "wavevectors_per_um": self.wavevectors.tolist(),
      "phases": self.phases.tolist(),
      "amplitudes_um": self.amplitudes.tolist(),
    }


@dataclasses.dataclass
class SimulatedMSI:
  """A simulated MSI acquisition of a real H&E image and its ground truth.

  Attributes:
    msi: the simulated MSI, counts as float32; `metadata["simulated"]` is True and `metadata["simulation"]` holds
      every generating parameter.
    he: the H&E image (H, W, 3) float32 in [0, 1] it was simulated from.
    histology_pixel_size_um: (y, x) H&E pixel size, µm.
    transform: the affine ground truth, H&E (fixed) µm → MSI (moving) µm.
    displacement: the smooth displacement u of the MSI frame, or None (see the module docstring).
    displacement_um: u evaluated at the MSI pixel centres, (H_msi, W_msi, 2) (x, y) µm, or None.
    landmarks: (N, 4) float64 matched points, columns fixed_x, fixed_y (H&E µm), moving_x, moving_y (MSI µm),
      exact under the ground truth (for target registration error).
    tissue_classes: (H, W) int32 class map on the H&E grid, 0 = background, 1..K tissue classes.
    tissue_classes_msi: (H_msi, W_msi) int32 class map at the MSI pixel centres (nearest H&E pixel).
    class_centroids: (K, 2) the (hematoxylin, eosin) centroids of classes 1..K.
  """

  msi: MSIImage
  he: np.ndarray
  histology_pixel_size_um: tuple[float, float]
  transform: AffineTransform
  displacement: SmoothDisplacement | None
  displacement_um: np.ndarray | None
  landmarks: np.ndarray
  tissue_classes: np.ndarray
  tissue_classes_msi: np.ndarray
  class_centroids: np.ndarray

  @property
  def he_pixel_size_um(self) -> tuple[float, float]:
    """Deprecated name of `histology_pixel_size_um`."""
    return self.histology_pixel_size_um

  @property
  def landmarks_fixed_um(self) -> np.ndarray:
    """(N, 2) landmark positions (x, y) µm in the H&E."""
    return self.landmarks[:, :2]

  @property
  def landmarks_moving_um(self) -> np.ndarray:
    """(N, 2) landmark positions (x, y) µm in the MSI."""
    return self.landmarks[:, 2:]

  def moving_to_fixed(self, points_um: np.ndarray) -> np.ndarray:
    """The H&E position q = T⁻¹(p − u(p)) (µm) shown by the MSI at p (µm), (N, 2) → (N, 2)."""
    return _moving_to_fixed(self.transform, self.displacement, points_um)

  def fixed_to_moving(self, points_um: np.ndarray) -> np.ndarray:
    """The MSI position p (µm) at which the H&E point q (µm) appears: p = T(q) + u(p); (N, 2) → (N, 2)."""
    return _fixed_to_moving(self.transform, self.displacement, points_um)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """An affine 3×3 matrix applied to (..., 2) points in float64."""
  return np.asarray(points, np.float64) @ matrix[:2, :2].T + matrix[:2, 2]


def _moving_to_fixed(transform: AffineTransform, displacement: SmoothDisplacement | None, points: np.ndarray):
  points = np.asarray(points, dtype=np.float64)
  if displacement is not None:
    points = points - displacement(points)
  return _apply(np.linalg.inv(np.asarray(transform.matrix, np.float64)), points)


def _fixed_to_moving(
  transform: AffineTransform,
  displacement: SmoothDisplacement | None,
  points: np.ndarray,
  *,
  tol_um: float = 1e-6,
  max_iter: int = 100,
):
  affine = _apply(np.asarray(transform.matrix, np.float64), points)
  if displacement is None:
    return affine
  moving = affine + displacement(affine)
  for _ in range(max_iter):
    updated = affine + displacement(moving)
    done = np.max(np.abs(updated - moving), initial=0.0) < tol_um
    moving = updated
    if done:
      break
  return moving


def he_tissue_mask(he_rgb: np.ndarray) -> np.ndarray:
  """The tissue of an H&E image: `msisynth.io.tissue_mask`, without parts under 0.1 % of the image.

  The size floor removes the specks and label fragments that survive the threshold on large scans.

  Args:
    he_rgb: (H, W, 3) H&E, float in [0, 1] or uint8.

  Returns:
    bool (H, W), True on tissue.
  """
  he_rgb = np.asarray(he_rgb)
  min_size = max(64, he_rgb.shape[0] * he_rgb.shape[1] // 1000)
  return np.asarray(msi_io.tissue_mask(he_rgb, min_size_px=min_size), dtype=bool)


def _stain_features(he_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tissue mask and normalised hematoxylin and eosin densities (step 1)."""
  tissue = he_tissue_mask(he_rgb)
  od = np.asarray(msi_io.he_deconvolve(he_rgb), dtype=np.float64)
  stains = []
  for k in range(2):
    density = np.clip(od[..., k], 0, None)
    scale = np.percentile(density[tissue], 99) if tissue.sum() >= 10 else np.percentile(density, 99)
    density = np.clip(density / max(scale, 1e-6), 0, 1.5)
    density[~tissue] = 0
    stains.append(density)
  return tissue, stains[0], stains[1]


def tissue_classes(
  seed: int, he_rgb: np.ndarray, *, n_classes: int = 4, class_centroids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Tissue classes of an H&E image by k-means on its stain densities (steps 1-2 of the model).

  Args:
    seed: seed of the k-means initialisation.
    he_rgb: (H, W, 3) float H&E in [0, 1].
    n_classes: number of tissue classes K (besides the background).
    class_centroids: (K, 2) (hematoxylin, eosin) centroids to assign pixels to instead of running k-means.

  Returns:
    (classes, centroids): the (H, W) int32 class map, 0 = background, 1..K by increasing hematoxylin, and the
    (K, 2) centroids.

  Raises:
    ConfigError: for a bad n_classes or centroid array.
    DataError: when the image has no tissue.
  """
  he_rgb = _check_he(he_rgb)
  tissue, hem, eos = _stain_features(he_rgb)
  return _classes_from_stains(seed, tissue, hem, eos, n_classes, class_centroids)


def fit_class_centroids(
  seed: int, he_images: Sequence[np.ndarray], *, n_classes: int = 4, max_pixels_per_image: int = 20000
) -> np.ndarray:
  """Tissue-class centroids fitted on the pooled stain densities of several H&E images.

  Passing them to `simulate_msi(class_centroids=...)` gives every slide the same tissue classes, and so (with
  one `chemistry_seed`) the same spectra for the same kind of tissue.

  Args:
    seed: seed of the subsampling and of the k-means initialisation.
    he_images: (H, W, 3) H&E images, float in [0, 1] or uint8.
    n_classes: number of tissue classes K.
    max_pixels_per_image: tissue pixels drawn from each image for the fit.

  Returns:
    (K, 2) (hematoxylin, eosin) centroids, by increasing hematoxylin.

  Raises:
    ConfigError: for no images or a bad n_classes.
    DataError: when no image shows tissue.
  """
  if n_classes < 1 or len(he_images) == 0:
    raise errors.ConfigError(f"need at least one image and n_classes >= 1, got {len(he_images)} and {n_classes}")
  rng = np.random.default_rng([seed, _STREAM_CLASSES])
  pooled = []
  for he_rgb in he_images:
    tissue, hem, eos = _stain_features(_check_he(he_rgb))
    samples = np.stack([ndimage.gaussian_filter(hem, 1.5), ndimage.gaussian_filter(eos, 1.5)], -1)[tissue]
    if len(samples) > max_pixels_per_image:
      samples = samples[rng.choice(len(samples), max_pixels_per_image, replace=False)]
    pooled.append(samples)
  pooled = np.concatenate(pooled)
  if len(pooled) < n_classes:
    raise errors.DataError(f"the images show {len(pooled)} tissue pixels, fewer than {n_classes} classes")
  centroids, _ = vq.kmeans2(pooled, n_classes, minit="++", rng=rng, iter=30)
  return centroids[np.argsort(centroids[:, 0], kind="stable")]


def _classes_from_stains(seed, tissue, hem, eos, n_classes, class_centroids):
  if n_classes < 1:
    raise errors.ConfigError(f"n_classes must be >= 1, got {n_classes}")
  if not tissue.any():
    raise errors.DataError("the H&E image shows no tissue (the tissue mask is empty)")
  smooth = np.stack([ndimage.gaussian_filter(hem, 1.5), ndimage.gaussian_filter(eos, 1.5)], axis=-1)
  samples = smooth[tissue]
  if class_centroids is None:
    rng = np.random.default_rng([seed, _STREAM_CLASSES])
    fit = samples
    if len(fit) > 20000:
      fit = fit[rng.choice(len(fit), 20000, replace=False)]
    k = min(n_classes, len(np.unique(fit, axis=0)))
    centroids, _ = vq.kmeans2(fit, k, minit="++", rng=rng, iter=30)
    if k < n_classes:  # Fewer distinct colours than classes: repeat centroids so the class count is kept.
      centroids = np.concatenate([centroids, np.repeat(centroids[-1:], n_classes - k, axis=0)])
  else:
    centroids = np.asarray(class_centroids, dtype=np.float64)
    if centroids.shape != (n_classes, 2):
      raise errors.ConfigError(f"class_centroids must be ({n_classes}, 2), got {centroids.shape}")
  centroids = centroids[np.argsort(centroids[:, 0], kind="stable")]
  labels, _ = vq.vq(samples, centroids)
  classes = np.zeros(tissue.shape, np.int32)
  classes[tissue] = labels + 1
  return classes, centroids


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px) -> np.ndarray:
  """A smooth zero-mean unit-variance random field: white noise under a (periodic) Gaussian filter of σ pixels."""
  spectrum = ndimage.fourier_gaussian(np.fft.rfft2(rng.standard_normal(shape)), sigma_px, n=shape[1])
  field = np.fft.irfft2(spectrum, s=shape)
  return (field - field.mean()) / max(field.std(), 1e-12)


@dataclasses.dataclass(frozen=True)
class _Chemistry:
  """The channel model of step 4 (see module docstring); rows are channels, columns features."""

  mz: np.ndarray
  kinds: tuple[str, ...]
  weights: np.ndarray
  offsets: np.ndarray
  sharpness: np.ndarray
  powers: np.ndarray
  amplitudes: np.ndarray

  def channels(self, features: np.ndarray, index: slice) -> np.ndarray:
    """y_j (float32) for channels `index` at (..., F) features -> (..., c)."""
    f32 = lambda v: np.asarray(v, np.float32)
    a = f32(features) @ f32(self.weights[index]).T
    s, o = f32(self.sharpness[index]), f32(self.offsets[index])
    norm = np.logaddexp(np.float32(0), s * (1 - o))
    return f32(self.amplitudes[index]) * (np.logaddexp(np.float32(0), s * (a - o)) / norm) ** f32(self.powers[index])


def _draw_chemistry(
  chemistry_seed: int, n_channels: int, mz_range: tuple[float, float], n_classes: int, n_latent: int, intensity: float
) -> _Chemistry:
  rng = np.random.default_rng([chemistry_seed, _STREAM_CHEMISTRY])
  lo, hi = mz_range
  spacing = (hi - lo) / n_channels
  mz = lo + spacing * (np.arange(n_channels) + 0.5) + rng.uniform(-0.45, 0.45, n_channels) * spacing
  mz = np.round(mz, 4)
  # Kinds in fixed proportions, in a random order along m/z.
  counts = np.floor(np.asarray(_KIND_PROPORTIONS) * n_channels).astype(int)
  counts[1] += n_channels - counts.sum()
  if n_latent == 0:
    counts[1] += counts[5]
    counts[5] = 0
  kinds = np.repeat(np.arange(len(CHANNEL_KINDS)), counts)
  rng.shuffle(kinds)
  # Features: h, e, m_0 (background), m_1..m_K, z_1..z_L.
  n_features = 3 + n_classes + n_latent
  h_i, e_i, bg_i, cls0, lat0 = 0, 1, 2, 3, 3 + n_classes
  weights = np.zeros((n_channels, n_features))
  for j, kind in enumerate(kinds):
    w = weights[j]
    name = CHANNEL_KINDS[kind]
    if name == "matrix":
      w[bg_i] = 1.0
      w[cls0:lat0] = rng.uniform(0.0, 0.2, n_classes)  # Ion suppression on tissue.
    elif name == "ubiquitous":
      w[cls0:lat0] = rng.uniform(0.4, 1.0, n_classes)
      w[[h_i, e_i]] = rng.uniform(0.0, 0.3, 2)
    elif name == "class":
      w[cls0:lat0] = rng.uniform(0.0, 0.15, n_classes)
      w[cls0 + rng.integers(n_classes)] = 1.0
      w[[h_i, e_i]] = rng.uniform(0.0, 0.2, 2)
    elif name == "nuclei":
      w[h_i] = 1.0
      w[cls0:lat0] = rng.uniform(0.0, 0.2, n_classes)
    elif name == "eosin":
      w[e_i] = 1.0
      w[cls0:lat0] = rng.uniform(0.0, 0.2, n_classes)
    else:  # latent
      w[lat0 + rng.integers(n_latent)] = 1.0
      w[cls0:lat0] = rng.uniform(0.0, 0.3, n_classes)
  return _Chemistry(
    mz=mz,
    kinds=tuple(CHANNEL_KINDS[k] for k in kinds),
    weights=weights,
    offsets=rng.uniform(0.05, 0.5, n_channels),
    sharpness=rng.uniform(4.0, 12.0, n_channels),
    powers=rng.uniform(0.6, 2.0, n_channels),
    amplitudes=intensity * np.exp(rng.normal(0.0, 0.8, n_channels)),
  )


def _check_he(he_rgb) -> np.ndarray:
  he = np.asarray(he_rgb)
  if he.ndim != 3 or he.shape[2] not in (3, 4) or min(he.shape[:2]) < 2:
    raise errors.ConfigError(f"he_rgb must be an (H, W, 3) RGB image, got shape {he.shape}")
  he = he[..., :3]
  if np.issubdtype(he.dtype, np.integer):
    he = he.astype(np.float32) / np.iinfo(he.dtype).max
  he = he.astype(np.float32)
  if not np.all(np.isfinite(he)) or he.min() < 0 or he.max() > 1:
    raise errors.ConfigError("he_rgb must hold finite values in [0, 1] (or be uint8)")
  return he


def _random_affine(rng, he_extent_lo, he_extent_hi, *, max_rotation_deg, max_scale, max_shear):
  """Rotation, scale and shear about the centre of the H&E image, as a 3×3 matrix."""
  theta = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
  scale = np.exp(rng.uniform(-np.log1p(max_scale), np.log1p(max_scale)))
  shear = rng.uniform(-max_shear, max_shear)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  linear = rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
  centre = (he_extent_lo + he_extent_hi) / 2
  matrix = np.eye(3)
  matrix[:2, :2] = linear
  matrix[:2, 2] = centre - linear @ centre
  return matrix, {"rotation_deg": float(np.rad2deg(theta)), "scale": float(scale), "shear": float(shear)}


def _footprint(matrix: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [lo[0], hi[1]], [hi[0], hi[1]]])
  mapped = corners @ matrix[:2, :2].T + matrix[:2, 2]
  return mapped.min(axis=0), mapped.max(axis=0)


def _random_displacement(rng, extent_um: np.ndarray, amplitude_um: float, n_terms: int = 6) -> SmoothDisplacement:
  """Low-frequency displacement: wavelengths from the whole extent down to a third of it, max |u| ≈ amplitude."""
  cycles = rng.uniform(0.3, 3.0, n_terms)
  angles = rng.uniform(0, 2 * np.pi, n_terms)
  size = float(np.max(extent_um))
  wavevectors = np.stack([np.cos(angles), np.sin(angles)], axis=1) * (cycles / size)[:, None]
  phases = rng.uniform(0, 2 * np.pi, n_terms)
  amplitudes = rng.normal(size=(n_terms, 2))
  # Scale so that the largest displacement on a fine grid over the extent equals the amplitude.
  probe = SmoothDisplacement(wavevectors, phases, amplitudes)
  gx, gy = np.meshgrid(np.linspace(0, extent_um[0], 48), np.linspace(0, extent_um[1], 48))
  peak = np.max(np.linalg.norm(probe(np.stack([gx, gy], -1)), axis=-1))
  return SmoothDisplacement(wavevectors, phases, amplitudes * (amplitude_um / max(peak, 1e-12)))


def simulate_msi(
  seed: int,
  he_rgb: np.ndarray,
  *,
  histology_pixel_size_um: float | Sequence[float] | None = None,
  msi_pixel_size_um: float | Sequence[float] = 20.0,
  n_channels: int = 200,
  mz_range: tuple[float, float] = (400.0, 1000.0),
  misalignment: None | str | AffineTransform = None,
  max_rotation_deg: float = 10.0,
  max_scale: float = 0.05,
  max_shear: float = 0.02,
  max_translation_um: float = 200.0,
  deformation_um: float = 0.0,
  noise: NoiseModel | bool | None = True,
  psf_fwhm_um: float | None = None,
  n_classes: int = 4,
  class_centroids: np.ndarray | None = None,
  n_latent: int = 2,
  latent_length_um: float = 150.0,
  intensity: float = 30.0,
  chemistry_seed: int | None = None,
  n_landmarks: int = 50,
  he_name: str = "",
  he_pixel_size_um: float | Sequence[float] | None = None,
) -> SimulatedMSI:
  """Simulates an MSI acquisition of the tissue in a real H&E image (model in the module docstring).

  Args:
    seed: seed of everything that is not the chemistry (classes, latent fields, misalignment, noise, landmarks).
    he_rgb: (H, W, 3) H&E, float in [0, 1] or uint8 (an alpha channel is dropped).
    histology_pixel_size_um: H&E pixel size, µm (float or (y, x)); required.
    msi_pixel_size_um: MSI pixel size, µm (float or (y, x)); 10-50 µm is typical.
    n_channels: number of m/z channels.
    mz_range: (low, high) m/z of the channels.
    misalignment: None (the MSI frame is the H&E frame: T = identity), "random" (drawn from `seed` within the
      bounds below), or an AffineTransform H&E µm → MSI µm.
    max_rotation_deg: bound of the random rotation, degrees.
    max_scale: bound of the random relative scale change (0.05 = ±5 %).
    max_shear: bound of the random shear.
    max_translation_um: bound of the random offset of the tissue inside the MSI acquisition rectangle, µm.
    deformation_um: largest displacement of the smooth deformation u, µm; 0 for none. Applied with any
      misalignment, including None.
    noise: a NoiseModel; True for the default NoiseModel(); False or None for no noise.
    psf_fwhm_um: FWHM of the instrument's Gaussian point spread, µm; None for the MSI pixel size (the larger of
      y and x).
    n_classes: number of tissue classes (besides background).
    class_centroids: (n_classes, 2) stain centroids to assign classes with instead of k-means.
    n_latent: number of latent chemistry fields not visible in the H&E.
    latent_length_um: length scale (Gaussian σ, µm) of the latent fields.
    intensity: median channel amplitude A_j, counts.
    chemistry_seed: seed of the channel model (m/z, kinds, weights, nonlinearities); None for `seed`. Share it
      between slides to give them one chemistry.
    n_landmarks: number of ground-truth landmarks drawn in the tissue.
    he_name: a name for the H&E source, recorded in the metadata.
    he_pixel_size_um: deprecated name of `histology_pixel_size_um`.

  Returns:
    A SimulatedMSI; `msi.cube` holds counts (float32), `msi.metadata["simulated"]` is True.

  Raises:
    ConfigError: for invalid arguments (shapes, sizes, bounds, unknown misalignment).
    DataError: when the H&E shows no tissue.
  """
  he = _check_he(he_rgb)
  histology_pixel_size_um = geometry.renamed_argument(
    histology_pixel_size_um, he_pixel_size_um, "histology_pixel_size_um", "he_pixel_size_um"
  )
  he_px = geometry.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  msi_px = geometry.pixel_size_yx(msi_pixel_size_um, "msi_pixel_size_um")
  if n_channels < 1:
    raise errors.ConfigError(f"n_channels must be >= 1, got {n_channels}")
  if len(mz_range) != 2 or not 0 < mz_range[0] < mz_range[1]:
    raise errors.ConfigError(f"mz_range must be (low, high) with 0 < low < high, got {mz_range}")
  if deformation_um < 0 or min(max_rotation_deg, max_scale, max_shear, max_translation_um) < 0:
    raise errors.ConfigError("deformation_um and the misalignment bounds must be >= 0")
  if n_latent < 0 or intensity <= 0 or latent_length_um <= 0:
    raise errors.ConfigError("n_latent must be >= 0, intensity and latent_length_um > 0")
  if noise is True:
    noise = NoiseModel()
  elif noise is None or noise is False:
    noise = NoiseModel.none()
  elif not isinstance(noise, NoiseModel):
    raise errors.ConfigError(f"noise must be a NoiseModel, True, False or None, got {noise!r}")
  psf_fwhm = float(max(msi_px)) if psf_fwhm_um is None else float(psf_fwhm_um)
  if psf_fwhm < 0:
    raise errors.ConfigError(f"psf_fwhm_um must be >= 0, got {psf_fwhm_um}")
  chemistry_seed = seed if chemistry_seed is None else chemistry_seed
  height, width = he.shape[:2]

  # Ground truth transform and MSI grid (step 5).
  he_lo = -0.5 * np.array([he_px[1], he_px[0]])
  he_hi = np.array([(width - 0.5) * he_px[1], (height - 0.5) * he_px[0]])
  misalign_rng = np.random.default_rng([seed, _STREAM_MISALIGN])
  misalignment_params: dict[str, Any] = {"kind": "none" if misalignment is None else "given"}
  if misalignment is None:
    matrix = np.eye(3)
    extent = he_hi + deformation_um
  elif isinstance(misalignment, str):
    if misalignment != "random":
      raise errors.ConfigError(f"misalignment must be None, 'random' or an AffineTransform, got {misalignment!r}")
    matrix, misalignment_params = _random_affine(
      misalign_rng, he_lo, he_hi, max_rotation_deg=max_rotation_deg, max_scale=max_scale, max_shear=max_shear
    )
    lo, hi = _footprint(matrix, he_lo, he_hi)
    offset = misalign_rng.uniform(0, max_translation_um, 2) + deformation_um
    far_margin = misalign_rng.uniform(0, max_translation_um, 2) + deformation_um
    matrix[:2, 2] += offset - lo
    extent = hi - lo + offset + far_margin
    misalignment_params.update(kind="random", offset_um=offset.tolist())
  elif isinstance(misalignment, AffineTransform):
    matrix = np.asarray(misalignment.matrix, dtype=np.float64)
    _, hi = _footprint(matrix, he_lo, he_hi)
    extent = hi + deformation_um
  else:
    raise errors.ConfigError(f"misalignment must be None, 'random' or an AffineTransform, got {misalignment!r}")
  if abs(np.linalg.det(matrix[:2, :2])) < 1e-9:
    raise errors.ConfigError("the misalignment transform is singular")
  transform = AffineTransform.from_matrix(matrix)
  matrix = np.asarray(transform.matrix, np.float64)  # The ground truth is exactly the stored (float32) matrix.
  msi_w = max(1, int(np.floor(extent[0] / msi_px[1])) + 1)
  msi_h = max(1, int(np.floor(extent[1] / msi_px[0])) + 1)
  if msi_h * msi_w < 4:
    raise errors.ConfigError(
      f"the simulated MSI would be {msi_h}×{msi_w} pixels: the H&E ({height}×{width} px at {he_px} µm) is too "
      f"small for {msi_px} µm MSI pixels"
    )
  displacement = None
  if deformation_um > 0:
    extent_um = np.array([msi_w * msi_px[1], msi_h * msi_px[0]])
    displacement = _random_displacement(np.random.default_rng([seed, _STREAM_DEFORM]), extent_um, deformation_um)
    if displacement.max_gradient() >= 0.5:
      raise errors.ConfigError(
        f"deformation_um={deformation_um} is too large for a {extent_um} µm image: the deformation must stay "
        "smooth (|∇u| < 0.5)"
      )

  # Steps 1-4 on the H&E grid.
  tissue, hem, eos = _stain_features(he)
  classes, centroids = _classes_from_stains(seed, tissue, hem, eos, n_classes, class_centroids)
  memberships = np.stack(
    [ndimage.gaussian_filter((classes == k).astype(np.float64), 1.0) for k in range(n_classes + 1)], axis=-1
  )
  latent_rng = np.random.default_rng([seed, _STREAM_LATENT])
  latent = []
  for _ in range(n_latent):
    sigma_px = (latent_length_um / he_px[0], latent_length_um / he_px[1])
    field = _smooth_field(latent_rng, (height, width), sigma_px)
    latent.append(np.clip(0.5 + 0.25 * field, 0, 1) * (1 - memberships[..., 0]))
  features = np.concatenate([np.stack([hem, eos], -1), memberships] + [z[..., None] for z in latent], axis=-1)
  chemistry = _draw_chemistry(chemistry_seed, n_channels, mz_range, n_classes, n_latent, intensity)
  background_features = np.zeros(features.shape[-1])
  background_features[2] = 1.0

  # Instrument kernel in H&E pixels: the Gaussian point spread convolved with the MSI pixel's square (area
  # integration), both shrunk by the scale of T, since an MSI length ℓ covers ℓ / scale of the H&E.
  scale = math.sqrt(abs(np.linalg.det(matrix[:2, :2])))
  sigma_um = psf_fwhm / (2 * math.sqrt(2 * math.log(2))) / scale
  kernels = [_instrument_kernel(sigma_um / he_px[ax], msi_px[ax] / scale / he_px[ax]) for ax in (0, 1)]
  rows, cols = np.meshgrid(np.arange(msi_h), np.arange(msi_w), indexing="ij")
  centres = _moving_to_fixed(transform, displacement, np.stack([cols * msi_px[1], rows * msi_px[0]], -1).reshape(-1, 2))
  # Off the tissue every feature is the background's, so channels are computed, blurred and sampled only on the
  # bounding box of the tissue plus the kernel's reach; everything else takes the background value.
  active = np.any(np.abs(features - background_features) > 1e-6, axis=-1)
  r_lo, r_hi, c_lo, c_hi = _bounding_box(active, margin=(len(kernels[0]) // 2 + 1, len(kernels[1]) // 2 + 1))
  crop_features = features[r_lo:r_hi, c_lo:c_hi]
  crop_active = active[r_lo:r_hi, c_lo:c_hi]
  crop_shape = crop_features.shape[:2]
  sample_rc = np.stack([centres[:, 1] / he_px[0] - r_lo, centres[:, 0] / he_px[1] - c_lo])
  sampler = _BilinearSampler(sample_rc, crop_shape)

  expected = np.empty((msi_h * msi_w, n_channels), np.float32)
  chunk = 16
  starts = range(0, n_channels, chunk)
  for start in progress.track(starts, desc="simulating MSI channels", total=len(starts), unit="block"):
    index = slice(start, min(start + chunk, n_channels))
    outside = chemistry.channels(background_features, index)
    y = np.empty(crop_shape + (len(outside),), np.float32)
    y[:] = outside
    y[crop_active] = chemistry.channels(crop_features[crop_active], index)
    y = ndimage.correlate1d(y, kernels[0], axis=0, mode="nearest")
    y = ndimage.correlate1d(y, kernels[1], axis=1, mode="nearest")
    expected[:, index] = sampler(y.reshape(-1, y.shape[-1]), outside)
  expected = expected.reshape(msi_h, msi_w, n_channels).astype(np.float64)

  cube, mask, noise_info = _add_noise(np.random.default_rng([seed, _STREAM_NOISE]), expected, noise, msi_px)

  # Class map at the MSI pixel centres and landmarks.
  classes_msi = (
    ndimage.map_coordinates(
      classes, [centres[:, 1] / he_px[0], centres[:, 0] / he_px[1]], order=0, mode="constant", cval=0
    )
    .reshape(msi_h, msi_w)
    .astype(np.int32)
  )
  landmarks = _draw_landmarks(
    np.random.default_rng([seed, _STREAM_LANDMARKS]),
    tissue,
    he_px,
    transform,
    displacement,
    (msi_h, msi_w),
    msi_px,
    n_landmarks,
  )
  displacement_um = None
  if displacement is not None:
    displacement_um = displacement(np.stack([cols * msi_px[1], rows * msi_px[0]], -1)).astype(np.float32)

  simulation = {
    "seed": int(seed),
    "chemistry_seed": int(chemistry_seed),
    "he_name": he_name,
    "he_shape": [height, width],
    "histology_pixel_size_um": list(he_px),
    "msi_pixel_size_um": list(msi_px),
    "msi_shape": [msi_h, msi_w],
    "n_channels": int(n_channels),
    "mz_range": [float(mz_range[0]), float(mz_range[1])],
    "psf_fwhm_um": psf_fwhm,
    "n_classes": int(n_classes),
    "class_centroids": centroids.tolist(),
    "n_latent": int(n_latent),
    "latent_length_um": float(latent_length_um),
    "intensity": float(intensity),
    "channel_kinds": list(chemistry.kinds),
    "misalignment": misalignment_params,
    "bounds": {
      "max_rotation_deg": max_rotation_deg,
      "max_scale": max_scale,
      "max_shear": max_shear,
      "max_translation_um": max_translation_um,
    },
    "transform_fixed_to_moving": matrix.tolist(),
    "deformation_um": float(deformation_um),
    "displacement": None if displacement is None else displacement.to_dict(),
    "noise": noise.to_dict(),
    "noise_realised": noise_info,
  }
  msi = MSIImage(
    cube=cube,
    mz=chemistry.mz,
    mask=mask,
    pixel_size_um=msi_px,
    metadata={
      "simulated": True,
      "source": f"simulated from {he_name or 'an H&E image'} (seed {seed})",
      "simulation": simulation,
    },
  )
  return SimulatedMSI(
    msi=msi,
    he=he,
    histology_pixel_size_um=he_px,
    transform=transform,
    displacement=displacement,
    displacement_um=displacement_um,
    landmarks=landmarks,
    tissue_classes=classes,
    tissue_classes_msi=classes_msi,
    class_centroids=centroids,
  )


def _instrument_kernel(sigma_px: float, box_px: float) -> np.ndarray:
  """1-D weights per pixel offset of a box of width `box_px` convolved with a Gaussian of σ `sigma_px`.

  Each weight is the kernel integrated over its pixel (16 points per pixel), so a box narrower than a pixel or a
  vanishing σ stay exact; the weights sum to 1.
  """
  radius = int(np.ceil(3 * sigma_px + box_px / 2)) + 1
  x = np.arange(-radius, radius + 1)[:, None] + (np.arange(16) + 0.5)[None, :] / 16 - 0.5
  half = max(box_px, 1e-6) / 2
  if sigma_px > 1e-3:
    profile = special.ndtr((x + half) / sigma_px) - special.ndtr((x - half) / sigma_px)
  else:
    profile = (np.abs(x) <= half).astype(np.float64)
  weights = profile.mean(axis=1)
  if weights.sum() <= 0:  # A box far below a pixel without blur: all weight on the centre.
    weights[radius] = 1.0
  return weights / weights.sum()


def _bounding_box(active: np.ndarray, margin: tuple[int, int]) -> tuple[int, int, int, int]:
  """Row and column ranges [lo, hi) of the True pixels, widened by `margin` and clipped to the image."""
  height, width = active.shape
  rows, cols = np.flatnonzero(active.any(axis=1)), np.flatnonzero(active.any(axis=0))
  if rows.size == 0:
    return 0, min(height, 2), 0, min(width, 2)
  return (
    max(0, rows[0] - margin[0]),
    min(height, rows[-1] + margin[0] + 1),
    max(0, cols[0] - margin[1]),
    min(width, cols[-1] + margin[1] + 1),
  )


class _BilinearSampler:
  """Bilinear interpolation at fixed (row, col) positions, shared by many channels."""

  def __init__(self, rc: np.ndarray, shape: tuple[int, int]):
    height, width = shape
    r, c = rc
    self.inside = (r >= -0.5) & (r <= height - 0.5) & (c >= -0.5) & (c <= width - 0.5)
    r = np.clip(r, 0, height - 1)
    c = np.clip(c, 0, width - 1)
    r0 = np.minimum(np.floor(r).astype(np.int64), max(height - 2, 0))
    c0 = np.minimum(np.floor(c).astype(np.int64), max(width - 2, 0))
    fr, fc = r - r0, c - c0
    r1, c1 = np.minimum(r0 + 1, height - 1), np.minimum(c0 + 1, width - 1)
    self.index = np.stack([r0 * width + c0, r0 * width + c1, r1 * width + c0, r1 * width + c1])
    self.weight = np.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc])

  def __call__(self, flat: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """(H·W, c) values → (N, c) at the positions; `outside` (c,) where a position is off the image."""
    out = np.zeros((self.index.shape[1], flat.shape[1]))
    for k in range(4):
      out += self.weight[k][:, None] * flat[self.index[k]]
    out[~self.inside] = outside
    return out


def _add_noise(rng: np.random.Generator, expected: np.ndarray, noise: NoiseModel, msi_px) -> tuple:
  """Step 6: ionisation efficiency, baseline, counting noise, hotspots, missing pixels."""
  height, width, n_channels = expected.shape
  log_eta = np.zeros((height, width))
  if noise.ionisation_smooth_sd > 0:
    sigma = (noise.ionisation_length_um / msi_px[0], noise.ionisation_length_um / msi_px[1])
    log_eta += noise.ionisation_smooth_sd * _smooth_field(rng, (height, width), sigma)
  if noise.ionisation_random_sd > 0:
    log_eta += noise.ionisation_random_sd * rng.standard_normal((height, width))
  log_eta -= (noise.ionisation_smooth_sd**2 + noise.ionisation_random_sd**2) / 2
  rate = np.exp(log_eta)[..., None] * expected
  if noise.baseline > 0:
    rate = rate + noise.baseline * rng.exponential(1.0, n_channels)
  if noise.gamma_shape is not None:
    rate = rate * rng.gamma(noise.gamma_shape, 1.0 / noise.gamma_shape, rate.shape)
  cube = rng.poisson(rate).astype(np.float32) if noise.counting == "poisson" else rate.astype(np.float32)
  n_hot = int(round(noise.hotspot_fraction * cube.size))
  if n_hot:
    flat = rng.choice(cube.size, n_hot, replace=False)
    r, c, j = np.unravel_index(flat, cube.shape)
    level = np.percentile(cube.reshape(-1, n_channels), 99.9, axis=0)
    hot = level[j] * rng.uniform(*noise.hotspot_factor, n_hot)
    cube[r, c, j] = (np.round(hot) if noise.counting == "poisson" else hot).astype(np.float32)
  mask = np.ones((height, width), bool)
  n_missing = int(round(noise.missing_fraction * height * width))
  if n_missing:
    mask.ravel()[rng.choice(height * width, n_missing, replace=False)] = False
  lines = rng.choice(height, min(noise.missing_lines, height), replace=False) if noise.missing_lines else []
  mask[np.asarray(lines, dtype=int)] = False
  cube[~mask] = 0
  info = {
    "n_hotspots": n_hot,
    "n_missing_pixels": int((~mask).sum()),
    "missing_lines": [int(v) for v in np.sort(lines)],
  }
  return cube, mask, info


def _draw_landmarks(rng, tissue, he_px, transform, displacement, msi_shape, msi_px, n_landmarks) -> np.ndarray:
  """Landmarks at tissue pixels spread by farthest-point sampling, kept when they fall on the MSI grid."""
  if n_landmarks <= 0:
    return np.zeros((0, 4))
  rows, cols = np.nonzero(tissue)
  if len(rows) > 20000:
    keep = np.sort(rng.choice(len(rows), 20000, replace=False))
    rows, cols = rows[keep], cols[keep]
  fixed = np.stack([cols * he_px[1], rows * he_px[0]], -1).astype(np.float64)
  moving = _fixed_to_moving(transform, displacement, fixed)
  on_grid = (
    (moving[:, 0] >= 0)
    & (moving[:, 0] <= (msi_shape[1] - 1) * msi_px[1])
    & (moving[:, 1] >= 0)
    & (moving[:, 1] <= (msi_shape[0] - 1) * msi_px[0])
  )
  fixed, moving = fixed[on_grid], moving[on_grid]
  if len(fixed) == 0:
    return np.zeros((0, 4))
  chosen = [int(rng.integers(len(fixed)))]
  distance = np.linalg.norm(fixed - fixed[chosen[0]], axis=1)
  for _ in range(min(n_landmarks, len(fixed)) - 1):
    chosen.append(int(np.argmax(distance)))
    distance = np.minimum(distance, np.linalg.norm(fixed - fixed[chosen[-1]], axis=1))
  return np.concatenate([fixed[chosen], moving[chosen]], axis=1)


def save_simulated(sim: SimulatedMSI, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, pathlib.Path]:
  """Writes a simulated acquisition and its ground truth to a folder.

  Files: `simulated_msi.imzML`/`.ibd` (processed mode, by `msisynth.io.write_imzml`), `he.png` (the H&E),
  `ground_truth.json` (fixed → moving transform matrix in µm, pixel sizes, shapes, displacement terms, every
  generating parameter, `"simulated": true`), `landmarks.csv` (columns fixed_x, fixed_y, moving_x, moving_y, µm),
  `tissue_classes.npy` (H&E grid) and, with a deformation, `displacement_um.npy` ((H_msi, W_msi, 2) (x, y) µm).

  Args:
    sim: the simulation.
    out_dir: folder to write into (created if needed).
    overwrite: replace existing files; otherwise an existing file is an error.

  Returns:
    The written paths by name ("imzml", "he", "ground_truth", "landmarks", "tissue_classes", "displacement").

  Raises:
    ConfigError: when a file exists and overwrite is False (nothing is written then).
  """
  out = pathlib.Path(out_dir)
  paths = {
    "imzml": out / "simulated_msi.imzML",
    "he": out / "he.png",
    "ground_truth": out / "ground_truth.json",
    "landmarks": out / "landmarks.csv",
    "tissue_classes": out / "tissue_classes.npy",
  }
  if sim.displacement_um is not None:
    paths["displacement"] = out / "displacement_um.npy"
  outputs.refuse_existing(*paths.values(), paths["imzml"].with_suffix(".ibd"), overwrite=overwrite)
  out.mkdir(parents=True, exist_ok=True)
  msi_io.write_imzml(paths["imzml"], sim.msi, mode="processed", overwrite=overwrite)
  msi_io.write_image(paths["he"], np.clip(sim.he, 0, 1), overwrite=overwrite)
  simulation = sim.msi.metadata.get("simulation", {})
  ground_truth = {
    "simulated": True,
    "fixed": "histology (he.png)",
    "moving": "MSI (simulated_msi.imzML)",
    "transform_fixed_to_moving": np.asarray(sim.transform.matrix).tolist(),
    "transform_units": "µm, points (x, y), pixel (0, 0) centre at the origin",
    "displacement_model": "the MSI at p shows the H&E at T^-1(p - u(p)); u in the MSI frame, µm",
    "displacement": None if sim.displacement is None else sim.displacement.to_dict(),
    "histology_pixel_size_um": list(sim.histology_pixel_size_um),
    "he_pixel_size_um": list(sim.histology_pixel_size_um),  # deprecated name of histology_pixel_size_um
    "msi_pixel_size_um": list(sim.msi.pixel_size_um),
    "he_shape": list(sim.he.shape[:2]),
    "msi_shape": list(sim.msi.shape),
    "n_landmarks": int(len(sim.landmarks)),
    "parameters": simulation,
  }
  outputs.atomic_write(paths["ground_truth"], json.dumps(ground_truth, indent=2))
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer)
  writer.writerow(["fixed_x", "fixed_y", "moving_x", "moving_y"])
  writer.writerows([[f"{v:.6f}" for v in row] for row in sim.landmarks])
  outputs.atomic_write(paths["landmarks"], buffer.getvalue())
  outputs.save_npy(paths["tissue_classes"], sim.tissue_classes)
  if sim.displacement_um is not None:
    outputs.save_npy(paths["displacement"], sim.displacement_um)
  return paths


# --------------------------------------------------------------------------------------------------- benchmark

_STREAM_NEIGHBOUR, _STREAM_OUTLINE, _STREAM_ROI, _STREAM_STAIN, _STREAM_DRIFT, _STREAM_BENCH_LM = range(200, 206)
ISOTOPE_SPACING = 1.00336


@dataclasses.dataclass
class BenchmarkCase:
  """One SIMULATED benchmark case (`simulate_benchmark_case`): MSI of a neighbouring section and the H&E.

  Attributes:
    msi: the simulated MSI (counts), isotope and drift effects included; `metadata["simulated"]` is True.
    he: the H&E the MSI is registered to, re-stained (stain variation), (H, W, 3) in [0, 1].
    histology_pixel_size_um: (y, x) µm.
    transform: the affine ground truth, H&E (fixed) µm → MSI (moving) µm.
    landmarks: (N, 4) fixed_x, fixed_y (H&E µm), moving_x, moving_y (MSI µm) = T(fixed): the affine ground truth
      at tissue points, for the TRE of an affine registration.
    neighbour_he: the neighbouring section the MSI was simulated from (elastic warp, tears, folds), unstained copy.
    elastic_um: (H, W, 2) the elastic displacement (x, y) µm of the neighbour, on the H&E grid.
    roi_mask: (H_msi, W_msi) bool, the acquired polygon.
    tissue_msi: (H_msi, W_msi) bool, tissue of the neighbour at the MSI pixels.
    simulated: always True.
    metadata: every generating parameter.
  """

  msi: MSIImage
  he: np.ndarray
  histology_pixel_size_um: tuple[float, float]
  transform: AffineTransform
  landmarks: np.ndarray
  neighbour_he: np.ndarray
  elastic_um: np.ndarray
  roi_mask: np.ndarray
  tissue_msi: np.ndarray
  simulated: bool = True
  metadata: dict = dataclasses.field(default_factory=dict)

  @property
  def he_pixel_size_um(self) -> tuple[float, float]:
    """Deprecated name of `histology_pixel_size_um`."""
    return self.histology_pixel_size_um


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), stream])


def neighbour_section(
  seed: int,
  he_rgb: np.ndarray,
  *,
  histology_pixel_size_um: float | None = None,
  elastic_um: float = 40.0,
  elastic_length_um: float = 300.0,
  n_tears: int = 2,
  tear_size_um: float = 150.0,
  n_folds: int = 1,
  fold_width_um: float = 60.0,
  he_pixel_size_um: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
  """A neighbouring section of an H&E: elastic warp, local tissue loss and folds (see the module docstring).

  Args:
    seed: seed of the deformation, tears and folds.
    he_rgb: (H, W, 3) float in [0, 1].
    histology_pixel_size_um: isotropic H&E pixel, µm (required).
    elastic_um: largest elastic displacement, µm.
    elastic_length_um: Gaussian σ of the elastic field, µm.
    n_tears: number of local tissue losses.
    tear_size_um: typical tear diameter, µm.
    n_folds: number of folds.
    fold_width_um: width of a fold band, µm.
    he_pixel_size_um: deprecated name of `histology_pixel_size_um`.

  Returns:
    (neighbour (H, W, 3) float32, displacement (H, W, 2) float32 (x, y) µm, info dict).
  """
  he = _check_he(he_rgb)
  rng = _rng(seed, _STREAM_NEIGHBOUR)
  h, w = he.shape[:2]
  histology_pixel_size_um = geometry.renamed_argument(
    histology_pixel_size_um, he_pixel_size_um, "histology_pixel_size_um", "he_pixel_size_um"
  )
  if histology_pixel_size_um is None:
    raise errors.ConfigError("neighbour_section needs histology_pixel_size_um")
  px = float(histology_pixel_size_um)
  field = np.stack([ndimage.gaussian_filter(rng.standard_normal((h, w)), elastic_length_um / px, mode="reflect")
                    for _ in range(2)], axis=-1)  # fmt: skip
  field *= elastic_um / max(float(np.abs(field).max()), 1e-12)
  rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
  coords = [rows + field[..., 1] / px, cols + field[..., 0] / px]
  neighbour = np.stack([ndimage.map_coordinates(he[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)
  tissue = he_tissue_mask(neighbour)
  background = np.median(neighbour[~tissue], axis=0) if (~tissue).any() else np.ones(3)
  info = {"elastic_um": float(elastic_um), "elastic_length_um": float(elastic_length_um), "tears": [], "folds": []}
  ty, tx = np.nonzero(tissue)
  for _ in range(int(n_tears) if ty.size else 0):
    i = rng.integers(ty.size)
    blob = np.zeros((h, w))
    blob[ty[i], tx[i]] = 1.0
    blob = ndimage.gaussian_filter(blob, tear_size_um / px / 2.5)
    blob = blob / blob.max() * (0.7 + 0.6 * ndimage.gaussian_filter(rng.random((h, w)), 3))
    hole = (blob > 0.5) & tissue
    neighbour[hole] = background
    info["tears"].append({"centre_px": [int(ty[i]), int(tx[i])], "pixels": int(hole.sum())})
  for _ in range(int(n_folds) if ty.size else 0):
    theta = rng.uniform(0, np.pi)
    i = rng.integers(ty.size)
    dist = (rows - ty[i]) * math.cos(theta) - (cols - tx[i]) * math.sin(theta)
    band = (np.abs(dist) < fold_width_um / px / 2) & tissue
    od = -np.log(np.clip(neighbour[band], 1e-3, 1.0))
    neighbour[band] = np.exp(-2.0 * od)
    info["folds"].append({"through_px": [int(ty[i]), int(tx[i])], "angle_rad": float(theta),
                          "pixels": int(band.sum())})  # fmt: skip
  return np.clip(neighbour, 0, 1).astype(np.float32), field.astype(np.float32), info


def restain(seed: int, he_rgb: np.ndarray, *, stain_jitter: float = 0.12, density_jitter: float = 0.15) -> np.ndarray:
  """The same H&E under another slide's staining: optical density times a random matrix near the identity."""
  he = _check_he(he_rgb)
  rng = _rng(seed, _STREAM_STAIN)
  od = -np.log(np.clip(he.astype(np.float64), 1e-3, 1.0))
  matrix = np.eye(3) + rng.normal(0, stain_jitter, (3, 3))
  density = math.exp(rng.normal(0, density_jitter))
  return np.clip(np.exp(-density * np.clip(od @ matrix, 0, None)), 0, 1).astype(np.float32)


def _star_polygon(rng, centre_rc, extent_rc, n_vertices, radius):
  angles = np.sort(rng.uniform(0, 2 * np.pi, n_vertices))
  r = rng.uniform(radius[0], radius[1], n_vertices)
  return np.stack([centre_rc[0] + r * extent_rc[0] * np.sin(angles),
                   centre_rc[1] + r * extent_rc[1] * np.cos(angles)], axis=-1)  # fmt: skip


def isotope_abundances(mz: np.ndarray) -> np.ndarray:
  """(N, 3) relative abundances of M, M+1, M+2 (normalised to sum 1) of ions of monoisotopic m/z `mz`."""
  lam = 0.011 * np.asarray(mz, np.float64) / 14.0
  rel = np.stack([np.ones_like(lam), lam, lam**2 / 2], axis=-1)
  return rel / rel.sum(axis=-1, keepdims=True)


def drift_gain(drift_ppm: np.ndarray, *, bin_ppm: float, peak_sigma_ppm: float) -> np.ndarray:
  """The share of a Gaussian peak (σ ppm) shifted by `drift_ppm` that falls into a bin of ± `bin_ppm` ppm."""
  d = np.asarray(drift_ppm, np.float64)
  return special.ndtr((bin_ppm - d) / peak_sigma_ppm) - special.ndtr((-bin_ppm - d) / peak_sigma_ppm)


def simulate_benchmark_case(
  seed: int,
  he_rgb: np.ndarray,
  *,
  histology_pixel_size_um: float | None = None,
  msi_pixel_size_um: float = 20.0,
  n_ions: int = 40,
  chemistry_seed: int = 0,
  class_centroids: np.ndarray | None = None,
  elastic_um: float = 40.0,
  n_tears: int = 2,
  n_folds: int = 1,
  outline_leak: float = 0.6,
  roi_vertices: int = 7,
  roi_radius: tuple[float, float] = (0.45, 0.75),
  stain_jitter: float = 0.12,
  drift_ppm: float = 15.0,
  bin_ppm: float = 10.0,
  peak_sigma_ppm: float = 6.0,
  max_rotation_deg: float = 10.0,
  max_scale: float = 0.05,
  max_translation_um: float = 200.0,
  n_landmarks: int = 50,
  he_name: str = "",
  he_pixel_size_um: float | None = None,
) -> BenchmarkCase:
  """One case of the semi-synthetic benchmark (SIMULATED; model in the module docstring, "The benchmark").

  Args:
    seed: seed of this case (neighbour section, misalignment, outline, ROI, stain, drift, noise, landmarks).
    he_rgb: the real H&E, (H, W, 3) in [0, 1].
    histology_pixel_size_um: its (assumed) pixel, µm (2-5); None for 5.
    msi_pixel_size_um: MSI pixel, µm (20-50).
    n_ions: simulated ions; the cube has 3 · n_ions channels (M, M+1, M+2 of each).
    chemistry_seed: the ions' model, shared across slides.
    class_centroids: tissue-class centroids shared across slides (`fit_class_centroids`).
    elastic_um, n_tears, n_folds: the neighbouring section (`neighbour_section`).
    outline_leak: share of the other side's mean spectrum added on and off tissue (0: a sharp outline).
    roi_vertices, roi_radius: the acquisition polygon.
    stain_jitter: slide-to-slide stain variation of the H&E.
    drift_ppm, bin_ppm, peak_sigma_ppm: m/z drift, bin half-width and peak width, ppm.
    max_rotation_deg, max_scale, max_translation_um: bounds of the random affine misalignment.
    n_landmarks: tissue points for the TRE.
    he_name: recorded in the metadata.
    he_pixel_size_um: deprecated name of `histology_pixel_size_um`.

  Returns:
    A BenchmarkCase.

  Raises:
    ConfigError: for bad arguments; DataError: when the H&E shows no tissue.
  """
  from skimage import draw

  he = _check_he(he_rgb)
  histology_pixel_size_um = geometry.renamed_argument(
    histology_pixel_size_um, he_pixel_size_um, "histology_pixel_size_um", "he_pixel_size_um"
  )
  if histology_pixel_size_um is None:
    histology_pixel_size_um = 5.0
  if not 0 <= outline_leak <= 1:
    raise errors.ConfigError(f"outline_leak must be in [0, 1], got {outline_leak}")
  if n_ions < 1 or roi_vertices < 3:
    raise errors.ConfigError(f"need n_ions >= 1 and roi_vertices >= 3, got {n_ions}, {roi_vertices}")
  neighbour, field, neighbour_info = neighbour_section(
    seed, he, histology_pixel_size_um=histology_pixel_size_um, elastic_um=elastic_um, n_tears=n_tears, n_folds=n_folds
  )
  sim = simulate_msi(seed, neighbour, histology_pixel_size_um=histology_pixel_size_um,
                     msi_pixel_size_um=msi_pixel_size_um, n_channels=n_ions, misalignment="random",
                     max_rotation_deg=max_rotation_deg, max_scale=max_scale, max_translation_um=max_translation_um,
                     chemistry_seed=chemistry_seed,
                     class_centroids=class_centroids, he_name=he_name, n_landmarks=4)  # fmt: skip
  cube = np.asarray(sim.msi.cube, np.float64)
  measured = np.asarray(sim.msi.mask, bool)
  tissue = (np.asarray(sim.tissue_classes_msi) > 0)
  hm, wm = cube.shape[:2]

  # Weak outline: each side receives a share of the other side's mean spectrum, modulated smoothly.
  rng = _rng(seed, _STREAM_OUTLINE)
  on, off = tissue & measured, ~tissue & measured
  mean_on = cube[on].mean(axis=0) if on.any() else np.zeros(cube.shape[-1])
  mean_off = cube[off].mean(axis=0) if off.any() else np.zeros(cube.shape[-1])
  smooth = ndimage.gaussian_filter(rng.standard_normal((hm, wm)), 4.0)
  smooth = np.exp(0.3 * smooth / max(float(smooth.std()), 1e-12))
  leak = np.where(tissue[..., None], mean_off, mean_on) * (outline_leak * smooth)[..., None]
  cube = cube + leak * measured[..., None]

  # Isotopes and m/z drift.
  mz_mono = np.asarray(sim.msi.mz, np.float64)
  abundance = isotope_abundances(mz_mono)
  rng = _rng(seed, _STREAM_DRIFT)
  drift = ndimage.gaussian_filter(rng.standard_normal((hm, wm)), max(hm, wm) / 6)
  drift = drift / max(float(np.abs(drift).max()), 1e-12) * drift_ppm
  slope = rng.uniform(-0.5, 0.5) * drift_ppm
  mz_all = (mz_mono[:, None] + ISOTOPE_SPACING * np.arange(3)[None]).ravel()
  lo, hi = float(mz_all.min()), float(mz_all.max())
  rel_mz = (mz_all - lo) / max(hi - lo, 1e-12) - 0.5
  channels = []
  for j in range(len(mz_all)):
    ion, iso = divmod(j, 3)
    gain = drift_gain(drift + slope * rel_mz[j], bin_ppm=bin_ppm, peak_sigma_ppm=peak_sigma_ppm)
    channels.append(cube[..., ion] * abundance[ion, iso] * gain)
  cube = np.stack(channels, axis=-1)
  order = np.argsort(mz_all, kind="stable")
  cube, mz_all = cube[..., order], mz_all[order]

  # The acquisition polygon.
  rng = _rng(seed, _STREAM_ROI)
  ty, tx = np.nonzero(tissue)
  if ty.size:
    centre = (ty.mean(), tx.mean())
    extent = (max(ty.max() - ty.min(), 4) * 1.2, max(tx.max() - tx.min(), 4) * 1.2)
  else:
    centre, extent = (hm / 2, wm / 2), (hm, wm)
  poly = _star_polygon(rng, centre, extent, int(roi_vertices), roi_radius)
  roi = np.zeros((hm, wm), bool)
  rr, cc = draw.polygon(poly[:, 0], poly[:, 1], shape=(hm, wm))
  roi[rr, cc] = True
  mask = measured & roi
  cube = np.where(mask[..., None], cube, 0.0).astype(np.float32)

  stained = restain(seed, he, stain_jitter=stain_jitter)
  rng = _rng(seed, _STREAM_BENCH_LM)
  he_tissue = he_tissue_mask(he)
  ly, lx = np.nonzero(he_tissue)
  px = geometry.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  pick = rng.choice(ly.size, size=min(int(n_landmarks), ly.size), replace=False) if ly.size else np.zeros(0, int)
  fixed = np.stack([lx[pick] * px[1], ly[pick] * px[0]], axis=-1).astype(np.float64)
  moving = _apply(np.asarray(sim.transform.matrix, np.float64), fixed) if len(fixed) else fixed
  metadata = {
    "simulated": True,
    "benchmark": "neighbouring-section semi-synthetic benchmark (msisynth.simulate.simulate_benchmark_case)",
    "seed": int(seed), "he_name": he_name, "histology_pixel_size_um": float(histology_pixel_size_um),
    "he_pixel_size_um": float(histology_pixel_size_um),  # deprecated name of histology_pixel_size_um
    "msi_pixel_size_um": float(msi_pixel_size_um), "n_ions": int(n_ions), "chemistry_seed": int(chemistry_seed),
    "neighbour": neighbour_info, "outline_leak": float(outline_leak), "roi_polygon_rc": poly.tolist(),
    "stain_jitter": float(stain_jitter), "drift_ppm": float(drift_ppm), "bin_ppm": float(bin_ppm),
    "peak_sigma_ppm": float(peak_sigma_ppm), "drift_slope_ppm": float(slope),
    "transform_fixed_to_moving": np.asarray(sim.transform.matrix, np.float64).tolist(),
    "simulation": sim.msi.metadata["simulation"],
  }  # fmt: skip
  msi = MSIImage(cube=cube, mz=mz_all.astype(np.float64), mask=mask, pixel_size_um=sim.msi.pixel_size_um,
                 metadata={"simulated": True, "source": f"SIMULATED benchmark case from {he_name or 'an H&E'} "
                                                        f"(seed {seed})", "simulation": metadata})  # fmt: skip
  return BenchmarkCase(msi=msi, he=stained, histology_pixel_size_um=px, transform=sim.transform,
                       landmarks=np.concatenate([fixed, moving], axis=1), neighbour_he=neighbour, elastic_um=field,
                       roi_mask=roi, tissue_msi=tissue, metadata=metadata)  # fmt: skip
