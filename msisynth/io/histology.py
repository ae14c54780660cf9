"""Histology and microscopy images: reading, writing, tissue masks, stain separation and resampling.

Layout: images are NumPy arrays, row-major, (H, W) or (H, W, C) with channels last. Histology RGB is float32 in
[0, 1]. Pixel (r, c) of an image with pixel size (py, px) µm has its centre at (x, y) = (c * px, r * py) µm
(docs/architecture.md); `resample_to_pixel_size` keeps that point fixed.

Readers: TIFF through tifffile (8/16/32-bit integer or float, channels first or last, planar microscopy
stacks; LZW, Deflate, JPEG and JPEG 2000 compression through imagecodecs); PNG, JPEG and other formats through
Pillow. Pillow decodes 16-bit-per-channel RGB PNGs to 8 bits (16-bit grey PNGs and TIFFs keep their precision).

Slide-sized images: `read_histology(path, pixel_size_um=...)` reads a downsampled copy. From a pyramidal TIFF
(OME-TIFF sub-resolutions, SVS, any TIFF whose series has levels) it decodes only the level nearest the
requested pixel size (the coarsest that is not coarser) and downsamples from there; a large single-level TIFF
is decoded into a temporary memory-mapped file and reduced strip by strip. An image too large to decode in
the memory available gets an ImageReadError that says what to do, never a bare MemoryError. The pixel size
comes from the file's metadata (`histology_pixel_size_um`: OME PhysicalSize, Aperio MPP, ImageJ units, TIFF
resolution in centimetres) unless the caller gives it; a recorded size that cannot be right for the recorded
objective raises a `PixelSizeWarning`.

Nothing here imports JAX or matplotlib; scikit-image and SciPy are imported when a function needs them.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import re
import warnings

import numpy as np

from msisynth import errors, geometry, outputs
from msisynth.io import integrity

_TIFF_SUFFIXES = (".tif", ".tiff")


class _OmeFallbackFilter(logging.Filter):
  """Drops tifffile's note that it reads an OME-TIFF with interleaved storage as a plain TIFF series.

  Microscope software (the msight H&E is one) writes such files; tifffile then reads them correctly as a plain
  series, and msisynth reads the OME-XML itself, so the note, logged at every opening, is noise.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return "OME series cannot handle discontiguous storage" not in record.getMessage()


if not any(isinstance(f, _OmeFallbackFilter) for f in logging.getLogger("tifffile").filters):
  logging.getLogger("tifffile").addFilter(_OmeFallbackFilter())
# Largest image Pillow may decode here (pixels); Pillow's own default refuses whole-slide-sized images.
_MAX_PIXELS = 1 << 31


def _as_path(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.ImageReadError("no such file", path)
  return path


def _read_tiff(path: pathlib.Path) -> np.ndarray:
  import tifffile

  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      data = series.asarray()
      axes = series.axes
  except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error, ... on corrupt files.
    raise errors.ImageReadError(f"cannot read TIFF ({type(e).__name__}: {e})", path) from e
  return _arrange(data, axes)


def _read_pillow(path: pathlib.Path) -> np.ndarray:
  from PIL import Image

  integrity.check_image_file(path)  # decoders fill a cut PNG or JPEG without an error
  limit = Image.MAX_IMAGE_PIXELS
  try:
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
      elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
      elif mode == "PA":
        im = im.convert("RGBA")
      data = np.asarray(im)
      if im.mode == "I":  # 16-bit grey decoded into 32-bit integers
        if data.min() < 0 or data.max() > 65535:
          raise errors.ImageReadError(f"unsupported 32-bit integer image (range {data.min()}-{data.max()})", path)
        data = data.astype(np.uint16)
  except errors.ImageReadError:
    raise
  except Exception as e:  # UnidentifiedImageError, OSError (truncated data), DecompressionBombError, ...
    raise errors.ImageReadError(f"cannot read image ({type(e).__name__}: {e})", path) from e
  finally:
    Image.MAX_IMAGE_PIXELS = limit
  return data


def _load(path: str | os.PathLike) -> tuple[pathlib.Path, np.ndarray]:
  path = _as_path(path)
  data = _read_tiff(path) if path.suffix.lower() in _TIFF_SUFFIXES else _read_pillow(path)
  if data.ndim not in (2, 3) or data.shape[0] == 0 or data.shape[1] == 0:
    raise errors.ImageReadError(f"unsupported image shape {data.shape}; expected (H, W) or (H, W, C)", path)
  return path, data


class PixelSizeWarning(UserWarning):
  """A pixel size recorded in an image file cannot be right (it disagrees with the recorded objective)."""


# Camera pixels lie in this range (µm), so recorded pixel size x objective magnification must too.
_SENSOR_PIXEL_UM = (1.0, 30.0)
# Pixel sizes outside this range (µm) are not those of a microscope image.
_PLAUSIBLE_PIXEL_UM = (0.02, 1000.0)
# Inch-based TIFF/PNG resolutions below this many pixels per inch are screen or print defaults (72, 96, 300
# dpi), not a physical size: 1270 dpi is 20 µm per pixel.
_MIN_PHYSICAL_DPI = 1270.0
_UNITS_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "\u03bcm": 1.0, "mm": 1e3,
             "cm": 1e4, "m": 1e6}  # fmt: skip
_MAGNIFICATION = re.compile(r"(?<![A-Za-z0-9.])(\d{1,3}(?:\.\d+)?)\s*[xX](?![A-Za-z0-9])")
# Decoding into a temporary memory-mapped file instead of memory above this many bytes, when downsampling.
_MEMMAP_BYTES = 1 << 28


def _local(tag: str) -> str:
  return tag.rsplit("}", 1)[-1]


def _ome_pixel_size(xml: str) -> tuple[tuple[float, float] | None, list[tuple[float, str]]]:
  """(y, x) µm of the first OME Image and the magnifications it mentions ((value, where) pairs)."""
  import xml.etree.ElementTree as ET

  try:
    root = ET.fromstring(xml)
  except ET.ParseError:
    return None, []
  elements = list(root.iter())
  image = next((e for e in elements if _local(e.tag) == "Image"), None)
  if image is None:
    return None, []
  pixels = next((e for e in image.iter() if _local(e.tag) == "Pixels"), None)
  size = None
  if pixels is not None:
    try:
      px = float(pixels.get("PhysicalSizeX")) * _UNITS_UM.get(pixels.get("PhysicalSizeXUnit", "µm"), math.nan)
      py = float(pixels.get("PhysicalSizeY", pixels.get("PhysicalSizeX")))
      py *= _UNITS_UM.get(pixels.get("PhysicalSizeYUnit", pixels.get("PhysicalSizeXUnit", "µm")), math.nan)
      if np.isfinite(px) and np.isfinite(py) and px > 0 and py > 0:
        size = (py, px)
    except (TypeError, ValueError):
      size = None
  mags = [(float(m), "in the image name") for m in _MAGNIFICATION.findall(image.get("Name", ""))]
  # The objective of the instrument the image refers to (or its ObjectiveSettings).
  refs = {e.get("ID") for e in image.iter() if _local(e.tag) in ("InstrumentRef", "ObjectiveSettings")}
  for element in elements:
    if _local(element.tag) == "Instrument" and element.get("ID") in refs:
      objectives = [e for e in element.iter() if _local(e.tag) == "Objective"]
    elif _local(element.tag) == "Objective" and element.get("ID") in refs:
      objectives = [element]
    else:
      continue
    for objective in objectives:
      try:
        mags.append((float(objective.get("NominalMagnification")), "its objective's nominal magnification"))
      except (TypeError, ValueError):
        pass
  return size, mags


def _tiff_pixel_size(tif) -> tuple[tuple[float, float] | None, list[tuple[float, str]]]:
  page = tif.pages[0]
  if tif.is_ome and tif.ome_metadata:
    size, mags = _ome_pixel_size(tif.ome_metadata)
    if size is not None:
      return size, mags
  description = page.description or ""
  if tif.is_svs:
    mpp = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    mag = re.search(r"AppMag\s*=\s*([0-9.]+)", description)
    mags = [(float(mag.group(1)), "its AppMag")] if mag else []
    if mpp and float(mpp.group(1)) > 0:
      return (float(mpp.group(1)), float(mpp.group(1))), mags
  try:
    xres, yres = (float(v) for v in page.resolution)
    unit = int(page.resolutionunit)
  except (TypeError, ValueError, AttributeError):
    return None, []
  if not (xres > 0 and yres > 0):
    return None, []
  if tif.is_imagej:
    unit_name = str((tif.imagej_metadata or {}).get("unit", "")).strip().lower().replace("\\u00b5", "\u00b5")
    if unit_name in _UNITS_UM:
      return (_UNITS_UM[unit_name] / yres, _UNITS_UM[unit_name] / xres), []
    return None, []
  if unit == 3:  # centimetre
    return (1e4 / yres, 1e4 / xres), []
  if unit == 2 and min(xres, yres) >= _MIN_PHYSICAL_DPI:  # inch, at a microscope's resolution
    return (25400.0 / yres, 25400.0 / xres), []
  return None, []


def histology_pixel_size_um(path: str | os.PathLike) -> tuple[float, float] | None:
  """The pixel size an image file records, (y, x) µm, or None when it records none.

  Read from OME-XML `PhysicalSizeX/Y` (with their units), Aperio SVS `MPP`, ImageJ TIFFs in microns, TIFF
  resolution tags in centimetres (or inches at over 1270 dpi; 72-300 dpi are screen defaults, not sizes), and
  PNG/JPEG resolution at over 1270 dpi. A recorded size that cannot be right raises a `PixelSizeWarning` (it is
  still returned): outside 0.02-1000 µm, or one that would need camera pixels outside 1-30 µm with the
  magnification the file records (objective, or a "2X" in the OME image name).

  Args:
    path: the image file.

  Returns:
    (py, px) µm, or None.

  Raises:
    ImageReadError: missing or unreadable file.
  """
  path = _as_path(path)
  mags: list[tuple[float, str]] = []
  try:
    if path.suffix.lower() in _TIFF_SUFFIXES:
      import tifffile

      with tifffile.TiffFile(path) as tif:
        size, mags = _tiff_pixel_size(tif)
    else:
      from PIL import Image

      with Image.open(path) as im:
        dpi = im.info.get("dpi")
      size = None
      if dpi and min(float(v) for v in dpi) >= _MIN_PHYSICAL_DPI:
        size = (25400.0 / float(dpi[1]), 25400.0 / float(dpi[0]))
  except errors.ImageReadError:
    raise
  except Exception as e:  # tifffile and Pillow raise assorted errors on corrupt files
    raise errors.ImageReadError(f"cannot read the image's metadata ({type(e).__name__}: {e})", path) from e
  if size is None:
    return None
  px = size[1]
  if not (_PLAUSIBLE_PIXEL_UM[0] <= min(size) and max(size) <= _PLAUSIBLE_PIXEL_UM[1]):
    warnings.warn(
      f"{path}: the recorded pixel size {size} µm is not that of a microscope image; pass the pixel size yourself",
      PixelSizeWarning,
      stacklevel=2,
    )
  for mag, where in mags:
    sensor = px * mag
    if mag > 0 and not _SENSOR_PIXEL_UM[0] <= sensor <= _SENSOR_PIXEL_UM[1]:
      warnings.warn(
        f"{path}: the file records {px:g} µm per pixel, but with the {mag:g}x objective ({where}) that would need "
        f"camera pixels of {sensor:.3g} µm, and cameras have pixels of {_SENSOR_PIXEL_UM[0]:g}-"
        f"{_SENSOR_PIXEL_UM[1]:g} µm: the recorded size is probably wrong. Give the pixel size yourself "
        "(image_pixel_size_um=), e.g. from landmarks or a scale bar",
        PixelSizeWarning,
        stacklevel=2,
      )
      break
  return size


def _available_bytes() -> int | None:
  """Memory the system can still give (MemAvailable on Linux), or None when unknown."""
  try:
    with open("/proc/meminfo") as fh:
      for line in fh:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
  except (ValueError, OSError, AttributeError):
    return None


def _header(path: pathlib.Path) -> dict:
  """Size of the full-resolution image without decoding it: height, width, channels, itemsize, format, levels."""
  try:
    if path.suffix.lower() in _TIFF_SUFFIXES:
      import tifffile

      with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = dict(zip(series.axes, series.shape))
        channels = int(np.prod([n for a, n in shape.items() if a not in "YX"], dtype=np.int64))
        return {"height": shape.get("Y", 0), "width": shape.get("X", 0), "channels": max(channels, 1),
                "itemsize": series.dtype.itemsize, "format": "TIFF", "levels": len(series.levels)}  # fmt: skip
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
      Image.MAX_IMAGE_PIXELS = None  # only the header is read here; _read_pillow applies the limit
      with Image.open(path) as im:
        width, height = im.size
        bands = len(im.getbands())
        itemsize = 2 if "16" in im.mode else 4 if im.mode in ("I", "F") else 1
        fmt = im.format or path.suffix.lstrip(".").upper()
    finally:
      Image.MAX_IMAGE_PIXELS = limit
    return {"height": height, "width": width, "channels": bands, "itemsize": itemsize, "format": fmt, "levels": 1}
  except Exception as e:  # unreadable headers surface as the decoder's own error later
    del e
    return {}


def _check_decodable(path: pathlib.Path, header: dict, *, downsampled: bool) -> None:
  """Refuses, with a message that says what to do, an image whose decoding would not fit in memory."""
  if not header:
    return
  pixels = int(header["height"]) * int(header["width"])
  decoded = pixels * int(header["channels"]) * int(header["itemsize"])
  # Decoded array, its float32 copy and the float32 RGB result; a downsampled read keeps only the decoded one.
  need = decoded if downsampled else decoded + pixels * int(header["channels"]) * 4 + pixels * 3 * 4
  available = _available_bytes()
  if available is None or need <= available:
    return
  size = f"{header['width']} x {header['height']} {header['format']}"
  if header["format"] == "TIFF" and not downsampled:
    hint = "pass pixel_size_um= to read a downsampled copy (a pyramidal TIFF decodes only the level needed)"
  else:
    hint = (
      f"{header['format']} cannot be decoded in parts: convert it to a tiled, pyramidal TIFF (e.g. `vips tiffsave "
      f"{path.name} slide.tif --tile --pyramid --compression=jpeg`) and read that with pixel_size_um="
    )
  raise errors.ImageReadError(
    f"decoding this {size} image needs about {need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of "
    f"memory available; {hint}",
    path,
  )


def _arrange(data: np.ndarray, axes: str) -> np.ndarray:
  """Drops singleton axes other than Y and X, and puts a remaining non-spatial axis last."""
  keep = [i for i, a in enumerate(axes) if data.shape[i] != 1 or a in "YX"]
  data = data.reshape([data.shape[i] for i in keep])
  axes = "".join(axes[i] for i in keep)
  if data.ndim == 3 and axes.endswith("YX"):
    data = np.moveaxis(data, 0, -1)
  return data


def _read_downsampled(
  path: pathlib.Path, native: tuple[float, float], target: tuple[float, float]
) -> tuple[np.ndarray, tuple[float, float]]:
  """Decodes the coarsest stored level that is not coarser than `target` (µm): (raw array, its pixel size)."""
  header = _header(path)
  try:
    if path.suffix.lower() in _TIFF_SUFFIXES:
      import tifffile

      with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        axes = levels[0].axes
        base = dict(zip(axes, levels[0].shape))
        chosen, size = levels[0], native
        for level in levels[1:]:
          shape = dict(zip(level.axes, level.shape))
          step = (native[0] * base["Y"] / shape["Y"], native[1] * base["X"] / shape["X"])
          if step[0] <= target[0] * (1 + 1e-6) and step[1] <= target[1] * (1 + 1e-6):
            chosen, size = level, step
        nbytes = int(np.prod(chosen.shape, dtype=np.int64)) * chosen.dtype.itemsize
        coarse = min(target[0] / size[0], target[1] / size[1]) >= 2
        available = _available_bytes()
        memmap = coarse and nbytes > _MEMMAP_BYTES and (available is None or nbytes > available // 4)
        if not memmap and available is not None and nbytes > available:
          _check_decodable(path, {**header, "height": dict(zip(chosen.axes, chosen.shape))["Y"],
                                  "width": dict(zip(chosen.axes, chosen.shape))["X"]}, downsampled=True)  # fmt: skip
        data = chosen.asarray(out="memmap" if memmap else None)
        return _arrange(data, chosen.axes), size
    _check_decodable(path, header, downsampled=True)
    return _read_pillow(path), native
  except MemoryError as e:
    raise errors.ImageReadError(
      "not enough memory to decode this image; convert it to a tiled, pyramidal TIFF and read that with "
      "pixel_size_um=",
      path,
    ) from e
  except (errors.ImageReadError, errors.ConfigError):
    raise
  except Exception as e:  # tifffile / Pillow errors on corrupt files
    raise errors.ImageReadError(f"cannot read image ({type(e).__name__}: {e})", path) from e


def _to_unit_float(data: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Scales by the dtype's range: uint8 / 255, uint16 / 65535, uint32 / (2**32 - 1); bool and floats as is."""
  if data.dtype == bool:
    return data.astype(np.float32)
  if data.dtype in (np.uint8, np.uint16, np.uint32):
    return (data.astype(np.float32) / np.float32(np.iinfo(data.dtype).max)).astype(np.float32)
  if data.dtype in (np.float16, np.float32, np.float64):
    if data.dtype == np.float64 and np.all(np.isfinite(data)) and np.abs(data).max() > np.finfo(np.float32).max:
      raise errors.ImageReadError(f"float64 values up to {np.abs(data).max():.3g} exceed the float32 range", path)
    out = data.astype(np.float32)
    if not np.all(np.isfinite(out)):
      raise errors.ImageReadError("image holds NaN or Inf values", path)
    return out
  raise errors.ImageReadError(f"unsupported pixel type {data.dtype} (expected uint8, uint16, uint32 or float)", path)


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image with all its channels, as float32 scaled by the range of its pixel type.

  uint8 is divided by 255, uint16 by 65535, uint32 by 2**32 - 1; float images are returned unscaled. Channel
  stacks stored channels-first (for example (3, H, W) microscopy TIFFs) are returned channels-last.

  Args:
    path: PNG, JPEG, TIFF or another format Pillow reads.

  Returns:
    float32 (H, W) or (H, W, C).

  Raises:
    ImageReadError: missing or unreadable file, unsupported pixel type or shape, NaN/Inf values.
  """
  path, data = _load(path)
  return _to_unit_float(data, path)


def read_histology(
  path: str | os.PathLike,
  pixel_size_um: float | tuple[float, float] | None = None,
  *,
  image_pixel_size_um: float | tuple[float, float] | None = None,
) -> np.ndarray:
  """Reads a histology image (H&E or any brightfield stain) as RGB in [0, 1], optionally downsampled.

  Grey images are replicated to three channels; an alpha channel is composited over white (the colour of an
  empty slide); 16-bit images keep their precision where the decoder does (TIFF, grey PNG).

  With `pixel_size_um`, the image is returned at that pixel size (`resample_to_pixel_size`, pixel (0, 0)'s
  centre kept). Pyramidal TIFFs (OME-TIFF, SVS) are read from the level nearest the requested size, so a whole
  slide is never decoded at full resolution; memory stays near the size of that level.

  Args:
    path: PNG, JPEG, TIFF (uncompressed, LZW, Deflate, JPEG, JPEG 2000; pyramidal or not) or another format
      Pillow reads; 8- or 16-bit, grey, grey+alpha, RGB or RGBA.
    pixel_size_um: pixel size of the result, µm (a number or a (y, x) pair); None: the file's own pixels.
    image_pixel_size_um: pixel size of the file's full-resolution image, µm. Always wins over the file's
      metadata; needed with `pixel_size_um` when the file records none (`histology_pixel_size_um`).

  Returns:
    float32 (H, W, 3) in [0, 1].

  Raises:
    ImageReadError: missing or unreadable file, unsupported pixel type, a float image outside [0, 1], a
      channel count other than 1-4 (use `read_image` for multi-channel microscopy), or an image too large to
      decode in the memory available (the message says how to read it).
    ConfigError: bad pixel sizes, or `pixel_size_um` for a file that records no pixel size and no
      `image_pixel_size_um`.
  """
  path = _as_path(path)
  if pixel_size_um is None:
    _check_decodable(path, _header(path), downsampled=False)
    try:
      path, data = _load(path)
    except MemoryError as e:
      raise errors.ImageReadError("not enough memory to decode this image; pass pixel_size_um= to read it "
                                  "downsampled", path) from e  # fmt: skip
    image = _to_unit_float(data, path)
  else:
    target = geometry.pixel_size_yx(pixel_size_um, "pixel_size_um")
    native = None
    if image_pixel_size_um is not None:
      native = geometry.pixel_size_yx(image_pixel_size_um, "image_pixel_size_um")
    if native is None:
      native = histology_pixel_size_um(path)
    if native is None:
      raise errors.ConfigError(
        f"{path}: the file records no pixel size; pass image_pixel_size_um= (the scanner's, e.g. 0.25 µm at 40x, "
        "0.5 µm at 20x) to read it at pixel_size_um"
      )
    data, level_size = _read_downsampled(path, native, target)
    if not np.allclose(level_size, target, rtol=1e-9):
      resampled = resample_to_pixel_size(data, level_size, target)
    else:
      resampled = data.astype(np.float32)
    if data.dtype in (np.uint8, np.uint16, np.uint32):
      resampled /= np.float32(np.iinfo(data.dtype).max)
    elif data.dtype.kind not in "fb":
      raise errors.ImageReadError(f"unsupported pixel type {data.dtype}", path)
    elif not np.all(np.isfinite(resampled)):
      raise errors.ImageReadError("image holds NaN or Inf values", path)
    image = resampled
  if data.dtype.kind == "f" and (image.min() < 0 or image.max() > 1):
    raise errors.ImageReadError(
      f"float image with values in [{image.min():.4g}, {image.max():.4g}], expected [0, 1]", path
    )
  if image.ndim == 2:
    image = image[..., None]
  channels = image.shape[2]
  if channels in (2, 4):
    alpha = image[..., -1:]
    image = image[..., :-1] * alpha + (1.0 - alpha)
  elif channels not in (1, 3):
    raise errors.ImageReadError(
      f"{channels} channels; a histology image is grey, RGB or RGBA (read_image reads other stacks)", path
    )
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)


def write_image(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = False) -> pathlib.Path:
  """Writes an image; the format follows the extension.

  - `.png`: 8-bit. Floats must lie in [0, 1] and are rounded to 0-255; uint16 is scaled to 8 bits; bool
    becomes 0/255. Grey, grey+alpha, RGB or RGBA.
  - `.tif` / `.tiff`: floats as float32, uint8 and uint16 as they are, bool as uint8 0/255. Any number of
    channels; stacks of other than 3 or 4 channels are stored channels-first, which `read_image` undoes.

  Args:
    path: output file.
    image: (H, W) or (H, W, C) array.
    overwrite: replace an existing file; otherwise refuse.

  Returns:
    The path written.

  Raises:
    ConfigError: unsupported extension, shape or dtype, NaN/Inf, floats outside [0, 1] for PNG, an existing
      file without overwrite=True, or a missing output directory.
  """
  path = pathlib.Path(path)
  image = np.asarray(image)
  suffix = path.suffix.lower()
  if suffix not in (".png",) + _TIFF_SUFFIXES:
    raise errors.ConfigError(f"{path}: write_image writes .png, .tif or .tiff, not {suffix!r}")
  outputs.refuse_existing(path, overwrite=overwrite)
  if not path.parent.is_dir():
    raise errors.ConfigError(f"{path.parent}: output directory does not exist")
  if image.ndim not in (2, 3) or image.size == 0:
    raise errors.ConfigError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
  if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
    raise errors.ConfigError("image holds NaN or Inf values")
  if image.dtype == bool:
    image = image.astype(np.uint8) * 255
  if image.dtype.kind not in "fu" or (image.dtype.kind == "u" and image.dtype.itemsize > 2):
    raise errors.ConfigError(f"unsupported dtype {image.dtype}; use float, uint8, uint16 or bool")
  if suffix == ".png":
    from PIL import Image

    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 2, 3, 4):
      raise errors.ConfigError(f"PNG holds 1-4 channels, got {channels}; write a TIFF instead")
    if image.dtype.kind == "f":
      if image.min() < 0 or image.max() > 1:
        raise errors.ConfigError(f"float image must lie in [0, 1] for PNG, got [{image.min()}, {image.max()}]")
      image = np.round(image * 255).astype(np.uint8)
    elif image.dtype == np.uint16:
      image = np.round(image / 257.0).astype(np.uint8)
    if image.ndim == 3 and channels == 1:
      image = image[..., 0]
    with outputs.atomic_path(path) as tmp:  # a kill mid-write leaves the previous file intact
      Image.fromarray(image).save(tmp, format="PNG")
  else:
    import tifffile

    if image.dtype.kind == "f":
      image = image.astype(np.float32)
    photometric = "rgb" if image.ndim == 3 and image.shape[2] in (3, 4) else "minisblack"
    extrasamples = ("unassalpha",) if photometric == "rgb" and image.shape[2] == 4 else None
    if image.ndim == 3 and photometric == "minisblack":
      image = np.moveaxis(image, -1, 0)
    with outputs.atomic_path(path) as tmp:
      tifffile.imwrite(tmp, image, photometric=photometric, extrasamples=extrasamples)
  return path


def _check_rgb(rgb: np.ndarray, name: str = "rgb") -> np.ndarray:
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[2] != 3:
    raise errors.ConfigError(f"{name} must be (H, W, 3), got shape {rgb.shape}")
  if rgb.dtype == np.uint8:
    return rgb.astype(np.float32) / 255.0
  if rgb.dtype.kind != "f":
    raise errors.ConfigError(f"{name} must be float in [0, 1] or uint8, got {rgb.dtype}")
  if not np.all(np.isfinite(rgb)) or rgb.min() < 0 or rgb.max() > 1:
    raise errors.ConfigError(f"{name} must hold finite values in [0, 1]")
  return rgb.astype(np.float32, copy=False)


TISSUE_MASK_METHODS = ("chroma", "otsu", "otsu_od", "saturation")


def slide_background(rgb: np.ndarray, *, bright_fraction: float = 0.1) -> np.ndarray:
  """Colour of the empty slide: the median RGB of the brightest `bright_fraction` of the pixels.

  Args:
    rgb: (H, W, 3) float in [0, 1] or uint8.
    bright_fraction: share of the pixels, by R + G + B, taken as background, in (0, 1].

  Returns:
    float32 (3,): the background colour, each channel at least 0.5 (an image without a bright background, all
    tissue or all dark, is then not stretched into noise).

  Raises:
    ConfigError: bad shape, dtype, range or fraction.
  """
  rgb = _check_rgb(rgb)
  if not 0 < bright_fraction <= 1:
    raise errors.ConfigError(f"bright_fraction must be in (0, 1], got {bright_fraction}")
  brightness = rgb.sum(axis=2)
  cut = np.quantile(brightness, 1.0 - bright_fraction)
  return np.maximum(np.median(rgb[brightness >= cut], axis=0), 0.5).astype(np.float32)


def _tissue_statistic(rgb: np.ndarray, method: str, smoothing_sigma_px: float) -> np.ndarray:
  from scipy import ndimage

  if method == "chroma":
    # Chroma (max - min of RGB, HSV's C) of the white-balanced image. Unlike saturation (C / max) it stays near 0
    # on black and grey pixels, whose channel differences are noise: labels, ink, a dark slide edge. Smoothing
    # the channels first (not the statistic) keeps the chroma of the background's noise near 0.
    balanced = np.clip(rgb / slide_background(rgb), 0.0, 1.0)
    if smoothing_sigma_px > 0:
      balanced = ndimage.gaussian_filter(balanced, (smoothing_sigma_px, smoothing_sigma_px, 0))
    return balanced.max(axis=2) - balanced.min(axis=2)
  if method == "otsu_od":
    stat = -np.log10(np.maximum(rgb, 1.0 / 255.0)).sum(axis=2)
  else:
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    stat = (high - low) / np.maximum(high, 1e-6)
  if smoothing_sigma_px > 0:
    stat = ndimage.gaussian_filter(stat, smoothing_sigma_px)
  return stat


def tissue_mask(
  rgb: np.ndarray,
  *,
  method: str = "chroma",
  threshold: float | None = None,
  min_size_px: int = 64,
  max_hole_size_px: int | None = None,
  opening_radius_px: int = 2,
  smoothing_sigma_px: float = 1.0,
) -> np.ndarray:
  """Tissue foreground of a brightfield (H&E) image.

  The background of a slide is bright and colourless, while stained tissue has colour. Methods:

  - `"chroma"` (default): divides the image by the slide's background colour (`slide_background`, so that a
    tinted or yellowed background becomes white), then thresholds the chroma max(RGB) - min(RGB) with
    hysteresis: connected regions above a low threshold, min(0.05, Otsu / 2) (or `threshold`), are kept where
    they reach a high one, min(Otsu, 2 x low). Black and grey labels, black ink, grey debris and a dark slide
    edge have no chroma and are left out; pale tissue is kept; patches of background noise rarely reach the
    high threshold. (Otsu alone as the high threshold would be pulled up by a little strongly coloured pen ink
    and then miss pale tissue.)
  - `"otsu"`: HSV saturation at Otsu's threshold (the former default). It loses tissue too pale to have
    colour next to strongly stained tissue, since Otsu then splits pale from dark tissue.
  - `"saturation"`: HSV saturation above a fixed `threshold` (default 0.05), every hole filled. On a white slide
    it keeps pale tissue, but it calls a tinted background tissue (all of the msight bladder H&E), and the
    saturation of dark grey pixels is noise.
  - `"otsu_od"`: the optical density -log10(RGB), summed over channels, at Otsu's threshold: keeps pale or grey
    tissue but also anything dark, and very dark labels can pull the threshold above the tissue.

  The statistic is smoothed first; then the mask is opened with a disk (removing lines thinner than about
  2 * `opening_radius_px` + 1, such as text edges), connected parts smaller than `min_size_px` are dropped and
  holes up to `max_hole_size_px` filled.

  Measured (docs/results.md, section 11, `python benchmarks/bench_tissue.py`). On the 11 shipped slides, the Dice of
  the mask of the slide blended towards white unevenly (100 % stain at the left edge to 20 % at the right)
  against the mask of the original, median (worst): "chroma" 0.98 (0.78), "otsu" 0.81 (0.54), "saturation"
  0.96 (0.72); blended evenly to 30 %: "chroma" 0.98 (0.92), "otsu" 0.99 (0.69), "saturation" 0.91 (0.48).
  On 48 generated slides with known tissue (stain 100 %, 30 % or uneven; white or tinted background; labels,
  pen, debris, dark edge), Dice against the truth, median (worst): "chroma" 0.97 (0.93), "otsu" 0.95 (0.00),
  "saturation" 0.69 (0.45), "otsu_od" 0.93 (0.00). Pen ink is coloured and counts as tissue with every method
  (`msisynth.tissue.tissue_crop` removes it by shape); a textured grey background (rcc-UH0710_33) and the
  vignetted corners of the msight slide come partly into the "chroma" mask.

  Args:
    rgb: (H, W, 3) float in [0, 1] or uint8.
    method: "chroma", "otsu", "saturation" or "otsu_od".
    threshold: "chroma": the low (hysteresis) threshold instead of min(0.05, Otsu / 2); "saturation": the
      saturation threshold (default 0.05); not used by the Otsu methods.
    min_size_px: smallest tissue component kept, in pixels.
    max_hole_size_px: largest hole filled, in pixels (default: `min_size_px`; "saturation": every hole); holes
      touching the image border are never filled.
    opening_radius_px: radius of the disk of the morphological opening, pixels (0: none).
    smoothing_sigma_px: Gaussian smoothing of the statistic (of the channels for "chroma") before
      thresholding, pixels (0: none).

  Returns:
    bool (H, W), True on tissue. All False for a blank (constant) image.

  Raises:
    ConfigError: bad shape, dtype, range, method, threshold or sizes.
  """
  from scipy import ndimage
  from skimage.filters import threshold_otsu
  from skimage.morphology import disk

  rgb = _check_rgb(rgb)
  if method not in TISSUE_MASK_METHODS:
    raise errors.ConfigError(f"method must be one of {', '.join(TISSUE_MASK_METHODS)}, got {method!r}")
  if min(min_size_px, opening_radius_px, smoothing_sigma_px) < 0:
    raise errors.ConfigError("min_size_px, opening_radius_px and smoothing_sigma_px must be >= 0")
  if threshold is not None and not (math.isfinite(threshold) and 0 <= threshold < 1):
    raise errors.ConfigError(f"threshold must be in [0, 1), got {threshold}")
  if max_hole_size_px is not None:
    max_hole = max_hole_size_px
  else:
    max_hole = rgb.shape[0] * rgb.shape[1] if method == "saturation" else min_size_px
  stat = _tissue_statistic(rgb, method, smoothing_sigma_px)
  if float(stat.max() - stat.min()) < 1e-6:
    return np.zeros(stat.shape, bool)
  if method == "saturation":
    mask = stat > (0.05 if threshold is None else threshold)
  elif method == "chroma":
    otsu = threshold_otsu(stat)
    low = min(0.05, 0.5 * otsu) if threshold is None else min(threshold, otsu)
    high = min(otsu, 2.0 * low)
    mask = stat > low
  else:
    mask = stat > threshold_otsu(stat)
  if opening_radius_px > 0:
    mask = ndimage.binary_opening(mask, structure=disk(opening_radius_px))
  if method == "chroma":
    labels, count = ndimage.label(mask)
    seeded = np.zeros(count + 1, bool)
    seeded[labels[mask & (stat > high)]] = True
    seeded[0] = False
    mask = seeded[labels]
  if min_size_px > 1:
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = sizes[labels] >= min_size_px
  if max_hole > 0:
    holes, _ = ndimage.label(~mask)
    sizes = np.bincount(holes.ravel())
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes <= max_hole
    fill[0] = False
    fill[border] = False
    mask = mask | fill[holes]
  return mask


def he_deconvolve(rgb: np.ndarray) -> np.ndarray:
  """Separates haematoxylin, eosin and DAB by colour deconvolution (Ruifrok & Johnston; skimage's rgb2hed).

  Args:
    rgb: (H, W, 3) float in [0, 1] or uint8.

  Returns:
    float32 (H, W, 3): haematoxylin, eosin and DAB optical densities (0 where the stain is absent).

  Raises:
    ConfigError: bad shape, dtype or range.
  """
  from skimage.color import rgb2hed

  return rgb2hed(_check_rgb(rgb)).astype(np.float32)


def _box_reduce(image: np.ndarray, ky: int, kx: int) -> np.ndarray:
  """Means over ky x kx blocks (the last partial block padded with edge values), in float32, strip by strip."""
  h, w = image.shape[:2]
  out_h, out_w = -(-h // ky), -(-w // kx)
  out = np.empty((out_h, out_w) + image.shape[2:], np.float32)
  strip = max(1, (1 << 24) // max(1, ky * w * int(np.prod(image.shape[2:], dtype=np.int64))))
  cols = np.minimum(np.arange(out_w * kx), w - 1)
  for r0 in range(0, out_h, strip):
    r1 = min(out_h, r0 + strip)
    rows = np.minimum(np.arange(r0 * ky, r1 * ky), h - 1)
    block = image[rows][:, cols].astype(np.float32)
    block = block.reshape((r1 - r0, ky, out_w, kx) + image.shape[2:])
    out[r0:r1] = block.mean(axis=(1, 3))
  return out


def resample_to_pixel_size(
  image: np.ndarray,
  from_pixel_size_um,
  to_pixel_size_um,
  *,
  order: int = 1,
) -> np.ndarray:
  """Resamples an image to another pixel size, keeping pixel (0, 0)'s centre at the same physical point.

  Output pixel (r, c) samples the input at input pixel coordinates (r * ty / fy, c * tx / fx), with (fy, fx)
  and (ty, tx) the input and output pixel sizes, so physical positions (docs/architecture.md) are preserved.
  The output covers the same field of view: round(H * fy / ty) x round(W * fx / tx) pixels. When downsampling
  (order >= 1) the image is first averaged over blocks of whole input pixels and then smoothed with a Gaussian
  of sigma (s - 1) / 2 for the remaining factor s, so no aliasing arises; `order=0` (labels, masks) picks the
  nearest input pixel and keeps the dtype.

  Args:
    image: (H, W) or (H, W, C) array; channels are resampled independently.
    from_pixel_size_um: input pixel size, µm (a number or a (y, x) pair).
    to_pixel_size_um: output pixel size, µm (a number or a (y, x) pair).
    order: 0 nearest, 1 linear, up to 5 (spline) interpolation.

  Returns:
    (H', W') or (H', W', C): float32 for order >= 1, the input dtype for order 0.

  Raises:
    ConfigError: bad shape, pixel sizes or order.
  """
  from scipy import ndimage

  image = np.asarray(image)
  if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
    raise errors.ConfigError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
  if not isinstance(order, int | np.integer) or not 0 <= order <= 5:
    raise errors.ConfigError(f"order must be an integer in 0..5, got {order!r}")
  fy, fx = geometry.pixel_size_yx(from_pixel_size_um, "from_pixel_size_um")
  ty, tx = geometry.pixel_size_yx(to_pixel_size_um, "to_pixel_size_um")
  h, w = image.shape[:2]
  out_h, out_w = geometry.shape_at_pixel_size((h, w), (fy, fx), (ty, tx))
  scale = (ty / fy, tx / fx)  # input pixels per output pixel
  if order == 0:
    rows = np.clip(np.round(np.arange(out_h) * scale[0]).astype(np.int64), 0, h - 1)
    cols = np.clip(np.round(np.arange(out_w) * scale[1]).astype(np.int64), 0, w - 1)
    return image[rows][:, cols]
  if image.dtype.kind not in "fiub":
    raise errors.ConfigError(f"unsupported dtype {image.dtype}")
  if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
    raise errors.ConfigError("image holds NaN or Inf values")
  # Whole-pixel block averaging first: exact area anti-aliasing, and cheap on huge slides.
  ky, kx = (max(1, math.floor(s)) for s in scale)
  if ky > 1 or kx > 1:
    data = _box_reduce(image, ky, kx)
  else:
    data = image.astype(np.float32)
  # Block j of the reduced grid is centred on input pixel j * k + (k - 1) / 2.
  matrix = [scale[0] / ky, scale[1] / kx]
  offset = [-(ky - 1) / 2 / ky, -(kx - 1) / 2 / kx]
  sigma = [max(0.0, (m - 1) / 2) for m in matrix]
  if image.ndim == 3:
    matrix.append(1.0)
    offset.append(0.0)
    sigma.append(0.0)
  if any(s > 0 for s in sigma):
    data = ndimage.gaussian_filter(data, sigma, mode="nearest")
  out = ndimage.affine_transform(
    data,
    np.asarray(matrix),
    offset=offset,
    output_shape=(out_h, out_w) + image.shape[2:],
    order=int(order),
    mode="nearest",
    prefilter=order > 1,
  )
  return out.astype(np.float32, copy=False)
