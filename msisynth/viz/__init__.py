"""Figures (matplotlib, Agg backend): one module per stage.

- `msisynth.viz.msi`: ion images, PCA composites, mean spectra, `save_figure`.
- `msisynth.viz.training`: image grids of MSI input, real and synthetic histology during training.
- `msisynth.viz.registration`: checkerboards and overlays before/after registration, landmarks.
- `msisynth.viz.regions`: annotated regions over ion images, per-region spectra.

Import the module you need (`from msisynth.viz import registration`); matplotlib is loaded only then.
"""
