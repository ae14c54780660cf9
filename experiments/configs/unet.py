"""The U-Net baseline: the pix2pix generator trained with L1 only (no discriminator).

The same generator, data, optimiser and schedule as experiments/configs/pix2pix.py, with `model.kind = "unet"`
and `model.gan_weight = 0`; the training step skips the discriminator entirely.

Commands (from the repository root):
  python experiments/train.py --config=experiments/configs/unet.py --workdir=runs/unet
  python experiments/train.py --config=experiments/configs/unet.py:msiflow --workdir=runs/unet_msiflow
  python experiments/train.py --config=experiments/configs/unet.py:tiny --workdir=/tmp/unet_tiny

Variants as in pix2pix.py (tiny, msiflow, bf16). Expected runtime: about 60% of the pix2pix run's (no
discriminator forward and backward passes); the tiny variant takes about half a minute on a laptop CPU.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common, pix2pix


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The U-Net (L1 only) training config; `arg` names variants (see pix2pix.py)."""
  return pix2pix.apply_variants(common.get_base_config("unet"), arg)
