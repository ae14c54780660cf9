"""Tests of the study's pieces on tiny inputs: the rough-alignment alternation, the paired synthesis comparison
and the launchers' output guard. Everything here is SIMULATED unless it says otherwise."""

import math
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import study as study_config
from msisynth import io as msi_io
from msisynth import simulate
from msisynth.evaluation import common, rough, stats, study

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(shared_data):
  """One training and one held-out SIMULATED benchmark section from a reduced slide, and the tiny config."""
  config = study_config.get_config("tiny")
  full = msi_io.read_histology(shared_data / "he" / "rcc-UH0505_12.png")
  he = np.ascontiguousarray(full[::4, ::4]).astype(np.float32)
  sections = []
  for seed in (1, 2):
    case = simulate.simulate_benchmark_case(seed, he, histology_pixel_size_um=20.0, msi_pixel_size_um=80.0, n_ions=6,
                                            max_translation_um=100.0)  # fmt: skip
    sections.append(common.Section(f"s{seed}", case.msi, case.he, 20.0, case.transform, truth=case.transform,
                                   landmarks=case.landmarks))  # fmt: skip
  pre = common.fit_preprocessor(sections[:1], [sections[0].msi.mask], 3, 0)
  return config, sections, pre


def test_alternation_reports_tre_per_round_against_ground_truth(tiny, tmp_path):
  config, sections, pre = tiny
  config.rough.losses = ("shift_l1",)
  seeds = stats.Seeds(split=0, data=0, train=(0,))
  out = rough.alternate(config, sections[:1], sections[1:], pre, tmp_path, seeds, study.registration_config(config))
  (train_tre,) = out["initial"]["train_tre_px"]
  assert math.isfinite(train_tre) and train_tre >= 0
  (round1,) = out["shift_l1"]
  assert round1["round"] == 1 and len(round1["train_tre_px"]) == 1 and len(round1["test_tre_px"]) == 1
  assert all(t >= 0 for t in round1["train_tre_px"] + round1["test_tre_px"])
  assert (tmp_path / "shift_l1_round1" / "checkpoints").is_dir()


def test_tre_of_the_ground_truth_is_zero(tiny):
  _, sections, _ = tiny
  assert rough._tre_px(sections[0].truth, sections[0]) == pytest.approx(0.0, abs=1e-9)
  assert rough._tre_px(None, sections[0]) == math.inf


def test_route_summary_counts_failures_as_worst_never_drops_them():
  rows = [{"synthetic": {"tre_px": 0.5}, "msi_tic": {"tre_px": math.inf}},
          {"synthetic": {"tre_px": 0.7}, "msi_tic": {"tre_px": 3.0}},
          {"synthetic": {"tre_px": 1.5}, "msi_tic": {"tre_px": 0.4}}]  # fmt: skip
  s = study.route_summary(rows, ("synthetic", "msi_tic"))
  assert s["msi_tic"]["failed"] == 1 and s["msi_tic"]["n"] == 3 and s["msi_tic"]["median_px"] == 3.0
  assert s["synthetic"]["success_1px"] == pytest.approx(2 / 3)
  assert s["synthetic_vs_msi_tic"]["n"] == 3


@pytest.mark.parametrize("launcher", ["experiments/evaluate.py", "experiments/study.py"])
def test_launchers_refuse_a_non_empty_output_folder(tmp_path, launcher):
  (tmp_path / "results.md").write_text("the user's own file")
  proc = subprocess.run([sys.executable, launcher, f"--output_dir={tmp_path}", "--overwrite"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert (tmp_path / "results.md").read_text() == "the user's own file"


def test_landmark_start_is_rough_but_close(tiny):
  _, sections, _ = tiny
  exact = rough.landmark_transforms(sections[:1], noise_um=0.0)[0]
  assert rough._tre_px(exact, sections[0]) == pytest.approx(0.0, abs=1e-6)
  noisy = rough.landmark_transforms(sections[:1], noise_um=60.0, seed=1)[0]
  assert 0.05 < rough._tre_px(noisy, sections[0]) < 10


def test_study_configs_keep_the_protocol():
  for variant in ("cpu", "medium", "paper"):
    c = study_config.get_config(variant)
    assert len(c.seeds.train) >= 5 and len(set(c.seeds.train)) == len(c.seeds.train)
    assert c.model_config.optim.learning_rate == 2e-4
    assert c.bladder.n_perturbations >= 20
  assert study_config.get_config("medium").model_config.train.num_steps == 3000
  assert study_config.get_config("paper").model_config.model.depth == 8
  with pytest.raises(ValueError, match="unknown study variant"):
    study_config.get_config("huge")
