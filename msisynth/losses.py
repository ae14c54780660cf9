"""GAN and reconstruction losses of pix2pix, as pure functions.

Layout: discriminator outputs are logits of any shape (PatchGAN: (B, H', W', 1)); images are NHWC in [-1, 1].
Every loss is computed in float32 whatever the input dtype (bfloat16 activations under mixed precision) and
returns a scalar float32 mean.

GAN modes (pix2pix's `--gan_mode`):
  - "vanilla": the logistic loss on logits, -log σ(x) for "real" and -log(1 - σ(x)) for "fake"
    (torch's BCEWithLogitsLoss).
  - "lsgan": least squares, (x - 1)² for "real" and x² for "fake" (Mao et al., 2017).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from msisynth import errors

GAN_MODES = ("vanilla", "lsgan")


def gan_loss(logits: ArrayLike, target_is_real: bool, mode: str = "vanilla") -> jax.Array:
  """Mean GAN loss of discriminator outputs against an all-real or all-fake target.

  Args:
    logits: discriminator outputs (logits for "vanilla", raw scores for "lsgan"), any shape.
    target_is_real: whether the target label is "real" (1) or "fake" (0).
    mode: "vanilla" or "lsgan".

  Returns:
    Scalar float32.

  Raises:
    ConfigError: on an unknown mode.
  """
  logits = jnp.asarray(logits, jnp.float32)
  target = jnp.full_like(logits, 1.0 if target_is_real else 0.0)
  if mode == "vanilla":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  if mode == "lsgan":
    return jnp.mean(jnp.square(logits - target))
  raise errors.ConfigError(f"gan mode must be one of {GAN_MODES}, got {mode!r}")


def discriminator_loss(real_logits: ArrayLike, fake_logits: ArrayLike, mode: str = "vanilla") -> jax.Array:
  """pix2pix discriminator loss: 0.5 · (loss(real → 1) + loss(fake → 0)).

  The factor 0.5 slows D relative to G, as pix2pix does.

  Args:
    real_logits: D on (MSI, real H&E).
    fake_logits: D on (MSI, synthetic H&E), with the generator's output detached.
    mode: "vanilla" or "lsgan".

  Returns:
    Scalar float32.
  """
  return 0.5 * (gan_loss(real_logits, True, mode) + gan_loss(fake_logits, False, mode))


def generator_gan_loss(fake_logits: ArrayLike, mode: str = "vanilla") -> jax.Array:
  """Non-saturating generator loss: D's outputs on synthetic images scored against "real"."""
  return gan_loss(fake_logits, True, mode)


def l1_loss(prediction: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
  """Mean absolute error, optionally restricted to a mask.

  Args:
    prediction: (..., H, W, C) images.
    target: same shape as `prediction`.
    mask: optional (..., H, W) or (..., H, W, 1) weights (bool or float); the mean is then taken over the
      masked pixels (and all channels) only. An all-zero mask gives 0.

  Returns:
    Scalar float32.

  Raises:
    ConfigError: when the shapes do not match.
  """
  prediction = jnp.asarray(prediction, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  if prediction.shape != target.shape:
    raise errors.ConfigError(f"L1 loss: prediction shape {prediction.shape} != target shape {target.shape}")
  err = jnp.abs(prediction - target)
  if mask is None:
    return jnp.mean(err)
  mask = jnp.asarray(mask, jnp.float32)
  if mask.ndim == err.ndim - 1:
    mask = mask[..., None]
  if mask.shape[:-1] != err.shape[:-1] or mask.shape[-1] != 1:
    raise errors.ConfigError(f"L1 loss: mask shape {mask.shape} does not match images {err.shape}")
  total = jnp.sum(err * mask)
  count = jnp.sum(mask) * err.shape[-1]
  return total / jnp.maximum(count, 1.0)


RECON_LOSSES = ("l1", "shift_l1")


def shift_tolerant_l1_loss(prediction: ArrayLike, target: ArrayLike, max_shift: int = 2,
                           mask: ArrayLike | None = None) -> jax.Array:  # fmt: skip
  """L1 that forgives a small misalignment: per image, the least mean |prediction − shifted target| over shifts.

  For training pairs whose histology is only roughly aligned with the MSI (pairs built from landmarks or a coarse
  registration), plain L1 punishes the generator for the pair's misalignment and teaches it to blur. Here each
  image of the batch is compared with the target translated by every integer shift (dy, dx) in [−s, s]², over the
  central window that all shifts cover (the border of width s is ignored), and the smallest mean error counts.
  With `max_shift` 0 it is `l1_loss`.

  Args:
    prediction: (B, H, W, C) images, H and W > 2 s.
    target: same shape.
    max_shift: s, the largest shift in pixels.
    mask: optional (B, H, W) or (B, H, W, 1) weights, shifted with the target.

  Returns:
    Scalar float32: the mean over the batch of each image's least shifted L1.

  Raises:
    ConfigError: for mismatched shapes, a negative shift or one too large for the images.
  """
  prediction = jnp.asarray(prediction, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  s = int(max_shift)
  if prediction.shape != target.shape or prediction.ndim != 4:
    raise errors.ConfigError(f"shift-tolerant L1: prediction {prediction.shape} and target {target.shape} must be one "
                             "(B, H, W, C) shape")  # fmt: skip
  if s < 0 or 2 * s >= min(prediction.shape[1:3]):
    raise errors.ConfigError(f"shift-tolerant L1: max_shift must be in [0, {(min(prediction.shape[1:3]) - 1) // 2}], "
                             f"got {max_shift}")  # fmt: skip
  if s == 0:
    return l1_loss(prediction, target, mask)
  h, w = prediction.shape[1:3]
  centre = prediction[:, s:h - s, s:w - s]
  if mask is None:
    weights = jnp.ones(target.shape[:3] + (1,), jnp.float32)
  else:
    weights = jnp.asarray(mask, jnp.float32)
    weights = weights[..., None] if weights.ndim == 3 else weights
  errs = []
  for dy in range(-s, s + 1):
    for dx in range(-s, s + 1):
      t = target[:, s + dy:h - s + dy, s + dx:w - s + dx]
      m = weights[:, s + dy:h - s + dy, s + dx:w - s + dx]
      total = jnp.sum(jnp.abs(centre - t) * m, axis=(1, 2, 3))
      count = jnp.sum(m, axis=(1, 2, 3)) * prediction.shape[-1]
      errs.append(total / jnp.maximum(count, 1.0))
  return jnp.mean(jnp.min(jnp.stack(errs, axis=0), axis=0))


def pix2pix_generator_loss(
  fake_logits: ArrayLike | None,
  fake: ArrayLike,
  real: ArrayLike,
  *,
  gan_weight: float = 1.0,
  l1_weight: float = 100.0,
  mode: str = "vanilla",
  mask: ArrayLike | None = None,
  recon_loss: str = "l1",
  max_shift: int = 2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """pix2pix generator objective: gan_weight · GAN + l1_weight · L1 (λ = 100 in the paper).

  Args:
    fake_logits: D on (MSI, synthetic H&E); None when gan_weight is 0 (the U-Net baseline, L1 only).
    fake: synthetic H&E.
    real: real H&E.
    gan_weight: weight of the adversarial term.
    l1_weight: λ, the weight of the L1 term.
    mode: GAN mode.
    mask: optional mask for the L1 term (see `l1_loss`).
    recon_loss: "l1" (the paper's) or "shift_l1" (`shift_tolerant_l1_loss`, for roughly aligned pairs).
    max_shift: the largest shift of "shift_l1", in pixels.

  Returns:
    (total loss, {"g_gan": unweighted adversarial loss, "g_l1": unweighted L1}).
  """
  if recon_loss == "l1":
    l1 = l1_loss(fake, real, mask)
  elif recon_loss == "shift_l1":
    l1 = shift_tolerant_l1_loss(fake, real, max_shift, mask)
  else:
    raise errors.ConfigError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
  if gan_weight == 0 or fake_logits is None:
    gan = jnp.zeros((), jnp.float32)
    total = l1_weight * l1
  else:
    gan = generator_gan_loss(fake_logits, mode)
    total = gan_weight * gan + l1_weight * l1
  return total, {"g_gan": gan, "g_l1": l1}
