"""Shared test fixtures: the shipped real data and small generated inputs."""

import os
import pathlib

import pytest

# Tests run on the CPU, whatever the machine has, and use little memory.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _snapshot(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
  files = (p for p in folder.rglob("*") if p.is_file())
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="session")
def shipped_data() -> pathlib.Path:
  """The shipped real data folder (`msisynth.datasets.data_dir()`: the repository's data/ unless MSISYNTH_DATA
  is set). Tests must never write into it; the session fails if any file in it changed."""
  from msisynth import datasets

  path = datasets.data_dir()
  before = _snapshot(path)
  yield path
  after = _snapshot(path)
  changed = sorted(set(before) ^ set(after) | {k for k in before.keys() & after.keys() if before[k] != after[k]})
  assert not changed, f"tests wrote into the shipped data folder {path}: {changed[:10]}"


@pytest.fixture(scope="session")
def shared_data(shipped_data) -> pathlib.Path:
  """Another name of `shipped_data`, kept for existing tests."""
  return shipped_data


def pytest_configure(config):
  config.addinivalue_line("markers", "notebooks: executes the colab/*.ipynb notebooks in small-settings mode")
