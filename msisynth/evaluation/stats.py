"""The statistics of a fair comparison: seeds, finiteness, paired tests over cases, effect sizes.

A comparison of two methods A and B is made *per case* (a held-out image, tile or registration) and *per training
seed*: the per-case difference B − A, averaged over the training seeds of each model, is what the tests see, so
that cases are the units of replication and seeds only reduce the training noise inside each case. Every value
must be finite: a NaN metric is an error (`check_finite`), never dropped, because dropping it would take the two
means over different case sets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from msisynth import errors


@dataclasses.dataclass(frozen=True)
class Seeds:
  """Separate seeds for what is held out, what is simulated and how the networks start.

  Attributes:
    split: the train/test split (which slides, which part of a section). Fixed across a comparison.
    data: simulated data (chemistry, noise, misalignments) and patch sampling order.
    train: the training seeds (initialisation and dropout); one run per seed and model, the split fixed.
  """

  split: int = 0
  data: int = 0
  train: tuple[int, ...] = (0, 1, 2, 3, 4)

  def __post_init__(self):
    if len(self.train) < 1 or len(set(self.train)) != len(self.train):
      raise errors.ConfigError(f"training seeds must be distinct and at least one, got {self.train}")


def check_finite(values: Mapping[str, Any] | Sequence[float] | float, what: str) -> None:
  """Raises DataError naming `what` and the key when any value (nested mappings and sequences too) is not finite."""

  def walk(v, path):
    if isinstance(v, Mapping):
      for k, x in v.items():
        walk(x, f"{path}.{k}" if path else str(k))
    elif isinstance(v, (list, tuple, np.ndarray)):
      for i, x in enumerate(np.asarray(v, dtype=object).ravel()):
        walk(x, f"{path}[{i}]")
    elif isinstance(v, (bool, str)) or v is None:
      if v is None:
        raise errors.DataError(f"{what}: {path or 'value'} is missing (None)")
    elif isinstance(v, (int, float, np.floating, np.integer)) and not math.isfinite(float(v)):
      raise errors.DataError(f"{what}: {path or 'value'} is {v}; a metric that is not finite is an error, "
                             "never dropped")  # fmt: skip

  walk(values, "")


def mean_std(values: Sequence[float], what: str = "values") -> dict[str, float]:
  """Mean, sample std and n; DataError on any non-finite value or an empty list."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise errors.DataError(f"{what}: no values")
  check_finite(v, what)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def wilcoxon_signed_rank(differences: Sequence[float]) -> float:
  """Two-sided p-value of the Wilcoxon signed-rank test of zero median difference (exact for small n, no zeros).

  Zero differences are dropped (Wilcoxon's convention); with none left the p-value is 1.
  """
  from scipy import stats

  d = np.asarray(differences, np.float64)
  check_finite(d, "paired differences")
  d = d[d != 0]
  if d.size == 0:
    return 1.0
  return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_bootstrap_ci(differences: Sequence[float], *, n_boot: int = 10_000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:  # fmt: skip
  """Percentile bootstrap CI of the mean of paired differences, resampling cases with replacement."""
  d = np.asarray(differences, np.float64)
  check_finite(d, "paired differences")
  if d.size < 2:
    raise errors.DataError(f"a bootstrap CI needs at least 2 cases, got {d.size}")
  rng = np.random.default_rng(seed)
  means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
  alpha = (1 - level) / 2
  lo, hi = np.quantile(means, [alpha, 1 - alpha])
  return float(lo), float(hi)


def paired_comparison(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, seed: int = 0,
                      what: str = "metric") -> dict[str, Any]:  # fmt: skip
  """Paired comparison of B against A over the same cases: mean difference B − A with a 95% CI, tests, effect size.

  Args:
    a: per-case values of method A (e.g. the U-Net), already averaged over its training seeds.
    b: per-case values of method B (e.g. pix2pix), the same cases in the same order.
    n_boot: bootstrap resamples.
    seed: bootstrap seed.
    what: a name for error messages.

  Returns:
    {"n": cases, "mean_a", "mean_b", "mean_diff": mean of B − A, "ci95": [lo, hi] (percentile bootstrap over
     cases), "wilcoxon_p": two-sided signed-rank p-value, "cohens_dz": mean / sd of the differences (paired effect
     size; 0 when sd = 0 and mean = 0), "rank_biserial": matched-pairs rank-biserial correlation in [-1, 1]
     (the signed-rank effect size), "b_better_fraction": share of cases with B > A}.

  Raises:
    DataError: for non-finite values, mismatched lengths or fewer than 2 cases.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise errors.DataError(f"{what}: paired values must be two equal-length lists, got {a.shape} and {b.shape}")
  check_finite(a, f"{what} (A)")
  check_finite(b, f"{what} (B)")
  d = b - a
  lo, hi = paired_bootstrap_ci(d, n_boot=n_boot, seed=seed)
  sd = float(d.std(ddof=1))
  dz = float(d.mean() / sd) if sd > 0 else (0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean()))
  nz = d[d != 0]
  if nz.size:
    from scipy import stats

    ranks = stats.rankdata(np.abs(nz))
    rbc = float((ranks[nz > 0].sum() - ranks[nz < 0].sum()) / ranks.sum())
  else:
    rbc = 0.0
  return {"n": int(d.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": float(d.mean()),
          "ci95": [lo, hi], "wilcoxon_p": wilcoxon_signed_rank(d), "cohens_dz": dz, "rank_biserial": rbc,
          "b_better_fraction": float(np.mean(d > 0))}  # fmt: skip


def seed_averaged(per_seed: Mapping[int, Mapping[str, float]], what: str) -> dict[str, float]:
  """Per-case values averaged over training seeds: {case: mean over seeds}; every seed must hold every case."""
  seeds = sorted(per_seed)
  if not seeds:
    raise errors.DataError(f"{what}: no training seeds")
  cases = list(per_seed[seeds[0]])
  for s in seeds:
    if list(per_seed[s]) != cases:
      raise errors.DataError(f"{what}: seed {s} scored cases {list(per_seed[s])}, seed {seeds[0]} scored {cases}")
    check_finite(per_seed[s], f"{what}, training seed {s}")
  return {c: float(np.mean([per_seed[s][c] for s in seeds])) for c in cases}
