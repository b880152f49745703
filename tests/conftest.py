"""Test setup: eight fake CPU devices, set before jax is imported anywhere."""
import os
import re
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.helpers import SHARED_CACHE, tiny_config  # noqa: E402

pytest_plugins = ["pytester"]  # tests/test_lanes.py runs pytest on small made-up suites

# pytest-xdist's workers inherit the environment, so they share the directory too.
if SHARED_CACHE not in os.environ:
    os.environ[SHARED_CACHE] = tempfile.mkdtemp(prefix="mmjax-tests-jax-cache-")
    _OWN_CACHE = True
else:
    _OWN_CACHE = False


def pytest_sessionfinish(session):
    if _OWN_CACHE:  # whoever made it: the controller, or a worker started without one
        shutil.rmtree(os.environ[SHARED_CACHE], ignore_errors=True)


# Session fixtures that train a tiny model: a test that uses one (directly or through another
# fixture) is end-to-end. The unit lane, `-m "not e2e"`, leaves them out.
RUN_FIXTURES = frozenset({"vae_run", "cnn_run", "diffusion_run", "flow_run", "ldm_run", "clip_run", "gan_run"})


def _names_slow(markexpr: str) -> bool:
    return re.search(r"\bslow\b", markexpr or "") is not None


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    """Mark tests that use a run fixture `e2e`; leave `slow` tests out unless `-m` names slow
    (`-m slow`, `-m "slow or e2e"`): `-m "not e2e"` alone never runs them."""
    for item in items:
        if RUN_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
    if _names_slow(config.getoption("markexpr", "")):
        return
    kept, slow = [], []
    for item in items:
        (slow if item.get_closest_marker("slow") else kept).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = kept


def _tiny_run(tmp_path_factory, name: str, **kwargs):
    from mmjax.train.loop import train

    workdir = str(tmp_path_factory.mktemp("runs") / name)
    config = tiny_config(name, **kwargs)
    return workdir, config, train(config, workdir)


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory):
    """One tiny text-conditioned VAE run of 20 steps on 8 fake devices, shared by many tests.
    It keeps the default compilation cache, `<workdir>/../.jax_cache`, which a test checks. Its
    directory sits in one parent for the whole session, so the xdist workers that each need a
    vae_run share that default cache (the second compiles nothing), as do the runs a test puts
    next to it (`sibling_workdir`)."""
    from mmjax.train.loop import train

    parent = os.path.join(os.environ[SHARED_CACHE], "runs_with_default_cache")
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="vae_shapes-", dir=parent)  # a new name, however often
    os.rmdir(workdir)  # train() makes it
    config = tiny_config("vae_shapes", shared_cache=False)
    return workdir, config, train(config, workdir)


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory):
    """A tiny CNN judge run (20 steps): enough to exercise classify and evaluation."""
    return _tiny_run(tmp_path_factory, "cnn_shapes")


@pytest.fixture(scope="session")
def diffusion_run(tmp_path_factory):
    """A tiny pixel-space text-to-image diffusion run (20 steps)."""
    return _tiny_run(tmp_path_factory, "diffusion_shapes")


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory):
    """A tiny pixel-space flow-matching DiT run (20 steps)."""
    return _tiny_run(tmp_path_factory, "flow_shapes")


@pytest.fixture(scope="session")
def ldm_run(tmp_path_factory, vae_run):
    """A tiny latent diffusion run on the tiny VAE's latents (20 steps)."""
    from mmjax.train.loop import train

    workdir = str(tmp_path_factory.mktemp("runs") / "ldm_shapes")
    # Its test checks the frozen VAE and sampling from the checkpoint: no in-loop evaluation or
    # preview, whose compiles (a sampler over the UNet and the VAE decoder) it would not use.
    config = tiny_config("ldm_shapes", f"latent.vae_workdir={vae_run[0]}", "train.eval_every=0",
                         "train.sample_every=0")
    return workdir, config, train(config, workdir)


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory):
    """A tiny CLIP trained long enough (160 steps) to beat chance clearly on color."""
    from mmjax.train.loop import train

    workdir = str(tmp_path_factory.mktemp("runs") / "clip")
    config = tiny_config("clip_shapes", "train.num_steps=160", "train.batch_size=32", "optim.lr=3e-3",
                         "train.eval_every=160", "train.checkpoint_every=160", "train.eval_batches=2",
                         "optim.warmup_steps=10")
    return workdir, train(config, workdir)


@pytest.fixture(scope="session")
def gan_run(tmp_path_factory):
    """A tiny text-conditioned GAN (240 steps, the discriminator at a high learning rate): long
    enough for its projection head to tell an image's caption from another color's."""
    from mmjax.train.loop import train

    workdir = str(tmp_path_factory.mktemp("runs") / "gan")
    config = tiny_config("gan_shapes", "train.num_steps=240", "train.eval_every=240", "train.sample_every=240",
                         "train.checkpoint_every=240", "loss.r1_every=4", "optim_d.lr=2e-3")
    return workdir, config, train(config, workdir)
