"""The real msight bladder pair (MALDI-TOF MSI and H&E of one mouse urogenital section; see the data README).

`load_section` reads the continuous imzML (its shared m/z axis is unsorted, so the channels are sorted here) with
pyimzml, the H&E (LZW OME-TIFF, reduced by an integer block factor), and fits the rough affine of the 4 manual
landmark pairs (H&E µm → MSI µm). The file's recorded H&E pixel size (0.17 µm) is wrong; the H&E pixel is
estimated from the landmarks (the affine's scale × the 25 µm MSI pixel).

Once `msisynth.datasets` loads this pair, `load_section` can call it instead of reading the files itself.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from msisynth import errors
from msisynth.evaluation import images

MSI_PIXEL_UM = 25.0


def _folder(data_dir) -> pathlib.Path:
  from msisynth import datasets

  root = pathlib.Path(data_dir) if data_dir else datasets.data_dir()
  folder = root / "msight_bladder"
  if not (folder / "prostate_example.imzML").is_file():
    raise errors.DataError(f"{folder}: the msight bladder pair (prostate_example.imzML) is not there")
  return folder


def read_msi(data_dir=None):
  """The MSI as an `MSIImage` (163 × 274 pixels of 25 µm, 422 channels sorted by m/z, measured = in the ROI)."""
  import warnings

  from pyimzml.ImzMLParser import ImzMLParser

  from msisynth.types import MSIImage

  path = _folder(data_dir) / "prostate_example.imzML"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    parser = ImzMLParser(os.fspath(path))
  coords = np.asarray(parser.coordinates)[:, :2] - 1
  width, height = coords.max(axis=0) + 1
  mz0, _ = parser.getspectrum(0)
  order = np.argsort(np.asarray(mz0), kind="stable")
  cube = np.zeros((int(height), int(width), len(order)), np.float32)
  mask = np.zeros((int(height), int(width)), bool)
  for i, (x, y) in enumerate(coords):
    _, intensity = parser.getspectrum(i)
    cube[y, x] = np.asarray(intensity, np.float32)[order]
    mask[y, x] = True
  mz = np.asarray(mz0, np.float64)[order]
  keep = np.concatenate([[True], np.diff(mz) > 0])
  return MSIImage(cube=cube[..., keep], mz=mz[keep], mask=mask, pixel_size_um=(MSI_PIXEL_UM, MSI_PIXEL_UM),
                  metadata={"simulated": False, "source": os.fspath(path)})  # fmt: skip


def read_landmarks(data_dir=None) -> np.ndarray:
  """(4, 4) msi_x, msi_y, he_x, he_y in pixels (pixel centres at integers)."""
  path = _folder(data_dir) / "landmarks_rough_msightnotebook.csv"
  return np.loadtxt(path, delimiter=",", comments="#")


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
  from msisynth import io as msi_io
  from msisynth import simulate
  from msisynth.evaluation.common import Section
  from msisynth.register.transforms import AffineTransform

  msi = read_msi(data_dir)
  he_full = msi_io.read_histology(_folder(data_dir) / "prostate_he_example.tif")
  he = np.clip(images.block_reduce(np.asarray(he_full, np.float32), int(he_reduce)), 0, 1).astype(np.float32)
  lm = read_landmarks(data_dir)
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
  info = {"he_pixel_size_um_estimated": he_px, "he_full_pixel_size_um_estimated": he_full_px,
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
