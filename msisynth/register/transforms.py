"""Deprecated alias: the transforms and warping are `msisynth.geometry.transforms`.

`import msisynth.register.transforms` gives that very module (so `AffineTransform` and the rest are the same
objects), with a DeprecationWarning.
"""

import sys
import warnings

from msisynth.geometry import transforms as _transforms

warnings.warn(
  "msisynth.register.transforms is deprecated; use msisynth.geometry.transforms", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _transforms
