"""Tests of msisynth.pipeline: one section from imzML and H&E files to a registered report folder.

The sections are semi-synthetic (`simulated_sections`): a crop of a shipped real H&E scan with MSI simulated from
it under a known transform and written as imzML; accuracy is checked with a "perfect synthesizer" that returns the
known H&E resampled on the MSI grid.
"""

import json
import pathlib

import numpy as np
import pytest
from simulated_sections import CROP, HE_PX, MSI_PX, READ, REGISTRATION, he_crop, perfect_synthesizer, write_section

from msisynth import errors, outputs, pipeline
from msisynth import io as msi_io
from msisynth.geometry.transforms import warp_msi
from msisynth.types import MSIImage

REGIONS = {
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "geometry": {"type": "Polygon", "coordinates": [[[8, 8], [50, 8], [50, 40], [8, 40], [8, 8]]]},
      "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
    },
    {
      "type": "Feature",
      "geometry": {"type": "Polygon", "coordinates": [[[58, 40], [104, 40], [104, 78], [58, 78], [58, 40]]]},
      "properties": {"objectType": "annotation", "classification": {"name": "Normal", "color": [0, 150, 0]}},
    },
  ],
}


@pytest.fixture(scope="module")
def sections(shared_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("sections")
  sims = {
    "shifted": write_section(root / "shifted", he_crop(shared_data, (0, 0)), mirrored=False, seed=0),
    "mirrored": write_section(root / "mirrored", he_crop(shared_data, (10, 20)), mirrored=True, seed=1),
  }
  (root / "regions.geojson").write_text(json.dumps(REGIONS))
  return root, sims


def _inputs(root: pathlib.Path, section: str, **kwargs) -> pipeline.SectionInputs:
  folder = root / section
  return pipeline.SectionInputs(
    msi=folder / "simulated_msi.imzML",
    histology=folder / "he.png",
    histology_pixel_size_um=HE_PX,
    read_options=READ,
    simulated=True,
    **kwargs,
  )


def test_process_section_writes_a_complete_report(sections, tmp_path):
  root, sims = sections
  sim = sims["shifted"]
  out = tmp_path / "report"
  inputs = _inputs(
    root, "shifted", regions=root / "regions.geojson", landmarks=root / "shifted" / "landmarks.csv", name="shifted"
  )
  result = pipeline.process_section(inputs, perfect_synthesizer, registration_config=REGISTRATION, out_dir=out)

  # Every file of the report is there, and nothing else.
  assert sorted(p.name for p in out.iterdir()) == sorted([*pipeline.REPORT_FILES.values(), outputs.MARKER])
  assert set(result.paths) == set(pipeline.REPORT_FILES)

  # The transform: finite, orientation-preserving here, and accurate (the synthesizer is perfect).
  matrix = np.asarray(result.transform.matrix, np.float64)
  assert np.all(np.isfinite(matrix)) and np.linalg.det(matrix[:2, :2]) > 0.5
  assert not result.registration["mirrored"]
  assert result.tre["n"] == len(sim.landmarks) and result.tre["mean_px"] < 0.5
  saved = json.loads((out / "transform.json").read_text())
  np.testing.assert_allclose(saved["matrix_fixed_to_moving_um"], matrix, atol=1e-6)
  assert (out / "transform.tfm").read_text().startswith("#Insight Transform File")

  # The MSI cube in histology space: the working grid (= the H&E here, MSI pixel / 4 = 15 µm) and every channel.
  cube = np.load(out / "msi_in_histology_space.npy", mmap_mode="r")
  mz = np.load(out / "mz.npy")
  msi = msi_io.read_imzml(root / "shifted" / "simulated_msi.imzML", **READ)
  assert cube.shape == (*CROP, msi.num_channels) and cube.dtype == np.float32
  np.testing.assert_array_equal(mz, msi.mz)
  mask = np.load(out / "msi_mask_in_histology_space.npy")
  assert mask.dtype == bool and mask.shape == CROP and mask.mean() > 0.9
  # It is the MSI resampled through the transform (all channels, chunked to disk).
  expected = warp_msi(msi, result.transform, CROP, HE_PX)
  np.testing.assert_allclose(cube, expected.cube, rtol=1e-5, atol=1e-4)
  # Carried through the found transform, some channel follows the H&E tissue closely (as it was simulated to).
  tissue = msi_io.tissue_mask(sim.he)[mask].astype(np.float64)
  values = np.asarray(cube)[mask].astype(np.float64)
  values = values[:, values.std(axis=0) > 0]
  correlation = [abs(np.corrcoef(tissue, v)[0, 1]) for v in values.T]
  assert max(correlation) > 0.6

  # Regions: both are on the MSI grid, with statistics and a differential-ion table.
  assert set(result.region_names.values()) == {"Tumor", "Normal"}
  table = (out / "region_table.csv").read_text().splitlines()
  assert table[0].startswith("region,mz,mean,median,std,n_pixels")
  assert {line.split(",")[0] for line in table[1:]} == {"Tumor", "Normal"}
  assert len(table) - 1 == 2 * msi.num_channels
  assert all(n >= pipeline.MIN_REGION_PIXELS for n in result.region_stats.n_pixels)
  assert result.differential is not None and len(result.differential) == msi.num_channels
  labels = np.load(out / "region_labels_msi.npy")
  assert labels.shape == msi.shape and set(np.unique(labels)) == {0, 1, 2}

  # Metrics and the report say the data are simulated and give the key numbers.
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["simulated"] is True and metrics["section"] == "shifted"
  assert metrics["mi_after"] > metrics["mi_before"]
  assert metrics["converged"] in (True, False) and metrics["uncertainty_um"] >= 0
  assert metrics["regions"]["n_regions"] == 2 and metrics["tre"]["mean_um"] < 0.5 * MSI_PX
  assert set(metrics["timing_s"]) >= {"read MSI", "synthesise H&E", "register", "total"}
  report = (out / "report.md").read_text()
  assert report.splitlines()[0] == "# Section shifted: MSI → histology registration (simulated)"
  for name in pipeline.REPORT_FILES.values():
    assert f"`{name}`" in report


def test_mirrored_section_in_memory_at_another_output_pixel_size(sections, tmp_path):
  root, sims = sections
  sim = sims["mirrored"]
  chunk = CROP[0] // 2 * CROP[1] // 2 * 4 * 100  # 100 channels of the output grid per chunk: several chunks
  result = pipeline.process_section(
    _inputs(root, "mirrored"),
    perfect_synthesizer,
    registration_config=REGISTRATION,
    output_pixel_size_um=2 * HE_PX,
    max_chunk_bytes=chunk,
  )
  assert result.paths == {}
  # Flips are searched by default: the mirror is found.
  assert result.registration["mirrored"] and np.linalg.det(np.asarray(result.transform.linear)) < 0
  landmarks = sim.landmarks
  mapped = np.asarray(result.transform.apply(landmarks[:, :2]))
  assert np.mean(np.linalg.norm(mapped - landmarks[:, 2:], axis=1)) < 0.5 * MSI_PX
  # The cube sits on a 30 µm grid over the same field of view, and equals one warp of the whole cube.
  assert result.output_shape == (CROP[0] // 2, CROP[1] // 2) and result.output_pixel_size_um == (30.0, 30.0)
  msi = msi_io.read_imzml(root / "mirrored" / "simulated_msi.imzML", **READ)
  assert result.msi_in_histology.shape == (*result.output_shape, msi.num_channels)
  whole = warp_msi(msi, result.transform, result.output_shape, 2 * HE_PX)
  np.testing.assert_allclose(result.msi_in_histology, whole.cube, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(result.msi_mask_in_histology, whole.mask)
  assert result.simulated and result.metrics["simulated"]
  assert result.synthetic_he.shape == (*msi.shape, 3)

  # The report of an in-memory result can be written afterwards.
  paths = pipeline.write_section_report(result, tmp_path / "later", figures=False)
  assert np.load(paths["msi_in_histology_space"]).shape == result.msi_in_histology.shape
  assert "region_table" not in paths and "checkerboard_after" not in paths and "transform_tfm" in paths
  np.testing.assert_allclose(msi_io.read_histology(paths["synthetic_he"]), result.synthetic_he, atol=1 / 255)


def test_without_carry_msi_no_dense_cube_is_computed_or_written(sections, tmp_path):
  root, _ = sections
  out = tmp_path / "report"
  result = pipeline.process_section(
    _inputs(root, "shifted"), perfect_synthesizer, registration_config=REGISTRATION, out_dir=out, figures=False,
    carry_msi=False,
  )
  assert result.msi_in_histology is None and "msi_in_histology_space" not in result.paths
  assert not (out / pipeline.REPORT_FILES["msi_in_histology_space"]).exists()
  assert "carry MSI into histology space" not in result.timings_s
  assert json.loads((out / "metrics.json").read_text())["msi_cube_carried"] is False
  assert pipeline.REPORT_FILES["msi_in_histology_space"] not in (out / "report.md").read_text()
  # The mask is the one the full cube would have had.
  msi = msi_io.read_imzml(root / "shifted" / "simulated_msi.imzML", **READ)
  whole = warp_msi(msi, result.transform, result.output_shape, result.output_pixel_size_um)
  np.testing.assert_array_equal(np.load(out / "msi_mask_in_histology_space.npy"), whole.mask)


def test_an_existing_output_folder_is_never_overwritten(sections, tmp_path):
  root, _ = sections
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("my notes")
  with pytest.raises(errors.DataError, match="not empty"):
    pipeline.process_section(_inputs(root, "shifted"), perfect_synthesizer, out_dir=out)
  assert (out / "notes.txt").read_text() == "my notes" and len(list(out.iterdir())) == 1
  (tmp_path / "a_file").write_text("")
  with pytest.raises(errors.DataError, match="is a file"):
    pipeline.process_section(_inputs(root, "shifted"), perfect_synthesizer, out_dir=tmp_path / "a_file")


def test_pixel_sizes_are_required_or_read(sections):
  root, _ = sections
  with pytest.raises(errors.ConfigError, match="histology_pixel_size_um is required"):
    pipeline.SectionInputs(msi=root / "shifted" / "simulated_msi.imzML", histology=root / "shifted" / "he.png")
  msi = msi_io.read_imzml(root / "shifted" / "simulated_msi.imzML", **READ)
  assert msi.pixel_size_um == (MSI_PX, MSI_PX)  # from the imzML metadata
  unknown = MSIImage(cube=msi.cube, mz=msi.mz, mask=msi.mask, pixel_size_um=None)
  with pytest.raises(errors.ConfigError, match="pixel size is not in the file's metadata"):
    pipeline.process_section(
      pipeline.SectionInputs(msi=unknown, histology=root / "shifted" / "he.png", histology_pixel_size_um=HE_PX),
      perfect_synthesizer,
    )


def test_a_synthesizer_of_the_wrong_shape_is_refused(sections):
  root, _ = sections
  with pytest.raises(errors.ConfigError, match=r"must return \(H, W, 3\) RGB on the MSI grid"):
    pipeline.process_section(_inputs(root, "shifted"), lambda msi: np.zeros((4, 4, 3), np.float32))

  # The upsampling factor is read from the synthesizer, never guessed from the shape it returns.
  def upsampled_without_record(msi):
    return np.ones(((msi.shape[0] - 1) * 2 + 1, (msi.shape[1] - 1) * 2 + 1, 3), np.float32)

  with pytest.raises(errors.ConfigError, match="recorded factor u = 1"):
    pipeline.process_section(_inputs(root, "shifted"), upsampled_without_record)


def test_working_pixel_size():
  assert pipeline.working_pixel_size_um(20.0, 0.5) == (5.0, 5.0)  # a quarter of the MSI pixel
  assert pipeline.working_pixel_size_um(20.0, 8.0) == (8.0, 8.0)  # never finer than the H&E
  assert pipeline.working_pixel_size_um((20.0, 40.0), 1.0) == (5.0, 10.0)
  assert pipeline.working_pixel_size_um(20.0, 0.5, registration_pixel_size_um=2.0) == (2.0, 2.0)
  assert pipeline.working_pixel_size_um(20.0, 4.0, registration_pixel_size_um=2.0) == (4.0, 4.0)
  with pytest.raises(errors.ConfigError):
    pipeline.working_pixel_size_um(-1.0, 0.5)


def test_a_synthesizer_on_an_upsampled_grid_registers_at_its_own_pixel_size(sections):
  """Generators trained on upsampled pairs return ((H-1)·u+1, (W-1)·u+1) pixels; the pipeline registers those."""
  root, sims = sections
  sim = sims["shifted"]

  def upsampled_synthesizer(msi: MSIImage) -> np.ndarray:
    return perfect_synthesizer(msi, upsample=2)

  upsampled_synthesizer.upsample = 2  # recorded, as a Synthesizer records its checkpoint's config.data.upsample
  inputs = _inputs(root, "shifted", landmarks=root / "shifted" / "landmarks.csv")
  result = pipeline.process_section(inputs, upsampled_synthesizer, registration_config=REGISTRATION)
  msi_px = result.msi_pixel_size_um
  assert result.synthetic_pixel_size_um == pytest.approx((msi_px[0] / 2, msi_px[1] / 2))
  assert result.synthetic_he.shape[:2] == ((sim.msi.shape[0] - 1) * 2 + 1, (sim.msi.shape[1] - 1) * 2 + 1)
  assert result.tre["mean_px"] < 0.5
