r"""The paper's evaluation at CPU size: pix2pix against the U-Net baseline, and MSI registration by two routes.

Commands (from the repository root; `python experiments/evaluate.py ...` works too; --output_dir defaults to
runs/eval_<setting>):
  python -m experiments.evaluate --setting=msiflow --output_dir=runs/eval_msiflow
  python -m experiments.evaluate --setting=simulated --output_dir=runs/eval_simulated
  python -m experiments.evaluate --setting=simulated --tiny --output_dir=/tmp/eval_tiny          # seconds
  python -m experiments.evaluate --setting=msiflow --part=registration --output_dir=runs/eval_msiflow \
      --workdir_pix2pix=runs/eval_msiflow/pix2pix                                                 # reuse a run

Settings, splits and sizes are in experiments/configs/evaluate.py (its docstring gives the expected runtimes).

--part=synthesis (the synthesis table). pix2pix and the U-Net baseline are trained on the same patches of the same
split with the same generator and schedule; they differ only in the adversarial term (the U-Net has no
discriminator). A workdir that already holds a finished run (latest checkpoint step >= its config's
train.num_steps) is loaded instead of trained; an unfinished one is resumed. Both models are then evaluated on
held-out data, each held-out image synthesised whole (`msisynth.synthesize`, tiles of the training patch size,
blended), with the final (latest) weights, never the checkpoint picked by validation:
  - msiflow: the real msiFlow UPEC_12 pair (MSI → immunofluorescence microscopy registered by msiFlow), spatial
    hold-out: the whole section is synthesised and the cases are the patch-size tiles of the held-out band
    (`PatchDataset.tile_positions` of the validation region), plus the band as a whole (reported separately);
  - simulated: real H&E slides with SIMULATED MSI; whole slides held out; the cases are the held-out slides.
Per case: MI (bits, 32 bins over [0, 1]), NMI (100 bins over [0, 1]), SSIM and PSNR (dB) between the synthetic and
the real image, inside the tissue mask (and the held-out region); the histogram measures compare luminance (H&E)
or the mean of the three microscopy channels (msiflow). The tables give mean ± std (sample std over cases) per model
and of the per-case difference pix2pix − U-Net. A figure per case shows the MSI input (its first three principal
components), the real image, the U-Net and the pix2pix output.

--part=registration (the route comparison; uses the pix2pix generator, trained or loaded as above):
  - simulated: each held-out slide is simulated again with a random affine misalignment (`simulate_msi(...,
    misalignment="random")`, one per seed) and registered to its real H&E (fixed) by (i) the synthetic H&E from
    the pix2pix generator (the paper's unimodal route) and (ii) the MSI itself: its first PCA component (the
    generator's first input channel) and its TIC image (multimodal). Every route uses the same MI registration
    settings. The TRE (µm and MSI pixels) is measured at the simulation's landmarks; success = mean TRE < 2 MSI px.
  - msiflow: `microscopy_unregistered` (fixed) is registered to the MSI grid by the synthetic microscopy from the
    msiflow-trained generator, the UMAP image and the first PCA component of the ion images. msiFlow's own
    registered microscopy is the reference (not ground truth): the best affine map unregistered → msiFlow's
    result is estimated by registering those two microscopy images with NCC (unimodal); each route is compared
    with it (displacement over a grid, µm = MSI pixels here since the TIFFs record no pixel size) and its warped
    microscopy with msiFlow's (mean absolute difference, NCC, MI).

The logic lives in `msisynth.evaluation.paper`; the protocol study (seeds, paired tests, bias-corrected MI,
the benchmark and the real pair) is experiments/study.py. --output_dir is refused when it is not empty unless
--overwrite (and never one msisynth did not create).

Writes into --output_dir: results.md, results.json, figures/*.png, pix2pix/ and unet/ (training workdirs unless
--workdir_* are given), and for --tiny with the simulated setting the reduced slides it used (tiny_slides/).
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # `python experiments/evaluate.py` as well as `python -m experiments.evaluate`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags

from msisynth import cli, outputs
from msisynth.evaluation import paper
from msisynth.evaluation.paper import (  # noqa: F401  (re-exported for tests and notebooks)
  EvalData,
  _finished_step,
  _same_preprocessor,
  model_configs,
  run_evaluation,
  summarise,
  train_or_load,
)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the launcher's flags on `flag_values` (a separate FlagValues lets tests run it in-process)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_enum("setting", "simulated", ["msiflow", "simulated"], "Data setting (see the module docstring).", **fv)
  flags.DEFINE_string("output_dir", None, "Output folder (results.md, results.json, figures, workdirs); default "
                      "runs/eval_<setting> (runs/eval_<setting>_tiny with --tiny).", **fv)  # fmt: skip
  flags.DEFINE_enum("part", "all", list(paper.PARTS), "What to evaluate.", **fv)
  flags.DEFINE_integer("steps", None, "Training steps of each model (default: the config's).", **fv)
  flags.DEFINE_bool("tiny", False, "Test-size settings (seconds).", **fv)
  flags.DEFINE_string("workdir_pix2pix", None, "pix2pix workdir (default <output_dir>/pix2pix); a finished run is "
                      "loaded, an unfinished one resumed.", **fv)  # fmt: skip
  flags.DEFINE_string("workdir_unet", None, "U-Net workdir (default <output_dir>/unet).", **fv)
  flags.DEFINE_string("data_dir", None, "The shared data folder (default: msisynth's).", **fv)


def load_config(setting: str, *, tiny: bool = False, steps: int | None = None, data_dir: str | None = None):
  """The evaluation config of experiments/configs/evaluate.py for `setting`, with the launcher's overrides."""
  from experiments.configs import evaluate as eval_config

  config = eval_config.get_config(setting + (",tiny" if tiny else ""))
  if steps is not None:
    cli.check_positive("steps", steps)
    eval_config.set_steps(config.train, steps)
  if data_dir:
    config.train.data.data_dir = data_dir
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from msisynth import train as train_lib

  train_lib.quiet_orbax_logs()
  fv = flags.FLAGS
  output_dir = fv.output_dir or f"runs/eval_{fv.setting}{'_tiny' if fv.tiny else ''}"
  config = load_config(fv.setting, tiny=fv.tiny, steps=fv.steps, data_dir=fv.data_dir)
  outputs.prepare_output_dir(output_dir, overwrite=cli.OVERWRITE.value, owner="experiments.evaluate")
  command = "python -m experiments.evaluate " + " ".join(sys.argv[1:])
  paper.run_evaluation(config, output_dir, part=fv.part, workdir_pix2pix=fv.workdir_pix2pix,
                       workdir_unet=fv.workdir_unet, command=command)  # fmt: skip


if __name__ == "__main__":
  define_flags()
  cli.run(main)
