"""The end-to-end demo (`python -m experiments.demo`): a small pix2pix on semi-synthetic pairs, one held-out slide.

Command (from the repository root; about 5-10 minutes on a 2-core CPU, most of it training):
  python -m experiments.demo                      # get_config()
  python -m experiments.demo --quick              # get_config("quick"): a smoke test in about a minute

The training part is a pix2pix config (`experiments/configs/common.py`): a depth-5 U-Net on 32×32 MSI-pixel
patches, 600 steps of batch 8, on the shipped H&E slides with MSI simulated from them (real H&E, simulated MSI:
every result is labelled simulated). `demo` holds the rest: the slides, their assumed pixel sizes and the
simulated test section's misalignment. Results of `get_config()` are in docs/results.md (the demo section).

Variants:
  (none)   the demo as the README runs it.
  quick    tiny settings: depth 3, ngf 8, 16-pixel patches, 24 m/z channels, 4 steps, one training slide, and the
           held-out H&E at half resolution (its assumed pixel size doubled).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

# The shipped slide thumbnails record no pixel size; the demo assumes this one.
HISTOLOGY_PIXEL_SIZE_UM = 10.0
MSI_PIXEL_SIZE_UM = 40.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo's configuration; `arg` "quick" for the smoke-test settings.

  Raises:
    ValueError: on an unknown variant.
  """
  if arg not in (None, "", "quick"):
    raise ValueError(f"unknown demo variant {arg!r} (known: quick)")
  quick = arg == "quick"
  steps = 4 if quick else 600
  config = common.get_base_config("pix2pix")
  config.seed = 0
  config.model.depth = 5
  config.model.ngf = 16
  config.model.max_mult = 4
  config.model.ndf = 16
  config.model.d_layers = 2
  config.train.batch_size = 8
  config.train.log_every = 50
  config.data.source = "simulated"
  config.data.patch_size = 32
  config.data.upsample = 1
  config.data.histology_pixel_size_um = HISTOLOGY_PIXEL_SIZE_UM
  config.data.msi_pixel_size_um = MSI_PIXEL_SIZE_UM
  config.data.n_channels = 120
  config.data.n_components = 8
  config.data.max_val_patches = 32
  config.optim.learning_rate = 1e-3

  config.demo = ml_collections.ConfigDict()
  config.demo.quick = quick
  config.demo.test_slide = "rcc-UH9905_18"
  config.demo.val_slide = "rcc-UH9812_03"
  config.demo.train_slides = ("rcc-MH0204_33", "rcc-UH0505_12", "rcc-UH0710_33", "rcc-UH9610_15")
  # The simulated test section: a random affine misalignment within these bounds.
  config.demo.max_rotation_deg = 10.0
  config.demo.max_scale = 0.05
  config.demo.max_translation_um = 150.0
  if quick:
    config.model.depth = 3
    config.model.ngf = 8
    config.train.batch_size = 2
    config.data.patch_size = 16
    config.data.n_channels = 24
    config.data.n_components = 4
    config.data.max_val_patches = 4
    config.demo.train_slides = config.demo.train_slides[:1]
  set_steps(config, steps)
  return config


def set_steps(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """Sets the training length and the schedules that follow from it (evaluation, checkpoints, learning rate)."""
  config.train.num_steps = steps
  config.train.eval_every = max(steps // 3, 1)
  config.train.checkpoint_every = max(steps // 3, 1)
  config.train.image_every = max(steps // 3, 1)
  config.optim.constant_steps = steps // 2
  config.optim.decay_steps = steps - steps // 2
  return config
