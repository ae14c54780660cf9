"""Exception types raised by msisynth.

Every error a user can cause with their own data is one of these, and its message names the file (where there
is one) and the problem, so that a failure deep in a pipeline still says which input to fix.
"""

from __future__ import annotations

import os


class MSISynthError(Exception):
  """Base class of every msisynth error."""


class DataError(MSISynthError, ValueError):
  """Input data is malformed, inconsistent or unusable.

  Attributes:
    path: the file the problem is in, or None when the data did not come from a file.
  """

  def __init__(self, message: str, path: str | os.PathLike | None = None):
    self.path = None if path is None else os.fspath(path)
    super().__init__(f"{self.path}: {message}" if self.path else message)


class ImzMLError(DataError):
  """An imzML/ibd pair cannot be read as MSI (missing, truncated, malformed or inconsistent)."""


class ImageReadError(DataError):
  """A histology or microscopy image cannot be read."""


class ConfigError(MSISynthError, ValueError):
  """A configuration or argument combination is invalid (wrong shapes, sizes, options)."""


class TrainingError(MSISynthError, RuntimeError):
  """Training cannot go on (a NaN/Inf loss, a checkpoint that does not match the configuration)."""


class CheckpointError(MSISynthError, RuntimeError):
  """A checkpoint directory is missing, empty, or does not hold what is asked of it."""


class RegistrationError(MSISynthError, RuntimeError):
  """A registration failed or produced a degenerate transform that is refused."""


class OutputExistsError(DataError, ConfigError):
  """An output file or folder exists (or is not msisynth's own) and would be overwritten; nothing was written."""
