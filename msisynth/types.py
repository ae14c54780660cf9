"""The MSI image container shared by every stage.

Layout: `cube` is (height, width, channels) float32, row-major like an image: row = y, column = x.
Pixel (0, 0) has its centre at physical (0, 0) µm; pixel (r, c) at (x, y) = (c * px, r * py) µm with
(py, px) = `pixel_size_um` (see docs/architecture.md for the coordinate conventions of the whole library).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from msisynth import errors, geometry


@dataclasses.dataclass
class MSIImage:
  """A dense MSI image.

  Attributes:
    cube: float32 (H, W, C) intensities; 0 where a pixel was not measured.
    mz: float64 (C,) m/z of each channel, strictly increasing.
    mask: bool (H, W), True where a spectrum was measured.
    pixel_size_um: (y, x) pixel size in µm, or None when the source does not say.
    metadata: anything else the source gives (instrument, polarity, original coordinates offset, file name,
      whether the data are simulated, ...). JSON-serialisable values only.
  """

  cube: np.ndarray
  mz: np.ndarray
  mask: np.ndarray
  pixel_size_um: tuple[float, float] | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.cube = np.asarray(self.cube)
    self.mz = np.asarray(self.mz, dtype=np.float64)
    self.mask = np.asarray(self.mask, dtype=bool)
    source = self.metadata.get("source")
    if self.cube.ndim != 3:
      raise errors.DataError(f"MSI cube must be (height, width, channels), got shape {self.cube.shape}", source)
    if self.mz.shape != (self.cube.shape[2],):
      raise errors.DataError(
          f"m/z axis has shape {self.mz.shape} but the cube has {self.cube.shape[2]} channels", source)
    if self.mask.shape != self.cube.shape[:2]:
      raise errors.DataError(f"mask shape {self.mask.shape} != image shape {self.cube.shape[:2]}", source)
    if self.mz.size > 1 and not np.all(np.diff(self.mz) > 0):
      raise errors.DataError("m/z axis is not strictly increasing", source)
    if self.pixel_size_um is not None:
      try:
        self.pixel_size_um = geometry.pixel_size_yx(self.pixel_size_um, "pixel_size_um")
      except errors.ConfigError as e:
        raise errors.DataError(str(e), source) from None

  @property
  def shape(self) -> tuple[int, int]:
    """(height, width) in pixels."""
    return tuple(self.cube.shape[:2])

  @property
  def num_channels(self) -> int:
    return int(self.cube.shape[2])

  def ion_image(self, mz: float, tol: float = 0.0, tol_unit: str = "da") -> np.ndarray:
    """Sum of the channels within `mz ± tol` (Da, or ppm with tol_unit='ppm'); nearest channel when tol=0.

    Raises:
      DataError: when no channel lies in the window.
    """
    if tol_unit not in ("da", "ppm"):
      raise errors.ConfigError(f"tol_unit must be 'da' or 'ppm', got {tol_unit!r}")
    if tol == 0:
      return self.cube[..., int(np.argmin(np.abs(self.mz - mz)))]
    half = tol * mz * 1e-6 if tol_unit == "ppm" else tol
    sel = np.flatnonzero(np.abs(self.mz - mz) <= half)
    if sel.size == 0:
      raise errors.DataError(
          f"no channel within m/z {mz} ± {tol} {tol_unit} (axis spans {self.mz[0]:.4f}-{self.mz[-1]:.4f})",
          self.metadata.get("source"))
    return self.cube[..., sel].sum(axis=-1)

  def tic_image(self, quantile: float = 99.0) -> np.ndarray:
    """The total ion count image scaled to [0, 1] by its `quantile`-th percentile over the measured pixels.

    Returns:
      (H, W) float32 in [0, 1] (the sum of every channel per pixel, divided by the percentile, clipped).
    """
    tic = np.asarray(self.cube, np.float64).sum(axis=-1)
    top = float(np.percentile(tic[self.mask], quantile)) if self.mask.any() else float(tic.max())
    return np.clip(tic / max(top, 1e-12), 0, 1).astype(np.float32)

  def select_mz(self, indices) -> MSIImage:
    """A new MSIImage with only the given channels (indices or boolean mask)."""
    return dataclasses.replace(self, cube=self.cube[..., indices], mz=self.mz[indices])
