"""Benchmark: what the integrity checks cost next to the work they guard.

  (a) Checkpoints: the finiteness check and the SHA-256 digest that `msisynth.checkpoint.save` computes, on a
      host pytree the size of the full pix2pix train state (`--params` float32 values; generator, discriminator
      and two Adam moments), against writing the same arrays with `np.save` (a floor for orbax's write).
  (b) Images: `msisynth.io.integrity.check_png` / `check_jpeg` against Pillow decoding the same file, on the
      shipped H&E slides (PNG) and the same slides re-encoded as JPEG (quality 90).

Prints the times (process CPU seconds, the steadier measure on a shared machine, and wall seconds) and the ratios,
and writes benchmarks/results/bench_integrity.json. Targets: the checkpoint check under 3 s for the full pix2pix
state (it runs once per checkpoint, every few thousand steps); an image check under 1.5 x Pillow's decoding.

  python benchmarks/bench_integrity.py            # 170 M values (about 680 MB), every shipped slide
  python benchmarks/bench_integrity.py --small    # 10 M values, two slides (seconds)
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from msisynth import checkpoint, datasets  # noqa: E402
from msisynth.io import integrity  # noqa: E402


def _timed(fn, repeats: int = 3) -> dict[str, float]:
  fn()  # warm-up (numba compiles on first use; file caches)
  cpu, wall = [], []
  for _ in range(repeats):
    c, w = time.process_time(), time.perf_counter()
    fn()
    cpu.append(time.process_time() - c)
    wall.append(time.perf_counter() - w)
  return {"cpu_s": min(cpu), "wall_s": min(wall)}


def bench_checkpoint(num_values: int) -> dict:
  rng = np.random.default_rng(0)
  # Four equal parts: parameters, two Adam moments, the discriminator (shapes do not matter to the cost).
  leaves = [rng.standard_normal((num_values // 64, 16), dtype=np.float32) for _ in range(4)]
  tree = {"generator": {"params": leaves[0]}, "train": {"mu": leaves[1], "nu": leaves[2], "d": leaves[3]}}

  def check():
    checkpoint.check_finite(tree)
    for value in tree.values():
      checkpoint._array_digest(value)

  with tempfile.TemporaryDirectory() as tmp:

    def write():
      for i, leaf in enumerate(leaves):
        np.save(pathlib.Path(tmp) / f"{i}.npy", leaf)

    result = {"values": num_values, "megabytes": 4 * num_values / 1e6, "check": _timed(check), "np_save": _timed(write)}
  result["ratio_cpu"] = result["check"]["cpu_s"] / result["np_save"]["cpu_s"]
  result["ratio_wall"] = result["check"]["wall_s"] / result["np_save"]["wall_s"]
  return result


def bench_images(max_slides: int | None) -> list[dict]:
  from PIL import Image

  slides = sorted(datasets.list_he_slides())[:max_slides]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for slide in slides:
      image = Image.open(slide).convert("RGB")
      jpeg = pathlib.Path(tmp) / f"{slide.stem}.jpg"
      buffer = io.BytesIO()
      image.save(buffer, format="JPEG", quality=90)
      jpeg.write_bytes(buffer.getvalue())
      for path, check in ((slide, integrity.check_png), (jpeg, integrity.check_jpeg)):

        def decode(path=path):
          with Image.open(path) as im:
            im.load()

        row = {
          "file": path.name,
          "pixels": image.width * image.height,
          "bytes": path.stat().st_size,
          "check": _timed(lambda path=path, check=check: check(path)),
          "decode": _timed(decode),
        }
        row["ratio_cpu"] = row["check"]["cpu_s"] / row["decode"]["cpu_s"]
        rows.append(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="10 M values and two slides")
  args = parser.parse_args()
  results = {
    "checkpoint": bench_checkpoint(10_000_000 if args.small else 170_000_000),
    "images": bench_images(2 if args.small else None),
  }
  c = results["checkpoint"]
  print(f"checkpoint, {c['megabytes']:.0f} MB: finiteness + digest {c['check']['cpu_s']:.2f} s CPU "
        f"({c['check']['wall_s']:.2f} s wall), np.save {c['np_save']['cpu_s']:.2f} s CPU "
        f"({c['np_save']['wall_s']:.2f} s wall): ratio {c['ratio_cpu']:.2f} CPU, {c['ratio_wall']:.2f} wall")
  for row in results["images"]:
    print(f"{row['file']}: {row['pixels'] / 1e6:.1f} MP, {row['bytes'] / 1e6:.1f} MB: check "
          f"{row['check']['cpu_s']:.3f} s, Pillow decode {row['decode']['cpu_s']:.3f} s CPU: "
          f"ratio {row['ratio_cpu']:.2f}")
  out = REPO / "benchmarks" / "results" / "bench_integrity.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
