r"""Benchmark: compilations and times for a folder of differently shaped sections, `register_batch` against single
calls, and JAX's persistent compilation cache.

1. `--part=folder`: 10 generated sections of different shapes (histology 300-460 px a side at 2 µm, MSI-like
   images 4× coarser at 8 µm) registered one after the other with `register_msi_to_histology`; per section the
   wall time and how many new compilations of the level and check functions it caused.
2. `--part=batch`: 8 same-shape pairs (256², uni) by one `register_batch` call and by 8 `register` calls (both
   warm: each is run once first).
3. `--part=cache`: the cold time (first registration in a fresh process, compilation included) with and without
   JAX's persistent compilation cache (`msisynth.register.enable_compilation_cache`), each in a new process.

Command (from the repository root):
  python benchmarks/bench_register_compile.py --part=folder,batch,cache
Writes benchmarks/results/bench_register_compile.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from absl import app, flags

_PART = flags.DEFINE_list("part", ["folder", "batch", "cache"], "Parts to run.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/bench_register_compile.json", "Result file.")
_COLD_CHILD = flags.DEFINE_string("cold_child", None, "Internal: run one cold registration with this cache dir.")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _counts():
  from msisynth.register import optimize as opt

  return opt._run_level._cache_size() + opt._evaluate._cache_size()


def folder():
  from msisynth.register import cases
  from msisynth.register import optimize as opt

  rng = np.random.default_rng(0)
  rows = []
  for _ in range(10):
    h, w = (int(v) for v in rng.integers(300, 461, 2))
    rgb = cases.tissue_image(rng, 0, shape=(h, w))
    tissue = rgb.min(axis=2) < 0.85
    signal = cases.msi_like(rng, rgb, tissue)
    hh, ww = h // 4 * 4, w // 4 * 4
    msi = signal[:hh, :ww].reshape(hh // 4, 4, ww // 4, 4).mean(axis=(1, 3))
    before = _counts()
    start = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      r = opt.register_msi_to_histology(rgb, msi, histology_pixel_size_um=2.0, msi_pixel_size_um=8.0)
    rows.append({"histology_shape": [h, w], "msi_shape": list(msi.shape), "seconds": time.perf_counter() - start,
                 "new_compilations": _counts() - before, "success": r.success})  # fmt: skip
    print(rows[-1], flush=True)
  rest = float(np.median([r["seconds"] for r in rows[1:]]))
  total = sum(r["new_compilations"] for r in rows)
  return {"sections": rows, "total_compilations": total, "first_s": rows[0]["seconds"], "median_rest_s": rest}


def batch():
  from msisynth.register import cases
  from msisynth.register import optimize as opt

  rng = np.random.default_rng(1)
  made = [cases.make_case(rng, 256, appearance="uni") for _ in range(8)]
  fixed = np.stack([1.0 - c.fixed.mean(axis=2) for c in made])
  moving = np.stack([c.moving for c in made])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt.register(fixed[0], moving[0])
    opt.register_batch(fixed, moving)
    start = time.perf_counter()
    singles = [opt.register(f, m) for f, m in zip(fixed, moving)]
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = opt.register_batch(fixed, moving)
    batch_s = time.perf_counter() - start
  errs_single = [cases.grid_error_px(r.transform, c)[0] for r, c in zip(singles, made)]
  errs_batch = [cases.grid_error_px(r.transform, c)[0] for r, c in zip(batched, made)]
  return {"pairs": 8, "size": 256, "singles_s": single_s, "batch_s": batch_s, "speedup": single_s / batch_s,
          "median_err_single_px": float(np.median(errs_single)),
          "median_err_batch_px": float(np.median(errs_batch))}  # fmt: skip


def cold_child(cache_dir):
  from msisynth.register import cases, enable_compilation_cache
  from msisynth.register import optimize as opt

  if cache_dir != "none":
    enable_compilation_cache(cache_dir)
  c = cases.make_case(np.random.default_rng(2), 512, appearance="uni")
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt.register(1.0 - c.fixed.mean(axis=2), c.moving)
  cold = time.perf_counter() - start
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt.register(1.0 - c.fixed.mean(axis=2), c.moving)
  print(json.dumps({"cold_s": cold, "warm_s": time.perf_counter() - start}))


def cache():
  out = {}
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  with tempfile.TemporaryDirectory() as tmp:
    for label, arg in (("no_cache", "none"), ("cache_first_run", tmp), ("cache_second_run", tmp)):
      res = subprocess.run([sys.executable, __file__, f"--cold_child={arg}"], capture_output=True, text=True,
                           env=env, check=True)  # fmt: skip
      out[label] = json.loads(res.stdout.strip().splitlines()[-1])
      print(label, out[label], flush=True)
  return out


def main(argv):
  del argv
  if _COLD_CHILD.value:
    cold_child(_COLD_CHILD.value)
    return
  import jax

  results = {"command": " ".join(sys.argv), "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
             "load_average_at_start": list(os.getloadavg())}  # fmt: skip
  for part in _PART.value:
    results[part] = {"folder": folder, "batch": batch, "cache": cache}[part]()
  output = REPO / _OUTPUT.value
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(results, indent=2) + "\n")
  print(json.dumps({k: v for k, v in results.items() if k != "folder"}, indent=2))
  if "folder" in results:
    print({k: v for k, v in results["folder"].items() if k != "sections"})


if __name__ == "__main__":
  app.run(main)
