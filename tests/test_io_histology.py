"""Histology image reading/writing, tissue masks, stain separation and resampling."""

import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed

from msisynth import errors
from msisynth.io import histology


def _png16_rgb(path, rgb16):
  """A 16-bit-per-channel RGB PNG, encoded by hand (Pillow cannot write one)."""
  h, w, _ = rgb16.shape
  raw = b"".join(b"\x00" + rgb16[r].astype(">u2").tobytes() for r in range(h))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  path.write_bytes(
    b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
  )
  return path


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_png_8bit_rgb(tmp_path, rng):
  data = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
  Image.fromarray(data).save(tmp_path / "a.png")
  out = histology.read_histology(tmp_path / "a.png")
  assert out.dtype == np.float32 and out.shape == (7, 9, 3)
  np.testing.assert_allclose(out, data / 255.0, atol=1e-7)


def test_png_16bit_grey_keeps_precision(tmp_path, rng):
  data = rng.integers(0, 65536, (6, 5), dtype=np.uint16)
  Image.fromarray(data).save(tmp_path / "g16.png")
  np.testing.assert_allclose(histology.read_image(tmp_path / "g16.png"), data / 65535.0, atol=1e-7)
  rgb = histology.read_histology(tmp_path / "g16.png")
  assert rgb.shape == (6, 5, 3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  np.testing.assert_allclose(rgb[..., 1], data / 65535.0, atol=1e-7)


def test_png_16bit_rgb(tmp_path, rng):
  data = rng.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
  out = histology.read_histology(_png16_rgb(tmp_path / "c16.png", data))
  assert out.shape == (4, 6, 3)
  np.testing.assert_allclose(out, data / 65535.0, atol=1 / 255)  # Pillow decodes to 8 bits


def test_alpha_is_composited_over_white(tmp_path):
  rgba = np.zeros((1, 3, 4), np.uint8)
  rgba[0, :, :3] = [200, 0, 0]
  rgba[0, :, 3] = [0, 255, 51]
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  out = histology.read_histology(tmp_path / "rgba.png")
  np.testing.assert_allclose(out[0, 0], [1, 1, 1])
  np.testing.assert_allclose(out[0, 1], [200 / 255, 0, 0], atol=1e-6)
  np.testing.assert_allclose(out[0, 2], 0.2 * np.array([200 / 255, 0, 0]) + 0.8, atol=1e-6)
  grey_alpha = np.stack([np.full((2, 2), 100, np.uint8), np.full((2, 2), 0, np.uint8)], axis=-1)
  Image.fromarray(grey_alpha, "LA").save(tmp_path / "la.png")
  np.testing.assert_allclose(histology.read_histology(tmp_path / "la.png"), 1.0)


def test_jpeg(tmp_path):
  yy, xx = np.mgrid[0:32, 0:48]
  data = np.stack([xx * 5, yy * 7, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
  Image.fromarray(data).save(tmp_path / "a.jpg", quality=95)
  out = histology.read_histology(tmp_path / "a.jpg")
  assert out.shape == (32, 48, 3)
  assert np.abs(out - data / 255.0).mean() < 0.01


def test_tiffs(tmp_path, rng):
  rgb16 = rng.integers(0, 65536, (5, 4, 3), dtype=np.uint16)
  tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
  np.testing.assert_allclose(histology.read_histology(tmp_path / "rgb16.tif"), rgb16 / 65535.0, atol=1e-7)
  stack = rng.integers(0, 256, (5, 8, 9), dtype=np.uint8)  # channels first, as microscopy exports are
  tifffile.imwrite(tmp_path / "stack.tif", stack)
  np.testing.assert_allclose(histology.read_image(tmp_path / "stack.tif"), np.moveaxis(stack, 0, -1) / 255.0)
  with pytest.raises(errors.ImageReadError, match="5 channels"):
    histology.read_histology(tmp_path / "stack.tif")
  floats = rng.random((4, 4, 3)).astype(np.float32)
  tifffile.imwrite(tmp_path / "f.tif", floats, photometric="rgb")
  np.testing.assert_array_equal(histology.read_histology(tmp_path / "f.tif"), floats)
  tifffile.imwrite(tmp_path / "big.tif", floats * 3, photometric="rgb")
  with pytest.raises(errors.ImageReadError, match="expected \\[0, 1\\]"):
    histology.read_histology(tmp_path / "big.tif")


def test_msiflow_microscopy_is_channels_last(shared_data):
  image = histology.read_image(shared_data / "msiflow_upec12" / "microscopy_unregistered.tif")
  assert image.shape == (140, 128, 3) and image.dtype == np.float32
  raw = tifffile.imread(shared_data / "msiflow_upec12" / "microscopy_unregistered.tif")
  np.testing.assert_allclose(image[..., 1], raw[1] / 255.0)


def test_unreadable_files(tmp_path):
  with pytest.raises(errors.ImageReadError, match="no such file") as info:
    histology.read_histology(tmp_path / "absent.png")
  assert info.value.path == str(tmp_path / "absent.png")
  (tmp_path / "noise.png").write_bytes(bytes(range(256)))
  with pytest.raises(errors.ImageReadError, match="cannot read image"):
    histology.read_histology(tmp_path / "noise.png")
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "cut.png")
  (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
  with pytest.raises(errors.ImageReadError):
    histology.read_histology(tmp_path / "cut.png")
  (tmp_path / "bad.tif").write_bytes(b"II*\x00" + bytes(20))
  with pytest.raises(errors.ImageReadError, match="TIFF"):
    histology.read_image(tmp_path / "bad.tif")
  tifffile.imwrite(tmp_path / "signed.tif", np.zeros((3, 3), np.int16))
  with pytest.raises(errors.ImageReadError, match="int16"):
    histology.read_image(tmp_path / "signed.tif")


def test_write_image_round_trips(tmp_path, rng):
  rgb = rng.random((5, 6, 3)).astype(np.float32)
  histology.write_image(tmp_path / "a.png", rgb)
  np.testing.assert_allclose(histology.read_histology(tmp_path / "a.png"), rgb, atol=0.5 / 255 + 1e-6)
  histology.write_image(tmp_path / "a.tif", rgb)
  np.testing.assert_array_equal(histology.read_image(tmp_path / "a.tif"), rgb)
  stack = rng.integers(0, 65536, (5, 6, 7), dtype=np.uint16)
  histology.write_image(tmp_path / "s.tiff", stack)
  np.testing.assert_allclose(histology.read_image(tmp_path / "s.tiff"), stack / 65535.0)
  mask = rng.random((4, 4)) > 0.5
  histology.write_image(tmp_path / "m.png", mask)
  np.testing.assert_array_equal(histology.read_image(tmp_path / "m.png") > 0.5, mask)
  with pytest.raises(errors.ConfigError, match="overwrite"):
    histology.write_image(tmp_path / "a.png", rgb)
  histology.write_image(tmp_path / "a.png", 1 - rgb, overwrite=True)
  with pytest.raises(errors.ConfigError):
    histology.write_image(tmp_path / "a.bmp", rgb)
  with pytest.raises(errors.ConfigError, match=r"\[0, 1\]"):
    histology.write_image(tmp_path / "b.png", rgb * 2)


def _synthetic_slide(rng):
  """White slide, one pink-purple disk of tissue with a small hole, and a tiny speck of dust."""
  yy, xx = np.mgrid[0:96, 0:128]
  disk = (yy - 48) ** 2 + (xx - 60) ** 2 < 30**2
  hole = (yy - 48) ** 2 + (xx - 60) ** 2 < 2**2
  rgb = np.full((96, 128, 3), 0.94) + rng.normal(0, 0.02, (96, 128, 3))
  rgb[disk & ~hole] = [0.75, 0.45, 0.7]
  rgb[disk & ~hole] += rng.normal(0, 0.05, (int((disk & ~hole).sum()), 3))
  rgb[10:12, 110:112] = [0.4, 0.2, 0.4]
  return np.clip(rgb, 0, 1).astype(np.float32), disk


# The low thresholds of "chroma" and "saturation" take in the smoothed rim of the disk: about one pixel more.
@pytest.mark.parametrize("method, min_iou", [("chroma", 0.92), ("otsu", 0.95), ("otsu_od", 0.95), ("saturation", 0.85)])
def test_tissue_mask_on_synthetic_slide(rng, method, min_iou):
  rgb, disk = _synthetic_slide(rng)
  mask = histology.tissue_mask(rgb, method=method, min_size_px=20)
  assert mask.dtype == bool and mask.shape == disk.shape
  iou = (mask & disk).sum() / (mask | disk).sum()
  assert iou > min_iou
  if method != "saturation":  # a fixed low threshold keeps the smoothed speck of saturated dust
    assert not mask[10:12, 110:112].any()  # the speck is removed
  assert mask[48, 60]  # the hole is filled
  assert not histology.tissue_mask(np.ones((10, 10, 3), np.float32)).any()


def test_tissue_mask_on_real_he(shared_data):
  rgb = histology.read_histology(shared_data / "he" / "rcc-UH0505_12.png")
  mask = histology.tissue_mask(rgb)
  assert 0.15 < mask.mean() < 0.35
  assert not mask[:5, :5].any() and not mask[-5:, -5:].any()
  assert not mask[450:, :].any()  # the black "Tumor" / "Normal" labels under the sections are not tissue
  labels, count = ndimage.label(mask)
  sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
  # The tumour and the normal section, and the pale fragment below the tumour (rows 406-437; Otsu on
  # saturation, the default before, lost it).
  assert count == 3 and sizes[1] > 30000 and 300 < sizes[2] < 2000
  assert mask[420, 233]
  assert rgb[mask].mean() < rgb[~mask].mean() - 0.2


def _two_stain_slide(rng, *, background=(0.96, 0.96, 0.95), pale=0.2):
  """A stained disk beside a pale one (stain strength `pale`), black text bars, on a (tinted) background."""
  yy, xx = np.mgrid[0:96, 0:160]
  dark = (yy - 40) ** 2 + (xx - 40) ** 2 < 25**2
  light = (yy - 40) ** 2 + (xx - 115) ** 2 < 25**2
  bg = np.asarray(background)
  rgb = np.broadcast_to(bg, (96, 160, 3)) + rng.normal(0, 0.01, (96, 160, 3))
  stain = np.array([0.7, 0.35, 0.65])  # transmission of the stain at full strength
  rgb = np.where(dark[..., None], bg * stain, rgb)
  rgb = np.where(light[..., None], bg * stain**pale, rgb)
  for c in range(20, 140, 12):  # a label: black bars with colour fringes
    rgb[78:90, c : c + 4] = 0.05
    rgb[78:90, c - 1] = [0.6, 0.1, 0.1]
    rgb[78:90, c + 4] = [0.1, 0.1, 0.6]
  return np.clip(rgb, 0, 1).astype(np.float32), dark, light


@pytest.mark.parametrize("background", [(0.96, 0.96, 0.95), (0.8, 0.86, 0.83)])
def test_tissue_mask_keeps_pale_tissue_beside_stained(rng, background):
  rgb, dark, light = _two_stain_slide(rng, background=background)
  mask = histology.tissue_mask(rgb)
  truth = dark | light
  assert (mask & truth).sum() / (mask | truth).sum() > 0.9
  assert not mask[76:92].any()  # the label is not tissue
  # Otsu on saturation, the former default, loses the pale disk.
  old = histology.tissue_mask(rgb, method="otsu")
  assert old[light].mean() < 0.5 and old[dark].mean() > 0.9
  if background != (0.96, 0.96, 0.95):
    # A fixed saturation threshold takes the tinted background for tissue; the white-balanced chroma does not.
    assert histology.tissue_mask(rgb, method="saturation").mean() > 0.9
    assert not mask[:5, :5].any()


def test_tissue_mask_same_on_paler_stain(rng):
  rgb, dark, light = _two_stain_slide(rng, pale=0.5)
  base = histology.tissue_mask(rgb)
  for strength in (0.5, 0.3):
    pale = histology.tissue_mask((1 - strength * (1 - rgb)).astype(np.float32))
    assert 2 * (pale & base).sum() / (pale.sum() + base.sum()) > 0.9


def test_tissue_mask_threshold_and_background(rng):
  rgb, dark, light = _two_stain_slide(rng, background=(0.8, 0.86, 0.83))
  np.testing.assert_allclose(histology.slide_background(rgb), [0.8, 0.86, 0.83], atol=0.01)
  strict = histology.tissue_mask(rgb, threshold=0.2)
  assert strict[dark].mean() > 0.9 and strict[light].mean() < 0.1
  with pytest.raises(errors.ConfigError):
    histology.tissue_mask(rgb, threshold=1.5)
  with pytest.raises(errors.ConfigError, match="method"):
    histology.tissue_mask(rgb, method="li")
  with pytest.raises(errors.ConfigError):
    histology.slide_background(rgb, bright_fraction=0)


def test_he_deconvolve_recovers_stain_densities(rng):
  densities = np.zeros((8, 8, 3))
  densities[..., 0] = rng.uniform(0, 0.4, (8, 8))
  densities[..., 1] = rng.uniform(0, 0.3, (8, 8))
  rgb = hed2rgb(densities)
  out = histology.he_deconvolve(rgb)
  assert out.dtype == np.float32 and out.shape == (8, 8, 3)
  np.testing.assert_allclose(out, rgb2hed(rgb), atol=1e-6)
  np.testing.assert_allclose(out[..., :2], densities[..., :2], atol=0.02)
  with pytest.raises(errors.ConfigError):
    histology.he_deconvolve(np.zeros((4, 4)))


def test_resample_keeps_physical_positions(rng):
  # A linear ramp in x: value = x in µm. After resampling, output column c sits at c * to µm.
  h, w, fy, fx = 40, 60, 1.0, 0.5
  ramp = np.tile(np.arange(w) * fx, (h, 1)).astype(np.float32)
  for to in (0.3, 1.25, 2.0, 3.7):
    out = histology.resample_to_pixel_size(ramp, (fy, fx), to)
    assert out.shape == (round(h * fy / to), round(w * fx / to))
    interior = np.arange(out.shape[1]) * to
    keep = (interior > 3 * to) & (interior < (w - 1) * fx - 3 * to)
    np.testing.assert_allclose(out[out.shape[0] // 2, keep], interior[keep], atol=1e-3)


def test_resample_identity_constant_and_channels(rng):
  image = rng.random((9, 11, 2)).astype(np.float32)
  np.testing.assert_allclose(histology.resample_to_pixel_size(image, 2.0, 2.0), image, atol=1e-6)
  constant = np.full((50, 40, 3), 0.25, np.float32)
  np.testing.assert_allclose(histology.resample_to_pixel_size(constant, 0.5, 7.3), 0.25, atol=1e-6)
  both = histology.resample_to_pixel_size(image, 1.0, 3.0)
  one = histology.resample_to_pixel_size(image[..., 1], 1.0, 3.0)
  np.testing.assert_allclose(both[..., 1], one, atol=1e-6)


def test_resample_anti_aliases():
  checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
  out = histology.resample_to_pixel_size(checker, 1.0, 4.0)
  assert out.shape == (16, 16)
  np.testing.assert_allclose(out, 0.5, atol=0.02)
  # Matches area averaging (a box filter) on a smooth image up to the small residual smoothing.
  smooth = ndimage.gaussian_filter(np.random.default_rng(1).random((64, 64)), 4).astype(np.float32)
  box = smooth.reshape(16, 4, 16, 4).mean(axis=(1, 3))
  shifted = histology.resample_to_pixel_size(smooth, 1.0, 4.0)
  # Block means are centred 1.5 input px right of and below the output pixel centres: shift them back.
  reference = ndimage.shift(box, (1.5 / 4, 1.5 / 4), order=1, mode="nearest")
  np.testing.assert_allclose(shifted[2:-2, 2:-2], reference[2:-2, 2:-2], atol=2e-3)


def test_resample_labels_nearest():
  labels = np.repeat(np.repeat(np.array([[1, 2], [3, 4]], np.uint8), 10, axis=0), 10, axis=1)
  out = histology.resample_to_pixel_size(labels, 1.0, (2.0, 5.0), order=0)
  assert out.dtype == np.uint8 and out.shape == (10, 4)
  assert set(np.unique(out)) == {1, 2, 3, 4}
  np.testing.assert_array_equal(out[:, 0], [1] * 5 + [3] * 5)
  with pytest.raises(errors.ConfigError):
    histology.resample_to_pixel_size(labels, 0, 1)
  with pytest.raises(errors.ConfigError):
    histology.resample_to_pixel_size(labels, 1, 1, order=7)
