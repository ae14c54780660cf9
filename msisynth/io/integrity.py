"""Checks that an image file holds all the data its headers declare, before its decoded pixels are trusted.

Decoders fill what a cut file lacks without saying so: Pillow returns a PNG whose compressed stream is complete
but short with its missing rows black, and libjpeg fills a JPEG scan that ends early (a file cut and closed with
an end-of-image marker) with flat grey. These checks read the file's structure and compare what it declares
(image size, bit depth, number of blocks) with what it holds:

- PNG: every chunk is whole, the chunks end with IEND, and the IDAT stream inflates to exactly the number of
  bytes that IHDR's width, height, bit depth, colour type and interlacing call for.
- JPEG (baseline and extended sequential Huffman): every scan holds entropy-coded data for all of its blocks
  before the next marker. Progressive and arithmetic-coded JPEGs are decoded without this check.

Each check raises `ImageReadError` naming the file and what is missing; a file it does not recognise passes.
"""

from __future__ import annotations

import functools
import os
import pathlib
import struct
import zlib

import numpy as np
from absl import logging

from msisynth import errors

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 22


def check_image_file(path: str | os.PathLike) -> None:
  """Raises ImageReadError when a PNG or JPEG file holds less data than its headers declare.

  Args:
    path: the image file; formats other than PNG and JPEG (by their first bytes) pass unchecked.

  Raises:
    ImageReadError: a cut or inconsistent PNG or JPEG.
  """
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    head = f.read(8)
  if head == _PNG_SIGNATURE:
    check_png(path)
  elif head[:2] == b"\xff\xd8":
    check_jpeg(path)


def _png_expected_bytes(width: int, height: int, depth: int, colour: int, interlace: int) -> int:
  bits = _PNG_CHANNELS[colour] * depth
  if interlace == 0:
    return height * (1 + (width * bits + 7) // 8)
  total = 0
  for x0, y0, dx, dy in _ADAM7:
    w = (width - x0 + dx - 1) // dx if width > x0 else 0
    h = (height - y0 + dy - 1) // dy if height > y0 else 0
    if w and h:
      total += h * (1 + (w * bits + 7) // 8)
  return total


def _inflate_count(inflater, data: bytes, path) -> int:
  """Feeds `data` to `inflater` and returns how many bytes it inflates to, holding at most 4 MiB at a time."""
  count = 0
  try:
    while not inflater.eof:
      out = inflater.decompress(data, _INFLATE_STEP)
      count += len(out)
      data = inflater.unconsumed_tail
      if not data and len(out) < _INFLATE_STEP:
        break
  except zlib.error as e:
    raise errors.ImageReadError(f"PNG image data cannot be inflated ({e})", path) from e
  return count


def check_png(path: str | os.PathLike) -> None:
  """Raises ImageReadError unless the PNG's chunks are whole, end with IEND and inflate to the declared size.

  Args:
    path: a PNG file.

  Raises:
    ImageReadError: a cut chunk, no IEND, an IDAT stream that is cut or inflates to more or fewer bytes than
      IHDR declares.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  expected, inflated, inflater, seen_iend = None, 0, zlib.decompressobj(), False
  with open(path, "rb") as f:
    f.seek(len(_PNG_SIGNATURE))
    while f.tell() < size:
      header = f.read(8)
      if len(header) < 8:
        raise errors.ImageReadError(f"PNG cut inside a chunk header at byte {f.tell() - len(header)}", path)
      length, kind = struct.unpack(">I4s", header)
      if f.tell() + length + 4 > size:
        raise errors.ImageReadError(
          f"PNG chunk {kind.decode('latin-1')!r} declares {length} bytes but the file ends {size - f.tell()} bytes "
          "later (a cut file)",
          path,
        )
      if kind == b"IHDR":
        data = f.read(length)
        if length < 13:
          raise errors.ImageReadError("PNG header chunk IHDR is too short", path)
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[:13])
        if colour not in _PNG_CHANNELS or interlace not in (0, 1):
          return  # Pillow reports what it cannot decode
        expected = _png_expected_bytes(width, height, depth, colour, interlace)
      elif kind == b"IDAT":
        inflated += _inflate_count(inflater, f.read(length), path)
      elif kind == b"IEND":
        seen_iend = True
        break
      else:
        f.seek(length, os.SEEK_CUR)
      f.seek(4, os.SEEK_CUR)  # the CRC, which Pillow checks
  if not seen_iend:
    raise errors.ImageReadError("PNG has no IEND chunk: the file is cut short", path)
  if expected is None:
    return
  if not inflater.eof:
    raise errors.ImageReadError(f"PNG image data is cut short: {inflated} of {expected} bytes", path)
  if inflated != expected:
    raise errors.ImageReadError(
      f"PNG image data holds {inflated} bytes but its header ({width}x{height}, {depth}-bit, colour type {colour}) "
      f"declares {expected}: {'rows are missing' if inflated < expected else 'the file is inconsistent'}",
      path,
    )


# ----------------------------------------------------------------------------------------------------------------
# JPEG: count the entropy-coded blocks of each scan (Huffman decoding without the inverse DCT).

_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # baseline, extended sequential
_OTHER_FRAMES = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_JPEG_PYTHON_MAX_BYTES = 8 << 20  # without numba, larger files are not checked (pure Python is slow)


def _count_units(data, start, n_units, block_dc, block_ac, maxcode, valptr, mincode, huffval, restart):
  """(whole units decoded, status, byte position): status 0 complete, -1 data ended early, -2 corrupt data.

  One function with the bit buffer in local variables, so that numba compiles it into a tight loop.
  """
  size = data.size
  pos = start
  acc = 0  # bit buffer, the next bit at position nbits - 1
  nbits = 0
  at_marker = False
  for unit in range(n_units):
    if restart > 0 and unit > 0 and unit % restart == 0:
      # What is left of the buffer is padding; the next marker must be a restart marker (RST0-7).
      acc, nbits, at_marker = 0, 0, False
      while pos + 1 < size and not (data[pos] == 0xFF and data[pos + 1] != 0 and data[pos + 1] != 0xFF):
        pos += 1
      if pos + 1 >= size or not (0xD0 <= data[pos + 1] <= 0xD7):
        return unit, -1, pos
      pos += 2
    for b in range(block_dc.size):
      for cls in range(2):
        table = block_dc[b] if cls == 0 else block_ac[b]
        k = 1
        while True:
          if nbits < 32 and not at_marker:
            while nbits <= 48:
              if pos >= size:
                at_marker = True
                break
              byte = int(data[pos])
              if byte == 0xFF:
                if pos + 1 < size and data[pos + 1] == 0:
                  pos += 2
                else:
                  at_marker = True
                  break
              else:
                pos += 1
              acc = ((acc << 8) | byte) & 0xFFFFFFFFFFFFFF
              nbits += 8
          # One Huffman symbol (at most 16 bits), then its extra bits (at most 16).
          symbol = -2
          for length in range(1, 17):
            if length > nbits:
              return unit, -1, pos
            code = (acc >> (nbits - length)) & ((1 << length) - 1)
            if maxcode[cls, table, length] >= 0 and code <= maxcode[cls, table, length]:
              symbol = huffval[cls, table, valptr[cls, table, length] + code - mincode[cls, table, length]]
              nbits -= length
              break
          if symbol < 0:
            return unit, -2, pos
          if cls == 0:
            extra = symbol
          else:
            extra = symbol & 15
          if extra > nbits:
            if at_marker:
              return unit, -1, pos
            return unit, -2, pos
          nbits -= extra
          if cls == 0:
            if symbol > 16:
              return unit, -2, pos
            break
          run = symbol >> 4
          if extra == 0:
            if run != 15:
              break  # end of block
            k += 16
          else:
            k += run + 1
          if k > 64:
            return unit, -2, pos
          if k == 64:
            break
  return n_units, 0, pos


@functools.cache
def _unit_counter():
  """`_count_units` compiled by numba (imported on first use), or None without numba (then pure Python)."""
  try:
    import numba
  except ImportError:
    return None
  return numba.njit(cache=True)(_count_units)


def _huffman_tables(segment: bytes, maxcode, valptr, mincode, huffval, defined) -> None:
  """Fills the decoding tables (JPEG standard, Annex F.2.2.3) from a DHT segment."""
  i = 0
  while i + 17 <= len(segment):
    cls, table = segment[i] >> 4, segment[i] & 15
    counts = list(segment[i + 1 : i + 17])
    n = sum(counts)
    if cls > 1 or table > 3 or i + 17 + n > len(segment):
      raise ValueError("malformed Huffman table")
    values = segment[i + 17 : i + 17 + n]
    huffval[cls, table, :] = 0
    huffval[cls, table, :n] = np.frombuffer(values, np.uint8)
    code, k = 0, 0
    for length in range(1, 17):
      count = counts[length - 1]
      if count:
        valptr[cls, table, length] = k
        mincode[cls, table, length] = code
        code += count
        k += count
        maxcode[cls, table, length] = code - 1
      else:
        maxcode[cls, table, length] = -1
      code <<= 1
    defined[cls, table] = True
    i += 17 + n


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _jpeg_cut(path, what: str) -> errors.ImageReadError:
  return errors.ImageReadError(f"JPEG is cut short or corrupt: {what}", path)


def _next_segment(raw: bytes, pos: int, path) -> tuple[int, bytes, int]:
  """The next JPEG marker segment from `pos`: (marker, its payload, the position after it), or (0xD9, b"", ...) at
  the end-of-image marker. Bytes between segments, and a scan's entropy-coded data with its stuffed 0xFF00 and
  restart markers, are skipped, as libjpeg skips them.

  Raises:
    ImageReadError: the file ends before an end-of-image marker, or inside a marker segment.
  """
  end = len(raw)
  while True:
    pos = raw.find(b"\xff", pos)
    pos = end if pos < 0 else pos
    while pos < end and raw[pos] == 0xFF:
      pos += 1
    if pos >= end:
      raise _jpeg_cut(path, "the file ends without an end-of-image marker")
    marker = raw[pos]
    pos += 1
    if marker == 0xD9:  # EOI
      return marker, b"", pos
    if 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01):
      continue  # restart markers, and a stuffed 0xFF00 of image data
    if pos + 2 > end:
      raise _jpeg_cut(path, f"the file ends inside marker 0xFF{marker:02X}")
    length = int.from_bytes(raw[pos : pos + 2], "big")
    if length < 2 or pos + length > end:
      raise _jpeg_cut(path, f"marker 0xFF{marker:02X} declares {length} bytes but the file ends first")
    return marker, raw[pos + 2 : pos + length], pos + length


def _check_progressive(raw: bytes, pos: int, frame: bytes, path: pathlib.Path) -> None:
  """The scans after a progressive (Huffman) frame header must refine every coefficient of every component to
  full precision (Al = 0) before the end-of-image marker, as every standard encoder's scan script does. A file cut
  between scans and closed with an end-of-image marker decodes without an error into a blurred or grey image."""
  if len(frame) < 6 or len(frame) < 6 + 3 * frame[5]:
    return  # a header the decoder will reject
  finest = {frame[6 + 3 * c]: np.full(64, 99) for c in range(frame[5])}  # the lowest Al reached per coefficient
  while True:
    marker, segment, pos = _next_segment(raw, pos, path)
    if marker == 0xD9:
      break
    if marker != 0xDA or not segment or len(segment) < 4 + 2 * segment[0]:
      continue
    n = segment[0]
    ss, se, approx = segment[1 + 2 * n], segment[2 + 2 * n], segment[3 + 2 * n]
    for c in range(n):
      levels = finest.get(segment[1 + 2 * c])
      if levels is not None and ss <= se < 64:
        levels[ss : se + 1] = np.minimum(levels[ss : se + 1], approx & 15)
  unfinished = {ident: int(np.sum(levels != 0)) for ident, levels in finest.items() if np.any(levels != 0)}
  if unfinished:
    which = ", ".join(f"component {ident}: {k} of 64" for ident, k in unfinished.items())
    raise errors.ImageReadError(
      f"progressive JPEG ends before its scans refine every coefficient ({which} unfinished): a cut file closed "
      "with an end-of-image marker, which would decode without an error into a blurred image; re-export it", path)


def check_jpeg(path: str | os.PathLike) -> None:
  """Raises ImageReadError unless every scan of a sequential Huffman JPEG holds data for all its blocks, or the
  scans of a progressive one refine every coefficient.

  Args:
    path: a JPEG file (lossless and arithmetic-coded JPEGs pass unchecked).

  Raises:
    ImageReadError: a scan that ends before its last block (a cut file, closed with an end-of-image marker or
      not), corrupt entropy-coded data, or a file that ends inside a marker segment.
  """
  path = pathlib.Path(path)
  count_units = _unit_counter()
  if count_units is None:
    if path.stat().st_size > _JPEG_PYTHON_MAX_BYTES:
      logging.warning("%s: not checked for a cut JPEG scan (install numba to check files over 8 MB)", path)
      return
    count_units = _count_units
  data = np.fromfile(path, np.uint8)
  raw = data.tobytes()
  maxcode = np.full((2, 4, 17), -1, np.int64)
  valptr = np.zeros((2, 4, 17), np.int64)
  mincode = np.zeros((2, 4, 17), np.int64)
  huffval = np.zeros((2, 4, 256), np.int64)
  defined = np.zeros((2, 4), bool)
  frame, restart, pos = None, 0, 2

  def cut(what: str) -> errors.ImageReadError:
    return _jpeg_cut(path, what)

  while True:
    marker, segment, pos = _next_segment(raw, pos, path)
    if marker == 0xD9:  # EOI
      return
    if marker == 0xC2:
      return _check_progressive(raw, pos, segment, path)
    if marker in _OTHER_FRAMES:
      return  # lossless or arithmetic-coded: not checked here
    if marker in _SEQUENTIAL_HUFFMAN:
      if len(segment) < 6:
        raise cut("frame header too short")
      height, width, n = struct.unpack(">HHB", segment[1:6])
      if height == 0 or len(segment) < 6 + 3 * n:
        return  # height given later (DNL), or a header the decoder will reject
      components = {}
      for c in range(n):
        ident, sampling, _ = segment[6 + 3 * c : 9 + 3 * c]
        components[ident] = (sampling >> 4, sampling & 15)
      frame = (width, height, components)
    elif marker == 0xC4:
      try:
        _huffman_tables(segment, maxcode, valptr, mincode, huffval, defined)
      except ValueError:
        raise cut("malformed Huffman table") from None
    elif marker == 0xDD:
      if len(segment) >= 2:
        restart = int.from_bytes(segment[:2], "big")
    elif marker == 0xDA:
      if frame is None:
        return
      width, height, components = frame
      h_max = max(h for h, _ in components.values())
      v_max = max(v for _, v in components.values())
      n = segment[0] if segment else 0
      block_dc, block_ac = [], []
      selected = []
      for c in range(n):
        ident, tables = segment[1 + 2 * c : 3 + 2 * c]
        if ident not in components:
          return
        selected.append(ident)
        dc, ac = tables >> 4, tables & 15
        if dc > 3 or ac > 3 or not (defined[0, dc] and defined[1, ac]):
          return
        h, v = components[ident]
        blocks = 1 if n == 1 else h * v
        block_dc += [dc] * blocks
        block_ac += [ac] * blocks
      if not selected:
        return
      if n == 1:
        h, v = components[selected[0]]
        cols, rows = _ceil_div(_ceil_div(width * h, h_max), 8), _ceil_div(_ceil_div(height * v, v_max), 8)
      else:
        cols, rows = _ceil_div(width, 8 * h_max), _ceil_div(height, 8 * v_max)
      units = cols * rows
      done, status, pos = count_units(
        data, pos, units, np.asarray(block_dc, np.int64), np.asarray(block_ac, np.int64), maxcode, valptr, mincode,
        huffval, restart,
      )
      if status == -2:
        raise errors.ImageReadError(f"JPEG holds corrupt image data (at byte {pos}, block row {done // cols})", path)
      if status == -1:
        raise cut(
          f"its image data ends after {done} of {units} blocks ({100 * done / units:.0f}% of the image): the rest "
          "would be filled in"
        )
      pos = int(pos)
