"""Writing files so that nothing a user had is lost: atomic writes and one guard for output folders.

Every file msisynth writes goes through `atomic_write` (or the helpers built on it): the content goes to a
temporary file in the same folder, which is flushed and then renamed over the destination. A kill or a full disk
mid-write therefore leaves the previous file intact (a rename within one file system is atomic on POSIX and
Windows), and a reader never sees half a file.

Output folders go through `prepare_output_dir`: a launcher writes a marker file (`.msisynth`) into each folder it
creates, and refuses a non-empty folder that lacks its marker, or any non-empty folder unless `overwrite=True`.
The one error type for "output exists" is `msisynth.errors.OutputExistsError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from msisynth import errors

MARKER = ".msisynth"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[pathlib.Path]:
  """A temporary path beside `path` that is renamed onto `path` when the block ends without an exception.

  Use it with writers that need a file name (tifffile, matplotlib, numpy): write to the yielded path. On an
  exception the temporary file is removed and `path` is untouched.

  Args:
    path: the destination.
    overwrite: when False, an existing `path` raises OutputExistsError before anything is written.

  Yields:
    The temporary path, in the same folder and with the same suffix as `path`.

  Raises:
    OutputExistsError: `path` exists and `overwrite` is False.
  """
  path = refuse_existing(path, overwrite=overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def refuse_existing(*paths: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
  """The one "output exists" check for files: raises unless `overwrite` or none of `paths` exists.

  Returns:
    The first path, as a `pathlib.Path`.

  Raises:
    OutputExistsError: one of `paths` exists and `overwrite` is False.
  """
  for path in paths:
    if not overwrite and pathlib.Path(path).exists():
      raise errors.OutputExistsError("exists; pass overwrite=True (--overwrite) to replace it", path)
  return pathlib.Path(paths[0])


def atomic_write(path: str | os.PathLike, data: bytes | str, *, overwrite: bool = True) -> pathlib.Path:
  """Writes `data` (bytes, or str as UTF-8) to `path` atomically; returns the path."""
  payload = data.encode("utf-8") if isinstance(data, str) else data
  with atomic_path(path, overwrite=overwrite) as tmp:
    tmp.write_bytes(payload)
  return pathlib.Path(path)


def save_npy(path: str | os.PathLike, array: Any, *, overwrite: bool = True) -> pathlib.Path:
  """Writes `array` as a NumPy .npy file at exactly `path` (no suffix added), atomically; returns the path."""
  import numpy as np

  with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
    np.save(f, np.asarray(array))
  return pathlib.Path(path)


def save_figure(fig: Any, path: str | os.PathLike, *, overwrite: bool = True, **savefig_kwargs) -> pathlib.Path:
  """`fig.savefig(path, **savefig_kwargs)` (Matplotlib) atomically, the format from `path`'s suffix."""
  path = pathlib.Path(path)
  with atomic_path(path, overwrite=overwrite) as tmp:
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".").lower() or None)
    fig.savefig(tmp, **savefig_kwargs)
  return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> pathlib.Path:
  """Writes `obj` as indented JSON (NumPy values made plain) to `path` atomically; returns the path."""
  return atomic_write(path, json.dumps(json_ready(obj), indent=2) + "\n", overwrite=overwrite)


def json_ready(value: Any) -> Any:
  """`value` with NumPy/JAX scalars and arrays, paths and tuples made into plain JSON types."""
  import numpy as np  # local: this module stays importable without NumPy-heavy imports at top

  if isinstance(value, Mapping):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  if isinstance(value, (np.generic,)):
    value = value.item()
  if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
    return json_ready(np.asarray(value).tolist())
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, owner: str = "msisynth") -> pathlib.Path:
  """Creates (or checks) an output folder that a launcher will write into.

  A new or empty folder is created and marked as the launcher's own. A non-empty folder is refused unless
  `overwrite` is True; even then, a non-empty folder without the marker (one msisynth did not create) is refused,
  so that `--overwrite` never clobbers a user's own files.

  Args:
    path: the folder.
    overwrite: allow writing into a non-empty folder that msisynth created.
    owner: what created the folder (stored in the marker, e.g. "experiments.train").

  Returns:
    The folder's path.

  Raises:
    OutputExistsError: the folder is not empty and `overwrite` is False, or it holds files msisynth did not
      write, or `path` is a file.
  """
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise errors.OutputExistsError("is a file, not a folder", path)
  if path.is_dir() and any(path.iterdir()):
    if not (path / MARKER).exists():
      raise errors.OutputExistsError(
        "is not empty and was not created by msisynth; choose a new or empty folder (nothing was changed)", path
      )
    if not overwrite:
      raise errors.OutputExistsError("is not empty; pass --overwrite (overwrite=True) to write into it", path)
    return path
  try:
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / MARKER, json.dumps({"created_by": owner}) + "\n")
  except OSError as e:
    raise errors.OutputExistsError(f"cannot create the output folder: {e.strerror or e}", path) from e
  return path


def is_own_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is a folder that msisynth created (it holds the marker file)."""
  return (pathlib.Path(path) / MARKER).is_file()
