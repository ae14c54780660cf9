r"""Registers one image (or one MSI section through its synthetic H&E) to a fixed image by mutual information.

Commands (from the repository root; `python experiments/register.py ...` works too):
  image to image:
    python -m experiments.register --fixed=he.png --fixed_pixel_size_um=1 \
        --moving=other.png --moving_pixel_size_um=2 --output_dir=reports/register [--landmarks=points.csv]
  MSI to histology (synthetic H&E from a trained generator; flips and 90° turns are tried by default):
    python -m experiments.register --fixed=he.png --fixed_pixel_size_um=1 \
        --msi=section.imzML --checkpoint=workdirs/pix2pix --output_dir=reports/register

The MSI route is `msisynth.pipeline.process_section`, the function `experiments.register_sections` runs per
section: the synthetic H&E is registered at its own pixel size (the MSI pixel / the upsampling factor the
generator was trained at, recorded in its checkpoint). It writes the section report of
`msisynth.report.write_section_report` (transform.json/.tfm, synthetic_he.png, checkerboards, overlay,
msi_in_histology_space.npy on the fixed grid or at --output_pixel_size_um, its mask, mz.npy, metrics.json,
report.md), and the exports --output_format asks for (`msisynth.export.write_section_exports`: section.zarr,
ion_images.ome.tif, msi_segments.geojson; without npy the dense cube is left out). The image route is
`msisynth.pipeline.register_images` and writes transform.json/.tfm,
warped_moving.tif/.png, checkerboard.png, overlay.png, landmarks.png (with --landmarks) and metrics.json.
In metrics.json, `mi_*` / `nmi_*` are the evaluation MI (hard histogram, bits) before and after;
`registration_metric` is the value the registration maximised. --output_dir must be new or empty (or one
msisynth wrote, with --overwrite).

Landmarks CSV: columns fixed_x, fixed_y, moving_x, moving_y in µm (or *_px in pixels).
Runtime: a few seconds to a minute on a CPU for images of a few hundred pixels across (most of it compiling the
registration once per image shape); registration of 2048² images takes seconds on a GPU.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # `python experiments/register.py` as well as `python -m experiments.register`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags

from msisynth import cli, errors


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the launcher's flags on `flag_values` (a separate FlagValues lets tests run it in-process)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("fixed", None, "Fixed image (histology): PNG, JPEG or TIFF.", **fv)
  flags.DEFINE_float("fixed_pixel_size_um", None, "Fixed pixel size (µm).", **fv)
  flags.DEFINE_string("fixed_mask", None, "Optional fixed mask image (non-zero = use); --moving only.", **fv)
  flags.DEFINE_string("moving", None, "Moving image (PNG, JPEG or TIFF); or give --msi and --checkpoint.", **fv)
  flags.DEFINE_float("moving_pixel_size_um", None, "Moving (or MSI) pixel size (µm); with --msi default: the file's.",
                     **fv)  # fmt: skip
  flags.DEFINE_string("moving_mask", None, "Optional moving mask image (non-zero = use); --moving only.", **fv)
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
  flags.DEFINE_float("working_pixel_size_um", None, "Finest pixel size registration works at (µm); with --msi "
                     "default: msisynth.geometry.working_pixel_size_um.", **fv)  # fmt: skip
  flags.DEFINE_bool("simulated", False, "Mark the outputs as simulated data.", **fv)
  flags.DEFINE_string("output_dir", None, "Output folder.", **fv)
  if "overwrite" not in flag_values:  # `cli` defines it on the global flags
    flags.DEFINE_bool("overwrite", False, "Write into a non-empty --output_dir that msisynth created.", **fv)
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
  if fv.msi and (fv.fixed_mask or fv.moving_mask):
    problems.append("--fixed_mask and --moving_mask apply to --moving only (--msi uses the measured-pixel mask)")
  if fv.moving and list(fv.output_format) != ["npy"]:
    problems.append("--output_format applies to --msi only")
  if fv.moving and not fv.moving_pixel_size_um:
    problems.append("--moving needs --moving_pixel_size_um")
  if fv.iterations and not all(v.strip().lstrip("-").isdigit() and int(v) > 0 for v in fv.iterations):
    problems.append(f"--iterations must be positive integers, got {','.join(fv.iterations)}")
  if not fv.output_dir:
    problems.append("--output_dir is required")
  if fv.iterations and not all(v.strip().isdigit() and int(v) > 0 for v in fv.iterations):
    problems.append(f"--iterations must be positive integers, got {','.join(fv.iterations)}")
  if problems:
    raise errors.ConfigError("; ".join(problems))


def _mask(path, shape, name):
  from msisynth import io

  mask = io.read_image(path)
  mask = mask.max(axis=2) if mask.ndim == 3 else mask
  if mask.shape != tuple(shape):
    raise errors.DataError(f"{name} shape {mask.shape} != image shape {tuple(shape)}", path)
  return mask > 0


def _registration_config(fv, flips: bool, working):
  from msisynth.register import optimize

  iterations = None
  if fv.iterations:
    its = tuple(int(v) for v in fv.iterations)
    iterations = its[0] if len(its) == 1 else its
  return optimize.RegistrationConfig(similarity=fv.similarity, kind=fv.kind, levels=fv.levels,
                                     max_iterations=iterations, max_samples=fv.samples, flips_and_rot90=flips,
                                     working_pixel_size_um=working)  # fmt: skip


def run(fv: flags.FlagValues) -> dict:
  """Runs the registration the flags describe and writes the outputs; returns the metrics written.

  Raises:
    ConfigError: for missing or contradictory flags.
    OutputExistsError: for a non-empty output folder without --overwrite (or one msisynth did not create).
    DataError, RegistrationError: for unreadable inputs or a refused registration.
  """
  _check_flags(fv)
  from msisynth import io, pipeline

  flips = bool(fv.msi) if fv.flips is None else bool(fv.flips)
  overwrite = bool(fv.overwrite)
  if fv.msi:
    from msisynth import synthesize

    section = pipeline.SectionInputs(
      msi=fv.msi, histology=fv.fixed, histology_pixel_size_um=fv.fixed_pixel_size_um,
      msi_pixel_size_um=fv.moving_pixel_size_um, landmarks=fv.landmarks, simulated=fv.simulated or None,
      read_options={} if fv.bin_width is None else {"bin_width": fv.bin_width, "bin_unit": fv.bin_unit})
    result = pipeline.process_section(
      section, synthesize.load_synthesizer(fv.checkpoint), registration_pixel_size_um=fv.working_pixel_size_um,
      flips=flips, output_pixel_size_um=fv.output_pixel_size_um or fv.fixed_pixel_size_um,
      registration_config=_registration_config(fv, flips, None), out_dir=fv.output_dir, overwrite=overwrite,
      carry_msi="npy" in fv.output_format)
    if list(fv.output_format) != ["npy"]:
      from msisynth import export, outputs

      exported = export.write_section_exports(result, fv.output_dir, output_format=fv.output_format,
                                              histology=fv.fixed, overwrite=overwrite)  # fmt: skip
      result.metrics["exports"] = {k: p.name for k, p in exported.items()}
      outputs.atomic_write_json(pathlib.Path(fv.output_dir) / "metrics.json", result.metrics)
    return result.metrics
  fixed, moving = io.read_image(fv.fixed), io.read_image(fv.moving)
  result = pipeline.register_images(
    fixed, moving, fixed_pixel_size_um=fv.fixed_pixel_size_um, moving_pixel_size_um=fv.moving_pixel_size_um,
    fixed_mask=None if not fv.fixed_mask else _mask(fv.fixed_mask, fixed.shape[:2], "--fixed_mask"),
    moving_mask=None if not fv.moving_mask else _mask(fv.moving_mask, moving.shape[:2], "--moving_mask"),
    landmarks=fv.landmarks, registration_config=_registration_config(fv, flips, fv.working_pixel_size_um),
    simulated=fv.simulated, fixed_name=str(fv.fixed), moving_name=str(fv.moving), out_dir=fv.output_dir,
    overwrite=overwrite)
  return result.metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
