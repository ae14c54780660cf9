"""Sparse MSI: every pixel's own peaks in CSR layout, for processed imzML data too large to make dense.

`SparseMSI` holds pixels x peaks as three flat arrays (as `scipy.sparse.csr_matrix` does): `indptr` (N + 1,)
int64, and `mz` / `intensity` (nnz,), pixel i owning entries indptr[i]:indptr[i + 1], sorted by m/z. Its memory
is about the size of the `.ibd` (m/z in the file's float type, intensities float32). Pixel i sits at
(rows[i], cols[i]) of an image of `shape` (row = y - min(y), column = x - min(x), as `read_imzml`).

Everything users run on MSI works on it without a dense cube: mean, max and total (TIC) spectra on any m/z
axis, the TIC image, ion images at m/z ± tol, peak picking (on the mean spectrum, or per pixel with alignment),
binning onto any axis, and a dense `MSIImage` of chosen channels only. `MSIPreprocessor.fit` accepts it.

    sparse = read_imzml_sparse("section.imzML")            # or SparseMSI.from_msi(msi)
    peaks = sparse.pick_peaks(top_n=500)
    msi = sparse.to_msi(peaks=peaks)                        # (H, W, 500) cube of those peaks only
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from absl import logging

from msisynth import errors
from msisynth import peaks as peaks_lib
from msisynth.io import _engine, _ibd, _kernels
from msisynth.types import MSIImage

DEFAULT_SPECTRUM_BIN_PPM = 1.0


@dataclasses.dataclass
class Spectra:
  """Per-channel summaries of a sparse image on an m/z axis.

  Attributes:
    mz: (C,) channel centres.
    edges: (C + 1,) channel edges.
    mean: (C,) mean intensity over all measured pixels.
    maximum: (C,) largest intensity of any pixel.
    total: (C,) summed intensity (the total-ion spectrum).
    pixel_count: (C,) pixels in which the channel is nonzero.
    mz_weighted: (C,) sum of m/z x intensity (for exact centroids).
    num_pixels: measured pixels.
  """

  mz: np.ndarray
  edges: np.ndarray
  mean: np.ndarray
  maximum: np.ndarray
  total: np.ndarray
  pixel_count: np.ndarray
  mz_weighted: np.ndarray
  num_pixels: int


def _axis_for(edges: np.ndarray | None, bin_width: float, bin_unit: str, lo: float, hi: float) -> _engine.KernelAxis:
  from msisynth.io import imzml

  if edges is not None:
    edges = np.asarray(edges, np.float64)
    if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0) or not np.all(np.isfinite(edges)):
      raise errors.ConfigError("edges must be a strictly increasing 1-D array of at least 2 finite values")
    return _engine.KernelAxis.bins(edges)
  unit = imzml._check_unit(bin_unit, "bin_unit")
  if not (np.isfinite(bin_width) and bin_width > 0):
    raise errors.ConfigError(f"bin_width must be positive, got {bin_width}")
  plan = imzml._BinPlan.create(lo, hi, float(bin_width), unit, data_range=True)
  return _engine.KernelAxis.bins(plan.edges(), clip=True)


@dataclasses.dataclass
class SparseMSI:
  """Pixels x peaks in CSR layout (see the module docstring).

  Attributes:
    indptr: (N + 1,) int64 row pointers.
    mz: (nnz,) float m/z, sorted within each pixel.
    intensity: (nnz,) float32 intensities.
    rows: (N,) int64 image row of each pixel.
    cols: (N,) int64 image column of each pixel.
    shape: (H, W) of the image.
    pixel_size_um: (y, x) µm, or None.
    metadata: as `MSIImage.metadata`.
  """

  indptr: np.ndarray
  mz: np.ndarray
  intensity: np.ndarray
  rows: np.ndarray
  cols: np.ndarray
  shape: tuple[int, int]
  pixel_size_um: tuple[float, float] | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.indptr = np.asarray(self.indptr, np.int64)
    self.rows = np.asarray(self.rows, np.int64)
    self.cols = np.asarray(self.cols, np.int64)
    self.intensity = np.asarray(self.intensity)
    self.mz = np.asarray(self.mz)
    self.shape = tuple(int(v) for v in self.shape)
    source = self.metadata.get("source")
    n = self.rows.size
    if self.indptr.shape != (n + 1,) or self.cols.shape != (n,) or self.indptr[0] != 0:
      raise errors.DataError(f"indptr must be ({n} + 1,) from 0 and cols ({n},) for {n} pixels", source)
    if np.any(np.diff(self.indptr) < 0) or self.indptr[-1] != self.mz.size or self.mz.shape != self.intensity.shape:
      raise errors.DataError("indptr must be non-decreasing and end at the length of mz and intensity", source)
    if n and (self.rows.min() < 0 or self.cols.min() < 0 or self.rows.max() >= self.shape[0]
              or self.cols.max() >= self.shape[1]):  # fmt: skip
      raise errors.DataError(f"pixel positions fall outside the image shape {self.shape}", source)

  # -- construction -----------------------------------------------------------------------------------------------

  @classmethod
  def from_msi(cls, msi: MSIImage) -> SparseMSI:
    """The nonzero channels of every measured pixel of a dense image (m/z = the channel m/z)."""
    if not isinstance(msi, MSIImage):
      raise errors.ConfigError(f"expected an MSIImage, got {type(msi).__name__}")
    rows, cols = np.nonzero(msi.mask)
    spectra = np.asarray(msi.cube[rows, cols], np.float32)
    nonzero = spectra != 0
    indptr = np.zeros(rows.size + 1, np.int64)
    np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
    channel = np.nonzero(nonzero)[1]
    return cls(indptr, msi.mz[channel], spectra[nonzero], rows, cols, msi.shape, msi.pixel_size_um,
               dict(msi.metadata))  # fmt: skip

  # -- sizes ---------------------------------------------------------------------------------------------------------

  @property
  def num_pixels(self) -> int:
    return int(self.rows.size)

  @property
  def nnz(self) -> int:
    return int(self.mz.size)

  @property
  def nbytes(self) -> int:
    return int(self.indptr.nbytes + self.mz.nbytes + self.intensity.nbytes + self.rows.nbytes + self.cols.nbytes)

  @property
  def mask(self) -> np.ndarray:
    """(H, W) bool, True at measured pixels."""
    m = np.zeros(self.shape, bool)
    m[self.rows, self.cols] = True
    return m

  def mz_range(self) -> tuple[float, float]:
    """(lowest, highest) m/z of any peak."""
    if self.nnz == 0:
      raise errors.DataError("the image holds no peaks", self.metadata.get("source"))
    return float(self.mz.min()), float(self.mz.max())

  def _image(self, values: np.ndarray) -> np.ndarray:
    image = np.zeros(self.shape, np.float32)
    image[self.rows, self.cols] = values
    return image

  # -- spectra and images --------------------------------------------------------------------------------------------

  def spectra(self, *, edges: np.ndarray | None = None, bin_width: float = DEFAULT_SPECTRUM_BIN_PPM,
              bin_unit: str = "ppm") -> Spectra:  # fmt: skip
    """Mean, max and total spectra (and pixel counts) on bins of `edges`, or of `bin_width` over the data.

    Peaks outside `edges` are left out. Args: edges (strictly increasing), or bin_width and bin_unit ("ppm":
    geometric bins, "da").
    """
    lo, hi = self.mz_range() if edges is None else (0.0, 0.0)
    axis = _axis_for(edges, bin_width, bin_unit, lo, hi)
    hist = _engine.Histogram.zeros(axis.edges)
    _kernels.histogram_csr(self.indptr, self.mz, self.intensity, axis.edges, axis.table, axis.tlo, axis.tinv,
                           hist.total, hist.count, hist.mz_sum, hist.maximum)  # fmt: skip
    n = max(self.num_pixels, 1)
    return Spectra(hist.centres, axis.edges, hist.total / n, hist.maximum, hist.total, hist.count, hist.mz_sum,
                   self.num_pixels)  # fmt: skip

  def mean_spectrum(self, **axis) -> tuple[np.ndarray, np.ndarray]:
    """(m/z, mean intensity over the measured pixels); axis arguments as `spectra`."""
    s = self.spectra(**axis)
    return s.mz, s.mean

  def max_spectrum(self, **axis) -> tuple[np.ndarray, np.ndarray]:
    """(m/z, largest intensity of any pixel); axis arguments as `spectra`."""
    s = self.spectra(**axis)
    return s.mz, s.maximum

  def total_spectrum(self, **axis) -> tuple[np.ndarray, np.ndarray]:
    """(m/z, summed intensity over all pixels: the total-ion spectrum); axis arguments as `spectra`."""
    s = self.spectra(**axis)
    return s.mz, s.total

  def tic(self) -> np.ndarray:
    """(H, W) float32 total ion count of each pixel (0 where unmeasured)."""
    out = np.zeros(self.num_pixels, np.float64)
    _kernels.row_sums_csr(self.indptr, self.intensity, out)
    return self._image(out)

  def ion_image(self, mz: float, tol: float = 10.0, tol_unit: str = "ppm") -> np.ndarray:
    """(H, W) float32 sum of each pixel's intensities within mz ± tol (ppm of mz, or Da), inclusive."""
    from msisynth.io import imzml

    unit = imzml._check_unit(tol_unit, "tol_unit")
    if not (np.isfinite(mz) and mz > 0 and np.isfinite(tol) and tol >= 0):
      raise errors.ConfigError(f"need mz > 0 and tol >= 0, got {mz}, {tol}")
    half = tol * mz * 1e-6 if unit == "ppm" else tol
    out = np.zeros(self.num_pixels, np.float64)
    _kernels.window_sums_csr(self.indptr, self.mz, self.intensity, float(mz - half), float(mz + half), out)
    return self._image(out)

  # -- peaks ---------------------------------------------------------------------------------------------------------

  def pick_peaks(self, method: str = "mean", *, bin_width_ppm: float = DEFAULT_SPECTRUM_BIN_PPM,
                 **options) -> peaks_lib.Peaks:  # fmt: skip
    """Peak picking: "mean" (`msisynth.peaks.pick_peaks_mean` on the mean spectrum at `bin_width_ppm`, with
    pixel counts and exact centroids) or "per_pixel" (`pick_peaks_per_pixel`: peakPick -> peakAlign ->
    peakFilter). `options` go to those functions (snr, min_pixel_fraction, top_n, deisotope_peaks, ...)."""
    if method == "per_pixel":
      return peaks_lib.pick_peaks_per_pixel(self.indptr, self.mz, self.intensity, **options)
    if method != "mean":
      raise errors.ConfigError(f"method must be 'mean' or 'per_pixel', got {method!r}")
    s = self.spectra(bin_width=bin_width_ppm, bin_unit="ppm")
    options.setdefault("min_pixel_fraction", 0.01)
    options.setdefault("smooth_sigma", 2.0)
    return peaks_lib.pick_peaks_mean(s.mz, s.mean, pixel_counts=s.pixel_count, num_pixels=max(s.num_pixels, 1),
                                     mz_weighted=s.mz_weighted, totals=s.total, **options)  # fmt: skip

  # -- dense output --------------------------------------------------------------------------------------------------

  def _dense(self, axis: _engine.KernelAxis, mz: np.ndarray, binning: dict, max_cube_gib: float | None) -> MSIImage:
    gib = self.shape[0] * self.shape[1] * axis.num_channels * 4 / 2**30
    if max_cube_gib is not None and gib > max_cube_gib:
      raise errors.ConfigError(
        f"the cube would be {self.shape[0]}x{self.shape[1]}x{axis.num_channels} float32 = {gib:.1f} GiB "
        f"(> max_cube_gib={max_cube_gib}); choose fewer channels"
      )
    cube = np.zeros((*self.shape, axis.num_channels), np.float32)
    flat = self.rows * self.shape[1] + self.cols
    overflowed = _kernels.bin_csr(self.indptr, self.mz, self.intensity, np.arange(self.num_pixels), flat,
                                  cube.reshape(-1, axis.num_channels), *axis.args())  # fmt: skip
    if overflowed:
      raise errors.DataError(
        f"the sums of {overflowed} pixel(s) exceed the float32 range of the cube (|x| > "
        f"{np.finfo(np.float32).max:.3g})", self.metadata.get("source"),
      )  # fmt: skip
    metadata = {**self.metadata, "binning": binning}
    return MSIImage(cube=cube, mz=mz, mask=self.mask, pixel_size_um=self.pixel_size_um, metadata=metadata)

  def bin(self, *, edges: np.ndarray | None = None, bin_width: float | None = None, bin_unit: str = "ppm",
          drop_empty: bool = True, max_cube_gib: float | None = 4.0) -> MSIImage:  # fmt: skip
    """A dense `MSIImage` binned onto `edges` (any strictly increasing axis; peaks outside are left out) or onto
    bins of `bin_width` over the data's m/z range; bins no pixel reaches are dropped when `drop_empty`.

    Raises:
      ConfigError: invalid axis, or a cube larger than `max_cube_gib` (None: no limit).
    """
    if (edges is None) == (bin_width is None):
      raise errors.ConfigError("give exactly one of edges and bin_width")
    lo, hi = self.mz_range()
    axis = _axis_for(edges, bin_width or 1.0, bin_unit, lo, hi)
    binning = {"method": "bins", "edges": "given"} if edges is not None else {
      "method": "bins", "bin_width": float(bin_width), "bin_unit": bin_unit.lower(), "mz_range": [lo, hi]}  # fmt: skip
    centres = 0.5 * (axis.edges[:-1] + axis.edges[1:])
    if drop_empty:
      s = self.spectra(edges=axis.edges)
      occupied = s.pixel_count > 0
      remap = np.where(occupied, np.cumsum(occupied) - 1, -1)
      axis = dataclasses.replace(axis, remap=remap, num_channels=int(occupied.sum()))
      centres = centres[occupied]
      binning["empty_bins_dropped"] = int(occupied.size - occupied.sum())
    return self._dense(axis, centres, binning, max_cube_gib)

  def to_msi(self, mz_values: np.ndarray | None = None, tol: float = 10.0, tol_unit: str = "ppm", *,
             peaks: peaks_lib.Peaks | None = None, max_cube_gib: float | None = 4.0) -> MSIImage:  # fmt: skip
    """A dense `MSIImage` of chosen channels only: ion windows mz ± tol around `mz_values`, or the integration
    windows of picked `peaks`.

    Raises:
      ConfigError: neither or both given, invalid values, or a cube larger than `max_cube_gib`.
    """
    if (mz_values is None) == (peaks is None):
      raise errors.ConfigError("give exactly one of mz_values and peaks")
    if peaks is not None:
      if len(peaks) == 0:
        raise errors.DataError("no peaks to make channels of", self.metadata.get("source"))
      axis = _engine.KernelAxis.windows(peaks.lower, peaks.upper)
      return self._dense(axis, peaks.mz, {"method": "peaks", "num_peaks": len(peaks)}, max_cube_gib)
    from msisynth.io import imzml

    values = np.sort(np.asarray(mz_values, np.float64).reshape(-1))
    if values.size == 0 or not np.all(np.isfinite(values)) or values.min() <= 0 or np.any(np.diff(values) == 0):
      raise errors.ConfigError("mz_values must be distinct positive finite m/z values")
    unit = imzml._check_unit(tol_unit, "tol_unit")
    plan = imzml._WindowPlan.create(values, float(tol), unit)
    axis = _engine.KernelAxis.windows(plan.lows, plan.highs)
    return self._dense(axis, values, {"method": "windows", "tol": float(tol), "tol_unit": unit}, max_cube_gib)


def read_imzml_sparse(
  path: str | os.PathLike,
  *,
  z: int | None = None,
  nan_policy: str = "raise",
  check_uuid: bool = True,
  num_threads: int | None = None,
  outliers: str = "raise",
  progress: bool = True,
) -> SparseMSI:
  """Reads an imzML file into a `SparseMSI` (every pixel's peaks as stored; processed or continuous).

  Continuous files keep only the nonzero channels of each pixel. Memory: about the size of the `.ibd` for
  processed files. Arguments, pixel layout and errors as `read_imzml`.

  Raises:
    ImzMLError: as `read_imzml`.
    ConfigError: invalid arguments.
  """
  from msisynth.io import imzml

  @imzml.reader_errors
  def read(path):
    if nan_policy not in ("raise", "zero"):
      raise errors.ConfigError(f"nan_policy must be 'raise' or 'zero', got {nan_policy!r}")
    if outliers not in ("raise", "crop"):
      raise errors.ConfigError(f"outliers must be 'raise' or 'crop', got {outliers!r}")
    start = time.perf_counter()
    index = imzml._open_index(path, check_uuid=check_uuid)
    selected, rows, cols, shape, offset = imzml._grid(index, z, outliers=outliers)
    metadata = {
      "source": os.fspath(index.path), "declared_mode": index.header.declared_mode,
      "mode": "continuous" if index.continuous else "processed", "num_spectra": int(selected.size),
      "polarity": index.header.polarity, "spectrum_type": index.header.spectrum_type,
      "instrument": index.header.instrument, "uuid": index.header.uuid, **offset,
    }  # fmt: skip
    if index.continuous:
      msi = imzml.read_imzml(path, z=z, nan_policy=nan_policy, check_uuid=check_uuid, num_threads=num_threads,
                             outliers=outliers, progress=progress, max_cube_gib=None)  # fmt: skip
      sparse = SparseMSI.from_msi(msi)
      sparse.metadata = {**metadata, **{k: v for k, v in msi.metadata.items() if k == "binning"}}
      return sparse
    threads = num_threads or _ibd.default_threads()
    indptr, mz, intensity = _engine.gather_processed(index, selected, nan_policy=nan_policy, num_threads=threads,
                                                     show_progress=progress)  # fmt: skip
    if progress:
      logging.info("%s: read %d spectra, %d peaks (%.0f MB) in %.2f s", index.path.name, selected.size, mz.size,
                   (mz.nbytes + intensity.nbytes) / 1e6, time.perf_counter() - start)  # fmt: skip
    return SparseMSI(indptr, mz, intensity, rows, cols, shape, index.header.pixel_size_um, metadata)

  return read(path)
