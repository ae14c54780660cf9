r"""The paper's evaluation at CPU size: pix2pix against the U-Net baseline, and registration route comparison.

Commands (from the repository root; `experiments/evaluate.py` reads this config):
  python -m experiments.evaluate --setting=msiflow --output_dir=runs/eval_msiflow
  python -m experiments.evaluate --setting=simulated --output_dir=runs/eval_simulated
  python -m experiments.evaluate --setting=simulated --tiny --output_dir=/tmp/eval_tiny     # seconds, for tests

`get_config("msiflow")`, `get_config("simulated")`, and either with ",tiny" appended.

Settings:
  msiflow    the real msiFlow UPEC_12 pair (10 MALDI ion images → msiFlow's registered immunofluorescence
             microscopy), a spatial hold-out: a band of rows holding 30% of the tissue, 4 MSI pixels of gap. The
             grid is upsampled 2x; 32-pixel patches; the cases are the 32-pixel tiles of the held-out band (and
             the band as a whole). Registration: microscopy_unregistered ↔ MSI, compared with msiFlow's result.
  simulated  semi-synthetic pairs (real H&E slides, MSI SIMULATED from them by `msisynth.simulate`), H&E assumed
             10 µm, MSI 40 µm, 120 m/z channels → PCA 8, grid upsampled 2x (20 µm pixels); trained on 4 slides,
             one slide for validation during training, 3 slides held out as the test cases. Registration: each
             test slide re-simulated with a random affine misalignment (2 seeds each), registered by the
             synthetic H&E (unimodal) and by the MSI itself (first PCA component, TIC image; multimodal MI).

Both train the same generator (U-Net, depth 5, ngf 16, max_mult 4, dropout 0.5, batch norm) twice on the same
patches: pix2pix (adversarial + 100·L1 with a 2-layer PatchGAN, ndf 16) and the U-Net baseline (L1 only). Adam
(2e-4, b1 0.5: pix2pix's), 1,000 steps of batch 8 (half constant, half linear decay to 0).

Expected runtime on a 2-core CPU (measured on a shared 2-core AMD EPYC machine, see docs/results.md): msiflow
1.5 minutes when the machine is idle, 6.5 minutes under a load average of 8; simulated 5 minutes idle, 13 minutes
loaded (of which about 0.5 minute builds the simulated pairs and 2-7 minutes are the 18 registrations). About
1 GB (msiflow) and 1.7 GB (simulated) peak memory. The tiny variant takes 25-35 seconds.

Expected results (docs/results.md has the tables): on both settings the U-Net baseline has the higher SSIM (by
about 0.07) and pix2pix does not reproduce the paper's MI and SSIM gains at this budget; on the simulated
registration cases every route succeeds (TRE 0.2-0.25 MSI px), on msiFlow's pair the UMAP route comes closest to
msiFlow's registration.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

SETTINGS = ("msiflow", "simulated")


def _cpu_model(config: ml_collections.ConfigDict) -> None:
  """The CPU-sized generator, discriminator and schedule shared by both settings."""
  config.model.depth = 5
  config.model.ngf = 16
  config.model.max_mult = 4
  config.model.ndf = 16
  config.model.d_layers = 2
  config.optim.learning_rate = 2e-4  # pix2pix's
  config.train.batch_size = 8
  config.data.patch_size = 32
  config.data.max_val_patches = 32
  set_steps(config, 1000)


def set_steps(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """Sets the number of training steps and the schedule, logging and checkpoint cadence that follow from it."""
  steps = int(steps)
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  t = config.train
  t.num_steps = steps
  config.optim.constant_steps = steps // 2
  config.optim.decay_steps = steps - steps // 2
  t.log_every = max(1, min(50, steps // 4))
  t.eval_every = max(1, steps // 4)
  t.checkpoint_every = max(1, steps // 2)
  t.image_every = max(1, steps // 2)
  t.max_to_keep = 2
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The evaluation config: `arg` is "msiflow" or "simulated", optionally followed by ",tiny".

  Fields:
    setting: "msiflow" or "simulated".
    train: the pix2pix training config (experiments/configs/common.py fields); the U-Net baseline is the same
      config with model.kind "unet" and model.gan_weight 0.
    split: simulated only: train_slides, val_slide, test_slides (file stems of the shipped H&E slides);
      he_downsample (an integer factor the slides are reduced by first; 1 = as shipped).
    eval: tile_size and overlap of the whole-image synthesis (pixels of the pair grid), mi_bins, nmi_bins,
      case_min_tissue_fraction (msiflow: least tissue share of a held-out tile to be a case).
    registration: seeds (simulated misalignments per test slide), routes, misalignment bounds, the
      `RegistrationConfig` options shared by every route, success_px (TRE threshold in MSI pixels).

  Raises:
    ValueError: for an unknown setting or variant.
  """
  parts = [p for p in (arg or "").split(",") if p]
  setting = parts[0] if parts else "simulated"
  if setting not in SETTINGS:
    raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
  tiny = "tiny" in parts[1:]
  unknown = set(parts[1:]) - {"tiny"}
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; expected 'tiny'")

  config = ml_collections.ConfigDict()
  config.setting = setting
  config.tiny = tiny
  train = common.get_base_config("pix2pix")
  if setting == "msiflow":
    common.use_msiflow(train)
  _cpu_model(train)
  config.split = ml_collections.ConfigDict()
  config.split.train_slides = ("rcc-MH0204_33", "rcc-UH0505_12", "rcc-UH0710_33", "rcc-UH9610_15")
  config.split.val_slide = "rcc-UH9812_03"
  config.split.test_slides = ("rcc-UH9905_18", "rcc-UH9911_05", "rcc-UH9912_01")
  config.split.he_downsample = 1
  if setting == "simulated":
    train.data.source = "simulated"
    train.data.histology_pixel_size_um = 10.0
    train.data.msi_pixel_size_um = 40.0
    train.data.n_channels = 120
    train.data.n_components = 8
    train.data.upsample = 2
    train.data.min_tissue_fraction = 0.5
    train.data.he_slides = config.split.train_slides
    train.data.val_he_slides = (config.split.val_slide,)
  config.train = train

  config.eval = ml_collections.ConfigDict()
  config.eval.tile_size = 32  # the training patch: the generator is applied as it was trained
  config.eval.overlap = 16
  config.eval.batch_size = 16
  config.eval.mi_bins = 32
  config.eval.nmi_bins = 100
  config.eval.case_min_tissue_fraction = 0.3
  # msiflow: the target's near-binary mask channel is smoothed by this Gaussian σ (pair pixels); 0 keeps it.
  config.eval.mask_channel_sigma_px = 2.0

  reg = ml_collections.ConfigDict()
  reg.seeds = (1, 2)
  reg.routes = ("synthetic", "msi_pca1", "msi_tic") if setting == "simulated" else ("synthetic", "umap", "msi_pca1")
  reg.max_rotation_deg = 10.0
  reg.max_scale = 0.05
  reg.max_translation_um = 200.0
  reg.similarity = "mi"
  reg.levels = 3
  reg.max_iterations = ml_collections.config_dict.placeholder(int)  # None: RegistrationConfig's default
  reg.max_samples = 32768
  reg.flips_and_rot90 = False
  # Simulated setting: None for msisynth.geometry.working_pixel_size_um (a quarter of the MSI pixel, never finer
  # than the H&E); the tables made before that rule registered at half the MSI pixel (20.0 here).
  reg.working_pixel_size_um = ml_collections.config_dict.placeholder(float)
  reg.success_px = 2.0
  config.registration = reg

  if tiny:
    _make_tiny(config)
  return config


def _make_tiny(config: ml_collections.ConfigDict) -> None:
  """Test size: a depth-3 generator, 2 steps, 16-pixel patches, one slide per role reduced 4x, short registration."""
  t = config.train
  t.model.depth = 3
  t.model.ngf = 4
  t.model.max_mult = 2
  t.model.ndf = 4
  t.model.d_layers = 1
  t.train.batch_size = 2
  t.data.patch_size = 16
  t.data.max_val_patches = 4
  set_steps(t, 2)
  # One validation and one checkpoint at the end, no image grids: less to compile and write.
  t.train.eval_every = 2
  t.train.checkpoint_every = 2
  t.train.image_every = 0
  config.eval.tile_size = 16
  config.eval.overlap = 8
  config.eval.case_min_tissue_fraction = 0.2
  if config.setting == "simulated":
    config.split.train_slides = config.split.train_slides[:1]
    config.split.test_slides = config.split.test_slides[:1]
    config.split.he_downsample = 4
    t.data.he_slides = config.split.train_slides
    t.data.histology_pixel_size_um = 40.0
    t.data.msi_pixel_size_um = 80.0
    t.data.n_channels = 24
    t.data.n_components = 4
    t.data.upsample = 1
    t.data.min_tissue_fraction = 0.3
  else:
    t.data.upsample = 1
    t.data.min_tissue_fraction = 0.2
  reg = config.registration
  reg.seeds = (1,)
  reg.levels = 1
  reg.max_iterations = 15
  reg.max_samples = 2048
