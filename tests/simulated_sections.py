"""Semi-synthetic sections shared by the pipeline, batch and deformable tests.

A section is a crop of a shipped real H&E scan (downsampled to 5 µm and read as 15 µm pixels) with MSI simulated
from it (`msisynth.simulate`) under a known shift, optionally mirrored, and written as imzML beside the H&E. An
untrained generator cannot align anything, so accuracy is checked with `perfect_synthesizer`: the known H&E
resampled on the MSI grid (the pipeline takes any callable). Every section has the same shapes and the
registration runs one pyramid level with few steps, so that it compiles once for the whole test session.
"""

import json
import pathlib

import numpy as np

from msisynth import geometry, simulate
from msisynth import io as msi_io
from msisynth.geometry.transforms import AffineTransform, warp_image
from msisynth.register import optimize
from msisynth.types import MSIImage

HE_PX, MSI_PX = 15.0, 60.0
CROP = (84, 112)
READ = {"bin_width": 1.0, "bin_unit": "da", "progress": False}
# One level, all 12 starts (4 rotations and 2 principal-axes angles, each with and without a mirror) kept: quick
# to compile and run on a CPU.
REGISTRATION = optimize.RegistrationConfig(levels=1, max_iterations=40, max_samples=2048, num_candidates=12)
SHIFT_UM = (90.0, 70.0)


def he_crop(shared_data: pathlib.Path, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
  """A CROP-sized piece of the shipped H&E scan rcc-UH9905_18, downsampled 5×, from pixel `offset` (row, col)."""
  he = msi_io.read_histology(shared_data / "he" / "rcc-UH9905_18.png")
  he = np.clip(msi_io.resample_to_pixel_size(he, 1.0, 5.0), 0.0, 1.0)
  return he[offset[0] : offset[0] + CROP[0], offset[1] : offset[1] + CROP[1]]


def write_section(
  folder: pathlib.Path, he: np.ndarray, *, mirrored: bool = False, seed: int = 0, n_landmarks: int = 12
) -> simulate.SimulatedMSI:
  """Simulates MSI from `he` (at HE_PX) under a shift of SHIFT_UM (after a mirror about the centre if `mirrored`)
  and saves the section (imzML, he.png, ground_truth.json, landmarks.csv) into `folder`."""
  transform = AffineTransform.from_linear(np.eye(2), SHIFT_UM)
  if mirrored:
    centre = ((he.shape[1] - 1) * HE_PX / 2, (he.shape[0] - 1) * HE_PX / 2)
    transform = transform.compose(AffineTransform.mirror("x", centre))
  sim = simulate.simulate_msi(
    seed, he, histology_pixel_size_um=HE_PX, msi_pixel_size_um=MSI_PX, n_channels=8, misalignment=transform,
    n_landmarks=n_landmarks,
  )
  simulate.save_simulated(sim, folder)
  return sim


def perfect_synthesizer(msi: MSIImage, upsample: int = 1) -> np.ndarray:
  """The H&E beside the imzML, resampled through the ground truth (white outside) on the MSI grid, or on that grid
  upsampled by `upsample` (((H - 1)·u + 1, (W - 1)·u + 1) pixels of MSI pixel / u, as a generator trained on
  upsampled pairs returns)."""
  folder = pathlib.Path(msi.metadata["source"]).parent
  truth = json.loads((folder / "ground_truth.json").read_text())
  he = msi_io.read_histology(folder / "he.png")
  transform = AffineTransform.from_matrix(truth["transform_fixed_to_moving"])
  rgb = warp_image(
    he,
    transform.inverse(),
    geometry.upsampled_shape(msi.shape, upsample),
    fixed_pixel_size_um=np.asarray(truth["msi_pixel_size_um"], np.float64) / upsample,
    moving_pixel_size_um=truth["histology_pixel_size_um"],
    cval=1.0,
  )
  return np.clip(np.asarray(rgb), 0.0, 1.0)
