"""End-to-end test of the evaluation launcher (experiments/evaluate.py) at its tiny size, plus its pure helpers.

The tiny simulated setting trains pix2pix and the U-Net two steps each on one reduced slide (simulated MSI), scores
both on a held-out slide synthesised whole, and registers one misaligned simulated acquisition by the synthetic
H&E route and the direct MSI routes.
"""

import json
import math

import numpy as np
import pytest

from experiments import evaluate as ev
from msisynth import errors


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
  out = tmp_path_factory.mktemp("eval_tiny")
  config = ev.load_config("simulated", tiny=True, data_dir=str(shared_data))
  results = ev.run_evaluation(config, out, part="all", command="test")
  return out, config, results


def test_writes_results_json_with_both_models_and_difference(tiny_run):
  out, _, returned = tiny_run
  results = json.loads((out / "results.json").read_text())
  assert results == json.loads(json.dumps(returned))
  assert results["simulated"] is True and results["setting"] == "simulated"
  assert results["training"]["pix2pix"]["status"] == "trained" and results["training"]["unet"]["steps"] == 2
  summary = results["synthesis"]["summary"]
  for metric in ("mi_bits", "ssim", "psnr_db", "nmi"):
    for key in ("unet", "pix2pix", "difference"):
      assert math.isfinite(summary[metric][key]["mean"]), (metric, key)
  (case,) = results["synthesis"]["cases"]
  assert case["case"] == "rcc-UH9905_18" and case["unet"]["n_pixels"] > 100
  assert summary["mi_bits"]["difference"]["mean"] == pytest.approx(case["pix2pix"]["mi_bits"] - case["unet"]["mi_bits"])
  assert 0 <= case["pix2pix"]["mi_bits"] and -1 <= case["pix2pix"]["ssim"] <= 1


def test_writes_markdown_table_and_figures_labelled_simulated(tiny_run):
  out, _, _ = tiny_run
  text = (out / "results.md").read_text()
  assert "| metric | U-Net (L1) | pix2pix | pix2pix − U-Net |" in text
  assert "SIMULATED" in text and "| MI (bits) |" in text and "| SSIM |" in text
  figure = out / "figures" / "synthesis_rcc-UH9905_18.png"
  assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in (out / "figures").glob("registration_*_synthetic.png"))


def test_registration_routes_give_finite_tre(tiny_run):
  _, config, results = tiny_run
  registration = results["registration"]
  assert registration["simulated"] is True
  (case,) = registration["cases"]
  assert case["n_landmarks"] > 10
  for route in ("synthetic", "msi_pca1"):
    entry = case["routes"][route]
    assert entry["error"] is None
    assert math.isfinite(entry["tre_mean_um"]) and math.isfinite(entry["tre_mean_px"])
    assert entry["tre_mean_um"] == pytest.approx(entry["tre_mean_px"] * config.train.data.msi_pixel_size_um)
    assert entry["success"] == (entry["tre_mean_px"] < 2.0)
    assert 0.0 <= registration["summary"][route]["success_rate"] <= 1.0


def test_finished_run_is_loaded_not_retrained(tiny_run):
  out, config, _ = tiny_run
  assert ev._finished_step(out / "pix2pix") == 2
  assert ev._finished_step(out / "nothing_here") is None
  data = ev.EvalData(None, None, None, [], [], [], True, "H&E", {}, {})
  data.paired = type("Paired", (), {"preprocessor": type("P", (), {"to_dict": lambda self: {"x": [1.0]}})()})()
  with pytest.raises(errors.ConfigError, match="other data"):
    ev.train_or_load("pix2pix", ev.model_configs(config)["pix2pix"], out / "pix2pix", data)


def test_model_configs_differ_only_in_the_gan_term():
  config = ev.load_config("msiflow")
  configs = ev.model_configs(config)
  assert configs["pix2pix"].model.gan_weight == 1.0 and configs["unet"].model.gan_weight == 0.0
  assert configs["unet"].model.kind == "unet" and configs["pix2pix"].train.num_steps == 1000
  config = ev.load_config("simulated", steps=10)
  assert ev.model_configs(config)["unet"].optim.decay_steps == 5


def test_summarise_pairs_differences_per_case():
  cases = [
    {"unet": {"mi_bits": 1.0, "nmi": 1.1, "ssim": 0.2, "psnr_db": 10.0},
     "pix2pix": {"mi_bits": 1.5, "nmi": 1.2, "ssim": 0.1, "psnr_db": 11.0}},
    {"unet": {"mi_bits": 2.0, "nmi": 1.3, "ssim": 0.4, "psnr_db": 12.0},
     "pix2pix": {"mi_bits": 2.1, "nmi": 1.2, "ssim": float("nan"), "psnr_db": 13.0}},
  ]  # fmt: skip
  # A NaN metric is an error, never dropped: dropping it would take the means over different case sets.
  with pytest.raises(errors.DataError, match="not finite"):
    ev.summarise(cases)
  cases[1]["pix2pix"]["ssim"] = 0.3
  s = ev.summarise(cases)
  assert s["mi_bits"]["unet"] == {"mean": 1.5, "std": pytest.approx(np.std([1.0, 2.0], ddof=1)), "n": 2}
  assert s["mi_bits"]["difference"]["mean"] == pytest.approx(0.3)
  assert s["ssim"]["pix2pix"]["n"] == 2 and s["ssim"]["difference"]["mean"] == pytest.approx(-0.1)


def test_same_preprocessor_compares_fitted_state():
  a = {"format": "p", "state": {"mean": [1.0, 2.0], "components": [[0.5, 0.5]]}, "config": {"n": 3}}
  b = json.loads(json.dumps(a))
  assert ev._same_preprocessor(a, b)
  b["state"]["mean"][1] = 2.1
  assert not ev._same_preprocessor(a, b)
  assert not ev._same_preprocessor(a, None) and ev._same_preprocessor(None, None)


def test_msiflow_mask_channel_is_softened_once_per_pair_and_lr_is_pix2pix():
  from msisynth.data import Pair, PairedData
  from msisynth.evaluation import paper

  target = np.zeros((20, 20, 3), np.float32)
  target[:, 10:, 2] = 1.0  # the near-binary mask channel
  pair = Pair(name="p", msi=np.zeros((20, 20, 2), np.float32), histology=target, mask=np.ones((20, 20), bool),
              metadata={})  # fmt: skip
  paired = PairedData([pair], [None], [pair], [None], None, "region", {})
  soft = paper.soften_mask_channel(paired, 2.0)
  assert soft.train_pairs[0] is soft.val_pairs[0]
  channel = soft.train_pairs[0].histology[..., 2]
  assert 0 < channel[0, 9] < 1 and np.mean((channel == 0) | (channel == 1)) < 0.7
  np.testing.assert_array_equal(soft.train_pairs[0].histology[..., :2], target[..., :2])
  assert pair.histology[0, 9, 2] == 0.0  # the input is not modified
  assert ev.load_config("msiflow").train.optim.learning_rate == 2e-4
