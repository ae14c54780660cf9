"""Checkpoints of training runs, on orbax-checkpoint's `CheckpointManager` (API of orbax-checkpoint 0.12.x).

A run's checkpoints live in `workdir/checkpoints/<step>/`, one orbax item per part, so that inference can read
the generator without the discriminator or the optimiser:

  generator     StandardSave   {"params", "batch_stats"} of the generator
  train         StandardSave   {"step", "rng", "d_params", "d_batch_stats", "g_opt_state", "d_opt_state"}
  config        JsonSave       the training ConfigDict as a dict
  data_state    JsonSave       where the data stream is: {"seed", "step"} (the next batch index)
  preprocessor  JsonSave       {"preprocessor": MSIPreprocessor.to_dict() or None}
  digest        JsonSave       a SHA-256 digest of every other item, checked on restore

Before a save, every floating-point array of the state (parameters, batch statistics, optimiser states) is
checked finite: a state with NaN/Inf is refused (TrainingError), so every saved step is a good one. A restore
reads each item back and compares it with the stored digest; a step that cannot be read or does not match (a
truncated or bit-flipped file, a deleted manifest, a corrupt JSON item) is *damaged*: the error names it and the
newest intact step, and `restore_latest(..., resume_from="intact")` falls back to that step, but only when asked.

One manager keeps both the last `max_to_keep` checkpoints and the best one by validation SSIM (saved with
`metrics={"val_ssim": ...}`), through orbax's `AnyPreservationPolicy(LatestN, BestN)`. Saves are asynchronous
and atomic: a process killed while saving leaves only complete checkpoints behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
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
_JSON_ITEMS = ("config", "data_state", "preprocessor")
DIGEST_ITEM = "digest"
DAMAGED_SUBDIR = "checkpoints.damaged"
RESUME_FROM = ("latest", "intact")


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

# ----------------------------------------------------------------------------------------------------------------
# Finiteness and digests.


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path)


def check_finite(tree, what: str = "the train state") -> None:
  """TrainingError unless every floating-point array of `tree` is finite (no NaN, no Inf).

  Args:
    tree: a pytree of arrays (a TrainState, or {"params", "batch_stats"}).
    what: how the message names `tree`.

  Raises:
    TrainingError: naming up to five arrays that hold NaN or Inf.
  """
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, "dtype") or not _is_float(leaf.dtype):
      continue
    value = np.asarray(jax.device_get(leaf))
    if not np.isfinite(value).all():
      bad.append(f"{_leaf_name(path)} (max |x| = {np.nanmax(np.abs(value)) if not np.isnan(value).all() else 'nan'})")
  if bad:
    raise errors.TrainingError(
      f"{what} holds NaN/Inf in {len(bad)} array(s): {', '.join(bad[:5])}; it is not usable (lower the learning "
      "rate or check the input data for NaN/Inf)"
    )


def _is_float(dtype) -> bool:
  """Whether `dtype` is a floating-point dtype (float16/bfloat16/float32/float64)."""
  return np.issubdtype(np.dtype(dtype), np.floating) or str(dtype) == "bfloat16"


def _array_digest(tree) -> dict[str, Any]:
  """SHA-256 over the leaves of `tree` (dtype, shape and bytes of each), independent of the container types.

  Orbax restores namedtuples as dicts when no target is given, so the digest does not depend on the tree's
  structure: it hashes the sorted per-leaf digests.
  """
  leaf_digests = []
  for leaf in jax.tree_util.tree_leaves(tree):
    value = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    h.update(value.tobytes())
    leaf_digests.append(h.hexdigest())
  total = hashlib.sha256("".join(sorted(leaf_digests)).encode()).hexdigest()
  return {"sha256": total, "arrays": len(leaf_digests)}


def _json_digest(obj) -> dict[str, Any]:
  canonical = json.dumps(json.loads(json.dumps(obj)), sort_keys=True)
  return {"sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def _verify(where: str, step: int, restored: Mapping[str, Any], digest: Mapping[str, Any] | None) -> None:
  """CheckpointError unless each restored item matches its stored digest."""
  if digest is None:
    logging.log_first_n(logging.WARNING, "%s: checkpoint step %d has no digest; it is not verified", 4, where, step)
    return
  items = digest.get("items", {})
  for name, value in restored.items():
    if name == DIGEST_ITEM or name not in items:
      continue
    got = _array_digest(value) if name in ("generator", "train") else _json_digest(value)
    if got["sha256"] != items[name].get("sha256"):
      raise _Damaged(f"item '{name}' does not match the digest stored with it (the files were changed on disk)")


class _Damaged(Exception):
  """A step that cannot be read back as it was written (internal; becomes a CheckpointError)."""



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

  Raises:
    TrainingError: when a parameter, batch statistic or optimiser state holds NaN/Inf (nothing is written).
  """
  step = int(jax.device_get(state.step))
  generator_item = {"params": state.g_params, "batch_stats": state.g_batch_stats}
  train_item = {name: getattr(state, name) for name in _TRAIN_FIELDS}
  # One host copy serves the finiteness check and the digest (orbax makes its own for the write).
  host = jax.device_get({"generator": generator_item, "train": train_item})
  check_finite(host, f"the train state at step {step}")
  json_items = {
    "config": _config_dict(config),
    "data_state": dict(data_state or {}),
    "preprocessor": {"preprocessor": None if preprocessor is None else dict(preprocessor)},
  }
  digest = {"format": 1, "items": {name: _array_digest(value) for name, value in host.items()}}
  digest["items"].update({name: _json_digest(value) for name, value in json_items.items()})
  args = ocp.args.Composite(
    generator=ocp.args.StandardSave(generator_item),
    train=ocp.args.StandardSave(train_item),
    **{name: ocp.args.JsonSave(value) for name, value in json_items.items()},
    **{DIGEST_ITEM: ocp.args.JsonSave(digest)},
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


def _read_step(directory: str, step: int, items: tuple[str, ...], targets: Mapping[str, Any] | None = None):
  """Items of one step read back and checked against their digest; _Damaged when that fails.

  A fresh checkpointer reads the step folder, so that a failed read (orbax can leave its event loop closed) does
  not affect the caller's manager.
  """
  targets = targets or {}
  step_dir = os.path.join(directory, str(step))
  missing = [name for name in items if not os.path.isdir(os.path.join(step_dir, name))]
  if missing:
    raise _Damaged(f"item(s) {missing} are missing")
  args = {}
  for name in items:
    if name in ("generator", "train"):
      args[name] = ocp.args.StandardRestore(targets.get(name))
    else:
      args[name] = ocp.args.JsonRestore()
  has_digest = os.path.isdir(os.path.join(step_dir, DIGEST_ITEM))
  if has_digest:
    args[DIGEST_ITEM] = ocp.args.JsonRestore()
  reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = reader.restore(step_dir, args=ocp.args.Composite(**args))
  except Exception as e:  # tensorstore, orbax and json raise many kinds (ValueError, RuntimeError, OSError, ...)
    _quiet_closed_loop_callbacks()
    raise _Damaged(_reason(e)) from e
  finally:
    try:
      reader.close()
    except Exception:  # noqa: BLE001 - closing after a failed read must not hide the read's error
      pass
  restored = {name: restored[name] for name in args}
  digest = restored.pop(DIGEST_ITEM, None)
  if has_digest and not (isinstance(digest, Mapping) and isinstance(digest.get("items"), Mapping)):
    raise _Damaged("its digest item is malformed")
  try:
    _verify(directory, step, restored, digest)
  except _Damaged:
    raise
  except Exception as e:  # noqa: BLE001 - a restored item of an unexpected form is damage too
    raise _Damaged(_reason(e)) from e
  return restored


def _quiet_closed_loop_callbacks() -> None:
  """Drops the "Event loop is closed" tracebacks that tensorstore callbacks print after a failed orbax read.

  They come from background threads (as unraisable exceptions) once orbax has closed its event loop, say nothing
  the CheckpointError does not, and would bury its one line. Only that exact error is dropped.
  """
  hook = sys.unraisablehook
  if getattr(hook, "_msisynth_quiet", False):
    return

  def quiet(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    hook(unraisable)

  quiet._msisynth_quiet = True
  sys.unraisablehook = quiet


def _reason(e: BaseException) -> str:
  """One line saying why a read failed, without tensorstore's long spec."""
  text = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
  return f"{type(e).__name__}: {text[:300] or 'unreadable'}"


_ALL_ITEMS = ("generator", "train", *_JSON_ITEMS)
_INFERENCE_ITEMS = ("generator", "config", "preprocessor")


def newest_intact_step(manager_or_workdir, below: int | None = None, items: tuple[str, ...] = _ALL_ITEMS) -> int | None:
  """The newest step (below `below`, when given) whose items read back and match their digest; None if none.

  Args:
    manager_or_workdir: a manager or a run folder.
    below: consider only steps before this one.
    items: the items that must be intact (default: all of them, as resuming needs).

  Returns:
    The step, or None when no step is intact.
  """
  with _Manager(manager_or_workdir, read_only=True) as manager:
    directory, steps = os.fspath(manager.directory), sorted(manager.all_steps(), reverse=True)
  for step in steps:
    if below is not None and step >= below:
      continue
    try:
      _read_step(directory, step, items)
    except _Damaged as e:
      logging.warning("%s: checkpoint step %d is damaged (%s)", directory, step, e)
      continue
    return int(step)
  return None


def _damaged_error(directory: str, step: int, reason, items, advice: str) -> errors.CheckpointError:
  intact = newest_intact_step(directory, below=step, items=items)
  if intact is None:
    way = "no earlier step is intact (start again in a new workdir)"
  else:
    way = f"step {intact} is intact: {advice.format(step=intact)}"
  return errors.CheckpointError(f"{directory}: checkpoint step {step} is damaged ({reason}); {way}")


def _move_aside(directory: str, steps: list[int]) -> None:
  """Moves damaged steps out of the checkpoint folder (kept, not deleted) so that training can save them again."""
  aside = os.path.join(os.path.dirname(directory), DAMAGED_SUBDIR)
  os.makedirs(aside, exist_ok=True)
  for step in steps:
    target = os.path.join(aside, str(step))
    n = 1
    while os.path.exists(target):
      target, n = os.path.join(aside, f"{step}.{n}"), n + 1
    shutil.move(os.path.join(directory, str(step)), target)
    logging.warning("moved damaged checkpoint step %d to %s", step, target)


def restore_latest(manager_or_workdir, target_state=None, step: int | None = None, resume_from: str = "latest"):
  """Restores the latest (or a given) checkpoint, verified against the digest stored with it.

  Args:
    manager_or_workdir: a manager or a run folder.
    target_state: a TrainState of the same configuration (e.g. from `create_train_state`); the restored arrays
      take its structure, dtypes and shardings. Without it the raw pytrees are returned.
    step: restore this step instead of the latest.
    resume_from: "latest": a damaged latest step raises CheckpointError naming it and the newest intact step.
      "intact": restore the newest intact step instead; damaged newer steps are moved to
      `workdir/checkpoints.damaged/` (kept, not deleted) so that training can save those steps again.

  Returns:
    (state, extras): state is a TrainState when `target_state` is given, else
    {"generator": {"params", "batch_stats"}, "train": {...}}; extras is {"step", "config" (ConfigDict),
    "data_state", "preprocessor" (dict or None)}.

  Raises:
    CheckpointError: when there is no checkpoint, the step is damaged (and `resume_from` is "latest"), or no step
      is intact.
    TrainingError: when the checkpoint does not match `target_state` (another configuration).
  """
  if resume_from not in RESUME_FROM:
    raise errors.ConfigError(f"resume_from must be one of {RESUME_FROM}, got {resume_from!r}")
  with _Manager(manager_or_workdir, read_only=True) as manager:
    directory = os.fspath(manager.directory)
    step = _pick_step(manager, step, "latest")
  targets = None
  if target_state is not None:
    targets = {
      "generator": {"params": target_state.g_params, "batch_stats": target_state.g_batch_stats},
      "train": {name: getattr(target_state, name) for name in _TRAIN_FIELDS},
    }
  try:
    restored = _read_step_for(directory, step, targets)
  except _Damaged as e:
    if resume_from == "latest":
      raise _damaged_error(
        directory, step, e, _ALL_ITEMS, "pass resume_from='intact' (experiments/train.py --resume_from=intact) to "
        "resume from it; the damaged steps are then moved aside, not deleted"
      ) from None
    intact = newest_intact_step(directory, below=step)
    if intact is None:
      raise errors.CheckpointError(
        f"{directory}: checkpoint step {step} is damaged ({e}) and no earlier step is intact; nothing was changed "
        "(start again in a new workdir)"
      ) from None
    with _Manager(manager_or_workdir, read_only=True) as manager:
      newer = sorted(s for s in manager.all_steps() if s > intact)
    logging.warning("%s: checkpoint step %d is damaged (%s); resuming from step %d, the newest intact one",
                    directory, step, e, intact)
    if jax.process_index() == 0:  # one process moves them; the others wait until it has
      _move_aside(directory, newer)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("msisynth.checkpoint.move_aside")
    if isinstance(manager_or_workdir, ocp.CheckpointManager):
      manager_or_workdir.reload()
    step = intact
    restored = _read_step_for(directory, step, targets)
  extras = _extras(restored)
  extras["step"] = step
  if target_state is None:
    return {"generator": restored["generator"], "train": restored["train"]}, extras
  g, t = restored["generator"], restored["train"]
  _check_matches(f"{directory}/{step}", {"generator": g, "train": t}, targets)
  state = target_state.replace(g_params=g["params"], g_batch_stats=g["batch_stats"], **t)
  return state, extras


def _read_step_for(directory: str, step: int, targets):
  """`_read_step` of every item; a step that reads raw but not into `targets` is another model (TrainingError)."""
  if targets is None:
    return _read_step(directory, step, _ALL_ITEMS)
  try:
    return _read_step(directory, step, _ALL_ITEMS, targets)
  except _Damaged as e:
    _read_step(directory, step, _ALL_ITEMS)  # raises _Damaged when the step itself is damaged
    raise errors.TrainingError(
      f"{directory}/{step}: the checkpoint does not match the configured model and optimiser ({e}); use a new "
      "workdir or the configuration it was trained with"
    ) from None


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
    CheckpointError: when the folder holds no checkpoint or not the asked step, when the step is damaged (the
      message names the newest intact step), or when its weights hold NaN/Inf.
  """
  with _Manager(workdir, read_only=True) as manager:
    directory = os.fspath(manager.directory)
    step = _pick_step(manager, step, which)
  try:
    restored = _read_step(directory, step, _INFERENCE_ITEMS)
  except _Damaged as e:
    raise _damaged_error(directory, step, e, _INFERENCE_ITEMS, "pass step={step} to use it") from None
  g = restored["generator"]
  variables = {"params": g["params"], "batch_stats": g.get("batch_stats") or {}}
  try:
    check_finite(variables, f"the generator of checkpoint step {step}")
  except errors.TrainingError as e:
    raise errors.CheckpointError(f"{directory}: {e}") from None
  return ml_collections.ConfigDict(restored["config"]), variables, restored["preprocessor"]["preprocessor"]
