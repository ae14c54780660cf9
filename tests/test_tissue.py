"""Tests of msisynth.tissue: the crop of a whole slide to its tissue."""

import numpy as np
import pytest
from scipy import ndimage

from msisynth import errors, tissue
from msisynth.geometry import transforms as tf


@pytest.fixture
def rng():
  return np.random.default_rng(0)


STAIN = np.array([0.7, 0.35, 0.65])  # transmission of an H&E-like stain at full strength


def _slide(rng, shape, pieces, *, strength=1.0, background=(0.96, 0.96, 0.95), artefacts=True):
  """A slide with tissue disks (row, col, radius) and, optionally, a label, pen lines, debris and a dark edge."""
  height, width = shape
  yy, xx = np.mgrid[0:height, 0:width]
  bg = np.asarray(background)
  rgb = np.broadcast_to(bg, (height, width, 3)) + rng.normal(0, 0.01, (height, width, 3))
  truth = np.zeros(shape, bool)
  for r, c, radius in pieces:
    disk = (yy - r) ** 2 + (xx - c) ** 2 < radius**2
    texture = STAIN ** (strength * rng.uniform(0.6, 1.0, (int(disk.sum()), 1)))
    rgb[disk] = bg * texture
    truth |= disk
  if artefacts:
    # A label: a white sticker with black text bars (with colour fringes) in the lower left corner.
    rgb[height - 40 : height - 8, 20:120] = 0.98
    for c in range(28, 110, 10):
      rgb[height - 34 : height - 14, c : c + 4] = 0.05
      rgb[height - 34 : height - 14, c - 1] = [0.6, 0.1, 0.1]
      rgb[height - 34 : height - 14, c + 4] = [0.1, 0.1, 0.6]
    # Pen: a blue and a green line across the slide, 5 px wide, one crossing the tissue.
    for colour, row in (([0.15, 0.25, 0.75], height // 3), ([0.1, 0.55, 0.2], pieces[0][0])):
      line = np.abs(yy - row - 0.1 * (xx - width / 2)) < 2.5
      rgb[line & ~truth] = colour
    # Debris: dark specks.
    for _ in range(30):
      r, c = rng.integers(0, height), rng.integers(0, width)
      rgb[r : r + 3, c : c + 3] = [0.3, 0.25, 0.2]
    # A dark slide edge along the left.
    ramp = np.clip(1 - xx / 12.0, 0, 1)[..., None]
    rgb = rgb * (1 - 0.9 * ramp)
  return np.clip(rgb, 0, 1).astype(np.float32), truth


def _box_holds(crop, truth):
  r0, c0, r1, c1 = crop.box_px
  return truth[r0:r1, c0:c1].sum() / truth.sum()


def test_tiny_tissue_on_large_slide(rng):
  # One section of 0.6 % of a 768 x 1024 slide, with a label, pen lines, debris and a dark edge.
  pieces = [(300, 700, 35)]
  rgb, truth = _slide(rng, (768, 1024), pieces)
  assert truth.mean() < 0.01
  crop = tissue.tissue_crop(rgb, pixel_size_um=2.0)
  assert _box_holds(crop, truth) == 1.0
  assert crop.shape[0] * crop.shape[1] < 0.02 * truth.size  # labels, pen, debris and edge are left out
  assert crop.components == 1
  assert (crop.mask & ~truth).sum() < 0.2 * truth.sum()  # the pen lines through the section are cut off
  r0, c0, _, _ = crop.box_px
  assert crop.origin_um == (2.0 * c0, 2.0 * r0)
  dice = 2 * (crop.mask & truth).sum() / (crop.mask.sum() + truth.sum())
  assert dice > 0.9


@pytest.mark.parametrize("strength", [0.3, 0.15])
def test_pale_tissue(rng, strength):
  rgb, truth = _slide(rng, (384, 512), [(200, 300, 40)], strength=strength, background=(0.8, 0.86, 0.83))
  crop = tissue.tissue_crop(rgb)
  assert _box_holds(crop, truth) == 1.0
  assert crop.shape[0] * crop.shape[1] < 0.1 * truth.size


def test_several_pieces(rng):
  pieces = [(150, 200, 40), (170, 330, 30), (300, 260, 25)]
  rgb, truth = _slide(rng, (512, 640), pieces)
  crop = tissue.tissue_crop(rgb)
  assert crop.components == 3
  assert _box_holds(crop, truth) == 1.0
  _, count = ndimage.label(crop.mask)
  assert count == 3
  one = tissue.tissue_crop(rgb, max_components=1)
  assert one.components == 1 and one.mask[150, 200] and not one.mask[300, 260]


def test_margin_and_summary(rng):
  rgb, truth = _slide(rng, (256, 256), [(128, 128, 30)], artefacts=False)
  crop = tissue.tissue_crop(rgb, pixel_size_um=(1.0, 2.0), margin_um=10.0)
  r0, c0, r1, c1 = crop.box_px
  rows, cols = np.nonzero(crop.mask)
  assert rows.min() - r0 == 10 and cols.min() - c0 == 5  # 10 µm: 10 rows of 1 µm, 5 columns of 2 µm
  assert r1 - 1 - rows.max() == 10 and c1 - 1 - cols.max() == 5
  summary = crop.summary()
  assert summary["box_px"] == [r0, c0, r1, c1] and summary["crop_shape"] == [r1 - r0, c1 - c0]
  assert crop.crop(rgb).shape == (r1 - r0, c1 - c0, 3)
  np.testing.assert_array_equal(crop.mask_crop, crop.mask[r0:r1, c0:c1])
  with pytest.raises(errors.ConfigError):
    crop.crop(rgb[:10])


def test_uncrop_transform_maps_slide_points_like_crop_points(rng):
  rgb, _ = _slide(rng, (256, 320), [(150, 200, 30)], artefacts=False)
  crop = tissue.tissue_crop(rgb, pixel_size_um=1.5)
  on_crop = tf.AffineTransform.from_linear([[0.9, -0.2], [0.25, 1.1]], [12.0, -7.0])
  on_slide = crop.uncrop_transform(on_crop)
  # A point at crop µm p is at slide µm p + origin; both transforms send it to the same moving point.
  points = np.array([[0.0, 0.0], [30.0, 45.0], [-5.0, 80.0]])
  np.testing.assert_allclose(
    np.asarray(on_slide.apply(points + np.asarray(crop.origin_um))), np.asarray(on_crop.apply(points)), atol=1e-3
  )


def test_errors(rng):
  with pytest.raises(errors.DataError, match="no tissue"):
    tissue.tissue_crop(np.ones((64, 64, 3), np.float32))
  rgb, _ = _slide(rng, (64, 64), [(32, 32, 12)], artefacts=False)
  with pytest.raises(errors.ConfigError):
    tissue.tissue_crop(rgb, pixel_size_um=0)
  with pytest.raises(errors.ConfigError):
    tissue.tissue_crop(rgb, mask=np.ones((10, 10), bool))
  with pytest.raises(errors.ConfigError):
    tissue.tissue_crop(rgb, margin_um=-1)
  with pytest.raises(errors.ConfigError):
    tissue.tissue_components(np.ones((4, 4, 4), bool))
