"""Input and output: imzML mass spectrometry imaging, histology and microscopy images.

Nothing here imports JAX or matplotlib, so reading data does not pay for them.
"""

from msisynth.io.histology import (
  PixelSizeWarning,
  he_deconvolve,
  histology_pixel_size_um,
  read_histology,
  read_image,
  resample_to_pixel_size,
  tissue_mask,
  write_image,
)
from msisynth.io.imzml import imzml_info, mz_bin_edges, read_imzml, read_ion_image, write_imzml
from msisynth.io.sparse import SparseMSI, read_imzml_sparse

__all__ = [
  "PixelSizeWarning",
  "SparseMSI",
  "he_deconvolve",
  "histology_pixel_size_um",
  "imzml_info",
  "mz_bin_edges",
  "read_histology",
  "read_image",
  "read_imzml",
  "read_imzml_sparse",
  "read_ion_image",
  "resample_to_pixel_size",
  "tissue_mask",
  "write_image",
  "write_imzml",
]
