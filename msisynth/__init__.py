"""msisynth: register mass spectrometry imaging to histology through synthetic histology.

A JAX/Flax implementation of Bird, Ye, Race & Brown, "Deep histological synthesis from mass spectrometry imaging
for multimodal registration" (MIUA 2025).

The top level holds what a user calls, in the order data flows: read MSI and histology, preprocess, make
training pairs, train, synthesise, register, carry regions, run a whole section (`process_section`) and write its
report. Everything else lives in its module (`msisynth.preprocess`, `msisynth.register.optimize`, ...; see
docs/architecture.md). Submodules are imported on first use, so `import msisynth` is fast and I/O-only code never
pays for JAX.

`msisynth.register` is both the registration subpackage and callable: `ms.register(fixed, moving,
fixed_pixel_size_um=..., moving_pixel_size_um=...)` is `msisynth.register.optimize.register`, and
`from msisynth.register import AffineTransform` works as for any package.

Two MI estimators, two names: `msisynth.mutual_information` is the evaluation metric (hard histogram of grey
levels, bits; `msisynth.metrics`); `msisynth.parzen_mutual_information` is the differentiable Parzen-window MI the
registration maximises (`msisynth.register.similarity`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Stage modules, in the order data flows (docs/architecture.md).
_SUBMODULES = (
    "errors", "outputs", "geometry", "types", "io", "datasets", "preprocess", "simulate", "data", "models",
    "losses", "train", "checkpoint", "synthesize", "metrics", "register", "regions", "pipeline", "report", "batch",
    "export", "distributed", "demo", "progress", "viz",
)

_EXPORTS = {
    "errors": ["MSISynthError", "DataError", "ConfigError", "OutputExistsError"],
    "types": ["MSIImage"],
    "geometry": ["Grid", "AffineTransform", "warp_image", "warp_msi"],
    "io": ["read_imzml", "read_imzml_sparse", "SparseMSI", "imzml_info", "write_imzml", "read_histology",
           "read_image", "write_image", "tissue_mask", "resample_to_pixel_size"],
    "datasets": ["data_dir", "load_msiflow", "load_mouse_brain", "list_he_slides", "load_he"],
    "preprocess": ["tic_normalize", "remove_hotspots", "pca", "PreprocessConfig", "MSIPreprocessor"],
    "simulate": ["simulate_msi", "save_simulated"],
    "data": ["make_pair", "PatchDataset", "msiflow_pairs", "semi_synthetic_pairs"],
    "train": ["create_train_state", "train_step", "train_and_evaluate"],
    "synthesize": ["load_synthesizer", "Synthesizer"],
    "metrics": ["mutual_information", "normalized_mutual_information", "ssim", "psnr"],
    # `register` itself is the subpackage, and callable (see the module docstring).
    "register": ["RegistrationConfig", "register_msi_to_histology", "save_transform_json", "load_transform_json",
                 "save_itk_transform", "load_itk_transform", "load_landmarks_csv", "target_registration_error",
                 "parzen_mutual_information", "BSplineTransform", "DeformableConfig", "register_deformable",
                 "save_displacement_field", "load_displacement_field", "DisplacementFieldTransform"],
    "regions": ["read_geojson_regions", "regions_to_msi", "region_statistics", "differential_ions"],
    "pipeline": ["SectionInputs", "process_section", "register_images"],
    "report": ["write_section_report"],
}

_NAME_TO_MODULE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_NAME_TO_MODULE) + list(_SUBMODULES)


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"msisynth.{name}")
  module = _NAME_TO_MODULE.get(name)
  if module is None:
    raise AttributeError(f"module 'msisynth' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"msisynth.{module}"), name)
  globals()[name] = value  # later look-ups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
