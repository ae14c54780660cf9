"""Tests of msisynth.regions and msisynth.viz.regions: annotations read, rasterised, carried onto MSI, summarised."""

import csv
import json
import logging
import pathlib

import numpy as np
import pytest
import scipy.stats
from checks import assert_refused_naming_the_file
from scenes import square_annotation

from msisynth import errors
from msisynth import regions as R
from msisynth.geometry.transforms import AffineTransform
from msisynth.types import MSIImage
from msisynth.viz import regions as viz_regions

FIXTURE = pathlib.Path(__file__).parent / "data" / "regions_qupath.geojson"
SHAPE = (48, 64)


def _affine(matrix) -> AffineTransform:
  return AffineTransform.from_matrix(np.asarray(matrix, dtype=np.float64))


def _perimeter(points: np.ndarray) -> float:
  return float(np.sum(np.linalg.norm(points - np.roll(points, -1, axis=0), axis=1)))


def _write_json(tmp_path, obj, name="a.geojson") -> pathlib.Path:
  path = tmp_path / name
  path.write_text(json.dumps(obj))
  return path


def _feature(geometry, properties=None):
  return {"type": "Feature", "geometry": geometry, "properties": properties or {}}


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]}


# ----------------------------------------------------------------------------------------------------------------
# Reading and rasterising.


def test_reads_qupath_feature_collection():
  regions = R.read_geojson_regions(FIXTURE)
  assert [r.name for r in regions] == ["Tumor", "Stroma", "Tumor"]
  assert [r.object_type for r in regions] == ["annotation", "annotation", "detection"]
  assert regions[0].color == (200, 0, 0)
  assert regions[0].id.endswith("7a01")
  tumor, stroma, _ = regions
  assert len(tumor.polygons) == 1 and len(tumor.polygons[0].holes_px) == 1
  assert len(stroma.polygons) == 2
  # QuPath corner coordinates are moved to the pixel-centre convention; the closing vertex is dropped.
  np.testing.assert_array_equal(tumor.polygons[0].exterior_px, [[3.5, 3.5], [35.5, 3.5], [35.5, 27.5], [3.5, 27.5]])
  assert tumor.area_px() == pytest.approx(32 * 24 - 10 * 10)
  assert stroma.polygons[0].area_px() == pytest.approx(200.0)
  annotations = R.read_geojson_regions(FIXTURE, object_types=("annotation",))
  assert [r.object_type for r in annotations] == ["annotation", "annotation"]


def test_rasterize_areas_match_polygon_areas():
  regions = R.read_geojson_regions(FIXTURE)
  labels, names = R.rasterize_regions(regions, SHAPE)
  assert labels.dtype == np.int32 and labels.shape == SHAPE
  assert names == {1: "Tumor", 2: "Stroma"}
  for label, name in names.items():
    polygons = [p for r in regions if r.name == name for p in r.polygons]
    area = sum(p.area_px() for p in polygons)
    boundary = sum(_perimeter(p.exterior_px) + sum(_perimeter(h) for h in p.holes_px) for p in polygons)
    assert abs(np.count_nonzero(labels == label) - area) <= 0.5 * boundary, name
  # Axis-aligned QuPath edges fall on pixel boundaries, so the tumour (with its hole, plus the detection) is exact.
  assert np.count_nonzero(labels == 1) == 668 + 64
  # The hole, corner pixels (10, 10)-(19, 19), is unlabelled; the ring around it is tumour.
  assert np.all(labels[10:20, 10:20] == 0)
  assert np.all(labels[4:10, 4:36] == 1) and np.all(labels[20:28, 4:36] == 1)
  assert labels[0, 0] == 0


def test_rasterize_on_a_coarser_grid():
  regions = R.read_geojson_regions(FIXTURE, object_types=("annotation",))
  fine, _ = R.rasterize_regions(regions, SHAPE, pixel_size_um=0.5)
  coarse, names = R.rasterize_regions(regions, (24, 32), pixel_size_um=1.0, regions_pixel_size_um=0.5)
  for label in names:
    area = np.count_nonzero(fine == label) / 4
    assert abs(np.count_nonzero(coarse == label) - area) <= 0.15 * area


def test_overlapping_regions_later_wins(tmp_path):
  inner = {"type": "Polygon", "coordinates": [[[1, 1], [3, 1], [3, 3], [1, 3], [1, 1]]]}
  path = _write_json(
    tmp_path,
    {
      "type": "FeatureCollection",
      "features": [
        _feature(SQUARE, {"classification": {"name": "outer"}}),
        _feature(inner, {"classification": {"name": "inner"}}),
      ],
    },
  )
  labels, names = R.rasterize_regions(R.read_geojson_regions(path), (6, 6))
  assert names == {1: "outer", 2: "inner"}
  assert np.count_nonzero(labels == 2) == 4 and np.count_nonzero(labels == 1) == 12
  assert np.all(labels[1:3, 1:3] == 2)


def test_bare_feature_list_name_fallbacks_and_centre_origin(tmp_path):
  path = _write_json(
    tmp_path,
    [
      _feature(SQUARE, {"name": "gland"}),
      _feature(SQUARE, {"classification": {"name": "Tumor"}, "name": "ignored"}),
      _feature(SQUARE, None),
    ],
  )
  regions = R.read_geojson_regions(path, origin="center")
  assert [r.name for r in regions] == ["gland", "Tumor", "unnamed"]
  np.testing.assert_array_equal(regions[0].polygons[0].exterior_px[0], [0.0, 0.0])


def test_non_polygon_features_are_skipped_with_a_warning(tmp_path, caplog):
  point = {"type": "Point", "coordinates": [3, 3]}
  line = {"type": "LineString", "coordinates": [[0, 0], [3, 3]]}
  path = _write_json(
    tmp_path,
    {
      "type": "FeatureCollection",
      "features": [_feature(point), _feature(SQUARE, {"classification": {"name": "A"}}), _feature(line)],
    },
  )
  with caplog.at_level(logging.WARNING, logger="msisynth.regions"):
    regions = R.read_geojson_regions(path)
  assert [r.name for r in regions] == ["A"]
  assert "Point" in caplog.text and "LineString" in caplog.text
  only_points = _write_json(tmp_path, {"type": "FeatureCollection", "features": [_feature(point)]}, "p.geojson")
  with pytest.raises(errors.DataError, match="no polygon") as info:
    R.read_geojson_regions(only_points)
  assert info.value.path == str(only_points)


@pytest.mark.parametrize(
  "content, message",
  [
    ("{not json", "not valid JSON"),
    (json.dumps({"type": "Polygon", "coordinates": []}), "FeatureCollection"),
    (json.dumps({"type": "FeatureCollection"}), "features"),
    (
      json.dumps([{"type": "Feature", "properties": {}, "geometry": {"type": "Circle", "radius": 3}}]),
      "unsupported geometry type 'Circle'",
    ),
    (json.dumps([_feature({"type": "Polygon", "coordinates": []})]), "empty polygon"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [[]]})]), "empty"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [2, 2], [0, 0]]]})]), "zero area"),
    (json.dumps([_feature({"type": "MultiPolygon", "coordinates": []})]), "empty MultiPolygon"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [[["a", 0], [1, 0], [1, 1]]]})]), "not numbers"),
    (json.dumps([5]), "not a GeoJSON Feature"),
  ],
)
def test_malformed_geojson_raises_data_error_naming_the_file(tmp_path, content, message):
  assert_refused_naming_the_file(R.read_geojson_regions, tmp_path / "bad.geojson", content, message)


def test_missing_file_raises_data_error(tmp_path):
  with pytest.raises(errors.DataError, match="not found"):
    R.read_geojson_regions(tmp_path / "absent.geojson")


# ----------------------------------------------------------------------------------------------------------------
# Transfer onto the MSI grid.


def test_identity_and_equal_pixel_sizes_equal_rasterize():
  regions = R.read_geojson_regions(FIXTURE)
  expected, expected_names = R.rasterize_regions(regions, SHAPE, pixel_size_um=5.0)
  identity = AffineTransform.identity()
  kwargs = dict(histology_pixel_size_um=5.0, msi_pixel_size_um=5.0)
  labels, names = R.regions_to_msi(regions, identity, SHAPE, **kwargs)
  np.testing.assert_array_equal(labels, expected)
  assert names == expected_names
  for method in ("majority", "nearest"):
    labels, names = R.regions_to_msi(expected, identity, SHAPE, names=expected_names, method=method, **kwargs)
    np.testing.assert_array_equal(labels, expected)
    assert names == expected_names


def test_scale_and_translation_put_labels_where_expected():
  labels_hist, regions = square_annotation()
  # T maps histology µm to MSI µm: the MSI origin sits at histology (100, 50) µm, so T(p) = p - (100, 50).
  transform = _affine([[1, 0, -100], [0, 1, -50], [0, 0, 1]])
  np.testing.assert_allclose(np.asarray(transform.apply(np.array([[100.0, 50.0]]))), [[0.0, 0.0]], atol=1e-4)
  kwargs = dict(histology_pixel_size_um=2.0, msi_pixel_size_um=20.0)
  # MSI pixel (r, c) shows histology (20c + 100, 20r + 50) µm: inside the square for c in 15..24, r in 8..17.
  expected = np.zeros((24, 32), np.int32)
  expected[8:18, 15:25] = 1
  from_polygons, names = R.regions_to_msi(regions, transform, (24, 32), **kwargs)
  assert names == {1: "gland"}
  np.testing.assert_array_equal(from_polygons, expected)
  for method in ("majority", "nearest"):
    from_labels, names = R.regions_to_msi(labels_hist, transform, (24, 32), method=method, **kwargs)
    assert names == {1: "region 1"}
    np.testing.assert_array_equal(from_labels, expected, err_msg=method)


def test_anisotropic_msi_pixels_and_chunked_votes(monkeypatch):
  labels_hist, regions = square_annotation()
  transform = _affine([[1, 0, -100], [0, 1, -50], [0, 0, 1]])
  kwargs = dict(histology_pixel_size_um=2.0, msi_pixel_size_um=(20.0, 10.0))
  # MSI pixel (r, c) shows histology (10c + 100, 20r + 50) µm: inside for c in 30..49, r in 8..17.
  expected = np.zeros((24, 64), np.int32)
  expected[8:18, 30:50] = 1
  from_polygons, _ = R.regions_to_msi(regions, transform, (24, 64), **kwargs)
  np.testing.assert_array_equal(from_polygons, expected)
  whole, _ = R.regions_to_msi(labels_hist, transform, (24, 64), **kwargs)
  np.testing.assert_array_equal(whole, expected)
  # Voting a few MSI rows at a time gives the same labels.
  monkeypatch.setattr(R, "_MAX_COUNTS", 64 * 2 * 5)
  chunked, _ = R.regions_to_msi(labels_hist, transform, (24, 64), **kwargs)
  np.testing.assert_array_equal(chunked, whole)


def test_rotated_and_scaled_polygons_agree_with_majority_vote():
  labels_hist, regions = square_annotation()
  angle = np.deg2rad(30)
  # Histology µm -> MSI µm: rotate 30°, shrink 0.9, shift.
  a = 0.9 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  transform = _affine([[a[0, 0], a[0, 1], 100.0], [a[1, 0], a[1, 1], -150.0], [0, 0, 1]])
  kwargs = dict(histology_pixel_size_um=2.0, msi_pixel_size_um=15.0)
  from_polygons, _ = R.regions_to_msi(regions, transform, (40, 40), **kwargs)
  from_labels, _ = R.regions_to_msi(labels_hist, transform, (40, 40), **kwargs)
  area = np.count_nonzero(from_polygons)
  # (200 µm * 0.9)^2 / (15 µm)^2 = 144 MSI pixels.
  assert abs(area - 144) <= 12
  # The two routes differ only at a few boundary pixels.
  assert np.count_nonzero(from_polygons != from_labels) <= 0.1 * area


def test_majority_vote_differs_from_nearest_on_thin_structures():
  # 1 µm histology, 10 µm MSI, T(p) = p - (4.5, 4.5) µm: MSI pixel (r, c) covers exactly histology pixels
  # 10r..10r+9 x 10c..10c+9, and its centre falls on histology column 10c + 5 (rounding half up). A
  # one-pixel-wide line of label 2 runs down each of those centre columns; the rest is label 1.
  labels_hist = np.ones((60, 60), np.int32)
  labels_hist[:, 5::10] = 2
  transform = _affine([[1, 0, -4.5], [0, 1, -4.5], [0, 0, 1]])
  kwargs = dict(histology_pixel_size_um=1.0, msi_pixel_size_um=10.0, names={1: "stroma", 2: "vessel"})
  nearest, _ = R.regions_to_msi(labels_hist, transform, (6, 6), method="nearest", **kwargs)
  majority, names = R.regions_to_msi(labels_hist, transform, (6, 6), **kwargs)
  assert names == {1: "stroma", 2: "vessel"}
  assert np.all(nearest == 2)
  assert np.all(majority == 1)
  # The automatic sample count (10 per axis here) gives the same answer as asking for it.
  explicit, _ = R.regions_to_msi(labels_hist, transform, (6, 6), samples_per_pixel=10, **kwargs)
  np.testing.assert_array_equal(explicit, majority)
  # A line four columns wide (40% of each MSI pixel) still loses; six columns (60%) win.
  for width, winner in ((4, 1), (6, 2)):
    wide = np.ones((60, 60), np.int32)
    for start in range(0, 60, 10):
      wide[:, start : start + width] = 2
    voted, _ = R.regions_to_msi(wide, transform, (6, 6), **kwargs)
    assert np.all(voted == winner), width
  # Samples beyond the histology image vote 0 (unlabelled).
  outside, _ = R.regions_to_msi(labels_hist, transform, (8, 8), **kwargs)
  assert np.all(outside[6:] == 0) and np.all(outside[:, 6:] == 0) and np.all(outside[:6, :6] == 1)


def test_regions_to_msi_rejects_bad_arguments():
  identity = AffineTransform.identity()
  regions = R.read_geojson_regions(FIXTURE)
  kwargs = dict(histology_pixel_size_um=1.0, msi_pixel_size_um=1.0)
  with pytest.raises(errors.ConfigError, match="names"):
    R.regions_to_msi(regions, identity, SHAPE, names={1: "x"}, **kwargs)
  with pytest.raises(errors.ConfigError, match="method"):
    R.regions_to_msi(np.zeros(SHAPE, np.int32), identity, SHAPE, method="mode", **kwargs)
  with pytest.raises(errors.ConfigError, match="integer"):
    R.regions_to_msi(np.zeros(SHAPE), identity, SHAPE, **kwargs)
  with pytest.raises(errors.ConfigError, match="pixel_size"):
    R.regions_to_msi(regions, identity, SHAPE, histology_pixel_size_um=0.0, msi_pixel_size_um=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Per-region chemistry.


def _msi(cube, mask=None, simulated=False) -> MSIImage:
  cube = np.asarray(cube, np.float32)
  mask = np.ones(cube.shape[:2], bool) if mask is None else mask
  mz = 100.0 + 1.5 * np.arange(cube.shape[2])
  return MSIImage(cube, mz, mask, pixel_size_um=(20.0, 20.0), metadata={"simulated": simulated})


def test_region_statistics_match_numpy():
  rng = np.random.default_rng(0)
  cube = rng.gamma(2.0, 3.0, size=(5, 6, 4))
  mask = np.ones((5, 6), bool)
  mask[0, 0] = mask[4, 5] = False
  labels = np.zeros((5, 6), np.int32)
  labels[:3, :3] = 1
  labels[2:, 3:] = 2
  labels[4, 0] = 3
  msi = _msi(cube, mask)
  stats = R.region_statistics(msi, labels, {1: "tumour", 2: "stroma", 3: "fat", 7: "absent"})
  assert stats.region_names() == ["tumour", "stroma", "fat", "absent"]
  for i, label in enumerate([1, 2, 3]):
    spectra = cube.astype(np.float32)[(labels == label) & mask].astype(np.float64)
    assert stats.n_pixels[i] == spectra.shape[0]
    np.testing.assert_allclose(stats.mean[i], spectra.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.median[i], np.median(spectra, axis=0), rtol=1e-12)
    if spectra.shape[0] > 1:
      np.testing.assert_allclose(stats.std[i], spectra.std(axis=0, ddof=1), rtol=1e-12)
  assert stats.n_pixels.tolist() == [8, 8, 1, 0]  # unmeasured (0, 0) and (4, 5) left out
  assert np.all(np.isnan(stats.std[2])) and np.all(np.isnan(stats.mean[3]))
  assert not stats.simulated
  present = R.region_statistics(msi, labels)
  assert present.names == {1: "region 1", 2: "region 2", 3: "region 3"}
  with pytest.raises(errors.ConfigError, match="shape"):
    R.region_statistics(msi, labels[:4])


def _two_region_msi(seed=0, simulated=False):
  rng = np.random.default_rng(seed)
  cube = rng.gamma(4.0, 1.0, size=(10, 10, 6))
  cube[:, :5, 3] += 6.0  # channel 3 higher in region A (left half)
  cube[..., 5] = 0.0  # absent everywhere
  labels = np.zeros((10, 10), np.int32)
  labels[:, :5] = 1
  labels[:, 5:] = 2
  return _msi(cube, simulated=simulated), labels


def test_differential_ions_finds_the_raised_channel():
  msi, labels = _two_region_msi()
  names = {1: "A", 2: "B"}
  table = R.differential_ions(msi, labels, "A", "B", names=names, top=None)
  assert len(table) == 6 and table.region_a == "A" and table.n_a == 50 and table.n_b == 50
  assert table.channel[0] == 3 and table.mz[0] == pytest.approx(msi.mz[3])
  assert table.log2_fold_change[0] > 1 and table.q_value[0] < 1e-6
  # The p-value is scipy's Mann-Whitney U for that channel alone; q-values are BH-adjusted and never below p.
  x = msi.cube[labels == 1][:, 3]
  y = msi.cube[labels == 2][:, 3]
  assert table.p_value[0] == pytest.approx(scipy.stats.mannwhitneyu(x, y).pvalue, rel=1e-9)
  assert np.all(table.q_value >= table.p_value - 1e-15)
  np.testing.assert_allclose(np.sort(table.q_value), np.sort(scipy.stats.false_discovery_control(table.p_value)))
  # Sorted by q, and the all-zero channel is untestable: p = q = 1, no fold change.
  assert np.all(np.diff(table.q_value) >= 0)
  row = int(np.flatnonzero(table.channel == 5)[0])
  assert table.p_value[row] == 1.0 and table.log2_fold_change[row] == 0.0
  reverse = R.differential_ions(msi, labels, 2, 1, top=2)
  assert len(reverse) == 2 and reverse.channel[0] == 3 and reverse.log2_fold_change[0] < -1
  assert reverse.region_a == "region 2"
  np.testing.assert_allclose(reverse.log2_fold_change[0], -table.log2_fold_change[0])


def test_statistics_in_channel_blocks_match_whole(monkeypatch):
  msi, labels = _two_region_msi()
  names = {1: "A", 2: "B"}
  whole = R.region_statistics(msi, labels, names)
  whole_diff = R.differential_ions(msi, labels, 1, 2, top=None)
  monkeypatch.setattr(R, "_MAX_BLOCK_VALUES", 60)  # 60 values: one channel at a time for 50 pixels
  blocked = R.region_statistics(msi, labels, names)
  for field in ("mean", "median", "std"):
    np.testing.assert_allclose(getattr(blocked, field), getattr(whole, field), rtol=1e-12)
  blocked_diff = R.differential_ions(msi, labels, 1, 2, top=None)
  np.testing.assert_array_equal(blocked_diff.channel, whole_diff.channel)
  np.testing.assert_allclose(blocked_diff.p_value, whole_diff.p_value, rtol=1e-12)


def test_differential_ions_needs_enough_pixels():
  msi, labels = _two_region_msi()
  labels[:, :5] = 0
  labels[0, 0] = labels[0, 1] = 1
  with pytest.raises(errors.DataError, match="2 measured MSI pixel"):
    R.differential_ions(msi, labels, 1, 2, min_pixels=3)
  with pytest.raises(errors.ConfigError, match="same region"):
    R.differential_ions(msi, labels, 2, 2)
  with pytest.raises(errors.ConfigError, match="no region named"):
    R.differential_ions(msi, labels, "A", 2, names={1: "B"})


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_csv_tables_round_trip(tmp_path):
  msi, labels = _two_region_msi()
  stats = R.region_statistics(msi, labels, {1: "A", 2: "B"})
  tidy = tmp_path / "regions.csv"
  R.write_region_table_csv(stats, tidy)
  rows = _read_csv(tidy)
  assert list(rows[0]) == ["region", "mz", "mean", "median", "std", "n_pixels"]
  assert len(rows) == 2 * 6
  for row in rows:
    i = stats.region_names().index(row["region"])
    j = int(np.flatnonzero(stats.mz == float(row["mz"]))[0])
    assert float(row["mean"]) == stats.mean[i, j]
    assert float(row["median"]) == stats.median[i, j]
    assert float(row["std"]) == stats.std[i, j]
    assert int(row["n_pixels"]) == stats.n_pixels[i]

  wide = tmp_path / "spectra.csv"
  R.write_mean_spectra_csv(stats, wide)
  rows = _read_csv(wide)
  assert list(rows[0]) == ["mz", "A", "B"]
  np.testing.assert_array_equal([float(r["mz"]) for r in rows], stats.mz)
  np.testing.assert_array_equal([float(r["B"]) for r in rows], stats.mean[1])

  table = R.differential_ions(msi, labels, 1, 2, names={1: "A", 2: "B"}, top=3)
  diff = tmp_path / "diff.csv"
  R.write_differential_ions_csv(table, diff)
  rows = _read_csv(diff)
  assert [int(r["channel"]) for r in rows] == table.channel.tolist()
  assert float(rows[0]["q_value"]) == table.q_value[0] and rows[0]["region_a"] == "A"

  with pytest.raises(errors.DataError, match="overwrite=True") as info:
    R.write_region_table_csv(stats, tidy)
  assert str(tidy) in str(info.value)
  with pytest.raises(errors.DataError, match="exists"):
    R.write_mean_spectra_csv(stats, wide)
  R.write_mean_spectra_csv(stats, wide, overwrite=True)


def test_simulated_tables_say_so(tmp_path):
  msi, labels = _two_region_msi(simulated=True)
  stats = R.region_statistics(msi, labels, {1: "A", 2: "B"})
  assert stats.simulated
  R.write_region_table_csv(stats, tmp_path / "t.csv")
  assert all(row["simulated"] == "true" for row in _read_csv(tmp_path / "t.csv"))
  R.write_mean_spectra_csv(stats, tmp_path / "w.csv")
  assert list(_read_csv(tmp_path / "w.csv")[0]) == ["mz", "A (simulated)", "B (simulated)"]


# ----------------------------------------------------------------------------------------------------------------
# Figures.


def test_figures_draw_regions_and_say_simulated(tmp_path):
  msi, labels = _two_region_msi(simulated=True)
  names = {1: "A", 2: "B"}
  fig = viz_regions.plot_regions_on_ion_image(msi, labels, names, mz=msi.mz[3], colors={1: (200, 0, 0)})
  ax = fig.axes[0]
  assert "(simulated)" in ax.get_title() and "m/z" in ax.get_title()
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A (n=50)", "B (n=50)"]
  assert ax.get_legend().get_patches()[0].get_edgecolor()[:3] == pytest.approx((200 / 255, 0, 0))
  fig.savefig(tmp_path / "ion.png")
  assert (tmp_path / "ion.png").stat().st_size > 0

  stats = R.region_statistics(msi, labels, names)
  fig = viz_regions.plot_region_spectra(stats)
  ax = fig.axes[0]
  assert "(simulated)" in ax.get_title()
  assert len(ax.get_lines()) == 2
  fig = viz_regions.plot_region_spectra(stats, regions=["B"], title="Chemistry")
  assert len(fig.axes[0].get_lines()) == 1 and fig.axes[0].get_title() == "Chemistry (simulated)"
  with pytest.raises(errors.ConfigError, match="not in the statistics"):
    viz_regions.plot_region_spectra(stats, regions=["C"])

  real, _ = _two_region_msi(simulated=False)
  fig = viz_regions.plot_regions_on_ion_image(real, labels, names, mz=real.mz[0])
  assert "simulated" not in fig.axes[0].get_title()
