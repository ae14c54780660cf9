r"""The study (experiments/study.py): the protocol on the SIMULATED neighbouring-section benchmark, training from
rough alignments, and the real msight bladder pair.

Commands (from the repository root):
  python -m experiments.study --output_dir=runs/study                                  # the CPU study
  python -m experiments.study --config=experiments/configs/study.py:tiny --output_dir=/tmp/study_tiny  # a minute
  python -m experiments.study --config=experiments/configs/study.py:paper --output_dir=runs/study_paper  # GPU

Variants:
  (none) / cpu  the CPU study sized for a 2-core machine: a depth-5 ngf-16 U-Net generator (455k parameters)
                (+ a 2-layer PatchGAN for pix2pix) on 32-pixel patches, batch 8, Adam 2e-4 (pix2pix's), 200 steps;
                5 training seeds per model on each setting; 4 training slides, 3 held-out slides × 2 simulated
                neighbour sections = 6 benchmark cases; the real pair's held-out part in 64-pixel tiles; 20
                perturbed starts per route. Measured: 2,057 s (34 min) wall end to end on the shared 2-core CPU at
                a load average of 9-14 (simulation 73 s, benchmark 1,046 s, rough alignments 466 s, real pair
                472 s); an idle machine should need well under half of that.
  medium        the "medium model" CPU budget: the same generator trained 3,000 steps of batch 8. Measured per-step
                rates in the CPU study (load average 9-14): pix2pix 7.6-21.6 steps/s, U-Net 5.0-13.7 steps/s, so
                3,000 steps take 2.5-10 minutes on 2 cores, well inside 30 minutes (a rate measurement, not a
                separate 3,000-step run). "Medium" is relative: 455k parameters against the paper's 54M.
  paper         the paper's scale: UNet-256 (depth 8, ngf 64) + 70×70 PatchGAN, 256-pixel patches, batch 1,
                200k steps (100k constant + 100k linear decay), Adam 2e-4; on one GPU. Not run here (no GPU).
  tiny          test size: 2 steps, 2 seeds, tiny networks, 1 training and 1 held-out slide, 2 perturbations.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study config; `arg` is "", "cpu", "medium", "paper" or "tiny".

  Raises:
    ValueError: for an unknown variant.
  """
  variant = (arg or "cpu").strip() or "cpu"
  if variant not in ("cpu", "medium", "paper", "tiny"):
    raise ValueError(f"unknown study variant {variant!r}; expected cpu, medium, paper or tiny")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.seeds = ml_collections.ConfigDict({"split": 0, "data": 1, "train": (0, 1, 2, 3, 4)})

  m = common.get_base_config("pix2pix")
  m.model.depth, m.model.ngf, m.model.max_mult, m.model.ndf, m.model.d_layers = 5, 16, 4, 16, 2
  m.optim.learning_rate = 2e-4  # pix2pix's
  m.train.batch_size = 8
  m.data.patch_size = 32
  m.data.upsample = 4
  m.data.min_tissue_fraction = 0.3
  _steps(m, 200)
  config.model_config = m

  config.benchmark = ml_collections.ConfigDict(dict(
    n_train_slides=4, n_test_slides=3, sims_per_test_slide=2, he_reduce=1, histology_pixel_size_um=5.0,
    msi_pixel_size_um=20.0, n_ions=40, n_components=8))  # fmt: skip
  config.eval = ml_collections.ConfigDict(dict(mi_bins=16, kid_patch=16, tile=32, overlap=8))
  config.registration = ml_collections.ConfigDict(dict(
    routes=("synthetic", "msi_tic", "msi_pca1"), levels=2, max_iterations=None, max_samples=4096,
    working_pixel_size_um=10.0))  # fmt: skip
  config.rough = ml_collections.ConfigDict(dict(rounds=2, losses=("l1", "shift_l1"), kind="unet", max_shift_px=3,
                                                     max_test_cases=3, init="direct", landmark_noise_um=60.0))
  config.bladder = ml_collections.ConfigDict(dict(
    he_reduce=2, split_axis=1, test_fraction=0.4, n_components=8, case_tile=64, n_perturbations=20,
    perturb_rotation_deg=5.0, perturb_translation_um=75.0, perturb_scale=0.05))  # fmt: skip

  if variant == "medium":
    _steps(m, 3000)
  elif variant == "paper":
    p = common.get_base_config("pix2pix")
    p.data.upsample = 4
    p.data.min_tissue_fraction = 0.3
    config.model_config = p
    config.eval.tile, config.eval.overlap = 256, 64
  elif variant == "tiny":
    m.model.depth, m.model.ngf, m.model.max_mult, m.model.ndf, m.model.d_layers = 3, 4, 2, 4, 1
    m.train.batch_size = 2
    m.data.patch_size = 16
    m.data.upsample = 2
    _steps(m, 2)
    config.seeds.train = (0, 1)
    config.benchmark.update(dict(n_train_slides=1, n_test_slides=1, sims_per_test_slide=2, he_reduce=4,
                                 histology_pixel_size_um=20.0, msi_pixel_size_um=80.0, n_ions=8,
                                 n_components=3))  # fmt: skip
    config.eval.update(dict(mi_bins=4, kid_patch=8, tile=16, overlap=8))
    config.registration.update(dict(levels=1, max_iterations=10, max_samples=1024, working_pixel_size_um=40.0))
    config.rough.rounds = 1
    config.bladder.update(dict(he_reduce=16, case_tile=16, n_perturbations=2, n_components=3))
  return config


def _steps(config: ml_collections.ConfigDict, steps: int) -> None:
  t = config.train
  t.num_steps = int(steps)
  config.optim.constant_steps = steps // 2
  config.optim.decay_steps = steps - steps // 2
  t.log_every = max(1, min(50, steps // 4))
  t.eval_every = max(1, steps)
  t.checkpoint_every = max(1, steps)
  t.image_every = 0
  t.max_to_keep = 1
