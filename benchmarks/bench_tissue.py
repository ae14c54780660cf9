"""Benchmark: tissue masks and the tissue crop on the shipped slides and on generated slides with known tissue.

(a) **Stain strength, real slides.** The 11 shipped slides (the 9 H&E previews under data/he, the msight
    bladder H&E reduced 4x to 480 x 640, the HR2MSI stained optical image) have no ground-truth masks, so each
    method is judged by its agreement with itself: Dice of the mask of the slide made paler against the mask of
    the original slide, for the slide blended towards white (stain strength 50 % and 30 %: rgb' = 1 - a (1 -
    rgb)), blended with a strength falling from 100 % at the left edge to 20 % at the right (uneven staining:
    pale tissue beside stained tissue), and with its HSV saturation halved. A method that marks everything
    agrees perfectly, so (b) and the contact sheet (docs/figures/tissue_masks.png) go with it.
(b) **Generated slides with known tissue.** Random blobs filled with tissue texture cut from the inside of two
    shipped slides, on a white or a tinted, vignetted background, at stain strength 100 % and 30 % (optical
    density scaled) or unevenly stained (strength varying smoothly from 15 % to 100 % over the slide), with
    none or some of: a label (black text with colour fringes), pen marks (blue, green), debris (dark specks),
    a dark slide edge. Dice against the known tissue, and the share of artefact pixels called tissue.
(c) **The tissue crop** (`msisynth.tissue.tissue_crop`) on 12 generated slides of 2048 x 2048 px whose tissue
    (one section) covers 0.3-1 % of the slide (stain 100 %, 30 % or uneven), with a label, pen marks, debris
    and a dark edge: whether the crop box holds all the tissue, and the share of the crop that is tissue.

Results go to benchmarks/results/bench_tissue.json; the contact sheets to docs/figures/.

  python benchmarks/bench_tissue.py            # about 7 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
from scipy import ndimage

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msisynth import datasets  # noqa: E402
from msisynth import tissue as msi_tissue  # noqa: E402
from msisynth.io import histology  # noqa: E402

METHODS = ("chroma", "otsu", "saturation", "otsu_od")


def dice(a: np.ndarray, b: np.ndarray) -> float:
  total = int(a.sum()) + int(b.sum())
  return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def shipped_slides() -> dict[str, np.ndarray]:
  slides = {p.stem: datasets.load_he(p) for p in datasets.list_he_slides()}
  he = datasets.load_msight_bladder().he
  slides["msight_bladder"] = histology._box_reduce(np.asarray(he, np.float32), 4, 4)
  slides["hr2msi_optical"] = np.asarray(datasets.load_hr2msi_bladder().optical, np.float32)
  return {k: np.clip(v, 0, 1).astype(np.float32) for k, v in slides.items()}


def blend_to_white(rgb: np.ndarray, strength: float) -> np.ndarray:
  return (1.0 - strength * (1.0 - rgb)).astype(np.float32)


def desaturate(rgb: np.ndarray, factor: float) -> np.ndarray:
  from skimage.color import hsv2rgb, rgb2hsv

  hsv = rgb2hsv(rgb)
  hsv[..., 1] *= factor
  return np.clip(hsv2rgb(hsv), 0, 1).astype(np.float32)


def blend_gradient(rgb: np.ndarray, left: float = 1.0, right: float = 0.2) -> np.ndarray:
  """Blended towards white by a strength falling from `left` to `right` across the slide (uneven staining)."""
  strength = np.linspace(left, right, rgb.shape[1])[None, :, None]
  return (1.0 - strength * (1.0 - rgb)).astype(np.float32)


PALINGS = {
  "gradient": blend_gradient,
  "blend50": lambda rgb: blend_to_white(rgb, 0.5),
  "blend30": lambda rgb: blend_to_white(rgb, 0.3),
  "sat50": lambda rgb: desaturate(rgb, 0.5),
}


# ---------------------------------------------------------------------------------------------------------------
# Generated slides.
# ---------------------------------------------------------------------------------------------------------------


def texture_from(rgb: np.ndarray) -> np.ndarray:
  """The largest square of tissue inside a slide (tissue by the consensus of all methods, eroded)."""
  masks = [histology.tissue_mask(rgb, method=m) for m in ("chroma", "otsu", "saturation")]
  inside = ndimage.binary_erosion(np.logical_and.reduce(masks), iterations=3)
  dist = ndimage.distance_transform_edt(inside)
  r, c = np.unravel_index(np.argmax(dist), dist.shape)
  half = max(8, int(dist[r, c] / np.sqrt(2)))
  return rgb[max(0, r - half) : r + half, max(0, c - half) : c + half]


def tile(texture: np.ndarray, shape: tuple[int, int], rng) -> np.ndarray:
  flipped = np.concatenate([texture, texture[::-1]], axis=0)
  flipped = np.concatenate([flipped, flipped[:, ::-1]], axis=1)
  reps = (shape[0] // flipped.shape[0] + 2, shape[1] // flipped.shape[1] + 2, 1)
  big = np.tile(flipped, reps)
  r0, c0 = rng.integers(0, flipped.shape[0]), rng.integers(0, flipped.shape[1])
  return big[r0 : r0 + shape[0], c0 : c0 + shape[1]]


def blobs(rng, shape, coverage: float, sigma: float) -> np.ndarray:
  field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
  mask = field > np.quantile(field, 1 - coverage)
  labels, _ = ndimage.label(mask)
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return ndimage.binary_fill_holes(sizes[labels] >= 200)


def draw_artefacts(rng, rgb: np.ndarray, kinds: set[str], avoid: np.ndarray) -> np.ndarray:
  """Draws label, pen, debris and edge artefacts in place; returns their mask."""
  height, width = rgb.shape[:2]
  art = np.zeros((height, width), bool)
  yy, xx = np.mgrid[0:height, 0:width]
  if "label" in kinds:
    h, w = height // 6, width // 4
    r0, c0 = height - h - 4, 4
    rgb[r0 : r0 + h, c0 : c0 + w] = 0.97
    art[r0 : r0 + h, c0 : c0 + w] = True
    for k in range(6):  # "letters": black bars with a red fringe left and a blue fringe right
      cc = c0 + 6 + k * (w - 12) // 6
      rr = slice(r0 + h // 4, r0 + 3 * h // 4)
      bar = max(3, w // 30)
      rgb[rr, cc : cc + bar] = 0.05
      rgb[rr, cc - 1] = [0.6, 0.1, 0.1]
      rgb[rr, cc + bar] = [0.1, 0.1, 0.6]
  if "pen" in kinds:
    for colour in ([0.15, 0.25, 0.75], [0.1, 0.55, 0.2]):
      r0, r1 = rng.integers(0, height, 2)
      t = np.linspace(0, 1, 4 * width)
      rows = (r0 + (r1 - r0) * t + 0.05 * height * np.sin(6 * t)).astype(int).clip(0, height - 1)
      cols = (t * (width - 1)).astype(int)
      line = np.zeros((height, width), bool)
      line[rows, cols] = True
      line = ndimage.binary_dilation(line, iterations=max(2, width // 300)) & ~avoid
      rgb[line] = colour
      art |= line
  if "debris" in kinds:
    for _ in range(40):
      r, c, rad = rng.integers(0, height), rng.integers(0, width), rng.integers(1, 4)
      dot = ((yy - r) ** 2 + (xx - c) ** 2 <= rad**2) & ~avoid
      rgb[dot] = rng.choice([[0.25, 0.22, 0.2], [0.4, 0.35, 0.3], [0.1, 0.1, 0.1]])
      art |= dot
  if "edge" in kinds:
    band = max(6, width // 30)
    ramp = np.clip(1 - xx / band, 0, 1)[..., None]
    edge = (xx < band) & ~avoid
    rgb[edge] = (rgb * (1 - 0.9 * ramp))[edge]
    art |= edge & (ramp[..., 0] > 0.3)
  return art


def generated_slide(
  rng, texture: np.ndarray, *, shape=(384, 512), stain: float = 1.0, tinted: bool = False, kinds=(), coverage=0.3,
  sigma=None, window=None,
):
  """A slide with known tissue: returns (rgb, tissue, artefact mask).

  With `window` (a share of the slide's side), the tissue is one section: blobs covering `coverage` of the
  slide, inside a square window of that side at a random place.
  """
  height, width = shape
  if window is None:
    truth = blobs(rng, shape, coverage, sigma or min(shape) / 12)
  else:
    side = int(window * min(shape))
    truth = np.zeros(shape, bool)
    r0 = rng.integers(height // 10, height - side - height // 10)
    c0 = rng.integers(width // 10, width - side - width // 10)
    yy, xx = (np.mgrid[0:side, 0:side] - (side - 1) / 2) / (side / 2)
    section = blobs(rng, (side, side), 1.3 * coverage * height * width / side**2, side / 5) & (yy**2 + xx**2 < 1)
    truth[r0 : r0 + side, c0 : c0 + side] = section
  yy, xx = np.mgrid[0:height, 0:width]
  background = np.array([0.80, 0.86, 0.83] if tinted else [0.96, 0.96, 0.95])
  radius2 = ((yy - height / 2) / height) ** 2 + ((xx - width / 2) / width) ** 2
  light = background * (1 - (0.3 if tinted else 0.05) * radius2[..., None])
  if stain == "uneven":  # stain strength varying smoothly from 0.15 to 1 over the slide
    field = ndimage.gaussian_filter(rng.normal(size=shape), min(shape) / 4)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-9)
    stain = (0.15 + 0.85 * field)[..., None]
  transmission = np.clip(tile(texture, shape, rng), 1 / 255, 1) ** stain
  rgb = np.where(truth[..., None], light * transmission, light) + rng.normal(0, 0.01, (height, width, 3))
  art = draw_artefacts(rng, rgb, set(kinds), truth)
  return np.clip(rgb, 0, 1).astype(np.float32), truth & ~art, art & ~truth


ARTEFACT_SETS = {"none": (), "label+edge": ("label", "edge"), "pen+debris": ("pen", "debris"),
                 "all": ("label", "edge", "pen", "debris")}


# ---------------------------------------------------------------------------------------------------------------
# Contact sheets.
# ---------------------------------------------------------------------------------------------------------------


def outlined(rgb: np.ndarray, masks: list[np.ndarray], colours, width: int = 240) -> np.ndarray:
  from skimage.segmentation import find_boundaries
  from skimage.transform import resize

  height = int(round(rgb.shape[0] * width / rgb.shape[1]))
  out = resize(rgb, (height, width, 3), order=1, anti_aliasing=True)
  for mask, colour in zip(masks, colours):
    small = resize(mask.astype(np.float32), (height, width), order=0) > 0.5
    out[find_boundaries(small, mode="inner")] = colour
  return out


def sheet(tiles: list[np.ndarray], columns: int) -> np.ndarray:
  height = max(t.shape[0] for t in tiles)
  width = max(t.shape[1] for t in tiles)
  rows = -(-len(tiles) // columns)
  out = np.ones((rows * (height + 4), columns * (width + 4), 3))
  for i, t in enumerate(tiles):
    r, c = divmod(i, columns)
    out[r * (height + 4) : r * (height + 4) + t.shape[0], c * (width + 4) : c * (width + 4) + t.shape[1]] = t
  return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_tissue.json"))
  args = parser.parse_args()
  from skimage.io import imsave

  t0 = time.perf_counter()
  slides = shipped_slides()
  results = {"methods": list(METHODS), "real": {}, "generated": [], "crop": []}

  # (a) Stain strength on the shipped slides.
  print("(a) Dice of the mask of the paled slide against the mask of the original")
  print(f"{'slide':18s} {'paling':8s} " + " ".join(f"{m:>10s}" for m in METHODS))
  tiles = []
  for name, rgb in slides.items():
    base = {m: histology.tissue_mask(rgb, method=m) for m in METHODS}
    entry = {"tissue_fraction": {m: float(base[m].mean()) for m in METHODS}}
    for paling, make in PALINGS.items():
      pale = make(rgb)
      scores = {m: dice(histology.tissue_mask(pale, method=m), base[m]) for m in METHODS}
      entry[paling] = scores
      print(f"{name:18s} {paling:8s} " + " ".join(f"{scores[m]:10.3f}" for m in METHODS))
      if paling == "blend30":
        pale_masks = [histology.tissue_mask(pale, method=m) for m in ("otsu", "chroma")]
        pale_tile = outlined(pale, pale_masks, ([1, 0, 0], [0, 0.7, 0]))
    results["real"][name] = entry
    tiles += [outlined(rgb, [base["otsu"], base["chroma"]], ([1, 0, 0], [0, 0.7, 0])), pale_tile]
  figures = pathlib.Path(args.figures)
  figures.mkdir(parents=True, exist_ok=True)
  imsave(figures / "tissue_masks.png", sheet(tiles, 6), check_contrast=False)
  summary = {}
  for paling in PALINGS:
    summary[paling] = {m: float(np.median([results["real"][k][paling][m] for k in slides])) for m in METHODS}
    summary[paling + "_min"] = {m: float(np.min([results["real"][k][paling][m] for k in slides])) for m in METHODS}
  results["real_summary"] = summary
  print("median:", json.dumps(summary, indent=None))

  # (b) Generated slides with known tissue.
  rng = np.random.default_rng(0)
  textures = {k: texture_from(slides[k]) for k in ("rcc-UH9812_03", "pig206-optical")}
  print("\n(b) generated slides: Dice against the known tissue / share of artefact pixels called tissue")
  gen_tiles = []
  for tex_name, texture in textures.items():
    for tinted in (False, True):
      for stain in (1.0, 0.3, "uneven"):
        for art_name, kinds in ARTEFACT_SETS.items():
          rgb, truth, art = generated_slide(rng, texture, stain=stain, tinted=tinted, kinds=kinds)
          row = {"texture": tex_name, "tinted": tinted, "stain": stain, "artefacts": art_name}
          for m in METHODS:
            mask = histology.tissue_mask(rgb, method=m)
            row[m] = {"dice": dice(mask, truth), "artefact_in": float(mask[art].mean()) if art.any() else 0.0}
          results["generated"].append(row)
          print(f"{tex_name:15s} tinted={tinted!s:5s} stain={stain!s:6s} {art_name:11s} "
                + " ".join(f"{m}={row[m]['dice']:.3f}/{row[m]['artefact_in']:.2f}" for m in METHODS))
          if art_name == "all" and tex_name == "rcc-UH9812_03":
            masks = [histology.tissue_mask(rgb, method=m) for m in ("otsu", "chroma")]
            gen_tiles.append(outlined(rgb, [truth] + masks, ([0, 0, 1], [1, 0, 0], [0, 0.7, 0])))
  imsave(figures / "tissue_masks_generated.png", sheet(gen_tiles, 3), check_contrast=False)
  gen = results["generated"]
  results["generated_summary"] = {
    m: {
      "median_dice": float(np.median([r[m]["dice"] for r in gen])),
      "min_dice": float(np.min([r[m]["dice"] for r in gen])),
      "median_dice_stain30": float(np.median([r[m]["dice"] for r in gen if r["stain"] == 0.3])),
      "median_dice_uneven": float(np.median([r[m]["dice"] for r in gen if r["stain"] == "uneven"])),
      "median_dice_tinted": float(np.median([r[m]["dice"] for r in gen if r["tinted"]])),
      "mean_artefact_in": float(np.mean([r[m]["artefact_in"] for r in gen if r["artefacts"] != "none"])),
    }
    for m in METHODS
  }
  print("summary:", json.dumps(results["generated_summary"], indent=1))

  # (c) The tissue crop on large slides with tiny tissue.
  print("\n(c) tissue crop, 2048 x 2048 slides with tiny tissue, label, pen, debris and edge")
  crop_rng = np.random.default_rng(1)
  for k in range(12):
    texture = textures["rcc-UH9812_03" if k % 2 == 0 else "pig206-optical"]
    stain = (1.0, 0.3, "uneven")[k % 3]
    coverage = (0.003, 0.006, 0.01)[(k // 3) % 3]
    rgb, truth, _ = generated_slide(
      crop_rng, texture, shape=(2048, 2048), stain=stain, tinted=k >= 6, kinds=ARTEFACT_SETS["all"],
      coverage=coverage, window=2.2 * np.sqrt(coverage),
    )
    start = time.perf_counter()
    crop = msi_tissue.tissue_crop(rgb, pixel_size_um=1.0)
    seconds = time.perf_counter() - start
    r0, c0, r1, c1 = crop.box_px
    rows, cols = np.nonzero(truth)
    inside = float(truth[r0:r1, c0:c1].sum() / truth.sum())
    row = {"stain": stain, "coverage": float(truth.mean()), "tinted": k >= 6, "tissue_inside_crop": inside,
           "crop_fraction_of_slide": float((r1 - r0) * (c1 - c0) / truth.size),
           "tissue_fraction_of_crop": float(truth[r0:r1, c0:c1].mean()), "seconds": seconds}
    results["crop"].append(row)
    print(json.dumps(row))
  print(f"\ntotal {time.perf_counter() - t0:.0f} s")
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
