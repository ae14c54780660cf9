"""Tests of msisynth.checkpoint: round trips, retention of the latest and the best, inference restore, errors."""

import os

import jax
import numpy as np
import pytest

from experiments.configs import pix2pix, unet
from msisynth import checkpoint, errors, models, train

K, P = 10, 32


@pytest.fixture(scope="module")
def config():
  return pix2pix.get_config("tiny")


@pytest.fixture(scope="module")
def state(config):
  return jax.device_get(train.create_train_state(0, config, (P, P, K)))


def _with_step(state, step):
  return state.replace(step=np.int32(step), g_params=jax.tree_util.tree_map(lambda x: x + step, state.g_params))


def leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_save_and_restore_latest_round_trip(state, config, tmp_path):
  preprocessor = {"format": "test", "mean": [0.5, 0.25], "nested": {"k": 3}}
  assert checkpoint.save(
    tmp_path,
    _with_step(state, 7),
    config=config,
    data_state={"seed": 0, "step": 7},
    preprocessor=preprocessor,
    metrics={"val_ssim": 0.4},
  )
  assert not checkpoint.save(tmp_path, _with_step(state, 7), config=config)  # this step is already saved
  target = train.create_train_state(1, config, (P, P, K))
  restored, extras = checkpoint.restore_latest(tmp_path, target_state=target)
  assert isinstance(restored, train.TrainState) and int(restored.step) == 7
  assert leaves_equal(restored, _with_step(state, 7))
  assert restored.generator == target.generator and restored.g_tx is target.g_tx
  assert extras["step"] == 7 and extras["data_state"] == {"seed": 0, "step": 7}
  assert extras["preprocessor"] == preprocessor
  assert extras["config"].model.depth == config.model.depth and extras["config"].data.source == "msiflow"
  # Without a target: raw pytrees, generator and training parts separate.
  raw, _ = checkpoint.restore_latest(tmp_path)
  assert leaves_equal(raw["generator"]["params"], _with_step(state, 7).g_params)
  assert leaves_equal(raw["train"]["d_params"], state.d_params)


def test_keeps_latest_and_best_and_restores_for_inference(state, config, tmp_path):
  ssim = {1: 0.2, 2: 0.9, 3: 0.3, 4: None, 5: 0.5, 6: 0.1}
  manager = checkpoint.make_manager(tmp_path, max_to_keep=2)
  for step, value in ssim.items():
    metrics = None if value is None else {"val_ssim": value, "val_mi": 0.1}
    checkpoint.save(manager, _with_step(state, step), config=config, metrics=metrics)
  manager.wait_until_finished()
  manager.close()
  assert checkpoint.latest_step(tmp_path) == 6
  assert checkpoint.best_step(tmp_path) == 2
  kept = sorted(checkpoint.make_manager(tmp_path, read_only=True).all_steps())
  assert kept == [2, 5, 6]  # the last two, and the best by validation SSIM

  for which, step in (("latest", 6), ("best", 2)):
    cfg, variables, pre = checkpoint.restore_for_inference(tmp_path, which=which)
    assert pre is None and cfg.model.ngf == config.model.ngf
    assert set(variables) == {"params", "batch_stats"}
    assert leaves_equal(variables["params"], _with_step(state, step).g_params)
    assert leaves_equal(variables["batch_stats"], state.g_batch_stats)
  _, variables, _ = checkpoint.restore_for_inference(tmp_path / "checkpoints", step=5)
  assert leaves_equal(variables["params"], _with_step(state, 5).g_params)

  # The restored variables drive the generator built from the restored config alone.
  cfg, variables, _ = checkpoint.restore_for_inference(tmp_path)
  generator = models.generator_from_config(cfg)
  out = jax.eval_shape(lambda v, x: generator.apply(v, x, train=False), variables, np.zeros((1, P, P, K), np.float32))
  assert out.shape == (1, P, P, 3)


def test_unet_state_round_trip(tmp_path):
  config = unet.get_config("tiny,bf16")
  state = train.create_train_state(1, config, (P, P, K))
  checkpoint.save(tmp_path, state, config=config)
  restored, extras = checkpoint.restore_latest(tmp_path, target_state=train.create_train_state(2, config, (P, P, K)))
  assert restored.d_params == {} and restored.discriminator is None
  assert leaves_equal(restored, state) and extras["preprocessor"] is None


def test_errors(state, config, tmp_path):
  with pytest.raises(errors.CheckpointError, match="no checkpoint folder"):
    checkpoint.restore_for_inference(tmp_path / "nothing")
  assert checkpoint.latest_step(tmp_path / "nothing") is None
  checkpoint.make_manager(tmp_path).close()
  with pytest.raises(errors.CheckpointError, match="no checkpoint"):
    checkpoint.restore_latest(tmp_path)
  checkpoint.save(tmp_path, _with_step(state, 3), config=config)
  with pytest.raises(errors.CheckpointError, match="no checkpoint at step 4"):
    checkpoint.restore_for_inference(tmp_path, step=4)
  with pytest.raises(errors.ConfigError, match="which"):
    checkpoint.restore_for_inference(tmp_path, which="first")
  # No validation metrics: "best" falls back to the latest.
  _, variables, _ = checkpoint.restore_for_inference(tmp_path, which="best")
  assert leaves_equal(variables["params"], _with_step(state, 3).g_params)
  # A checkpoint of another model does not restore into this one.
  other = pix2pix.get_config("tiny")
  other.model.ngf = 4
  target = jax.eval_shape(lambda: train.create_train_state(0, other, (P, P, K)))
  with pytest.raises(errors.TrainingError, match="does not match"):
    checkpoint.restore_latest(tmp_path, target_state=target)


def test_save_refuses_non_finite_state(state, config, tmp_path):
  bad = state.replace(step=np.int32(1), g_params=jax.tree_util.tree_map(lambda x: x * np.inf, state.g_params))
  with pytest.raises(errors.TrainingError, match="NaN/Inf"):
    checkpoint.save(tmp_path, bad, config=config)
  opt = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan) if x.dtype == np.float32 else x, state.g_opt_state)
  with pytest.raises(errors.TrainingError, match="g_opt_state"):
    checkpoint.save(tmp_path, state.replace(step=np.int32(2), g_opt_state=opt), config=config)
  assert checkpoint.latest_step(tmp_path) is None


def test_non_finite_weights_do_not_load(state, config, tmp_path, monkeypatch):
  # A checkpoint written without the check (an older msisynth) does not give NaN images silently.
  from msisynth import synthesize

  monkeypatch.setattr(checkpoint, "check_finite", lambda *a, **k: None)
  bad = state.replace(step=np.int32(1), g_params=jax.tree_util.tree_map(lambda x: x * np.inf, state.g_params))
  checkpoint.save(tmp_path, bad, config=config)
  monkeypatch.undo()
  with pytest.raises(errors.CheckpointError, match="NaN/Inf"):
    checkpoint.restore_for_inference(tmp_path)
  with pytest.raises(errors.CheckpointError, match="NaN/Inf"):
    synthesize.load_synthesizer(tmp_path, tile_size=32, overlap=8)


def _largest_file(folder):
  files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_file(step_dir / "generator")
  os.truncate(path, path.stat().st_size // 2)


def _flip_bit(step_dir):
  path = _largest_file(step_dir / "generator")
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _delete_manifest(step_dir):
  (step_dir / "generator" / "manifest.ocdbt").unlink()


def _corrupt_json(step_dir):
  (step_dir / "config" / "metadata").write_text('{"model": ')


def _edit_json(step_dir):
  (step_dir / "preprocessor" / "metadata").write_text('{"preprocessor": {"a": 1}}')


@pytest.mark.parametrize("damage", [_truncate, _flip_bit, _delete_manifest, _corrupt_json, _edit_json])
def test_damaged_latest_step_is_named_and_intact_one_offered(state, config, tmp_path, damage):
  for step in (1, 2):
    checkpoint.save(tmp_path, _with_step(state, step), config=config)
  damage(tmp_path / "checkpoints" / "2")
  target = train.create_train_state(0, config, (P, P, K))
  message = r"checkpoint step 2 is damaged .*step 1 is intact"
  with pytest.raises(errors.CheckpointError, match=message + r": pass resume_from='intact'"):
    checkpoint.restore_latest(tmp_path, target_state=target)
  with pytest.raises(errors.CheckpointError, match=message + ": pass step=1"):
    checkpoint.restore_for_inference(tmp_path)
  assert checkpoint.newest_intact_step(tmp_path) == 1
  assert checkpoint.latest_step(tmp_path) == 2  # nothing was changed until asked
  restored, extras = checkpoint.restore_latest(tmp_path, target_state=target, resume_from="intact")
  assert extras["step"] == 1 and leaves_equal(restored, _with_step(state, 1))
  # The damaged step is kept aside, and the checkpoint folder now ends at the intact step.
  assert (tmp_path / "checkpoints.damaged" / "2").is_dir()
  assert checkpoint.latest_step(tmp_path) == 1


def test_no_intact_step_is_an_error(state, config, tmp_path):
  checkpoint.save(tmp_path, _with_step(state, 1), config=config)
  _truncate(tmp_path / "checkpoints" / "1")
  with pytest.raises(errors.CheckpointError, match="step 1 is damaged .*no earlier step is intact"):
    checkpoint.restore_latest(tmp_path)
  with pytest.raises(errors.CheckpointError, match="no earlier step is intact"):
    checkpoint.restore_latest(tmp_path, resume_from="intact")
  assert (tmp_path / "checkpoints" / "1").is_dir()


def test_synthesizer_never_returns_a_nan_image(config):
  from msisynth import synthesize

  synthesizer = synthesize.Synthesizer(
    apply_fn=lambda x: np.full(x.shape[:3] + (3,), np.nan, np.float32),
    config=config,
    preprocessor=None,
    in_channels=K,
    size_multiple=16,
    tile_size=32,
    overlap=8,
    workdir="run",
  )
  with pytest.raises(errors.CheckpointError, match="NaN/Inf"):
    synthesizer(np.zeros((40, 48, K), np.float32))
