"""Builds the Colab notebooks in this folder from the cell lists below, without outputs.

Commands (from the repository root):
  python colab/make_notebooks.py            # (re)write colab/*.ipynb
  python colab/make_notebooks.py --check    # exit 1 when a committed notebook differs from what this builds

Edit the cells here rather than in the .ipynb files, then rebuild: the notebooks stay small and diffable (no
outputs, fixed cell ids), and the three share one set-up cell. tests/test_notebooks.py checks that the committed
notebooks match this script and runs each of them with the small settings.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

COLAB_DIR = pathlib.Path(__file__).resolve().parent
REPO_URL = "https://github.com/msisynth/msisynth"
COLAB_URL = "https://colab.research.google.com/github/msisynth/msisynth/blob/main/colab"

# ---------------------------------------------------------------------------------------------------------------
# Shared cells.


def _badge(name: str) -> str:
  return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB_URL}/{name}.ipynb)"


SETUP_MD = """\
## Set-up

- **On Colab** the next cell installs msisynth from the project's repository (`REPO_URL`) with pip. Pick a GPU
  runtime first for notebooks 2 and 3 (*Runtime → Change runtime type → GPU*); JAX uses the GPU by itself. If pip
  upgraded JAX, restart the runtime once (*Runtime* menu) and run the cells again.
- **Locally**, nothing is installed: the cell uses msisynth as installed (`pip install -e ".[dev]"`), or else the
  checkout this notebook sits in.
- **Data.** The notebooks read the data shipped beside the repository: a folder laid out as `../shared/data`, with
  `imzml/` (imzML examples), `he/` (real H&E scans), `msiflow_upec12/` (real MSI and microscopy of one section)
  and `mouse_brain_abeta/` (real amyloid-β ion images). Point the environment variable `MSISYNTH_DATA` (or
  `DATA_DIR` below) to such a folder; in a checkout with `../shared/data` beside it nothing needs setting. On
  Colab, either copy the folder to Google Drive as `MyDrive/msisynth_data` (the cell mounts Drive and uses it), or
  upload a zip of it in the *Files* pane, unzip it (`!unzip -q msisynth_data.zip -d /content/msisynth_data`) and
  set `DATA_DIR = "/content/msisynth_data"`.
- **`SMALL`** shrinks every size and step count so that the notebook runs in about a minute on a CPU (the tests run
  the notebooks this way; set `MSISYNTH_NOTEBOOK_SMALL=1`). The default, full settings are meant for a Colab GPU.
- **`OUTPUT_DIR`** receives every file the notebooks write (figures, checkpoints, transforms); nothing is written
  into the repository or the data folder. It defaults to a folder in the system's temporary directory, shared by
  the three notebooks so that notebook 3 finds the generator notebook 2 trained; set `MSISYNTH_NOTEBOOK_OUTPUT`
  (or edit the cell) to keep the results elsewhere, e.g. on Google Drive.
"""


def _setup_code(notebook: str) -> str:
  return f'''\
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile

REPO_URL = "{REPO_URL}"  # the project's repository; pip installs from it on Colab
IN_COLAB = "google.colab" in sys.modules

# Small settings: tiny sizes and step counts for a quick CPU run. False: the full settings, for a GPU.
SMALL = os.environ.get("MSISYNTH_NOTEBOOK_SMALL", "0") == "1"

# The data folder (imzml/, he/, msiflow_upec12/, mouse_brain_abeta/); "" keeps msisynth's default, ../shared/data.
DATA_DIR = os.environ.get("MSISYNTH_DATA") or ("/content/drive/MyDrive/msisynth_data" if IN_COLAB else "")

# Every output goes under this folder, never into the repository or the data folder.
OUTPUT_DIR = pathlib.Path(
  os.environ.get("MSISYNTH_NOTEBOOK_OUTPUT") or pathlib.Path(tempfile.gettempdir()) / "msisynth_notebooks"
)

if IN_COLAB:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{{REPO_URL}}"], check=True)
  if DATA_DIR.startswith("/content/drive/"):
    from google.colab import drive

    drive.mount("/content/drive")
elif importlib.util.find_spec("msisynth") is None:
  # Not installed: use the checkout this notebook belongs to (colab/ sits in the repository root).
  for root in (pathlib.Path.cwd(), pathlib.Path.cwd().parent):
    if (root / "msisynth" / "__init__.py").is_file():
      sys.path.insert(0, str(root))
      break
if DATA_DIR:
  os.environ["MSISYNTH_DATA"] = DATA_DIR

OUT = OUTPUT_DIR / "{notebook}"
OUT.mkdir(parents=True, exist_ok=True)
print(f"small settings: {{SMALL}}; outputs in {{OUT}}")
'''


SHOW_CODE = '''\
def show(fig, name):
  """Saves a figure as OUT/<name>.png and displays it."""
  path = viz_msi.save_figure(fig, OUT / f"{name}.png", overwrite=True)
  display(Image(filename=str(path)))
'''

# ---------------------------------------------------------------------------------------------------------------
# 01: quickstart.

QUICKSTART = [
  (
    "md",
    f"""\
# msisynth quickstart: read, preprocess and look at mass spectrometry imaging

{_badge("01_quickstart")}

Mass spectrometry imaging (MSI) records a mass spectrum at every pixel of a tissue section: an image with one
channel per m/z value. This notebook reads MSI from **imzML** files in both layouts (continuous and processed),
preprocesses it the way msisynth prepares MSI for its networks (TIC normalisation, hotspot removal, peak picking,
PCA) and draws ion images, the mean spectrum and the PCA. Every data set here is **real**: the imzML.org and
METASPACE example files, the msiFlow mouse bladder section UPEC_12 and the PlaquePicker mouse hemibrain.

Next: notebook 2 trains pix2pix and a U-Net to synthesise H&E from MSI; notebook 3 registers MSI to histology.
""",
  ),
  ("md", SETUP_MD),
  ("code", _setup_code("01_quickstart")),
  (
    "code",
    """\
import json

import numpy as np
from IPython.display import Image, display

from msisynth import datasets, io, preprocess
from msisynth.viz import msi as viz_msi

DATA = datasets.data_dir()
print(f"data folder: {DATA}")

"""
    + SHOW_CODE,
  ),
  (
    "md",
    """\
## 1. imzML in both layouts

An imzML data set is two files: `name.imzML` (XML metadata, and for every spectrum its pixel position and where its
arrays lie) and `name.ibd` (the binary m/z and intensity arrays). In a **continuous** file every spectrum shares
one m/z axis; in a **processed** file each pixel has its own m/z array (typically centroided peaks), which
`read_imzml` bins onto a common axis (10 ppm bins by default) or sums around requested m/z values.
`imzml_info` describes a file without reading its intensities. The imzML.org examples are 3 × 3 pixels with
8,399 m/z values, stored once in each layout.
""",
  ),
  (
    "code",
    """\
continuous_path = DATA / "imzml" / "pyimzml" / "Example_Continuous.imzML"
processed_path = DATA / "imzml" / "pyimzml" / "Example_Processed.imzML"
for path in (continuous_path, processed_path):
  info = io.imzml_info(path)
  print(f"{path.name}: {info['mode']}, {info['shape'][0]}×{info['shape'][1]} pixels, {info['num_spectra']} spectra, "
        f"m/z {info['mz_range'][0]:.2f}-{info['mz_range'][1]:.2f}, pixel size {info['pixel_size_um']} µm")

continuous = io.read_imzml(continuous_path, progress=False)
processed = io.read_imzml(processed_path, bin_width=0.5, bin_unit="da", progress=False)
print(f"continuous: cube {continuous.cube.shape} (its own {continuous.num_channels} m/z channels)")
print(f"processed:  cube {processed.cube.shape} (binned at 0.5 Da)")

# The same spectra in both files: binning the continuous one identically gives the same cube.
rebinned = io.read_imzml(continuous_path, bin_width=0.5, bin_unit="da", progress=False)
same = rebinned.cube.shape == processed.cube.shape and np.allclose(rebinned.cube, processed.cube, rtol=1e-4)
print("continuous and processed files agree after binning:", same)

# One ion image straight from the file: the intensities within ±0.5 Da of the strongest m/z, summed per pixel.
strongest = float(processed.mz[np.argmax(processed.cube.sum(axis=(0, 1)))])
ion = io.read_ion_image(processed_path, strongest, tol=0.5, tol_unit="da", progress=False)
print(f"ion image at m/z {strongest:.2f} ± 0.5:\\n", np.round(ion.cube[..., 0], 1))
""",
  ),
  (
    "md",
    """\
## 2. Mean spectrum and peak picking (real MALDI-FTICR data)

A real processed file: an HT-29 colon cancer spheroid from METASPACE (2 × 4 pixels, about 1,000 centroided peaks
per spectrum). Each spectrum is **TIC-normalised** (divided by its total ion count, so pixels that ionised better
do not dominate), the mean spectrum is taken over the measured pixels and its strongest local maxima are
**picked** as peaks, at least 20 ppm apart.
""",
  ),
  (
    "code",
    """\
spheroid_path = DATA / "imzml" / "metaspace" / "Untreated_3_434_tiny.imzML"
# 5 ppm bins resolve the FTICR peaks; bins that no spectrum reaches are left out of the cube.
spheroid = io.read_imzml(spheroid_path, bin_width=5.0, bin_unit="ppm", progress=False)
print(f"{spheroid_path.name}: cube {spheroid.cube.shape}, m/z {spheroid.mz[0]:.1f}-{spheroid.mz[-1]:.1f}")

normalized = preprocess.tic_normalize(spheroid.cube, mask=spheroid.mask)
spectrum = np.asarray(preprocess.mean_spectrum(normalized, mask=spheroid.mask))
peaks = preprocess.pick_peaks(spheroid.mz, spectrum, n_peaks=30, min_distance_ppm=20.0)
print(f"{peaks.size} peaks; the five strongest at m/z",
      ", ".join(f"{m:.4f}" for m in spheroid.mz[peaks[np.argsort(-spectrum[peaks])[:5]]]))
show(viz_msi.plot_mean_spectrum(spheroid.mz, spectrum, peaks,
                                title="Mean TIC-normalised spectrum: HT-29 spheroid (METASPACE, real)"),
     "mean_spectrum")
""",
  ),
  (
    "md",
    """\
## 3. Ion images of a real tissue section (msiFlow UPEC_12)

The msiFlow section is a mouse urinary bladder measured by MALDI: ten ion images on a 140 × 128 grid, with the
measured-pixel mask (unmeasured pixels are drawn grey). Each ion image is clipped at its 99th percentile for
display, so a few **hotspots** (single very bright pixels, common in MALDI) do not wash out the rest.
""",
  ),
  (
    "code",
    """\
section = datasets.load_msiflow()
msi = section.msi
print(f"msiFlow UPEC_12: {msi.shape[0]}×{msi.shape[1]} pixels, {msi.num_channels} ion images, "
      f"{int(msi.mask.sum())} measured pixels, {int(section.tissue_mask.sum())} on tissue")
print("m/z:", ", ".join(f"{m:.4f}" for m in msi.mz))
show(viz_msi.plot_ion_images(msi, n=3 if SMALL else 6, title="msiFlow UPEC_12 ion images (real MALDI)"),
     "ion_images_msiflow")
""",
  ),
  (
    "md",
    """\
## 4. Preprocessing and PCA

The steps msisynth applies before a network sees MSI, one function each: TIC normalisation, hotspot removal
(each channel clipped at its 99th percentile over the measured pixels), then **principal component analysis**
(PCA) over the pixels' spectra. The first three PCA score images, shown as one RGB image, summarise the main
chemical contrasts of the section; the scree plot gives each component's share of the variance.
""",
  ),
  (
    "code",
    """\
normalized = preprocess.tic_normalize(msi.cube, mask=msi.mask)
clipped = preprocess.remove_hotspots(normalized, quantile=0.99, mask=msi.mask)
result = preprocess.pca(clipped, 3, mask=msi.mask)
print("explained variance ratio:", np.round(np.asarray(result.explained_variance_ratio), 3))
show(viz_msi.plot_pca(np.asarray(result.scores), np.asarray(result.explained_variance_ratio), mask=msi.mask,
                      title="msiFlow UPEC_12: PCA of TIC-normalised ion images (real)"),
     "pca_msiflow")
""",
  ),
  (
    "md",
    """\
The mouse hemibrain from PlaquePicker holds three amyloid-β ion images (m/z 4059.9, 4159.1, 4442.6) of a 67-week
*App* knock-in mouse; the plaques are the bright spots.
""",
  ),
  (
    "code",
    """\
brain = datasets.load_mouse_brain()
if SMALL:  # every second pixel: the same picture, a quarter of the work
  brain = type(brain)(cube=brain.cube[::2, ::2], mz=brain.mz, mask=brain.mask[::2, ::2],
                      pixel_size_um=brain.pixel_size_um, metadata=brain.metadata)
print(f"mouse hemibrain: {brain.shape[0]}×{brain.shape[1]} pixels, m/z {', '.join(f'{m:.1f}' for m in brain.mz)}")
show(viz_msi.plot_ion_images(brain, brain.mz, title="Mouse hemibrain, amyloid-β ion images (PlaquePicker, real)"),
     "ion_images_mouse_brain")
""",
  ),
  (
    "md",
    """\
## 5. `MSIPreprocessor`: the network input, fitted once and reused

Training and inference must transform MSI identically, so msisynth keeps the whole chain in one fitted object:
channel selection (all channels, the top-N peaks of the mean spectrum, or given m/z values), normalisation,
hotspot thresholds, a PCA (or NMF) basis and a per-channel scaling to [-1, 1]. It is fitted on one section's
measured pixels, applied unchanged to other sections, and saved as JSON beside a network's checkpoint.
""",
  ),
  (
    "code",
    """\
config = preprocess.PreprocessConfig(channels="all", normalization="tic", hotspot_quantile=0.99, reduction="pca",
                                     n_components=3)
preprocessor = preprocess.MSIPreprocessor(config=config).fit(msi)
network_input = preprocessor.transform(msi)
print(f"network input {network_input.shape}, values in [{network_input.min():.2f}, {network_input.max():.2f}]")

path = OUT / "preprocessor.json"
preprocessor.save(path, overwrite=True)
reloaded = preprocess.MSIPreprocessor.load(path)
print(f"saved to {path}; the reloaded preprocessor gives the same input:",
      np.array_equal(reloaded.transform(msi), network_input))

summary = {
  "msiflow_pca_explained_variance": [float(v) for v in np.asarray(result.explained_variance_ratio)],
  "spheroid_peaks_mz": [float(m) for m in spheroid.mz[peaks]],
  "network_input_shape": list(network_input.shape),
}
(OUT / "summary.json").write_text(json.dumps(summary, indent=2))
print("figures and summary in", OUT)
""",
  ),
]

# ---------------------------------------------------------------------------------------------------------------
# 02: train pix2pix and the U-Net, compare.

TRAIN = [
  (
    "md",
    f"""\
# Synthesising H&E from MSI: pix2pix against a U-Net trained with L1 only

{_badge("02_train_pix2pix_vs_unet")}

The method of Bird, Ye, Race & Brown (MIUA 2025) turns the hard multimodal registration of MSI to histology into a
single-modality one by first **synthesising H&E from the MSI**. This notebook trains the two generators the paper
compares, with msisynth's shipped training configurations (`experiments/configs/pix2pix.py`, `unet.py`):

- **pix2pix**: a U-Net generator trained against a PatchGAN discriminator (adversarial loss + 100 × L1);
- **U-Net**: the same generator trained with the L1 loss only.

Both see the same data, then each synthesises the held-out slide and is scored by mutual information (MI, bits) and
SSIM against the real H&E.

**Data.** No public MSI section with its H&E scan could be shipped, so the default data are **semi-synthetic**:
real H&E slides with MSI **simulated** from them (`msisynth.simulate`: tissue classes and latent chemistry mixed
into 200 m/z channels, blurred by the instrument, Poisson-gamma counting noise, hotspots). Every number and
figure below is therefore on **simulated MSI** and says so. `DATA_SOURCE = "msiflow"` trains on the real msiFlow
pair instead (ten MALDI ion images against immunofluorescence microscopy registered by msiFlow; the target is
microscopy, not H&E).

**Runtime.** Use a GPU runtime; JAX finds the GPU without any setting. With the full settings (the shipped
configs: UNet-256 and a 70 × 70 PatchGAN on 256-pixel patches, batch 1) each model trains for `NUM_STEPS` steps.
The configs estimate a few hours for their full 200,000-step schedule on one recent GPU; the 20,000 steps set here
are a tenth of that, so expect tens of minutes per model (an estimate scaled from the configs', not measured on
Colab; a T4 is slower than the newest GPUs). Each model's `metrics.jsonl` records its steps per second as it
trains. Simulating the 200-channel MSI of the slides takes a few minutes of CPU first. On a CPU, use the small
settings.
""",
  ),
  ("md", SETUP_MD),
  ("code", _setup_code("02_train_pix2pix_vs_unet")),
  (
    "code",
    """\
import json
import time

import jax
import numpy as np
from IPython.display import Image, display
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments.configs import pix2pix as pix2pix_config
from experiments.configs import unet as unet_config
from msisynth import data, datasets, io, metrics, synthesize, train
from msisynth.viz import msi as viz_msi
from msisynth.viz import training as viz_training

print(f"JAX {jax.__version__} on {jax.default_backend()}: {jax.devices()}")
if IN_COLAB and jax.default_backend() == "cpu":
  print("No GPU: choose Runtime → Change runtime type → GPU, or run with the small settings.")

"""
    + SHOW_CODE,
  ),
  (
    "md",
    """\
## 1. Settings

`DATA_SOURCE` picks the data; two H&E slides are set aside: `VAL_SLIDE` for validation during training and
for the comparison below, and `TEST_SLIDE`, which neither model sees, for notebook 3's registration. The configs
are the shipped ones; the small settings shrink them (the configs' `tiny` variant with an even smaller U-Net,
three steps, H&E at a quarter of its resolution and 16 simulated m/z channels), the full settings only shorten
the schedule to `NUM_STEPS`.
""",
  ),
  (
    "code",
    """\
DATA_SOURCE = "simulated"  # "simulated": real H&E with simulated MSI; "msiflow": the real msiFlow pair
VAL_SLIDE = "rcc-UH9912_01"  # the configs' validation slide
TEST_SLIDE = "rcc-UH9905_18"  # held out from training and validation: notebook 3 registers it
NUM_STEPS = 20_000  # steps per model with the full settings; None keeps the configs' 200,000
SMALL_TRAIN_SLIDES = ("rcc-UH0505_12",)  # the small settings train on one slide
HE_PIXEL_SIZE_UM = 5.0  # assumed for the shipped H&E scans, which record none (as in the configs)
MODE = "small" if SMALL else "full"
# The two training workdirs; notebook 3 reads OUT / MODE (the semi-synthetic run).
WORK = OUT / (MODE if DATA_SOURCE == "simulated" else f"{MODE}_{DATA_SOURCE}")
WORK.mkdir(parents=True, exist_ok=True)


def make_config(module):
  \"\"\"The shipped config of `module` (pix2pix or unet), adapted to the settings above.\"\"\"
  if SMALL:
    config = module.get_config("tiny")  # depth-4 U-Net, ngf 8, on 32-pixel patches of the msiFlow pair
    config.model.depth = 3
    config.train.num_steps = 3
    config.train.batch_size = 2
    config.train.checkpoint_every = config.train.eval_every = 3
    config.train.image_every = 0
    config.optim.constant_steps = config.optim.decay_steps = 2
    config.data.max_val_patches = 8
    if DATA_SOURCE == "simulated":
      config.data.source = "simulated"
      config.data.patch_size = 16
      config.data.upsample = 1
      config.data.min_tissue_fraction = 0.3
      config.data.he_pixel_size_um = 4 * HE_PIXEL_SIZE_UM
      config.data.msi_pixel_size_um = 40.0
      config.data.n_channels = 16
      config.data.n_components = 4
  else:
    config = module.get_config("msiflow" if DATA_SOURCE == "msiflow" else None)
    if NUM_STEPS:
      steps = int(NUM_STEPS)
      config.train.num_steps = steps
      config.optim.constant_steps = steps // 2
      config.optim.decay_steps = steps - steps // 2
      config.train.eval_every = config.train.checkpoint_every = config.train.image_every = max(steps // 10, 1)
  return config


configs = {"pix2pix": make_config(pix2pix_config), "unet": make_config(unet_config)}
d = configs["pix2pix"].data
print(f"{DATA_SOURCE} data; {configs['pix2pix'].train.num_steps} steps of batch {configs['pix2pix'].train.batch_size} "
      f"× {d.patch_size}² patches; U-Net depth {configs['pix2pix'].model.depth}, ngf {configs['pix2pix'].model.ngf}")
""",
  ),
  (
    "md",
    """\
## 2. Training pairs

For the semi-synthetic data, each training slide gets a simulated MSI acquisition aligned with it, all slides
share one simulated chemistry (the same tissue gives the same spectra), and one `MSIPreprocessor` (TIC
normalisation, hotspot clipping, PCA, scaling to [-1, 1]) is fitted on the training slides and applied to every
slide. Each MSI is paired with its H&E resampled onto the MSI grid (upsampled by `data.upsample`). Patches are
drawn inside the tissue; a batch is a function of (seed, step), so a resumed run sees the same batches.
""",
  ),
  (
    "code",
    """\
start = time.perf_counter()
if DATA_SOURCE == "simulated":
  slides = {p.stem: p for p in datasets.list_he_slides()}
  train_names = SMALL_TRAIN_SLIDES if SMALL else tuple(s for s in slides if s not in (VAL_SLIDE, TEST_SLIDE))
  he_paths = {name: slides[name] for name in (*train_names, VAL_SLIDE)}
  if SMALL:  # H&E at a quarter of its resolution (copies in OUT, the shipped files stay as they are)
    for name, path in he_paths.items():
      small = io.resample_to_pixel_size(io.read_histology(path), HE_PIXEL_SIZE_UM, d.he_pixel_size_um)
      he_paths[name] = io.write_image(WORK / f"{name}.png", np.clip(small, 0, 1), overwrite=True)
  paired = data.semi_synthetic_pairs(
    [he_paths[name] for name in train_names], val_he_paths=[he_paths[VAL_SLIDE]], seed=int(configs["pix2pix"].seed),
    he_pixel_size_um=float(d.he_pixel_size_um), msi_pixel_size_um=float(d.msi_pixel_size_um),
    n_channels=int(d.n_channels), n_components=int(d.n_components), upsample=int(d.upsample))
  for config in configs.values():  # recorded with the checkpoints
    config.data.he_slides = tuple(str(he_paths[name]) for name in train_names)
    config.data.val_he_slides = (str(he_paths[VAL_SLIDE]),)
  target_name = "H&E"
  print(f"training slides: {', '.join(train_names)}; validation slide: {VAL_SLIDE} (simulated MSI)")
else:
  paired = data.msiflow_pairs(val_fraction=float(d.val_fraction), split_axis=d.split_axis, gap_px=int(d.gap_px),
                              seed=int(configs["pix2pix"].seed), upsample=int(d.upsample))
  target_name = "microscopy"
  print("the real msiFlow pair, split spatially into training and validation bands")
for pair in paired.train_pairs:
  print(f"  {pair.name}: {pair.shape[0]}×{pair.shape[1]} pixels, {pair.num_channels} input channels, "
        f"{int(pair.mask.sum())} tissue pixels{' (simulated MSI)' if pair.metadata['simulated'] else ''}")

train_data = paired.train_dataset(patch_size=int(d.patch_size), batch_size=int(configs["pix2pix"].train.batch_size),
                                  seed=int(configs["pix2pix"].seed), augment=bool(d.augment),
                                  min_tissue_fraction=float(d.min_tissue_fraction))
val_set = paired.val_dataset(patch_size=int(d.patch_size), batch_size=int(configs["pix2pix"].train.batch_size),
                             min_tissue_fraction=float(d.min_tissue_fraction)).validation_set()
keep = np.linspace(0, len(val_set["msi"]) - 1, min(len(val_set["msi"]), int(d.max_val_patches))).round().astype(int)
val_set = {key: value[keep] for key, value in val_set.items()} if len(keep) else None
print(f"{train_data.num_positions} training patch positions; "
      f"{0 if val_set is None else len(val_set['msi'])} validation patches; {time.perf_counter() - start:.0f} s")
""",
  ),
  (
    "md",
    """\
## 3. Training

`train_and_evaluate` runs the jitted training step (the discriminator update, then the generator's through the
updated discriminator, as pix2pix does; the U-Net skips the discriminator), logs losses to `metrics.jsonl`,
scores the validation patches (SSIM, MI) and writes orbax checkpoints with the fitted preprocessor beside the
weights. Running the cell again resumes from the workdir instead of starting over.
""",
  ),
  (
    "code",
    """\
train_seconds = {}
for name, config in configs.items():
  start = time.perf_counter()
  train.train_and_evaluate(config, WORK / name, train_data, val_set, preprocessor=paired.preprocessor)
  train_seconds[name] = time.perf_counter() - start
  print(f"{name}: {config.train.num_steps} steps in {train_seconds[name]:.0f} s, workdir {WORK / name}")

if DATA_SOURCE == "simulated":  # what notebook 3 needs to simulate its test slide with the same chemistry
  simulation = {key: paired.metadata[key] for key in ("seed", "he_pixel_size_um", "msi_pixel_size_um", "n_channels",
                                                         "class_centroids")}
  simulation.update(test_slide=TEST_SLIDE, upsample=int(d.upsample), simulated=True)
  (WORK / "simulation.json").write_text(json.dumps(simulation, indent=2))
""",
  ),
  (
    "code",
    """\
def read_log(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


fig = Figure(figsize=(10, 3.2), layout="constrained")
FigureCanvasAgg(fig)
for ax, name in zip(fig.subplots(1, 2), configs):
  log = [row for row in read_log(WORK / name) if "g_l1" in row]
  for key in ("g_l1", "g_gan", "d_loss"):
    points = [(row["step"], row[key]) for row in log if key in row]
    if points:
      ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", ms=3, label=key)
  ax.set_xlabel("step")
  ax.set_title(f"{name} training losses" + (" (simulated MSI)" if paired.simulated else ""))
  ax.legend(fontsize=8)
show(fig, "training_losses")
""",
  ),
  (
    "md",
    """\
## 4. Held-out comparison: MI and SSIM

Each generator, restored from its checkpoint, synthesises the whole validation slide (tiled with blended
overlaps) from its MSI. The synthetic image is compared with the real one inside the tissue (with the msiFlow
pair, inside the validation band): **MI** (bits, 32 grey-level bins; higher means the synthetic image predicts the
real one's intensities better, which is what MI-driven registration relies on) and **SSIM** (structural
similarity, 1 = identical).
""",
  ),
  (
    "code",
    """\
tile = 32 if SMALL else 256
synthesizers = {name: synthesize.load_synthesizer(WORK / name, tile_size=tile, overlap=tile // 4) for name in configs}
scores, synthetic = {}, {}
for pair, region in zip(paired.val_pairs, paired.val_regions):
  mask = pair.mask if region is None else pair.mask & region
  for name, synthesizer in synthesizers.items():
    fake = synthesizer(pair.msi)
    synthetic[name] = fake
    ssim = float(metrics.ssim(fake, pair.histology, mask=mask))
    if np.isnan(ssim):  # no 11 × 11 SSIM window lies wholly in the tissue (tiny images): score the whole image
      ssim = float(metrics.ssim(fake, pair.histology))
    mi = metrics.mutual_information(fake, pair.histology, mask=mask, bins=32, value_range=(0.0, 1.0))
    scores[name] = {"mi_bits": float(mi), "ssim": ssim}
  held_out = pair
  break  # one validation slide (or band) is enough for the comparison

label = " (simulated MSI)" if paired.simulated else ""
print(f"held-out {held_out.name}{label}:")
print(f"  {'model':8s} {'MI (bits)':>10s} {'SSIM':>8s}")
for name, s in scores.items():
  print(f"  {name:8s} {s['mi_bits']:10.3f} {s['ssim']:8.3f}")
results = {"data": DATA_SOURCE, "simulated": paired.simulated, "held_out": held_out.name, "mode": MODE,
           "scores": scores, "train_seconds": train_seconds}
(OUT / f"scores_{WORK.name}.json").write_text(json.dumps(results, indent=2))
""",
  ),
  (
    "code",
    """\
panels = [("MSI input (first 3 components)", viz_training.msi_preview(held_out.msi)),
          (f"real {target_name}", held_out.histology)]
panels += [(f"{name}: MI {scores[name]['mi_bits']:.2f}, SSIM {scores[name]['ssim']:.2f}", synthetic[name])
           for name in configs]
height, width = held_out.shape
fig = Figure(figsize=(4 * len(panels), 4 * height / width + 0.7), layout="constrained")
FigureCanvasAgg(fig)
for ax, (title, image) in zip(fig.subplots(1, len(panels)), panels):
  ax.imshow(np.clip(image, 0, 1))
  ax.set_title(title, fontsize=9)
  ax.set_axis_off()
fig.suptitle(f"Held-out {held_out.name}: synthetic {target_name} from MSI{label}")
show(fig, "comparison")
""",
  ),
  (
    "md",
    """\
The pix2pix generator's checkpoint in `WORK / "pix2pix"` (with its preprocessor and `simulation.json`) is what
notebook 3 uses to synthesise H&E for registration. With the small settings both models train for three steps, so
their images are noise and the scores say nothing about the methods; they only show that every step runs.
""",
  ),
]

# ---------------------------------------------------------------------------------------------------------------
# 03: register and evaluate.

REGISTER = [
  (
    "md",
    f"""\
# Registering MSI to H&E through synthetic H&E, with a known ground truth

{_badge("03_register_and_evaluate")}

A held-out real H&E slide gets a **simulated** MSI acquisition that is misaligned by a known affine transform
(rotation, scale, shear and shift), so the registration error can be measured exactly. Then:

1. the pix2pix generator of notebook 2 (or, if there is none, a tiny one trained here) **synthesises H&E** from
   the MSI;
2. synthetic H&E → real H&E is registered by mutual information (MI): a single-modality problem;
3. for comparison, the MSI itself (its total ion count image) → real H&E is registered directly: the multimodal
   problem the method avoids;
4. the **target registration error** (TRE) of both routes is measured on ground-truth landmarks, checkerboards
   show the alignment before and after;
5. every MSI channel is carried into histology space, and the transform is saved as JSON and as an ITK transform.

All MSI here is **simulated** (from real H&E); every figure and number says so.
""",
  ),
  ("md", SETUP_MD),
  ("code", _setup_code("03_register_and_evaluate")),
  (
    "code",
    """\
import json
import time

import jax
import numpy as np
from IPython.display import Image, display

from msisynth import checkpoint, data, datasets, io, simulate, synthesize, train
from msisynth.register import evaluate, optimize, transform_io, transforms
from msisynth.viz import msi as viz_msi
from msisynth.viz import registration as viz_registration

print(f"JAX {jax.__version__} on {jax.default_backend()}")

"""
    + SHOW_CODE,
  ),
  (
    "md",
    """\
## 1. The generator

Notebook 2 leaves its pix2pix workdir and the simulation settings (`simulation.json`: pixel sizes, channels and
the shared chemistry) in `OUTPUT_DIR`. When they are missing, a tiny pix2pix is trained here on one slide with
the same code (three steps with the small settings, 1,000 with the full ones): enough to run the notebook, not
to register well.
""",
  ),
  (
    "code",
    """\
from experiments.configs import pix2pix as pix2pix_config

MODE = "small" if SMALL else "full"
TRAINED = OUTPUT_DIR / "02_train_pix2pix_vs_unet" / MODE
HE_PIXEL_SIZE_UM = 5.0  # assumed for the shipped H&E scans (as in notebook 2)
slides = {p.stem: p for p in datasets.list_he_slides()}


def usable(workdir, settings):
  return settings.is_file() and (workdir / "checkpoints").is_dir() and checkpoint.latest_step(workdir) is not None


def train_here(workdir):
  \"\"\"A tiny pix2pix on one semi-synthetic slide; returns the simulation settings it was trained with.\"\"\"
  config = pix2pix_config.get_config("tiny")
  config.data.source = "simulated"
  config.model.depth = 3
  config.data.patch_size = 16 if SMALL else 32
  config.data.upsample = 1
  config.train.num_steps = 3 if SMALL else 1000
  config.train.batch_size = 2 if SMALL else 8
  config.train.checkpoint_every = config.train.num_steps
  config.train.image_every = 0
  config.optim.constant_steps = config.optim.decay_steps = max(config.train.num_steps // 2, 1)
  scale = 4.0 if SMALL else 2.0
  he_path = slides["rcc-UH0505_12"]
  he = io.resample_to_pixel_size(io.read_histology(he_path), HE_PIXEL_SIZE_UM, scale * HE_PIXEL_SIZE_UM)
  workdir.parent.mkdir(parents=True, exist_ok=True)
  he_path = io.write_image(workdir.parent / "train_slide.png", np.clip(he, 0, 1), overwrite=True)
  paired = data.semi_synthetic_pairs([he_path], seed=int(config.seed), he_pixel_size_um=scale * HE_PIXEL_SIZE_UM,
                                     msi_pixel_size_um=40.0, n_channels=16 if SMALL else 64,
                                     n_components=4 if SMALL else 8, upsample=1, val_fraction=0.0)
  dataset = paired.train_dataset(patch_size=int(config.data.patch_size), batch_size=int(config.train.batch_size),
                                 seed=int(config.seed), min_tissue_fraction=0.3)
  train.train_and_evaluate(config, workdir, dataset, None, preprocessor=paired.preprocessor)
  settings = {key: paired.metadata[key] for key in ("seed", "he_pixel_size_um", "msi_pixel_size_um", "n_channels",
                                                     "class_centroids")}
  return dict(settings, upsample=1, simulated=True)


if usable(TRAINED / "pix2pix", TRAINED / "simulation.json"):
  GENERATOR = TRAINED / "pix2pix"
  SIM = json.loads((TRAINED / "simulation.json").read_text())
  print(f"using notebook 2's generator: {GENERATOR} (step {checkpoint.latest_step(GENERATOR)})")
else:
  GENERATOR = OUT / MODE / "pix2pix"
  start = time.perf_counter()
  SIM = train_here(GENERATOR)
  print(f"no generator trained on simulated MSI by notebook 2 in {TRAINED}: trained a tiny one here in "
        f"{time.perf_counter() - start:.0f} s")
print("simulation settings:", {key: value for key, value in SIM.items() if key != "class_centroids"})
""",
  ),
  (
    "md",
    """\
## 2. A held-out slide with simulated, misaligned MSI

The test slide was used neither for training nor for validation. Its MSI is simulated with the chemistry the
generator was trained on (same seed and tissue-class centroids), on an MSI grid that is rotated (up to 10°),
scaled (up to 5 %), sheared and shifted against the H&E by a random affine transform: the **ground truth**, which
`simulate_msi` returns together with 50 matched landmarks.
""",
  ),
  (
    "code",
    """\
TEST_SLIDE = SIM.get("test_slide", "rcc-UH9905_18")
he_px = float(SIM["he_pixel_size_um"])
msi_px = float(SIM["msi_pixel_size_um"])
he = io.read_histology(slides[TEST_SLIDE])
if he_px != HE_PIXEL_SIZE_UM:
  he = np.clip(io.resample_to_pixel_size(he, HE_PIXEL_SIZE_UM, he_px), 0, 1)
sim = simulate.simulate_msi(
  2024, he, he_pixel_size_um=he_px, msi_pixel_size_um=msi_px, n_channels=int(SIM["n_channels"]),
  misalignment="random", max_rotation_deg=10.0, max_scale=0.05, max_translation_um=10 * msi_px,
  chemistry_seed=int(SIM["seed"]), class_centroids=np.asarray(SIM["class_centroids"]), he_name=TEST_SLIDE)
msi = sim.msi
print(f"H&E {TEST_SLIDE}: {he.shape[0]}×{he.shape[1]} pixels at {he_px:g} µm (real)")
print(f"MSI: {msi.shape[0]}×{msi.shape[1]} pixels at {msi_px:g} µm, {msi.num_channels} m/z channels (simulated)")
print("ground truth (H&E µm → MSI µm):\\n", np.round(np.asarray(sim.transform.matrix), 3))
show(viz_msi.plot_ion_images(msi, n=3, title=f"Simulated MSI of {TEST_SLIDE}"), "simulated_ion_images")
""",
  ),
  (
    "md",
    """\
## 3. Synthetic H&E

The checkpoint holds the fitted `MSIPreprocessor`, which turns the raw simulated spectra into the network input.
The generator was trained on MSI upsampled by `upsample` onto a finer grid (the full configs use 4: 20 µm MSI
pixels on the 5 µm H&E grid), so the input is upsampled the same way, and the synthetic H&E lies on that finer
grid, with pixels of `msi_px / upsample` µm and the same origin as the MSI. The generator runs over overlapping
tiles that are blended without seams.
""",
  ),
  (
    "code",
    """\
tile = 32 if SMALL else 256
synthesizer = synthesize.load_synthesizer(GENERATOR, tile_size=tile, overlap=tile // 4)
upsample = int(SIM.get("upsample", 1))
network_input = data.upsample_grid(synthesizer.network_input(msi), upsample)
synthetic = synthesizer(np.clip(network_input, -1, 1))
synthetic_px = msi_px / upsample
synthetic_mask = data.upsample_grid(msi.mask.astype(np.float32), upsample) > 1 - 1e-4
synthesize.save_synthesis(OUT / "synthetic_he.png", synthetic, overwrite=True)
print(f"synthetic H&E {synthetic.shape} at {synthetic_px:g} µm on the MSI frame, written to {OUT / 'synthetic_he.png'}")
""",
  ),
  (
    "md",
    """\
## 4. Registration: synthetic → real H&E, and MSI → H&E directly

Both routes use the same optimiser: an affine transform (µm, histology → MSI, ITK's convention) found by gradient
descent on Parzen-window MI, coarse to fine over a Gaussian pyramid, from several starts (centres of mass,
principal axes). The registration works at half the MSI pixel size (never finer than the H&E). The direct route
registers the MSI's total ion count (TIC) image, the usual single image of an MSI acquisition, to the same H&E.
`FLIPS = True` also tries 90° turns and mirror images, as needed for real sections that may be mounted turned
or face down (the simulated misalignment has neither).
""",
  ),
  (
    "code",
    """\
FLIPS = False
reg_config = optimize.RegistrationConfig(
  similarity="mi", kind="affine", flips_and_rot90=FLIPS, working_pixel_size_um=max(msi_px / 2, he_px),
  levels=2 if SMALL else 3, max_iterations=(60, 40) if SMALL else None, max_samples=4096 if SMALL else 32768)

tic = msi.cube.sum(axis=-1)
tic = np.clip(tic / max(float(np.percentile(tic[msi.mask], 99)), 1e-12), 0, 1)
# route: (moving image, its pixel size in µm, its measured-pixel mask)
routes = {"synthetic H&E → H&E": (synthetic, synthetic_px, synthetic_mask),
          "MSI (TIC) → H&E, direct": (tic, msi_px, msi.mask)}
results = {}
for route, (moving, moving_px, moving_mask) in routes.items():
  start = time.perf_counter()
  results[route] = optimize.register(he, moving, fixed_pixel_size_um=he_px, moving_pixel_size_um=moving_px,
                                     moving_mask=moving_mask, config=reg_config)
  print(f"{route}: MI {results[route].metric:.3f} bits, converged {results[route].converged}, "
        f"{time.perf_counter() - start:.0f} s")
""",
  ),
  (
    "md",
    """\
## 5. Target registration error

TRE is the distance, in MSI µm, between where a transform sends each ground-truth H&E landmark and where that
landmark really lies in the MSI. "Before" is the identity (the frames as acquired).
""",
  ),
  (
    "code",
    """\
fixed_points, moving_points = sim.landmarks_fixed_um, sim.landmarks_moving_um
tre = {"before (identity)": evaluate.target_registration_error(transforms.AffineTransform.identity(), fixed_points,
                                                                moving_points, msi_px)}
for route, result in results.items():
  tre[route] = evaluate.target_registration_error(result.transform, fixed_points, moving_points, msi_px)
print(f"TRE on {len(fixed_points)} landmarks (simulated MSI, known ground truth):")
print(f"  {'':28s} {'mean µm':>9s} {'median µm':>10s} {'mean MSI px':>12s}")
for route, t in tre.items():
  print(f"  {route:28s} {t['mean_um']:9.1f} {t['median_um']:10.1f} {t['mean_px']:12.2f}")
""",
  ),
  (
    "md",
    """\
## 6. Checkerboards before and after

Alternating tiles of the real H&E and of the moving image resampled onto the H&E grid: aligned structures
continue across tile borders. Before = the identity, after = the registration's transform.
""",
  ),
  (
    "code",
    """\
def on_he_grid(image, image_px, transform):
  return np.asarray(transforms.warp_image(image, transform, he.shape[:2], fixed_pixel_size_um=he_px,
                                          moving_pixel_size_um=image_px, cval=1.0 if image.ndim == 3 else 0.0))


identity = transforms.AffineTransform.identity()
for key, (route, (moving, moving_px, _)) in zip(("synthetic", "direct"), routes.items()):
  fig = viz_registration.plot_checkerboard_before_after(
    he, on_he_grid(moving, moving_px, identity), on_he_grid(moving, moving_px, results[route].transform),
    pixel_size_um=he_px,
    titles=(f"{route}: before", f"{route}: after (TRE {tre[route]['mean_um']:.0f} µm)"), simulated=True)
  show(fig, f"checkerboard_{key}")
show(viz_registration.plot_landmarks(he, synthetic, fixed_points, moving_points,
                                     transform=results["synthetic H&E → H&E"].transform, fixed_pixel_size_um=he_px,
                                     moving_pixel_size_um=synthetic_px, title="Landmarks after registration",
                                     simulated=True),
     "landmarks")
""",
  ),
  (
    "md",
    """\
## 7. Every MSI channel in histology space, and the saved transform

The MSI cube is resampled at T(x) for every H&E pixel x (all channels, with the measured-pixel mask), so each
ion image now lies on the H&E. The transform is saved as msisynth JSON (with pixel sizes, shapes and the
registration summary) and as an ITK text transform that SimpleITK and 3D Slicer read; both are read back to check
them.
""",
  ),
  (
    "code",
    """\
best = results["synthetic H&E → H&E"]
msi_on_he = transforms.warp_msi(msi, best.transform, he.shape[:2], he_px)
np.save(OUT / "msi_in_histology_space.npy", msi_on_he.cube)
np.save(OUT / "mz.npy", msi_on_he.mz)
print(f"MSI in histology space: {msi_on_he.cube.shape} float32 at {he_px:g} µm, "
      f"{int(msi_on_he.mask.sum())} pixels covered by measured MSI")
show(viz_msi.plot_ion_images(msi_on_he, n=3, title=f"Simulated MSI carried onto the H&E of {TEST_SLIDE}"),
     "ion_images_in_histology_space")

json_path = transform_io.save_transform_json(
  OUT / "transform.json", best.transform, fixed_pixel_size_um=he_px, moving_pixel_size_um=msi_px,
  fixed_shape=he.shape[:2], moving_shape=msi.shape, fixed_name=f"H&E {TEST_SLIDE}", moving_name="simulated MSI",
  metadata={"simulated": True, "registration": optimize.result_summary(best),
            "tre_um": {route: t["mean_um"] for route, t in tre.items()}},
  overwrite=True)
itk_path = transform_io.save_itk_transform(OUT / "transform.tfm", best.transform,
                                           center_um=np.asarray(transforms.image_center_um(he.shape[:2], he_px)),
                                           overwrite=True)
for path, loaded in ((json_path, transform_io.load_transform_json(json_path)),
                     (itk_path, transform_io.load_itk_transform(itk_path))):
  same = np.allclose(np.asarray(loaded.matrix), np.asarray(best.transform.matrix), atol=1e-3)
  print(f"{path.name}: read back {'identical' if same else 'DIFFERENT'}")

summary = {
  "simulated": True,
  "test_slide": TEST_SLIDE,
  "generator": str(GENERATOR),
  "tre": {route: {k: v for k, v in t.items() if k != "per_point"} for route, t in tre.items()},
  "mi_bits": {route: r.metric for route, r in results.items()},
}
(OUT / "metrics.json").write_text(json.dumps(summary, indent=2))
print("outputs in", OUT)
""",
  ),
  (
    "md",
    """\
## Your own data

For a real section, `msisynth.pipeline.process_section` runs the same steps from files (imzML and an H&E image)
and writes a report folder with the transform, figures, the MSI cube in histology space and, given matched
landmarks, the TRE:

```python
from msisynth import pipeline, synthesize

synthesizer = synthesize.load_synthesizer("path/to/pix2pix/workdir")
result = pipeline.process_section(
  pipeline.SectionInputs(msi="section.imzML", histology="section_he.png", histology_pixel_size_um=1.0),
  synthesizer, out_dir="section_report")
```

The generator must have been trained on MSI like yours (same instrument and m/z channels), with
`config.data.upsample = 1`: `process_section` feeds it the MSI on its own grid. Train it with notebook 2 or
`experiments/train.py` on your own registered pairs.
""",
  ),
]

NOTEBOOKS = {
  "01_quickstart": (QUICKSTART, False),
  "02_train_pix2pix_vs_unet": (TRAIN, True),
  "03_register_and_evaluate": (REGISTER, True),
}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook `name` (a key of NOTEBOOKS), without outputs and with fixed cell ids."""
  cells, gpu = NOTEBOOKS[name]
  nb = nbformat.v4.new_notebook()
  for i, (kind, source) in enumerate(cells):
    make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
    cell = make(source.rstrip("\n"))
    cell["id"] = f"{name[:2]}-cell-{i:02d}"
    nb.cells.append(cell)
  nb.metadata = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    "colab": {"provenance": [], "name": f"{name}.ipynb"},
  }
  if gpu:
    nb.metadata["accelerator"] = "GPU"
    nb.metadata["colab"]["gpuType"] = "T4"
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare with the committed notebooks, write nothing")
  args = parser.parse_args(argv)
  stale = []
  for name in NOTEBOOKS:
    path = COLAB_DIR / f"{name}.ipynb"
    text = render(name)
    if args.check:
      if not path.is_file() or path.read_text(encoding="utf-8") != text:
        stale.append(path.name)
    else:
      path.write_text(text, encoding="utf-8")
      print(f"wrote {path}")
  if stale:
    print(f"out of date (run python colab/make_notebooks.py): {', '.join(stale)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
