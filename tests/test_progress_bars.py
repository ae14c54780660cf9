"""Progress bars on the long commands (msisynth.progress): shown when enabled, silent otherwise."""

import numpy as np
import pytest

from msisynth import progress, simulate, synthesize, train


@pytest.fixture
def bars():
  progress.set_enabled(True)
  yield
  progress.set_enabled(None)


def _synthesize():
  x = np.zeros((40, 40, 2), np.float32)
  return synthesize.synthesize_tiled(lambda t: t[..., :1], x, tile_size=16, overlap=4, batch_size=2)


def test_tiled_synthesis_shows_a_bar(bars, capsys):
  out = _synthesize()
  assert out.shape == (40, 40, 1)
  assert "synthesising tiles" in capsys.readouterr().err


def test_simulation_shows_a_bar(bars, capsys):
  he = np.full((40, 40, 3), 0.9, np.float32)
  he[10:30, 10:30] = (0.6, 0.3, 0.6)
  simulate.simulate_msi(0, he, histology_pixel_size_um=5.0, msi_pixel_size_um=20.0, n_channels=20)
  assert "simulating MSI channels" in capsys.readouterr().err


def test_no_bar_when_disabled(capsys):
  progress.set_enabled(False)
  try:
    _synthesize()
  finally:
    progress.set_enabled(None)
  assert "synthesising" not in capsys.readouterr().err


def test_training_eta_format():
  assert train._format_eta(3725.4) == "1:02:05"
  assert train._format_eta(None) == "?" and train._format_eta(float("inf")) == "?"
