"""Tests of msisynth.train: the pix2pix step (D then G), the U-Net baseline, mixed precision, exact resumption,
NaN handling and data parallelism over 8 CPU devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import pix2pix, unet
from msisynth import checkpoint, errors, losses, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, P, B = 10, 32, 2  # MSI channels, patch size, batch: the tiny config on the msiFlow pair has the same shapes


def make_batch(step, seed=0, batch=B, k=K, size=P):
  """A synthetic batch, a function of (seed, step): H&E-like targets that depend smoothly on the MSI."""
  rng = np.random.default_rng([seed, step])
  msi = np.tanh(rng.normal(size=(batch, size, size, k))).astype(np.float32)
  he = np.tanh(msi[..., :3] * 1.5 + 0.3 * msi[..., 3:6]).astype(np.float32)
  return {"msi": msi, "histology": he, "mask": np.ones((batch, size, size, 1), np.float32)}


@pytest.fixture(scope="module")
def config():
  return pix2pix.get_config("tiny")


def leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_pix2pix_step_updates_discriminator_then_generator(config):
  before = jax.device_get(train.create_train_state(0, config, (P, P, K)))
  state = train.create_train_state(0, config, (P, P, K))
  batch = make_batch(0)
  state, m = train.train_step(state, batch)
  assert int(state.step) == 1
  assert set(m) == {
    "d_loss",
    "d_real",
    "d_fake",
    "d_grad_norm",
    "d_param_norm",
    "g_loss",
    "g_gan",
    "g_l1",
    "g_grad_norm",
    "g_param_norm",
    "learning_rate",
  }
  assert all(np.isfinite(float(v)) for v in m.values())
  for name in ("g_params", "g_batch_stats", "d_params", "d_batch_stats"):
    assert not leaves_equal(getattr(before, name), getattr(state, name)), name
  np.testing.assert_allclose(m["learning_rate"], 2e-4, rtol=1e-6)

  # Recompute the step's losses by hand: the same generator output (same dropout key), D's loss with D's
  # parameters before the update, and G's adversarial term through D's parameters *after* the update.
  g, d = state.generator, state.discriminator
  key = jax.random.fold_in(jax.random.wrap_key_data(before.rng), 0)

  @jax.jit
  def reference(g_vars, d_old, d_new, batch):
    fake, _ = g.apply(g_vars, batch["msi"], train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    score = lambda p, stats, image: d.apply(
      {"params": p, "batch_stats": stats},
      jnp.concatenate([batch["msi"], image], -1),
      train=True,
      mutable=["batch_stats"],
    )[0]
    d_loss = losses.discriminator_loss(
      score(d_old, before.d_batch_stats, batch["histology"]), score(d_old, before.d_batch_stats, fake)
    )
    return (
      d_loss,
      losses.generator_gan_loss(score(d_new, before.d_batch_stats, fake)),
      losses.generator_gan_loss(score(d_old, before.d_batch_stats, fake)),
      losses.l1_loss(fake, batch["histology"]),
    )

  d_loss, g_gan_new, g_gan_old, l1 = reference(
    {"params": before.g_params, "batch_stats": before.g_batch_stats}, before.d_params, state.d_params, batch
  )
  np.testing.assert_allclose(m["d_loss"], d_loss, rtol=1e-5)
  np.testing.assert_allclose(m["g_l1"], l1, rtol=1e-5)
  np.testing.assert_allclose(m["g_gan"], g_gan_new, rtol=1e-5)
  assert abs(float(g_gan_new - g_gan_old)) > 1e-4  # so the check above tells the two apart
  np.testing.assert_allclose(m["g_loss"], g_gan_new + 100 * l1, rtol=1e-5)

  # Inference: running averages, no dropout: deterministic, in [-1, 1].
  out1, out2 = train.eval_step(state, batch), train.eval_step(state, batch["msi"])
  assert out1.shape == (B, P, P, 3) and out1.dtype == jnp.float32
  np.testing.assert_array_equal(out1, out2)
  assert float(jnp.max(jnp.abs(out1))) <= 1.0


def test_unet_baseline_bf16_learns_with_l1_only():
  config = unet.get_config("tiny,bf16")
  config.optim.learning_rate = 5e-3  # a visible change in a few steps
  state = train.create_train_state(1, config, (P, P, K))
  assert state.discriminator is None and state.d_params == {}
  assert state.generator.dtype == jnp.bfloat16
  batch = make_batch(0)
  l1 = []
  for _ in range(6):
    state, m = train.train_step(state, batch)
    l1.append(float(m["g_l1"]))
  assert "d_loss" not in m and "g_gan" not in m
  np.testing.assert_allclose(m["g_loss"], 100 * m["g_l1"], rtol=1e-6)
  assert l1[-1] < l1[0] - 0.01, l1  # it learns the fixed batch
  # Mixed precision: float32 parameters, optimiser state and batch statistics.
  for tree in (state.g_params, state.g_opt_state, state.g_batch_stats):
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree_util.tree_leaves(tree))
  assert train.eval_step(state, batch).dtype == jnp.float32


def test_config_and_batch_errors(config):
  bad = pix2pix.get_config("tiny")
  bad.model.kind = "cyclegan"
  with pytest.raises(errors.ConfigError, match="model.kind"):
    train.create_train_state(0, bad, (P, P, K))
  with pytest.raises(errors.ConfigError, match=r"input size \(40, 40\)"):
    train.create_train_state(0, config, (40, 40, K))
  state = train.create_train_state(0, config, (P, P, K))
  batch = make_batch(0)
  batch["histology"] = batch["histology"][..., :2]
  with pytest.raises(errors.ConfigError, match="histology"):
    train.train_step(state, batch)


def test_data_mesh_uses_largest_divisor():
  assert [train.num_data_devices(b, 8) for b in (1, 2, 7, 8, 9, 12, 16, 64)] == [1, 2, 7, 8, 3, 6, 8, 8]
  with pytest.raises(errors.ConfigError):
    train.num_data_devices(0, 8)


def _run(config, workdir, steps, data=make_batch, val=None):
  config = config.copy_and_resolve_references()
  config.train.num_steps = steps
  return train.train_and_evaluate(config, workdir, data, val)


def test_resume_is_exact(config, tmp_path):
  config = config.copy_and_resolve_references()
  config.train.checkpoint_every = 2
  config.train.image_every = 0
  straight = jax.device_get(_run(config, tmp_path / "straight", 4))
  _run(config, tmp_path / "resumed", 2)
  assert checkpoint.latest_step(tmp_path / "resumed") == 2
  resumed = jax.device_get(_run(config, tmp_path / "resumed", 4))
  assert int(resumed.step) == 4
  assert leaves_equal(straight, resumed)  # parameters, batch statistics, optimiser states and rng, bit for bit
  with open(tmp_path / "resumed" / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(config, tmp_path):
  def data(step):
    batch = make_batch(step)
    if step == 3:  # the fourth update
      batch["msi"][0, 5, 5, 0] = np.nan
    return batch

  val = make_batch(99, batch=4)
  with pytest.raises(errors.TrainingError, match=r"non-finite values at step 4 .*last good checkpoint is step 3"):
    _run(config, tmp_path, 6, data=data, val=val)
  assert checkpoint.latest_step(tmp_path) == 3
  _, variables, _ = checkpoint.restore_for_inference(tmp_path)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(variables))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert max(r["step"] for r in records) == 3 and any("val_ssim" in r for r in records)
  assert sorted(os.listdir(tmp_path / "images")) == ["step_000003.png"]


def test_parameters_that_become_non_finite_are_never_saved(config, tmp_path):
  # A huge learning rate: the losses of step 1 are computed before its update and are finite, its parameters not.
  config = config.copy_and_resolve_references()
  config.optim.learning_rate = 1e39
  with pytest.raises(errors.TrainingError, match=r"non-finite values at step 1 .*last good checkpoint is none"):
    _run(config, tmp_path, 3)
  assert checkpoint.latest_step(tmp_path) is None


def test_bad_counts_are_refused(config, tmp_path):
  for field, value in [("num_steps", -5), ("num_steps", 0), ("checkpoint_every", 0), ("eval_every", 0),
                       ("image_every", -1), ("batch_size", 0)]:
    bad = config.copy_and_resolve_references()
    bad.train[field] = value
    with pytest.raises(errors.ConfigError, match=f"config.train.{field}"):
      train.train_and_evaluate(bad, tmp_path / "run", make_batch)
  assert not (tmp_path / "run").exists()


def test_refuses_a_folder_it_did_not_create(config, tmp_path):
  user = tmp_path / "user"
  (user / "images").mkdir(parents=True)
  lines = "".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(100))
  (user / "metrics.jsonl").write_text(lines)
  (user / "images" / "step_000003.png").write_bytes(b"user's picture")
  with pytest.raises(errors.OutputExistsError, match="not created by msisynth"):
    _run(config, user, 3)
  assert (user / "metrics.jsonl").read_text() == lines
  assert (user / "images" / "step_000003.png").read_bytes() == b"user's picture"
  assert sorted(os.listdir(user)) == ["images", "metrics.jsonl"]


def test_torn_metrics_line_does_not_block_resume(config, tmp_path):
  config = config.copy_and_resolve_references()
  config.train.image_every = 0
  _run(config, tmp_path, 2)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "g_lo')  # a kill or a full disk mid-line
  _run(config, tmp_path, 4)
  assert [r["step"] for r in train.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_damaged_latest_checkpoint_resumes_from_intact_only_when_asked(config, tmp_path):
  config = config.copy_and_resolve_references()
  config.train.image_every = 0
  straight = jax.device_get(_run(config, tmp_path / "straight", 4))
  run = tmp_path / "run"
  _run(config, run, 3)
  (run / "checkpoints" / "3" / "train" / "manifest.ocdbt").unlink()
  with pytest.raises(errors.CheckpointError, match=r"step 3 is damaged .*step 2 is intact.*--resume_from=intact"):
    _run(config, run, 4)
  assert checkpoint.latest_step(run) == 3  # not silently started over, nothing moved
  config.train.num_steps = 4
  resumed = jax.device_get(train.train_and_evaluate(config, run, make_batch, resume_from="intact"))
  assert leaves_equal(straight, resumed)
  assert (run / "checkpoints.damaged" / "3").is_dir()
  assert [r["step"] for r in train.read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import os, sys
    # 8 CPU devices; little optimisation of code that runs three tiny steps.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from experiments.configs import pix2pix
    from msisynth import train
    assert jax.local_device_count() == 8
    config = pix2pix.get_config("tiny")
    config.model.depth, config.model.d_layers = 3, 1  # a smaller program: this test compiles it twice
    config.train.batch_size = 8

    def batch(step):
      r = np.random.default_rng([0, step])
      msi = np.tanh(r.normal(size=(8, 16, 16, 4))).astype(np.float32)
      return {{"msi": msi, "histology": np.tanh(2 * msi[..., :3])}}

    out = {{}}
    for n in (8, 1):
      mesh = train.data_mesh(8, num_devices=n)
      assert mesh.size == n
      state = train.create_train_state(0, config, (16, 16, 4), mesh)
      for step in range(3):
        state, metrics = train.train_step(state, batch(step), mesh)
      assert state.g_params["down0"]["kernel"].sharding.is_fully_replicated
      assert len(state.g_params["down0"]["kernel"].sharding.device_set) == n
      out[n] = jax.device_get((state.g_params, state.g_batch_stats, state.d_params, state.d_batch_stats,
                               state.g_opt_state, metrics))
    diff = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), out[8], out[1])
    names = ["g_params", "g_batch_stats", "d_params", "d_batch_stats", "g_opt_state", "metrics"]
    print({{name: max(jax.tree_util.tree_leaves(d)) for name, d in zip(names, diff)}})
    # Batch statistics over the whole global batch: per-device statistics would change the running variances.
    np.testing.assert_allclose(out[8][1]["down_norm1"]["var"], out[1][1]["down_norm1"]["var"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(out[8]), jax.tree_util.tree_leaves(out[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)

    # A batch of 1 on an 8-device host runs on one device (the U-Net baseline: a smaller program to compile).
    mesh = train.data_mesh(1)
    assert mesh.size == 1
    config.train.batch_size = 1
    config.model.kind = "unet"
    state = train.create_train_state(0, config, (16, 16, 4), mesh)
    state, metrics = train.train_step(state, {{k: v[:1] for k, v in batch(0).items()}})
    assert np.isfinite(float(metrics["g_loss"]))
    print("OK")
""")


def test_eight_devices_match_one_device(tmp_path):
  script = tmp_path / "multi_device.py"
  script.write_text(MULTI_DEVICE_SCRIPT.format(repo=REPO))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-3000:]
