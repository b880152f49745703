"""Test setup: eight fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.helpers import tiny_config  # noqa: E402


def _tiny_run(tmp_path_factory, name: str):
    from mmjax.train.loop import train

    workdir = str(tmp_path_factory.mktemp("runs") / name)
    config = tiny_config(name)
    return workdir, config, train(config, workdir)


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory):
    """One tiny text-conditioned VAE run of 20 steps on 8 fake devices, shared by many tests."""
    return _tiny_run(tmp_path_factory, "vae_shapes")


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory):
    """A tiny CNN judge run (20 steps): enough to exercise classify and evaluation."""
    return _tiny_run(tmp_path_factory, "cnn_shapes")
