"""Whole-image synthesis of H&E from MSI with a trained generator: restore from a workdir, tile, blend, save.

Layout: the network input is an (H, W, k) float32 image in [-1, 1] (the output of the fitted
`msisynth.preprocess.MSIPreprocessor` stored with the checkpoint); the generator works on NHWC tiles and
returns tanh outputs in [-1, 1]; a `Synthesizer` returns (H, W, 3) float32 RGB in [0, 1], the histology
convention of docs/architecture.md.

Tiling. A trained pix2pix generator sees fixed-size patches, and a whole MSI section does not fit one pass on
every device, so `synthesize_tiled` covers the image with overlapping tiles of one shape and blends them:

- the image is padded by reflection (`overlap // 2` pixels on each side, more at the end so the tiles fit
  exactly), so that border pixels get context and every size runs, including images smaller than a tile and
  sizes that are not multiples of the network's 2**depth; the result is cropped back;
- each tile is weighted by a separable window that is zero on the outer `overlap // 4` pixels of each tile
  edge (where the network's own zero padding makes the output unreliable), rises as a raised cosine over the
  next `overlap // 2` pixels and is one inside; the raised cosines of neighbouring tiles sum to one, and the
  accumulated output is divided by the accumulated weights, so there are no seams;
- tiles go through the network `batch_size` at a time and the output is accumulated in NumPy, so device
  memory does not grow with the image.

For a fully convolutional network whose receptive-field radius is at most `overlap // 4`, whose size multiple
divides the tile stride `tile_size - overlap` and `overlap // 2`, and which normalises with running statistics
(batch norm in inference mode, not instance norm), the tiled result equals a whole-image pass away from the
image border. The pix2pix UNet-256 (depth 8) sees the whole tile at its bottleneck, so tiling it is an
approximation by construction, as it is for the patches it was trained on.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from msisynth import checkpoint, errors, geometry, models, preprocess, progress
from msisynth import io as msi_io
from msisynth.types import MSIImage

# How far outside [-1, 1] a network input may stray (rounding in a preprocessor) before it is refused.
_INPUT_RANGE_SLACK = 1e-3


def _ceil_to(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _axis_layout(length: int, tile: int, overlap: int, multiple: int) -> tuple[int, int, int, int]:
  """Tiling of one axis of `length` pixels: (tile, count, pad_before, pad_after); see `TileLayout`."""
  pad = overlap // 2
  needed = length + 2 * pad
  if needed <= tile:
    tile = _ceil_to(needed, multiple)
    count = 1
  else:
    stride = tile - overlap
    count = 1 + -(-(needed - tile) // stride)
  total = tile + (count - 1) * (tile - overlap)
  return tile, count, pad, total - length - pad


class TileLayout(NamedTuple):
  """How `synthesize_tiled` covers an image.

  Attributes:
    tile_shape: (th, tw) tile size in pixels; smaller than tile_size along an axis that one tile covers.
    grid: (ny, nx) number of tiles along each axis; tile (i, j) starts at (i * (th - overlap),
      j * (tw - overlap)) in the padded image.
    padding: ((top, bottom), (left, right)) reflection padding in pixels.
  """

  tile_shape: tuple[int, int]
  grid: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]

  @property
  def num_tiles(self) -> int:
    return self.grid[0] * self.grid[1]


def tile_layout(
  shape: tuple[int, int], *, tile_size: int = 256, overlap: int = 32, size_multiple: int = 1
) -> TileLayout:
  """The tiles that `synthesize_tiled` uses for an image of (height, width) `shape`, in pixels.

  Raises:
    ConfigError: on bad tiling arguments.
  """
  if size_multiple < 1:
    raise errors.ConfigError(f"size_multiple must be >= 1, got {size_multiple}")
  if tile_size < 1 or tile_size % size_multiple:
    raise errors.ConfigError(
      f"tile_size {tile_size} must be a positive multiple of {size_multiple} (2**depth of the generator)"
    )
  if not 0 <= overlap < tile_size:
    raise errors.ConfigError(f"overlap must be in [0, tile_size = {tile_size}), got {overlap}")
  if len(shape) != 2 or min(shape) < 1:
    raise errors.ConfigError(f"image shape must be (height, width) >= 1, got {tuple(shape)}")
  th, ny, top, bottom = _axis_layout(int(shape[0]), tile_size, overlap, size_multiple)
  tw, nx, left, right = _axis_layout(int(shape[1]), tile_size, overlap, size_multiple)
  return TileLayout((th, tw), (ny, nx), ((top, bottom), (left, right)))


def blend_window(tile: int, overlap: int) -> np.ndarray:
  """The 1-D tile weights: zero on the outer `overlap // 4` pixels, a raised cosine over `overlap // 2`, then one.

  With tiles `tile - overlap` apart, the weights of two neighbours sum to one over their overlap.

  Args:
    tile: tile size in pixels.
    overlap: overlap of neighbouring tiles in pixels, 0 <= overlap < tile.

  Returns:
    (tile,) float32 weights in [0, 1].
  """
  margin = overlap // 4
  ramp = overlap - 2 * margin
  # Distance of each pixel from the nearer tile edge, in pixels.
  j = np.minimum(np.arange(tile), tile - 1 - np.arange(tile)).astype(np.float64)
  u = np.clip((j - margin + 0.5) / max(ramp, 1), 0.0, 1.0)
  window = np.sin(0.5 * np.pi * u) ** 2
  window[j < margin] = 0.0
  return window.astype(np.float32)


def synthesize_tiled(
  apply_fn: Callable[[jax.Array], Any],
  x: np.ndarray,
  *,
  tile_size: int = 256,
  overlap: int = 32,
  batch_size: int = 8,
  size_multiple: int = 1,
) -> np.ndarray:
  """Applies an image-to-image network to a whole image with overlapping, blended tiles.

  See the module docstring for the padding and blending. `apply_fn` is called on one tile shape (and one batch
  size) per axis layout, so a jitted function compiles once per tile shape.

  Args:
    apply_fn: maps a (B, th, tw, k) float32 batch to (B, th, tw, c) outputs (any float dtype); for instance a
      jitted `lambda x: generator.apply(variables, x, train=False)`.
    x: (H, W, k) network input, any H, W >= 1.
    tile_size: tile height and width in pixels, a multiple of `size_multiple`. An axis whose padded length fits
      one tile uses a single smaller tile (rounded up to `size_multiple`).
    overlap: overlap of neighbouring tiles in pixels, 0 <= overlap < tile_size.
    batch_size: at most this many tiles per call of `apply_fn` (the tiles are split into equal batches); it
      bounds the device memory.
    size_multiple: the network needs tile sizes divisible by this (2**depth for the U-Net).

  Returns:
    (H, W, c) float32 blended output.

  Raises:
    ConfigError: on bad tiling arguments, an input that is not (H, W, k), or an `apply_fn` that changes the
      batch or spatial size.
  """
  x = np.asarray(x)
  if x.ndim != 3 or min(x.shape) < 1:
    raise errors.ConfigError(f"tiled synthesis needs an (height, width, channels) input, got shape {x.shape}")
  if batch_size < 1:
    raise errors.ConfigError(f"batch_size must be >= 1, got {batch_size}")
  height, width = x.shape[:2]
  layout = tile_layout((height, width), tile_size=tile_size, overlap=overlap, size_multiple=size_multiple)
  (th, tw), (ny, nx), ((top, bottom), (left, right)) = layout
  padded = np.pad(x.astype(np.float32, copy=False), layout.padding + ((0, 0),), mode="reflect")
  # An axis covered by one tile has no neighbour to blend with: its padding only gives context.
  wy = blend_window(th, overlap) if ny > 1 else np.ones(th, np.float32)
  wx = blend_window(tw, overlap) if nx > 1 else np.ones(tw, np.float32)
  window = wy[:, None] * wx[None, :]

  origins = [(i * (th - overlap), j * (tw - overlap)) for i in range(ny) for j in range(nx)]
  # Equal batches of at most batch_size: one compiled shape, and the last batch wastes at most a few slots.
  n_batches = -(-len(origins) // batch_size)
  batch = -(-len(origins) // n_batches)
  out = None
  weight = np.zeros(padded.shape[:2], np.float32)
  for y0, x0 in origins:
    weight[y0 : y0 + th, x0 : x0 + tw] += window

  def accumulate(tile_origins, result):
    nonlocal out
    result = np.asarray(result, dtype=np.float32)
    if result.ndim != 4 or result.shape[:3] != (batch, th, tw):
      raise errors.ConfigError(
        f"apply_fn turned a ({batch}, {th}, {tw}, k) batch into shape {result.shape}; it "
        "must keep the batch and spatial sizes"
      )
    if out is None:
      out = np.zeros(padded.shape[:2] + result.shape[3:], np.float32)
    for (y0, x0), tile in zip(tile_origins, result):
      out[y0 : y0 + th, x0 : x0 + tw] += tile * window[..., None]

  # One batch is in flight on the device while the previous one is accumulated on the host.
  pending = None
  starts = range(0, len(origins), batch)
  for start in progress.track(starts, desc="synthesising tiles", total=len(starts), unit="batch"):
    chunk = origins[start : start + batch]
    tiles = np.zeros((batch, th, tw, x.shape[2]), np.float32)
    for k, (y0, x0) in enumerate(chunk):
      tiles[k] = padded[y0 : y0 + th, x0 : x0 + tw]
    result = apply_fn(jnp.asarray(tiles))
    if pending is not None:
      accumulate(*pending)
    pending = (chunk, result)
  accumulate(*pending)

  crop = (slice(top, top + height), slice(left, left + width))
  return out[crop] / weight[crop][..., None]


@dataclasses.dataclass
class Synthesizer:
  """A restored generator that turns MSI into synthetic H&E at full size.

  Call it on an `MSIImage` (the stored preprocessor is applied first, never refitted) or on an (H, W, k)
  array already in [-1, 1]; it returns (H, W, 3) float32 RGB in [0, 1]. A generator trained on pairs whose MSI
  grid was upsampled (`config.data.upsample` = u > 1) sees an MSIImage upsampled the same way (bilinear, pixel
  (0, 0) kept in place): the output then has ((H - 1)·u + 1, (W - 1)·u + 1) pixels of `pixel size / u`. An array
  input is taken as the network input on the network's own grid and is never resampled.

  Attributes:
    apply_fn: jitted generator in inference mode, (B, th, tw, k) in [-1, 1] -> (B, th, tw, 3) in [-1, 1].
    config: the training configuration saved with the checkpoint.
    preprocessor: the fitted `MSIPreprocessor` saved with the checkpoint, or None when it had none.
    in_channels: k, the number of input channels the generator was trained on.
    size_multiple: tile sizes must be multiples of this (2**depth of the U-Net).
    tile_size: tile height and width in pixels.
    overlap: overlap of neighbouring tiles in pixels.
    batch_size: tiles per generator call.
    workdir: the checkpoint directory it was restored from.
  """

  apply_fn: Callable[[jax.Array], jax.Array]
  config: Any
  preprocessor: Any | None
  in_channels: int
  size_multiple: int
  tile_size: int = 256
  overlap: int = 32
  batch_size: int = 8
  workdir: str | None = None

  @property
  def upsample(self) -> int:
    """Factor u from the MSI pixel to the generator's pixel (the training pairs' `config.data.upsample`)."""
    data = self.config.get("data") if hasattr(self.config, "get") else None
    return max(int(data.get("upsample", 1) or 1), 1) if data is not None else 1

  def output_pixel_size_um(self, msi_pixel_size_um) -> tuple[float, float]:
    """(y, x) pixel size (µm) of the synthetic H&E made from an MSIImage of the given pixel size."""
    return geometry.Grid((1, 1), msi_pixel_size_um).upsampled(self.upsample).pixel_size_um

  def network_input(self, msi: MSIImage | np.ndarray) -> np.ndarray:
    """The (H, W, k) float32 generator input for `msi`.

    Raises:
      CheckpointError: for an MSIImage when the checkpoint holds no preprocessor.
      DataError: for an array of the wrong shape, channel count or range.
    """
    if isinstance(msi, MSIImage):
      if self.preprocessor is None:
        raise errors.CheckpointError(
          f"{self.workdir}: the checkpoint holds no fitted preprocessor, so an MSIImage cannot be mapped to "
          "network inputs; pass an (H, W, k) array in [-1, 1] instead"
        )
      x = np.asarray(self.preprocessor.transform(msi), dtype=np.float32)
      if self.upsample > 1:
        x = np.clip(geometry.upsample_grid(x, self.upsample, "bilinear"), -1.0, 1.0)
      source = msi.metadata.get("source")
    else:
      x = np.asarray(msi, dtype=np.float32)
      source = None
    if x.ndim != 3 or x.shape[2] != self.in_channels:
      raise errors.DataError(
        f"the generator takes (height, width, {self.in_channels}) inputs, got shape {x.shape}", source
      )
    if not np.all(np.isfinite(x)):
      raise errors.DataError("the network input has NaN or infinite values", source)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - _INPUT_RANGE_SLACK or hi > 1 + _INPUT_RANGE_SLACK:
      raise errors.DataError(
        f"the network input spans [{lo:.4g}, {hi:.4g}], outside [-1, 1]; raw MSI must go through the "
        "checkpoint's preprocessor (pass an MSIImage)",
        source,
      )
    return x

  def __call__(self, msi: MSIImage | np.ndarray) -> np.ndarray:
    """Synthesises H&E for a whole image.

    Args:
      msi: an MSIImage, or an (H, W, k) array already preprocessed into [-1, 1].

    Returns:
      (H, W, 3) float32 RGB in [0, 1].

    Raises:
      CheckpointError: for an MSIImage when the checkpoint holds no preprocessor, or when the generator gives
        NaN/Inf.
      DataError: for an array of the wrong shape, channel count or range.
    """
    y = synthesize_tiled(
      self.apply_fn,
      self.network_input(msi),
      tile_size=self.tile_size,
      overlap=self.overlap,
      batch_size=self.batch_size,
      size_multiple=self.size_multiple,
    )
    if not np.isfinite(y).all():  # finite weights and input, yet NaN/Inf out: never hand back a NaN image
      raise errors.CheckpointError(
        f"{self.workdir}: the generator gave NaN/Inf for {np.mean(~np.isfinite(y)):.1%} of the output; the "
        "checkpoint is not usable on this input"
      )
    return np.clip((y + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)


def load_synthesizer(
  workdir: str | os.PathLike,
  *,
  step: int | None = None,
  which: str = "latest",
  tile_size: int = 256,
  overlap: int = 32,
  batch_size: int = 8,
) -> Synthesizer:
  """Restores a trained generator, its configuration and its preprocessor from an orbax workdir.

  Args:
    workdir: the training workdir (as written by `msisynth.train`).
    step: the step to restore; None for the one chosen by `which`.
    which: "latest" or "best" (by the validation metric recorded at training time).
    tile_size: tile height and width in pixels, a multiple of 2**depth of the generator.
    overlap: overlap of neighbouring tiles in pixels.
    batch_size: tiles per generator call.

  Returns:
    A `Synthesizer`, its generator in inference mode (batch-norm running statistics, no dropout), jitted once
    per tile shape.

  Raises:
    CheckpointError: when the workdir holds no usable checkpoint.
    ConfigError: on tiling arguments the generator cannot take.
  """
  config, variables, preprocessor_dict = checkpoint.restore_for_inference(workdir, step=step, which=which)
  generator = models.generator_from_config(config)
  size_multiple = 2**generator.depth
  if tile_size % size_multiple or not 0 <= overlap < tile_size:
    raise errors.ConfigError(
      f"tile_size {tile_size} must be a multiple of 2**depth = {size_multiple} and exceed overlap {overlap} >= 0"
    )
  variables = jax.device_put(dict(variables))
  try:
    in_channels = int(variables["params"]["down0"]["kernel"].shape[2])
  except (KeyError, IndexError, TypeError) as e:
    raise errors.CheckpointError(f"{workdir}: the saved generator has no first convolution 'down0'") from e

  # Weights are an argument, not a closed-over constant, so they are not baked into each compiled tile shape.
  apply = jax.jit(lambda v, x: generator.apply(v, x, train=False))

  preprocessor = None if preprocessor_dict is None else preprocess.MSIPreprocessor.from_dict(preprocessor_dict)
  return Synthesizer(
    apply_fn=lambda x: apply(variables, x),
    config=config,
    preprocessor=preprocessor,
    in_channels=in_channels,
    size_multiple=size_multiple,
    tile_size=int(tile_size),
    overlap=int(overlap),
    batch_size=int(batch_size),
    workdir=os.fspath(workdir),
  )


def save_synthesis(
  path: str | os.PathLike, rgb: np.ndarray, overwrite: bool = False, *, tiff_dtype: str = "float32"
) -> pathlib.Path:
  """Writes synthetic H&E as PNG (8-bit) or TIFF (float32 or uint16), chosen by the file extension.

  Args:
    path: a .png, .tif or .tiff file.
    rgb: (H, W, 3) float RGB in [0, 1], as a `Synthesizer` returns it; values outside are clipped.
    overwrite: replace an existing file; without it an existing file is an error.
    tiff_dtype: for TIFF, "float32" (values in [0, 1]) or "uint16" (scaled to 0..65535).

  Returns:
    The path written.

  Raises:
    ConfigError: on an image that is not (H, W, 3), NaN values, an unknown extension or TIFF dtype, a missing
      folder, or an existing file without `overwrite`.
  """
  rgb = np.asarray(rgb, dtype=np.float32)
  if rgb.ndim != 3 or rgb.shape[2] != 3:
    raise errors.ConfigError(f"{path}: synthetic H&E must be (height, width, 3), got shape {rgb.shape}")
  if np.isnan(rgb).any():
    raise errors.ConfigError(f"{path}: synthetic H&E holds NaN values")
  if tiff_dtype not in ("float32", "uint16"):
    raise errors.ConfigError(f"tiff_dtype must be 'float32' or 'uint16', got {tiff_dtype!r}")
  rgb = np.clip(rgb, 0.0, 1.0)
  if pathlib.Path(path).suffix.lower() in (".tif", ".tiff") and tiff_dtype == "uint16":
    rgb = np.round(rgb * 65535.0).astype(np.uint16)
  # PNG: write_image rounds floats in [0, 1] to 8 bits.
  return msi_io.write_image(path, rgb, overwrite=overwrite)
