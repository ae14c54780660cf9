"""Draws the two real MSI ↔ histology pairs shipped with (or fetched by) msisynth: docs/figures/real_pairs.png.

  python docs/make_real_pairs_figure.py            # about 15 s; fetches msight_bladder once if not cached

Each row: the histology image, the MSI's total ion count and one ion image, read with msisynth's own readers
(`datasets.load_msight_bladder`, `datasets.load_hr2msi_bladder`) and drawn with
`msisynth.viz.msi.plot_msi_histology_pairs`. The images are not registered to each other.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from msisynth import datasets  # noqa: E402
from msisynth.viz import msi as viz_msi  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "figures" / "real_pairs.png"


def main() -> None:
  msight = datasets.load_msight_bladder()
  hr2msi = datasets.load_hr2msi_bladder()
  # msight: the ion with the highest mean intensity over the measured pixels.
  mean = msight.msi.cube[msight.msi.mask].mean(axis=0)
  msight_mz = float(msight.msi.mz[int(np.argmax(mean))])
  fig = viz_msi.plot_msi_histology_pairs(
    [
      ("msight_bladder", msight.he, msight.msi, msight_mz),
      ("hr2msi_bladder", hr2msi.optical, hr2msi.msi, 798.541),  # PC(34:1)+K
    ],
    histology_pixel_sizes_um=[msight.histology_pixel_size_um, None],
    title="Real MSI ↔ histology pairs (not registered): msight H&E at the landmark-implied "
    f"{msight.histology_pixel_size_um:.2f} µm; HR2MSI optical image in pixels (size not recorded)",
  )
  path = viz_msi.save_figure(fig, OUT, dpi=110, overwrite=True)
  print(f"wrote {path} (msight ion image m/z {msight_mz:.4f})")


if __name__ == "__main__":
  main()
