"""Benchmark: msisynth's imzML reader against a plain pyimzml loop (and pyM2aia, when installed), in one run.

Cases:

  processed    generated: `--height` x `--width` pixels, `--peaks` random centroided peaks each (m/z 200-1200,
               float64 m/z, float32 intensities), binned onto `--bin-width` ppm bins over the data's m/z range
               (`read_imzml(bin_width=..., keep_empty_bins=True)`, a regular axis).
  continuous   generated: the same pixels, `--channels` channels, read whole.
  msight       the real MALDI-TOF file of `msisynth.datasets.load_msight_bladder` (local copy only) (continuous, 422
               channels, an unsorted shared m/z array with one repeated value), read whole.
  default      generated processed file of 120 x 120 pixels x 1,500 peaks (m/z 100-1000) read with no options
               (channels="auto"): the peak memory of the read, against the 2 GiB target.

Like for like, each msisynth read (a) is timed against (b) the plain approach: `ImzMLParser`, then a loop over
`getspectrum` with `np.histogram` onto the same bin edges (processed), or a copy of the intensities into the same
dense cube (continuous; for msight, `np.bincount` onto the sorted distinct m/z, which is what the reader does);
both include parsing the XML, and both results are compared element-wise. When `import m2aia` works, (c) pyM2aia
(C++ M2aia behind ctypes) is timed in the same run as an anchor: `ImzMLReader(path)` plus `Load()` (parse, mean and
max spectra) and then every spectrum (`GetSpectra` for continuous files, `GetSpectrum` per spectrum for processed
ones: M2aia has no call that bins processed spectra onto a given axis, so that anchor does less work than (a)),
after all the other timings (its library keeps threads and memory once loaded).

Also measured: the binning kernel alone, numba (the one the reader uses) against XLA on the CPU
(`jax.ops.segment_sum` of the same peaks into the same bins, jitted, compilation excluded), on the first 10,000
pixels of the processed case's peaks held in memory.

Each case runs (a) and (b) `--repeats` times (default 3), alternating, and reports the medians and their ratio,
with every run's times and ratios beside them. Times are wall clock and process CPU time; the 1-minute load
average before each case and at the start and end is recorded too (other work on a shared machine slows the
two-thread read more than the one-thread loop). Peak memory of (a) is the resident set size (psutil) sampled every
2 ms by a thread, minus the RSS just before the call (the largest over the repeats); the memory-mapped .ibd
windows count in it. The written files are synced to disk first. Before timing, the
numba kernels are loaded once on a tiny file (their one-time cost per process is reported as `kernel_load_s`),
and as much fresh memory as twice the largest cube is touched and freed (a fresh VM pays seconds per GB on first
touch, which would otherwise land on whichever reader runs first).

Targets: (a) >= 10x (b) in every case; peak memory of (a) <= 1.5 x cube + 200 MB; default read <= 2 GiB.

  PYTHONPATH=. python benchmarks/bench_io.py           # 200 x 200 pixels, 2,000 peaks / channels (minutes)
  PYTHONPATH=. python benchmarks/bench_io.py --small   # 60 x 60 pixels, 500 peaks / channels (seconds)

(pyM2aia: `pip install m2aia`; the results below were taken with it installed in a separate folder on PYTHONPATH.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from msisynth import datasets  # noqa: E402
from msisynth.io import _ibd, _kernels, imzml, sparse  # noqa: E402


def _msight_file() -> pathlib.Path | None:
  """The msight imzML from a local copy (no download in a benchmark), or None."""
  try:
    return datasets.msight_bladder_dir(download=False) / "prostate_example.imzML"
  except Exception:  # noqa: BLE001 - no local copy: the real-file case is skipped
    return None


def write_processed(path: pathlib.Path, height: int, width: int, peaks: int, seed: int, mz_lo=200.0,
                    mz_hi=1200.0) -> None:  # fmt: skip
  from pyimzml.ImzMLWriter import ImzMLWriter

  rng = np.random.default_rng(seed)
  with ImzMLWriter(str(path), mode="processed", mz_dtype=np.float64, intensity_dtype=np.float32) as writer:
    for y in range(height):
      for x in range(width):
        mz = np.sort(rng.uniform(mz_lo, mz_hi, peaks))
        writer.addSpectrum(mz, rng.random(peaks).astype(np.float32), (x + 1, y + 1))


def write_continuous(path: pathlib.Path, height: int, width: int, channels: int, seed: int) -> None:
  from pyimzml.ImzMLWriter import ImzMLWriter

  rng = np.random.default_rng(seed)
  mz = np.linspace(200.0, 1200.0, channels)
  with ImzMLWriter(str(path), mode="continuous", mz_dtype=np.float64, intensity_dtype=np.float32) as writer:
    for y in range(height):
      for x in range(width):
        writer.addSpectrum(mz, rng.random(channels).astype(np.float32), (x + 1, y + 1))


class PeakRSS:
  """Samples the process's resident set size in a thread; `peak_delta` is the peak above the starting RSS."""

  def __init__(self, interval_s: float = 0.002):
    self.interval_s = interval_s
    self.process = psutil.Process()

  def __enter__(self):
    self.start = self.process.memory_info().rss
    self.peak = self.start
    self.running = True
    self.thread = threading.Thread(target=self._run, daemon=True)
    self.thread.start()
    return self

  def _run(self):
    while self.running:
      self.peak = max(self.peak, self.process.memory_info().rss)
      time.sleep(self.interval_s)

  def __exit__(self, *exc):
    self.running = False
    self.thread.join()
    self.peak = max(self.peak, self.process.memory_info().rss)

  @property
  def peak_delta(self) -> int:
    return self.peak - self.start


def pyimzml_loop(path: pathlib.Path, edges: np.ndarray | None, merge_axis: bool = False) -> np.ndarray:
  """The plain approach: parse with pyimzml, then getspectrum + np.histogram (or a copy) per pixel."""
  from pyimzml.ImzMLParser import ImzMLParser

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    parser = ImzMLParser(str(path), parse_lib="ElementTree")
  coords = np.asarray(parser.coordinates)
  x0, y0 = coords[:, 0].min(), coords[:, 1].min()
  shape = (coords[:, 1].max() - y0 + 1, coords[:, 0].max() - x0 + 1)
  cube = None
  inverse = None
  for i, (x, y, _) in enumerate(parser.coordinates):
    mz, intensity = parser.getspectrum(i)
    if edges is None:
      if merge_axis:
        if inverse is None:
          distinct, inverse = np.unique(mz.astype(np.float64), return_inverse=True)
          cube = np.zeros(shape + (distinct.size,), np.float32)
        cube[y - y0, x - x0] = np.bincount(inverse, intensity.astype(np.float64), distinct.size)
        continue
      if cube is None:
        cube = np.zeros(shape + (mz.size,), np.float32)
      cube[y - y0, x - x0] = intensity
    else:
      if cube is None:
        cube = np.zeros(shape + (edges.size - 1,), np.float32)
      # float64 weights: np.histogram accumulates in the weights' dtype, and float32 loses precision there.
      cube[y - y0, x - x0] = np.histogram(mz, edges, weights=intensity.astype(np.float64))[0]
  parser.m.close()
  return cube


def m2aia_anchor(path: pathlib.Path) -> dict:
  """pyM2aia's read of every spectrum (see the module docstring); {"error": ...} when it cannot run."""
  cwd = os.getcwd()
  os.chdir(tempfile.gettempdir())  # pyM2aia writes a preferences file into the working directory, from its import on
  try:
    import m2aia
  except Exception as e:  # noqa: BLE001 - report whatever stops it
    os.chdir(cwd)
    return {"error": f"import m2aia failed: {type(e).__name__}: {e}"}
  try:
    start, cpu = time.perf_counter(), time.process_time()
    reader = m2aia.ImzMLReader(str(path))
    reader.Load()
    n = reader.GetNumberOfSpectra()
    kind = reader.GetSpectrumType()
    if "Continuous" in kind:
      values = reader.GetSpectra(list(range(n)))
      what = "Load + GetSpectra(all)"
      total = float(values.sum(dtype=np.float64))
    else:
      total = 0.0
      for i in range(n):
        total += float(reader.GetSpectrum(i)[1].sum(dtype=np.float64))
      what = "Load + GetSpectrum per spectrum"
    return {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "what": what,
            "spectrum_type": kind, "intensity_sum": total}  # fmt: skip
  except Exception as e:  # noqa: BLE001
    return {"error": f"{type(e).__name__}: {e}"}
  finally:
    os.chdir(cwd)


def warm_up_memory(nbytes: int) -> None:
  block = np.ones(max(nbytes, 8) // 8, np.float64)
  del block


def _load() -> float | None:
  """The 1-minute load average (other work on the machine), or None where the OS has none."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_case(name: str, path: pathlib.Path, read_kwargs: dict, threads: int | None, merge_axis: bool = False,
             repeats: int = 3) -> dict:  # fmt: skip
  """Times `repeats` msisynth reads and as many pyimzml loops, alternating (msisynth, loop, msisynth, ...), so
  that a burst of other work on the machine lands on both; the speedup is the ratio of the medians."""
  load = _load()
  msisynth_runs, loop_runs, peaks = [], [], []
  same = True
  for _ in range(repeats):
    with PeakRSS() as memory:
      start, cpu = time.perf_counter(), time.process_time()
      msi = imzml.read_imzml(path, progress=False, num_threads=threads, **read_kwargs)
      msisynth_runs.append((time.perf_counter() - start, time.process_time() - cpu))
    peaks.append(memory.peak_delta)
    edges = None
    if msi.metadata["binning"]["method"] == "bins":
      binning = msi.metadata["binning"]
      edges = imzml.mz_bin_edges(*binning["mz_range"], binning["bin_width"], binning["bin_unit"])
    start, cpu = time.perf_counter(), time.process_time()
    reference = pyimzml_loop(path, edges, merge_axis)
    loop_runs.append((time.perf_counter() - start, time.process_time() - cpu))
    same &= bool(reference.shape == msi.cube.shape and np.allclose(msi.cube, reference, rtol=1e-5, atol=1e-5))
    del reference
  msisynth_s, msisynth_cpu_s = (float(np.median(v)) for v in zip(*msisynth_runs))
  loop_s, loop_cpu_s = (float(np.median(v)) for v in zip(*loop_runs))
  peak = max(peaks)
  cube_bytes = msi.cube.nbytes
  result = {
    "file": path.name,
    "ibd_mb": path.with_suffix(".ibd").stat().st_size / 1e6,
    "imzml_mb": path.stat().st_size / 1e6,
    "read_kwargs": read_kwargs,
    "cube_shape": list(msi.cube.shape),
    "cube_mb": cube_bytes / 1e6,
    "threads": threads or _ibd.default_threads(),
    "repeats": repeats,
    "msisynth_s": msisynth_s,
    "pyimzml_loop_s": loop_s,
    "speedup": loop_s / msisynth_s,
    "msisynth_cpu_s": msisynth_cpu_s,
    "pyimzml_loop_cpu_s": loop_cpu_s,
    "speedup_cpu": loop_cpu_s / msisynth_cpu_s,
    "msisynth_runs_s": [r[0] for r in msisynth_runs],
    "pyimzml_loop_runs_s": [r[0] for r in loop_runs],
    "speedup_per_pair": [lp[0] / ms[0] for ms, lp in zip(msisynth_runs, loop_runs)],
    "peak_rss_delta_mb": peak / 1e6,
    "memory_limit_mb": (1.5 * cube_bytes + 200e6) / 1e6,
    "same_cube": same,
    "load_average_1min_before": load,
    "load_average_1min_after": _load(),
  }
  result["speed_target_met"] = result["speedup"] >= 10
  result["memory_target_met"] = peak <= 1.5 * cube_bytes + 200e6
  shape = tuple(msi.cube.shape)
  print(f"[{name}] {path.name}: ibd {result['ibd_mb']:.0f} MB, cube {shape} = {result['cube_mb']:.0f} MB (load average "
        f"{load})")  # fmt: skip
  print(f"  msisynth read_imzml  {msisynth_s:7.2f} s wall {msisynth_cpu_s:7.2f} s CPU ({result['threads']} threads; "
        f"median of {repeats})")  # fmt: skip
  print(f"  pyimzml loop         {loop_s:7.2f} s wall {loop_cpu_s:7.2f} s CPU (median of {repeats})")
  met = "met" if result["speed_target_met"] else "NOT met"
  pairs = ", ".join(f"{x:.1f}" for x in result["speedup_per_pair"])
  print(f"  speedup              {result['speedup']:7.1f} x wall {result['speedup_cpu']:7.1f} x CPU "
        f"(target >= 10 x: {met}; run by run {pairs})")  # fmt: skip
  met = "met" if result["memory_target_met"] else "NOT met"
  print(f"  peak RSS of read     {result['peak_rss_delta_mb']:7.0f} MB above start "
        f"(limit 1.5 x cube + 200 MB = {result['memory_limit_mb']:.0f} MB: {met})")  # fmt: skip
  print(f"  same cube as loop    {same}")
  return result


def add_m2aia(name: str, path: pathlib.Path, result: dict) -> None:
  """The pyM2aia anchor, timed after every msisynth and pyimzml case (its C++ library stays loaded once used)."""
  anchor = m2aia_anchor(path)
  result["m2aia"] = anchor
  if "error" in anchor:
    print(f"[{name}] pyM2aia failed: {anchor['error']}")
  else:
    anchor["msisynth_speedup_vs_m2aia"] = anchor["s"] / result["msisynth_s"]
    anchor["msisynth_speedup_vs_m2aia_cpu"] = anchor["cpu_s"] / result["msisynth_cpu_s"]
    print(f"[{name}] pyM2aia ({anchor['what']}) {anchor['s']:7.2f} s wall {anchor['cpu_s']:7.2f} s CPU: msisynth is "
          f"{anchor['msisynth_speedup_vs_m2aia']:.1f} x faster wall, {anchor['msisynth_speedup_vs_m2aia_cpu']:.1f} x "
          "CPU")  # fmt: skip


def kernel_comparison(path: pathlib.Path, bin_width_ppm: float, threads: int | None) -> dict:
  """numba bin kernel vs XLA segment_sum, on the same in-memory peaks and bins."""
  import jax
  import jax.numpy as jnp

  data = sparse.read_imzml_sparse(path, progress=False, num_threads=threads)
  keep = min(data.num_pixels, 10_000)  # XLA's compile time grows with the size; 10,000 pixels are plenty
  data = sparse.SparseMSI(data.indptr[: keep + 1], data.mz[: data.indptr[keep]], data.intensity[: data.indptr[keep]],
                          data.rows[:keep], data.cols[:keep], data.shape)  # fmt: skip
  lo, hi = data.mz_range()
  plan = imzml._BinPlan.create(lo, hi, bin_width_ppm, "ppm", data_range=True)
  edges = plan.edges()
  c = plan.num_bins
  flat = data.rows * data.shape[1] + data.cols
  axis = imzml._kernel_bins(plan)
  out = np.zeros((data.shape[0] * data.shape[1], c), np.float32)
  pixels = np.arange(data.num_pixels)
  _kernels.bin_csr(data.indptr, data.mz, data.intensity, pixels, flat, out, *axis.args())  # compiled/loaded
  times = []
  for _ in range(3):
    out[:] = 0
    start = time.perf_counter()
    _kernels.bin_csr(data.indptr, data.mz, data.intensity, pixels, flat, out, *axis.args())
    times.append(time.perf_counter() - start)
  numba_s = min(times)
  pixel_of_peak = np.repeat(flat, np.diff(data.indptr))

  @jax.jit
  def xla_bin(mz, intensity, pixel, edges):
    k = jnp.clip(jnp.searchsorted(edges, mz, side="right") - 1, 0, edges.size - 2)
    return jax.ops.segment_sum(intensity, pixel * (edges.size - 1) + k, num_segments=out.size).reshape(out.shape)

  args = [jnp.asarray(a) for a in (data.mz.astype(np.float32), data.intensity, pixel_of_peak.astype(np.int32),
                                   edges.astype(np.float32))]  # fmt: skip
  start = time.perf_counter()
  xla_out = xla_bin(*args).block_until_ready()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(3):
    start = time.perf_counter()
    xla_out = xla_bin(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  xla_s = min(times)
  # float32 m/z in XLA (x64 off) can move peaks within ~0.06 ppm of an edge; compare totals per pixel.
  agree = bool(np.allclose(np.asarray(xla_out).sum(axis=1), out.sum(axis=1), rtol=1e-4))
  result = {"peaks": data.nnz, "bins": c, "numba_s": numba_s, "xla_s": xla_s, "xla_compile_s": compile_s,
            "xla_over_numba": xla_s / numba_s, "pixel_totals_agree": agree,
            "kept": "numba" if numba_s <= xla_s else "xla"}  # fmt: skip
  print(f"[kernel] {data.nnz} peaks into {c} bins: numba {numba_s:.3f} s, XLA CPU {xla_s:.3f} s "
        f"(+{compile_s:.1f} s compile); XLA / numba = {xla_s / numba_s:.1f}")  # fmt: skip
  return result


def default_read(path: pathlib.Path, threads: int | None) -> dict:
  with PeakRSS() as memory:
    start = time.perf_counter()
    msi = imzml.read_imzml(path, progress=False, num_threads=threads)
    seconds = time.perf_counter() - start
  b = msi.metadata["binning"]
  result = {"file": path.name, "ibd_mb": path.with_suffix(".ibd").stat().st_size / 1e6,
            "cube_shape": list(msi.cube.shape), "cube_mb": msi.cube.nbytes / 1e6, "method": b["method"],
            "peak_width_ppm": b.get("peak_width_ppm"), "seconds": seconds,
            "peak_rss_delta_mb": memory.peak_delta / 1e6, "target_mb": 2 * 1024**3 / 1e6,
            "target_met": memory.peak_delta <= 2 * 1024**3}  # fmt: skip
  print(f"[default] {path.name}: cube {tuple(msi.cube.shape)} by {b['method']} (peak width "
        f"{b.get('peak_width_ppm'):.3g}"
        f" ppm) in {seconds:.2f} s; peak RSS {memory.peak_delta / 1e6:.0f} MB (target <= 2 GiB: "
        f"{'met' if result['target_met'] else 'NOT met'})")  # fmt: skip
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--height", type=int, default=200)
  parser.add_argument("--width", type=int, default=200)
  parser.add_argument("--peaks", type=int, default=2000, help="peaks per spectrum of the processed file")
  parser.add_argument("--channels", type=int, default=2000, help="channels of the continuous file")
  parser.add_argument("--bin-width", type=float, default=500.0, help="bin width in ppm for the processed file")
  parser.add_argument("--threads", type=int, default=None, help="read_imzml num_threads (default: its own)")
  parser.add_argument("--small", action="store_true", help="60 x 60 pixels, 500 peaks/channels; default 30 x 30")
  parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each reader per case (medians)")
  parser.add_argument("--no-m2aia", action="store_true", help="skip the pyM2aia anchor")
  parser.add_argument("--workdir", type=pathlib.Path, default=None, help="where to write the files (default: temp)")
  parser.add_argument("--output", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "bench_io.json")
  args = parser.parse_args(argv)
  load_at_start = _load()
  default_size = (120, 120, 1500)
  if args.small:
    args.height = args.width = 60
    args.peaks = args.channels = 500
    default_size = (30, 30, 300)
  if args.workdir:
    pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    tmp = pathlib.Path(tmp)
    start = time.perf_counter()
    write_processed(tmp / "tiny.imzML", 3, 3, 20, seed=9)
    write_processed(tmp / "processed.imzML", args.height, args.width, args.peaks, seed=0)
    write_continuous(tmp / "continuous.imzML", args.height, args.width, args.channels, seed=1)
    write_processed(tmp / "default.imzML", *default_size, seed=2, mz_lo=100.0, mz_hi=1000.0)
    if hasattr(os, "sync"):
      os.sync()  # the files' dirty pages go to disk now, not by write-back during the timings
    print(f"wrote the test files in {time.perf_counter() - start:.1f} s (not timed below)")
    start = time.perf_counter()
    for kwargs in ({"bin_width": 1000.0}, {}):
      imzml.read_imzml(tmp / "tiny.imzML", progress=False, **kwargs)
    msight = _msight_file()
    warm_file = msight if msight is not None and msight.exists() else tmp / "continuous.imzML"
    imzml.read_imzml(warm_file, progress=False, mz_range=(700, 701))
    kernel_load_s = time.perf_counter() - start
    print(f"loaded the compiled kernels in {kernel_load_s:.1f} s (once per process; not timed below)")
    warm_up_memory(2 * 4 * args.height * args.width * max(args.channels, 4 * args.peaks))
    m2aia = not args.no_m2aia
    results = {
      # keep_empty_bins: the same regular axis as the np.histogram loop, so the outputs compare element-wise.
      "processed": run_case("processed", tmp / "processed.imzML",
                            {"bin_width": args.bin_width, "keep_empty_bins": True}, args.threads,
                            repeats=args.repeats),
      "continuous": run_case("continuous", tmp / "continuous.imzML", {}, args.threads, repeats=args.repeats),
    }  # fmt: skip
    paths = {"processed": tmp / "processed.imzML", "continuous": tmp / "continuous.imzML"}
    if msight is not None and msight.exists():
      results["msight"] = run_case("msight", msight, {}, args.threads, merge_axis=True, repeats=args.repeats)
      paths["msight"] = msight
    results["default_processed_read"] = default_read(tmp / "default.imzML", args.threads)
    results["binning_kernel"] = kernel_comparison(tmp / "processed.imzML", args.bin_width, args.threads)
    if m2aia:
      for name, path in paths.items():
        add_m2aia(name, path, results[name])
  record = {
    "benchmark": "bench_io",
    "command": "PYTHONPATH=. python benchmarks/bench_io.py " + " ".join(sys.argv[1:] if argv is None else argv),
    "config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
    "kernel_load_s": kernel_load_s,
    "memory_method": "psutil RSS sampled every 2 ms by a thread, peak minus RSS before read_imzml",
    "machine": {
      "cpus": os.cpu_count(),
      "load_average_1min_at_start": load_at_start,
      "load_average_1min_at_end": _load(),
      "python": platform.python_version(),
      "numpy": np.__version__,
      "numba": __import__("numba").__version__,
      "platform": platform.platform(),
    },
    "results": results,
  }
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(record, indent=2, default=str) + "\n")
  print(f"saved {args.output}")
  if m2aia:
    os.chdir(tempfile.gettempdir())  # pyM2aia writes its preferences file into the working directory at exit
  return 0


if __name__ == "__main__":
  sys.exit(main())
