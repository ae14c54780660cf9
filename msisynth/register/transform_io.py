"""Saving and loading registration transforms: a self-describing JSON file and ITK's text `.tfm` format.

Both hold the FIXED → MOVING map in µm (docs/architecture.md). The `.tfm` file is what `SimpleITK.ReadTransform`
reads; applied by `SimpleITK.Resample` to images whose spacing is their pixel size (x, y) and origin 0, it gives
the same warp as `msisynth.register.warp_image`. Nothing is overwritten unless `overwrite=True`.

A deformable `BSplineTransform` (T(x) = A (x + d(x)) + b) is written to `.tfm` as ITK's `CompositeTransform` of an
`AffineTransform` then a `BSplineTransform` of order 3: ITK applies a composite's transforms from the last to the
first, so the B-spline displacement comes first. Its FixedParameters are the grid size (nx, ny), origin (x, y),
spacing (x, y) and direction (identity); its Parameters are every node's x displacement (x fastest, then y) and
then every node's y displacement, in µm. In JSON the affine matrix is kept under `matrix_fixed_to_moving_um` and
the grid under `bspline`. `save_displacement_field` writes the same map as a dense field T(x) - x on a pixel grid.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from msisynth import errors, outputs
from msisynth.geometry import transforms as tf
from msisynth.geometry.transforms import AffineTransform, pixel_size_yx
from msisynth.register.bspline import BSplineTransform

JSON_FORMAT = "msisynth.affine_transform"
JSON_VERSION = 1
_ITK_TYPES = ("AffineTransform_double_2_2", "AffineTransform_float_2_2")
CONVENTION = (
  "matrix_fixed_to_moving_um maps a point (x, y, 1) of the fixed image, in µm with the origin at the centre of "
  "pixel (0, 0), to the moving image; pixel (row, col) is at (col * pixel_size_x, row * pixel_size_y). Resample "
  "the moving image onto the fixed grid by sampling it there (ITK's convention)."
)


def _target(path, overwrite: bool) -> pathlib.Path:
  path = outputs.refuse_existing(path, overwrite=overwrite)
  if not path.parent.is_dir():
    raise errors.DataError("the folder to write into does not exist", path.parent)
  return path


def _matrix(transform: AffineTransform) -> np.ndarray:
  if isinstance(transform, BSplineTransform):
    transform = transform.affine
  if not isinstance(transform, AffineTransform):
    raise errors.ConfigError(f"expected an AffineTransform or a BSplineTransform, got {type(transform).__name__}")
  m = np.asarray(transform.matrix, np.float64)
  if m.shape != (3, 3) or not np.all(np.isfinite(m)):
    raise errors.ConfigError(f"the transform must be one finite 3 × 3 matrix, got shape {m.shape}")
  return m


def _side(name, shape, pixel_size):
  out: dict[str, Any] = {}
  if name is not None:
    out["name"] = str(name)
  if shape is not None:
    out["shape"] = [int(shape[0]), int(shape[1])]
  if pixel_size is not None:
    out["pixel_size_um"] = list(pixel_size_yx(pixel_size))
  return out


def save_transform_json(
  path: str | os.PathLike,
  transform: AffineTransform,
  *,
  fixed_pixel_size_um=None,
  moving_pixel_size_um=None,
  fixed_shape: Sequence[int] | None = None,
  moving_shape: Sequence[int] | None = None,
  fixed_name: str | None = None,
  moving_name: str | None = None,
  metadata: dict[str, Any] | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes a transform and what it relates to as JSON.

  The file holds `matrix_fixed_to_moving_um`, its inverse, and, when both pixel sizes are given,
  `matrix_fixed_px_to_moving_px` acting on (col, row, 1) pixel indices.

  Args:
    path: the .json file to write.
    transform: FIXED → MOVING transform in µm.
    fixed_pixel_size_um: fixed pixel size, float or (y, x).
    moving_pixel_size_um: moving pixel size, float or (y, x).
    fixed_shape: (H, W) of the fixed image.
    moving_shape: (H, W) of the moving image.
    fixed_name: what the fixed image is (file name, "histology", ...).
    moving_name: what the moving image is.
    metadata: more JSON-serialisable information (registration summary, simulated flag, ...).
    overwrite: replace an existing file.

  Returns:
    The path written.

  Raises:
    DataError: when the file exists and overwrite is False, or its folder does not exist.
    ConfigError: for a bad transform or pixel size.
  """
  m = _matrix(transform)
  target = _target(path, overwrite)
  doc: dict[str, Any] = {
    "format": JSON_FORMAT,
    "version": JSON_VERSION,
    "direction": "fixed_to_moving",
    "units": "um",
    "convention": CONVENTION,
    "matrix_fixed_to_moving_um": m.tolist(),
    "matrix_moving_to_fixed_um": np.linalg.inv(m).tolist(),
    "determinant": float(np.linalg.det(m[:2, :2])),
    "fixed": _side(fixed_name, fixed_shape, fixed_pixel_size_um),
    "moving": _side(moving_name, moving_shape, moving_pixel_size_um),
  }
  if fixed_pixel_size_um is not None and moving_pixel_size_um is not None:
    fy, fx = pixel_size_yx(fixed_pixel_size_um)
    my, mx = pixel_size_yx(moving_pixel_size_um)
    doc["matrix_fixed_px_to_moving_px"] = (np.diag([1 / mx, 1 / my, 1.0]) @ m @ np.diag([fx, fy, 1.0])).tolist()
  if isinstance(transform, BSplineTransform):
    doc["bspline"] = _bspline_doc(transform)
  if metadata:
    doc["metadata"] = metadata
  try:
    text = json.dumps(doc, indent=2, allow_nan=False, default=_json_default)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"metadata cannot be written as JSON: {e}") from e
  outputs.atomic_write(target, text + "\n")
  return target


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def load_transform_json(path: str | os.PathLike, *, with_info: bool = False):
  """Reads a transform written by `save_transform_json`.

  Args:
    path: the .json file.
    with_info: also return the whole document (pixel sizes, shapes, names, metadata).

  Returns:
    The `AffineTransform`, or (transform, document dict) when `with_info`.

  Raises:
    DataError: when the file is missing, not JSON, or not such a transform.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.DataError("no such transform file", path)
  try:
    doc = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.DataError(f"not a JSON file: {e}", path) from e
  if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
    raise errors.DataError(f"not an {JSON_FORMAT} file (no 'format': '{JSON_FORMAT}')", path)
  if doc.get("version", 0) > JSON_VERSION:
    raise errors.DataError(f"file version {doc.get('version')} is newer than this reader ({JSON_VERSION})", path)
  try:
    m = np.asarray(doc["matrix_fixed_to_moving_um"], np.float64)
  except (KeyError, ValueError, TypeError) as e:
    raise errors.DataError(f"missing or malformed matrix_fixed_to_moving_um: {e}", path) from e
  if m.shape != (3, 3) or not np.all(np.isfinite(m)) or not np.allclose(m[2], [0, 0, 1]):
    raise errors.DataError(f"matrix_fixed_to_moving_um must be a finite affine 3 × 3 matrix, got {m.tolist()}", path)
  transform = AffineTransform.from_matrix(m)
  if "bspline" in doc:
    transform = _bspline_from_doc(doc["bspline"], transform, path)
  return (transform, doc) if with_info else transform


def _bspline_doc(transform: BSplineTransform) -> dict[str, Any]:
  c = np.asarray(transform.coefficients, np.float64)
  if not np.all(np.isfinite(c)):
    raise errors.ConfigError("the B-spline coefficients are not finite")
  return {
    "model": "x_moving = A (x + d(x)) + b; d a cubic B-spline (ITK BSplineTransform order 3) in fixed µm",
    "grid_shape_yx": list(transform.grid_shape),
    "grid_origin_um": np.asarray(transform.grid_origin_um, np.float64).tolist(),
    "grid_spacing_um": np.asarray(transform.grid_spacing_um, np.float64).tolist(),
    "coefficients_um": c.tolist(),
  }


def _bspline_from_doc(block, affine: AffineTransform, path) -> BSplineTransform:
  try:
    c = np.asarray(block["coefficients_um"], np.float64)
    origin = np.asarray(block["grid_origin_um"], np.float64)
    spacing = np.asarray(block["grid_spacing_um"], np.float64)
  except (KeyError, TypeError, ValueError) as e:
    raise errors.DataError(f"malformed 'bspline' block: {e}", path) from e
  if not (np.all(np.isfinite(c)) and np.all(np.isfinite(origin)) and np.all(np.isfinite(spacing))):
    raise errors.DataError("the 'bspline' block holds non-finite values", path)
  try:
    return BSplineTransform.create(affine, c, origin, spacing)
  except errors.ConfigError as e:
    raise errors.DataError(f"malformed 'bspline' block: {e}", path) from e


def save_itk_transform(
  path: str | os.PathLike,
  transform: AffineTransform,
  *,
  center_um: Sequence[float] = (0.0, 0.0),
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes an ITK text transform file (`AffineTransform_double_2_2`) that `SimpleITK.ReadTransform` reads.

  ITK's affine map is T(x) = A (x - c) + c + t with Parameters = A row by row then t, and FixedParameters = c.
  Any centre gives the same map; the fixed image's centre makes t readable as a shift.

  Args:
    path: the .tfm (or .txt) file to write.
    transform: FIXED → MOVING transform in µm (ITK's physical space with spacing = pixel size, origin 0).
    center_um: the centre c (x, y) µm written as FixedParameters.
    overwrite: replace an existing file.

  Returns:
    The path written.

  Raises:
    DataError: when the file exists and overwrite is False.
    ConfigError: for a bad transform.
  """
  m = _matrix(transform)
  target = _target(path, overwrite)
  a, b = m[:2, :2], m[:2, 2]
  c = np.asarray(center_um, np.float64).reshape(2)
  t = b - c + a @ c
  params = [*a.ravel(), *t]
  affine_lines = [
    "Transform: AffineTransform_double_2_2",
    "Parameters: " + " ".join(repr(float(v)) for v in params),
    "FixedParameters: " + " ".join(repr(float(v)) for v in c),
  ]
  if isinstance(transform, BSplineTransform):
    coefficients = np.asarray(transform.coefficients, np.float64)
    if not np.all(np.isfinite(coefficients)):
      raise errors.ConfigError("the B-spline coefficients are not finite")
    ny, nx = transform.grid_shape
    fixed = [nx, ny, *np.asarray(transform.grid_origin_um, np.float64), *np.asarray(transform.grid_spacing_um,
             np.float64), 1.0, 0.0, 0.0, 1.0]  # fmt: skip
    lines = ["#Insight Transform File V1.0", "#Transform 0", "Transform: CompositeTransform_double_2_2",
             "#Transform 1", *affine_lines, "#Transform 2", "Transform: BSplineTransform_double_2_2",
             "Parameters: " + " ".join(repr(float(v)) for v in coefficients.ravel()),
             "FixedParameters: " + " ".join(repr(float(v)) for v in fixed)]  # fmt: skip
  else:
    lines = ["#Insight Transform File V1.0", "#Transform 0", *affine_lines]
  outputs.atomic_write(target, "\n".join(lines) + "\n")
  return target


def _itk_blocks(path: pathlib.Path) -> list[dict[str, list[str]]]:
  """The transforms of an ITK text file, each as {field: values}, in file order."""
  blocks: list[dict[str, list[str]]] = []
  for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
    if ":" in line and not line.startswith("#"):
      key, value = line.split(":", 1)
      key = key.strip()
      if key == "Transform" or not blocks:
        blocks.append({})
      if key in blocks[-1]:
        raise errors.DataError(f"field {key!r} appears twice in one transform", path)
      blocks[-1][key] = value.split()
  return blocks


def _load_itk_bspline(path: pathlib.Path, blocks) -> BSplineTransform:
  """A composite [AffineTransform, BSplineTransform order 3] (or a B-spline alone) as a `BSplineTransform`."""
  kinds = [(b.get("Transform") or ["?"])[0] for b in blocks]
  if kinds[0].startswith("CompositeTransform"):
    blocks, kinds = blocks[1:], kinds[1:]
  bspline_types = ("BSplineTransform_double_2_2", "BSplineTransform_float_2_2")
  if len(blocks) == 1 and kinds[0] in bspline_types:
    affine = AffineTransform.identity()
  elif len(blocks) == 2 and kinds[0] in _ITK_TYPES and kinds[1] in bspline_types:
    affine = _affine_from_fields(blocks[0], path)
  else:
    raise errors.DataError(f"expected a 2-D affine then a 2-D B-spline transform, got {kinds}", path)
  try:
    params = np.asarray([float(v) for v in blocks[-1]["Parameters"]], np.float64)
    fixed = np.asarray([float(v) for v in blocks[-1]["FixedParameters"]], np.float64)
  except (KeyError, ValueError) as e:
    raise errors.DataError(f"malformed B-spline Parameters/FixedParameters: {e}", path) from e
  if fixed.size != 10 or not np.all(np.isfinite(fixed)) or not np.all(np.isfinite(params)):
    raise errors.DataError("a 2-D B-spline needs 10 finite FixedParameters and finite Parameters", path)
  if not np.allclose(fixed[6:], [1.0, 0.0, 0.0, 1.0]):
    raise errors.DataError(f"only an identity grid direction is supported, got {fixed[6:].tolist()}", path)
  nx, ny = int(round(fixed[0])), int(round(fixed[1]))
  if params.size != 2 * nx * ny:
    raise errors.DataError(f"a {nx} × {ny} grid needs {2 * nx * ny} parameters, got {params.size}", path)
  try:
    return BSplineTransform.create(affine, params.reshape(2, ny, nx), fixed[2:4], fixed[4:6])
  except errors.ConfigError as e:
    raise errors.DataError(str(e), path) from e


def _affine_from_fields(fields, path) -> AffineTransform:
  kind = (fields.get("Transform") or ["?"])[0]
  if kind not in _ITK_TYPES:
    raise errors.DataError(f"transform type {kind!r} is not one of {_ITK_TYPES}", path)
  try:
    params = [float(v) for v in fields["Parameters"]]
    center = [float(v) for v in fields.get("FixedParameters", ["0", "0"])]
  except (KeyError, ValueError) as e:
    raise errors.DataError(f"malformed Parameters/FixedParameters: {e}", path) from e
  if len(params) != 6 or len(center) != 2 or not all(math.isfinite(v) for v in params + center):
    raise errors.DataError(f"expected 6 parameters and a 2-D centre, got {params} and {center}", path)
  a = np.asarray(params[:4]).reshape(2, 2)
  c = np.asarray(center)
  offset = np.asarray(params[4:]) + c - a @ c
  return AffineTransform.from_linear(a, offset)


def load_itk_transform(path: str | os.PathLike) -> AffineTransform | BSplineTransform:
  """Reads a 2-D ITK text transform file (as `save_itk_transform` or SimpleITK write them).

  Args:
    path: the .tfm file: one 2-D affine transform, or a composite of an affine and an order-3 B-spline (ITK applies
      the B-spline first), or a B-spline alone.

  Returns:
    The `AffineTransform`, or a `BSplineTransform` for the B-spline files (ITK's physical space, µm).

  Raises:
    DataError: when the file is missing, holds other transforms, or is malformed.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.DataError("no such transform file", path)
  blocks = _itk_blocks(path)
  kinds = [(b.get("Transform") or ["?"])[0] for b in blocks]
  if any(k.startswith(("CompositeTransform", "BSplineTransform")) for k in kinds):
    return _load_itk_bspline(path, blocks)
  if len(blocks) > 1:
    raise errors.DataError("holds more than one transform; expected one 2-D affine transform", path)
  return _affine_from_fields(blocks[0] if blocks else {}, path)


_FIELD_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")


def save_displacement_field(
  path: str | os.PathLike,
  transform,
  fixed_shape: Sequence[int],
  fixed_pixel_size_um=1.0,
  *,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes a transform as a dense displacement field on the fixed grid: field(x) = T(x) - x, µm.

  `.npy`: a float32 (H, W, 2) array, [..., 0] along x and [..., 1] along y, at the pixel centres
  (col·px, row·py). `.nii`, `.nii.gz`, `.mha`, `.nrrd`: an ITK vector image (float64, spacing = pixel size,
  origin 0) that `SimpleITK.DisplacementFieldTransform(SimpleITK.ReadImage(path, SimpleITK.sitkVectorFloat64))`
  turns into the same FIXED → MOVING map (linear between pixel centres). `load_displacement_field` reads either back
  as a `DisplacementFieldTransform`.

  Args:
    path: the file to write; its suffix picks the format.
    transform: an `AffineTransform`, a `BSplineTransform` or a `DisplacementFieldTransform`, FIXED → MOVING.
    fixed_shape: (H, W) of the fixed grid.
    fixed_pixel_size_um: fixed pixel size, float or (y, x).
    overwrite: replace an existing file.

  Returns:
    The path written.

  Raises:
    DataError: when the file exists and overwrite is False, or its folder does not exist.
    ConfigError: for an unknown suffix, a bad transform, shape or pixel size.
  """
  path = pathlib.Path(path)
  name = path.name.lower()
  if not (name.endswith(".npy") or name.endswith(_FIELD_SUFFIXES)):
    raise errors.ConfigError(f"a displacement field is written as .npy or one of {_FIELD_SUFFIXES}, got {path.name}")
  if len(fixed_shape) < 2 or min(int(fixed_shape[0]), int(fixed_shape[1])) < 1:
    raise errors.ConfigError(f"fixed_shape must be (H, W), got {fixed_shape!r}")
  shape = (int(fixed_shape[0]), int(fixed_shape[1]))
  py, px = pixel_size_yx(fixed_pixel_size_um, "fixed_pixel_size_um")
  if isinstance(transform, AffineTransform):
    m = _matrix(transform)
    grid = np.asarray(tf.fixed_grid_um(shape, (py, px)), np.float64)
    field = (grid @ m[:2, :2].T + m[:2, 2] - grid).astype(np.float32)
  elif callable(getattr(transform, "displacement_field", None)):  # BSplineTransform, DisplacementFieldTransform
    field = np.asarray(transform.displacement_field(shape, (py, px)), np.float32)
  else:
    raise errors.ConfigError(f"expected an AffineTransform, a BSplineTransform or a DisplacementFieldTransform, "
                             f"got {type(transform).__name__}")  # fmt: skip
  if not np.all(np.isfinite(field)):
    raise errors.ConfigError("the displacement field is not finite")
  target = _target(path, overwrite)
  if name.endswith(".npy"):
    with outputs.atomic_path(target) as tmp, open(tmp, "wb") as f:
      np.save(f, field)
    return target
  import SimpleITK as sitk

  image = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
  image.SetSpacing((px, py))
  image.SetOrigin((0.0, 0.0))
  # ITK picks the format from the whole name (.nii.gz), so the temporary file keeps it, in a folder beside it.
  with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
    sitk.WriteImage(image, os.path.join(tmp, target.name))
    os.replace(os.path.join(tmp, target.name), target)
  return target


# Names used elsewhere in the package.
write_transform_json = save_transform_json
write_transform_tfm = save_itk_transform
read_transform_json = load_transform_json
read_itk_transform = load_itk_transform
