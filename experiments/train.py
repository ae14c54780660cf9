"""Trains pix2pix or the U-Net baseline to synthesise H&E from MSI.

Usage (from the repository root):
  python experiments/train.py --config=experiments/configs/pix2pix.py:tiny --workdir=/tmp/pix2pix_tiny
  python -m experiments.train --config=experiments/configs/unet.py --workdir=runs/unet
  python experiments/train.py --config=experiments/configs/pix2pix.py --workdir=runs/pix2pix \
      --config.train.batch_size=16 --config.precision=bfloat16

Any config field can be overridden with --config.<field>=<value>. Running again with the same --workdir resumes
from its latest checkpoint, and ends with the same parameters as an uninterrupted run. The workdir receives
checkpoints/ (orbax; the fitted MSI preprocessor and the config are saved with the weights), metrics.jsonl,
images/step_XXXXXX.png and, when tensorboardX is installed, tensorboard/.

The workdir must be new, empty, or one this launcher created (it holds the marker file `.msisynth`): a folder
with other files is refused and left untouched. When the latest checkpoint is damaged, the run stops and names
the newest intact step; `--resume_from=intact` resumes from it (the damaged steps are moved to
checkpoints.damaged/, not deleted). Mistakes (a missing config file, an unknown field, a bad count) print one
line and exit with status 2; `--verbosity=1` shows the traceback.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
  # Run as a script: make the repository root importable (msisynth, experiments.configs).
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from msisynth import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training config file, e.g. experiments/configs/pix2pix.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and images (resumed if present).")
_RESUME_FROM = flags.DEFINE_enum(
  "resume_from",
  "latest",
  ["latest", "intact"],
  "latest: resume from the latest checkpoint, stopping if it is damaged; intact: from the newest intact one.",
)
flags.mark_flags_as_required(["config", "workdir"])
# Several processes (hosts): these flags, or MSISYNTH_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID, or a
# cluster JAX detects (SLURM); see docs/scaling.md.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 in a multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (default: from the environment).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from msisynth import distributed

  # Before any JAX computation (the data pipeline below runs some).
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from msisynth import train

  train.quiet_orbax_logs()
  config = _CONFIG.value
  train.check_train_config(config)  # also raises OSError when the config file could not be loaded
  logging.info("config:\n%s", config)
  workdir = train.prepare_workdir(_WORKDIR.value)  # before reading any data: a refused folder costs nothing
  train_data, val_data, preprocessor = train.data_from_config(config)
  train.train_and_evaluate(
    config, workdir, train_data, val_data, preprocessor=preprocessor, resume_from=_RESUME_FROM.value
  )


if __name__ == "__main__":
  cli.run(main)
