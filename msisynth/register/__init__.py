"""Registration in physical space (µm): affine transforms, similarity measures, optimisation, I/O and accuracy.

Transforms map FIXED → MOVING (ITK's convention); see docs/architecture.md. `register` finds an affine map;
`register_deformable` refines it with a cubic B-spline (`BSplineTransform`), which the warps, the regions and the
ITK / displacement-field writers accept as well.
"""

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
from msisynth.register.optimize import (
  Candidate,
  RegistrationConfig,
  RegistrationResult,
  register,
  register_batch,
  register_msi_to_histology,
  result_summary,
)
from msisynth.register.similarity import (
  joint_histogram,
  mse,
  mutual_information,
  ncc,
  normalized_mutual_information,
)
from msisynth.register.transform_io import (
  load_itk_transform,
  load_transform_json,
  save_displacement_field,
  save_itk_transform,
  save_transform_json,
)
from msisynth.register.transforms import (
  AffineTransform,
  constrain_params,
  image_center_um,
  image_corners_um,
  warp_image,
  warp_msi,
)

__all__ = [
  "AffineTransform",
  "BSplineTransform",
  "Candidate",
  "DeformableConfig",
  "DeformableResult",
  "RegistrationConfig",
  "RegistrationResult",
  "constrain_params",
  "deformable_summary",
  "image_center_um",
  "image_corners_um",
  "joint_histogram",
  "load_itk_transform",
  "load_landmarks_csv",
  "load_transform_json",
  "mse",
  "mutual_information",
  "ncc",
  "normalized_mutual_information",
  "register",
  "register_batch",
  "register_deformable",
  "register_msi_to_histology",
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
