"""Throughput of the full pix2pix training step (D then G, `msisynth.train.train_step`), in images per second.

The model is the default pix2pix (UNet-256 generator, 54.4 M parameters at 16 input channels, and the 70×70
PatchGAN, 2.78 M), the same as `shared/bench/pix2pix_torch_reference.py`, on random MSI/H&E batches of
`--size`² pixels with `--channels` channels, for each batch size and compute precision. The step is jitted on a
one-axis data mesh over the local devices (as in training); timings exclude compilation (reported separately)
and the first `--warmup` steps.

FLOPs per step: `xla` is XLA's own count (`jit(...).lower(...).compile().cost_analysis()`); `model` is an
analytic count of the convolutions only (2 FLOPs per multiply-add): the generator forward F_G once and backward
(input and weight gradients) twice over, so 3 F_G, and the discriminator forward on fake, real and fake again plus
its backward passes (weights and inputs on the D update, inputs only through the G loss), 8 F_D. Achieved
TFLOP/s use the model count; the fraction of peak compares them with the device's dense peak for the precision
(a table of known GPUs; N/A on CPUs and unknown devices). JAX runs float32 convolutions on NVIDIA tensor cores
as TF32 by default, so float32 rows also give the fraction of the TF32 peak.

Usage, from the repository root (msisynth importable: `pip install -e .` or `PYTHONPATH=.`). On a GPU, in one
command with the PyTorch reference at the same batches, size and channels:
  python benchmarks/bench_train.py && \
    python ../shared/bench/pix2pix_torch_reference.py --steps 40 --configs 1:0:0,16:0:0,16:1:0,64:1:0,64:1:1
On a CPU (minutes):
  python benchmarks/bench_train.py --batches=1,4 --steps=3 --warmup=1
  python benchmarks/bench_train.py --small --batches=1,16 --size=64
Results are printed and merged into benchmarks/results/bench_train.json (see --output): rows are keyed by device,
model, precision, batch and size, so a rerun replaces its own rows and other settings accumulate.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.configs import pix2pix  # noqa: E402
from msisynth import models, train  # noqa: E402

_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"], "Global batch sizes.")
_PRECISIONS = flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Compute dtypes: float32, bfloat16.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per setting.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_SIZE = flags.DEFINE_integer("size", 256, "Patch size in pixels (a multiple of 2**depth).")
_CHANNELS = flags.DEFINE_integer("channels", 16, "MSI input channels k.")
_SMALL = flags.DEFINE_bool("small", False, "A small model (depth 4, ngf 8, 2-layer PatchGAN ndf 8), quick on a CPU.")
_OUTPUT = flags.DEFINE_string(
  "output", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_train.json"), "JSON file."
)

# Dense peak FLOP/s by device (substring of jax's device_kind, most specific first): (bf16, fp32, tf32).
PEAK_FLOPS = (
  ("H100 PCIe", (756e12, 51e12, 378e12)),
  ("H100", (989e12, 67e12, 495e12)),  # SXM
  ("H200", (989e12, 67e12, 495e12)),
  ("GH200", (989e12, 67e12, 495e12)),
  ("B200", (2250e12, 80e12, 1100e12)),
  ("A100", (312e12, 19.5e12, 156e12)),
  ("L40S", (362e12, 91.6e12, 183e12)),
  ("L4", (121e12, 30.3e12, 60e12)),
  ("A10G", (70e12, 31.2e12, 35e12)),
  ("V100", (125e12, 15.7e12, 125e12)),
)


def peak_flops(device_kind: str) -> tuple[float, float, float] | None:
  """(bf16, fp32, tf32) dense peak FLOP/s of a known accelerator, or None (CPUs, unknown devices)."""
  for name, peaks in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peaks
  return None


def _conv_flops(h_out: int, w_out: int, c_in: int, c_out: int, k: int = 4) -> float:
  return 2.0 * k * k * c_in * c_out * h_out * w_out


def unet_forward_flops(size: int, channels: int, depth: int, ngf: int, max_mult: int, out_channels: int = 3) -> float:
  """Convolution FLOPs of one UNetGenerator forward pass on one size×size image."""
  widths = models.unet_widths(depth, ngf, max_mult)
  total = 0.0
  for i in range(depth):
    s = size // 2 ** (i + 1)  # encoder output of level i
    total += _conv_flops(s, s, channels if i == 0 else widths[i - 1], widths[i])
    # The transposed convolution of level i: each of its s² input pixels meets a 4×4 kernel.
    c_in = widths[i] if i == depth - 1 else 2 * widths[i]
    total += _conv_flops(s, s, c_in, out_channels if i == 0 else widths[i - 1])
  return total


def patchgan_forward_flops(size: int, channels: int, n_layers: int, ndf: int) -> float:
  """Convolution FLOPs of one 4×4 PatchDiscriminator forward pass on one size×size image."""
  total, s, c = 0.0, size, channels
  for n in range(n_layers + 2):
    c_out = 1 if n == n_layers + 1 else ndf * min(2**n, 8)
    s = s // 2 if n < n_layers else s - 1
    total += _conv_flops(s, s, c, c_out)
    c = c_out
  return total


def bench_config(small: bool, precision: str, batch: int):
  config = pix2pix.get_config("tiny" if small else None)
  config.precision = precision
  config.train.batch_size = batch
  return config


def run_one(config, batch: int, size: int, channels: int, steps: int, warmup: int) -> dict:
  mesh = train.data_mesh(batch)
  state = train.create_train_state(0, config, (size, size, channels), mesh)
  rng = np.random.default_rng(0)
  data = {
    "msi": rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32),
    "histology": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
  }
  data = jax.device_put(data, train.batch_sharding(mesh))
  step_fn = train.compiled_train_step(mesh)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  for _ in range(warmup):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / steps
  m = config.model
  model_flops = batch * (
    3 * unet_forward_flops(size, channels, m.depth, m.ngf, m.max_mult)
    + 8 * patchgan_forward_flops(size, channels + 3, m.d_layers, m.ndf)
  )
  return dict(
    compile_s=round(compile_s, 2),
    ms_per_step=round(1000 * seconds, 2),
    images_per_s=round(batch / seconds, 3),
    model_flops_per_step=model_flops,
    xla_flops_per_step=xla_flops,
    model_tflops_per_s=round(model_flops / seconds / 1e12, 4),
    devices=mesh.size,
    g_loss=float(metrics["g_loss"]),
    params_G=models.count_params(state.g_params),
    params_D=models.count_params(state.d_params),
  )


def _key(row: dict) -> tuple:
  return (row["device"], row["model"], row["precision"], row["batch"], row["size"], row["in_channels"])


def save_rows(path: str, rows: list[dict]) -> None:
  """Merges `rows` into the JSON list at `path`, replacing rows with the same key."""
  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  new_keys = {_key(r) for r in rows}
  merged = [r for r in old if _key(r) not in new_keys] + rows
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(merged, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv):
  del argv
  device = jax.devices()[0]
  kind = device.device_kind
  peaks = peak_flops(kind) if device.platform == "gpu" else None
  rows = []
  for precision in _PRECISIONS.value:
    for batch in map(int, _BATCHES.value):
      config = bench_config(_SMALL.value, precision, batch)
      row = dict(
        device=kind,
        platform=device.platform,
        num_devices=jax.device_count(),
        jax=jax.__version__,
        host=platform.node(),
        model="small" if _SMALL.value else "pix2pix UNet-256 + 70x70 PatchGAN",
        precision=precision,
        batch=batch,
        size=_SIZE.value,
        in_channels=_CHANNELS.value,
        steps=_STEPS.value,
      )
      try:
        row.update(run_one(config, batch, _SIZE.value, _CHANNELS.value, _STEPS.value, _WARMUP.value))
      except Exception as e:  # noqa: BLE001 - report (e.g. out of memory) and go on with the other settings
        row["error"] = repr(e)[:300]
      if peaks and "model_tflops_per_s" in row:
        peak = peaks[0] if precision == "bfloat16" else peaks[1]
        row["peak_tflops"] = peak / 1e12
        row["fraction_of_peak"] = round(row["model_tflops_per_s"] * 1e12 / peak, 4)
        if precision == "float32":
          row["fraction_of_tf32_peak"] = round(row["model_tflops_per_s"] * 1e12 / peaks[2], 4)
      else:
        row["fraction_of_peak"] = "N/A"
      print(json.dumps(row), flush=True)
      rows.append(row)
      save_rows(_OUTPUT.value, [row])  # after each setting, so a long run that is stopped keeps what it measured

  print(f"{'precision':>9} {'batch':>5} {'images/s':>9} {'ms/step':>9} {'TFLOP/s':>8} {'of peak':>8} {'compile s':>9}")
  for r in rows:
    if "error" in r:
      print(f"{r['precision']:>9} {r['batch']:>5} error: {r['error']}")
      continue
    frac = r["fraction_of_peak"]
    frac = f"{100 * frac:.1f}%" if isinstance(frac, float) else frac
    print(
      f"{r['precision']:>9} {r['batch']:>5} {r['images_per_s']:>9.2f} {r['ms_per_step']:>9.1f} "
      f"{r['model_tflops_per_s']:>8.3f} {frac:>8} {r['compile_s']:>9.1f}"
    )


if __name__ == "__main__":
  app.run(main)
