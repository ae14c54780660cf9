"""The end-to-end demo on the shipped data: MSI → synthetic H&E → registration → MSI in histology space.

`run_demo(config, out_dir)` is what `python -m experiments.demo` runs (its config: `experiments/configs/demo.py`);
the stages are public functions too, for notebooks. On data that are labelled as they are:

  1. `explore_real_msi`: reads the shipped imzML example and the real msiFlow UPEC_12 ion images, preprocesses them
     (TIC, hotspot clipping, PCA) and draws their PCA and ion images.
  2. `train_generator`: semi-synthetic training pairs (real H&E slides with MSI **simulated** from them,
     `msisynth.data.semi_synthetic_pairs`) and a small pix2pix generator trained on the CPU (or reused from a
     finished run in the workdir).
  3. `simulate_test_section`: a held-out H&E slide gets a simulated MSI acquisition with a known random
     misalignment, written as imzML; `msisynth.pipeline.process_section` reads it, synthesises H&E, registers
     synthetic → real H&E, carries every MSI channel into histology space and writes the section report; the known
     misalignment gives the target registration error (TRE). `direct_multimodal` registers the MSI TIC image to the
     H&E for comparison.
  4. `write_demo_report`: `report.md` and `demo_metrics.json` in the output folder.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

from msisynth import errors, outputs

REPORT = "report.md"
METRICS = "demo_metrics.json"


def _stage(name: str) -> None:
  logging.info("=" * 20 + " %s " + "=" * 20, name)
  print(f"\n== {name}", flush=True)


def explore_real_msi(out: pathlib.Path) -> dict[str, Any]:
  """Stage 1: reads real MSI, preprocesses it, and draws its PCA (`msi_pca.png`) and ion images into `out`."""
  from msisynth import datasets, io, preprocess
  from msisynth.viz import msi as viz_msi

  results = {}
  imzml = datasets.data_dir() / "imzml" / "pym2aia" / "test.imzML"
  msi = io.read_imzml(imzml, progress=False)
  results["imzml_example"] = {"file": str(imzml), "shape": list(msi.shape), "channels": msi.num_channels,
                              "mz_range": [float(msi.mz[0]), float(msi.mz[-1])], "pixel_size_um": msi.pixel_size_um}
  print(f"  {imzml.name}: {msi.shape[0]}×{msi.shape[1]} pixels, {msi.num_channels} m/z channels "
        f"({msi.mz[0]:.1f}-{msi.mz[-1]:.1f})")  # fmt: skip

  msi = datasets.load_msiflow().msi
  normalized = preprocess.tic_normalize(msi.cube, mask=msi.mask)
  clipped = preprocess.remove_hotspots(normalized, quantile=0.99, mask=msi.mask)
  result = preprocess.pca(clipped, 3, mask=msi.mask)
  viz_msi.save_figure(viz_msi.plot_pca(result.scores, result.explained_variance_ratio,
                                       title="Real MSI (msiFlow UPEC_12): PCA"), out / "msi_pca.png",
                      overwrite=True)  # fmt: skip
  viz_msi.save_figure(viz_msi.plot_ion_images(msi, n=6, title="Real MSI (msiFlow UPEC_12): ion images"),
                      out / "msi_ion_images.png", overwrite=True)  # fmt: skip
  results["msiflow_pca_explained_variance"] = [float(v) for v in result.explained_variance_ratio]
  print(f"  msiFlow UPEC_12: {msi.shape[0]}×{msi.shape[1]} pixels, {msi.num_channels} ion images; "
        f"PCA explained variance {', '.join(f'{v:.2f}' for v in result.explained_variance_ratio)}")  # fmt: skip
  return results


def train_generator(config, workdir: pathlib.Path, slides: Mapping[str, pathlib.Path]) -> None:
  """Stage 2: semi-synthetic pairs (simulated MSI from real H&E) and a small pix2pix generator in `workdir`.

  A finished run in `workdir` (a checkpoint at `config.train.num_steps` or later) is reused.
  """
  from msisynth import checkpoint, data
  from msisynth import train as train_lib

  latest = checkpoint.latest_step(workdir) if (workdir / "checkpoints").exists() else None
  if latest is not None and latest >= int(config.train.num_steps):
    print(f"  reusing the generator trained earlier in {workdir} (step {latest})")
    return
  d, demo = config.data, config.demo
  paired = data.semi_synthetic_pairs(
    [slides[s] for s in demo.train_slides], seed=int(config.seed),
    histology_pixel_size_um=float(d.histology_pixel_size_um), msi_pixel_size_um=float(d.msi_pixel_size_um),
    n_channels=int(d.n_channels), n_components=int(d.n_components), upsample=int(d.upsample),
    val_he_paths=[slides[demo.val_slide]])  # fmt: skip
  kwargs = dict(patch_size=int(d.patch_size), batch_size=int(config.train.batch_size))
  train_data = paired.train_dataset(seed=int(config.seed), **kwargs)
  val_set = paired.val_dataset(**kwargs).validation_set()
  n_val = min(len(val_set["msi"]), int(d.max_val_patches))
  val_set = {k: v[:n_val] for k, v in val_set.items()}
  print(f"  {len(demo.train_slides)} training slides (simulated MSI, {d.n_channels} m/z → PCA {d.n_components}), "
        f"validation slide {demo.val_slide}; {config.train.num_steps} steps of batch {config.train.batch_size} × "
        f"{d.patch_size}² patches")  # fmt: skip
  start = time.perf_counter()
  train_lib.train_and_evaluate(config, workdir, train_data, val_set, preprocessor=paired.preprocessor)
  print(f"  trained in {time.perf_counter() - start:.0f} s; checkpoints in {workdir / 'checkpoints'}")


def held_out_histology_pixel_size_um(config) -> float:
  """The pixel size (µm) of the held-out H&E as the demo uses it (halved resolution in the quick variant)."""
  return float(config.data.histology_pixel_size_um) * (2 if config.demo.quick else 1)


def simulate_test_section(out: pathlib.Path, he_path: pathlib.Path, config):
  """Stage 3a: the held-out slide with a simulated, misaligned MSI acquisition written as imzML under `out`.

  Returns:
    (SimulatedMSI, {name: path} of the files `msisynth.simulate.save_simulated` wrote).
  """
  from msisynth import io, simulate

  he = io.read_histology(he_path)
  if config.demo.quick:
    he = he[::2, ::2]
  msi_px = float(config.data.msi_pixel_size_um)
  sim = simulate.simulate_msi(
    int(config.seed) + 1000, he, histology_pixel_size_um=held_out_histology_pixel_size_um(config),
    msi_pixel_size_um=msi_px, n_channels=int(config.data.n_channels), misalignment="random",
    max_rotation_deg=float(config.demo.max_rotation_deg), max_scale=float(config.demo.max_scale),
    max_translation_um=float(config.demo.max_translation_um), chemistry_seed=int(config.seed),
    he_name=he_path.stem)  # fmt: skip
  paths = simulate.save_simulated(sim, out / "test_section_simulated", overwrite=True)
  print(f"  {he_path.stem}: simulated MSI {sim.msi.shape[0]}×{sim.msi.shape[1]} pixels × {sim.msi.num_channels} m/z "
        f"at {msi_px:g} µm, misaligned by a known affine; written to {paths['imzml']}")  # fmt: skip
  return sim, paths


def direct_multimodal(sim, histology_pixel_size_um, msi_pixel_size_um) -> dict[str, Any]:
  """Stage 3c: the direct route: the MSI TIC image registered to the real H&E by MI (multimodal).

  Set up like the synthetic route (the same H&E as the fixed image, the same starts, flips and 90° turns
  included), so that the two routes differ only in the moving image.
  """
  from msisynth.register import evaluate, optimize

  result = optimize.register(sim.he, sim.msi.tic_image(), fixed_pixel_size_um=histology_pixel_size_um,
                             moving_pixel_size_um=msi_pixel_size_um, moving_mask=sim.msi.mask,
                             config=optimize.RegistrationConfig(flips_and_rot90=True))  # fmt: skip
  tre = evaluate.target_registration_error(result.transform, sim.landmarks_fixed_um, sim.landmarks_moving_um,
                                           msi_pixel_size_um)  # fmt: skip
  return {"route": "MSI TIC image → H&E (multimodal MI)", "registration_metric": float(result.metric),
          "registration_metric_name": result.metric_name, "converged": bool(result.converged),
          "tre_mean_um": float(tre["mean_um"]), "tre_mean_msi_px": float(tre["mean_px"])}  # fmt: skip


def run_demo(config, out_dir, *, workdir=None, overwrite: bool = False) -> dict[str, Any]:
  """Runs the whole demo (stages 1-4 of the module docstring) into `out_dir`; returns the summary written.

  Args:
    config: `experiments/configs/demo.py`'s config (a pix2pix training config with a `demo` section).
    out_dir: the report folder (new or empty, or one msisynth wrote with `overwrite`).
    workdir: the generator's training folder; None for `out_dir/generator`. A finished run there is reused.
    overwrite: write into an existing report folder msisynth created (the generator workdir is kept and reused).

  Raises:
    ConfigError: an unknown slide name.
    OutputExistsError: `out_dir` is not empty and `overwrite` is False, or msisynth did not create it.
  """
  from msisynth import datasets, pipeline, synthesize
  from msisynth import train as train_lib

  train_lib.quiet_orbax_logs()
  slides = {p.stem: p for p in datasets.list_he_slides()}
  demo = config.demo
  for name in [demo.test_slide, demo.val_slide, *demo.train_slides]:
    if name not in slides:
      raise errors.ConfigError(f"unknown slide {name!r}; shipped slides: {', '.join(sorted(slides))}")
  out = outputs.prepare_output_dir(out_dir, overwrite=overwrite, owner="experiments.demo")
  workdir = pathlib.Path(workdir) if workdir else out / "generator"
  msi_px, he_px = float(config.data.msi_pixel_size_um), held_out_histology_pixel_size_um(config)
  t0 = time.perf_counter()
  summary = {"note": "Stages 2-3 use real H&E with SIMULATED MSI (semi-synthetic); stage 1 uses real MSI.",
             "histology_pixel_size_um_assumed": float(config.data.histology_pixel_size_um),
             "msi_pixel_size_um": msi_px}  # fmt: skip

  _stage("1. Real MSI: read, preprocess, PCA")
  summary["real_msi"] = explore_real_msi(out)

  _stage("2. Train a small pix2pix generator on semi-synthetic pairs (simulated MSI from real H&E)")
  train_generator(config, workdir, slides)

  _stage(f"3. Register the held-out slide {demo.test_slide} (simulated MSI with a known misalignment)")
  sim, paths = simulate_test_section(out, slides[demo.test_slide], config)
  section_out = out / "section"
  if overwrite and outputs.is_own_dir(section_out):
    shutil.rmtree(section_out)
  inputs = pipeline.SectionInputs(msi=paths["imzml"], histology=paths["he"], msi_pixel_size_um=msi_px,
                                  histology_pixel_size_um=he_px, landmarks=paths["landmarks"], simulated=True)
  result = pipeline.process_section(inputs, synthesize.load_synthesizer(workdir), out_dir=section_out)
  summary["synthetic_to_real"] = result.metrics
  summary["direct_multimodal"] = direct_multimodal(sim, he_px, msi_px)
  summary["runtime_s"] = round(time.perf_counter() - t0, 1)
  write_demo_report(out, summary)
  print(f"\nReport: {out.resolve() / REPORT}  ({summary['runtime_s']:.0f} s)")
  return summary


def _tre(metrics: Mapping[str, Any]) -> str:
  tre = metrics.get("tre") or {}
  return f"{tre['mean_um']:.1f} µm ({tre['mean_px']:.2f} MSI px)" if "mean_um" in tre else "n/a"


def _value(value, spec: str = ".3f") -> str:
  return "n/a" if value is None else f"{value:{spec}}"


def write_demo_report(out: pathlib.Path, summary: Mapping[str, Any]) -> None:
  """Writes `demo_metrics.json` and `report.md` (the two routes side by side) into `out`."""
  syn, direct = summary["synthetic_to_real"], summary["direct_multimodal"]
  outputs.atomic_write_json(out / METRICS, summary)
  lines = [
    "# msisynth demo report",
    "",
    "Stage 1 uses real MSI. Stages 2-3 use **real H&E with simulated MSI** (semi-synthetic data): the numbers "
    "below are on simulated MSI.",
    "",
    "## Real MSI",
    "",
    "- PCA of the msiFlow UPEC_12 ion images: `msi_pca.png`; ion images: `msi_ion_images.png`.",
    "",
    "## Registration of the held-out slide (simulated MSI, known misalignment)",
    "",
    "| route | registration MI (Parzen, bits) | TRE (mean) | converged |",
    "|---|---|---|---|",
    f"| synthetic H&E → real H&E (unimodal, msisynth) | {_value(syn.get('registration_metric'))} | {_tre(syn)} | "
    f"{syn.get('converged')} |",
    f"| MSI TIC image → H&E (direct, multimodal MI) | {_value(direct['registration_metric'])} | "
    f"{direct['tre_mean_um']:.1f} µm ({direct['tre_mean_msi_px']:.2f} MSI px) | {direct['converged']} |",
    "",
    "Both routes register the same H&E with the same starts (flips and 90° turns included). The MI is the value "
    "each registration maximised: of the synthetic route between H&E and synthetic H&E, of the direct route "
    "between H&E and the TIC image, so only the TRE compares across rows. The simulated TIC image shows the "
    "tissue outline clearly, which MI can use directly; whether the direct route does as well on real MSI is not "
    "tested by this demo.",
    f"The synthetic route's evaluation MI (hard histogram, bits, `section/metrics.json`): "
    f"{_value(syn.get('mi_before'))} before, {_value(syn.get('mi_after'))} after registration.",
    "",
    "Section outputs (figures, transform JSON/ITK, MSI cube in histology space): `section/` — see "
    "`section/report.md`.",
    "",
    f"Runtime: {summary['runtime_s']:.0f} s.",
  ]
  outputs.atomic_write(out / REPORT, "\n".join(lines) + "\n")
