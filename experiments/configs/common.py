"""Settings shared by the pix2pix and U-Net training configs.

Fields other code depends on:
  seed, precision ("float32" | "bfloat16")
  model.{kind ("pix2pix" | "unet"), depth, ngf, max_mult, out_channels, dropout_rate, norm, d_kind, d_layers, ndf,
         gan_mode, gan_weight, l1_weight, mask_l1, recon_loss ("l1" | "shift_l1"), max_shift_px}
  optim.{learning_rate, b1, b2, constant_steps, decay_steps}
  train.{num_steps, batch_size, log_every, eval_every, checkpoint_every, image_every, max_to_keep}
  data.{source ("simulated" | "msiflow"), data_dir, patch_size, augment, min_tissue_fraction, val_fraction,
        split_axis, gap_px, upsample, max_val_patches, he_slides, val_he_slides, histology_pixel_size_um
        (deprecated alias he_pixel_size_um), msi_pixel_size_um, n_channels, n_components}
"""

from __future__ import annotations

import ml_collections


def get_base_config(kind: str = "pix2pix") -> ml_collections.ConfigDict:
  """Full-size settings: pix2pix's UNet-256 and 70×70 PatchGAN on 256×256 patches, pix2pix's optimiser.

  The schedule follows pix2pix's 100 epochs at a constant learning rate then 100 of linear decay, counted in steps
  of one patch (pix2pix's batch size 1).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.precision = "float32"

  config.model = ml_collections.ConfigDict()
  config.model.kind = kind
  config.model.depth = 8
  config.model.ngf = 64
  config.model.max_mult = 8
  config.model.out_channels = 3
  config.model.dropout_rate = 0.5
  config.model.norm = "batch"
  config.model.d_kind = "patch"
  config.model.d_layers = 3
  config.model.ndf = 64
  config.model.gan_mode = "vanilla"
  config.model.gan_weight = 1.0 if kind == "pix2pix" else 0.0
  config.model.l1_weight = 100.0
  # pix2pix's L1 covers the whole patch, background included: the synthetic background must look like the real
  # one for registration. True restricts L1 to the tissue mask.
  config.model.mask_l1 = False
  # "shift_l1" forgives a misalignment of the pairs up to max_shift_px pixels (msisynth.losses.shift_tolerant_l1_loss).
  config.model.recon_loss = "l1"
  config.model.max_shift_px = 2

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-4
  config.optim.b1 = 0.5
  config.optim.b2 = 0.999
  config.optim.constant_steps = 100_000
  config.optim.decay_steps = 100_000

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 200_000
  config.train.batch_size = 1
  config.train.log_every = 200
  config.train.eval_every = 5_000
  config.train.checkpoint_every = 5_000
  config.train.image_every = 5_000
  config.train.max_to_keep = 3

  config.data = ml_collections.ConfigDict()
  config.data.source = "simulated"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: msisynth's shipped data folder
  config.data.patch_size = 256
  config.data.augment = True
  config.data.min_tissue_fraction = 0.5
  config.data.val_fraction = 0.2  # spatial hold-out band, used when there are no validation slides
  config.data.split_axis = "auto"
  config.data.gap_px = 4
  # MSI pixels are upsampled by this factor onto the pair grid: 20 µm MSI / 4 = the 5 µm H&E pixel.
  config.data.upsample = 4
  config.data.max_val_patches = 64
  # "simulated" only: real H&E slides with MSI simulated from them (always labelled simulated). Slides are paths
  # or names of shipped slides; he_slides None takes every shipped slide not held out for validation.
  config.data.he_slides = ml_collections.config_dict.placeholder(tuple)
  config.data.val_he_slides = ("rcc-UH9912_01",)
  config.data.histology_pixel_size_um = 5.0
  # Deprecated name of histology_pixel_size_um (one value: setting either sets both).
  config.data.he_pixel_size_um = config.data.get_ref("histology_pixel_size_um")
  config.data.msi_pixel_size_um = 20.0
  config.data.n_channels = 200
  config.data.n_components = 16
  return config


def use_msiflow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Trains on the real msiFlow UPEC_12 pair (140×128 MSI pixels, tissue on about 16% of them).

  The grid is upsampled 2× so that a validation band along y (30% of the tissue) holds whole 32-pixel patches;
  the U-Net has depth 5 for these patches.
  """
  config.data.source = "msiflow"
  config.data.upsample = 2
  config.data.split_axis = "y"
  config.data.val_fraction = 0.3
  config.data.patch_size = 32
  config.data.min_tissue_fraction = 0.3
  config.model.depth = 5
  return config


def make_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A CPU-sized variant for tests and smoke runs: the msiFlow pair, 32-pixel patches, depth 4, ngf 8, 6 steps."""
  config.model.depth = 4
  config.model.ngf = 8
  config.model.max_mult = 2  # widths 8, 16, 16, 16: one decoder block with dropout, as in pix2pix's inner blocks
  config.model.ndf = 8
  config.model.d_layers = 2
  config.optim.constant_steps = 4
  config.optim.decay_steps = 4
  config.train.num_steps = 6
  config.train.batch_size = 2
  config.train.log_every = 1
  config.train.eval_every = 3
  config.train.checkpoint_every = 1
  config.train.image_every = 3
  config.train.max_to_keep = 2
  use_msiflow(config)
  config.model.depth = 4
  config.data.max_val_patches = 8
  return config
