"""Building blocks the study shares: pairs from sections, training one model, scoring, registering one route.

A *section* here is an MSI acquisition with its H&E and (where known) the affine ground truth H&E µm → MSI µm.
Layouts: MSI as `msisynth.MSIImage`; H&E (H, W, 3) float RGB in [0, 1]; transforms fixed (H&E) → moving (MSI).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any

import numpy as np

from msisynth import errors, metrics
from msisynth.evaluation import images


@dataclasses.dataclass
class Section:
  """One MSI acquisition and its H&E.

  Attributes:
    name: for tables.
    msi: the MSI (`MSIImage`).
    he: (H, W, 3) H&E in [0, 1].
    histology_pixel_size_um: isotropic H&E pixel, µm.
    transform: the transform used to build training pairs (ground truth, or an estimate).
    truth: the affine ground truth (simulated) or None (real data).
    landmarks: (N, 4) fixed_x, fixed_y, moving_x, moving_y µm for the TRE against `truth`, or None.
    simulated: whether the MSI is simulated.
    he_mask: optional (H, W) bool tissue of the H&E.
  """

  name: str
  msi: Any
  he: np.ndarray
  histology_pixel_size_um: float
  transform: Any
  truth: Any = None
  landmarks: np.ndarray | None = None
  simulated: bool = True
  he_mask: np.ndarray | None = None


def fit_preprocessor(sections, masks, n_components: int, seed: int):
  """One `MSIPreprocessor` (TIC, 99th-percentile hotspots, PCA, [-1, 1]) fitted on the masked pixels of `sections`."""
  from msisynth import data as data_lib
  from msisynth.preprocess import MSIPreprocessor, PreprocessConfig

  config = PreprocessConfig(channels="all", normalization="tic", hotspot_quantile=0.99, reduction="pca",
                            n_components=int(n_components), scale_quantiles=(0.01, 0.99), seed=int(seed))  # fmt: skip
  pooled, mask = data_lib._pooled_section([s.msi for s in sections], masks, "study training sections")
  return MSIPreprocessor(config=config).fit(pooled, mask=mask)


def make_section_pair(section: Section, preprocessor, upsample: int, transform=None):
  """The training/evaluation pair of a section on its MSI grid upsampled by `upsample`."""
  from msisynth import data as data_lib
  from msisynth import simulate

  he_mask = section.he_mask if section.he_mask is not None else simulate.he_tissue_mask(section.he)
  return data_lib.make_pair(
    np.asarray(preprocessor.transform(section.msi), np.float32), section.he,
    transform=transform if transform is not None else section.transform,
    msi_pixel_size_um=section.msi.pixel_size_um, histology_pixel_size_um=section.histology_pixel_size_um,
    upsample=int(upsample), msi_mask=section.msi.mask, histology_mask=he_mask, name=section.name,
    metadata={"simulated": bool(section.simulated)})  # fmt: skip


def train_model(config, workdir: str | os.PathLike, pairs, regions, preprocessor, *, data_seed: int, tile: int,
                overlap: int):  # fmt: skip
  """Trains one model (config.model.kind; config.seed is the training seed) and returns (Synthesizer, seconds)."""
  from msisynth import data as data_lib
  from msisynth import synthesize
  from msisynth import train as train_lib

  start = time.perf_counter()
  d = config.data
  dataset = data_lib.PatchDataset(pairs, patch_size=int(d.patch_size), batch_size=int(config.train.batch_size),
                                  seed=int(data_seed), region_masks=regions, augment=True,
                                  min_tissue_fraction=float(d.min_tissue_fraction))  # fmt: skip
  train_lib.train_and_evaluate(config, workdir, dataset, None, preprocessor=preprocessor)
  synth = synthesize.load_synthesizer(workdir, which="latest", tile_size=int(tile), overlap=int(overlap),
                                      batch_size=16)  # fmt: skip
  return synth, time.perf_counter() - start


def score_images(fake: np.ndarray, real: np.ndarray, mask: np.ndarray, *, mi_bins: int, kid_patch: int,
                 where: str, real_features: np.ndarray | None = None) -> dict[str, float]:  # fmt: skip
  """Every image measure of one case; DataError when any is not finite (never dropped).

  mi_bits: Miller–Madow-corrected MI of the luminance, `mi_bins` bins over [0, 1], in bits (the region must hold
  4 · bins² pixels); mi_plugin_bits the uncorrected value; mi_perm_bits the plug-in minus a 10-shuffle permutation
  null; nmi (100 bins), ssim, psnr_db inside the mask; kid the texture KID (lower is better) of patches of
  `kid_patch` pixels (`real_features`: the real image's `texture_features`, when already computed).
  """
  from msisynth.evaluation import stats

  m = np.asarray(mask, bool)
  mm = metrics.mutual_information_corrected(fake, real, bins=mi_bins, mask=m, correction="miller_madow", where=where)
  perm = metrics.mutual_information_corrected(fake, real, bins=mi_bins, mask=m, correction="permutation",
                                              n_permutations=10, where=where)  # fmt: skip
  out = {
    "mi_bits": mm["mi_bits"],
    "mi_plugin_bits": mm["plugin_bits"],
    "mi_perm_bits": perm["mi_bits"],
    "nmi": float(metrics.normalized_mutual_information(fake, real, bins=100, value_range=(0.0, 1.0), mask=m)),
    "ssim": float(metrics.ssim(fake, real, max_val=1.0, mask=m)),
    "psnr_db": float(metrics.psnr(fake, real, max_val=1.0, mask=m)),
    "kid": _kid(fake, real, m, kid_patch, real_features),
    "n_pixels": int(m.sum()),
  }
  stats.check_finite(out, where)
  return out


def real_texture_features(real: np.ndarray, mask: np.ndarray, kid_patch: int, max_patches: int = 1000):
  """The real image's texture features for `score_images` (disjoint patches, at most `max_patches`)."""
  f = metrics.texture_features(real, patch_size=kid_patch, mask=np.asarray(mask, bool))
  return f, _subset(len(f), max_patches)


def _subset(n: int, k: int) -> np.ndarray:
  return np.linspace(0, n - 1, min(n, k)).round().astype(int) if n else np.zeros(0, int)


def _kid(fake, real, mask, patch, real_features) -> float:
  if real_features is None:
    return metrics.texture_kid(fake, real, mask=mask, patch_size=patch)["kid"]
  fb, keep = real_features
  fa = metrics.texture_features(fake, patch_size=patch, mask=mask)
  return metrics.kernel_distance(fa[keep], fb[keep])


def register_route(fixed, moving, *, fixed_px, moving_px, moving_mask, rconfig, fixed_mask=None, initial=None):
  """(RegistrationResult or None, error text or None, seconds) of one registration."""
  import warnings

  from msisynth.register import optimize

  start = time.perf_counter()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      result = optimize.register(fixed, moving, fixed_pixel_size_um=fixed_px, moving_pixel_size_um=moving_px,
                                 fixed_mask=fixed_mask, moving_mask=moving_mask, config=rconfig,
                                 initial_transform=initial)  # fmt: skip
    return result, None, time.perf_counter() - start
  except errors.RegistrationError as e:
    return None, str(e), time.perf_counter() - start


def route_images(section: Section, synthesizer, preprocessor, upsample: int, roi=None) -> dict[str, tuple]:
  """Moving images of the routes: name → (image, pixel size µm, mask); `roi` restricts the measured pixels."""
  from msisynth import data as data_lib

  measured = np.asarray(section.msi.mask, bool) if roi is None else np.asarray(section.msi.mask, bool) & roi
  px = float(np.sqrt(np.prod(section.msi.pixel_size_um)))
  x = np.asarray(preprocessor.transform(section.msi), np.float32)
  out = {
    "msi_tic": (np.where(measured, images.tic_image(section.msi), 0.0).astype(np.float32), px, measured),
    "msi_pca1": (np.where(measured, images.first_pc(x, measured), 0.0).astype(np.float32), px, measured),
  }
  if synthesizer is not None:
    up = data_lib.upsample_grid(np.clip(x, -1, 1), upsample)
    measured_up = data_lib.upsample_grid(measured.astype(np.float32), upsample) > 1 - 1e-4
    fake = np.asarray(synthesizer(up))
    fake = np.where(measured_up[..., None], fake, 1.0).astype(np.float32)
    out["synthetic"] = (fake, px / upsample, measured_up)
  return out


def write_text(path: pathlib.Path, text: str) -> None:
  from msisynth import outputs

  outputs.atomic_write(path, text)
