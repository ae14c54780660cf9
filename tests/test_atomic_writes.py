"""Every file msisynth writes is written atomically: a writer killed or failing mid-write leaves the old file."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from msisynth import errors, io, outputs, synthesize, train
from msisynth.geometry.transforms import AffineTransform
from msisynth.register import transform_io

REPO = pathlib.Path(__file__).resolve().parents[1]
OLD = b"the user's previous file\n"


def _writers():
  rgb = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(np.float32)
  transform = AffineTransform.from_params([0, 0, 0, 0, 1.0, 2.0])

  def figure(path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1])
    outputs.save_figure(fig, path)

  def metrics_rewrite(path):
    train.MetricWriter(path.parent, resume_step=0)

  return {
    "image.png": lambda p: io.write_image(p, rgb, overwrite=True),
    "image.tif": lambda p: io.write_image(p, rgb, overwrite=True),
    "synthetic.tif": lambda p: synthesize.save_synthesis(p, rgb, overwrite=True),
    "transform.json": lambda p: transform_io.save_transform_json(p, transform, overwrite=True),
    "transform.tfm": lambda p: transform_io.save_itk_transform(p, transform, center_um=[0, 0], overwrite=True),
    "cube.npy": lambda p: outputs.save_npy(p, rgb),
    "figure.png": figure,
    "metrics.jsonl": metrics_rewrite,
  }


@pytest.mark.parametrize("name", sorted(_writers()))
def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch, name):
  path = tmp_path / name
  old = OLD if name != "metrics.jsonl" else b'{"step": 1}\n{"step": 2}\n'
  path.write_bytes(old)

  def fail(src, dst):
    raise OSError(28, "No space left on device")  # the rename that would publish the file

  monkeypatch.setattr(outputs.os, "replace", fail)
  with pytest.raises(OSError, match="No space left"):
    _writers()[name](path)
  assert path.read_bytes() == old
  assert sorted(os.listdir(tmp_path)) == [name]  # no temporary file left behind
  monkeypatch.undo()
  _writers()[name](path)  # and the writer works when nothing fails
  assert path.read_bytes() != old


def test_writer_that_raises_mid_way_leaves_the_old_file(tmp_path, monkeypatch):
  import tifffile

  path = tmp_path / "he.tif"
  old = np.full((8, 8, 3), 0.25, np.float32)
  io.write_image(path, old)

  def half_then_fail(target, data, **kwargs):
    pathlib.Path(target).write_bytes(b"II*\x00" + b"\x00" * 100)
    raise RuntimeError("killed mid-write")

  monkeypatch.setattr(tifffile, "imwrite", half_then_fail)
  with pytest.raises(RuntimeError, match="mid-write"):
    io.write_image(path, np.zeros((8, 8, 3), np.float32), overwrite=True)
  np.testing.assert_array_equal(io.read_image(path), old)
  assert os.listdir(tmp_path) == ["he.tif"]


KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from msisynth import io
    image = np.random.default_rng(1).uniform(size=(1500, 1500, 3)).astype(np.float32)
    print("ready", flush=True)
    while True:
      io.write_image({path!r}, image, overwrite=True)
""")


def test_write_image_killed_mid_write_leaves_the_old_file(tmp_path):
  path = tmp_path / "he.tif"
  old = np.random.default_rng(0).uniform(size=(32, 32, 3)).astype(np.float32)
  io.write_image(path, old)
  script = KILL_SCRIPT.format(repo=str(REPO), path=str(path))
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
    deadline, size = time.time() + 60, path.stat().st_size
    # Kill it mid-write: while a temporary file is being written, or (a writer in place) once the file changed.
    while time.time() < deadline and not [n for n in os.listdir(tmp_path) if n != "he.tif"]:
      if path.stat().st_size != size:
        break
      time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  # The destination is either the old image or a complete new one, never a truncated file.
  image = io.read_image(path)
  assert image.shape in ((32, 32, 3), (1500, 1500, 3))
  if image.shape == (32, 32, 3):
    np.testing.assert_array_equal(image, old)


def test_overwrite_false_refuses_before_writing(tmp_path):
  path = tmp_path / "cube.npy"
  path.write_bytes(OLD)
  with pytest.raises(errors.OutputExistsError):
    outputs.save_npy(path, np.zeros(3), overwrite=False)
  assert path.read_bytes() == OLD
