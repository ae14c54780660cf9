r"""Benchmark: msisynth's JAX mutual-information affine registration against SimpleITK's, on semi-synthetic cases.

Cases: square crops of the real H&E slides in data/he (resized to each size; the slides are about
550 × 680 px, so 1024² and 2048² cases are upsampled and smoother than real scans at that size) warped by a random
known affine (rotation ≤ 15°, scales 0.9–1.1, shear ≤ 0.05, shift ≤ 8 % of the size, about the centre), then
given another intensity curve (gamma 0.7–1.4), a slight blur and noise (σ = 0.02). Both methods register the same
grey images (1 - luminance, so tissue is bright and the empty slide dark, which suits moments initialisation) with
pixel size 1.

- msisynth: `msisynth.register.register` with its defaults (Mattes-style MI, 32 bins, 3 levels, centres of mass +
  principal axes starts, Adam, up to 16,384 sampled pixels per level).
- SimpleITK: Mattes MI with 50 bins, 3-level pyramid (shrink 4, 2, 1; smoothing σ 2, 1, 0 px), moments
  initialisation (`CenteredTransformInitializer` MOMENTS), regular-step gradient descent (learning rate 1,
  minimum step 1e-4, 200 iterations per level, scales from physical shift), linear interpolation; by default it
  draws the same number of random pixels per level as msisynth (`--sitk_samples=match`), or all pixels (`all`).

Scores: target registration error (TRE) over a 10 × 10 grid of points across the fixed image, in pixels; a case
succeeds when its mean grid TRE is below 2 px. Times are wall-clock per case; msisynth's first case of each size
includes compiling for that size ("cold"), the rest reuse the compiled functions ("warm").

Command (from the repository root):
  python benchmarks/bench_register.py --sizes=256,512,1024,2048 --cases=3
Writes benchmarks/results/bench_register.json (and prints a table). Runs unchanged on a GPU (JAX picks it up);
SimpleITK always runs on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from absl import app, flags, logging

_SIZES = flags.DEFINE_list("sizes", ["256", "512", "1024", "2048"], "Image sizes (square, pixels).")
_CASES = flags.DEFINE_integer("cases", 3, "Cases per size.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the cases.")
_METHODS = flags.DEFINE_list("methods", ["msisynth", "simpleitk"], "Methods to run.")
_SITK_SAMPLES = flags.DEFINE_enum("sitk_samples", "match", ["match", "all"], "SimpleITK's metric sampling.")
_DATA = flags.DEFINE_string("data", None, "Folder of H&E PNGs (default: the shipped data/he).")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/bench_register.json", "Result file (overwritten).")
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", 16384, "Pixels sampled per level (both methods with 'match').")

REPO = pathlib.Path(__file__).resolve().parents[1]
SUCCESS_PX = 2.0


def _slides(folder: pathlib.Path) -> list[np.ndarray]:
  from msisynth import io

  paths = sorted(folder.glob("*.png"))
  if not paths:
    raise SystemExit(f"no H&E PNGs in {folder}")
  return [1.0 - io.read_histology(p) @ np.array([0.299, 0.587, 0.114], np.float32) for p in paths]


def make_case(rng: np.random.Generator, slides: list[np.ndarray], size: int):
  """(fixed, moving, true transform, description) for one semi-synthetic case."""
  from scipy import ndimage as ndi
  from skimage.transform import resize

  from msisynth.register import transforms as tf

  while True:
    k = int(rng.integers(len(slides)))
    slide = slides[k]
    side = int(min(slide.shape) * rng.uniform(0.6, 0.9))
    r0 = int(rng.integers(0, slide.shape[0] - side + 1))
    c0 = int(rng.integers(0, slide.shape[1] - side + 1))
    crop = slide[r0 : r0 + side, c0 : c0 + side]
    if (crop > 0.15).mean() > 0.3:  # enough tissue to register
      break
  fixed = resize(crop, (size, size), order=1, anti_aliasing=True).astype(np.float32)
  center = tf.image_center_um((size, size))
  params = [
    math.radians(rng.uniform(-15, 15)),
    math.log(rng.uniform(0.9, 1.1)),
    math.log(rng.uniform(0.9, 1.1)),
    rng.uniform(-0.05, 0.05),
    rng.uniform(-0.08, 0.08) * size,
    rng.uniform(-0.08, 0.08) * size,
  ]
  true = tf.AffineTransform.from_params(params, center)
  # moving(T(x)) = fixed(x): sample the fixed image at T^-1 of the moving grid.
  moving = np.asarray(tf.warp_image(fixed, true.inverse(), (size, size), cval=0.0))
  moving = np.clip(moving, 0, 1) ** rng.uniform(0.7, 1.4)
  moving = ndi.gaussian_filter(moving, 0.5 * size / 256) + rng.normal(0, 0.02, moving.shape)
  return fixed, moving.astype(np.float32), true, {"slide": k, "params": [float(p) for p in params]}


def grid_tre_px(found, true, size: int) -> tuple[float, float]:
  from msisynth.register import evaluate

  err = evaluate.transform_error(found, true, (size, size), 1.0, num=10)
  return err["mean_um"], err["max_um"]


def run_msisynth(fixed, moving, max_samples):
  from msisynth import errors
  from msisynth.register import optimize

  config = optimize.RegistrationConfig(max_samples=max_samples)
  start = time.perf_counter()
  try:
    result = optimize.register(fixed, moving, config=config)
    transform = result.transform
    info = {"converged": result.converged, "iterations": list(result.iterations), "metric": result.metric}
  except errors.RegistrationError as e:
    transform, info = None, {"error": str(e)}
  return transform, time.perf_counter() - start, info


def run_simpleitk(fixed, moving, sampling, max_samples):
  import SimpleITK as sitk

  from msisynth.register.transforms import AffineTransform

  start = time.perf_counter()
  f = sitk.GetImageFromArray(fixed.astype(np.float32))
  m = sitk.GetImageFromArray(moving.astype(np.float32))
  init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2),
                                           sitk.CenteredTransformInitializerFilter.MOMENTS)  # fmt: skip
  reg = sitk.ImageRegistrationMethod()
  reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
  if sampling == "match":
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n = fixed.size
    reg.SetMetricSamplingPercentagePerLevel([min(1.0, max_samples / (n / s**2)) for s in (4, 2, 1)], seed=0)
  else:
    reg.SetMetricSamplingStrategy(reg.NONE)
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
    return None, time.perf_counter() - start, {"error": str(e).splitlines()[-1]}
  seconds = time.perf_counter() - start
  # The composite result's last member is the affine; ITK's transform maps fixed → moving like ours.
  tx = sitk.CompositeTransform(out).GetNthTransform(0) if out.GetName() == "CompositeTransform" else out
  tx = sitk.AffineTransform(tx)
  a = np.asarray(tx.GetMatrix()).reshape(2, 2)
  c = np.asarray(tx.GetCenter())
  offset = np.asarray(tx.GetTranslation()) + c - a @ c
  info = {"iterations": int(reg.GetOptimizerIteration()), "metric": float(reg.GetMetricValue())}
  return AffineTransform.from_linear(a, offset), seconds, info


def summarise(rows):
  out = {}
  for method in sorted({r["method"] for r in rows}):
    sel = [r for r in rows if r["method"] == method]
    tre = np.array([r["tre_mean_px"] if r["tre_mean_px"] is not None else np.inf for r in sel])
    ok = tre < SUCCESS_PX
    times = [r["seconds"] for r in sel]
    out[method] = {
      "n": len(sel),
      "success_rate": float(ok.mean()),
      "mean_tre_px_successful": float(tre[ok].mean()) if ok.any() else None,
      "median_tre_px": float(np.median(tre)),
      "mean_time_s": float(np.mean(times)),
      "cold_time_s": float(times[0]),
      "warm_mean_time_s": float(np.mean(times[1:])) if len(times) > 1 else None,
    }
  return out


def main(argv):
  del argv
  import jax

  import msisynth

  data = pathlib.Path(_DATA.value) if _DATA.value else msisynth.datasets.data_dir() / "he"
  slides = _slides(data)
  rng = np.random.default_rng(_SEED.value)
  results = {
    "benchmark": "affine MI registration, semi-synthetic H&E cases",
    "command": " ".join(sys.argv),
    "msisynth_version": msisynth.__version__,
    "jax_version": jax.__version__,
    "jax_device": str(jax.devices()[0].device_kind),
    "jax_platform": jax.devices()[0].platform,
    "cpu_count": os.cpu_count(),
    "load_average_at_start": list(os.getloadavg()),
    "machine": platform.machine(),
    "success_threshold_px": SUCCESS_PX,
    "sitk_sampling": _SITK_SAMPLES.value,
    "max_samples": _MAX_SAMPLES.value,
    "sizes": {},
  }
  output = REPO / _OUTPUT.value if not os.path.isabs(_OUTPUT.value) else pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  for size in (int(s) for s in _SIZES.value):
    rows = []
    for case in range(_CASES.value):
      fixed, moving, true, desc = make_case(rng, slides, size)
      for method in _METHODS.value:
        if method == "msisynth":
          found, seconds, info = run_msisynth(fixed, moving, _MAX_SAMPLES.value)
        elif method == "simpleitk":
          found, seconds, info = run_simpleitk(fixed, moving, _SITK_SAMPLES.value, _MAX_SAMPLES.value)
        else:
          raise app.UsageError(f"unknown method {method!r}")
        tre_mean, tre_max = grid_tre_px(found, true, size) if found is not None else (None, None)
        row = {"size": size, "case": case, "method": method, "seconds": seconds, "tre_mean_px": tre_mean,
               "tre_max_px": tre_max, **desc, **info}  # fmt: skip
        rows.append(row)
        logging.info("size %d case %d %-9s TRE %s px in %.2f s", size, case, method,
                     "failed" if tre_mean is None else f"{tre_mean:.3f}", seconds)  # fmt: skip
    results["sizes"][str(size)] = {"summary": summarise(rows), "cases": rows}
    output.write_text(json.dumps(results, indent=2) + "\n")  # after every size, so a cut-off run keeps its part

  print(f"{'size':>6} {'method':>10} {'success':>8} {'median TRE px':>14} {'cold s':>8} {'warm s':>8}")
  for size, entry in results["sizes"].items():
    for method, s in entry["summary"].items():
      warm = "-" if s["warm_mean_time_s"] is None else f"{s['warm_mean_time_s']:.2f}"
      print(f"{size:>6} {method:>10} {s['success_rate']:>8.0%} {s['median_tre_px']:>14.3f} "
            f"{s['cold_time_s']:>8.2f} {warm:>8}")  # fmt: skip
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
