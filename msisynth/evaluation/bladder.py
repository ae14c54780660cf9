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
