"""Tests of experiments/register_sections.py: a folder of sections in, one report per section and a summary out.

Sections are semi-synthetic (MSI simulated from a crop of a shipped real H&E, written as imzML by
`msisynth.simulate.save_simulated`). Accuracy does not matter here, so most runs use a "perfect synthesizer" (the
known H&E resampled on the MSI grid); one run restores a tiny untrained generator from a real checkpoint through
the command-line flags. Registration uses one pyramid level so that it compiles once for the session.
"""

import concurrent.futures
import csv
import json
import os
import pathlib
import shutil
import types

import numpy as np
import pytest
from absl import flags
from simulated_sections import CROP, HE_PX, MSI_PX, READ, REGISTRATION, he_crop, perfect_synthesizer, write_section

from experiments import register_sections
from msisynth import batch, errors, pipeline, synthesize
from msisynth import io as msi_io
from msisynth.geometry.transforms import AffineTransform

REGISTRATION_FLAGS = [
  "--registration_levels=1",
  "--registration_iterations=40",
  "--registration_samples=2048",
  "--registration_candidates=12",
]


def _rectangle(name, x0, y0, x1, y1):
  ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
  return {
    "type": "Feature",
    "geometry": {"type": "Polygon", "coordinates": [ring]},
    "properties": {"objectType": "annotation", "classification": {"name": name}},
  }


def _regions(*features):
  return json.dumps({"type": "FeatureCollection", "features": list(features)})


@pytest.fixture(scope="module")
def templates(shared_data, tmp_path_factory):
  """Two simulated section folders (shifted; mirrored and shifted) to copy into each test's sections folder."""
  root = tmp_path_factory.mktemp("templates")
  write_section(root / "shifted", he_crop(shared_data, (0, 0)), mirrored=False, seed=0, n_landmarks=8)
  write_section(root / "mirrored", he_crop(shared_data, (10, 20)), mirrored=True, seed=1, n_landmarks=8)
  (root / "regions.geojson").write_text(
    _regions(_rectangle("Tumor", 8, 8, 50, 40), _rectangle("Normal", 58, 40, 104, 78))
  )
  return root


def _copy(templates: pathlib.Path, which: str, dest: pathlib.Path) -> pathlib.Path:
  shutil.copytree(templates / which, dest)
  return dest


def _read_summary(out: pathlib.Path) -> dict[str, dict[str, str]]:
  with open(out / "summary.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == register_sections.SUMMARY_COLUMNS
    return {row["section"]: row for row in reader}


def test_batch_runs_reports_failures_and_resumes(templates, tmp_path):
  sections = tmp_path / "sections"
  _copy(templates, "shifted", sections / "a_shifted")
  (sections / "a_shifted" / "regions.geojson").write_text(
    _regions(_rectangle("Cortex", 10, 10, 60, 50), _rectangle("Medulla", 62, 30, 108, 80))
  )
  _copy(templates, "mirrored", sections / "b_mirrored")
  truncated = _copy(templates, "shifted", sections / "c_truncated")
  ibd = truncated / "simulated_msi.ibd"
  os.truncate(ibd, ibd.stat().st_size // 2)
  blank = _copy(templates, "shifted", sections / "d_blank")
  msi_io.write_image(blank / "he.png", np.ones((*CROP, 3), np.float32), overwrite=True)  # no tissue to register
  out = tmp_path / "out"
  kwargs = dict(
    synthesizer=perfect_synthesizer,
    histology_pixel_size_um=HE_PX,
    regions=templates / "regions.geojson",
    read_options=READ,
    registration_config=REGISTRATION,
    figures=False,  # drawn and checked in test_pipeline; slow on a busy CPU
  )

  rows = {row["section"]: row for row in register_sections.run_batch(sections, out, **kwargs)}
  assert {name: row["status"] for name, row in rows.items()} == {
    "a_shifted": "ok",
    "b_mirrored": "ok",
    "c_truncated": "failed",
    "d_blank": "failed",
  }
  # The truncated file is caught before the long work; the blank H&E fails in registration; the others go on.
  assert "truncated" in rows["c_truncated"]["error"] and rows["c_truncated"]["run"] == "not run"
  assert rows["d_blank"]["error"].startswith("RegistrationError") and rows["d_blank"]["run"] == "this run"
  # Each section's own regions win over the global ones; the mirror is found.
  assert rows["a_shifted"]["n_regions"] == 2 and rows["b_mirrored"]["n_regions"] == 2
  assert "mirror" in rows["b_mirrored"]["start"] and rows["b_mirrored"]["mirrored"] is True
  assert rows["b_mirrored"]["tre_mean_px"] < 0.5 and rows["a_shifted"]["simulated"] is True
  metrics_a = json.loads((out / "a_shifted" / "metrics.json").read_text())
  assert metrics_a["regions"]["names"] == ["Cortex", "Medulla"] and metrics_a["simulated"] is True

  summary = _read_summary(out)
  assert list(summary) == ["a_shifted", "b_mirrored", "c_truncated", "d_blank"]
  assert summary["a_shifted"]["status"] == "ok" and float(summary["a_shifted"]["mi_after"]) > 0
  assert summary["d_blank"]["status"] == "failed" and "RegistrationError" in summary["d_blank"]["error"]
  md = (out / "summary.md").read_text()
  assert "2 of 4 sections registered; 2 failed." in md and "simulated" in md.splitlines()[0]
  for name in ("a_shifted", "b_mirrored"):
    done = json.loads((out / name / register_sections.DONE_MARKER).read_text())
    assert done["summary"]["status"] == "ok" and "report.md" in done["files"]
    assert (out / name / "msi_in_histology_space.npy").is_file()
  # Nothing is left under a failed section's name, nor any temporary folder.
  assert sorted(p.name for p in out.iterdir()) == [
    ".msisynth",
    "a_shifted",
    "b_mirrored",
    "batch.json",
    "summary.csv",
    "summary.md",
  ]

  # Interrupt b (its marker is gone) and leave a temporary folder behind, then run again: a is skipped,
  # b is redone and moved into place, the leftover is cleaned.
  stamp = {p.name: p.stat().st_mtime_ns for p in (out / "a_shifted").iterdir()}
  (out / "b_mirrored" / register_sections.DONE_MARKER).unlink()
  (out / "b_mirrored" / "stale.txt").write_text("from the interrupted run")
  leftover = out / ".a_shifted.partial-0000dead"
  leftover.mkdir()
  (leftover / "transform.json").write_text("{}")

  rows = {row["section"]: row for row in register_sections.run_batch(sections, out, **kwargs)}
  assert rows["a_shifted"]["run"] == "earlier" and rows["b_mirrored"]["run"] == "this run"
  assert rows["a_shifted"]["status"] == rows["b_mirrored"]["status"] == "ok"
  assert {p.name: p.stat().st_mtime_ns for p in (out / "a_shifted").iterdir()} == stamp
  assert (out / "b_mirrored" / register_sections.DONE_MARKER).is_file()
  assert not (out / "b_mirrored" / "stale.txt").exists() and not leftover.exists()
  summary = _read_summary(out)
  assert (
    summary["a_shifted"]["run"] == "earlier"
    and summary["a_shifted"]["mi_after"] == f"{rows['a_shifted']['mi_after']:.6g}"
  )
  assert summary["c_truncated"]["status"] == "failed"


def _tiny_checkpoint(workdir: pathlib.Path, imzml: pathlib.Path) -> None:
  """A tiny untrained U-Net checkpoint with a preprocessor fitted on the section as the launcher reads it."""
  from experiments.configs import common
  from msisynth import checkpoint, preprocess, train

  msi = msi_io.read_imzml(imzml, **READ)
  strong = msi.mz[msi.cube.reshape(-1, msi.num_channels).sum(axis=0) > 0][:3]
  preprocessor = preprocess.MSIPreprocessor(
    preprocess.PreprocessConfig(channels="mz", mz_values=strong, tol=0.1, tol_unit="da", reduction="none")
  ).fit(msi)
  config = common.make_tiny(common.get_base_config("unet"))
  state = train.create_train_state(0, config, (32, 32, preprocessor.num_output_channels))
  checkpoint.save(workdir, state, config=config, preprocessor=preprocessor.to_dict())


def _flags(*argv) -> flags.FlagValues:
  fv = flags.FlagValues()
  register_sections.define_flags(fv)
  fv(["register_sections", *argv])
  return fv


def test_command_line_with_a_checkpoint(templates, tmp_path):
  sections = tmp_path / "sections"
  section = _copy(templates, "shifted", sections / "only")
  (section / "section.json").write_text(json.dumps({"histology_pixel_size_um": HE_PX, "simulated": True}))
  workdir = tmp_path / "generator"
  _tiny_checkpoint(workdir, section / "simulated_msi.imzML")
  out = tmp_path / "out"
  argv = [
    f"--sections={sections}",
    f"--checkpoint={workdir}",
    f"--output_dir={out}",
    "--bin_width=1",
    "--bin_unit=da",
    "--nofigures",
  ]
  assert register_sections.run_from_flags(_flags(*argv, *REGISTRATION_FLAGS)) == 0
  summary = _read_summary(out)
  assert summary["only"]["status"] == "ok" and summary["only"]["simulated"] == "True"
  synthetic = msi_io.read_histology(out / "only" / "synthetic_he.png")
  msi = msi_io.read_imzml(section / "simulated_msi.imzML", **READ)
  # The restored generator ran on the MSI grid upsampled like its training pairs (config.data.upsample).
  u = synthesize.load_synthesizer(workdir).upsample
  assert synthetic.shape == ((msi.shape[0] - 1) * u + 1, (msi.shape[1] - 1) * u + 1, 3)
  assert np.load(out / "only" / "msi_in_histology_space.npy", mmap_mode="r").shape == (*CROP, msi.num_channels)
  # Run again: nothing to do, exit status 0.
  assert register_sections.run_from_flags(_flags(*argv)) == 0
  assert _read_summary(out)["only"]["run"] == "earlier"


def test_problems_are_reported_together_before_any_work(templates, tmp_path):
  sections = tmp_path / "sections"
  _copy(templates, "shifted", sections / "good")
  two = _copy(templates, "shifted", sections / "two_imzml")
  shutil.copy(two / "simulated_msi.imzML", two / "other.imzML")
  shutil.copy(two / "simulated_msi.ibd", two / "other.ibd")
  (_copy(templates, "shifted", sections / "no_he") / "he.png").unlink()
  own = _copy(templates, "shifted", sections / "own_pixel_size")
  (own / "section.json").write_text(json.dumps({"histology_pixel_size_um": 15}))
  bad_json = _copy(templates, "shifted", sections / "bad_json")
  (bad_json / "section.json").write_text(json.dumps({"histology_pixel_size": 15}))

  with pytest.raises(errors.DataError) as info:
    register_sections.run_batch(sections, tmp_path / "out", validate_only=True)
  message = str(info.value)
  assert "two_imzml: 2 .imzML files" in message
  assert "no_he: no histology image" in message
  assert "good: unknown histology pixel size" in message
  assert "unknown keys ['histology_pixel_size']" in message
  assert "own_pixel_size" not in message  # section.json gave its pixel size
  assert not (tmp_path / "out").exists()

  plans = {p.name: p for p in register_sections.find_sections(sections, histology_pixel_size_um=HE_PX)}
  assert plans["good"].ok and plans["good"].msi_pixel_size_um == (MSI_PX, MSI_PX)  # from the imzML metadata
  assert plans["good"].simulated is True  # from ground_truth.json
  assert plans["own_pixel_size"].histology_pixel_size_um == 15.0
  assert not plans["two_imzml"].ok and not plans["no_he"].ok
  # The command line says so with exit status 2.
  assert register_sections.run_from_flags(_flags(f"--sections={sections}", "--validate_only")) == 2


def test_flags_reach_the_pipeline_and_foreign_output_is_kept(templates, tmp_path, monkeypatch):
  sections = tmp_path / "sections"
  _copy(templates, "shifted", sections / "s1")
  calls = []

  def fake_process_section(inputs, synthesizer, *, out_dir, **options):
    calls.append((inputs, options))
    pathlib.Path(out_dir).mkdir()
    (pathlib.Path(out_dir) / "report.md").write_text("report")
    return types.SimpleNamespace(metrics={"simulated": True, "mi_after": 1.0}, paths={"report": out_dir / "report.md"})

  monkeypatch.setattr(pipeline, "process_section", fake_process_section)
  monkeypatch.setattr(batch, "load_synthesizer", lambda checkpoint, which: "synthesizer")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "my_notes.txt").write_text("keep me")
  out = tmp_path / "out"
  argv = [
    f"--sections={sections}",
    f"--checkpoint={tmp_path}",
    f"--output_dir={out}",
    "--histology_pixel_size_um=2.5",
    "--msi_pixel_size_um=50",
    f"--regions={templates / 'regions.geojson'}",
    "--no_flips",
    "--bin_width=5",
    "--mz_range=450,950",
    "--output_pixel_size_um=10",
    "--registration_levels=2",
  ]
  # A folder msisynth did not create is refused, even with --overwrite, and left as it was.
  for extra in ([], ["--overwrite"]):
    assert register_sections.run_from_flags(_flags(*argv, f"--output_dir={foreign}", *extra)) == 2
  assert sorted(p.name for p in foreign.iterdir()) == ["my_notes.txt"] and not calls

  assert register_sections.run_from_flags(_flags(*argv)) == 0
  ((inputs, options),) = calls
  assert inputs.histology_pixel_size_um == (2.5, 2.5) and inputs.msi_pixel_size_um == (50.0, 50.0)
  assert inputs.regions == templates / "regions.geojson" and inputs.name == "s1"
  assert inputs.read_options == {"bin_width": 5.0, "bin_unit": "ppm", "mz_range": (450.0, 950.0)}
  assert options["flips"] is False and options["output_pixel_size_um"] == 10.0 and options["figures"] is True
  assert options["registration_config"].levels == 2
  assert (foreign / "my_notes.txt").read_text() == "keep me" and (out / "s1" / "DONE.json").is_file()


def test_shards_split_the_sections_and_merge(templates, tmp_path, monkeypatch):
  sections = tmp_path / "sections"
  for name in ("s0", "s1", "s2", "s3", "s4"):
    _copy(templates, "shifted", sections / name)

  def fake_process_section(inputs, synthesizer, *, out_dir, **options):
    pathlib.Path(out_dir).mkdir()
    (pathlib.Path(out_dir) / "report.md").write_text(inputs.name)
    metrics = {"simulated": True, "mi_after": float(inputs.name[1:]), "converged": True}
    return types.SimpleNamespace(metrics=metrics, paths={"report": out_dir / "report.md"})

  monkeypatch.setattr(pipeline, "process_section", fake_process_section)
  out = tmp_path / "out"
  kwargs = dict(synthesizer=lambda msi: None, histology_pixel_size_um=HE_PX, read_options=READ)
  # The two shards run at the same time into one new folder: they need no order and no coordination.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {shard: pool.submit(register_sections.run_batch, sections, out, shard=shard, **kwargs) for shard in
               ("0/2", "1/2")}  # fmt: skip
    ran = {shard: [row["section"] for row in future.result()] for shard, future in futures.items()}
  assert ran == {"0/2": ["s0", "s2", "s4"], "1/2": ["s1", "s3"]}
  assert not (out / "summary.csv").exists()
  assert (out / "summary.shard-0-of-2.csv").is_file() and (out / "batch.shard-1-of-2.json").is_file()

  # The merge step, from the command line.
  assert register_sections.run_from_flags(_flags("--merge", f"--output_dir={out}")) == 0
  summary = _read_summary(out)
  assert list(summary) == ["s0", "s1", "s2", "s3", "s4"]
  assert [float(row["mi_after"]) for row in summary.values()] == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert "5 of 5 sections registered" in (out / "summary.md").read_text()
  # A shard run again resumes: its sections are done.
  rows = register_sections.run_batch(sections, out, shard="0/2", **kwargs)
  assert {row["run"] for row in rows} == {"earlier"}
  with pytest.raises(errors.ConfigError, match="shard"):
    register_sections.run_batch(sections, out, shard="2/2", **kwargs)


def test_exports_beside_the_report(templates, tmp_path):
  import spatialdata
  import tifffile

  sections = tmp_path / "sections"
  _copy(templates, "mirrored", sections / "m")
  out = tmp_path / "out"
  rows = register_sections.run_batch(
    sections,
    out,
    synthesizer=perfect_synthesizer,
    histology_pixel_size_um=HE_PX,
    regions=templates / "regions.geojson",
    read_options=READ,
    registration_config=REGISTRATION,
    figures=False,
    output_format=["spatialdata", "ome_tiff", "geojson"],
    export_options={"n_segments": 3},
  )
  assert rows[0]["status"] == "ok", rows[0]["error"]
  folder = out / "m"
  assert not (folder / "msi_in_histology_space.npy").exists()  # "npy" was not asked for
  assert json.loads((folder / "metrics.json").read_text())["msi_cube_carried"] is False  # nor computed
  assert "msi_in_histology_space.npy" not in (folder / "report.md").read_text()
  sdata = spatialdata.read_zarr(folder / "section.zarr")
  assert {"histology", "msi"} <= set(sdata.images) and "regions" in sdata.shapes
  truth = AffineTransform.from_matrix(json.loads((folder / "transform.json").read_text())["matrix_fixed_to_moving_um"])
  from spatialdata import transformations as st

  between = st.get_transformation_between_coordinate_systems(
    sdata, "histology", "msi", intermediate_coordinate_systems=sdata.images["histology"]
  )
  matrix = np.asarray(between.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
  np.testing.assert_allclose(matrix, np.asarray(truth.matrix, np.float64), atol=1e-5)
  with tifffile.TiffFile(folder / "ion_images.ome.tif") as tif:
    assert tif.series[0].shape[1:] == CROP
  assert len(json.loads((folder / "msi_segments.geojson").read_text())["features"]) == 3
  done = json.loads((folder / register_sections.DONE_MARKER).read_text())
  assert {"section.zarr", "ion_images.ome.tif", "msi_segments.geojson"} <= set(done["files"])


def test_batch_shows_a_progress_bar(templates, tmp_path, monkeypatch, capsys):
  from msisynth import progress

  _copy(templates, "shifted", tmp_path / "sections" / "s")

  def fake_process_section(inputs, synthesizer, *, out_dir, **options):
    pathlib.Path(out_dir).mkdir()
    return types.SimpleNamespace(metrics={"mi_after": 1.0}, paths={})

  monkeypatch.setattr(pipeline, "process_section", fake_process_section)
  progress.set_enabled(True)
  try:
    rows = register_sections.run_batch(
      tmp_path / "sections", tmp_path / "out", synthesizer=lambda msi: None, histology_pixel_size_um=HE_PX
    )
  finally:
    progress.set_enabled(None)
  assert rows[0]["status"] == "ok" and "registering sections" in capsys.readouterr().err
