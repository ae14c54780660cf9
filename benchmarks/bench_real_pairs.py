"""MSI → histology registration on the two real pairs: landmark distances per route (msight_bladder) and the
success verdict and figure (hr2msi_bladder).

msight_bladder (MALDI-TOF MSI 163 × 274 at 25 µm; H&E reduced 2× to about 5.4 µm, its pixel the one the 4 rough
landmarks imply): every route registers an image made from the MSI (moving, its measured-pixel polygon as the
mask) to the H&E and is scored by the mean distance (MSI px) at the 4 landmarks. The landmarks only score; no
route fits to them or chooses by them. Routes:
- `default/<image>`: `register_msi_to_histology` with its defaults (affine, flips and turns, tissue crop,
  translation search) on the TIC or PC1 image (`bladder.msi_images`: PCs of the √TIC-normalised spectra).
- `rigid/<image>`: the same with `kind="rigid"` (rotation and translation; the physical scale 1 of the two pixel
  sizes), on the TIC and PC1-PC4.
- `rigid/best_gain`: among the rigid results, the one with the largest gain of the registration's own success
  test (unsupervised choice).
- `rigid/best_gain+ridge`: `bladder.register_iterative_ridge` from it (a linear synthesis of the H&E luminance
  from 30 PCs, refitted at each round's alignment; 4 rounds).
Diagnostics (they use the landmark fit, so they are NOT routes): the registration started from the landmark
affine (`from_landmarks/...`), and a ridge image fitted at the landmark alignment and registered from it
(`oracle_ridge/...`): whether the similarity's optimum lies near the landmarks at all.

hr2msi_bladder (Orbitrap, 3 ions, 10 µm; optical image taken as 2.876 µm from the fields of view):
`register_msi_to_histology(..., pixel_size_uncertain=True)` on √(sum of the ions) and on the m/z 798.541 ion;
the verdict, the gain at each misalignment fraction, and `docs/figures/hr2msi_checkerboard_overlay.png`.

Command (about 6 minutes on 2 CPU cores):
  PYTHONPATH=. python benchmarks/bench_real_pairs.py
Options: --parts=msight,hr2msi  --output=benchmarks/results/bench_real_pairs.json  --no-figure
A sweep over H&E reduction, working pixel, image and transform type (about 2 minutes):
  PYTHONPATH=. python benchmarks/bench_real_pairs.py --parts=sweep \
    --output=benchmarks/results/bench_real_pairs_sweep.json
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time
import warnings

import numpy as np

from msisynth import datasets, geometry
from msisynth.evaluation import bladder
from msisynth.geometry import transforms as tf
from msisynth.outputs import atomic_write_json
from msisynth.register import optimize

ROOT = pathlib.Path(__file__).resolve().parents[1]


def describe(transform) -> dict:
  m = np.asarray(transform.matrix, np.float64)[:2, :2]
  return {"scale": float(math.sqrt(abs(np.linalg.det(m)))), "rotation_deg": float(tf.rotation_deg(transform))}


def _fit_points(src, dst, kind):
  """Least-squares affine, similarity or rigid map of (N, 2) points `src` to `dst`, as a 3 × 3 matrix."""
  if kind == "affine":
    return bladder.fit_affine(src, dst)
  cs, cd = src.mean(axis=0), dst.mean(axis=0)
  u, sv, vt = np.linalg.svd((dst - cd).T @ (src - cs))
  d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
  rot = u @ d @ vt
  scale = 1.0 if kind == "rigid" else float((sv * np.diag(d)).sum() / ((src - cs) ** 2).sum())
  m = np.eye(3)
  m[:2, :2] = scale * rot
  m[:2, 2] = cd - scale * rot @ cs
  return m


def landmark_consistency(landmarks_um, msi_px) -> dict:
  """How well the landmarks agree with each other: the mean residual (MSI px) of each transform family fitted to
  all of them (the best any result of that family can score) and its leave-one-out prediction error."""
  src, dst = landmarks_um[:, :2], landmarks_um[:, 2:]
  out = {}
  for kind in ("affine", "similarity", "rigid"):
    m = _fit_points(src, dst, kind)
    residual = np.linalg.norm(src @ m[:2, :2].T + m[:2, 2] - dst, axis=1) / msi_px
    loo = []
    for i in range(len(src)):
      keep = np.arange(len(src)) != i
      mi = _fit_points(src[keep], dst[keep], kind)
      loo.append(float(np.linalg.norm(src[i] @ mi[:2, :2].T + mi[:2, 2] - dst[i]) / msi_px))
    out[kind] = {"fit_mean_msi_px": float(residual.mean()), "fit_msi_px": residual.tolist(),
                 "leave_one_out_msi_px": loo, "leave_one_out_mean_msi_px": float(np.mean(loo))}  # fmt: skip
    print(f"landmarks, {kind:10s} fitted to all 4: mean {residual.mean():.1f} px; leave-one-out "
          f"{np.round(loo, 1).tolist()} (mean {np.mean(loo):.1f})", flush=True)  # fmt: skip
  return out


def msight_part(he_reduce: int, figure: bool) -> list[dict]:
  section, info = bladder.load_section(he_reduce=he_reduce)
  msi, he, he_px = section.msi, section.he, section.histology_pixel_size_um
  msi_px = float(msi.pixel_size_um[1])
  mask = np.asarray(msi.mask, bool)
  images = bladder.msi_images(msi, n_components=4)
  working = max(geometry.working_pixel_size_um(msi_px, he_px))
  rows = []

  def record(route, result, seconds, **extra):
    dist = bladder.landmark_distance_msi_px(result.transform, section.landmarks, msi_px)
    row = {"pair": "msight_bladder", "route": route, "mean_landmark_distance_msi_px": float(dist.mean()),
           "landmark_distances_msi_px": dist.tolist(), **describe(result.transform), "success": bool(result.success),
           "gain": float(result.gain), "metric": float(result.metric), "start": result.start, "seconds": seconds,
           **extra}  # fmt: skip
    rows.append(row)
    print(f"{route:34s} {row['mean_landmark_distance_msi_px']:6.1f} px  scale {row['scale']:.3f}  "
          f"rot {row['rotation_deg']:+6.2f}°  success {row['success']!s:5s} gain {row['gain']:.3f}  {seconds:.0f} s",
          flush=True)  # fmt: skip
    return result

  dist = bladder.landmark_distance_msi_px(section.transform, section.landmarks, msi_px)
  rows.append({"pair": "msight_bladder", "route": "landmark affine (reference)",
               "mean_landmark_distance_msi_px": float(dist.mean()), "landmark_distances_msi_px": dist.tolist(),
               **describe(section.transform), "histology_pixel_size_um": he_px})  # fmt: skip
  print(f"{'landmark affine (reference)':34s} {dist.mean():6.1f} px  {describe(section.transform)}", flush=True)
  rows[-1]["landmark_consistency"] = landmark_consistency(section.landmarks, msi_px)

  def run(route, image, **changes):
    config = optimize.RegistrationConfig(flips_and_rot90=True, working_pixel_size_um=working, **changes)
    t0 = time.perf_counter()
    kwargs = dict(histology_pixel_size_um=he_px, msi_pixel_size_um=msi.pixel_size_um, msi_mask=mask, config=config)
    result = optimize.register_msi_to_histology(he, images[image], **kwargs)
    return record(route, result, time.perf_counter() - t0)

  for image in ("tic", "pc1"):
    run(f"default/{image}", image)
  rigid = {}
  for image in ("tic", "pc1", "pc2", "pc3", "pc4"):
    rigid[image] = run(f"rigid/{image}", image, kind="rigid")
  best = max(rigid, key=lambda k: rigid[k].gain)
  record(f"rigid/best_gain ({best})", rigid[best], 0.0)
  if figure:
    draw_msight(section, rigid[best].transform, f"rigid/best_gain ({best})")
  config = optimize.RegistrationConfig(working_pixel_size_um=working, kind="rigid")
  t0 = time.perf_counter()
  result, history = bladder.register_iterative_ridge(he, msi, rigid[best].transform, histology_pixel_size_um=he_px,
                                                     config=config)  # fmt: skip
  per_round = [float(bladder.landmark_distance_msi_px(t, section.landmarks, msi_px).mean()) for t in history]
  record("rigid/best_gain+ridge", result, time.perf_counter() - t0, per_round_mean_distance_msi_px=per_round)

  # Diagnostics from the landmark fit (not routes).
  for kind in ("rigid", "affine"):
    config = optimize.RegistrationConfig(working_pixel_size_um=working, kind=kind)
    t0 = time.perf_counter()
    result = optimize.register(he, images["pc1"], fixed_pixel_size_um=he_px, moving_pixel_size_um=msi.pixel_size_um,
                               moving_mask=mask, config=config, initial_transform=section.transform)  # fmt: skip
    record(f"from_landmarks/{kind}/pc1", result, time.perf_counter() - t0)
  features = bladder.msi_features(msi, 30)
  grey = np.asarray(he, np.float32) @ np.asarray([0.2126, 0.7152, 0.0722], np.float32)
  target, inside = bladder.histology_on_msi_grid(grey, section.transform, mask.shape, histology_pixel_size_um=he_px,
                                                 msi_pixel_size_um=msi_px)  # fmt: skip
  oracle = bladder.ridge_image(features, mask, target[..., 0], inside)
  for similarity in ("mi", "ncc"):
    config = optimize.RegistrationConfig(working_pixel_size_um=working, kind="rigid", similarity=similarity,
                                         outside_bin=similarity == "mi")  # fmt: skip
    t0 = time.perf_counter()
    result = optimize.register(he, oracle, fixed_pixel_size_um=he_px, moving_pixel_size_um=msi.pixel_size_um,
                               moving_mask=mask, config=config, initial_transform=section.transform)  # fmt: skip
    record(f"oracle_ridge/rigid/{similarity}", result, time.perf_counter() - t0)
  return rows


def sweep_part() -> list[dict]:
  """msight: `register_msi_to_histology` over H&E reduction (2×, 4×), working pixel (12.5, 25 µm), image (TIC,
  PC1, PC2) and transform type (rigid, affine)."""
  rows = []
  for he_reduce in (2, 4):
    section, _ = bladder.load_section(he_reduce=he_reduce)
    msi, he, he_px = section.msi, section.he, section.histology_pixel_size_um
    images = bladder.msi_images(msi, n_components=2)
    for working in (12.5, 25.0):
      for image in ("tic", "pc1", "pc2"):
        for kind in ("rigid", "affine"):
          config = optimize.RegistrationConfig(flips_and_rot90=True, kind=kind,
                                               working_pixel_size_um=max(working, he_px))  # fmt: skip
          t0 = time.perf_counter()
          result = optimize.register_msi_to_histology(he, images[image], histology_pixel_size_um=he_px,
                                                      msi_pixel_size_um=msi.pixel_size_um, msi_mask=msi.mask,
                                                      config=config)  # fmt: skip
          dist = bladder.landmark_distance_msi_px(result.transform, section.landmarks, float(msi.pixel_size_um[1]))
          row = {"pair": "msight_bladder", "route": f"sweep/reduce{he_reduce}/working{working:g}/{image}/{kind}",
                 "mean_landmark_distance_msi_px": float(dist.mean()), "landmark_distances_msi_px": dist.tolist(),
                 **describe(result.transform), "success": bool(result.success), "gain": float(result.gain),
                 "seconds": time.perf_counter() - t0}  # fmt: skip
          rows.append(row)
          print(f"{row['route']:40s} {dist.mean():6.1f} px  rot {row['rotation_deg']:+7.1f}°  success "
                f"{row['success']!s:5s} gain {row['gain']:.3f}", flush=True)  # fmt: skip
  return rows


def hr2msi_part(figure: bool) -> list[dict]:
  pair = datasets.load_hr2msi_bladder()
  msi, optical = pair.msi, pair.optical
  msi_px = float(msi.pixel_size_um[1])
  optical_px = msi.cube.shape[1] * msi_px / optical.shape[1]
  ions = np.asarray(msi.cube, np.float32)
  scaled = ions / np.maximum(np.percentile(ions, 99, axis=(0, 1)), 1e-12)
  raw = np.sqrt(ions.sum(-1))
  # Each ion scaled by its 99th percentile before the sum (else the brightest ion dominates), and the raw sum
  # (the image the earlier measurement used), scaled by its own 99th percentile.
  images = {"sqrt_sum_of_ions": np.sqrt(np.clip(scaled.sum(-1) / 3.0, 0, None)),
            "sqrt_raw_sum_of_ions": np.clip(raw / np.percentile(raw, 99), 0, 1),
            "mz_798.541": np.clip(scaled[..., list(msi.mz).index(798.541)], 0, 1)}  # fmt: skip
  rows, results = [], {}
  for name, image in images.items():
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      result = optimize.register_msi_to_histology(optical, image, histology_pixel_size_um=optical_px,
                                                  msi_pixel_size_um=msi_px, pixel_size_uncertain=True)  # fmt: skip
    results[name] = (result, image)
    row = {"pair": "hr2msi_bladder", "route": f"default+pixel_size_uncertain/{name}", **describe(result.transform),
           "success": bool(result.success), "gain": float(result.gain),
           "misaligned_by_fraction": result.notes.get("misaligned_by_fraction"), "metric": float(result.metric),
           "turn_ambiguous": bool(result.turn_ambiguous), "start": result.start,
           "warnings": [str(w.message) for w in caught], "seconds": time.perf_counter() - t0,
           "optical_pixel_size_um": optical_px}  # fmt: skip
    rows.append(row)
    print(f"hr2msi {name:20s} scale {row['scale']:.3f} rot {row['rotation_deg']:+.1f}° success {row['success']} "
          f"gain {row['gain']:.3f} by fraction {row['misaligned_by_fraction']} turn_ambiguous "
          f"{row['turn_ambiguous']} {row['seconds']:.0f} s", flush=True)  # fmt: skip
  # Agreement between the results: mean distance (MSI px) between where two results send the optical pixels that
  # fall inside the MSI field under the m/z 798.541 result.
  ref = results["mz_798.541"][0].transform
  ys, xs = np.mgrid[0 : optical.shape[0] : 8, 0 : optical.shape[1] : 8]
  pts = np.stack([xs.ravel() * optical_px, ys.ravel() * optical_px], axis=1)
  mref = np.asarray(ref.matrix, np.float64)
  in_ref = pts @ mref[:2, :2].T + mref[:2, 2]
  extent = np.array([msi.cube.shape[1], msi.cube.shape[0]]) * msi_px
  keep = np.all((in_ref >= 0) & (in_ref <= extent), axis=1)
  for row, (result, _) in zip(rows, results.values()):
    m = np.asarray(result.transform.matrix, np.float64)
    moved = pts[keep] @ m[:2, :2].T + m[:2, 2]
    gap = np.linalg.norm(moved - in_ref[keep], axis=1).mean() / msi_px
    row["mean_distance_to_mz_798.541_result_msi_px"] = float(gap)
    print(f"hr2msi {row['route']}: {row['mean_distance_to_mz_798.541_result_msi_px']:.1f} MSI px from the m/z "
          "798.541 result", flush=True)  # fmt: skip
  if figure:
    draw_hr2msi(optical, optical_px, msi_px, *results["sqrt_sum_of_ions"])
  return rows


def draw_msight(section, transform, label):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  he, he_px = section.he, section.histology_pixel_size_um
  msi_px = float(section.msi.pixel_size_um[1])
  fig, axes = plt.subplots(1, 2, figsize=(14, 5.6))
  for ax, (title, t) in zip(axes, (("landmark affine", section.transform), (label, transform))):
    polygon = np.asarray(tf.warp_image(section.msi.mask.astype(np.float32), t, he.shape[:2], order=0,
                                       fixed_pixel_size_um=he_px, moving_pixel_size_um=msi_px)) > 0.5  # fmt: skip
    ax.imshow(np.clip(he, 0, 1) ** 3)  # contrast stretched: faint tissue against the bare slide
    ax.contour(polygon, [0.5], colors="yellow", linewidths=1.2)
    inverse = np.linalg.inv(np.asarray(t.matrix, np.float64))
    mapped = (section.landmarks[:, 2:] @ inverse[:2, :2].T + inverse[:2, 2]) / he_px
    ax.plot(section.landmarks[:, 0] / he_px, section.landmarks[:, 1] / he_px, "r+", ms=14, mew=2)
    ax.plot(mapped[:, 0], mapped[:, 1], "bx", ms=12, mew=2)
    dist = bladder.landmark_distance_msi_px(t, section.landmarks, msi_px).mean()
    d = describe(t)
    ax.set_title(f"{title}: {dist:.1f} MSI px, scale {d['scale']:.2f}, {d['rotation_deg']:+.1f}°")
    ax.axis("off")
  fig.suptitle("msight_bladder: MSI acquisition polygon (yellow) on the H&E; H&E landmarks red +, MSI landmarks "
               "mapped blue ×")  # fmt: skip
  path = ROOT / "docs" / "figures" / "msight_landmarkfit_vs_registered.png"
  fig.savefig(path, dpi=70, bbox_inches="tight")
  print(f"wrote {path}")


def draw_hr2msi(optical, optical_px, msi_px, result, image):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from msisynth.viz import registration as viz_reg

  # The ions are bright on tissue, the stained section dark on a white slide: draw the ions inverted.
  warped = 1.0 - np.asarray(tf.warp_image(image, result.transform, optical.shape[:2], fixed_pixel_size_um=optical_px,
                                    moving_pixel_size_um=msi_px))  # fmt: skip
  grey = optical @ np.asarray([0.2126, 0.7152, 0.0722], np.float32)
  fig, axes = plt.subplots(2, 1, figsize=(9, 10))
  axes[0].imshow(viz_reg.checkerboard(grey, warped, tiles=10), cmap="gray")
  axes[0].set_title("hr2msi_bladder: optical | √(sum of 3 ions) registered (checkerboard, ions inverted)")
  axes[1].imshow(viz_reg.overlay(grey, warped, invert=True))
  axes[1].set_title(f"overlay: optical magenta, ions green (aligned: grey-white)\nsuccess={result.success}, "
                    f"gain {result.gain:.3f}, scale {describe(result.transform)['scale']:.3f}")  # fmt: skip
  for ax in axes:
    ax.axis("off")
  path = ROOT / "docs" / "figures" / "hr2msi_checkerboard_overlay.png"
  fig.savefig(path, dpi=80, bbox_inches="tight")
  print(f"wrote {path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="msight,hr2msi")
  parser.add_argument("--he_reduce", type=int, default=2)
  parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_real_pairs.json"))
  parser.add_argument("--no-figure", dest="figure", action="store_false")
  args = parser.parse_args()
  warnings.simplefilter("ignore", UserWarning)
  rows = []
  parts = args.parts.split(",")
  if "msight" in parts:
    rows += msight_part(args.he_reduce, args.figure)
  if "sweep" in parts:
    rows += sweep_part()
  if "hr2msi" in parts:
    rows += hr2msi_part(args.figure)
  atomic_write_json(args.output, {"command": "python benchmarks/bench_real_pairs.py", "rows": rows})
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
