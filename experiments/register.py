r"""Registers one image (or one MSI section through its synthetic H&E) to a fixed image by mutual information.

Commands (from the repository root; `python experiments/register.py ...` works too):
  image to image:
    python -m experiments.register --fixed=he.png --fixed_pixel_size_um=1 \
        --moving=other.png --moving_pixel_size_um=2 --output_dir=reports/register [--landmarks=points.csv]
  MSI to histology (synthetic H&E from a trained generator; flips and 90° turns are tried by default):
    python -m experiments.register --fixed=he.png --fixed_pixel_size_um=1 \
        --msi=section.imzML --checkpoint=workdirs/pix2pix --output_dir=reports/register

Writes into --output_dir (refused when it is not empty, unless --overwrite):
  transform.json, transform.tfm   the FIXED → MOVING transform in µm (msisynth JSON; ITK text for SimpleITK)
  warped_moving.tif / .png        the moving image resampled onto the fixed grid (all channels in the TIFF)
  checkerboard.png, overlay.png   before (identity) / after checkerboards and a magenta/green overlay
  landmarks.png                   with --landmarks
  metrics.json                    MI and NMI before/after (inside the overlap), TRE before/after with --landmarks,
                                  convergence, uncertainty (µm), the chosen start and the candidates
  with --msi also: synthetic_he.png (MSI grid), msi_in_histology.npy (H, W, C float32 on the fixed grid or at
  --output_pixel_size_um), msi_mask_in_histology.npy and mz.npy

Landmarks CSV: columns fixed_x, fixed_y, moving_x, moving_y in µm (or *_px in pixels).
Runtime: a few seconds to a minute on a CPU for images of a few hundred pixels across (most of it compiling the
registration once per image shape); registration of 2048² images takes seconds on a GPU.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

if __package__ in (None, ""):  # `python experiments/register.py` as well as `python -m experiments.register`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging

from msisynth import cli, errors, outputs


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the launcher's flags on `flag_values` (a separate FlagValues lets tests run it in-process)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("fixed", None, "Fixed image (histology): PNG, JPEG or TIFF.", **fv)
  flags.DEFINE_float("fixed_pixel_size_um", None, "Fixed pixel size (µm).", **fv)
  flags.DEFINE_string("fixed_mask", None, "Optional fixed mask image (non-zero = use).", **fv)
  flags.DEFINE_string("moving", None, "Moving image (PNG, JPEG or TIFF); or give --msi and --checkpoint.", **fv)
  flags.DEFINE_float("moving_pixel_size_um", None, "Moving (or MSI) pixel size (µm); with --msi default: the file's.",
                     **fv)  # fmt: skip
  flags.DEFINE_string("moving_mask", None, "Optional moving mask image (non-zero = use).", **fv)
  flags.DEFINE_string("msi", None, "imzML file to register through its synthetic H&E.", **fv)
  flags.DEFINE_string("checkpoint", None, "Training workdir of the generator (with --msi).", **fv)
  flags.DEFINE_float("bin_width", None, "m/z bin width for processed imzML (default: the reader's).", **fv)
  flags.DEFINE_enum("bin_unit", "ppm", ["ppm", "da"], "Unit of --bin_width.", **fv)
  flags.DEFINE_float("output_pixel_size_um", None, "Pixel size (µm) of the MSI cube in histology space; default: "
                     "the fixed pixel size.", **fv)  # fmt: skip
  flags.DEFINE_string("landmarks", None, "CSV of matched points (fixed_x, fixed_y, moving_x, moving_y µm).", **fv)
  flags.DEFINE_enum("similarity", "mi", ["mi", "nmi", "ncc", "mse"], "Similarity measure.", **fv)
  flags.DEFINE_enum("kind", "affine", ["affine", "similarity", "rigid"], "Transform family.", **fv)
  flags.DEFINE_bool("flips", None, "Also start from 90° turns and mirror images (default: on with --msi).", **fv)
  flags.DEFINE_integer("levels", 3, "Pyramid levels.", lower_bound=1, **fv)
  flags.DEFINE_list("iterations", None, "Adam steps per level, coarse to fine (default 150,100,80).", **fv)
  flags.DEFINE_integer("samples", 16384, "Pixels sampled per level.", lower_bound=1, **fv)
  flags.DEFINE_float("working_pixel_size_um", None, "Finest pixel size registration works at (µm).", **fv)
  flags.DEFINE_bool("simulated", False, "Mark the outputs as simulated data.", **fv)
  flags.DEFINE_string("output_dir", None, "Output folder.", **fv)
  if "overwrite" not in flag_values:  # msisynth.cli defines it once on the global flags, for every launcher
    flags.DEFINE_bool("overwrite", False, "Write into a non-empty --output_dir.", **fv)
  flags.DEFINE_list("output_format", ["npy"], "With --msi, what to write besides the report: any of npy, "
                    "spatialdata, ome_tiff, geojson (msisynth.export).", **fv)  # fmt: skip


def _check_flags(fv: flags.FlagValues) -> None:
  problems = []
  if not fv.fixed:
    problems.append("--fixed is required")
  if not fv.fixed_pixel_size_um or fv.fixed_pixel_size_um <= 0:
    problems.append("--fixed_pixel_size_um must be a positive number")
  if bool(fv.moving) == bool(fv.msi):
    problems.append("give exactly one of --moving (an image) and --msi (an imzML file)")
  if fv.msi and not fv.checkpoint:
    problems.append("--msi needs --checkpoint, the workdir of a trained generator")
  if fv.moving and not fv.moving_pixel_size_um:
    problems.append("--moving needs --moving_pixel_size_um")
  if not fv.output_dir:
    problems.append("--output_dir is required")
  if fv.iterations and not all(v.strip().isdigit() and int(v) > 0 for v in fv.iterations):
    problems.append(f"--iterations must be positive integers, got {','.join(fv.iterations)}")
  if problems:
    raise errors.ConfigError("; ".join(problems))


def _mask(path, shape, name):
  import numpy as np

  from msisynth import io

  mask = io.read_image(path)
  if mask.ndim == 3:
    mask = mask.max(axis=2)
  if mask.shape != tuple(shape):
    raise errors.DataError(f"{name} shape {mask.shape} != image shape {tuple(shape)}", path)
  return np.asarray(mask > 0)


def _synthesize(fv):
  """(synthetic H&E, MSIImage) from --msi and --checkpoint."""
  from msisynth import io

  try:
    from msisynth import synthesize
  except ImportError as e:
    raise errors.ConfigError(f"--msi needs msisynth.synthesize, which cannot be imported here: {e}") from e
  if not hasattr(synthesize, "load_synthesizer"):
    raise errors.ConfigError("--msi needs msisynth.synthesize.load_synthesizer, which this installation lacks")
  options = {} if fv.bin_width is None else {"bin_width": fv.bin_width, "bin_unit": fv.bin_unit}
  msi = io.read_imzml(fv.msi, **options)
  synthesizer = synthesize.load_synthesizer(fv.checkpoint)
  return synthesizer(msi), msi


def _display(image):
  """Image as float in [0, 1] for a PNG: RGB as is (clipped), otherwise the grey level scaled by percentiles."""
  import numpy as np

  img = np.asarray(image, np.float32)
  if img.ndim == 3 and img.shape[2] == 3 and img.min() >= 0 and img.max() <= 1:
    return img
  grey = img if img.ndim == 2 else img.mean(axis=2)
  lo, hi = np.percentile(grey, [1, 99])
  return np.clip((grey - lo) / max(hi - lo, 1e-12), 0, 1)


def run(fv: flags.FlagValues) -> dict:
  """Runs the registration the flags describe and writes the outputs; returns the metrics written.

  Raises:
    ConfigError: for missing or contradictory flags, or a non-empty output folder without --overwrite.
    DataError, RegistrationError: for unreadable inputs or a refused registration.
  """
  _check_flags(fv)
  import numpy as np

  from msisynth import io
  from msisynth.register import evaluate, optimize, transform_io
  from msisynth.register import similarity as sim
  from msisynth.register import transforms as tf
  from msisynth.viz import registration as viz

  out = pathlib.Path(fv.output_dir)
  if out.exists() and any(out.iterdir()) and not fv.overwrite:
    raise errors.ConfigError(f"{out} is not empty; pass --overwrite to write into it, or choose another --output_dir")
  started = time.time()
  overwrite = bool(fv.overwrite)

  fixed = io.read_image(fv.fixed)
  fixed_px = tf.pixel_size_yx(fv.fixed_pixel_size_um, "--fixed_pixel_size_um")
  fixed_mask = None if not fv.fixed_mask else _mask(fv.fixed_mask, fixed.shape[:2], "--fixed_mask")
  msi = None
  if fv.msi:
    moving, msi = _synthesize(fv)
    moving_px = fv.moving_pixel_size_um or msi.pixel_size_um
    if moving_px is None:
      raise errors.ConfigError(f"{fv.msi} does not give its pixel size; pass --moving_pixel_size_um")
    moving_mask = None if msi.mask.all() else msi.mask
    moving_name = str(fv.msi)
  else:
    moving = io.read_image(fv.moving)
    moving_px = fv.moving_pixel_size_um
    moving_mask = None
    moving_name = str(fv.moving)
  moving_px = tf.pixel_size_yx(moving_px, "--moving_pixel_size_um")
  if fv.moving_mask:
    moving_mask = _mask(fv.moving_mask, moving.shape[:2], "--moving_mask")
  landmarks = None  # every input is read and checked before anything is written
  if fv.landmarks:
    landmarks = evaluate.load_landmarks_csv(fv.landmarks, fixed_pixel_size_um=fixed_px, moving_pixel_size_um=moving_px)

  flips = bool(fv.msi) if fv.flips is None else bool(fv.flips)
  iterations = None
  if fv.iterations:
    its = tuple(int(v) for v in fv.iterations)
    iterations = its[0] if len(its) == 1 else its
  working = fv.working_pixel_size_um
  if working is None and msi is not None:
    working = max(math.sqrt(moving_px[0] * moving_px[1]) / 2, math.sqrt(fixed_px[0] * fixed_px[1]))
  config = optimize.RegistrationConfig(similarity=fv.similarity, kind=fv.kind, levels=fv.levels,
                                       max_iterations=iterations, max_samples=fv.samples, flips_and_rot90=flips,
                                       working_pixel_size_um=working)  # fmt: skip
  logging.info("registering %s (%s px at %s µm) to %s (%s px at %s µm)", moving_name, moving.shape[:2], moving_px,
               fv.fixed, fixed.shape[:2], fixed_px)  # fmt: skip
  result = optimize.register(fixed, moving, fixed_pixel_size_um=fixed_px, moving_pixel_size_um=moving_px,
                             fixed_mask=fixed_mask, moving_mask=moving_mask, config=config)  # fmt: skip
  seconds = time.time() - started
  logging.info("registered in %.1f s: %s %.4f, start %s, converged %s, uncertainty %.1f µm", seconds,
               result.metric_name, result.metric, result.start, result.converged, result.uncertainty_um)  # fmt: skip
  summary = optimize.result_summary(result)
  tag = " (simulated)" if fv.simulated or (msi is not None and msi.metadata.get("simulated")) else ""

  common = {"fixed_pixel_size_um": fixed_px, "moving_pixel_size_um": moving_px}
  out.mkdir(parents=True, exist_ok=True)
  transform_io.save_transform_json(out / "transform.json", result.transform, fixed_shape=fixed.shape[:2],
                                   moving_shape=moving.shape[:2], fixed_name=str(fv.fixed), moving_name=moving_name,
                                   metadata={"registration": summary, "simulated": bool(tag)}, overwrite=overwrite,
                                   **common)  # fmt: skip
  center = np.asarray(tf.image_center_um(fixed.shape[:2], fixed_px), np.float64)
  transform_io.save_itk_transform(out / "transform.tfm", result.transform, center_um=center, overwrite=overwrite)

  identity = tf.AffineTransform.identity()
  warped = np.asarray(tf.warp_image(moving, result.transform, fixed.shape[:2], **common))
  before = np.asarray(tf.warp_image(moving, identity, fixed.shape[:2], **common))
  io.write_image(out / "warped_moving.tif", warped.astype(np.float32), overwrite=overwrite)
  io.write_image(out / "warped_moving.png", _display(warped), overwrite=overwrite)

  # MI / NMI on the fixed grid, inside the part of it the moving image covers.
  fixed_grey = optimize.to_grey(fixed)
  quality = {}
  for name, t, image in (("before", identity, before), ("after", result.transform, warped)):
    inside = np.asarray(tf.warp_image(np.ones(moving.shape[:2], bool), t, fixed.shape[:2], order=0, **common))
    if fixed_mask is not None:
      inside &= fixed_mask
    grey = optimize.to_grey(image)
    if inside.sum() < 16:
      quality[f"mi_{name}"] = quality[f"nmi_{name}"] = None
      continue
    quality[f"mi_{name}"] = float(sim.mutual_information(fixed_grey, grey, bins=32, mask=inside))
    quality[f"nmi_{name}"] = float(sim.normalized_mutual_information(fixed_grey, grey, bins=32, mask=inside))

  def save_fig(fig, name):
    outputs.save_figure(fig, out / name, dpi=120, overwrite=overwrite)

  save_fig(viz.plot_checkerboard_before_after(fixed, before, warped, pixel_size_um=fixed_px, simulated=bool(tag),
                                              titles=("Before registration (identity)",
                                                      "After registration")), "checkerboard.png")  # fmt: skip
  save_fig(viz.plot_overlay(fixed, warped, pixel_size_um=fixed_px, simulated=bool(tag),
                            title="Fixed (magenta) and registered moving (green)"), "overlay.png")  # fmt: skip

  metrics = {
    "fixed": str(fv.fixed),
    "moving": moving_name,
    "simulated": bool(tag),
    "fixed_pixel_size_um": list(fixed_px),
    "moving_pixel_size_um": list(moving_px),
    **quality,
    "seconds": seconds,
    "converged": result.converged,
    "uncertainty_um": result.uncertainty_um,
    "registration": summary,
  }
  if landmarks is not None:
    for name, t in (("before", identity), ("after", result.transform)):
      tre = evaluate.target_registration_error(t, landmarks[:, :2], landmarks[:, 2:], moving_px)
      metrics[f"tre_{name}"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in tre.items()}
    save_fig(viz.plot_landmarks(fixed, moving, landmarks[:, :2], landmarks[:, 2:], transform=result.transform,
                                fixed_pixel_size_um=fixed_px, moving_pixel_size_um=moving_px,
                                simulated=bool(tag)), "landmarks.png")  # fmt: skip

  if msi is not None:
    io.write_image(out / "synthetic_he.png", np.clip(moving, 0, 1), overwrite=overwrite)
    out_px = fixed_px if fv.output_pixel_size_um is None else tf.pixel_size_yx(fv.output_pixel_size_um)
    out_shape = tuple(int(math.floor((n - 1) * p / q)) + 1 for n, p, q in zip(fixed.shape[:2], fixed_px, out_px))
    carried = tf.warp_msi(msi, result.transform, out_shape, out_px, moving_pixel_size_um=moving_px)
    for name, array in (("msi_in_histology.npy", carried.cube), ("msi_mask_in_histology.npy", carried.mask),
                        ("mz.npy", carried.mz)):  # fmt: skip
      outputs.save_npy(out / name, array, overwrite=overwrite)
    metrics["msi_in_histology"] = {"shape": list(carried.cube.shape), "pixel_size_um": list(out_px)}
    from msisynth import export

    formats = [f for f in export.check_output_format(fv.output_format) if f != "npy"]
    exported = export.write_exports(out, formats, histology=fixed, histology_pixel_size_um=fixed_px, msi=msi,
                                    transform=result.transform, msi_pixel_size_um=moving_px, simulated=bool(tag),
                                    name=pathlib.Path(fv.msi).stem, overwrite=overwrite)  # fmt: skip
    metrics["exports"] = {k: p.name for k, p in exported.items()}

  outputs.atomic_write(out / "metrics.json", json.dumps(metrics, indent=2, default=float) + "\n", overwrite=overwrite)
  for warning in result.warnings:
    logging.warning("%s", warning)
  logging.info("wrote %s", out)
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
