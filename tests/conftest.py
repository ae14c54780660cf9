"""Shared test fixtures: the shipped real data and small generated inputs."""

import os
import pathlib

import pytest

# Tests run on the CPU, whatever the machine has, and use little memory.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The shipped real data folder (../shared/data); tests must never write into it."""
  path = pathlib.Path(os.environ.get("MSISYNTH_DATA", REPO.parent / "shared" / "data"))
  if not path.is_dir():
    pytest.skip(f"shipped data not found at {path}")
  return path


def pytest_configure(config):
  config.addinivalue_line("markers", "notebooks: executes the colab/*.ipynb notebooks in small-settings mode")
