"""Paired MSI/histology data for training: pairs on one grid, spatial splits, patch sampling and augmentation.

Layout. A `Pair` holds the network input `msi` (H, W, k) float32 in [-1, 1] (the output of a fitted
`MSIPreprocessor`; unmeasured pixels are -1), the target `histology` (H, W, 3) float32 in [0, 1] resampled onto
the same grid, and `mask` (H, W) bool, True where the pixel is tissue and was measured. Batches are NHWC float32:
`msi` (B, P, P, k) in [-1, 1], `histology` (B, P, P, 3) in [-1, 1] (the generator's tanh range) and `mask`
(B, P, P, 1) in {0, 1}.

Determinism. `PatchDataset.batch(step)` draws from `np.random.default_rng([seed, step])` only, so the batch at
step n is a function of (seed, n): a resumed run sees exactly the batches an uninterrupted run would.

Splits. Either a spatial hold-out inside one image (`split_regions`: a band of the image for validation, a gap
of `gap_px` pixels between it and the training region) or different sections/slides for training and validation.
A patch is only drawn where its whole footprint lies inside its region, so with disjoint regions no training patch
overlaps a validation patch. `PairedData` carries both kinds in one form: a list of training pairs with their
regions and a list of validation pairs with theirs (the same Pair in both lists for a spatial split).

Coordinates follow docs/architecture.md: pixel (r, c) has its centre at (x, y) = (c·px, r·py) µm, transforms map
histology (fixed) µm → MSI (moving) µm.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from msisynth import datasets, errors, geometry, progress, simulate
from msisynth import io as msi_io
from msisynth.geometry import upsample_grid
from msisynth.geometry.transforms import AffineTransform, warp_image
from msisynth.preprocess import MSIPreprocessor
from msisynth.types import MSIImage

# The eight symmetries of the square: k quarter turns, then an optional left-right flip.
NUM_AUGMENTATIONS = 8


@dataclasses.dataclass
class Pair:
  """An MSI image and its histology on one grid.

  Attributes:
    name: a name for reports (slide or section).
    msi: (H, W, k) float32 network input in [-1, 1]; -1 where nothing was measured.
    histology: (H, W, 3) float32 target in [0, 1].
    mask: (H, W) bool, True for measured tissue pixels.
    metadata: "simulated" (bool), "pixel_size_um" ((y, x) of this grid), "source", and how the pair was made.
  """

  name: str
  msi: np.ndarray
  histology: np.ndarray
  mask: np.ndarray
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.msi = np.asarray(self.msi, dtype=np.float32)
    self.histology = np.asarray(self.histology, dtype=np.float32)
    self.mask = np.asarray(self.mask, dtype=bool)
    if self.msi.ndim != 3 or self.histology.ndim != 3 or self.histology.shape[2] != 3:
      raise errors.ConfigError(
        f"pair {self.name!r}: msi must be (H, W, k) and histology (H, W, 3), got {self.msi.shape} and "
        f"{self.histology.shape}"
      )
    if self.msi.shape[:2] != self.histology.shape[:2] or self.mask.shape != self.msi.shape[:2]:
      raise errors.ConfigError(
        f"pair {self.name!r}: msi {self.msi.shape}, histology {self.histology.shape} and mask {self.mask.shape} "
        "are not on one grid"
      )
    self.metadata.setdefault("simulated", False)

  @property
  def shape(self) -> tuple[int, int]:
    """(H, W) of the grid, pixels."""
    return tuple(self.mask.shape)

  @property
  def num_channels(self) -> int:
    return int(self.msi.shape[2])


def make_pair(
  msi_input: np.ndarray,
  histology: np.ndarray,
  *,
  transform: AffineTransform | None = None,
  msi_pixel_size_um: float | Sequence[float],
  histology_pixel_size_um: float | Sequence[float],
  upsample: int = 1,
  msi_mask: np.ndarray | None = None,
  tissue_mask: np.ndarray | None = None,
  histology_mask: np.ndarray | None = None,
  msi_interpolation: str = "bilinear",
  fill_value: float = 1.0,
  name: str = "",
  metadata: dict[str, Any] | None = None,
) -> Pair:
  """Puts preprocessed MSI and its histology on one grid: the MSI grid, optionally upsampled.

  The target grid has pixel size `msi_pixel_size_um / upsample` and its pixel (0, 0) centred on MSI pixel (0, 0):
  for an (H, W) MSI it is ((H - 1)·u + 1, (W - 1)·u + 1) pixels (see `upsample_grid`). The MSI is interpolated
  onto it (`msi_interpolation`); the histology is low-pass filtered to the target pixel size (Gaussian of σ = 0.4 ×
  the ratio of the target pixel, seen in the histology, to the histology pixel, when that ratio exceeds 1) and
  resampled bilinearly at T⁻¹(x) with `warp_image`.

  Args:
    msi_input: (H, W, k) float network input in [-1, 1] (a fitted `MSIPreprocessor`'s output).
    histology: (Hh, Wh, 3) float RGB in [0, 1].
    transform: histology (fixed) µm → MSI (moving) µm, as `register` and `simulate_msi` give; None for the
      identity (both images' pixel (0, 0) centres at the origin).
    msi_pixel_size_um: MSI pixel size, float or (y, x).
    histology_pixel_size_um: histology pixel size, float or (y, x).
    upsample: integer factor u >= 1 between the MSI pixel and the pair's pixel.
    msi_mask: (H, W) bool, True where the MSI was measured; None for all.
    tissue_mask: (H, W) bool tissue mask on the MSI grid.
    histology_mask: (Hh, Wh) bool tissue mask on the histology grid (used when tissue_mask is None).
    msi_interpolation: "bilinear" or "nearest" upsampling of the MSI.
    fill_value: histology value where the MSI grid lies outside the histology (1 = white, an H&E background).
    name: the pair's name.
    metadata: extra metadata ("simulated", "source", ...), merged into the pair's.

  Returns:
    The Pair; its mask is tissue & measured & inside the histology. Without any tissue mask, tissue is found by
    `msisynth.simulate.he_tissue_mask` on the resampled histology (H&E only).

  Raises:
    ConfigError: for mismatched shapes, bad pixel sizes or factors.
    DataError: when the MSI input is not finite or not in [-1, 1].
  """
  msi_input = np.asarray(msi_input, dtype=np.float32)
  histology = np.asarray(histology, dtype=np.float32)
  where = f"pair {name!r}: " if name else ""
  if msi_input.ndim != 3:
    raise errors.ConfigError(f"{where}msi_input must be (H, W, k), got shape {msi_input.shape}")
  if histology.ndim != 3 or histology.shape[2] != 3:
    raise errors.ConfigError(f"{where}histology must be (H, W, 3), got shape {histology.shape}")
  if not np.all(np.isfinite(msi_input)) or msi_input.min() < -1.001 or msi_input.max() > 1.001:
    raise errors.DataError(
      f"{where}msi_input must be finite and in [-1, 1] (preprocess it first), got range "
      f"[{np.nanmin(msi_input):.3g}, {np.nanmax(msi_input):.3g}]"
    )
  if not np.all(np.isfinite(histology)) or histology.min() < 0 or histology.max() > 1:
    raise errors.DataError(f"{where}histology must be finite and in [0, 1]")
  msi_px = geometry.pixel_size_yx(msi_pixel_size_um, "msi_pixel_size_um")
  hist_px = geometry.pixel_size_yx(histology_pixel_size_um, "histology_pixel_size_um")
  upsample = geometry.check_upsample(upsample)
  msi_shape = msi_input.shape[:2]
  for label, m in (("msi_mask", msi_mask), ("tissue_mask", tissue_mask)):
    if m is not None and np.shape(m) != msi_shape:
      raise errors.ConfigError(f"{where}{label} has shape {np.shape(m)}, the MSI grid is {msi_shape}")
  if histology_mask is not None and np.shape(histology_mask) != histology.shape[:2]:
    raise errors.ConfigError(
      f"{where}histology_mask has shape {np.shape(histology_mask)}, the histology is {histology.shape[:2]}"
    )
  if transform is None:
    transform = AffineTransform.identity()
  elif not isinstance(transform, AffineTransform):
    raise errors.ConfigError(f"{where}transform must be an AffineTransform or None, got {type(transform).__name__}")

  target = geometry.Grid(msi_shape, msi_px).upsampled(upsample)
  target_px, target_shape = target.pixel_size_um, target.shape
  msi = np.clip(upsample_grid(msi_input, upsample, msi_interpolation), -1, 1).astype(np.float32)

  measured = np.ones(msi_shape, bool) if msi_mask is None else np.asarray(msi_mask, bool)
  if msi_interpolation == "bilinear" and upsample > 1:
    # A pixel counts as measured only when every MSI pixel it interpolates from was measured.
    measured_up = upsample_grid(measured.astype(np.float32), upsample, "bilinear") > 1 - 1e-4
  else:
    measured_up = upsample_grid(measured, upsample, "nearest")

  # Low-pass the histology to the target pixel size, then resample it at T^-1(x).
  to_histology = transform.inverse()
  linear = np.asarray(to_histology.linear, np.float64)
  step_um = np.abs(linear) @ np.array([target_px[1], target_px[0]])  # A target pixel step, seen in histology µm.
  ratio = step_um / np.array([hist_px[1], hist_px[0]])
  sigma = [0.4 * ratio[1] if ratio[1] > 1 else 0.0, 0.4 * ratio[0] if ratio[0] > 1 else 0.0, 0.0]
  smoothed = ndimage.gaussian_filter(histology, sigma, mode="nearest") if max(sigma) > 0 else histology
  kwargs = dict(fixed_pixel_size_um=target_px, moving_pixel_size_um=hist_px)
  # A fourth channel of ones comes out 1 exactly where the sample lies inside the histology and 0 outside.
  stacked = np.concatenate([smoothed, np.ones(histology.shape[:2] + (1,), np.float32)], axis=-1)
  warped = np.asarray(warp_image(stacked, to_histology, target_shape, order=1, cval=0.0, **kwargs))
  inside = warped[..., 3] > 0.5
  resampled = np.where(inside[..., None], np.clip(warped[..., :3], 0, 1), np.float32(fill_value)).astype(np.float32)

  if tissue_mask is not None:
    tissue = upsample_grid(np.asarray(tissue_mask, bool), upsample, "nearest")
  elif histology_mask is not None:
    tissue = np.asarray(
      warp_image(np.asarray(histology_mask, np.uint8), to_histology, target_shape, order=0, **kwargs)
    ).astype(bool)
  else:
    tissue = simulate.he_tissue_mask(resampled)

  info = {
    "simulated": False,
    "pixel_size_um": list(target_px),
    "msi_pixel_size_um": list(msi_px),
    "histology_pixel_size_um": list(hist_px),
    "upsample": upsample,
    "transform_fixed_to_moving": np.asarray(transform.matrix, np.float64).tolist(),
    "source": name,
  }
  info.update(metadata or {})
  return Pair(name=name, msi=msi, histology=resampled, mask=tissue & measured_up & inside, metadata=info)


def split_regions(
  mask_shape: Sequence[int],
  *,
  val_fraction: float = 0.2,
  axis: str = "auto",
  gap_px: int = 4,
  seed: int = 0,
  tissue_mask: np.ndarray | None = None,
  min_band_px: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """A spatial hold-out: a band of the image for validation, the rest (minus a gap) for training.

  The band spans the whole image across `axis` and holds `val_fraction` of the image's columns (axis "x") or rows
  (axis "y"), or of its tissue pixels when `tissue_mask` is given, and is at least `min_band_px` thick (so that
  validation patches of that size fit in it); its position is drawn from `seed`. `gap_px`
  pixels on each side of the band belong to neither region, so that the correlation the point spread brings
  between neighbouring pixels does not cross the split.

  Args:
    mask_shape: (H, W) of the grid.
    val_fraction: share of the image (or of the tissue) in the validation band, in [0, 1).
    axis: "x" (a band of columns), "y" (a band of rows) or "auto" (along the longer side).
    gap_px: pixels left out on each side of the band.
    seed: seed of the band position.
    tissue_mask: optional (H, W) bool mask whose pixels the fraction counts.
    min_band_px: least thickness of the band, pixels.

  Returns:
    (train_mask, val_mask): disjoint (H, W) bool masks. val_mask is all False for val_fraction 0.

  Raises:
    ConfigError: for a bad fraction, axis or gap, or when a region would be empty.
  """
  if len(mask_shape) < 2:
    raise errors.ConfigError(f"mask_shape must be (H, W), got {mask_shape!r}")
  height, width = int(mask_shape[0]), int(mask_shape[1])
  if not 0 <= val_fraction < 1:
    raise errors.ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}")
  if gap_px < 0:
    raise errors.ConfigError(f"gap_px must be >= 0, got {gap_px}")
  if axis == "auto":
    axis = "x" if width >= height else "y"
  if axis not in ("x", "y"):
    raise errors.ConfigError(f"axis must be 'x', 'y' or 'auto', got {axis!r}")
  train = np.ones((height, width), bool)
  val = np.zeros((height, width), bool)
  if val_fraction == 0:
    return train, val
  weights = np.ones((height, width)) if tissue_mask is None else np.asarray(tissue_mask, bool).astype(np.float64)
  if weights.shape != (height, width):
    raise errors.ConfigError(f"tissue_mask has shape {weights.shape}, expected {(height, width)}")
  profile = weights.sum(axis=0 if axis == "x" else 1)
  length = len(profile)
  cumulative = np.concatenate([[0.0], np.cumsum(profile)])
  target = val_fraction * cumulative[-1]
  if target <= 0:
    raise errors.ConfigError("the tissue mask is empty: there is nothing to split")
  # For each start s the shortest band [s, e) holding the target share; starts whose band fits are candidates.
  ends = np.searchsorted(cumulative, cumulative[:-1] + target - 1e-9, side="left")
  ends = np.maximum(ends, np.arange(length) + max(int(min_band_px), 1))
  starts = np.flatnonzero(ends <= length)
  if starts.size == 0:
    raise errors.ConfigError(f"a {min_band_px}-pixel band does not fit in a {height}×{width} grid along {axis}")
  rng = np.random.default_rng(seed)
  start = int(rng.choice(starts))
  end = int(ends[start])
  band = np.zeros(length, bool)
  band[start:end] = True
  excluded = np.zeros(length, bool)
  excluded[max(0, start - gap_px) : min(length, end + gap_px)] = True
  if axis == "x":
    val[:, band] = True
    train[:, excluded] = False
  else:
    val[band] = True
    train[excluded] = False
  if not train.any():
    raise errors.ConfigError(
      f"no training region left for a {val_fraction} validation band with a {gap_px}-pixel gap on a "
      f"{height}×{width} grid"
    )
  return train, val


def _dihedral(image: np.ndarray, op: int) -> np.ndarray:
  """One of the 8 symmetries of the square on the two leading (spatial) axes."""
  out = np.rot90(image, k=op % 4, axes=(0, 1))
  if op >= 4:
    out = out[:, ::-1]
  return out


class PatchDataset:
  """Square patches of pairs, drawn inside tissue and inside each pair's allowed region.

  A top-left position (r, c) of pair i is valid when the patch [r, r + P) × [c, c + P) lies entirely inside the
  image and inside the pair's region, and at least `min_tissue_fraction` of its pixels are in the pair's mask.
  Training batches draw valid positions uniformly (over all pairs together) and one of the 8 symmetries of the
  square per patch, applied identically to the MSI, the histology and the mask.
  """

  def __init__(
    self,
    pairs: Sequence[Pair],
    *,
    patch_size: int,
    batch_size: int,
    seed: int,
    region_masks: Sequence[np.ndarray | None] | None = None,
    augment: bool = True,
    min_tissue_fraction: float = 0.5,
  ):
    """Indexes the valid patch positions.

    Args:
      pairs: the pairs (all with the same number of MSI channels).
      patch_size: patch side P, pixels.
      batch_size: patches per batch B.
      seed: seed of the sampling; `batch(step)` depends on (seed, step) only.
      region_masks: per pair an (H, W) bool mask of where patches may lie, or None for the whole image.
      augment: apply random flips and quarter turns in `batch`.
      min_tissue_fraction: least share of mask pixels in a patch, in [0, 1].

    Raises:
      ConfigError: for bad sizes, mismatched channels or regions, an image smaller than the patch, or when no
        valid patch position exists.
    """
    pairs = list(pairs)
    if not pairs:
      raise errors.ConfigError("PatchDataset needs at least one pair")
    if int(patch_size) != patch_size or patch_size < 1 or int(batch_size) != batch_size or batch_size < 1:
      raise errors.ConfigError(f"patch_size and batch_size must be positive integers, got {patch_size}, {batch_size}")
    if not 0 <= min_tissue_fraction <= 1:
      raise errors.ConfigError(f"min_tissue_fraction must lie in [0, 1], got {min_tissue_fraction}")
    channels = {p.num_channels for p in pairs}
    if len(channels) != 1:
      raise errors.ConfigError(f"pairs have different numbers of MSI channels: {sorted(channels)}")
    if region_masks is None:
      region_masks = [None] * len(pairs)
    region_masks = list(region_masks)
    if len(region_masks) != len(pairs):
      raise errors.ConfigError(f"{len(region_masks)} region masks for {len(pairs)} pairs")
    self.pairs = pairs
    self.patch_size = int(patch_size)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.augment = bool(augment)
    self.min_tissue_fraction = float(min_tissue_fraction)
    self.region_masks = []
    self._valid = []
    for pair, region in zip(pairs, region_masks):
      if min(pair.shape) < self.patch_size:
        raise errors.ConfigError(
          f"pair {pair.name!r} is {pair.shape[0]}×{pair.shape[1]} pixels, smaller than the {self.patch_size}-pixel "
          "patch"
        )
      region = np.ones(pair.shape, bool) if region is None else np.asarray(region, bool)
      if region.shape != pair.shape:
        raise errors.ConfigError(f"pair {pair.name!r}: region mask {region.shape} != image {pair.shape}")
      self.region_masks.append(region)
      self._valid.append(self._valid_positions(pair.mask, region))
    self._counts = np.array([v.sum() for v in self._valid], np.int64)
    if self._counts.sum() == 0:
      raise errors.ConfigError(
        f"no {self.patch_size}-pixel patch lies inside the allowed regions with at least "
        f"{self.min_tissue_fraction:.0%} tissue in pairs {[p.name for p in pairs]}; use smaller patches, a lower "
        "min_tissue_fraction or larger regions"
      )
    self._flat = [np.flatnonzero(v) for v in self._valid]
    self._offsets = np.concatenate([[0], np.cumsum(self._counts)])

  def _valid_positions(self, mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(H - P + 1, W - P + 1) bool: top-left corners of valid patches, by summed-area tables."""
    p = self.patch_size

    def window_sums(a):
      s = np.pad(np.cumsum(np.cumsum(a.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
      return s[p:, p:] - s[:-p, p:] - s[p:, :-p] + s[:-p, :-p]

    inside_region = window_sums(region) == p * p
    # At least one tissue pixel even with min_tissue_fraction = 0: a patch of background teaches nothing.
    enough_tissue = window_sums(mask & region) >= max(1.0, self.min_tissue_fraction * p * p - 1e-9)
    return inside_region & enough_tissue

  @property
  def num_positions(self) -> int:
    """Number of valid patch positions over all pairs."""
    return int(self._counts.sum())

  @property
  def num_channels(self) -> int:
    return self.pairs[0].num_channels

  def valid_positions(self, index: int) -> np.ndarray:
    """(N, 2) top-left (row, col) of every valid patch of pair `index`."""
    return np.argwhere(self._valid[index])

  def _extract(self, index: int, row: int, col: int, op: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pair, p = self.pairs[index], self.patch_size
    window = (slice(row, row + p), slice(col, col + p))
    return (_dihedral(pair.msi[window], op), _dihedral(pair.histology[window], op), _dihedral(pair.mask[window], op))

  def _stack(self, patches) -> dict[str, np.ndarray]:
    msi, histology, mask = zip(*patches)
    return {
      "msi": np.ascontiguousarray(np.stack(msi), np.float32),
      "histology": np.ascontiguousarray(np.stack(histology) * 2 - 1, np.float32),
      "mask": np.ascontiguousarray(np.stack(mask)[..., None], np.float32),
    }

  def sample_positions(self, step: int) -> np.ndarray:
    """(B, 4) int64 rows of (pair index, top row, left column, symmetry) of the batch at `step`."""
    if int(step) != step or step < 0:
      raise errors.ConfigError(f"step must be a non-negative integer, got {step!r}")
    rng = np.random.default_rng([self.seed, int(step)])
    flat = rng.integers(0, self.num_positions, self.batch_size)
    ops = rng.integers(0, NUM_AUGMENTATIONS, self.batch_size) if self.augment else np.zeros(self.batch_size, int)
    out = np.empty((self.batch_size, 4), np.int64)
    for b, (f, op) in enumerate(zip(flat, ops)):
      index = int(np.searchsorted(self._offsets, f, side="right") - 1)
      pos = self._flat[index][f - self._offsets[index]]
      row, col = np.unravel_index(pos, self._valid[index].shape)
      out[b] = (index, row, col, op)
    return out

  def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
    """The training batch at `step`, a function of (seed, step) only.

    Args:
      step: the training step.
      rows: only these rows of the batch (a process's share in a job of several, `msisynth.distributed`).

    Returns:
      {"msi": (B, P, P, k) float32 in [-1, 1], "histology": (B, P, P, 3) float32 in [-1, 1],
       "mask": (B, P, P, 1) float32 in {0, 1}}.

    Raises:
      ConfigError: for a negative or non-integer step.
    """
    positions = self.sample_positions(step)
    if rows is not None:
      positions = positions[rows]
    return self._stack([self._extract(int(i), int(r), int(c), int(op)) for i, r, c, op in positions])

  def tile_positions(self, stride: int | None = None) -> np.ndarray:
    """(N, 3) int64 rows of (pair index, top row, left column) of patches tiling the allowed regions.

    Rows are taken every `stride` pixels from the first row holding a valid patch; along each row, the first
    valid position, then the next valid one at least `stride` further, and so on. With the default stride (the
    patch size) the tiles do not overlap. Deterministic and free of augmentation.
    """
    stride = self.patch_size if stride is None else int(stride)
    if stride < 1:
      raise errors.ConfigError(f"stride must be >= 1, got {stride}")
    out = []
    for index, valid in enumerate(self._valid):
      rows = np.flatnonzero(valid.any(axis=1))
      if rows.size == 0:
        continue
      for row in range(int(rows[0]), valid.shape[0], stride):
        next_col = 0
        for col in np.flatnonzero(valid[row]):
          if col >= next_col:
            out.append((index, row, int(col)))
            next_col = col + stride
    return np.asarray(out, np.int64).reshape(-1, 3)

  def validation_set(self, stride: int | None = None) -> dict[str, np.ndarray]:
    """Every tile of `tile_positions(stride)` as one un-augmented set of arrays.

    Returns:
      {"msi", "histology", "mask"} as in `batch` with N patches, plus "position" (N, 3) (pair, row, col).
    """
    positions = self.tile_positions(stride)
    if len(positions) == 0:
      p, k = self.patch_size, self.num_channels
      empty = {
        "msi": np.zeros((0, p, p, k), np.float32),
        "histology": np.zeros((0, p, p, 3), np.float32),
        "mask": np.zeros((0, p, p, 1), np.float32),
      }
      return {**empty, "position": positions}
    data = self._stack([self._extract(int(i), int(r), int(c)) for i, r, c in positions])
    data["position"] = positions
    return data

  def validation_batches(
    self, batch_size: int | None = None, stride: int | None = None
  ) -> Iterator[dict[str, np.ndarray]]:
    """The validation tiles in batches of a fixed size (the last one padded), for a jitted evaluation step.

    Args:
      batch_size: patches per batch; None for this dataset's batch size.
      stride: tile stride; None for the patch size.

    Yields:
      Batches as in `batch`, plus "weight" (B,) float32: 1 for a real tile, 0 for padding.
    """
    batch_size = self.batch_size if batch_size is None else int(batch_size)
    if batch_size < 1:
      raise errors.ConfigError(f"batch_size must be >= 1, got {batch_size}")
    data = self.validation_set(stride)
    n = len(data["position"])
    for start in range(0, n, batch_size):
      chunk = {k: v[start : start + batch_size] for k, v in data.items() if k != "position"}
      real = len(chunk["msi"])
      if real < batch_size:
        chunk = {
          k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()
        }
      chunk["weight"] = (np.arange(batch_size) < real).astype(np.float32)
      yield chunk


@dataclasses.dataclass
class PairedData:
  """Pairs split for training and validation, and the preprocessor that made their MSI input.

  A spatial split lists the same Pair in both lists with disjoint regions; a split by section lists different
  pairs (regions None = whole image).

  Attributes:
    train_pairs: pairs to train on.
    train_regions: per training pair, a bool mask of where training patches may lie, or None.
    val_pairs: pairs to validate on (may be empty).
    val_regions: per validation pair, a bool mask or None.
    preprocessor: the fitted MSIPreprocessor (store `preprocessor.to_dict()` with the checkpoint).
    split: "region" (spatial hold-out), "section" (different sections) or "none".
    metadata: "simulated" (bool), "source" and the parameters that made the data.
  """

  train_pairs: list[Pair]
  train_regions: list[np.ndarray | None]
  val_pairs: list[Pair]
  val_regions: list[np.ndarray | None]
  preprocessor: MSIPreprocessor | None
  split: str
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_channels(self) -> int:
    """MSI channels k of the network input."""
    return self.train_pairs[0].num_channels

  @property
  def simulated(self) -> bool:
    return bool(self.metadata.get("simulated", False))

  def train_dataset(
    self, *, patch_size: int, batch_size: int, seed: int, augment: bool = True, min_tissue_fraction: float = 0.5
  ) -> PatchDataset:
    """The training PatchDataset over the training pairs and regions."""
    return PatchDataset(
      self.train_pairs,
      patch_size=patch_size,
      batch_size=batch_size,
      seed=seed,
      region_masks=self.train_regions,
      augment=augment,
      min_tissue_fraction=min_tissue_fraction,
    )

  def val_dataset(self, *, patch_size: int, batch_size: int, min_tissue_fraction: float = 0.5) -> PatchDataset | None:
    """A PatchDataset over the validation pairs and regions (no augmentation), or None without validation data."""
    if not self.val_pairs:
      return None
    return PatchDataset(
      self.val_pairs,
      patch_size=patch_size,
      batch_size=batch_size,
      seed=0,
      region_masks=self.val_regions,
      augment=False,
      min_tissue_fraction=min_tissue_fraction,
    )


def _spatial_split(pair_shape, *, val_fraction, axis, gap_px, seed, tissue_mask, min_band_px):
  if val_fraction <= 0:
    return None, None
  return split_regions(
    pair_shape,
    val_fraction=val_fraction,
    axis=axis,
    gap_px=gap_px,
    seed=seed,
    tissue_mask=tissue_mask,
    min_band_px=min_band_px,
  )


def msiflow_pairs(
  data_dir: str | os.PathLike | None = None,
  *,
  val_fraction: float = 0.25,
  split_axis: str = "auto",
  gap_px: int = 4,
  seed: int = 0,
  upsample: int = 1,
  min_val_band_px: int = 0,
  preprocess_config: Any | None = None,
) -> PairedData:
  """The real msiFlow pair UPEC_12: 10 MALDI ion images as input, msiFlow's registered microscopy as target.

  The MSI input is the ion images through an `MSIPreprocessor` fitted on the training region only (default: no
  normalisation, since they are already ion images; hotspots clipped at the 99th percentile; no reduction; each
  channel's 1st-99th percentile scaled to [-1, 1]). The target is the 3-channel immunofluorescence microscopy
  (autofluorescence, Ly6G, urothelium mask) registered onto the MSI grid by msiFlow; it is a peer's registration,
  not hand-checked ground truth. The mask is the tissue mask & measured pixels. One section, so the split is a
  spatial hold-out (`split_regions`, balanced on tissue); val_fraction 0 gives no validation. The tissue covers
  about 85 × 64 of the 140 × 128 pixels, so a validation band of 25 % is thin: set `min_val_band_px` to the
  patch size (divided by `upsample`) to fit validation patches. The TIFFs record no pixel size, so the pair is in
  pixel units (pixel size 1, metadata "pixel_size_known": False).

  Args:
    data_dir: the shared data folder (None: `msisynth.datasets.data_dir()`).
    val_fraction: share of the tissue in the validation band.
    split_axis: "x", "y" or "auto" (see `split_regions`).
    gap_px: pixels between the regions, on the MSI grid.
    seed: seed of the band position.
    upsample: integer factor from the MSI pixel to the pair's pixel.
    min_val_band_px: least thickness of the validation band, MSI pixels.
    preprocess_config: a `PreprocessConfig` to use instead of the default above.

  Returns:
    PairedData with one Pair (in both lists for a spatial split), split "region" or "none", the fitted
    preprocessor, and metadata {"simulated": False, "source": ...}.

  Raises:
    DataError: when the data are missing or malformed (from `msisynth.datasets.load_msiflow`).
    ConfigError: for bad split or size arguments.
  """
  from msisynth.preprocess import PreprocessConfig

  loaded = datasets.load_msiflow(data_dir)
  msi: MSIImage = loaded.msi
  tissue = np.asarray(loaded.tissue_mask, bool)
  target = np.clip(np.asarray(loaded.microscopy_registered, np.float32), 0, 1)
  train_region, val_region = _spatial_split(
    msi.shape,
    val_fraction=val_fraction,
    axis=split_axis,
    gap_px=gap_px,
    seed=seed,
    tissue_mask=tissue & msi.mask,
    min_band_px=min_val_band_px,
  )
  config = preprocess_config or PreprocessConfig(
    channels="all", normalization="none", hotspot_quantile=0.99, reduction="none", scale_quantiles=(0.01, 0.99)
  )
  preprocessor = MSIPreprocessor(config=config)
  preprocessor.fit(msi, mask=tissue if train_region is None else tissue & train_region)
  msi_input = preprocessor.transform(msi)
  pixel_size = msi.pixel_size_um or (1.0, 1.0)
  source = str(msi.metadata.get("source", "msiflow_upec12"))
  pair = make_pair(
    msi_input,
    target,
    msi_pixel_size_um=pixel_size,
    histology_pixel_size_um=pixel_size,
    upsample=upsample,
    msi_mask=msi.mask,
    tissue_mask=tissue,
    fill_value=0.0,
    name="msiflow_upec12",
    metadata={
      "simulated": False,
      "source": source,
      "target": "immunofluorescence microscopy registered by msiFlow",
      "pixel_size_known": msi.pixel_size_um is not None,
      "mz": msi.mz.tolist(),
    },
  )
  metadata = {
    "simulated": False,
    "source": source,
    "val_fraction": val_fraction,
    "split_axis": split_axis,
    "gap_px": gap_px,
    "min_val_band_px": min_val_band_px,
    "seed": seed,
    "upsample": upsample,
  }
  if train_region is None:
    return PairedData([pair], [None], [], [], preprocessor, "none", metadata)
  up = lambda region: upsample_grid(region, upsample, "nearest")
  return PairedData([pair], [up(train_region)], [pair], [up(val_region)], preprocessor, "region", metadata)


def _section_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _pooled_section(
  sections: Sequence[MSIImage], masks: Sequence[np.ndarray], source: str
) -> tuple[MSIImage, np.ndarray]:
  """Several sections with one m/z axis side by side in one MSIImage, to fit one preprocessor on all of them."""
  height = max(s.shape[0] for s in sections)
  cubes, measured, fit = [], [], []
  for section, mask in zip(sections, masks):
    pad = ((0, height - section.shape[0]), (0, 0))
    cubes.append(np.pad(section.cube, pad + ((0, 0),)))
    measured.append(np.pad(section.mask, pad))
    fit.append(np.pad(np.asarray(mask, bool), pad))
  pooled = MSIImage(
    cube=np.concatenate(cubes, axis=1),
    mz=sections[0].mz,
    mask=np.concatenate(measured, axis=1),
    pixel_size_um=sections[0].pixel_size_um,
    metadata={
      "simulated": all(s.metadata.get("simulated", False) for s in sections),
      "source": source,
    },
  )
  return pooled, np.concatenate(fit, axis=1)


def semi_synthetic_pairs(
  he_paths: Sequence[str | os.PathLike],
  *,
  seed: int,
  histology_pixel_size_um: float | None = None,
  msi_pixel_size_um: float = 20.0,
  n_channels: int = 200,
  n_components: int = 8,
  upsample: int = 2,
  val_he_paths: Sequence[str | os.PathLike] = (),
  val_fraction: float = 0.2,
  split_axis: str = "auto",
  gap_px: int = 4,
  min_val_band_px: int = 0,
  noise: simulate.NoiseModel | bool | None = True,
  preprocess_config: Any | None = None,
  simulate_kwargs: dict[str, Any] | None = None,
  he_pixel_size_um: float | None = None,
) -> PairedData:
  """Semi-synthetic training pairs: real H&E slides with MSI simulated from them (labelled simulated).

  Each slide is read with `msisynth.io.read_histology` and simulated by `msisynth.simulate.simulate_msi` with no
  misalignment (training needs aligned pairs), one chemistry for all slides (`chemistry_seed=seed`) and tissue
  classes fitted on the pooled training slides, so that the same tissue gives the same spectra everywhere. One
  `MSIPreprocessor` (default: TIC normalisation, 99th-percentile hotspot clipping, PCA to `n_components`, 1st-99th
  percentile scaling to [-1, 1]) is fitted on the training slides' tissue (their training regions for a spatial
  split) and applied to every slide. Each MSI is paired with its H&E on the MSI grid upsampled by `upsample`
  (`make_pair`); the mask is the H&E tissue mask & measured pixels.

  Splits: with `val_he_paths`, those slides are the validation set (a split by section) and the training slides
  are used whole; otherwise every training slide is split spatially by `val_fraction` (0: no validation).

  Args:
    he_paths: the training H&E images (e.g. `msisynth.datasets.list_he_slides()`).
    seed: seed of the chemistry, the per-slide simulation and the splits.
    histology_pixel_size_um: assumed H&E pixel size, µm; None for 5 (the shipped PNGs do not record theirs;
      see `msisynth.simulate`).
    msi_pixel_size_um: simulated MSI pixel size, µm.
    n_channels: simulated m/z channels.
    n_components: PCA components k of the network input.
    upsample: integer factor from the MSI pixel to the pair's pixel.
    val_he_paths: H&E images held out for validation (a split by section).
    val_fraction: share of each training slide's tissue in its validation band when val_he_paths is empty.
    split_axis: "x", "y" or "auto" for the spatial split.
    gap_px: pixels between the regions of a spatial split, on the MSI grid.
    min_val_band_px: least thickness of each validation band, MSI pixels (the patch size / `upsample` makes
      room for validation patches).
    noise: the simulation's NoiseModel (True: the default one; False/None: none).
    preprocess_config: a `PreprocessConfig` to use instead of the default above (its n_components wins).
    simulate_kwargs: further keyword arguments of `simulate_msi` (e.g. n_classes, psf_fwhm_um, intensity).
    he_pixel_size_um: deprecated name of `histology_pixel_size_um`.

  Returns:
    PairedData: pairs named after the slides (metadata "simulated": True), regions, split "section", "region"
    or "none", the fitted preprocessor (store `to_dict()` with the checkpoint) and metadata with every parameter.

  Raises:
    ConfigError: for no slides or bad arguments.
    ImageReadError: for an unreadable slide (from `read_histology`).
  """
  from msisynth.preprocess import PreprocessConfig

  histology_pixel_size_um = geometry.renamed_argument(
    histology_pixel_size_um, he_pixel_size_um, "histology_pixel_size_um", "he_pixel_size_um"
  )
  if histology_pixel_size_um is None:
    histology_pixel_size_um = 5.0
  he_paths = [os.fspath(p) for p in he_paths]
  val_he_paths = [os.fspath(p) for p in val_he_paths]
  if not he_paths:
    raise errors.ConfigError("semi_synthetic_pairs needs at least one training H&E image")
  simulate_kwargs = dict(simulate_kwargs or {})
  for key in ("misalignment", "chemistry_seed", "class_centroids", "he_name"):
    if key in simulate_kwargs:
      raise errors.ConfigError(f"simulate_kwargs may not set {key!r}: semi_synthetic_pairs sets it")
  n_classes = simulate_kwargs.pop("n_classes", 4)
  train_he = [msi_io.read_histology(p) for p in he_paths]
  val_he = [msi_io.read_histology(p) for p in val_he_paths]
  centroids = simulate.fit_class_centroids(seed, train_he, n_classes=n_classes)

  def simulated(index, he, path):
    return simulate.simulate_msi(
      _section_seed(seed, index),
      he,
      histology_pixel_size_um=histology_pixel_size_um,
      msi_pixel_size_um=msi_pixel_size_um,
      n_channels=n_channels,
      misalignment=None,
      noise=noise,
      n_classes=n_classes,
      class_centroids=centroids,
      chemistry_seed=seed,
      he_name=os.path.basename(path),
      **simulate_kwargs,
    )

  slides = progress.track(zip(train_he + val_he, he_paths + val_he_paths), desc="simulating slides",
                          total=len(he_paths) + len(val_he_paths), unit="slide")  # fmt: skip
  every = [simulated(i, he, p) for i, (he, p) in enumerate(slides)]
  sims, val_sims = every[: len(he_paths)], every[len(he_paths) :]

  splits = []
  for i, sim in enumerate(sims):
    tissue_msi = sim.tissue_classes_msi > 0
    if val_he_paths:
      splits.append((None, None))
    else:
      splits.append(
        _spatial_split(
          sim.msi.shape,
          val_fraction=val_fraction,
          axis=split_axis,
          gap_px=gap_px,
          seed=_section_seed(seed, 1000 + i),
          tissue_mask=tissue_msi & sim.msi.mask,
          min_band_px=min_val_band_px,
        )
      )

  config = preprocess_config or PreprocessConfig(
    channels="all",
    normalization="tic",
    hotspot_quantile=0.99,
    reduction="pca",
    n_components=n_components,
    scale_quantiles=(0.01, 0.99),
    seed=seed,
  )
  if config.reduction != "none" and config.n_components != n_components:
    config = dataclasses.replace(config, n_components=n_components)
  fit_masks = [
    (sim.tissue_classes_msi > 0) & (np.ones(sim.msi.shape, bool) if train is None else train)
    for sim, (train, _) in zip(sims, splits)
  ]
  names = ", ".join(os.path.basename(p) for p in he_paths)
  pooled, pooled_mask = _pooled_section([s.msi for s in sims], fit_masks, f"MSI simulated from {names}")
  preprocessor = MSIPreprocessor(config=config).fit(pooled, mask=pooled_mask)

  def paired(sim, path):
    tissue = simulate.he_tissue_mask(sim.he)
    return make_pair(
      preprocessor.transform(sim.msi),
      sim.he,
      transform=sim.transform,
      msi_pixel_size_um=sim.msi.pixel_size_um,
      histology_pixel_size_um=sim.histology_pixel_size_um,
      upsample=upsample,
      msi_mask=sim.msi.mask,
      histology_mask=tissue,
      name=os.path.splitext(os.path.basename(path))[0],
      metadata={
        "simulated": True,
        "source": f"H&E {path} with simulated MSI",
        "simulation": sim.msi.metadata["simulation"],
      },
    )

  pairs = [paired(sim, p) for sim, p in zip(sims, he_paths)]
  metadata = {
    "simulated": True,
    "source": "real H&E slides with simulated MSI (msisynth.simulate)",
    "seed": seed,
    "he_paths": he_paths,
    "val_he_paths": val_he_paths,
    "histology_pixel_size_um": histology_pixel_size_um,
    "he_pixel_size_um": histology_pixel_size_um,  # deprecated name of histology_pixel_size_um
    "msi_pixel_size_um": msi_pixel_size_um,
    "n_channels": n_channels,
    "n_components": n_components,
    "upsample": upsample,
    "val_fraction": val_fraction,
    "split_axis": split_axis,
    "gap_px": gap_px,
    "min_val_band_px": min_val_band_px,
    "class_centroids": centroids.tolist(),
  }
  if val_he_paths:
    val_pairs = [paired(sim, p) for sim, p in zip(val_sims, val_he_paths)]
    return PairedData(pairs, [None] * len(pairs), val_pairs, [None] * len(val_pairs), preprocessor, "section", metadata)
  if val_fraction <= 0:
    return PairedData(pairs, [None] * len(pairs), [], [], preprocessor, "none", metadata)
  up = lambda region: upsample_grid(region, upsample, "nearest")
  return PairedData(
    pairs, [up(t) for t, _ in splits], pairs, [up(v) for _, v in splits], preprocessor, "region", metadata
  )
