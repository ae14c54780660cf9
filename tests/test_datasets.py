"""The shipped real data sets load with the expected shapes and values."""

import os
import pathlib
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
  wheels = tmp_path / "wheels"
  build = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels),
     str(REPO)], capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
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
