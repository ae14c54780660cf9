"""The real msight bladder pair (MALDI-TOF MSI and H&E of one mouse urogenital section; see the data README).

`load_section` loads it with `msisynth.datasets.load_msight_bladder` (the file's unsorted m/z axis sorted, its
repeated channel merged: 421 channels), reduces the H&E by an integer block factor and fits the rough affine of the
4 manual landmark pairs (H&E µm → MSI µm). The file's recorded H&E pixel size (0.17 µm) is wrong; the pixel is the
one the landmarks imply (about 2.7 µm at full resolution).
"""

from __future__ import annotations

import numpy as np

from msisynth.evaluation import images

MSI_PIXEL_UM = 25.0


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The least-squares 3 × 3 affine matrix mapping (N, 2) points `src` to `dst`."""
  a = np.concatenate([src, np.ones((len(src), 1))], axis=1)
  sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
  matrix = np.eye(3)
  matrix[:2, :] = sol.T
  return matrix


def load_section(data_dir=None, *, he_reduce: int = 4):
  """The pair as a `common.Section` (real; `truth` None) with the landmark affine as its transform.

  Returns:
    (section, info): info holds the estimated H&E pixel size, the landmark residuals (MSI px) and the reduction.
  """
  from msisynth import datasets, simulate
  from msisynth.evaluation.common import Section
  from msisynth.geometry.transforms import AffineTransform

  pair = datasets.load_msight_bladder(data_dir, download=False)
  msi = pair.msi
  he = np.clip(images.block_reduce(np.asarray(pair.he, np.float32), int(he_reduce)), 0, 1).astype(np.float32)
  lm = np.asarray(pair.landmarks_px, np.float64)
  pixel_matrix = fit_affine(lm[:, 2:4], lm[:, 0:2])  # H&E px -> MSI px
  scale = float(np.sqrt(abs(np.linalg.det(pixel_matrix[:2, :2]))))
  he_full_px = scale * MSI_PIXEL_UM
  he_px = he_full_px * he_reduce
  # Block reduction by f moves pixel centres: full-res pixel (f - 1)/2 is reduced pixel 0.
  he_um = (lm[:, 2:4] - (he_reduce - 1) / 2) / he_reduce * he_px
  msi_um = lm[:, 0:2] * MSI_PIXEL_UM
  matrix = fit_affine(he_um, msi_um)
  residual = np.linalg.norm(he_um @ matrix[:2, :2].T + matrix[:2, 2] - msi_um, axis=1) / MSI_PIXEL_UM
  transform = AffineTransform(matrix)
  section = Section("msight_bladder", msi, he, he_px, transform, truth=None,
                    landmarks=np.concatenate([he_um, msi_um], 1), simulated=False,
                    he_mask=simulate.he_tissue_mask(he))  # fmt: skip
  info = {"histology_pixel_size_um_estimated": he_px, "histology_full_pixel_size_um_estimated": he_full_px,
          "he_reduce": int(he_reduce), "landmark_residual_msi_px": residual.tolist(), "msi_shape": list(msi.shape),
          "n_channels": int(msi.cube.shape[-1]), "measured_pixels": int(msi.mask.sum())}  # fmt: skip
  return section, info


def spatial_split(mask: np.ndarray, *, test_fraction: float = 0.4, gap_px: int = 4, axis: int = 1):
  """Train and test regions (bool, MSI grid): a cut across `axis` leaving `test_fraction` of `mask` on the high side."""
  m = np.asarray(mask, bool)
  counts = m.sum(axis=1 - axis)
  cum = np.cumsum(counts) / max(counts.sum(), 1)
  cut = int(np.searchsorted(cum, 1 - test_fraction))
  idx = np.arange(m.shape[axis])
  train_1d, test_1d = idx < cut - gap_px // 2, idx >= cut + (gap_px - gap_px // 2)
  shape = [1, 1]
  shape[axis] = -1
  return np.broadcast_to(train_1d.reshape(shape), m.shape) & m, np.broadcast_to(test_1d.reshape(shape), m.shape) & m


# ----------------------------------------------------------------------------------------- registration routes
# The routes measured on the real pairs (benchmarks/bench_real_pairs.py, docs/results.md section 10 "Real pairs").
# Landmarks only score a result (`landmark_distance_msi_px`); no route fits to them or chooses by them.


def _pc_scores(spectra: np.ndarray, n_components: int) -> np.ndarray:
  """(N, k) scores on the first principal components (`preprocess.pca`, largest variance first, each axis's
  largest loading positive, so the images do not flip between runs) of √(TIC-normalised) (N, C) spectra."""
  from msisynth import preprocess

  rooted = np.sqrt(spectra / np.maximum(spectra.sum(axis=1), 1e-12)[:, None])
  k = int(min(n_components, *rooted.shape))
  if k < 1:
    return np.zeros((rooted.shape[0], 0))
  return np.asarray(preprocess.pca(rooted, k, method="full").scores, np.float64)


def msi_images(msi, *, n_components: int = 6) -> dict[str, np.ndarray]:
  """Grey images of an MSI on its grid, each scaled to [0, 1] by its 1st and 99th percentiles over the measured
  pixels: "tic" (total ion count) and "pc1" ... (principal components of the square root of the TIC-normalised
  spectra, ordered by variance). Unmeasured pixels hold each image's median.

  Args:
    msi: an `MSIImage`.
    n_components: principal components to return.

  Returns:
    {name: (H, W) float32}.

  Raises:
    DataError: when fewer than 2 pixels are measured or every measured spectrum is zero.
  """
  from msisynth import errors

  mask = np.asarray(msi.mask, bool)
  spectra = np.asarray(msi.cube, np.float64)[mask]
  tic = spectra.sum(axis=1)
  if spectra.shape[0] < 2 or not np.any(tic > 0):
    raise errors.DataError("the MSI has fewer than 2 measured pixels or only zero spectra", msi.metadata.get("source"))
  pcs = _pc_scores(spectra, n_components)
  scores = [tic] + [pcs[:, i] for i in range(pcs.shape[1])]
  out = {}
  for name, values in zip(["tic"] + [f"pc{i + 1}" for i in range(pcs.shape[1])], scores):
    lo, hi = np.percentile(values, [1, 99])
    scaled = np.clip((values - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    image = np.full(mask.shape, np.median(scaled), np.float32)
    image[mask] = scaled
    out[name] = image
  return out


def msi_features(msi, n_components: int) -> np.ndarray:
  """(H, W, K) float32 principal-component scores (as `msi_images`, unscaled; 0 outside the measured pixels)."""
  mask = np.asarray(msi.mask, bool)
  pcs = _pc_scores(np.asarray(msi.cube, np.float64)[mask], n_components)
  out = np.zeros(mask.shape + (pcs.shape[1],), np.float32)
  out[mask] = pcs
  return out


def landmark_distance_msi_px(transform, landmarks_um: np.ndarray, msi_pixel_size_um: float) -> np.ndarray:
  """(N,) distances (MSI pixels) between where a histology µm → MSI µm transform sends the histology landmarks and
  the MSI landmarks; `landmarks_um` is (N, 4): histology x, y, MSI x, y (µm)."""
  m = np.asarray(transform.matrix, np.float64)
  lm = np.asarray(landmarks_um, np.float64)
  mapped = lm[:, :2] @ m[:2, :2].T + m[:2, 2]
  return np.linalg.norm(mapped - lm[:, 2:4], axis=1) / float(msi_pixel_size_um)


def histology_on_msi_grid(histology, transform, msi_shape, *, histology_pixel_size_um: float,
                          msi_pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
  """The histology smoothed to the MSI pixel and sampled at the MSI pixel centres through a histology µm → MSI µm
  transform: ((h, w, C) float32, (h, w) bool inside the histology field)."""
  from scipy import ndimage as ndi

  from msisynth.geometry.transforms import AffineTransform, warp_image

  he = np.asarray(histology, np.float32)
  he = he[..., None] if he.ndim == 2 else he
  sigma = 0.5 * float(msi_pixel_size_um) / float(histology_pixel_size_um)
  smooth = np.stack([ndi.gaussian_filter(he[..., c], sigma) for c in range(he.shape[-1])], axis=-1)
  inverse = AffineTransform.from_matrix(np.linalg.inv(np.asarray(transform.matrix, np.float64)))
  kwargs = dict(fixed_pixel_size_um=float(msi_pixel_size_um), moving_pixel_size_um=float(histology_pixel_size_um))
  sampled = np.asarray(warp_image(smooth, inverse, msi_shape[:2], **kwargs))
  inside = np.asarray(warp_image(np.ones(he.shape[:2], np.float32), inverse, msi_shape[:2], order=0, **kwargs)) > 0.5
  return sampled.reshape(*msi_shape[:2], -1), inside


def ridge_image(features: np.ndarray, mask: np.ndarray, target: np.ndarray, fit_mask: np.ndarray, *,
                ridge: float = 1.0) -> np.ndarray:  # fmt: skip
  """A linear "synthesis": the ridge regression of `target` (h, w) on `features` (h, w, K) fitted over `fit_mask`,
  predicted over `mask` and clipped to [0, 1]; the median prediction elsewhere. (h, w) float32."""
  sel = np.asarray(fit_mask, bool) & np.asarray(mask, bool) & np.isfinite(target)
  design = np.concatenate([features[sel], np.ones((int(sel.sum()), 1), np.float32)], axis=1).astype(np.float64)
  gram = design.T @ design + ridge * np.eye(design.shape[1])
  coef = np.linalg.solve(gram, design.T @ np.asarray(target, np.float64)[sel])
  full = np.concatenate([features[mask], np.ones((int(mask.sum()), 1), np.float32)], axis=1) @ coef
  full = np.clip(full, 0.0, 1.0)
  out = np.full(mask.shape, np.median(full), np.float32)
  out[mask] = full
  return out


def register_iterative_ridge(histology, msi, initial, *, histology_pixel_size_um: float, n_components: int = 30,
                             iterations: int = 4, config=None, histology_mask=None):  # fmt: skip
  """Alternates a linear synthesis and a registration, from an initial histology µm → MSI µm transform.

  At each round: the histology's luminance is sampled on the MSI grid at the current transform, a ridge map from
  the MSI's first `n_components` principal components to it is fitted (`ridge_image`), and that image is
  registered (moving, with the measured pixels as its mask) starting from the current transform.

  Args:
    histology: (H, W, 3) RGB histology in [0, 1].
    msi: the `MSIImage` (its pixel size is used).
    initial: the starting `AffineTransform` (e.g. from `register_msi_to_histology` on a principal component).
    histology_pixel_size_um: histology pixel size.
    n_components: principal components the ridge map uses.
    iterations: rounds.
    config: `RegistrationConfig` of each round's registration.
    histology_mask: optional fixed mask.

  Returns:
    (result, history): the last `RegistrationResult` and the transform after each round.
  """
  from msisynth.register import optimize

  msi_px = float(msi.pixel_size_um[1])
  features = msi_features(msi, n_components)
  mask = np.asarray(msi.mask, bool)
  grey = optimize.to_grey(np.asarray(histology, np.float32)[..., :3])
  transform, history, result = initial, [], None
  for _ in range(int(iterations)):
    target, inside = histology_on_msi_grid(grey, transform, mask.shape, histology_pixel_size_um=histology_pixel_size_um,
                                           msi_pixel_size_um=msi_px)  # fmt: skip
    image = ridge_image(features, mask, target[..., 0], inside)
    result = optimize.register(histology, image, fixed_pixel_size_um=histology_pixel_size_um,
                               moving_pixel_size_um=msi.pixel_size_um, fixed_mask=histology_mask, moving_mask=mask,
                               config=config, initial_transform=transform)  # fmt: skip
    transform = result.transform
    history.append(transform)
  return result, history
