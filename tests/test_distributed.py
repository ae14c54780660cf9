"""Training across processes (msisynth.distributed): 2 processes on localhost equal 1 process, on the CPU."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from msisynth import distributed, errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # three tiny steps: little to optimise
    sys.path.insert(0, {repo!r})
    from msisynth import distributed
    multi = distributed.initialize()  # from MSISYNTH_* in the environment; before any JAX computation
    import jax, numpy as np
    from experiments.configs import pix2pix
    from msisynth import train

    class Patches:
      "A batch of 2 as a function of (seed, step); a process asks only for its rows."
      asked = set()

      def batch(self, step, rows=None):
        r = np.random.default_rng([0, step])
        msi = np.tanh(r.normal(size=(2, 16, 16, 4))).astype(np.float32)
        out = {{"msi": msi, "histology": np.tanh(2 * msi[..., :3])}}
        if rows is not None:
          Patches.asked.add((rows.start, rows.stop))
          out = {{k: v[rows] for k, v in out.items()}}
        return out

    config = pix2pix.get_config("tiny")
    config.model.depth, config.model.d_layers = 3, 1
    config.train.batch_size, config.train.num_steps = 2, 3
    config.train.checkpoint_every, config.train.image_every, config.train.eval_every = 3, 0, 1000
    r = np.random.default_rng(1)
    val_msi = np.tanh(r.normal(size=(4, 16, 16, 4))).astype(np.float32)
    val = {{"msi": val_msi, "histology": np.tanh(2 * val_msi[..., :3])}}  # every process holds all of it
    state = train.train_and_evaluate(config, sys.argv[1], Patches(), val)
    assert jax.process_count() == (2 if multi else 1) and jax.device_count() == jax.process_count()
    if multi:
      assert Patches.asked == {{(jax.process_index(), jax.process_index() + 1)}}, Patches.asked
    if jax.process_index() == 0:
      leaves = jax.tree_util.tree_leaves(jax.device_get((state.g_params, state.d_params, state.g_batch_stats)))
      np.savez(sys.argv[2], *[np.asarray(x) for x in leaves])
    print("OK", jax.process_index())
""")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER.format(repo=REPO))
  base = {k: v for k, v in os.environ.items() if not k.startswith(("MSISYNTH_", "XLA_", "JAX_", "SLURM_"))}
  address = f"127.0.0.1:{_free_port()}"
  procs = []
  for pid in range(2):
    env = dict(base, MSISYNTH_COORDINATOR_ADDRESS=address, MSISYNTH_NUM_PROCESSES="2", MSISYNTH_PROCESS_ID=str(pid))
    cmd = [sys.executable, str(script), str(tmp_path / "two"), str(tmp_path / "two.npz")]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  one = subprocess.run(
    [sys.executable, str(script), str(tmp_path / "one"), str(tmp_path / "one.npz")],
    env=base,
    capture_output=True,
    text=True,
    timeout=600,
  )
  outs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
    outs.append((proc.returncode, out, err))
  for code, out, err in outs:
    assert code == 0 and "OK" in out, out + err[-3000:]
  assert one.returncode == 0, one.stdout + one.stderr[-3000:]

  two_params, one_params = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  assert len(two_params.files) == len(one_params.files) > 0
  for name in one_params.files:
    np.testing.assert_allclose(two_params[name], one_params[name], rtol=1e-4, atol=2e-5)
  # One metrics log (the first process writes it), with the same validation scores as one process.
  logs = {}
  for run in ("one", "two"):
    lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    logs[run] = {k: v for line in lines for k, v in line.items() if k.startswith("val_")}
  assert set(logs["two"]) == {"val_ssim", "val_mi", "val_l1"}
  for name, value in logs["one"].items():
    assert logs["two"][name] == pytest.approx(value, rel=1e-4, abs=1e-5)


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False


def test_initialize_refuses_a_partial_description(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv(distributed.ENV_COORDINATOR, raising=False)
  with pytest.raises(errors.ConfigError, match="process id"):
    distributed.initialize(num_processes=2)
  with pytest.raises(errors.ConfigError, match="coordinator"):
    distributed.initialize(num_processes=2, process_id=1)
