"""The study's results as markdown tables (what docs/results.md shows)."""

from __future__ import annotations

import math

import numpy as np


def _f(x, spec=".3f") -> str:
  if x is None:
    return "n/a"
  x = float(x)
  if math.isinf(x):
    return "∞ (failed)" if x > 0 else "−∞"
  return format(x, spec)


def _p(p) -> str:
  return "<0.001" if p < 0.001 else f"{p:.3f}"


def synthesis_table(syn: dict, title: str) -> list[str]:
  """Per measure: seed-averaged mean per model (U-Net, pix2pix, ridge) and the paired pix2pix − U-Net test."""
  from msisynth.evaluation.study import MEASURE_NAMES, MEASURES

  n = len(syn["cases"])
  seeds = len(syn["per_seed"]["unet"])
  lines = [f"**{title}** — {n} held-out cases, {seeds} training seeds per model (the split fixed); each case's "
           "score is averaged over seeds, then tested paired over cases. Δ = pix2pix − U-Net with its 95% paired "
           "bootstrap CI, Wilcoxon signed-rank p, Cohen's d_z and rank-biserial r; ridge = the closed-form baseline.",
           "",
           "| measure | U-Net | pix2pix | ridge | Δ pix2pix − U-Net [95% CI] | p | d_z | r | ridge − pix2pix [95% CI] "
           "| p |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
  for m in MEASURES:
    c = syn["comparisons"][m]
    pu, rp = c["pix2pix_vs_unet"], c["ridge_vs_pix2pix"]
    lines.append(
      f"| {MEASURE_NAMES[m]} | {_f(pu['mean_a'])} ± {_f(syn['seed_spread']['unet'][m])} | {_f(pu['mean_b'])} ± "
      f"{_f(syn['seed_spread']['pix2pix'][m])} | {_f(rp['mean_b'])} | {_f(pu['mean_diff'], '+.3f')} "
      f"[{_f(pu['ci95'][0], '+.3f')}, {_f(pu['ci95'][1], '+.3f')}] | {_p(pu['wilcoxon_p'])} | "
      f"{_f(pu['cohens_dz'], '.2f')} | {_f(pu['rank_biserial'], '.2f')} | {_f(rp['mean_diff'], '+.3f')} "
      f"[{_f(rp['ci95'][0], '+.3f')}, {_f(rp['ci95'][1], '+.3f')}] | {_p(rp['wilcoxon_p'])} |"
    )
  lines += ["", "(± after a model's mean: std over training seeds of the mean over cases.)"]
  return lines


def benchmark_registration_table(reg: dict, routes) -> list[str]:
  s = reg["summary"]
  lines = ["| route | median TRE (MSI px) | mean TRE of the registered (px) | max (px) | < 1 px | < 2 px | failed |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
  for r in routes:
    e = s[r]
    lines.append(f"| {r} | {_f(e['median_px'], '.2f')} | {_f(e['mean_px'], '.2f')} | {_f(e['max_px'], '.2f')} | "
                 f"{e['success_1px']:.2f} | {e['success_2px']:.2f} | {e['failed']} |")  # fmt: skip
  for k, v in s.items():
    if k.startswith("synthetic_vs_"):
      lines.append("")
      lines.append(f"Paired over cases, TRE synthetic − {k[len('synthetic_vs_'):]}: {_f(v['mean_diff'], '+.2f')} px "
                   f"[{_f(v['ci95'][0], '+.2f')}, {_f(v['ci95'][1], '+.2f')}], Wilcoxon p {_p(v['wilcoxon_p'])}.")
  lines += ["", "Per case, TRE (MSI px): " + "; ".join(
    f"{row['case']}: " + ", ".join(f"{r} {_f(row[r]['tre_px'], '.2f')}" for r in routes) for row in reg["cases"])]
  return lines


def rough_table(rough: dict) -> list[str]:
  init = rough["initial"].get("init", "direct")
  lines = ["| loss | round | training pairs: median TRE (px) | held-out: median TRE (px) | held-out < 1 px |",
           "|---|---|---|---|---|",
           f"| ({init}) | 0 | {_f(np.median(rough['initial']['train_tre_px']), '.2f')} | – | – |"]  # fmt: skip
  for loss, rounds in rough.items():
    if loss == "initial":
      continue
    for r in rounds:
      t = np.asarray(r["test_tre_px"])
      lines.append(f"| {loss} | {r['round']} | {_f(np.median(r['train_tre_px']), '.2f')} | {_f(np.median(t), '.2f')} "
                   f"| {np.mean(t < 1):.2f} |")  # fmt: skip
  return lines


def bladder_registration_table(reg: dict) -> list[str]:
  lines = ["| route | median start offset (px) | median TRE to the unperturbed result (px) | < 1 px | < 2 px | failed "
           "| unperturbed result vs landmark affine (px) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
  for r, e in reg["routes"].items():
    if "error" in e:
      lines.append(f"| {r} | failed from the best alignment: {e['error']} | | | | | |")
      continue
    lines.append(f"| {r} | {_f(e['median_start_px'], '.2f')} | {_f(e['median_tre_px'], '.2f')} | "
                 f"{e['success_1px']:.2f} | {e['success_2px']:.2f} | {e['failed']} | "
                 f"{_f(e['to_landmark_affine_px'], '.2f')} |")  # fmt: skip
  lines += ["", f"UMAP route: {reg['umap']}."]
  return lines


def markdown(results: dict) -> str:
  """The whole study report."""
  t = results["timings_s"]
  hw = results.get("hardware", {})
  lines = ["# Study results", "", f"Command: `{results.get('command') or 'experiments/study.py'}`  ",
           f"Hardware: {hw.get('cpu_count')} CPU cores ({hw.get('cpu_model')}), JAX {hw.get('jax')} on "
           f"{hw.get('backend')}; code {hw.get('git_commit')}.  ",
           "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + ".  ",
           f"Seeds: {results['seeds']}.", ""]  # fmt: skip
  routes = results["config"]["registration"]["routes"]
  if "benchmark" in results:
    b = results["benchmark"]
    lines += ["## Benchmark (SIMULATED: neighbouring-section MSI)", "", f"Split: {results['benchmark_split']}", ""]
    lines += synthesis_table(b["synthesis"], "Synthesis on the SIMULATED benchmark")
    lines += ["", "### Registration routes (SIMULATED; TRE against the affine ground truth)", ""]
    lines += benchmark_registration_table(b["registration"], routes)
    lines.append("")
  if "rough" in results:
    lines += ["## Training from rough alignments (SIMULATED benchmark)", ""] + rough_table(results["rough"]) + [""]
  if "bladder" in results:
    bl = results["bladder"]
    lines += ["## Real pair: msight bladder", "", f"Data: {bl['info']}", "", f"Split: {bl['split']}", ""]
    lines += synthesis_table(bl["synthesis"], "Synthesis on the held-out part of the real section")
    lines += ["", "### Registration of the held-out part from perturbed starts", ""]
    lines += bladder_registration_table(bl["registration"])
  return "\n".join(lines)
