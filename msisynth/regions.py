"""Histology annotations carried onto the MSI grid, and the chemistry of each annotated region.

Annotations drawn on the H&E (QuPath GeoJSON polygons, or a label image on the histology grid) are moved onto
the MSI pixel grid with the registration transform, and each region's spectra are summarised and compared.

Layout and conventions (docs/architecture.md): images are (H, W) row-major, row = y, column = x. A label image is
int32 with 0 = unlabelled and 1, 2, ... naming regions through a `names` dict {label: name}. Polygon vertices are
(x, y) in pixels of the annotated histology image with the library's pixel-centre convention (the centre of pixel
(0, 0) is (0, 0)); physical points are (x, y) µm. The transform maps histology (FIXED) µm to MSI (MOVING) µm: a
histology point p lies at MSI point T(p), and the MSI pixel centred at q shows the histology point T⁻¹(q).

Everything here is NumPy: it runs once per section on the CPU, with no gradients.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats
import skimage.draw

from msisynth import errors, geometry, outputs
from msisynth.geometry import transforms
from msisynth.types import MSIImage

logger = logging.getLogger(__name__)

_SKIPPED_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString")
# Sub-pixel samples per axis when voting for an MSI pixel's label: 16 x 16 = 256 votes per pixel bound the cost
# for very fine histology while estimating the majority far better than its sampling noise needs.
_MAX_SAMPLES_PER_AXIS = 16
# Vote counters (uint16, one per MSI pixel and label) held at once: bounds the memory of a vote to 128 MB.
_MAX_COUNTS = 1 << 26
# Float64 values of one region's spectra summarised at once: bounds memory for profile data with many channels.
_MAX_BLOCK_VALUES = 1 << 24


@dataclasses.dataclass(frozen=True, eq=False)
class Polygon:
  """A simple polygon with optional holes, in histology pixel coordinates.

  Attributes:
    exterior_px: float64 (N, 2) vertices (x, y) in pixels (pixel-centre convention), not repeating the first one.
    holes_px: a tuple of such (M, 2) arrays, one per hole.
  """

  exterior_px: np.ndarray
  holes_px: tuple[np.ndarray, ...] = ()

  def area_px(self) -> float:
    """The area in square pixels: the exterior's area less its holes' (shoelace formula)."""
    return _ring_area(self.exterior_px) - sum(_ring_area(hole) for hole in self.holes_px)

  def map_points(self, fn: Callable[[np.ndarray], np.ndarray]) -> Polygon:
    """The same polygon with every vertex array passed through `fn` ((N, 2) -> (N, 2))."""
    return Polygon(
      np.asarray(fn(self.exterior_px), dtype=np.float64),
      tuple(np.asarray(fn(hole), dtype=np.float64) for hole in self.holes_px),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Region:
  """One annotated object: a class name and one or more polygons (a GeoJSON Polygon or MultiPolygon).

  Attributes:
    name: the class name (QuPath classification), which becomes the region's name in label images and tables.
    polygons: the polygons, in pixels of the annotated histology image (x, y), pixel-centre convention.
    object_type: QuPath's objectType ("annotation", "detection", ...).
    color: the class colour as (r, g, b) in 0-255 when the file gives one, else None.
    id: the feature's identifier when the file gives one, else None.
  """

  name: str
  polygons: tuple[Polygon, ...]
  object_type: str = "annotation"
  color: tuple[int, int, int] | None = None
  id: str | None = None

  def area_px(self) -> float:
    """The total area in square histology pixels (holes excluded)."""
    return float(sum(polygon.area_px() for polygon in self.polygons))


@dataclasses.dataclass(frozen=True, eq=False)
class RegionStats:
  """Per-region summaries of an MSI image's measured spectra.

  Attributes:
    labels: int (R,) the region labels, in the order of the rows below.
    names: {label: name} for those labels.
    mz: float64 (C,) m/z of each channel.
    n_pixels: int (R,) measured MSI pixels in each region.
    mean: float64 (R, C) mean intensity per region and channel (NaN for a region with no measured pixel).
    median: float64 (R, C) median intensity.
    std: float64 (R, C) sample standard deviation (ddof=1; NaN with fewer than two pixels).
    simulated: whether the MSI data are simulated (then every table and figure says so).
  """

  labels: np.ndarray
  names: dict[int, str]
  mz: np.ndarray
  n_pixels: np.ndarray
  mean: np.ndarray
  median: np.ndarray
  std: np.ndarray
  simulated: bool = False

  def region_names(self) -> list[str]:
    """The region names in row order."""
    return [self.names[int(label)] for label in self.labels]


@dataclasses.dataclass(frozen=True, eq=False)
class DifferentialIons:
  """Ions that differ between two regions, sorted by q-value then by |log2 fold change| (largest first).

  Attributes:
    region_a: name of the first region (the numerator of the fold change).
    region_b: name of the second region.
    n_a: measured pixels in region A.
    n_b: measured pixels in region B.
    pseudo_count: the intensity added to both means before the fold change.
    channel: int (K,) channel index of each row.
    mz: float64 (K,) m/z of each row.
    mean_a: float64 (K,) mean intensity in region A.
    mean_b: float64 (K,) mean intensity in region B.
    log2_fold_change: float64 (K,) log2((mean_a + pseudo_count) / (mean_b + pseudo_count)).
    u_statistic: float64 (K,) Mann-Whitney U of region A's pixels against region B's.
    p_value: float64 (K,) two-sided Mann-Whitney U p-value.
    q_value: float64 (K,) Benjamini-Hochberg adjusted p-value over all channels tested.
    simulated: whether the MSI data are simulated.
  """

  region_a: str
  region_b: str
  n_a: int
  n_b: int
  pseudo_count: float
  channel: np.ndarray
  mz: np.ndarray
  mean_a: np.ndarray
  mean_b: np.ndarray
  log2_fold_change: np.ndarray
  u_statistic: np.ndarray
  p_value: np.ndarray
  q_value: np.ndarray
  simulated: bool = False

  def __len__(self) -> int:
    return int(self.channel.size)


# ----------------------------------------------------------------------------------------------------------------
# Reading annotations.


def read_geojson_regions(
  path: str | os.PathLike,
  *,
  origin: str = "corner",
  object_types: Sequence[str] | None = None,
) -> list[Region]:
  """Reads polygon annotations from a GeoJSON file as QuPath exports it.

  Accepts a FeatureCollection, a bare list of Features (QuPath writes this too) or a single Feature. Each
  Feature's geometry must be a Polygon or MultiPolygon (holes kept) or a GeometryCollection of them; Point and
  LineString geometries (and their Multi forms, and null geometries) are skipped with a logged warning. The class
  name is `properties.classification.name`, else `properties.name`, else "unnamed".

  Args:
    path: the GeoJSON file.
    origin: where the file puts pixel coordinates' origin. "corner" (QuPath and most image tools): (0, 0) is the
      top-left corner of pixel (0, 0), whose centre is (0.5, 0.5). "center": (0, 0) is the centre of pixel
      (0, 0), the library's convention. Coordinates are converted to the pixel-centre convention.
    object_types: keep only features whose objectType is one of these (e.g. ("annotation",) to drop cell
      detections); None keeps all.

  Returns:
    The regions in file order, vertices in histology pixels (x, y), pixel-centre convention.

  Raises:
    DataError: naming the file, when it is missing, is not JSON, is not GeoJSON features, has a geometry type
      that is not supported, has an empty or degenerate polygon, or has no usable polygon at all.
    ConfigError: for an unknown `origin`.
  """
  if origin not in ("corner", "center"):
    raise errors.ConfigError(f"origin must be 'corner' or 'center', got {origin!r}")
  shift = 0.5 if origin == "corner" else 0.0
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise errors.DataError("GeoJSON file not found", path) from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.DataError(f"not valid JSON: {e}", path) from e

  if isinstance(data, list):
    features = data
  elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
    features = data.get("features")
    if not isinstance(features, list):
      raise errors.DataError("FeatureCollection has no 'features' list", path)
  elif isinstance(data, dict) and data.get("type") == "Feature":
    features = [data]
  else:
    kind = data.get("type") if isinstance(data, dict) else type(data).__name__
    raise errors.DataError(f"expected a GeoJSON FeatureCollection or a list of Features, got {kind!r}", path)

  regions = []
  skipped = 0
  for index, feature in enumerate(features):
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
      raise errors.DataError(f"feature {index} is not a GeoJSON Feature", path)
    properties = feature.get("properties") or {}
    if not isinstance(properties, dict):
      raise errors.DataError(f"feature {index} has properties that are not an object", path)
    object_type = str(properties.get("objectType", properties.get("object_type", "annotation")))
    if object_types is not None and object_type not in object_types:
      continue
    polygons, skipped_types = _geometry_polygons(feature.get("geometry"), shift, path, index)
    if skipped_types:
      skipped += 1
      logger.warning(
        "%s: feature %d: skipped geometry %s (only polygons define regions)",
        os.fspath(path),
        index,
        ", ".join(skipped_types),
      )
    if not polygons:
      continue
    name, color = _feature_class(properties)
    feature_id = feature.get("id", properties.get("id"))
    regions.append(
      Region(
        name=name,
        polygons=tuple(polygons),
        object_type=object_type,
        color=color,
        id=None if feature_id is None else str(feature_id),
      )
    )
  if not regions:
    what = f" ({skipped} non-polygon feature(s) skipped)" if skipped else ""
    if object_types is not None:
      what += f" among object types {list(object_types)}"
    raise errors.DataError(f"no polygon annotations found{what}", path)
  return regions


def _feature_class(properties: Mapping[str, Any]) -> tuple[str, tuple[int, int, int] | None]:
  """The class name and colour of a QuPath feature's properties."""
  classification = properties.get("classification")
  name, color = None, None
  if isinstance(classification, dict):
    name = classification.get("name")
    if name is None and isinstance(classification.get("names"), list) and classification["names"]:
      name = ": ".join(str(part) for part in classification["names"])
    color = classification.get("color", classification.get("colorRGB"))
  elif isinstance(classification, str):
    name = classification
  if not name:
    name = properties.get("name") or "unnamed"
  if isinstance(color, (list, tuple)) and len(color) == 3 and all(isinstance(v, (int, float)) for v in color):
    color = tuple(int(v) for v in color)
  elif isinstance(color, int):
    # QuPath's packed ARGB integer.
    color = ((color >> 16) & 255, (color >> 8) & 255, color & 255)
  else:
    color = None
  return str(name), color


def _geometry_polygons(geometry: Any, shift: float, path, index: int) -> tuple[list[Polygon], list[str]]:
  """The polygons of one feature's geometry, and the names of the geometry types skipped."""
  if geometry is None:
    return [], ["null"]
  if not isinstance(geometry, dict) or "type" not in geometry:
    raise errors.DataError(f"feature {index} has a geometry that is not a GeoJSON object", path)
  kind = geometry["type"]
  if kind in _SKIPPED_GEOMETRIES:
    return [], [kind]
  if kind == "GeometryCollection":
    polygons, skipped = [], []
    for part in geometry.get("geometries") or []:
      more, more_skipped = _geometry_polygons(part, shift, path, index)
      polygons += more
      skipped += more_skipped
    return polygons, skipped
  coordinates = geometry.get("coordinates")
  if kind == "Polygon":
    return [_parse_polygon(coordinates, shift, path, index)], []
  if kind == "MultiPolygon":
    if not isinstance(coordinates, list) or not coordinates:
      raise errors.DataError(f"feature {index}: empty MultiPolygon", path)
    return [_parse_polygon(part, shift, path, index) for part in coordinates], []
  raise errors.DataError(
    f"feature {index}: unsupported geometry type {kind!r} (expected Polygon or MultiPolygon)", path
  )


def _parse_polygon(rings: Any, shift: float, path, index: int) -> Polygon:
  """A Polygon from GeoJSON rings [exterior, hole, ...], shifted to the pixel-centre convention."""
  if not isinstance(rings, list) or not rings:
    raise errors.DataError(f"feature {index}: empty polygon", path)
  parsed = []
  for ring_index, ring in enumerate(rings):
    what = "exterior ring" if ring_index == 0 else f"hole {ring_index}"
    try:
      points = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise errors.DataError(f"feature {index}: {what} has coordinates that are not numbers", path) from e
    if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] < 2:
      raise errors.DataError(f"feature {index}: {what} is empty or not a list of [x, y] positions", path)
    points = points[:, :2]
    if not np.all(np.isfinite(points)):
      raise errors.DataError(f"feature {index}: {what} has non-finite coordinates", path)
    if points.shape[0] > 1 and np.array_equal(points[0], points[-1]):
      points = points[:-1]
    if np.unique(points, axis=0).shape[0] < 3 or _ring_area(points) == 0:
      raise errors.DataError(f"feature {index}: {what} is empty (fewer than 3 distinct vertices or zero area)", path)
    parsed.append(points - shift)
  return Polygon(parsed[0], tuple(parsed[1:]))


def _ring_area(points: np.ndarray) -> float:
  x, y = points[:, 0], points[:, 1]
  return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# ----------------------------------------------------------------------------------------------------------------
# Rasterising.


def rasterize_regions(
  regions: Sequence[Region],
  shape: tuple[int, int],
  *,
  pixel_size_um: float | tuple[float, float] = 1.0,
  regions_pixel_size_um: float | tuple[float, float] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
  """Rasterises polygon regions onto an image grid.

  A pixel belongs to a polygon when its centre lies inside the exterior ring and outside every hole (a centre
  exactly on an edge counts as inside, so integer-aligned edges are avoided by the pixel-centre convention for
  QuPath's corner-based coordinates). Regions with the same name share one label, numbered 1, 2, ... in order of
  first appearance. Where regions overlap, the later one in the list wins (QuPath writes parents before the
  objects drawn inside them, so inner annotations win). To keep features of one class apart, give them distinct
  names (`dataclasses.replace(region, name=...)`).

  Args:
    regions: the regions, vertices in pixels of the annotated image.
    shape: (height, width) of the grid.
    pixel_size_um: (y, x) or scalar pixel size of the grid, µm.
    regions_pixel_size_um: pixel size of the image the regions were drawn on, µm; None when that is the grid
      itself (same as `pixel_size_um`). Both grids have the centre of pixel (0, 0) at (0, 0) µm.

  Returns:
    (labels, names): int32 (H, W) labels, 0 = unlabelled, and {label: name}.

  Raises:
    ConfigError: for a bad shape or pixel size, or no regions.
  """
  grid = geometry.pixel_size_yx(pixel_size_um, "pixel_size_um")
  source = (
    grid if regions_pixel_size_um is None else geometry.pixel_size_yx(regions_pixel_size_um, "regions_pixel_size_um")
  )
  scale = np.array([source[1] / grid[1], source[0] / grid[0]])
  return _rasterize(regions, _shape(shape), lambda points: points * scale)


def _rasterize(
  regions: Sequence[Region], shape: tuple[int, int], to_grid_px: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, dict[int, str]]:
  """Rasterises regions after mapping their vertices with `to_grid_px` ((N, 2) (x, y) -> grid pixels)."""
  if not regions:
    raise errors.ConfigError("no regions to rasterise")
  for region in regions:
    if not isinstance(region, Region):
      raise errors.ConfigError(f"expected Region objects, got {type(region).__name__}")
  labels = np.zeros(shape, dtype=np.int32)
  label_of: dict[str, int] = {}
  for region in regions:
    label = label_of.setdefault(region.name, len(label_of) + 1)
    mask = np.zeros(shape, dtype=bool)
    for polygon in region.polygons:
      mask |= _polygon_mask(polygon.map_points(to_grid_px), shape)
    labels[mask] = label
  return labels, {label: name for name, label in label_of.items()}


def _polygon_mask(polygon: Polygon, shape: tuple[int, int]) -> np.ndarray:
  mask = np.zeros(shape, dtype=bool)
  rows, cols = skimage.draw.polygon(polygon.exterior_px[:, 1], polygon.exterior_px[:, 0], shape)
  mask[rows, cols] = True
  for hole in polygon.holes_px:
    rows, cols = skimage.draw.polygon(hole[:, 1], hole[:, 0], shape)
    mask[rows, cols] = False
  return mask


# ----------------------------------------------------------------------------------------------------------------
# Transfer to the MSI grid.


def regions_to_msi(
  labels_or_regions: np.ndarray | Sequence[Region],
  transform,
  msi_shape: tuple[int, int],
  *,
  histology_pixel_size_um: float | tuple[float, float],
  msi_pixel_size_um: float | tuple[float, float],
  names: Mapping[int, str] | None = None,
  method: str = "majority",
  samples_per_pixel: int | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
  """Carries histology annotations onto the MSI pixel grid.

  The transform maps histology (fixed) µm to MSI (moving) µm, as `register` returns it.

  Polygons (a sequence of `Region`) are exact: every vertex is mapped histology px → histology µm → `T` → MSI µm
  → MSI px, and the mapped polygons are rasterised on the MSI grid (an affine map takes polygons to polygons;
  through a deformable one the edges are first split every half MSI pixel):
  an MSI pixel belongs to a region when its centre lies inside the mapped polygon, which for a region wider than
  a pixel is within a boundary pixel of the majority rule below. Labels are numbered as `rasterize_regions` does.

  A label image on the histology grid is resampled. With `method="majority"` (the default) each MSI pixel takes
  the most frequent label among a regular grid of sample points inside it, each MSI point q read from the label
  image at T⁻¹(q) (nearest histology pixel; points outside the histology image vote 0). MSI pixels are 10-100 µm
  across while H&E pixels are 0.25-2 µm, so one MSI pixel covers hundreds to thousands of H&E pixels; reading
  only the label under its centre would let a thin structure or a ragged boundary decide a pixel that is mostly
  something else, whereas the majority is the label that dominates the tissue the MSI spectrum was actually
  acquired from. `method="nearest"` reads only the centre (fast, and exact when the grids coincide). Ties go to
  the lowest label, so 0 (unlabelled) wins a tie with a region.

  Args:
    labels_or_regions: an int (H_h, W_h) label image on the histology grid (0 = unlabelled), or regions whose
      vertices are in histology pixels (e.g. from `read_geojson_regions`).
    transform: the `AffineTransform` mapping histology (fixed) µm to MSI (moving) µm, or a deformable
      `BSplineTransform` (`register_deformable`); its inverse is then solved numerically per MSI point.
    msi_shape: (height, width) of the MSI image.
    histology_pixel_size_um: (y, x) or scalar pixel size of the histology image (the annotated one), µm.
    msi_pixel_size_um: (y, x) or scalar MSI pixel size, µm.
    names: {label: name} for a label image; None names each label present "region <label>". Not allowed with
      regions, which carry their own names.
    method: "majority" or "nearest", for a label image (polygons are always rasterised exactly).
    samples_per_pixel: sample points per MSI pixel along each axis for "majority"; None chooses enough to reach
      about one per histology pixel, at most 16.

  Returns:
    (labels_msi, names): int32 (H, W) labels on the MSI grid (0 = unlabelled) and {label: name}, holding every
    label of the input even when it covers no MSI pixel.

  Raises:
    ConfigError: for a bad shape, pixel size, method or label image, or `names` given with regions.
  """
  msi_shape = _shape(msi_shape)
  histology_size = geometry.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  msi_size = geometry.pixel_size_yx(msi_pixel_size_um, "msi_pixel_size_um")
  if method not in ("majority", "nearest"):
    raise errors.ConfigError(f"method must be 'majority' or 'nearest', got {method!r}")

  if not isinstance(labels_or_regions, np.ndarray) and isinstance(labels_or_regions, (list, tuple)):
    if names is not None:
      raise errors.ConfigError("names are taken from the regions; pass names only with a label image")
    histology_xy = np.array([histology_size[1], histology_size[0]])
    msi_xy = np.array([msi_size[1], msi_size[0]])
    # A deformable map bends straight edges: vertices every half MSI pixel keep the mapped polygon within
    # a fraction of a pixel of the bent one.
    step_px = None if isinstance(transform, transforms.AffineTransform) else 0.5 * min(msi_xy / histology_xy)

    def to_msi_px(points_px):
      if step_px is not None:
        points_px = _densify_ring(points_px, step_px)
      return _map_points(transform, points_px * histology_xy) / msi_xy

    return _rasterize(labels_or_regions, msi_shape, to_msi_px)

  labels = np.asarray(labels_or_regions)
  if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
    raise errors.ConfigError(
      f"expected an integer (H, W) label image or a list of Region, got {labels.dtype} array of shape {labels.shape}"
    )
  if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
    raise errors.ConfigError("label image values must lie in [0, 2**31 - 1]")
  if names is None:
    names = {int(label): f"region {int(label)}" for label in np.unique(labels) if label != 0}
  else:
    names = {int(label): str(name) for label, name in names.items()}

  inverse = transform.inverse()
  if method == "nearest":
    warped = transforms.warp_image(
      labels.astype(np.int32),
      inverse,
      msi_shape,
      fixed_pixel_size_um=msi_size,
      moving_pixel_size_um=histology_size,
      order=0,
    )
    return np.asarray(warped, dtype=np.int32), names
  if samples_per_pixel is not None:
    if int(samples_per_pixel) < 1:
      raise errors.ConfigError(f"samples_per_pixel must be at least 1, got {samples_per_pixel}")
    samples = (int(samples_per_pixel), int(samples_per_pixel))
  else:
    samples = _auto_samples(inverse, msi_shape, msi_size, histology_size)
  return _vote(labels, inverse, msi_shape, msi_size, histology_size, samples), names


def _map_points(transform, points_um: np.ndarray) -> np.ndarray:
  """(N, 2) points through an affine (float64) or deformable (float32, in chunks) transform, as float64."""
  if isinstance(transform, transforms.AffineTransform):
    return np.asarray(transform.apply(points_um), dtype=np.float64)
  from msisynth.register import bspline

  return bspline.apply_points(transform, points_um)


def _densify_ring(ring: np.ndarray, step: float) -> np.ndarray:
  """A closed ring (N, 2) with vertices added so that no edge is longer than `step`."""
  ring = np.asarray(ring, dtype=np.float64)
  if len(ring) < 2:
    return ring
  nxt = np.roll(ring, -1, axis=0)
  counts = np.maximum(1, np.ceil(np.linalg.norm(nxt - ring, axis=1) / step).astype(int))
  parts = [a + (b - a) * (np.arange(n)[:, None] / n) for a, b, n in zip(ring, nxt, counts)]
  return np.concatenate(parts)


def _auto_samples(inverse, msi_shape, msi_size, histology_size) -> tuple[int, int]:
  """Samples per MSI pixel along (y, x) that reach about one per histology pixel, from T⁻¹'s local scale."""
  centre = np.array([(msi_shape[1] - 1) / 2 * msi_size[1], (msi_shape[0] - 1) / 2 * msi_size[0]])
  probe = np.stack([centre, centre + [msi_size[1], 0.0], centre + [0.0, msi_size[0]]])
  mapped = _map_points(inverse, probe)
  step_x_px = np.abs(mapped[1] - mapped[0]) / [histology_size[1], histology_size[0]]
  step_y_px = np.abs(mapped[2] - mapped[0]) / [histology_size[1], histology_size[0]]
  # A little slack so that float32 round-off does not ask for one more sample than an exact ratio needs.
  per_axis = [math.ceil(float(np.max(step)) - 1e-3) for step in (step_y_px, step_x_px)]
  return tuple(int(min(max(n, 1), _MAX_SAMPLES_PER_AXIS)) for n in per_axis)


def _vote(labels, inverse, msi_shape, msi_size, histology_size, samples) -> np.ndarray:
  """The most frequent histology label among samples[0] x samples[1] points inside each MSI pixel.

  Each sub-pixel sample is one nearest-neighbour `warp_image` of the label image through T⁻¹ composed with a
  shift by the sample's offset from the pixel centre; points outside the histology image read 0.
  """
  values, codes = np.unique(labels, return_inverse=True)
  codes = codes.reshape(labels.shape).astype(np.int32)
  # Out-of-image samples read 0, which must be the code of label 0 even when the label image holds no 0.
  if values[0] != 0:
    values = np.concatenate([[0], values])
    codes += 1
  n_values = values.size
  height, width = msi_shape
  sy, sx = samples
  offsets_y = ((np.arange(sy) + 0.5) / sy - 0.5) * msi_size[0]
  offsets_x = ((np.arange(sx) + 0.5) / sx - 0.5) * msi_size[1]
  rows_per_chunk = int(np.clip(_MAX_COUNTS // (width * n_values), 1, height))
  out = np.zeros(msi_shape, dtype=np.int32)
  for start in range(0, height, rows_per_chunk):
    n_rows = min(rows_per_chunk, height - start)
    counts = np.zeros((n_rows * width, n_values), dtype=np.uint16 if sy * sx < 2**16 else np.uint32)
    pixel = np.arange(n_rows * width)
    for dy in offsets_y:
      for dx in offsets_x:
        # A chunk's grid starts at MSI row `start`; its sample points sit (dx, dy) µm off the pixel centres.
        shift = transforms.AffineTransform.from_linear(np.eye(2), [dx, start * msi_size[0] + dy])
        warped = transforms.warp_image(
          codes,
          inverse.compose(shift),
          (n_rows, width),
          fixed_pixel_size_um=msi_size,
          moving_pixel_size_um=histology_size,
          order=0,
        )
        counts[pixel, np.asarray(warped).ravel()] += 1
    # argmax takes the first maximum: ties go to the lowest label.
    out[start : start + n_rows] = values[np.argmax(counts, axis=1)].reshape(n_rows, width)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Per-region chemistry.


def region_statistics(msi: MSIImage, labels_msi: np.ndarray, names: Mapping[int, str] | None = None) -> RegionStats:
  """Mean, median and standard deviation spectra of each region, over its measured MSI pixels only.

  Args:
    msi: the MSI image; pixels outside `msi.mask` (not measured) are left out of every region.
    labels_msi: int (H, W) labels on the MSI grid (0 = unlabelled), e.g. from `regions_to_msi`.
    names: {label: name} of the regions to summarise, in that order; None takes every non-zero label present,
      named "region <label>".

  Returns:
    The statistics, one row per region. A region with no measured pixel has n_pixels 0 and NaN spectra.

  Raises:
    ConfigError: when the label image does not match the MSI image.
  """
  labels_msi = _check_labels(msi, labels_msi)
  names = _names_or_present(labels_msi, names)
  cube = np.asarray(msi.cube)
  region_labels = np.array(list(names), dtype=np.int64)
  n_channels = msi.num_channels
  n_pixels = np.zeros(region_labels.size, dtype=np.int64)
  mean, median, std = (np.full((region_labels.size, n_channels), np.nan) for _ in range(3))
  for i, label in enumerate(region_labels):
    rows, cols = np.nonzero((labels_msi == label) & msi.mask)
    n_pixels[i] = rows.size
    if rows.size == 0:
      logger.warning("region %r has no measured MSI pixel", names[int(label)])
      continue
    for block in _channel_blocks(rows.size, n_channels):
      spectra = cube[rows, cols, block].astype(np.float64)
      mean[i, block] = spectra.mean(axis=0)
      median[i, block] = np.median(spectra, axis=0)
      if rows.size > 1:
        std[i, block] = spectra.std(axis=0, ddof=1)
  return RegionStats(
    labels=region_labels,
    names=dict(names),
    mz=np.array(msi.mz, dtype=np.float64),
    n_pixels=n_pixels,
    mean=mean,
    median=median,
    std=std,
    simulated=bool(msi.metadata.get("simulated", False)),
  )


def differential_ions(
  msi: MSIImage,
  labels_msi: np.ndarray,
  region_a: int | str,
  region_b: int | str,
  *,
  names: Mapping[int, str] | None = None,
  top: int | None = 20,
  min_pixels: int = 3,
  pseudo_count: float | None = None,
) -> DifferentialIons:
  """Ranks the ions that differ between two regions' measured pixels.

  Each channel is tested with a two-sided Mann-Whitney U rank test (scipy.stats.mannwhitneyu over the channel
  axis at once; tie-corrected, exact for small samples without ties). p-values are adjusted over all channels
  with Benjamini-Hochberg (scipy.stats.false_discovery_control). A channel constant over both regions (e.g. all
  zero) has p = 1. The fold change is log2((mean_a + pseudo_count) / (mean_b + pseudo_count)): positive when the
  ion is higher in region A. The pseudo-count keeps ions absent from one region finite.

  Args:
    msi: the MSI image; only measured pixels (`msi.mask`) are used.
    labels_msi: int (H, W) labels on the MSI grid.
    region_a: the first region (numerator), as a label or, with `names`, a name.
    region_b: the second region.
    names: {label: name}, to name regions in the table and find them by name.
    top: rows to keep after sorting; None keeps every channel.
    min_pixels: the fewest measured pixels a region may have.
    pseudo_count: added to both means; None uses 1% of the median, over the channels present in either
      region, of the two regions' average mean intensity (scale-free, so it suits raw counts and normalised data
      alike), or 1.0 when every channel is 0. The value used is recorded in the table.

  Returns:
    The table, sorted by q-value, then by |log2 fold change| (largest first).

  Raises:
    DataError: when a region has fewer than `min_pixels` measured pixels.
    ConfigError: for unknown or identical regions, or labels that do not match the MSI image.
  """
  labels_msi = _check_labels(msi, labels_msi)
  names = {int(k): str(v) for k, v in names.items()} if names is not None else {}
  label_a = _resolve_region(region_a, names, labels_msi)
  label_b = _resolve_region(region_b, names, labels_msi)
  if label_a == label_b:
    raise errors.ConfigError(f"region_a and region_b are the same region ({label_a})")
  if min_pixels < 1:
    raise errors.ConfigError(f"min_pixels must be at least 1, got {min_pixels}")
  name_a = names.get(label_a, f"region {label_a}")
  name_b = names.get(label_b, f"region {label_b}")
  cube = np.asarray(msi.cube)
  pixels_a = np.nonzero((labels_msi == label_a) & msi.mask)
  pixels_b = np.nonzero((labels_msi == label_b) & msi.mask)
  for name, pixels in ((name_a, pixels_a), (name_b, pixels_b)):
    if pixels[0].size < min_pixels:
      raise errors.DataError(
        f"region {name!r} has {pixels[0].size} measured MSI pixel(s); at least {min_pixels} are needed to "
        "compare regions",
        msi.metadata.get("source"),
      )

  n_channels = msi.num_channels
  mean_a, mean_b, u_statistic, p_value = (np.empty(n_channels) for _ in range(4))
  for block in _channel_blocks(pixels_a[0].size + pixels_b[0].size, n_channels):
    x = cube[pixels_a[0], pixels_a[1], block].astype(np.float64)
    y = cube[pixels_b[0], pixels_b[1], block].astype(np.float64)
    mean_a[block], mean_b[block] = x.mean(axis=0), y.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
      result = scipy.stats.mannwhitneyu(x, y, axis=0, alternative="two-sided")
    u_statistic[block] = result.statistic
    p_value[block] = result.pvalue
  if pseudo_count is None:
    average = (mean_a + mean_b) / 2
    present = average[average > 0]
    pseudo_count = 0.01 * float(np.median(present)) if present.size else 1.0
  elif pseudo_count <= 0:
    raise errors.ConfigError(f"pseudo_count must be positive, got {pseudo_count}")
  log2_fc = np.log2((mean_a + pseudo_count) / (mean_b + pseudo_count))
  # Constant channels give a zero rank variance and a NaN p-value: there is nothing to tell the regions apart.
  p_value = np.where(np.isfinite(p_value), np.clip(p_value, 0.0, 1.0), 1.0)
  q_value = scipy.stats.false_discovery_control(p_value, method="bh")

  order = np.lexsort((-np.abs(log2_fc), q_value))
  if top is not None:
    order = order[: max(0, int(top))]
  return DifferentialIons(
    region_a=name_a,
    region_b=name_b,
    n_a=int(pixels_a[0].size),
    n_b=int(pixels_b[0].size),
    pseudo_count=float(pseudo_count),
    channel=order.astype(np.int64),
    mz=np.array(msi.mz, dtype=np.float64)[order],
    mean_a=mean_a[order],
    mean_b=mean_b[order],
    log2_fold_change=log2_fc[order],
    u_statistic=u_statistic[order],
    p_value=p_value[order],
    q_value=q_value[order],
    simulated=bool(msi.metadata.get("simulated", False)),
  )


def _channel_blocks(n_pixels: int, n_channels: int):
  """Slices of the channel axis small enough that n_pixels x block float64 values stay near 128 MB."""
  block = int(np.clip(_MAX_BLOCK_VALUES // max(n_pixels, 1), 1, max(n_channels, 1)))
  for start in range(0, n_channels, block):
    yield slice(start, min(n_channels, start + block))


def _resolve_region(region: int | str, names: Mapping[int, str], labels_msi: np.ndarray) -> int:
  if isinstance(region, str):
    matches = [label for label, name in names.items() if name == region]
    if not matches:
      raise errors.ConfigError(f"no region named {region!r} (known: {sorted(names.values())})")
    return matches[0]
  label = int(region)
  if label == 0:
    raise errors.ConfigError("label 0 is the unlabelled background, not a region")
  if label not in names and not np.any(labels_msi == label):
    raise errors.ConfigError(f"label {label} is not in the label image")
  return label


def _check_labels(msi: MSIImage, labels_msi) -> np.ndarray:
  if not isinstance(msi, MSIImage):
    raise errors.ConfigError(f"expected an MSIImage, got {type(msi).__name__}")
  labels_msi = np.asarray(labels_msi)
  if labels_msi.shape != msi.shape:
    raise errors.ConfigError(f"label image shape {labels_msi.shape} != MSI image shape {msi.shape}")
  if not np.issubdtype(labels_msi.dtype, np.integer):
    raise errors.ConfigError(f"label image must hold integers, got {labels_msi.dtype}")
  return labels_msi


def _names_or_present(labels: np.ndarray, names: Mapping[int, str] | None) -> dict[int, str]:
  if names is not None:
    return {int(label): str(name) for label, name in names.items()}
  return {int(label): f"region {int(label)}" for label in np.unique(labels) if label != 0}


# ----------------------------------------------------------------------------------------------------------------
# Tables.


def write_region_table_csv(stats: RegionStats, path: str | os.PathLike, *, overwrite: bool = False) -> None:
  """Writes per-region statistics as a tidy CSV: one row per (region, m/z).

  Columns: region, mz, mean, median, std, n_pixels, and a final `simulated` column (always "true") when the data
  are simulated. Numbers are written with full precision (they read back to the same floats).

  Args:
    stats: from `region_statistics`.
    path: the CSV file.
    overwrite: replace an existing file.

  Raises:
    DataError: when the file exists and `overwrite` is False.
  """
  header = ["region", "mz", "mean", "median", "std", "n_pixels"]
  rows = []
  for i, name in enumerate(stats.region_names()):
    for j, mz in enumerate(stats.mz):
      row = [
        name,
        _num(mz),
        _num(stats.mean[i, j]),
        _num(stats.median[i, j]),
        _num(stats.std[i, j]),
        int(stats.n_pixels[i]),
      ]
      rows.append(row)
  _write_csv(path, header, rows, overwrite, simulated_column=stats.simulated)


def write_mean_spectra_csv(stats: RegionStats, path: str | os.PathLike, *, overwrite: bool = False) -> None:
  """Writes the mean spectra as a wide CSV: an `mz` column, then one column per region (headed by its name).

  When the data are simulated, every region column is headed "<name> (simulated)".

  Args:
    stats: from `region_statistics`.
    path: the CSV file.
    overwrite: replace an existing file.

  Raises:
    DataError: when the file exists and `overwrite` is False.
  """
  suffix = " (simulated)" if stats.simulated else ""
  header = ["mz"] + [name + suffix for name in stats.region_names()]
  rows = [[_num(mz)] + [_num(v) for v in stats.mean[:, j]] for j, mz in enumerate(stats.mz)]
  _write_csv(path, header, rows, overwrite)


def write_differential_ions_csv(table: DifferentialIons, path: str | os.PathLike, *, overwrite: bool = False) -> None:
  """Writes a `differential_ions` table as CSV, one row per ion in the table's order.

  Columns: channel, mz, region_a, region_b, mean_a, mean_b, log2_fold_change, u_statistic, p_value, q_value,
  n_a, n_b, pseudo_count, and a final `simulated` column (always "true") when the data are simulated.

  Args:
    table: from `differential_ions`.
    path: the CSV file.
    overwrite: replace an existing file.

  Raises:
    DataError: when the file exists and `overwrite` is False.
  """
  header = [
    "channel",
    "mz",
    "region_a",
    "region_b",
    "mean_a",
    "mean_b",
    "log2_fold_change",
    "u_statistic",
    "p_value",
    "q_value",
    "n_a",
    "n_b",
    "pseudo_count",
  ]
  rows = []
  for k in range(len(table)):
    row = [
      int(table.channel[k]),
      _num(table.mz[k]),
      table.region_a,
      table.region_b,
      _num(table.mean_a[k]),
      _num(table.mean_b[k]),
      _num(table.log2_fold_change[k]),
      _num(table.u_statistic[k]),
      _num(table.p_value[k]),
      _num(table.q_value[k]),
      table.n_a,
      table.n_b,
      _num(table.pseudo_count),
    ]
    rows.append(row)
  _write_csv(path, header, rows, overwrite, simulated_column=table.simulated)


def _num(value) -> str:
  return repr(float(value))


def _write_csv(path, header: list[str], rows: list[list], overwrite: bool, *, simulated_column: bool = False) -> None:
  """Writes a CSV atomically; `simulated_column` appends a final "simulated" column that says "true" on each row."""
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer)
  writer.writerow(header + ["simulated"] if simulated_column else header)
  writer.writerows([row + ["true"] for row in rows] if simulated_column else rows)
  outputs.atomic_write(path, buffer.getvalue(), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks.


def _shape(shape) -> tuple[int, int]:
  shape = tuple(int(v) for v in shape)
  if len(shape) != 2 or min(shape) < 1:
    raise errors.ConfigError(f"shape must be (height, width) with both at least 1, got {shape}")
  return shape
