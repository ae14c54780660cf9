r"""The whole study in one command: protocol, benchmark, rough alignments, the real pair; writes the tables.

  python -m experiments.study --output_dir=runs/study                       # CPU study (see the config)
  python -m experiments.study --config=experiments/configs/study.py:tiny --output_dir=/tmp/study_tiny
  python -m experiments.study --output_dir=runs/study --parts=bladder       # one part

The logic is `msisynth.evaluation.study.run_study`; the config (sizes, seeds, budgets) is
experiments/configs/study.py. Writes results.json and results.md (the tables of docs/results.md) and the training
runs under runs/ into --output_dir, which is refused when not empty unless --overwrite.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags
from ml_collections import config_flags

from msisynth import cli, outputs

_CONFIG = config_flags.DEFINE_config_file("config", str(pathlib.Path(__file__).parent / "configs" / "study.py"),
                                          "The study config.")  # fmt: skip
_OUTPUT = flags.DEFINE_string("output_dir", "runs/study", "Output folder.")
_PARTS = flags.DEFINE_list("parts", ["benchmark", "rough", "bladder"], "Parts to run: benchmark, rough, bladder.")
_DATA = flags.DEFINE_string("data_dir", None, "The shared data folder (default: msisynth's).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from msisynth import errors
  from msisynth import train as train_lib
  from msisynth.evaluation import study

  unknown = set(_PARTS.value) - {"benchmark", "rough", "bladder"}
  if unknown:
    raise errors.ConfigError(f"--parts: unknown {sorted(unknown)}; expected benchmark, rough, bladder")
  train_lib.quiet_orbax_logs()
  config = _CONFIG.value
  if _DATA.value:
    config.data_dir = _DATA.value
  outputs.prepare_output_dir(_OUTPUT.value, overwrite=cli.OVERWRITE.value, owner="experiments.study")
  study.run_study(config, _OUTPUT.value, parts=tuple(_PARTS.value),
                  command="python -m experiments.study " + " ".join(sys.argv[1:]))  # fmt: skip


if __name__ == "__main__":
  cli.run(main)
