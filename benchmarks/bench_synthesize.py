"""Throughput of whole-image tiled synthesis (`msisynth.synthesize.synthesize_tiled`), in megapixels per second.

Runs the default pix2pix generator (UNet-256: depth 8, ngf 64, 54 M parameters at 16 input channels) and a
smaller one (depth 8, ngf 16) over square images of a few sizes, in float32 and bfloat16 compute. The weights
are randomly initialised: the work per pixel does not depend on their values, so the figures hold for a
trained generator of the same shape. The input is random in [-1, 1] with `--channels` channels.

Timings exclude compilation: each tile shape is compiled and run once before the clock starts. The figure
counts output pixels (the image, not the padded tiles), so it includes the cost of the overlap.

Usage, from the repository root with msisynth importable (`pip install -e .` or `PYTHONPATH=.`); the same
script runs on a GPU:
  python benchmarks/bench_synthesize.py --sizes=512,1024,2048
  python benchmarks/bench_synthesize.py --small --sizes=512,1024 --precisions=float32
Results are printed and merged into benchmarks/results/bench_synthesize.json (see --output): each row is keyed
by device, generator, precision, size and tiling, so runs at other settings accumulate and a rerun replaces
its own rows.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from msisynth import models, synthesize

_SIZES = flags.DEFINE_list("sizes", ["512", "1024", "2048"], "Square image sizes (output pixels per side).")
_TILE = flags.DEFINE_integer("tile_size", 256, "Tile size in pixels (a multiple of 2**depth = 256).")
_OVERLAP = flags.DEFINE_integer("overlap", 32, "Tile overlap in pixels.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Tiles per generator call.")
_CHANNELS = flags.DEFINE_integer("channels", 16, "MSI input channels k.")
_SMALL = flags.DEFINE_bool("small", False, "Benchmark only the small generator (quick on a CPU).")
_PRECISIONS = flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Compute dtypes: float32, bfloat16.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per setting; the best is reported.")
_OUTPUT = flags.DEFINE_string(
  "output", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_synthesize.json"), "JSON file."
)

GENERATORS = {
  "full": dict(depth=8, ngf=64, max_mult=8),  # pix2pix UNet-256
  "small": dict(depth=8, ngf=16, max_mult=8),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _apply_fn(name: str, precision: str, channels: int):
  generator = models.UNetGenerator(**GENERATORS[name], dropout_rate=0.5, norm="batch", dtype=DTYPES[precision])
  init = jax.jit(lambda key: generator.init(key, jnp.zeros((1, 256, 256, channels)), train=False))
  # An RBG key compiles the initialisers in seconds on the CPU; the values do not matter here.
  variables = init(jax.random.key(0, impl="rbg"))
  apply = jax.jit(lambda v, x: generator.apply(v, x, train=False))
  return (lambda x: apply(variables, x)), models.count_params(variables["params"])


def _run(name: str, precision: str, sizes: list[int]) -> list[dict]:
  apply_fn, n_params = _apply_fn(name, precision, _CHANNELS.value)
  rows = []
  for size in sizes:
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, (size, size, _CHANNELS.value)).astype(np.float32)
    layout = synthesize.tile_layout((size, size), tile_size=_TILE.value, overlap=_OVERLAP.value, size_multiple=256)
    n_batches = -(-layout.num_tiles // _BATCH.value)
    batch = -(-layout.num_tiles // n_batches)  # the batch shape synthesize_tiled uses
    start = time.perf_counter()
    jax.block_until_ready(apply_fn(jnp.zeros((batch, *layout.tile_shape, _CHANNELS.value), jnp.float32)))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      y = synthesize.synthesize_tiled(
        apply_fn, x, tile_size=_TILE.value, overlap=_OVERLAP.value, batch_size=_BATCH.value, size_multiple=256
      )
      times.append(time.perf_counter() - start)
    assert y.shape == (size, size, 3) and np.all(np.isfinite(y))
    seconds = min(times)
    row = dict(
      device=jax.devices()[0].device_kind,
      backend=jax.default_backend(),
      jax=jax.__version__,
      tile_size=_TILE.value,
      overlap=_OVERLAP.value,
      batch_size=_BATCH.value,
      channels=_CHANNELS.value,
      generator=name,
      precision=precision,
      params=n_params,
      size=size,
      tiles=layout.num_tiles,
      tile_shape=list(layout.tile_shape),
      seconds=round(seconds, 3),
      megapixels_per_s=round(size * size / seconds / 1e6, 4),
      compile_and_first_batch_s=round(compile_s, 2),
    )
    print(
      f"{name:5s} {precision:8s} {size:5d}^2  {layout.num_tiles:4d} tiles  {seconds:8.2f} s  "
      f"{row['megapixels_per_s']:8.4f} MP/s",
      flush=True,
    )
    rows.append(row)
  return rows


def main(argv):
  del argv
  sizes = [int(s) for s in _SIZES.value]
  names = ["small"] if _SMALL.value else ["full", "small"]
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  rows = []
  for name in names:
    for precision in _PRECISIONS.value:
      if precision not in DTYPES:
        raise app.UsageError(f"--precisions takes {sorted(DTYPES)}, got {precision!r}")
      rows.extend(_run(name, precision, sizes))
  key_fields = ("device", "generator", "precision", "size", "tile_size", "overlap", "batch_size", "channels")
  new_keys = {tuple(r[k] for k in key_fields) for r in rows}
  kept = []
  if os.path.exists(_OUTPUT.value):
    with open(_OUTPUT.value) as f:
      kept = [r for r in json.load(f).get("results", []) if tuple(r.get(k) for k in key_fields) not in new_keys]
  result = dict(
    benchmark="tiled synthesis throughput, msisynth.synthesize.synthesize_tiled (random-initialised weights)",
    host=f"{platform.machine()}, {os.cpu_count()} CPU cores",
    results=kept + rows,
  )
  os.makedirs(os.path.dirname(_OUTPUT.value), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
