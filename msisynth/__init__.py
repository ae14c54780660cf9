"""msisynth: register mass spectrometry imaging to histology through synthetic histology.

A JAX/Flax implementation of Bird, Ye, Race & Brown, "Deep histological synthesis from mass spectrometry imaging
for multimodal registration" (MIUA 2025).

Every public function is available from the top level (`msisynth.read_imzml`, `msisynth.register_msi_to_histology`,
...) and from its module (`msisynth.io`, `msisynth.preprocess`, ...). The submodules are imported on first use, so
`import msisynth` is fast and I/O-only code never pays for JAX. Where two modules use one name, the top level holds
the one named here and the other stays in its module: `msisynth.mutual_information` is the evaluation metric in
bits (`msisynth.metrics`); the differentiable Parzen-window MI of the registration is
`msisynth.register.mutual_information`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Stage modules, in the order data flows (docs/architecture.md).
_SUBMODULES = (
    "errors", "types", "io", "datasets", "preprocess", "simulate", "data", "models", "losses", "train",
    "checkpoint", "synthesize", "metrics", "register", "regions", "pipeline", "batch", "export", "distributed",
    "viz",
)

_EXPORTS = {
    "errors": ["MSISynthError", "DataError", "ImzMLError", "ImageReadError", "ConfigError", "TrainingError",
               "CheckpointError", "RegistrationError"],
    "types": ["MSIImage"],
    "io": ["read_imzml", "read_ion_image", "imzml_info", "write_imzml", "mz_bin_edges", "read_histology",
           "read_image", "write_image", "tissue_mask", "he_deconvolve", "resample_to_pixel_size"],
    "datasets": ["data_dir", "load_msiflow", "load_mouse_brain", "list_he_slides", "load_he", "MsiflowSection"],
    "preprocess": ["tic_normalize", "rms_normalize", "median_normalize", "normalize", "hotspot_thresholds",
                   "clip_hotspots", "remove_hotspots", "mean_spectrum", "pick_peaks", "pca", "pca_transform",
                   "PCAResult", "nmf", "nmf_transform", "NMFResult", "fit_range", "apply_range", "scale_to_range",
                   "PreprocessConfig", "MSIPreprocessor"],
    "simulate": ["simulate_msi", "save_simulated", "SimulatedMSI", "NoiseModel", "SmoothDisplacement",
                 "fit_class_centroids", "tissue_classes", "he_tissue_mask"],
    "data": ["Pair", "make_pair", "upsample_grid", "split_regions", "PatchDataset", "PairedData", "msiflow_pairs",
             "semi_synthetic_pairs"],
    "models": ["UNetGenerator", "PatchDiscriminator", "generator_from_config", "discriminator_from_config",
               "count_params", "init_variables", "unet_widths"],
    "losses": ["gan_loss", "discriminator_loss", "generator_gan_loss", "l1_loss", "pix2pix_generator_loss"],
    "train": ["TrainState", "create_train_state", "train_step", "eval_step", "train_and_evaluate", "data_mesh",
              "data_from_config", "make_optimizer", "compiled_train_step"],
    "checkpoint": ["restore_latest", "restore_for_inference", "latest_step", "best_step"],
    "synthesize": ["load_synthesizer", "Synthesizer", "synthesize_tiled", "save_synthesis"],
    "metrics": ["mutual_information", "normalized_mutual_information", "ssim", "psnr"],
    # `register` itself is the subpackage; its function is `msisynth.register.register`.
    "register": ["AffineTransform", "RegistrationConfig", "RegistrationResult", "register_batch",
                 "register_msi_to_histology", "result_summary", "warp_image", "warp_msi", "save_transform_json",
                 "load_transform_json",
                 "save_itk_transform", "load_itk_transform", "load_landmarks_csv", "target_registration_error",
                 "ncc", "mse", "BSplineTransform", "DeformableConfig", "register_deformable",
                 "save_displacement_field"],
    "regions": ["read_geojson_regions", "rasterize_regions", "regions_to_msi", "region_statistics",
                "differential_ions", "write_region_table_csv", "write_mean_spectra_csv",
                "write_differential_ions_csv", "Region", "RegionStats"],
    "pipeline": ["SectionInputs", "SectionResult", "process_section", "write_section_report",
                 "working_pixel_size_um"],
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
