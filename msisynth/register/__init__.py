"""Registration of images in physical space (µm): affine transforms, similarity measures, optimisation, I/O.

Transforms map FIXED → MOVING (ITK's convention); see docs/architecture.md.
"""

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
  "constrain_params",
  "image_center_um",
  "image_corners_um",
  "warp_image",
  "warp_msi",
]
