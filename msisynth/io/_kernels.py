"""Compiled (numba) kernels of the imzML readers and of the sparse spectra: decoding, binning, windows, histograms.

Every kernel takes plain NumPy arrays. Spectra come either as raw little-endian bytes of a memory-mapped `.ibd`
window (byte offsets and value counts per spectrum, a type code per array) or as CSR arrays (indptr, m/z,
intensity). Each spectrum writes only its own output row, so the loops over spectra run in parallel (`prange`)
without locks.

Bin membership is decided against the bin edges themselves (float64 comparisons, as `np.histogram` does), from a
first guess out of a lookup table over the m/z range (`search_table`): no logarithm, no binary search, and a
result that does not depend on the last bit of a logarithm.
Within a spectrum, the values that fall into one channel are summed in float64 (in a per-thread scratch row for
clean sorted spectra, run by run otherwise) before they are added to the float32 output, so sorted spectra are
binned as exactly as a float64 histogram cast to float32. Writes to the output are checked against the float32
range as they are made (flag OVERFLOW), so the reader needs no second pass over the cube.

Type codes: 0 float32, 1 float64, 2 int32, 3 int64 (see `TYPE_CODES`).
"""

from __future__ import annotations

import functools
import os
import threading

import numba as nb
import numpy as np

# numba's "workqueue" threads sleep between parallel loops, where the OpenMP layer's spin and burn CPU that the
# other work of a busy machine needs (measured: about 20 % more CPU per read here). Workqueue must not run two
# parallel kernels at once, so every parallel kernel below is launched under one lock (`_serialised`): readers in
# several Python threads (batch registration plans sections in parallel) take turns, each using every core.
# Users who set NUMBA_THREADING_LAYER keep their choice.
if "NUMBA_THREADING_LAYER" not in os.environ:
  nb.config.THREADING_LAYER = "workqueue"
_LAUNCH = threading.Lock()


def _serialised(kernel, chunked: bool = False):
  """The parallel kernel `kernel`, launched under the module's lock (see above).

  `chunked` kernels take one more argument, the number of chunks their parallel loop splits the spectra into (a
  few per thread, each with its own scratch arrays); it is passed here because a compiled function that asks
  numba for its thread count cannot be cached.
  """

  @functools.wraps(kernel)
  def launch(*args):
    with _LAUNCH:
      if chunked:
        return kernel(*args, 4 * nb.get_num_threads())
      return kernel(*args)

  launch.kernel = kernel
  return launch

TYPE_CODES = {np.dtype("<f4"): 0, np.dtype("<f8"): 1, np.dtype("<i4"): 2, np.dtype("<i8"): 3}
ITEMSIZE = np.array([4, 8, 4, 8], np.int64)

# Status flags returned per spectrum by the raw kernels.
BAD_MZ = 1  # NaN or Inf m/z
UNSORTED_MZ = 2  # m/z decreases somewhere
BAD_INTENSITY = 4  # NaN or Inf intensity
NONPOSITIVE_MZ = 8  # m/z <= 0
OVERFLOW = 16  # a value or sum written to the output left the float32 range

_OPTS = dict(cache=True, nogil=True)


@nb.njit(**_OPTS)
def decode(buf, offset, n, code):
  """float64 (n,) values of type `code` at byte `offset` of the uint8 buffer `buf` (any alignment)."""
  if code == 0:
    return buf[offset : offset + 4 * n].copy().view(np.float32).astype(np.float64)
  if code == 1:
    return buf[offset : offset + 8 * n].copy().view(np.float64)
  if code == 2:
    return buf[offset : offset + 4 * n].copy().view(np.int32).astype(np.float64)
  return buf[offset : offset + 8 * n].copy().view(np.int64).astype(np.float64)


def search_table(arr: np.ndarray, right: bool = True, max_entries: int = 1 << 20) -> tuple[np.ndarray, float, float]:
  """A lookup table that turns a search in the sorted array `arr` into a multiply, a load and a short walk.

  Bucket b covers [lo + b / inv, lo + (b + 1) / inv) and holds the number of entries of `arr` in the buckets
  before it, computed with the same float64 operations as the kernels' (`_bucket`). Those entries all lie below
  any value of bucket b, so the entry is never past the search position of such a value, and the kernels walk
  forward from it to the exact position. Buckets are no wider than the narrowest gap of `arr` (at most one
  entry to step over) unless that needs more than `max_entries` of them. The same table serves both sides of
  the search (`right` is accepted for the callers' clarity). Entries are unsigned: no index wrap-around in the
  kernels.
  """
  del right
  arr = np.asarray(arr, np.float64)
  dtype = np.uint32 if arr.size < 2**32 - 1 else np.uint64
  if arr.size < 2 or not arr[-1] > arr[0]:
    return np.zeros(1, dtype), float(arr[0]) if arr.size else 0.0, 0.0
  gaps = np.diff(arr)
  positive = gaps[gaps > 0]
  span = float(arr[-1] - arr[0])
  width = max(float(positive.min()) if positive.size else span, span / max_entries)
  count = int(np.ceil(span / width)) + 1
  inv = 1.0 / width
  # Entries of arr below the start of each bucket: a count per bucket, accumulated (no search).
  bucket = np.clip(np.floor((arr - arr[0]) * inv).astype(np.int64) + 1, 0, count)
  table = np.cumsum(np.bincount(bucket, minlength=count + 1))[:count].astype(dtype)
  return table, float(arr[0]), inv


# The helpers below are inlined into each loop (inline="always"), so no call and no reference counting per value.
# Indices are unsigned, which spares the negative-index wrap-around of signed ones on the hot paths.
_ONE = np.uint64(1)


@nb.njit(inline="always", **_OPTS)
def _bucket(m, table, tlo, tinv):
  """Table entry for a value m >= tlo (see `search_table`)."""
  b = np.uint64((m - tlo) * tinv)
  top = np.uint64(table.size - 1)
  if b > top:
    b = top
  return np.uint64(table[b])


@nb.njit(inline="always", **_OPTS)
def _bin_of(m, edges, table, tlo, tinv):
  """Bin k of edges[0] <= m < edges[-1]: edges[k] <= m < edges[k + 1] (`np.searchsorted(edges, m, "right") - 1`)."""
  k = _bucket(m, table, tlo, tinv)
  k += np.uint64(edges[k] <= m)  # the usual single step, without a branch to mispredict
  while edges[k] <= m:  # stops at the last edge at the latest: m < edges[-1]
    k += _ONE
  return k - _ONE


@nb.njit(inline="always", **_OPTS)
def _first_not_below(m, arr, table, tlo, tinv):
  """`np.searchsorted(arr, m, "left")` for arr[0] < m <= arr[-1]."""
  k = _bucket(m, table, tlo, tinv)
  while arr[k] < m:  # stops at the last entry at the latest: m <= arr[-1]
    k += _ONE
  return k


@nb.njit(inline="always", **_OPTS)
def _bin_or_outside(m, edges, table, tlo, tinv, clip):
  """Bin of m as `np.histogram` places it (the last edge in the last bin); values outside the edges go to the end
  bins with `clip` and are -1 otherwise, as is NaN."""
  nbins = edges.size - 1
  if not m >= edges[0]:
    if not clip or m != m:
      return -1
    return 0
  if m >= edges[nbins]:
    if m > edges[nbins] and not clip:
      return -1
    return nbins - 1
  return np.int64(_bin_of(m, edges, table, tlo, tinv))


@nb.njit(**_OPTS)
def _accumulate_edges(mz, intensity, out, row, edges, table, tlo, tinv, clip, remap):
  """Adds one spectrum into out[row, :] by bins; values outside the bins are clipped in (clip) or dropped.

  With a non-empty `remap`, bin k goes to output column remap[k] (dropped when negative). Each run of values
  that fall into one channel is summed in float64 and then added to the output.
  """
  use_remap = remap.size > 0
  current = -2
  acc = 0.0
  for j in range(mz.size):
    k = _bin_or_outside(mz[j], edges, table, tlo, tinv, clip)
    if k < 0:
      continue
    if use_remap:
      k = remap[k]
      if k < 0:
        continue
    if k != current:
      if current >= 0:
        out[row, current] += acc
      current = k
      acc = 0.0
    acc += intensity[j]
  if current >= 0:
    out[row, current] += acc


@nb.njit(**_OPTS)
def _clean_within(mz, intensity, first, last):
  """Whether m/z never decreases, from >= first to < last, and every intensity is finite: the spectra (nearly
  all) that `_bin_sorted` takes. NaN fails every comparison, so it fails here too."""
  n = mz.size
  if n == 0 or not (mz[0] >= first and mz[n - 1] < last):
    return False
  ok = True
  for j in range(1, n):
    ok &= mz[j] >= mz[j - 1]
  for j in range(n):
    v = intensity[j]
    ok &= v - v == 0.0
  return ok


@nb.njit(**_OPTS)
def _bin_sorted(mz, intensity, scratch, ks, edges, table, tlo, tinv):
  """scratch[k] += intensity[j] (float64) for the bin k of each m/z, k kept in ks[j]; mz as `_clean_within`.

  Sums in the order of the values, so each bin's sum is the one `_accumulate_edges` forms for the bin's run.
  """
  for j in range(mz.size):
    k = _bin_of(mz[j], edges, table, tlo, tinv)
    scratch[k] += intensity[j]
    ks[j] = k


@nb.njit(**_OPTS)
def _flush(scratch, ks, count, out, row, remap):
  """Adds the bin sums of `_bin_sorted` into out[row, :] (through `remap` when given) and zeroes them again;
  returns OVERFLOW when a result leaves the float32 range.

  Dense spectra go bin by bin over their m/z range, sparse ones peak by peak (a bin met again adds 0.0: no
  change, as no sum is -0.0).
  """
  k0, k1 = ks[0], ks[count - 1]  # int64
  bad = False
  if remap.size == 0 and k1 - k0 < 2 * count:
    for k in range(k0, k1 + 1):
      v = np.float32(out[row, k] + scratch[k])
      out[row, k] = v
      bad |= v - v != 0.0
      scratch[k] = 0.0
  elif k1 - k0 < 2 * count:
    for k in range(k0, k1 + 1):
      c = remap[k]
      if c >= 0:
        v = np.float32(out[row, c] + scratch[k])
        out[row, c] = v
        bad |= v - v != 0.0
      scratch[k] = 0.0
  else:
    for j in range(count):
      k = ks[j]
      c = np.int64(k) if remap.size == 0 else remap[k]
      if c >= 0:
        v = np.float32(out[row, c] + scratch[k])
        out[row, c] = v
        bad |= v - v != 0.0
      scratch[k] = 0.0
  return OVERFLOW if bad else 0


@nb.njit(**_OPTS)
def _accumulate_windows(mz, intensity, out, row, lows, highs, cummax_highs, wtable, wtlo, wtinv):
  """Adds one spectrum into out[row, :] by windows [lows[k], highs[k]] (inclusive, sorted by low, may overlap)."""
  nw = lows.size
  top = cummax_highs[nw - 1]
  bottom = cummax_highs[0]
  for j in range(mz.size):
    m = mz[j]
    # k = searchsorted(cummax_highs, m, "left"): windows before it end below m.
    if not m > bottom:
      if m != m:
        continue
      k = 0
    elif m > top:
      continue
    else:
      k = np.int64(_first_not_below(m, cummax_highs, wtable, wtlo, wtinv))
    while k < nw and lows[k] <= m:
      if m <= highs[k]:
        out[row, k] += intensity[j]
      k += 1


@nb.njit(**_OPTS)
def _row_overflow(out, row):
  """OVERFLOW when out[row, :] holds a value outside the float32 range (its inputs were finite)."""
  bad = False
  for c in range(out.shape[1]):
    v = out[row, c]
    bad |= v - v != 0.0
  return OVERFLOW if bad else 0


@nb.njit(**_OPTS)
def _accumulate_columns(values, out, row, dest):
  """Adds column j of a spectrum into out[row, dest[j]] (dest < 0: dropped); for continuous files."""
  for j in range(values.size):
    d = dest[j]
    if d >= 0:
      out[row, d] += values[j]


@nb.njit(**_OPTS)
def _status(mz, intensity, zero_bad):
  """Status flags of one spectrum; with zero_bad, non-finite intensities are set to 0 in place."""
  flags = 0
  for j in range(mz.size):
    if not np.isfinite(mz[j]):
      flags |= BAD_MZ
    elif mz[j] <= 0:
      flags |= NONPOSITIVE_MZ
    if j > 0 and mz[j] < mz[j - 1]:
      flags |= UNSORTED_MZ
  for j in range(intensity.size):
    if not np.isfinite(intensity[j]):
      flags |= BAD_INTENSITY
      if zero_bad:
        intensity[j] = 0.0
  return flags


@nb.njit(**_OPTS)
def _status_of(mz, intensity):
  """Status flags of one spectrum, without changing it."""
  flags = 0
  previous = -np.inf
  for j in range(mz.size):
    m = mz[j]
    if not np.isfinite(m):
      flags |= BAD_MZ
    elif m <= 0:
      flags |= NONPOSITIVE_MZ
    if m < previous:
      flags |= UNSORTED_MZ
    previous = m
  for j in range(intensity.size):
    if not np.isfinite(intensity[j]):
      flags |= BAD_INTENSITY
      break
  return flags


@nb.njit(inline="always", **_OPTS)
def _skipped(flags, zero_bad):
  """Whether a spectrum with these status flags is left out: bad m/z, or bad intensities not read as 0."""
  return (flags & (BAD_MZ | NONPOSITIVE_MZ)) != 0 or ((flags & BAD_INTENSITY) != 0 and not zero_bad)


@nb.njit(**_OPTS)
def _decode_spectrum(mz_buf, mz_off, mz_code, int_buf, int_off, int_code, count, zero_bad):
  """(m/z, intensities, status flags) of one spectrum decoded to float64; bad intensities zeroed with zero_bad."""
  mz = decode(mz_buf, mz_off, count, mz_code)
  intensity = decode(int_buf, int_off, count, int_code)
  return mz, intensity, _status(mz, intensity, zero_bad)


@nb.njit(**_OPTS)
def _accumulate(mz, intensity, out, row, scratch, ks, mode, edges, table, tlo, tinv, clip, remap, lows, highs,
                cummax_highs, wtable, wtlo, wtinv):  # fmt: skip
  """Adds one spectrum (flags already checked) into out[row, :]; returns OVERFLOW or 0.

  Bins (mode 0) over positive edges take sorted, clean spectra through `_bin_sorted` and the rest through
  `_accumulate_edges`, with the same sums; windows (mode 1) go through `_accumulate_windows`.
  """
  if mode == 0:
    if edges[0] > 0 and _clean_within(mz, intensity, edges[0], edges[edges.size - 1]):
      _bin_sorted(mz, intensity, scratch, ks, edges, table, tlo, tinv)
      return _flush(scratch, ks, mz.size, out, row, remap)
    _accumulate_edges(mz, intensity, out, row, edges, table, tlo, tinv, clip, remap)
  else:
    _accumulate_windows(mz, intensity, out, row, lows, highs, cummax_highs, wtable, wtlo, wtinv)
  return _row_overflow(out, row)


@nb.njit(**_OPTS)
def _scratch(mode, edges, longest):
  """One chunk's scratch arrays for `_accumulate`: a float64 row of bins (mode 0) and room for the bin of each
  value of the longest spectrum."""
  return np.zeros(edges.size - 1 if mode == 0 else 1), np.empty(longest, np.int64)


@nb.njit(parallel=True, **_OPTS)
def bin_raw(mz_buf, mz_off, mz_code, int_buf, int_off, int_code, lengths, rows, out, mode, edges, table, tlo, tinv,
            clip, remap, lows, highs, cummax_highs, wtable, wtlo, wtinv, zero_bad, chunks):  # fmt: skip
  """Bins spectra read from raw .ibd bytes into out[rows[i], :]; returns per-spectrum status flags.

  mode 0: bins (edges and their `search_table`, clip, remap); mode 1: windows (lows, highs, cummax_highs and its
  `search_table`). Spectra with non-finite m/z are not binned (their flags say so); non-finite intensities are
  binned as 0 when `zero_bad`, and otherwise make the spectrum skipped too. OVERFLOW marks a spectrum whose
  sums left the float32 range. The common layout (float64 m/z, float32 intensities) is read in place,
  unaligned, and a clean sorted spectrum (nearly all) is binned without any further check; other layouts are
  decoded to float64 first. `chunks`: see `_serialised`.
  """
  n = lengths.size
  flags = np.zeros(n, np.int32)
  longest = 1
  for i in range(n):
    longest = max(longest, lengths[i])
  fast_bins = mode == 0 and edges[0] > 0
  first, last = edges[0], edges[edges.size - 1]
  chunks = max(1, min(n, chunks))
  for c in nb.prange(chunks):
    scratch, ks = _scratch(mode, edges, longest)
    for i in range(c * n // chunks, (c + 1) * n // chunks):
      count = lengths[i]
      if count <= 0:
        continue
      if mz_code == 1 and int_code == 0:
        mz_view = mz_buf[mz_off[i] : mz_off[i] + 8 * count].view(np.float64)
        int_view = int_buf[int_off[i] : int_off[i] + 4 * count].view(np.float32)
        if fast_bins and _clean_within(mz_view, int_view, first, last):
          _bin_sorted(mz_view, int_view, scratch, ks, edges, table, tlo, tinv)
          flags[i] = _flush(scratch, ks, count, out, rows[i], remap)
          continue
        f = _status_of(mz_view, int_view)
        flags[i] = f
        if _skipped(f, zero_bad):
          continue
        if not f & BAD_INTENSITY:
          flags[i] = f | _accumulate(mz_view, int_view, out, rows[i], scratch, ks, mode, edges, table, tlo, tinv,
                                     clip, remap, lows, highs, cummax_highs, wtable, wtlo, wtinv)  # fmt: skip
          continue
      mz, intensity, f = _decode_spectrum(mz_buf, mz_off[i], mz_code, int_buf, int_off[i], int_code, count, zero_bad)
      flags[i] = f
      if _skipped(f, zero_bad):
        continue
      flags[i] = f | _accumulate(mz, intensity, out, rows[i], scratch, ks, mode, edges, table, tlo, tinv, clip, remap,
                                 lows, highs, cummax_highs, wtable, wtlo, wtinv)  # fmt: skip
  return flags


@nb.njit(parallel=True, **_OPTS)
def extremes_raw(mz_buf, mz_off, mz_code, lengths, out):
  """out[i] = (first, last) m/z of spectrum i (NaN for empty ones)."""
  for i in nb.prange(lengths.size):
    count = lengths[i]
    if count <= 0:
      out[i, 0] = np.nan
      out[i, 1] = np.nan
      continue
    size = 8 if (mz_code == 1 or mz_code == 3) else 4
    out[i, 0] = decode(mz_buf, mz_off[i], 1, mz_code)[0]
    out[i, 1] = decode(mz_buf, mz_off[i] + (count - 1) * size, 1, mz_code)[0]


@nb.njit(parallel=True, **_OPTS)
def extremes_pread(pread, fd, mz_off, mz_code, lengths, out, chunks):
  """out[i] = (first, last) m/z of spectrum i (NaN for empty ones), each value read by `pread` (libc's, through
  ctypes) from the open file `fd`: two system calls per spectrum instead of page faults on a memory map. Returns
  how many reads came back short (the file changed under the reader)."""
  n = lengths.size
  size = ITEMSIZE[mz_code]
  short = np.zeros(chunks, np.int64)
  for c in nb.prange(chunks):
    value = np.zeros(8, np.uint8)
    for i in range(c * n // chunks, (c + 1) * n // chunks):
      count = lengths[i]
      if count <= 0:
        out[i, 0] = np.nan
        out[i, 1] = np.nan
        continue
      short[c] += pread(fd, value.ctypes.data, size, mz_off[i]) != size
      out[i, 0] = decode(value, 0, 1, mz_code)[0]
      short[c] += pread(fd, value.ctypes.data, size, mz_off[i] + (count - 1) * size) != size
      out[i, 1] = decode(value, 0, 1, mz_code)[0]
  return short.sum()


@nb.njit(parallel=True, **_OPTS)
def copy_raw(int_buf, int_off, int_code, count, rows, out, dest, zero_bad):
  """Continuous spectra: `count` intensities at each int_off[i] added to out[rows[i], dest[j]]; returns flags
  (OVERFLOW for a spectrum whose values or sums leave the float32 range)."""
  n = int_off.size
  flags = np.zeros(n, np.int32)
  identity = dest.size == out.shape[1] and dest.size == count
  if identity:
    for j in range(dest.size):
      if dest[j] != j:
        identity = False
        break
  for i in nb.prange(n):
    r = rows[i]
    if int_code == 0:
      # float32 intensities (the usual layout): read in place, unaligned, and copied straight to the output.
      view = int_buf[int_off[i] : int_off[i] + 4 * count].view(np.float32)
      bad = False
      overflow = False
      if identity:
        for j in range(count):
          v = view[j]
          if v - v != 0.0:
            bad = True
          out[r, j] = v
      else:
        for j in range(count):
          v = view[j]
          if v - v != 0.0:
            bad = True
          d = dest[j]
          if d >= 0:
            s = out[r, d] + v
            out[r, d] = s
            overflow |= s - s != 0.0
      if not bad:
        if overflow:
          flags[i] = OVERFLOW
        continue
      flags[i] = BAD_INTENSITY
      for j in range(out.shape[1]):
        out[r, j] = 0.0
      if not zero_bad:
        continue
    values = decode(int_buf, int_off[i], count, int_code)
    f = 0
    for j in range(count):
      if not np.isfinite(values[j]):
        f = BAD_INTENSITY
        if zero_bad:
          values[j] = 0.0
    flags[i] = f
    if f and not zero_bad:
      continue
    if identity:
      for j in range(count):
        out[r, j] = values[j]
    else:
      _accumulate_columns(values, out, r, dest)
    flags[i] = f | _row_overflow(out, r)
  return flags


@nb.njit(parallel=True, **_OPTS)
def gather_raw(buf, off, lengths, code, out, starts):
  """Decodes spectra from raw bytes into one flat array: out[starts[i]:starts[i] + lengths[i]]."""
  for i in nb.prange(off.size):
    count = lengths[i]
    if count > 0:
      values = decode(buf, off[i], count, code)
      for j in range(count):
        out[starts[i] + j] = values[j]


@nb.njit(parallel=True, **_OPTS)
def bin_csr(indptr, mz, intensity, pixels, rows, out, mode, edges, table, tlo, tinv, clip, remap, lows, highs,
            cummax_highs, wtable, wtlo, wtinv, chunks):  # fmt: skip
  """Bins CSR spectra `pixels` into out[rows[i], :] (mode as `bin_raw`); returns how many pixels' sums left the
  float32 range."""
  n = pixels.size
  longest = 1
  for i in range(n):
    longest = max(longest, indptr[pixels[i] + 1] - indptr[pixels[i]])
  overflow = np.zeros(n, np.int32)
  chunks = max(1, min(n, chunks))
  for c in nb.prange(chunks):
    scratch, ks = _scratch(mode, edges, longest)
    for i in range(c * n // chunks, (c + 1) * n // chunks):
      p = pixels[i]
      a, b = indptr[p], indptr[p + 1]
      if b > a:
        overflow[i] = _accumulate(mz[a:b], intensity[a:b], out, rows[i], scratch, ks, mode, edges, table, tlo, tinv,
                                  clip, remap, lows, highs, cummax_highs, wtable, wtlo, wtinv) != 0  # fmt: skip
  return overflow.sum()


@nb.njit(**_OPTS)
def _histogram_one(mz, intensity, edges, table, tlo, tinv, total, count, mz_sum, maximum):
  nbins = edges.size - 1
  first, last = edges[0], edges[nbins]
  current = -2
  acc = 0.0
  n = mz.size
  for j in range(n + 1):
    k = -3
    v = 0.0
    if j < n:
      m = mz[j]
      if not (m >= first and m <= last):
        continue
      k = nbins - 1 if m == last else np.int64(_bin_of(m, edges, table, tlo, tinv))
      v = intensity[j]
      mz_sum[k] += v * m
    if k != current:
      if current >= 0:
        total[current] += acc
        if acc != 0.0:
          count[current] += 1
        if acc > maximum[current]:
          maximum[current] = acc
      current = k
      acc = 0.0
    acc += v


@nb.njit(**_OPTS)
def histogram_csr(indptr, mz, intensity, edges, table, tlo, tinv, total, count, mz_sum, maximum):
  """Per bin over all pixels: summed intensity, pixels present (nonzero), intensity-weighted m/z sum, and the
  largest per-pixel value. Values outside the bins are dropped; each pixel's peaks must be sorted by m/z."""
  for p in range(indptr.size - 1):
    a, b = indptr[p], indptr[p + 1]
    if b > a:
      _histogram_one(mz[a:b].astype(np.float64), intensity[a:b].astype(np.float64), edges, table, tlo, tinv, total,
                     count, mz_sum, maximum)  # fmt: skip


@nb.njit(**_OPTS)
def histogram_raw(mz_buf, mz_off, mz_code, int_buf, int_off, int_code, lengths, edges, table, tlo, tinv, total,
                  count, mz_sum, maximum, zero_bad):  # fmt: skip
  """`histogram_csr` over spectra read from raw .ibd bytes; returns per-spectrum status flags (see `bin_raw`)."""
  n = lengths.size
  flags = np.zeros(n, np.int32)
  for i in range(n):
    c = lengths[i]
    if c <= 0:
      continue
    mz, intensity, f = _decode_spectrum(mz_buf, mz_off[i], mz_code, int_buf, int_off[i], int_code, c, zero_bad)
    flags[i] = f
    if _skipped(f, zero_bad):
      continue
    if f & UNSORTED_MZ:
      order = np.argsort(mz, kind="mergesort")
      mz = mz[order]
      intensity = intensity[order]
    _histogram_one(mz, intensity, edges, table, tlo, tinv, total, count, mz_sum, maximum)
  return flags


@nb.njit(parallel=True, **_OPTS)
def window_sums_csr(indptr, mz, intensity, lo, hi, out):
  """out[p] = sum of the intensities of pixel p with lo <= m/z <= hi (an ion image over CSR spectra)."""
  for p in nb.prange(indptr.size - 1):
    s = 0.0
    for j in range(indptr[p], indptr[p + 1]):
      m = mz[j]
      if m >= lo and m <= hi:
        s += intensity[j]
    out[p] = s


@nb.njit(parallel=True, **_OPTS)
def row_sums_csr(indptr, intensity, out):
  """Per-pixel total ion count over CSR spectra."""
  for p in nb.prange(indptr.size - 1):
    s = 0.0
    for j in range(indptr[p], indptr[p + 1]):
      s += intensity[j]
    out[p] = s


@nb.njit(parallel=True, **_OPTS)
def sort_rows_csr(indptr, mz, intensity):
  """Sorts each pixel's peaks by m/z in place (stable); returns how many pixels needed it."""
  n = indptr.size - 1
  changed = np.zeros(n, np.int64)
  for p in nb.prange(n):
    a, b = indptr[p], indptr[p + 1]
    unsorted = False
    for j in range(a + 1, b):
      if mz[j] < mz[j - 1]:
        unsorted = True
        break
    if unsorted:
      order = np.argsort(mz[a:b], kind="mergesort")
      m = mz[a:b][order]
      v = intensity[a:b][order]
      mz[a:b] = m
      intensity[a:b] = v
      changed[p] = 1
  return changed.sum()


@nb.njit(**_OPTS)
def window_groups(mz_off, mz_end, int_off, int_end, cap):
  """Splits spectra (in the given order) into consecutive groups whose m/z and intensity byte spans each stay
  within `cap` bytes; returns the group boundaries (starts, then the total)."""
  n = mz_off.size
  bounds = [0]
  if n == 0:
    return np.array(bounds, np.int64)
  a0, a1, b0, b1 = mz_off[0], mz_end[0], int_off[0], int_end[0]
  for i in range(1, n):
    na0 = min(a0, mz_off[i])
    na1 = max(a1, mz_end[i])
    nb0 = min(b0, int_off[i])
    nb1 = max(b1, int_end[i])
    if na1 - na0 > cap or nb1 - nb0 > cap:
      bounds.append(i)
      a0, a1, b0, b1 = mz_off[i], mz_end[i], int_off[i], int_end[i]
    else:
      a0, a1, b0, b1 = na0, na1, nb0, nb1
  bounds.append(n)
  return np.array(bounds, np.int64)


# Parallel kernels, launched one at a time.
bin_raw = _serialised(bin_raw, chunked=True)
extremes_raw = _serialised(extremes_raw)
extremes_pread = _serialised(extremes_pread, chunked=True)
copy_raw = _serialised(copy_raw)
gather_raw = _serialised(gather_raw)
bin_csr = _serialised(bin_csr, chunked=True)
window_sums_csr = _serialised(window_sums_csr)
row_sums_csr = _serialised(row_sums_csr)
sort_rows_csr = _serialised(sort_rows_csr)
