"""pix2pix (U-Net generator + 70×70 PatchGAN, adversarial + 100·L1) synthesising H&E from MSI.

Commands (from the repository root):
  python experiments/train.py --config=experiments/configs/pix2pix.py --workdir=runs/pix2pix
  python experiments/train.py --config=experiments/configs/pix2pix.py:msiflow --workdir=runs/pix2pix_msiflow
  python experiments/train.py --config=experiments/configs/pix2pix.py:tiny --workdir=/tmp/pix2pix_tiny

Variants (comma-separated after the colon):
  (none)     the full settings: UNet-256 (depth 8, ngf 64) + 70×70 PatchGAN, 256-pixel patches of the
             semi-synthetic pairs (the shipped real H&E slides with MSI simulated from them; results are on
             simulated data), batch 1, 200k steps (100k constant, 100k linear decay), Adam(2e-4, b1=0.5).
             Expected runtime: simulating the MSI of the 8 training slides takes minutes of CPU time; the
             200k steps take roughly 1-3 hours on one H100-class GPU (an estimate from the cost of one step,
             92 GFLOP at batch 1; not measured end to end). Impractical on a CPU (about 20 s per step on 2 cores).
  msiflow    the real msiFlow UPEC_12 pair (MSI ↔ registered microscopy, 140×128 pixels, upsampled 2×):
             32-pixel patches and a depth-5 U-Net, a validation band along y; same schedule. The target is
             immunofluorescence microscopy, not H&E.
  tiny       CPU smoke/test size: depth 4, ngf 8, 32-pixel patches of the msiFlow pair, 6 steps (about half a
             minute on a laptop CPU, most of it compilation).
  bf16       bfloat16 compute (parameters and losses stay float32).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def apply_variants(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants of `arg` ("tiny", "msiflow", "bf16") to `config`.

  Raises:
    ValueError: on an unknown variant.
  """
  for variant in filter(None, (arg or "").split(",")):
    if variant == "tiny":
      common.make_tiny(config)
    elif variant == "msiflow":
      common.use_msiflow(config)
    elif variant == "bf16":
      config.precision = "bfloat16"
    else:
      raise ValueError(f"unknown config variant {variant!r}; expected tiny, msiflow or bf16")
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pix2pix training config; `arg` names variants (see the module docstring)."""
  return apply_variants(common.get_base_config("pix2pix"), arg)
