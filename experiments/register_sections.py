r"""Registers a folder of MSI sections to their H&E with a trained generator: one report per section, resumable.

Command (from the repository root):
  python -m experiments.register_sections --sections=DIR --checkpoint=WORKDIR --output_dir=OUT \
      [--histology_pixel_size_um=0.5] [--msi_pixel_size_um=20] [--regions=FILE.geojson] [--no_flips]

Layout of --sections: one subfolder per section holding
  - one `.imzML` file and its `.ibd`;
  - one histology image (`.png`, `.jpg`, `.jpeg`, `.tif`, `.tiff`);
  - optionally `regions.geojson` (QuPath polygons drawn on that image; else the global --regions applies);
  - optionally `landmarks.csv` (columns fixed_x, fixed_y in H&E µm, moving_x, moving_y in MSI µm) for the target
    registration error;
  - optionally `section.json`, overriding the flags for this section: {"msi_pixel_size_um": 20,
    "histology_pixel_size_um": 0.5}; it may also name the files ("imzml", "histology", "regions", "landmarks"),
    mark the data as simulated ("simulated": true) and give `read_imzml` options ("read_options": {"bin_width":
    5, "bin_unit": "ppm"}). A `ground_truth.json` saying "simulated": true (as `msisynth.simulate` writes) also
    marks a section simulated.

Output: OUT/<section>/ holds the report of `msisynth.pipeline.process_section` (transform JSON/ITK, figures, the
MSI cube in histology space, metrics.json, report.md) and `DONE.json`, written last; OUT/summary.csv and
OUT/summary.md list every section (status ok/failed, MI before/after, converged, uncertainty, chosen start, TRE,
regions, error). OUT/batch.json records the inputs of the batch.

Resuming: run the same command again. A section whose folder has `DONE.json` is skipped; any other section is
processed in a temporary folder (OUT/.<section>.partial-*) and moved into place only when complete, so an
interrupted run leaves no half-written report under a section's name. A failing section is recorded in the
summary with its error and the batch goes on; the exit status is 1 when any section failed. Every section is
checked before the long work starts, and all problems are reported at once (--validate_only stops there).
--overwrite redoes completed sections too.

Runtime: the registration compiles once per image shape (about a minute on a 2-core CPU with the default
settings); after that a section of about 25 × 30 MSI pixels against a 84 × 114 px H&E takes about 10 s of
registration and 5 s of report on a CPU. Whole-slide sections take longer in proportion to the working-copy and
MSI sizes; a GPU runs the registration in seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import pathlib
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # `python experiments/register_sections.py` as well as `python -m ...`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging

from msisynth import errors

HISTOLOGY_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DONE_MARKER = "DONE.json"
BATCH_FILE = "batch.json"
SECTION_FILE = "section.json"
SUMMARY_COLUMNS = (
  "section",
  "status",
  "run",
  "simulated",
  "mi_before",
  "mi_after",
  "converged",
  "uncertainty_um",
  "start",
  "mirrored",
  "rotation_deg",
  "tre_mean_um",
  "tre_mean_px",
  "n_regions",
  "seconds",
  "report",
  "error",
)
_SECTION_KEYS = (
  "msi_pixel_size_um",
  "histology_pixel_size_um",
  "imzml",
  "histology",
  "regions",
  "landmarks",
  "simulated",
  "read_options",
)
_PARTIAL = ".partial-"
_OLD = ".old-"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the launcher's flags (on the global flags, or on another `FlagValues` for tests)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("sections", None, "Folder with one subfolder per section.", **fv)
  flags.DEFINE_string("checkpoint", None, "Training workdir of the generator (msisynth.train).", **fv)
  flags.DEFINE_string("output_dir", None, "Report folder; one subfolder per section plus summary.csv/md.", **fv)
  flags.DEFINE_float(
    "histology_pixel_size_um", None, "H&E pixel size (µm) of every section without section.json.", **fv
  )
  flags.DEFINE_float("msi_pixel_size_um", None, "MSI pixel size (µm); default: from each imzML file.", **fv)
  flags.DEFINE_string("regions", None, "GeoJSON applied to every section without its own regions.geojson.", **fv)
  flags.DEFINE_bool("no_flips", False, "Do not try 90° rotations and mirror images as registration starts.", **fv)
  flags.DEFINE_bool("overwrite", False, "Redo completed sections and write into a non-empty output folder.", **fv)
  flags.DEFINE_bool(
    "figures", True, "Draw the figures of each report (--nofigures: arrays, images, tables only).", **fv
  )
  flags.DEFINE_bool("validate_only", False, "Check the sections folder, report problems and stop.", **fv)
  flags.DEFINE_float(
    "registration_pixel_size_um",
    None,
    "Working pixel size of registration (µm); default: a quarter of the MSI pixel, never finer than the H&E.",
    **fv,
  )
  flags.DEFINE_float(
    "output_pixel_size_um",
    None,
    "Pixel size (µm) of the MSI cube in histology space; default: the registration pixel size.",
    **fv,
  )
  flags.DEFINE_float(
    "mz_for_figures", None, "m/z of the ion image under the region outlines; default: the most differential ion.", **fv
  )
  flags.DEFINE_float("bin_width", None, "m/z bin width for processed imzML (default: the reader's 10 ppm).", **fv)
  flags.DEFINE_enum("bin_unit", "ppm", ["ppm", "da"], "Unit of --bin_width.", **fv)
  flags.DEFINE_list("mz_range", None, "low,high m/z to read (default: everything).", **fv)
  flags.DEFINE_enum("which", "latest", ["latest", "best"], "Checkpoint to restore.", **fv)
  flags.DEFINE_integer("registration_levels", None, "Pyramid levels of registration (default 3).", **fv)
  flags.DEFINE_list("registration_iterations", None, "Adam steps per level, coarse to fine (default 150,100,80).", **fv)
  flags.DEFINE_integer("registration_samples", None, "Pixels sampled per level for MI (default 32768).", **fv)
  flags.DEFINE_integer(
    "registration_candidates",
    None,
    "Registration starts carried from the coarsest level to the finer ones (default 3).",
    **fv,
  )


# ----------------------------------------------------------------------------------------------------------------
# Finding and checking the sections.


@dataclasses.dataclass
class SectionPlan:
  """One section folder, as found and checked before any long work.

  Attributes:
    name: the subfolder's name (the section's name in the outputs).
    folder: the subfolder.
    imzml: the .imzML file, or None when missing or ambiguous.
    histology: the H&E image, or None when missing or ambiguous.
    msi_pixel_size_um: from section.json, the flag or the imzML metadata; None when unknown.
    histology_pixel_size_um: from section.json or the flag; None when unknown.
    regions: the GeoJSON to use, or None.
    landmarks: landmarks.csv, or None.
    simulated: True when section.json or ground_truth.json says so, else None (the data decide).
    read_options: keyword arguments of `read_imzml`.
    problems: what is wrong; the section is not run when there is any.
  """

  name: str
  folder: pathlib.Path
  imzml: pathlib.Path | None = None
  histology: pathlib.Path | None = None
  msi_pixel_size_um: float | tuple[float, float] | None = None
  histology_pixel_size_um: float | tuple[float, float] | None = None
  regions: pathlib.Path | None = None
  landmarks: pathlib.Path | None = None
  simulated: bool | None = None
  read_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not self.problems


def _pixel_size(value, what: str, problems: list[str]):
  try:
    arr = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
  except (TypeError, ValueError):
    arr = []
  if len(arr) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in arr):
    problems.append(f"{what} must be a positive number or a [y, x] pair, got {value!r}")
    return None
  return arr[0] if len(arr) == 1 else (arr[0], arr[1])


def _named_file(folder: pathlib.Path, value, key: str, problems: list[str]) -> pathlib.Path | None:
  path = folder / str(value)
  if not path.is_file():
    problems.append(f"{SECTION_FILE} names {key} {value!r}, which is not a file in the folder")
    return None
  return path


def _is_simulated_ground_truth(folder: pathlib.Path) -> bool:
  path = folder / "ground_truth.json"
  if not path.is_file():
    return False
  try:
    return json.loads(path.read_text(encoding="utf-8")).get("simulated") is True
  except (OSError, ValueError, AttributeError):
    return False


def plan_section(
  folder: pathlib.Path,
  *,
  histology_pixel_size_um: float | None = None,
  msi_pixel_size_um: float | None = None,
  regions: pathlib.Path | None = None,
  read_options: dict[str, Any] | None = None,
) -> SectionPlan:
  """Finds a section's files and pixel sizes and checks them, without reading intensities.

  Args:
    folder: the section's folder.
    histology_pixel_size_um: the default H&E pixel size (µm), or None.
    msi_pixel_size_um: the default MSI pixel size (µm), or None for the imzML metadata.
    regions: the default GeoJSON, or None.
    read_options: default `read_imzml` options.

  Returns:
    The plan, with every problem found in `problems`.
  """
  from msisynth import io as msi_io
  from msisynth import regions as msi_regions

  plan = SectionPlan(name=folder.name, folder=folder, read_options=dict(read_options or {}))
  problems = plan.problems
  settings: dict[str, Any] = {}
  section_json = folder / SECTION_FILE
  if section_json.is_file():
    try:
      settings = json.loads(section_json.read_text(encoding="utf-8"))
      if not isinstance(settings, dict):
        raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
      problems.append(f"{SECTION_FILE} cannot be read: {e}")
      settings = {}
    unknown = sorted(set(settings) - set(_SECTION_KEYS))
    if unknown:
      problems.append(f"{SECTION_FILE} has unknown keys {unknown} (known: {list(_SECTION_KEYS)})")

  files = sorted(p for p in folder.iterdir() if p.is_file())
  if "imzml" in settings:
    plan.imzml = _named_file(folder, settings["imzml"], "imzml", problems)
  else:
    found = [p for p in files if p.suffix.lower() == ".imzml"]
    if not found:
      problems.append("no .imzML file")
    elif len(found) > 1:
      problems.append(
        f"{len(found)} .imzML files ({', '.join(p.name for p in found)}); keep one, or name it in "
        f'{SECTION_FILE} as "imzml"'
      )
    else:
      plan.imzml = found[0]
  if "histology" in settings:
    plan.histology = _named_file(folder, settings["histology"], "histology", problems)
  else:
    found = [p for p in files if p.suffix.lower() in HISTOLOGY_SUFFIXES]
    if not found:
      problems.append(f"no histology image ({', '.join(HISTOLOGY_SUFFIXES)})")
    elif len(found) > 1:
      problems.append(
        f"{len(found)} histology images ({', '.join(p.name for p in found)}); keep one, or name it in "
        f'{SECTION_FILE} as "histology"'
      )
    else:
      plan.histology = found[0]

  info = None
  if plan.imzml is not None:
    try:
      info = msi_io.imzml_info(plan.imzml)
    except errors.MSISynthError as e:
      problems.append(f"the imzML cannot be read: {e}")

  if "msi_pixel_size_um" in settings:
    plan.msi_pixel_size_um = _pixel_size(settings["msi_pixel_size_um"], "msi_pixel_size_um", problems)
  elif msi_pixel_size_um is not None:
    plan.msi_pixel_size_um = msi_pixel_size_um
  elif info is not None and info.get("pixel_size_um") is not None:
    plan.msi_pixel_size_um = tuple(float(v) for v in info["pixel_size_um"])
  elif info is not None:
    problems.append(
      f"unknown MSI pixel size: {plan.imzml.name} does not give it; pass --msi_pixel_size_um or set "
      f'"msi_pixel_size_um" in {SECTION_FILE}'
    )
  if "histology_pixel_size_um" in settings:
    plan.histology_pixel_size_um = _pixel_size(settings["histology_pixel_size_um"], "histology_pixel_size_um", problems)
  elif histology_pixel_size_um is not None:
    plan.histology_pixel_size_um = histology_pixel_size_um
  else:
    problems.append(
      f'unknown histology pixel size: pass --histology_pixel_size_um or set "histology_pixel_size_um" in {SECTION_FILE}'
    )

  if "regions" in settings:
    plan.regions = _named_file(folder, settings["regions"], "regions", problems)
  elif (folder / "regions.geojson").is_file():
    plan.regions = folder / "regions.geojson"
  else:
    plan.regions = regions
  if plan.regions is not None:
    try:
      msi_regions.read_geojson_regions(plan.regions)
    except errors.MSISynthError as e:
      problems.append(f"the regions cannot be read: {e}")
  if "landmarks" in settings:
    plan.landmarks = _named_file(folder, settings["landmarks"], "landmarks", problems)
  elif (folder / "landmarks.csv").is_file():
    plan.landmarks = folder / "landmarks.csv"
  if "read_options" in settings:
    if isinstance(settings["read_options"], dict):
      plan.read_options.update(settings["read_options"])
    else:
      problems.append(f'"read_options" in {SECTION_FILE} must be an object')
  if "simulated" in settings:
    plan.simulated = bool(settings["simulated"])
  elif _is_simulated_ground_truth(folder):
    plan.simulated = True
  return plan


def find_sections(sections_dir: str | os.PathLike, **defaults) -> list[SectionPlan]:
  """Plans every section subfolder of `sections_dir` (hidden folders are skipped), sorted by name.

  Args:
    sections_dir: the folder of section folders.
    **defaults: passed to `plan_section`.

  Returns:
    One plan per subfolder.

  Raises:
    DataError: when the folder is missing or has no subfolder.
  """
  root = pathlib.Path(sections_dir)
  if not root.is_dir():
    raise errors.DataError("the sections folder does not exist", root)
  folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not folders:
    raise errors.DataError("the sections folder has no section subfolder (one per section: .imzML + .ibd + H&E)", root)
  return [plan_section(folder, **defaults) for folder in folders]


# ----------------------------------------------------------------------------------------------------------------
# Running.


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def _check_output_dir(out: pathlib.Path, record: dict[str, Any], overwrite: bool) -> None:
  """Refuses an output folder that holds something other than this batch's earlier output."""
  if out.exists() and not out.is_dir():
    raise errors.DataError("the output folder is a file", out)
  if not out.is_dir() or not any(out.iterdir()) or overwrite:
    return
  batch = out / BATCH_FILE
  if not batch.is_file():
    raise errors.DataError(
      "the output folder is not empty and holds no earlier register_sections batch; pass --overwrite to write "
      "into it, or choose another folder",
      out,
    )
  try:
    earlier = json.loads(batch.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise errors.DataError(f"{BATCH_FILE} cannot be read ({e}); pass --overwrite to start again", out) from e
  for key in ("sections", "checkpoint"):
    if earlier.get(key) != record.get(key):
      raise errors.DataError(
        f"the output folder holds a batch of {key} {earlier.get(key)!r}, not {record.get(key)!r}; resuming would "
        "mix them: pass --overwrite to redo every section, or choose another folder",
        out,
      )


def _clean_leftovers(out: pathlib.Path) -> None:
  """Removes the temporary folders an interrupted run left behind."""
  for path in out.iterdir():
    if path.is_dir() and path.name.startswith(".") and (_PARTIAL in path.name or _OLD in path.name):
      logging.info("removing %s, left by an interrupted run", path)
      shutil.rmtree(path, ignore_errors=True)


def _row(
  plan: SectionPlan, status: str, run: str, metrics: dict | None = None, seconds: float | None = None, error: str = ""
) -> dict[str, Any]:
  m = metrics or {}
  tre = m.get("tre") or {}
  regions = m.get("regions") or {}
  return {
    "section": plan.name,
    "status": status,
    "run": run,
    "simulated": m.get("simulated", plan.simulated or False),
    "mi_before": m.get("mi_before"),
    "mi_after": m.get("mi_after"),
    "converged": m.get("converged"),
    "uncertainty_um": m.get("uncertainty_um"),
    "start": m.get("start"),
    "mirrored": m.get("mirrored"),
    "rotation_deg": m.get("rotation_deg"),
    "tre_mean_um": tre.get("mean_um"),
    "tre_mean_px": tre.get("mean_px"),
    "n_regions": regions.get("n_regions"),
    "seconds": None if seconds is None else round(seconds, 1),
    "report": f"{plan.name}/report.md" if status == "ok" else "",
    "error": error,
  }


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.6g}" if math.isfinite(value) else ""
  return str(value).replace("\n", " ")


def write_summary(out: pathlib.Path, rows: Sequence[dict[str, Any]]) -> None:
  """Writes OUT/summary.csv and OUT/summary.md (each replaced atomically)."""
  import io

  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _cell(row.get(k)) for k in SUMMARY_COLUMNS})
  _atomic_write_text(out / "summary.csv", buffer.getvalue())

  n_ok = sum(r["status"] == "ok" for r in rows)
  simulated = any(r.get("simulated") is True for r in rows)
  title = "# Batch registration summary" + (" (includes simulated data)" if simulated else "")
  lines = [title, "", f"{n_ok} of {len(rows)} sections registered; {len(rows) - n_ok} failed.", ""]
  if simulated:
    lines += ["Sections marked simulated hold simulated MSI: their numbers are on simulated data.", ""]
  lines += [
    "| section | status | MI before → after (bits) | converged | uncertainty (µm) | start | TRE (µm) | "
    "regions | error |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    name = f"[{r['section']}]({r['report']})" if r.get("report") else r["section"]
    if r.get("simulated") is True:
      name += " (simulated)"
    mi = f"{_cell(r.get('mi_before')) or 'n/a'} → {_cell(r.get('mi_after')) or 'n/a'}" if r["status"] == "ok" else ""
    error = _cell(r.get("error")).replace("|", "\\|")
    lines.append(
      f"| {name} | {r['status']}{' (earlier run)' if r.get('run') == 'earlier' else ''} | {mi} | "
      f"{_cell(r.get('converged'))} | {_cell(r.get('uncertainty_um'))} | {_cell(r.get('start'))} | "
      f"{_cell(r.get('tre_mean_um'))} | {_cell(r.get('n_regions'))} | {error} |"
    )
  _atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")


def _read_done(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    done = json.loads(path.read_text(encoding="utf-8"))
    return done if isinstance(done, dict) else None
  except (OSError, ValueError):
    return None


def _run_one(plan: SectionPlan, synthesizer, out: pathlib.Path, options: dict[str, Any]) -> dict[str, Any]:
  """Processes one section into a temporary folder and moves it into place when complete."""
  from msisynth import pipeline

  final = out / plan.name
  tmp = out / f".{plan.name}{_PARTIAL}{uuid.uuid4().hex[:8]}"
  start = time.perf_counter()
  try:
    inputs = pipeline.SectionInputs(
      msi=plan.imzml,
      histology=plan.histology,
      histology_pixel_size_um=plan.histology_pixel_size_um,
      msi_pixel_size_um=plan.msi_pixel_size_um,
      regions=plan.regions,
      landmarks=plan.landmarks,
      name=plan.name,
      read_options=plan.read_options,
      simulated=plan.simulated,
    )
    result = pipeline.process_section(inputs, synthesizer, out_dir=tmp, **options)
    seconds = time.perf_counter() - start
    row = _row(plan, "ok", "this run", result.metrics, seconds)
    done = {
      "section": plan.name,
      "completed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "seconds": round(seconds, 1),
      "inputs": {
        "imzml": os.fspath(plan.imzml),
        "histology": os.fspath(plan.histology),
        "regions": None if plan.regions is None else os.fspath(plan.regions),
        "landmarks": None if plan.landmarks is None else os.fspath(plan.landmarks),
      },
      "files": sorted(p.name for p in result.paths.values()),
      "summary": row,
    }
    _atomic_write_text(tmp / DONE_MARKER, json.dumps(done, indent=2, default=str) + "\n")
  except Exception as e:  # A failing section is recorded and the batch goes on.
    shutil.rmtree(tmp, ignore_errors=True)
    logging.error("section %s failed: %s\n%s", plan.name, e, traceback.format_exc())
    message = f"{type(e).__name__}: {e}"
    return _row(plan, "failed", "this run", seconds=time.perf_counter() - start, error=message)
  # Move into place: an earlier (incomplete or replaced) folder is set aside first, then removed.
  old = None
  if final.exists():
    old = out / f".{plan.name}{_OLD}{uuid.uuid4().hex[:8]}"
    os.replace(final, old)
  os.replace(tmp, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return row


def _load_synthesizer(checkpoint, which: str):
  from msisynth import synthesize

  return synthesize.load_synthesizer(checkpoint, which=which)


def run_batch(
  sections_dir: str | os.PathLike,
  output_dir: str | os.PathLike,
  *,
  checkpoint: str | os.PathLike | None = None,
  synthesizer: Callable | None = None,
  histology_pixel_size_um: float | None = None,
  msi_pixel_size_um: float | None = None,
  regions: str | os.PathLike | None = None,
  flips: bool = True,
  overwrite: bool = False,
  validate_only: bool = False,
  read_options: dict[str, Any] | None = None,
  which: str = "latest",
  registration_config=None,
  **section_options,
) -> list[dict[str, Any]]:
  """Processes every section folder of `sections_dir` into `output_dir` (see the module docstring).

  Args:
    sections_dir: one subfolder per section.
    output_dir: the report folder.
    checkpoint: the generator's training workdir (restored after the sections are checked).
    synthesizer: a callable MSIImage -> RGB on the MSI grid to use instead of `checkpoint`.
    histology_pixel_size_um: H&E pixel size of sections without section.json, µm.
    msi_pixel_size_um: MSI pixel size, µm; None for each imzML's metadata.
    regions: GeoJSON for sections without their own regions.geojson.
    flips: try 90° rotations and mirror images as registration starts.
    overwrite: redo completed sections; write into a non-empty folder that holds another batch.
    validate_only: check the sections, write nothing, and return.
    read_options: `read_imzml` options for every section (section.json may add to them).
    which: "latest" or "best" checkpoint.
    registration_config: `RegistrationConfig` for every section (None: the pipeline's default).
    **section_options: more keyword arguments of `process_section` (registration_pixel_size_um,
      output_pixel_size_um, mz_for_figures, figures).

  Returns:
    One summary row per section (the rows of summary.csv).

  Raises:
    DataError: for a missing sections folder, a missing checkpoint or regions file, an output folder that holds
      something else (without `overwrite`), or, with `validate_only`, any problem.
    ConfigError: when neither `checkpoint` nor `synthesizer` is given.
  """
  if synthesizer is None and checkpoint is None and not validate_only:
    raise errors.ConfigError("give a checkpoint (the generator's training workdir) or a synthesizer")
  global_problems = []
  if checkpoint is not None and synthesizer is None and not pathlib.Path(checkpoint).is_dir():
    global_problems.append(f"{checkpoint}: the checkpoint folder does not exist")
  if regions is not None and not pathlib.Path(regions).is_file():
    global_problems.append(f"{regions}: the regions file does not exist")
  if global_problems:
    raise errors.DataError("; ".join(global_problems))

  plans = find_sections(
    sections_dir,
    histology_pixel_size_um=histology_pixel_size_um,
    msi_pixel_size_um=msi_pixel_size_um,
    regions=None if regions is None else pathlib.Path(regions),
    read_options=read_options,
  )
  names = [p.name.lower() for p in plans]
  for plan in plans:
    if names.count(plan.name.lower()) > 1:
      plan.problems.append("another section folder has the same name up to case")
    if plan.name.lower() in ("summary.csv", "summary.md", BATCH_FILE):
      plan.problems.append("the folder name is reserved for the summary")
  bad = [p for p in plans if not p.ok]
  for plan in bad:
    for problem in plan.problems:
      logging.error("section %s: %s", plan.name, problem)
  logging.info("%d sections found, %d ready, %d with problems", len(plans), len(plans) - len(bad), len(bad))
  if validate_only:
    if bad:
      raise errors.DataError("; ".join(f"{p.name}: {', '.join(p.problems)}" for p in bad), sections_dir)
    return [_row(p, "ok", "not run") for p in plans]

  out = pathlib.Path(output_dir)
  record = {
    "sections": os.fspath(pathlib.Path(sections_dir).resolve()),
    "checkpoint": None if checkpoint is None else os.fspath(pathlib.Path(checkpoint).resolve()),
  }
  _check_output_dir(out, record, overwrite)
  out.mkdir(parents=True, exist_ok=True)
  _clean_leftovers(out)
  _atomic_write_text(out / BATCH_FILE, json.dumps(record, indent=2) + "\n")

  pending = []
  rows: dict[str, dict[str, Any]] = {}
  for plan in plans:
    if not plan.ok:
      rows[plan.name] = _row(plan, "failed", "not run", error="; ".join(plan.problems))
      continue
    done = None if overwrite else _read_done(out / plan.name / DONE_MARKER)
    if done is not None and isinstance(done.get("summary"), dict):
      row = {k: done["summary"].get(k) for k in SUMMARY_COLUMNS}
      row.update(section=plan.name, status="ok", run="earlier")
      rows[plan.name] = row
      logging.info("section %s: done in an earlier run; skipped", plan.name)
    else:
      if (out / plan.name).exists():
        logging.info("section %s: an incomplete earlier output is redone", plan.name)
      pending.append(plan)

  def ordered():
    return [rows[p.name] for p in plans if p.name in rows]

  if pending and synthesizer is None:
    logging.info("restoring the generator from %s", checkpoint)
    synthesizer = _load_synthesizer(checkpoint, which)
  options = dict(section_options, flips=flips, registration_config=registration_config)
  for i, plan in enumerate(pending):
    logging.info("section %s (%d of %d to run)", plan.name, i + 1, len(pending))
    rows[plan.name] = _run_one(plan, synthesizer, out, options)
    write_summary(out, ordered())
  write_summary(out, ordered())
  n_failed = sum(r["status"] != "ok" for r in rows.values())
  logging.info("batch done: %d ok, %d failed; summary in %s", len(rows) - n_failed, n_failed, out / "summary.md")
  return ordered()


def registration_config_from_flags(flag_values: flags.FlagValues):
  """The `RegistrationConfig` the registration flags ask for, or None for the pipeline's default."""
  from msisynth.register import optimize

  changes = {}
  if flag_values.registration_levels is not None:
    changes["levels"] = int(flag_values.registration_levels)
  if flag_values.registration_iterations:
    its = tuple(int(v) for v in flag_values.registration_iterations)
    changes["max_iterations"] = its[0] if len(its) == 1 else its
  if flag_values.registration_samples is not None:
    changes["max_samples"] = int(flag_values.registration_samples)
  if flag_values.registration_candidates is not None:
    changes["num_candidates"] = int(flag_values.registration_candidates)
  return optimize.RegistrationConfig(similarity="mi", **changes) if changes else None


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """Runs the batch the flags describe.

  Returns:
    The exit status: 0 when every section is ok, 1 when any failed, 2 for a problem that stops the batch.
  """
  fv = flag_values
  missing = [] if fv.sections else ["sections"]
  if not fv.validate_only:
    missing += [name for name in ("checkpoint", "output_dir") if not fv[name].value]
  if missing:
    logging.error("missing flags: %s", ", ".join(f"--{m}" for m in missing))
    return 2
  read_options: dict[str, Any] = {}
  if fv.bin_width is not None:
    read_options.update(bin_width=float(fv.bin_width), bin_unit=fv.bin_unit)
  if fv.mz_range:
    if len(fv.mz_range) != 2:
      logging.error("--mz_range takes two values, low,high")
      return 2
    read_options["mz_range"] = (float(fv.mz_range[0]), float(fv.mz_range[1]))
  try:
    config = registration_config_from_flags(fv)
    rows = run_batch(
      fv.sections,
      fv.output_dir or ".",
      checkpoint=fv.checkpoint,
      histology_pixel_size_um=fv.histology_pixel_size_um,
      msi_pixel_size_um=fv.msi_pixel_size_um,
      regions=fv.regions,
      flips=not fv.no_flips,
      overwrite=fv.overwrite,
      validate_only=fv.validate_only,
      read_options=read_options,
      which=fv.which,
      registration_config=config,
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
    logging.error(
      "%d section(s) failed: %s (see %s)", len(failed), ", ".join(failed), pathlib.Path(fv.output_dir) / "summary.md"
    )
    return 1
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)
