"""Registered sections where spatial-omics tools open them: SpatialData, pyramidal OME-TIFF, QuPath GeoJSON.

- `to_spatialdata` / `write_spatialdata`: one SpatialData object (zarr; napari-spatialdata opens it) holding the
  H&E as a multiscale image, the MSI on its own grid (an image with the m/z as channel names, or, when the cube
  is large, a pixel label image and an AnnData table of the sparse spectra), the registration as coordinate
  transformations between the "histology" and "msi" coordinate systems, regions as shapes and per-region
  statistics as an AnnData table.
- `write_ion_images_ome_tiff`: chosen ion images resampled onto the histology grid, streamed tile by tile into a
  tiled, pyramidal OME-TIFF with its physical pixel size, which QuPath (and other OME viewers) overlays on the
  slide (`ion_images_in_histology` + `write_ome_tiff` do the same in memory).
- `kmeans_segments` + `labels_to_regions` + `write_geojson_regions`: an MSI-derived segmentation (k-means of the
  spectra) as QuPath GeoJSON in histology pixel coordinates, the inverse of `msisynth.regions.read_geojson_regions`.

Conventions (docs/architecture.md). msisynth: pixel (r, c) of an image of pixel size (py, px) µm has its centre at
(x, y) = (c·px, r·py) µm, and a registration transform T maps histology (fixed) µm to MSI (moving) µm. SpatialData
(and QuPath's GeoJSON) put pixel (r, c)'s centre at (c + 0.5, r + 0.5) in intrinsic (pixel) coordinates, so every
element's map to a coordinate system starts with a shift of -0.5 pixel; the "histology" and "msi" coordinate
systems are then in µm with msisynth's origin, and the transformation from "histology" to "msi" is T itself.

A deformable registration (T(x) = A (x + d(x)) + b, an object with `affine`, `apply`, `inverse` and
`displacement_field`, as `msisynth.register.bspline.BSplineTransform`) is followed exactly by the ion images and
the segments; SpatialData, whose coordinate transformations are affine, gets the affine part plus the field.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from msisynth import errors, outputs
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.types import MSIImage

# What `write_section_exports` (and the launchers' --output_format) can write beside a section's report.
#   npy: the dense MSI cube in histology space (the report's msi_in_histology_space.npy);
#   spatialdata: section.zarr (`to_spatialdata`);
#   ome_tiff: ion_images.ome.tif, chosen ion images on the histology grid (`write_ion_images_ome_tiff`);
#   geojson: msi_segments.geojson, k-means segments of the spectra in histology pixels (`write_geojson_regions`).
OUTPUT_FORMATS = ("npy", "spatialdata", "ome_tiff", "geojson")
EXPORT_FILES = {
  "spatialdata": "section.zarr",
  "ome_tiff": "ion_images.ome.tif",
  "geojson": "msi_segments.geojson",
}
HISTOLOGY_CS = "histology"
MSI_CS = "msi"
# Above this many bytes of float32 cube, the MSI goes into SpatialData as a sparse table rather than an image.
MAX_IMAGE_BYTES = 1 << 30
# Pyramid levels stop when the smaller side would drop below this many pixels.
MIN_LEVEL_SIZE = 256


def check_output_format(formats: str | Sequence[str] | None) -> tuple[str, ...]:
  """The output formats asked for, checked against `OUTPUT_FORMATS` (a comma-separated string is split).

  Raises:
    ConfigError: for an unknown format.
  """
  if formats is None:
    return ()
  if isinstance(formats, str):
    formats = [f for f in formats.split(",") if f.strip()]
  formats = tuple(str(f).strip().lower().replace("-", "_") for f in formats)
  unknown = [f for f in formats if f not in OUTPUT_FORMATS]
  if unknown:
    raise errors.ConfigError(f"unknown output format(s) {unknown}; choose from {list(OUTPUT_FORMATS)}")
  return tuple(dict.fromkeys(formats))


def _is_affine(transform) -> bool:
  return np.shape(getattr(transform, "matrix", None)) == (3, 3)


def _is_deformable(transform) -> bool:
  """A deformable map T(x) = A (x + d(x)) + b with its affine part and a displacement field (B-spline)."""
  return _is_affine(getattr(transform, "affine", None)) and callable(getattr(transform, "displacement_field", None))


def _affine(transform) -> np.ndarray:
  """The (3, 3) float64 matrix of an affine transform, or of the affine part of a deformable one."""
  if _is_affine(transform):
    return np.asarray(transform.matrix, np.float64)
  if _is_deformable(transform):
    return np.asarray(transform.affine.matrix, np.float64)
  raise errors.ConfigError(
    f"expected an AffineTransform or a deformable transform with an affine part, got {type(transform).__name__}"
  )


def _map_points(transform, points_xy_um: np.ndarray, *, inverse: bool = False) -> np.ndarray:
  """(N, 2) points through a transform (or its inverse): affine maps in float64, others through `apply`."""
  points = np.asarray(points_xy_um, np.float64)
  if _is_affine(transform):
    m = np.asarray(transform.matrix, np.float64)
    m = np.linalg.inv(m) if inverse else m
    return points @ m[:2, :2].T + m[:2, 2]
  if not _is_deformable(transform):
    _affine(transform)  # raises the ConfigError
  import jax.numpy as jnp

  fn = transform.inverse().apply if inverse else transform.apply
  return np.asarray(fn(jnp.asarray(points, jnp.float32)), np.float64)


def _pixel_to_um(pixel_size_um) -> Any:
  """SpatialData transformation: intrinsic pixel coordinates (centre at +0.5) → µm with msisynth's origin."""
  from spatialdata import transformations as st

  py, px = tf.pixel_size_yx(pixel_size_um)
  return st.Sequence([st.Translation([-0.5, -0.5], axes=("x", "y")), st.Scale([px, py], axes=("x", "y"))])


def _sd_affine(matrix: np.ndarray):
  from spatialdata import transformations as st

  return st.Affine(np.asarray(matrix, np.float64), input_axes=("x", "y"), output_axes=("x", "y"))


def _on_histology(pixel_size_um, matrix: np.ndarray) -> dict[str, Any]:
  """Transformations of an element on the histology grid: to "histology" µm, and on through T to "msi" µm."""
  from spatialdata import transformations as st

  to_um = _pixel_to_um(pixel_size_um)
  return {HISTOLOGY_CS: to_um, MSI_CS: st.Sequence([to_um, _sd_affine(matrix)])}


def _on_msi(pixel_size_um, matrix: np.ndarray) -> dict[str, Any]:
  """Transformations of an element on the MSI grid: to "msi" µm, and on through T⁻¹ to "histology" µm."""
  from spatialdata import transformations as st

  to_um = _pixel_to_um(pixel_size_um)
  return {MSI_CS: to_um, HISTOLOGY_CS: st.Sequence([to_um, _sd_affine(np.linalg.inv(matrix))])}


def _scale_factors(shape: Sequence[int], min_size: int = MIN_LEVEL_SIZE) -> list[int]:
  """Factors of 2 between pyramid levels while the smaller side stays >= min_size (at least one level of 2)."""
  factors = []
  side = min(int(shape[0]), int(shape[1]))
  while side // 2 >= min_size or (not factors and side >= 2):
    factors.append(2)
    side //= 2
  return factors


def channel_names(mz: np.ndarray) -> list[str]:
  """Unique text names of m/z channels (5 decimals; a suffix where two round alike)."""
  names, seen = [], {}
  for value in np.asarray(mz, np.float64):
    name = f"{value:.5f}"
    if name in seen:
      seen[name] += 1
      name = f"{name}_{seen[name]}"
    else:
      seen[name] = 0
    names.append(name)
  return names


def _rgb_uint8(histology: np.ndarray) -> np.ndarray:
  image = np.asarray(histology)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise errors.ConfigError(f"histology must be (H, W, 3) RGB, got shape {image.shape}")
  image = image[..., :3]
  if image.dtype != np.uint8:
    image = np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255).astype(np.uint8)
  return image


def _regions_geodataframe(regions, names: Mapping[int, str] | None, pixel_shift: float = 0.5):
  """One (multi)polygon per region class, indexed by its label, in intrinsic (corner-origin) histology pixels."""
  import geopandas as gpd
  import shapely

  by_name: dict[str, list] = {}
  for region in regions:
    for polygon in region.polygons:
      shell = np.asarray(polygon.exterior_px) + pixel_shift
      holes = [np.asarray(h) + pixel_shift for h in polygon.holes_px]
      by_name.setdefault(region.name, []).append(shapely.Polygon(shell, holes))
  label_of = {v: k for k, v in (names or {}).items()}
  rows = []
  for i, (name, polygons) in enumerate(by_name.items(), start=1):
    geometry = polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)
    rows.append((int(label_of.get(name, i)), name, geometry))
  rows.sort()
  frame = gpd.GeoDataFrame({"name": [r[1] for r in rows]}, geometry=[r[2] for r in rows], index=[r[0] for r in rows])
  frame.index.name = "label"
  return frame


def _region_table(stats, names: Sequence[str], element: str):
  import anndata as ad
  import pandas as pd
  from spatialdata.models import TableModel

  obs = pd.DataFrame(
    {
      "label": np.asarray(stats.labels, np.int64),
      "name": stats.region_names(),
      "n_pixels": np.asarray(stats.n_pixels, np.int64),
      "region": pd.Categorical([element] * len(stats.labels)),
    },
    index=[str(int(v)) for v in stats.labels],
  )
  var = pd.DataFrame({"mz": np.asarray(stats.mz, np.float64)}, index=names)
  table = ad.AnnData(
    X=np.asarray(stats.mean, np.float32),
    obs=obs,
    var=var,
    layers={"median": np.asarray(stats.median, np.float32), "std": np.asarray(stats.std, np.float32)},
    uns={"simulated": bool(stats.simulated), "X": "mean intensity per region and channel"},
  )
  return TableModel.parse(table, region=element, region_key="region", instance_key="label")


def _spectra_table(msi: MSIImage, names: Sequence[str], element: str):
  """The measured spectra as a sparse AnnData table, one row per MSI pixel, keyed by the pixel-id labels."""
  import anndata as ad
  import pandas as pd
  import scipy.sparse
  from spatialdata.models import TableModel

  rows, cols = np.nonzero(msi.mask)
  ids = rows.astype(np.int64) * msi.shape[1] + cols + 1
  spectra = scipy.sparse.csr_matrix(np.asarray(msi.cube[rows, cols], np.float32))
  obs = pd.DataFrame(
    {"pixel_id": ids, "row": rows, "col": cols, "region": pd.Categorical([element] * len(ids))},
    index=[str(v) for v in ids],
  )
  var = pd.DataFrame({"mz": np.asarray(msi.mz, np.float64)}, index=names)
  table = ad.AnnData(X=spectra, obs=obs, var=var)
  return TableModel.parse(table, region=element, region_key="region", instance_key="pixel_id")


def to_spatialdata(
  histology: np.ndarray,
  histology_pixel_size_um: float | tuple[float, float],
  msi: MSIImage,
  transform,
  *,
  msi_pixel_size_um: float | tuple[float, float] | None = None,
  regions: Sequence[Any] | None = None,
  region_names: Mapping[int, str] | None = None,
  region_stats=None,
  segments: np.ndarray | None = None,
  deformation_pixel_size_um: float | tuple[float, float] | None = None,
  msi_as: str = "auto",
  max_image_bytes: int = MAX_IMAGE_BYTES,
  simulated: bool | None = None,
  name: str = "section",
):
  """One registered section as a `spatialdata.SpatialData` object.

  Elements (all with transformations to both coordinate systems, "histology" and "msi", in µm):
    - images["histology"]: the H&E, uint8 (c, y, x) with channels r, g, b, multiscale (factors of 2).
    - images["msi"]: the MSI cube on its own grid, float32 (c, y, x), channel names = m/z (`channel_names`);
      or, when the cube is large (`msi_as="table"`, or "auto" above `max_image_bytes`), labels["msi_pixels"]
      (each measured pixel's id) with tables["msi_spectra"], the sparse spectra annotating those labels, plus
      images["msi_tic"], the total ion count.
    - labels["msi_segments"]: a segmentation on the MSI grid (e.g. `kmeans_segments`), when given.
    - shapes["regions"]: one (multi)polygon per region class (index = the region's label), on the histology grid.
    - tables["region_statistics"]: per-region mean (X), median and std (layers) of every channel, with
      n_pixels, annotating shapes["regions"].
    - images["deformation_um"], for a deformable registration (a B-spline T(x) = A (x + d(x)) + b): the field
      T(x) - x (channels "dx", "dy", µm) at the pixel centres of a grid over the H&E, so that T(x) = x + field(x).
      SpatialData's coordinate transformations are affine: the one between "histology" and "msi" is then the
      affine part (A, b), and the field holds the rest.
  `sdata.attrs["msisynth"]` records the transform matrix, the pixel sizes and the conventions.

  Args:
    histology: (H, W, 3) RGB, float in [0, 1] or uint8.
    histology_pixel_size_um: H&E pixel size, µm, float or (y, x).
    msi: the MSI image (on its own grid).
    transform: the registration, histology (fixed) µm → MSI (moving) µm (`AffineTransform`).
    msi_pixel_size_um: MSI pixel size, µm; None for `msi.pixel_size_um`.
    regions: `msisynth.regions.Region`s in histology pixels (`read_geojson_regions`), or None.
    region_names: {label: name} of the labels `regions_to_msi` gave them (so that shape indices match
      `region_stats`); None numbers the classes in order.
    region_stats: `msisynth.regions.RegionStats`, or None.
    segments: int (h, w) labels on the MSI grid (0 = none), or None.
    deformation_pixel_size_um: pixel size of the deformation field of a deformable transform, µm; None: half
      the MSI pixel, never finer than the H&E.
    msi_as: "image", "table" or "auto".
    max_image_bytes: the "auto" threshold, bytes of float32 cube.
    simulated: whether the data are simulated (None: `msi.metadata["simulated"]`); recorded in the attrs.
    name: the section's name, recorded in the attrs.

  Returns:
    The SpatialData object (write it with `write_spatialdata`).

  Raises:
    ConfigError: for a bad image, pixel size, option, or a transform that is not affine.
  """
  import spatialdata as sd
  from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel

  matrix = _affine(transform)
  he_px = tf.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  msi_px = msi_pixel_size_um if msi_pixel_size_um is not None else msi.pixel_size_um
  if msi_px is None:
    raise errors.ConfigError("the MSI has no pixel size; pass msi_pixel_size_um")
  msi_px = tf.pixel_size_yx(msi_px, "msi_pixel_size_um")
  if msi_as not in ("auto", "image", "table"):
    raise errors.ConfigError(f"msi_as must be 'auto', 'image' or 'table', got {msi_as!r}")
  rgb = _rgb_uint8(histology)
  names = channel_names(msi.mz)
  on_he = _on_histology(he_px, matrix)
  on_msi = _on_msi(msi_px, matrix)

  images = {
    "histology": Image2DModel.parse(
      np.moveaxis(rgb, -1, 0),
      dims=("c", "y", "x"),
      c_coords=["r", "g", "b"],
      scale_factors=_scale_factors(rgb.shape[:2]),
      transformations=on_he,
    )
  }
  labels, tables, shapes = {}, {}, {}
  cube_bytes = int(np.prod(msi.cube.shape)) * 4
  as_table = msi_as == "table" or (msi_as == "auto" and cube_bytes > max_image_bytes)
  if as_table:
    h, w = msi.shape
    ids = (np.arange(h * w, dtype=np.int64).reshape(h, w) + 1) * msi.mask
    dtype = np.int32 if h * w < 2**31 - 1 else np.int64
    labels["msi_pixels"] = Labels2DModel.parse(ids.astype(dtype), dims=("y", "x"), transformations=on_msi)
    tables["msi_spectra"] = _spectra_table(msi, names, "msi_pixels")
    tic = np.asarray(msi.cube, np.float32).sum(axis=-1)
    images["msi_tic"] = Image2DModel.parse(tic[None], dims=("c", "y", "x"), c_coords=["tic"], transformations=on_msi)
  else:
    images["msi"] = Image2DModel.parse(
      np.moveaxis(np.asarray(msi.cube, np.float32), -1, 0),
      dims=("c", "y", "x"),
      c_coords=names,
      transformations=on_msi,
    )
  if segments is not None:
    segments = np.asarray(segments)
    if segments.shape != msi.shape:
      raise errors.ConfigError(f"segments must be on the MSI grid {msi.shape}, got shape {segments.shape}")
    labels["msi_segments"] = Labels2DModel.parse(segments.astype(np.int32), dims=("y", "x"), transformations=on_msi)
  if regions:
    frame = _regions_geodataframe(regions, region_names)
    shapes["regions"] = ShapesModel.parse(frame, transformations=on_he)
    if region_stats is not None:
      tables["region_statistics"] = _region_table(region_stats, names, "regions")
  deformable = _is_deformable(transform)
  if deformable:
    if deformation_pixel_size_um is None:
      deformation_pixel_size_um = (max(msi_px[0] / 2, he_px[0]), max(msi_px[1] / 2, he_px[1]))
    field_px = tf.pixel_size_yx(deformation_pixel_size_um, "deformation_pixel_size_um")
    field_shape = tuple(max(1, int(round(n * a / b))) for n, a, b in zip(rgb.shape[:2], he_px, field_px))
    field = np.asarray(transform.displacement_field(field_shape, field_px), np.float32)
    images["deformation_um"] = Image2DModel.parse(
      np.moveaxis(field, -1, 0),
      dims=("c", "y", "x"),
      c_coords=["dx", "dy"],
      transformations=_on_histology(field_px, matrix),
    )
  simulated = bool(msi.metadata.get("simulated", False)) if simulated is None else bool(simulated)
  sdata = sd.SpatialData(images=images, labels=labels, shapes=shapes, tables=tables)
  sdata.attrs["msisynth"] = {
    "section": name,
    "simulated": simulated,
    "transform_histology_um_to_msi_um": matrix.tolist(),
    "deformable": deformable,
    "histology_pixel_size_um": list(he_px),
    "msi_pixel_size_um": list(msi_px),
    "conventions": (
      "coordinate systems 'histology' and 'msi' are in µm; the centre of pixel (r, c) of an image of pixel size "
      "(py, px) is at (c*px, r*py); the transformation from 'histology' to 'msi' is the registration transform"
      + ("'s affine part; images['deformation_um'] holds T(x) - x of the full map" if deformable else "")
    ),
  }
  return sdata


def write_spatialdata(path: str | os.PathLike, sdata, *, overwrite: bool = False) -> pathlib.Path:
  """Writes a SpatialData object as zarr, complete or not at all (a temporary folder renamed into place).

  Raises:
    OutputExistsError: `path` exists and `overwrite` is False.
  """
  path = outputs.refuse_existing(path, overwrite=overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.zarr")
  try:
    sdata.write(tmp, overwrite=False, update_sdata_path=False)  # the folder is renamed below
    if path.exists():
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return path


# ----------------------------------------------------------------------------------------------------------------
# Ion images on the histology grid, as a pyramidal OME-TIFF.


def ion_images_in_histology(
  msi: MSIImage,
  transform,
  mz_values: Sequence[float],
  histology_shape: Sequence[int],
  histology_pixel_size_um: float | tuple[float, float],
  *,
  tol: float = 0.0,
  tol_unit: str = "da",
  msi_pixel_size_um: float | tuple[float, float] | None = None,
) -> np.ndarray:
  """Ion images resampled onto the histology grid (bilinear; 0 outside the MSI).

  Args:
    msi: the MSI image.
    transform: histology (fixed) µm → MSI (moving) µm.
    mz_values: the ions (each the sum of the channels within ±tol, or the nearest channel with tol=0).
    histology_shape: (H, W) of the output grid.
    histology_pixel_size_um: its pixel size, µm (the H&E's, or a coarser one over the same field of view).
    tol: m/z window half-width.
    tol_unit: "da" or "ppm".
    msi_pixel_size_um: None for `msi.pixel_size_um`.

  Returns:
    float32 (H, W, len(mz_values)).

  Raises:
    DataError: an m/z with no channel in its window.
    ConfigError: no ion asked for, or no MSI pixel size.
  """
  msi_px = _export_msi_pixel_size(msi, mz_values, msi_pixel_size_um)
  stack = np.stack(_ion_images(msi, mz_values, tol, tol_unit), axis=-1)
  shape = (int(histology_shape[0]), int(histology_shape[1]))
  size = tf.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  return _warp_tile(stack, transform, shape, size, (0.0, 0.0), msi_px)


def _export_msi_pixel_size(msi: MSIImage, mz_values: Sequence[float], msi_pixel_size_um) -> tuple[float, float]:
  """The MSI pixel size (y, x) µm an export of ion images works with: `msi_pixel_size_um`, else the MSI's.

  Raises:
    ConfigError: no ion asked for, or no MSI pixel size.
  """
  if not len(mz_values):
    raise errors.ConfigError("give at least one m/z to export")
  msi_px = msi_pixel_size_um if msi_pixel_size_um is not None else msi.pixel_size_um
  if msi_px is None:
    raise errors.ConfigError("the MSI has no pixel size; pass msi_pixel_size_um")
  return tf.pixel_size_yx(msi_px, "msi_pixel_size_um")


def _ion_images(msi: MSIImage, mz_values: Sequence[float], tol: float, tol_unit: str) -> list[np.ndarray]:
  """The float32 ion image (MSI grid) of each m/z."""
  return [np.asarray(msi.ion_image(float(mz), tol, tol_unit), np.float32) for mz in mz_values]


def _warp_tile(image, transform, shape, pixel_size_um, origin_xy_um, msi_px) -> np.ndarray:
  """`image` (MSI grid) resampled (bilinear, 0 outside) onto a grid whose pixel (0, 0) is at `origin_xy_um`."""
  if _is_affine(transform):
    shift = np.array([[1, 0, origin_xy_um[0]], [0, 1, origin_xy_um[1]], [0, 0, 1]], np.float64)
    local = AffineTransform.from_matrix(_affine(transform) @ shift)
    warped = tf.warp_image(image, local, shape, fixed_pixel_size_um=pixel_size_um, moving_pixel_size_um=msi_px)
    return np.asarray(warped, np.float32)
  import jax.numpy as jnp

  rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
  points = np.stack([origin_xy_um[0] + cols * pixel_size_um[1], origin_xy_um[1] + rows * pixel_size_um[0]], -1)
  mapped = _map_points(transform, points.reshape(-1, 2)).reshape(*shape, 2)
  values, inside = tf.sample_linear(
    jnp.asarray(image), jnp.asarray(mapped[..., 1] / msi_px[0]), jnp.asarray(mapped[..., 0] / msi_px[1])
  )
  if np.ndim(image) == 3:
    inside = inside[..., None]
  return np.asarray(jnp.where(inside, values, 0.0), np.float32)


def _downsample2(image: np.ndarray) -> np.ndarray:
  """(C, H, W) averaged over 2 × 2 blocks (edge rows/columns repeated for odd sizes)."""
  c, h, w = image.shape
  padded = np.pad(image, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
  return padded.reshape(c, (h + 1) // 2, 2, (w + 1) // 2, 2).mean(axis=(2, 4)).astype(image.dtype)


def write_ome_tiff(
  path: str | os.PathLike,
  image: np.ndarray,
  pixel_size_um: float | tuple[float, float],
  *,
  channel_names: Sequence[str] | None = None,
  levels: int | None = None,
  tile: int = 256,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes a multi-channel image as a tiled, pyramidal OME-TIFF with its physical pixel size.

  The full-resolution channels are the main pages, the downsampled levels (factors of 2, 2 × 2 means) their
  SubIFDs: the layout QuPath, Bio-Formats and OME viewers read as a pyramid. Same grid as the slide (same shape
  and pixel size) means QuPath overlays it pixel for pixel.

  Args:
    path: the file (name it `*.ome.tif`).
    image: (H, W) or (H, W, C) array (float32 or integers).
    pixel_size_um: (y, x) or scalar pixel size, µm.
    channel_names: one per channel (e.g. the m/z), or None.
    levels: pyramid levels including the full resolution; None: halve while the smaller side stays >= 256 px.
    tile: tile side in pixels (a multiple of 16).
    overwrite: replace an existing file.

  Returns:
    The path.

  Raises:
    ConfigError: for a bad image, pixel size, names or tile.
    OutputExistsError: the file exists and `overwrite` is False.
  """
  import tifffile

  data = np.asarray(image)
  if data.ndim == 2:
    data = data[..., None]
  if data.ndim != 3 or min(data.shape) < 1:
    raise errors.ConfigError(f"image must be (H, W) or (H, W, C), got shape {np.shape(image)}")
  _check_tile(tile)
  py, px = tf.pixel_size_yx(pixel_size_um, "pixel_size_um")
  data = np.ascontiguousarray(np.moveaxis(data, -1, 0))
  c, h, w = data.shape
  if channel_names is not None and len(channel_names) != c:
    raise errors.ConfigError(f"{len(channel_names)} channel names for {c} channels")
  levels = _level_count((h, w), levels)
  metadata = _ome_metadata((py, px), channel_names)
  options = dict(photometric="minisblack", tile=(tile, tile), compression="zlib")
  with outputs.atomic_path(path, overwrite=overwrite) as tmp:
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
      scale = 1
      tif.write(
        data,
        subifds=levels - 1,
        resolution=(1e4 / px, 1e4 / py),
        resolutionunit="CENTIMETER",
        metadata=metadata,
        **options,
      )
      level = data
      for _ in range(levels - 1):
        level = _downsample2(level)
        scale *= 2
        tif.write(
          level,
          subfiletype=1,
          resolution=(1e4 / (px * scale), 1e4 / (py * scale)),
          resolutionunit="CENTIMETER",
          metadata=None,
          **options,
        )
  return pathlib.Path(path)


def _check_tile(tile: int) -> None:
  """Raises ConfigError unless `tile` is a positive multiple of 16 (TIFF tiles)."""
  if tile % 16 or tile <= 0:
    raise errors.ConfigError(f"tile must be a positive multiple of 16, got {tile}")


def _ome_metadata(pixel_size_yx: tuple[float, float], channel_names: Sequence[str] | None) -> dict[str, Any]:
  """The OME metadata of a CYX image: its physical pixel size (y, x) µm and, when given, its channel names."""
  py, px = pixel_size_yx
  metadata: dict[str, Any] = {
    "axes": "CYX",
    "PhysicalSizeX": px,
    "PhysicalSizeXUnit": "µm",
    "PhysicalSizeY": py,
    "PhysicalSizeYUnit": "µm",
  }
  if channel_names is not None:
    metadata["Channel"] = {"Name": [str(n) for n in channel_names]}
  return metadata


def _level_count(shape: Sequence[int], levels: int | None) -> int:
  if levels is not None:
    return max(1, int(levels))
  count, side = 1, min(int(shape[0]), int(shape[1]))
  while side // 2 >= MIN_LEVEL_SIZE:
    count, side = count + 1, side // 2
  return count


def write_ion_images_ome_tiff(
  path: str | os.PathLike,
  msi: MSIImage,
  transform,
  mz_values: Sequence[float],
  histology_shape: Sequence[int],
  histology_pixel_size_um: float | tuple[float, float],
  *,
  tol: float = 0.0,
  tol_unit: str = "da",
  msi_pixel_size_um: float | tuple[float, float] | None = None,
  levels: int | None = None,
  tile: int = 512,
  overwrite: bool = False,
) -> pathlib.Path:
  """Ion images resampled onto a (whole-slide) histology grid, streamed tile by tile into a pyramidal OME-TIFF.

  The output is never held in memory whole: each tile of each level is resampled from the ion images on the MSI
  grid (bilinear, 0 outside the MSI), so a 40× slide costs one tile of memory. Level k has pixels 2^k times the
  histology pixel, each centred on the centre of the 2^k × 2^k block of histology pixels it stands for. Same
  file layout and metadata as `write_ome_tiff` (channel names "m/z <value>").

  Args:
    path: the file (name it `*.ome.tif`).
    msi: the MSI image.
    transform: histology (fixed) µm → MSI (moving) µm.
    mz_values: the ions (each the sum of the channels within ±tol, or the nearest channel with tol=0).
    histology_shape: (H, W) of the slide.
    histology_pixel_size_um: its pixel size, µm.
    tol: m/z window half-width.
    tol_unit: "da" or "ppm".
    msi_pixel_size_um: None for `msi.pixel_size_um`.
    levels: pyramid levels including the full resolution; None: halve while the smaller side stays >= 256 px.
    tile: tile side in pixels (a multiple of 16).
    overwrite: replace an existing file.

  Returns:
    The path.

  Raises:
    ConfigError: for a bad shape, pixel size, tile, or no ion.
    DataError: an m/z with no channel in its window.
    OutputExistsError: the file exists and `overwrite` is False.
  """
  import tifffile

  from msisynth import progress

  _check_tile(tile)
  msi_px = _export_msi_pixel_size(msi, mz_values, msi_pixel_size_um)
  py, px = tf.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  h, w = (int(v) for v in histology_shape[:2])
  if min(h, w) < 1:
    raise errors.ConfigError(f"histology_shape must be (H, W), got {histology_shape!r}")
  ions = _ion_images(msi, mz_values, tol, tol_unit)
  _affine(transform)  # an affine or deformable transform, or a ConfigError now rather than mid-file
  levels = _level_count((h, w), levels)
  shapes = [(-(-h // 2**k), -(-w // 2**k)) for k in range(levels)]
  n_tiles = sum(-(-a // tile) * -(-b // tile) for a, b in shapes) * len(ions)

  def tiles(k: int, bar):
    scale = 2**k
    size = (py * scale, px * scale)
    offset = ((scale - 1) / 2 * px, (scale - 1) / 2 * py)  # (x, y) µm of the level's pixel (0, 0)
    lh, lw = shapes[k]
    for ion in ions:
      for r0 in range(0, lh, tile):
        for c0 in range(0, lw, tile):
          origin = (c0 * size[1] + offset[0], r0 * size[0] + offset[1])
          bar.update(1)
          yield _warp_tile(ion, transform, (tile, tile), size, origin, msi_px)

  metadata = _ome_metadata((py, px), [f"m/z {float(mz):.4f}" for mz in mz_values])
  options = dict(photometric="minisblack", tile=(tile, tile), compression="zlib", dtype=np.float32)
  with (
    outputs.atomic_path(path, overwrite=overwrite) as tmp,
    progress.bar(desc="ion images into histology space", total=n_tiles, unit="tile") as bar,
  ):
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
      for k in range(levels):
        scale = 2**k
        extra = dict(subifds=levels - 1, metadata=metadata) if k == 0 else dict(subfiletype=1, metadata=None)
        tif.write(
          tiles(k, bar),
          shape=(len(ions), *shapes[k]),
          resolution=(1e4 / (px * scale), 1e4 / (py * scale)),
          resolutionunit="CENTIMETER",
          **extra,
          **options,
        )
  return pathlib.Path(path)


# ----------------------------------------------------------------------------------------------------------------
# MSI segments as QuPath GeoJSON.


def kmeans_segments(
  seed: int,
  msi: MSIImage,
  k: int,
  *,
  n_components: int = 10,
  iterations: int = 50,
) -> np.ndarray:
  """Segments the MSI by k-means of its spectra (TIC-normalised, reduced by PCA), a function of the seed.

  Args:
    seed: the seed of the k-means++ start.
    msi: the MSI image.
    k: the number of segments.
    n_components: PCA components the clustering runs on (at most the channel count).
    iterations: Lloyd iterations at most (it stops earlier when the assignment no longer changes).

  Returns:
    int32 (H, W) labels: 0 where no spectrum was measured, 1..k numbered by decreasing segment size.

  Raises:
    ConfigError: when k < 1 or there are fewer measured pixels than k.
  """
  from msisynth import preprocess

  spectra = np.asarray(msi.cube[msi.mask], np.float64)
  if k < 1 or spectra.shape[0] < k:
    raise errors.ConfigError(f"k-means needs 1 <= k <= measured pixels ({spectra.shape[0]}), got k={k}")
  tic = spectra.sum(axis=1, keepdims=True)
  spectra = spectra / np.where(tic > 0, tic, 1.0)
  n_components = max(1, min(int(n_components), spectra.shape[1], spectra.shape[0]))
  features = np.asarray(preprocess.pca(spectra.astype(np.float32), n_components).scores, np.float64)
  rng = np.random.default_rng(seed)
  centres = [features[rng.integers(len(features))]]
  for _ in range(1, k):  # k-means++: each next centre drawn in proportion to the squared distance.
    d2 = np.min(((features[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
    total = d2.sum()
    centres.append(features[rng.choice(len(features), p=d2 / total) if total > 0 else rng.integers(len(features))])
  centres = np.asarray(centres)
  assignment = np.full(len(features), -1)
  for _ in range(iterations):
    new = np.argmin(((features[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    if np.array_equal(new, assignment):
      break
    assignment = new
    for j in range(k):
      if np.any(assignment == j):
        centres[j] = features[assignment == j].mean(axis=0)
  sizes = np.bincount(assignment, minlength=k)
  order = np.argsort(-sizes, kind="stable")
  relabel = np.empty(k, np.int32)
  relabel[order] = np.arange(1, k + 1, dtype=np.int32)
  labels = np.zeros(msi.shape, np.int32)
  labels[msi.mask] = relabel[assignment]
  return labels


def labels_to_regions(
  labels_msi: np.ndarray,
  transform,
  *,
  msi_pixel_size_um: float | tuple[float, float],
  histology_pixel_size_um: float | tuple[float, float],
  names: Mapping[int, str] | None = None,
  colors: Mapping[int, tuple[int, int, int]] | None = None,
):
  """Label-image segments on the MSI grid as `Region` polygons in histology pixels (pixel-centre convention).

  Each label's polygon is the union of its MSI pixels' squares, mapped MSI px → MSI µm → T⁻¹ → histology µm →
  histology px, so `msisynth.regions.regions_to_msi` with the same (affine) transform gives the labels back. A
  deformable transform maps the edges' points every quarter of an MSI pixel.

  Args:
    labels_msi: int (h, w) labels on the MSI grid, 0 = none.
    transform: histology (fixed) µm → MSI (moving) µm.
    msi_pixel_size_um: MSI pixel size, µm.
    histology_pixel_size_um: pixel size of the histology image the polygons are drawn on, µm.
    names: {label: name}; None names them "segment <label>".
    colors: {label: (r, g, b)}; None picks distinct colours.

  Returns:
    One `msisynth.regions.Region` per label present, in label order.
  """
  import shapely

  from msisynth import regions as msi_regions

  labels_msi = np.asarray(labels_msi)
  if labels_msi.ndim != 2:
    raise errors.ConfigError(f"labels must be (H, W), got shape {labels_msi.shape}")
  my, mx = tf.pixel_size_yx(msi_pixel_size_um, "msi_pixel_size_um")
  hy, hx = tf.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  affine = _is_affine(transform)
  _affine(transform)  # an affine or deformable transform, else a ConfigError

  def mapped(points: np.ndarray) -> np.ndarray:
    # MSI pixel coordinates (x = column, y = row) → MSI µm → T⁻¹ → histology µm → histology pixels.
    in_he = _map_points(transform, points * (mx, my), inverse=True)
    return in_he / (hx, hy)

  out = []
  for label in (int(v) for v in np.unique(labels_msi) if v != 0):
    boxes = []
    for r, row in enumerate(labels_msi == label):
      if not row.any():
        continue
      edges = np.flatnonzero(np.diff(np.r_[0, row.astype(np.int8), 0]))
      for start, stop in zip(edges[::2], edges[1::2]):
        boxes.append(shapely.box(start - 0.5, r - 0.5, stop - 0.5, r + 0.5))
    union = shapely.union_all(boxes)
    if not affine:  # a deformable map bends the pixel edges: follow them every quarter of an MSI pixel
      union = shapely.segmentize(union, 0.25)
    parts = list(union.geoms) if hasattr(union, "geoms") else [union]
    polygons = []
    for part in parts:
      shell = mapped(np.asarray(part.exterior.coords)[:-1])
      holes = tuple(mapped(np.asarray(ring.coords)[:-1]) for ring in part.interiors)
      polygons.append(msi_regions.Polygon(shell, holes))
    name = (names or {}).get(label, f"segment {label}")
    color = (colors or {}).get(label) or _distinct_color(label)
    out.append(msi_regions.Region(name=name, polygons=tuple(polygons), object_type="annotation", color=color))
  return out


def _distinct_color(label: int) -> tuple[int, int, int]:
  import colorsys

  hue = (label * 0.618033988749895) % 1.0
  return tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(hue, 0.75, 0.95))


def regions_to_geojson(regions) -> dict[str, Any]:
  """Regions (histology pixels, pixel-centre convention) as a QuPath GeoJSON FeatureCollection (corner origin)."""
  features = []
  for region in regions:
    rings = []
    for polygon in region.polygons:
      parts = [polygon.exterior_px, *polygon.holes_px]
      rings.append([[[float(x) + 0.5, float(y) + 0.5] for x, y in np.r_[p, p[:1]]] for p in parts])
    geometry = (
      {"type": "Polygon", "coordinates": rings[0]}
      if len(rings) == 1
      else {
        "type": "MultiPolygon",
        "coordinates": rings,
      }
    )
    classification: dict[str, Any] = {"name": region.name}
    if region.color is not None:
      classification["color"] = [int(v) for v in region.color]
    feature = {
      "type": "Feature",
      "geometry": geometry,
      "properties": {"objectType": region.object_type or "annotation", "classification": classification},
    }
    if region.id is not None:
      feature["id"] = region.id
    features.append(feature)
  return {"type": "FeatureCollection", "features": features}


def write_geojson_regions(path: str | os.PathLike, regions, *, overwrite: bool = False) -> pathlib.Path:
  """Writes regions as QuPath GeoJSON (`regions_to_geojson`), atomically; QuPath imports it onto the slide.

  Raises:
    OutputExistsError: the file exists and `overwrite` is False.
  """
  return outputs.atomic_write_json(path, regions_to_geojson(regions), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------------------
# A section's exports.


def write_exports(
  out_dir: str | os.PathLike,
  output_format: Sequence[str],
  *,
  histology: np.ndarray,
  histology_pixel_size_um: float | tuple[float, float],
  msi: MSIImage,
  transform,
  msi_pixel_size_um: float | tuple[float, float] | None = None,
  regions: str | os.PathLike | Sequence[Any] | None = None,
  region_names: Mapping[int, str] | None = None,
  region_stats=None,
  mz_values: Sequence[float] | None = None,
  n_ions: int = 4,
  n_segments: int = 4,
  seed: int = 0,
  simulated: bool | None = None,
  name: str = "section",
  overwrite: bool = False,
) -> dict[str, pathlib.Path]:
  """Writes the exports asked for of one registered section into `out_dir` (names in `EXPORT_FILES`).

  "npy" is not written here (the pipeline's report writes the dense cube); the other formats are.

  Args:
    out_dir: the folder.
    output_format: formats from `OUTPUT_FORMATS`.
    histology: the H&E (H, W, 3) the exports are placed on (the grid of the OME-TIFF and of the GeoJSON).
    histology_pixel_size_um: its pixel size, µm.
    msi: the MSI image on its own grid.
    transform: the registration, histology (fixed) µm → MSI (moving) µm.
    msi_pixel_size_um: None for `msi.pixel_size_um`.
    regions: the section's regions (a GeoJSON path or `Region`s on this H&E), for the SpatialData shapes.
    region_names: {label: name} of `regions_to_msi`, matching `region_stats`.
    region_stats: `msisynth.regions.RegionStats`, stored with the shapes.
    mz_values: ions of the OME-TIFF; None: the `n_ions` channels of highest mean intensity.
    n_ions: how many ions when `mz_values` is None.
    n_segments: k of the k-means segments ("geojson"; also stored in the SpatialData).
    seed: seed of the k-means.
    simulated: whether the data are simulated (None: the MSI's metadata).
    name: the section's name.
    overwrite: replace existing export files.

  Returns:
    {format: path} of what was written.

  Raises:
    ConfigError: an unknown format, or no MSI pixel size.
    OutputExistsError: an export exists and `overwrite` is False.
  """
  from msisynth import regions as msi_regions

  formats = check_output_format(output_format)
  out = pathlib.Path(out_dir)
  msi_px = msi_pixel_size_um if msi_pixel_size_um is not None else msi.pixel_size_um
  if msi_px is None:
    raise errors.ConfigError("the MSI has no pixel size; pass msi_pixel_size_um")
  written: dict[str, pathlib.Path] = {}
  segments = None
  if "geojson" in formats or "spatialdata" in formats:
    segments = kmeans_segments(seed, msi, max(1, min(int(n_segments), int(np.sum(msi.mask)))))
  if "spatialdata" in formats:
    drawn = msi_regions.read_geojson_regions(regions) if isinstance(regions, str | os.PathLike) else regions
    sdata = to_spatialdata(
      histology,
      histology_pixel_size_um,
      msi,
      transform,
      msi_pixel_size_um=msi_px,
      regions=drawn,
      region_names=region_names,
      region_stats=region_stats if drawn else None,
      segments=segments,
      simulated=simulated,
      name=name,
    )
    written["spatialdata"] = write_spatialdata(out / EXPORT_FILES["spatialdata"], sdata, overwrite=overwrite)
  if "ome_tiff" in formats:
    if mz_values is None:
      mz_values = _most_intense(msi, n_ions)
    written["ome_tiff"] = write_ion_images_ome_tiff(
      out / EXPORT_FILES["ome_tiff"],
      msi,
      transform,
      mz_values,
      np.shape(histology)[:2],
      histology_pixel_size_um,
      msi_pixel_size_um=msi_px,
      overwrite=overwrite,
    )
  if "geojson" in formats:
    segment_regions = labels_to_regions(
      segments, transform, msi_pixel_size_um=msi_px, histology_pixel_size_um=histology_pixel_size_um
    )
    written["geojson"] = write_geojson_regions(out / EXPORT_FILES["geojson"], segment_regions, overwrite=overwrite)
  logging.info("[%s] exports: %s", name, ", ".join(f"{k} → {p.name}" for k, p in written.items()) or "none")
  return written


def write_section_exports(
  result,
  out_dir: str | os.PathLike,
  *,
  output_format: Sequence[str],
  histology: str | os.PathLike | np.ndarray | None = None,
  regions: str | os.PathLike | None = None,
  msi: MSIImage | None = None,
  mz_values: Sequence[float] | None = None,
  **options,
) -> dict[str, pathlib.Path]:
  """`write_exports` for a `msisynth.pipeline.SectionResult`, beside its report (the launchers' --output_format).

  Args:
    result: the section's result.
    out_dir: the section's report folder.
    output_format: formats from `OUTPUT_FORMATS`. Without "npy" the dense cube in histology space
      (msi_in_histology_space.npy) is removed from the folder: the other formats keep the MSI on its own grid.
    histology: the full-resolution H&E (path or array); None uses the pipeline's registration copy at its
      working pixel size.
    regions: the section's GeoJSON (its regions go into the SpatialData as shapes with their statistics).
    msi: the MSI image; None uses the one the result kept.
    mz_values: ions of the OME-TIFF; None takes the most differential ions (or the most intense).
    **options: more keyword arguments of `write_exports` (n_ions, n_segments, seed, overwrite).

  Returns:
    {format: path} of what was written (also added to `result.paths` as "export_<format>").

  Raises:
    ConfigError: an unknown format, or no MSI to export.
  """
  from msisynth import io as msi_io

  formats = check_output_format(output_format)
  msi = msi if msi is not None else getattr(result, "_msi", None)
  if msi is None and set(formats) - {"npy"}:
    raise errors.ConfigError("the section result keeps no MSI image; pass msi=")
  if isinstance(histology, str | os.PathLike):
    histology, he_px = msi_io.read_histology(histology), result.histology_pixel_size_um
  elif histology is None:
    histology, he_px = result.histology_working, result.working_pixel_size_um
  else:
    he_px = result.histology_pixel_size_um
  differential = getattr(result, "differential", None)
  if mz_values is None and differential is not None and len(differential.mz):
    mz_values = [float(v) for v in differential.mz[: int(options.get("n_ions", 4))]]
  written = {}
  if set(formats) - {"npy"}:
    written = write_exports(
      out_dir,
      [f for f in formats if f != "npy"],
      histology=histology,
      histology_pixel_size_um=he_px,
      msi=msi,
      transform=result.transform,
      msi_pixel_size_um=result.msi_pixel_size_um,
      regions=regions,
      region_names=result.region_names,
      region_stats=result.region_stats,
      mz_values=mz_values,
      simulated=result.simulated,
      name=result.name,
      **options,
    )
  if "npy" not in formats:
    cube = result.paths.pop("msi_in_histology_space", None)
    if cube is not None and pathlib.Path(cube).exists():
      pathlib.Path(cube).unlink()
  for key, path in written.items():
    result.paths[f"export_{key}"] = path
  return written


def _most_intense(msi: MSIImage, n: int) -> list[float]:
  """The m/z of the n channels of highest mean intensity, in m/z order."""
  means = np.asarray(msi.cube, np.float64).reshape(-1, msi.num_channels).mean(axis=0)
  top = np.sort(np.argsort(-means, kind="stable")[: max(1, min(n, msi.num_channels))])
  return [float(msi.mz[i]) for i in top]
