"""Measurement behind the default variance-stabilising transform of `PreprocessConfig` (before PCA).

For each option ("none", "sqrt", "log1p", "pareto") the default preprocessing (TIC normalisation, hotspot
clipping at the 0.99 quantile of nonzero pixels, then the transform, then PCA with 3 components) is fitted on
real sections, and the principal component images are scored:

  neighbour_corr   mean over the 3 PC images of the Pearson correlation between horizontally adjacent measured
                   pixels: tissue structure is spatially coherent, pixel noise is not (higher is better);
  channels         effective number of channels in the loadings of PC1-3, (sum l^2)^2 / sum l^4, averaged: how many
                   ions the components draw on rather than the few most intense (higher is better);
  r2_microscopy    (msiFlow only) R^2 of a linear fit of the registered microscopy channels (autofluorescence,
                   Ly6G, urothelium) from the 3 PC images inside the tissue: how much of the histology the inputs
                   of the synthesis network carry (higher is better).

Data: the real msight MALDI-TOF section (`msight_bladder`, 421 channels after merging the repeated m/z, 33,035
spectra), the real msiFlow UPEC_12 section (10 ion images, 140 x 128) and the real mouse brain amyloid-beta ion
images (3 channels; only neighbour_corr is informative with 3 channels and 3 components).

  PYTHONPATH=. python benchmarks/measure_variance.py     # about a minute; writes benchmarks/results/variance.json
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from msisynth import datasets  # noqa: E402
from msisynth import preprocess as pp  # noqa: E402
from msisynth.io import imzml  # noqa: E402

OPTIONS = ("none", "sqrt", "log1p", "pareto")


def neighbour_corr(images: np.ndarray, mask: np.ndarray) -> float:
  both = mask[:, 1:] & mask[:, :-1]
  values = []
  for k in range(images.shape[-1]):
    a, b = images[:, 1:, k][both], images[:, :-1, k][both]
    values.append(float(np.corrcoef(a, b)[0, 1]))
  return float(np.mean(values))


def effective_channels(components: np.ndarray) -> float:
  c2 = components**2
  return float(np.mean(c2.sum(axis=1) ** 2 / (c2**2).sum(axis=1)))


def r2(features: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
  x = np.concatenate([features[mask], np.ones((int(mask.sum()), 1))], axis=1)
  scores = []
  for k in range(targets.shape[-1]):
    y = targets[..., k][mask].astype(np.float64)
    if y.std() == 0:
      continue
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    scores.append(1 - np.var(y - x @ coef) / np.var(y))
  return float(np.mean(scores))


def score(msi, fit_mask, targets=None, target_mask=None) -> dict:
  out = {}
  for option in OPTIONS:
    config = pp.PreprocessConfig(variance=option, n_components=min(3, msi.num_channels), reduction="pca")
    p = pp.MSIPreprocessor(config).fit(msi, fit_mask)
    x = p._normalized(msi)
    x = pp.clip_hotspots(x, p.hotspot_thresholds, msi.mask)
    if option != "none":  # as MSIPreprocessor does before a reduction
      x = pp.stabilize_variance(x, option, p.variance_scale, msi.mask)
    scores = np.asarray(pp.pca_transform(x, p.components, p.mean, mask=msi.mask))
    row = {"neighbour_corr": neighbour_corr(scores, fit_mask), "channels": effective_channels(p.components),
           "explained_variance_ratio": [float(v) for v in p.explained_variance_ratio]}  # fmt: skip
    if targets is not None:
      row["r2_microscopy"] = r2(scores, targets, target_mask)
    out[option] = row
    print(f"  {option:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if not isinstance(v, list)))
  return out


def main() -> int:
  results = {}
  msight = REPO.parent / "shared" / "data" / "msight_bladder" / "prostate_example.imzML"
  if msight.exists():
    print("msight_bladder (real MALDI-TOF, 421 channels)")
    msi = imzml.read_imzml(msight, progress=False)
    results["msight_bladder"] = score(msi, msi.mask)
  print("msiflow_upec12 (real, 10 ion images)")
  section = datasets.load_msiflow()
  tissue = section.tissue_mask.astype(bool) & section.msi.mask
  results["msiflow_upec12"] = score(section.msi, tissue, section.microscopy_registered, tissue)
  print("mouse_brain_abeta (real, 3 ion images)")
  brain = datasets.load_mouse_brain()
  results["mouse_brain_abeta"] = score(brain, brain.mask)
  ranks = {}
  for name, rows in results.items():
    for metric in ("neighbour_corr", "r2_microscopy"):
      if metric in next(iter(rows.values())):
        best = max(rows, key=lambda o: rows[o][metric])
        ranks[f"{name}:{metric}"] = best
  print("best per data set and measure:", ranks)
  record = {"measurement": "variance-stabilising transform before PCA", "command":
            "PYTHONPATH=. python benchmarks/measure_variance.py", "results": results, "best": ranks}  # fmt: skip
  out = REPO / "benchmarks" / "results" / "variance.json"
  out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"saved {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
