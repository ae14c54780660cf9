r"""End-to-end demo on the shipped data: MSI → synthetic H&E → registration → MSI in histology space.

Command (from the repository root; about 5-10 minutes on a 2-core CPU, most of it training):
  python -m experiments.demo
  python -m experiments.demo --output_dir=reports/demo --overwrite      # run again into the same folder
  python -m experiments.demo --quick                                    # tiny settings, a smoke test

The settings are `experiments/configs/demo.py` (`--quick` takes its "quick" variant); the run is
`msisynth.demo.run_demo`, whose docstring lists the stages: real MSI explored; a small pix2pix trained on real H&E
with simulated MSI; a held-out slide with simulated, misaligned MSI synthesised, registered
(`msisynth.pipeline.process_section`) and carried into histology space; the direct multimodal route for
comparison. Writes `report.md` in the output folder and prints where it is.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # `python experiments/demo.py` as well as `python -m experiments.demo`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags

from msisynth import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "reports/demo", "Report folder (created; an existing non-empty one msisynth "
                    "wrote needs --overwrite).")  # fmt: skip
flags.DEFINE_string("workdir", None, "Generator training folder (default: <output_dir>/generator). A finished run "
                    "there is reused instead of training again.")  # fmt: skip
flags.DEFINE_integer("steps", None, "Training steps of the demo generator (default: the config's).")
flags.DEFINE_integer("seed", None, "Seed of the simulation, the split and training (default: the config's).")
flags.DEFINE_string("test_slide", None, "Held-out H&E slide (file stem) that is registered.")
flags.DEFINE_list("train_slides", None, "H&E slides (file stems) the generator is trained on.")
flags.DEFINE_string("val_slide", None, "H&E slide (file stem) for validation during training.")
flags.DEFINE_bool("quick", False, "Tiny settings (a few training steps, small images) for a smoke test.")


def main(argv):
  del argv
  from experiments.configs import demo as demo_config
  from msisynth import demo

  config = demo_config.get_config("quick" if FLAGS.quick else None)
  if FLAGS.steps is not None:
    cli.check_positive("steps", FLAGS.steps)
    demo_config.set_steps(config, FLAGS.steps)
  if FLAGS.seed is not None:
    config.seed = FLAGS.seed
  for name in ("test_slide", "val_slide"):
    if FLAGS[name].value:
      config.demo[name] = FLAGS[name].value
  if FLAGS.train_slides:
    config.demo.train_slides = tuple(FLAGS.train_slides)
  demo.run_demo(config, FLAGS.output_dir, workdir=FLAGS.workdir, overwrite=cli.OVERWRITE.value)


if __name__ == "__main__":
  cli.run(main)
