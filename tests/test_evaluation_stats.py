"""Tests of the study's statistics (msisynth.evaluation.stats) and the ridge baseline."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from msisynth import errors
from msisynth.evaluation import ridge, stats


def test_seeds_are_separate_and_training_seeds_distinct():
  s = stats.Seeds(split=3, data=4, train=(0, 1, 2, 3, 4))
  assert (s.split, s.data, len(s.train)) == (3, 4, 5)
  with pytest.raises(errors.ConfigError):
    stats.Seeds(train=(1, 1))


def test_a_nan_metric_is_an_error_never_dropped():
  with pytest.raises(errors.DataError, match=r"case2\.ssim is nan"):
    stats.check_finite({"case1": {"ssim": 0.5}, "case2": {"ssim": float("nan")}}, "U-Net seed 0")
  with pytest.raises(errors.DataError, match="not finite"):
    stats.mean_std([1.0, float("nan")])
  with pytest.raises(errors.DataError):
    stats.paired_comparison([1.0, 2.0, 3.0], [1.0, float("inf"), 2.0])
  stats.check_finite({"a": [1, 2.0], "b": {"c": 3}, "name": "x", "ok": True}, "fine")


def test_paired_comparison_matches_scipy_and_effect_sizes():
  rng = np.random.default_rng(0)
  a = rng.normal(0, 1, 12)
  b = a + 0.5 + rng.normal(0, 0.3, 12)
  r = stats.paired_comparison(a, b, n_boot=4000)
  d = b - a
  assert r["n"] == 12 and r["mean_diff"] == pytest.approx(d.mean())
  assert r["wilcoxon_p"] == pytest.approx(sps.wilcoxon(d).pvalue)
  assert r["cohens_dz"] == pytest.approx(d.mean() / d.std(ddof=1))
  assert r["ci95"][0] < d.mean() < r["ci95"][1] and r["ci95"][0] > 0
  ranks = sps.rankdata(np.abs(d))
  assert r["rank_biserial"] == pytest.approx((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())
  assert r["b_better_fraction"] == pytest.approx(np.mean(d > 0))
  assert stats.paired_comparison(a, a + 1.0)["rank_biserial"] == 1.0


def test_paired_comparison_of_identical_methods_is_null():
  a = [0.1, 0.2, 0.3, 0.4]
  r = stats.paired_comparison(a, a)
  assert r["mean_diff"] == 0 and r["wilcoxon_p"] == 1.0 and r["cohens_dz"] == 0 and r["ci95"] == [0.0, 0.0]
  with pytest.raises(errors.DataError, match="at least 2"):
    stats.paired_comparison([1.0], [2.0])


def test_seed_averaged_requires_the_same_cases_for_every_seed():
  per = {0: {"x": 1.0, "y": 3.0}, 1: {"x": 2.0, "y": 5.0}}
  assert stats.seed_averaged(per, "m") == {"x": 1.5, "y": 4.0}
  with pytest.raises(errors.DataError, match="seed 1 scored"):
    stats.seed_averaged({0: {"x": 1.0}, 1: {"y": 1.0}}, "m")
  with pytest.raises(errors.DataError, match="not finite"):
    stats.seed_averaged({0: {"x": math.nan}}, "m")


def test_ridge_recovers_a_linear_colour_map():
  from msisynth.data import Pair

  rng = np.random.default_rng(1)
  x = np.clip(rng.normal(0, 0.4, (24, 24, 2)), -1, 1).astype(np.float32)
  rgb = np.clip(0.5 + 0.3 * x[..., :1] * np.array([1.0, -1.0, 0.5]) + 0.1 * x[..., 1:], 0, 1).astype(np.float32)
  pair = Pair(name="p", msi=x, histology=rgb, mask=np.ones((24, 24), bool), metadata={})
  w = ridge.fit_ridge([pair], 1, alpha=1e-6)
  assert w.shape == (5 * 2 + 1, 3)
  assert np.abs(ridge.predict_ridge(w, x, 1) - rgb).max() < 0.02
