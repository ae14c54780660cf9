"""Registration accuracy: landmark files and target registration error (TRE).

Landmarks are matched points, (x, y) in µm in the fixed and in the moving image (docs/architecture.md). A FIXED →
MOVING transform T is scored by how far T(fixed point) lands from the matching moving point, in the moving image's
µm (and pixels of `pixel_size_um`, normally the MSI pixel size).
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from msisynth import errors, outputs
from msisynth.geometry.transforms import AffineTransform, pixel_size_yx

_UM_COLUMNS = ("fixed_x", "fixed_y", "moving_x", "moving_y")
_PX_COLUMNS = ("fixed_x_px", "fixed_y_px", "moving_x_px", "moving_y_px")


def load_landmarks_csv(
  path: str | os.PathLike,
  *,
  fixed_pixel_size_um=None,
  moving_pixel_size_um=None,
) -> np.ndarray:
  """Reads matched landmarks from a CSV file with a header.

  Each side is given either in µm (columns `fixed_x, fixed_y` / `moving_x, moving_y`) or in pixels (`fixed_x_px,
  fixed_y_px` / `moving_x_px, moving_y_px`, x = column, y = row, converted with that side's pixel size). Other
  columns (an id, a name) are ignored.

  Args:
    path: the CSV file.
    fixed_pixel_size_um: needed when the fixed side is in pixels; float or (y, x).
    moving_pixel_size_um: needed when the moving side is in pixels.

  Returns:
    (N, 4) float64: fixed_x, fixed_y, moving_x, moving_y in µm.

  Raises:
    DataError: when the file is missing, empty, lacks the columns, or holds non-numeric or non-finite values.
    ConfigError: when a side is in pixels and its pixel size is not given.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.DataError("no such landmarks file", path)
  try:
    with path.open(newline="", encoding="utf-8-sig") as fh:
      reader = csv.DictReader(fh)
      header = [h.strip() for h in (reader.fieldnames or [])]
      rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
  except (UnicodeDecodeError, csv.Error) as e:
    raise errors.DataError(f"not a readable CSV file: {e}", path) from e
  out = np.zeros((len(rows), 4), np.float64)
  for side, offset, pixel_size in (("fixed", 0, fixed_pixel_size_um), ("moving", 2, moving_pixel_size_um)):
    um_cols, px_cols = _UM_COLUMNS[offset : offset + 2], _PX_COLUMNS[offset : offset + 2]
    if all(c in header for c in um_cols):
      cols, scale = um_cols, (1.0, 1.0)
    elif all(c in header for c in px_cols):
      if pixel_size is None:
        raise errors.ConfigError(f"{path}: the {side} landmarks are in pixels; pass {side}_pixel_size_um")
      py, px = pixel_size_yx(pixel_size, f"{side}_pixel_size_um")
      cols, scale = px_cols, (px, py)
    else:
      raise errors.DataError(
          f"needs columns {', '.join(um_cols)} (µm) or {', '.join(px_cols)} (pixels); found {', '.join(header)}",
          path)  # fmt: skip
    for j, (col, s) in enumerate(zip(cols, scale)):
      for i, row in enumerate(rows):
        try:
          out[i, offset + j] = float(row[col]) * s
        except (TypeError, ValueError):
          raise errors.DataError(f"row {i + 2}, column {col}: {row[col]!r} is not a number", path) from None
  if len(rows) == 0:
    raise errors.DataError("holds no landmarks", path)
  if not np.all(np.isfinite(out)):
    bad = int(np.flatnonzero(~np.all(np.isfinite(out), axis=1))[0])
    raise errors.DataError(f"row {bad + 2} has a non-finite coordinate", path)
  return out


read_landmarks_csv = load_landmarks_csv


def save_landmarks_csv(path: str | os.PathLike, landmarks_um: np.ndarray, *, overwrite: bool = False) -> pathlib.Path:
  """Writes (N, 4) fixed_x, fixed_y, moving_x, moving_y µm landmarks as CSV (readable by `load_landmarks_csv`).

  Raises:
    OutputExistsError: when the file exists and overwrite is False.
    ConfigError: when the array is not (N, 4).
  """
  arr = np.asarray(landmarks_um, np.float64)
  if arr.ndim != 2 or arr.shape[1] != 4:
    raise errors.ConfigError(f"landmarks must be (N, 4), got shape {arr.shape}")
  path = outputs.refuse_existing(path, overwrite=overwrite)
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer)
  writer.writerow(_UM_COLUMNS)
  writer.writerows([[repr(float(v)) for v in row] for row in arr])
  outputs.atomic_write(path, buffer.getvalue())
  return path


def target_registration_error(
  transform: AffineTransform,
  fixed_points_um: np.ndarray,
  moving_points_um: np.ndarray,
  pixel_size_um=1.0,
) -> dict:
  """Distances between the transformed fixed landmarks and the moving landmarks.

  Args:
    transform: FIXED → MOVING transform in µm (an `AffineTransform` or a `BSplineTransform`).
    fixed_points_um: (N, 2) (x, y) µm in the fixed image.
    moving_points_um: (N, 2) matching (x, y) µm in the moving image.
    pixel_size_um: pixel size that `mean_px` is expressed in (normally the moving / MSI pixel size); float or
      (y, x), whose geometric mean is used.

  Returns:
    dict with `mean_um`, `median_um`, `max_um`, `rms_um`, `mean_px`, `median_px`, `n` and `per_point` ((N,) µm).

  Raises:
    ConfigError: when the point arrays are not (N, 2) of one N ≥ 1.
  """
  f = np.asarray(fixed_points_um, np.float64)
  m = np.asarray(moving_points_um, np.float64)
  if f.ndim != 2 or f.shape[1] != 2 or f.shape != m.shape or len(f) == 0:
    raise errors.ConfigError(f"landmarks must be two (N, 2) arrays of one N >= 1, got {f.shape} and {m.shape}")
  if isinstance(transform, AffineTransform):
    matrix = np.asarray(transform.matrix, np.float64)
    mapped = f @ matrix[:2, :2].T + matrix[:2, 2]
  else:  # a deformable transform (BSplineTransform)
    mapped = np.asarray(transform.apply(f), np.float64)
  d = np.linalg.norm(mapped - m, axis=1)
  py, px = pixel_size_yx(pixel_size_um)
  p = float(np.sqrt(py * px))
  return {
    "mean_um": float(d.mean()),
    "median_um": float(np.median(d)),
    "max_um": float(d.max()),
    "rms_um": float(np.sqrt(np.mean(d**2))),
    "mean_px": float(d.mean() / p),
    "median_px": float(np.median(d) / p),
    "n": int(len(d)),
    "per_point": d,
  }


def grid_points_um(shape: Sequence[int], pixel_size_um=1.0, num: int = 10, margin: float = 0.05) -> np.ndarray:
  """A num × num grid of (x, y) µm points spanning an image of `shape`, `margin` (fraction) in from its edges."""
  py, px = pixel_size_yx(pixel_size_um)
  xs = np.linspace(margin, 1 - margin, num) * (shape[1] - 1) * px
  ys = np.linspace(margin, 1 - margin, num) * (shape[0] - 1) * py
  gx, gy = np.meshgrid(xs, ys)
  return np.stack([gx.ravel(), gy.ravel()], axis=1)


def transform_error(
  found: AffineTransform,
  true: AffineTransform,
  fixed_shape: Sequence[int],
  fixed_pixel_size_um=1.0,
  *,
  num: int = 10,
) -> dict:
  """TRE of a found transform against a known one over a grid of fixed points (semi-synthetic tests).

  The true moving points are `true` applied to a num × num grid over the fixed image; errors are in the moving
  image's µm and in fixed pixels (`mean_px`).

  Returns:
    The dict of `target_registration_error`.
  """
  pts = grid_points_um(fixed_shape, fixed_pixel_size_um, num)
  m = np.asarray(true.matrix, np.float64)
  return target_registration_error(found, pts, pts @ m[:2, :2].T + m[:2, 2], fixed_pixel_size_um)
