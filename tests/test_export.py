"""Tests of msisynth.export: SpatialData read back with spatialdata, OME-TIFF with tifffile, GeoJSON with shapely."""

import json

import numpy as np
import pytest
import shapely.geometry
import spatialdata
import tifffile
from spatialdata import transformations as st

from msisynth import errors, export, regions
from msisynth.geometry.transforms import AffineTransform, warp_image
from msisynth.types import MSIImage

HE_PX = (2.0, 2.5)  # (y, x) µm
MSI_PX = (20.0, 25.0)


def _transform() -> AffineTransform:
  """Histology µm → MSI µm: a turn of 7°, a scale of 1.05 and a shift."""
  a = np.deg2rad(7.0)
  linear = 1.05 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  return AffineTransform.from_linear(linear, (-12.0, 30.0))


def _msi(shape=(12, 10), n_channels=5, seed=0) -> MSIImage:
  """Two chemically distinct halves (left/right) with noise; one unmeasured pixel."""
  rng = np.random.default_rng(seed)
  cube = rng.uniform(0.0, 0.1, (*shape, n_channels)).astype(np.float32)
  cube[:, : shape[1] // 2, 0] += 5.0
  cube[:, shape[1] // 2 :, 1] += 5.0
  mask = np.ones(shape, bool)
  mask[0, 0] = False
  cube[0, 0] = 0.0
  mz = 400.0 + 10.0 * np.arange(n_channels)
  return MSIImage(cube, mz, mask, MSI_PX, {"simulated": True})


def _histology(shape=(90, 80)) -> np.ndarray:
  rng = np.random.default_rng(1)
  return rng.uniform(0.0, 1.0, (*shape, 3)).astype(np.float32)


def _square_region(name, x0, y0, x1, y1):
  ring = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
  return regions.Region(name=name, polygons=(regions.Polygon(ring),))


def _matrix(transformation) -> np.ndarray:
  return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), np.float64)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  return points @ matrix[:2, :2].T + matrix[:2, 2]


@pytest.mark.parametrize("msi_as", ["image", "table"])
def test_spatialdata_round_trip_keeps_the_transform(tmp_path, msi_as):
  msi, he, transform = _msi(), _histology(), _transform()
  drawn = [_square_region("Tumor", 5, 5, 30, 40), _square_region("Normal", 40, 10, 70, 60)]
  labels, names = regions.regions_to_msi(
    drawn, transform, msi.shape, histology_pixel_size_um=HE_PX, msi_pixel_size_um=MSI_PX
  )
  stats = regions.region_statistics(msi, labels, names)
  segments = export.kmeans_segments(0, msi, 2)
  sdata = export.to_spatialdata(
    he, HE_PX, msi, transform, regions=drawn, region_names=names, region_stats=stats, segments=segments, msi_as=msi_as
  )
  path = export.write_spatialdata(tmp_path / "section.zarr", sdata)
  with pytest.raises(errors.OutputExistsError):
    export.write_spatialdata(path, sdata)
  back = spatialdata.read_zarr(path)

  # The stored transformation between the coordinate systems is msisynth's, to 1e-4 µm.
  points = np.array([[0.0, 0.0], [123.4, 56.7], [199.0, 178.0], [-10.0, 300.0]])
  expected = np.asarray(transform.apply(points), np.float64)
  # Every element holds both maps, so all paths agree; name one (the H&E) for spatialdata to pick.
  between = st.get_transformation_between_coordinate_systems(
    back, "histology", "msi", intermediate_coordinate_systems=back.images["histology"]
  )
  np.testing.assert_allclose(_apply(_matrix(between), points), expected, atol=1e-4)
  # Pixel centres: SpatialData's intrinsic (c + 0.5, r + 0.5) lands on msisynth's (c·px, r·py) µm.
  msi_element = back.images["msi"] if msi_as == "image" else back.labels["msi_pixels"]
  to_msi = _matrix(st.get_transformation(msi_element, to_coordinate_system="msi"))
  np.testing.assert_allclose(_apply(to_msi, np.array([[3.5, 7.5]])), [[3 * MSI_PX[1], 7 * MSI_PX[0]]], atol=1e-9)
  # An H&E pixel centre goes through "histology" µm and T to the MSI point msisynth gives.
  he_element = back.images["histology"]
  he_to_msi = _matrix(st.get_transformation(he_element, to_coordinate_system="msi"))
  he_point = np.array([[40.0 * HE_PX[1], 30.0 * HE_PX[0]]])
  np.testing.assert_allclose(
    _apply(he_to_msi, np.array([[40.5, 30.5]])), np.asarray(transform.apply(he_point)), atol=1e-4
  )

  # The H&E is multiscale, RGB; the MSI keeps its grid and its m/z.
  assert list(he_element["scale0"].ds["image"].coords["c"].values) == ["r", "g", "b"]
  assert he_element["scale0"].ds["image"].shape == (3, *he.shape[:2]) and len(he_element.children) >= 2
  if msi_as == "image":
    image = back.images["msi"]
    assert image.shape == (msi.num_channels, *msi.shape)
    assert list(image.coords["c"].values) == export.channel_names(msi.mz)
    np.testing.assert_allclose(np.asarray(image.values), np.moveaxis(msi.cube, -1, 0))
  else:
    table = back.tables["msi_spectra"]
    assert table.n_obs == int(msi.mask.sum()) and list(table.var["mz"]) == list(msi.mz)
    pixel_ids = np.asarray(back.labels["msi_pixels"].values)
    row = table[table.obs["pixel_id"] == pixel_ids[5, 4]]
    np.testing.assert_allclose(np.asarray(row.X.todense()).ravel(), msi.cube[5, 4], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(back.labels["msi_segments"].values), segments)

  # Regions are shapes in histology pixels; their statistics a table keyed by the region labels.
  shapes = back.shapes["regions"]
  assert sorted(shapes["name"]) == ["Normal", "Tumor"]
  tumor = shapes.loc[[k for k, v in names.items() if v == "Tumor"][0]].geometry
  assert tumor.bounds == pytest.approx((5.5, 5.5, 30.5, 40.5))  # QuPath-style corner origin
  table = back.tables["region_statistics"]
  assert list(table.obs["name"]) == stats.region_names() and table.uns["spatialdata_attrs"]["region"] == "regions"
  np.testing.assert_allclose(np.asarray(table.X), stats.mean.astype(np.float32), equal_nan=True)
  assert back.attrs["msisynth"]["simulated"] is True


def test_spatialdata_refuses_a_transform_that_is_not_affine():
  with pytest.raises(errors.ConfigError, match="affine"):
    export.to_spatialdata(_histology(), HE_PX, _msi(), object())


def test_ome_tiff_is_pyramidal_with_its_pixel_size(tmp_path):
  msi, transform = _msi(), _transform()
  shape = (70, 66)
  ions = export.ion_images_in_histology(msi, transform, [400.0, 410.0], shape, HE_PX)
  reference = warp_image(msi.cube[..., :2], transform, shape, fixed_pixel_size_um=HE_PX, moving_pixel_size_um=MSI_PX)
  np.testing.assert_allclose(ions, np.asarray(reference), rtol=1e-6, atol=1e-7)
  path = export.write_ome_tiff(tmp_path / "ions.ome.tif", ions, HE_PX, channel_names=["a", "b"], levels=3, tile=32)
  with pytest.raises(errors.OutputExistsError):
    export.write_ome_tiff(path, ions, HE_PX)

  with tifffile.TiffFile(path) as tif:
    assert tif.is_ome
    series = tif.series[0]
    assert [level.shape for level in series.levels] == [(2, 70, 66), (2, 35, 33), (2, 18, 17)]
    np.testing.assert_array_equal(series.levels[0].asarray(), np.moveaxis(ions, -1, 0))
    meta = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
  assert meta["PhysicalSizeX"] == pytest.approx(HE_PX[1]) and meta["PhysicalSizeY"] == pytest.approx(HE_PX[0])
  assert meta["PhysicalSizeXUnit"] == "µm" and [c["Name"] for c in meta["Channel"]] == ["a", "b"]


def test_kmeans_segments_as_geojson_come_back_through_the_import(tmp_path):
  msi, transform = _msi(), _transform()
  segments = export.kmeans_segments(0, msi, 2)
  assert segments[0, 0] == 0 and set(np.unique(segments)) == {0, 1, 2}
  half = msi.shape[1] // 2
  left, right = segments[1:, :half], segments[1:, half:]
  assert len(np.unique(left)) == 1 and len(np.unique(right)) == 1 and left[0, 0] != right[0, 0]
  np.testing.assert_array_equal(segments, export.kmeans_segments(0, msi, 2))  # a function of the seed

  found = export.labels_to_regions(segments, transform, msi_pixel_size_um=MSI_PX, histology_pixel_size_um=HE_PX)
  path = export.write_geojson_regions(tmp_path / "segments.geojson", found)
  data = json.loads(path.read_text())
  assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
  for feature in data["features"]:
    geometry = shapely.geometry.shape(feature["geometry"])
    assert geometry.is_valid and geometry.area > 0
    assert (
      feature["properties"]["objectType"] == "annotation" and len(feature["properties"]["classification"]["color"]) == 3
    )
  # One MSI pixel maps to (25 / 2.5) × (20 / 2) × 1.05² histology px²; the union of a segment's pixels keeps it.
  pixel_area = (MSI_PX[0] / HE_PX[0]) * (MSI_PX[1] / HE_PX[1]) / 1.05**2
  areas = {
    f["properties"]["classification"]["name"]: shapely.geometry.shape(f["geometry"]).area for f in data["features"]
  }
  for label in (1, 2):
    assert areas[f"segment {label}"] == pytest.approx(pixel_area * np.sum(segments == label), rel=1e-6)

  back = regions.read_geojson_regions(path)
  labels, names = regions.regions_to_msi(
    back, transform, msi.shape, histology_pixel_size_um=HE_PX, msi_pixel_size_um=MSI_PX
  )
  by_name = {v: k for k, v in names.items()}
  recovered = np.zeros_like(segments)
  for label in (1, 2):
    recovered[labels == by_name[f"segment {label}"]] = label
  np.testing.assert_array_equal(recovered, segments)


def test_output_formats_are_checked():
  assert export.check_output_format("spatialdata,ome-tiff") == ("spatialdata", "ome_tiff")
  with pytest.raises(errors.ConfigError, match="unknown output format"):
    export.check_output_format(["zarr"])


def test_streamed_ome_tiff_matches_the_in_memory_one(tmp_path):
  msi, transform = _msi(), _transform()
  shape = (70, 66)
  path = export.write_ion_images_ome_tiff(
    tmp_path / "streamed.ome.tif", msi, transform, [400.0, 410.0], shape, HE_PX, levels=2, tile=32
  )
  with tifffile.TiffFile(path) as tif:
    levels = [level.asarray() for level in tif.series[0].levels]
    meta = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
  assert [c["Name"] for c in meta["Channel"]] == ["m/z 400.0000", "m/z 410.0000"]
  whole = export.ion_images_in_histology(msi, transform, [400.0, 410.0], shape, HE_PX)
  np.testing.assert_allclose(levels[0], np.moveaxis(whole, -1, 0), rtol=1e-5, atol=1e-5)
  # Level 1: pixels of twice the size, centred on the 2 × 2 blocks of the full-resolution grid.
  assert levels[1].shape == (2, 35, 33)
  centre = AffineTransform.from_linear(np.eye(2), (HE_PX[1] / 2, HE_PX[0] / 2))
  coarse = warp_image(
    msi.cube[..., :2],
    transform.compose(centre),
    (35, 33),
    fixed_pixel_size_um=(2 * HE_PX[0], 2 * HE_PX[1]),
    moving_pixel_size_um=MSI_PX,
  )
  np.testing.assert_allclose(levels[1], np.moveaxis(np.asarray(coarse), -1, 0), rtol=1e-5, atol=1e-5)


class _Wavy:
  """A stand-in deformable map T(x) = A (x + d(x)) + b with a smooth d, shaped like a B-spline transform."""

  def __init__(self, affine: AffineTransform):
    self.affine = affine

  def apply(self, points):
    p = np.asarray(points, np.float64)
    moved = p + 3.0 * np.sin(p[..., ::-1] / 40.0)
    m = np.asarray(self.affine.matrix, np.float64)
    return moved @ m[:2, :2].T + m[:2, 2]

  def displacement_field(self, shape, pixel_size_um):
    py, px = pixel_size_um
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    grid = np.stack([cols * px, rows * py], -1).astype(np.float64)
    return (self.apply(grid) - grid).astype(np.float32)


def test_a_deformable_transform_keeps_its_field(tmp_path):
  from scipy import ndimage

  msi, he, wavy = _msi(), _histology(), _Wavy(_transform())
  sdata = export.to_spatialdata(he, HE_PX, msi, wavy, deformation_pixel_size_um=10.0)
  back = spatialdata.read_zarr(export.write_spatialdata(tmp_path / "d.zarr", sdata))
  assert back.attrs["msisynth"]["deformable"] is True
  field = np.asarray(back.images["deformation_um"].values)  # (2, h, w): dx, dy at 10 µm pixel centres
  assert field.shape == (2, 18, 20)
  x = np.array([[7 * 10.0, 5 * 10.0]])
  np.testing.assert_allclose(x + field[:, 5, 7], wavy.apply(x), atol=1e-3)  # T(x) = x + field(x)
  between = st.get_transformation_between_coordinate_systems(
    back, "histology", "msi", intermediate_coordinate_systems=back.images["histology"]
  )
  np.testing.assert_allclose(_matrix(between), np.asarray(wavy.affine.matrix, np.float64), atol=1e-6)

  # Ion images follow the full map: bilinear samples of the ion image at T(x).
  shape = (30, 28)
  ions = export.ion_images_in_histology(msi, wavy, [400.0], shape, HE_PX)
  rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
  mapped = wavy.apply(np.stack([cols * HE_PX[1], rows * HE_PX[0]], -1))
  r, c = mapped[..., 1] / MSI_PX[0], mapped[..., 0] / MSI_PX[1]
  inside = (r >= -0.5) & (r < msi.shape[0] - 0.5) & (c >= -0.5) & (c < msi.shape[1] - 0.5)
  expected = np.where(inside, ndimage.map_coordinates(msi.cube[..., 0], [r, c], order=1, mode="nearest"), 0.0)
  np.testing.assert_allclose(ions[..., 0], expected, rtol=1e-4, atol=1e-4)


def test_a_displacement_field_read_back_exports_like_the_map_it_samples(tmp_path):
  from msisynth.register import field, transform_io

  msi, he, affine = _msi(), _histology(), _transform()
  path = transform_io.save_displacement_field(tmp_path / "f.nii.gz", affine, he.shape[:2], HE_PX)
  loaded = field.load_displacement_field(path)
  sdata = export.to_spatialdata(he, HE_PX, msi, loaded, deformation_pixel_size_um=10.0)
  assert sdata.attrs["msisynth"]["deformable"] is True
  # Ion images through the field equal those through the affine it samples (bilinear in the field is exact for
  # an affine map inside the field's grid; the last half pixel at the far edges uses the edge value).
  shape = (30, 28)
  by_field = export.ion_images_in_histology(msi, loaded, [400.0], shape, HE_PX)
  by_affine = export.ion_images_in_histology(msi, affine, [400.0], shape, HE_PX)
  np.testing.assert_allclose(by_field, by_affine, rtol=1e-4, atol=1e-4)
