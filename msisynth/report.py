"""Report folders: the files a processed section (or a registered image pair) is written as.

`msisynth.pipeline` computes; this module writes. `write_section_report(result, out_dir)` writes a
`pipeline.SectionResult` (what `process_section(..., out_dir=...)` does at its end); `write_pair_report` writes a
`pipeline.PairResult` of two registered images. Every file goes through `msisynth.outputs` (atomic writes; an
output folder is prepared by `prepare_output_dir`, and an existing file or folder raises `OutputExistsError`
unless `overwrite`).

Two MI estimators appear in a report, under distinct names: `mi_before` / `mi_after` (and `nmi_*`) are the
evaluation MI of `msisynth.metrics` (hard histogram of grey levels, bits), the same in every report;
`registration_metric` is the value the registration maximised (for "mi", the Parzen-window MI of
`msisynth.register.similarity`, bits).
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import TYPE_CHECKING

import numpy as np

from msisynth import errors, geometry, outputs
from msisynth import io as msi_io
from msisynth import regions as msi_regions

if TYPE_CHECKING:
  from msisynth.pipeline import PairResult, SectionResult

# File names of a section report, in the order `report.md` lists them.
REPORT_FILES = {
  "transform_json": "transform.json",
  "transform_tfm": "transform.tfm",
  "synthetic_he": "synthetic_he.png",
  "registered_synthetic_he": "registered_synthetic_he.png",
  "histology_working": "histology_working.png",
  "checkerboard_before": "checkerboard_before.png",
  "checkerboard_after": "checkerboard_after.png",
  "overlay": "overlay.png",
  "landmarks": "landmarks.png",
  "msi_in_histology_space": "msi_in_histology_space.npy",
  "msi_mask_in_histology_space": "msi_mask_in_histology_space.npy",
  "mz": "mz.npy",
  "region_labels_msi": "region_labels_msi.npy",
  "region_table": "region_table.csv",
  "region_mean_spectra": "region_mean_spectra.csv",
  "differential_ions": "differential_ions.csv",
  "regions_on_ion_image": "regions_on_ion_image.png",
  "region_spectra": "region_spectra.png",
  "metrics": "metrics.json",
  "report": "report.md",
}

_DESCRIPTIONS = {
  "transform_json": "histology (fixed) µm → MSI (moving) µm affine transform, JSON",
  "transform_tfm": "the same transform for ITK / SimpleITK",
  "synthetic_he": "synthetic H&E on the MSI grid",
  "registered_synthetic_he": "synthetic H&E warped into histology space (working pixel size)",
  "histology_working": "the H&E registration copy (working pixel size)",
  "checkerboard_before": "checkerboard of H&E and synthetic H&E before registration (identity)",
  "checkerboard_after": "checkerboard after registration",
  "overlay": "synthetic H&E over the H&E after registration",
  "landmarks": "landmarks on the H&E and the synthetic H&E, with their residuals after registration",
  "msi_in_histology_space": "every MSI channel in histology space, float32 (H, W, C)",
  "msi_mask_in_histology_space": "measured-MSI mask in histology space, bool (H, W)",
  "mz": "m/z of the channels, float64 (C,)",
  "region_labels_msi": "region labels on the MSI grid, int32 (0 = unlabelled)",
  "region_table": "per-region mean, median and std of every channel",
  "region_mean_spectra": "per-region mean spectra, one column per region",
  "differential_ions": "ions that differ between the first two regions (Mann-Whitney U, BH q-values)",
  "regions_on_ion_image": "region outlines over an ion image (MSI grid)",
  "region_spectra": "per-region mean spectra",
  "metrics": "all numbers of this report, JSON",
  "report": "this report",
}


# Report entries that are figures (their titles say "simulated" for simulated data).
_FIGURES = (
  "checkerboard_before",
  "checkerboard_after",
  "overlay",
  "landmarks",
  "regions_on_ion_image",
  "region_spectra",
)


# ----------------------------------------------------------------------------------------------------------------
# Writers.


def _save_npy(path: pathlib.Path, array, overwrite: bool) -> None:
  with outputs.atomic_path(path, overwrite=overwrite) as tmp:
    np.save(tmp, np.asarray(array))


def _save_png(path: pathlib.Path, rgb: np.ndarray, overwrite: bool) -> None:
  msi_io.write_image(path, np.clip(np.asarray(rgb, np.float32), 0.0, 1.0), overwrite=overwrite)


def _save_fig(fig, path: pathlib.Path, overwrite: bool) -> None:
  from msisynth.viz import msi as viz_msi

  viz_msi.save_figure(fig, path, overwrite=overwrite)


def write_section_report(
  result: SectionResult, out_dir: str | os.PathLike, overwrite: bool = False, figures: bool = True
) -> dict:
  """Writes a section's report folder (what `process_section` does when given `out_dir`).

  Files (those that apply): `transform.json` + `transform.tfm` (histology µm → MSI µm), `synthetic_he.png` (MSI
  grid), `histology_working.png` and `registered_synthetic_he.png` (working grid), `checkerboard_before.png`
  (identity) and `checkerboard_after.png`, `overlay.png`, with landmarks `landmarks.png`,
  `msi_in_histology_space.npy` (float32 (H, W, C)) + `msi_mask_in_histology_space.npy` + `mz.npy`, `metrics.json`,
  with regions `region_labels_msi.npy`, `region_table.csv`, `region_mean_spectra.csv`, `differential_ions.csv`,
  `regions_on_ion_image.png`, `region_spectra.png`, and `report.md` listing them with the key numbers. Titles of
  simulated data say "simulated".

  Args:
    result: from `process_section` run without `out_dir` (the MSI cube is then in memory).
    out_dir: the folder; created when missing.
    overwrite: write into an existing non-empty folder, replacing files of the same names.
    figures: draw the figures (PNG plots); the images, arrays, tables and texts are always written.

  Returns:
    {name: path} of the files written (also stored in `result.paths`).

  Raises:
    OutputExistsError: an existing non-empty folder without `overwrite`, or one msisynth did not create.
  """
  carried = result.metrics.get("msi_cube_carried", True)
  if carried and result.msi_in_histology is None and "msi_in_histology_space" not in result.paths:
    raise errors.ConfigError("the result holds no MSI cube in histology space to write")
  out = outputs.prepare_output_dir(out_dir, overwrite=overwrite, owner="msisynth.report")
  if result.msi_in_histology is not None:
    path = out / REPORT_FILES["msi_in_histology_space"]
    _save_npy(path, result.msi_in_histology, overwrite)
    result.paths["msi_in_histology_space"] = path
  write_report_files(result, out, overwrite=overwrite, figures=figures)
  return dict(result.paths)


def write_report_files(result: SectionResult, out: pathlib.Path, *, overwrite: bool, figures: bool = True) -> None:
  """Writes every report file but the MSI cube (`process_section` streams it while computing it) into `out`."""
  from msisynth.register import transform_io

  paths = result.paths
  files = {key: out / name for key, name in REPORT_FILES.items()}

  transform_io.save_transform_json(
    files["transform_json"],
    result.transform,
    fixed_pixel_size_um=result.histology_pixel_size_um,
    moving_pixel_size_um=result.msi_pixel_size_um,
    fixed_shape=result.metrics.get("histology_shape"),
    moving_shape=result.metrics.get("msi_shape"),
    fixed_name=f"histology ({result.metrics.get('histology_source')})",
    moving_name=f"MSI ({result.metrics.get('msi_source')})",
    metadata={
      "section": result.name,
      "simulated": result.simulated,
      "registration": outputs.json_ready(result.registration),
    },
    overwrite=overwrite,
  )
  paths["transform_json"] = files["transform_json"]
  center = geometry.image_center_um(result.histology_working.shape[:2], result.working_pixel_size_um)
  transform_io.save_itk_transform(
    files["transform_tfm"], result.transform, center_um=np.asarray(center).tolist(), overwrite=overwrite
  )
  paths["transform_tfm"] = files["transform_tfm"]

  for key, image in (
    ("synthetic_he", result.synthetic_he),
    ("registered_synthetic_he", result.registered_synthetic_he),
    ("histology_working", result.histology_working),
  ):
    _save_png(files[key], image, overwrite)
    paths[key] = files[key]

  if figures:
    _write_registration_figures(result, files, paths, overwrite, result.before_registration)

  carried = result.metrics.get("msi_cube_carried", True)
  if carried and result.msi_in_histology is None and "msi_in_histology_space" not in paths:
    raise errors.ConfigError("the result holds no MSI cube in histology space to write")
  for key, array in (("msi_mask_in_histology_space", result.msi_mask_in_histology), ("mz", result.mz)):
    _save_npy(files[key], array, overwrite)
    paths[key] = files[key]

  if result.region_stats is not None:
    _save_npy(files["region_labels_msi"], result.labels_msi, overwrite)
    paths["region_labels_msi"] = files["region_labels_msi"]
    msi_regions.write_region_table_csv(result.region_stats, files["region_table"], overwrite=overwrite)
    paths["region_table"] = files["region_table"]
    msi_regions.write_mean_spectra_csv(result.region_stats, files["region_mean_spectra"], overwrite=overwrite)
    paths["region_mean_spectra"] = files["region_mean_spectra"]
    if result.differential is not None:
      msi_regions.write_differential_ions_csv(result.differential, files["differential_ions"], overwrite=overwrite)
      paths["differential_ions"] = files["differential_ions"]
    if figures:
      _write_region_figures(result, files, paths, overwrite)

  paths["metrics"] = files["metrics"]
  paths["report"] = files["report"]
  outputs.atomic_write_json(files["metrics"], result.metrics, overwrite=overwrite)
  outputs.atomic_write(files["report"], _report_markdown(result), overwrite=overwrite)


def _write_registration_figures(result: SectionResult, files, paths, overwrite: bool, before) -> None:
  from msisynth.viz import registration as viz_registration

  common = {"pixel_size_um": result.working_pixel_size_um, "simulated": result.simulated}
  if before is not None:
    fig = viz_registration.plot_checkerboard(
      result.histology_working, before, title="H&E / synthetic H&E before registration (identity)", **common
    )
    _save_fig(fig, files["checkerboard_before"], overwrite)
    paths["checkerboard_before"] = files["checkerboard_before"]
  fig = viz_registration.plot_checkerboard(
    result.histology_working, result.registered_synthetic_he, title="H&E / synthetic H&E after registration", **common
  )
  _save_fig(fig, files["checkerboard_after"], overwrite)
  paths["checkerboard_after"] = files["checkerboard_after"]
  fig = viz_registration.plot_overlay(
    result.histology_working,
    result.registered_synthetic_he,
    title="H&E (magenta) and synthetic H&E (green) after registration",
    **common,
  )
  _save_fig(fig, files["overlay"], overwrite)
  paths["overlay"] = files["overlay"]
  if result.landmarks is not None:
    fig = viz_registration.plot_landmarks(
      result.histology_working,
      result.synthetic_he,
      result.landmarks[:, :2],
      result.landmarks[:, 2:],
      transform=result.transform,
      fixed_pixel_size_um=result.working_pixel_size_um,
      moving_pixel_size_um=result.synthetic_pixel_size_um or result.msi_pixel_size_um,
      title="Landmarks: H&E (left), synthetic H&E on the MSI grid",
      simulated=result.simulated,
    )
    _save_fig(fig, files["landmarks"], overwrite)
    paths["landmarks"] = files["landmarks"]


def _write_region_figures(result: SectionResult, files, paths, overwrite: bool) -> None:
  from msisynth.viz import regions as viz_regions

  if result._msi is not None and result._mz_for_figures is not None:
    fig = viz_regions.plot_regions_on_ion_image(
      result._msi, result.labels_msi, result.region_names, result._mz_for_figures, colors=result.region_colors
    )
    _save_fig(fig, files["regions_on_ion_image"], overwrite)
    paths["regions_on_ion_image"] = files["regions_on_ion_image"]
  fig = viz_regions.plot_region_spectra(result.region_stats, colors=result.region_colors)
  _save_fig(fig, files["region_spectra"], overwrite)
  paths["region_spectra"] = files["region_spectra"]


def _fmt(value, spec: str = ".4f", unit: str = "") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return f"{value:{spec}}{unit}"


def _report_markdown(result: SectionResult) -> str:
  m = result.metrics
  tag = " (simulated)" if result.simulated else ""
  lines = [f"# Section {result.name}: MSI → histology registration{tag}", ""]
  if result.simulated:
    lines += [
      "**The MSI data of this section are simulated** (semi-synthetic: MSI simulated from a real H&E). "
      "Every number below is on simulated data.",
      "",
    ]
  lines += [
    "Synthetic H&E was generated from the MSI, registered (fixed = H&E, moving = synthetic H&E on the MSI grid, "
    f"mutual information, affine{', then a B-spline deformation' if m.get('deformable') else ''}) and every MSI "
    "channel carried into histology space. The transform maps "
    "histology µm to MSI µm (pixel centres, (x, y)).",
    "",
    "## Key numbers",
    "",
    "| quantity | value |",
    "|---|---|",
    f"| MSI | {m['msi_shape'][0]} × {m['msi_shape'][1]} px, {m['n_channels']} channels, "
    f"{_fmt(m['msi_pixel_size_um'][1], 'g')} µm |",
    f"| H&E | {m['histology_shape'][0]} × {m['histology_shape'][1]} px, "
    f"{_fmt(m['histology_pixel_size_um'][1], 'g')} µm |",
    f"| registration copy | {m['working_shape'][0]} × {m['working_shape'][1]} px, "
    f"{_fmt(m['working_pixel_size_um'][1], 'g')} µm |",
    f"| MI before → after (bits) | {_fmt(m['mi_before'])} → {_fmt(m['mi_after'])} |",
    f"| NMI before → after | {_fmt(m['nmi_before'])} → {_fmt(m['nmi_after'])} |",
    f"| registration {m['registration_metric_name'].upper()} (Parzen, bits) | {_fmt(m['registration_metric'])} |",
    f"| converged | {m['converged']} (iterations per level {m['iterations']}) |",
    f"| uncertainty | {_fmt(m['uncertainty_um'], '.1f', ' µm')} |",
    f"| chosen start | {m['start']} (mirrored: {m['mirrored']}, rotation {_fmt(m['rotation_deg'], '.1f', '°')}) |",
  ]
  deformable = m.get("deformable")
  if deformable:
    lines.append(
      f"| deformable (B-spline, {_fmt(deformable['grid_spacing_um'][0], 'g')} µm grid) | "
      f"{deformable['metric_name'].upper()} {_fmt(deformable['metric_affine'])} → {_fmt(deformable['metric'])}, "
      f"max displacement {_fmt(deformable['max_displacement_um'], '.1f', ' µm')}, "
      f"min det {_fmt(deformable['min_jacobian'], '.2f')} |"
    )
  tre = m.get("tre")
  if tre:
    lines.append(
      f"| TRE (mean over {tre.get('n', '?')} landmarks) | {_fmt(tre.get('mean_um'), '.1f', ' µm')} "
      f"({_fmt(tre.get('mean_px'), '.2f', ' MSI px')}) |"
    )
  regions = m.get("regions")
  if regions:
    lines.append(
      f"| regions | {regions['n_regions']}: "
      + ", ".join(f"{k} ({v} px)" for k, v in regions["n_pixels"].items())
      + " |"
    )
    diff = regions.get("differential")
    if diff:
      lines.append(
        f"| differential ions {diff['region_a']} vs {diff['region_b']} | {diff['n_q_below_0_05']} of "
        f"{diff['n_ions']} with q < 0.05 |"
      )
  lines.append(f"| runtime | {_fmt(result.timings_s.get('total', sum(result.timings_s.values())), '.1f', ' s')} |")
  for warning in m.get("warnings") or []:
    lines += ["", f"Warning: {warning}"]
  lines += ["", "## Files", ""]
  for key, name in REPORT_FILES.items():
    if key in result.paths:
      lines.append(f"- `{name}`: {_DESCRIPTIONS[key]}{tag if key in _FIGURES else ''}")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Two registered images.

PAIR_REPORT_FILES = {
  "transform_json": "transform.json",
  "transform_tfm": "transform.tfm",
  "warped_moving_tif": "warped_moving.tif",
  "warped_moving_png": "warped_moving.png",
  "checkerboard": "checkerboard.png",
  "overlay": "overlay.png",
  "landmarks": "landmarks.png",
  "metrics": "metrics.json",
}


def _display(image) -> np.ndarray:
  """Image as float in [0, 1] for a PNG: RGB as is (clipped), otherwise the grey level scaled by percentiles."""
  img = np.asarray(image, np.float32)
  if img.ndim == 3 and img.shape[2] == 3 and img.min() >= 0 and img.max() <= 1:
    return img
  grey = img if img.ndim == 2 else img.mean(axis=2)
  lo, hi = np.percentile(grey, [1, 99])
  return np.clip((grey - lo) / max(hi - lo, 1e-12), 0, 1)


def write_pair_report(
  result: PairResult, out_dir: str | os.PathLike, *, overwrite: bool = False, figures: bool = True
) -> dict[str, pathlib.Path]:
  """Writes the report folder of two registered images (what `pipeline.register_images` does with `out_dir`).

  Files: `transform.json` + `transform.tfm` (FIXED µm → MOVING µm), `warped_moving.tif` (every channel) and
  `.png`, `checkerboard.png` (before/after), `overlay.png`, with landmarks `landmarks.png`, and `metrics.json`.

  Returns:
    {name: path} of the files written (also stored in `result.paths`).

  Raises:
    OutputExistsError: an existing non-empty folder without `overwrite`, or one msisynth did not create.
  """
  out = outputs.prepare_output_dir(out_dir, overwrite=overwrite, owner="msisynth.report")
  write_pair_files(result, out, overwrite=overwrite, figures=figures)
  return dict(result.paths)


def write_pair_files(result: PairResult, out: pathlib.Path, *, overwrite: bool, figures: bool = True) -> None:
  """Writes the files of `write_pair_report` into a prepared folder `out`."""
  from msisynth.register import transform_io

  files = {key: out / name for key, name in PAIR_REPORT_FILES.items()}
  paths = result.paths
  common = {"fixed_pixel_size_um": result.fixed_pixel_size_um, "moving_pixel_size_um": result.moving_pixel_size_um}
  transform_io.save_transform_json(files["transform_json"], result.transform, fixed_shape=result.fixed.shape[:2],
                                   moving_shape=result.moving.shape[:2], fixed_name=result.fixed_name,
                                   moving_name=result.moving_name, overwrite=overwrite,
                                   metadata={"registration": result.registration, "simulated": result.simulated},
                                   **common)  # fmt: skip
  center = np.asarray(geometry.image_center_um(result.fixed.shape[:2], result.fixed_pixel_size_um), np.float64)
  transform_io.save_itk_transform(files["transform_tfm"], result.transform, center_um=center, overwrite=overwrite)
  msi_io.write_image(files["warped_moving_tif"], result.warped.astype(np.float32), overwrite=overwrite)
  msi_io.write_image(files["warped_moving_png"], _display(result.warped), overwrite=overwrite)
  paths.update({k: files[k] for k in ("transform_json", "transform_tfm", "warped_moving_tif", "warped_moving_png")})
  if figures:
    from msisynth.viz import registration as viz

    tag = {"simulated": result.simulated}
    fig = viz.plot_checkerboard_before_after(result.fixed, result.before, result.warped,
                                             pixel_size_um=result.fixed_pixel_size_um,
                                             titles=("Before registration (identity)", "After registration"),
                                             **tag)  # fmt: skip
    _save_fig(fig, files["checkerboard"], overwrite)
    fig = viz.plot_overlay(result.fixed, result.warped, pixel_size_um=result.fixed_pixel_size_um,
                           title="Fixed (magenta) and registered moving (green)", **tag)  # fmt: skip
    _save_fig(fig, files["overlay"], overwrite)
    paths.update(checkerboard=files["checkerboard"], overlay=files["overlay"])
    if result.landmarks is not None:
      fig = viz.plot_landmarks(result.fixed, result.moving, result.landmarks[:, :2], result.landmarks[:, 2:],
                               transform=result.transform, **common, **tag)  # fmt: skip
      _save_fig(fig, files["landmarks"], overwrite)
      paths["landmarks"] = files["landmarks"]
  outputs.atomic_write_json(files["metrics"], result.metrics, overwrite=overwrite)
  paths["metrics"] = files["metrics"]
