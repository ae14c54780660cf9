"""Tests of msisynth.simulate on a small crop of a real H&E slide."""

import csv
import json

import numpy as np
import pytest

from msisynth import errors, simulate
from msisynth import io as msi_io
from msisynth.geometry.transforms import AffineTransform, warp_image

HE_PX = 5.0


@pytest.fixture(scope="module")
def he(shared_data):
  """The 'Normal' section of one rcc slide at half resolution: 160 × 170 px with a white margin."""
  full = msi_io.read_histology(shared_data / "he" / "rcc-UH0505_12.png")
  return np.ascontiguousarray(full[::2, ::2][40:200, 170:340])


def _quiet(**kwargs):
  return simulate.simulate_msi(
    0, kwargs.pop("he"), histology_pixel_size_um=HE_PX, n_channels=kwargs.pop("n_channels", 30), noise=False, **kwargs
  )


def _foreground_centre_um(sim):
  """Centre of mass (x, y) µm of the TIC above the background level (exact without noise)."""
  tic = sim.msi.cube.sum(-1).astype(np.float64)
  weight = np.clip(tic - np.median(np.concatenate([tic[0], tic[-1]])), 0, None)
  rows, cols = np.mgrid[: tic.shape[0], : tic.shape[1]]
  py, px = sim.msi.pixel_size_um
  return np.array([(weight * cols).sum() * px, (weight * rows).sum() * py]) / weight.sum()


def test_same_seed_same_simulation_and_other_seed_differs(he):
  a = simulate.simulate_msi(
    3, he, histology_pixel_size_um=HE_PX, n_channels=20, misalignment="random", deformation_um=5
  )
  b = simulate.simulate_msi(
    3, he, histology_pixel_size_um=HE_PX, n_channels=20, misalignment="random", deformation_um=5
  )
  np.testing.assert_array_equal(a.msi.cube, b.msi.cube)
  np.testing.assert_array_equal(a.msi.mask, b.msi.mask)
  np.testing.assert_array_equal(a.landmarks, b.landmarks)
  np.testing.assert_array_equal(np.asarray(a.transform.matrix), np.asarray(b.transform.matrix))
  c = simulate.simulate_msi(
    4, he, histology_pixel_size_um=HE_PX, n_channels=20, misalignment="random", deformation_um=5
  )
  assert not np.allclose(np.asarray(a.transform.matrix), np.asarray(c.transform.matrix))
  # One chemistry across seeds: same m/z and channel kinds, different noise.
  d = simulate.simulate_msi(5, he, histology_pixel_size_um=HE_PX, n_channels=20, chemistry_seed=3)
  np.testing.assert_array_equal(d.msi.mz, a.msi.mz)
  assert d.msi.metadata["simulation"]["channel_kinds"] == a.msi.metadata["simulation"]["channel_kinds"]


@pytest.mark.parametrize("msi_px, shape", [(20.0, (40, 43)), (25.0, (32, 34)), ((10.0, 40.0), (80, 22))])
def test_shapes_mz_and_metadata(he, msi_px, shape):
  sim = simulate.simulate_msi(1, he, histology_pixel_size_um=HE_PX, msi_pixel_size_um=msi_px, n_channels=200)
  assert sim.msi.cube.shape == shape + (200,) and sim.msi.cube.dtype == np.float32
  assert sim.msi.pixel_size_um == (msi_px if isinstance(msi_px, tuple) else (msi_px, msi_px))
  assert np.all(np.diff(sim.msi.mz) > 0) and 400 <= sim.msi.mz[0] and sim.msi.mz[-1] <= 1000
  assert sim.msi.metadata["simulated"] is True
  params = sim.msi.metadata["simulation"]
  assert params["seed"] == 1 and params["msi_shape"] == list(shape) and len(params["channel_kinds"]) == 200
  json.dumps(sim.msi.metadata)  # JSON-serialisable
  assert sim.tissue_classes.shape == he.shape[:2] and sim.tissue_classes_msi.shape == shape
  assert set(np.unique(sim.tissue_classes)) == set(range(5))
  np.testing.assert_array_equal(sim.tissue_classes > 0, simulate.he_tissue_mask(he))
  classes, centroids = simulate.tissue_classes(1, he)
  np.testing.assert_array_equal(classes, sim.tissue_classes)
  assert np.all(np.diff(centroids[:, 0]) >= 0)  # numbered by increasing hematoxylin
  assert np.all(sim.msi.cube >= 0)


def test_channels_are_nonlinear_mixtures_of_more_than_the_stains(he):
  sim = _quiet(he=he, n_channels=60)
  x = sim.msi.cube.reshape(-1, 60).astype(np.float64)
  x = x / x.std(0)
  singular = np.linalg.svd(x - x.mean(0), compute_uv=False)
  # A linear mixture of two stain densities (plus an offset) would leave rank 2 after centring.
  assert singular[4] / singular[0] > 0.02
  # The softplus/power response: a channel is not an affine function of any one other channel of its kind.
  kinds = np.array(sim.msi.metadata["simulation"]["channel_kinds"])
  nuclei = np.flatnonzero(kinds == "nuclei")
  a, b = x[:, nuclei[0]], x[:, nuclei[1]]
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.999
  # Tissue-class channels are brighter on their class than elsewhere in the tissue.
  classes = sim.tissue_classes_msi
  tissue = classes > 0
  per_class = np.array([[x[(classes == k).ravel(), j].mean() for k in range(1, 5)] for j in range(60)])
  assert np.all(per_class[kinds == "class"].max(1) > 1.5 * np.median(per_class[kinds == "class"], 1))
  matrix = np.flatnonzero(kinds == "matrix")
  assert np.all(x[~tissue.ravel()][:, matrix].mean(0) > 2 * x[tissue.ravel()][:, matrix].mean(0))


def test_noise_hotspots_and_missing_pixels(he):
  noise = simulate.NoiseModel(missing_fraction=0.05, missing_lines=1, hotspot_fraction=1e-3)
  sim = simulate.simulate_msi(2, he, histology_pixel_size_um=HE_PX, n_channels=40, noise=noise)
  mask, cube = sim.msi.mask, sim.msi.cube
  assert np.all(cube[~mask] == 0)
  assert np.any(~mask.any(axis=1))  # a whole scan line missing
  missing = (~mask).sum()
  assert mask.size * 0.05 <= missing <= mask.size * 0.05 + mask.shape[1]
  assert sim.msi.metadata["simulation"]["noise_realised"]["n_missing_pixels"] == missing
  counts = cube[mask]
  np.testing.assert_array_equal(counts, np.round(counts))  # Poisson counts
  # Hotspots: a few entries far above each channel's 99.9th percentile.
  level = np.percentile(counts, 99.9, axis=0)
  hot = counts > 2.5 * level
  assert 0 < hot.sum() <= 1e-3 * cube.size + 1
  # Ionisation efficiency: the TIC varies over the tissue far more than without noise.
  quiet = _quiet(he=he, n_channels=40)
  tissue = (sim.tissue_classes_msi > 0) & mask
  cv = lambda tic: tic.std() / tic.mean()
  assert cv(cube.sum(-1)[tissue]) > cv(quiet.msi.cube.sum(-1)[tissue]) + 0.1


def test_translation_shifts_the_tic_by_the_translation(he):
  shift = np.array([60.0, 40.0])
  base = _quiet(he=he)
  moved = _quiet(he=he, misalignment=AffineTransform.from_linear(np.eye(2), shift))
  assert moved.msi.shape == (base.msi.shape[0] + 2, base.msi.shape[1] + 3)
  np.testing.assert_allclose(_foreground_centre_um(moved) - _foreground_centre_um(base), shift, atol=2.0)


def test_random_misalignment_warps_back_onto_the_he_tissue(he):
  sim = _quiet(he=he, misalignment="random", max_rotation_deg=20, deformation_um=10)
  params = sim.msi.metadata["simulation"]["misalignment"]
  assert params["kind"] == "random" and abs(params["rotation_deg"]) <= 20
  tissue_msi = sim.tissue_classes_msi > 0
  kw = dict(fixed_pixel_size_um=HE_PX, moving_pixel_size_um=sim.msi.pixel_size_um, order=0)
  back = np.asarray(warp_image(tissue_msi.astype(np.uint8), sim.transform, he.shape[:2], **kw)).astype(bool)
  plain = np.asarray(warp_image(tissue_msi.astype(np.uint8), AffineTransform.identity(), he.shape[:2], **kw))
  tissue = simulate.he_tissue_mask(he)
  iou = lambda a, b: (a & b).sum() / (a | b).sum()
  assert iou(back, tissue) > 0.8 > iou(plain.astype(bool), tissue) + 0.2


def test_landmarks_follow_the_ground_truth(he):
  sim = _quiet(he=he, misalignment="random", deformation_um=15.0, n_landmarks=30)
  fixed, moving = sim.landmarks_fixed_um, sim.landmarks_moving_um
  assert sim.landmarks.shape == (30, 4)
  tissue = simulate.he_tissue_mask(he)
  assert tissue[np.round(fixed[:, 1] / HE_PX).astype(int), np.round(fixed[:, 0] / HE_PX).astype(int)].all()
  np.testing.assert_allclose(sim.moving_to_fixed(moving), fixed, atol=1e-4)
  matrix = np.asarray(sim.transform.matrix, np.float64)
  affine = fixed @ matrix[:2, :2].T + matrix[:2, 2]
  residual = np.linalg.norm(moving - affine, axis=1)
  assert residual.max() <= 15.0 + 1e-3 and residual.max() > 3.0
  np.testing.assert_allclose(moving - affine, sim.displacement(moving), atol=1e-4)
  assert sim.displacement_um.shape == sim.msi.shape + (2,)
  rigid = _quiet(he=he, misalignment="random", n_landmarks=10)
  m = np.asarray(rigid.transform.matrix, np.float64)
  np.testing.assert_allclose(rigid.landmarks_moving_um, rigid.landmarks_fixed_um @ m[:2, :2].T + m[:2, 2], atol=1e-6)
  assert rigid.displacement is None and rigid.displacement_um is None


def test_save_simulated_writes_readable_files(he, tmp_path):
  sim = simulate.simulate_msi(
    0, he[:80, :80], histology_pixel_size_um=HE_PX,
    n_channels=12, misalignment="random", deformation_um=5.0, n_landmarks=8
  )
  paths = simulate.save_simulated(sim, tmp_path / "sim")
  back = msi_io.read_imzml(paths["imzml"], mz_values=sim.msi.mz, tol=0, tol_unit="da")
  np.testing.assert_array_equal(back.mask, sim.msi.mask)
  np.testing.assert_allclose(back.cube, sim.msi.cube, rtol=1e-6)
  truth = json.loads(paths["ground_truth"].read_text())
  assert truth["simulated"] is True
  np.testing.assert_allclose(truth["transform_fixed_to_moving"], np.asarray(sim.transform.matrix), rtol=1e-6)
  assert truth["parameters"]["seed"] == 0
  with open(paths["landmarks"]) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["fixed_x", "fixed_y", "moving_x", "moving_y"]
  np.testing.assert_allclose(np.array(rows[1:], float), sim.landmarks, atol=1e-5)
  np.testing.assert_allclose(msi_io.read_histology(paths["he"]), sim.he, atol=1 / 255)
  np.testing.assert_array_equal(np.load(paths["displacement"]), sim.displacement_um)
  with pytest.raises(errors.ConfigError, match="exists"):
    simulate.save_simulated(sim, tmp_path / "sim")
  simulate.save_simulated(sim, tmp_path / "sim", overwrite=True)


def test_bad_arguments_raise_config_errors(he):
  with pytest.raises(errors.ConfigError, match="misalignment"):
    simulate.simulate_msi(0, he, histology_pixel_size_um=HE_PX, misalignment="sideways")
  with pytest.raises(errors.ConfigError, match="too small"):
    simulate.simulate_msi(0, he[:6, :6], histology_pixel_size_um=HE_PX, msi_pixel_size_um=50.0)
  with pytest.raises(errors.ConfigError, match="histology_pixel_size_um"):
    simulate.simulate_msi(0, he, histology_pixel_size_um=-1.0)
  with pytest.raises(errors.ConfigError, match="deformation"):
    simulate.simulate_msi(0, he, histology_pixel_size_um=HE_PX, deformation_um=500.0)
  with pytest.raises(errors.DataError, match="no tissue"):
    simulate.simulate_msi(0, np.ones((40, 40, 3), np.float32), histology_pixel_size_um=HE_PX)


# ------------------------------------------------------------------------------------ the benchmark simulator


@pytest.fixture(scope="module")
def bench(he):
  return simulate.simulate_benchmark_case(3, he, histology_pixel_size_um=HE_PX, msi_pixel_size_um=20.0, n_ions=6,
                                          he_name="crop")  # fmt: skip


def test_benchmark_case_is_labelled_simulated_and_reproducible(he, bench):
  assert bench.simulated and bench.msi.metadata["simulated"] and bench.metadata["simulated"]
  assert "SIMULATED" in bench.msi.metadata["source"]
  again = simulate.simulate_benchmark_case(3, he, histology_pixel_size_um=HE_PX, msi_pixel_size_um=20.0, n_ions=6,
                                           he_name="crop")  # fmt: skip
  np.testing.assert_array_equal(again.msi.cube, bench.msi.cube)
  other = simulate.simulate_benchmark_case(4, he, histology_pixel_size_um=HE_PX, msi_pixel_size_um=20.0, n_ions=6)
  assert not np.array_equal(other.roi_mask, bench.roi_mask) or not np.allclose(other.he, bench.he)


def test_benchmark_msi_comes_from_a_deformed_neighbour_section(he, bench):
  # The neighbour differs from the H&E (elastic warp, tears, folds) by at most the elastic amplitude.
  assert np.abs(bench.elastic_um).max() == pytest.approx(40.0, rel=1e-4)
  assert np.mean(np.abs(bench.neighbour_he - he)) > 0.01
  assert bench.metadata["neighbour"]["tears"] and bench.metadata["neighbour"]["folds"]
  # The landmarks follow the affine ground truth exactly.
  m = np.asarray(bench.transform.matrix)
  np.testing.assert_allclose(bench.landmarks[:, :2] @ m[:2, :2].T + m[:2, 2], bench.landmarks[:, 2:], atol=1e-9)


def test_benchmark_acquires_inside_a_polygon_only(bench):
  mask = bench.msi.mask
  assert mask.any() and not mask[~bench.roi_mask].any()
  assert np.all(bench.msi.cube[~mask] == 0)
  assert 0.1 < bench.roi_mask.mean() < 0.95


def test_benchmark_has_isotope_patterns_and_sorted_mz(bench):
  mz = bench.msi.mz
  assert mz.size == 18 and np.all(np.diff(mz) > 0)
  ab = simulate.isotope_abundances(np.array([500.0, 1500.0]))
  np.testing.assert_allclose(ab.sum(axis=1), 1.0)
  # Heavier ions carry more 13C: at m/z 500 the M peak dominates, at 1500 M+1 exceeds it (lambda = 1.18).
  assert ab[0, 0] > ab[0, 1] > ab[0, 2] and ab[1, 1] > ab[1, 0] and ab[1, 1] > ab[0, 1]
  # Each M+1 peak sits 1.00336 above a monoisotopic peak and follows its image.
  for j in range(mz.size):
    partner = np.flatnonzero(np.isclose(mz, mz[j] + simulate.ISOTOPE_SPACING, atol=1e-6))
    if partner.size:
      a, b = bench.msi.cube[..., j][bench.msi.mask], bench.msi.cube[..., partner[0]][bench.msi.mask]
      assert np.corrcoef(a, b)[0, 1] > 0.9


def test_drift_gain_is_a_bin_share():
  g = simulate.drift_gain(np.array([0.0, 5.0, 20.0, -20.0]), bin_ppm=10.0, peak_sigma_ppm=6.0)
  assert 0.9 < g[0] < 1 and g[0] > g[1] > g[2] and g[2] == pytest.approx(g[3])


def test_benchmark_outline_is_weaker_than_the_plain_simulation(he, bench):
  plain = simulate.simulate_msi(3, bench.neighbour_he, histology_pixel_size_um=HE_PX, msi_pixel_size_um=20.0,
                                n_channels=6, misalignment=bench.transform)  # fmt: skip

  def contrast(cube, mask, tissue):
    tic = cube.sum(axis=-1)
    on, off = tic[mask & tissue], tic[mask & ~tissue]
    return abs(on.mean() - off.mean()) / (on.std() + off.std())

  c_plain = contrast(plain.msi.cube, plain.msi.mask, plain.tissue_classes_msi > 0)
  c_bench = contrast(bench.msi.cube, bench.msi.mask, bench.tissue_msi)
  assert c_bench < c_plain


def test_restain_changes_colour_not_structure(he):
  other = simulate.restain(5, he)
  assert other.shape == he.shape and np.mean(np.abs(other - he)) > 0.005
  grey = lambda x: x.mean(axis=-1)  # noqa: E731
  assert np.corrcoef(grey(other).ravel(), grey(he).ravel())[0, 1] > 0.8
