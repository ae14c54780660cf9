r"""Registers a folder of MSI sections to their H&E with a trained generator: one report per section, resumable.

Command (from the repository root):
  python -m experiments.register_sections --sections=DIR --checkpoint=WORKDIR --output_dir=OUT \
      [--histology_pixel_size_um=0.5] [--msi_pixel_size_um=20] [--regions=FILE.geojson] [--no_flips] \
      [--output_format=npy,spatialdata,ome_tiff,geojson] [--shard=i/n]
  after a sharded run:  python -m experiments.register_sections --merge --output_dir=OUT

The folder layout (one subfolder per section: .imzML + .ibd, an H&E image, optional regions.geojson,
landmarks.csv and section.json), resuming and sharding are described in `msisynth.batch`. Output: OUT/<section>/
holds the report of `msisynth.pipeline.process_section` plus the exports of --output_format (`msisynth.export`:
section.zarr for SpatialData, ion_images.ome.tif, msi_segments.geojson) and DONE.json, written last; OUT/summary.csv
and OUT/summary.md list every section. The exit status is 1 when any section failed, 2 for a problem that stops
the batch. --overwrite redoes completed sections too.

A cluster array job runs one shard per task with no coordination (SLURM, 8 tasks):
  #SBATCH --array=0-7
  python -m experiments.register_sections --sections=DIR --checkpoint=W --output_dir=OUT \
      --shard=${SLURM_ARRAY_TASK_ID}/8
then, once all have finished (e.g. `sbatch --dependency=afterany:<jobid> ...`):
  python -m experiments.register_sections --merge --output_dir=OUT

Runtime: the registration compiles once per image shape (about a minute on a 2-core CPU with the default
settings); after that a section of about 25 × 30 MSI pixels against a 84 × 114 px H&E takes about 10 s of
registration and 5 s of report on a CPU. Whole-slide sections take longer in proportion to the working-copy and
MSI sizes; a GPU runs the registration in seconds.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

if __package__ in (None, ""):  # `python experiments/register_sections.py` as well as `python -m ...`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags, logging

from msisynth import batch, cli, errors, export

# The batch's names, re-exported for scripts and tests that used them from here.
DONE_MARKER = batch.DONE_MARKER
SUMMARY_COLUMNS = batch.SUMMARY_COLUMNS
find_sections = batch.find_sections
run_batch = batch.run_batch


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the launcher's flags (on the global flags, or on another `FlagValues` for tests)."""
  fv = dict(flag_values=flag_values)
  if flag_values is not flags.FLAGS:  # the shared launcher flags live on the global FlagValues (msisynth.cli)
    flags.DEFINE_bool("overwrite", False, "Redo completed sections; write into an msisynth folder of another batch.",
                      **fv)  # fmt: skip
  flags.DEFINE_string("sections", None, "Folder with one subfolder per section.", **fv)
  flags.DEFINE_string("checkpoint", None, "Training workdir of the generator (msisynth.train).", **fv)
  flags.DEFINE_string("output_dir", None, "Report folder; one subfolder per section plus summary.csv/md.", **fv)
  flags.DEFINE_float("histology_pixel_size_um", None, "H&E pixel size (µm) of sections without section.json.", **fv)
  flags.DEFINE_float("msi_pixel_size_um", None, "MSI pixel size (µm); default: from each imzML file.", **fv)
  flags.DEFINE_string("regions", None, "GeoJSON applied to every section without its own regions.geojson.", **fv)
  flags.DEFINE_bool("no_flips", False, "Do not try 90° rotations and mirror images as registration starts.", **fv)
  flags.DEFINE_bool("figures", True, "Draw the figures of each report (--nofigures: arrays, images, tables).", **fv)
  flags.DEFINE_bool("validate_only", False, "Check the sections folder, report problems and stop.", **fv)
  flags.DEFINE_float("registration_pixel_size_um", None, "Working pixel size of registration (µm); default: a "
                     "quarter of the MSI pixel, never finer than the H&E.", **fv)  # fmt: skip
  flags.DEFINE_float("output_pixel_size_um", None, "Pixel size (µm) of the MSI cube in histology space; default: "
                     "the registration pixel size.", **fv)  # fmt: skip
  flags.DEFINE_float("mz_for_figures", None, "m/z of the ion image under the region outlines.", **fv)
  flags.DEFINE_float("bin_width", None, "m/z bin width for processed imzML (default: the reader's 10 ppm).", **fv)
  flags.DEFINE_enum("bin_unit", "ppm", ["ppm", "da"], "Unit of --bin_width.", **fv)
  flags.DEFINE_list("mz_range", None, "low,high m/z to read (default: everything).", **fv)
  flags.DEFINE_enum("which", "latest", ["latest", "best"], "Checkpoint to restore.", **fv)
  flags.DEFINE_integer("registration_levels", None, "Pyramid levels of registration (default 3).", **fv)
  flags.DEFINE_list("registration_iterations", None, "Adam steps per level, coarse to fine (default 150,100,80).", **fv)
  flags.DEFINE_integer("registration_samples", None, "Pixels sampled per level for MI (default 32768).", **fv)
  flags.DEFINE_integer("registration_candidates", None, "Registration starts carried to the finer levels (default "
                       "3).", **fv)  # fmt: skip
  flags.DEFINE_list("output_format", ["npy"], f"What each section writes beside its report, any of "
                    f"{list(export.OUTPUT_FORMATS)} (no npy: no dense cube in histology space).", **fv)  # fmt: skip
  flags.DEFINE_list("export_mz", None, "m/z of the ion images of --output_format=ome_tiff (default: the most "
                    "differential ions).", **fv)  # fmt: skip
  flags.DEFINE_integer("segments", 4, "k of the k-means MSI segments of --output_format=geojson/spatialdata.", **fv)
  flags.DEFINE_string("shard", None, "i/n: run only every n-th section from the i-th (array jobs).", **fv)
  flags.DEFINE_bool("merge", False, "Merge the shards' tables in --output_dir into summary.csv/md and stop.", **fv)


def registration_config_from_flags(flag_values: flags.FlagValues):
  """The `RegistrationConfig` the registration flags ask for, or None for the pipeline's default."""
  from msisynth.register import optimize

  fv, changes = flag_values, {}
  if fv.registration_levels is not None:
    changes["levels"] = int(fv.registration_levels)
  if fv.registration_iterations:
    its = tuple(int(v) for v in fv.registration_iterations)
    changes["max_iterations"] = its[0] if len(its) == 1 else its
  if fv.registration_samples is not None:
    changes["max_samples"] = int(fv.registration_samples)
  if fv.registration_candidates is not None:
    changes["num_candidates"] = int(fv.registration_candidates)
  return optimize.RegistrationConfig(similarity="mi", **changes) if changes else None


def _read_options(fv: flags.FlagValues) -> dict[str, Any]:
  options: dict[str, Any] = {}
  if fv.bin_width is not None:
    options.update(bin_width=float(fv.bin_width), bin_unit=fv.bin_unit)
  if fv.mz_range:
    if len(fv.mz_range) != 2:
      raise errors.ConfigError("--mz_range takes two values, low,high")
    options["mz_range"] = (float(fv.mz_range[0]), float(fv.mz_range[1]))
  return options


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """Runs the batch (or the merge) the flags describe.

  Returns:
    The exit status: 0 when every section is ok, 1 when any failed, 2 for a problem that stops the batch.
  """
  fv = flag_values
  try:
    if fv.merge:
      if not fv.output_dir:
        raise errors.ConfigError("--merge needs --output_dir")
      rows = batch.merge_summaries(fv.output_dir)
      return 1 if any(r["status"] != "ok" for r in rows) else 0
    missing = [] if fv.sections else ["sections"]
    if not fv.validate_only:
      missing += [name for name in ("checkpoint", "output_dir") if not fv[name].value]
    if missing:
      raise errors.ConfigError(f"missing flags: {', '.join(f'--{m}' for m in missing)}")
    exports = {"n_segments": int(fv.segments)}
    if fv.export_mz:
      exports["mz_values"] = [float(v) for v in fv.export_mz]
    rows = batch.run_batch(
      fv.sections,
      fv.output_dir or ".",
      checkpoint=fv.checkpoint,
      histology_pixel_size_um=fv.histology_pixel_size_um,
      msi_pixel_size_um=fv.msi_pixel_size_um,
      regions=fv.regions,
      flips=not fv.no_flips,
      overwrite=fv.overwrite,
      validate_only=fv.validate_only,
      read_options=_read_options(fv),
      which=fv.which,
      registration_config=registration_config_from_flags(fv),
      shard=fv.shard,
      output_format=[] if fv.output_format == ["npy"] else fv.output_format,
      export_options=exports,
      registration_pixel_size_um=fv.registration_pixel_size_um,
      output_pixel_size_um=fv.output_pixel_size_um,
      mz_for_figures=fv.mz_for_figures,
      figures=fv.figures,
    )
  except errors.MSISynthError as e:
    logging.error("%s", e)
    return 2
  if fv.validate_only:
    logging.info("all %d sections are ready", len(rows))
    return 0
  failed = [r["section"] for r in rows if r["status"] != "ok"]
  if failed:
    logging.error("%d section(s) failed: %s (see the summary in %s)", len(failed), ", ".join(failed), fv.output_dir)
    return 1
  return 0


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  return run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
