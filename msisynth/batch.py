"""A folder of MSI sections registered with one generator: planning, resumable batches, shards and summaries.

Layout of a sections folder: one subfolder per section holding
  - one `.imzML` file and its `.ibd`;
  - one histology image (`.png`, `.jpg`, `.jpeg`, `.tif`, `.tiff`);
  - optionally `regions.geojson` (QuPath polygons drawn on that image; else the batch's default regions apply);
  - optionally `landmarks.csv` (columns fixed_x, fixed_y in H&E µm, moving_x, moving_y in MSI µm) for the target
    registration error;
  - optionally `section.json`, overriding the defaults for this section: {"msi_pixel_size_um": 20,
    "histology_pixel_size_um": 0.5}; it may also name the files ("imzml", "histology", "regions", "landmarks"),
    mark the data as simulated ("simulated": true) and give `read_imzml` options ("read_options": {"bin_width":
    5, "bin_unit": "ppm"}). A `ground_truth.json` saying "simulated": true (as `msisynth.simulate` writes) also
    marks a section simulated.

`run_batch` writes OUT/<section>/ (the report of `msisynth.pipeline.process_section` plus the exports asked for,
see `msisynth.export`) with `DONE.json` written last, and OUT/summary.csv + OUT/summary.md listing every section.
OUT/batch.json records the inputs of the batch.

Resuming: run the same batch again. A section whose folder has `DONE.json` is skipped; any other section is
processed in a temporary folder (OUT/.<section>.partial-*) and moved into place only when complete, so an
interrupted run leaves no half-written report under a section's name. A failing section is recorded in the
summary with its error and the batch goes on. Every section is checked before the long work starts, and all
problems are reported at once.

Shards: `shard=(i, n)` runs only the sections whose index in the sorted list is i modulo n, so the n tasks of a
cluster array job split one folder with no coordination. Each shard writes its own table
(OUT/summary.shard-<i>-of-<n>.csv and batch.shard-<i>-of-<n>.json) and touches only its own sections;
`merge_summaries(OUT)` then writes the one summary.csv/md of the whole batch.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
import pathlib
import re
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from msisynth import errors, geometry, outputs, progress

HISTOLOGY_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DONE_MARKER = "DONE.json"
BATCH_FILE = "batch.json"
SECTION_FILE = "section.json"
OWNER = "msisynth.batch"
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
_SHARD_FILE = re.compile(r"^summary\.shard-(\d+)-of-(\d+)\.csv$")


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
    msi_pixel_size_um: from section.json, the default or the imzML metadata; None when unknown.
    histology_pixel_size_um: from section.json or the default; None when unknown.
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
    """Whether the section can be run (no problem was found)."""
    return not self.problems


def _pixel_size(value, what: str, problems: list[str]):
  """A pixel size as given (a number stays a number), parsed by `geometry.pixel_size_yx`; None on a problem."""
  try:
    py, px = geometry.pixel_size_yx(value, what)
  except errors.ConfigError as e:
    problems.append(str(e))
    return None
  return py if not isinstance(value, list | tuple) or len(value) == 1 else (py, px)


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


def _one_file(
  files: list[pathlib.Path], suffixes: tuple[str, ...], what: str, key: str, problems: list[str], hint: str = ""
):
  found = [p for p in files if p.suffix.lower() in suffixes]
  if not found:
    problems.append(f"no {what}{hint}")
    return None
  if len(found) > 1:
    problems.append(
      f'{len(found)} {what}s ({", ".join(p.name for p in found)}); keep one, or name it in {SECTION_FILE} as "{key}"'
    )
    return None
  return found[0]


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
    plan.imzml = _one_file(files, (".imzml",), ".imzML file", "imzml", problems)
  if "histology" in settings:
    plan.histology = _named_file(folder, settings["histology"], "histology", problems)
  else:
    hint = f" ({', '.join(HISTOLOGY_SUFFIXES)})"
    plan.histology = _one_file(files, HISTOLOGY_SUFFIXES, "histology image", "histology", problems, hint)

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
    One plan per subfolder, with the problems of names that clash (up to case) or are reserved.

  Raises:
    DataError: when the folder is missing or has no subfolder.
  """
  root = pathlib.Path(sections_dir)
  if not root.is_dir():
    raise errors.DataError("the sections folder does not exist", root)
  folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not folders:
    raise errors.DataError("the sections folder has no section subfolder (one per section: .imzML + .ibd + H&E)", root)
  plans = [plan_section(folder, **defaults) for folder in folders]
  names = [p.name.lower() for p in plans]
  for plan in plans:
    if names.count(plan.name.lower()) > 1:
      plan.problems.append("another section folder has the same name up to case")
    if plan.name.lower() in ("summary.csv", "summary.md", BATCH_FILE):
      plan.problems.append("the folder name is reserved for the summary")
  return plans


# ----------------------------------------------------------------------------------------------------------------
# Shards.


def parse_shard(value: str | Sequence[int] | None) -> tuple[int, int]:
  """Reads a shard "i/n" (0 <= i < n) or an (i, n) pair; None is the whole batch, (0, 1).

  Raises:
    ConfigError: for anything else.
  """
  if value is None or value == "":
    return (0, 1)
  try:
    if isinstance(value, str):
      i, n = (int(v) for v in value.split("/"))
    else:
      i, n = (int(v) for v in value)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"a shard is 'i/n' with 0 <= i < n (e.g. 0/4), got {value!r}") from e
  if n < 1 or not 0 <= i < n:
    raise errors.ConfigError(f"a shard is 'i/n' with 0 <= i < n (e.g. 0/4), got {value!r}")
  return (i, n)


def shard_of(names: Sequence[str], shard: tuple[int, int]) -> list[str]:
  """The names (sorted) that shard (i, n) runs: every n-th from the i-th, so shards never overlap."""
  i, n = shard
  return sorted(names)[i::n]


def _shard_tag(shard: tuple[int, int]) -> str:
  return f"shard-{shard[0]}-of-{shard[1]}"


# ----------------------------------------------------------------------------------------------------------------
# The output folder.


def _batch_records(out: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in out.glob("batch*.json") if p.name == BATCH_FILE or p.name.startswith("batch.shard-"))


def _only_batch_scaffolding(out: pathlib.Path) -> bool:
  """Whether `out` holds nothing but hidden files (the marker, temporary files, sections in progress) and shard
  records and tables: what other shards starting at the same moment leave."""
  for path in out.iterdir():
    if path.name.startswith((".", "batch.shard-", "summary.shard-")) or path.name == BATCH_FILE:
      continue
    return False
  return True


def _prepare_batch_dir(out: pathlib.Path, record: dict[str, Any], overwrite: bool) -> None:
  """Creates the output folder, or checks that it holds this batch's earlier output (or `overwrite`).

  Raises:
    OutputExistsError: the folder is a file, holds files msisynth did not write, or holds another batch or
      another launcher's output (without `overwrite`).
  """
  if out.exists() and not out.is_dir():
    raise errors.OutputExistsError("the output folder is a file", out)
  for attempt in range(50):
    try:
      return _check_batch_dir(out, record, overwrite)
    except errors.OutputExistsError:
      # Another shard starting at the same moment may be writing the marker (a hidden temporary file until then).
      being_created = out.is_dir() and not outputs.is_own_dir(out) and _only_batch_scaffolding(out)
      if not being_created or attempt == 49:
        raise
      time.sleep(0.1)


def _check_batch_dir(out: pathlib.Path, record: dict[str, Any], overwrite: bool) -> None:
  if not out.is_dir() or not any(out.iterdir()):
    try:
      outputs.prepare_output_dir(out, overwrite=overwrite, owner=OWNER)
      return
    except errors.OutputExistsError:
      if not (out.is_dir() and outputs.is_own_dir(out)):
        raise
      # Another shard created the folder at the same moment: check it like any earlier one.
  if not outputs.is_own_dir(out):
    raise errors.OutputExistsError(
      "the output folder is not empty and was not created by msisynth; choose a new or empty folder "
      "(nothing was changed)",
      out,
    )
  if overwrite:
    return
  records = _batch_records(out)
  if not records:
    if _only_batch_scaffolding(out):  # another shard has just created the folder
      return
    raise errors.OutputExistsError(
      "the output folder holds no earlier register_sections batch; pass --overwrite to write into it, or "
      "choose another folder",
      out,
    )
  for path in records:
    try:
      earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise errors.OutputExistsError(f"{path.name} cannot be read ({e}); pass --overwrite to start again", out) from e
    for key in ("sections", "checkpoint"):
      if earlier.get(key) != record.get(key):
        raise errors.OutputExistsError(
          f"the output folder holds a batch of {key} {earlier.get(key)!r}, not {record.get(key)!r}; resuming "
          "would mix them: pass --overwrite to redo every section, or choose another folder",
          out,
        )


def _clean_leftovers(out: pathlib.Path, names: Sequence[str]) -> None:
  """Removes the temporary folders an interrupted run left behind for these sections (never another shard's)."""
  mine = set(names)
  for path in out.iterdir():
    if not (path.is_dir() and path.name.startswith(".")):
      continue
    for sep in (_PARTIAL, _OLD):
      if sep in path.name and path.name[1:].rsplit(sep, 1)[0] in mine:
        logging.info("removing %s, left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)
        break


# ----------------------------------------------------------------------------------------------------------------
# Summary tables.


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


def _typed(value: str) -> Any:
  """A summary.csv cell back as the value it was written from (number, bool, None or text)."""
  if value == "":
    return None
  if value in ("True", "False"):
    return value == "True"
  try:
    number = float(value)
  except ValueError:
    return value
  return int(number) if re.fullmatch(r"-?\d+", value) else number


def read_summary_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a summary.csv (or a shard's table) back into rows of typed values.

  Raises:
    DataError: when the file cannot be read or has other columns.
  """
  path = pathlib.Path(path)
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if tuple(reader.fieldnames or ()) != SUMMARY_COLUMNS:
        raise errors.DataError(f"not a batch summary table (columns {reader.fieldnames})", path)
      rows = list(reader)
  except OSError as e:
    raise errors.DataError(f"cannot be read: {e.strerror or e}", path) from e
  return [
    {k: (_typed(v) if k not in ("section", "report", "error", "start") else v) for k, v in r.items()} for r in rows
  ]


def _summary_csv(rows: Sequence[dict[str, Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _cell(row.get(k)) for k in SUMMARY_COLUMNS})
  return buffer.getvalue()


def _summary_markdown(rows: Sequence[dict[str, Any]], note: str = "") -> str:
  n_ok = sum(r["status"] == "ok" for r in rows)
  simulated = any(r.get("simulated") is True for r in rows)
  title = "# Batch registration summary" + (" (includes simulated data)" if simulated else "")
  lines = [title, "", f"{n_ok} of {len(rows)} sections registered; {len(rows) - n_ok} failed.", ""]
  if note:
    lines += [note, ""]
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
  return "\n".join(lines) + "\n"


def write_summary(out: str | os.PathLike, rows: Sequence[dict[str, Any]], *, note: str = "") -> None:
  """Writes OUT/summary.csv and OUT/summary.md (each replaced atomically)."""
  out = pathlib.Path(out)
  outputs.atomic_write(out / "summary.csv", _summary_csv(rows))
  outputs.atomic_write(out / "summary.md", _summary_markdown(rows, note))


def merge_summaries(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """Merges the shards' tables of a sharded batch into OUT/summary.csv and OUT/summary.md.

  Rows are sorted by section name. Missing shards are named in summary.md (and logged); the merge can be run
  again once they finish.

  Args:
    output_dir: the batch's output folder (every shard's `output_dir`).

  Returns:
    The merged rows.

  Raises:
    DataError: when the folder holds no shard table, or tables of different shard counts.
  """
  out = pathlib.Path(output_dir)
  tables = {}
  counts = set()
  if out.is_dir():
    for path in out.iterdir():
      match = _SHARD_FILE.match(path.name)
      if match:
        tables[int(match.group(1))] = path
        counts.add(int(match.group(2)))
  if not tables:
    raise errors.DataError("holds no shard table (summary.shard-<i>-of-<n>.csv); run the shards first", out)
  if len(counts) != 1:
    raise errors.DataError(
      f"holds shard tables of different shard counts {sorted(counts)}; remove the stale ones and merge again", out
    )
  (n,) = counts
  rows = {}
  for i in sorted(tables):
    for row in read_summary_csv(tables[i]):
      rows[row["section"]] = row
  merged = [rows[name] for name in sorted(rows)]
  missing = [i for i in range(n) if i not in tables]
  note = ""
  if missing:
    note = f"Shards {', '.join(f'{i}/{n}' for i in missing)} have not written their table yet."
    logging.warning("%s: %s", out, note)
  write_summary(out, merged, note=note)
  logging.info("merged %d shard table(s) of %d: %d sections → %s", len(tables), n, len(merged), out / "summary.md")
  return merged


# ----------------------------------------------------------------------------------------------------------------
# Running.


def _read_done(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    done = json.loads(path.read_text(encoding="utf-8"))
    return done if isinstance(done, dict) else None
  except (OSError, ValueError):
    return None


def _run_one(
  plan: SectionPlan, synthesizer, out: pathlib.Path, options: dict[str, Any], export_options: dict[str, Any]
) -> dict[str, Any]:
  """Processes one section into a temporary folder and moves it into place when complete."""
  from msisynth import export, pipeline

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
    formats = export_options.get("output_format")
    # No exports asked for means the report alone, with its dense cube.
    carry = not formats or "npy" in formats
    result = pipeline.process_section(inputs, synthesizer, out_dir=tmp, **{"carry_msi": carry, **options})
    if formats:
      export.write_section_exports(result, tmp, histology=plan.histology, regions=plan.regions, **export_options)
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
    outputs.atomic_write_json(tmp / DONE_MARKER, done)
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


def load_synthesizer(checkpoint: str | os.PathLike, which: str = "latest") -> Callable:
  """The generator of a training workdir (`msisynth.synthesize.load_synthesizer`), restored once per batch."""
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
  shard: str | tuple[int, int] | None = None,
  output_format: Sequence[str] = (),
  export_options: dict[str, Any] | None = None,
  **section_options,
) -> list[dict[str, Any]]:
  """Processes every section folder of `sections_dir` (or one shard of them) into `output_dir`.

  See the module docstring for the layout, resuming and shards.

  Args:
    sections_dir: one subfolder per section.
    output_dir: the report folder.
    checkpoint: the generator's training workdir (restored after the sections are checked, and only when a
      section is left to run).
    synthesizer: a callable MSIImage -> RGB on the MSI grid to use instead of `checkpoint`.
    histology_pixel_size_um: H&E pixel size of sections without section.json, µm.
    msi_pixel_size_um: MSI pixel size, µm; None for each imzML's metadata.
    regions: GeoJSON for sections without their own regions.geojson.
    flips: try 90° rotations and mirror images as registration starts.
    overwrite: redo completed sections; write into a non-empty msisynth folder that holds another batch.
    validate_only: check the sections, write nothing, and return.
    read_options: `read_imzml` options for every section (section.json may add to them).
    which: "latest" or "best" checkpoint.
    registration_config: `RegistrationConfig` for every section (None: the pipeline's default).
    shard: "i/n" or (i, n): run only this shard's sections and write this shard's table (None: all sections).
    output_format: exports written beside each report (`msisynth.export.OUTPUT_FORMATS`, e.g. "spatialdata").
    export_options: more keyword arguments of `msisynth.export.write_section_exports`.
    **section_options: more keyword arguments of `process_section` (registration_pixel_size_um,
      output_pixel_size_um, mz_for_figures, figures).

  Returns:
    One summary row per section of this shard (the rows of its table).

  Raises:
    DataError: for a missing sections folder, a missing checkpoint or regions file, or, with `validate_only`,
      any problem.
    OutputExistsError: an output folder that holds something else (without `overwrite`).
    ConfigError: when neither `checkpoint` nor `synthesizer` is given, or for a bad shard or output format.
  """
  from msisynth import export

  shard = parse_shard(shard)
  formats = export.check_output_format(output_format)
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
  mine = set(shard_of([p.name for p in plans], shard))
  plans = [p for p in plans if p.name in mine]
  bad = [p for p in plans if not p.ok]
  for plan in bad:
    for problem in plan.problems:
      logging.error("section %s: %s", plan.name, problem)
  where = "" if shard == (0, 1) else f" in shard {shard[0]}/{shard[1]}"
  logging.info("%d sections%s, %d ready, %d with problems", len(plans), where, len(plans) - len(bad), len(bad))
  if validate_only:
    if bad:
      raise errors.DataError("; ".join(f"{p.name}: {', '.join(p.problems)}" for p in bad), sections_dir)
    return [_row(p, "ok", "not run") for p in plans]

  out = pathlib.Path(output_dir)
  record = {
    "sections": os.fspath(pathlib.Path(sections_dir).resolve()),
    "checkpoint": None if checkpoint is None else os.fspath(pathlib.Path(checkpoint).resolve()),
    "shard": list(shard),
    "output_format": list(formats),
  }
  _prepare_batch_dir(out, record, overwrite)
  _clean_leftovers(out, [p.name for p in plans])
  batch_file = BATCH_FILE if shard == (0, 1) else f"batch.{_shard_tag(shard)}.json"
  outputs.atomic_write_json(out / batch_file, record)

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

  def save():
    if shard == (0, 1):
      write_summary(out, ordered())
    else:
      outputs.atomic_write(out / f"summary.{_shard_tag(shard)}.csv", _summary_csv(ordered()))

  if pending and synthesizer is None:
    logging.info("restoring the generator from %s", checkpoint)
    synthesizer = load_synthesizer(checkpoint, which)
  options = dict(section_options, flips=flips, registration_config=registration_config)
  exports = dict(export_options or {}, output_format=formats)
  with progress.bar(desc="registering sections", total=len(pending), unit="section") as b:
    for i, plan in enumerate(pending):
      logging.info("section %s (%d of %d to run%s)", plan.name, i + 1, len(pending), where)
      b.set_postfix_str(plan.name)
      rows[plan.name] = _run_one(plan, synthesizer, out, options, exports)
      save()
      b.update(1)
  save()
  n_failed = sum(r["status"] != "ok" for r in rows.values())
  logging.info("batch%s done: %d ok, %d failed; table in %s", where, len(rows) - n_failed, n_failed, out)
  return ordered()
