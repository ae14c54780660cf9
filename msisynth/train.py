"""pix2pix and U-Net training: the train state, one jitted data-parallel step, and the training loop.

Layout: a batch is `{"msi": (B, P, P, k) float32 in [-1, 1], "histology": (B, P, P, 3) float32 in [-1, 1]}`,
optionally with `"mask": (B, P, P)` bool (tissue). P must be divisible by 2**config.model.depth.

One `train_step` updates the discriminator and then the generator, as pix2pix's `optimize_parameters` does:

1. the generator runs once (train mode, dropout on) and its output `fake` is kept with its VJP;
2. D is scored on (MSI, stop_gradient(fake)) and on (MSI, real) — two calls, so each normalises with its own
   batch statistics as in pix2pix — and updated on 0.5 · (loss_fake + loss_real);
3. the generator loss gan_weight · GAN(D(MSI, fake)) + λ · L1(fake, real) is taken through the *updated*
   discriminator parameters. pix2pix does this (its `backward_G` runs after `optimizer_D.step()`), so the
   generator learns against the discriminator that has just seen this batch; the gradient flows back into the
   generator through the kept VJP, without a second generator forward.

The U-Net baseline (`config.model.kind = "unet"` or `config.model.gan_weight = 0`) is the same code path with
no discriminator: no D parameters, no D compute, L1 only.

Data parallelism: the step is jitted on a 1-D `jax.make_mesh` mesh named "data" with the batch sharded on its
leading axis and the state replicated. jit inserts the gradient all-reduce, and batch-norm statistics are
reductions over the whole global batch, so 8 devices compute what 1 device computes (up to the order of
floating-point sums). The mesh takes the largest number of local devices that divides the global batch.

Mixed precision (`config.precision = "bfloat16"`): the modules compute in bfloat16, parameters, optimiser
states, batch statistics and losses stay float32.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msisynth import checkpoint, distributed, errors, losses, metrics, models, outputs, progress

Batch = Mapping[str, Any]
MODEL_KINDS = ("pix2pix", "unet")

try:
  _tree_norm = optax.tree.norm  # optax >= 0.2.5
except AttributeError:
  _tree_norm = optax.global_norm


@dataclasses.dataclass(frozen=True)
class StepHParams:
  """Loss settings baked into the compiled step (static)."""

  gan_mode: str = "vanilla"
  gan_weight: float = 1.0
  l1_weight: float = 100.0
  mask_l1: bool = False
  recon_loss: str = "l1"
  max_shift_px: int = 2

  @property
  def use_gan(self) -> bool:
    return self.gan_weight != 0


@struct.dataclass
class TrainState:
  """Everything training needs, as one pytree of arrays plus static (compile-time) fields.

  Attributes:
    step: int32 scalar, the number of completed updates.
    rng: (2,) uint32, the raw data of the threefry training key (whatever kind of key created the state, so
      that it is sharding-invariant and checkpoints as a plain array); step keys are `fold_in(rng, step)`.
    g_params, g_batch_stats: generator variables.
    d_params, d_batch_stats: discriminator variables ({} for the U-Net baseline).
    g_opt_state, d_opt_state: optax states (d_opt_state is () without a discriminator).
    generator, discriminator: the Flax modules (discriminator None for the U-Net baseline).
    g_tx, d_tx: the optax transformations.
    lr_schedule: learning rate as a function of the step, for the metrics.
    hparams: loss settings.
  """

  step: jax.Array
  rng: jax.Array
  g_params: Any
  g_batch_stats: Any
  d_params: Any
  d_batch_stats: Any
  g_opt_state: Any
  d_opt_state: Any
  generator: models.UNetGenerator = struct.field(pytree_node=False)
  discriminator: models.PatchDiscriminator | None = struct.field(pytree_node=False)
  g_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  d_tx: optax.GradientTransformation | None = struct.field(pytree_node=False)
  lr_schedule: Callable[[Any], Any] = struct.field(pytree_node=False)
  hparams: StepHParams = struct.field(pytree_node=False)

  def generator_variables(self) -> dict[str, Any]:
    """{"params": ..., "batch_stats": ...} of the generator, as `generator.apply` takes them."""
    return {"params": self.g_params, "batch_stats": self.g_batch_stats}


# ----------------------------------------------------------------------------------------------------------------
# Configuration.


def step_hparams(config) -> StepHParams:
  """Loss settings of `config.model`; the U-Net baseline has gan_weight 0.

  Raises:
    ConfigError: on an unknown model kind or GAN mode, or a negative weight.
  """
  m = config.model
  kind = m.get("kind", "pix2pix")
  if kind not in MODEL_KINDS:
    raise errors.ConfigError(f"model.kind must be one of {MODEL_KINDS}, got {kind!r}")
  if m.gan_mode not in losses.GAN_MODES:
    raise errors.ConfigError(f"model.gan_mode must be one of {losses.GAN_MODES}, got {m.gan_mode!r}")
  gan_weight = 0.0 if kind == "unet" else float(m.gan_weight)
  if gan_weight < 0 or float(m.l1_weight) < 0:
    raise errors.ConfigError(f"loss weights must be >= 0, got gan_weight={gan_weight}, l1_weight={m.l1_weight}")
  return StepHParams(
    gan_mode=m.gan_mode, gan_weight=gan_weight, l1_weight=float(m.l1_weight), mask_l1=bool(m.get("mask_l1", False)),
    recon_loss=str(m.get("recon_loss", "l1")), max_shift_px=int(m.get("max_shift_px", 2)),
  )


@functools.cache
def _optimizer(learning_rate: float, b1: float, b2: float, constant_steps: int, decay_steps: int):
  # Cached so that equal settings give the same (hashable) objects and the compiled step is reused.
  if decay_steps > 0:
    schedule = optax.join_schedules(
      [optax.constant_schedule(learning_rate), optax.linear_schedule(learning_rate, 0.0, decay_steps)],
      boundaries=[constant_steps],
    )
  else:
    schedule = optax.constant_schedule(learning_rate)
  return optax.adam(schedule, b1=b1, b2=b2), schedule


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """pix2pix's Adam: a constant learning rate for `optim.constant_steps` steps, then linear decay to 0.

  Args:
    config: a ConfigDict with `optim.{learning_rate, b1, b2, constant_steps, decay_steps}`.

  Returns:
    (the optax transformation, the learning-rate schedule).

  Raises:
    ConfigError: on a non-positive learning rate or negative step counts.
  """
  o = config.optim
  if o.learning_rate <= 0 or o.constant_steps < 0 or o.decay_steps < 0:
    raise errors.ConfigError(
      f"optim needs learning_rate > 0 and step counts >= 0, got {o.learning_rate}, {o.constant_steps}, {o.decay_steps}"
    )
  return _optimizer(float(o.learning_rate), float(o.b1), float(o.b2), int(o.constant_steps), int(o.decay_steps))


# ----------------------------------------------------------------------------------------------------------------
# Devices.


def num_data_devices(batch_size: int, num_devices: int | None = None) -> int:
  """The largest number of devices, at most `num_devices` (default: all local), that divides `batch_size`."""
  if batch_size < 1:
    raise errors.ConfigError(f"batch size must be >= 1, got {batch_size}")
  n = jax.device_count() if num_devices is None else num_devices
  return max(d for d in range(1, min(n, batch_size) + 1) if batch_size % d == 0)


@functools.cache
def _mesh(n: int) -> jax.sharding.Mesh:
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def data_mesh(batch_size: int, num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D "data" mesh over as many local devices as divide `batch_size` (logged when not all of them).

  Args:
    batch_size: the global batch size.
    num_devices: use at most this many devices (default: every local device).

  Returns:
    The mesh; a batch of `batch_size` splits evenly over it.
  """
  # Every process's devices (msisynth.distributed): one host, or several after jax.distributed.initialize.
  available = jax.device_count() if num_devices is None else min(num_devices, jax.device_count())
  n = num_data_devices(batch_size, available)
  if n < available:
    logging.log_first_n(
      logging.WARNING, "global batch %d does not split over %d devices: using %d of them", 4, batch_size, available, n
    )
  return _mesh(n)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of the train state: a full copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of a batch: split on its leading axis over the "data" axis of `mesh`."""
  return NamedSharding(mesh, P("data"))


# ----------------------------------------------------------------------------------------------------------------
# State.


def _as_key(rng) -> jax.Array:
  if isinstance(rng, int | np.integer):
    return jax.random.key(int(rng))
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng.astype(jnp.uint32))


@functools.lru_cache(maxsize=32)
def _init_fn(generator, discriminator, size: tuple[int, int], channels: int, g_tx, d_tx, mesh):

  def init(key):
    g_key, d_key, state_key = jax.random.split(key, 3)
    g_vars = models.init_variables(generator, g_key, (1, *size, channels))
    g_params = g_vars["params"]
    d_params, d_stats, d_opt = {}, {}, ()
    if discriminator is not None:
      d_vars = models.init_variables(discriminator, d_key, (1, *size, channels + 3))
      d_params, d_stats = d_vars["params"], d_vars.get("batch_stats", {})
      d_opt = d_tx.init(d_params)
    return dict(
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.bits(state_key, (2,), jnp.uint32),
      g_params=g_params,
      g_batch_stats=g_vars.get("batch_stats", {}),
      d_params=d_params,
      d_batch_stats=d_stats,
      g_opt_state=g_tx.init(g_params),
      d_opt_state=d_opt,
    )

  return jax.jit(init, out_shardings=replicated(mesh))


def create_train_state(rng, config, input_shape, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """A fresh train state, replicated over the mesh.

  Args:
    rng: a JAX key (typed or raw uint32) or an int seed.
    config: the training ConfigDict (`model`, `optim`, `precision`, `train.batch_size`).
    input_shape: shape of the MSI input, (P, P, k) or (B, P, P, k); only P and k matter.
    mesh: the data mesh (default: `data_mesh(config.train.batch_size)`).

  Returns:
    A TrainState at step 0.

  Raises:
    ConfigError: when P is not divisible by 2**config.model.depth or a setting is invalid.
  """
  input_shape = tuple(int(s) for s in input_shape)
  if len(input_shape) not in (3, 4):
    raise errors.ConfigError(f"input_shape must be (P, P, k) or (B, P, P, k), got {input_shape}")
  size, channels = input_shape[-3:-1], input_shape[-1]
  models.check_divisible(size, int(config.model.depth))
  hp = step_hparams(config)
  generator = models.generator_from_config(config)
  discriminator = models.discriminator_from_config(config) if hp.use_gan else None
  tx, schedule = make_optimizer(config)
  d_tx = tx if hp.use_gan else None
  if mesh is None:
    mesh = data_mesh(int(config.train.batch_size))
  fields = _init_fn(generator, discriminator, size, channels, tx, d_tx, mesh)(_as_key(rng))
  return TrainState(
    **fields, generator=generator, discriminator=discriminator, g_tx=tx, d_tx=d_tx, lr_schedule=schedule, hparams=hp
  )


# ----------------------------------------------------------------------------------------------------------------
# Steps.


def _check_batch(batch: Batch) -> None:
  if "msi" not in batch or "histology" not in batch:
    raise errors.ConfigError(f"a batch needs 'msi' and 'histology', got keys {sorted(batch)}")
  msi, he = batch["msi"], batch["histology"]
  if msi.ndim != 4 or he.ndim != 4 or msi.shape[:3] != he.shape[:3] or he.shape[-1] != 3:
    raise errors.ConfigError(
      f"batch 'msi' must be (B, P, P, k) and 'histology' (B, P, P, 3) on the same grid, got {msi.shape} and {he.shape}"
    )


def _concat(msi: jax.Array, image: jax.Array) -> jax.Array:
  return jnp.concatenate([msi.astype(jnp.float32), image.astype(jnp.float32)], axis=-1)


def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  hp = state.hparams
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  msi = batch["msi"].astype(jnp.float32)
  real = batch["histology"].astype(jnp.float32)
  mask = batch.get("mask") if hp.mask_l1 else None

  def generate(g_params):
    fake, updates = state.generator.apply(
      {"params": g_params, "batch_stats": state.g_batch_stats},
      msi,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    return fake.astype(jnp.float32), updates.get("batch_stats", {})

  fake, generator_vjp, g_batch_stats = jax.vjp(generate, state.g_params, has_aux=True)
  out = {}

  d_params, d_batch_stats, d_opt_state = state.d_params, state.d_batch_stats, state.d_opt_state
  if hp.use_gan:
    discriminator = state.discriminator

    def score(params, stats, image):
      logits, updates = discriminator.apply(
        {"params": params, "batch_stats": stats}, _concat(msi, image), train=True, mutable=["batch_stats"]
      )
      return logits.astype(jnp.float32), updates.get("batch_stats", {})

    def d_loss_fn(params):
      fake_logits, stats = score(params, d_batch_stats, jax.lax.stop_gradient(fake))
      real_logits, stats = score(params, stats, real)
      loss = losses.discriminator_loss(real_logits, fake_logits, hp.gan_mode)
      return loss, (stats, real_logits, fake_logits)

    (d_loss, (d_batch_stats, real_logits, fake_logits)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
    d_updates, d_opt_state = state.d_tx.update(d_grads, d_opt_state, d_params)
    d_params = optax.apply_updates(d_params, d_updates)
    to_score = jax.nn.sigmoid if hp.gan_mode == "vanilla" else (lambda x: x)
    out.update(
      d_loss=d_loss,
      d_real=jnp.mean(to_score(real_logits)),
      d_fake=jnp.mean(to_score(fake_logits)),
      d_grad_norm=_tree_norm(d_grads),
    )

  def g_loss_fn(fake_image):
    fake_logits, stats = None, d_batch_stats
    if hp.use_gan:
      fake_logits, stats = score(d_params, d_batch_stats, fake_image)
    total, parts = losses.pix2pix_generator_loss(
      fake_logits, fake_image, real, gan_weight=hp.gan_weight, l1_weight=hp.l1_weight, mode=hp.gan_mode, mask=mask,
      recon_loss=hp.recon_loss, max_shift=hp.max_shift_px,
    )
    return total, (parts, stats)

  (g_loss, (parts, d_batch_stats)), fake_grad = jax.value_and_grad(g_loss_fn, has_aux=True)(fake)
  (g_grads,) = generator_vjp(fake_grad)
  g_updates, g_opt_state = state.g_tx.update(g_grads, state.g_opt_state, state.g_params)
  g_params = optax.apply_updates(state.g_params, g_updates)

  out.update(
    g_loss=g_loss,
    g_l1=parts["g_l1"],
    g_grad_norm=_tree_norm(g_grads),
    g_param_norm=_tree_norm(g_params),
    learning_rate=jnp.asarray(state.lr_schedule(state.step)),
  )
  if hp.use_gan:
    out.update(g_gan=parts["g_gan"], d_param_norm=_tree_norm(d_params))
  new_state = state.replace(
    step=state.step + 1,
    g_params=g_params,
    g_batch_stats=g_batch_stats,
    g_opt_state=g_opt_state,
    d_params=d_params,
    d_batch_stats=d_batch_stats,
    d_opt_state=d_opt_state,
  )
  return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


@functools.cache
def compiled_train_step(mesh: jax.sharding.Mesh) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`train_step` jitted for `mesh`: state replicated and donated, batch sharded on "data"."""
  return jax.jit(
    _train_step,
    in_shardings=(replicated(mesh), batch_sharding(mesh)),
    out_shardings=(replicated(mesh), replicated(mesh)),
    donate_argnums=(0,),
  )


def train_step(
  state: TrainState, batch: Batch, mesh: jax.sharding.Mesh | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One pix2pix update (D then G), or one L1 update of the U-Net baseline.

  The state's buffers are donated: use the returned state, not the argument, afterwards.

  Args:
    state: the train state, replicated over `mesh` (as `create_train_state` makes it).
    batch: {"msi", "histology"[, "mask"]} (see the module docstring).
    mesh: the data mesh (default: `data_mesh(batch size)`).

  Returns:
    (new state, metrics) with float32 scalars: g_loss (total), g_l1, g_grad_norm, g_param_norm, learning_rate,
    and with a discriminator d_loss, d_real, d_fake (mean D probability on real / synthetic), d_grad_norm,
    d_param_norm and g_gan (unweighted adversarial term).
  """
  _check_batch(batch)
  if mesh is None:
    mesh = data_mesh(int(batch["msi"].shape[0]))
  # Placing the batch here (a no-op when it is already placed) gives one compiled step for host and device input.
  return compiled_train_step(mesh)(state, jax.device_put(dict(batch), batch_sharding(mesh)))


@jax.jit
def _generate(state: TrainState, msi: jax.Array) -> jax.Array:
  return state.generator.apply(state.generator_variables(), msi, train=False).astype(jnp.float32)


def eval_step(state: TrainState, batch: Batch | jax.Array) -> jax.Array:
  """Synthetic H&E for a batch, with the generator in inference mode.

  Inference mode means batch-norm running averages and no dropout. pix2pix itself keeps dropout and the test
  batch's statistics at test time; here synthesis is deterministic and does not depend on how a whole slide is
  cut into tiles, which registration needs.

  Args:
    state: a train state.
    batch: a batch dict with "msi", or the (B, P, P, k) MSI array itself.

  Returns:
    (B, P, P, 3) float32 in [-1, 1].
  """
  msi = batch["msi"] if isinstance(batch, Mapping) else batch
  return _generate(state, jnp.asarray(msi, jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# Logging.



def quiet_orbax_logs() -> None:
  """Keeps orbax's warnings and errors in the absl log but drops its INFO lines (one per save and restore)."""

  def keep(record) -> bool:
    return record.levelno >= logging.converter.STANDARD_WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname

  logging.get_absl_handler().addFilter(keep)

class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` (always) and to TensorBoard (when tensorboardX is installed)."""

  def __init__(self, workdir: str | os.PathLike, resume_step: int = 0):
    self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    # In a job of several processes only the first writes (every process computes the same replicated metrics).
    self._primary = jax.process_index() == 0
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    if self._primary and os.path.exists(self.path):
      # Lines written after the checkpoint we resume from belong to a run that was cut off: drop them.
      kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
      outputs.atomic_write(self.path, "".join(kept))
    self._tb = None
    try:
      if not self._primary:
        raise ImportError
      import tensorboardX  # optional extra: pip install msisynth[tensorboard]

      self._tb = tensorboardX.SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"))
    except ImportError:
      pass

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._primary:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file; lines that are not JSON records are dropped with a warning.

  A run killed mid-write, or a full disk, leaves a torn last line; it must not block resuming.

  Args:
    path: the metrics.jsonl file.

  Returns:
    The records (dicts), in file order.
  """
  records, torn = [], []
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict):
        records.append(record)
      else:
        torn.append(number)
  if torn:
    logging.warning("%s: dropped %d line(s) that are not JSON records (a write cut off?): line(s) %s",
                    path, len(torn), torn[:10])
  return records


# ----------------------------------------------------------------------------------------------------------------
# The training loop.


def _format_eta(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _process_batch_fn(data, get_batch: Callable[[int], Batch], rows: slice, batch_size: int):
  """This process's rows of the batch at each step: all of it on one process, still a function of (seed, step)."""
  if rows == slice(0, batch_size):
    return get_batch
  batch = getattr(data, "batch", None)
  if batch is not None and "rows" in inspect.signature(batch).parameters:
    return lambda step: batch(step, rows=rows)  # reads only these patches
  return lambda step: {k: np.asarray(v)[rows] for k, v in get_batch(step).items()}


def _batch_fn(data) -> Callable[[int], Batch]:
  if hasattr(data, "batch"):
    return data.batch
  if callable(data):
    return data
  raise errors.ConfigError(f"train_data must have a .batch(step) method or be a function of the step, got {data!r}")


def _validation_batch(val_data) -> Batch | None:
  if val_data is None:
    return None
  if isinstance(val_data, Mapping):
    return val_data
  fn = getattr(val_data, "validation_set", None)
  if callable(fn):
    return fn()
  raise errors.ConfigError(f"val_data must be a batch dict or have validation_set(), got {val_data!r}")


def evaluate(
  state: TrainState, val_batch: Batch, batch_size: int = 16, mi_bins: int = 32, mesh: jax.sharding.Mesh | None = None
) -> tuple[dict[str, float], np.ndarray]:
  """Validation SSIM, MI (bits) and L1 of synthetic against real images.

  SSIM and MI compare the images mapped to [0, 1] (`msisynth.metrics`; MI on luminance, 32 bins over [0, 1]);
  `val_l1` is the mean absolute error in network units ([-1, 1]), the training L1.

  Args:
    state: the train state.
    val_batch: {"msi", "histology"[, "mask"]} holding the whole validation set.
    batch_size: images per generator call (rounded up to a multiple of the mesh size); the last call is padded,
      so one compiled generator serves every call.
    mi_bins: histogram bins of the MI.
    mesh: the data mesh the calls are split over (default: the state's devices, one when None given).

  Returns:
    ({"val_ssim", "val_mi", "val_l1"} means over the images, synthetic images (N, P, P, 3) in [-1, 1]).
  """
  msi = np.asarray(val_batch["msi"], np.float32)
  n = len(msi)
  if mesh is not None:
    batch_size = -(-batch_size // mesh.size) * mesh.size
  fakes = []
  for i in range(0, n, batch_size):
    chunk = msi[i : i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    if mesh is not None:
      chunk = distributed.replicated_batch({"msi": chunk}, batch_sharding(mesh))["msi"]
    fakes.append(distributed.to_host(eval_step(state, chunk))[: batch_size - pad])
  fake = np.concatenate(fakes)
  real = np.asarray(val_batch["histology"], np.float32)
  real01, fake01 = (real + 1) / 2, (fake + 1) / 2
  scores = {
    "val_ssim": float(np.nanmean(np.asarray(metrics.ssim(fake01, real01)))),
    "val_mi": float(
      np.nanmean(np.asarray(metrics.mutual_information(fake01, real01, bins=mi_bins, value_range=(0.0, 1.0))))
    ),
    "val_l1": float(np.mean(np.abs(fake - real))),
  }
  return scores, fake


def _last_good(workdir: str, last_saved: int | None) -> str:
  return f"step {last_saved} in {workdir}" if last_saved else f"none in {workdir}"


def _check_finite(pending: list[tuple[int, dict]], workdir: str, last_saved: int | None) -> list[dict]:
  """Host copies of the pending step metrics; TrainingError at the first non-finite loss or parameter norm.

  The losses are computed before a step's update and the parameter norms after it, so an update that makes the
  parameters NaN/Inf is caught at that step, before it can be saved.
  """
  host = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, host):
    bad = {
      k: float(v)
      for k, v in m.items()
      if (k.endswith("loss") or k.endswith("param_norm")) and not math.isfinite(float(v))
    }
    if bad:
      raise errors.TrainingError(
        f"non-finite values at step {step} (the update on data batch {step - 1}): {bad}. Training stopped; "
        f"the last good checkpoint is {_last_good(workdir, last_saved)}. Check the input data for NaN/Inf or "
        "lower the learning rate."
      )
  return host


def check_train_config(config) -> None:
  """ConfigError unless the step counts of `config.train` are usable.

  Args:
    config: the training ConfigDict.

  Raises:
    ConfigError: naming the first field that is not a positive integer (image_every may be 0: no images).
  """
  tc = config.train
  for name in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "max_to_keep"):
    value = tc.get(name)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
      raise errors.ConfigError(f"config.train.{name} must be a positive integer, got {value!r}")
  image_every = tc.get("image_every", 0)
  if isinstance(image_every, bool) or not isinstance(image_every, int | np.integer) or image_every < 0:
    raise errors.ConfigError(f"config.train.image_every must be an integer >= 0 (0: no images), got {image_every!r}")


WORKDIR_OWNER = "msisynth.train"


def prepare_workdir(workdir: str | os.PathLike) -> str:
  """Checks that `workdir` is a run folder msisynth created (resumed) or new/empty (created and marked).

  Args:
    workdir: the run folder.

  Returns:
    The folder, as a string.

  Raises:
    OutputExistsError: when the folder holds files and was not created by msisynth (nothing is changed), is a
      file, or cannot be created.
  """
  workdir = os.fspath(workdir)
  if outputs.is_own_dir(workdir):
    return workdir
  if jax.process_index() > 0:
    # In a job of several processes the first one checks and marks the folder; the others would race it.
    os.makedirs(workdir, exist_ok=True)
    return workdir
  try:
    outputs.prepare_output_dir(workdir, owner=WORKDIR_OWNER)
  except errors.OutputExistsError as e:
    if os.path.isdir(workdir) and any(os.scandir(workdir)):
      raise errors.OutputExistsError(
        "is not empty and was not created by msisynth training, so it is neither resumed nor overwritten "
        f"(nothing was changed); choose a new or empty workdir. A run folder of an older msisynth can be "
        f"adopted by creating the marker file {outputs.MARKER!r} in it",
        workdir,
      ) from e
    raise
  return workdir


def _subsample(data: Mapping[str, np.ndarray], max_items: int) -> dict[str, np.ndarray]:
  n = len(data["msi"])
  if max_items <= 0 or n <= max_items:
    return dict(data)
  keep = np.linspace(0, n - 1, max_items).round().astype(int)
  return {k: np.asarray(v)[keep] for k, v in data.items()}


def data_from_config(config) -> tuple[Any, dict[str, np.ndarray] | None, Any]:
  """The training data set, validation set and fitted preprocessor that `config.data` describes.

  Args:
    config: the training ConfigDict; `data.source` is "msiflow" (the real msiFlow UPEC_12 pair) or "simulated"
      (real H&E slides with simulated MSI, `msisynth.data.semi_synthetic_pairs`).

  Returns:
    (train_data: a `msisynth.data.PatchDataset`, validation set: {"msi", "histology", "mask", ...} of at most
    `data.max_val_patches` tiles or None, the fitted `MSIPreprocessor`).

  Raises:
    ConfigError: on an unknown source or bad data settings.
    DataError: when the data cannot be read.
  """
  from msisynth import data as data_lib

  d = config.data
  seed = int(config.seed)
  if d.source == "msiflow":
    paired = data_lib.msiflow_pairs(
      d.get("data_dir"),
      val_fraction=float(d.val_fraction),
      split_axis=d.split_axis,
      gap_px=int(d.gap_px),
      seed=seed,
      upsample=int(d.upsample),
      # The validation band must hold whole patches: at least patch_size / upsample MSI pixels across.
      min_val_band_px=-(-int(d.patch_size) // int(d.upsample)),
    )
  elif d.source == "simulated":
    from msisynth import datasets

    shipped = {p.stem: p for p in datasets.list_he_slides(d.get("data_dir"))}

    def resolve(names):
      # A slide is a path, or the name of a shipped slide ("rcc-UH0505_12").
      return [os.fspath(shipped.get(str(n), n)) for n in names]

    val_slides = resolve(d.get("val_he_slides") or ())
    slides = resolve(d.get("he_slides") or [p for p in map(os.fspath, shipped.values()) if p not in val_slides])
    paired = data_lib.semi_synthetic_pairs(
      list(slides),
      seed=seed,
      histology_pixel_size_um=float(d.histology_pixel_size_um),
      msi_pixel_size_um=float(d.msi_pixel_size_um),
      n_channels=int(d.n_channels),
      n_components=int(d.n_components),
      upsample=int(d.upsample),
      val_he_paths=val_slides,
      val_fraction=float(d.val_fraction),
      split_axis=d.split_axis,
      gap_px=int(d.gap_px),
    )
  else:
    raise errors.ConfigError(f"data.source must be 'msiflow' or 'simulated', got {d.source!r}")
  kwargs = dict(
    patch_size=int(d.patch_size),
    batch_size=int(config.train.batch_size),
    min_tissue_fraction=float(d.min_tissue_fraction),
  )
  train_data = paired.train_dataset(seed=seed, augment=bool(d.augment), **kwargs)
  val_dataset = paired.val_dataset(**kwargs)
  val_set = None
  if val_dataset is not None:
    val_set = val_dataset.validation_set()
    val_set = _subsample(val_set, int(d.max_val_patches)) if len(val_set["msi"]) else None
  return train_data, val_set, paired.preprocessor


def _preprocessor_dict(preprocessor) -> dict | None:
  if preprocessor is None or isinstance(preprocessor, dict):
    return preprocessor
  if hasattr(preprocessor, "to_dict"):
    return preprocessor.to_dict()
  raise errors.ConfigError(f"preprocessor must be a dict or have to_dict(), got {type(preprocessor).__name__}")


def train_and_evaluate(
  config, workdir: str | os.PathLike, train_data, val_data=None, preprocessor=None, *, resume_from: str = "latest"
) -> TrainState:
  """Trains pix2pix (or the U-Net baseline) and evaluates it, resuming from `workdir` when it holds a checkpoint.

  Writes `workdir/metrics.jsonl` (and TensorBoard when installed), image grids to `workdir/images/` and
  checkpoints to `workdir/checkpoints/` (the last `train.max_to_keep` and the best by validation SSIM). A run
  cut off at any point and started again with the same arguments ends with the same parameters as an
  uninterrupted run, because batches and keys are functions of (seed, step).

  Args:
    config: the training ConfigDict (see experiments/configs/common.py).
    workdir: output folder.
    train_data: an object with `.batch(step) -> {"msi", "histology"[, "mask"]}` deterministic in the step
      (`msisynth.data.PatchDataset`), or a function of the step.
    val_data: None, a batch dict holding the validation set, or an object with `validation_set()` (a
      `msisynth.data.PatchDataset`).
    preprocessor: the fitted `MSIPreprocessor` (or its `to_dict()`), saved beside the weights.
    resume_from: "latest" resumes from the latest checkpoint and stops with CheckpointError when it is damaged
      (the message names the newest intact step); "intact" resumes from the newest intact checkpoint (damaged
      newer ones are moved to `workdir/checkpoints.damaged/`). A workdir with no checkpoint starts from step 0.

  Returns:
    The final train state.

  Raises:
    TrainingError: when a loss, parameter or optimiser state becomes NaN/Inf (the message names the step and the
      last good checkpoint) or a checkpoint does not match.
    CheckpointError: when the latest checkpoint is damaged (and `resume_from` is "latest") or none is intact.
    ConfigError: on an invalid configuration or batch.
    OutputExistsError: when `workdir` holds files and was not created by msisynth.
  """
  check_train_config(config)
  if resume_from not in checkpoint.RESUME_FROM:
    raise errors.ConfigError(f"resume_from must be one of {checkpoint.RESUME_FROM}, got {resume_from!r}")
  workdir = prepare_workdir(workdir)
  tc = config.train
  num_steps, batch_size = int(tc.num_steps), int(tc.batch_size)
  get_batch = _batch_fn(train_data)
  val_batch = _validation_batch(val_data)
  preprocessor = _preprocessor_dict(preprocessor)
  data_config = config.get("data") or {}
  # Figures of simulated data say so (docs/architecture.md).
  simulated = data_config.get("source", "") == "simulated" or any(
    getattr(pair, "metadata", {}).get("simulated", False) for pair in getattr(train_data, "pairs", ())
  )

  mesh = data_mesh(batch_size)
  manager = checkpoint.make_manager(workdir, max_to_keep=int(tc.max_to_keep))
  writer = None
  try:
    start = checkpoint.latest_step(manager) or 0
    first = get_batch(start)
    _check_batch(first)
    if first["msi"].shape[0] != batch_size:
      raise errors.ConfigError(
        f"train_data gives batches of {first['msi'].shape[0]}, config.train.batch_size is {batch_size}"
      )
    state = create_train_state(jax.random.key(int(config.seed)), config, first["msi"].shape, mesh)
    if start:
      state, _ = checkpoint.restore_latest(manager, target_state=state, resume_from=resume_from)
      logging.info("resumed from step %d in %s", int(state.step), workdir)
      if int(state.step) != start:  # an older, intact step
        first = get_batch(int(state.step))
    start = int(state.step)
    logging.info(
      "training %s: %d steps of batch %d on %d device(s), generator %d parameters",
      config.model.kind,
      num_steps,
      batch_size,
      mesh.size,
      models.count_params(state.g_params),
    )
    writer = MetricWriter(workdir, resume_step=start)
    step_fn = compiled_train_step(mesh)
    shard = batch_sharding(mesh)
    # Each process produces only the rows of the global batch its devices hold (all of it on one process).
    rows = distributed.process_rows(shard, batch_size)
    local_batch = _process_batch_fn(train_data, get_batch, rows, batch_size)
    log_every = max(int(tc.log_every), 1)
    pending: list[tuple[int, dict]] = []
    last_saved = start or None
    t0, t0_step = time.perf_counter(), start

    def flush():
      nonlocal t0, t0_step, pending
      if not pending:
        return
      host = _check_finite(pending, workdir, last_saved)
      step = pending[-1][0]
      now = time.perf_counter()
      rate = (step - t0_step) / max(now - t0, 1e-9)
      means = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
      means["steps_per_s"] = rate
      means["images_per_s"] = rate * batch_size
      writer.write(step, means)
      eta = _format_eta((num_steps - step) / rate if rate > 0 else None)
      logging.info(
        "step %d/%d (%.0f%%, ETA %s): %s",
        step,
        num_steps,
        100.0 * step / max(num_steps, 1),
        eta,
        ", ".join(f"{k}={v:.4g}" for k, v in means.items()),
      )
      bar.set_postfix_str(f"g_loss={means.get('g_loss', float('nan')):.4g}, ETA {eta}")
      pending, t0, t0_step = [], now, step

    bar_context = progress.bar(desc=f"training {config.model.kind}", total=num_steps - start, unit="step")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, bar_context as bar:
      first_local = {k: v[rows] for k, v in first.items()}
      ahead = {start: pool.submit(lambda: first_local)}
      for step in range(start, num_steps):
        for s in range(step + 1, min(step + 3, num_steps)):
          if s not in ahead:
            ahead[s] = pool.submit(local_batch, s)
        batch = distributed.global_batch(ahead.pop(step).result(), shard, batch_size)
        state, step_metrics = step_fn(state, batch)
        bar.update(1)
        done = step + 1
        pending.append((done, step_metrics))
        is_last = done == num_steps
        save_now = done % int(tc.checkpoint_every) == 0 or is_last
        image_now = val_batch is not None and int(tc.image_every) > 0 and (done % int(tc.image_every) == 0 or is_last)
        # Every checkpoint carries its validation SSIM, which ranks it for "best".
        eval_now = val_batch is not None and (done % int(tc.eval_every) == 0 or save_now or image_now)
        if done % log_every == 0 or save_now or eval_now:
          flush()
        val_scores, fake = None, None
        if eval_now:
          val_scores, fake = evaluate(state, val_batch, batch_size=max(batch_size, 8), mesh=mesh)
          writer.write(done, val_scores)
          logging.info("step %d: %s", done, ", ".join(f"{k}={v:.4g}" for k, v in val_scores.items()))
        if image_now and jax.process_index() == 0:
          from msisynth.viz import training as viz_training

          viz_training.save_image_grid(
            os.path.join(workdir, "images", f"step_{done:06d}.png"),
            val_batch["msi"],
            val_batch["histology"],
            fake,
            title=f"step {done}" + (" (simulated data)" if simulated else ""),
            target_name="microscopy" if data_config.get("source") == "msiflow" else "H&E",
          )
        if save_now:
          try:
            checkpoint.save(
              manager,
              state,
              config=config,
              data_state={"seed": int(config.seed), "step": done},
              preprocessor=preprocessor,
              metrics=val_scores,
            )
          except errors.TrainingError as e:
            raise errors.TrainingError(
              f"{e}. Training stopped at step {done}; the last good checkpoint is {_last_good(workdir, last_saved)}"
            ) from None
          last_saved = done
    flush()
    return state
  finally:
    if writer is not None:
      writer.close()
    manager.wait_until_finished()
    manager.close()
