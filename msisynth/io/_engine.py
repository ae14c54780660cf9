"""The compiled read paths of the imzML reader: spectra memory-mapped window by window and handed to numba.

`index` arguments are `msisynth.io.imzml._Index` objects (positions, offsets and lengths of every spectrum);
`ids` select and order the spectra to visit. Every function raises `ImzMLError` naming the first bad spectrum
(NaN/Inf m/z, unsorted m/z where that is refused, NaN/Inf intensities under nan_policy="raise").
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from msisynth import errors, progress
from msisynth.io import _ibd, _kernels

_EMPTY_F = np.zeros(1, np.float64)
_EMPTY_I = np.zeros(0, np.int64)
_EMPTY_T = np.zeros(1, np.int64)


@dataclasses.dataclass(frozen=True)
class KernelAxis:
  """Output channels as the kernels see them: bins between edges, or windows [low, high] (with search tables)."""

  mode: int  # 0 bins, 1 windows
  num_channels: int
  edges: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_F)
  table: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_T)
  tlo: float = 0.0
  tinv: float = 0.0
  clip: bool = False
  remap: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_I)
  lows: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_F)
  highs: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_F)
  cummax_highs: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_F)
  wtable: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_T)
  wtlo: float = 0.0
  wtinv: float = 0.0

  @classmethod
  def bins(cls, edges: np.ndarray, *, clip: bool = False, remap: np.ndarray | None = None) -> KernelAxis:
    """Bins between `edges` (strictly increasing); values outside are clipped into the end bins or dropped.

    With `remap`, bin k goes to output channel remap[k] (dropped when negative).
    """
    edges = np.ascontiguousarray(edges, np.float64)
    table, tlo, tinv = _kernels.search_table(edges, right=True)
    remap = _EMPTY_I if remap is None else np.ascontiguousarray(remap, np.int64)
    num = int(remap.max()) + 1 if remap.size else edges.size - 1
    return cls(0, num, edges, table, tlo, tinv, bool(clip), remap)

  @classmethod
  def windows(cls, lows: np.ndarray, highs: np.ndarray) -> KernelAxis:
    """Inclusive windows, sorted by their low edge (they may overlap)."""
    lows = np.ascontiguousarray(lows, np.float64)
    highs = np.ascontiguousarray(highs, np.float64)
    cummax = np.maximum.accumulate(highs)
    wtable, wtlo, wtinv = _kernels.search_table(cummax, right=False)
    return cls(1, int(lows.size), lows=lows, highs=highs, cummax_highs=cummax, wtable=wtable, wtlo=wtlo,
               wtinv=wtinv)  # fmt: skip

  def args(self) -> tuple:
    return (self.mode, self.edges, self.table, self.tlo, self.tinv, self.clip, self.remap, self.lows, self.highs,
            self.cummax_highs, self.wtable, self.wtlo, self.wtinv)  # fmt: skip


def _code(dtype: np.dtype) -> int:
  return _kernels.TYPE_CODES[np.dtype(dtype).newbyteorder("<")]


def _raise_flags(index, ids: np.ndarray, flags: np.ndarray, nan_policy: str, allow_unsorted: bool) -> int:
  """Raises on the first bad spectrum; returns how many spectra have unsorted m/z arrays."""
  bad = np.flatnonzero(flags & _kernels.BAD_MZ)
  if bad.size:
    raise errors.ImzMLError(f"{index.position(ids[bad[0]])}: NaN or Inf in its m/z array", index.path)
  bad = np.flatnonzero(flags & _kernels.NONPOSITIVE_MZ)
  if bad.size:
    raise errors.ImzMLError(f"{index.position(ids[bad[0]])}: m/z <= 0 in its m/z array", index.path)
  if not allow_unsorted:
    bad = np.flatnonzero(flags & _kernels.UNSORTED_MZ)
    if bad.size:
      raise errors.ImzMLError(
        f"{index.position(ids[bad[0]])}: m/z array is not sorted in increasing order", index.path
      )
  if nan_policy == "raise":
    bad = np.flatnonzero(flags & _kernels.BAD_INTENSITY)
    if bad.size:
      raise errors.ImzMLError(
        f"{index.position(ids[bad[0]])}: NaN or Inf intensities (pass nan_policy='zero' to read them as 0)",
        index.path,
      )
  return int(np.count_nonzero(flags & _kernels.UNSORTED_MZ))


def _file_order(index, ids: np.ndarray, rows: np.ndarray | None = None):
  order = np.argsort(index.intensity_offsets[ids], kind="stable")
  return ids[order], (None if rows is None else rows[order])


class Binned(NamedTuple):
  """What a binning pass found: spectra with unsorted m/z arrays (binned by value all the same), and whether some
  value or sum written to the output left the float32 range (the kernels check every write)."""

  unsorted: int
  overflow: bool


def bin_processed(index, ids, rows, out, axis: KernelAxis, *, nan_policy="raise", num_threads=None,
                  show_progress=True, allow_unsorted=True, desc="binning spectra") -> Binned:  # fmt: skip
  """Bins each spectrum ids[i] (own m/z array) into out[rows[i], :] (out is (P, C) float32, C-contiguous)."""
  unsorted = 0
  overflow = False
  ids, rows = _file_order(index, np.asarray(ids, np.int64), np.asarray(rows, np.int64))
  lengths = np.minimum(index.mz_lengths[ids], index.intensity_lengths[ids])
  keep = lengths > 0
  ids, rows, lengths = ids[keep], rows[keep], lengths[keep]
  mz_dt, int_dt = index.header.mz_dtype, index.header.intensity_dtype
  mz_code, int_code = _code(mz_dt), _code(int_dt)
  with _ibd.threads(num_threads), progress.bar(desc=f"{index.path.name}: {desc}", total=ids.size, unit="spectra") as b:
    for start, stop, mbuf, mrel, ibuf, irel in _ibd.windows(
      index.ibd_path, index.mz_offsets[ids], lengths * mz_dt.itemsize, index.intensity_offsets[ids],
      lengths * int_dt.itemsize,
    ):  # fmt: skip
      flags = _kernels.bin_raw(mbuf, mrel, mz_code, ibuf, irel, int_code, lengths[start:stop], rows[start:stop], out,
                               *axis.args(), nan_policy == "zero")  # fmt: skip
      unsorted += _raise_flags(index, ids[start:stop], flags, nan_policy, allow_unsorted)
      overflow |= bool(np.any(flags & _kernels.OVERFLOW))
      if show_progress:
        b.update(stop - start)
  return Binned(unsorted, overflow)


@dataclasses.dataclass
class Histogram:
  """Per-bin sums over spectra: intensity, pixels present, m/z x intensity, largest per-pixel value."""

  edges: np.ndarray
  total: np.ndarray
  count: np.ndarray
  mz_sum: np.ndarray
  maximum: np.ndarray
  unsorted: int = 0  # spectra whose m/z arrays are not sorted

  @classmethod
  def zeros(cls, edges: np.ndarray) -> Histogram:
    n = edges.size - 1
    return cls(edges, np.zeros(n), np.zeros(n, np.int64), np.zeros(n), np.zeros(n))

  @property
  def centres(self) -> np.ndarray:
    return 0.5 * (self.edges[:-1] + self.edges[1:])


def histogram_processed(index, ids, axis: KernelAxis, *, nan_policy="raise", show_progress=True,
                        allow_unsorted=True) -> Histogram:  # fmt: skip
  """`Histogram` of the spectra `ids` on the bins of `axis` (values outside the bins are dropped)."""
  ids, _ = _file_order(index, np.asarray(ids, np.int64))
  lengths = np.minimum(index.mz_lengths[ids], index.intensity_lengths[ids])
  keep = lengths > 0
  ids, lengths = ids[keep], lengths[keep]
  mz_dt, int_dt = index.header.mz_dtype, index.header.intensity_dtype
  hist = Histogram.zeros(axis.edges)
  with progress.bar(desc=f"{index.path.name}: mean spectrum", total=ids.size, unit="spectra") as b:
    for start, stop, mbuf, mrel, ibuf, irel in _ibd.windows(
      index.ibd_path, index.mz_offsets[ids], lengths * mz_dt.itemsize, index.intensity_offsets[ids],
      lengths * int_dt.itemsize,
    ):  # fmt: skip
      flags = _kernels.histogram_raw(
        mbuf, mrel, _code(mz_dt), ibuf, irel, _code(int_dt), lengths[start:stop], axis.edges, axis.table, axis.tlo,
        axis.tinv, hist.total, hist.count, hist.mz_sum, hist.maximum, nan_policy == "zero",
      )  # fmt: skip
      hist.unsorted += _raise_flags(index, ids[start:stop], flags, nan_policy, allow_unsorted)
      if show_progress:
        b.update(stop - start)
  return hist


def mz_extremes(index, ids) -> np.ndarray:
  """(n, 2) first and last m/z of each spectrum ids[i] (NaN for empty ones): read with `pread` where there is one,
  through the memory map otherwise."""
  ids = np.asarray(ids, np.int64)
  if _ibd.PREAD is not None:
    out = np.empty((ids.size, 2))
    with open(index.ibd_path, "rb") as fh:
      short = _kernels.extremes_pread(_ibd.PREAD, fh.fileno(), index.mz_offsets[ids], _code(index.header.mz_dtype),
                                      index.mz_lengths[ids], out)  # fmt: skip
    if short == 0:
      return out
  order = np.argsort(index.mz_offsets[ids], kind="stable")
  o_ids = ids[order]
  lengths = index.mz_lengths[o_ids]
  out = np.full((ids.size, 2), np.nan)
  o_out = np.full((ids.size, 2), np.nan)
  dt = index.header.mz_dtype
  nbytes = lengths * dt.itemsize
  for start, stop, mbuf, mrel, _, _ in _ibd.windows(index.ibd_path, index.mz_offsets[o_ids], nbytes,
                                                    index.mz_offsets[o_ids], np.zeros(ids.size, np.int64),
                                                    populate=False):  # fmt: skip
    part = np.empty((stop - start, 2))
    _kernels.extremes_raw(mbuf, mrel, _code(dt), lengths[start:stop], part)
    o_out[start:stop] = part
  out[order] = o_out
  return out


def copy_continuous(index, ids, rows, out, c0: int, count: int, dest: np.ndarray, *, nan_policy="raise",
                    num_threads=None, show_progress=True) -> bool:  # fmt: skip
  """Continuous spectra: the file's channels c0:c0 + count of spectrum ids[i] added to out[rows[i], dest].

  Returns whether some value or sum written to the output left the float32 range.
  """
  overflow = False
  ids, rows = _file_order(index, np.asarray(ids, np.int64), np.asarray(rows, np.int64))
  keep = index.intensity_lengths[ids] > 0
  ids, rows = ids[keep], rows[keep]
  int_dt = index.header.intensity_dtype
  offsets = index.intensity_offsets[ids] + c0 * int_dt.itemsize
  nbytes = np.full(ids.size, count * int_dt.itemsize, np.int64)
  dest = np.ascontiguousarray(dest, np.int64)
  with _ibd.threads(num_threads), progress.bar(desc=f"{index.path.name}: reading", total=ids.size, unit="spectra") as b:
    for start, stop, _, _, ibuf, irel in _ibd.windows(
      index.ibd_path, offsets, np.zeros(ids.size, np.int64), offsets, nbytes
    ):
      flags = _kernels.copy_raw(ibuf, irel, _code(int_dt), count, rows[start:stop], out, dest, nan_policy == "zero")
      _raise_flags(index, ids[start:stop], flags, nan_policy, True)
      overflow |= bool(np.any(flags & _kernels.OVERFLOW))
      if show_progress:
        b.update(stop - start)
  return overflow


def gather_processed(index, ids, *, nan_policy="raise", num_threads=None, show_progress=True):
  """CSR arrays (indptr, mz, intensity) of the spectra `ids` in that order; m/z in the file's float type (float64
  for integer m/z), intensities float32. Each pixel's peaks come out sorted by m/z."""
  ids = np.asarray(ids, np.int64)
  lengths = index.mz_lengths[ids]
  indptr = np.zeros(ids.size + 1, np.int64)
  np.cumsum(lengths, out=indptr[1:])
  mz_dt, int_dt = index.header.mz_dtype, index.header.intensity_dtype
  mz_out_dt = mz_dt if mz_dt.kind == "f" else np.dtype(np.float64)
  mz = np.empty(int(indptr[-1]), mz_out_dt.newbyteorder("="))
  intensity = np.empty(int(indptr[-1]), np.float32)
  order = np.argsort(index.intensity_offsets[ids], kind="stable")
  o_ids, o_starts, o_len = ids[order], indptr[:-1][order], lengths[order]
  with _ibd.threads(num_threads), progress.bar(desc=f"{index.path.name}: reading", total=ids.size, unit="spectra") as b:
    for start, stop, mbuf, mrel, ibuf, irel in _ibd.windows(
      index.ibd_path, index.mz_offsets[o_ids], o_len * mz_dt.itemsize, index.intensity_offsets[o_ids],
      o_len * int_dt.itemsize,
    ):  # fmt: skip
      _kernels.gather_raw(mbuf, mrel, o_len[start:stop], _code(mz_dt), mz, o_starts[start:stop])
      _kernels.gather_raw(ibuf, irel, o_len[start:stop], _code(int_dt), intensity, o_starts[start:stop])
      if show_progress:
        b.update(stop - start)

  def first_pixel(bad: np.ndarray) -> int:
    return int(np.searchsorted(indptr, int(np.flatnonzero(bad)[0]), side="right") - 1)

  if not np.isfinite(mz.sum(dtype=np.float64)):
    raise errors.ImzMLError(f"{index.position(ids[first_pixel(~np.isfinite(mz))])}: NaN or Inf in its m/z array",
                            index.path)  # fmt: skip
  if mz.size and mz.min() <= 0:
    raise errors.ImzMLError(f"{index.position(ids[first_pixel(mz <= 0)])}: m/z <= 0 in its m/z array", index.path)
  if not np.isfinite(intensity.sum(dtype=np.float64)):
    finite = np.isfinite(intensity)
    if not finite.all():
      if nan_policy == "raise":
        raise errors.ImzMLError(
          f"{index.position(ids[first_pixel(~finite)])}: NaN or Inf intensities (pass nan_policy='zero' to read "
          "them as 0)",
          index.path,
        )
      intensity[~finite] = 0
  with _ibd.threads(num_threads):
    _kernels.sort_rows_csr(indptr, mz, intensity)
  return indptr, mz, intensity
