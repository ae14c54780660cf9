"""The public API: every name the top level advertises resolves, and `import msisynth` stays light."""

import subprocess
import sys

import pytest

import msisynth


@pytest.mark.parametrize("name", sorted(msisynth._NAME_TO_MODULE))
def test_exported_name_resolves_to_its_module(name):
  module = msisynth._NAME_TO_MODULE[name]
  value = getattr(msisynth, name)
  assert value is getattr(getattr(msisynth, module), name)


def test_unknown_name_raises_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'not_a_function'"):
    msisynth.not_a_function  # noqa: B018


def test_import_does_not_load_jax_or_matplotlib():
  code = "import sys, msisynth; print(int('jax' in sys.modules), int('matplotlib' in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
  assert out == ["0", "0"]


def test_top_level_metric_is_the_evaluation_mi_in_bits():
  import numpy as np

  rng = np.random.default_rng(0)
  image = rng.integers(0, 4, (32, 32)).astype(np.float32) / 3  # four equiprobable-ish levels: about 2 bits
  mi = float(msisynth.mutual_information(image, image, bins=4, value_range=(0, 1)))
  p = np.bincount((image * 3).round().astype(int).ravel(), minlength=4) / image.size
  assert mi == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-4)


def test_register_is_both_the_subpackage_and_callable():
  import numpy as np

  import msisynth.register as package
  from msisynth.register import AffineTransform, RegistrationConfig, register

  assert msisynth.register is package and callable(msisynth.register)
  yy, xx = np.mgrid[:32, :32].astype(np.float32)
  fixed = np.exp(-((xx - 16) ** 2 + (yy - 14) ** 2) / 40.0)
  moving = np.exp(-((xx - 18) ** 2 + (yy - 13) ** 2) / 40.0)
  config = RegistrationConfig(levels=1, max_iterations=20, max_samples=512, kind="rigid")
  kwargs = dict(fixed_pixel_size_um=1.0, moving_pixel_size_um=1.0, config=config)
  result = msisynth.register(fixed, moving, **kwargs)
  assert isinstance(result.transform, AffineTransform)
  np.testing.assert_allclose(result.transform.matrix, register(fixed, moving, **kwargs).transform.matrix)


def test_register_is_callable_whatever_was_imported_first():
  for code in (
    "import msisynth as ms; print(callable(ms.register))",
    "import msisynth.register; import msisynth as ms; print(callable(ms.register))",
    "from msisynth import pipeline; import msisynth as ms; print(callable(ms.register))",
    "from msisynth import register; print(callable(register), hasattr(register, 'optimize'))",
  ):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(out) == {"True"}, code


def test_the_two_mi_estimators_have_distinct_names():
  assert msisynth.mutual_information is msisynth.metrics.mutual_information
  assert msisynth.parzen_mutual_information is msisynth.register.similarity.mutual_information
  assert not hasattr(msisynth.register, "mutual_information")
