"""Tests of msisynth.synthesize: tiled whole-image synthesis, restoring a generator, saving the result."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msisynth import checkpoint, errors, models, preprocess, synthesize, train
from msisynth import io as msi_io
from msisynth.types import MSIImage

# A depth-2 U-Net has a receptive-field radius of 9 pixels and a size multiple of 4. With tiles of 64 and an
# overlap of 48, the zero band of each tile edge (overlap // 4 = 12) exceeds that radius, and the stride (16) and
# the padding (overlap // 2 = 24) are multiples of 4, so tiling must reproduce a whole-image pass exactly away
# from the image border.
DEPTH, IN_CHANNELS, TILE, OVERLAP = 2, 3, 64, 48
INTERIOR_TOL = 1e-4


def _random_variables(generator, seed=0):
  """Variables of `generator` drawn in NumPy, with unit-gain kernels so that outputs are far from zero.

  The shapes come from `jax.eval_shape`, which compiles nothing: these tests need arbitrary weights, not the
  pix2pix initialisation, whose tiny outputs would make an absolute tolerance meaningless.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: generator.init(jax.random.key(0), jnp.zeros((1, 8, 8, IN_CHANNELS)), train=False))

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1]) / 4), leaf.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "var":  # running variance, so that inference mode differs from training mode
      value = rng.uniform(0.5, 2.0, leaf.shape)
    else:  # biases and running means
      value = rng.normal(0.0, 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _tiny_generator():
  generator = models.UNetGenerator(depth=DEPTH, ngf=4, dropout_rate=0.0)
  variables = _random_variables(generator)
  apply_fn = jax.jit(lambda x: generator.apply(variables, x, train=False))
  return generator, variables, apply_fn


def _msi_like(seed, height, width, channels=IN_CHANNELS):
  """A smooth random image in [-1, 1], as preprocessed MSI is."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (height // 4 + 2, width // 4 + 2, channels))
  fine = np.repeat(np.repeat(coarse, 4, 0), 4, 1)[:height, :width]
  return np.clip(0.7 * fine + 0.3 * rng.uniform(-1, 1, (height, width, channels)), -1, 1).astype(np.float32)


def test_blend_window_partition_of_unity():
  tile, overlap = 40, 16
  window = synthesize.blend_window(tile, overlap)
  np.testing.assert_array_equal(window[:4], 0.0)
  np.testing.assert_array_equal(window[-4:], 0.0)
  np.testing.assert_array_equal(window[overlap - 4 : tile - overlap + 4], 1.0)
  np.testing.assert_allclose(window, window[::-1])
  stride = tile - overlap
  np.testing.assert_allclose(window[stride:] + window[:overlap], 1.0, atol=1e-6)


def test_tile_layout():
  layout = synthesize.tile_layout((70, 45), tile_size=32, overlap=8, size_multiple=8)
  # 70 + 2 * 4 px of padding needs 3 tiles 24 px apart (80 px); 45 + 8 needs 2 (56 px).
  assert layout == ((32, 32), (3, 2), ((4, 6), (4, 7)))
  assert layout.num_tiles == 6
  # A small image is one smaller tile, rounded up to the size multiple.
  assert synthesize.tile_layout((5, 3), tile_size=32, overlap=8, size_multiple=8) == (
    (16, 16),
    (1, 1),
    ((4, 7), (4, 9)),
  )


def test_tiled_equals_whole_image_pass_in_interior():
  _, _, apply_fn = _tiny_generator()
  x = _msi_like(0, 96, 112)
  whole = np.asarray(apply_fn(x[None]))[0]
  tiled = synthesize.synthesize_tiled(apply_fn, x, tile_size=TILE, overlap=OVERLAP, batch_size=5, size_multiple=4)
  assert tiled.shape == whole.shape == (96, 112, 3)
  border = 10  # the receptive-field radius: nearer the border, zero padding and reflection differ
  interior = (slice(border, -border), slice(border, -border))
  np.testing.assert_array_less(np.abs(tiled[interior] - whole[interior]), INTERIOR_TOL)
  assert np.std(whole) > 0.1  # the tolerance is small next to the outputs
  # Without overlap the tile joins show: the comparison is sensitive to them.
  seamed = synthesize.synthesize_tiled(apply_fn, x, tile_size=32, overlap=0, size_multiple=4)
  assert np.max(np.abs(seamed[interior] - whole[interior])) > 1e-2


def test_no_seams_on_constant_input():
  # On a constant input the stride-2 U-Net gives a pattern of period 4 (its transposed convolutions); a
  # seamless tiling reproduces that pattern everywhere, tile joins and image border included.
  _, _, apply_fn = _tiny_generator()
  x = np.full((90, 75, IN_CHANNELS), 0.4, np.float32)
  y = synthesize.synthesize_tiled(apply_fn, x, tile_size=TILE, overlap=OVERLAP, batch_size=8, size_multiple=4)
  period = np.asarray(apply_fn(np.full((1, 64, 64, IN_CHANNELS), 0.4, np.float32)))[0, 32:36, 32:36]
  assert np.ptp(period) > 1e-2  # the pattern is there to be matched
  expected = np.tile(period, (23, 19, 1))[:90, :75]
  np.testing.assert_allclose(y, expected, atol=INTERIOR_TOL)


@pytest.mark.parametrize("shape", [(70, 45), (5, 3), (1, 1), (300, 17)])
def test_pointwise_network_is_reproduced_at_any_size(shape):
  # A pointwise network tells the blending, padding and cropping apart from the network: the tiled output
  # must equal it at every pixel, whatever the size and however many tiles there are.
  calls = []

  def apply_fn(tiles):
    calls.append(tiles.shape)
    return jnp.tanh(2.0 * tiles[..., :2]) + tiles[..., 2:3]

  x = np.random.default_rng(1).uniform(-1, 1, shape + (3,)).astype(np.float32)
  y = synthesize.synthesize_tiled(apply_fn, x, tile_size=32, overlap=8, batch_size=3, size_multiple=8)
  expected = np.tanh(2.0 * x[..., :2]) + x[..., 2:3]
  assert y.shape == shape + (2,) and y.dtype == np.float32
  np.testing.assert_allclose(y, expected, atol=1e-6)
  # One tile shape and one batch size per image (a jitted network compiles once), never more than batch_size.
  assert len(set(calls)) == 1
  b, th, tw, _ = calls[0]
  assert b <= 3 and th % 8 == 0 and tw % 8 == 0 and th <= 32 and tw <= 32


def test_unet_runs_on_sizes_not_divisible_by_its_multiple():
  _, _, apply_fn = _tiny_generator()
  x = _msi_like(2, 70, 45)
  y = synthesize.synthesize_tiled(apply_fn, x, tile_size=TILE, overlap=OVERLAP, size_multiple=4)
  assert y.shape == (70, 45, 3)
  assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= 1.0)
  # The batch size only changes how tiles are grouped, not the result.
  y1 = synthesize.synthesize_tiled(apply_fn, x, tile_size=TILE, overlap=OVERLAP, batch_size=1, size_multiple=4)
  np.testing.assert_allclose(y, y1, atol=1e-6)


def test_bad_tiling_arguments():
  x = np.zeros((10, 10, 3), np.float32)
  identity = lambda t: t
  with pytest.raises(errors.ConfigError):
    synthesize.synthesize_tiled(identity, x, tile_size=32, overlap=32)
  with pytest.raises(errors.ConfigError):
    synthesize.synthesize_tiled(identity, x, tile_size=30, overlap=4, size_multiple=4)
  with pytest.raises(errors.ConfigError):
    synthesize.synthesize_tiled(identity, x[..., 0], tile_size=32, overlap=4)
  with pytest.raises(errors.ConfigError):
    synthesize.synthesize_tiled(lambda t: t[:, ::2], x, tile_size=32, overlap=4)


@pytest.mark.parametrize(
  "name, dtype, tol",
  [("syn.png", np.uint8, 0.5 / 255), ("syn.tif", np.float32, 0.0), ("syn.tiff", np.uint16, 0.5 / 65535)],
)
def test_save_synthesis(tmp_path, name, dtype, tol):
  rgb = np.random.default_rng(3).uniform(0, 1, (9, 7, 3)).astype(np.float32)
  path = tmp_path / name
  tiff_dtype = "uint16" if dtype == np.uint16 else "float32"
  synthesize.save_synthesis(path, rgb, tiff_dtype=tiff_dtype)
  back = msi_io.read_image(path)
  assert back.shape == rgb.shape
  np.testing.assert_allclose(back, rgb, atol=tol + 1e-7)
  with pytest.raises(errors.ConfigError, match="exists"):
    synthesize.save_synthesis(path, rgb)
  synthesize.save_synthesis(path, 1.0 - rgb, overwrite=True, tiff_dtype=tiff_dtype)
  np.testing.assert_allclose(msi_io.read_image(path), 1.0 - rgb, atol=tol + 1e-6)


def test_save_synthesis_refuses_bad_input(tmp_path):
  with pytest.raises(errors.ConfigError):
    synthesize.save_synthesis(tmp_path / "a.jpg", np.zeros((4, 4, 3)))
  with pytest.raises(errors.ConfigError):
    synthesize.save_synthesis(tmp_path / "a.png", np.zeros((4, 4)))
  with pytest.raises(errors.ConfigError):
    synthesize.save_synthesis(tmp_path / "a.tif", np.zeros((4, 4, 3)), tiff_dtype="uint8")


# ----------------------------------------------------------------------------------------------------------------
# Restoring a generator from a training workdir.


def _tiny_config():
  return ml_collections.ConfigDict(
    dict(
      model=dict(
        kind="unet",
        depth=DEPTH,
        ngf=4,
        max_mult=8,
        dropout_rate=0.0,
        norm="batch",
        gan_mode="vanilla",
        gan_weight=0.0,
        l1_weight=100.0,
        d_layers=1,
        ndf=4,
        d_kind="patch",
      ),
      optim=dict(learning_rate=2e-4, b1=0.5, b2=0.999, constant_steps=0, decay_steps=0),
      precision="float32",
      train=dict(batch_size=1),
    )
  )


def _small_msi(seed=0, shape=(48, 40), channels=6):
  rng = np.random.default_rng(seed)
  # Smooth, correlated channels, so that PCA has structure to find.
  base = _msi_like(seed, *shape, channels=2) + 1.0
  mixing = rng.uniform(0.1, 1.0, (2, channels))
  cube = (base @ mixing + 0.05 * rng.random(shape + (channels,))).astype(np.float32)
  return MSIImage(
    cube=cube,
    mz=np.linspace(300.0, 900.0, channels),
    mask=np.ones(shape, bool),
    metadata={"source": "simulated test cube", "simulated": True},
  )


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A workdir holding a tiny U-Net train state saved at step 0, with a fitted preprocessor."""
  config = _tiny_config()
  # An RBG key: the state initialises in a few seconds on the CPU, where threefry's compile takes much longer.
  state = train.create_train_state(jax.random.key(0, impl="rbg"), config, (16, 16, IN_CHANNELS))
  # Weights with outputs far from zero (see _random_variables), so that the comparison below means something.
  variables = _random_variables(state.generator, seed=1)
  state = state.replace(g_params=variables["params"], g_batch_stats=variables["batch_stats"])
  preprocessor = preprocess.MSIPreprocessor(preprocess.PreprocessConfig(n_components=IN_CHANNELS))
  preprocessor.fit(_small_msi(0))
  workdir = tmp_path_factory.mktemp("run")
  checkpoint.save(workdir, state, config=config, preprocessor=preprocessor.to_dict())
  bare = tmp_path_factory.mktemp("run_without_preprocessor")
  checkpoint.save(bare, state, config=config, preprocessor=None)
  return workdir, bare, state, preprocessor


def test_load_synthesizer_matches_generator(trained_workdir):
  workdir, _, state, preprocessor = trained_workdir
  synthesizer = synthesize.load_synthesizer(workdir, tile_size=TILE, overlap=OVERLAP, batch_size=2)
  assert synthesizer.in_channels == IN_CHANNELS and synthesizer.size_multiple == 2**DEPTH

  msi = _small_msi(1)  # another section: the stored preprocessor is applied, not refitted
  rgb = synthesizer(msi)
  assert rgb.shape == (48, 40, 3) and rgb.dtype == np.float32
  assert rgb.min() >= 0.0 and rgb.max() <= 1.0

  x = preprocessor.transform(msi)
  direct = state.generator.apply(state.generator_variables(), x[None], train=False)[0]
  expected = (np.asarray(direct) + 1) / 2
  interior = (slice(10, -10), slice(10, -10))
  np.testing.assert_array_less(np.abs(rgb[interior] - expected[interior]), INTERIOR_TOL)
  assert np.std(expected[interior]) > 0.05
  # An array already in [-1, 1] takes the same path without the preprocessor.
  np.testing.assert_array_equal(synthesizer(x), rgb)


def test_synthesizer_input_checks(trained_workdir):
  workdir, bare, _, _ = trained_workdir
  synthesizer = synthesize.load_synthesizer(bare, tile_size=TILE, overlap=OVERLAP)
  assert synthesizer.preprocessor is None
  with pytest.raises(errors.CheckpointError, match="no fitted preprocessor"):
    synthesizer(_small_msi(1))
  with pytest.raises(errors.DataError, match="outside"):
    synthesizer(np.full((8, 8, IN_CHANNELS), 5.0, np.float32))
  with pytest.raises(errors.DataError, match="channels|inputs"):
    synthesizer(np.zeros((8, 8, IN_CHANNELS + 1), np.float32))
  with pytest.raises(errors.ConfigError):
    synthesize.load_synthesizer(workdir, tile_size=30)
  with pytest.raises(errors.CheckpointError):
    synthesize.load_synthesizer(workdir, step=7)


def test_upsampling_generator_sees_the_msi_upsampled_like_its_training_pairs():
  """A checkpoint trained on pairs upsampled by u maps an MSIImage onto the MSI grid upsampled by u."""
  import ml_collections

  from msisynth import synthesize as syn_lib
  from msisynth.data import upsample_grid

  config = ml_collections.ConfigDict({"data": {"upsample": 3}})
  seen = []

  def apply_fn(x):
    seen.append(x.shape)
    return x[..., :3]

  class Identity:
    def transform(self, msi):
      return np.clip(msi.cube[..., :3] * 2 - 1, -1, 1)

  synth = syn_lib.Synthesizer(apply_fn=apply_fn, config=config, preprocessor=Identity(), in_channels=3,
                              size_multiple=1, tile_size=16, overlap=4, batch_size=4)
  rng = np.random.default_rng(0)
  msi = MSIImage(cube=rng.random((7, 5, 3)).astype(np.float32), mz=np.array([1.0, 2.0, 3.0]),
                 mask=np.ones((7, 5), bool), pixel_size_um=30.0)
  out = synth(msi)
  assert synth.upsample == 3
  assert out.shape == (19, 13, 3)
  assert synth.output_pixel_size_um(30.0) == (10.0, 10.0)
  expected = (upsample_grid(msi.cube * 2 - 1, 3, "bilinear") + 1) / 2
  np.testing.assert_allclose(out, np.clip(expected, 0, 1), atol=1e-5)
  # Arrays are network inputs already on the network's grid: never resampled.
  assert synth(np.zeros((7, 5, 3), np.float32)).shape == (7, 5, 3)
