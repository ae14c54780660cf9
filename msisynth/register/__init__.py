"""Registration in physical space (µm): similarity measures, optimisation, transform I/O and accuracy.

The affine transforms and the warping are `msisynth.geometry.transforms`; this package re-exports them
(`msisynth.register.AffineTransform`, `warp_image`, `warp_msi`, ...).

Transforms map FIXED → MOVING (ITK's convention); see docs/architecture.md. `register` finds an affine map;
`register_deformable` refines it with a cubic B-spline (`BSplineTransform`), which the warps, the regions and the
ITK / displacement-field writers accept as well; a dense displacement field (ours, or another tool's) is read back
by `load_displacement_field` as a `DisplacementFieldTransform`, which they accept too.

This package is callable: `msisynth.register(fixed, moving, ...)` is `msisynth.register.optimize.register`. A
package is bound as an attribute of its parent when it is imported (`import msisynth.register` sets
`msisynth.register` to this module), so a function of the same name at the top level would be replaced by the
module as soon as anything imported the package; making the module itself callable gives one object that is both.

The similarity measures here are the registration's: `parzen_mutual_information` (and
`parzen_normalized_mutual_information`) are differentiable Parzen-window estimates in bits, distinct from the
evaluation MI of `msisynth.metrics` (hard histogram).
"""

import sys
import types

from msisynth.geometry.transforms import (
  AffineTransform,
  constrain_params,
  image_center_um,
  image_corners_um,
  warp_image,
  warp_msi,
)
from msisynth.register.bspline import (
  BSplineTransform,
  DeformableConfig,
  DeformableResult,
  deformable_summary,
  register_deformable,
)
from msisynth.register.evaluate import (
  load_landmarks_csv,
  save_landmarks_csv,
  target_registration_error,
  transform_error,
)
from msisynth.register.field import DisplacementFieldTransform, load_displacement_field
from msisynth.register.optimize import (
  Candidate,
  RegistrationConfig,
  RegistrationResult,
  enable_compilation_cache,
  register,
  register_batch,
  register_msi_to_histology,
  result_summary,
  tissue_crop,
)
from msisynth.register.similarity import joint_histogram, mse, ncc
from msisynth.register.similarity import mutual_information as parzen_mutual_information
from msisynth.register.similarity import normalized_mutual_information as parzen_normalized_mutual_information
from msisynth.register.transform_io import (
  load_itk_transform,
  load_transform_json,
  save_displacement_field,
  save_itk_transform,
  save_transform_json,
)

__all__ = [
  "AffineTransform",
  "BSplineTransform",
  "Candidate",
  "DeformableConfig",
  "DeformableResult",
  "DisplacementFieldTransform",
  "RegistrationConfig",
  "RegistrationResult",
  "constrain_params",
  "deformable_summary",
  "image_center_um",
  "image_corners_um",
  "joint_histogram",
  "load_displacement_field",
  "load_itk_transform",
  "load_landmarks_csv",
  "load_transform_json",
  "mse",
  "ncc",
  "parzen_mutual_information",
  "parzen_normalized_mutual_information",
  "register",
  "register_batch",
  "enable_compilation_cache",
  "register_deformable",
  "register_msi_to_histology",
  "tissue_crop",
  "result_summary",
  "save_displacement_field",
  "save_itk_transform",
  "save_landmarks_csv",
  "save_transform_json",
  "target_registration_error",
  "transform_error",
  "warp_image",
  "warp_msi",
]


class _CallableModule(types.ModuleType):
  """The module type of `msisynth.register`: calling the package calls `register`."""

  def __call__(self, *args, **kwargs):
    return register(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
