"""A compiled scan of an imzML spectrum list: positions, offsets and lengths of every spectrum, at disk speed.

It reads the same tokens as the byte-level tokenizer of `msisynth.io.imzml` (`accession="IMS:1000050/51/52/102/103"`
followed by `value="..."` within the same tag, and `ref="<m/z group>"` / `ref="<intensity group>"`), in one
numba pass over the bytes instead of regular expressions. Whenever the spectrum list holds anything it does not
handle exactly (array types, number formats or compression given per array, a value that is not a plain
integer, counts that do not match), it returns None and the reader uses its general tokenizer instead.
"""

from __future__ import annotations

import mmap
import pathlib
import sys
from collections.abc import Callable

import numba as nb
import numpy as np

from msisynth.io import _kernels

_OPTS = dict(cache=True, nogil=True)

# Accessions that, inside the spectrum list, mean per-array settings this scan does not interpret.
_QUIRKS = (
  b"MS:1000521", b"MS:1000523", b"MS:1000519", b"MS:1000522", b"IMS:1000141", b"IMS:1000142", b"MS:1000574",
  b"MS:1000576", b"MS:1000514", b"MS:1000515", b"MS:1002312", b"MS:1002313", b"MS:1002314", b"MS:1002746",
  b"MS:1002747", b"MS:1002748",
)  # fmt: skip
_WANTED = (b"IMS:1000050", b"IMS:1000051", b"IMS:1000052", b"IMS:1000102", b"IMS:1000103")


def _pack(words: tuple[bytes, ...]) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(w) for w in words)
  table = np.zeros((len(words), width), np.uint8)
  lengths = np.zeros(len(words), np.int64)
  for i, w in enumerate(words):
    table[i, : len(w)] = np.frombuffer(w, np.uint8)
    lengths[i] = len(w)
  return table, lengths


@nb.njit(**_OPTS)
def _match(buf, start, stop, table, lengths):
  """Index of the word of `table` equal to buf[start:stop], or -1 (compared from the end, where accession numbers
  differ)."""
  n = stop - start
  for w in range(lengths.size):
    if lengths[w] != n:
      continue
    ok = True
    for i in range(n - 1, -1, -1):
      if buf[start + i] != table[w, i]:
        ok = False
        break
    if ok:
      return w
  return -1


_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_EQUALS = np.uint64(0x3D3D3D3D3D3D3D3D)  # '=' in every byte
_QUOTES = np.uint64(0x2222222222222222)  # '"' in every byte
_TOP = np.uint64(0x8000000000000000)
_ONE = np.uint64(1)
_BYTE_INDEX = np.uint64(0x0001020304050607)
_LITTLE_ENDIAN = sys.byteorder == "little"


@nb.njit(inline="always", **_OPTS)
def _bytes_equal(word, pattern):
  """0x80 in each byte of `word` equal to the same byte of `pattern`, 0 elsewhere (exact, no carries)."""
  x = word ^ pattern
  return ~(((x & _LOW7) + _LOW7) | x | _LOW7)


@nb.njit(inline="always", **_OPTS)
def _kind(buf, i):
  """For buf[i - 1:i + 1] == '="': 0 after 'accession', 1 after 'ref', else -1."""
  if (buf[i - 2] == 110 and buf[i - 3] == 111 and buf[i - 4] == 105 and buf[i - 5] == 115 and buf[i - 6] == 115
      and buf[i - 7] == 101 and buf[i - 8] == 99 and buf[i - 9] == 99 and buf[i - 10] == 97):  # fmt: skip
    return 0
  if buf[i - 2] == 102 and buf[i - 3] == 101 and buf[i - 4] == 114:
    return 1
  return -1


@nb.njit(inline="always", **_OPTS)
def _record(out, n, i, kind):
  if n < out.shape[0]:
    out[n, 0] = i
    out[n, 1] = kind


@nb.njit(inline="always", **_OPTS)
def _candidates_bytewise(buf, start, stop, out, n):
  """`_candidates` byte by byte over positions [start, stop), the first n already found; returns the new count."""
  for p in range(start, stop):
    if buf[p] == 34 and buf[p - 1] == 61:
      kind = _kind(buf, p)
      if kind >= 0:
        _record(out, n, p, kind)
        n += 1
  return n


@nb.njit(**_OPTS)
def _candidates(buf, begin, end, out):
  """Positions of the opening quotes of accession="..." (kind 0) and ref="..." (kind 1) in buf[begin + 10:end].

  Writes (position, kind) pairs into `out` when given room, and returns how many there are; called once to count
  and once to fill, so that no array is reallocated inside the byte loop. Eight bytes at a time: the word's
  bytes equal to '=' and to '"' as bit masks, a '="' pair where one is followed by the other.
  """
  i = begin + 10
  a = min(end, i + (-i) % 8) if _LITTLE_ENDIAN else end  # words aligned to the buffer (a page)
  n = _candidates_bytewise(buf, i, a, out, 0)
  words = (end - a) // 8
  if words > 0:
    view = buf[a : a + 8 * words].view(np.uint64)
    previous = _TOP if buf[a - 1] == 61 else np.uint64(0)  # the '=' mask of the byte before the first word
    for t in range(words):
      word = view[t]
      equals = _bytes_equal(word, _EQUALS)
      pairs = ((equals << np.uint64(8)) | (previous >> np.uint64(56))) & _bytes_equal(word, _QUOTES)
      previous = equals
      while pairs != 0:
        lowest = pairs & (~pairs + _ONE)  # the lowest marked byte: bit 8k + 7
        pairs ^= lowest
        # k from 256**k times a constant whose byte j is 7 - j: the top byte of the product is k.
        p = a + 8 * t + np.int64(((lowest >> np.uint64(7)) * _BYTE_INDEX) >> np.uint64(56))
        # Without branches on the (unpredictable) outcome: the pair is written in any case and kept by the count.
        accession = ((buf[p - 2] == 110) & (buf[p - 3] == 111) & (buf[p - 4] == 105) & (buf[p - 5] == 115)
                     & (buf[p - 6] == 115) & (buf[p - 7] == 101) & (buf[p - 8] == 99) & (buf[p - 9] == 99)
                     & (buf[p - 10] == 97))  # fmt: skip
        ref = (buf[p - 2] == 102) & (buf[p - 3] == 101) & (buf[p - 4] == 114)
        _record(out, n, p, 0 if accession else 1)
        n += accession | ref
  return _candidates_bytewise(buf, a + 8 * max(words, 0), end, out, n)


@nb.njit(**_OPTS)
def _tokens(buf, end, cands, wanted, wanted_len, refs, refs_len, quirks, quirks_len, codes, values, kinds):
  """Reads the tokens at the candidate quotes; returns (status, tokens, refs): status 0 ok, 1 unsupported."""
  nt = 0
  nk = 0
  for c in range(cands.shape[0]):
    i = cands[c, 0]
    j = i + 1
    while j < end and buf[j] != 34:
      j += 1
    if j >= end:
      return 1, nt, nk
    if cands[c, 1] == 1:
      w = _match(buf, i + 1, j, refs, refs_len)
      if w >= 0:
        kinds[nk] = w
        nk += 1
      continue
    if _match(buf, i + 1, j, quirks, quirks_len) >= 0:
      return 1, nt, nk
    w = _match(buf, i + 1, j, wanted, wanted_len)
    if w < 0:
      continue
    # value="..." later in the same tag.
    k = j + 1
    found = -1
    while k + 6 < end and buf[k] != 62:  # '>'
      if (buf[k] == 118 and buf[k + 1] == 97 and buf[k + 2] == 108 and buf[k + 3] == 117 and buf[k + 4] == 101
          and buf[k + 5] == 61 and buf[k + 6] == 34):  # fmt: skip
        found = k + 7
        break
      k += 1
    if found < 0:
      return 1, nt, nk
    k = found
    negative = False
    if k < end and buf[k] == 45:
      negative = True
      k += 1
    v = 0
    digits = 0
    while k < end and buf[k] >= 48 and buf[k] <= 57:
      if digits >= 18:  # might overflow int64: leave it to the general path
        return 1, nt, nk
      v = v * 10 + (buf[k] - 48)
      digits += 1
      k += 1
    if digits == 0 or k >= end or buf[k] != 34:
      return 1, nt, nk
    codes[nt] = w
    values[nt] = -v if negative else v
    nt += 1
  return 0, nt, nk


@nb.njit(parallel=True, **_OPTS)
def _candidates_parallel(buf, begin, end, out, chunks):
  """`_candidates` over `chunks` consecutive stretches of buf[begin:end] at once, stretch c writing into rows
  [c * room, (c + 1) * room) of `out` (room = rows // chunks); returns each stretch's count (over room: not all
  of it written)."""
  room = out.shape[0] // chunks
  counts = np.zeros(chunks, np.int64)
  for c in nb.prange(chunks):
    a = max(begin + (end - begin) * c // chunks, begin + 10)
    b = begin + (end - begin) * (c + 1) // chunks
    counts[c] = _candidates(buf, a - 10, max(a, b), out[c * room : (c + 1) * room])
  return counts


@nb.njit(parallel=True, **_OPTS)
def _tokens_parallel(buf, end, cands, wanted, wanted_len, refs, refs_len, quirks, quirks_len, codes, values, kinds,
                     chunks):  # fmt: skip
  """`_tokens` over `chunks` consecutive runs of the candidates at once, run c writing from its first candidate's
  index on; returns (status, tokens, refs) per run."""
  n = cands.shape[0]
  result = np.zeros((chunks, 3), np.int64)
  for c in nb.prange(chunks):
    a, b = n * c // chunks, n * (c + 1) // chunks
    status, nt, nk = _tokens(buf, end, cands[a:b], wanted, wanted_len, refs, refs_len, quirks, quirks_len,
                             codes[a:b], values[a:b], kinds[a:b])  # fmt: skip
    result[c, 0], result[c, 1], result[c, 2] = status, nt, nk
  return result


_candidates_parallel = _kernels._serialised(_candidates_parallel, chunked=True)
_tokens_parallel = _kernels._serialised(_tokens_parallel, chunked=True)


def _scan(buf, begin, end, wanted, wanted_len, refs, refs_len, quirks, quirks_len):
  """Returns (status, codes, values, kinds): status 0 ok, 1 unsupported layout. Runs on all threads."""
  # Room for twice the density of the first MB; a stretch that needs more is scanned again on its own.
  sample = _candidates(buf, begin, min(end, begin + (1 << 20)), np.zeros((0, 2), np.int64))
  room = int(2 * (sample + 16) * max(1.0, (end - begin) / (1 << 20)))
  chunks = 4 * nb.get_num_threads()
  out = np.empty((room + chunks, 2), np.int64)
  counts = _candidates_parallel(buf, begin, end, out)
  per = out.shape[0] // counts.size
  parts = []
  for c, count in enumerate(counts.tolist()):
    if count <= per:
      parts.append(out[c * per : c * per + count])
      continue
    a = max(begin + (end - begin) * c // counts.size, begin + 10)
    b = begin + (end - begin) * (c + 1) // counts.size
    part = np.empty((count, 2), np.int64)
    _candidates(buf, a - 10, max(a, b), part)
    parts.append(part)
  cands = np.concatenate(parts) if len(parts) > 1 else parts[0]
  count = cands.shape[0]
  codes = np.empty(count, np.int8)
  values = np.empty(count, np.int64)
  kinds = np.empty(count, np.int8)
  result = _tokens_parallel(buf, end, cands, wanted, wanted_len, refs, refs_len, quirks, quirks_len, codes, values,
                            kinds)  # fmt: skip
  if np.any(result[:, 0] != 0):
    return 1, codes[:0], values[:0], kinds[:0]
  starts = count * np.arange(result.shape[0]) // result.shape[0]
  tokens = np.concatenate([np.arange(a, a + nt) for a, nt in zip(starts.tolist(), result[:, 1].tolist())])
  refs_at = np.concatenate([np.arange(a, a + nk) for a, nk in zip(starts.tolist(), result[:, 2].tolist())])
  return 0, codes[tokens], values[tokens], kinds[refs_at]


def scan_spectrum_list(
  path: pathlib.Path, mz_group: str, intensity_group: str, fix_offsets: Callable[[np.ndarray], np.ndarray]
) -> dict[str, np.ndarray] | None:
  """Positions, offsets and lengths of every spectrum (arrays as `imzml._scan_spectrum_list`), or None.

  `fix_offsets` is applied to the offsets in document order (undoing writers' 32-bit wrap-around).
  """
  with open(path, "rb") as fh:
    try:
      mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (ValueError, OSError):
      return None
  try:
    begin = mm.find(b"<spectrumList")
    end = mm.rfind(b"</spectrumList>")
    if begin < 0 or end < begin:
      return None
    buf = np.frombuffer(mm, np.uint8)
    wanted, wanted_len = _pack(_WANTED)
    refs, refs_len = _pack((mz_group.encode(), intensity_group.encode()))
    quirks, quirks_len = _pack(_QUIRKS)
    status, codes, values, kinds = _scan(buf, begin, end, wanted, wanted_len, refs, refs_len, quirks, quirks_len)
    del buf
  finally:
    try:
      mm.close()
    except BufferError:
      pass
  if status != 0:
    return None
  x, y, z = (values[codes == c] for c in (0, 1, 2))
  offset, length = values[codes == 3], values[codes == 4]
  n = x.size
  if n == 0 or y.size != n or z.size not in (0, n) or not offset.size == length.size == kinds.size == 2 * n:
    return None
  # Tokens must come in document order per spectrum: the scan keeps them in that order.
  is_mz = kinds == 0
  first_is_mz = is_mz[0::2]
  if np.any(first_is_mz == is_mz[1::2]):
    return None
  offset = fix_offsets(offset)
  mz_slot = 2 * np.arange(n) + np.where(first_is_mz, 0, 1)
  int_slot = 2 * np.arange(n) + np.where(first_is_mz, 1, 0)
  z = z if z.size else np.ones(n, np.int64)
  return {
    "coords": np.stack([x, y, z], axis=1),
    "mz_offsets": offset[mz_slot],
    "mz_lengths": length[mz_slot],
    "intensity_offsets": offset[int_slot],
    "intensity_lengths": length[int_slot],
  }
