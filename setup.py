"""msisynth: MSI-to-histology registration through deep histological synthesis (JAX/Flax)."""

import pathlib

from setuptools import find_packages, setup

_ROOT = pathlib.Path(__file__).resolve().parent
_README = _ROOT / "README.md"
_EXPORT = ["spatialdata>=0.4,<0.8", "anndata>=0.10", "geopandas>=0.14", "shapely>=2.0"]


def _data_files() -> list[tuple[str, list[str]]]:
    """The shipped data (data/), installed under <prefix>/share/msisynth/data, where msisynth.datasets finds it."""
    folders: dict[str, list[str]] = {}
    for path in sorted((_ROOT / "data").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(_ROOT)
            target = pathlib.PurePosixPath("share", "msisynth", *rel.parent.parts)
            folders.setdefault(str(target), []).append(rel.as_posix())
    return sorted(folders.items())


setup(
    name="msisynth",
    version="0.1.0",
    description="Register mass spectrometry imaging to histology through synthetic H&E (pix2pix, JAX/Flax).",
    long_description=_README.read_text(encoding="utf-8") if _README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["msisynth", "msisynth.*", "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.4.35,<0.12",
        "flax>=0.10,<0.13",
        "optax>=0.2.3,<0.3",
        # Tested with 0.12.8; the CheckpointManager/args API is stable within this range.
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.87",
        "ml_collections>=0.1.1",
        "pyimzml>=1.5.4",
        "numpy>=1.26",
        # Compiled imzML binning kernels (msisynth.io._kernels).
        "numba>=0.59",
        "scipy>=1.11",
        "scikit-image>=0.22",
        "tifffile>=2023.7",
        "dm-pix>=0.4.3",
        "absl-py>=2.0",
        "matplotlib>=3.7",
        "tqdm>=4.66",
        # Decoders for compressed TIFFs (LZW, Deflate, JPEG, JPEG 2000), as slide scanners and OME-TIFF writers save.
        "imagecodecs>=2023.1",
        "numba>=0.58,<1",  # the JPEG completeness check (msisynth.io.integrity); pure Python without it
    ],
    data_files=_data_files(),
    extras_require={
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "SimpleITK>=2.3",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            "psutil>=5.9",
            *_EXPORT,
            # Builds the wheel in tests/test_datasets.py (the shipped data must travel in it).
            "wheel>=0.40",
        ],
        # SpatialData / OME-Zarr output (msisynth.export); tested with spatialdata 0.7.3.
        "export": _EXPORT,
        "tensorboard": ["tensorboardX>=2.6"],
    },
)
