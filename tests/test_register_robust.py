"""Tests of the registration's robustness features on generated cases (msisynth.register.cases): the success
verdict, the overlap-safe similarity, shared compiled shapes, the turn margin, the tissue crop and the scale
search of `register_msi_to_histology`."""

import dataclasses
import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi

from msisynth import errors
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import cases
from msisynth.register import optimize as opt

CONFIG = opt.RegistrationConfig(max_iterations=(50, 25, 25))


def _grey(case):
  return 1.0 - case.fixed.mean(axis=2)


def _register(case, moving=None, **kw):
  moving = case.moving if moving is None else moving
  return opt.register(_grey(case), moving, fixed_pixel_size_um=1.0, moving_pixel_size_um=case.moving_pixel_size_um,
                      config=kw.pop("config", CONFIG), **kw)  # fmt: skip


@pytest.fixture(scope="module")
def uni_case():
  return cases.make_case(np.random.default_rng(0), 128, appearance="uni", max_rotation_deg=15, max_shift=0.1)


def test_generated_case_truth_is_consistent(uni_case):
  # Warping the moving image back through the true transform gives the fixed image (as grey, up to the
  # intensity curve): their correlation is high, and higher than through the identity.
  back = np.asarray(tf.warp_image(uni_case.moving, uni_case.transform, (128, 128)))
  inner = (slice(20, -20), slice(20, -20))
  grey = _grey(uni_case)
  corr = np.corrcoef(back[inner].ravel(), grey[inner].ravel())[0, 1]
  assert corr > 0.9
  assert cases.grid_error_px(uni_case.transform, uni_case)[0] < 1e-3


def test_correct_registration_succeeds_and_unrelated_images_fail(uni_case):
  result = _register(uni_case)
  assert cases.grid_error_px(result.transform, uni_case)[0] < 2.0
  assert result.success and result.gain >= CONFIG.min_gain
  assert not any("failed" in w for w in result.warnings)
  assert 0.5 < result.overlap <= 1.0 and 0.5 < result.moving_overlap <= 1.0
  assert 0 < result.agreement <= 1.0
  summary = opt.result_summary(result)
  assert summary["success"] is True and "gain" in summary
  # A moving image of other tissue: nothing to find.
  other = cases.make_case(np.random.default_rng(5), 128, appearance="uni")
  with pytest.warns(UserWarning, match="registration failed"):
    bad = _register(uni_case, moving=np.random.default_rng(1).permutation(other.moving.ravel()).reshape(128, 128))
  assert not bad.success


def test_too_small_masks_are_refused(uni_case):
  mask = np.zeros((128, 128), bool)
  mask[60:64, 60:64] = True
  with pytest.raises(errors.RegistrationError, match="too few"):
    _register(uni_case, fixed_mask=mask)


def test_shrinking_the_overlap_cannot_raise_the_similarity(uni_case):
  """With the outside bin, samples that leave the moving image cost information: enlarging the moving image's
  footprint until a small central part overlaps lowers MI, whatever that part holds."""
  grey = _grey(uni_case)
  fixed = (grey - grey.min()) / np.ptp(grey)
  moving = fixed.copy()
  center = np.asarray(tf.image_center_um((128, 128)))
  rng = np.random.default_rng(0)
  idx = rng.choice(128 * 128, 4096, replace=False)
  rows, cols = idx // 128, idx % 128
  from msisynth.register.similarity import parzen_weights

  values = fixed[rows, cols]
  data = {"points": np.stack([cols, rows], 1).astype(np.float32), "values": values,
          "weights": np.ones(4096, np.float32), "moving": np.stack([moving, np.ones_like(moving)], -1),
          "moving_hw": np.array([128, 128], np.int32), "moving_range": np.array([0, 1], np.float32),
          "moving_px": np.array([1, 1], np.float32)}  # fmt: skip
  data["fixed_parzen"] = parzen_weights(values, np.array([0, 1], np.float32), bins=32)
  mats = []
  for zoom in (1.0, 0.5, 0.25, 0.1):  # fixed → moving scale > 1 … here < 1: the fixed maps onto a central part
    t = AffineTransform.from_params([0, np.log(1 / zoom), np.log(1 / zoom), 0, 0, 0], center)
    mats.append(np.asarray(t.matrix))
  mats = np.stack(mats).astype(np.float32)
  for outside, expect_monotone in ((True, True), (False, False)):
    opts = opt._LevelOptions("mi", "affine", 32, "bspline", outside, 2048)
    values_k, overlap = opt._similarities_of_matrices(mats, data, opts)
    values_k = np.asarray(values_k)
    assert np.all(np.diff(np.asarray(overlap)) < 0)
    if expect_monotone:
      assert np.all(np.diff(values_k) < 0), values_k


def test_differently_shaped_sections_share_compilations():
  """A folder of sections of different shapes compiles the level function once per start count (and the check
  once), not once per shape."""
  rng = np.random.default_rng(2)
  shapes = [(120, 100), (112, 128), (100, 90), (128, 124)]
  config = dataclasses.replace(CONFIG, max_iterations=(20, 10, 10))
  before = None
  for i, (h, w) in enumerate(shapes):
    img = cases.tissue_image(rng, 0, shape=(h, w))
    grey = 1.0 - img.mean(axis=2)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      opt.register(grey, grey[::2, ::2], fixed_pixel_size_um=1.0, moving_pixel_size_um=2.0, config=config)
    if i == 0:
      before = (opt._run_level._cache_size(), opt._evaluate._cache_size())
  after = (opt._run_level._cache_size(), opt._evaluate._cache_size())
  assert after == before, (before, after)


@pytest.mark.parametrize("turns,mirrored", [(2, False), (1, True)])
def test_turned_section_is_found_with_a_clear_margin(turns, mirrored):
  rng = np.random.default_rng(10 + turns)
  case = cases.make_case(rng, 128, appearance="uni", max_rotation_deg=10, max_shift=0.08, min_scale=0.9,
                         max_scale=1.1)  # fmt: skip
  # Compose the wanted turn and mirror into the truth: moving(T(x)) = fixed(x) with T = T0 ∘ turn.
  center = np.asarray(tf.image_center_um((128, 128)))
  turn = AffineTransform.from_params([turns * np.pi / 2, 0, 0, 0, 0, 0], center)
  if mirrored:
    turn = turn.compose(AffineTransform.mirror("x", center))
  truth = case.transform.compose(turn)
  moving = np.asarray(tf.warp_image(_grey(case), truth.inverse(), case.moving.shape))
  turned_case = dataclasses.replace(case, transform=truth)
  config = dataclasses.replace(CONFIG, flips_and_rot90=True)
  result = opt.register(_grey(case), moving, config=config)
  assert cases.grid_error_px(result.transform, turned_case)[0] < 2.0
  assert result.mirrored == mirrored and not result.turn_ambiguous and result.success


def test_unturned_preferred_without_a_margin(monkeypatch):
  """Rings look the same turned: no orientation wins clearly, so the unturned one is chosen and the result
  says so."""
  yy, xx = np.mgrid[:64, :64].astype(np.float32)
  r = np.hypot(xx - 31.5, yy - 31.5)
  rings = (np.cos(r / 3.0) * np.exp(-((r / 20) ** 2))).astype(np.float32)
  config = dataclasses.replace(CONFIG, flips_and_rot90=True)
  with pytest.warns(UserWarning, match="turn or mirror ambiguous"):
    result = opt.register(rings, rings, config=config)
  assert result.turn_ambiguous and not result.candidates[0].turned


def _slide_with_small_tissue(rng, size=320, tissue=64, at=(40, 220)):
  slide = np.full((size, size, 3), 0.93, np.float32) + rng.normal(0, 0.01, (size, size, 3)).astype(np.float32)
  section = cases.tissue_image(rng, tissue)
  r, c = at
  slide[r : r + tissue, c : c + tissue] = section
  slide[size - 40 : size - 20, 20:120] = 0.05  # a black label
  slide[:, :3] = 0.6  # the slide's edge, grey
  return np.clip(slide, 0, 1), section


def test_tissue_crop_finds_small_tissue_on_a_large_slide():
  rng = np.random.default_rng(3)
  slide, _ = _slide_with_small_tissue(rng)
  r0, r1, c0, c1 = opt.tissue_crop(slide)
  assert r0 <= 40 + 10 and r1 >= 40 + 54 and c0 <= 220 + 10 and c1 >= 220 + 54
  assert (r1 - r0) * (c1 - c0) < 0.15 * slide.shape[0] * slide.shape[1]
  assert r1 < 320 - 40  # the label is left out
  assert opt.tissue_crop(np.zeros((64, 64))) is None  # grey: no crop


def test_msi_to_histology_on_tiny_tissue_with_uncertain_pixel_size():
  rng = np.random.default_rng(4)
  slide, section = _slide_with_small_tissue(rng)
  # The MSI: an MSI-like image of the section region at 4 µm (histology 1 µm), turned by 90°, whose stated pixel
  # size is 30 % off.
  region = slide[24:120, 204:300]
  signal = cases.msi_like(rng, region, region.min(axis=2) < 0.85)
  signal = np.rot90(signal).copy()
  msi = signal.reshape(24, 4, 24, 4).mean(axis=(1, 3))
  result = opt.register_msi_to_histology(slide, msi, histology_pixel_size_um=1.0, msi_pixel_size_um=4.0 * 1.3,
                                         pixel_size_uncertain=True)  # fmt: skip
  assert "tissue_crop" in result.notes and result.notes["scale_search"]
  assert result.fixed_shape == slide.shape[:2]
  # The region's centre maps to the MSI's centre (in the stated MSI µm), within 2 MSI pixels.
  centre = np.array([204 + 47.5, 24 + 47.5])
  mapped = np.asarray(result.transform.apply(centre))
  expected = np.array([11.5, 11.5]) * 4.0 * 1.3
  assert np.linalg.norm(mapped - expected) < 2 * 4.0 * 1.3, (mapped, expected)
  assert result.success


def test_msi_like_options_change_only_what_they_name():
  rng = np.random.default_rng(3)
  rgb = cases.tissue_image(rng, 96)
  tissue = rgb.min(axis=2) < 0.85
  default = cases.msi_like(np.random.default_rng(1), rgb, tissue)
  assert np.array_equal(default, cases.msi_like(np.random.default_rng(1), rgb, tissue, mixture="sine", hidden=0.4))
  # Without the hidden field the image no longer depends on the random stream.
  a = cases.msi_like(np.random.default_rng(1), rgb, tissue, hidden=0.0)
  b = cases.msi_like(np.random.default_rng(2), rgb, tissue, hidden=0.0)
  assert np.array_equal(a, b) and not np.allclose(a, default)
  linear = cases.msi_like(np.random.default_rng(1), rgb, tissue, mixture="linear", hidden=0.0)
  assert not np.allclose(linear, a)
  far = ~ndi.binary_dilation(tissue, iterations=4)
  np.testing.assert_allclose(linear[far], a[far], atol=1e-3)  # away from tissue both are the matrix signal
  with pytest.raises(errors.ConfigError, match="mixture"):
    cases.msi_like(rng, rgb, tissue, mixture="cubic")
  with pytest.raises(errors.ConfigError, match="fraction has shape"):
    cases.msi_like(rng, rgb, tissue, fraction=np.ones((4, 4)))
  # The cover given is the one used: none at all leaves only the off-tissue signal.
  bare = cases.msi_like(np.random.default_rng(1), rgb, tissue, hidden=0.0, fraction=np.zeros(tissue.shape))
  np.testing.assert_allclose(bare, 0.5)


def test_match_resolution_smooths_only_the_finer_image_to_the_coarser_ones_width():
  impulse = np.zeros((1, 41, 41), np.float32)
  impulse[0, 20, 20] = 1.0
  other = np.random.default_rng(0).random((1, 11, 11)).astype(np.float32)

  def variance(img):
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    return float(np.sum(img * (xs - 20.0) ** 2) / np.sum(img))

  # Fixed pixels 2 µm, moving 6 µm: the fixed image gets σ² = (3² − 1) / 4 = 2 of its pixels.
  fixed, moving = opt._match_resolution(impulse, other, 2.0, 6.0)
  assert moving is other
  assert variance(fixed[0]) == pytest.approx(2.0, rel=0.02)
  # The other way round the moving image is smoothed, and equal grids are left alone.
  fixed2, moving2 = opt._match_resolution(other, impulse, 6.0, 2.0)
  assert fixed2 is other and variance(moving2[0]) == pytest.approx(2.0, rel=0.02)
  same = opt._match_resolution(impulse, impulse, 3.0, 3.0)
  assert same[0] is impulse and same[1] is impulse


def test_match_resolution_registers_an_msi_like_case():
  case = cases.make_case(np.random.default_rng(0), 128, appearance="msi", max_rotation_deg=10, max_shift=0.05)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    r = opt.register(1.0 - case.fixed.mean(axis=2), case.moving, fixed_pixel_size_um=case.fixed_pixel_size_um,
                     moving_pixel_size_um=case.moving_pixel_size_um,
                     config=opt.RegistrationConfig(match_resolution=True))  # fmt: skip
  assert cases.grid_error_px(r.transform, case)[0] < case.moving_pixel_size_um  # 1 MSI pixel


def _half_level_area(image, low, high):
  return float((image > 0.5 * (low + high)).sum())


@pytest.mark.parametrize("size", [128, 512])
def test_tissue_cover_follows_the_slides_own_edge(size):
  rng = np.random.default_rng(4)
  rgb, truth = cases._tissue_image(rng, size)
  from msisynth.io.histology import tissue_mask

  mask = tissue_mask(rgb, min_size_px=max(16, size * size // 2000))
  cover = cases.tissue_cover(rgb, mask)
  perimeter = float((truth > 0.5).sum() - ndi.binary_erosion(truth > 0.5).sum())
  # The half level of the estimate lies within half a pixel of the true one (on average along the edge) ...
  offset = (_half_level_area(cover, 0, 1) - _half_level_area(truth, 0, 1)) / perimeter
  assert abs(offset) < 0.5, offset
  # ... where the blurred binary mask ends well outside it (the bias the estimate removes).
  blurred = ndi.gaussian_filter(mask.astype(np.float32), 1.0)
  assert (_half_level_area(blurred, 0, 1) - _half_level_area(truth, 0, 1)) / perimeter > 1.5
  assert cover.min() >= 0 and cover.max() <= 1
  assert np.all(cover[~ndi.binary_dilation(mask, iterations=3)] == 0)
  assert np.mean(cover[ndi.binary_erosion(mask, iterations=5)] >= 0.9) > 0.9
  assert not cases.tissue_cover(rgb, np.zeros_like(mask)).any()


def test_msi_like_case_shows_the_tissue_as_large_as_the_histology():
  # The MSI-like image's tissue (half way between the off-tissue and the tissue signal) covers the area of the
  # histology's true tissue mapped through the truth, to 2 %: its edge is where the slide's is.
  case = cases.make_case(np.random.default_rng(5), 512, appearance="msi", msi_hidden=0.0, max_shift=0.0,
                         min_scale=0.75, max_scale=0.76)  # fmt: skip
  rgb, truth = cases._tissue_image(np.random.default_rng(5), 512)
  assert np.allclose(rgb.mean(), cases.tissue_image(np.random.default_rng(5), 512).mean())
  moving = ndi.median_filter(case.moving, 3)  # the hot pixels and most of the noise gone
  tissue_level = float(np.median(moving[moving > 0.9]))
  msi_area_um2 = _half_level_area(moving, 0.5, tissue_level) * case.moving_pixel_size_um**2
  det = abs(np.linalg.det(np.asarray(case.transform.matrix, np.float64)[:2, :2]))
  true_area_um2 = float((truth > 0.5).sum()) * case.fixed_pixel_size_um**2 * det
  assert msi_area_um2 == pytest.approx(true_area_um2, rel=0.02)


def test_intensity_percentiles_set_the_histogram_range():
  values = np.concatenate([np.linspace(0.0, 1.0, 999), [50.0]]).astype(np.float32)
  ones = np.ones_like(values)
  assert opt._range(values, ones).tolist() == [0.0, 50.0]
  lo, hi = opt._range(values, ones, (0.5, 99.5))
  assert 0.0 < lo < 0.01 and 0.99 < hi < 1.0  # the hot value no longer stretches the bins
  assert opt._range(values, (values < 0.5).astype(np.float32), (0.0, 100.0))[1] < 0.5  # within the mask only
  constant = np.ones(100, np.float32)
  assert opt._range(constant, np.ones(100), (1.0, 99.0)).tolist() == [1.0, 2.0]
  for bad in ((5.0, 5.0), (-1.0, 99.0), (1.0, 101.0), (60.0, 40.0)):
    with pytest.raises(errors.ConfigError, match="intensity_percentiles"):
      opt.RegistrationConfig(intensity_percentiles=bad)


def test_msi_hotspots_do_not_derail_the_registration():
  # An MSI-like case whose hotspots are strong (0.5 % of the pixels × 30): over the full intensity range the tissue
  # falls into a few bins and the registration fails; over the default percentiles it holds.
  case = cases.make_case(np.random.default_rng(3), 192, appearance="msi", max_rotation_deg=15, max_shift=0.1)
  moving = case.moving.copy()
  moving[np.random.default_rng(103).random(moving.shape) < 0.005] *= 30.0
  results = {}
  for percentiles in ((0.5, 99.5), (0.0, 100.0)):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      results[percentiles] = opt.register(_grey(case), moving, fixed_pixel_size_um=1.0,
                                          moving_pixel_size_um=case.moving_pixel_size_um,
                                          config=opt.RegistrationConfig(intensity_percentiles=percentiles))  # fmt: skip
  robust, full = results[(0.5, 99.5)], results[(0.0, 100.0)]
  assert opt.RegistrationConfig().intensity_percentiles == (0.5, 99.5)
  assert cases.grid_error_px(robust.transform, case)[0] < case.moving_pixel_size_um and robust.success
  assert cases.grid_error_px(full.transform, case)[0] > 10.0 and not full.success


def test_finest_repeats_take_the_median_of_runs_on_other_pools():
  case = cases.make_case(np.random.default_rng(0), 128, appearance="msi", max_rotation_deg=10, max_shift=0.05)
  kwargs = dict(fixed_pixel_size_um=1.0, moving_pixel_size_um=case.moving_pixel_size_um)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    once = opt.register(_grey(case), case.moving, **kwargs)
    thrice = opt.register(_grey(case), case.moving, config=opt.RegistrationConfig(finest_repeats=3), **kwargs)
  assert cases.grid_error_px(thrice.transform, case)[0] < case.moving_pixel_size_um and thrice.success
  assert not np.allclose(np.asarray(once.transform.matrix), np.asarray(thrice.transform.matrix))  # other pools
  assert thrice.iterations[-1] > once.iterations[-1]  # the finest level's steps of all three runs
  assert thrice.iterations[:-1] == once.iterations[:-1]  # the coarser levels are shared
  for bad in (0, 1.5):
    with pytest.raises(errors.ConfigError, match="finest_repeats"):
      opt.RegistrationConfig(finest_repeats=bad)
