"""Benchmark: msisynth's imzML reader against a plain pyimzml loop, on generated files.

Writes a processed imzML (random centroided spectra: `--peaks` peaks per pixel, m/z 200-1200) and a continuous
one (`--channels` channels) of `--height` x `--width` pixels into a temporary folder with pyimzml's writer,
then, in one run:

  (a) `msisynth.io.read_imzml`: processed file binned onto `--bin-width` ppm bins over the data's m/z range;
      continuous file read whole;
  (b) the plain approach: `ImzMLParser`, then a loop over `getspectrum` with `np.histogram` onto the same bin
      edges (processed) or a copy of the intensities (continuous) into the same dense cube.

Both include parsing the XML. It prints both times (wall clock, and process CPU time, which is the steadier of
the two on a shared machine) and their ratios, checks that both give the same cube, and reports the peak
memory of (a): the resident set size (RSS, psutil) sampled every 2 ms by a thread, minus the RSS just before
the call, against the size of the output cube. Results go to benchmarks/results/bench_io.json.

Before timing, the script touches as much fresh memory as twice the largest cube and frees it: in a freshly
booted virtual machine the first touch of memory costs far more than later ones (seconds per GB were seen on
the 2-core development VM), a cost of the machine that would otherwise land on whichever reader runs first.

Targets: (a) at least 10x faster than (b); peak memory of (a) at most 1.5 x cube + 200 MB.

  python benchmarks/bench_io.py            # 200 x 200 pixels, 2,000 peaks / channels (about 2 minutes)
  python benchmarks/bench_io.py --small    # 60 x 60 pixels, 500 peaks / channels (seconds)
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

from msisynth.io import imzml  # noqa: E402


def write_processed(path: pathlib.Path, height: int, width: int, peaks: int, seed: int) -> None:
  from pyimzml.ImzMLWriter import ImzMLWriter

  rng = np.random.default_rng(seed)
  with ImzMLWriter(str(path), mode="processed", mz_dtype=np.float64, intensity_dtype=np.float32) as writer:
    for y in range(height):
      for x in range(width):
        mz = np.sort(rng.uniform(200.0, 1200.0, peaks))
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


def pyimzml_loop(path: pathlib.Path, edges: np.ndarray | None) -> np.ndarray:
  """The plain approach: parse with pyimzml, then getspectrum + np.histogram (or a copy) per pixel."""
  from pyimzml.ImzMLParser import ImzMLParser

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    parser = ImzMLParser(str(path), parse_lib="ElementTree")
  coords = np.asarray(parser.coordinates)
  x0, y0 = coords[:, 0].min(), coords[:, 1].min()
  shape = (coords[:, 1].max() - y0 + 1, coords[:, 0].max() - x0 + 1)
  cube = None
  for i, (x, y, _) in enumerate(parser.coordinates):
    mz, intensity = parser.getspectrum(i)
    if edges is None:
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


def warm_up_memory(nbytes: int) -> None:
  block = np.ones(max(nbytes, 8) // 8, np.float64)
  del block


def run_case(name: str, path: pathlib.Path, read_kwargs: dict, threads: int | None) -> dict:
  with PeakRSS() as memory:
    start, cpu = time.perf_counter(), time.process_time()
    msi = imzml.read_imzml(path, progress=False, num_threads=threads, **read_kwargs)
    msisynth_s, msisynth_cpu_s = time.perf_counter() - start, time.process_time() - cpu
  edges = None
  if msi.metadata["binning"]["method"] == "bins":
    binning = msi.metadata["binning"]
    edges = imzml.mz_bin_edges(*binning["mz_range"], binning["bin_width"], binning["bin_unit"])
  start, cpu = time.perf_counter(), time.process_time()
  reference = pyimzml_loop(path, edges)
  loop_s, loop_cpu_s = time.perf_counter() - start, time.process_time() - cpu
  same = bool(np.allclose(msi.cube, reference, rtol=1e-5, atol=1e-5))
  del reference
  cube_bytes = msi.cube.nbytes
  result = {
    "file": path.name,
    "ibd_mb": path.with_suffix(".ibd").stat().st_size / 1e6,
    "imzml_mb": path.stat().st_size / 1e6,
    "cube_shape": list(msi.cube.shape),
    "cube_mb": cube_bytes / 1e6,
    "threads": imzml._effective_threads(threads),
    "msisynth_s": msisynth_s,
    "pyimzml_loop_s": loop_s,
    "speedup": loop_s / msisynth_s,
    "msisynth_cpu_s": msisynth_cpu_s,
    "pyimzml_loop_cpu_s": loop_cpu_s,
    "speedup_cpu": loop_cpu_s / msisynth_cpu_s,
    "peak_rss_delta_mb": memory.peak_delta / 1e6,
    "memory_limit_mb": (1.5 * cube_bytes + 200e6) / 1e6,
    "same_cube": same,
  }
  result["speed_target_met"] = result["speedup"] >= 10
  result["memory_target_met"] = memory.peak_delta <= 1.5 * cube_bytes + 200e6
  print(
    f"[{name}] {path.name}: ibd {result['ibd_mb']:.0f} MB, cube {tuple(msi.cube.shape)} = {result['cube_mb']:.0f} MB"
  )
  print(f"  msisynth read_imzml  {msisynth_s:7.2f} s wall {msisynth_cpu_s:7.2f} s CPU ({result['threads']} threads)")
  print(f"  pyimzml loop         {loop_s:7.2f} s wall {loop_cpu_s:7.2f} s CPU")
  met = "met" if result["speed_target_met"] else "NOT met"
  print(
    f"  speedup              {result['speedup']:7.1f} x wall {result['speedup_cpu']:7.1f} x CPU (target >= 10 x: {met})"
  )
  met = "met" if result["memory_target_met"] else "NOT met"
  print(
    f"  peak RSS of read     {result['peak_rss_delta_mb']:7.0f} MB above start "
    f"(limit 1.5 x cube + 200 MB = {result['memory_limit_mb']:.0f} MB: {met})"
  )
  print(f"  same cube as loop    {same}")
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--height", type=int, default=200)
  parser.add_argument("--width", type=int, default=200)
  parser.add_argument("--peaks", type=int, default=2000, help="peaks per spectrum of the processed file")
  parser.add_argument("--channels", type=int, default=2000, help="channels of the continuous file")
  parser.add_argument("--bin-width", type=float, default=500.0, help="bin width in ppm for the processed file")
  parser.add_argument("--threads", type=int, default=None, help="read_imzml num_threads (default: its own)")
  parser.add_argument("--small", action="store_true", help="60 x 60 pixels, 500 peaks/channels")
  parser.add_argument("--workdir", type=pathlib.Path, default=None, help="where to write the files (default: temp)")
  parser.add_argument("--output", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "bench_io.json")
  args = parser.parse_args(argv)
  if args.small:
    args.height = args.width = 60
    args.peaks = args.channels = 500
  if args.workdir:
    pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    tmp = pathlib.Path(tmp)
    start = time.perf_counter()
    write_processed(tmp / "processed.imzML", args.height, args.width, args.peaks, seed=0)
    write_continuous(tmp / "continuous.imzML", args.height, args.width, args.channels, seed=1)
    print(f"wrote the test files in {time.perf_counter() - start:.1f} s (not timed below)")
    warm_up_memory(2 * 4 * args.height * args.width * max(args.channels, 4 * args.peaks))
    results = {
      # keep_empty_bins: the same regular axis as the np.histogram loop, so the outputs compare element-wise.
      "processed": run_case(
          "processed", tmp / "processed.imzML", {"bin_width": args.bin_width, "keep_empty_bins": True}, args.threads),
      "continuous": run_case("continuous", tmp / "continuous.imzML", {}, args.threads),
    }
  record = {
    "benchmark": "bench_io",
    "command": "python benchmarks/bench_io.py " + " ".join(sys.argv[1:] if argv is None else argv),
    "config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
    "memory_method": "psutil RSS sampled every 2 ms by a thread, peak minus RSS before read_imzml",
    "machine": {
      "cpus": os.cpu_count(),
      "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "python": platform.python_version(),
      "numpy": np.__version__,
      "platform": platform.platform(),
    },
    "results": results,
  }
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(record, indent=2) + "\n")
  print(f"saved {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
