"""What every launcher in `experiments/` shares: one-line errors, `--overwrite`, `--noprogress`, count checks.

A launcher's `main` is run through `run(main)`: msisynth's own errors (bad input, bad options, an output that
exists) and bad flag values print one line naming the problem and exit with status 2; the traceback shows only
with `--verbosity=1` or higher. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

from msisynth import errors, progress

OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Write into a non-empty output folder that msisynth created (never one it did not create)."
)
NOPROGRESS = flags.DEFINE_bool("noprogress", False, "No progress bars (they are also off when not on a terminal).")


def check_positive(name: str, value: int | float | None, *, allow_none: bool = False) -> None:
  """Raises ConfigError unless `value` (the flag or option `name`) is > 0."""
  if value is None and allow_none:
    return
  if value is None or value <= 0:
    raise errors.ConfigError(f"--{name} must be > 0, got {value}")


def _wrap(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  def wrapped(argv: list[str]) -> object:
    if NOPROGRESS.value:
      progress.set_enabled(False)
    try:
      return main(argv)
    except (errors.MSISynthError, flags.ValidationError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
      if logging.get_verbosity() >= logging.DEBUG or flags.FLAGS["verbosity"].value >= 1:
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped


def run(main: Callable[[list[str]], object]) -> None:
  """`absl.app.run(main)` with one-line errors for the user's mistakes (see the module docstring)."""
  app.run(_wrap(main))
