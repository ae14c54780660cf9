"""The Colab notebooks (the .ipynb files are the source): committed without outputs, set up on Colab by cloning
the repository, which holds the data, and each runs top to bottom with the small settings
(MSISYNTH_NOTEBOOK_SMALL=1) and writes its figures and results.

Select with `pytest -m notebooks`; they also run in the default suite. The notebooks run in order with one shared
output folder, so notebook 3 reuses the generator notebook 2 trained (run alone, it trains a tiny one itself).
The kernel is the interpreter running the tests, through a kernelspec written to a temporary JUPYTER_PATH, so
neither the system's nor the virtual environment's Jupyter set-up matters or changes.
"""

import json
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.notebooks

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ("01_quickstart", "02_train_pix2pix_vs_unet", "03_register_and_evaluate")
CELL_TIMEOUT_S = 300
_FINISHED: set[str] = set()  # notebooks run successfully so far in this test run

# What each notebook must leave in OUTPUT_DIR/<notebook>/, and text its printed output must hold.
ARTEFACTS = {
  "01_quickstart": (
    [
      "mean_spectrum.png",
      "ion_images_msiflow.png",
      "pca_msiflow.png",
      "ion_images_mouse_brain.png",
      "preprocessor.json",
      "summary.json",
    ],
    [
      "continuous and processed files agree after binning: True",
      "explained variance ratio",
      "the reloaded preprocessor gives the same input: True",
    ],
  ),
  "02_train_pix2pix_vs_unet": (
    [
      "training_losses.png",
      "comparison.png",
      "scores_small.json",
      "small/simulation.json",
      "small/pix2pix/metrics.jsonl",
      "small/unet/metrics.jsonl",
    ],
    ["MI (bits)", "SSIM", "(simulated MSI)"],
  ),
  "03_register_and_evaluate": (
    [
      "simulated_ion_images.png",
      "synthetic_he.png",
      "checkerboard_synthetic.png",
      "checkerboard_direct.png",
      "landmarks.png",
      "ion_images_in_histology_space.png",
      "msi_in_histology_space.npy",
      "transform.json",
      "transform.tfm",
      "metrics.json",
    ],
    ["TRE on", "transform.json: read back identical", "transform.tfm: read back identical"],
  ),
}


def _load(name: str):
  return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def _printed(nb) -> str:
  parts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream":
        parts.append(output.get("text", ""))
      elif "data" in output:
        parts.append(output["data"].get("text/plain", ""))
  return "".join(parts)


def _colab_files() -> dict[str, int]:
  """Every file under colab/ (the notebooks' working folder) with its modification time."""
  return {str(p.relative_to(COLAB)): p.stat().st_mtime_ns for p in COLAB.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, shipped_data):
  """Environment for the kernels: this interpreter as the python3 kernel, small settings, one output folder."""
  jupyter_path = tmp_path_factory.mktemp("jupyter")
  spec_dir = jupyter_path / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3 (msisynth tests)",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  env = {
    "JUPYTER_PATH": os.pathsep.join([str(jupyter_path), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep),
    "MSISYNTH_NOTEBOOK_SMALL": "1",
    "MSISYNTH_NOTEBOOK_OUTPUT": str(tmp_path_factory.mktemp("notebook_output")),
    "JAX_PLATFORMS": "cpu",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    # The small settings train for three steps: compiling fast matters more than running fast.
    "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
    "MPLBACKEND": "Agg",
  }
  return env


@pytest.fixture
def in_env(kernel_env, monkeypatch):
  for key, value in kernel_env.items():
    monkeypatch.setenv(key, value)
  return pathlib.Path(kernel_env["MSISYNTH_NOTEBOOK_OUTPUT"])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = _load(name)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: commit the notebook without outputs"
  first_code = next(c.source for c in nb.cells if c.cell_type == "code")
  assert "MSISYNTH_NOTEBOOK_SMALL" in first_code and 'REPO_URL = "https://github.com/msisynth/msisynth"' in first_code
  assert "if IN_COLAB:" in first_code and '"google.colab" in sys.modules' in first_code


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_setup_clones_the_repository_with_its_data(name):
  """On Colab the first code cell clones the repository (data included) and installs it: no manual data step."""
  nb = _load(name)
  first_code = next(c.source for c in nb.cells if c.cell_type == "code")
  colab_branch = first_code[first_code.index("if IN_COLAB:") :].split("\nelif")[0]
  assert '"git", "clone"' in colab_branch and "REPO_URL" in colab_branch
  assert '"pip", "install"' in colab_branch and '"-e", str(REPO_DIR)' in colab_branch
  text = "\n".join(c.source for c in nb.cells)
  for manual in ("google.colab import drive", "drive.mount", "MyDrive", "unzip", "shared/data"):
    assert manual not in text, f"{name}: {manual!r}"
  assert not (COLAB / "make_notebooks.py").exists()  # the notebooks are the source, not generated


def test_kernel_runs_this_interpreter(in_env):
  from jupyter_client.kernelspec import KernelSpecManager

  spec = KernelSpecManager().get_kernel_spec("python3")
  assert spec.argv[0] == sys.executable


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, in_env):
  nb = _load(name)
  before = _colab_files()
  start = time.perf_counter()
  client = nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(COLAB)}}
  )
  from nbclient.exceptions import CellExecutionError

  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"{name} failed:\n{str(e)[-4000:]}")
  elapsed = time.perf_counter() - start
  print(f"{name}: {elapsed:.1f} s")

  out = in_env / name
  files, texts = ARTEFACTS[name]
  for file in files:
    path = out / file
    assert path.is_file() and path.stat().st_size > 0, f"{name} did not write {path}"
  printed = _printed(nb)
  for text in texts:
    assert text in printed, f"{name}: {text!r} not in its output"
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  assert _colab_files() == before, f"{name} wrote into its working folder {COLAB}"

  if name == "02_train_pix2pix_vs_unet":
    scores = json.loads((out / "scores_small.json").read_text())
    assert scores["simulated"] is True and set(scores["scores"]) == {"pix2pix", "unet"}
    for s in scores["scores"].values():
      assert 0 <= s["mi_bits"] < 8 and -1 <= s["ssim"] <= 1
  if name == "03_register_and_evaluate":
    if "02_train_pix2pix_vs_unet" in _FINISHED:
      assert "using notebook 2's generator" in printed
    else:  # run alone (or after a failed notebook 2): either way it has a generator
      assert "trained a tiny one here" in printed or "using notebook 2's generator" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["simulated"] is True
    assert set(metrics["tre"]) == {"before (identity)", "synthetic H&E → H&E", "MSI (TIC) → H&E, direct"}
    for tre in metrics["tre"].values():
      assert tre["mean_um"] >= 0 and tre["n"] == 50
  _FINISHED.add(name)
