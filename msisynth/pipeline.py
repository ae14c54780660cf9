"""One MSI section and its H&E, from files to registered outputs: the library core of the end-to-end flow.

`process_section(inputs, synthesizer)` runs, for one section:

  (a) read the MSI (the whole cube: continuous files as stored, processed files binned by `read_imzml`'s defaults
      or by the options in `SectionInputs.read_options`);
  (b) synthesise H&E on the MSI grid with `synthesizer` (any callable MSIImage -> (H, W, 3) RGB in [0, 1], for
      instance `msisynth.synthesize.load_synthesizer(workdir)`);
  (c) read the H&E and make a registration copy at a working pixel size (default: a quarter of the MSI pixel,
      never finer than the H&E itself; anti-aliased by `msisynth.io.resample_to_pixel_size`) with a tissue mask;
  (d) register fixed = H&E working copy ← moving = synthetic H&E (MSI grid) by mutual information, with flips and
      90° rotations among the starts by default (`msisynth.register.optimize.register`);
  (e) carry every MSI channel into histology space at `output_pixel_size_um` (default: the working pixel size)
      with `warp_msi`, a few channels at a time, streamed into a `.npy` on disk when an output folder is given;
  (f) with regions (QuPath GeoJSON on the H&E): map them onto the MSI grid through the transform, per-region
      statistics, differential ions between the first two regions with enough measured pixels, CSVs and figures;
  (g) with landmarks (CSV of matched fixed/moving points): target registration error in µm and MSI pixels.

With `out_dir` it writes a report folder (see `write_section_report`): the transform (JSON and ITK), images and
figures, the MSI cube in histology space, metrics and a short `report.md`.

Conventions (docs/architecture.md): physical µm with pixel centres, points (x, y), transforms map FIXED (the
histology) → MOVING (the MSI grid); simulated inputs (`metadata["simulated"]`) say "simulated" in every title,
report and metrics file they reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging
from scipy import ndimage

from msisynth import errors, outputs
from msisynth import io as msi_io
from msisynth import metrics as msi_metrics
from msisynth import regions as msi_regions
from msisynth.register import bspline, optimize
from msisynth.register import transforms as tf
from msisynth.register.transforms import AffineTransform
from msisynth.types import MSIImage

# The working (registration) pixel is this fraction of the MSI pixel by default.
WORKING_FRACTION_OF_MSI_PIXEL = 0.25
# Bytes of warped output held in memory at once when carrying the MSI cube into histology space.
MAX_CHUNK_BYTES = 256 * 2**20
# Fewest measured MSI pixels a region needs to be compared with another.
MIN_REGION_PIXELS = 3
# Histogram bins of the evaluation MI (bits) reported before and after registration.
MI_BINS = 32
# Default control-point spacing of the deformable stage, in MSI pixels.
DEFORMABLE_SPACING_MSI_PX = 20

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
# Inputs and results.


@dataclasses.dataclass
class SectionInputs:
  """What one section is made of.

  Attributes:
    msi: an .imzML path (the .ibd beside it) or an `MSIImage` already in memory.
    histology: an H&E image path (PNG, JPEG, TIFF) or an (H, W, 3) float array in [0, 1].
    histology_pixel_size_um: H&E pixel size, µm, float or (y, x); required (image files rarely record it).
    msi_pixel_size_um: MSI pixel size, µm, float or (y, x); None takes it from the imzML metadata (an error when
      the file does not give it).
    regions: optional QuPath GeoJSON of polygon annotations drawn on this H&E (pixel coordinates of the image).
    landmarks: optional CSV of matched points, columns fixed_x, fixed_y (H&E µm), moving_x, moving_y (MSI µm).
    name: the section's name in logs and reports; None uses the MSI file's stem (or "section").
    read_options: keyword arguments of `msisynth.io.read_imzml` (mz_range, bin_width, bin_unit, ...): how a
      processed file is binned, for instance.
    simulated: whether the data are simulated; None takes `metadata["simulated"]` of the MSI (imzML files do not
      record it, so give True for simulated sections read from files).
  """

  msi: str | os.PathLike | MSIImage
  histology: str | os.PathLike | np.ndarray
  histology_pixel_size_um: float | tuple[float, float] | None = None
  msi_pixel_size_um: float | tuple[float, float] | None = None
  regions: str | os.PathLike | None = None
  landmarks: str | os.PathLike | None = None
  name: str | None = None
  read_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  simulated: bool | None = None

  def __post_init__(self):
    if self.histology_pixel_size_um is None:
      raise errors.ConfigError(
        f"section {self.section_name()!r}: histology_pixel_size_um is required (H&E image files rarely record "
        "their pixel size)"
      )
    self.histology_pixel_size_um = tf.pixel_size_yx(self.histology_pixel_size_um, "histology_pixel_size_um")
    if self.msi_pixel_size_um is not None:
      self.msi_pixel_size_um = tf.pixel_size_yx(self.msi_pixel_size_um, "msi_pixel_size_um")
    if not isinstance(self.msi, MSIImage | str | os.PathLike):
      raise errors.ConfigError(f"msi must be an imzML path or an MSIImage, got {type(self.msi).__name__}")

  def section_name(self) -> str:
    """The name used in logs and reports."""
    if self.name:
      return str(self.name)
    if isinstance(self.msi, str | os.PathLike):
      return pathlib.Path(self.msi).stem
    return "section"


@dataclasses.dataclass
class SectionResult:
  """What `process_section` found and wrote.

  Attributes:
    name: the section's name.
    simulated: whether the MSI (or the H&E) is simulated.
    transform: FIXED (histology µm) → MOVING (MSI µm) `AffineTransform`, or with `deformable=True` the
      `BSplineTransform` refining it.
    registration: `msisynth.register.optimize.result_summary` of the registration (metric, converged,
      iterations, uncertainty_um, start, mirrored, rotation_deg, candidates, warnings).
    synthetic_he: (h, w, 3) float32 synthetic H&E on the MSI grid (or on it upsampled by the generator's factor).
    registered_synthetic_he: (H_w, W_w, 3) synthetic H&E warped onto the working grid (white outside the MSI).
    histology_working: (H_w, W_w, 3) the H&E registration copy.
    tissue_mask_working: (H_w, W_w) bool tissue mask of the working copy.
    msi_pixel_size_um: (y, x) MSI pixel size used.
    histology_pixel_size_um: (y, x) H&E pixel size.
    working_pixel_size_um: (y, x) pixel size of the registration copy.
    output_pixel_size_um: (y, x) pixel size of the MSI cube in histology space.
    output_shape: (H, W) of the MSI cube in histology space.
    mz: (C,) m/z of the channels.
    msi_in_histology: (H, W, C) float32 MSI cube in histology space when no output folder was given (else None:
      load `paths["msi_in_histology_space"]` with `np.load(path, mmap_mode="r")`).
    msi_mask_in_histology: (H, W) bool measured-MSI mask in histology space.
    labels_msi: (h, w) int32 region labels on the MSI grid, or None without regions.
    region_names: {label: name}, or None.
    region_colors: {label: (r, g, b) 0-255} from the annotations, where they give one.
    region_stats: `msisynth.regions.RegionStats`, or None.
    differential: `msisynth.regions.DifferentialIons` between the first two regions, or None.
    tre: target registration error summary (µm and MSI pixels), or None without landmarks.
    landmarks: (N, 4) fixed_x, fixed_y (H&E µm), moving_x, moving_y (MSI µm), or None.
    metrics: every number of the report (what `metrics.json` holds).
    timings_s: seconds per stage.
    paths: {name: path} of the files written (empty without an output folder).
    synthetic_pixel_size_um: (y, x) pixel size (µm) of `synthetic_he`: the MSI pixel size / the upsampling factor.
  """

  name: str
  simulated: bool
  transform: AffineTransform | bspline.BSplineTransform
  registration: dict[str, Any]
  synthetic_he: np.ndarray
  registered_synthetic_he: np.ndarray
  histology_working: np.ndarray
  tissue_mask_working: np.ndarray
  msi_pixel_size_um: tuple[float, float]
  histology_pixel_size_um: tuple[float, float]
  working_pixel_size_um: tuple[float, float]
  output_pixel_size_um: tuple[float, float]
  output_shape: tuple[int, int]
  mz: np.ndarray
  msi_in_histology: np.ndarray | None
  msi_mask_in_histology: np.ndarray
  labels_msi: np.ndarray | None = None
  region_names: dict[int, str] | None = None
  region_colors: dict[int, tuple[int, int, int]] | None = None
  region_stats: msi_regions.RegionStats | None = None
  differential: msi_regions.DifferentialIons | None = None
  tre: dict[str, Any] | None = None
  landmarks: np.ndarray | None = None
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
  timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
  paths: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
  synthetic_pixel_size_um: tuple[float, float] | None = None
  # Kept for the figures of the report; not part of the public attributes.
  _msi: MSIImage | None = dataclasses.field(default=None, repr=False)
  _mz_for_figures: float | None = dataclasses.field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# Helpers.


class _Stages:
  """Logs one line per stage with its duration, and keeps the durations."""

  def __init__(self, name: str):
    self.name = name
    self.timings: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, stage: str):
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    self.timings[stage] = round(elapsed, 3)
    logging.info("[%s] %s: %.2f s", self.name, stage, elapsed)


def working_pixel_size_um(
  msi_pixel_size_um, histology_pixel_size_um, registration_pixel_size_um=None
) -> tuple[float, float]:
  """The pixel size of the H&E registration copy.

  Args:
    msi_pixel_size_um: MSI pixel size, float or (y, x).
    histology_pixel_size_um: H&E pixel size, float or (y, x).
    registration_pixel_size_um: asked-for working pixel size, or None for a quarter of the MSI pixel.

  Returns:
    (y, x) µm, never finer than the H&E pixel (an H&E cannot be sharpened by resampling).

  Raises:
    ConfigError: for a bad pixel size.
  """
  msi = tf.pixel_size_yx(msi_pixel_size_um, "msi_pixel_size_um")
  he = tf.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  if registration_pixel_size_um is None:
    wanted = (msi[0] * WORKING_FRACTION_OF_MSI_PIXEL, msi[1] * WORKING_FRACTION_OF_MSI_PIXEL)
  else:
    wanted = tf.pixel_size_yx(registration_pixel_size_um, "registration_pixel_size_um")
    if wanted[0] < he[0] or wanted[1] < he[1]:
      logging.warning("registration pixel size %s µm is finer than the H&E's %s µm; using the H&E's", wanted, he)
  return max(wanted[0], he[0]), max(wanted[1], he[1])


def _grid_shape(shape: tuple[int, int], from_px: tuple[float, float], to_px: tuple[float, float]) -> tuple[int, int]:
  """Shape of the grid covering the same field of view at another pixel size (as `resample_to_pixel_size`)."""
  return max(1, round(shape[0] * from_px[0] / to_px[0])), max(1, round(shape[1] * from_px[1] / to_px[1]))


def _same_size(a: tuple[float, float], b: tuple[float, float]) -> bool:
  return bool(np.allclose(a, b, rtol=1e-9, atol=0.0))


def _read_msi(inputs: SectionInputs) -> MSIImage:
  if isinstance(inputs.msi, MSIImage):
    msi = inputs.msi
  else:
    msi = msi_io.read_imzml(inputs.msi, **dict(inputs.read_options))
  pixel_size = inputs.msi_pixel_size_um if inputs.msi_pixel_size_um is not None else msi.pixel_size_um
  if pixel_size is None:
    raise errors.ConfigError(
      f"{msi.metadata.get('source') or inputs.section_name()}: the MSI pixel size is not in the file's metadata; "
      "give msi_pixel_size_um"
    )
  changes = {}
  if msi.pixel_size_um is None or not _same_size(msi.pixel_size_um, pixel_size):
    changes["pixel_size_um"] = tuple(pixel_size)
  if inputs.simulated is not None and bool(msi.metadata.get("simulated", False)) != inputs.simulated:
    changes["metadata"] = {**msi.metadata, "simulated": bool(inputs.simulated)}
  return dataclasses.replace(msi, **changes) if changes else msi


def _read_histology(inputs: SectionInputs) -> tuple[np.ndarray, str]:
  if isinstance(inputs.histology, str | os.PathLike):
    return msi_io.read_histology(inputs.histology), os.fspath(inputs.histology)
  rgb = np.asarray(inputs.histology)
  if rgb.ndim != 3 or rgb.shape[2] != 3:
    raise errors.ConfigError(f"histology must be an (H, W, 3) RGB array, got shape {rgb.shape}")
  if rgb.dtype == np.uint8:
    rgb = rgb.astype(np.float32) / 255.0
  rgb = rgb.astype(np.float32, copy=False)
  if not np.all(np.isfinite(rgb)) or rgb.min() < 0 or rgb.max() > 1:
    raise errors.DataError("the histology array must hold finite values in [0, 1]")
  return rgb, "array"


def _check_synthetic(synthetic, msi: MSIImage, name: str) -> tuple[np.ndarray, int]:
  """The synthetic H&E clipped to [0, 1] and its upsampling factor u over the MSI grid (1 on the MSI grid).

  A generator trained on upsampled pairs returns ((H - 1)·u + 1, (W - 1)·u + 1) pixels (see
  `msisynth.synthesize.Synthesizer`); pixel (0, 0) stays at the MSI's pixel (0, 0).
  """
  synthetic = np.asarray(synthetic)
  h, w = msi.shape
  factor = None
  if synthetic.ndim == 3 and synthetic.shape[2] == 3:
    for u in range(1, 17):
      if synthetic.shape[:2] == ((h - 1) * u + 1, (w - 1) * u + 1):
        factor = u
        break
  if factor is None:
    raise errors.ConfigError(
      f"section {name!r}: the synthesizer returned shape {synthetic.shape}; it must return (H, W, 3) RGB on the "
      f"MSI grid ({h}x{w}) or on that grid upsampled by an integer factor"
    )
  synthetic = synthetic.astype(np.float32)
  if not np.all(np.isfinite(synthetic)):
    raise errors.DataError(f"section {name!r}: the synthetic H&E has NaN or infinite values")
  return np.clip(synthetic, 0.0, 1.0), factor


def _check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> pathlib.Path:
  """The output folder, refused when it is a file or holds anything and `overwrite` is False."""
  out = pathlib.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise errors.DataError("the output folder is a file", out)
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise errors.DataError(
      "the output folder exists and is not empty; pass overwrite=True to write into it "
      "(files of the same names are replaced) or choose another folder",
      out,
    )
  out.mkdir(parents=True, exist_ok=True)
  return out


def _evaluation_mi(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray) -> tuple[float | None, float | None]:
  """Hard-histogram MI (bits) and NMI of two grey/RGB images inside a mask; None when the mask is empty."""
  if not mask.any():
    return None, None
  mi = float(msi_metrics.mutual_information(fixed, warped, bins=MI_BINS, mask=mask, value_range=(0.0, 1.0)))
  nmi = float(msi_metrics.normalized_mutual_information(fixed, warped, bins=MI_BINS, mask=mask, value_range=(0.0, 1.0)))
  return (mi if math.isfinite(mi) else None), (nmi if math.isfinite(nmi) else None)


def _warp_to_working(image, transform, shape, working_px, msi_px, *, order=1, cval=0.0) -> np.ndarray:
  return np.asarray(
    tf.warp_image(
      image, transform, shape, fixed_pixel_size_um=working_px, moving_pixel_size_um=msi_px, order=order, cval=cval
    )
  )


def _carry_msi(
  msi: MSIImage,
  transform: AffineTransform,
  shape: tuple[int, int],
  pixel_size: tuple[float, float],
  path: pathlib.Path | None,
  max_chunk_bytes: int,
) -> tuple[np.ndarray | None, np.ndarray]:
  """Warps every channel into histology space a chunk of channels at a time, into a .npy when `path` is given."""
  n_channels = msi.num_channels
  chunk = int(max(1, min(n_channels, max_chunk_bytes // max(1, shape[0] * shape[1] * 4))))
  if path is None:
    out = np.empty((shape[0], shape[1], n_channels), np.float32)
    return out, _warp_channels(msi, transform, shape, pixel_size, chunk, out)
  # Into a temporary file beside `path`, renamed when complete: a kill leaves no half-written cube.
  with outputs.atomic_path(path) as tmp:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(shape[0], shape[1], n_channels))
    mask = _warp_channels(msi, transform, shape, pixel_size, chunk, out)
    out.flush()
    del out
  return None, mask


def _warp_channels(msi, transform, shape, pixel_size, chunk: int, out: np.ndarray) -> np.ndarray:
  mask = None
  for start in range(0, msi.num_channels, chunk):
    part = msi.select_mz(slice(start, min(start + chunk, msi.num_channels)))
    warped = tf.warp_msi(part, transform, shape, pixel_size)
    out[:, :, start : start + part.num_channels] = warped.cube
    if mask is None:
      mask = np.asarray(warped.mask, bool)
  return mask


def _read_landmarks(path, histology_px, msi_px) -> np.ndarray:
  """(N, 4) fixed_x, fixed_y (H&E µm), moving_x, moving_y (MSI µm); pixel columns use the pixel sizes."""
  from msisynth.register import evaluate

  return np.asarray(
    evaluate.load_landmarks_csv(path, fixed_pixel_size_um=histology_px, moving_pixel_size_um=msi_px), np.float64
  )


def _tre(transform: AffineTransform, landmarks: np.ndarray, msi_px: tuple[float, float]) -> dict[str, Any]:
  from msisynth.register import evaluate

  tre = evaluate.target_registration_error(transform, landmarks[:, :2], landmarks[:, 2:], msi_px)
  tre = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dict(tre).items()}
  tre["units"] = "µm in the MSI (moving) frame; px = MSI pixels"
  return tre


def json_ready(value):
  """Values of a metrics dict as JSON takes them (NaN/Inf as null, NumPy as Python)."""
  if isinstance(value, dict):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [json_ready(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_ready(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, pathlib.PurePath):
    return os.fspath(value)
  return value


# ----------------------------------------------------------------------------------------------------------------
# The pipeline.


def process_section(
  inputs: SectionInputs,
  synthesizer: Callable[[MSIImage], np.ndarray],
  *,
  registration_pixel_size_um: float | tuple[float, float] | None = None,
  flips: bool = True,
  output_pixel_size_um: float | tuple[float, float] | None = None,
  mz_for_figures: float | None = None,
  out_dir: str | os.PathLike | None = None,
  overwrite: bool = False,
  registration_config: optimize.RegistrationConfig | None = None,
  max_chunk_bytes: int = MAX_CHUNK_BYTES,
  figures: bool = True,
  deformable: bool = False,
  bspline_spacing_um: float | tuple[float, float] | None = None,
  deformable_config: bspline.DeformableConfig | None = None,
) -> SectionResult:
  """Synthesises H&E from a section's MSI, registers it to the section's H&E and carries the MSI across.

  Stages (a)-(g) are described in the module docstring; each logs one line with its duration.

  Args:
    inputs: the section.
    synthesizer: any callable mapping an `MSIImage` to (H, W, 3) RGB in [0, 1] on the MSI grid, e.g. a
      `msisynth.synthesize.Synthesizer` (which applies the preprocessor stored with its checkpoint).
    registration_pixel_size_um: pixel size of the H&E registration copy, µm; None for a quarter of the MSI pixel.
      Never finer than the H&E.
    flips: also start the registration from 90° rotations and mirror images (sections are often mounted turned or
      face down).
    output_pixel_size_um: pixel size of the MSI cube in histology space, µm; None for the working pixel size.
    mz_for_figures: m/z of the ion image under the region outlines; None for the most differential ion (or the
      channel with the highest mean intensity).
    out_dir: report folder (see `write_section_report`); None keeps everything in memory and writes nothing. A
      failure part-way leaves the files written so far (the batch launcher works in a temporary folder instead).
    overwrite: write into an existing non-empty `out_dir`, replacing files of the same names.
    registration_config: registration options; None for the defaults (MI, affine, 3 levels). `flips` sets its
      `flips_and_rot90`.
    max_chunk_bytes: warped output held in memory at once while carrying the MSI cube, bytes.
    figures: draw the report's figures (the slowest part of the report for small sections).
    deformable: refine the affine registration with a cubic B-spline deformation
      (`msisynth.register.bspline.register_deformable`, same similarity); the MSI, the regions and the landmarks
      then go through the `BSplineTransform`.
    bspline_spacing_um: control-point spacing of the deformation, µm; None for `deformable_config`'s, or
      `DEFORMABLE_SPACING_MSI_PX` MSI pixels.
    deformable_config: options of the deformable stage; None for the defaults.

  Returns:
    A `SectionResult`.

  Raises:
    ConfigError: an unknown MSI pixel size, bad pixel sizes or options, a synthesizer returning the wrong shape.
    DataError: unreadable inputs (naming the file), or an existing non-empty `out_dir` without `overwrite`.
    RegistrationError: when the registration fails or gives a degenerate transform.
  """
  name = inputs.section_name()
  stage = _Stages(name)
  out = _check_out_dir(out_dir, overwrite) if out_dir is not None else None
  t_start = time.perf_counter()
  logging.info("[%s] processing section", name)

  with stage("read MSI"):
    msi = _read_msi(inputs)
    msi_px = tuple(msi.pixel_size_um)
  simulated = bool(msi.metadata.get("simulated", False))
  logging.info(
    "[%s] MSI %dx%d px, %d channels, %s µm%s",
    name,
    *msi.shape,
    msi.num_channels,
    msi_px,
    " (simulated)" if simulated else "",
  )

  with stage("synthesise H&E"):
    synthetic, factor = _check_synthetic(synthesizer(msi), msi, name)
    # Pixel size of the synthetic H&E, and the measured-pixel mask on its grid.
    syn_px = (msi_px[0] / factor, msi_px[1] / factor)
    syn_mask = msi.mask
    if factor > 1:
      from msisynth.data import upsample_grid

      syn_mask = upsample_grid(msi.mask.astype(np.float32), factor, "nearest") > 0.5

  with stage("read H&E"):
    histology, histology_source = _read_histology(inputs)
    he_px = tuple(inputs.histology_pixel_size_um)
    working_px = working_pixel_size_um(msi_px, he_px, registration_pixel_size_um)
    if _same_size(working_px, he_px):
      working = histology
    else:
      working = np.clip(msi_io.resample_to_pixel_size(histology, he_px, working_px, order=1), 0.0, 1.0)
    working_shape = tuple(int(v) for v in working.shape[:2])
    tissue = np.asarray(msi_io.tissue_mask(working), bool)
    # The mask restricts the reported MI to the tissue (plus about one MSI pixel). Registration itself sees the
    # whole field: the synthetic H&E reproduces the background too, and the tissue/background contrast is the
    # strongest signal MI has (masking the fixed image to tissue lost it: 33 MSI px TRE against 0.7 px on the
    # demo's simulated section).
    radius = max(1, int(round(max(msi_px) / max(working_px))))
    fixed_mask = ndimage.binary_dilation(tissue, iterations=radius) if tissue.any() else None
    if fixed_mask is None:
      logging.warning("[%s] no tissue found in the H&E; reporting MI over the whole image", name)
  logging.info(
    "[%s] H&E %dx%d px at %s µm; registration copy %dx%d px at %s µm",
    name,
    *histology.shape[:2],
    he_px,
    *working_shape,
    working_px,
  )
  histology_shape = tuple(int(v) for v in histology.shape[:2])
  del histology

  with stage("register"):
    config = registration_config or optimize.RegistrationConfig(similarity="mi")
    config = dataclasses.replace(config, flips_and_rot90=bool(flips))
    moving_mask = None if syn_mask.all() else syn_mask
    result = optimize.register(
      working,
      synthetic,
      fixed_pixel_size_um=working_px,
      moving_pixel_size_um=syn_px,
      fixed_mask=None,
      moving_mask=moving_mask,
      config=config,
    )
    transform = result.transform
    summary = optimize.result_summary(result)
  deformable_result = None
  if deformable:
    with stage("deformable registration"):
      dconfig = deformable_config or bspline.DeformableConfig(
        similarity=config.similarity if config.similarity in bspline.SIMILARITIES else "mi"
      )
      if bspline_spacing_um is not None or dconfig.grid_spacing_um is None:
        spacing = DEFORMABLE_SPACING_MSI_PX * max(msi_px) if bspline_spacing_um is None else bspline_spacing_um
        dconfig = dataclasses.replace(dconfig, grid_spacing_um=spacing)
      deformable_result = bspline.register_deformable(
        working, synthetic, transform, fixed_pixel_size_um=working_px, moving_pixel_size_um=syn_px,
        moving_mask=moving_mask, config=dconfig,
      )  # fmt: skip
      transform = deformable_result.transform
      summary["deformable"] = bspline.deformable_summary(deformable_result)
    logging.info(
      "[%s] deformable: %s %.4f → %.4f, max displacement %.1f µm, min det %.2f",
      name,
      deformable_result.metric_name,
      deformable_result.metric_affine,
      deformable_result.metric,
      deformable_result.max_displacement_um,
      deformable_result.min_jacobian,
    )
  logging.info(
    "[%s] registered: %s %.4f, start %s, converged %s, uncertainty %.1f µm",
    name,
    result.metric_name,
    result.metric,
    result.start,
    result.converged,
    result.uncertainty_um,
  )

  with stage("evaluate registration"):
    identity = AffineTransform.identity()
    registered = _warp_to_working(synthetic, transform, working_shape, working_px, syn_px, cval=1.0)
    before = _warp_to_working(synthetic, identity, working_shape, working_px, syn_px, cval=1.0)
    inside_after = _warp_to_working(msi.mask, transform, working_shape, working_px, msi_px, order=0, cval=False)
    inside_before = _warp_to_working(msi.mask, identity, working_shape, working_px, msi_px, order=0, cval=False)
    region = np.ones(working_shape, bool) if fixed_mask is None else fixed_mask
    mi_before, nmi_before = _evaluation_mi(working, before, inside_before & region)
    mi_after, nmi_after = _evaluation_mi(working, registered, inside_after & region)

  out_px = (
    working_px if output_pixel_size_um is None else tf.pixel_size_yx(output_pixel_size_um, "output_pixel_size_um")
  )
  out_shape = working_shape if _same_size(out_px, working_px) else _grid_shape(histology_shape, he_px, out_px)
  paths: dict[str, pathlib.Path] = {}
  with stage("carry MSI into histology space"):
    cube_path = None
    if out is not None:
      cube_path = out / REPORT_FILES["msi_in_histology_space"]
      paths["msi_in_histology_space"] = cube_path
    warped_cube, warped_mask = _carry_msi(msi, transform, out_shape, out_px, cube_path, max_chunk_bytes)
  logging.info(
    "[%s] MSI in histology space: %dx%d px x %d channels at %s µm", name, *out_shape, msi.num_channels, out_px
  )

  labels_msi = names = colors = stats = differential = None
  if inputs.regions is not None:
    with stage("regions"):
      regions = msi_regions.read_geojson_regions(inputs.regions)
      labels_msi, names = msi_regions.regions_to_msi(
        regions, transform, msi.shape, histology_pixel_size_um=he_px, msi_pixel_size_um=msi_px
      )
      label_of = {v: k for k, v in names.items()}
      colors = {label_of[r.name]: r.color for r in regions if r.color is not None and r.name in label_of}
      stats = msi_regions.region_statistics(msi, labels_msi, names)
      enough = [int(label) for label, n in zip(stats.labels, stats.n_pixels) if n >= MIN_REGION_PIXELS]
      if len(enough) >= 2:
        differential = msi_regions.differential_ions(
          msi, labels_msi, enough[0], enough[1], names=names, top=None, min_pixels=MIN_REGION_PIXELS
        )
      else:
        logging.warning(
          "[%s] fewer than two regions have %d measured MSI pixels: no differential ions", name, MIN_REGION_PIXELS
        )

  tre = landmarks = None
  if inputs.landmarks is not None:
    with stage("landmarks"):
      landmarks = _read_landmarks(inputs.landmarks, he_px, msi_px)
      tre = _tre(transform, landmarks, msi_px)

  if mz_for_figures is None and differential is not None and len(differential.mz):
    mz_for_figures = float(differential.mz[0])
  if mz_for_figures is None and msi.num_channels:
    mz_for_figures = float(msi.mz[int(np.argmax(msi.cube.reshape(-1, msi.num_channels).mean(axis=0)))])

  timings = dict(stage.timings)
  metrics = {
    "section": name,
    "simulated": simulated,
    "msi_source": msi.metadata.get("source")
    or (os.fspath(inputs.msi) if not isinstance(inputs.msi, MSIImage) else "MSIImage"),
    "histology_source": histology_source,
    "msi_shape": list(msi.shape),
    "n_channels": msi.num_channels,
    "msi_pixel_size_um": list(msi_px),
    "histology_shape": list(histology_shape),
    "histology_pixel_size_um": list(he_px),
    "working_shape": list(working_shape),
    "working_pixel_size_um": list(working_px),
    "output_shape": list(out_shape),
    "output_pixel_size_um": list(out_px),
    "mi_before": mi_before,
    "mi_after": mi_after,
    "nmi_before": nmi_before,
    "nmi_after": nmi_after,
    "mi_note": (
      f"hard-histogram MI in bits ({MI_BINS} bins) of H&E and synthetic H&E grey levels inside the "
      "H&E tissue (plus one MSI pixel) where the MSI was measured; before = identity transform"
    ),
    "registration_metric": result.metric,
    "registration_metric_name": result.metric_name,
    "converged": result.converged,
    "iterations": list(result.iterations),
    "uncertainty_um": result.uncertainty_um,
    "start": result.start,
    "mirrored": result.mirrored,
    "rotation_deg": summary["rotation_deg"],
    "flips_searched": bool(flips),
    "overlap": result.overlap,
    "warnings": list(result.warnings) + (list(deformable_result.warnings) if deformable_result else []),
    "transform_fixed_to_moving_um": summary["matrix_fixed_to_moving_um"],
    "deformable": summary.get("deformable"),
    "tre": tre,
    "regions": None,
    "timing_s": timings,
  }
  if stats is not None:
    metrics["regions"] = {
      "n_regions": len(stats.labels),
      "names": stats.region_names(),
      "n_pixels": {stats.names[int(k)]: int(n) for k, n in zip(stats.labels, stats.n_pixels)},
      "differential": None
      if differential is None
      else {
        "region_a": differential.region_a,
        "region_b": differential.region_b,
        "n_a": differential.n_a,
        "n_b": differential.n_b,
        "n_ions": len(differential),
        "n_q_below_0_05": int(np.sum(differential.q_value < 0.05)),
      },
    }

  section = SectionResult(
    name=name,
    simulated=simulated,
    transform=transform,
    registration=summary,
    synthetic_he=synthetic,
    registered_synthetic_he=registered,
    histology_working=working,
    tissue_mask_working=tissue,
    msi_pixel_size_um=msi_px,
    synthetic_pixel_size_um=syn_px,
    histology_pixel_size_um=he_px,
    working_pixel_size_um=working_px,
    output_pixel_size_um=out_px,
    output_shape=out_shape,
    mz=np.asarray(msi.mz),
    msi_in_histology=warped_cube,
    msi_mask_in_histology=warped_mask,
    labels_msi=labels_msi,
    region_names=names,
    region_colors=colors,
    region_stats=stats,
    differential=differential,
    tre=tre,
    landmarks=landmarks,
    metrics=metrics,
    timings_s=timings,
    paths=paths,
    _msi=msi,
    _mz_for_figures=mz_for_figures,
  )
  if out is not None:
    with stage("write report"):
      _write_report(section, out, overwrite=overwrite, before=before, figures=figures)
  section.timings_s = dict(stage.timings)
  section.timings_s["total"] = round(time.perf_counter() - t_start, 3)
  if out is not None:
    # The timing of the report stage itself is known only now.
    section.metrics["timing_s"] = section.timings_s
    _write_json(out / REPORT_FILES["metrics"], section.metrics, overwrite=True)
  logging.info("[%s] done in %.1f s%s", name, section.timings_s["total"], f" → {out}" if out is not None else "")
  return section


# ----------------------------------------------------------------------------------------------------------------
# The report.


def _write_json(path: pathlib.Path, data: Mapping[str, Any], overwrite: bool) -> None:
  if path.exists() and not overwrite:
    raise errors.DataError("file exists; pass overwrite=True to replace it", path)
  outputs.atomic_write(path, json.dumps(json_ready(dict(data)), indent=2, ensure_ascii=False) + "\n")


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
    DataError: an existing non-empty folder without `overwrite`.
  """
  out = _check_out_dir(out_dir, overwrite)
  if result.msi_in_histology is None and "msi_in_histology_space" not in result.paths:
    raise errors.ConfigError("the result holds no MSI cube in histology space to write")
  if result.msi_in_histology is not None:
    path = out / REPORT_FILES["msi_in_histology_space"]
    outputs.save_npy(path, result.msi_in_histology)
    result.paths["msi_in_histology_space"] = path
  before = _warp_to_working(
    result.synthetic_he,
    AffineTransform.identity(),
    result.histology_working.shape[:2],
    result.working_pixel_size_um,
    result.msi_pixel_size_um,
    cval=1.0,
  )
  _write_report(result, out, overwrite=overwrite, before=before, figures=figures)
  return dict(result.paths)


def _write_report(
  result: SectionResult, out: pathlib.Path, *, overwrite: bool, before: np.ndarray | None, figures: bool = True
) -> None:
  """Writes every report file but the MSI cube (written while it is computed) into `out`."""
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
    metadata={"section": result.name, "simulated": result.simulated, "registration": json_ready(result.registration)},
    overwrite=overwrite,
  )
  paths["transform_json"] = files["transform_json"]
  center = tf.image_center_um(result.histology_working.shape[:2], result.working_pixel_size_um)
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
    _write_registration_figures(result, files, paths, overwrite, before)

  if result.msi_in_histology is None and "msi_in_histology_space" not in paths:
    raise errors.ConfigError("the result holds no MSI cube in histology space to write")
  for key, array in (("msi_mask_in_histology_space", result.msi_mask_in_histology), ("mz", result.mz)):
    if files[key].exists() and not overwrite:
      raise errors.DataError("file exists; pass overwrite=True to replace it", files[key])
    outputs.save_npy(files[key], array)
    paths[key] = files[key]

  if result.region_stats is not None:
    outputs.save_npy(files["region_labels_msi"], result.labels_msi)
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
  _write_json(files["metrics"], result.metrics, overwrite=overwrite)
  text = _report_markdown(result)
  if files["report"].exists() and not overwrite:
    raise errors.DataError("file exists; pass overwrite=True to replace it", files["report"])
  outputs.atomic_write(files["report"], text)


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
