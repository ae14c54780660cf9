"""The paper's evaluation at CPU size: pix2pix against the U-Net baseline, and MSI registration by two routes.

The launcher is experiments/evaluate.py (its docstring gives the commands); settings, splits and sizes are in
experiments/configs/evaluate.py.

Synthesis: pix2pix and the U-Net baseline are trained on the same patches of the same split with the same generator
and schedule; they differ only in the adversarial term. A workdir that already holds a finished run is loaded
instead of trained; an unfinished one is resumed. Both models are evaluated on held-out data, each held-out image
synthesised whole, with the final weights:
  - msiflow: the real msiFlow UPEC_12 pair (MSI → immunofluorescence microscopy registered by msiFlow), spatial
    hold-out; the cases are the patch-size tiles of the held-out band, plus the band as a whole (reported apart);
  - simulated: real H&E slides with SIMULATED MSI; whole slides held out; the cases are the held-out slides.
Per case: MI (bits, plug-in, `eval.mi_bins` bins over [0, 1]), NMI, SSIM and PSNR (dB) inside the tissue mask.
A metric that is not finite is an error (`msisynth.evaluation.stats.check_finite`), never dropped. The plug-in MI
of small tiles is mostly estimator bias; the protocol of `msisynth.evaluation.study` replaces this table with
bias-corrected MI over whole regions, several training seeds and paired tests.

Registration: simulated held-out slides re-simulated with a random affine misalignment and registered by the
synthetic H&E and by the MSI itself (PCA 1, TIC); on msiFlow's pair, the unregistered microscopy is registered to
the MSI grid and compared with msiFlow's result (a reference, not ground truth).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import time
from typing import Any

import numpy as np
from absl import logging

from msisynth import errors, outputs
from msisynth.evaluation import images, stats

PARTS = ("synthesis", "registration", "all")
MODELS = ("unet", "pix2pix")
MODEL_NAMES = {"unet": "U-Net (L1)", "pix2pix": "pix2pix"}
METRICS = ("mi_bits", "nmi", "ssim", "psnr_db")
METRIC_NAMES = {"mi_bits": "MI (bits)", "nmi": "NMI", "ssim": "SSIM", "psnr_db": "PSNR (dB)"}
ROUTE_NAMES = {
  "synthetic": "synthetic (pix2pix) → real, unimodal",
  "msi_pca1": "MSI PCA 1 → real, multimodal MI",
  "msi_tic": "MSI TIC → real, multimodal MI",
  "umap": "MSI UMAP → real, multimodal MI",
}


# ------------------------------------------------------------------------------------------------- configuration


def load_config(setting: str, *, tiny: bool = False, steps: int | None = None, data_dir: str | None = None):
  """The evaluation config of experiments/configs/evaluate.py for `setting`, with the launcher's overrides."""
  from experiments.configs import evaluate as eval_config

  config = eval_config.get_config(setting + (",tiny" if tiny else ""))
  if steps is not None:
    eval_config.set_steps(config.train, steps)
  if data_dir:
    config.train.data.data_dir = data_dir
  return config


def model_configs(config) -> dict[str, Any]:
  """The pix2pix and U-Net training configs: identical except model.kind and model.gan_weight.

  Raises:
    ConfigError: if they differ in anything else (a guard against an unfair comparison).
  """
  pix2pix = config.train.copy_and_resolve_references()
  pix2pix.model.kind = "pix2pix"
  unet = pix2pix.copy_and_resolve_references()
  unet.model.kind = "unet"
  unet.model.gan_weight = 0.0
  a, b = _flatten(pix2pix.to_dict()), _flatten(unet.to_dict())
  differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  if differing != ["model.gan_weight", "model.kind"]:
    raise errors.ConfigError(f"pix2pix and U-Net configs must differ only in the GAN term, they differ in {differing}")
  return {"pix2pix": pix2pix, "unet": unet}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def hardware() -> dict[str, Any]:
  """The code version (git commit), CPU count and model, JAX backend and devices, for the results."""
  import jax

  model = None
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  commit = None
  try:
    import subprocess

    repo = pathlib.Path(__file__).resolve().parents[2]
    git = ["git", "-C", os.fspath(repo)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           timeout=10)  # fmt: skip
    if head.returncode == 0:
      commit = head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return {
    "git_commit": commit,
    "cpu_count": os.cpu_count(),
    "cpu_model": model or platform.processor(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "python": platform.python_version(),
  }


def _progress(message: str) -> None:
  print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)
  logging.info(message)


# ---------------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Case:
  """A held-out evaluation case: a window of an image synthesised whole.

  Attributes:
    name: for tables and figure names.
    image: index into `EvalData.images`.
    window: (row slice, column slice) of the case in that image.
    mask: bool mask of the window, True where the pixel counts (tissue, measured, held out).
  """

  name: str
  image: int
  window: tuple[slice, slice]
  mask: np.ndarray


@dataclasses.dataclass
class EvalData:
  """Training data, the held-out images and the cases cut from them.

  Attributes:
    paired: the `msisynth.data.PairedData`.
    train_data: the training `PatchDataset` (both models see the same batches).
    val_set: the validation tiles watched during training (never used to pick weights here).
    images: the held-out pairs, synthesised whole.
    cases: the cases (windows of `images`) averaged in the table.
    extra_cases: cases reported but not averaged (the whole held-out band of the msiflow setting).
    simulated: whether the MSI is simulated.
    target_name: "H&E" or "microscopy".
    slides: simulated only: slide stem → path of the H&E actually used.
    split: a description of the split for the results.
  """

  paired: Any
  train_data: Any
  val_set: dict | None
  images: list
  cases: list[Case]
  extra_cases: list[Case]
  simulated: bool
  target_name: str
  slides: dict[str, pathlib.Path]
  split: dict[str, Any]


def _slide_paths(config, output_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Stem → path of every slide the split names; reduced copies under output_dir/tiny_slides when he_downsample > 1."""
  from msisynth import datasets
  from msisynth import io as msi_io

  shipped = {p.stem: p for p in datasets.list_he_slides(config.train.data.get("data_dir"))}
  split = config.split
  names = [*split.train_slides, split.val_slide, *split.test_slides]
  missing = [n for n in names if n not in shipped]
  if missing:
    raise errors.ConfigError(f"unknown slides {missing}; shipped slides: {sorted(shipped)}")
  if len(set(names)) != len(names):
    raise errors.ConfigError(f"a slide is in more than one of train/val/test: {names}")
  factor = int(split.he_downsample)
  if factor == 1:
    return {n: shipped[n] for n in names}
  folder = output_dir / "tiny_slides"
  folder.mkdir(parents=True, exist_ok=True)
  out = {}
  for n in names:
    path = folder / f"{n}.png"
    if not path.exists():
      reduced = images.block_reduce(msi_io.read_histology(shipped[n]), factor)
      msi_io.write_image(path, np.clip(reduced, 0, 1).astype(np.float32))
    out[n] = path
  return out


def build_data(config, output_dir: pathlib.Path) -> EvalData:
  """The split, training data and held-out cases of `config.setting`.

  Raises:
    ConfigError, DataError: for bad settings or unreadable data.
  """
  from msisynth import data as data_lib
  from msisynth import datasets

  t, d = config.train, config.train.data
  patch, upsample, seed = int(d.patch_size), int(d.upsample), int(t.seed)
  dataset_kwargs = dict(patch_size=patch, batch_size=int(t.train.batch_size),
                        min_tissue_fraction=float(d.min_tissue_fraction))  # fmt: skip
  if config.setting == "msiflow":
    paired = data_lib.msiflow_pairs(d.get("data_dir"), val_fraction=float(d.val_fraction), split_axis=d.split_axis,
                                    gap_px=int(d.gap_px), seed=seed, upsample=upsample,
                                    min_val_band_px=-(-patch // upsample))  # fmt: skip
    paired = soften_mask_channel(paired, float(config.eval.get("mask_channel_sigma_px", 2.0)))
    train_data = paired.train_dataset(seed=seed, augment=bool(d.augment), **dataset_kwargs)
    val_set = paired.val_dataset(**dataset_kwargs).validation_set()
    pair, region = paired.val_pairs[0], paired.val_regions[0]
    held_out = pair.mask & region
    tiles = data_lib.PatchDataset(
      [pair],
      patch_size=patch,
      batch_size=1,
      seed=0,
      region_masks=[region],
      augment=False,
      min_tissue_fraction=float(config.eval.case_min_tissue_fraction),
    )
    cases = []
    for _, row, col in tiles.tile_positions():
      window = (slice(int(row), int(row) + patch), slice(int(col), int(col) + patch))
      cases.append(Case(f"tile_r{row}_c{col}", 0, window, held_out[window]))
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    band = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    # The microscopy covers the whole section, msiFlow's tissue mask only the urothelium: the band is also scored
    # over every measured pixel, for context.
    measured = datasets.load_msiflow(d.get("data_dir")).msi.mask.astype(np.float32)
    measured = data_lib.upsample_grid(measured, upsample) > 1 - 1e-4
    extra = [
      Case("held-out band", 0, band, held_out[band]),
      Case("held-out band, all measured pixels", 0, band, (measured & region)[band]),
    ]
    split = {
      "kind": "spatial hold-out of one section",
      "axis": d.split_axis,
      "val_fraction": float(d.val_fraction),
      "gap_px_msi": int(d.gap_px),
      "band_rows_pair_grid": [int(rows[0]), int(rows[-1]) + 1],
      "upsample": upsample,
      "cases": "tiles of the held-out band",
      "n_train_positions": train_data.num_positions,
    }
    return EvalData(paired, train_data, val_set, [pair], cases, extra, False, "microscopy", {}, split)

  slides = _slide_paths(config, output_dir)
  s = config.split
  paired = data_lib.semi_synthetic_pairs(
    [slides[n] for n in s.train_slides], seed=seed, histology_pixel_size_um=float(d.histology_pixel_size_um),
    msi_pixel_size_um=float(d.msi_pixel_size_um), n_channels=int(d.n_channels), n_components=int(d.n_components),
    upsample=upsample, val_he_paths=[slides[s.val_slide]] + [slides[n] for n in s.test_slides])  # fmt: skip
  train_data = paired.train_dataset(seed=seed, augment=bool(d.augment), **dataset_kwargs)
  val_pair, test_pairs = paired.val_pairs[0], paired.val_pairs[1:]
  val_set = data_lib.PatchDataset([val_pair], augment=False, seed=0, **dataset_kwargs).validation_set()
  n_val = min(len(val_set["msi"]), int(d.max_val_patches))
  keep = np.linspace(0, len(val_set["msi"]) - 1, n_val).round().astype(int)
  val_set = {k: np.asarray(v)[keep] for k, v in val_set.items()}
  cases = [Case(n, i, (slice(None), slice(None)), p.mask) for i, (n, p) in enumerate(zip(s.test_slides, test_pairs))]
  split = {"kind": "held-out slides", "train_slides": list(s.train_slides), "val_slide": s.val_slide,
           "test_slides": list(s.test_slides), "he_downsample": int(s.he_downsample), "upsample": upsample,
           "histology_pixel_size_um_assumed": float(d.histology_pixel_size_um),
           "msi_pixel_size_um": float(d.msi_pixel_size_um),
           "cases": "held-out slides", "n_train_positions": train_data.num_positions}  # fmt: skip
  return EvalData(paired, train_data, val_set, list(test_pairs), cases, [], True, "H&E", slides, split)


def soften_mask_channel(paired, sigma_px: float):
  """The msiFlow target with its third channel (a near-binary urothelium mask: 98% of its pixels exactly 0 or 1)
  smoothed by a Gaussian of `sigma_px` pair pixels, so that the discriminator cannot win on its hard edges alone.

  0 keeps the channel as it is. The same Pair objects are shared by the training and validation lists (a spatial
  split), so each is replaced once.
  """
  from scipy import ndimage

  if sigma_px <= 0:
    return paired
  done = {}

  def soft(pair):
    if id(pair) not in done:
      target = np.array(pair.histology, np.float32, copy=True)
      target[..., 2] = ndimage.gaussian_filter(target[..., 2], sigma_px, mode="nearest")
      meta = dict(pair.metadata, mask_channel_sigma_px=float(sigma_px))
      done[id(pair)] = dataclasses.replace(pair, histology=np.clip(target, 0, 1), metadata=meta)
    return done[id(pair)]

  return dataclasses.replace(paired, train_pairs=[soft(p) for p in paired.train_pairs],
                             val_pairs=[soft(p) for p in paired.val_pairs])  # fmt: skip


# ------------------------------------------------------------------------------------------------------ training


def _finished_step(workdir: pathlib.Path) -> int | None:
  """The latest step of a finished run in `workdir` (latest step >= its config's train.num_steps), else None."""
  from msisynth import checkpoint

  step = checkpoint.latest_step(workdir)
  if step is None:
    return None
  saved_config, _, _ = checkpoint.restore_for_inference(workdir, step=step)
  return step if step >= int(saved_config.train.num_steps) else None


def _same_preprocessor(a: dict | None, b: dict | None) -> bool:
  """Whether two `MSIPreprocessor.to_dict()`s describe the same fitted transform (floats to 1e-5 relative)."""
  if a is None or b is None:
    return a is b
  fa, fb = _flatten(a), _flatten(b)
  if set(fa) != set(fb):
    return False
  for k, va in fa.items():
    vb = fb[k]
    if isinstance(va, list | tuple) or isinstance(vb, list | tuple):
      try:
        xa, xb = np.asarray(va, np.float64), np.asarray(vb, np.float64)
      except (TypeError, ValueError):
        if va != vb:
          return False
        continue
      if xa.shape != xb.shape or not np.allclose(xa, xb, rtol=1e-5, atol=1e-7, equal_nan=True):
        return False
    elif va != vb:
      return False
  return True


def train_or_load(kind: str, config, workdir: pathlib.Path, data: EvalData) -> dict[str, Any]:
  """Trains one model into `workdir` (resuming), or loads it when `workdir` holds a finished run.

  Returns:
    {"kind", "workdir", "status" ("trained" | "loaded"), "steps", "seconds", "final_val": last validation scores}.

  Raises:
    ConfigError: when a loaded run was fitted on other data (its saved preprocessor differs from this split's).
  """
  from msisynth import checkpoint
  from msisynth import train as train_lib

  start = time.perf_counter()
  finished = _finished_step(workdir)
  if finished is not None:
    saved_config, _, saved_pre = checkpoint.restore_for_inference(workdir, step=finished)
    if not _same_preprocessor(saved_pre, data.paired.preprocessor.to_dict()):
      raise errors.ConfigError(
        f"{workdir}: this run's MSI preprocessor differs from the one fitted on this evaluation's training split, "
        "so it was trained on other data; train it here"
      )
    status = "loaded"
    _progress(f"{kind}: loaded the finished run in {workdir} (step {finished})")
  else:
    _progress(f"{kind}: training {int(config.train.num_steps)} steps of batch {int(config.train.batch_size)} in "
              f"{workdir}")  # fmt: skip
    train_lib.train_and_evaluate(config, workdir, data.train_data, data.val_set, preprocessor=data.paired.preprocessor)
    saved_config = config
    status = "trained"
  seconds = time.perf_counter() - start
  final_val = {}
  metrics_file = workdir / "metrics.jsonl"
  if metrics_file.exists():
    for line in metrics_file.read_text().splitlines():
      record = json.loads(line) if line.strip() else {}
      if "val_ssim" in record:
        final_val = {k: v for k, v in record.items() if k.startswith("val_") or k == "step"}
  _progress(f"{kind}: {status} in {seconds:.0f} s; last validation {final_val}")
  return {"kind": kind, "workdir": os.fspath(workdir), "status": status, "steps": int(checkpoint.latest_step(workdir)),
          "seconds": round(seconds, 1), "final_val": final_val, "config": saved_config.to_dict()}  # fmt: skip


def load_generator(config, workdir: pathlib.Path):
  """The final (latest) generator of a run as a `Synthesizer` tiling with the training patch size."""
  from msisynth import synthesize

  e = config.eval
  return synthesize.load_synthesizer(workdir, which="latest", tile_size=int(e.tile_size), overlap=int(e.overlap),
                                     batch_size=int(e.batch_size))  # fmt: skip


# ---------------------------------------------------------------------------------------------- synthesis table


def image_metrics(fake: np.ndarray, real: np.ndarray, mask: np.ndarray, config, *, grey=None) -> dict[str, float]:
  """MI (bits), NMI, SSIM and PSNR (dB) of a synthetic against a real RGB image in [0, 1], inside `mask`.

  The histogram measures (MI, NMI) compare grey levels: `grey(image)` -> (H, W) when given, else the luminance
  that `msisynth.metrics` uses for RGB. SSIM (mean over channels) and PSNR use the three channels.
  """
  from msisynth import metrics

  e = config.eval
  kw = dict(mask=np.asarray(mask, bool))
  hist_fake, hist_real = (fake, real) if grey is None else (grey(fake), grey(real))
  values = {
    "mi_bits": metrics.mutual_information(hist_fake, hist_real, bins=int(e.mi_bins), value_range=(0.0, 1.0), **kw),
    "nmi": metrics.normalized_mutual_information(
      hist_fake, hist_real, bins=int(e.nmi_bins), value_range=(0.0, 1.0), **kw
    ),
    "ssim": metrics.ssim(fake, real, max_val=1.0, **kw),
    "psnr_db": metrics.psnr(fake, real, max_val=1.0, **kw),
  }
  out = {k: float(v) for k, v in values.items()}
  out["n_pixels"] = int(np.sum(mask))
  return out


def _mean_std(values) -> dict[str, float]:
  """Mean, std and n of the finite values: for registration TREs only, where a failed registration has no TRE and
  is counted as a failure beside the mean (never for image metrics: see `summarise`)."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return {"mean": float("nan"), "std": float("nan"), "n": 0}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def summarise(cases: list[dict]) -> dict[str, dict]:
  """Per metric: mean ± std over cases of each model and of the per-case difference pix2pix − U-Net.

  Raises:
    DataError: when any case has a non-finite metric (it is an error, never dropped).
  """
  out = {}
  for m in METRICS:
    out[m] = {k: stats.mean_std([c[k][m] for c in cases], f"{METRIC_NAMES[m]} of {k}") for k in MODELS}
    out[m]["difference"] = stats.mean_std([c["pix2pix"][m] - c["unet"][m] for c in cases],
                                          f"{METRIC_NAMES[m]} difference")  # fmt: skip
  return out


def plot_synthesis_case(msi_rgb, real, unet, pix2pix, mask, *, title: str, scores: dict, target_name: str):
  """A figure with the MSI input (first principal components), the real image, the U-Net and pix2pix outputs."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  height, width = real.shape[:2]
  aspect = height / max(width, 1)
  if aspect < 0.4:  # a wide band: panels one above the other
    fig = Figure(figsize=(10, 4 * 10 * aspect + 1.6), layout="constrained")
    axes = fig.subplots(4, 1)
  else:
    fig = Figure(figsize=(12, 3 * aspect + 0.9), layout="constrained")
    axes = fig.subplots(1, 4)
  FigureCanvasAgg(fig)
  panels = [
    (msi_rgb, "MSI input (PCA 1-3)"),
    (real, f"real {target_name}"),
    (unet, "U-Net (L1): " + _score_text(scores["unet"])),
    (pix2pix, "pix2pix: " + _score_text(scores["pix2pix"])),
  ]
  outline = np.asarray(mask, bool)
  for ax, (image, label) in zip(axes, panels):
    ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
    if not outline.all():
      ax.contour(outline.astype(float), levels=[0.5], colors="yellow", linewidths=0.6)
    ax.set_title(label, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title, fontsize=10)
  return fig


def _score_text(s: dict) -> str:
  return f"MI {_num(s['mi_bits'], '.3f')}, SSIM {_num(s['ssim'], '.3f')}"


def _finite(value) -> bool:
  return value is not None and math.isfinite(float(value))


def _num(value, spec: str) -> str:
  """A number for a table, "n/a" for None or NaN (JSON keeps NaN as null)."""
  return format(float(value), spec) if _finite(value) else "n/a"


def _fmt(stat: dict, digits: int = 3, signed: bool = False) -> str:
  if not stat or not _finite(stat.get("mean")):
    return "n/a"
  sign = "+" if signed else ""
  return f"{stat['mean']:{sign}.{digits}f} ± {stat['std']:.{digits}f}"


def synthesis_part(config, data: EvalData, generators: dict, figures: pathlib.Path) -> dict[str, Any]:
  """Synthesises every held-out image whole with both models and scores each case; writes a figure per case."""
  from msisynth.viz import msi as viz_msi

  label = " (simulated MSI)" if data.simulated else " (real MSI)"
  synthetic = {k: [] for k in MODELS}
  seconds = {}
  for kind in MODELS:
    start = time.perf_counter()
    for pair in data.images:
      synthetic[kind].append(generators[kind](pair.msi))
    seconds[kind] = round(time.perf_counter() - start, 2)
    _progress(f"synthesis: {kind} synthesised {len(data.images)} held-out image(s) whole in {seconds[kind]:.1f} s")

  def score(case: Case) -> dict[str, Any]:
    pair = data.images[case.image]
    real = pair.histology[case.window]
    row = {"case": case.name, "shape": list(real.shape[:2])}
    for kind in MODELS:
      fake = synthetic[kind][case.image][case.window]
      row[kind] = image_metrics(fake, real, case.mask, config, grey=None if data.simulated else images.grey_mean)
    return row

  rows = [score(c) for c in data.cases]
  extra = [score(c) for c in data.extra_cases]
  previews = [images.msi_rgb(p.msi, p.mask) for p in data.images]
  for case, row in zip(data.cases + data.extra_cases, rows + extra):
    pair = data.images[case.image]
    w = case.window
    fig = plot_synthesis_case(
      previews[case.image][w], pair.histology[w], synthetic["unet"][case.image][w],
      synthetic["pix2pix"][case.image][w], case.mask,
      title=f"{case.name}{label}: held-out, synthesised whole; yellow = evaluated mask",
      scores=row, target_name=data.target_name)  # fmt: skip
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in case.name)
    row["figure"] = os.fspath(viz_msi.save_figure(fig, figures / f"synthesis_{safe}.png", dpi=90, overwrite=True))
  summary = summarise(rows)
  for m in METRICS:
    s = summary[m]
    _progress(f"synthesis: {METRIC_NAMES[m]}: U-Net {_fmt(s['unet'])}, pix2pix {_fmt(s['pix2pix'])}, "
              f"pix2pix − U-Net {_fmt(s['difference'], signed=True)}")  # fmt: skip
  return {"cases": rows, "extra_cases": extra, "summary": summary, "synthesis_seconds": seconds,
          "synthetic": synthetic}  # fmt: skip


def synthesis_markdown(result: dict, data: EvalData, config) -> list[str]:
  """The synthesis tables as markdown lines."""
  s, n = result["summary"], len(result["cases"])
  grey = "luminance (BT.709)" if data.simulated else "mean of the 3 microscopy channels"
  what = "held-out tiles of the held-out band" if not data.simulated else "held-out slides (simulated MSI)"
  lines = [
    f"Mean ± std over {n} {what}; difference = per-case pix2pix − U-Net. MI in bits ({int(config.eval.mi_bins)} "
    f"bins over [0, 1]) and NMI ({int(config.eval.nmi_bins)} bins) of the {grey}; SSIM (mean over the 3 channels, "
    "11×11 Gaussian windows lying wholly inside the mask) and PSNR over the 3 channels; all inside the tissue mask"
    + (
      " (msiFlow's tissue mask covers the urothelium; the last row scores every measured pixel of the band)."
      if not data.simulated
      else "."
    ),
    "",
    "| metric | U-Net (L1) | pix2pix | pix2pix − U-Net |",
    "|---|---|---|---|",
  ]
  for m in METRICS:
    lines.append(f"| {METRIC_NAMES[m]} | {_fmt(s[m]['unet'])} | {_fmt(s[m]['pix2pix'])} | "
                 f"{_fmt(s[m]['difference'], signed=True)} |")  # fmt: skip
  lines += [
    "",
    "Per case:",
    "",
    "| case | pixels | model | MI (bits) | NMI | SSIM | PSNR (dB) |",
    "|---|---|---|---|---|---|---|",
  ]
  for row in result["cases"] + result["extra_cases"]:
    name = row["case"] + (" (not in the mean)" if row in result["extra_cases"] else "")
    for kind in MODELS:
      v = row[kind]
      numbers = " | ".join(_num(v[m], ".2f" if m == "psnr_db" else ".3f") for m in METRICS)
      lines.append(f"| {name} | {v['n_pixels']} | {MODEL_NAMES[kind]} | {numbers} |")
  return lines


# ---------------------------------------------------------------------------------------- registration: simulated


def registration_config(config):
  """The `RegistrationConfig` every route uses."""
  from msisynth.register import optimize

  r = config.registration
  iterations = r.get("max_iterations")
  working = None
  if config.setting == "simulated":
    # The library's one rule (`msisynth.geometry.working_pixel_size_um`), or the config's working pixel size.
    from msisynth import geometry

    d = config.train.data
    working = max(geometry.working_pixel_size_um(float(d.msi_pixel_size_um), float(d.histology_pixel_size_um),
                                                 r.get("working_pixel_size_um")))  # fmt: skip
  return optimize.RegistrationConfig(similarity=r.similarity, levels=int(r.levels),
                                     max_iterations=None if iterations is None else int(iterations),
                                     max_samples=int(r.max_samples), flips_and_rot90=bool(r.flips_and_rot90),
                                     working_pixel_size_um=working)  # fmt: skip


def _register_route(fixed, moving, *, fixed_px, moving_px, moving_mask, rconfig, fixed_mask=None):
  """(result or None, error message or None, seconds) of one registration."""
  from msisynth.register import optimize

  start = time.perf_counter()
  try:
    result = optimize.register(fixed, moving, fixed_pixel_size_um=fixed_px, moving_pixel_size_um=moving_px,
                               fixed_mask=fixed_mask, moving_mask=moving_mask, config=rconfig)  # fmt: skip
    return result, None, time.perf_counter() - start
  except errors.RegistrationError as e:
    return None, str(e), time.perf_counter() - start


def registration_simulated(config, data: EvalData, synthesizer, figures: pathlib.Path) -> dict[str, Any]:
  """TRE of the synthetic-H&E route and the direct MSI routes on held-out slides with known misalignments."""
  from msisynth import data as data_lib
  from msisynth import io as msi_io
  from msisynth import simulate
  from msisynth.geometry.transforms import AffineTransform, warp_image
  from msisynth.register import evaluate as reg_eval
  from msisynth.viz import msi as viz_msi
  from msisynth.viz import registration as viz_reg

  d, r = config.train.data, config.registration
  he_px, msi_px, upsample = float(d.histology_pixel_size_um), float(d.msi_pixel_size_um), int(d.upsample)
  rconfig = registration_config(config)
  centroids = np.asarray(data.paired.metadata["class_centroids"])
  preprocessor = data.paired.preprocessor
  cases = []
  for slide_index, stem in enumerate(config.split.test_slides):
    he = msi_io.read_histology(data.slides[stem])
    for seed in r.seeds:
      sim_seed = 10_000 + 100 * slide_index + int(seed)
      sim = simulate.simulate_msi(
        sim_seed, he, histology_pixel_size_um=he_px, msi_pixel_size_um=msi_px, n_channels=int(d.n_channels),
        misalignment="random", max_rotation_deg=float(r.max_rotation_deg), max_scale=float(r.max_scale),
        max_translation_um=float(r.max_translation_um), noise=True, class_centroids=centroids,
        chemistry_seed=int(config.train.seed), he_name=stem)  # fmt: skip
      x = np.asarray(preprocessor.transform(sim.msi), np.float32)
      measured = np.asarray(sim.msi.mask, bool)
      x_up = data_lib.upsample_grid(x, upsample)
      measured_up = data_lib.upsample_grid(measured.astype(np.float32), upsample) > 1 - 1e-4
      moving = {
        "synthetic": (synthesizer(np.clip(x_up, -1, 1)), msi_px / upsample, measured_up),
        "msi_pca1": (x[..., 0], msi_px, measured),
        "msi_tic": (images.tic_image(sim.msi), msi_px, measured),
      }
      fixed_lm, moving_lm = sim.landmarks_fixed_um, sim.landmarks_moving_um
      before = reg_eval.target_registration_error(AffineTransform.identity(), fixed_lm, moving_lm, msi_px)
      case = {"slide": stem, "seed": sim_seed, "msi_shape": list(sim.msi.shape), "n_landmarks": int(len(fixed_lm)),
              "misalignment": sim.msi.metadata["simulation"]["misalignment"],
              "tre_before_um": before["mean_um"], "routes": {}}  # fmt: skip
      for route in r.routes:
        image, px, mask = moving[route]
        result, error, seconds = _register_route(he, image, fixed_px=he_px, moving_px=px, moving_mask=mask,
                                                 rconfig=rconfig)  # fmt: skip
        entry = {"seconds": round(seconds, 2), "error": error}
        if result is not None:
          tre = reg_eval.target_registration_error(result.transform, fixed_lm, moving_lm, msi_px)
          entry.update(tre_mean_um=tre["mean_um"], tre_mean_px=tre["mean_px"], tre_median_px=tre["median_px"],
                       tre_max_px=tre["max_um"] / msi_px, success=bool(tre["mean_px"] < float(r.success_px)),
                       metric=float(result.metric), converged=bool(result.converged), start=result.start,
                       matrix=np.asarray(result.transform.matrix, np.float64).tolist())  # fmt: skip
          kw = dict(fixed_pixel_size_um=he_px, moving_pixel_size_um=px)
          warped_before = np.asarray(warp_image(image, AffineTransform.identity(), he.shape[:2], **kw))
          warped_after = np.asarray(warp_image(image, result.transform, he.shape[:2], **kw))
          fig = viz_reg.plot_checkerboard_before_after(
            he, warped_before, warped_after, pixel_size_um=he_px, simulated=True,
            titles=(f"{stem} seed {sim_seed}, {route}: before", f"after: TRE {tre['mean_px']:.2f} MSI px"))  # fmt: skip
          path = figures / f"registration_{stem}_s{sim_seed}_{route}.png"
          entry["figure"] = os.fspath(viz_msi.save_figure(fig, path, dpi=70, overwrite=True))
        else:
          entry.update(tre_mean_um=float("nan"), tre_mean_px=float("nan"), tre_median_px=float("nan"),
                       tre_max_px=float("nan"), success=False)  # fmt: skip
        case["routes"][route] = entry
        _progress(f"registration: {stem} seed {sim_seed} {route}: TRE {entry['tre_mean_px']:.2f} MSI px "
                  f"({entry['tre_mean_um']:.1f} µm) in {seconds:.0f} s{' — ' + error if error else ''}")  # fmt: skip
      cases.append(case)
  summary = {}
  for route in r.routes:
    entries = [c["routes"][route] for c in cases]
    summary[route] = {
      "tre_mean_um": _mean_std([e["tre_mean_um"] for e in entries]),
      "tre_mean_px": _mean_std([e["tre_mean_px"] for e in entries]),
      "tre_median_over_cases_px": float(np.nanmedian([e["tre_mean_px"] for e in entries])),
      "success_rate": float(np.mean([e["success"] for e in entries])),
      "n_success": int(sum(e["success"] for e in entries)),
      "n_failed_to_register": int(sum(e["error"] is not None for e in entries)),
      "n": len(entries),
      "seconds_mean": float(np.mean([e["seconds"] for e in entries])),
    }
  before = _mean_std([c["tre_before_um"] / msi_px for c in cases])
  return {"setting": "simulated", "simulated": True, "msi_pixel_size_um": msi_px, "histology_pixel_size_um": he_px,
          "success_px": float(r.success_px), "registration_config": dataclasses.asdict(rconfig), "cases": cases,
          "summary": summary, "tre_before_px": before}  # fmt: skip


def registration_simulated_markdown(result: dict) -> list[str]:
  """The simulated route comparison as markdown lines."""
  n = len(result["cases"])
  lines = [
    f"{n} cases (held-out slides × misalignment seeds; SIMULATED MSI with a known random affine). TRE = mean "
    f"distance at the simulation's landmarks; success = TRE < {result['success_px']:g} MSI px "
    f"({result['msi_pixel_size_um']:g} µm pixels). Before registration: TRE {_fmt(result['tre_before_px'], 1)} "
    "MSI px.",
    "",
    "| route | TRE (µm) | TRE (MSI px) | median over cases (MSI px) | success | failed to register | time (s) |",
    "|---|---|---|---|---|---|---|",
  ]
  for route, s in result["summary"].items():
    lines.append(f"| {ROUTE_NAMES.get(route, route)} | {_fmt(s['tre_mean_um'], 1)} | {_fmt(s['tre_mean_px'], 2)} | "
                 f"{s['tre_median_over_cases_px']:.2f} | {s['n_success']}/{s['n']} | {s['n_failed_to_register']} | "
                 f"{s['seconds_mean']:.0f} |")  # fmt: skip
  routes = list(result["summary"])
  lines += ["", "Per case, TRE in MSI px:", "", "| slide | seed | " + " | ".join(routes) + " |",
            "|---|---|" + "---|" * len(routes)]  # fmt: skip
  for c in result["cases"]:
    tres = " | ".join(_num(c["routes"][r]["tre_mean_px"], ".2f") for r in routes)
    lines.append(f"| {c['slide']} | {c['seed']} | {tres} |")
  return lines


# ------------------------------------------------------------------------------------------ registration: msiflow


def compare_with_reference(warped: np.ndarray, inside: np.ndarray, reference: np.ndarray, valid: np.ndarray,
                           config) -> dict[str, float]:  # fmt: skip
  """Mean absolute difference, NCC and MI (bits) of our warped microscopy against msiFlow's, where both are defined."""
  from msisynth import metrics

  mask = valid & inside
  a, b = images.grey_mean(warped), images.grey_mean(reference)
  return {
    "mean_abs_diff": float(np.mean(np.abs(warped - reference)[mask])),
    "ncc": images.ncc(a, b, mask),
    "mi_bits": float(
      metrics.mutual_information(a, b, bins=int(config.eval.mi_bins), value_range=(0.0, 1.0), mask=mask)
    ),
    "n_pixels": int(mask.sum()),
  }


def registration_msiflow(config, data: EvalData, synthetic_whole: np.ndarray, figures: pathlib.Path) -> dict:
  """Registers msiFlow's unregistered microscopy to the MSI by several routes and compares with msiFlow's result."""
  from msisynth import data as data_lib
  from msisynth import datasets
  from msisynth.geometry.transforms import AffineTransform, warp_image
  from msisynth.register import evaluate as reg_eval
  from msisynth.register import optimize
  from msisynth.viz import msi as viz_msi
  from msisynth.viz import registration as viz_reg

  flow = datasets.load_msiflow(config.train.data.get("data_dir"))
  unreg = np.asarray(flow.microscopy_unregistered, np.float32)
  reference = np.asarray(flow.microscopy_registered, np.float32)
  grid = reference.shape[:2]
  measured = np.asarray(flow.msi.mask, bool)
  valid = measured & (reference.max(axis=-1) > 0)  # msiFlow fills what its warp leaves uncovered with 0
  upsample = int(config.train.data.upsample)
  rconfig = registration_config(config)

  def warp_to_msi(transform):
    """Unregistered microscopy on the MSI grid through a microscopy → MSI transform, and where it is defined."""
    inverse = transform.inverse()
    warped = np.asarray(warp_image(unreg, inverse, grid))
    inside = np.asarray(warp_image(np.ones(unreg.shape[:2], np.float32), inverse, grid)) > 0.999
    return warped, inside

  # The reference: the affine that best maps unregistered → msiFlow's result, by NCC (one modality).
  start = time.perf_counter()
  ref_config = dataclasses.replace(rconfig, similarity="ncc")
  s_result = optimize.register(images.grey_mean(reference), images.grey_mean(unreg), fixed_mask=valid,
                              config=ref_config)
  t_ref = s_result.transform.inverse()
  ref_warped, ref_inside = warp_to_msi(t_ref)
  reference_fit = compare_with_reference(ref_warped, ref_inside, reference, valid, config)
  reference_fit.update(seconds=round(time.perf_counter() - start, 2), ncc_metric=float(s_result.metric),
                       matrix_unregistered_to_msi=np.asarray(t_ref.matrix, np.float64).tolist())  # fmt: skip
  _progress(f"registration (msiflow): affine fit to msiFlow's result: NCC {reference_fit['ncc']:.3f}, mean |diff| "
            f"{reference_fit['mean_abs_diff']:.4f}")  # fmt: skip

  x = np.asarray(data.paired.preprocessor.transform(flow.msi), np.float64)
  pca1 = images.first_pc(x, measured)
  measured_up = data_lib.upsample_grid(measured.astype(np.float32), upsample) > 1 - 1e-4
  moving = {
    "synthetic": (images.grey_mean(synthetic_whole), 1.0 / upsample, measured_up),
    "umap": (np.asarray(flow.umap, np.float32), 1.0, measured),
    "msi_pca1": (pca1, 1.0, measured),
  }

  def describe(transform) -> dict[str, Any]:
    warped, inside = warp_to_msi(transform)
    out = compare_with_reference(warped, inside, reference, valid, config)
    err = reg_eval.transform_error(transform, t_ref, unreg.shape[:2], 1.0)
    out.update(displacement_to_reference_mean_px=err["mean_um"], displacement_to_reference_max_px=err["max_um"])
    return out, warped

  identity, unreg_on_grid = describe(AffineTransform.identity())
  routes = {"no registration (identity)": identity}
  fig = viz_reg.plot_checkerboard_before_after(reference, unreg_on_grid, ref_warped, titles=(
    "msiFlow's result / unregistered microscopy", "msiFlow's result / affine NCC fit to it"))  # fmt: skip
  viz_msi.save_figure(fig, figures / "registration_msiflow_reference.png", dpi=80, overwrite=True)
  for route in config.registration.routes:
    image, px, mask = moving[route]
    result, error, seconds = _register_route(images.grey_mean(unreg), image, fixed_px=1.0, moving_px=px,
                                             moving_mask=mask, rconfig=rconfig)  # fmt: skip
    if result is None:
      routes[route] = {"error": error, "seconds": round(seconds, 2)}
      _progress(f"registration (msiflow): {route} failed: {error}")
      continue
    entry, warped = describe(result.transform)
    matrix = np.asarray(result.transform.matrix, np.float64).tolist()
    entry.update(seconds=round(seconds, 2), metric=float(result.metric), converged=bool(result.converged),
                 start=result.start, matrix_unregistered_to_msi=matrix)  # fmt: skip
    routes[route] = entry
    fig = viz_reg.plot_checkerboard_before_after(reference, unreg_on_grid, warped, titles=(
      "msiFlow's result / unregistered", f"msiFlow's result / ours ({route})"))  # fmt: skip
    entry["figure"] = os.fspath(viz_msi.save_figure(fig, figures / f"registration_msiflow_{route}.png", dpi=80,
                                                    overwrite=True))  # fmt: skip
    fig = viz_reg.plot_overlay(reference, warped, title=f"msiFlow's result (magenta) / ours, {route} (green)",
                               invert=False)  # fmt: skip
    viz_msi.save_figure(fig, figures / f"registration_msiflow_{route}_overlay.png", dpi=80, overwrite=True)
    distance = entry["displacement_to_reference_mean_px"]
    _progress(f"registration (msiflow): {route}: {distance:.2f} px from the reference, mean |diff| "
              f"{entry['mean_abs_diff']:.4f}, NCC {entry['ncc']:.3f}, {seconds:.0f} s")  # fmt: skip
  return {"setting": "msiflow", "simulated": False, "reference": reference_fit, "routes": routes,
          "registration_config": dataclasses.asdict(rconfig), "upsample": upsample,
          "note": "msiFlow's registration is a reference, not ground truth; the TIFFs record no pixel size, so "
                  "distances are in MSI pixels"}  # fmt: skip


def registration_msiflow_markdown(result: dict) -> list[str]:
  """The msiflow route comparison as markdown lines."""
  ref = result["reference"]
  lines = [
    "Real msiFlow UPEC_12 pair: `microscopy_unregistered` registered to the MSI grid; compared with msiFlow's "
    "registered microscopy, a reference, not ground truth. The reference affine is the map unregistered → "
    "msiFlow's result found by NCC registration of the two microscopy images; its fit reaches NCC "
    f"{ref['ncc']:.3f} and mean |diff| {ref['mean_abs_diff']:.4f} (the part of msiFlow's result an affine map "
    "explains). Distance = where a route's transform and the reference affine send a 10 × 10 grid of points across "
    "the microscopy, mean (max), in MSI pixels (the TIFFs record no pixel size). The image comparisons (mean "
    "absolute difference over the 3 channels in [0, 1], NCC and MI (bits) of the channel mean) are over the "
    "measured MSI pixels where both images are defined. Every route uses the same MI registration settings.",
    "",
    "| route | distance to the reference affine, mean (max) px | mean abs diff vs msiFlow | NCC vs msiFlow | "
    "MI vs msiFlow (bits) | time (s) |",
    "|---|---|---|---|---|---|",
  ]
  for route, e in result["routes"].items():
    name = ROUTE_NAMES.get(route, route).replace("real", "microscopy").replace("pix2pix", "pix2pix, msiflow-trained")
    if "error" in e:
      lines.append(f"| {name} | failed: {e['error']} | | | | {e['seconds']:.0f} |")
      continue
    seconds = f"{e['seconds']:.0f}" if "seconds" in e else "–"
    mean_px, max_px = e["displacement_to_reference_mean_px"], e["displacement_to_reference_max_px"]
    lines.append(f"| {name} | {_num(mean_px, '.2f')} ({_num(max_px, '.2f')}) | {_num(e['mean_abs_diff'], '.4f')} | "
                 f"{_num(e['ncc'], '.3f')} | {_num(e['mi_bits'], '.3f')} | {seconds} |")  # fmt: skip
  return lines


# ---------------------------------------------------------------------------------------------------------- main


def run_evaluation(config, output_dir: str | os.PathLike, *, part: str = "all", workdir_pix2pix=None,
                   workdir_unet=None, command: str | None = None) -> dict[str, Any]:  # fmt: skip
  """Runs the evaluation `config` describes and writes results.md, results.json and figures into `output_dir`.

  Args:
    config: from `load_config` (experiments/configs/evaluate.py).
    output_dir: output folder (created).
    part: "synthesis", "registration" or "all".
    workdir_pix2pix: pix2pix workdir (default output_dir/pix2pix).
    workdir_unet: U-Net workdir (default output_dir/unet); not needed for part "registration".
    command: the command line, recorded in the results.

  Returns:
    The results written to results.json (without the synthetic images).

  Raises:
    ConfigError: for a bad part or configuration, or a loaded run trained on other data.
  """
  if part not in PARTS:
    raise errors.ConfigError(f"part must be one of {PARTS}, got {part!r}")
  start = time.perf_counter()
  out = pathlib.Path(output_dir)
  figures = out / "figures"
  figures.mkdir(parents=True, exist_ok=True)
  workdirs = {"pix2pix": pathlib.Path(workdir_pix2pix or out / "pix2pix"),
              "unet": pathlib.Path(workdir_unet or out / "unet")}  # fmt: skip
  configs = model_configs(config)
  _progress(f"evaluation: setting {config.setting}{' (tiny)' if config.tiny else ''}, part {part}, output {out}")

  t0 = time.perf_counter()
  data = build_data(config, out)
  data_seconds = time.perf_counter() - t0
  _progress(f"data: {len(data.cases)} held-out cases, {data.split['n_train_positions']} training patch positions "
            f"({'simulated MSI' if data.simulated else 'real MSI'}) in {data_seconds:.0f} s")  # fmt: skip

  kinds = MODELS if part in ("synthesis", "all") else ("pix2pix",)
  training = {k: train_or_load(k, configs[k], workdirs[k], data) for k in kinds}
  generators = {k: load_generator(config, workdirs[k]) for k in kinds}

  results: dict[str, Any] = {
    "setting": config.setting,
    "tiny": bool(config.tiny),
    "simulated": data.simulated,
    "data": "real H&E slides with SIMULATED MSI (semi-synthetic)"
    if data.simulated
    else "real msiFlow UPEC_12 MSI ↔ immunofluorescence microscopy registered by msiFlow",  # fmt: skip
    "split": data.split,
    "command": command,
    "hardware": hardware(),
    "config": config.to_dict(),
    "training": {k: {kk: vv for kk, vv in v.items() if kk != "config"} for k, v in training.items()},
    "configs_differ_only_in": ["model.gan_weight", "model.kind"],
    "data_seconds": round(data_seconds, 1),
  }
  synthetic_whole = None
  if part in ("synthesis", "all"):
    synthesis = synthesis_part(config, data, generators, figures)
    synthetic_whole = synthesis.pop("synthetic")["pix2pix"][0]
    results["synthesis"] = synthesis
  if part in ("registration", "all"):
    t1 = time.perf_counter()
    if config.setting == "simulated":
      results["registration"] = registration_simulated(config, data, generators["pix2pix"], figures)
    else:
      if synthetic_whole is None:
        synthetic_whole = generators["pix2pix"](data.images[0].msi)
      results["registration"] = registration_msiflow(config, data, synthetic_whole, figures)
    results["registration"]["seconds"] = round(time.perf_counter() - t1, 1)
  results["runtime_s"] = round(time.perf_counter() - start, 1)
  results = outputs.json_ready(results)
  outputs.atomic_write(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
  outputs.atomic_write(out / "results.md", "\n".join(results_markdown(results, data, config)) + "\n")
  _progress(f"done in {results['runtime_s']:.0f} s: {out / 'results.md'}")
  return results


def results_markdown(results: dict, data: EvalData, config) -> list[str]:
  """The whole report as markdown lines."""
  simulated = results["simulated"]
  title = "simulated MSI (semi-synthetic: real H&E, SIMULATED MSI)" if simulated else "real msiFlow UPEC_12 pair"
  hw = results["hardware"]
  t = config.train
  lines = [
    f"# Evaluation: {title}{' — tiny test run' if results['tiny'] else ''}",
    "",
    f"Command: `{results.get('command') or 'experiments.evaluate'}`  ",
    f"Hardware: {hw['cpu_count']} CPU cores ({hw['cpu_model']}), JAX {hw['jax']} on {hw['backend']}.  ",
    f"Code: {hw.get('git_commit') or 'unknown'}.  ",
    f"Total runtime: {results['runtime_s']:.0f} s (data {results['data_seconds']:.0f} s).",
    "",
    f"Training: both models {int(t.train.num_steps)} steps of batch {int(t.train.batch_size)} × "
    f"{int(t.data.patch_size)}² patches, U-Net depth {int(t.model.depth)}, ngf {int(t.model.ngf)}, Adam "
    f"{float(t.optim.learning_rate):g}; identical except the GAN term. "
    + ", ".join(f"{MODEL_NAMES[k]}: {v['status']} in {v['seconds']:.0f} s (step {v['steps']})"
                for k, v in results["training"].items()) + ".",
    "",
  ]  # fmt: skip
  if "synthesis" in results:
    lines += [f"## Synthesis: {data.target_name} from MSI, held-out data", ""]
    lines += synthesis_markdown(results["synthesis"], data, config)
    lines.append("")
  if "registration" in results:
    lines += ["## Registration routes", ""]
    if simulated:
      lines += registration_simulated_markdown(results["registration"])
    else:
      lines += registration_msiflow_markdown(results["registration"])
    lines.append("")
  lines.append("Figures: `figures/`.")
  return lines
