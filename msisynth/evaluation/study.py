"""The study: pix2pix against the U-Net (and a ridge baseline) under a sound protocol, on a benchmark that can
separate methods and on a real pair; registration routes; training from rough alignments.

Protocol (every part):
  - Seeds: `Seeds.split` picks the held-out slides / the side of the section held out, `Seeds.data` the simulated
    data and the patch order, `Seeds.train` the training runs (≥ 5, one per model and seed, the split fixed).
  - Cases: held-out images (benchmark: held-out slides × simulated neighbour sections; real pair: tiles of the
    held-out part). Per case each model's scores are averaged over its training seeds, then pix2pix − U-Net is
    tested over cases: mean difference with a 95% paired bootstrap CI, Wilcoxon signed-rank p, Cohen's d_z and
    the matched-pairs rank-biserial correlation (`stats.paired_comparison`).
  - Measures: Miller–Madow-corrected MI of the luminance (bits, `mi_bins` bins over [0, 1], regions of at least
    4 · bins² pixels; the plug-in and the permutation-corrected values are kept beside it), NMI, SSIM, PSNR and
    the texture KID (`metrics.texture_kid`, lower is better). A metric that is not finite raises DataError.
  - Registration: TRE at tissue points against the affine ground truth (benchmark), or relative to the
    unperturbed result from ≥ 20 known random affine perturbations of the start (real pair); success = TRE below
    1 and 2 MSI pixels.

Everything on the benchmark is SIMULATED (`msisynth.simulate.simulate_benchmark_case`) and labelled so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import numpy as np

from msisynth import errors, outputs, synthesize
from msisynth.evaluation import common, paper, report, ridge, rough, stats
from msisynth.geometry.transforms import AffineTransform

MODELS = ("unet", "pix2pix")
MEASURES = ("mi_bits", "mi_perm_bits", "mi_plugin_bits", "nmi", "ssim", "psnr_db", "kid")
MEASURE_NAMES = {"mi_bits": "MI, Miller–Madow (bits)", "mi_perm_bits": "MI − permutation null (bits)",
                 "mi_plugin_bits": "MI, plug-in (bits)", "nmi": "NMI", "ssim": "SSIM", "psnr_db": "PSNR (dB)",
                 "kid": "texture KID (lower better)"}  # fmt: skip


def _log(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_config(config, kind: str, seed: int):
  """The training config of one run: the study's model and schedule, `kind`, training seed `seed`."""
  c = config.model_config.copy_and_resolve_references()
  c.model.kind = kind
  c.model.gan_weight = 1.0 if kind == "pix2pix" else 0.0
  c.seed = int(seed)
  return c


# ------------------------------------------------------------------------------------------------- benchmark


def benchmark_sections(config, seeds: stats.Seeds) -> tuple[list, list, dict]:
  """The SIMULATED benchmark: training and held-out sections (`simulate_benchmark_case`), and the split."""
  from msisynth import datasets, simulate
  from msisynth import io as msi_io
  from msisynth.evaluation.images import block_reduce

  b = config.benchmark
  slides = [p for p in datasets.list_he_slides(config.get("data_dir")) if p.stem.startswith("rcc-")]
  order = np.random.default_rng(seeds.split).permutation(len(slides))
  n_train = int(b.n_train_slides)
  train_paths = [slides[i] for i in order[:n_train]]
  test_paths = [slides[i] for i in order[n_train:n_train + int(b.n_test_slides)]]

  def read(p):
    return np.clip(block_reduce(msi_io.read_histology(p), int(b.he_reduce)), 0, 1).astype(np.float32)

  train_he = [read(p) for p in train_paths]
  centroids = simulate.fit_class_centroids(seeds.data, train_he, n_classes=4)
  kwargs = dict(histology_pixel_size_um=float(b.histology_pixel_size_um), msi_pixel_size_um=float(b.msi_pixel_size_um),
                n_ions=int(b.n_ions), chemistry_seed=seeds.data, class_centroids=centroids)  # fmt: skip

  def section(he, name, seed):
    case = simulate.simulate_benchmark_case(seed, he, he_name=name, **kwargs)
    return common.Section(f"{name}/s{seed}", case.msi, case.he, float(b.histology_pixel_size_um), case.transform,
                          truth=case.transform, landmarks=case.landmarks, simulated=True)  # fmt: skip

  train = [section(he, p.stem, 1000 * seeds.data + i) for i, (he, p) in enumerate(zip(train_he, train_paths))]
  test = []
  for i, p in enumerate(test_paths):
    he = read(p)
    for k in range(int(b.sims_per_test_slide)):
      test.append(section(he, p.stem, 1000 * seeds.data + 100 + 10 * i + k))
  split = {"train_slides": [p.stem for p in train_paths], "test_slides": [p.stem for p in test_paths],
           "sims_per_test_slide": int(b.sims_per_test_slide), "seeds": dataclasses.asdict(seeds)}  # fmt: skip
  return train, test, split


def _cases_of(pair, tile: int | None, min_pixels: int):
  """Evaluation windows of a pair: the whole image (tile None) or square tiles holding ≥ `min_pixels` mask."""
  if tile is None:
    return [("whole", (slice(None), slice(None)))]
  out = []
  h, w = pair.mask.shape
  for r in range(0, h - tile + 1, tile):
    for c in range(0, w - tile + 1, tile):
      window = (slice(r, r + tile), slice(c, c + tile))
      if pair.mask[window].sum() >= min_pixels:
        out.append((f"r{r}c{c}", window))
  return out


def _ssim_windows(mask: np.ndarray) -> int:
  """The number of 11 × 11 SSIM windows lying wholly inside `mask`."""
  from scipy import ndimage

  from msisynth.metrics import SSIM_FILTER_SIZE

  k = SSIM_FILTER_SIZE
  if min(mask.shape) < k:
    return 0
  inside = ndimage.minimum_filter(mask.astype(np.uint8), size=k, mode="constant", cval=0)
  return int(inside.sum())


def compare_synthesis(config, train_pairs, train_regions, test_pairs, test_masks, preprocessor, workdir: pathlib.Path,
                      seeds: stats.Seeds, *, tile=None, label: str) -> dict[str, Any]:  # fmt: skip
  """Trains both models for every training seed, scores every held-out case, and tests pix2pix − U-Net paired.

  Returns:
    {"cases": names, "per_seed": {model: {seed: {case: scores}}}, "mean_over_seeds": {model: {measure: {case:
     value}}}, "comparisons": {measure: paired_comparison}, "ridge": ..., "train_seconds": ...}.
  """
  from msisynth import metrics

  e = config.eval
  u = int(config.model_config.data.upsample)
  min_pixels = metrics.mi_min_pixels(int(e.mi_bins))
  # A case is fixed by geometry alone, before any model is scored: enough pixels for the MI histogram and whole
  # SSIM windows inside the mask. Nothing is dropped after scoring.
  cases = []
  for i, (pair, mask) in enumerate(zip(test_pairs, test_masks)):
    for name, window in _cases_of(pair, tile, min_pixels):
      m = np.asarray(mask, bool)[window]
      if m.sum() >= min_pixels and _ssim_windows(m) >= int(e.get("min_ssim_windows", 16)):
        cases.append((f"{pair.name}:{name}" if tile else pair.name, i, window, m))
  if len(cases) < 2:
    raise errors.DataError(f"{label}: {len(cases)} evaluation cases; the paired tests need at least 2")

  real_features = {name: common.real_texture_features(test_pairs[i].histology[w], m, int(e.kid_patch))
                   for name, i, w, m in cases}  # fmt: skip

  def score_all(fakes):
    return {name: common.score_images(fakes[i][w], test_pairs[i].histology[w], m, mi_bins=int(e.mi_bins),
                                      kid_patch=int(e.kid_patch), where=f"{label} {name}",
                                      real_features=real_features[name])  # fmt: skip
            for name, i, w, m in cases}

  per_seed = {k: {} for k in MODELS}
  train_seconds = {k: [] for k in MODELS}
  for seed in seeds.train:
    for kind in MODELS:
      c = model_config(config, kind, seed)
      synth, seconds = common.train_model(c, workdir / f"{kind}_seed{seed}", train_pairs, train_regions,
                                          preprocessor, data_seed=seeds.data, tile=int(e.tile),
                                          overlap=int(e.overlap))  # fmt: skip
      fakes = [np.asarray(synth(p.msi)) for p in test_pairs]
      per_seed[kind][seed] = score_all(fakes)
      train_seconds[kind].append(round(seconds, 1))
      ssim = np.mean([v["ssim"] for v in per_seed[kind][seed].values()])
      _log(f"{label}: {kind} seed {seed}: trained in {seconds:.0f} s, mean SSIM {ssim:.3f}")
  weights = ridge.fit_ridge(train_pairs if train_regions is None else
                            [dataclasses.replace(p, mask=p.mask & r) if r is not None else p
                             for p, r in zip(train_pairs, train_regions)], u, seed=seeds.data)  # fmt: skip
  ridge_scores = score_all([ridge.predict_ridge(weights, p.msi, u) for p in test_pairs])

  names = [c[0] for c in cases]
  mean = {k: {m: stats.seed_averaged({s: {n: per_seed[k][s][n][m] for n in names} for s in seeds.train},
                                     f"{label} {k} {m}") for m in MEASURES} for k in MODELS}  # fmt: skip
  mean["ridge"] = {m: {n: ridge_scores[n][m] for n in names} for m in MEASURES}
  comparisons = {}
  for m in MEASURES:
    u_, p_, r_ = ([mean[k][m][n] for n in names] for k in ("unet", "pix2pix", "ridge"))
    comparisons[m] = {"pix2pix_vs_unet": stats.paired_comparison(u_, p_, what=f"{label} {m}"),
                      "ridge_vs_unet": stats.paired_comparison(u_, r_, what=f"{label} {m}"),
                      "ridge_vs_pix2pix": stats.paired_comparison(p_, r_, what=f"{label} {m}")}  # fmt: skip
  # Seed spread: per model, the std over training seeds of the case-mean of each measure.
  spread = {k: {m: float(np.std([np.mean([per_seed[k][s][n][m] for n in names]) for s in seeds.train], ddof=1))
                if len(seeds.train) > 1 else 0.0 for m in MEASURES} for k in MODELS}  # fmt: skip
  return {"cases": names, "n_pixels": {n: int(c[3].sum()) for n, c in zip(names, cases)}, "per_seed": per_seed,
          "mean_over_seeds": mean, "comparisons": comparisons, "seed_spread": spread,
          "train_seconds": train_seconds}  # fmt: skip


def registration_config(config):
  from msisynth.register import optimize

  r = config.registration
  return optimize.RegistrationConfig(similarity="mi", levels=int(r.levels), max_iterations=r.get("max_iterations"),
                                     max_samples=int(r.max_samples),
                                     working_pixel_size_um=float(r.working_pixel_size_um))  # fmt: skip


def _tre(transform, section) -> dict[str, float]:
  from msisynth.register import evaluate as reg_eval

  lm = section.landmarks
  px = float(np.sqrt(np.prod(section.msi.pixel_size_um)))
  t = reg_eval.target_registration_error(transform, lm[:, :2], lm[:, 2:], px)
  return {"tre_um": t["mean_um"], "tre_px": t["mean_px"]}


def benchmark_registration(config, sections, synthesizer, preprocessor) -> dict[str, Any]:
  """TRE of each route on the held-out benchmark sections (ground truth known), from the default starts."""
  rconfig = registration_config(config)
  u = int(config.model_config.data.upsample)
  rows = []
  for s in sections:
    routes = common.route_images(s, synthesizer, preprocessor, u)
    row = {"case": s.name, "before": _tre(AffineTransform.identity(), s)}
    for name in config.registration.routes:
      image, px, mask = routes[name]
      result, error, seconds = common.register_route(s.he, image, fixed_px=s.histology_pixel_size_um, moving_px=px,
                                                     moving_mask=mask, rconfig=rconfig)  # fmt: skip
      entry = {"seconds": round(seconds, 1), "error": error}
      entry.update(_tre(result.transform, s) if result is not None else {"tre_um": math.inf, "tre_px": math.inf})
      row[name] = entry
    rows.append(row)
    _log("benchmark registration " + s.name + ": " + ", ".join(f"{k} {row[k]['tre_px']:.2f} px"
                                                              for k in config.registration.routes))  # fmt: skip
  return {"cases": rows, "summary": route_summary(rows, config.registration.routes)}


def route_summary(rows, routes, key: str = "tre_px") -> dict[str, Any]:
  """Per route: median TRE (MSI px), the share below 1 and below 2 px, failures; paired tests of synthetic vs direct.

  A failed registration (no transform) has TRE inf: it counts as a failure and enters the medians and the rank
  tests as the worst value, never dropped.
  """
  out = {}
  for r in routes:
    v = np.asarray([row[r][key] for row in rows], np.float64)
    out[r] = {"n": int(v.size), "median_px": float(np.median(v)), "mean_px": float(np.mean(v[np.isfinite(v)]))
              if np.isfinite(v).any() else math.inf, "success_1px": float(np.mean(v < 1)),
              "success_2px": float(np.mean(v < 2)), "failed": int(np.sum(~np.isfinite(v))),
              "max_px": float(np.max(v))}  # fmt: skip
  if "synthetic" in routes:
    for r in routes:
      if r == "synthetic":
        continue
      a = np.asarray([row[r][key] for row in rows], np.float64)
      b = np.asarray([row["synthetic"][key] for row in rows], np.float64)
      cap = 1e3  # failures enter the tests as a large finite TRE
      out[f"synthetic_vs_{r}"] = stats.paired_comparison(np.minimum(a, cap), np.minimum(b, cap),
                                                         what=f"TRE {r}")  # fmt: skip
  return out


# --------------------------------------------------------------------------------------------------- real pair


def bladder_study(config, seeds: stats.Seeds, workdir: pathlib.Path) -> dict[str, Any]:
  """The real msight bladder pair: spatial split, both models × seeds, perturbed-start registration."""
  from msisynth.evaluation import bladder

  bc = config.bladder
  section, info = bladder.load_section(config.get("data_dir"), he_reduce=int(bc.he_reduce))
  u = int(config.model_config.data.upsample)
  axis = int(bc.split_axis)
  train_roi, test_roi = bladder.spatial_split(section.msi.mask, test_fraction=float(bc.test_fraction),
                                              axis=axis)  # fmt: skip
  if seeds.split % 2:  # the split seed picks which side is held out
    train_roi, test_roi = test_roi, train_roi
  rconfig = registration_config(config)

  # Pairs: the rough landmark affine, refined by a direct (TIC) MI registration from it over the training part.
  pre0 = common.fit_preprocessor([section], [train_roi], int(bc.n_components), seeds.data)
  routes0 = common.route_images(section, None, pre0, u, roi=train_roi)
  image, px, mask = routes0["msi_tic"]
  refined, error, _ = common.register_route(section.he, image, fixed_px=section.histology_pixel_size_um, moving_px=px,
                                            moving_mask=mask, rconfig=rconfig, initial=section.transform)  # fmt: skip
  pair_transform = refined.transform if refined is not None else section.transform
  moved = _transform_distance_px(pair_transform, section.transform, section)
  info["pairs_from"] = "landmark affine refined by TIC MI registration" if refined is not None else "landmarks"
  info["refinement_moved_msi_px"] = moved
  preprocessor = pre0
  pair = common.make_section_pair(section, preprocessor, u, transform=pair_transform)
  from msisynth import data as data_lib

  up = lambda r: data_lib.upsample_grid(r, u, "nearest")  # noqa: E731
  synthesis = compare_synthesis(config, [pair], [up(train_roi)], [pair], [pair.mask & up(test_roi)], preprocessor,
                                workdir / "bladder", seeds, tile=int(bc.case_tile), label="bladder")  # fmt: skip

  # Perturbed-start registration of the held-out part, per route.
  synth = synthesize.load_synthesizer(workdir / "bladder" / f"pix2pix_seed{seeds.train[0]}",
                                                             which="latest", tile_size=int(config.eval.tile),
                                                             overlap=int(config.eval.overlap))  # fmt: skip
  routes = common.route_images(section, synth, preprocessor, u, roi=test_roi)
  rng = np.random.default_rng(seeds.data + 7)
  perturb = [_random_affine(rng, section, float(bc.perturb_rotation_deg), float(bc.perturb_translation_um),
                            float(bc.perturb_scale)) for _ in range(int(bc.n_perturbations))]  # fmt: skip
  tissue_pts = _tissue_points(section, test_roi)
  reg = {"routes": {}, "umap": "not run: umap-learn is not installed (no UMAP image route)"}
  for name in config.registration.routes:
    image, px, mask = routes[name]
    kw = dict(fixed_px=section.histology_pixel_size_um, moving_px=px, moving_mask=mask, rconfig=rconfig)
    best, error, _ = common.register_route(section.he, image, initial=pair_transform, **kw)
    if best is None:
      reg["routes"][name] = {"error": error}
      continue
    rows = []
    for p in perturb:
      start = AffineTransform(np.asarray(p @ np.asarray(best.transform.matrix, np.float64)))
      start_px = _points_distance_px(start, best.transform, tissue_pts, section)
      result, error, seconds = common.register_route(section.he, image, initial=start, **kw)
      tre = math.inf if result is None else _points_distance_px(result.transform, best.transform, tissue_pts, section)
      rows.append({"start_px": start_px, "tre_px": tre, "seconds": round(seconds, 1), "error": error})
    v = np.asarray([r["tre_px"] for r in rows])
    reg["routes"][name] = {"rows": rows, "median_tre_px": float(np.median(v)), "success_1px": float(np.mean(v < 1)),
                           "success_2px": float(np.mean(v < 2)), "failed": int(np.sum(~np.isfinite(v))),
                           "median_start_px": float(np.median([r["start_px"] for r in rows])),
                           "to_landmark_affine_px": _points_distance_px(best.transform, section.transform,
                                                                        tissue_pts, section)}  # fmt: skip
    _log(f"bladder registration {name}: median TRE {np.median(v):.2f} px, success(<1 px) {np.mean(v < 1):.2f}")
  return {"info": info, "synthesis": synthesis, "registration": reg, "simulated": False,
          "split": {"axis": "x" if axis == 1 else "y", "test_fraction": float(bc.test_fraction),
                    "train_pixels": int(train_roi.sum()), "test_pixels": int(test_roi.sum())}}  # fmt: skip


def _tissue_points(section, roi) -> np.ndarray:
  """(N, 2) MSI µm points of the measured pixels in `roi` (a 10 × 10 subsample)."""
  ys, xs = np.nonzero(roi)
  pick = np.linspace(0, len(ys) - 1, min(100, len(ys))).astype(int)
  py, px = section.msi.pixel_size_um
  return np.stack([xs[pick] * px, ys[pick] * py], axis=-1).astype(np.float64)


def _points_distance_px(a, b, msi_points_um, section) -> float:
  """Mean distance (MSI px) where two H&E → MSI transforms send the H&E points that `b` maps to `msi_points_um`."""
  inv = np.linalg.inv(np.asarray(b.matrix, np.float64))
  he_pts = msi_points_um @ inv[:2, :2].T + inv[:2, 2]
  ma = np.asarray(a.matrix, np.float64)
  mapped = he_pts @ ma[:2, :2].T + ma[:2, 2]
  return float(np.mean(np.linalg.norm(mapped - msi_points_um, axis=1)) / np.sqrt(np.prod(section.msi.pixel_size_um)))


def _transform_distance_px(a, b, section) -> float:
  return _points_distance_px(a, b, _tissue_points(section, section.msi.mask), section)


def _random_affine(rng, section, rotation_deg, translation_um, scale) -> np.ndarray:
  """A random affine (3 × 3, MSI µm → MSI µm) about the centre of the measured MSI: rotation, scale, shift."""
  ys, xs = np.nonzero(section.msi.mask)
  py, px = section.msi.pixel_size_um
  c = np.array([xs.mean() * px, ys.mean() * py])
  theta = math.radians(rng.uniform(-rotation_deg, rotation_deg))
  s = math.exp(rng.uniform(-math.log1p(scale), math.log1p(scale)))
  lin = s * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  t = rng.uniform(-translation_um, translation_um, 2)
  m = np.eye(3)
  m[:2, :2] = lin
  m[:2, 2] = c - lin @ c + t
  return m


# ------------------------------------------------------------------------------------------------------- study


def run_study(config, output_dir, *, parts=("benchmark", "rough", "bladder"), command: str = "") -> dict[str, Any]:
  """Runs the study `config` describes into `output_dir` (results.json, results.md) and returns the results.

  Raises:
    ConfigError, DataError: for bad settings, unreadable data or a non-finite metric.
  """
  out = pathlib.Path(output_dir)
  work = out / "runs"
  work.mkdir(parents=True, exist_ok=True)
  seeds = stats.Seeds(split=int(config.seeds.split), data=int(config.seeds.data), train=tuple(config.seeds.train))
  start = time.perf_counter()
  results: dict[str, Any] = {"command": command, "config": config.to_dict(), "seeds": dataclasses.asdict(seeds),
                             "timings_s": {}}  # fmt: skip
  if "benchmark" in parts or "rough" in parts:
    t0 = time.perf_counter()
    train, test, split = benchmark_sections(config, seeds)
    u = int(config.model_config.data.upsample)
    pre = common.fit_preprocessor(train, [s.msi.mask for s in train], int(config.benchmark.n_components), seeds.data)
    results["benchmark_split"] = split
    results["timings_s"]["simulate"] = round(time.perf_counter() - t0, 1)
    _log(f"benchmark: {len(train)} training and {len(test)} held-out SIMULATED sections")
  if "benchmark" in parts:
    t0 = time.perf_counter()
    train_pairs = [common.make_section_pair(s, pre, u) for s in train]
    test_pairs = [common.make_section_pair(s, pre, u) for s in test]
    syn = compare_synthesis(config, train_pairs, None, test_pairs, [p.mask for p in test_pairs], pre,
                            work / "benchmark", seeds, label="benchmark")  # fmt: skip
    synth = synthesize.load_synthesizer(work / "benchmark" / f"pix2pix_seed{seeds.train[0]}",
                                                               which="latest", tile_size=int(config.eval.tile),
                                                               overlap=int(config.eval.overlap))  # fmt: skip
    reg = benchmark_registration(config, test, synth, pre)
    results["benchmark"] = {"simulated": True, "synthesis": syn, "registration": reg}
    results["timings_s"]["benchmark"] = round(time.perf_counter() - t0, 1)
  if "rough" in parts:
    t0 = time.perf_counter()
    results["rough"] = rough.alternate(config, train, test, pre, work / "rough", seeds,
                                       registration_config(config))  # fmt: skip
    results["timings_s"]["rough"] = round(time.perf_counter() - t0, 1)
  if "bladder" in parts:
    t0 = time.perf_counter()
    results["bladder"] = bladder_study(config, seeds, work)
    results["timings_s"]["bladder"] = round(time.perf_counter() - t0, 1)
  results["timings_s"]["total"] = round(time.perf_counter() - start, 1)
  import resource

  usage = resource.getrusage(resource.RUSAGE_SELF)
  results["timings_s"]["cpu_process"] = round(usage.ru_utime + usage.ru_stime, 1)
  results["hardware"] = paper.hardware()

  outputs.atomic_write(out / "results.json", json.dumps(outputs.json_ready(results), indent=2) + "\n")
  outputs.atomic_write(out / "results.md", report.markdown(results) + "\n")
  _log(f"study done in {results['timings_s']['total']:.0f} s: {out / 'results.md'}")
  return results
