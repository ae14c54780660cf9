"""Memory-mapped access to the binary half of an imzML pair (the `.ibd`), in windows of bounded size.

Spectra are visited in groups whose m/z and intensity arrays each lie within a window of at most `WINDOW_BYTES`
of the file; each window is memory-mapped read-only, handed to a compiled kernel that runs over the group's
spectra on all threads, and unmapped again. Unmapping returns the file's pages, so the resident memory of a read
stays near the output plus one window, whatever the size of the `.ibd`.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pathlib
from collections.abc import Iterator

import numba
import numpy as np

from msisynth.io import _kernels

WINDOW_BYTES = 64 << 20


def _libc_pread():
  """libc's `pread` through ctypes (positional reads, safe from several threads at once), or None where there is
  none (Windows): a few values from each of many spectra cost two system calls each instead of page faults."""
  if os.name != "posix":
    return None
  try:
    libc = ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None
  # pread64 takes a 64-bit offset on every glibc (pread does only where off_t is 64-bit); others have pread.
  function = getattr(libc, "pread64", None) or getattr(libc, "pread", None)
  if function is None:
    return None
  function.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
  function.restype = ctypes.c_ssize_t
  return function


PREAD = _libc_pread()


@contextlib.contextmanager
def _mapped(fileno: int, start: int, stop: int, populate: bool = True) -> Iterator[tuple[np.ndarray, int]]:
  """Maps bytes [start, stop) of a file: yields (uint8 buffer, file offset of buffer[0]).

  The mapping is released when the last array viewing it is dropped (the caller's loop variables hold it until
  the next window), so at most two windows are mapped at a time.
  """
  if stop <= start:
    yield np.zeros(8, np.uint8), start
    return
  base = start - start % mmap.ALLOCATIONGRANULARITY
  if populate and hasattr(mmap, "MAP_POPULATE"):
    # Maps every page of the window at once instead of one page fault at a time.
    mm = mmap.mmap(fileno, stop - base, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                   offset=base)  # fmt: skip
  else:
    mm = mmap.mmap(fileno, stop - base, access=mmap.ACCESS_READ, offset=base)
  buf = np.frombuffer(mm, np.uint8)
  del mm
  yield buf, base


def windows(
  path: pathlib.Path,
  mz_off: np.ndarray,
  mz_bytes: np.ndarray,
  int_off: np.ndarray,
  int_bytes: np.ndarray,
  window_bytes: int = WINDOW_BYTES,
  populate: bool = True,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (start, stop, mz_buf, mz_rel, int_buf, int_rel) for consecutive groups of the given spectra.

  mz_rel / int_rel are the byte offsets of each spectrum's arrays of the group inside mz_buf / int_buf. Pass
  zero-length byte ranges (e.g. mz_bytes all 0) for arrays that are not needed. Spectra should be given in file
  order, so that groups are compact. `populate`: map all pages of a window up front (when most are read).
  """
  mz_off = np.asarray(mz_off, np.int64)
  int_off = np.asarray(int_off, np.int64)
  mz_end = mz_off + np.asarray(mz_bytes, np.int64)
  int_end = int_off + np.asarray(int_bytes, np.int64)
  # A spectrum with nothing to read does not stretch a window.
  mz_off_g = np.where(mz_end > mz_off, mz_off, np.where(int_end > int_off, int_off, 0))
  mz_end_g = np.where(mz_end > mz_off, mz_end, mz_off_g)
  int_off_g = np.where(int_end > int_off, int_off, mz_off_g)
  int_end_g = np.where(int_end > int_off, int_end, int_off_g)
  bounds = _kernels.window_groups(mz_off_g, mz_end_g, int_off_g, int_end_g, int(window_bytes))
  with open(path, "rb") as fh:
    fd = fh.fileno()
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
      a0, a1 = int(mz_off_g[start:stop].min()), int(mz_end_g[start:stop].max())
      b0, b1 = int(int_off_g[start:stop].min()), int(int_end_g[start:stop].max())
      joint = max(a1, b1) - min(a0, b0)
      if joint <= (a1 - a0) + (b1 - b0) + mmap.ALLOCATIONGRANULARITY:
        # Interleaved arrays (the usual layout): one mapping serves both.
        with _mapped(fd, min(a0, b0), max(a1, b1), populate) as (buf, base):
          yield start, stop, buf, mz_off[start:stop] - base, buf, int_off[start:stop] - base
      else:
        with _mapped(fd, a0, a1, populate) as (mbuf, mbase), _mapped(fd, b0, b1, populate) as (ibuf, ibase):
          yield start, stop, mbuf, mz_off[start:stop] - mbase, ibuf, int_off[start:stop] - ibase


@contextlib.contextmanager
def threads(num_threads: int | None) -> Iterator[int]:
  """Runs the compiled kernels on `num_threads` threads (None: numba's default) for the duration."""
  previous = numba.get_num_threads()
  wanted = previous if num_threads is None else max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS))
  numba.set_num_threads(wanted)
  try:
    yield wanted
  finally:
    numba.set_num_threads(previous)


def default_threads() -> int:
  return max(1, min(numba.config.NUMBA_NUM_THREADS, os.cpu_count() or 1))
