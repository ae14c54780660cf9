"""Progress bars for long work (reading imzML, simulating, training, synthesising, batch registration).

One switch for the whole library: bars show when standard error is a terminal, and never in CI, in tests or with
`set_enabled(False)` (the launchers' `--noprogress`). The environment variable `MSISYNTH_PROGRESS=0` or `1`
overrides the terminal check. tqdm is used when installed; without it the bars are silently absent.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_ENABLED: bool | None = None  # None: decide from the environment


def set_enabled(enabled: bool | None) -> None:
  """Turns progress bars on (True), off (False), or back to the automatic choice (None)."""
  global _ENABLED
  _ENABLED = enabled


def enabled() -> bool:
  """Whether progress bars show now."""
  if _ENABLED is not None:
    return _ENABLED
  env = os.environ.get("MSISYNTH_PROGRESS")
  if env is not None:
    return env.strip().lower() not in ("0", "false", "no", "off", "")
  if os.environ.get("CI") or "PYTEST_CURRENT_TEST" in os.environ:
    return False
  return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _Null:
  """Stands in for a tqdm bar when bars are off."""

  def __init__(self, iterable=None, **_: Any):
    self._iterable = iterable

  def __iter__(self):
    return iter(self._iterable if self._iterable is not None else ())

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
    del s, refresh

  def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
    del desc, refresh

  def close(self) -> None:
    pass


def _bar(iterable=None, **kwargs: Any):
  if enabled():
    try:
      from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
      return _Null(iterable)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
  return _Null(iterable)


def track(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
  """Iterates over `iterable` with a progress bar labelled `desc`."""
  bar = _bar(iterable, desc=desc, total=total, unit=unit)
  try:
    yield from bar
  finally:
    bar.close()


@contextlib.contextmanager
def bar(*, desc: str, total: int | None = None, unit: str = "it") -> Iterator[Any]:
  """A progress bar to advance by hand: `with bar(desc=..., total=n) as b: ... b.update(k)`."""
  b = _bar(None, desc=desc, total=total, unit=unit)
  try:
    yield b
  finally:
    b.close()
