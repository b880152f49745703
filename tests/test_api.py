import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mmjax
from tests.helpers import REPO


def test_generate_is_deterministic(vae_run):
    workdir, config, _ = vae_run
    model = mmjax.load(workdir)
    prompts = ["a large red circle at the top left", "a small blue square"]
    a = model.generate(prompts, num=3, seed=7)
    b = model.generate(prompts, num=3, seed=7)
    c = model.generate(prompts, num=3, seed=8)
    size = config.data.image_size
    assert a.shape == (6, size, size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_reconstruct_and_interpolate_shapes(vae_run):
    workdir, config, _ = vae_run
    model = mmjax.load(workdir)
    from mmjax.data import ShapesSource

    source = ShapesSource("test", image_size=config.data.image_size)
    a, b = source[0], source[1]
    recon = model.reconstruct(np.stack([a["image"], b["image"]]), [a["caption"], b["caption"]])
    assert recon.shape == (2,) + a["image"].shape and recon.dtype == np.uint8
    path = model.interpolate_images(a["image"], b["image"], num=5, prompt_a=a["caption"], prompt_b=b["caption"])
    assert path.shape == (5,) + a["image"].shape
    with pytest.warns(DeprecationWarning, match="interpolate_images"):  # the old name, for one release
        old = model.interpolate(a["image"], b["image"], num=5, prompt_a=a["caption"], prompt_b=b["caption"])
    np.testing.assert_array_equal(old, path)
    z = model.encode(np.stack([a["image"], b["image"]]), [a["caption"], b["caption"]])
    np.testing.assert_array_equal(model.decode(z, [a["caption"], b["caption"]]), recon)
    with pytest.raises(NotImplementedError, match="classify"):
        model.classify(a["image"])
    with pytest.raises(ValueError, match="16x16"):
        model.reconstruct(np.zeros((1, 20, 20, 3), np.uint8), ["a red circle"])


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_sample_py_end_to_end(vae_run, tmp_path):
    workdir, config, _ = vae_run
    before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
    out = tmp_path / "grid.png"
    proc = run_sample("--workdir", workdir, "--prompt", "a small green square at the top",
                      "--num", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        assert img.width >= 4 * config.data.image_size
    image_path = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image_path)
    proc = run_sample("--workdir", workdir, "--reconstruct", str(image_path), "--prompt", "a white square",
                      "--out", str(tmp_path / "recon.png"))
    assert proc.returncode == 0, proc.stderr
    proc = run_sample("--workdir", workdir, "--interpolate", str(image_path), str(image_path),
                      "--prompt", "a white square", "--num", "3", "--out", str(tmp_path / "interp.png"))
    assert proc.returncode == 0, proc.stderr
    after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
    assert before == after  # sampling never writes into the workdir


def test_sample_py_clear_errors(vae_run, tmp_path):
    workdir, _, _ = vae_run
    proc = run_sample("--workdir", str(tmp_path / "missing"), "--prompt", "a red circle")
    assert proc.returncode == 2 and "not found" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_sample("--workdir", str(empty), "--prompt", "a red circle")
    assert proc.returncode == 2 and "checkpoint" in proc.stderr.lower()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    proc = run_sample("--workdir", workdir, "--reconstruct", str(bad), "--prompt", "a red circle")
    assert proc.returncode == 2 and "bad.png" in proc.stderr
