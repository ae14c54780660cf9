"""Checks shared by several test files."""

import pytest

from msisynth import errors


def assert_refused_naming_the_file(read, path, content: str, match: str, error=errors.DataError) -> None:
  """Writes `content` to `path` and checks that `read(path)` raises `error`, matching `match` and naming the file."""
  path.write_text(content)
  with pytest.raises(error, match=match) as info:
    read(path)
  assert str(path) in str(info.value)
