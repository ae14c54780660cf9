r"""Diagnosis: where the affine registration ends on MSI-like generated cases, from its own starts and from the
true transform, under given configurations (the measurements behind docs/results.md section 10).

For each configuration and case: the mean grid error (fixed px) of `register` with its starts, and of `register`
started from the true transform (`initial_transform`), which shows whether the truth is where the optimiser
stays (an optimum of the similarity as estimated) or drifts from. A case succeeds below 1 MSI pixel (4 fixed px).

Command (from the repository root):
  python benchmarks/bench_register_drift.py --size=256 --cases=12 --seed=1
Writes benchmarks/results/bench_register_drift_<size>.json.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import sys
import time
import warnings

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from absl import app, flags

_SIZE = flags.DEFINE_integer("size", 256, "Fixed image size (square, pixels).")
_CASES = flags.DEFINE_integer("cases", 12, "MSI-like cases.")
_SEED = flags.DEFINE_integer("seed", 1, "Seed of the cases.")
_CONFIGS = flags.DEFINE_string(
  "configs", "{'defaults': {}, 'previous defaults': {'coarse_kind': None, 'outside_bin': True, 'start_scales': (1.0,),"
  " 'max_iterations': 50, 'final_learning_rate_fraction': 0.05}}",
  "Python dict literal: name -> RegistrationConfig options ('max_iterations': 50 means 100 at the coarsest level and "
  "50 at the others, with the previous default level count).")  # fmt: skip

_OUTPUT = flags.DEFINE_string(
  "output", None, "Results file (default benchmarks/results/bench_register_drift_<size>.json).")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _previous_levels(size):
  # The level count of the previous defaults: extent max(H·max(gf, base), h·max(gm, base)) / base, base 2 µm.
  extent = max(size * 2.0, size // 4 * 4.0) / 2.0
  return max(2, 1 + int(np.ceil(np.log2(extent / 96))))


def main(argv):
  del argv
  from msisynth.register import cases
  from msisynth.register import optimize as opt

  warnings.simplefilter("ignore")
  rng = np.random.default_rng(_SEED.value)
  made = [cases.make_case(rng, _SIZE.value, appearance="msi") for _ in range(_CASES.value)]
  out = {"command": " ".join(sys.argv), "load_average_at_start": list(os.getloadavg()), "size": _SIZE.value,
         "configs": {}}  # fmt: skip
  for name, options in ast.literal_eval(_CONFIGS.value).items():
    options = dict(options)
    if options.get("max_iterations") == 50:
      levels = _previous_levels(_SIZE.value)
      options.update(levels=levels, max_iterations=(100,) + (50,) * (levels - 1))
    config = opt.RegistrationConfig(**options)
    rows = []
    for c in made:
      fixed = 1.0 - c.fixed.mean(axis=2)
      kw = dict(fixed_pixel_size_um=1.0, moving_pixel_size_um=c.moving_pixel_size_um, config=config)
      start = time.perf_counter()
      r = opt.register(fixed, c.moving, **kw)
      seconds = time.perf_counter() - start
      from_truth = opt.register(fixed, c.moving, initial_transform=c.transform, **kw)
      rows.append({"err_px": cases.grid_error_px(r.transform, c)[0], "seconds": seconds,
                   "from_truth_err_px": cases.grid_error_px(from_truth.transform, c)[0]})  # fmt: skip
    errs = [r["err_px"] for r in rows]
    out["configs"][name] = {"options": repr(options), "cases": rows, "success": int(sum(e < 4.0 for e in errs)),
                            "max_err_px": max(errs), "median_s": float(np.median([r["seconds"] for r in rows]))}
    print(f"{name}: {out['configs'][name]['success']}/{len(rows)} < 4 px, errors {np.round(errs, 1).tolist()}, "
          f"from the truth {np.round([r['from_truth_err_px'] for r in rows], 1).tolist()}", flush=True)
  path = pathlib.Path(_OUTPUT.value or REPO / "benchmarks" / "results" / f"bench_register_drift_{_SIZE.value}.json")
  path.write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
