"""Tests of msisynth.viz.msi: each figure has the expected axes and titles and saves as a non-empty PNG."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from msisynth import errors
from msisynth.types import MSIImage
from msisynth.viz import msi as viz_msi


def _msi(**metadata):
  rng = np.random.default_rng(0)
  cube = rng.gamma(2.0, 1.0, (8, 9, 10)).astype(np.float32)
  cube[..., 4] *= 5.0  # a strong peak
  mask = np.ones((8, 9), bool)
  mask[0, :3] = False
  cube[~mask] = 0.0
  return MSIImage(cube, np.linspace(500.0, 509.0, 10), mask, metadata={"source": "/data/tissue.imzML", **metadata})


def _is_png(path):
  return path.stat().st_size > 100 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_ion_images_given_mz_and_default_peaks(tmp_path):
  msi = _msi()
  fig = viz_msi.plot_ion_images(msi, [501.0, 504.0], ncols=3)
  assert isinstance(fig, Figure)
  assert len(fig.axes) == 4  # two images, two colour bars
  assert [ax.get_title() for ax in fig.axes[::2]] == ["m/z 501.0000", "m/z 504.0000"]
  assert "tissue.imzML" in fig.get_suptitle() and "simulated" not in fig.get_suptitle()
  # The unmeasured pixels are masked, hence drawn in the colour map's grey "bad" colour.
  shown = fig.axes[0].images[0].get_array()
  assert np.array_equal(np.ma.getmaskarray(shown), ~msi.mask)
  path = viz_msi.save_figure(fig, tmp_path / "sub" / "ions.png")
  assert _is_png(path)

  fig = viz_msi.plot_ion_images(_msi(simulated=True), n=4)
  assert len(fig.axes) == 8
  assert "m/z 504.0000" in [ax.get_title() for ax in fig.axes]
  assert "(simulated)" in fig.get_suptitle()
  with pytest.raises(errors.DataError, match="tissue.imzML"):
    viz_msi.plot_ion_images(msi, [700.0])


def test_plot_pca_axes_and_png(tmp_path):
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(8, 9, 3))
  fig = viz_msi.plot_pca(scores, np.array([0.5, 0.3, 0.1]), simulated=True, mask=np.ones((8, 9), bool))
  assert isinstance(fig, Figure) and len(fig.axes) == 3 + 2
  assert "(simulated)" in fig.get_suptitle()
  assert fig.axes[1].get_title() == "PC1 (50.0 %)"
  assert _is_png(viz_msi.save_figure(fig, tmp_path / "pca.png"))
  assert len(viz_msi.plot_pca(scores[..., :1], [0.9]).axes) == 3
  with pytest.raises(errors.ConfigError):
    viz_msi.plot_pca(scores, [0.5, 0.3])


def test_plot_mean_spectrum_and_save_rules(tmp_path):
  msi = _msi()
  spectrum = msi.cube[msi.mask].mean(0)
  fig = viz_msi.plot_mean_spectrum(msi.mz, spectrum, peaks=[4, 7])
  assert isinstance(fig, Figure) and len(fig.axes) == 1
  assert fig.axes[0].get_xlabel() == "m/z"
  path = viz_msi.save_figure(fig, tmp_path / "spectrum.png")
  assert _is_png(path)
  with pytest.raises(errors.ConfigError, match="exists"):
    viz_msi.save_figure(viz_msi.plot_mean_spectrum(msi.mz, spectrum), path)
  viz_msi.save_figure(viz_msi.plot_mean_spectrum(msi.mz, spectrum), path, dpi=60, overwrite=True)
  assert _is_png(path)
  with pytest.raises(errors.ConfigError):
    viz_msi.plot_mean_spectrum(msi.mz, spectrum, peaks=[10])


def test_plot_msi_histology_pairs(tmp_path):
  he = np.random.default_rng(1).random((20, 30, 3)).astype(np.float32)
  msi = MSIImage(_msi().cube, _msi().mz, _msi().mask, pixel_size_um=(10.0, 10.0))
  fig = viz_msi.plot_msi_histology_pairs([("a", he, msi, 504.0), ("b", he, _msi(simulated=True), 501.0)],
                                         histology_pixel_sizes_um=[2.0, None])  # fmt: skip
  assert len(fig.axes) == 6
  titles = [ax.get_title() for ax in fig.axes]
  assert titles[:3] == ["a: histology", "a: MSI TIC", "a: m/z 504.0000"]
  assert [ax.get_xlabel() for ax in fig.axes] == ["µm", "µm", "µm", "pixels", "pixels", "pixels"]
  assert fig.axes[0].get_images()[0].get_extent()[1] == pytest.approx(29.5 * 2.0)
  assert "(simulated)" in fig._suptitle.get_text()
  assert _is_png(viz_msi.save_figure(fig, tmp_path / "pairs.png"))
  with pytest.raises(errors.ConfigError):
    viz_msi.plot_msi_histology_pairs([("a", he[..., 0], msi, 504.0)])
