"""Flax Linen networks of pix2pix: the U-Net generator and the PatchGAN discriminator.

Layout: NHWC. The generator takes MSI patches (B, H, W, k) float32 in [-1, 1] (any k, read from the input) and
returns synthetic H&E (B, H, W, out_channels) in [-1, 1] (tanh). The discriminator takes the channel
concatenation of MSI and (real or synthetic) H&E and returns logits, one per patch: (B, H', W', 1).

At the default settings the networks are those of pix2pix (Isola et al., 2017) and of the PyTorch reference in
`shared/bench/pix2pix_torch_reference.py`: UNet-256 (depth 8, ngf 64, widths capped at 8·ngf, batch norm,
dropout 0.5 in the three inner decoder blocks; 54,427,267 parameters at 16 input channels) and the 70×70
PatchGAN (n_layers 3, ndf 64; 2,782,017 parameters for 16 + 3 input channels). Weights are initialised as
pix2pix does: convolution kernels N(0, 0.02), biases 0, batch-norm scales N(1, 0.02).

`dtype` sets the compute dtype (bfloat16 for mixed precision); parameters stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msisynth import errors

NORMS = ("batch", "instance", "none")
DISCRIMINATORS = ("patch", "pixel")

# Random numbers are drawn as a flat vector and reshaped: the same distribution, and XLA:CPU compiles the
# partitionable threefry generator for rank-3+ shapes many times more slowly than for a vector.


def _flat_normal(key: jax.Array, shape, dtype) -> jax.Array:
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def conv_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """pix2pix's `init_weights(net, "normal", gain=0.02)`: kernels ~ N(0, 0.02)."""
  return 0.02 * _flat_normal(key, shape, dtype)


def _scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  return 1.0 + 0.02 * _flat_normal(key, shape, dtype)


class Dropout(nn.Module):
  """Inverted dropout (as `flax.linen.Dropout`) drawing its mask as a flat vector (see `_flat_normal`).

  Attributes:
    rate: probability of zeroing an element.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0:
      return x
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, (x.size,)).reshape(x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x)).astype(x.dtype)


def _norm_layer(norm: str, train: bool, dtype: Any) -> Callable[..., nn.Module] | None:
  """The normalisation layer factory for `norm`, or None for "none"."""
  if norm == "batch":
    # momentum 0.9 and eps 1e-5 are torch.nn.BatchNorm2d's defaults (its momentum 0.1 weights the new batch).
    return partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=_scale_init, dtype=dtype
    )
  if norm == "instance":
    # pix2pix's instance norm has no affine parameters and keeps no running statistics.
    return partial(nn.InstanceNorm, use_scale=False, use_bias=False, epsilon=1e-5, dtype=dtype)
  if norm == "none":
    return None
  raise errors.ConfigError(f"norm must be one of {NORMS}, got {norm!r}")


def unet_widths(depth: int, ngf: int, max_mult: int) -> list[int]:
  """Feature widths of the U-Net encoder levels: ngf · min(2**i, max_mult) for i < depth."""
  return [ngf * min(2**i, max_mult) for i in range(depth)]


class UNetGenerator(nn.Module):
  """pix2pix U-Net generator with skip connections between mirrored levels.

  Each of the `depth` levels halves the spatial size with a 4×4 stride-2 convolution, so the input height and
  width must be divisible by 2**depth (depth 8 takes 256×256 down to 1×1). The decoder mirrors the encoder
  with 4×4 stride-2 transposed convolutions; each decoder level sees its own output concatenated with the
  encoder features of the same level.

  Attributes:
    depth: number of downsamplings.
    ngf: width of the first level.
    max_mult: widths are capped at ngf · max_mult.
    out_channels: output channels (3 for RGB), passed through tanh.
    dropout_rate: dropout in the decoder blocks whose input and output widths are both the cap (pix2pix's
      "inner" blocks: three of them in UNet-256); 0 disables it.
    norm: "batch", "instance" or "none". Convolutions have no bias before batch norm, as in pix2pix.
    dtype: compute dtype; parameters are float32.
  """

  depth: int = 8
  ngf: int = 64
  max_mult: int = 8
  out_channels: int = 3
  dropout_rate: float = 0.5
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Synthesises an image.

    Args:
      x: (B, H, W, k) input, H and W divisible by 2**depth.
      train: batch statistics and dropout when True; running averages and no dropout when False.

    Returns:
      (B, H, W, out_channels) in [-1, 1], in the compute dtype.

    Raises:
      ConfigError: on a wrong rank or a size not divisible by 2**depth.
    """
    if self.depth < 2:
      raise errors.ConfigError(f"U-Net depth must be at least 2, got {self.depth}")
    if x.ndim != 4:
      raise errors.ConfigError(f"generator input must be (batch, height, width, channels), got shape {x.shape}")
    check_divisible(x.shape[1:3], self.depth)
    norm = _norm_layer(self.norm, train, self.dtype)
    use_bias = norm is None or self.norm != "batch"
    conv = partial(
      nn.Conv,
      kernel_size=(4, 4),
      strides=(2, 2),
      padding=((1, 1), (1, 1)),
      kernel_init=conv_init,
      use_bias=use_bias,
      dtype=self.dtype,
    )
    # torch's ConvTranspose2d(k=4, s=2, p=1) is a stride-2 transposed convolution with k - 1 - p = 2 pixels of
    # padding on each side of the dilated input; that doubles the size exactly.
    upconv = partial(
      nn.ConvTranspose,
      kernel_size=(4, 4),
      strides=(2, 2),
      padding=((2, 2), (2, 2)),
      kernel_init=conv_init,
      dtype=self.dtype,
    )
    widths = unet_widths(self.depth, self.ngf, self.max_mult)
    last = self.depth - 1

    h = x.astype(self.dtype)
    skips = []
    for i in range(self.depth):
      h = conv(widths[i], name=f"down{i}")(h)
      if 0 < i < last and norm is not None:
        h = norm(name=f"down_norm{i}")(h)
      if i < last:
        # The reference applies this LeakyReLU in place, so the skip connection carries activated features.
        h = nn.leaky_relu(h, 0.2)
        skips.append(h)
    for i in reversed(range(self.depth)):
      if i < last:
        h = jnp.concatenate([skips[i], h], axis=-1)
      h = nn.relu(h)
      if i == 0:
        h = upconv(self.out_channels, use_bias=True, name="up0")(h)
        return jnp.tanh(h)
      h = upconv(widths[i - 1], use_bias=use_bias, name=f"up{i}")(h)
      if norm is not None:
        h = norm(name=f"up_norm{i}")(h)
      if i < last and widths[i] == widths[i - 1] == self.ngf * self.max_mult and self.dropout_rate > 0:
        h = Dropout(self.dropout_rate, name=f"dropout{i}")(h, deterministic=not train)
    raise AssertionError("unreachable")


class PatchDiscriminator(nn.Module):
  """pix2pix PatchGAN discriminator: one real/fake logit per overlapping patch.

  `kind="patch"` with n_layers=3 is the 70×70 PatchGAN: three 4×4 stride-2 convolutions, one stride-1, then a
  stride-1 convolution to one channel (256×256 in → 30×30 logits). `kind="pixel"` is the 1×1 PixelGAN.

  Attributes:
    n_layers: number of stride-2 convolutions of the patch variant (receptive field 70 px at 3).
    ndf: width of the first layer; widths are capped at ndf · 8.
    norm: "batch", "instance" or "none".
    kind: "patch" or "pixel".
    dtype: compute dtype; parameters are float32.
  """

  n_layers: int = 3
  ndf: int = 64
  norm: str = "batch"
  kind: str = "patch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Scores an (MSI, H&E) pair.

    Args:
      x: (B, H, W, k + 3) MSI and H&E concatenated on channels.
      train: batch statistics when True, running averages when False.

    Returns:
      (B, H', W', 1) logits in the compute dtype.

    Raises:
      ConfigError: on an unknown kind or norm, or an input too small for the patch variant.
    """
    if x.ndim != 4:
      raise errors.ConfigError(f"discriminator input must be (batch, height, width, channels), got shape {x.shape}")
    norm = _norm_layer(self.norm, train, self.dtype)
    use_bias = norm is None or self.norm != "batch"
    h = x.astype(self.dtype)
    if self.kind == "pixel":
      conv = partial(nn.Conv, kernel_size=(1, 1), kernel_init=conv_init, dtype=self.dtype)
      h = nn.leaky_relu(conv(self.ndf, use_bias=True, name="conv0")(h), 0.2)
      h = conv(self.ndf * 2, use_bias=use_bias, name="conv1")(h)
      if norm is not None:
        h = norm(name="norm1")(h)
      h = nn.leaky_relu(h, 0.2)
      return conv(1, use_bias=use_bias, name="conv2")(h)
    if self.kind != "patch":
      raise errors.ConfigError(f"discriminator kind must be one of {DISCRIMINATORS}, got {self.kind!r}")
    if self.n_layers < 1:
      raise errors.ConfigError(f"discriminator n_layers must be at least 1, got {self.n_layers}")
    size = min(x.shape[1:3])
    out = size // 2**self.n_layers - 2
    if out < 1:
      raise errors.ConfigError(
        f"a {self.n_layers}-layer PatchGAN needs inputs of at least {3 * 2**self.n_layers} pixels, got "
        f"{tuple(x.shape[1:3])}"
      )
    conv = partial(nn.Conv, kernel_size=(4, 4), padding=((1, 1), (1, 1)), kernel_init=conv_init, dtype=self.dtype)
    h = nn.leaky_relu(conv(self.ndf, strides=(2, 2), use_bias=True, name="conv0")(h), 0.2)
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * min(2**n, 8), strides=(stride, stride), use_bias=use_bias, name=f"conv{n}")(h)
      if norm is not None:
        h = norm(name=f"norm{n}")(h)
      h = nn.leaky_relu(h, 0.2)
    return conv(1, strides=(1, 1), use_bias=True, name=f"conv{self.n_layers + 1}")(h)


def check_divisible(size: tuple[int, ...], depth: int) -> None:
  """Raises ConfigError unless every entry of `size` (pixels) is divisible by 2**depth."""
  factor = 2**depth
  if any(int(s) % factor for s in size) or any(int(s) < factor for s in size):
    raise errors.ConfigError(
      f"input size {tuple(int(s) for s in size)} is not a positive multiple of 2**depth = {factor} "
      f"(U-Net depth {depth}); crop or pad the input, or lower model.depth"
    )


def _compute_dtype(config) -> Any:
  precision = config.get("precision", "float32")
  if precision in ("float32", "fp32"):
    return jnp.float32
  if precision in ("bfloat16", "bf16"):
    return jnp.bfloat16
  raise errors.ConfigError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")


def generator_from_config(config) -> UNetGenerator:
  """The generator described by `config.model` (and the compute dtype by `config.precision`).

  Args:
    config: a ConfigDict with `model.{depth, ngf, max_mult, dropout_rate, norm}` and optionally `precision`
      ("float32" | "bfloat16"); `model.out_channels` defaults to 3.

  Returns:
    An unbound UNetGenerator.

  Raises:
    ConfigError: on an unknown normalisation or precision.
  """
  m = config.model
  if m.norm not in NORMS:
    raise errors.ConfigError(f"model.norm must be one of {NORMS}, got {m.norm!r}")
  return UNetGenerator(
    depth=int(m.depth),
    ngf=int(m.ngf),
    max_mult=int(m.max_mult),
    out_channels=int(m.get("out_channels", 3)),
    dropout_rate=float(m.dropout_rate),
    norm=m.norm,
    dtype=_compute_dtype(config),
  )


def discriminator_from_config(config) -> PatchDiscriminator:
  """The discriminator described by `config.model` (`d_layers`, `ndf`, `d_kind`, `norm`) and `config.precision`.

  Raises:
    ConfigError: on an unknown kind, normalisation or precision.
  """
  m = config.model
  if m.d_kind not in DISCRIMINATORS:
    raise errors.ConfigError(f"model.d_kind must be one of {DISCRIMINATORS}, got {m.d_kind!r}")
  if m.norm not in NORMS:
    raise errors.ConfigError(f"model.norm must be one of {NORMS}, got {m.norm!r}")
  return PatchDiscriminator(
    n_layers=int(m.d_layers), ndf=int(m.ndf), norm=m.norm, kind=m.d_kind, dtype=_compute_dtype(config)
  )


def init_variables(module: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
  """Variables of `module` for inputs of `input_shape`, initialised as pix2pix does, from one random draw.

  The result has the structure of `module.init(key, x, train=False)` and the same distributions (kernels
  N(0, 0.02), batch-norm scales N(1, 0.02), biases 0, running means 0 and variances 1), but every random value
  comes from a single normal draw. XLA:CPU compiles each random draw of an initialiser separately and slowly, so
  one draw starts training several times faster on CPUs; the values differ from `module.init`'s.

  Args:
    module: a UNetGenerator or PatchDiscriminator (or any module whose variables are conv kernels and biases
      and batch-norm scales, biases and statistics).
    key: a JAX key.
    input_shape: NHWC shape of an input.

  Returns:
    {"params": ..., ["batch_stats": ...]}.

  Raises:
    ConfigError: for a variable this scheme does not know.
  """
  abstract = jax.eval_shape(partial(module.init, train=False), jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  names = [(str(getattr(path[0], "key", path[0])), str(getattr(path[-1], "key", path[-1]))) for path, _ in leaves]
  random = [(c, n) == ("params", "kernel") or (c, n) == ("params", "scale") for c, n in names]
  total = sum(leaf.size for (_, leaf), r in zip(leaves, random) if r)
  draw = jax.random.normal(key, (max(total, 1),), jnp.float32)
  out, offset = [], 0
  for (path, leaf), (collection, name), r in zip(leaves, names, random):
    if r:
      value = 0.02 * draw[offset : offset + leaf.size].reshape(leaf.shape)
      offset += leaf.size
      value = value + 1.0 if name == "scale" else value
    elif (collection, name) in (("params", "bias"), ("batch_stats", "mean")):
      value = jnp.zeros(leaf.shape, jnp.float32)
    elif (collection, name) == ("batch_stats", "var"):
      value = jnp.ones(leaf.shape, jnp.float32)
    else:
      raise errors.ConfigError(f"init_variables does not know how to initialise {jax.tree_util.keystr(path)}")
    out.append(value.astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
