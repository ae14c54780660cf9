"""Cost of the viewer exports (`msisynth.export`): SpatialData write and read, streamed OME-TIFF, k-means GeoJSON.

A synthetic section: an MSI cube of --msi_size² pixels × --channels channels (20 µm pixels), an H&E of
--he_size² pixels (2 µm), an affine registration with a 5° turn. Times are wall-clock seconds of one run each
(first calls include JAX compilation of the warp, reported apart for the OME-TIFF), sizes are bytes on disk.

Usage, from the repository root with msisynth importable (`PYTHONPATH=.`):
  python benchmarks/bench_export.py
  python benchmarks/bench_export.py --msi_size=200 --channels=500 --he_size=4000
Results are printed and written to benchmarks/results/bench_export.json (see --output).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
from absl import app, flags

from msisynth import export
from msisynth.geometry.transforms import AffineTransform
from msisynth.types import MSIImage

_MSI = flags.DEFINE_integer("msi_size", 120, "MSI side in pixels.")
_CHANNELS = flags.DEFINE_integer("channels", 200, "MSI channels.")
_HE = flags.DEFINE_integer("he_size", 2000, "H&E side in pixels.")
_IONS = flags.DEFINE_integer("ions", 4, "Ion images in the OME-TIFF.")
_OUTPUT = flags.DEFINE_string(
  "output", os.path.join(os.path.dirname(__file__), "results", "bench_export.json"), "Results JSON."
)


def _size(path: pathlib.Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  n, c, he_n = _MSI.value, _CHANNELS.value, _HE.value
  cube = rng.gamma(1.0, 1.0, (n, n, c)).astype(np.float32)
  cube[: n // 2, :, 0] += 10.0
  msi = MSIImage(cube, 100.0 + np.arange(c) * 0.5, np.ones((n, n), bool), (20.0, 20.0))
  he = rng.integers(0, 255, (he_n, he_n, 3), dtype=np.uint8)
  a = np.deg2rad(5.0)
  transform = AffineTransform.from_linear(np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]), (30.0, -20.0))
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    t = time.perf_counter()
    sdata = export.to_spatialdata(he, 2.0, msi, transform)
    path = export.write_spatialdata(tmp / "section.zarr", sdata)
    rows["spatialdata_write_s"] = time.perf_counter() - t
    rows["spatialdata_bytes"] = _size(path)
    import spatialdata

    t = time.perf_counter()
    back = spatialdata.read_zarr(path)
    np.asarray(back.images["msi"].values)
    rows["spatialdata_read_msi_s"] = time.perf_counter() - t

    mz = list(msi.mz[: _IONS.value])
    for name in ("ome_tiff_first_s", "ome_tiff_s"):  # the first run compiles the warp per level
      t = time.perf_counter()
      tiff = export.write_ion_images_ome_tiff(tmp / "ions.ome.tif", msi, transform, mz, (he_n, he_n), 2.0,
                                              overwrite=True)  # fmt: skip
      rows[name] = time.perf_counter() - t
    rows["ome_tiff_bytes"] = _size(tiff)
    rows["ome_tiff_megapixels_per_s"] = he_n * he_n * len(mz) * 4 / 3 / 1e6 / rows["ome_tiff_s"]

    t = time.perf_counter()
    segments = export.kmeans_segments(0, msi, 4)
    rows["kmeans_s"] = time.perf_counter() - t
    t = time.perf_counter()
    regions = export.labels_to_regions(segments, transform, msi_pixel_size_um=20.0, histology_pixel_size_um=2.0)
    export.write_geojson_regions(tmp / "segments.geojson", regions)
    rows["geojson_s"] = time.perf_counter() - t
  result = {
    "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    "settings": {"msi_size": n, "channels": c, "he_size": he_n, "ions": _IONS.value},
    "results": {k: round(v, 3) if isinstance(v, float) else v for k, v in rows.items()},
  }
  print(json.dumps(result, indent=2))
  os.makedirs(os.path.dirname(_OUTPUT.value), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
