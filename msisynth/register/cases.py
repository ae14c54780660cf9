"""Generated registration cases with a known affine ground truth, for tests and benchmarks.

A case is a fixed image (a histology-like RGB image, or a real H&E slide given by the caller) and a moving image
made from it through a random FIXED → MOVING affine transform T (µm), so that moving(T(x)) = fixed(x):

- **Transform.** Rotation U(±`max_rotation_deg`) (default ±30°), isotropic scale log-uniform in [`min_scale`,
  `max_scale`] (default 0.7–1.4; that of T, so the moving image shows the tissue 1/scale times as large), an
  anisotropy of up to ±5 % and a shear of up to ±0.05, and a translation of up to `max_shift` (default 20 %) of
  the field on each axis, about the image centres. With `flips=True` a mirror (probability ½) and a quarter turn
  (0°, 90°, 180° or 270°, uniform) are composed in, as when a section is mounted face down or turned.
- **Appearance.** "uni": grey luminance through another intensity curve (gamma 0.7–1.4), a slight blur and noise
  (σ 0.02), on a grid of the same pixel size. "msi": an MSI-like image on a grid `msi_factor` times coarser (box
  averaged, as an MSI pixel integrates its area): a non-monotonic mixture of the hematoxylin and eosin densities
  and of a smooth field the stains do not show, with an off-tissue matrix signal, multiplicative noise and
  hotspots. The tissue signal is weighted by the fraction of each pixel that the tissue covers (the generated
  slide's own, or `tissue_cover` of a given slide), so that the MSI's tissue edge lies where the slide's does.
  Its intensities are not a function of the fixed image's, so only a multimodal similarity can align it.
- **Texture.** A fixed image enlarged from a smaller slide is smoother than a real scan of that size, so
  `fine_texture=True` (default) adds nuclei-like dots of about 3 px to its tissue, which the moving image shares.

The error of a found transform is measured on a 10 × 10 grid across the fixed image (`grid_error_px`), in fixed
pixels.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage as ndi

from msisynth import errors
from msisynth.geometry.transforms import AffineTransform

APPEARANCES = ("uni", "msi")

_H_RGB = np.array([0.65, 0.70, 0.29])  # optical density direction of hematoxylin
_E_RGB = np.array([0.07, 0.99, 0.11])  # eosin


@dataclasses.dataclass(frozen=True)
class Case:
  """One generated registration case.

  Attributes:
    fixed: (H, W, 3) float32 RGB in [0, 1] (histology-like).
    moving: (h, w) float32 grey (uni) or MSI-like intensities (msi).
    fixed_pixel_size_um: fixed pixel size (µm).
    moving_pixel_size_um: moving pixel size (µm).
    transform: the true FIXED → MOVING transform.
    appearance: "uni" or "msi".
    mirrored: whether the truth contains a mirror.
    quarter_turns: quarter turns (0-3) in the truth.
    fixed_tissue: (H, W) bool tissue of the fixed image.
  """

  fixed: np.ndarray
  moving: np.ndarray
  fixed_pixel_size_um: float
  moving_pixel_size_um: float
  transform: AffineTransform
  appearance: str
  mirrored: bool
  quarter_turns: int
  fixed_tissue: np.ndarray


def _smooth_noise(rng, shape, sigma):
  field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
  return field / max(float(field.std()), 1e-6)


def tissue_image(rng: np.random.Generator, size: int, *, tissue_fraction: float = 0.45, pale: float = 0.0,
                 shape: tuple[int, int] | None = None) -> np.ndarray:  # fmt: skip
  """A histology-like RGB image: a few lobes of H&E-stained tissue with inner structure on a bright slide.

  Args:
    rng: random generator.
    size: side in pixels (square) unless `shape` is given.
    tissue_fraction: about this fraction of the field is tissue.
    pale: 0 (normal staining) to 1 (very pale: stain densities divided by up to 8).
    shape: (H, W) instead of a square.

  Returns:
    (H, W, 3) float32 RGB in [0, 1].
  """
  return _tissue_image(rng, size, tissue_fraction=tissue_fraction, pale=pale, shape=shape)[0]


def _tissue_image(rng, size, *, tissue_fraction=0.45, pale=0.0, shape=None):
  """`tissue_image` and the fraction of each pixel that the tissue covers, (H, W) float32 in [0, 1]."""
  h, w = shape if shape is not None else (size, size)
  scale = max(h, w)
  low = ndi.zoom(_smooth_noise(rng, (48, 48), 5.0), (h / 48, w / 48), order=1)[:h, :w]
  yy, xx = np.mgrid[:h, :w] / scale
  # A centred, asymmetric envelope so that the tissue is one main piece with a distinct orientation.
  cy, cx = 0.5 * h / scale + rng.uniform(-0.05, 0.05), 0.5 * w / scale + rng.uniform(-0.05, 0.05)
  ang = rng.uniform(0, math.pi)
  u = (xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)
  v = -(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)
  env = -(u / 0.36) ** 2 - (v / 0.22) ** 2 + 0.3 * u / 0.36
  field = env + 0.35 * low
  thr = np.quantile(field, 1 - tissue_fraction)
  tissue = ndi.gaussian_filter((field > thr).astype(np.float32), max(1.0, scale / 512))
  inner = ndi.zoom(_smooth_noise(rng, (96, 96), 3.0), (h / 96, w / 96), order=1)[:h, :w]
  hem = tissue * np.clip(0.55 + 0.35 * inner, 0.05, 1.2)
  eos = tissue * np.clip(0.6 - 0.25 * inner + 0.2 * low, 0.1, 1.2)
  dim = 1.0 / (1.0 + 7.0 * pale)
  od = (hem[..., None] * _H_RGB + eos[..., None] * _E_RGB) * 0.9 * dim
  rgb = np.exp(-od * math.log(10)) * 0.94 + 0.03 * rng.standard_normal((h, w, 1)) * 0.1
  return np.clip(rgb, 0, 1).astype(np.float32), tissue.astype(np.float32)


def _add_texture(rng, rgb, tissue):
  h, w = tissue.shape
  n = int(0.004 * tissue.sum())
  dots = np.zeros((h, w), np.float32)
  if n:
    idx = rng.choice(h * w, size=n, p=(tissue.ravel() / tissue.sum()))
    dots.flat[idx] = 1.0
  dots = np.clip(ndi.gaussian_filter(dots, 1.2) * 9.0, 0, 1)
  od = dots[..., None] * _H_RGB * 0.8
  return np.clip(rgb * np.exp(-od * math.log(10)), 0, 1).astype(np.float32)


def random_transform(rng: np.random.Generator, fixed_shape, fixed_px: float, moving_shape, moving_px: float, *,
                     max_rotation_deg=30.0, min_scale=0.7, max_scale=1.4, max_shift=0.2, flips=False):  # fmt: skip
  """A random FIXED → MOVING transform about the image centres (see the module); (transform, mirrored, turns)."""
  rot = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
  turns, mirrored = 0, False
  if flips:
    turns = int(rng.integers(4))
    mirrored = bool(rng.random() < 0.5)
    rot += turns * math.pi / 2
  s = math.exp(rng.uniform(math.log(min_scale), math.log(max_scale)))
  aniso = math.exp(rng.uniform(-0.05, 0.05))
  shear = rng.uniform(-0.05, 0.05)
  r = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
  a = r @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([s * aniso, s / aniso])
  if mirrored:
    a = a @ np.diag([-1.0, 1.0])
  cf = np.array([(fixed_shape[1] - 1) * fixed_px, (fixed_shape[0] - 1) * fixed_px]) / 2
  cm = np.array([(moving_shape[1] - 1) * moving_px, (moving_shape[0] - 1) * moving_px]) / 2
  field = np.array([moving_shape[1] * moving_px, moving_shape[0] * moving_px])
  shift = rng.uniform(-max_shift, max_shift, 2) * field
  b = cm + shift - a @ cf
  return AffineTransform.from_linear(a, b), mirrored, turns


def _warp_np(image, matrix, out_shape, in_px, out_px, order=1, cval=0.0):
  """image (on a grid of in_px) sampled at M(x_out) for each output pixel: out(x) = image(M x)."""
  # index space: in_index = (M (out_index * out_px)) / in_px, with (row, col) order.
  a, b = matrix[:2, :2], matrix[:2, 2]
  s = np.diag([out_px, out_px]) / in_px
  lin = (a @ s)  # acts on (col, row)
  lin_rc = lin[::-1, ::-1]
  off_rc = (b / in_px)[::-1]
  return ndi.affine_transform(image, lin_rc, offset=off_rc, output_shape=out_shape, order=order, mode="constant",
                              cval=cval)  # fmt: skip


MIXTURES = ("sine", "linear")


def tissue_cover(rgb: np.ndarray, tissue: np.ndarray) -> np.ndarray:
  """The fraction of each pixel that tissue covers, estimated from an H&E image's optical density.

  A tissue edge in a slide is a ramp of optical density over a few pixels. A binary mask (`tissue`) ends at its
  outer foot, so an image made from the blurred mask shows the tissue larger than the slide does: by 2.6 px at
  256² to 8 px at 2048² on `tissue_image`'s slides, which draws an edge-aligning registration to a wrong scale.
  Here the density, smoothed (σ 1 px), less the bare slide's (the median away from the mask), is divided by the
  local density of the tissue's interior (the mask eroded, a normalised Gaussian average of σ max(4, size / 64)
  px) and clipped to [0, 1]. On `tissue_image`'s slides (with texture) its half level lies within 0.31 px of the
  true cover's (256²–2048², 6 slides), it is ≥ 0.9 on 94–98 % of the interior, and 0 from 3 px beyond the mask.

  Args:
    rgb: (H, W, 3) H&E image in [0, 1].
    tissue: (H, W) bool tissue mask of it (`msisynth.io.histology.tissue_mask`).

  Returns:
    (H, W) float32 in [0, 1].
  """
  tissue = np.asarray(tissue, bool)
  if not tissue.any():
    return np.zeros(tissue.shape, np.float32)
  size = max(tissue.shape)
  od = ndi.gaussian_filter(-np.log10(np.clip(rgb[..., :3], 1e-3, 1.0)).sum(axis=2), 1.0)
  core = ndi.binary_erosion(tissue, iterations=max(2, size // 128))
  if not core.any():
    core = tissue
  sigma = max(4.0, size / 64)
  weight = ndi.gaussian_filter(core.astype(np.float64), sigma)
  local = ndi.gaussian_filter(od * core, sigma) / np.maximum(weight, 1e-12)
  local = np.where(weight > 1e-3, local, np.median(od[core]))
  outside = ~ndi.binary_dilation(tissue, iterations=3)
  slide = float(np.median(od[outside])) if outside.any() else 0.0  # the bare slide's density
  cover = np.clip((od - slide) / np.maximum(local - slide, 1e-6), 0.0, 1.0)
  return np.where(outside, 0.0, cover).astype(np.float32)  # none beyond the mask's edge ramp


def msi_like(rng: np.random.Generator, rgb: np.ndarray, tissue: np.ndarray, *, mixture: str = "sine",
             hidden: float = 0.4, fraction: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
  """An MSI-like single-channel image of an H&E image on the same grid (see the module).

  Args:
    rng: random generator (the hidden field).
    rgb: (H, W, 3) H&E image in [0, 1].
    tissue: (H, W) bool tissue.
    mixture: "sine" (default): sin(2.5 h + 0.7) + 0.6 e of the normalised hematoxylin h and eosin e densities, a
      non-monotonic function of the stain; "linear": h + 0.6 e.
    hidden: weight of a smooth random field the stains do not show.
    fraction: (H, W) fraction of each pixel that the tissue covers, in [0, 1], where the MSI signal of the tissue
      comes from; None: `tissue_cover(rgb, tissue)`.
  """
  if mixture not in MIXTURES:
    raise errors.ConfigError(f"mixture must be one of {MIXTURES}, got {mixture!r}")
  if fraction is not None and np.shape(fraction) != np.shape(tissue):
    raise errors.ConfigError(f"fraction has shape {np.shape(fraction)}, the tissue mask {np.shape(tissue)}")
  od = -np.log10(np.clip(rgb, 1e-3, 1.0))
  hem = np.clip(od @ _H_RGB / (_H_RGB @ _H_RGB), 0, None)
  eos = np.clip(od @ _E_RGB / (_E_RGB @ _E_RGB), 0, None)
  h, w = tissue.shape
  field = ndi.zoom(_smooth_noise(rng, (32, 32), 3.0), (h / 32, w / 32), order=1)[:h, :w]
  t = tissue_cover(rgb, tissue) if fraction is None else np.clip(np.asarray(fraction, np.float32), 0, 1)
  hn = hem / max(np.percentile(hem[tissue], 99), 1e-3)
  en = eos / max(np.percentile(eos[tissue], 99), 1e-3)
  mix = (np.sin(2.5 * hn + 0.7) if mixture == "sine" else hn) + 0.6 * en
  signal = t * (1.2 + 0.6 * mix + hidden * field) + (1 - t) * 0.5
  return np.clip(signal, 0, None).astype(np.float32)


def make_case(rng: np.random.Generator, size: int, *, appearance: str = "uni", flips: bool = False,
              source: np.ndarray | None = None, msi_factor: int = 4, fine_texture: bool = True,
              max_rotation_deg: float = 30.0, min_scale: float = 0.7, max_scale: float = 1.4,
              max_shift: float = 0.2, pale: float = 0.0, msi_mixture: str = "sine",
              msi_hidden: float = 0.4) -> Case:  # fmt: skip
  """A generated case (see the module).

  Args:
    rng: random generator.
    size: side of the fixed image (pixels).
    appearance: "uni" or "msi".
    flips: also mirror and turn by quarter turns.
    source: an RGB H&E image to use (resized to size × size after a random square crop); None: `tissue_image`.
    msi_factor: the moving grid is this many times coarser for "msi".
    fine_texture: add nuclei-like dots (see the module).
    max_rotation_deg: see `random_transform`.
    min_scale: see `random_transform`.
    max_scale: see `random_transform`.
    max_shift: see `random_transform`.
    pale: paleness of the generated tissue (see `tissue_image`).
    msi_mixture: the stain mixture of "msi" (see `msi_like`).
    msi_hidden: the hidden field's weight for "msi" (see `msi_like`).

  Returns:
    A `Case`; the fixed pixel size is 1 µm.

  Raises:
    ConfigError: for an unknown appearance or a size under 32.
  """
  if appearance not in APPEARANCES:
    raise errors.ConfigError(f"appearance must be one of {APPEARANCES}, got {appearance!r}")
  if size < 32:
    raise errors.ConfigError(f"size must be at least 32, got {size}")
  if source is None:
    rgb, fraction = _tissue_image(rng, size, pale=pale)
  else:
    fraction = None
    src = np.asarray(source, np.float32)[..., :3]
    side = min(src.shape[:2])
    r0 = int(rng.integers(0, src.shape[0] - side + 1))
    c0 = int(rng.integers(0, src.shape[1] - side + 1))
    src = src[r0 : r0 + side, c0 : c0 + side]
    rgb = np.clip(ndi.zoom(src, (size / side, size / side, 1), order=1), 0, 1)[:size, :size]
  from msisynth.io.histology import tissue_mask

  tissue = tissue_mask(rgb, min_size_px=max(16, size * size // 2000))
  if fine_texture and tissue.any():
    rgb = _add_texture(rng, rgb, tissue)
  fixed_px = 1.0
  if appearance == "uni":
    moving_px, mshape = fixed_px, (size, size)
  else:
    moving_px, mshape = fixed_px * msi_factor, (size // msi_factor, size // msi_factor)
  t, mirrored, turns = random_transform(rng, (size, size), fixed_px, mshape, moving_px, flips=flips,
                                        max_rotation_deg=max_rotation_deg, min_scale=min_scale,
                                        max_scale=max_scale, max_shift=max_shift)  # fmt: skip
  inv = np.linalg.inv(np.asarray(t.matrix, np.float64))
  if appearance == "uni":
    grey = 1.0 - rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    gamma = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    grey = np.clip(grey, 0, 1) ** gamma
    moving = _warp_np(grey, inv, mshape, fixed_px, moving_px)
    moving = ndi.gaussian_filter(moving, 0.7) + 0.02 * rng.standard_normal(mshape)
  else:
    signal = msi_like(rng, rgb, tissue, mixture=msi_mixture, hidden=msi_hidden, fraction=fraction)
    # Warp at the fixed resolution onto a fine moving grid, then integrate over each MSI pixel.
    fine_shape = (mshape[0] * msi_factor, mshape[1] * msi_factor)
    fine = _warp_np(signal, inv, fine_shape, fixed_px, fixed_px, cval=0.5)
    # fine pixel (r, c) sits at moving µm (c, r)·fixed_px; an MSI pixel (R, C) at (C, R)·moving_px covers fine
    # pixels centred around it: shift by half a pixel so that box averaging keeps the centres.
    half = (msi_factor - 1) / 2.0
    fine = ndi.shift(fine, (half, half), order=1, mode="nearest")
    moving = fine.reshape(mshape[0], msi_factor, mshape[1], msi_factor).mean(axis=(1, 3))
    moving = moving * np.exp(0.15 * rng.standard_normal(mshape))
    hot = rng.random(mshape) < 0.002
    moving[hot] *= rng.uniform(3, 8, int(hot.sum()))
  return Case(fixed=rgb.astype(np.float32), moving=moving.astype(np.float32), fixed_pixel_size_um=fixed_px,
              moving_pixel_size_um=moving_px, transform=t, appearance=appearance, mirrored=mirrored,
              quarter_turns=turns, fixed_tissue=tissue)  # fmt: skip


def grid_error_px(found: AffineTransform, case: Case, num: int = 10) -> tuple[float, float]:
  """(mean, max) distance in fixed pixels, over a num × num grid across the fixed image, between where the found
  and the true transforms send each point, measured back in the fixed space."""
  h, w = case.fixed.shape[:2]
  px = case.fixed_pixel_size_um
  ys, xs = np.meshgrid(np.linspace(0.05, 0.95, num) * (h - 1), np.linspace(0.05, 0.95, num) * (w - 1),
                       indexing="ij")  # fmt: skip
  pts = np.stack([xs.ravel() * px, ys.ravel() * px, np.ones(xs.size)])
  true_inv = np.linalg.inv(np.asarray(case.transform.matrix, np.float64))
  back = (true_inv @ np.asarray(found.matrix, np.float64) @ pts)[:2]
  d = np.linalg.norm(back - pts[:2], axis=0) / px
  return float(d.mean()), float(d.max())


# ----------------------------------------------------------------------------------------------------------------
# Deformable cases: a real image under a known smooth map.


def deformed_pair(seed: int, size: int = 96, *, amplitude_px: float = 6.0, sigma_px: float = 16.0,
                  row0: int = 150) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
  """A crop of scikit-image's real IHC image (moving, grey) and the fixed image it becomes under a known smooth
  map T(x) = x + (20, 20) + u(x), u a Gaussian-filtered random field (σ `sigma_px`) of RMS `amplitude_px`.

  Pixels are 1 µm on both images, so points in µm are pixel (x, y).

  Args:
    seed: seed of the field u.
    size: side of the fixed image, px.
    amplitude_px: RMS of u, px.
    sigma_px: smoothness of u, px.
    row0: first row of the crop (column 150) in the IHC image.

  Returns:
    (fixed (size, size) float32, moving (size + 40, size + 40) float32, true map (size, size, 2) (x, y) in moving
    px of each fixed pixel centre).
  """
  import skimage.data

  rng = np.random.default_rng(seed)
  rgb = skimage.data.immunohistochemistry()[row0 : row0 + size + 40, 150 : 150 + size + 40].astype(np.float32) / 255
  moving = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
  u = np.stack([ndi.gaussian_filter(n, sigma_px, mode="reflect") for n in rng.normal(size=(2, size, size))])
  u *= amplitude_px / np.sqrt(np.mean(u**2))
  yy, xx = np.mgrid[:size, :size].astype(np.float64)
  true_map = np.stack([xx + 20.0 + u[0], yy + 20.0 + u[1]], axis=-1)
  fixed = ndi.map_coordinates(moving, [true_map[..., 1], true_map[..., 0]], order=1).astype(np.float32)
  return fixed, moving, true_map


def map_error_px(transform, true_map: np.ndarray, margin: int = 4) -> float:
  """Mean distance (px) between where `transform` (affine or B-spline) and the true map of `deformed_pair` send
  the fixed pixel centres, `margin` px from the border excluded."""
  from msisynth.geometry import transforms as tf
  from msisynth.register import bspline

  grid = np.asarray(tf.fixed_grid_um(true_map.shape[:2]), np.float64)
  got = bspline.apply_points(transform, grid.reshape(-1, 2)).reshape(grid.shape)
  return float(np.linalg.norm(got - true_map, axis=-1)[margin:-margin, margin:-margin].mean())
