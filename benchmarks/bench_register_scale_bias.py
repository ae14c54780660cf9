r"""Diagnosis: where the mutual information of generated MSI-like cases peaks along the scale, with every pixel.

On MSI-like cases (`msisynth.register.cases`, appearance "msi") `register` lands 1-2 MSI pixels from the truth
(the `bench_register.py` misses), and `bench_register_drift.py` shows that it drifts there from the true transform
too: the optimum of the similarity is not at the truth. This script finds which way and why. For each case it
measures, with every pixel of the working grid (no sampling, no optimiser):

- the MI (32-bin cubic B-spline Parzen estimate, as `register` uses, over the images' full intensity ranges) of
  the fixed image and the moving image resampled through truth ∘ S(s), where S(s) scales by s about the fixed
  image's centre, for s over `--scales`; and reports the s of the largest MI. s > 1 means that MI prefers a moving
  image drawn smaller than the truth in the fixed space;
- the same with the fixed image smoothed to the moving grid's resolution (`RegistrationConfig.match_resolution`:
  σ of half a pixel each), which removes what comes from the blur of the coarser MSI grid;
- (with `--register`) the scale error of `register`'s result: the root of the determinant of truth⁻¹ ∘ found.

Each variant of the moving appearance changes one thing: "generated" is `make_case`'s default, "no hidden field"
drops the smooth field the stains do not show, "linear" also makes the stain mixture monotonic. Cases are made
with no translation and a scale of 0.75 so that the moving field covers the whole fixed field at every s: the
overlap does not change along the scan.

Command (from the repository root):
  python benchmarks/bench_register_scale_bias.py --size=256 --cases=6 --register
Writes benchmarks/results/bench_register_scale_bias.json.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import warnings

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from absl import app, flags

_SIZE = flags.DEFINE_integer("size", 256, "Fixed image size (square, pixels).")
_CASES = flags.DEFINE_integer("cases", 6, "Cases per variant.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the cases.")
_SCALES = flags.DEFINE_list("scales", [f"{0.96 + 0.005 * i:.3f}" for i in range(21)], "Scales s of the scan.")
_REGISTER = flags.DEFINE_bool("register", False, "Also run `register` (defaults) and report its scale error.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/bench_register_scale_bias.json", "Result file.")

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {
  "generated": {},
  "no hidden field": {"msi_hidden": 0.0},
  "linear, no hidden field": {"msi_hidden": 0.0, "msi_mixture": "linear"},
}


def scan(case, scales, working_factor, match):
  """MI at each scale, on the working grid (pixel size `working_factor` fixed pixels)."""
  import jax.numpy as jnp

  from msisynth.geometry.transforms import AffineTransform, warp_image
  from msisynth.register import optimize
  from msisynth.register import similarity as sim

  fpx, mpx = case.fixed_pixel_size_um, case.moving_pixel_size_um
  fixed = optimize.shrink_image(1.0 - case.fixed.mean(axis=2), working_factor)
  work_px = fpx * working_factor
  if match:  # what RegistrationConfig(match_resolution=True) does to a level's images
    fixed = optimize._match_resolution(fixed[None], case.moving[None], work_px, mpx)[0][0]
  truth = np.asarray(case.transform.matrix, np.float64)
  center = 0.5 * np.array(case.fixed.shape[1::-1], np.float64) * fpx
  fixed_range = (float(fixed.min()), float(fixed.max()))
  moving_range = (float(case.moving.min()), float(case.moving.max()))
  out = []
  for s in scales:
    scale = np.eye(3)
    scale[:2, :2] *= s
    scale[:2, 2] = (1.0 - s) * center
    t = AffineTransform(jnp.asarray(truth @ scale, jnp.float32))
    moved = np.asarray(warp_image(case.moving, t, fixed.shape, fixed_pixel_size_um=work_px,
                                  moving_pixel_size_um=mpx, cval=np.nan))  # fmt: skip
    inside = np.isfinite(moved)
    out.append(float(sim.mutual_information(jnp.asarray(fixed[inside]), jnp.asarray(moved[inside]), bins=32,
                                            fixed_range=fixed_range, moving_range=moving_range)))  # fmt: skip
  return np.array(out)


def main(argv):
  del argv
  import jax

  import msisynth
  from msisynth import errors, outputs
  from msisynth.register import cases, optimize

  scales = np.array([float(s) for s in _SCALES.value])
  results = {"benchmark": "MI along the scale about the truth on MSI-like cases, every pixel (simulated data)",
             "command": " ".join(sys.argv), "msisynth_version": msisynth.__version__,
             "jax_version": jax.__version__, "scales": scales, "variants": {}}  # fmt: skip
  for name, options in VARIANTS.items():
    rng = np.random.default_rng(_SEED.value)
    rows = []
    for i in range(_CASES.value):
      case = cases.make_case(rng, _SIZE.value, appearance="msi", max_shift=0.0, min_scale=0.75, max_scale=0.76,
                             **options)  # fmt: skip
      # register's working grid: half the MSI pixel (RegistrationConfig.working_pixel_size_um's default).
      factor = max(1, int(round(0.5 * case.moving_pixel_size_um / case.fixed_pixel_size_um)))
      row = {"case": i}
      for label, match in (("as is", False), ("resolution matched", True)):
        mi = scan(case, scales, factor, match)
        row[f"peak_scale_{label}"] = float(scales[mi.argmax()])
        row[f"mi_{label}"] = mi
      if _REGISTER.value:
        fixed = 1.0 - case.fixed.mean(axis=2)
        try:
          with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = optimize.register(fixed, case.moving, fixed_pixel_size_um=case.fixed_pixel_size_um,
                                  moving_pixel_size_um=case.moving_pixel_size_um)  # fmt: skip
          residual = np.linalg.inv(np.asarray(case.transform.matrix, np.float64)) @ np.asarray(r.transform.matrix)
          row["register_scale"] = float(math.sqrt(abs(np.linalg.det(residual[:2, :2]))))
          row["register_err_px"] = cases.grid_error_px(r.transform, case)[0]
        except errors.RegistrationError as e:
          row["register_error"] = str(e)
      rows.append(row)
      print(f"{name:>24} case {i}: peak s {row['peak_scale_as is']:.3f} as is, "
            f"{row['peak_scale_resolution matched']:.3f} resolution matched"
            + (f"; register scale {row['register_scale']:.4f}, err {row['register_err_px']:.2f} px"
               if "register_scale" in row else ""), flush=True)  # fmt: skip
    summary = {f"mean_peak_scale_{label}": float(np.mean([r[f"peak_scale_{label}"] for r in rows]))
               for label in ("as is", "resolution matched")}  # fmt: skip
    if _REGISTER.value:
      summary["mean_register_scale"] = float(np.mean([r["register_scale"] for r in rows if "register_scale" in r]))
    results["variants"][name] = {"options": options, "summary": summary, "cases": rows}
    print(f"{name:>24}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()), flush=True)
  output = REPO / _OUTPUT.value if not pathlib.Path(_OUTPUT.value).is_absolute() else pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(outputs.json_ready(results), indent=2) + "\n")
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
