"""Checkpoints of training runs, on orbax-checkpoint's `CheckpointManager` (API of orbax-checkpoint 0.12.x).

A run's checkpoints live in `workdir/checkpoints/<step>/`, one orbax item per part, so that inference can read
the generator without the discriminator or the optimiser:

  generator     StandardSave   {"params", "batch_stats"} of the generator
  train         StandardSave   {"step", "rng", "d_params", "d_batch_stats", "g_opt_state", "d_opt_state"}
  config        JsonSave       the training ConfigDict as a dict
  data_state    JsonSave       where the data stream is: {"seed", "step"} (the next batch index)
  preprocessor  JsonSave       {"preprocessor": MSIPreprocessor.to_dict() or None}

One manager keeps both the last `max_to_keep` checkpoints and the best one by validation SSIM (saved with
`metrics={"val_ssim": ...}`), through orbax's `AnyPreservationPolicy(LatestN, BestN)`. Saves are asynchronous
and atomic: a process killed while saving leaves only complete checkpoints behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from msisynth import errors

# The API used here (args.Composite/StandardSave/JsonSave, preservation policies) is that of orbax-checkpoint
# 0.12.x, tested with 0.12.8.
TESTED_ORBAX_VERSION = "0.12.8"
CHECKPOINT_SUBDIR = "checkpoints"
BEST_METRIC = "val_ssim"
_TRAIN_FIELDS = ("step", "rng", "d_params", "d_batch_stats", "g_opt_state", "d_opt_state")


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """The checkpoint folder of a run: `workdir/checkpoints`, or `workdir` itself when it is that folder."""
  workdir = os.path.abspath(os.fspath(workdir))
  if os.path.basename(workdir) == CHECKPOINT_SUBDIR:
    return workdir
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


def _best_metric(metrics: Mapping[str, Any]) -> float:
  return float(metrics[BEST_METRIC])


def make_manager(
  workdir: str | os.PathLike, *, max_to_keep: int | None = 3, read_only: bool = False
) -> ocp.CheckpointManager:
  """A CheckpointManager over `workdir/checkpoints` keeping the last `max_to_keep` and the best by SSIM.

  Args:
    workdir: the run folder (or its `checkpoints` subfolder).
    max_to_keep: how many of the latest checkpoints to keep (None keeps all); the best one by validation SSIM
      is kept in addition.
    read_only: open for restoring only (nothing is created or deleted).

  Returns:
    The manager; close it (`manager.close()`) when done.

  Raises:
    CheckpointError: when `read_only` and the folder does not exist.
  """
  directory = checkpoint_dir(workdir)
  if not hasattr(checkpoint_managers, "AnyPreservationPolicy"):
    raise errors.CheckpointError(
      f"orbax-checkpoint {getattr(ocp, '__version__', '?')} has no preservation policies; msisynth needs the "
      f"CheckpointManager API of orbax-checkpoint 0.12 (tested with {TESTED_ORBAX_VERSION})"
    )
  if read_only and not os.path.isdir(directory):
    raise errors.CheckpointError(f"{directory}: no checkpoint folder (was this run trained with msisynth?)")
  policy = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(n=max_to_keep),
      checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=None if read_only else policy,
    best_fn=_best_metric,
    best_mode="max",
    read_only=read_only,
    create=not read_only,
    cleanup_tmp_directories=not read_only,
    save_interval_steps=0 if read_only else 1,
  )
  return ocp.CheckpointManager(directory, options=options)


class _Manager:
  """A manager given by the caller (left open) or opened on a workdir (closed on exit)."""

  def __init__(self, manager_or_workdir, read_only: bool):
    self.owned = not isinstance(manager_or_workdir, ocp.CheckpointManager)
    self.manager = make_manager(manager_or_workdir, read_only=read_only) if self.owned else manager_or_workdir

  def __enter__(self) -> ocp.CheckpointManager:
    return self.manager

  def __exit__(self, *exc):
    if self.owned:
      self.manager.wait_until_finished()
      self.manager.close()


def latest_step(manager_or_workdir) -> int | None:
  """The latest saved step, or None when there is no checkpoint (or no checkpoint folder)."""
  if not isinstance(manager_or_workdir, ocp.CheckpointManager) and not os.path.isdir(
    checkpoint_dir(manager_or_workdir)
  ):
    return None
  with _Manager(manager_or_workdir, read_only=True) as manager:
    return manager.latest_step()


def best_step(manager_or_workdir) -> int | None:
  """The kept step with the highest validation SSIM, or None when no checkpoint has validation metrics."""
  if not isinstance(manager_or_workdir, ocp.CheckpointManager) and not os.path.isdir(
    checkpoint_dir(manager_or_workdir)
  ):
    return None
  with _Manager(manager_or_workdir, read_only=True) as manager:
    with_metrics = [s for s in manager.all_steps() if manager.metrics(s) and BEST_METRIC in manager.metrics(s)]
    return manager.best_step() if with_metrics else None


def _config_dict(config) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  if isinstance(config, Mapping):
    return dict(config)
  raise errors.ConfigError(f"config must be a ConfigDict or a dict, got {type(config).__name__}")


def save(
  manager_or_workdir,
  state,
  *,
  config,
  data_state: Mapping[str, Any] | None = None,
  preprocessor: Mapping[str, Any] | None = None,
  metrics: Mapping[str, float] | None = None,
) -> bool:
  """Saves a train state with its config, data position and preprocessor at step `state.step`.

  Args:
    manager_or_workdir: a manager from `make_manager` (left open; the save may still be running on return) or a
      run folder (a manager is opened, waited for and closed).
    state: a `msisynth.train.TrainState`.
    config: the training ConfigDict.
    data_state: the data position, e.g. {"seed": 0, "step": 1000}.
    preprocessor: `MSIPreprocessor.to_dict()` (JSON-serialisable) or None.
    metrics: validation metrics of this state; `val_ssim` ranks the checkpoint for "best".

  Returns:
    Whether a checkpoint was written (False when this step is already saved).
  """
  step = int(jax.device_get(state.step))
  train_item = {name: getattr(state, name) for name in _TRAIN_FIELDS}
  args = ocp.args.Composite(
    generator=ocp.args.StandardSave({"params": state.g_params, "batch_stats": state.g_batch_stats}),
    train=ocp.args.StandardSave(train_item),
    config=ocp.args.JsonSave(_config_dict(config)),
    data_state=ocp.args.JsonSave(dict(data_state or {})),
    preprocessor=ocp.args.JsonSave({"preprocessor": None if preprocessor is None else dict(preprocessor)}),
  )
  ranked = None
  if metrics is not None and BEST_METRIC in metrics and math.isfinite(float(metrics[BEST_METRIC])):
    ranked = {k: float(v) for k, v in metrics.items()}
  with _Manager(manager_or_workdir, read_only=False) as manager:
    if step in manager.all_steps():
      return False
    return manager.save(step, args=args, metrics=ranked)


def _pick_step(manager: ocp.CheckpointManager, step: int | None, which: str) -> int:
  directory = os.fspath(manager.directory)
  steps = manager.all_steps()
  if not steps:
    raise errors.CheckpointError(f"{directory}: no checkpoint")
  if step is not None:
    if step not in steps:
      raise errors.CheckpointError(f"{directory}: no checkpoint at step {step}; saved steps are {sorted(steps)}")
    return int(step)
  if which == "latest":
    return int(manager.latest_step())
  if which == "best":
    best = best_step(manager)
    if best is None:
      logging.warning("%s: no checkpoint has validation metrics; using the latest", directory)
      return int(manager.latest_step())
    return int(best)
  raise errors.ConfigError(f"which must be 'latest' or 'best', got {which!r}")


def _extras(restored) -> dict[str, Any]:
  return {
    "config": ml_collections.ConfigDict(restored["config"]),
    "data_state": dict(restored["data_state"]),
    "preprocessor": restored["preprocessor"]["preprocessor"],
  }


def restore_latest(manager_or_workdir, target_state=None, step: int | None = None):
  """Restores the latest (or a given) checkpoint.

  Args:
    manager_or_workdir: a manager or a run folder.
    target_state: a TrainState of the same configuration (e.g. from `create_train_state`); the restored arrays
      take its structure, dtypes and shardings. Without it the raw pytrees are returned.
    step: restore this step instead of the latest.

  Returns:
    (state, extras): state is a TrainState when `target_state` is given, else
    {"generator": {"params", "batch_stats"}, "train": {...}}; extras is {"step", "config" (ConfigDict),
    "data_state", "preprocessor" (dict or None)}.

  Raises:
    CheckpointError: when there is no checkpoint.
    TrainingError: when the checkpoint does not match `target_state` (another configuration).
  """
  with _Manager(manager_or_workdir, read_only=True) as manager:
    step = _pick_step(manager, step, "latest")
    json_args = dict(
      config=ocp.args.JsonRestore(), data_state=ocp.args.JsonRestore(), preprocessor=ocp.args.JsonRestore()
    )
    if target_state is None:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(generator=ocp.args.StandardRestore(), train=ocp.args.StandardRestore(), **json_args),
      )
      extras = _extras(restored)
      extras["step"] = step
      return {"generator": restored["generator"], "train": restored["train"]}, extras
    g_target = {"params": target_state.g_params, "batch_stats": target_state.g_batch_stats}
    t_target = {name: getattr(target_state, name) for name in _TRAIN_FIELDS}
    try:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          generator=ocp.args.StandardRestore(g_target), train=ocp.args.StandardRestore(t_target), **json_args
        ),
      )
    except (ValueError, KeyError, TypeError) as e:
      raise errors.TrainingError(
        f"{manager.directory}/{step}: the checkpoint does not match the configured model and optimiser "
        f"({type(e).__name__}: {str(e)[:500]}); use a new workdir or the configuration it was trained with"
      ) from e
  g, t = restored["generator"], restored["train"]
  _check_matches(
    f"{manager.directory}/{step}", {"generator": g, "train": t}, {"generator": g_target, "train": t_target}
  )
  state = target_state.replace(g_params=g["params"], g_batch_stats=g["batch_stats"], **t)
  extras = _extras(restored)
  extras["step"] = step
  return state, extras


def _check_matches(where: str, restored, target) -> None:
  """TrainingError unless `restored` has the structure, shapes and dtypes of `target`."""
  got = jax.tree_util.tree_flatten_with_path(restored)[0]
  want = jax.tree_util.tree_flatten_with_path(target)[0]
  got_paths = [jax.tree_util.keystr(p) for p, _ in got]
  want_paths = [jax.tree_util.keystr(p) for p, _ in want]
  if got_paths != want_paths:
    missing = sorted(set(want_paths) - set(got_paths))[:5]
    extra = sorted(set(got_paths) - set(want_paths))[:5]
    raise errors.TrainingError(
      f"{where}: the checkpoint does not match the configured model and optimiser (missing {missing}, "
      f"unexpected {extra}); use a new workdir or the configuration it was trained with"
    )
  for path, (_, a), (_, b) in zip(got_paths, got, want):
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
      raise errors.TrainingError(
        f"{where}: the checkpoint does not match the configured model and optimiser: {path} is "
        f"{a.dtype}{list(a.shape)} in the checkpoint and {b.dtype}{list(b.shape)} in the configured state; use a "
        "new workdir or the configuration it was trained with"
      )


def restore_for_inference(
  workdir: str | os.PathLike, step: int | None = None, which: str = "latest"
) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict | None]:
  """The generator of a run, without building the optimiser or the discriminator.

  Args:
    workdir: the run folder (or its `checkpoints` subfolder).
    step: a saved step; None picks by `which`.
    which: "latest", or "best" (highest validation SSIM; the latest when no checkpoint has metrics).

  Returns:
    (config, variables, preprocessor): the training ConfigDict (build the generator with
    `msisynth.models.generator_from_config(config)`), {"params", "batch_stats"} for `generator.apply`, and
    the saved `MSIPreprocessor.to_dict()` or None.

  Raises:
    CheckpointError: when the folder holds no checkpoint or not the asked step.
  """
  with _Manager(workdir, read_only=True) as manager:
    step = _pick_step(manager, step, which)
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        generator=ocp.args.StandardRestore(), config=ocp.args.JsonRestore(), preprocessor=ocp.args.JsonRestore()
      ),
    )
  g = restored["generator"]
  variables = {"params": g["params"], "batch_stats": g.get("batch_stats") or {}}
  return ml_collections.ConfigDict(restored["config"]), variables, restored["preprocessor"]["preprocessor"]
