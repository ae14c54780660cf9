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


def one_line(error: BaseException) -> str:
  """`error`'s message on one line: its first line, and its last when there are more (a wrapped traceback)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _verbose_requested(argv: list[str]) -> bool:
  # Before the flags are parsed, look for --verbosity / -v with a value >= 1 ourselves.
  for i, arg in enumerate(argv[1:], 1):
    for name in ("--verbosity", "-v"):
      if arg.startswith(name + "="):
        value = arg.split("=", 1)[1]
      elif arg == name and i + 1 < len(argv):
        value = argv[i + 1]
      else:
        continue
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config file (unknown variant, unknown field) as one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, errors.MSISynthError, AttributeError, KeyError, ValueError, OSError) as e:
    if _verbose_requested(argv):
      raise
    message = one_line(e)
    if isinstance(e, AttributeError | KeyError):  # ml_collections: an override of a field the config lacks
      name = str(e).strip("\"'")
      given = [arg for arg in argv[1:] if arg.startswith("--") and name in arg.split("=", 1)[0]]
      message = f"unknown config field {name!r}" + (f" in {given[0]}" if given else "")
    print(f"error: bad flag: {message} (pass --helpshort for the flags, --verbosity=1 for a traceback)",
          file=sys.stderr)
    sys.exit(2)


# What a user's mistake raises: msisynth's errors, bad flag values, and files that are missing or not readable
# (a config file that failed to load raises OSError when first used).
_USER_ERRORS = (errors.MSISynthError, flags.ValidationError, OSError)


def _wrap(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  def wrapped(argv: list[str]) -> object:
    if NOPROGRESS.value:
      progress.set_enabled(False)
    try:
      return main(argv)
    except _USER_ERRORS as e:
      if logging.get_verbosity() >= logging.DEBUG or flags.FLAGS["verbosity"].value >= 1:
        raise
      print(f"error: {one_line(e)}", file=sys.stderr)
      sys.exit(2)

  return wrapped


def run(main: Callable[[list[str]], object]) -> None:
  """`absl.app.run(main)` with one-line errors for the user's mistakes (see the module docstring)."""
  app.run(_wrap(main), flags_parser=_parse_flags)
