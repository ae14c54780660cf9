"""The real-pair registration helpers of `msisynth.evaluation.bladder` on tiny cases (and on msight when present)."""

import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi

from msisynth import errors
from msisynth.evaluation import bladder
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import optimize
from msisynth.types import MSIImage


def _tiny_msi(seed=0, shape=(10, 12), channels=6):
  rng = np.random.default_rng(seed)
  pattern = np.zeros(shape)
  pattern[:, shape[1] // 2 :] = 1.0
  base = rng.uniform(0.5, 1.0, channels)
  cube = base * (1 + 0.8 * pattern[..., None] * np.eye(channels)[0]) + 0.01 * rng.random((*shape, channels))
  mask = np.ones(shape, bool)
  mask[0, 0] = False
  cube[~mask] = 0
  return MSIImage(cube=cube.astype(np.float32), mz=np.arange(channels) + 100.0, mask=mask, pixel_size_um=(4.0, 4.0))


def test_msi_images_are_scaled_and_filled():
  msi = _tiny_msi()
  images = bladder.msi_images(msi, n_components=3)
  assert sorted(images) == ["pc1", "pc2", "pc3", "tic"]
  for image in images.values():
    assert image.shape == (10, 12) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image[0, 0] == pytest.approx(np.median(image[msi.mask]), abs=1e-6)
  # The planted left/right difference is the first component.
  pc1 = images["pc1"]
  assert abs(pc1[:, :6][msi.mask[:, :6]].mean() - pc1[:, 6:].mean()) > 0.5


def test_msi_images_refuse_an_empty_msi():
  msi = _tiny_msi()
  empty = MSIImage(cube=np.zeros_like(msi.cube), mz=msi.mz, mask=msi.mask, pixel_size_um=(4.0, 4.0))
  with pytest.raises(errors.DataError):
    bladder.msi_images(empty)


def test_landmark_distance_in_msi_pixels():
  shift = AffineTransform.from_matrix(np.array([[1.0, 0, 50.0], [0, 1.0, 0.0], [0, 0, 1]]))
  landmarks = np.array([[0.0, 0.0, 50.0, 0.0], [10.0, 10.0, 60.0, 35.0]])
  np.testing.assert_allclose(bladder.landmark_distance_msi_px(shift, landmarks, 25.0), [0.0, 1.0], atol=1e-5)


def test_ridge_image_recovers_a_linear_map():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(20, 20, 4)).astype(np.float32)
  target = 0.5 + 0.1 * features[..., 0] - 0.05 * features[..., 2]
  mask = np.ones((20, 20), bool)
  out = bladder.ridge_image(features, mask, target, mask, ridge=1e-6)
  np.testing.assert_allclose(out, np.clip(target, 0, 1), atol=1e-4)


def test_histology_on_msi_grid_follows_the_transform():
  he = np.zeros((40, 40), np.float32)
  he[:, 20:] = 1.0
  identity = AffineTransform.identity()
  sampled, inside = bladder.histology_on_msi_grid(he, identity, (10, 10), histology_pixel_size_um=1.0,
                                                  msi_pixel_size_um=4.0)  # fmt: skip
  assert sampled.shape == (10, 10, 1) and inside.all()
  assert sampled[:, :4, 0].max() < 0.2 and sampled[:, 6:, 0].min() > 0.8


def test_iterative_ridge_registration_runs_and_moves_toward_the_truth():
  rng = np.random.default_rng(2)
  grey = ndi.gaussian_filter(rng.random((128, 128)), 5.0)
  grey = (grey - grey.min()) / np.ptp(grey)
  he = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
  # The MSI: 32 × 32 pixels of 4 µm on the same field; channels are nonlinear functions of the grey level.
  g = grey.reshape(32, 4, 32, 4).mean(axis=(1, 3))
  cube = np.stack([1 + g, 2 - g, 1 + g**2, 1 + (1 - g) ** 2, 1 + 0.05 * rng.random(g.shape)], axis=-1)
  msi = MSIImage(cube=cube.astype(np.float32), mz=np.arange(5) + 100.0, mask=np.ones(g.shape, bool),
                 pixel_size_um=(4.0, 4.0))  # fmt: skip
  # MSI pixel j is the mean of histology pixels 4j..4j+3 (centre 4j + 1.5 µm): histology µm → MSI µm is x - 1.5.
  truth = np.array([[1.0, 0, -1.5], [0, 1.0, -1.5], [0, 0, 1]])
  start = truth.copy()
  start[:2, 2] += (6.0, -4.0)
  config = optimize.RegistrationConfig(kind="rigid", working_pixel_size_um=2.0, max_iterations=40)
  result, history = bladder.register_iterative_ridge(he, msi, AffineTransform.from_matrix(start),
                                                     histology_pixel_size_um=1.0, n_components=4, iterations=2,
                                                     config=config)  # fmt: skip
  assert len(history) == 2 and result.transform is history[-1]
  found = np.asarray(result.transform.matrix, np.float64)
  assert np.linalg.norm(found[:2, 2] - truth[:2, 2]) < 0.5 * np.linalg.norm(start[:2, 2] - truth[:2, 2])


@pytest.fixture(scope="module")
def msight_rigid_tic():
  """The real msight pair registered by the measured route `rigid/tic` (H&E reduced 4×, to keep it quick)."""
  from msisynth import datasets

  try:
    datasets.msight_bladder_dir(download=False)
  except errors.DataError as e:
    pytest.skip(str(e))
  section, _ = bladder.load_section(he_reduce=4)
  image = bladder.msi_images(section.msi, n_components=1)["tic"]
  config = optimize.RegistrationConfig(flips_and_rot90=True, kind="rigid",
                                       working_pixel_size_um=section.histology_pixel_size_um)  # fmt: skip
  kwargs = dict(histology_pixel_size_um=section.histology_pixel_size_um, msi_pixel_size_um=section.msi.pixel_size_um,
                msi_mask=section.msi.mask, config=config)  # fmt: skip
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # the verdict's "registration failed" (checked below)
    result = optimize.register_msi_to_histology(section.he, image, **kwargs)
  distance = bladder.landmark_distance_msi_px(result.transform, section.landmarks, 25.0).mean()
  return result, float(distance)


def test_msight_route_that_misses_the_landmarks_says_it_failed(msight_rigid_tic):
  """The rigid TIC route lands 26-30 MSI px from the landmarks (docs/results.md, "Real pairs"); the
  registration's own verdict must not call that a success."""
  result, distance = msight_rigid_tic
  assert distance > 7.0
  assert not result.success


@pytest.mark.xfail(strict=True, reason="no route reaches the 7 MSI px target on msight (docs/results.md, Real pairs)")
def test_msight_route_reaches_7_msi_px_at_the_landmarks(msight_rigid_tic):
  _, distance = msight_rigid_tic
  assert distance <= 7.0
