"""Tests of msisynth.report through `pipeline.register_images`: the pair report and the one output guard."""

import json

import numpy as np
import pytest

from msisynth import errors, outputs, pipeline, report
from msisynth.register import optimize, transform_io


def _pair():
  yy, xx = np.mgrid[:32, :32].astype(np.float32)
  fixed = np.exp(-((xx - 16) ** 2 + (yy - 14) ** 2) / 40.0) + 0.5 * np.exp(-((xx - 8) ** 2 + (yy - 24) ** 2) / 10.0)
  moving = np.roll(fixed, (1, 2), axis=(0, 1))
  return np.clip(fixed, 0, 1), np.clip(moving, 0, 1)


@pytest.fixture(scope="module")
def result():
  fixed, moving = _pair()
  config = optimize.RegistrationConfig(levels=1, max_iterations=40, max_samples=1024, kind="rigid")
  return pipeline.register_images(fixed, moving, fixed_pixel_size_um=1.0, moving_pixel_size_um=1.0,
                                  registration_config=config, simulated=True)  # fmt: skip


def test_pair_metrics_name_the_two_mi_estimators_apart(result):
  m = result.metrics
  assert m["registration_metric_name"] == "mi" and np.isfinite(m["registration_metric"])
  assert "hard-histogram" in m["mi_note"] and m["mi_after"] > m["mi_before"]
  assert m["simulated"] and result.warped.shape == result.fixed.shape


def test_pair_report_files_and_the_output_guard(result, tmp_path):
  out = tmp_path / "pair"
  paths = report.write_pair_report(result, out, figures=False)
  assert {p.name for p in out.iterdir()} == {*(p.name for p in paths.values()), outputs.MARKER}
  assert json.loads((out / "metrics.json").read_text())["mi_after"] == pytest.approx(result.metrics["mi_after"])
  np.testing.assert_allclose(transform_io.load_transform_json(out / "transform.json").matrix,
                             result.transform.matrix, atol=1e-6)  # fmt: skip
  with pytest.raises(errors.OutputExistsError, match="--overwrite"):
    report.write_pair_report(result, out, figures=False)
  report.write_pair_report(result, out, figures=False, overwrite=True)
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep")
  with pytest.raises(errors.OutputExistsError, match="not created by msisynth"):
    report.write_pair_report(result, mine, figures=False, overwrite=True)
  assert [p.name for p in mine.iterdir()] == ["notes.txt"]
