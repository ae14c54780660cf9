"""The real data sets shipped with msisynth, as msisynth objects.

- `load_msiflow`: mouse urinary bladder section UPEC_12 from msiFlow: 10 MALDI ion images on a 140 x 128 grid,
  the measured-pixel and tissue masks, a UMAP embedding, and immunofluorescence microscopy of the same section
  before and after msiFlow's own MSI-microscopy registration. A real multimodal registration case.
- `load_mouse_brain`: three amyloid-beta ion images of a mouse hemibrain (PlaquePicker).
- `list_he_slides` / `load_he`: real H&E scans (renal cell carcinoma, pig fetus) from CardinalWorkflows.
- `load_hr2msi_bladder`: three Orbitrap ion images of a mouse urinary bladder and the stained optical image of
  the same section (a real MSI-histology pair).
- `load_msight_bladder`: a full MALDI-TOF imzML cube of a mouse urogenital section (SCiLS Lab export) and its
  H&E, with 4 rough landmark pairs (a real MSI-H&E pair). Its 130 MB are not shipped: they are read from a local
  copy, or fetched once from the Python package index into the user's cache (`msight_bladder_dir`).

The data folder (`data_dir`) is looked up in this order: `$MSISYNTH_DATA`; the `data/` folder of a source
checkout, next to the `msisynth` package (an editable install); the copy a wheel installs under
`<prefix>/share/msisynth/data` (setup.py `data_files`). Its README.md lists every file with its source and
licence. Layouts follow docs/architecture.md: images (H, W) or (H, W, C), float32 in [0, 1]. Nothing here
imports JAX or matplotlib.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import site
import sys
import sysconfig
import warnings

import numpy as np
from absl import logging

from msisynth import errors
from msisynth.io import histology
from msisynth.types import MSIImage

MOUSE_BRAIN_MZ = (4059.9, 4159.1, 4442.6)
MSIFLOW_MICROSCOPY_CHANNELS = ("autofluorescence", "Ly6G", "urothelium mask")
# What a folder must hold to count as the shipped data (a bare site-packages/data of another package does not).
_DATA_MARKERS = ("README.md", "imzml", "he", "msiflow_upec12")
_HE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_ION_IMAGE_NAME = re.compile(r"^(?P<prefix>.+?)_(?P<whole>\d+)_(?P<fraction>\d+)\.tiff?$", re.IGNORECASE)


def data_dir_candidates() -> list[pathlib.Path]:
  """The folders `data_dir` tries, in order (see the module docstring); `$MSISYNTH_DATA` alone when it is set."""
  env = os.environ.get("MSISYNTH_DATA")
  if env:
    return [pathlib.Path(env).expanduser()]
  candidates = [pathlib.Path(__file__).resolve().parents[1] / "data"]
  prefixes = [sysconfig.get_path("data"), sys.prefix, sys.exec_prefix, getattr(site, "USER_BASE", None)]
  for prefix in prefixes:
    if prefix:
      path = pathlib.Path(prefix) / "share" / "msisynth" / "data"
      if path not in candidates:
        candidates.append(path)
  return candidates


def data_dir() -> pathlib.Path:
  """The folder of shipped data: `$MSISYNTH_DATA`, else the checkout's `data/`, else the installed copy.

  A folder counts when it holds the shipped README.md, imzml/, he/ and msiflow_upec12/ (`$MSISYNTH_DATA` only
  needs to exist).

  Returns:
    The folder's path.

  Raises:
    DataError: no such folder; the message lists the places tried.
  """
  candidates = data_dir_candidates()
  if os.environ.get("MSISYNTH_DATA"):
    if not candidates[0].is_dir():
      raise errors.DataError(
        "MSISYNTH_DATA names a folder that does not exist; unset it to use the data shipped with msisynth, or "
        "point it at a folder that holds imzml/, he/, msiflow_upec12/ and mouse_brain_abeta/",
        candidates[0],
      )
    return candidates[0]
  for path in candidates:
    if all((path / name).exists() for name in _DATA_MARKERS):
      return path
  raise errors.DataError(
    "shipped data folder not found (tried " + ", ".join(os.fspath(p) for p in candidates) + "); install msisynth "
    "from a source checkout or a wheel built from one, or set MSISYNTH_DATA to a copy of the repository's data/"
  )


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


# ---------------------------------------------------------------------------------------------------------------
# The two real MSI-histology pairs.
# ---------------------------------------------------------------------------------------------------------------

HR2MSI_MZ = (741.5307, 743.5482, 798.541)
HR2MSI_PIXEL_SIZE_UM = 10.0
MSIGHT_PACKAGE = "msight==1.0.24"
# sha256 of msight-1.0.24-py3-none-any.whl as served by the Python package index (75,428,910 bytes).
MSIGHT_WHEEL_SHA256 = "91dd89eba919c744c5ecccdd1eb8885031e35a23171a7d055ed513073de69c23"
MSIGHT_FILES = ("prostate_example.imzML", "prostate_example.ibd", "prostate_he_example.tif")
_MSIGHT_WHEEL_FOLDER = "notebooks/example_data/"
_MSIGHT_LANDMARKS = "landmarks_rough_msightnotebook.csv"


def cache_dir() -> pathlib.Path:
  """Where msisynth keeps downloaded data: `$MSISYNTH_CACHE`, else `$XDG_CACHE_HOME/msisynth`, else
  `~/.cache/msisynth` (the folder may not exist yet)."""
  env = os.environ.get("MSISYNTH_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "msisynth"


def _msight_candidates(root: str | os.PathLike | None) -> list[pathlib.Path]:
  candidates = []
  if root is not None:
    candidates.append(pathlib.Path(root) / "msight_bladder")
  else:
    try:
      candidates.append(data_dir() / "msight_bladder")
    except errors.DataError:
      pass
    # A checkout next to a shared data folder (../shared/data beside the repository), when there is one.
    candidates.append(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "msight_bladder")
  candidates.append(cache_dir() / "msight_bladder")
  return candidates


def _fetch_msight(target: pathlib.Path, timeout_s: float = 600.0) -> None:
  """Downloads the msight wheel with pip, checks its sha256 and extracts the example files into `target`."""
  import hashlib
  import shutil
  import subprocess
  import tempfile
  import zipfile

  how = (
    f"to get it by hand: `python -m pip download --no-deps {MSIGHT_PACKAGE}`, then unzip "
    f"{_MSIGHT_WHEEL_FOLDER}{{{','.join(MSIGHT_FILES)}}} from the wheel into {target}"
  )
  target.parent.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(tempfile.mkdtemp(prefix=".msight-", dir=target.parent))
  try:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--dest", os.fspath(work), MSIGHT_PACKAGE]  # fmt: skip
    try:
      run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise errors.DataError(f"could not download {MSIGHT_PACKAGE} ({e}); {how}", target) from e
    wheels = sorted(work.glob("msight-*.whl"))
    if run.returncode != 0 or not wheels:
      tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
      raise errors.DataError(
        f"could not download {MSIGHT_PACKAGE} (pip: {tail[0]}); are you offline? {how}", target
      )
    digest = hashlib.sha256()
    with open(wheels[0], "rb") as fh:
      for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    if digest.hexdigest() != MSIGHT_WHEEL_SHA256:
      raise errors.DataError(
        f"the downloaded {wheels[0].name} has sha256 {digest.hexdigest()}, expected {MSIGHT_WHEEL_SHA256}; "
        "refusing to use it",
        target,
      )
    staging = work / "msight_bladder"
    staging.mkdir()
    with zipfile.ZipFile(wheels[0]) as wheel:
      names = set(wheel.namelist())
      for name in MSIGHT_FILES:
        with wheel.open(_MSIGHT_WHEEL_FOLDER + name) as src, open(staging / name, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
      licence = [n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n]
      if licence:
        (staging / "LICENSE").write_bytes(wheel.read(licence[0]))
    if target.exists():
      shutil.rmtree(target)
    os.replace(staging, target)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def msight_bladder_dir(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> pathlib.Path:
  """The folder holding the msight example files (`MSIGHT_FILES`), fetching them once when needed.

  Local copies are tried in order: `<data folder>/msight_bladder`; `../shared/data/msight_bladder` beside a
  source checkout; `cache_dir()/msight_bladder`. With none of them, and `download`, the msight package is
  downloaded once with `python -m pip download --no-deps msight==1.0.24` (75 MB), its sha256 checked against
  `MSIGHT_WHEEL_SHA256`, and the three files extracted into `cache_dir()/msight_bladder`.

  Args:
    data_dir: the shipped data folder (default: `data_dir()`).
    download: fetch the files when no local copy exists; otherwise raise.

  Returns:
    The folder's path.

  Raises:
    DataError: no local copy and `download` is False, the download failed (offline) or its checksum is
      wrong; the message says how to get the files by hand.
  """
  candidates = _msight_candidates(data_dir)
  for folder in candidates:
    if all((folder / name).is_file() for name in MSIGHT_FILES):
      return folder
  target = candidates[-1]
  if not download:
    raise errors.DataError(
      "the msight example data is not here (looked in "
      + ", ".join(os.fspath(c) for c in candidates)
      + f"); call load_msight_bladder() online to fetch it once, or run `python -m pip download --no-deps "
      f"{MSIGHT_PACKAGE}` and unzip {_MSIGHT_WHEEL_FOLDER}{{{','.join(MSIGHT_FILES)}}} into {target}"
    )
  logging.info("fetching %s once into %s (75 MB)", MSIGHT_PACKAGE, target)
  _fetch_msight(target)
  return target


@dataclasses.dataclass(frozen=True)
class MsightBladder:
  """The msight example: MALDI-TOF MSI of a mouse urogenital (bladder) section and its H&E.

  No exact registration ground truth exists: `landmarks_px` are 4 manual point pairs, a rough check (an affine
  fit leaves residuals of several MSI pixels).

  Attributes:
    msi: the continuous imzML cube (163 x 274 pixels at 25 µm, 33,035 measured pixels inside the acquisition's
      region of interest); the file's 422 m/z values sorted, the repeated value 1450.5458 merged into one
      channel (421 channels).
    he: float32 (1920, 2560, 3) RGB in [0, 1]. The field of view cuts the tissue at its left edge.
    histology_pixel_size_um: H&E pixel size implied by the landmarks and the MSI's 25 µm (about 2.7 µm).
    he_recorded_pixel_size_um: the pixel size the TIFF records (0.17 µm), which cannot be right for its 2x
      objective.
    landmarks_px: float64 (4, 4): msi_x, msi_y (MSI pixel column, row), he_x, he_y (H&E pixel column, row);
      pixel centres at integers.
  """

  msi: MSIImage
  he: np.ndarray
  histology_pixel_size_um: float
  he_recorded_pixel_size_um: float | None
  landmarks_px: np.ndarray

  @property
  def he_pixel_size_um(self) -> float:
    """Deprecated name of `histology_pixel_size_um`."""
    return self.histology_pixel_size_um

  def landmarks_um(self) -> np.ndarray:
    """The landmarks in µm in the `load_landmarks_csv` layout: fixed (H&E) x, y, moving (MSI) x, y."""
    py, px = self.msi.pixel_size_um
    lm = self.landmarks_px
    return np.stack([lm[:, 2] * self.histology_pixel_size_um, lm[:, 3] * self.histology_pixel_size_um,
                     lm[:, 0] * px, lm[:, 1] * py], axis=1)  # fmt: skip


def _landmark_pixel_size(landmarks_px: np.ndarray, msi_pixel_size_um: float) -> float:
  """H&E pixel size (µm) implied by point pairs: the scale of the least-squares affine MSI µm -> H&E pixels."""
  msi_um = landmarks_px[:, :2] * msi_pixel_size_um
  design = np.concatenate([msi_um, np.ones((len(msi_um), 1))], axis=1)
  coef, *_ = np.linalg.lstsq(design, landmarks_px[:, 2:], rcond=None)
  return float(1.0 / math.sqrt(abs(np.linalg.det(coef[:2]))))


def load_msight_bladder(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> MsightBladder:
  """Loads the msight example pair (MSI cube, H&E, rough landmarks), fetching the 130 MB once if needed.

  See `msight_bladder_dir` for where the files are looked for. The landmarks are shipped in the data folder.
  The MSI is read with `read_imzml`, which sorts the file's unsorted m/z axis (it goes backwards at 6 places)
  and merges its repeated channel, logging both.

  Args:
    data_dir: the shipped data folder (default: `data_dir()`).
    download: fetch the files when no local copy exists.

  Returns:
    MsightBladder.

  Raises:
    DataError: files missing (see `msight_bladder_dir`) or not as expected.
  """
  from msisynth.io import imzml

  folder = msight_bladder_dir(data_dir, download=download)
  landmarks_path = _resolve(data_dir, "msight_bladder", _MSIGHT_LANDMARKS)
  try:
    landmarks = np.loadtxt(landmarks_path, delimiter=",", comments="#", ndmin=2)
  except ValueError as e:
    raise errors.DataError(f"cannot read the landmarks ({e})", landmarks_path) from e
  if landmarks.shape[1] != 4 or len(landmarks) < 3:
    raise errors.DataError(f"expected rows of msi_x,msi_y,he_x,he_y, got shape {landmarks.shape}", landmarks_path)
  msi = imzml.read_imzml(folder / MSIGHT_FILES[0], progress=False)
  if msi.pixel_size_um is None:
    raise errors.DataError("the imzML records no pixel size (expected 25 µm)", folder / MSIGHT_FILES[0])
  he_path = folder / MSIGHT_FILES[2]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", histology.PixelSizeWarning)  # the recorded 0.17 µm is known to be wrong
    recorded = histology.histology_pixel_size_um(he_path)
  he = histology.read_histology(he_path)
  msi.metadata.update({"real": True, "simulated": False, "dataset": "msight_bladder"})
  return MsightBladder(
    msi=msi,
    he=he,
    histology_pixel_size_um=_landmark_pixel_size(landmarks, msi.pixel_size_um[1]),
    he_recorded_pixel_size_um=None if recorded is None else float(recorded[1]),
    landmarks_px=landmarks,
  )


@dataclasses.dataclass(frozen=True)
class HR2MSIBladder:
  """AP-SMALDI Orbitrap MSI of a mouse urinary bladder (Römpp et al. 2010) and the stained optical image.

  Attributes:
    msi: (134, 260, 3) float32 at 10 µm: for each of the ions m/z 741.5307 (SM(34:1)+K), 743.5482 (unknown)
      and 798.541 (PC(34:1)+K), the sum of the file's peaks within ± 0.1 Da (the file's own tolerance). The
      source keeps only peaks near these ions, so a pixel without any is indistinguishable from one not
      measured: every pixel of the raster counts as measured (mask all True); metadata `pixels_with_peaks`
      counts those holding at least one peak.
    optical: float32 (482, 904, 3) RGB in [0, 1] (its alpha composited over white), blue stain, not H&E. Its
      pixel size is not recorded; if it spans the MSI raster's field of view it is about 2.9 µm.
  """

  msi: MSIImage
  optical: np.ndarray


def load_hr2msi_bladder(data_dir: str | os.PathLike | None = None) -> HR2MSIBladder:
  """Loads the HR2MSI mouse urinary bladder pair: 3 ion images (netCDF, read with scipy) and the optical image.

  Args:
    data_dir: the shipped data folder (default: `data_dir()`).

  Returns:
    HR2MSIBladder.

  Raises:
    DataError: files missing or not as expected.
  """
  from scipy.io import netcdf_file

  root = _resolve(data_dir, "hr2msi_bladder")
  cdf = _resolve(root, "HR2MSI_mouse_urinary_bladder_S096_Figure1.cdf")
  try:
    with netcdf_file(cdf, "r", mmap=False) as f:
      width, height = int(f._attributes["width"]), int(f._attributes["height"])
      mz = np.asarray(f.variables["mz"].data, np.float64).copy()
      intensity = np.asarray(f.variables["intensity"].data, np.float64).copy()
      x = np.asarray(f.variables["x"].data, np.int64).copy()
      y = np.asarray(f.variables["y"].data, np.int64).copy()
      tolerance = f.variables["mz"]._attributes.get("tolerance", b"da:0.1")
  except (OSError, KeyError, TypeError, ValueError) as e:
    raise errors.DataError(f"cannot read the netCDF file ({type(e).__name__}: {e})", cdf) from e
  unit, _, value = (tolerance.decode() if isinstance(tolerance, bytes) else str(tolerance)).partition(":")
  if unit.lower() != "da":
    raise errors.DataError(f"unexpected m/z tolerance {tolerance!r} (expected da:<value>)", cdf)
  tol = float(value)
  if not (mz.shape == intensity.shape == x.shape == y.shape):
    raise errors.DataError("the arrays mz, intensity, x and y differ in length", cdf)
  if x.size and (x.min() < 1 or y.min() < 1 or x.max() > width or y.max() > height):
    raise errors.DataError(f"pixel positions outside the {width} x {height} raster", cdf)
  ions = np.array(HR2MSI_MZ)
  channel = np.argmin(np.abs(mz[:, None] - ions[None, :]), axis=1)
  near = np.abs(mz - ions[channel]) <= tol + 1e-9
  cube = np.zeros((height, width, ions.size), np.float64)
  np.add.at(cube, (y[near] - 1, x[near] - 1, channel[near]), intensity[near])
  with_peaks = np.zeros((height, width), bool)
  with_peaks[y - 1, x - 1] = True
  msi = MSIImage(
    cube=cube.astype(np.float32),
    mz=ions,
    mask=np.ones((height, width), bool),
    pixel_size_um=(HR2MSI_PIXEL_SIZE_UM, HR2MSI_PIXEL_SIZE_UM),
    metadata={
      "source": os.fspath(cdf),
      "real": True,
      "simulated": False,
      "dataset": "hr2msi_bladder",
      "tol_da": tol,
      "pixels_with_peaks": int(with_peaks.sum()),
      "peaks_outside_windows": int((~near).sum()),
    },
  )
  optical = histology.read_histology(_resolve(root, "HR2MSI_mouse_urinary_bladder_S096_optical.tif"))
  return HR2MSIBladder(msi=msi, optical=optical)
