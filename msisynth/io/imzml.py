"""Reading and writing imzML mass spectrometry imaging files.

An imzML data set is a pair of files: `name.imzML` (XML: metadata, and for every spectrum its pixel position and
where its m/z and intensity arrays lie in the binary file) and `name.ibd` (the arrays, little-endian, after a
16-byte UUID). Two layouts exist:

- *continuous*: every spectrum shares one m/z array; each pixel stores only its intensities. The image is read
  as is: one channel per m/z value, or a subset of them.
- *processed*: every pixel has its own m/z array (typically centroided peaks). The image is made dense by binning
  the peaks onto a common m/z axis (bins of fixed width in ppm or Da), or by summing the peaks that fall within a
  tolerance of requested m/z values.

Layout of the result: an `MSIImage` whose cube is (H, W, C) float32 with row = y - min(y) and column =
x - min(x) in imzML pixel coordinates; pixels without a spectrum are 0 and False in the mask.

The XML metadata is read with pyimzml (`pyimzml.metadata.Metadata`); the spectrum list (positions, offsets,
lengths) is scanned with a fast byte-level tokenizer, checked for consistency, and read with an XML parser
instead when the file's layout is one the tokenizer does not recognise (a compiled scan, `msisynth.io._scan`,
reads the common layout first). The binary file is memory-mapped in windows and binned by compiled numba kernels
on several threads (`msisynth.io._engine`, `_kernels`), so memory stays near the size of the output cube.

Processed files are read by default to at most `DEFAULT_MAX_CHANNELS` channels chosen from the data
(`msisynth.io._auto`); `msisynth.io.sparse` keeps every peak in CSR form instead.

Real exporters' files are read as they are written:
- unsorted m/z arrays are valid: a processed spectrum's peaks are binned by value (as if sorted), and an
  unsorted shared axis of a continuous file is permuted once into increasing order; exactly repeated m/z values
  are merged into one channel (intensities summed). Both are logged. NaN, Inf or m/z <= 0 stay errors that name
  the spectrum.
- cvParams inside a <binaryDataArray> (array type, number format, compression) take precedence over the
  referenceable param group, as the mzML schema says.
- zlib-compressed arrays are decompressed once into a temporary copy of the .ibd (removed when no longer used).
- a file declared continuous is checked spectrum by spectrum: every m/z array must be the shared one, or a
  byte-identical copy; spectra with axes of their own make it read as processed, with a warning.

Imports at import time: NumPy, numba and absl only (pyimzml when a file is opened; never JAX or matplotlib).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from msisynth import errors, outputs
from msisynth.io import _engine
from msisynth.types import MSIImage

# Bin width of channels="every_bin" (the reader's default before channels="auto") when `bin_width` is not given.
DEFAULT_BIN_WIDTH_PPM = 10.0
# Most channels that channels="auto" gives a processed file.
DEFAULT_MAX_CHANNELS = 2000
# Largest output cube allocated unless the caller raises the limit (or passes max_cube_gib=None).
DEFAULT_MAX_CUBE_GIB = 4.0
CHANNEL_CHOICES = ("auto", "peaks", "bins", "every_bin")

_NS = "{http://psi.hupo.org/ms/mzml}"
_PRECISIONS = {
  "MS:1000521": "<f4",
  "MS:1000523": "<f8",
  "MS:1000519": "<i4",
  "MS:1000522": "<i8",
  "IMS:1000141": "<i4",
  "IMS:1000142": "<i8",
}
_ZLIB_COMPRESSION = "MS:1000574"
_NO_COMPRESSION = "MS:1000576"
# Compressions of the mzML vocabulary that msisynth does not decode (MS-Numpress, alone or with zlib).
_OTHER_COMPRESSIONS = {
  "MS:1002312": "MS-Numpress linear prediction",
  "MS:1002313": "MS-Numpress positive integer",
  "MS:1002314": "MS-Numpress short logged float",
  "MS:1002746": "MS-Numpress linear prediction followed by zlib",
  "MS:1002747": "MS-Numpress positive integer followed by zlib",
  "MS:1002748": "MS-Numpress short logged float followed by zlib",
}
_MZ_ARRAY = "MS:1000514"
_INTENSITY_ARRAY = "MS:1000515"
_CONTINUOUS = "IMS:1000030"
_PROCESSED = "IMS:1000031"
_UUID = "IMS:1000080"
_PIXEL_SIZE_X = "IMS:1000046"
_PIXEL_SIZE_Y = "IMS:1000047"
_CENTROID = "MS:1000127"
_PROFILE = "MS:1000128"
_POSITIVE = "MS:1000130"
_NEGATIVE = "MS:1000129"

# Values of a chunk of spectra processed at once when `chunk_spectra` is not given: small enough that the
# temporaries of one chunk stay in the tens of MB, large enough that per-chunk overheads vanish.
_CHUNK_VALUES = 1 << 20
_XML_BLOCK_BYTES = 1 << 24


# ---------------------------------------------------------------------------------------------------------------
# The index of a file: header metadata and per-spectrum positions, offsets and lengths.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Header:
  """What the XML says before the spectrum list."""

  declared_mode: str | None
  mz_group: str | None  # None when no referenceableParamGroup declares the array (its cvParams are inline)
  intensity_group: str | None
  mz_dtype: np.dtype | None  # None when the group does not say (inline cvParams must)
  intensity_dtype: np.dtype | None
  spectrum_count: int | None
  pixel_size_um: tuple[float, float] | None
  uuid: str | None
  polarity: str | None
  spectrum_type: str | None
  instrument: str | None
  mz_zlib: bool = False  # the group declares zlib compression
  intensity_zlib: bool = False


@dataclasses.dataclass(frozen=True)
class _Index:
  """Everything needed to read the spectra of one imzML/ibd pair without touching the XML again."""

  path: pathlib.Path
  ibd_path: pathlib.Path
  ibd_size: int
  header: _Header
  coords: np.ndarray  # (N, 3) int64: x, y, z as written in the file.
  mz_offsets: np.ndarray  # (N,) int64 byte offsets into the .ibd.
  mz_lengths: np.ndarray  # (N,) int64 number of values.
  intensity_offsets: np.ndarray
  intensity_lengths: np.ndarray
  continuous: bool  # all spectra share one m/z array.
  # (low, high) m/z over every spectrum when known exactly (set after unsorted m/z arrays are found), else None.
  mz_extent: tuple[float, float] | None = None
  # Keeps a temporary decompressed copy of the .ibd alive as long as an index refers to it.
  owner: Any = None

  @property
  def num_spectra(self) -> int:
    return int(self.coords.shape[0])

  def position(self, i: int) -> str:
    x, y, z = (int(v) for v in self.coords[i])
    return f"spectrum {i} at imzML position (x={x}, y={y}" + (f", z={z})" if z != 1 else ")")


def _local_name(tag: str) -> str:
  return tag.rsplit("}", 1)[-1]


def _parse_header(path: pathlib.Path) -> _Header:
  """Parses the XML up to <spectrumList> and interprets it with pyimzml's metadata classes."""
  from pyimzml.metadata import Metadata

  mzml = None
  spectrum_list = None
  try:
    with open(path, "rb") as fh:
      events = ET.iterparse(fh, events=("start",))
      _, root = next(events)
      if not root.tag.startswith(_NS) or _local_name(root.tag) not in ("mzML", "indexedmzML"):
        raise errors.ImzMLError(
          f"not an imzML file: the XML root element is <{_local_name(root.tag)}>, expected <mzML> in namespace "
          f"{_NS[1:-1]}",
          path,
        )
      mzml = root if _local_name(root.tag) == "mzML" else None
      for _, elem in events:
        if elem.tag == _NS + "mzML":
          mzml = elem
        elif elem.tag == _NS + "spectrumList":
          spectrum_list = elem
          break
  except ET.ParseError as e:
    raise errors.ImzMLError(f"not a well-formed imzML (XML) file: {e}", path) from e
  except StopIteration as e:
    raise errors.ImzMLError("the file is empty, not an imzML file", path) from e
  if mzml is None or spectrum_list is None:
    raise errors.ImzMLError("no <spectrumList> element: not an imzML file, or its XML is truncated", path)
  try:
    with warnings.catch_warnings():
      # pyimzml warns about every cvParam whose name differs from the ontology's spelling; these are harmless.
      warnings.simplefilter("ignore")
      meta = Metadata(mzml)
  except Exception as e:  # pyimzml raises assorted errors on incomplete headers.
    raise errors.ImzMLError(f"cannot read the imzML header ({type(e).__name__}: {e})", path) from e

  groups = meta.referenceable_param_groups

  def group_for(accession: str, what: str) -> str | None:
    ids = [gid for gid, group in groups.items() if accession in group.param_by_accession]
    if len(ids) > 1:
      raise errors.ImzMLError(f"several referenceableParamGroups declare the {what} array: {ids}", path)
    # No group: each <binaryDataArray> must then say what it holds (checked when the spectrum list is read).
    return ids[0] if ids else None

  def dtype_of(group_id: str | None, what: str) -> np.dtype | None:
    if group_id is None:
      return None
    found = [np.dtype(dt) for acc, dt in _PRECISIONS.items() if acc in groups[group_id].param_by_accession]
    if len(found) > 1:
      raise errors.ImzMLError(f"the {what} array's number format is ambiguous", path)
    return found[0] if found else None

  def zlib_of(group_id: str | None, what: str) -> bool:
    params = {} if group_id is None else groups[group_id].param_by_accession
    other = [name for acc, name in _OTHER_COMPRESSIONS.items() if acc in params]
    if other:
      raise errors.ImzMLError(f"the {what} arrays use {other[0]} compression, which msisynth does not decode", path)
    return _ZLIB_COMPRESSION in params

  mz_group = group_for(_MZ_ARRAY, "m/z")
  intensity_group = group_for(_INTENSITY_ARRAY, "intensity")

  content = meta.file_description.param_by_accession
  declared_mode = "continuous" if _CONTINUOUS in content else "processed" if _PROCESSED in content else None

  pixel_size = None
  for settings in meta.scan_settings.values():
    px = settings.param_by_accession.get(_PIXEL_SIZE_X)
    py = settings.param_by_accession.get(_PIXEL_SIZE_Y)
    px, py = (px if px is not None else py), (py if py is not None else px)
    try:
      if px is not None and float(px) > 0 and float(py) > 0:
        pixel_size = (float(py), float(px))
        break
    except (TypeError, ValueError):
      continue

  all_params = [content] + [g.param_by_accession for g in groups.values()]
  polarity = None
  if any(_POSITIVE in p for p in all_params):
    polarity = "positive"
  if any(_NEGATIVE in p for p in all_params):
    polarity = "mixed" if polarity else "negative"
  spectrum_type = (
    "profile"
    if any(_PROFILE in p for p in all_params)
    else "centroid"
    if any(_CENTROID in p for p in all_params)
    else None
  )
  instrument = None
  for config in meta.instrument_configurations.values():
    if config.cv_params:
      instrument = str(config.cv_params[0][0])
      break
  count = spectrum_list.get("count")
  return _Header(
    declared_mode=declared_mode,
    mz_group=mz_group,
    intensity_group=intensity_group,
    mz_dtype=dtype_of(mz_group, "m/z"),
    intensity_dtype=dtype_of(intensity_group, "intensity"),
    spectrum_count=int(count) if count and count.strip().isdigit() else None,
    pixel_size_um=pixel_size,
    uuid=None if content.get(_UUID) is None else str(content.get(_UUID)),
    polarity=polarity,
    spectrum_type=spectrum_type,
    instrument=instrument,
    mz_zlib=zlib_of(mz_group, "m/z"),
    intensity_zlib=zlib_of(intensity_group, "intensity"),
  )


def _spectrum_list_blocks(path: pathlib.Path) -> Iterator[bytes]:
  """Yields the bytes of <spectrumList> in blocks that each end after a whole </spectrum>."""
  with open(path, "rb") as fh:
    carry = b""
    started = False
    while True:
      data = fh.read(_XML_BLOCK_BYTES)
      buf = carry + data
      if not started:
        start = buf.find(b"<spectrumList")
        if start < 0:
          if not data:
            return
          carry = buf[-64:]
          continue
        buf = buf[start:]
        started = True
      end = buf.find(b"</spectrumList>")
      if end >= 0:
        yield buf[:end]
        return
      if not data:
        yield buf
        return
      cut = buf.rfind(b"</spectrum>")
      if cut < 0:
        carry = buf
        continue
      cut += len(b"</spectrum>")
      yield buf[:cut]
      carry = buf[cut:]


# Accessions that, inside the spectrum list, can only be per-array cvParams (array type, number format,
# compression); their presence sends the file to the XML parser, which applies them.
_INLINE_ARRAY_PARAMS = tuple(
  f'"{acc}"'.encode()
  for acc in (*_PRECISIONS, _ZLIB_COMPRESSION, _NO_COMPRESSION, *_OTHER_COMPRESSIONS, _MZ_ARRAY, _INTENSITY_ARRAY)
)
_SCAN_VALUES = re.compile(rb'accession="(IMS:100005[012]|IMS:100010[23])"[^>]*?value="([^"]*)"')


def _fix_wrapped_offsets(offsets: np.ndarray) -> np.ndarray:
  """Undoes the signed 32-bit overflow some writers commit, as pyimzml does."""
  if offsets.size == 0 or offsets.min() >= 0:
    return offsets
  prev = np.concatenate(([np.iinfo(np.int64).min], offsets[:-1]))
  wraps = np.cumsum((offsets < 0) & (prev >= 0))
  return offsets + wraps * (1 << 32)


def _scan_spectrum_list(path: pathlib.Path, header: _Header) -> dict[str, np.ndarray] | None:
  """Reads positions, offsets and lengths of every spectrum with a byte-level tokenizer.

  Returns None when the spectrum list is laid out in a way the tokenizer does not recognise (attributes in an
  unusual order, single quotes, inline array types, ...); the caller then uses pyimzml's parser.
  """
  if header.mz_group is None or header.intensity_group is None or header.mz_zlib or header.intensity_zlib:
    return None
  # A pattern that starts with a literal is scanned far faster by `re`; "ref" is case-sensitive, so attributes
  # such as cvRef or dataProcessingRef do not match.
  refs = re.compile(
    rb'ref="(' + re.escape(header.mz_group.encode()) + rb"|" + re.escape(header.intensity_group.encode()) + rb')"'
  )
  mz_ref = header.mz_group.encode()
  parts: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "y", "z", "offset", "length", "is_mz")}
  for block in _spectrum_list_blocks(path):
    if any(accession in block for accession in _INLINE_ARRAY_PARAMS):
      return None  # cvParams inside <binaryDataArray> override the groups: the XML parser reads them
    tokens = _SCAN_VALUES.findall(block)
    kinds = refs.findall(block)
    if not tokens:
      continue
    table = np.array(tokens, dtype="S")
    accession = table[:, 0]
    try:
      values = table[:, 1].astype(np.int64)
    except (ValueError, OverflowError):
      return None
    for key, acc in (
      ("x", b"IMS:1000050"),
      ("y", b"IMS:1000051"),
      ("z", b"IMS:1000052"),
      ("offset", b"IMS:1000102"),
      ("length", b"IMS:1000103"),
    ):
      parts[key].append(values[accession == acc])
    parts["is_mz"].append(np.array(kinds, dtype="S") == mz_ref)
  merged = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in parts.items()}
  n = merged["x"].size
  if n == 0 or merged["y"].size != n or merged["z"].size not in (0, n):
    return None
  if header.spectrum_count is not None and header.spectrum_count != n:
    return None
  if not merged["offset"].size == merged["length"].size == merged["is_mz"].size == 2 * n:
    return None
  is_mz = merged["is_mz"].astype(bool)
  first_is_mz = is_mz[0::2]
  if np.any(first_is_mz == is_mz[1::2]):
    return None
  mz_slot = 2 * np.arange(n) + np.where(first_is_mz, 0, 1)
  int_slot = 2 * np.arange(n) + np.where(first_is_mz, 1, 0)
  offsets = _fix_wrapped_offsets(merged["offset"])
  z = merged["z"] if merged["z"].size else np.ones(n, np.int64)
  return {
    "coords": np.stack([merged["x"], merged["y"], z], axis=1),
    "mz_offsets": offsets[mz_slot],
    "mz_lengths": merged["length"][mz_slot],
    "intensity_offsets": offsets[int_slot],
    "intensity_lengths": merged["length"][int_slot],
  }


def _parse_spectrum_list_xml(path: pathlib.Path, header: _Header) -> dict[str, Any]:
  """Reads the spectrum list with an XML parser, applying each <binaryDataArray>'s own cvParams.

  As the mzML schema says, a cvParam inside a <binaryDataArray> (array type, number format, compression)
  takes precedence over the referenceable param group it refers to. Returns the fields of `_Index`, plus the
  encoded byte lengths and zlib flags of every array and the number formats of the m/z and intensity arrays
  (which must each be the same in every spectrum).
  """
  groups: dict[str, dict[str, str]] = {}
  coords: list[tuple[int, int, int]] = []
  arrays = {kind: {k: [] for k in ("offset", "length", "encoded", "zlib", "dtype")} for kind in ("mz", "intensity")}
  precisions = {acc: np.dtype(dt) for acc, dt in _PRECISIONS.items()}
  known = {_ZLIB_COMPRESSION, _NO_COMPRESSION, *_OTHER_COMPRESSIONS}

  def params_of(element) -> dict[str, str]:
    return {cv.get("accession", ""): cv.get("value", "") for cv in element.findall(_NS + "cvParam")}

  def spectrum_error(message: str) -> errors.ImzMLError:
    return errors.ImzMLError(f"spectrum {len(coords)}: {message}", path)

  try:
    with open(path, "rb") as fh:
      spectrum_list = None
      for event, elem in ET.iterparse(fh, events=("start", "end")):
        tag = elem.tag
        if event == "start":
          if tag == _NS + "spectrumList":
            spectrum_list = elem
          continue
        if tag == _NS + "referenceableParamGroup":
          groups[elem.get("id", "")] = params_of(elem)
        elif tag == _NS + "spectrum":
          position = {acc: None for acc in ("IMS:1000050", "IMS:1000051", "IMS:1000052")}
          for cv in elem.iter(_NS + "cvParam"):
            if cv.get("accession") in position:
              position[cv.get("accession")] = cv.get("value")
          try:
            x, y = int(position["IMS:1000050"]), int(position["IMS:1000051"])
            z = 1 if position["IMS:1000052"] is None else int(position["IMS:1000052"])
          except (TypeError, ValueError) as e:
            raise spectrum_error("missing or non-integer pixel position") from e
          found = set()
          for bda in elem.iter(_NS + "binaryDataArray"):
            merged: dict[str, str] = {}
            for ref in bda.findall(_NS + "referenceableParamGroupRef"):
              merged.update(groups.get(ref.get("ref", ""), {}))
            inline = params_of(bda)
            # Inline number format and compression replace the group's (not add to them).
            if any(acc in precisions for acc in inline):
              merged = {k: v for k, v in merged.items() if k not in precisions}
            if any(acc in known for acc in inline):
              merged = {k: v for k, v in merged.items() if k not in known}
            merged.update(inline)
            kind = "mz" if _MZ_ARRAY in merged else "intensity" if _INTENSITY_ARRAY in merged else None
            if kind is None:
              continue  # another array type (charge, noise, ...): not used
            if kind in found:
              raise spectrum_error(f"two {kind} arrays")
            found.add(kind)
            dtypes = [dt for acc, dt in precisions.items() if acc in merged]
            if len(dtypes) != 1:
              raise spectrum_error(f"the {kind} array's number format is missing or ambiguous")
            other = [name for acc, name in _OTHER_COMPRESSIONS.items() if acc in merged]
            if other:
              raise spectrum_error(f"the {kind} array uses {other[0]} compression, which msisynth does not decode")
            zlib_array = _ZLIB_COMPRESSION in merged
            try:
              offset = int(merged["IMS:1000102"])
              length = int(merged["IMS:1000103"])
              encoded = int(merged["IMS:1000104"]) if merged.get("IMS:1000104", "") != "" else -1
            except (KeyError, ValueError) as e:
              raise spectrum_error(f"the {kind} array's external offset or length is missing or not an integer") from e
            if zlib_array and encoded < 0:
              raise spectrum_error(f"the zlib-compressed {kind} array has no external encoded length (IMS:1000104)")
            table = arrays[kind]
            table["offset"].append(offset)
            table["length"].append(length)
            table["encoded"].append(encoded)
            table["zlib"].append(zlib_array)
            table["dtype"].append(dtypes[0])
          if found != {"mz", "intensity"}:
            raise spectrum_error("needs one m/z and one intensity array")
          coords.append((x, y, z))
          elem.clear()
          if spectrum_list is not None:
            spectrum_list.remove(elem)  # keeps memory flat on files with millions of spectra
  except ET.ParseError as e:
    raise errors.ImzMLError(f"cannot read the spectrum list: not well-formed XML ({e}); truncated file?", path) from e
  if not coords:
    raise errors.ImzMLError("the imzML file lists no spectra", path)
  out: dict[str, Any] = {"coords": np.asarray(coords, dtype=np.int64).reshape(-1, 3)}
  for kind, name in (("mz", "m/z"), ("intensity", "intensity")):
    table = arrays[kind]
    kinds = set(table["dtype"])
    if len(kinds) > 1:
      raise errors.ImzMLError(
        f"the {name} arrays use several number formats ({', '.join(sorted(d.name for d in kinds))}); msisynth "
        "reads files whose arrays of one kind share one format",
        path,
      )
    out[f"{kind}_offsets"] = _fix_wrapped_offsets(np.asarray(table["offset"], np.int64))
    out[f"{kind}_lengths"] = np.asarray(table["length"], np.int64)
    out[f"{kind}_encoded"] = np.asarray(table["encoded"], np.int64)
    out[f"{kind}_zlib"] = np.asarray(table["zlib"], bool)
    out[f"{kind}_dtype"] = kinds.pop()
  return out


class _TemporaryFolder:
  """A folder deleted when the last reference to this object goes."""

  def __init__(self, prefix: str):
    import weakref

    self.path = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    weakref.finalize(self, shutil.rmtree, self.path, True)


def _inflate_ibd(
  path: pathlib.Path, ibd_path: pathlib.Path, fields: dict[str, Any], header: _Header
) -> tuple[pathlib.Path, Any]:
  """Writes the arrays, zlib-decompressed where compressed, to a temporary .ibd and points the index at it.

  Arrays that share bytes in the original file (a continuous file's one m/z array) share them in the copy.
  The first 16 bytes (the UUID) are copied as they are.

  Returns:
    (path of the temporary .ibd, the object that keeps it alive); `fields` offsets are updated in place.
  """
  import zlib

  folder = _TemporaryFolder(prefix=f"msisynth-{path.stem}-")
  out_path = folder.path / ibd_path.name
  ibd_size = ibd_path.stat().st_size
  total = {"mz": 0, "intensity": 0}
  with open(ibd_path, "rb") as src, open(out_path, "wb") as dst:
    dst.write(src.read(16))
    position = 16
    for kind, name in (("mz", "m/z"), ("intensity", "intensity")):
      dtype = header.mz_dtype if kind == "mz" else header.intensity_dtype
      itemsize = dtype.itemsize
      offsets, lengths = fields[f"{kind}_offsets"], fields[f"{kind}_lengths"]
      encoded, compressed = fields[f"{kind}_encoded"], fields[f"{kind}_zlib"]
      new_offsets = np.empty_like(offsets)
      done: dict[tuple[int, int, bool], int] = {}
      for i in range(offsets.size):
        key = (int(offsets[i]), int(encoded[i]), bool(compressed[i]))
        expected = int(lengths[i]) * itemsize
        if expected <= 0 or key in done:
          new_offsets[i] = done.get(key, position)
          continue
        nbytes = key[1] if key[2] else expected
        x, y, z = (int(v) for v in fields["coords"][i])
        where = f"spectrum {i} at imzML position (x={x}, y={y}" + (f", z={z})" if z != 1 else ")")
        if key[0] < 0 or key[0] + nbytes > ibd_size:
          raise errors.ImzMLError(
            f"{where}: its {name} array spans bytes {key[0]}-{key[0] + nbytes} but {ibd_path.name} has only "
            f"{ibd_size} bytes (truncated .ibd?)",
            path,
          )
        src.seek(key[0])
        data = src.read(nbytes)
        if key[2]:
          try:
            data = zlib.decompress(data)
          except zlib.error as e:
            raise errors.ImzMLError(f"{where}: its zlib-compressed {name} array does not decompress ({e})", path) from e
          total[kind] += 1
        if len(data) != expected:
          raise errors.ImzMLError(
            f"{where}: its {name} array holds {len(data)} bytes, expected {lengths[i]} values of "
            f"{dtype.name}",
            path,
          )
        dst.write(data)
        done[key] = new_offsets[i] = position
        position += len(data)
      fields[f"{kind}_offsets"] = new_offsets
  logging.info(
    "%s: decompressed %d zlib m/z and %d intensity arrays into a temporary %.1f MB copy of the .ibd",
    path.name, total["mz"], total["intensity"], position / 1e6,
  )  # fmt: skip
  return out_path, folder


def _compiled_scan(path: pathlib.Path, header: _Header) -> dict[str, np.ndarray] | None:
  """The spectrum list by the compiled scanner (`msisynth.io._scan`), or None when it leaves the file to the
  general tokenizer."""
  from msisynth.io import _scan

  if header.mz_group is None or header.intensity_group is None or header.mz_zlib or header.intensity_zlib:
    return None
  fields = _scan.scan_spectrum_list(path, header.mz_group, header.intensity_group, _fix_wrapped_offsets)
  if fields is None or (header.spectrum_count is not None and header.spectrum_count != fields["coords"].shape[0]):
    return None
  return fields


def _parse_with_pyimzml(path: pathlib.Path) -> dict[str, np.ndarray]:
  from pyimzml.ImzMLParser import ImzMLParser

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      parser = ImzMLParser(os.fspath(path), parse_lib="ElementTree", ibd_file=None)
  except Exception as e:  # ParseError, AttributeError, KeyError, ... on malformed spectrum lists.
    raise errors.ImzMLError(f"cannot read the spectrum list ({type(e).__name__}: {e})", path) from e
  if not parser.coordinates:
    raise errors.ImzMLError("the imzML file lists no spectra", path)
  try:
    return {
      "coords": np.asarray(parser.coordinates, dtype=np.int64).reshape(-1, 3),
      "mz_offsets": np.asarray(parser.mzOffsets, dtype=np.int64),
      "mz_lengths": np.asarray(parser.mzLengths, dtype=np.int64),
      "intensity_offsets": np.asarray(parser.intensityOffsets, dtype=np.int64),
      "intensity_lengths": np.asarray(parser.intensityLengths, dtype=np.int64),
    }
  except (OverflowError, ValueError, TypeError) as e:
    raise errors.ImzMLError(f"a position, offset or length of the spectrum list is not a 64-bit integer: {e}",
                            path) from e  # fmt: skip


def _find_ibd(path: pathlib.Path) -> pathlib.Path:
  exact = path.with_suffix(".ibd")
  if exact.is_file():
    return exact
  for candidate in path.parent.glob("*"):
    if candidate.stem == path.stem and candidate.suffix.lower() == ".ibd" and candidate.is_file():
      return candidate
  raise errors.ImzMLError(f"the binary file {path.stem}.ibd that holds the spectra is missing", path)


def _normalise_uuid(value: str) -> str:
  return re.sub(r"[^0-9a-f]", "", value.lower())


def _open_index(path: str | os.PathLike, *, check_uuid: bool = True, parser: str = "auto") -> _Index:
  """Parses and validates an imzML file's index (no spectra are read)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.ImzMLError("no such file", path)
  if path.suffix.lower() != ".imzml":
    raise errors.ImzMLError(f"expected a .imzML file, got suffix {path.suffix!r}", path)
  header = _parse_header(path)
  ibd_path = _find_ibd(path)
  ibd_size = ibd_path.stat().st_size
  if parser not in ("auto", "pyimzml"):
    raise errors.ConfigError(f"parser must be 'auto' or 'pyimzml', got {parser!r}")
  owner = None
  if parser == "pyimzml":
    if header.mz_zlib or header.intensity_zlib:
      raise errors.ImzMLError("zlib-compressed arrays are read with parser='auto' only", path)
    fields = _parse_with_pyimzml(path)
  else:
    fields = _compiled_scan(path, header)
    if fields is None:
      fields = _scan_spectrum_list(path, header)
    if fields is None:
      logging.info("%s: spectrum list not recognised by the fast scanner; reading it with the XML parser", path)
      fields = _parse_spectrum_list_xml(path, header)
      dtypes = {"mz_dtype": fields.pop("mz_dtype"), "intensity_dtype": fields.pop("intensity_dtype")}
      header = dataclasses.replace(header, **dtypes)
      if check_uuid:
        _check_uuid(path, ibd_path, ibd_size, header)
      if fields["mz_zlib"].any() or fields["intensity_zlib"].any():
        ibd_path, owner = _inflate_ibd(path, ibd_path, fields, header)
        ibd_size = ibd_path.stat().st_size
      for key in ("mz_encoded", "intensity_encoded", "mz_zlib", "intensity_zlib"):
        del fields[key]
  for dtype, what in ((header.mz_dtype, "m/z"), (header.intensity_dtype, "intensity")):
    if dtype is None:
      raise errors.ImzMLError(f"the {what} array's number format is not declared", path)
  declared, listed = header.spectrum_count, len(fields["coords"])
  if declared is not None and declared != listed:
    raise errors.ImzMLError(
      f'<spectrumList count="{declared}"> declares {declared} spectra but the file lists {listed}: its XML is cut '
      "short or corrupt",
      path,
    )
  index = _Index(
    path=path, ibd_path=ibd_path, ibd_size=ibd_size, header=header, continuous=False, owner=owner, **fields
  )
  _validate_index(index, check_uuid)
  return dataclasses.replace(index, continuous=_is_continuous(index))


def _is_continuous(index: _Index) -> bool:
  """Whether all spectra share one m/z array.

  True when every non-empty spectrum points at the same m/z array. A file declared continuous whose spectra
  point at separate copies counts as continuous only when every copy holds the same bytes as the first; when
  some spectra have their own axes the file is read as processed, with a warning that names the first.
  """
  nonempty = np.flatnonzero(index.mz_lengths > 0)
  if nonempty.size == 0:
    return index.header.declared_mode != "processed"
  lengths = index.mz_lengths[nonempty]
  if not np.all(lengths == lengths[0]):
    if index.header.declared_mode == "continuous":
      first = int(nonempty[np.flatnonzero(lengths != lengths[0])[0]])
      logging.warning(
        "%s: declared continuous but its m/z arrays differ in length (%s has %d values, the first %d); reading "
        "it as processed",
        index.path, index.position(first), int(index.mz_lengths[first]), int(lengths[0]),
      )  # fmt: skip
    return False
  offsets = index.mz_offsets[nonempty]
  if np.all(offsets == offsets[0]):
    return True
  if index.header.declared_mode != "continuous":
    return False
  # Declared continuous, with copies of the axis: compare every distinct copy with the first, byte for byte.
  nbytes = int(lengths[0]) * index.header.mz_dtype.itemsize
  distinct, first_use = np.unique(offsets, return_index=True)
  reference = np.empty(nbytes, np.uint8)
  differing = []
  with open(index.ibd_path, "rb") as fh:
    _read_exact(fh, int(offsets[0]), reference)
    scratch = _Scratch()
    per_chunk = max(1, _CHUNK_VALUES * 8 // max(nbytes, 1))
    for start in range(0, distinct.size, per_chunk):
      chunk = distinct[start : start + per_chunk]
      buf, starts = _read_arrays(fh, chunk, np.full(chunk.size, nbytes, np.int64), scratch)
      rows = _typed_arrays(buf, starts, np.full(chunk.size, nbytes), np.dtype(np.uint8))
      bad = np.flatnonzero((rows != reference).any(axis=1))
      differing.extend((start + bad).tolist())
  if not differing:
    return True
  own = np.isin(offsets, distinct[differing])
  first = int(nonempty[first_use[differing].min()])
  logging.warning(
    "%s: declared continuous, but %d of %d spectra have m/z axes of their own (the first: %s); reading it as "
    "processed",
    index.path, int(own.sum()), int(nonempty.size), index.position(first),
  )  # fmt: skip
  return False


def _check_uuid(path: pathlib.Path, ibd_path: pathlib.Path, ibd_size: int, header: _Header) -> None:
  if not header.uuid or ibd_size < 16:
    return
  with open(ibd_path, "rb") as fh:
    ibd_uuid = fh.read(16).hex()
  if _normalise_uuid(header.uuid) != ibd_uuid:
    raise errors.ImzMLError(
      f"the UUID in the .imzML ({header.uuid}) does not match the one at the start of "
      f"{ibd_path.name} ({ibd_uuid}): the two files do not belong together (pass check_uuid=False to "
      "read them anyway)",
      path,
    )


def _validate_index(index: _Index, check_uuid: bool) -> None:
  path = index.path
  if index.num_spectra == 0:
    raise errors.ImzMLError("the imzML file lists no spectra", path)
  if index.ibd_size < 16:
    raise errors.ImzMLError(f"{index.ibd_path.name} has {index.ibd_size} bytes, too short to hold its UUID", path)
  if check_uuid:
    _check_uuid(path, index.ibd_path, index.ibd_size, index.header)
  for name, offsets, lengths, dtype in (
    ("m/z", index.mz_offsets, index.mz_lengths, index.header.mz_dtype),
    ("intensity", index.intensity_offsets, index.intensity_lengths, index.header.intensity_dtype),
  ):
    bad = np.flatnonzero(lengths < 0)
    if bad.size:
      raise errors.ImzMLError(f"{index.position(bad[0])}: negative {name} array length", path)
    # Compared as room left after the offset, so that no product or sum can overflow int64 (lengths of 2^62).
    outside = (offsets < 0) | (offsets > index.ibd_size)
    room = np.where(outside, 0, index.ibd_size - np.clip(offsets, 0, index.ibd_size)) // dtype.itemsize
    bad = np.flatnonzero((lengths > 0) & (outside | (lengths > room)))
    if bad.size:
      i = bad[0]
      end = int(offsets[i]) + int(lengths[i]) * dtype.itemsize  # Python integers
      raise errors.ImzMLError(
        f"{index.position(i)}: its {name} array spans bytes {int(offsets[i])}-{end} but "
        f"{index.ibd_path.name} has only {index.ibd_size} bytes (truncated .ibd, or a corrupt offset or length)",
        path,
      )
  # An empty spectrum of a continuous file may keep the shared m/z array but store no intensities.
  mismatch = np.flatnonzero((index.intensity_lengths != index.mz_lengths) & (index.intensity_lengths > 0))
  if mismatch.size:
    i = mismatch[0]
    raise errors.ImzMLError(
      f"{index.position(i)}: m/z array has {index.mz_lengths[i]} values but intensity array has "
      f"{index.intensity_lengths[i]}",
      path,
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading arrays from the .ibd.
# ---------------------------------------------------------------------------------------------------------------


def _read_exact(fh, offset: int, out) -> None:
  fh.seek(offset)
  view = memoryview(out).cast("B")
  got = fh.readinto(view)
  if got != len(view):
    raise errors.ImzMLError(f"unexpected end of file at byte {offset + (got or 0)}", fh.name)


class _Scratch:
  """Work buffers of one reader thread, grown as needed and reused from chunk to chunk.

  Fresh memory costs a page fault per page on first touch; reusing buffers keeps that cost to the first chunk.
  """

  def __init__(self):
    self._buffers: dict[str, np.ndarray] = {}

  def get(self, name: str, shape: int | tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = self._buffers.get(name)
    if buf is None or buf.size < nbytes:
      buf = self._buffers[name] = np.empty(max(nbytes, 1), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _read_arrays(
  fh, byte_offsets: np.ndarray, byte_lengths: np.ndarray, scratch: _Scratch
) -> tuple[np.ndarray, np.ndarray]:
  """Reads byte ranges of the .ibd into one (reused) buffer.

  Returns:
    (buffer, starts): a uint8 buffer and the position of each requested range in it. Ranges that lie close
    together in the file are read with a single read of their span; scattered ranges are read one by one.
  """
  total = int(byte_lengths.sum())
  if byte_offsets.size == 0:
    return np.zeros(0, np.uint8), np.zeros(0, np.int64)
  lo = int(byte_offsets.min())
  hi = int((byte_offsets + byte_lengths).max())
  if hi - lo <= 1.25 * total + (1 << 16):
    buf = scratch.get("raw", hi - lo, np.uint8)
    _read_exact(fh, lo, buf)
    return buf, byte_offsets - lo
  buf = scratch.get("raw", total, np.uint8)
  starts = np.concatenate(([0], np.cumsum(byte_lengths)[:-1])).astype(np.int64)
  for offset, start, length in zip(byte_offsets.tolist(), starts.tolist(), byte_lengths.tolist()):
    if length:
      _read_exact(fh, offset, buf[start : start + length])
  return buf, starts


def _typed_arrays(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """Views or gathers arrays of `dtype` from a buffer: (n, L) when all have length L, else concatenated (sum,)."""
  n = starts.size
  if n and np.all(lengths == lengths[0]):
    count = int(lengths[0])
    steps = np.diff(starts)
    if n == 1 or np.all(steps == steps[0]) and steps[0] >= count * dtype.itemsize:
      step = int(steps[0]) if n > 1 else count * dtype.itemsize
      return np.ndarray((n, count), dtype=dtype, buffer=buf, offset=int(starts[0]), strides=(step, dtype.itemsize))
    return np.stack([np.frombuffer(buf, dtype, count, int(s)) for s in starts.tolist()])
  pieces = [np.frombuffer(buf, dtype, int(c), int(s)) for s, c in zip(starts.tolist(), lengths.tolist()) if c]
  return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def _read_scalars(path: pathlib.Path, byte_offsets: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """Reads one value of `dtype` at each byte offset (the first and last m/z of each spectrum)."""
  out = np.empty(byte_offsets.size, dtype)
  raw = out.view(np.uint8)
  size = dtype.itemsize
  with open(path, "rb", buffering=0) as fh:
    if hasattr(os, "pread"):  # one system call per value, and no read-ahead into a buffer
      fd = fh.fileno()
      chunks = [os.pread(fd, size, offset) for offset in byte_offsets.tolist()]
      joined = b"".join(chunks)
      if len(joined) != raw.size:
        raise errors.ImzMLError("unexpected end of file while reading m/z values", path)
      raw[:] = np.frombuffer(joined, np.uint8)
    else:
      for i, offset in enumerate(byte_offsets.tolist()):
        _read_exact(fh, offset, raw[i * size : (i + 1) * size])
  return out


# ---------------------------------------------------------------------------------------------------------------
# m/z axes: bins and windows.
# ---------------------------------------------------------------------------------------------------------------


def _check_unit(unit: str, name: str) -> str:
  if not isinstance(unit, str) or unit.lower() not in ("ppm", "da"):
    raise errors.ConfigError(f"{name} must be 'ppm' or 'da', got {unit!r}")
  return unit.lower()


def mz_bin_edges(mz_min: float, mz_max: float, bin_width: float, bin_unit: str = "ppm") -> np.ndarray:
  """Edges of the m/z bins that `read_imzml` uses to bin spectra.

  Bin k holds the peaks with edges[k] <= m/z < edges[k + 1]. Bins of `bin_unit="da"` are `bin_width` Da wide;
  bins of `bin_unit="ppm"` are geometric, each `bin_width` ppm wider than the last (edges[k] = mz_min * (1 +
  bin_width * 1e-6) ** k). There are just enough bins that `mz_max` lies inside the last one, so the last edge
  lies above `mz_max`. The channel m/z of a bin is the midpoint of its edges.

  Args:
    mz_min: lower edge of the first bin, m/z (> 0).
    mz_max: highest m/z to cover (>= mz_min).
    bin_width: bin width in ppm or Da (> 0).
    bin_unit: "ppm" or "da".

  Returns:
    float64 (num_bins + 1,) strictly increasing edges.

  Raises:
    ConfigError: on non-finite, non-positive or inverted arguments.
  """
  unit = _check_unit(bin_unit, "bin_unit")
  if not (np.isfinite(mz_min) and np.isfinite(mz_max) and mz_min > 0 and mz_max >= mz_min):
    raise errors.ConfigError(f"need 0 < mz_min <= mz_max, got ({mz_min}, {mz_max})")
  if not (np.isfinite(bin_width) and bin_width > 0):
    raise errors.ConfigError(f"bin_width must be positive, got {bin_width}")
  plan = _BinPlan.create(float(mz_min), float(mz_max), float(bin_width), unit)
  return plan.edges()


@dataclasses.dataclass(frozen=True)
class _BinPlan:
  """Bins of fixed width (Da) or fixed relative width (ppm, geometric) from `lo`.

  A value's bin is floor(t) with t = (mz - lo) / width, or log(mz / lo) / log(1 + ppm * 1e-6), in float64.
  """

  lo: float
  scale: float  # 1 / width, or 1 / log(1 + ppm * 1e-6)
  num_bins: int
  geometric: bool
  bin_width: float
  bin_unit: str
  data_range: bool = False  # lo and hi are the data's own extremes: no value lies outside the bins

  @classmethod
  def create(cls, lo: float, hi: float, bin_width: float, unit: str, data_range: bool = False) -> _BinPlan:
    geometric = unit == "ppm"
    scale = 1.0 / math.log1p(bin_width * 1e-6) if geometric else 1.0 / bin_width
    top = (math.log(hi) - math.log(lo)) * scale if geometric else (hi - lo) * scale
    return cls(lo, scale, int(math.floor(top)) + 1, geometric, bin_width, unit, data_range)

  def edges(self) -> np.ndarray:
    k = np.arange(self.num_bins + 1, dtype=np.float64)
    if self.geometric:
      return self.lo * np.exp(k / self.scale)
    return self.lo + k / self.scale

  def centres(self) -> np.ndarray:
    e = self.edges()
    return 0.5 * (e[:-1] + e[1:])

  def slots(self, mz: np.ndarray, scratch: _Scratch | None = None) -> np.ndarray:
    """Slot of each value: 1 + its bin, 0 below the first bin, num_bins + 1 above the last (intp)."""
    scratch = scratch or _Scratch()
    t = scratch.get("t", mz.shape, np.float64)
    # float64 loops even for float32 m/z: float32 arithmetic would misplace values near bin edges.
    # t = (log(mz) - log(lo)) * scale + 1, evaluated exactly as `create` places the top bin, so the lowest and
    # highest m/z of the data land in the first and last bin.
    if self.geometric:
      np.log(mz, out=t, dtype=np.float64)
      t -= math.log(self.lo)
    else:
      np.subtract(mz, self.lo, out=t, dtype=np.float64)
    t *= self.scale
    t += 1.0
    # Slots 0 and num_bins + 1 collect values outside the bins. With the data's own range every value is inside,
    # and clipping to the bins keeps the extremes there whatever the last-bit rounding of the logarithms.
    # Clipping also keeps the integer conversion below in range.
    if self.data_range:
      np.clip(t, 1, self.num_bins, out=t)
    else:
      np.clip(t, 0, self.num_bins + 1, out=t)
    slots = scratch.get("slots", mz.shape, np.intp)
    np.copyto(slots, t, casting="unsafe")
    return slots


@dataclasses.dataclass(frozen=True)
class _WindowPlan:
  """Output channels that each sum the peaks within [lo_k, hi_k] (inclusive), windows possibly overlapping.

  Windows are split into layers of non-overlapping windows; each layer assigns a peak to at most one window.
  """

  lows: np.ndarray
  highs: np.ndarray
  layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (flat edges [lo, next(hi), ...], channel of each window)

  @classmethod
  def create(cls, centres: np.ndarray, tol: float, unit: str) -> _WindowPlan:
    half = centres * tol * 1e-6 if unit == "ppm" else np.full_like(centres, tol)
    lows, highs = centres - half, centres + half
    layer_windows: list[list[int]] = []
    layer_end: list[float] = []
    for k in np.argsort(lows, kind="stable").tolist():
      for j, end in enumerate(layer_end):
        if end <= lows[k]:
          layer_windows[j].append(k)
          layer_end[j] = np.nextafter(highs[k], np.inf)
          break
      else:
        layer_windows.append([k])
        layer_end.append(np.nextafter(highs[k], np.inf))
    layers = []
    for ks in layer_windows:
      ks = np.asarray(ks)
      flat = np.empty(2 * ks.size)
      flat[0::2] = lows[ks]
      flat[1::2] = np.nextafter(highs[ks], np.inf)
      layers.append((flat, ks))
    return cls(lows, highs, tuple(layers))

  @property
  def num_bins(self) -> int:
    return int(self.lows.size)

  def slot_layers(self, mz: np.ndarray) -> Iterator[np.ndarray]:
    """For each layer, the slot of each value: 1 + the channel of its window, 0 when in none."""
    for flat, channel in self.layers:
      pos = np.searchsorted(flat, mz, side="right")
      inside = (pos & 1).astype(bool)
      yield np.where(inside, channel[np.minimum(pos >> 1, channel.size - 1)] + 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------------------------


def _validate_read_args(
  mz_range, mz_values, tol, tol_unit, bin_width, bin_unit, nan_policy, chunk_spectra, num_threads, max_cube_gib
):
  tol_unit = _check_unit(tol_unit, "tol_unit")
  bin_unit = _check_unit(bin_unit, "bin_unit")
  if mz_range is not None:
    try:
      lo, hi = (float(v) for v in mz_range)
    except (TypeError, ValueError) as e:
      raise errors.ConfigError(f"mz_range must be a pair (low, high), got {mz_range!r}") from e
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
      raise errors.ConfigError(f"mz_range must satisfy 0 < low < high, got {mz_range!r}")
    mz_range = (lo, hi)
  if mz_values is not None:
    if mz_range is not None or bin_width is not None:
      raise errors.ConfigError("give either mz_values (with tol) or mz_range/bin_width, not both")
    values = np.asarray(mz_values, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
      raise errors.ConfigError("mz_values must be a non-empty sequence of positive finite m/z values")
    values = np.sort(values)
    if np.any(np.diff(values) == 0):
      raise errors.ConfigError("mz_values contains duplicates")
    mz_values = values
  if not (np.isfinite(tol) and tol >= 0):
    raise errors.ConfigError(f"tol must be >= 0, got {tol}")
  if bin_width is not None and not (np.isfinite(bin_width) and bin_width > 0):
    raise errors.ConfigError(f"bin_width must be positive, got {bin_width}")
  if nan_policy not in ("raise", "zero"):
    raise errors.ConfigError(f"nan_policy must be 'raise' or 'zero', got {nan_policy!r}")
  if chunk_spectra is not None and (not isinstance(chunk_spectra, int | np.integer) or chunk_spectra < 1):
    raise errors.ConfigError(f"chunk_spectra must be a positive integer or None, got {chunk_spectra!r}")
  if num_threads is not None and (not isinstance(num_threads, int | np.integer) or num_threads < 1):
    raise errors.ConfigError(f"num_threads must be a positive integer or None, got {num_threads!r}")
  if max_cube_gib is not None and not max_cube_gib > 0:
    raise errors.ConfigError(f"max_cube_gib must be positive or None, got {max_cube_gib}")
  return mz_range, mz_values, tol_unit, bin_unit


# A dense cube whose measured pixels cover less than this share of its rectangle is refused (or cropped).
MIN_COVERAGE = 0.01


def _core_box(x: np.ndarray, y: np.ndarray) -> tuple[int, int, int, int]:
  """The rectangle (x0, x1, y0, y1) of the bulk of the positions: quartiles widened by 3 interquartile ranges."""
  bounds = []
  for v in (x, y):
    q1, q3 = np.quantile(v.astype(np.float64), [0.25, 0.75])
    reach = 3 * (q3 - q1) + 2
    bounds += [math.floor(q1 - reach), math.ceil(q3 + reach)]
  return tuple(bounds)


def _area(x: np.ndarray, y: np.ndarray) -> int:
  # Python integers: the area of positions near 2^62 does not overflow.
  return (int(x.max()) - int(x.min()) + 1) * (int(y.max()) - int(y.min()) + 1)


def _grid(
  index: _Index, z: int | None, outliers: str = "raise"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int], dict]:
  """Selects the spectra of one z plane and maps them to (row, column) of the dense image."""
  coords = index.coords
  z_values = np.unique(coords[:, 2])
  if z is None:
    if z_values.size > 1:
      raise errors.ImzMLError(f"3D data with z positions {z_values.tolist()}; pass z= to read one plane", index.path)
    selected = np.arange(index.num_spectra)
  else:
    selected = np.flatnonzero(coords[:, 2] == z)
    if selected.size == 0:
      raise errors.ImzMLError(f"no spectra at z={z}; the file has z positions {z_values.tolist()}", index.path)
  extra = {}
  x, y = coords[selected, 0], coords[selected, 1]
  area = _area(x, y)
  if selected.size < MIN_COVERAGE * area:
    x0, x1, y0, y1 = _core_box(x, y)
    outside = (x < x0) | (x > x1) | (y < y0) | (y > y1)
    named = ", ".join(index.position(int(i)) for i in selected[outside][:5])
    more = f" and {int(outside.sum()) - 5} more" if outside.sum() > 5 else ""
    inside = ~outside
    cropped_ok = outside.any() and inside.any() and inside.sum() >= MIN_COVERAGE * _area(x[inside], y[inside])
    if outliers == "raise" or not cropped_ok:
      where = f"; outlying: {named}{more}" if outside.any() else ""
      hint = " (pass outliers='crop' to leave them out)" if cropped_ok else ""
      raise errors.ImzMLError(
        f"the {selected.size} spectra cover only {100 * selected.size / area:.3g} % of the "
        f"{int(y.max()) - int(y.min()) + 1} x {int(x.max()) - int(x.min()) + 1} pixel rectangle of their "
        f"positions{where}{hint}",
        index.path,
      )
    logging.warning("%s: left out %d spectra at outlying positions: %s%s", index.path.name, int(outside.sum()),
                    named, more)  # fmt: skip
    extra["dropped_spectra"] = [int(i) for i in selected[outside]]
    selected = selected[inside]
    x, y = coords[selected, 0], coords[selected, 1]
  x0, y0 = int(x.min()), int(y.min())
  rows, cols = y - y0, x - x0
  shape = (int(rows.max()) + 1, int(cols.max()) + 1)
  linear = rows * shape[1] + cols
  unique, first, counts = np.unique(linear, return_index=True, return_counts=True)
  if unique.size != linear.size:
    dup = selected[first[np.flatnonzero(counts > 1)[0]]]
    raise errors.ImzMLError(f"{index.position(dup)}: several spectra share this pixel position", index.path)
  offset = {"coordinate_offset": [x0, y0], **extra}
  return selected, rows, cols, shape, offset


def _chunks(costs: np.ndarray, chunk_spectra: int | None) -> list[tuple[int, int]]:
  """Splits spectra into consecutive chunks of about `_CHUNK_VALUES` values.

  Args:
    costs: values each spectrum brings into memory (its stored values plus its row of the output).
    chunk_spectra: a fixed number of spectra per chunk instead, or None.
  """
  n = costs.size
  if chunk_spectra is not None:
    return [(s, min(s + chunk_spectra, n)) for s in range(0, n, chunk_spectra)]
  group = (np.cumsum(np.maximum(costs, 1)) - 1) // _CHUNK_VALUES
  bounds = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), n]
  return list(zip(bounds[:-1], bounds[1:]))


def _run_chunks(
  chunks: list[tuple[int, int]],
  work: Callable[[int, int, Any, _Scratch], None],
  path: pathlib.Path,
  num_threads: int,
  progress: bool,
  what: str,
) -> None:
  """Runs `work(start, stop, fh, scratch)` over chunks, on a thread pool when there are several threads and chunks."""
  start_time = time.perf_counter()
  total = chunks[-1][1] if chunks else 0
  done = 0
  next_report = 0.1
  local = threading.local()
  handles = []
  lock = threading.Lock()

  def run(chunk):
    fh = getattr(local, "fh", None)
    if fh is None:
      fh = open(path, "rb")  # one handle per worker thread, closed at the end
      local.fh = fh
      with lock:
        handles.append(fh)
    scratch = getattr(local, "scratch", None)
    if scratch is None:
      scratch = local.scratch = _Scratch()
    work(chunk[0], chunk[1], fh, scratch)
    return chunk

  def report(chunk):
    nonlocal done, next_report
    done += chunk[1] - chunk[0]
    if progress and total and (done / total >= next_report or done == total):
      elapsed = time.perf_counter() - start_time
      logging.info("%s: %s %d/%d spectra (%.0f%%) in %.1f s", path.name, what, done, total, 100 * done / total, elapsed)
      next_report = math.floor(done / total * 10 + 1) / 10

  try:
    if num_threads <= 1 or len(chunks) <= 1:
      for chunk in chunks:
        report(run(chunk))
      return
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
      pending: list[concurrent.futures.Future] = []
      for chunk in chunks:
        pending.append(pool.submit(run, chunk))
        if len(pending) >= 2 * num_threads:
          report(pending.pop(0).result())
      for future in pending:
        report(future.result())
  finally:
    for fh in handles:
      fh.close()


def _first_bad_spectrum(bad: np.ndarray, lengths: np.ndarray | None) -> int:
  """Row of the first spectrum with a True in `bad`: (n, L) rows, or (sum,) values of spectra of `lengths`."""
  if lengths is None:
    return int(np.flatnonzero(bad.any(axis=1))[0])
  return int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(bad)[0], side="right"))


def _check_finite(
  values: np.ndarray, index: _Index, spectrum_ids: np.ndarray, lengths: np.ndarray | None, nan_policy: str, what: str
) -> np.ndarray:
  """Raises on NaN/Inf (naming the pixel), or with nan_policy='zero' returns the values with them set to 0."""
  if values.dtype.kind != "f" or np.isfinite(values.sum(dtype=np.float64)):
    return values  # one cheap pass; the sum of finite m/z or intensity values does not overflow float64
  finite = np.isfinite(values)
  if finite.all():
    return values
  if nan_policy == "zero":
    return np.where(finite, values, 0).astype(values.dtype, copy=False)
  row = _first_bad_spectrum(~finite, lengths)
  hint = " (pass nan_policy='zero' to read them as 0)" if what == "intensities" else ""
  raise errors.ImzMLError(f"{index.position(spectrum_ids[row])}: NaN or Inf {what}{hint}", index.path)


class _MzOutsideRange(Exception):
  """m/z values lie outside the range read from the first and last value of each array (unsorted arrays)."""


def _check_mz(
  mz: np.ndarray,
  index: _Index,
  spectrum_ids: np.ndarray,
  lengths: np.ndarray | None,
  data_range: tuple[float, float] | None = None,
) -> int:
  """Checks m/z values read from processed spectra; returns how many of the spectra are not sorted.

  Unsorted m/z arrays are valid data (real exporters write them): binning and window sums do not depend on the
  order, and exactly repeated m/z values of one spectrum add up in the same channel, so the result is that of
  the sorted spectrum. NaN, Inf and m/z <= 0 are errors naming the pixel.

  Raises:
    ImzMLError: NaN, Inf or m/z <= 0.
    _MzOutsideRange: a value lies outside `data_range` (the caller then measures the exact range and reads again).
  """
  _check_finite(mz, index, spectrum_ids, lengths, "raise", "m/z values")
  if mz.size == 0:
    return 0
  low, high = float(mz.min()), float(mz.max())
  if low <= 0:
    row = _first_bad_spectrum(mz <= 0, lengths)
    raise errors.ImzMLError(f"{index.position(spectrum_ids[row])}: m/z <= 0 in its m/z array ({low})", index.path)
  if mz.ndim == 2:
    unsorted = int(np.count_nonzero((mz[:, 1:] < mz[:, :-1]).any(axis=1)))
  else:
    decreasing = np.zeros(mz.size, bool)
    decreasing[1:] = mz[1:] < mz[:-1]
    decreasing[np.cumsum(lengths)[:-1]] = False  # first value of each spectrum vs last of the previous one
    unsorted = 0
    if decreasing.any():
      unsorted = int(np.unique(np.searchsorted(np.cumsum(lengths), np.flatnonzero(decreasing), side="right")).size)
  if data_range is not None and (low < data_range[0] or high > data_range[1]):
    raise _MzOutsideRange()
  return unsorted


def _exact_mz_range(index: _Index, selected: np.ndarray, chunk_spectra, threads, progress) -> tuple[float, float]:
  """Smallest and largest m/z over the selected spectra, reading every m/z array (for unsorted arrays)."""
  extent = [math.inf, -math.inf]
  lock = threading.Lock()
  mz_dtype = index.header.mz_dtype

  def work(start: int, stop: int, fh, scratch: _Scratch) -> None:
    ids = selected[start:stop]
    ids = ids[index.mz_lengths[ids] > 0]
    if ids.size == 0:
      return
    lengths = index.mz_lengths[ids]
    buf, starts = _read_arrays(fh, index.mz_offsets[ids], lengths * mz_dtype.itemsize, scratch)
    mz = _typed_arrays(buf, starts, lengths, mz_dtype)
    _check_mz(mz, index, ids, None if mz.ndim == 2 else lengths)
    with lock:
      extent[0] = min(extent[0], float(mz.min()))
      extent[1] = max(extent[1], float(mz.max()))

  _run_chunks(_chunks(index.mz_lengths[selected], chunk_spectra), work, index.ibd_path, threads, progress,
              "measured the m/z range of")  # fmt: skip
  return extent[0], extent[1]


def _data_mz_range(index: _Index, selected: np.ndarray) -> tuple[float, float]:
  """Smallest and largest m/z over the selected spectra, from the first and last value of each m/z array."""
  lengths = index.mz_lengths[selected]
  nonempty = selected[lengths > 0]
  if nonempty.size == 0:
    return (math.nan, math.nan)
  if index.mz_extent is not None:
    return index.mz_extent
  if index.continuous:
    # One array; read it whole, since a shared axis may be unsorted.
    axis = np.empty(int(index.mz_lengths[nonempty[0]]), index.header.mz_dtype)
    with open(index.ibd_path, "rb") as fh:
      _read_exact(fh, int(index.mz_offsets[nonempty[0]]), axis)
    if not np.all(np.isfinite(axis)) or np.any(axis <= 0):
      raise errors.ImzMLError(f"{index.position(int(nonempty[0]))}: the shared m/z array holds NaN, Inf or m/z <= 0",
                              index.path)  # fmt: skip
    return float(axis.min()), float(axis.max())
  values = _engine.mz_extremes(index, nonempty)
  bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
  if bad.size:
    i = int(nonempty[bad[0] // 2])
    value = values.reshape(-1)[bad[0]]
    what = "NaN or Inf" if not np.isfinite(value) else f"m/z <= 0 ({value})"
    raise errors.ImzMLError(f"{index.position(i)}: {what} in its m/z array", index.path)
  return float(values.min()), float(values.max())


def _effective_threads(num_threads: int | None) -> int:
  if num_threads is not None:
    return int(num_threads)
  return max(1, min(4, os.cpu_count() or 1))


def reader_errors(function: Callable) -> Callable:
  """Turns any raw OverflowError / ValueError / IndexError of a reader into an ImzMLError naming the file.

  The readers check what they read; this is the net under those checks, so that a corrupt file never surfaces
  as a bare NumPy error.
  """

  @functools.wraps(function)
  def wrapped(path, *args, **kwargs):
    try:
      return function(path, *args, **kwargs)
    except errors.MSISynthError:
      raise
    except (OverflowError, ValueError, IndexError) as e:
      raise errors.ImzMLError(f"corrupt or unsupported file ({type(e).__name__}: {e})", path) from e

  return wrapped


@reader_errors
def read_imzml(
  path: str | os.PathLike,
  *,
  mz_range: tuple[float, float] | None = None,
  mz_values: Sequence[float] | np.ndarray | None = None,
  tol: float = 10.0,
  tol_unit: str = "ppm",
  bin_width: float | None = None,
  bin_unit: str = "ppm",
  keep_empty_bins: bool = False,
  channels: str = "auto",
  max_channels: int = DEFAULT_MAX_CHANNELS,
  peak_options: dict | None = None,
  z: int | None = None,
  nan_policy: str = "raise",
  check_uuid: bool = True,
  chunk_spectra: int | None = None,
  num_threads: int | None = None,
  max_cube_gib: float | None = DEFAULT_MAX_CUBE_GIB,
  outliers: str = "raise",
  progress: bool = True,
  overflow: str = "raise",
) -> MSIImage:
  """Reads an imzML file (continuous or processed) into a dense MSI cube.

  Channels of the result:

  - `mz_values` given: one channel per value (sorted increasing), the sum of the intensities whose m/z lies
    within `value ± tol` (ppm of the value, or Da), inclusive. Works in both modes; windows may overlap.
  - continuous file, no `bin_width`: the file's own channels, all of them or those with m/z in `mz_range`
    (inclusive). An unsorted shared m/z array is read in increasing m/z, repeated values summed (logged).
  - processed file, `channels="auto"` (the default): at most `max_channels` channels, chosen from the data
    (see `msisynth.io._auto`): peaks are picked on the mean spectrum (smoothing, MAD noise, SNR >= 3, present
    in >= 1 % of the pixels; `peak_options` changes these, see `msisynth.peaks.pick_peaks_mean`) and their
    median width (ppm) is the data's resolution; when binning at that resolution gives at most `max_channels`
    non-empty bins the file is binned so ("bins"), otherwise each channel integrates one of the `max_channels`
    strongest peaks ("peaks"). A log line and `metadata["binning"]` say which, with the width found.
    `channels="peaks"` or `"bins"` forces one of the two.
  - processed file with `bin_width`, or `channels="every_bin"` (the behaviour before "auto"): intensities summed
    into bins of `bin_width` (ppm: geometric bins; Da: fixed width; default 10 ppm) from the lowest m/z of
    `mz_range` or of the data, up to its highest; see `mz_bin_edges` (membership is decided against the edges
    in float64, as `np.histogram` does). Channel m/z values are bin midpoints. Bins that no spectrum reaches
    are dropped (a first pass over the data finds them), unless `keep_empty_bins`. Continuous files with
    `bin_width` are binned the same way.

  Pixels: row = y - min(y), column = x - min(x) over the file's spectra; positions without a spectrum are 0
  with mask False. A listed spectrum with no values (length 0) counts as measured: mask True, all channels 0.
  When the measured pixels cover under 1 % of that rectangle (a few spectra at outlying positions), the read is
  refused naming the outlying spectra, or, with `outliers="crop"`, those spectra are left out (logged, and
  listed in `metadata["dropped_spectra"]`).

  The `.ibd` is memory-mapped in windows of 64 MB and binned by compiled (numba) kernels on `num_threads`
  threads, so memory stays near the size of the output cube; a subset of channels of a continuous file reads
  only the bytes it needs.

  Args:
    path: the .imzML file; the .ibd with the same stem must sit beside it.
    mz_range: (low, high) m/z to keep, or None for everything.
    mz_values: m/z values of the output channels (summed within ± tol), or None.
    tol: half-width of the windows around `mz_values`.
    tol_unit: "ppm" or "da".
    bin_width: bin width for processed data (or to re-bin continuous data); None: see `channels`.
    bin_unit: "ppm" or "da".
    keep_empty_bins: with binning, keep channels for bins that no spectrum reaches (a regular axis).
    channels: processed files without `bin_width` or `mz_values`: "auto", "peaks", "bins" or "every_bin"
      (every non-empty bin of `bin_width`, default 10 ppm).
    max_channels: most channels "auto" and "peaks" give.
    peak_options: overrides of the peak picking of "auto", "peaks" and "bins": smooth_sigma (fine-axis
      channels of 2 ppm), snr, min_pixel_fraction, deisotope_peaks, window_fwhm.
    z: the z position to read from a 3D file; None for 2D files.
    nan_policy: "raise" (default) on NaN/Inf intensities, naming the pixel; "zero" reads them as 0.
    check_uuid: refuse an .ibd whose UUID differs from the one the .imzML names.
    chunk_spectra: spectra per chunk, or None to size chunks at about a million values.
    num_threads: reader threads (None: as many as there are CPUs).
    max_cube_gib: refuse to allocate an output cube larger than this (GiB; default 4); None allows any size.
    outliers: "raise" or "crop", for spectra at outlying positions (see above).
    progress: log progress with absl.logging and show a progress bar (`msisynth.progress`).
    overflow: "raise" (default) when an intensity, or a sum of them in one channel, exceeds the float32 range
      (about 3.4e38) of the cube, naming the pixel; "clip" stores it as the largest float32 instead.

  Returns:
    MSIImage with float32 cube (H, W, C), float64 m/z (C,), mask (H, W), `pixel_size_um` from the file's
    "pixel size x/y" parameters (None when absent) and metadata: source, mode ("continuous" or "processed" as
    read), declared_mode, num_spectra, coordinate_offset ([x, y] of pixel (0, 0) in file coordinates),
    polarity, spectrum_type, instrument, uuid, and the binning used.

  Raises:
    ImzMLError: missing or truncated .ibd, malformed XML or a file that is not imzML, UUID mismatch, NaN/Inf
      values or m/z <= 0 (naming the spectrum), a compression other than zlib, no non-empty spectrum, several
      spectra at one pixel.
    ConfigError: invalid or conflicting arguments, or an output cube larger than `max_cube_gib`.
  """
  mz_range, mz_values, tol_unit, bin_unit = _validate_read_args(
    mz_range, mz_values, tol, tol_unit, bin_width, bin_unit, nan_policy, chunk_spectra, num_threads, max_cube_gib
  )
  if channels not in CHANNEL_CHOICES:
    raise errors.ConfigError(f"channels must be one of {CHANNEL_CHOICES}, got {channels!r}")
  if not isinstance(max_channels, int | np.integer) or max_channels < 1:
    raise errors.ConfigError(f"max_channels must be a positive integer, got {max_channels!r}")
  if outliers not in ("raise", "crop"):
    raise errors.ConfigError(f"outliers must be 'raise' or 'crop', got {outliers!r}")
  if overflow not in ("raise", "clip"):
    raise errors.ConfigError(f"overflow must be 'raise' or 'clip', got {overflow!r}")
  start_time = time.perf_counter()
  index = _open_index(path, check_uuid=check_uuid)
  path = index.path
  selected, rows, cols, shape, offset = _grid(index, z, outliers=outliers)
  nonempty = index.intensity_lengths[selected] > 0
  if not nonempty.any():
    raise errors.ImzMLError("every spectrum is empty (length 0): there is nothing to read", path)
  threads = _effective_threads(num_threads)
  metadata = {
    "source": os.fspath(path),
    "declared_mode": index.header.declared_mode,
    "num_spectra": int(selected.size),
    "polarity": index.header.polarity,
    "spectrum_type": index.header.spectrum_type,
    "instrument": index.header.instrument,
    "uuid": index.header.uuid,
    **offset,
  }
  if z is not None:
    metadata["z"] = int(z)

  def check_size(num_channels: int) -> None:
    gib = shape[0] * shape[1] * num_channels * 4 / 2**30
    if max_cube_gib is not None and gib > max_cube_gib:
      raise errors.ConfigError(
        f"{path}: the output cube would be {shape[0]}x{shape[1]}x{num_channels} float32 = {gib:.1f} GiB "
        f"(> max_cube_gib={max_cube_gib}); choose mz_range, mz_values, a wider bin_width or fewer max_channels, "
        "or pass a larger max_cube_gib (None: no limit)"
      )

  def allocate(num_channels: int) -> np.ndarray:
    check_size(num_channels)
    return np.zeros((shape[0], shape[1], num_channels), np.float32)

  request = _ReadRequest(index, selected, rows, cols, check_size, allocate, mz_range, mz_values, tol, tol_unit,
                         bin_width, bin_unit, keep_empty_bins, nan_policy, chunk_spectra, threads,
                         progress)  # fmt: skip
  if index.continuous:
    cube, mz, binning, maybe_overflow = _read_continuous(request)
  else:
    try:
      cube, mz, binning, maybe_overflow = _read_processed(request, channels, int(max_channels), peak_options)
    except _MzOutsideRange:
      # Unsorted m/z arrays: their first and last values are not the extremes. Measure the range and bin again.
      extent = _exact_mz_range(index, selected, chunk_spectra, threads, progress)
      logging.info("%s: m/z arrays are not sorted; the data spans m/z %.4f-%.4f", path.name, *extent)
      index = dataclasses.replace(index, mz_extent=extent)
      request = dataclasses.replace(request, index=index)
      cube, mz, binning, maybe_overflow = _read_processed(request, channels, int(max_channels), peak_options)
  if maybe_overflow:
    cube = _check_overflow(cube, index, selected, rows, cols, overflow)
  metadata["mode"] = "continuous" if index.continuous else "processed"
  metadata["binning"] = binning
  mask = np.zeros(shape, bool)
  mask[rows, cols] = True
  if progress:
    logging.info(
      "%s: read %s %dx%dx%d cube in %.2f s", path.name, metadata["mode"], *cube.shape, time.perf_counter() - start_time
    )
  return MSIImage(cube=cube, mz=mz, mask=mask, pixel_size_um=index.header.pixel_size_um, metadata=metadata)


def _check_overflow(cube: np.ndarray, index: _Index, selected, rows, cols, overflow: str) -> np.ndarray:
  """Raises when float32 cube values overflowed to Inf (NaN/Inf inputs are refused before), or clips them."""
  if np.isfinite(cube.sum(dtype=np.float64)):
    return cube  # one cheap pass
  bad = ~np.isfinite(cube)
  if overflow == "clip":
    big = np.finfo(np.float32).max
    cube[bad] = np.where(cube[bad] > 0, big, -big)
    return cube
  r, c = np.argwhere(bad.any(axis=2))[0]
  k = np.flatnonzero((rows == r) & (cols == c))
  where = index.position(selected[k[0]]) if k.size else f"pixel (row {r}, column {c})"
  raise errors.ImzMLError(
    f"{where}: intensities exceed the float32 range of the cube (|x| > {np.finfo(np.float32).max:.3g}); pass "
    "overflow='clip' to store them as the largest float32",
    index.path,
  )


def _column_windows(axis: np.ndarray, plan: _BinPlan | _WindowPlan) -> tuple[np.ndarray, np.ndarray]:
  """Channel index ranges [a_k, b_k) of the shared m/z axis that fall into each output channel."""
  if isinstance(plan, _WindowPlan):
    a = np.searchsorted(axis, plan.lows, side="left")
    b = np.searchsorted(axis, plan.highs, side="right")
  else:
    slots = plan.slots(axis)
    counts = np.bincount(slots, minlength=plan.num_bins + 2)[1:-1]
    first = int(np.searchsorted(slots, 1))  # the axis is increasing, so are its slots
    a = first + np.concatenate(([0], np.cumsum(counts)[:-1]))
    b = a + counts
  return a.astype(np.int64), b.astype(np.int64)


def _reduce_layers(a: np.ndarray, b: np.ndarray, width: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Plans sums of columns a[k]:b[k] of a (n, width) block with np.add.reduceat, exactly (no differences).

  Non-empty windows are split into layers of non-overlapping ones. In a layer, the window edges cut the
  columns into segments, and each window is exactly the segment that starts at its first column.

  Returns:
    [(channels, bounds, segments)]: reduceat at `bounds` gives segment sums; `segments` picks the
    segment of each of `channels`.
  """
  layer_channels: list[list[int]] = []
  layer_end: list[int] = []
  for k in np.argsort(a, kind="stable").tolist():
    if b[k] <= a[k]:
      continue
    for j, end in enumerate(layer_end):
      if end <= a[k]:
        layer_channels[j].append(k)
        layer_end[j] = int(b[k])
        break
    else:
      layer_channels.append([k])
      layer_end.append(int(b[k]))
  layers = []
  for ks in layer_channels:
    ks = np.asarray(ks)
    bounds = np.unique(np.concatenate([a[ks], b[ks]]))
    bounds = bounds[bounds < width]
    layers.append((ks, bounds, np.searchsorted(bounds, a[ks])))
  return layers


def _sort_shared_axis(axis: np.ndarray, path: pathlib.Path) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray | None]]:
  """Sorts an unsorted shared m/z axis and merges exactly repeated values (real exporters write such axes).

  Returns:
    (the sorted axis without repeats, (order, starts)): `block[:, order]` puts a spectrum's channels in m/z
    order; `np.add.reduceat(..., starts, axis=1)` then sums repeated channels (starts None: no repeats).
  """
  order = np.argsort(axis, kind="stable")
  ordered = axis[order]
  unique, starts = np.unique(ordered, return_index=True)
  repeated = unique[np.diff(np.append(starts, ordered.size)) > 1]
  steps = np.diff(axis)
  logging.warning(
    "%s: the shared m/z array is not sorted (it fails to increase at %d places: %d decreases, %d repeats)%s; its %d "
    "channels are read in increasing m/z order%s",
    path, int(np.sum(steps <= 0)), int(np.sum(steps < 0)), int(np.sum(steps == 0)),
    f" and repeats {repeated.size} value(s) ({', '.join(f'{v:.4f}' for v in repeated[:5])})" if repeated.size else "",
    axis.size,
    f", each repeated value merged into one channel (intensities summed): {unique.size} channels" if repeated.size
    else "",
  )  # fmt: skip
  return unique, (order, starts if repeated.size else None)


@dataclasses.dataclass(frozen=True)
class _ReadRequest:
  """What `read_imzml` asks of `_read_continuous` / `_read_processed`: the file's index, the selected spectra and
  their pixels, the output-size guards and the channel options (as validated by `_validate_read_args`)."""

  index: _Index
  selected: np.ndarray
  rows: np.ndarray
  cols: np.ndarray
  check_size: Callable[[int], None]
  allocate: Callable[[int], np.ndarray]
  mz_range: tuple[float, float] | None
  mz_values: np.ndarray | None
  tol: float
  tol_unit: str
  bin_width: float | None
  bin_unit: str
  keep_empty_bins: bool
  nan_policy: str
  chunk_spectra: int | None
  threads: int
  progress: bool

  def fields(self) -> tuple:
    """The fields in order, not copied (`dataclasses.astuple` would deep-copy the arrays)."""
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _shared_axis(index, selected) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The shared m/z array of a continuous file: (as stored, sorted distinct values, column -> distinct index).

  An unsorted shared array is read in increasing m/z; columns with the same m/z value are summed into one
  channel. Both are logged (`_sort_shared_axis`).
  """
  path = index.path
  first = int(selected[np.argmax(index.mz_lengths[selected] > 0)])
  length = int(index.mz_lengths[first])
  with open(index.ibd_path, "rb") as fh:
    axis = np.empty(length, index.header.mz_dtype)
    _read_exact(fh, int(index.mz_offsets[first]), axis)
  axis = axis.astype(np.float64)
  if not np.all(np.isfinite(axis)):
    i = int(np.flatnonzero(~np.isfinite(axis))[0])
    raise errors.ImzMLError(f"{index.position(first)}: the shared m/z array holds NaN or Inf (value {i})", path)
  if np.any(axis <= 0):
    i = int(np.flatnonzero(axis <= 0)[0])
    raise errors.ImzMLError(f"{index.position(first)}: the shared m/z array holds m/z <= 0 (value {i}: {axis[i]})",
                            path)  # fmt: skip
  if axis.size < 2 or np.all(np.diff(axis) > 0):
    return axis, axis, np.arange(axis.size)
  _sort_shared_axis(axis, path)  # logs what is unsorted and repeated
  distinct, inverse = np.unique(axis, return_inverse=True)
  return axis, distinct, inverse.reshape(-1)


def _read_continuous(request: _ReadRequest):
  """A continuous file's cube: (cube, m/z, binning, whether the cube may hold values beyond float32)."""
  (index, selected, rows, cols, check_size, allocate, mz_range, mz_values, tol, tol_unit, bin_width, bin_unit,
   keep_empty_bins, nan_policy, chunk_spectra, threads, progress) = request.fields()  # fmt: skip
  path = index.path
  raw_axis, axis, inverse = _shared_axis(index, selected)
  if mz_values is not None:
    plan = _WindowPlan.create(mz_values, tol, tol_unit)
    binning = {"method": "windows", "tol": float(tol), "tol_unit": tol_unit}
    a, b = _column_windows(axis, plan)
    empty = np.flatnonzero(b <= a)
    if empty.size:
      logging.warning(
        "%s: no channel within ± %g %s of m/z %s; those channels are 0", path, tol, tol_unit,
        mz_values[empty][:5].tolist(),
      )  # fmt: skip
    if axis is raw_axis:
      cube = _read_continuous_windows(index, selected, rows, cols, allocate, mz_values, (a, b), nan_policy,
                                      chunk_spectra, threads, progress)  # fmt: skip
      return cube, mz_values, binning, True
    # An unsorted shared axis: bin every spectrum (with the shared m/z array) onto the windows.
    cube = allocate(mz_values.size)
    flat_rows = rows.astype(np.int64) * cube.shape[1] + cols
    binned = _engine.bin_processed(index, selected, flat_rows, cube.reshape(-1, cube.shape[2]),
                                   _engine.KernelAxis.windows(plan.lows, plan.highs), nan_policy=nan_policy,
                                   num_threads=threads, show_progress=progress, allow_unsorted=True)  # fmt: skip
    return cube, mz_values, binning, binned.overflow
  lo, hi = mz_range if mz_range is not None else (float(axis[0]), float(axis[-1]))
  if bin_width is not None:
    plan = _BinPlan.create(lo, hi, bin_width, bin_unit, data_range=mz_range is None)
    check_size(plan.num_bins)
    slots = plan.slots(axis)
    distinct_dest = np.where((slots >= 1) & (slots <= plan.num_bins), slots - 1, -1)
    out_mz = plan.centres()
    binning = {"method": "bins", "bin_width": float(bin_width), "bin_unit": bin_unit, "mz_range": [lo, hi]}
    if not keep_empty_bins:
      # As for processed files: bins that no m/z value of the shared axis reaches are left out.
      occupied = np.zeros(plan.num_bins, bool)
      occupied[distinct_dest[distinct_dest >= 0]] = True
      remap = np.where(occupied, np.cumsum(occupied) - 1, -1)
      distinct_dest = np.where(distinct_dest >= 0, remap[np.maximum(distinct_dest, 0)], -1)
      out_mz = out_mz[occupied]
      binning["empty_bins_dropped"] = int(plan.num_bins - occupied.sum())
  else:
    first_channel, stop_channel = np.searchsorted(axis, lo, side="left"), np.searchsorted(axis, hi, side="right")
    if stop_channel <= first_channel:
      raise errors.ImzMLError(f"no channel in m/z range {mz_range}; the file spans {axis[0]:.4f}-{axis[-1]:.4f}", path)
    out_mz = axis[first_channel:stop_channel]
    distinct_dest = np.arange(axis.size) - first_channel
    distinct_dest[(distinct_dest < 0) | (distinct_dest >= out_mz.size)] = -1
    binning = {"method": "none", "mz_range": None if mz_range is None else [lo, hi]}
    if axis is not raw_axis:
      binning["shared_axis_sorted"] = False
      binning["repeated_mz_summed"] = int(raw_axis.size - axis.size)
  column_dest = distinct_dest[inverse]
  used = np.flatnonzero(column_dest >= 0)
  cube = allocate(out_mz.size)
  overflow = False
  if used.size:
    c0, c1 = int(used[0]), int(used[-1]) + 1  # only the file's channels c0:c1 are read
    flat_rows = rows.astype(np.int64) * cube.shape[1] + cols
    overflow = _engine.copy_continuous(index, selected, flat_rows, cube.reshape(-1, cube.shape[2]), c0, c1 - c0,
                                       column_dest[c0:c1], nan_policy=nan_policy, num_threads=threads,
                                       show_progress=progress)  # fmt: skip
  return cube, out_mz, binning, overflow


def _read_continuous_windows(index, selected, rows, cols, allocate, out_mz, windows, nan_policy, chunk_spectra, threads,
                             progress):  # fmt: skip
  """Ion windows of a continuous file with a sorted shared axis: reads only the channels inside the windows."""
  used = windows[1] > windows[0]
  c0 = int(windows[0][used].min()) if used.any() else 0
  c1 = int(windows[1][used].max()) if used.any() else 0
  layers = _reduce_layers(windows[0] - c0, windows[1] - c0, c1 - c0)
  cube = allocate(out_mz.size)
  itemsize = index.header.intensity_dtype.itemsize
  lengths = index.intensity_lengths[selected]
  chunks = _chunks(np.where(lengths > 0, c1 - c0, 0) + out_mz.size, chunk_spectra)

  def work(start: int, stop: int, fh, scratch: _Scratch) -> None:
    ids = selected[start:stop]
    keep = index.intensity_lengths[ids] > 0
    ids, r, c = ids[keep], rows[start:stop][keep], cols[start:stop][keep]
    if ids.size == 0 or c1 <= c0:
      return
    byte_offsets = index.intensity_offsets[ids] + c0 * itemsize
    buf, starts = _read_arrays(fh, byte_offsets, np.full(ids.size, (c1 - c0) * itemsize, np.int64), scratch)
    block = _typed_arrays(buf, starts, np.full(ids.size, c1 - c0), index.header.intensity_dtype)
    block = _check_finite(block, index, ids, None, nan_policy, "intensities")
    sums = np.zeros((block.shape[0], out_mz.size), np.float64)
    for channels, bounds, segments in layers:
      sums[:, channels] = np.add.reduceat(block, bounds, axis=1, dtype=np.float64)[:, segments]
    cube[r, c, :] = sums

  _run_chunks(chunks, work, index.ibd_path, threads, progress, "read")
  return cube


def _kernel_bins(plan: _BinPlan, remap: np.ndarray | None = None) -> _engine.KernelAxis:
  return _engine.KernelAxis.bins(plan.edges(), clip=plan.data_range, remap=remap)


def _occupied_bins(index, selected, plan: _BinPlan, nan_policy, progress, check_range=False) -> np.ndarray:
  """Which bins of `plan` hold intensity from at least one of the selected spectra (one pass over the data).

  Raises:
    _MzOutsideRange: with `check_range`, when some m/z array is unsorted (its first and last values may not be the
      range the bins were planned on).
  """
  hist = _engine.histogram_processed(index, selected, _kernel_bins(plan), nan_policy=nan_policy,
                                     show_progress=progress)  # fmt: skip
  if check_range and hist.unsorted:
    raise _MzOutsideRange()
  occupied = hist.count > 0
  if plan.data_range and occupied.size:
    # Values at the extremes are clipped into the first and last bins by the binning pass.
    occupied[0] = occupied[-1] = True
  return occupied


def _read_processed(request: _ReadRequest, channels="auto", max_channels=DEFAULT_MAX_CHANNELS, peak_options=None):
  """A processed file's cube: (cube, m/z, binning, whether the cube may hold values beyond float32)."""
  (index, selected, rows, cols, check_size, allocate, mz_range, mz_values, tol, tol_unit, bin_width, bin_unit,
   keep_empty_bins, nan_policy, chunk_spectra, threads, progress) = request.fields()  # fmt: skip
  path = index.path
  del chunk_spectra  # the compiled path sizes its own windows
  # Bins over the data's range from first/last values: unsorted arrays may reach beyond it (checked below).
  check_range = mz_range is None and index.mz_extent is None
  if mz_values is not None:
    plan = _WindowPlan.create(mz_values, tol, tol_unit)
    axis = _engine.KernelAxis.windows(plan.lows, plan.highs)
    out_mz = mz_values
    binning = {"method": "windows", "tol": float(tol), "tol_unit": tol_unit}
  elif channels == "every_bin" or bin_width is not None or keep_empty_bins:
    width = DEFAULT_BIN_WIDTH_PPM if bin_width is None else float(bin_width)
    unit = "ppm" if bin_width is None else bin_unit
    lo, hi = mz_range if mz_range is not None else _data_mz_range(index, selected)
    plan = _BinPlan.create(lo, hi, width, unit, data_range=mz_range is None)
    out_mz = plan.centres()
    binning = {"method": "bins", "bin_width": width, "bin_unit": unit, "mz_range": [lo, hi]}
    if keep_empty_bins:
      check_size(plan.num_bins)
      axis = _kernel_bins(plan)
    else:
      occupied = _occupied_bins(index, selected, plan, nan_policy, progress, check_range)
      remap = np.where(occupied, np.cumsum(occupied) - 1, -1)
      axis = _kernel_bins(plan, remap)
      out_mz = out_mz[occupied]
      binning["empty_bins_dropped"] = int(plan.num_bins - occupied.sum())
    if progress:
      logging.info("%s: %d bins of %g %s over m/z %.4f-%.4f", path.name, out_mz.size, width, unit, lo, hi)
  else:
    from msisynth.io import _auto

    axis, out_mz, binning = _auto.choose_channels(
      index, selected, channels=channels, max_channels=max_channels, mz_range=mz_range, nan_policy=nan_policy,
      progress=progress, options=peak_options, check_size=check_size, check_range=check_range,
    )  # fmt: skip
  cube = allocate(out_mz.size)
  flat_rows = rows.astype(np.int64) * cube.shape[1] + cols
  unsorted, overflow = _engine.bin_processed(index, selected, flat_rows, cube.reshape(-1, cube.shape[2]), axis,
                                             nan_policy=nan_policy, num_threads=threads,
                                             show_progress=progress)  # fmt: skip
  if unsorted:
    if check_range and mz_values is None:
      raise _MzOutsideRange()  # the bins were planned on first/last values, which unsorted arrays do not bound
    logging.warning(
      "%s: %d of %d spectra have m/z arrays that are not sorted; their peaks are binned by m/z value (repeated "
      "values summed), as if sorted",
      path.name, unsorted, int(selected.size),
    )  # fmt: skip
    binning["unsorted_spectra"] = unsorted
  return cube, out_mz, binning, overflow


def read_ion_image(
  path: str | os.PathLike,
  mz: float,
  tol: float = 10.0,
  tol_unit: str = "ppm",
  **kwargs,
) -> MSIImage:
  """Reads one ion image: the sum of intensities within `mz ± tol` at every pixel.

  Only the bytes of the channels in the window are read from continuous files.

  Args:
    path: the .imzML file.
    mz: m/z of the ion.
    tol: half-width of the window.
    tol_unit: "ppm" or "da".
    **kwargs: other `read_imzml` arguments (z, nan_policy, check_uuid, progress, ...).

  Returns:
    MSIImage with one channel (cube (H, W, 1)); `msi.cube[..., 0]` is the ion image.

  Raises:
    ImzMLError, ConfigError: as `read_imzml`.
  """
  if not np.isscalar(mz):
    raise errors.ConfigError(f"mz must be one number, got {mz!r}; use read_imzml(mz_values=...) for several")
  return read_imzml(path, mz_values=[float(mz)], tol=tol, tol_unit=tol_unit, **kwargs)


@reader_errors
def imzml_info(path: str | os.PathLike, *, check_uuid: bool = True) -> dict[str, Any]:
  """Describes an imzML file without reading its intensities.

  The m/z range is taken from the shared axis of a continuous file (exact, sorted or not), and from the first and
  last value of every m/z array of a processed one (two small reads per spectrum): exact when the arrays are
  sorted, which is not checked here.

  Args:
    path: the .imzML file.
    check_uuid: refuse an .ibd whose UUID differs from the one the .imzML names.

  Returns:
    dict with source, mode, declared_mode, shape (H, W) of the dense image, num_spectra, num_empty_spectra,
    z_values, coordinate_offset, mz_range (low, high), num_channels (continuous) or peaks_per_spectrum
    (min/median/max, processed), pixel_size_um (y, x) or None, mz_dtype, intensity_dtype, polarity,
    spectrum_type, instrument, uuid.

  Raises:
    ImzMLError: as `read_imzml` for the index (missing/truncated .ibd, malformed XML, ...).
  """
  index = _open_index(path, check_uuid=check_uuid)
  coords = index.coords
  x0, y0 = int(coords[:, 0].min()), int(coords[:, 1].min())
  shape = (int(coords[:, 1].max()) - y0 + 1, int(coords[:, 0].max()) - x0 + 1)
  lengths = index.mz_lengths
  continuous = index.continuous
  info = {
    "source": os.fspath(index.path),
    "mode": "continuous" if continuous else "processed",
    "declared_mode": index.header.declared_mode,
    "shape": shape,
    "num_spectra": index.num_spectra,
    "num_empty_spectra": int(np.sum(index.intensity_lengths == 0)),
    "z_values": np.unique(coords[:, 2]).tolist(),
    "coordinate_offset": [x0, y0],
    "mz_range": _data_mz_range(index, np.arange(index.num_spectra)),
    "pixel_size_um": index.header.pixel_size_um,
    "mz_dtype": index.header.mz_dtype.name,
    "intensity_dtype": index.header.intensity_dtype.name,
    "polarity": index.header.polarity,
    "spectrum_type": index.header.spectrum_type,
    "instrument": index.header.instrument,
    "uuid": index.header.uuid,
  }
  if continuous:
    info["num_channels"] = int(lengths.max())
  else:
    info["peaks_per_spectrum"] = {
      "min": int(lengths.min()),
      "median": float(np.median(lengths)),
      "max": int(lengths.max()),
    }
  return info


# ---------------------------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------------------------


def _pixel_size_params(pixel_size_um: tuple[float, float]) -> str:
  py, px = pixel_size_um
  return "".join(
    f'\n      <cvParam cvRef="IMS" accession="{acc}" name="{name}" value="{value!r}" unitCvRef="UO" '
    f'unitAccession="UO:0000017" unitName="micrometer"/>'
    for acc, name, value in ((_PIXEL_SIZE_X, "pixel size x", float(px)), (_PIXEL_SIZE_Y, "pixel size y", float(py)))
  )


def write_imzml(
  path: str | os.PathLike,
  msi: MSIImage,
  mode: str = "continuous",
  *,
  overwrite: bool = False,
  mz_dtype: type = np.float64,
  intensity_dtype: type = np.float32,
  polarity: str | None = None,
  progress: bool = True,
) -> pathlib.Path:
  """Writes an MSIImage as an imzML/ibd pair with pyimzml's `ImzMLWriter`.

  Only measured pixels (mask True) are written, at imzML position (x, y) = (column, row) +
  `msi.metadata["coordinate_offset"]` (default (1, 1)). Continuous mode writes the full m/z axis once and every
  pixel's intensities; processed mode writes, for each pixel, the m/z and intensity of its non-zero channels (a
  pixel whose channels are all zero is written as a single zero-intensity peak at the first m/z, because
  imzML writers cannot store empty spectra). `pixel_size_um`, when set, is written as the "pixel size x/y"
  parameters. Files are written under temporary names and renamed at the end, so a failed write leaves no
  partial file behind.

  Reading back: `read_imzml(path)` for continuous files, and `read_imzml(path, mz_values=msi.mz, tol=0,
  tol_unit="da")` for processed ones, give back the same cube, m/z and mask (within the precision of
  `intensity_dtype`).

  Args:
    path: output .imzML path (the .ibd is written beside it).
    msi: the image to write.
    mode: "continuous" or "processed".
    overwrite: replace existing files; otherwise refuse.
    mz_dtype: numpy type of the stored m/z values (float32 or float64).
    intensity_dtype: numpy type of the stored intensities (float32 or float64).
    polarity: "positive", "negative" or None.
    progress: log progress with absl.logging.

  Returns:
    The path of the written .imzML file.

  Raises:
    ConfigError: bad arguments, or the files exist and overwrite is False.
    DataError: the cube holds NaN/Inf, or no pixel is measured.
  """
  from pyimzml.ImzMLWriter import ImzMLWriter

  if not isinstance(msi, MSIImage):
    raise errors.ConfigError(f"msi must be an MSIImage, got {type(msi).__name__}")
  if mode not in ("continuous", "processed"):
    raise errors.ConfigError(f"mode must be 'continuous' or 'processed', got {mode!r}")
  if np.dtype(mz_dtype) not in (np.float32, np.float64) or np.dtype(intensity_dtype) not in (np.float32, np.float64):
    raise errors.ConfigError("mz_dtype and intensity_dtype must be float32 or float64")
  if polarity not in (None, "positive", "negative"):
    raise errors.ConfigError(f"polarity must be 'positive', 'negative' or None, got {polarity!r}")
  path = pathlib.Path(path)
  if path.suffix.lower() != ".imzml":
    raise errors.ConfigError(f"{path}: the output file must end in .imzML")
  imzml_path, ibd_path = path.with_suffix(".imzML"), path.with_suffix(".ibd")
  outputs.refuse_existing(imzml_path, ibd_path, overwrite=overwrite)
  if not path.parent.is_dir():
    raise errors.ConfigError(f"{path.parent}: output directory does not exist")
  rows, cols = np.nonzero(msi.mask)
  if rows.size == 0:
    raise errors.DataError("no pixel is measured (mask is all False); nothing to write", msi.metadata.get("source"))
  if msi.num_channels == 0:
    raise errors.DataError("the image has no channels; nothing to write", msi.metadata.get("source"))
  x0, y0 = (int(v) for v in msi.metadata.get("coordinate_offset", (1, 1)))
  mz = msi.mz.astype(np.float64)
  tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
  tmp_imzml, tmp_ibd = tmp_dir / imzml_path.name, tmp_dir / ibd_path.name
  start_time = time.perf_counter()
  try:
    with ImzMLWriter(
      os.fspath(tmp_imzml), mz_dtype=mz_dtype, intensity_dtype=intensity_dtype, mode=mode, polarity=polarity
    ) as writer:
      next_report = 0.1
      for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        spectrum = msi.cube[r, c, :]
        if not np.all(np.isfinite(spectrum)):
          raise errors.DataError(f"pixel (row={r}, column={c}) has NaN/Inf intensities", msi.metadata.get("source"))
        if mode == "continuous":
          writer.addSpectrum(mz, spectrum, (c + x0, r + y0))
        else:
          nonzero = np.flatnonzero(spectrum)
          if nonzero.size == 0:
            writer.addSpectrum(mz[:1], np.zeros(1, spectrum.dtype), (c + x0, r + y0))
          else:
            writer.addSpectrum(mz[nonzero], spectrum[nonzero], (c + x0, r + y0))
        if progress and (i + 1) / rows.size >= next_report:
          logging.info(
            "%s: wrote %d/%d spectra in %.1f s", path.name, i + 1, rows.size, time.perf_counter() - start_time
          )
          next_report += 0.1
    # pyimzml names the run after the full output path; use the file's stem, and add the pixel size.
    text = tmp_imzml.read_text(encoding="ISO-8859-1")
    run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    text = text.replace(f'id="{os.path.splitext(os.fspath(tmp_imzml))[0]}"', f'id="{run_id}"', 1)
    if msi.pixel_size_um is not None:
      anchor = re.search(r'<cvParam[^>]*name="max count of pixels y"[^>]*/>', text)
      if anchor is None:
        raise errors.DataError("could not place the pixel size in the written XML", tmp_imzml)
      text = text[: anchor.end()] + _pixel_size_params(msi.pixel_size_um) + text[anchor.end() :]
    tmp_imzml.write_text(text, encoding="ISO-8859-1")
    os.replace(tmp_ibd, ibd_path)
    os.replace(tmp_imzml, imzml_path)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  return imzml_path
