"""The shipped real data sets load with the expected shapes and values."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tifffile

from msisynth import datasets, errors

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_data_dir(shared_data, monkeypatch, tmp_path):
  monkeypatch.setenv("MSISYNTH_DATA", str(shared_data))
  assert datasets.data_dir() == shared_data
  monkeypatch.setenv("MSISYNTH_DATA", str(tmp_path / "absent"))
  with pytest.raises(errors.DataError, match="MSISYNTH_DATA"):
    datasets.data_dir()
  monkeypatch.delenv("MSISYNTH_DATA")
  # Without the variable: the repository's own data/ folder, next to the package.
  assert datasets.data_dir() == REPO / "data"
  assert (datasets.data_dir() / "README.md").is_file()


def test_data_dir_is_found_from_an_installed_wheel(tmp_path):
  """A wheel built from the checkout installs the data under <prefix>/share/msisynth/data, where data_dir finds it."""
  # Build from a copy of the sources, so that the build leaves nothing in the checkout.
  source = tmp_path / "source"
  ignore = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", "reports", "runs", "*.pyc")
  shutil.copytree(REPO, source, ignore=ignore)
  wheels = tmp_path / "wheels"
  build = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels),
     str(source)], capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
  if build.returncode != 0:
    pytest.skip(f"cannot build a wheel offline here: {build.stderr.strip()[-300:]}")
  wheel = next(wheels.glob("msisynth-*.whl"))
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
  assert any(n.endswith(".data/data/share/msisynth/data/README.md") for n in names)
  assert any(n.endswith("share/msisynth/data/imzml/pyimzml/Example_Continuous.ibd") for n in names)
  assert not any(n.startswith("data/") for n in names)
  # Install it into a fresh prefix (a virtual environment of its own) and ask from outside the checkout.
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
  python = venv / "bin" / "python"
  clean = {k: v for k, v in os.environ.items() if k not in ("MSISYNTH_DATA", "PYTHONPATH")}
  install = subprocess.run(
    [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
    capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean)  # fmt: skip
  if install.returncode != 0:
    pytest.skip(f"pip cannot install into another environment here: {install.stderr.strip()[-300:]}")
  # The installed package imports NumPy and friends from this interpreter's environment (no site .pth files).
  site_dirs = [p for p in sys.path if p.endswith("site-packages")]
  env = dict(clean)
  env["PYTHONPATH"] = os.pathsep.join(site_dirs)
  code = "import msisynth.datasets as d; print(d.__file__); print(d.data_dir())"
  run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
  assert run.returncode == 0, run.stderr[-2000:]
  module_file, found = run.stdout.split()[-2:]
  assert module_file.startswith(str(venv)), module_file
  assert found == str(venv / "share" / "msisynth" / "data")
  assert (pathlib.Path(found) / "he" / "rcc-UH0505_12.png").is_file()


def test_load_msiflow(shared_data):
  section = datasets.load_msiflow(shared_data)
  msi = section.msi
  assert msi.cube.shape == (140, 128, 10) and msi.cube.dtype == np.float32
  np.testing.assert_allclose(msi.mz[:3], [335.971, 372.1893, 521.4526])
  assert np.all(np.diff(msi.mz) > 0)
  assert msi.pixel_size_um is None
  assert msi.metadata["real"] is True and msi.metadata["simulated"] is False
  folder = shared_data / "msiflow_upec12"
  measured = tifffile.imread(folder / "msi_measured_pixels.tif") > 0
  np.testing.assert_array_equal(msi.mask, measured)
  raw = tifffile.imread(folder / "ion_images" / "UPEC_12_546_5264.tif")
  k = int(np.argmin(np.abs(msi.mz - 546.5264)))
  np.testing.assert_allclose(msi.cube[..., k], raw / 255.0 * measured)
  assert not msi.cube[~msi.mask].any()
  assert section.tissue_mask.dtype == bool and section.tissue_mask.shape == (140, 128)
  assert not (section.tissue_mask & ~msi.mask).any()
  assert section.umap.shape == (140, 128)
  for image in (section.microscopy_unregistered, section.microscopy_registered):
    assert image.shape == (140, 128, 3) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1
  assert not np.array_equal(section.microscopy_unregistered, section.microscopy_registered)


def test_load_mouse_brain(shared_data):
  msi = datasets.load_mouse_brain(shared_data)
  assert msi.cube.shape == (314, 534, 3)
  np.testing.assert_allclose(msi.mz, [4059.9, 4159.1, 4442.6])
  raw = np.load(shared_data / "mouse_brain_abeta" / "ion_images.npy")
  np.testing.assert_array_equal(msi.mask, ~np.isnan(raw).any(axis=2))
  assert np.isfinite(msi.cube).all() and not msi.cube[~msi.mask].any()
  np.testing.assert_array_equal(msi.cube[msi.mask], raw[msi.mask])
  assert 0.5 < msi.mask.mean() < 0.9


def test_he_slides(shared_data):
  slides = datasets.list_he_slides(shared_data)
  assert len(slides) == 9 and slides == sorted(slides)
  by_name = datasets.load_he("rcc-UH0505_12", data_dir=shared_data)
  by_path = datasets.load_he(shared_data / "he" / "rcc-UH0505_12.png")
  np.testing.assert_array_equal(by_name, by_path)
  assert by_name.shape == (560, 684, 3) and by_name.dtype == np.float32
  pig = datasets.load_he("pig206-optical.png", data_dir=shared_data)  # RGBA, composited over white
  assert pig.shape == (395, 587, 3) and pig.max() <= 1
  with pytest.raises(errors.DataError, match="rcc-UH0505_12"):
    datasets.load_he("no-such-slide", data_dir=shared_data)


def test_load_hr2msi_bladder(shared_data):
  from scipy.io import netcdf_file

  pair = datasets.load_hr2msi_bladder(shared_data)
  msi = pair.msi
  assert msi.cube.shape == (134, 260, 3) and msi.cube.dtype == np.float32
  np.testing.assert_allclose(msi.mz, [741.5307, 743.5482, 798.541])
  assert msi.pixel_size_um == (10.0, 10.0) and msi.mask.all()
  assert msi.metadata["real"] and msi.metadata["pixels_with_peaks"] == 22860
  with netcdf_file(shared_data / "hr2msi_bladder" / "HR2MSI_mouse_urinary_bladder_S096_Figure1.cdf", "r",
                   mmap=False) as f:  # fmt: skip
    mz, intensity = f.variables["mz"].data.copy(), f.variables["intensity"].data.copy()
    x, y = f.variables["x"].data.copy(), f.variables["y"].data.copy()
  for k, ion in enumerate(msi.mz):
    near = np.abs(mz - ion) <= 0.1
    assert msi.cube[..., k].sum() == pytest.approx(intensity[near].sum(), rel=1e-5)
    i = np.flatnonzero(near)[0]
    assert msi.cube[y[i] - 1, x[i] - 1, k] >= np.float32(intensity[i]) * (1 - 1e-6)
  assert pair.optical.shape == (482, 904, 3) and pair.optical.dtype == np.float32
  assert 0 <= pair.optical.min() and pair.optical.max() <= 1


def test_load_msight_bladder_from_a_local_copy():
  """Reads the local copy when there is one; tests never download it."""
  try:
    folder = datasets.msight_bladder_dir(download=False)
  except errors.DataError as e:
    pytest.skip(str(e))
  pair = datasets.load_msight_bladder(download=False)
  msi = pair.msi
  assert msi.shape == (163, 274) and msi.mask.sum() == 33035
  assert msi.num_channels == 421 and np.all(np.diff(msi.mz) > 0)  # 422 values, one repeated, sorted
  assert np.isclose(msi.mz, 1450.5458, atol=1e-4).sum() == 1
  assert msi.pixel_size_um == (25.0, 25.0) and msi.metadata["mode"] == "continuous"
  assert pair.he.shape == (1920, 2560, 3)
  assert pair.he_recorded_pixel_size_um == pytest.approx(0.17)
  assert 2.5 < pair.histology_pixel_size_um < 3.0
  assert pair.landmarks_px.shape == (4, 4)
  assert pair.landmarks_um().shape == (4, 4)
  # The merged channel holds both of the file's channels at 1450.5458: check the first spectrum by hand.
  head = (folder / "prostate_example.imzML").read_bytes()[:20000].decode()
  first = head[head.index("<spectrum ") : head.index("</spectrum>")]
  x, y = (int(re.search(f'name="position {a}" value="(\\d+)"', first).group(1)) for a in "xy")
  mz_at, int_at = (int(v) for v in re.findall(r'name="external offset" value="(\d+)"', first))
  ibd = (folder / "prostate_example.ibd").read_bytes()
  raw_mz = np.frombuffer(ibd, "<f8", 422, mz_at)
  raw_intensity = np.frombuffer(ibd, "<f4", 422, int_at)
  x0, y0 = msi.metadata["coordinate_offset"]
  pixel = msi.cube[y - y0, x - x0]
  repeated = np.abs(raw_mz - 1450.5458) < 1e-4
  assert repeated.sum() == 2
  k = int(np.argmin(np.abs(msi.mz - 1450.5458)))
  assert pixel[k] == pytest.approx(raw_intensity[repeated].sum(), rel=1e-6)
  order = np.argsort(raw_mz, kind="stable")
  np.testing.assert_array_equal(np.delete(pixel, k), np.delete(raw_intensity[order], np.flatnonzero(repeated[order])))


def _fake_pip(monkeypatch, wheel_bytes=None, returncode=0, stderr=""):
  """Replaces `pip download` by a stand-in that writes `wheel_bytes` as the msight wheel (no network)."""
  calls = []

  def run(cmd, **kwargs):
    calls.append(cmd)
    dest = pathlib.Path(cmd[cmd.index("--dest") + 1])
    if wheel_bytes is not None:
      (dest / "msight-1.0.24-py3-none-any.whl").write_bytes(wheel_bytes)
    return subprocess.CompletedProcess(cmd, returncode, "", stderr)

  monkeypatch.setattr(subprocess, "run", run)
  return calls


def _no_local_copy(monkeypatch, tmp_path):
  monkeypatch.setenv("MSISYNTH_CACHE", str(tmp_path / "cache"))
  folders = [tmp_path / "none", tmp_path / "cache" / "msight_bladder"]
  monkeypatch.setattr(datasets, "_msight_candidates", lambda root: folders)


def test_msight_fetch_offline_says_how_to_get_it(monkeypatch, tmp_path):
  _no_local_copy(monkeypatch, tmp_path)
  with pytest.raises(errors.DataError, match="pip download --no-deps msight==1.0.24"):
    datasets.msight_bladder_dir(download=False)
  calls = _fake_pip(monkeypatch, returncode=1, stderr="ERROR: No matching distribution found for msight==1.0.24")
  with pytest.raises(errors.DataError, match=r"offline\?.*pip download --no-deps msight==1\.0\.24"):
    datasets.msight_bladder_dir()
  assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
  assert not (tmp_path / "cache" / "msight_bladder").exists()


def test_msight_fetch_checks_the_sha256_and_extracts(monkeypatch, tmp_path):
  import hashlib
  import io

  _no_local_copy(monkeypatch, tmp_path)
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as z:
    for name in datasets.MSIGHT_FILES:
      z.writestr("notebooks/example_data/" + name, name.encode())
    z.writestr("msight-1.0.24.dist-info/licenses/LICENSE", b"MIT License")
  wheel = buffer.getvalue()
  _fake_pip(monkeypatch, wheel)
  with pytest.raises(errors.DataError, match="sha256"):
    datasets.msight_bladder_dir()
  assert not (tmp_path / "cache" / "msight_bladder").exists()
  monkeypatch.setattr(datasets, "MSIGHT_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
  folder = datasets.msight_bladder_dir()
  assert folder == tmp_path / "cache" / "msight_bladder"
  assert sorted(p.name for p in folder.iterdir()) == sorted([*datasets.MSIGHT_FILES, "LICENSE"])
  assert (folder / "prostate_example.ibd").read_bytes() == b"prostate_example.ibd"
  assert not [p for p in folder.parent.iterdir() if p.name.startswith(".msight-")]  # no leftovers
  # Once there, it is used without fetching again.
  calls = _fake_pip(monkeypatch, None, returncode=1)
  assert datasets.msight_bladder_dir() == folder and not calls
