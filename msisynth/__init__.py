"""msisynth: register mass spectrometry imaging to histology through synthetic histology.

A JAX/Flax implementation of Bird, Ye, Race & Brown, "Deep histological synthesis from mass spectrometry imaging
for multimodal registration" (MIUA 2025).
"""

__version__ = "0.1.0"
