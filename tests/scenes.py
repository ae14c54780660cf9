"""Small generated scenes shared by several test files: smooth random images and a square annotation."""

import numpy as np


def blob_image(shape, seed: int = 0, n_blobs: int = 5) -> np.ndarray:
  """A float32 (H, W) image: the sum of `n_blobs` unit Gaussian blobs (sigma 2-5 px) at random places."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
  out = np.zeros(shape, np.float32)
  for _ in range(n_blobs):
    cy, cx, s = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2, 5)
    out += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
  return out


def square_annotation():
  """A histology label image (2 µm pixels) and the same square as a polygon region "gland": x in [399, 599),
  y in [199, 399) µm."""
  from msisynth import regions

  labels = np.zeros((260, 360), np.int32)
  labels[100:200, 200:300] = 1
  polygon = regions.Polygon(np.array([[199.5, 99.5], [299.5, 99.5], [299.5, 199.5], [199.5, 199.5]]))
  return labels, [regions.Region("gland", (polygon,))]
