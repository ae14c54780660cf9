"""Training from rough alignments: users never start with registered pairs.

Round 0 builds the training pairs from a rough alignment of each training section: a direct multimodal MI
registration of the MSI's TIC image to the H&E (`rough.init` "direct"), or an affine fitted to 4 noisy landmarks
("landmarks"). Each later round
  1. trains a generator on the current pairs (optionally with the misalignment-tolerant `shift_l1` loss),
  2. synthesises H&E from every training section's MSI,
  3. registers the synthetic H&E to the real H&E (one modality), starting from the current transform, and
  4. rebuilds the pairs with the new transforms.
After every round the held-out sections are registered by that round's generator (from the default starts, as a
user would) and the TRE against their ground truth is measured, so one can see whether a round helps. The
training sections' TRE measures the quality of the pairs themselves.
"""

from __future__ import annotations

import math
import time

import numpy as np

from msisynth.evaluation import common


def _tre_px(transform, section) -> float:
  if transform is None:
    return math.inf
  lm = section.landmarks
  m = np.asarray(transform.matrix, np.float64)
  d = np.linalg.norm(lm[:, :2] @ m[:2, :2].T + m[:2, 2] - lm[:, 2:], axis=1)
  return float(d.mean() / np.sqrt(np.prod(section.msi.pixel_size_um)))


def initial_transforms(train, preprocessor, rconfig, *, upsample: int):
  """Round 0: the direct TIC → H&E MI registration of each section (default starts); None where it failed."""
  out = []
  for s in train:
    image, px, mask = common.route_images(s, None, preprocessor, upsample)["msi_tic"]
    result, _, _ = common.register_route(s.he, image, fixed_px=s.histology_pixel_size_um, moving_px=px,
                                         moving_mask=mask, rconfig=rconfig)  # fmt: skip
    out.append(result.transform if result is not None else s.transform.__class__.identity())
  return out


def landmark_transforms(train, *, n_points: int = 4, noise_um: float = 60.0, seed: int = 0):
  """Round 0 from landmarks: an affine fitted to `n_points` of each section's landmarks, the MSI side jittered by
  Gaussian noise of `noise_um` µm (as hand-placed landmarks are: the real bladder pair's 4 leave 3-8 MSI px)."""
  from msisynth.evaluation.bladder import fit_affine
  from msisynth.geometry.transforms import AffineTransform

  rng = np.random.default_rng(seed)
  out = []
  for s in train:
    lm = s.landmarks
    # Spread points: the extremes of x + y and x − y.
    key = [lm[:, 0] + lm[:, 1], lm[:, 0] - lm[:, 1]]
    idx = list(dict.fromkeys([int(np.argmin(key[0])), int(np.argmax(key[0])), int(np.argmin(key[1])),
                              int(np.argmax(key[1]))]))[:n_points]  # fmt: skip
    moving = lm[idx, 2:] + rng.normal(0, noise_um, (len(idx), 2))
    out.append(AffineTransform(fit_affine(lm[idx, :2], moving)))
  return out


def alternate(config, train, test, preprocessor, workdir, seeds, rconfig) -> dict:
  """Runs the alternation for each reconstruction loss in `config.rough.losses`; TRE per round (MSI px).

  Args:
    config: the study config (`rough.rounds`, `rough.losses`, `rough.kind`, the model config).
    train: training `common.Section`s with ground truth (`landmarks`), used only to measure.
    test: held-out sections with ground truth.
    preprocessor: the fitted MSI preprocessor.
    workdir: where the training runs go.
    seeds: `stats.Seeds` (the first training seed is used).
    rconfig: the `RegistrationConfig`.

  Returns:
    {"initial": {"train_tre_px": [...], "test_direct_tre_px": [...]}, loss: [{"round", "train_tre_px",
     "test_tre_px", "seconds"}, ...]}.
  """
  from msisynth.evaluation import study

  u = int(config.model_config.data.upsample)
  r = config.rough
  t0 = time.perf_counter()
  init = str(r.get("init", "direct"))
  if init == "landmarks":
    start = landmark_transforms(train, noise_um=float(r.get("landmark_noise_um", 60.0)), seed=seeds.data)
  else:
    start = initial_transforms(train, preprocessor, rconfig, upsample=u)
  out = {"initial": {"init": init, "train_tre_px": [_tre_px(t, s) for t, s in zip(start, train)], "seconds": 0.0}}
  out["initial"]["seconds"] = round(time.perf_counter() - t0, 1)
  study._log(f"rough: round 0 ({init}) training-pair TRE {out['initial']['train_tre_px']}")
  for loss in r.losses:
    transforms = list(start)
    rounds = []
    for k in range(1, int(r.rounds) + 1):
      t1 = time.perf_counter()
      pairs = [common.make_section_pair(s, preprocessor, u, transform=t) for s, t in zip(train, transforms)]
      c = study.model_config(config, str(r.kind), seeds.train[0])
      c.model.recon_loss = str(loss)
      c.model.max_shift_px = int(r.max_shift_px)
      synth, _ = common.train_model(c, workdir / f"{loss}_round{k}", pairs, None, preprocessor, data_seed=seeds.data,
                                    tile=int(config.eval.tile), overlap=int(config.eval.overlap))  # fmt: skip
      new = []
      for s, t in zip(train, transforms):
        image, px, mask = common.route_images(s, synth, preprocessor, u)["synthetic"]
        result, _, _ = common.register_route(s.he, image, fixed_px=s.histology_pixel_size_um, moving_px=px,
                                             moving_mask=mask, rconfig=rconfig, initial=t)  # fmt: skip
        new.append(result.transform if result is not None else t)
      transforms = new
      test_tre = []
      for s in test[: int(r.get("max_test_cases", len(test)))]:
        image, px, mask = common.route_images(s, synth, preprocessor, u)["synthetic"]
        result, _, _ = common.register_route(s.he, image, fixed_px=s.histology_pixel_size_um, moving_px=px,
                                             moving_mask=mask, rconfig=rconfig)  # fmt: skip
        test_tre.append(_tre_px(None if result is None else result.transform, s))
      rounds.append({"round": k, "train_tre_px": [_tre_px(t, s) for t, s in zip(transforms, train)],
                     "test_tre_px": test_tre, "seconds": round(time.perf_counter() - t1, 1)})  # fmt: skip
      study._log(f"rough ({loss}) round {k}: training-pair TRE median {np.median(rounds[-1]['train_tre_px']):.2f} "
                 f"px, held-out TRE median {np.median(test_tre):.2f} px")  # fmt: skip
    out[str(loss)] = rounds
  return out
