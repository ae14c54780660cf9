r"""Benchmark: msisynth's affine registration beside elastix and SimpleITK, on generated held-out cases.

Cases come from `msisynth.register.cases` (see there): a histology-like fixed image (generated tissue, or a random
square of a shipped H&E slide in data/he with `--source=he`), a random known affine (rotation ±30°, scale 0.7–1.4,
translation ≤ 20 % of the field; with `--flips` also mirrors and quarter turns) and a moving image that is either
the same modality ("uni": grey through another intensity curve, blurred, noisy) or MSI-like ("msi": a non-monotonic
mixture of the stains on a grid 4× coarser, with noise and hotspots). `--unrelated=N` adds N pairs per size whose
moving image comes from another case (nothing to find; with `--source=he`, from another slide), to measure misses
of the failure detection.

Every method registers the same grey images (1 - mean RGB for the fixed, the moving as made) with their pixel
sizes, each method in a fresh process of its own per size (once ITK had run in a process, msisynth's calls there
took 30-50 % longer, and elastix's slowed beside JAX's thread pools too):
- msisynth: `msisynth.register.register` with its defaults (`register_msi_to_histology`'s with `--flips`).
- elastix: itk-elastix with its default affine parameter map (`GetDefaultParameterMap("affine")`: 4 levels,
  256 iterations, 2048 random samples per iteration, Mattes MI, adaptive stochastic gradient descent).
- SimpleITK: Mattes MI (50 bins), moments initialisation, regular-step gradient descent, 3 levels, 4096 random
  samples per level.

A case succeeds when the mean distance over a 10 × 10 grid across the fixed image between the found and the true
transform is below 2 fixed pixels (uni) or 1 moving pixel (msi, i.e. 4 fixed pixels). msisynth's own verdict
(`RegistrationResult.success`) is compared with that: a false alarm is a successful case it calls failed; a miss is
a failed or unrelated case it calls successful. Times are wall-clock per registration (with `--repeats=N`, the
median of N rounds over the pairs; the machine's load changes within a run). Before the timed cases of
each size, every method's process registers one throw-away case of each appearance, which compiles msisynth's
shapes for that size (its time is msisynth's cold time, `cold_s_by_appearance`, in a fresh process) and loads
elastix and SimpleITK: every timed call is warm.

Command (from the repository root; keep runs short, the machine may be shared):
  python benchmarks/bench_register.py --sizes=256,512,1024,2048 --cases=4 --unrelated=2 --repeats=3
Writes benchmarks/results/bench_register.json (and prints a table).
"""

from __future__ import annotations

import ast
import json
import multiprocessing
import os
import pathlib
import platform
import sys
import time
import warnings

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from absl import app, flags, logging

_SIZES = flags.DEFINE_list("sizes", ["256", "512", "1024", "2048"], "Fixed image sizes (square, pixels).")
_CASES = flags.DEFINE_integer("cases", 4, "Cases per size and appearance.")
_APPEARANCES = flags.DEFINE_list("appearances", ["uni", "msi"], "Moving image appearances.")
_UNRELATED = flags.DEFINE_integer("unrelated", 0, "Unrelated pairs per size (failure detection).")
_FLIPS = flags.DEFINE_bool("flips", False, "Mirrors and quarter turns in the truth; msisynth searches them.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the cases.")
_METHODS = flags.DEFINE_list("methods", ["msisynth", "elastix", "simpleitk"], "Methods to run.")
_SOURCE = flags.DEFINE_enum("source", "generated", ["generated", "he"], "Fixed images: generated or H&E slides.")
_CONFIG = flags.DEFINE_string("config", "{}", "Python dict literal of RegistrationConfig options for msisynth.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed calls per pair (the pairs in turn, N rounds); the median counts.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/bench_register.json", "Result file (overwritten).")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _slides():
  import msisynth
  from msisynth import io

  folder = msisynth.datasets.data_dir() / "he"
  paths = sorted(folder.glob("*.png"))
  if not paths:
    raise SystemExit(f"no H&E PNGs in {folder}")
  return [np.asarray(io.read_histology(p), np.float32)[..., :3] for p in paths]


def threshold_px(case) -> float:
  return 2.0 if case.appearance == "uni" else case.moving_pixel_size_um / case.fixed_pixel_size_um


def run_msisynth(fixed, moving, fpx, mpx, flips, config_literal="{}"):
  from msisynth import errors
  from msisynth.register import optimize

  config = optimize.RegistrationConfig(**{"flips_and_rot90": flips, **ast.literal_eval(config_literal)})
  start = time.perf_counter()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      r = optimize.register(fixed, moving, fixed_pixel_size_um=fpx, moving_pixel_size_um=mpx, config=config)
  except errors.RegistrationError as e:
    return None, time.perf_counter() - start, {"error": str(e), "success_flag": False}
  info = {"success_flag": r.success, "gain": r.gain, "uncertainty_um": r.uncertainty_um, "overlap": r.overlap,
          "moving_overlap": r.moving_overlap, "agreement": r.agreement, "turn_ambiguous": r.turn_ambiguous,
          "warnings": list(r.warnings), "start": r.start, "iterations": list(r.iterations),
          "metric": r.metric}  # fmt: skip
  return r.transform, time.perf_counter() - start, info


def run_elastix(fixed, moving, fpx, mpx):
  import itk

  from msisynth.geometry.transforms import AffineTransform

  start = time.perf_counter()
  f = itk.image_from_array(np.ascontiguousarray(fixed, np.float32))
  f.SetSpacing([fpx, fpx])
  m = itk.image_from_array(np.ascontiguousarray(moving, np.float32))
  m.SetSpacing([mpx, mpx])
  po = itk.ParameterObject.New()
  po.AddParameterMap(po.GetDefaultParameterMap("affine"))
  try:
    _, tp = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False)
  except RuntimeError as e:
    return None, time.perf_counter() - start, {"error": str(e).strip().splitlines()[-1][:200]}
  seconds = time.perf_counter() - start
  p = tp.GetParameterMap(0)
  a = np.array([float(v) for v in p["TransformParameters"]])
  c = np.array([float(v) for v in p["CenterOfRotationPoint"]])
  lin = a[:4].reshape(2, 2)
  return AffineTransform.from_linear(lin, a[4:] + c - lin @ c), seconds, {}


def run_simpleitk(fixed, moving, fpx, mpx):
  import SimpleITK as sitk

  from msisynth.geometry.transforms import AffineTransform

  start = time.perf_counter()
  f = sitk.GetImageFromArray(fixed.astype(np.float32))
  f.SetSpacing((fpx, fpx))
  m = sitk.GetImageFromArray(moving.astype(np.float32))
  m.SetSpacing((mpx, mpx))
  init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2),
                                           sitk.CenteredTransformInitializerFilter.MOMENTS)  # fmt: skip
  reg = sitk.ImageRegistrationMethod()
  reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
  reg.SetMetricSamplingStrategy(reg.RANDOM)
  n = fixed.size
  reg.SetMetricSamplingPercentagePerLevel([min(1.0, 4096 / (n / s**2)) for s in (4, 2, 1)], seed=0)
  reg.SetInterpolator(sitk.sitkLinear)
  reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                               gradientMagnitudeTolerance=1e-8)  # fmt: skip
  reg.SetOptimizerScalesFromPhysicalShift()
  reg.SetShrinkFactorsPerLevel([4, 2, 1])
  reg.SetSmoothingSigmasPerLevel([2, 1, 0])
  reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
  reg.SetInitialTransform(init, inPlace=False)
  try:
    out = reg.Execute(f, m)
  except RuntimeError as e:
    return None, time.perf_counter() - start, {"error": str(e).strip().splitlines()[-1][:200]}
  seconds = time.perf_counter() - start
  tx = sitk.CompositeTransform(out).GetNthTransform(0) if out.GetName() == "CompositeTransform" else out
  tx = sitk.AffineTransform(tx)
  a = np.asarray(tx.GetMatrix()).reshape(2, 2)
  c = np.asarray(tx.GetCenter())
  offset = np.asarray(tx.GetTranslation()) + c - a @ c
  return AffineTransform.from_linear(a, offset), seconds, {}


def run_method(method, fixed, moving, fpx, mpx, flips=False, config_literal="{}"):
  """(transform or None, seconds, info) of one method on one pair."""
  if method == "msisynth":
    return run_msisynth(fixed, moving, fpx, mpx, flips, config_literal)
  if method == "elastix":
    return run_elastix(fixed, moving, fpx, mpx)
  if method == "simpleitk":
    return run_simpleitk(fixed, moving, fpx, mpx)
  raise app.UsageError(f"unknown method {method!r}")


def run_phase(method, warm_pairs, pairs, flips, config_literal, repeats=1):
  """One method on one size's pairs, in a process of its own (see the module): the throw-away warm-up pairs
  first, then the timed ones, all pairs once per repeat. Returns (warm-up seconds per pair, [(3 × 3 matrix or
  None, median seconds, info with every repeat's seconds)]); the result is that of the first repeat."""
  cold = [run_method(method, *pair, flips, config_literal)[1] for pair in warm_pairs]
  out, times = [], [[] for _ in pairs]
  for repeat in range(repeats):
    for i, pair in enumerate(pairs):
      found, seconds, info = run_method(method, *pair, flips, config_literal)
      times[i].append(seconds)
      if repeat == 0:
        out.append((None if found is None else np.asarray(found.matrix, np.float64), info))
  return cold, [(m, float(np.median(t)), {**info, "seconds_each": t}) for (m, info), t in zip(out, times)]


def summarise(rows):
  out = {}
  for method in sorted({r["method"] for r in rows}):
    sel = [r for r in rows if r["method"] == method and not r["unrelated"]]
    if not sel:
      continue
    ok = np.array([r["ok"] for r in sel])
    err = np.array([r["err_mean_px"] if r["err_mean_px"] is not None else np.inf for r in sel])
    entry = {"n": len(sel), "success_rate": float(ok.mean()), "median_err_px": float(np.median(err)),
             "median_warm_s": float(np.median([r["seconds"] for r in sel]))}  # fmt: skip
    for appearance in sorted({r["appearance"] for r in sel}):
      part = [r for r in sel if r["appearance"] == appearance]
      entry[f"{appearance}_success"] = f"{sum(r['ok'] for r in part)}/{len(part)}"
      entry[f"{appearance}_median_warm_s"] = float(np.median([r["seconds"] for r in part]))
    if method == "msisynth":
      flag = np.array([r.get("success_flag", False) for r in sel])
      unrel = [r for r in rows if r["method"] == method and r["unrelated"]]
      entry["false_alarms"] = int(np.sum(ok & ~flag))
      entry["misses_wrong"] = int(np.sum(~ok & flag))
      entry["wrong"] = int(np.sum(~ok))
      entry["unrelated"] = len(unrel)
      entry["misses_unrelated"] = int(sum(bool(r.get("success_flag")) for r in unrel))
      entry["uncertainty_warnings_on_successes"] = int(sum(
        any("uncertain" in w for w in r.get("warnings", [])) for r, o in zip(sel, ok) if o))  # fmt: skip
    out[method] = entry
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  import msisynth
  from msisynth import outputs
  from msisynth.geometry.transforms import AffineTransform
  from msisynth.register import cases

  slides = _slides() if _SOURCE.value == "he" else None
  rng = np.random.default_rng(_SEED.value)
  results = {
    "benchmark": "affine registration on generated held-out cases: msisynth, elastix, SimpleITK",
    "command": " ".join(sys.argv),
    "msisynth_version": msisynth.__version__,
    "jax_version": jax.__version__,
    "jax_platform": jax.devices()[0].platform,
    "cpu_count": os.cpu_count(),
    "load_average_at_start": list(os.getloadavg()),
    "machine": platform.machine(),
    "flips": _FLIPS.value,
    "msisynth_config": _CONFIG.value,
    "repeats": _REPEATS.value,
    "source": _SOURCE.value,
    "sizes": {},
  }
  output = REPO / _OUTPUT.value if not os.path.isabs(_OUTPUT.value) else pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  spawn = multiprocessing.get_context("spawn")
  for size in (int(s) for s in _SIZES.value):
    # Warm-up: one throw-away case per appearance (its own seed, so the timed cases do not change).
    warm_rng = np.random.default_rng([_SEED.value, size, 7])
    warm_pairs = []
    for appearance in _APPEARANCES.value:
      source = None if slides is None else slides[int(warm_rng.integers(len(slides)))]
      case = cases.make_case(warm_rng, size, appearance=appearance, flips=_FLIPS.value, source=source)
      warm_pairs.append((1.0 - case.fixed.mean(axis=2), case.moving, case.fixed_pixel_size_um,
                         case.moving_pixel_size_um))  # fmt: skip
    plan = [(a, i) for i in range(_CASES.value) for a in _APPEARANCES.value]
    plan += [("unrelated", i) for i in range(_UNRELATED.value)]
    made, made_slide, jobs = [], [], []
    for appearance, i in plan:
      if appearance == "unrelated":
        base = made[i % len(made)]
        source = None
        if slides is not None:  # another slide than the base case's: crops of one slide may overlap
          others = [k for k in range(len(slides)) if k != made_slide[i % len(made)]] or [0]
          source = slides[others[int(rng.integers(len(others)))]]
        other = cases.make_case(rng, size, appearance=base.appearance, flips=_FLIPS.value, source=source)
        jobs.append((i, base, other.moving, True))
      else:
        k = None if slides is None else int(rng.integers(len(slides)))
        case = cases.make_case(rng, size, appearance=appearance, flips=_FLIPS.value,
                               source=None if k is None else slides[k])  # fmt: skip
        made.append(case)
        made_slide.append(k)
        jobs.append((i, case, case.moving, False))
    pairs = [(1.0 - c.fixed.mean(axis=2), moving, c.fixed_pixel_size_um, c.moving_pixel_size_um)
             for _, c, moving, _ in jobs]  # fmt: skip
    rows, cold = [], {}
    for method in _METHODS.value:
      # Each method runs in a fresh process: once ITK had run in a process, msisynth's later calls there took
      # 30-50 % longer (its thread pools stay), and elastix's calls slowed beside JAX's too.
      pool = spawn.Pool(1)
      try:
        warm_s, found = pool.apply(run_phase, (method, warm_pairs, pairs, _FLIPS.value, _CONFIG.value,
                                               _REPEATS.value))  # fmt: skip
      finally:
        pool.close()
        pool.join()
      if method == "msisynth":
        cold = dict(zip(_APPEARANCES.value, warm_s))
      logging.info("size %d %s warm-up %s s", size, method, ", ".join(f"{v:.2f}" for v in warm_s))
      for (i, case, _, unrelated), (matrix, seconds, info) in zip(jobs, found):
        transform = None if matrix is None else AffineTransform(jnp.asarray(matrix, jnp.float32))
        err = cases.grid_error_px(transform, case) if transform is not None and not unrelated else (None, None)
        ok = err[0] is not None and err[0] < threshold_px(case)
        rows.append({"size": size, "case": i, "appearance": case.appearance, "unrelated": unrelated,
                     "method": method, "seconds": seconds, "err_mean_px": err[0], "err_max_px": err[1],
                     "ok": bool(ok), "mirrored": case.mirrored, "quarter_turns": case.quarter_turns,
                     **info})  # fmt: skip
        logging.info("size %d %s %d %-9s err %s px in %.2f s %s", size, case.appearance, i, method,
                     "-" if err[0] is None else f"{err[0]:.2f}", seconds,
                     "" if method != "msisynth" else f"success={info.get('success_flag')}")  # fmt: skip
    results["sizes"][str(size)] = {"summary": summarise(rows), "cold_s_by_appearance": cold, "cases": rows}
    output.write_text(json.dumps(outputs.json_ready(results), indent=2) + "\n")

  print(f"{'size':>6} {'method':>10} {'success':>8} {'median err px':>14} {'cold s':>8} {'warm s':>8}  by appearance")
  for size, entry in results["sizes"].items():
    for method, s in entry["summary"].items():
      colds = entry.get("cold_s_by_appearance") or {}
      cold = f"{max(colds.values()):.2f}" if method == "msisynth" and colds else "-"
      warm = f"{s['median_warm_s']:.2f}"
      extra = "".join(f"  {a} {s[a + '_success']} ({s[a + '_median_warm_s']:.2f} s)" for a in _APPEARANCES.value
                      if a + "_success" in s)  # fmt: skip
      if method == "msisynth":
        extra += (f"  false alarms {s['false_alarms']}/{s['n'] - s['wrong']}, misses {s['misses_wrong']}/{s['wrong']}"
                 f" wrong + {s['misses_unrelated']}/{s['unrelated']} unrelated")  # fmt: skip
      print(f"{size:>6} {method:>10} {s['success_rate']:>8.0%} {s['median_err_px']:>14.3f} {cold:>8} {warm:>8}{extra}")
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
