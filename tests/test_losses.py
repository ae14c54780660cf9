"""Tests of msisynth.losses against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msisynth import errors, losses


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_vanilla_gan_loss_is_binary_cross_entropy_on_logits():
  logits = np.array([[-3.0, -0.5], [0.0, 2.5]], np.float32)
  want_real = np.mean(-np.log(_sigmoid(logits)))
  want_fake = np.mean(-np.log(1 - _sigmoid(logits)))
  np.testing.assert_allclose(losses.gan_loss(logits, True, "vanilla"), want_real, rtol=1e-6)
  np.testing.assert_allclose(losses.gan_loss(logits, False, "vanilla"), want_fake, rtol=1e-6)
  # Large logits stay finite (computed from logits, not from probabilities).
  assert np.isfinite(float(losses.gan_loss(jnp.array([200.0, -200.0]), True)))


def test_lsgan_loss():
  x = np.array([0.2, 1.5, -1.0], np.float32)
  np.testing.assert_allclose(losses.gan_loss(x, True, "lsgan"), np.mean((x - 1) ** 2), rtol=1e-6)
  np.testing.assert_allclose(losses.gan_loss(x, False, "lsgan"), np.mean(x**2), rtol=1e-6)


def test_discriminator_and_generator_losses():
  real, fake = np.array([1.0, 2.0]), np.array([-1.0, 0.5])
  d = losses.discriminator_loss(real, fake)
  np.testing.assert_allclose(
    d, 0.5 * (np.mean(-np.log(_sigmoid(real))) + np.mean(-np.log(1 - _sigmoid(fake)))), rtol=1e-6
  )
  np.testing.assert_allclose(losses.generator_gan_loss(fake), np.mean(-np.log(_sigmoid(fake))), rtol=1e-6)
  # At D's chance level (logits 0) both losses are log 2.
  np.testing.assert_allclose(losses.discriminator_loss(np.zeros(4), np.zeros(4)), np.log(2), rtol=1e-6)


def test_losses_are_float32_for_bfloat16_inputs():
  x = jnp.array([0.3, -0.7], jnp.bfloat16)
  assert losses.gan_loss(x, True).dtype == jnp.float32
  assert losses.l1_loss(x, jnp.zeros_like(x)).dtype == jnp.float32


def test_l1_loss_with_and_without_mask():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
  np.testing.assert_allclose(losses.l1_loss(a, b), np.mean(np.abs(a - b)), rtol=1e-6)
  mask = rng.random((2, 4, 4)) > 0.5
  want = np.abs(a - b)[mask].mean()
  np.testing.assert_allclose(losses.l1_loss(a, b, mask), want, rtol=1e-5)
  np.testing.assert_allclose(losses.l1_loss(a, b, mask[..., None].astype(np.float32)), want, rtol=1e-5)
  assert float(losses.l1_loss(a, b, np.zeros((2, 4, 4)))) == 0.0
  with pytest.raises(errors.ConfigError, match="mask shape"):
    losses.l1_loss(a, b, np.ones((2, 4, 3)))
  with pytest.raises(errors.ConfigError, match="prediction shape"):
    losses.l1_loss(a, b[..., :2])


def test_pix2pix_generator_loss_weights():
  fake_logits = np.array([0.3, -0.2])
  fake, real = np.full((1, 2, 2, 3), 0.5), np.zeros((1, 2, 2, 3))
  total, parts = losses.pix2pix_generator_loss(fake_logits, fake, real, gan_weight=1.0, l1_weight=100.0)
  np.testing.assert_allclose(parts["g_l1"], 0.5)
  np.testing.assert_allclose(total, losses.generator_gan_loss(fake_logits) + 50.0, rtol=1e-6)
  total, parts = losses.pix2pix_generator_loss(None, fake, real, gan_weight=0.0, l1_weight=100.0)
  np.testing.assert_allclose(total, 50.0)
  assert float(parts["g_gan"]) == 0.0


def test_unknown_mode_raises():
  with pytest.raises(errors.ConfigError, match="wgan"):
    losses.gan_loss(np.zeros(2), True, "wgan")


def test_shift_tolerant_l1_forgives_a_small_shift_only():
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  shifted = jnp.roll(target, (1, -2), axis=(1, 2))  # the prediction sees the target moved by (1, -2) px
  assert float(losses.l1_loss(shifted, target)) > 0.3
  assert float(losses.shift_tolerant_l1_loss(shifted, target, max_shift=2)) == pytest.approx(0.0, abs=1e-6)
  assert float(losses.shift_tolerant_l1_loss(shifted, target, max_shift=1)) > 0.3
  assert float(losses.shift_tolerant_l1_loss(shifted, target, max_shift=0)) == pytest.approx(
    float(losses.l1_loss(shifted, target)))
  grad = jax.grad(lambda p: losses.shift_tolerant_l1_loss(p, target, max_shift=2))(shifted + 0.1)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_shift_tolerant_l1_options_and_generator_loss():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(errors.ConfigError, match="max_shift"):
    losses.shift_tolerant_l1_loss(x, x, max_shift=4)
  total, parts = losses.pix2pix_generator_loss(None, x + 0.5, x, gan_weight=0.0, l1_weight=2.0,
                                               recon_loss="shift_l1", max_shift=1)  # fmt: skip
  assert float(parts["g_l1"]) == pytest.approx(0.5) and float(total) == pytest.approx(1.0)
  with pytest.raises(errors.ConfigError, match="recon_loss"):
    losses.pix2pix_generator_loss(None, x, x, gan_weight=0.0, recon_loss="l2")
