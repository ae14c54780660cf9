"""Tests of msisynth.models: shapes, exact parameter counts, the pix2pix reference sizes, initialisation."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msisynth import errors, models


def _init_shapes(module, shape):
  """Variable shapes of `module` on an input of `shape`, without compiling anything."""
  return jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), jnp.zeros(shape))


def unet_param_count(k, out, ngf, depth, max_mult, norm):
  """Hand formula: 4x4 kernels; bias on every conv except before batch norm; affine (2 per channel) for batch."""
  c = [ngf * min(2**i, max_mult) for i in range(depth)]
  bias = norm != "batch"
  affine = 2 if norm == "batch" else 0
  n = 0
  for i in range(depth):  # encoder: norm on every level but the first and the innermost
    n += 16 * (k if i == 0 else c[i - 1]) * c[i] + (c[i] if bias else 0)
    n += affine * c[i] if 0 < i < depth - 1 else 0
  for i in range(depth):  # decoder: input is the skip concatenation except at the innermost level
    cin = c[i] if i == depth - 1 else 2 * c[i]
    cout = out if i == 0 else c[i - 1]
    n += 16 * cin * cout + (cout if bias or i == 0 else 0) + (affine * cout if i > 0 else 0)
  return n


def patch_param_count(cin, ndf, n_layers, norm):
  bias = norm != "batch"
  affine = 2 if norm == "batch" else 0
  n, prev = 16 * cin * ndf + ndf, ndf
  for i in range(1, n_layers + 1):
    nf = ndf * min(2**i, 8)
    n += 16 * prev * nf + (nf if bias else 0) + affine * nf
    prev = nf
  return n + 16 * prev + 1


def torch_reference_counts(cin, cout=3, ngf=64, ndf=64):
  """Parameter counts of shared/bench/pix2pix_torch_reference.py, layer by layer as its code builds them."""
  conv = lambda i, o, bias: 16 * i * o + (o if bias else 0)
  bn = lambda c: 2 * c

  def block(outer, inner, sub=0, cin_=None, outermost=False, innermost=False):
    cin_ = cin_ or outer
    n = conv(cin_, inner, False)  # dconv, bias=False
    if outermost:
      return n + sub + conv(inner * 2, outer, True)  # up with bias, tanh
    if innermost:
      return n + conv(inner, outer, False) + bn(outer)
    return n + bn(inner) + sub + conv(inner * 2, outer, False) + bn(outer)

  b = block(ngf * 8, ngf * 8, innermost=True)
  for _ in range(3):
    b = block(ngf * 8, ngf * 8, b)
  b = block(ngf * 4, ngf * 8, b)
  b = block(ngf * 2, ngf * 4, b)
  b = block(ngf, ngf * 2, b)
  g = block(cout, ngf, b, cin_=cin, outermost=True)
  d_in = cin + cout
  d = (
    conv(d_in, ndf, True)
    + conv(ndf, ndf * 2, False)
    + bn(ndf * 2)
    + conv(ndf * 2, ndf * 4, False)
    + bn(ndf * 4)
    + conv(ndf * 4, ndf * 8, False)
    + bn(ndf * 8)
    + conv(ndf * 8, 1, True)
  )
  return g, d


def _config(**model):
  base = dict(
    depth=8, ngf=64, max_mult=8, out_channels=3, dropout_rate=0.5, norm="batch", d_kind="patch", d_layers=3, ndf=64
  )
  base.update(model)
  return ml_collections.ConfigDict({"model": base, "precision": "float32"})


def test_default_config_matches_torch_reference_sizes():
  g_ref, d_ref = torch_reference_counts(16)
  assert (g_ref, d_ref) == (54_427_267, 2_782_017)  # "54.4M" and "2.78M" in the reference's docstring
  config = _config()
  g = _init_shapes(models.generator_from_config(config), (1, 256, 256, 16))
  d = _init_shapes(models.discriminator_from_config(config), (1, 256, 256, 19))
  assert models.count_params(g["params"]) == g_ref
  assert models.count_params(d["params"]) == d_ref
  assert unet_param_count(16, 3, 64, 8, 8, "batch") == g_ref
  assert patch_param_count(19, 64, 3, "batch") == d_ref


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
@pytest.mark.parametrize("k,ngf,depth,max_mult", [(5, 8, 4, 2), (1, 4, 3, 8), (7, 6, 5, 4)])
def test_generator_param_count_small(norm, k, ngf, depth, max_mult):
  g = models.UNetGenerator(depth=depth, ngf=ngf, max_mult=max_mult, norm=norm)
  v = _init_shapes(g, (2, 2**depth * 2, 2**depth, k))
  assert models.count_params(v["params"]) == unet_param_count(k, 3, ngf, depth, max_mult, norm)
  assert ("batch_stats" in v) == (norm == "batch")


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_patch_discriminator_param_count_and_output(norm, n_layers):
  d = models.PatchDiscriminator(n_layers=n_layers, ndf=4, norm=norm)
  size = 64
  v = _init_shapes(d, (2, size, size, 6))
  assert models.count_params(v["params"]) == patch_param_count(6, 4, n_layers, norm)
  out = jax.eval_shape(
    lambda x: d.init_with_output(jax.random.key(0), x, train=False)[0], jnp.zeros((2, size, size, 6))
  )
  side = size // 2**n_layers - 2  # n_layers stride-2 convolutions, then two 4x4 stride-1 ones with padding 1
  assert out.shape == (2, side, side, 1)


def test_patchgan_70_gives_30x30_at_256():
  d = models.PatchDiscriminator()
  out = jax.eval_shape(lambda x: d.init_with_output(jax.random.key(0), x, train=False)[0], jnp.zeros((1, 256, 256, 19)))
  assert out.shape == (1, 30, 30, 1)


def test_pixel_discriminator():
  d = models.PatchDiscriminator(kind="pixel", ndf=4)
  v = _init_shapes(d, (1, 8, 8, 6))
  assert models.count_params(v["params"]) == (6 * 4 + 4) + 4 * 8 + 2 * 8 + 8 * 1
  out = jax.eval_shape(lambda x: d.init_with_output(jax.random.key(0), x, train=False)[0], jnp.zeros((1, 8, 8, 6)))
  assert out.shape == (1, 8, 8, 1)


@pytest.mark.parametrize("size", [(24, 32), (8, 8), (48, 40)])
def test_size_not_divisible_raises(size):
  g = models.UNetGenerator(depth=4, ngf=4)
  with pytest.raises(errors.ConfigError, match=r"input size .* 2\*\*depth = 16 \(U-Net depth 4\)"):
    _init_shapes(g, (1, *size, 3))


def test_bad_options_raise():
  with pytest.raises(errors.ConfigError, match="norm"):
    models.generator_from_config(_config(norm="layer"))
  with pytest.raises(errors.ConfigError, match="d_kind"):
    models.discriminator_from_config(_config(d_kind="global"))
  with pytest.raises(errors.ConfigError, match="at least 24 pixels"):
    _init_shapes(models.PatchDiscriminator(n_layers=3, ndf=4), (1, 16, 16, 4))


def test_initialisers_follow_pix2pix():
  kernel = np.asarray(models.conv_init(jax.random.key(0), (4, 4, 32, 64)))
  assert abs(kernel.std() - 0.02) < 0.001 and abs(kernel.mean()) < 0.001  # N(0, 0.02)
  scale = np.asarray(models._scale_init(jax.random.key(1), (4096,)))
  assert abs(scale.mean() - 1) < 0.002 and abs(scale.std() - 0.02) < 0.002  # batch-norm scales N(1, 0.02)


def test_generator_forward_init_and_dropout():
  g = models.UNetGenerator(depth=3, ngf=16, max_mult=1)  # widths 16, 16, 16: dropout in decoder level 1
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 5), minval=-1, maxval=1)
  v = jax.jit(models.init_variables, static_argnums=(0, 2))(g, jax.random.key(0), (2, 16, 16, 5))
  # The one-draw initialisation has module.init's structure, shapes and distributions.
  abstract = _init_shapes(g, (2, 16, 16, 5))
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(abstract)
  assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(abstract)))
  assert set(v["params"]) == {"down0", "down1", "down2", "down_norm1", "up0", "up1", "up2", "up_norm1", "up_norm2"}
  kernels = np.concatenate([np.ravel(p["kernel"]) for p in v["params"].values() if "kernel" in p])
  assert abs(kernels.std() - 0.02) < 0.002 and abs(kernels.mean()) < 0.002
  scale = np.concatenate([np.ravel(p["scale"]) for p in v["params"].values() if "scale" in p])
  assert abs(scale.mean() - 1) < 0.01 and 0.005 < scale.std() < 0.04
  assert all(np.all(np.asarray(p["bias"]) == 0) for p in v["params"].values() if "bias" in p)
  assert all(np.all(np.asarray(s["var"]) == 1) for s in v["batch_stats"].values())

  @jax.jit
  def run(v, x, key):
    train_out, _ = g.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    return train_out, g.apply(v, x, train=False)

  a, ev1 = run(v, x, jax.random.key(2))
  b, ev2 = run(v, x, jax.random.key(3))
  assert a.shape == (2, 16, 16, 3) and a.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(a))) <= 1.0
  assert not np.allclose(a, b)  # dropout differs with the key in training mode
  np.testing.assert_array_equal(ev1, ev2)  # inference mode is deterministic


def test_bfloat16_compute_keeps_float32_params():
  config = _config(depth=3, ngf=4)
  config.precision = "bfloat16"
  g = models.generator_from_config(config)
  v = _init_shapes(g, (1, 16, 16, 2))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(v["params"]))
  out = jax.eval_shape(lambda v, x: g.apply(v, x, train=False), v, jnp.zeros((1, 16, 16, 2)))
  assert out.dtype == jnp.bfloat16
