"""The README's main command, end to end at tiny settings: `python -m experiments.demo --quick`."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_demo_quick_writes_a_complete_report(tmp_path):
  out = tmp_path / "demo"
  # No MSISYNTH_DATA: the demo finds the data shipped in the repository by itself.
  env = {k: v for k, v in os.environ.items() if k != "MSISYNTH_DATA"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "experiments.demo", "--quick", f"--output_dir={out}"]
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"Report: {out.resolve() / 'report.md'}" in run.stdout

  report = (out / "report.md").read_text()
  assert "simulated MSI" in report
  metrics = json.loads((out / "demo_metrics.json").read_text())
  assert metrics["synthetic_to_real"]["simulated"] is True
  for route in ("synthetic_to_real", "direct_multimodal"):
    assert route in metrics
  for name in ("msi_pca.png", "msi_ion_images.png", "section/transform.json", "section/transform.tfm",
               "section/checkerboard_before.png", "section/checkerboard_after.png", "section/metrics.json",
               "section/msi_in_histology_space.npy", "section/mz.npy"):
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name

  # A second run into the same folder is refused without --overwrite, and leaves the report alone.
  before = (out / "report.md").stat().st_mtime_ns
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert again.returncode != 0
  assert "--overwrite" in again.stderr
  assert (out / "report.md").stat().st_mtime_ns == before


def test_demo_refuses_a_non_positive_step_count(tmp_path):
  out = tmp_path / "demo"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "experiments.demo", "--quick", "--steps=-1", f"--output_dir={out}"]
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode != 0 and "--steps" in run.stderr
  assert not out.exists()
