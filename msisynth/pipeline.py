"""One MSI section and its H&E, from files to registered outputs: the library core of the end-to-end flow.

`process_section(inputs, synthesizer)` runs, for one section:

  (a) read the MSI (the whole cube: continuous files as stored, processed files binned by `read_imzml`'s defaults
      or by the options in `SectionInputs.read_options`);
  (b) synthesise H&E on the MSI grid with `synthesizer` (any callable MSIImage -> (H, W, 3) RGB in [0, 1], for
      instance `msisynth.synthesize.load_synthesizer(workdir)`);
  (c) read the H&E and make a registration copy at a working pixel size (`msisynth.geometry.working_pixel_size_um`:
      a quarter of the MSI pixel, never finer than the H&E itself; anti-aliased by
      `msisynth.io.resample_to_pixel_size`) with a tissue mask;
  (d) register fixed = H&E working copy ← moving = synthetic H&E (MSI grid) by mutual information, with flips and
      90° rotations among the starts by default (`msisynth.register.optimize.register`);
  (e) carry every MSI channel into histology space at `output_pixel_size_um` (default: the working pixel size)
      with `warp_msi`, a few channels at a time, streamed into a `.npy` on disk when an output folder is given
      (skipped with `carry_msi=False`: only its mask);
  (f) with regions (QuPath GeoJSON on the H&E): map them onto the MSI grid through the transform, per-region
      statistics, differential ions between the first two regions with enough measured pixels, CSVs and figures;
  (g) with landmarks (CSV of matched fixed/moving points): target registration error in µm and MSI pixels.

With `out_dir` it writes a report folder (`msisynth.report.write_section_report`): the transform (JSON and ITK),
images and figures, the MSI cube in histology space, metrics and a short `report.md`. `register_images` is the
same route for two images (no MSI, no synthesis), with `msisynth.report.write_pair_report`.

Grids (`msisynth.geometry`): the synthetic H&E lies on the MSI grid upsampled by the factor the generator was
trained at. That factor is recorded with the checkpoint (`config.data.upsample`) and read from the synthesizer
(`Synthesizer.upsample`; any callable may carry an `upsample` attribute, else 1), never inferred from the shape
of what it returns.

Conventions (docs/architecture.md): physical µm with pixel centres, points (x, y), transforms map FIXED (the
histology) → MOVING (the MSI grid); simulated inputs (`metadata["simulated"]`) say "simulated" in every title,
report and metrics file they reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging
from scipy import ndimage

from msisynth import errors, geometry, outputs, report
from msisynth import io as msi_io
from msisynth import metrics as msi_metrics
from msisynth import regions as msi_regions
from msisynth.geometry import WORKING_FRACTION_OF_MSI_PIXEL, working_pixel_size_um  # noqa: F401 (public here too)
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import bspline, optimize
from msisynth.report import REPORT_FILES, write_section_report  # noqa: F401 (public here too)
from msisynth.types import MSIImage

# Bytes of warped output held in memory at once when carrying the MSI cube into histology space.
MAX_CHUNK_BYTES = 256 * 2**20
# Fewest measured MSI pixels a region needs to be compared with another.
MIN_REGION_PIXELS = 3
# Histogram bins of the evaluation MI (bits) reported before and after registration.
MI_BINS = 32
# Default control-point spacing of the deformable stage, in MSI pixels.
DEFORMABLE_SPACING_MSI_PX = 20

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
    self.histology_pixel_size_um = geometry.pixel_size_yx(self.histology_pixel_size_um, "histology_pixel_size_um")
    if self.msi_pixel_size_um is not None:
      self.msi_pixel_size_um = geometry.pixel_size_yx(self.msi_pixel_size_um, "msi_pixel_size_um")
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
    upsample: the synthesizer's recorded upsampling factor u (the synthetic H&E is on the MSI grid upsampled by u).
    before_registration: (H_w, W_w, 3) synthetic H&E on the working grid under the identity (for the figures).
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
  upsample: int = 1
  before_registration: np.ndarray | None = dataclasses.field(default=None, repr=False)
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
  if msi.pixel_size_um is None or not geometry.same_pixel_size(msi.pixel_size_um, pixel_size):
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


def _check_synthetic(synthetic, msi: MSIImage, upsample: int, name: str) -> np.ndarray:
  """The synthetic H&E clipped to [0, 1], checked to lie on the MSI grid upsampled by the recorded factor.

  A generator trained on upsampled pairs returns ((H - 1)·u + 1, (W - 1)·u + 1) pixels (`geometry.Grid.upsampled`;
  see `msisynth.synthesize.Synthesizer`); pixel (0, 0) stays at the MSI's pixel (0, 0).
  """
  synthetic = np.asarray(synthetic)
  expected = geometry.upsampled_shape(msi.shape, upsample)
  if synthetic.shape != (*expected, 3):
    raise errors.ConfigError(
      f"section {name!r}: the synthesizer returned shape {synthetic.shape}; it must return (H, W, 3) RGB on the "
      f"MSI grid ({msi.shape[0]}x{msi.shape[1]}) upsampled by its recorded factor u = {upsample}, i.e. "
      f"{(*expected, 3)} (a callable records u as its `upsample` attribute; a Synthesizer takes it from "
      "config.data.upsample)"
    )
  synthetic = synthetic.astype(np.float32)
  if not np.all(np.isfinite(synthetic)):
    raise errors.DataError(f"section {name!r}: the synthetic H&E has NaN or infinite values")
  return np.clip(synthetic, 0.0, 1.0)


def synthesizer_upsample(synthesizer) -> int:
  """The upsampling factor a synthesizer records (`Synthesizer.upsample`, or a callable's `upsample`), else 1."""
  return geometry.check_upsample(getattr(synthesizer, "upsample", 1))


_MI_NOTE = f"evaluation MI: hard-histogram MI in bits ({MI_BINS} bins, msisynth.metrics) of the grey levels"


def _evaluation_mi(fixed, warped, mask, unit_range: bool = True) -> tuple[float | None, float | None]:
  """Evaluation MI (hard histogram, bits) and NMI of two grey/RGB images inside a mask; None for an empty mask.

  `unit_range`: the images are in [0, 1] (histograms over [0, 1]); else over the data's range.
  """
  if not mask.any():
    return None, None
  value_range = (0.0, 1.0) if unit_range else None
  mi = float(msi_metrics.mutual_information(fixed, warped, bins=MI_BINS, mask=mask, value_range=value_range))
  nmi = float(
    msi_metrics.normalized_mutual_information(fixed, warped, bins=MI_BINS, mask=mask, value_range=value_range)
  )
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


json_ready = outputs.json_ready  # kept for callers of pipeline.json_ready


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
  carry_msi: bool = True,
) -> SectionResult:
  """Synthesises H&E from a section's MSI, registers it to the section's H&E and carries the MSI across.

  Stages (a)-(g) are described in the module docstring; each logs one line with its duration.

  Args:
    inputs: the section.
    synthesizer: any callable mapping an `MSIImage` to (H, W, 3) RGB in [0, 1] on the MSI grid upsampled by its
      `upsample` attribute (1 when it has none), e.g. a `msisynth.synthesize.Synthesizer` (which applies the
      preprocessor stored with its checkpoint and records the factor its generator was trained at).
    registration_pixel_size_um: pixel size of the H&E registration copy, µm; None for a quarter of the MSI pixel.
      Never finer than the H&E.
    flips: also start the registration from 90° rotations and mirror images (sections are often mounted turned or
      face down).
    output_pixel_size_um: pixel size of the MSI cube in histology space, µm; None for the working pixel size.
    mz_for_figures: m/z of the ion image under the region outlines; None for the most differential ion (or the
      channel with the highest mean intensity).
    out_dir: report folder (`msisynth.report.write_section_report`); None keeps everything in memory and writes
      nothing. A failure part-way leaves the files written so far (the batch launcher works in a temporary folder
      instead).
    overwrite: write into an existing non-empty `out_dir` that msisynth created, replacing files of the same names.
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
    carry_msi: compute the dense MSI cube in histology space (stage (e); `msi_in_histology_space.npy` with
      `out_dir`). False computes only its mask (`msi_in_histology` is None and no cube is written), for callers
      that export the MSI on its own grid (`msisynth.export.write_section_exports` without "npy").

  Returns:
    A `SectionResult`.

  Raises:
    ConfigError: an unknown MSI pixel size, bad pixel sizes or options, a synthesizer returning the wrong shape.
    DataError: unreadable inputs (naming the file).
    OutputExistsError: an existing non-empty `out_dir` without `overwrite` (or one msisynth did not create).
    RegistrationError: when the registration fails or gives a degenerate transform.
  """
  name = inputs.section_name()
  stage = _Stages(name)
  out = None
  if out_dir is not None:
    out = outputs.prepare_output_dir(out_dir, overwrite=overwrite, owner="msisynth.pipeline")
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
    factor = synthesizer_upsample(synthesizer)
    synthetic = _check_synthetic(synthesizer(msi), msi, factor, name)
    # Pixel size of the synthetic H&E, and the measured-pixel mask on its grid.
    syn_px = geometry.Grid(msi.shape, msi_px).upsampled(factor).pixel_size_um
    syn_mask = msi.mask
    if factor > 1:
      syn_mask = geometry.upsample_grid(msi.mask.astype(np.float32), factor, "nearest") > 0.5

  with stage("read H&E"):
    histology, histology_source = _read_histology(inputs)
    he_px = tuple(inputs.histology_pixel_size_um)
    working_px = working_pixel_size_um(msi_px, he_px, registration_pixel_size_um)
    if geometry.same_pixel_size(working_px, he_px):
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
    working_px if output_pixel_size_um is None else geometry.pixel_size_yx(output_pixel_size_um, "output_pixel_size_um")
  )
  if geometry.same_pixel_size(out_px, working_px):
    out_shape = working_shape
  else:
    out_shape = geometry.Grid(histology_shape, he_px).at_pixel_size(out_px).shape
  paths: dict[str, pathlib.Path] = {}
  if carry_msi:
    with stage("carry MSI into histology space"):
      cube_path = None
      if out is not None:
        cube_path = out / REPORT_FILES["msi_in_histology_space"]
        paths["msi_in_histology_space"] = cube_path
      warped_cube, warped_mask = _carry_msi(msi, transform, out_shape, out_px, cube_path, max_chunk_bytes)
    logging.info(
      "[%s] MSI in histology space: %dx%d px x %d channels at %s µm", name, *out_shape, msi.num_channels, out_px
    )
  else:
    with stage("MSI mask in histology space"):
      # One channel warped the same way gives the same mask as the full cube would.
      warped_cube = None
      warped_mask = np.asarray(tf.warp_msi(msi.select_mz(slice(0, 1)), transform, out_shape, out_px).mask, bool)

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
    "msi_cube_carried": bool(carry_msi),
    "mi_before": mi_before,
    "mi_after": mi_after,
    "nmi_before": nmi_before,
    "nmi_after": nmi_after,
    "mi_note": (
      _MI_NOTE + " of H&E and synthetic H&E inside the H&E tissue (plus one MSI pixel) where the MSI was "
      "measured; before = identity transform"
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
    upsample=factor,
    before_registration=before,
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
      report.write_report_files(section, out, overwrite=overwrite, figures=figures)
  section.timings_s = dict(stage.timings)
  section.timings_s["total"] = round(time.perf_counter() - t_start, 3)
  if out is not None:
    # The timing of the report stage itself is known only now.
    section.metrics["timing_s"] = section.timings_s
    outputs.atomic_write_json(out / REPORT_FILES["metrics"], section.metrics)
  logging.info("[%s] done in %.1f s%s", name, section.timings_s["total"], f" → {out}" if out is not None else "")
  return section


# ----------------------------------------------------------------------------------------------------------------
# Two images (no MSI): the same registration and evaluation, for image pairs.


@dataclasses.dataclass
class PairResult:
  """What `register_images` found (and wrote, with `out_dir`).

  Attributes:
    transform: FIXED µm → MOVING µm `AffineTransform`.
    registration: `msisynth.register.optimize.result_summary` of the registration.
    fixed: the fixed image; moving: the moving image (as given).
    fixed_pixel_size_um, moving_pixel_size_um: (y, x) µm.
    warped: the moving image resampled onto the fixed grid by the transform; before: the same under the identity.
    landmarks: (N, 4) fixed_x, fixed_y, moving_x, moving_y µm, or None.
    metrics: every number of the report (what `metrics.json` holds): evaluation MI/NMI before and after (hard
      histogram, bits, inside the overlap), the registration's own metric, TRE before/after with landmarks.
    simulated: whether the data are simulated (titles and metrics say so).
    fixed_name, moving_name: where the images came from.
    paths: {name: path} of the files written (empty without an output folder).
  """

  transform: AffineTransform
  registration: dict[str, Any]
  fixed: np.ndarray
  moving: np.ndarray
  fixed_pixel_size_um: tuple[float, float]
  moving_pixel_size_um: tuple[float, float]
  warped: np.ndarray
  before: np.ndarray
  landmarks: np.ndarray | None
  metrics: dict[str, Any]
  simulated: bool = False
  fixed_name: str = "fixed"
  moving_name: str = "moving"
  paths: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)


def register_images(
  fixed: np.ndarray,
  moving: np.ndarray,
  *,
  fixed_pixel_size_um,
  moving_pixel_size_um,
  fixed_mask: np.ndarray | None = None,
  moving_mask: np.ndarray | None = None,
  landmarks: str | os.PathLike | None = None,
  registration_config: optimize.RegistrationConfig | None = None,
  simulated: bool = False,
  fixed_name: str = "fixed",
  moving_name: str = "moving",
  out_dir: str | os.PathLike | None = None,
  overwrite: bool = False,
) -> PairResult:
  """Registers a moving image to a fixed one by `msisynth.register` and evaluates it like `process_section`.

  Args:
    fixed: (H, W) or (H, W, C) fixed image (histology).
    moving: (h, w) or (h, w, C) moving image.
    fixed_pixel_size_um, moving_pixel_size_um: pixel sizes, a number or (y, x) µm.
    fixed_mask, moving_mask: optional bool masks on each grid (True = use).
    landmarks: optional CSV of matched points (fixed_x, fixed_y, moving_x, moving_y µm, or *_px in pixels).
    registration_config: registration options; None for the defaults.
    simulated: mark every title and metric as simulated.
    fixed_name, moving_name: where the images came from (in the transform file and the metrics).
    out_dir: report folder (`msisynth.report.write_pair_report`); None writes nothing.
    overwrite: write into an existing non-empty `out_dir` that msisynth created.

  Returns:
    A `PairResult`.

  Raises:
    ConfigError, DataError, RegistrationError: bad options or inputs, a refused registration.
    OutputExistsError: an existing non-empty `out_dir` without `overwrite` (or one msisynth did not create).
  """
  fixed_px = geometry.pixel_size_yx(fixed_pixel_size_um, "fixed_pixel_size_um")
  moving_px = geometry.pixel_size_yx(moving_pixel_size_um, "moving_pixel_size_um")
  # Every input is read and checked before anything is written.
  points = None if landmarks is None else _read_landmarks(landmarks, fixed_px, moving_px)
  out = None
  if out_dir is not None:
    out = outputs.prepare_output_dir(out_dir, overwrite=overwrite, owner="msisynth.pipeline")
  fixed, moving = np.asarray(fixed), np.asarray(moving)
  for what, mask, image in (("fixed_mask", fixed_mask, fixed), ("moving_mask", moving_mask, moving)):
    if mask is not None and np.shape(mask) != image.shape[:2]:
      raise errors.ConfigError(f"{what} has shape {np.shape(mask)}, the image is {image.shape[:2]}")
  started = time.perf_counter()
  logging.info("registering %s (%s px at %s µm) to %s (%s px at %s µm)", moving_name, moving.shape[:2], moving_px,
               fixed_name, fixed.shape[:2], fixed_px)  # fmt: skip
  result = optimize.register(fixed, moving, fixed_pixel_size_um=fixed_px, moving_pixel_size_um=moving_px,
                             fixed_mask=fixed_mask, moving_mask=moving_mask,
                             config=registration_config or optimize.RegistrationConfig())  # fmt: skip
  seconds = time.perf_counter() - started
  logging.info("registered in %.1f s: %s %.4f, start %s, converged %s, uncertainty %.1f µm", seconds,
               result.metric_name, result.metric, result.start, result.converged, result.uncertainty_um)  # fmt: skip
  summary = optimize.result_summary(result)
  common = {"fixed_pixel_size_um": fixed_px, "moving_pixel_size_um": moving_px}
  identity = AffineTransform.identity()
  warped = np.asarray(tf.warp_image(moving, result.transform, fixed.shape[:2], **common))
  before = np.asarray(tf.warp_image(moving, identity, fixed.shape[:2], **common))

  # Evaluation MI / NMI on the fixed grid, inside the part of it the moving image covers.
  fixed_grey = optimize.to_grey(fixed)
  quality = {}
  for key, t, image in (("before", identity, before), ("after", result.transform, warped)):
    inside = np.asarray(tf.warp_image(np.ones(moving.shape[:2], bool), t, fixed.shape[:2], order=0, **common))
    if fixed_mask is not None:
      inside &= np.asarray(fixed_mask, bool)
    grey = optimize.to_grey(image)
    in_unit = min(fixed_grey.min(), grey.min()) >= 0 and max(fixed_grey.max(), grey.max()) <= 1
    mi, nmi = (None, None) if inside.sum() < 16 else _evaluation_mi(fixed_grey, grey, inside, in_unit)
    quality[f"mi_{key}"], quality[f"nmi_{key}"] = mi, nmi
  metrics = {
    "fixed": fixed_name,
    "moving": moving_name,
    "simulated": bool(simulated),
    "fixed_pixel_size_um": list(fixed_px),
    "moving_pixel_size_um": list(moving_px),
    **quality,
    "mi_note": _MI_NOTE + " inside the overlap (and the fixed mask); before = identity transform",
    "registration_metric": result.metric,
    "registration_metric_name": result.metric_name,
    "seconds": seconds,
    "converged": result.converged,
    "uncertainty_um": result.uncertainty_um,
    "registration": summary,
  }
  if points is not None:
    for key, t in (("before", identity), ("after", result.transform)):
      metrics[f"tre_{key}"] = _tre(t, points, moving_px)
  for warning in result.warnings:
    logging.warning("%s", warning)
  pair = PairResult(
    transform=result.transform,
    registration=summary,
    fixed=fixed,
    moving=moving,
    fixed_pixel_size_um=fixed_px,
    moving_pixel_size_um=moving_px,
    warped=warped,
    before=before,
    landmarks=points,
    metrics=metrics,
    simulated=bool(simulated),
    fixed_name=fixed_name,
    moving_name=moving_name,
  )
  if out is not None:
    report.write_pair_files(pair, out, overwrite=overwrite)
  return pair
