"""End-to-end tests of experiments/train.py: the configs, a run killed with SIGKILL and resumed against an
uninterrupted one, and restoring the result for inference."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import pix2pix, unet
from msisynth import checkpoint, preprocess, synthesize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 10


def test_configs():
  full = pix2pix.get_config()
  assert (full.model.kind, full.model.depth, full.model.ngf, full.model.max_mult, full.model.d_layers) == (
    "pix2pix",
    8,
    64,
    8,
    3,
  )
  assert (full.model.l1_weight, full.model.gan_weight, full.optim.learning_rate, full.optim.b1) == (100, 1, 2e-4, 0.5)
  assert (full.data.patch_size, full.train.batch_size, full.precision) == (256, 1, "float32")
  baseline = unet.get_config()
  assert (baseline.model.kind, baseline.model.gan_weight) == ("unet", 0.0)
  tiny = unet.get_config("tiny,bf16")
  assert (tiny.precision, tiny.data.patch_size, tiny.model.depth, tiny.data.source) == ("bfloat16", 32, 4, "msiflow")
  assert pix2pix.get_config("msiflow").data.patch_size % 2 ** pix2pix.get_config("msiflow").model.depth == 0
  with pytest.raises(ValueError, match="unknown config variant"):
    pix2pix.get_config("huge")


def _env(tmp_path, shared_data):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(
    JAX_PLATFORMS="cpu",
    MSISYNTH_DATA=str(shared_data),
    # The three runs compile the same programs: share them through JAX's persistent cache, and spend little time
    # optimising code that runs ten tiny steps.
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    XLA_FLAGS="--xla_backend_optimization_level=0",
  )
  return env


def _steps(workdir):
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def test_killed_run_resumes_to_identical_parameters(tmp_path, shared_data):
  env = _env(tmp_path, shared_data)
  config = f"--config={os.path.join('experiments', 'configs', 'pix2pix.py')}:tiny"
  steps = f"--config.train.num_steps={NUM_STEPS}"
  ref, run = str(tmp_path / "uninterrupted"), str(tmp_path / "interrupted")

  # Uninterrupted, as a module; one checkpoint at the end.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      config,
      f"--workdir={ref}",
      steps,
      f"--config.train.checkpoint_every={NUM_STEPS}",
      "--config.train.image_every=0",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert _steps(ref) == [NUM_STEPS]

  # As a script, checkpointing every step, killed with SIGKILL once a checkpoint exists.
  cmd = [sys.executable, os.path.join("experiments", "train.py"), config, f"--workdir={run}", steps]
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline and not any(s >= 2 for s in _steps(run)):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log.close()
  assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-4000:]
  killed_at = max(_steps(run))
  assert 2 <= killed_at < NUM_STEPS

  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"resumed from step {killed_at}" in proc.stderr
  assert max(_steps(run)) == NUM_STEPS

  # Identical generator, discriminator, optimiser states, batch statistics and rng.
  (a, _), (b, extras) = checkpoint.restore_latest(ref), checkpoint.restore_latest(run)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)
  assert extras["data_state"] == {"seed": 0, "step": NUM_STEPS}

  # One metrics line per training step despite the kill; validation metrics and image grids were written.
  with open(os.path.join(run, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "g_loss" in r] == list(range(1, NUM_STEPS + 1))
  assert all(np.isfinite(r["val_ssim"]) for r in records if "val_ssim" in r)
  assert os.path.exists(os.path.join(run, "images", f"step_{NUM_STEPS:06d}.png"))

  # Inference: config, generator variables and the fitted preprocessor, without optimiser or discriminator.
  restored_config, variables, pre = checkpoint.restore_for_inference(run, which="best")
  assert restored_config.data.source == "msiflow" and restored_config.model.depth == 4
  assert preprocess.MSIPreprocessor.from_dict(pre).is_fitted
  synthesizer = synthesize.load_synthesizer(run, tile_size=32, overlap=8, batch_size=2)
  rgb = synthesizer(np.zeros((40, 48, variables["params"]["down0"]["kernel"].shape[2]), np.float32))
  assert rgb.shape == (40, 48, 3) and 0 <= rgb.min() and rgb.max() <= 1


TINY = f"--config={os.path.join('experiments', 'configs', 'unet.py')}:tiny"


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config=no_such_config.py"], "No such file or directory: 'no_such_config.py'"),
    ([TINY.replace(":tiny", ":huge")], "unknown config variant 'huge'"),
    ([TINY, "--config.train.bogus=3"], "unknown config field 'bogus'"),
    ([TINY, "--config.train.checkpoint_every=0"], "config.train.checkpoint_every must be a positive integer"),
    ([TINY, "--config.train.num_steps=-5"], "config.train.num_steps must be a positive integer"),
    ([TINY, "--resume_from=oldest"], "--resume_from"),
    ([TINY, "--overwrite"], "not created by msisynth"),
    ([TINY, "--workdir=/proc/no_such_folder/run"], "cannot create the output folder"),
  ],
)
def test_mistakes_give_one_line_and_leave_user_files(tmp_path, shared_data, args, message):
  user = tmp_path / "user"
  (user / "images").mkdir(parents=True)
  (user / "metrics.jsonl").write_text('{"step": 1}\n')
  (user / "images" / "step_000003.png").write_bytes(b"mine")
  proc = subprocess.run(
    [sys.executable, os.path.join("experiments", "train.py"), f"--workdir={user}", *args],
    cwd=REPO,
    env=_env(tmp_path, shared_data),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors_printed = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors_printed) == 1 and message in errors_printed[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert (user / "metrics.jsonl").read_text() == '{"step": 1}\n'
  assert (user / "images" / "step_000003.png").read_bytes() == b"mine"
