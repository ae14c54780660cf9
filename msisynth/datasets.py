"""The real data sets shipped beside the repository (../shared/data), as msisynth objects.

- `load_msiflow`: mouse urinary bladder section UPEC_12 from msiFlow: 10 MALDI ion images on a 140 x 128 grid,
  the measured-pixel and tissue masks, a UMAP embedding, and immunofluorescence microscopy of the same section
  before and after msiFlow's own MSI-microscopy registration. A real multimodal registration case.
- `load_mouse_brain`: three amyloid-beta ion images of a mouse hemibrain (PlaquePicker).
- `list_he_slides` / `load_he`: real H&E scans (renal cell carcinoma, pig fetus) from CardinalWorkflows.

The folder is `$MSISYNTH_DATA` when set, else `../shared/data` next to the repository (see its README.md for
sources and licences). Layouts follow docs/architecture.md: images (H, W) or (H, W, C), float32 in [0, 1].
Nothing here imports JAX or matplotlib.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import numpy as np

from msisynth import errors
from msisynth.io import histology
from msisynth.types import MSIImage

MOUSE_BRAIN_MZ = (4059.9, 4159.1, 4442.6)
MSIFLOW_MICROSCOPY_CHANNELS = ("autofluorescence", "Ly6G", "urothelium mask")
_HE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_ION_IMAGE_NAME = re.compile(r"^(?P<prefix>.+?)_(?P<whole>\d+)_(?P<fraction>\d+)\.tiff?$", re.IGNORECASE)


def data_dir() -> pathlib.Path:
  """The folder of shipped data: `$MSISYNTH_DATA`, else `<repository>/../shared/data`.

  Returns:
    The folder's path.

  Raises:
    DataError: the folder does not exist.
  """
  env = os.environ.get("MSISYNTH_DATA")
  path = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  if not path.is_dir():
    raise errors.DataError(
      "shipped data folder not found; set MSISYNTH_DATA to the folder that holds imzml/, he/, msiflow_upec12/ "
      "and mouse_brain_abeta/",
      path,
    )
  return path


def _resolve(root: str | os.PathLike | None, *parts: str) -> pathlib.Path:
  path = (data_dir() if root is None else pathlib.Path(root)).joinpath(*parts)
  if not path.exists():
    raise errors.DataError("missing from the shipped data", path)
  return path


@dataclasses.dataclass(frozen=True)
class MsiflowSection:
  """The msiFlow UPEC_12 section: MSI and microscopy of one mouse bladder section.

  Every image lies on the MSI grid (140 x 128 pixels) except `microscopy_unregistered`, which has the same
  size but is not aligned. The TIFFs carry no physical pixel size (their resolution tags are 1 pixel per
  unit with no unit), so `msi.pixel_size_um` is None.

  Attributes:
    msi: the 10 ion images as channels in increasing m/z order (m/z from the file names), intensities as
      exported by msiFlow (8-bit, scaled to [0, 1]); mask from `msi_measured_pixels.tif`; metadata `source`,
      `real` (True), `dataset`, `ion_image_files`.
    tissue_mask: bool (H, W), msiFlow's tissue segmentation of the MSI.
    umap: float32 (H, W) in [0, 1], greyscale UMAP embedding of the spectra.
    microscopy_unregistered: float32 (H, W, 3) in [0, 1]: autofluorescence, Ly6G, urothelium mask
      (`MSIFLOW_MICROSCOPY_CHANNELS`), before registration.
    microscopy_registered: the same after msiFlow's registration onto the MSI grid: a peer's answer to compare
      with, not ground truth.
  """

  msi: MSIImage
  tissue_mask: np.ndarray
  umap: np.ndarray
  microscopy_unregistered: np.ndarray
  microscopy_registered: np.ndarray


def _ion_image_mz(path: pathlib.Path) -> float:
  match = _ION_IMAGE_NAME.match(path.name)
  if match is None:
    raise errors.DataError("ion image file name does not end in _<m/z with _ for .>.tif", path)
  return float(f"{match['whole']}.{match['fraction']}")


def load_msiflow(data_dir: str | os.PathLike | None = None) -> MsiflowSection:
  """Loads the msiFlow UPEC_12 section (MSI ion images, masks, UMAP and microscopy).

  Args:
    data_dir: the shipped data folder (default: `data_dir()`).

  Returns:
    MsiflowSection.

  Raises:
    DataError: files missing, unreadable, or of inconsistent shapes.
  """
  root = _resolve(data_dir, "msiflow_upec12")
  files = sorted(_resolve(root, "ion_images").glob("*.tif*"), key=_ion_image_mz)
  if not files:
    raise errors.DataError("no ion images (*.tif) found", root / "ion_images")
  mz = np.array([_ion_image_mz(f) for f in files])
  ions = [histology.read_image(f) for f in files]
  shapes = {im.shape for im in ions}
  if len(shapes) != 1 or ions[0].ndim != 2:
    raise errors.DataError(f"ion images must share one (H, W) shape, got {sorted(shapes)}", root / "ion_images")
  cube = np.stack(ions, axis=-1).astype(np.float32)
  mask = histology.read_image(_resolve(root, "msi_measured_pixels.tif")) > 0
  if mask.shape != cube.shape[:2]:
    raise errors.DataError(f"mask shape {mask.shape} != ion image shape {cube.shape[:2]}", root)
  cube[~mask] = 0.0
  msi = MSIImage(
    cube=cube,
    mz=mz,
    mask=mask,
    pixel_size_um=None,
    metadata={
      "source": os.fspath(root),
      "real": True,
      "simulated": False,
      "dataset": "msiflow_upec12",
      "ion_image_files": [f.name for f in files],
    },
  )

  def on_grid(name: str, channels: int | None) -> np.ndarray:
    image = histology.read_image(_resolve(root, name))
    expected = cube.shape[:2] if channels is None else cube.shape[:2] + (channels,)
    if image.shape != expected:
      raise errors.DataError(f"shape {image.shape}, expected {expected}", root / name)
    return image

  return MsiflowSection(
    msi=msi,
    tissue_mask=on_grid("msi_tissue_mask.tif", None) > 0,
    umap=on_grid("msi_umap_grayscale.tif", None),
    microscopy_unregistered=on_grid("microscopy_unregistered.tif", 3),
    microscopy_registered=on_grid("microscopy_registered_by_msiflow.tif", 3),
  )


def load_mouse_brain(data_dir: str | os.PathLike | None = None) -> MSIImage:
  """Loads the mouse hemibrain amyloid-beta ion images (PlaquePicker, NLGF 67-week mouse 1).

  The source stores pixels outside the acquired region as NaN: those are the unmeasured pixels (mask False,
  cube 0); every other pixel is measured (mask True), including off-tissue ones whose intensities are near
  zero. The source gives no pixel size (`pixel_size_um` None).

  Args:
    data_dir: the shipped data folder (default: `data_dir()`).

  Returns:
    MSIImage (314, 534, 3) float32 at m/z 4059.9, 4159.1, 4442.6.

  Raises:
    DataError: the file is missing or not the expected array.
  """
  path = _resolve(data_dir, "mouse_brain_abeta", "ion_images.npy")
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise errors.DataError(f"cannot read ({e})", path) from e
  if data.ndim != 3 or data.shape[2] != len(MOUSE_BRAIN_MZ):
    raise errors.DataError(f"expected (H, W, {len(MOUSE_BRAIN_MZ)}), got {data.shape}", path)
  finite = np.isfinite(data)
  mask = finite.all(axis=2)
  cube = np.where(mask[..., None], data, 0.0).astype(np.float32)
  return MSIImage(
    cube=cube,
    mz=np.array(MOUSE_BRAIN_MZ),
    mask=mask,
    pixel_size_um=None,
    metadata={"source": os.fspath(path), "real": True, "simulated": False, "dataset": "mouse_brain_abeta"},
  )


def list_he_slides(data_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The shipped H&E scans, sorted by name.

  Args:
    data_dir: the shipped data folder (default: `data_dir()`).

  Returns:
    Paths of the images in `he/`.

  Raises:
    DataError: the folder is missing.
  """
  folder = _resolve(data_dir, "he")
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in _HE_SUFFIXES and p.is_file())


def load_he(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> np.ndarray:
  """Loads an H&E image: a path, or the name of a shipped slide with or without extension ("rcc-UH0505_12").

  Args:
    name_or_path: file path or shipped slide name.
    data_dir: the shipped data folder (default: `data_dir()`), used for names.

  Returns:
    float32 (H, W, 3) RGB in [0, 1] (RGBA scans are composited over white).

  Raises:
    DataError: no such file or slide (the message lists the shipped names); ImageReadError when unreadable.
  """
  path = pathlib.Path(name_or_path)
  if path.is_file():
    return histology.read_histology(path)
  slides = list_he_slides(data_dir)
  for slide in slides:
    if str(name_or_path) in (slide.name, slide.stem):
      return histology.read_histology(slide)
  raise errors.DataError(
    f"no such file or shipped H&E slide; shipped slides: {', '.join(s.stem for s in slides)}", path
  )
