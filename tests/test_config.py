import os
import subprocess
import sys

import pytest

from mmjax import config as config_lib
from tests.helpers import REPO


def load(*overrides, spec="configs/vae_shapes.py:tiny"):
    return config_lib.load_config(os.path.join(REPO, spec), list(overrides))


def test_override_applies_with_type():
    config = load("optim.lr=3e-4", "train.num_steps=7", "dtype=bfloat16")
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.train.num_steps == 7
    assert config.dtype == "bfloat16"


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("trian.batch_size=8", "trian"),
    ("optim.lr=fast", "optim.lr"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("train.progress=3", "train.progress"),
    ("family=gan", "family"),
    ("variant=huge", "variant"),
    ("data.name=imagenet", "data.name"),
    ("train.batch_size=0", "train.batch_size"),
    ("optim.schedule=linear", "optim.schedule"),
])
def test_bad_override_names_the_key(override, named):
    with pytest.raises(config_lib.ConfigError, match=named.replace(".", r"\.")):
        load(override)


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="not found"):
        load(spec="configs/nope.py")


def test_unknown_config_variant():
    with pytest.raises(config_lib.ConfigError, match="huge"):
        load(spec="configs/vae_shapes.py:huge")


def test_split_override_args():
    assert config_lib.split_override_args(["--config.optim.lr=1", "--config.train.seed", "3"]) == [
        "optim.lr=1", "train.seed=3"]
    with pytest.raises(config_lib.ConfigError, match="--bogus"):
        config_lib.split_override_args(["--bogus"])


@pytest.mark.parametrize("override", ["--config.optim.lrr=1e-3", "--config.train.batch_size=abc"])
@pytest.mark.e2e
def test_train_py_typo_exits_fast_without_creating_workdir(tmp_path, override):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", "configs/vae_shapes.py:tiny",
         "--workdir", str(workdir), override],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert override.split("=")[0].removeprefix("--config.") in proc.stderr
    assert not workdir.exists()


def test_shapes_images_are_rgb():
    with pytest.raises(config_lib.ConfigError, match="data.channels"):
        load("data.channels=4", spec="configs/diffusion_shapes.py:tiny")


def test_pixel_diffusion_variant_must_predict_the_image_channels():
    # ldm64 predicts 4-channel latents: on RGB pixels it would fail deep inside the first
    # step; the config check names the problem and the fix instead.
    with pytest.raises(config_lib.ConfigError, match="predicts 4-channel.*latent.vae_workdir"):
        load("variant=ldm64", spec="configs/diffusion_shapes.py:tiny")
