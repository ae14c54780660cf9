"""Tests of msisynth.data: pairs on one grid, spatial splits, patch sampling, augmentation and the builders."""

import numpy as np
import pytest

from msisynth import data, datasets, errors, simulate
from msisynth.geometry.transforms import AffineTransform
from msisynth.preprocess import MSIPreprocessor


def _pair(seed=0, shape=(40, 48), k=3, name="p"):
  """A pair whose histology is a pixelwise function of its MSI: histology = (msi + 1) / 2 (k = 3)."""
  rng = np.random.default_rng(seed)
  msi = rng.uniform(-1, 1, shape + (k,)).astype(np.float32)
  histology = (msi[..., :3] + 1) / 2
  mask = histology[..., 0] > 0.3
  return data.Pair(name=name, msi=msi, histology=histology, mask=mask)


# -- make_pair ------------------------------------------------------------------------------------------------------


def test_make_pair_translation_puts_feature_where_the_transform_says():
  hist_px, msi_px = 2.0, 10.0
  histology = np.ones((200, 240, 3), np.float32)
  centre_hist = np.array([150.0, 120.0])  # (x, y) µm in the histology
  yy, xx = np.mgrid[:200, :240] * hist_px
  histology[(np.abs(xx - centre_hist[0]) <= 20) & (np.abs(yy - centre_hist[1]) <= 20)] = 0.1
  shift = np.array([70.0, -30.0])  # histology (fixed) -> MSI (moving): x_msi = x_hist + shift
  transform = AffineTransform.from_linear(np.eye(2), shift)
  msi = np.zeros((30, 36, 2), np.float32)
  pair = data.make_pair(
    msi,
    histology,
    transform=transform,
    msi_pixel_size_um=msi_px,
    histology_pixel_size_um=hist_px,
    upsample=2,
    tissue_mask=np.ones((30, 36), bool),
  )
  assert pair.shape == (59, 71) and pair.metadata["pixel_size_um"] == [5.0, 5.0]
  dark = 1 - pair.histology[..., 0]
  rows, cols = np.mgrid[: pair.shape[0], : pair.shape[1]]
  centre = np.array([(dark * cols).sum(), (dark * rows).sum()]) / dark.sum() * 5.0
  np.testing.assert_allclose(centre, centre_hist + shift, atol=1.0)
  # MSI pixels left of x = 70 µm see no histology (x_hist < 0): outside, masked out, filled white.
  assert not pair.mask[:, :13].any() and pair.mask[:, 15:].any()
  np.testing.assert_array_equal(pair.histology[:, :13], 1.0)


def test_make_pair_identity_upsampling_keeps_msi_at_its_pixel_centres_and_masks_unmeasured():
  rng = np.random.default_rng(1)
  msi = rng.uniform(-1, 1, (6, 7, 4)).astype(np.float32)
  measured = np.ones((6, 7), bool)
  measured[2, 3] = False
  histology = rng.uniform(0, 1, (24, 28, 3)).astype(np.float32)
  pair = data.make_pair(
    msi,
    histology,
    msi_pixel_size_um=20.0,
    histology_pixel_size_um=5.0,
    upsample=3,
    msi_mask=measured,
    tissue_mask=np.ones((6, 7), bool),
    name="x",
  )
  assert pair.msi.shape == (16, 19, 4) and pair.histology.shape == (16, 19, 3)
  np.testing.assert_allclose(pair.msi[::3, ::3], msi, atol=1e-6)
  np.testing.assert_allclose(pair.msi[0, 1], (2 * msi[0, 0] + msi[0, 1]) / 3, atol=1e-6)
  # Every target pixel interpolating from the unmeasured MSI pixel is masked; the others are not.
  assert not pair.mask[4:9, 7:12].any()
  assert pair.mask[3, :].all() and pair.mask[:, 6].all()
  # Identity without upsampling: histology sampled at the MSI centres after the anti-alias filter.
  same = data.make_pair(
    msi, histology, msi_pixel_size_um=5.0, histology_pixel_size_um=5.0, tissue_mask=np.ones((6, 7), bool)
  )
  np.testing.assert_allclose(same.histology, histology[:6, :7], atol=1e-6)


def test_make_pair_rejects_bad_inputs():
  msi = np.zeros((5, 5, 2), np.float32)
  he = np.ones((20, 20, 3), np.float32)
  kwargs = dict(msi_pixel_size_um=20.0, histology_pixel_size_um=5.0)
  with pytest.raises(errors.DataError, match=r"\[-1, 1\]"):
    data.make_pair(msi + 3, he, **kwargs)
  with pytest.raises(errors.ConfigError, match="msi_mask"):
    data.make_pair(msi, he, msi_mask=np.ones((4, 5), bool), **kwargs)
  with pytest.raises(errors.ConfigError, match="upsample"):
    data.make_pair(msi, he, upsample=1.5, **kwargs)
  with pytest.raises(errors.ConfigError, match="histology"):
    data.make_pair(msi, he[..., :2], **kwargs)


# -- splits ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["x", "y", "auto"])
def test_split_regions_are_disjoint_with_a_gap_and_hold_the_fraction(axis):
  train, val = data.split_regions((50, 80), val_fraction=0.25, axis=axis, gap_px=3, seed=4)
  assert not (train & val).any() and val.any() and train.any()
  along = 1 if axis in ("x", "auto") else 0
  val_lines = np.flatnonzero(val.any(axis=1 - along))
  train_lines = np.flatnonzero(train.any(axis=1 - along))
  assert np.all(np.diff(val_lines) == 1)  # one band
  assert np.min(np.abs(train_lines[:, None] - val_lines[None, :])) == 4  # 3 pixels between the regions
  assert abs(len(val_lines) / val.shape[along] - 0.25) < 0.03


def test_split_regions_balances_tissue_and_depends_on_seed():
  tissue = np.zeros((40, 100), bool)
  tissue[:, 60:] = True
  train, val = data.split_regions(tissue.shape, val_fraction=0.5, axis="x", gap_px=0, seed=0, tissue_mask=tissue)
  assert abs((val & tissue).sum() / tissue.sum() - 0.5) < 0.03
  bands = {tuple(np.flatnonzero(data.split_regions((40, 100), val_fraction=0.2, seed=s)[1][0])) for s in range(5)}
  assert len(bands) > 1
  thick = data.split_regions(tissue.shape, val_fraction=0.05, axis="x", seed=0, tissue_mask=tissue, min_band_px=12)[1]
  assert np.flatnonzero(thick[0]).size == 12
  with pytest.raises(errors.ConfigError):
    data.split_regions((10, 10), val_fraction=1.0)
  with pytest.raises(errors.ConfigError):
    data.split_regions((10, 10), axis="z")


# -- PatchDataset ---------------------------------------------------------------------------------------------------


def test_batches_have_the_layout_and_both_sides_get_the_same_augmentation():
  pair = _pair()
  ds = data.PatchDataset([pair], patch_size=8, batch_size=16, seed=3, min_tissue_fraction=0.2)
  batch = ds.batch(0)
  assert batch["msi"].shape == (16, 8, 8, 3) and batch["histology"].shape == (16, 8, 8, 3)
  assert batch["mask"].shape == (16, 8, 8, 1)
  assert all(v.dtype == np.float32 for v in batch.values())
  assert batch["msi"].min() >= -1 and batch["histology"].min() >= -1 and batch["histology"].max() <= 1
  # histology = f(msi) pixelwise before augmenting, so it still holds after, patch by patch.
  np.testing.assert_allclose(batch["histology"], batch["msi"], atol=1e-6)
  np.testing.assert_array_equal(batch["mask"][..., 0], (batch["histology"][..., 0] > -0.4).astype(np.float32))
  positions = ds.sample_positions(0)
  assert len(set(positions[:, 3])) > 3  # several symmetries used
  for (_, r, c, op), patch in zip(positions, batch["msi"]):
    original = pair.msi[r : r + 8, c : c + 8]
    assert not np.array_equal(patch, original) or op == 0
    np.testing.assert_array_equal(patch, data._dihedral(original, op))


def test_batches_are_a_function_of_seed_and_step_only():
  pairs = [_pair(0), _pair(1, shape=(30, 36))]
  a = data.PatchDataset(pairs, patch_size=8, batch_size=4, seed=7)
  b = data.PatchDataset(pairs, patch_size=8, batch_size=4, seed=7)
  for step in (0, 1, 2):  # history on `a` only
    a.batch(step)
  for key in ("msi", "histology", "mask"):
    np.testing.assert_array_equal(a.batch(5)[key], b.batch(5)[key])
    np.testing.assert_array_equal(a.batch(5)[key], a.batch(5)[key])
  assert not np.array_equal(a.batch(5)["msi"], a.batch(6)["msi"])
  c = data.PatchDataset(pairs, patch_size=8, batch_size=4, seed=8)
  assert not np.array_equal(a.batch(5)["msi"], c.batch(5)["msi"])
  assert set(a.sample_positions(5)[:, 0]) <= {0, 1}
  with pytest.raises(errors.ConfigError):
    a.batch(-1)


def test_patches_lie_inside_tissue_and_region_and_train_val_footprints_do_not_overlap():
  pair = _pair(2, shape=(48, 64))
  pair.mask[:, :10] = False
  train, val = data.split_regions(pair.shape, val_fraction=0.3, axis="x", gap_px=2, seed=1)
  p = 8
  train_ds = data.PatchDataset(
    [pair], patch_size=p, batch_size=32, seed=0, region_masks=[train], min_tissue_fraction=0.6
  )
  val_ds = data.PatchDataset(
    [pair], patch_size=p, batch_size=5, seed=0, region_masks=[val], augment=False, min_tissue_fraction=0.6
  )
  footprint_train = np.zeros(pair.shape, bool)
  for r, c in train_ds.valid_positions(0):
    footprint_train[r : r + p, c : c + p] = True
  tiles = val_ds.tile_positions()
  assert len(tiles) > 0
  footprint_val = np.zeros(pair.shape, bool)
  for _, r, c in tiles:
    assert not footprint_val[r : r + p, c : c + p].any()  # tiles do not overlap each other
    footprint_val[r : r + p, c : c + p] = True
  assert not (footprint_train & footprint_val).any()
  assert footprint_train.any() and not (footprint_train & ~train).any() and not (footprint_val & ~val).any()
  for step in range(3):
    for _, r, c, _ in train_ds.sample_positions(step):
      assert pair.mask[r : r + p, c : c + p].mean() >= 0.6 and train[r : r + p, c : c + p].all()


def test_validation_batches_tile_without_augmentation_and_pad_the_last_batch():
  pair = _pair(3, shape=(33, 40))
  ds = data.PatchDataset([pair], patch_size=8, batch_size=4, seed=0, augment=True, min_tissue_fraction=0.0)
  full = ds.validation_set()
  n = len(full["position"])
  assert n == 4 * 5  # rows 0, 8, 16, 24 and columns 0, 8, ..., 32 of a 33 x 40 image
  for (_, r, c), patch in zip(full["position"], full["msi"]):
    np.testing.assert_array_equal(patch, pair.msi[r : r + 8, c : c + 8])
  batches = list(ds.validation_batches(batch_size=6))
  assert [b["msi"].shape[0] for b in batches] == [6, 6, 6, 6]
  np.testing.assert_array_equal(batches[-1]["weight"], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.concatenate([b["histology"] for b in batches])[:n], full["histology"])
  again = list(ds.validation_batches(batch_size=6))
  np.testing.assert_array_equal(again[1]["msi"], batches[1]["msi"])


def test_patch_dataset_errors_are_clear():
  with pytest.raises(errors.ConfigError, match="smaller than the 16-pixel patch"):
    data.PatchDataset([_pair(shape=(12, 30))], patch_size=16, batch_size=2, seed=0)
  empty = _pair()
  empty.mask[:] = False
  with pytest.raises(errors.ConfigError, match="no 8-pixel patch"):
    data.PatchDataset([empty], patch_size=8, batch_size=2, seed=0)
  with pytest.raises(errors.ConfigError, match="channels"):
    data.PatchDataset([_pair(k=3), _pair(k=4)], patch_size=8, batch_size=2, seed=0)
  with pytest.raises(errors.ConfigError, match="region"):
    data.PatchDataset([_pair()], patch_size=8, batch_size=2, seed=0, region_masks=[np.ones((5, 5), bool)])


# -- builders -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def he_crops(shared_data, tmp_path_factory):
  """Two small H&E crops (one section each, half resolution, one shape) written as PNGs to a temporary folder."""
  from msisynth import io as msi_io

  folder = tmp_path_factory.mktemp("he")
  paths = []
  for name, window in (("rcc-UH0505_12", np.s_[40:200, 170:340]), ("rcc-UH9812_03", np.s_[30:190, 0:170])):
    crop = msi_io.read_histology(shared_data / "he" / f"{name}.png")[::2, ::2][window]
    paths.append(msi_io.write_image(folder / f"{name}.png", crop))
  return paths


def test_semi_synthetic_pairs_spatial_split(he_crops):
  paired = data.semi_synthetic_pairs(
    he_crops,
    seed=0,
    histology_pixel_size_um=5.0,
    msi_pixel_size_um=20.0,
    n_channels=30,
    n_components=4,
    upsample=2,
    val_fraction=0.3,
  )
  assert paired.split == "region" and paired.simulated and paired.num_channels == 4
  assert [p.name for p in paired.train_pairs] == ["rcc-UH0505_12", "rcc-UH9812_03"]
  assert paired.val_pairs == paired.train_pairs
  for pair, train, val in zip(paired.train_pairs, paired.train_regions, paired.val_regions):
    assert pair.metadata["simulated"] is True and pair.metadata["pixel_size_um"] == [10.0, 10.0]
    assert pair.msi.min() >= -1 and pair.msi.max() <= 1 and pair.histology.shape[:2] == pair.msi.shape[:2]
    assert not (train & val).any() and (val & pair.mask).any() and (train & pair.mask).any()
    msi_h, msi_w = pair.metadata["simulation"]["msi_shape"]
    assert pair.shape == ((msi_h - 1) * 2 + 1, (msi_w - 1) * 2 + 1)
    # The mask is the H&E tissue on the pair's grid (less the missing MSI pixels).
    tissue = simulate.he_tissue_mask(pair.histology)
    assert (pair.mask & tissue).sum() / (pair.mask | tissue).sum() > 0.85
  restored = type(paired.preprocessor).from_dict(paired.preprocessor.to_dict())
  assert restored.num_output_channels == 4 and paired.preprocessor.fitted_on_simulated
  train_ds = paired.train_dataset(patch_size=16, batch_size=4, seed=0)
  val_ds = paired.val_dataset(patch_size=16, batch_size=4)
  assert train_ds.batch(0)["msi"].shape == (4, 16, 16, 4)
  assert len(val_ds.validation_set()["position"]) > 0


def test_semi_synthetic_pairs_split_by_section(he_crops):
  paired = data.semi_synthetic_pairs(
    he_crops[:1],
    val_he_paths=he_crops[1:],
    seed=1,
    histology_pixel_size_um=5.0,
    n_channels=30,
    n_components=4,
    upsample=2,
    noise=False,
  )
  assert paired.split == "section" and paired.train_regions == [None] and paired.val_regions == [None]
  assert [p.name for p in paired.val_pairs] == ["rcc-UH9812_03"]
  assert paired.preprocessor.fitted_on == "MSI simulated from rcc-UH0505_12.png"
  # One chemistry: the same m/z in both slides' simulations.
  sims = [p.metadata["simulation"] for p in paired.train_pairs + paired.val_pairs]
  assert sims[0]["chemistry_seed"] == sims[1]["chemistry_seed"] == 1
  assert sims[0]["class_centroids"] == sims[1]["class_centroids"]


def test_msiflow_pairs_real_pair_with_a_spatial_split(shared_data):
  paired = data.msiflow_pairs(shared_data, val_fraction=0.25, split_axis="x", gap_px=3, seed=0, min_val_band_px=16)
  assert paired.split == "region" and not paired.simulated
  pair = paired.train_pairs[0]
  assert pair.shape == (140, 128) and pair.num_channels == 10 and pair.metadata["simulated"] is False
  assert pair.msi.min() >= -1 and pair.msi.max() <= 1 and 0 <= pair.histology.min() and pair.histology.max() <= 1
  train, val = paired.train_regions[0], paired.val_regions[0]
  assert not (train & val).any() and (val & pair.mask).sum() >= 0.2 * pair.mask.sum()
  assert np.flatnonzero(val.any(axis=0)).size >= 16
  # The preprocessor was fitted on the training region only: its channel ranges come from there.
  prep = paired.preprocessor
  assert prep.num_output_channels == 10 and prep.config.normalization == "none"
  section = datasets.load_msiflow(shared_data)
  on_train = MSIPreprocessor(config=prep.config).fit(section.msi, mask=section.tissue_mask & train)
  on_all = MSIPreprocessor(config=prep.config).fit(section.msi, mask=section.tissue_mask)
  np.testing.assert_array_equal(on_train.scale_hi, prep.scale_hi)
  assert not np.array_equal(on_all.scale_hi, prep.scale_hi)
  train_ds = paired.train_dataset(patch_size=16, batch_size=2, seed=0)
  batch = train_ds.batch(0)
  assert batch["msi"].shape == (2, 16, 16, 10) and batch["histology"].shape == (2, 16, 16, 3)
  val_set = paired.val_dataset(patch_size=16, batch_size=2).validation_set()
  assert len(val_set["position"]) >= 1
  for _, r, c in val_set["position"]:
    assert val[r : r + 16, c : c + 16].all()
