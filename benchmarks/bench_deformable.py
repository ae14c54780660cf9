"""Deformable (B-spline) refinement after the affine registration: accuracy and time.

Two parts, printed and saved as JSON (`--out`, default benchmarks/results/bench_deformable.json):

1. Semi-synthetic: a crop of scikit-image's real IHC image (moving) and the fixed image it becomes under a known
   smooth map T(x) = x + (20, 20) px + u(x), u Gaussian-smoothed noise (σ = `--sigma_px`) scaled to an RMS of
   `--amplitude_px` per axis. `register` (MI, defaults) gives the affine; `register_deformable` (defaults, grid
   spacing `--spacing_px`) refines it. Error: mean |T_found(x) - T(x)| over the fixed pixels (4-pixel margin).
2. The real pair `hr2msi_bladder` (Orbitrap MSI at 10 µm, three ions; stained optical image, pixel size not
   recorded, taken as 2.85 µm from the fields of view), when `--hr2msi` names its folder. No ground truth: the
   affine registration uses the m/z 798.54 ion image (PC(34:1)+K), and each deformable result is scored by the
   hard-histogram NMI (32 bins) of the optical image with the two other ion images (held out) and by the Dice
   overlap of the tissue masks (optical: Otsu; MSI: Otsu of log TIC).

Command (about 5 minutes on 2 CPU cores):
  PYTHONPATH=. python benchmarks/bench_deformable.py --hr2msi data/hr2msi_bladder
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import warnings

import numpy as np
import skimage.data
import skimage.filters

from msisynth import metrics as msi_metrics
from msisynth.geometry import transforms as tf
from msisynth.register import bspline, cases, optimize

ION_NAMES = ("743.5482", "798.541", "741.5307")


def semi_synthetic(args):
  rows = []
  for size in args.sizes:
    for seed in range(args.cases):
      fixed, moving, true_map = cases.deformed_pair(
        seed, size, amplitude_px=args.amplitude_px, sigma_px=args.sigma_px, row0=60 + 40 * seed
      )
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        affine = optimize.register(fixed, moving).transform
        t1 = time.perf_counter()
        result = bspline.register_deformable(
          fixed, moving, affine, config=bspline.DeformableConfig(grid_spacing_um=args.spacing_px)
        )
        t2 = time.perf_counter()
      row = {
        "size": size,
        "seed": seed,
        "affine_error_px": cases.map_error_px(affine, true_map),
        "deformable_error_px": cases.map_error_px(result.transform, true_map),
        "min_jacobian": result.min_jacobian,
        "affine_s": t1 - t0,
        "deformable_s": t2 - t1,
        "warnings": [str(w.message) for w in caught],
      }
      rows.append(row)
      print(f"{size}² seed {seed}: affine {row['affine_error_px']:.2f} px → deformable "
            f"{row['deformable_error_px']:.2f} px (min det {row['min_jacobian']:.2f}); "
            f"{row['affine_s']:.1f} s + {row['deformable_s']:.1f} s")  # fmt: skip
  return rows


def _read_hr2msi(folder: pathlib.Path):
  import tifffile
  from scipy.io import netcdf_file

  f = netcdf_file(folder / "HR2MSI_mouse_urinary_bladder_S096_Figure1.cdf", "r", mmap=False)
  mz, intensity = f.variables["mz"].data.copy(), f.variables["intensity"].data.copy()
  x, y = f.variables["x"].data.astype(int) - 1, f.variables["y"].data.astype(int) - 1
  width, height = int(f._attributes["width"]), int(f._attributes["height"])
  f.close()
  cube = np.zeros((height, width, len(ION_NAMES)), np.float32)
  for k, name in enumerate(ION_NAMES):
    sel = np.abs(mz - float(name)) < 0.02
    np.add.at(cube[..., k], (y[sel], x[sel]), intensity[sel])
  rgba = tifffile.imread(folder / "HR2MSI_mouse_urinary_bladder_S096_optical.tif")
  return cube, rgba


def hr2msi(args):
  from msisynth import io as msi_io

  cube, rgba = _read_hr2msi(pathlib.Path(args.hr2msi))
  msi_px, optical_px, work_px = 10.0, 2.85, 5.0
  measured = cube.sum(-1) > 0
  ions = np.log1p(cube)
  ions = np.clip(ions / np.percentile(ions[measured], 99.5, axis=0), 0.0, 1.0)
  rgb = rgba[..., :3].astype(np.float32) / 255
  work = np.clip(msi_io.resample_to_pixel_size(rgb, optical_px, work_px, order=1), 0.0, 1.0)
  valid = msi_io.resample_to_pixel_size((rgba[..., 3] > 0).astype(np.float32), optical_px, work_px, order=1) > 0.99
  grey = work @ np.array([0.299, 0.587, 0.114], np.float32)
  optical_tissue = np.asarray(msi_io.tissue_mask(work), bool) & valid
  tic = np.log1p(cube.sum(-1))
  msi_tissue = tic > skimage.filters.threshold_otsu(tic[measured])
  kwargs = dict(fixed_pixel_size_um=work_px, moving_pixel_size_um=msi_px, fixed_mask=valid, moving_mask=measured)

  def score(transform):
    warp = dict(fixed_pixel_size_um=work_px, moving_pixel_size_um=msi_px)
    inside = np.asarray(tf.warp_image(measured, transform, grey.shape, order=0, cval=False, **warp)) & valid
    out = {}
    for k, name in enumerate(ION_NAMES):
      warped = np.asarray(tf.warp_image(ions[..., k], transform, grey.shape, **warp))
      out[f"nmi_{name}"] = float(msi_metrics.normalized_mutual_information(grey, warped, bins=32, mask=inside,
                                                                            value_range=(0.0, 1.0)))  # fmt: skip
    tissue = np.asarray(tf.warp_image(msi_tissue, transform, grey.shape, order=0, cval=False, **warp)) & valid
    out["tissue_dice"] = float(2 * np.sum(tissue & optical_tissue) / (tissue.sum() + optical_tissue.sum()))
    return out

  t0 = time.perf_counter()
  config = optimize.RegistrationConfig(working_pixel_size_um=work_px)
  affine = optimize.register(grey, ions[..., 1], config=config, **kwargs)
  rows = [{"stage": "affine", "seconds": time.perf_counter() - t0, "mi": affine.metric, **score(affine.transform)}]
  print("hr2msi affine:", rows[-1])
  for spacing in args.hr2msi_spacings_um:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      t0 = time.perf_counter()
      config = bspline.DeformableConfig(grid_spacing_um=spacing)
      result = bspline.register_deformable(grey, ions[..., 1], affine.transform, config=config, **kwargs)
      seconds = time.perf_counter() - t0
    rows.append({"stage": f"deformable {spacing:g} µm", "seconds": seconds, "mi_affine": result.metric_affine,
                 "mi": result.metric, "max_displacement_um": result.max_displacement_um,
                 "mean_displacement_um": result.mean_displacement_um, "min_jacobian": result.min_jacobian,
                 "warnings": [str(w.message) for w in caught], **score(result.transform)})  # fmt: skip
    print("hr2msi", rows[-1])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=int, nargs="+", default=[96, 256])
  parser.add_argument("--cases", type=int, default=5)
  parser.add_argument("--amplitude_px", type=float, default=6.0)
  parser.add_argument("--sigma_px", type=float, default=16.0)
  parser.add_argument("--spacing_px", type=float, default=16.0)
  parser.add_argument("--hr2msi", default=None, help="folder of the hr2msi_bladder pair")
  parser.add_argument("--hr2msi_spacings_um", type=float, nargs="+", default=[400.0, 200.0, 100.0])
  parser.add_argument("--out", default="benchmarks/results/bench_deformable.json")
  args = parser.parse_args()
  results = {"args": vars(args), "semi_synthetic": semi_synthetic(args)}
  if args.hr2msi:
    results["hr2msi"] = hr2msi(args)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  print("saved", out)


if __name__ == "__main__":
  main()
