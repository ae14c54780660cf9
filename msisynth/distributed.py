"""Training across machines: `jax.distributed` set-up and the per-process share of a global batch.

A job of several processes (one per host, or several on one host) runs the same training code. Each process
calls `initialize()` first, before any JAX computation; then `jax.devices()` holds every process's devices, the
training mesh of `msisynth.train` spans all of them, and the state stays replicated and the batch sharded on
"data" exactly as on one host. Each process produces only the rows of the global batch that its own devices hold
(`process_rows`), still a function of (seed, step), and `global_batch` assembles the global array from them.

How a process learns its place, first match wins:
  1. the arguments of `initialize`;
  2. the environment: MSISYNTH_COORDINATOR_ADDRESS (host:port of process 0), MSISYNTH_NUM_PROCESSES and
     MSISYNTH_PROCESS_ID (JAX's own JAX_COORDINATOR_ADDRESS is read by JAX too);
  3. a cluster JAX detects by itself (SLURM with more than one task, Open MPI, Kubernetes, Cloud TPU).
With none of these, or a single process, nothing is initialised and training runs as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

from msisynth import errors, progress

ENV_COORDINATOR = "MSISYNTH_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MSISYNTH_NUM_PROCESSES"
ENV_PROCESS_ID = "MSISYNTH_PROCESS_ID"
_STATE = {"initialized": False}


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise errors.ConfigError(f"environment variable {name} must be an integer, got {value!r}") from e


def _cluster_detected() -> bool:
  """Whether a multi-process cluster launch that JAX detects by itself is under way."""
  tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE")
  try:
    return tasks is not None and int(tasks) > 1
  except ValueError:
    return False


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_device_ids: list[int] | None = None,
) -> bool:
  """Initialises `jax.distributed` when this process is one of several (see the module docstring).

  Call it once, at the start of the program, before any JAX computation. Calling it again is a no-op.

  Args:
    coordinator_address: "host:port" of process 0 (None: the environment).
    num_processes: how many processes (None: the environment).
    process_id: this process's index, 0 <= process_id < num_processes (None: the environment).
    local_device_ids: the local devices this process uses (None: all; JAX_LOCAL_DEVICE_IDS is read too).

  Returns:
    Whether the job has more than one process.

  Raises:
    ConfigError: for a partial or inconsistent description (e.g. a process id without a process count).
  """
  if _STATE["initialized"]:
    return jax.process_count() > 1
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
  explicit = num_processes is not None and num_processes > 1
  if explicit:
    if process_id is None or not 0 <= process_id < num_processes:
      raise errors.ConfigError(
        f"a job of {num_processes} processes needs a process id in [0, {num_processes}) "
        f"(--process_id or {ENV_PROCESS_ID}), got {process_id}"
      )
    if not coordinator_address and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
      raise errors.ConfigError(
        f"a job of {num_processes} processes needs the coordinator's host:port ({ENV_COORDINATOR})"
      )
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
    )
  elif _cluster_detected():
    jax.distributed.initialize(local_device_ids=local_device_ids)
  else:
    return False
  _STATE["initialized"] = True
  if jax.process_index() != 0:
    progress.set_enabled(False)  # one progress bar per job
  logging.info(
    "process %d of %d: %d local of %d devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return jax.process_count() > 1


def process_rows(sharding: jax.sharding.Sharding, global_size: int) -> slice:
  """The rows of a global batch of `global_size` (sharded on its leading axis) that this process's devices hold.

  Raises:
    ConfigError: when they are not one contiguous block (a mesh whose devices are not grouped by process).
  """
  indices = sharding.addressable_devices_indices_map((global_size,))
  starts, stops = set(), set()
  for index in indices.values():
    rows = index[0] if index else slice(None)
    start, stop, _ = rows.indices(global_size)
    starts.add(start)
    stops.add(stop)
  lo, hi = min(starts), max(stops)
  covered = np.zeros(global_size, bool)
  for index in indices.values():
    covered[index[0] if index else slice(None)] = True
  if not covered[lo:hi].all():
    raise errors.ConfigError("this process's devices do not hold one contiguous block of the batch")
  return slice(lo, hi)


def global_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding, global_size: int) -> dict:
  """The global batch as sharded `jax.Array`s, from this process's rows (`process_rows`) of each array.

  With one process this is `jax.device_put(local, sharding)`.
  """
  if jax.process_count() == 1:
    return jax.device_put(dict(local), sharding)
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(sharding, value, (global_size, *value.shape[1:]))
  return out


def replicated_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """A batch every process holds in full (e.g. the validation set), placed on `sharding` across processes."""
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
  return out


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly batch-sharded, multi-process) array as one NumPy array on every process."""
  if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
