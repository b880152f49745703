"""Flow matching on a DiT: the shared step, exact resume, the global batch, and the handle's methods."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import api, sharding, zoo
from mmjax.config import ConfigError
from mmjax.families import flow as flow_family
from mmjax.sampling import flow
from mmjax.train.loop import NonFiniteLossError, train
from tests.families.test_families import fit, one_batch
from tests.helpers import read_metrics, tiny_config


@pytest.mark.e2e
@pytest.mark.parametrize("block", ["cross", "joint"])
def test_overfits_one_batch(block):
    config = tiny_config("flow_shapes", f"model.block={block}", "optim.lr=3e-3", "optim.warmup_steps=0",
                         "optim.schedule=constant", "loss.p_uncond=0.0")
    *_, history = fit(config, 80)
    first = np.mean([h["mse"] for h in history[:10]])
    last = np.mean([h["mse"] for h in history[-10:]])
    assert last < 0.6 * first, (first, last)
    assert all(h["nonfinite"] == 0 for h in history)


def test_loss_on_eight_devices_equals_one_device():
    config = tiny_config("flow_shapes")
    family, model = zoo.FAMILIES["flow"], zoo.build_model(config)
    (objective,) = family.objectives(model, config)
    batch = one_batch(config, size=16)
    params, _ = jax.jit(lambda: family.init(model, jax.random.key(0), batch, config))()
    params = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
    loss = jax.jit(lambda p, b: objective.loss_fn(p, b, jax.random.key(1), 0, None)[0])
    one = jax.devices()[0]
    single = float(loss(jax.device_put(params, one), jax.device_put(batch, one)))
    mesh = sharding.make_mesh()
    sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
    assert len(sharded["image"].sharding.device_set) == 8
    multi = float(loss(jax.device_put(params, NamedSharding(mesh, PartitionSpec())), sharded))
    assert multi == pytest.approx(single, rel=1e-5)


def test_exact_resume(flow_run, tmp_path):
    straight_dir, config, straight = flow_run
    workdir = str(tmp_path / "resumed")
    assert train(config, workdir, stop_at=10).step == 10
    second = train(config, workdir)
    assert second.step == 20
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state.params),
                 jax.device_get(second.state.params))
    a, b = read_metrics(straight_dir), read_metrics(workdir)
    assert [a[s]["loss"] for s in range(1, 21)] == [b[s]["loss"] for s in range(1, 21)]


def test_nonfinite_loss_halts(tmp_path):
    config = tiny_config("flow_shapes", "optim.lr=1e38", "optim.grad_clip=0.0", "optim.warmup_steps=0",
                         "train.log_every=1", "train.eval_every=0", "train.sample_every=0")
    with pytest.raises(NonFiniteLossError):
        train(config, str(tmp_path / "nan"))


def test_config_errors_name_the_key():
    for override, key in (("loss.time_sampling=beta", "loss.time_sampling"), ("sample.sampler=ddim", "sample.sampler"),
                          ("sample.shift=0.0", "sample.shift"), ("loss.time_std=0.0", "loss.time_std"),
                          ("model.out_channels=4", "latent.vae_workdir")):
        with pytest.raises(ConfigError, match=key):
            tiny_config("flow_shapes", override)


def test_handle_samples_edits_and_maps(flow_run, tmp_path):
    workdir, config, _ = flow_run
    model = api.load(workdir)
    assert type(model).__name__ == "FlowModel"
    assert model.methods == ["attention_maps", "edit", "generate", "img2img", "inpaint", "interpolate_prompts"]
    prompts = ["a red circle", "a blue square"]
    images = model.generate(prompts, num=2, seed=3)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, model.generate(prompts, num=2, seed=3))
    assert not np.array_equal(images, model.generate(prompts, num=2, seed=4))
    assert not np.array_equal(images, model.generate(prompts, num=2, seed=3, sampler="heun"))
    # Interpolation's ends are the two prompts' own samples (same seed, same sampler).
    ends = model.interpolate_prompts("a red circle", "a blue square", num=3, seed_a=3, seed_b=5, steps=4)
    np.testing.assert_array_equal(ends[0], model.generate(["a red circle"], seed=3, steps=4)[0])
    np.testing.assert_array_equal(ends[-1], model.generate(["a blue square"], seed=5, steps=4)[0])
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    painted = model.inpaint(images, mask, "a green triangle")
    np.testing.assert_array_equal(painted[:, ~mask], images[:, ~mask])
    assert model.img2img(images, "a green triangle", strength=0.5).shape == images.shape
    edited = model.edit(images, prompts * 2, ["a green circle"] * 4, strength=0.5)
    assert edited.shape == images.shape
    maps = model.attention_maps("a red circle at the top", num=2)
    assert maps.words == ["a", "red", "circle", "at", "the", "top"] and maps.maps.shape == (2, 6, 16, 16)
    np.testing.assert_allclose(maps.maps.sum(axis=(2, 3)), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(maps.images, model.generate(["a red circle at the top"], num=2))
    assert not np.array_equal(images, model.generate(prompts, num=2, seed=3, shift=3.0))
    with pytest.raises(TypeError, match="eta"):
        model.generate(prompts, eta=0.5)
    with pytest.raises(ValueError, match="shift must be > 0"):
        model.generate(prompts, shift=0.0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.generate(prompts, sampler="ddim")
    # An export samples the same images.
    out = api.export(workdir, str(tmp_path / "exported"))
    np.testing.assert_array_equal(api.load(out).generate(prompts, num=2, seed=3), images)


def test_sampler_is_the_ode_solver_over_the_guided_velocity(flow_run):
    """generate == flow.sample over the backbone's velocity with guidance mixing, by hand."""
    _, config, result = flow_run
    model, params = zoo.build_model(config), result.state.ema_params
    s = flow_family.settings(config)
    tokens = one_batch(config, size=2)["tokens"]
    rng = jax.random.key(7)
    got = flow_family.generate(model, params, s, tokens, rng, 2.0, sampler="heun", steps=3, shift=2.0)
    empty = jnp.broadcast_to(jnp.asarray(flow_family.diffusion._empty_tokens(s.max_len)), tokens.shape)

    def velocity(x, t):
        v_c = model.apply({"params": params["unet"]}, x, 1000.0 * t, tokens)
        v_u = model.apply({"params": params["unet"]}, x, 1000.0 * t, empty)
        return v_u + 2.0 * (v_c - v_u)

    x0 = flow.sample(velocity, jax.random.normal(rng, (2, 16, 16, 3)), 3, "heun", 2.0)
    np.testing.assert_allclose(got, jnp.clip(x0, -1, 1), atol=2e-5)


def test_latent_flow_on_the_tiny_vae(vae_run, tmp_path):
    config = tiny_config("flow_shapes", f"latent.vae_workdir={vae_run[0]}", "model.out_channels=4",
                         "train.num_steps=4", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=4")
    train(config, str(tmp_path / "latent"))
    model = api.load(str(tmp_path / "latent"))
    out = model.generate(["a large red circle"], num=2, seed=0, steps=3)
    assert out.shape == (2, 16, 16, 3)
    assert os.path.exists(os.path.join(tmp_path, "latent", "tokenizer.json"))


def test_sample_py_flow_options(flow_run, tmp_path, capsys):
    from tests.families.test_diffusion import _sample_main

    common = ["--workdir", flow_run[0], "--prompt", "a red circle", "--steps", "3"]
    out = tmp_path / "gen.png"
    assert _sample_main(*common, "--sampler", "heun", "--shift", "2", "--num", "2", "--out", str(out)) == 0
    assert out.exists()
    capsys.readouterr()
    assert _sample_main(*common, "--eta", "0.3", "--out", str(tmp_path / "x.png")) == 2
    assert "--eta does not apply to --mode generate of a flow model" in capsys.readouterr().err
    assert _sample_main(*common, "--sampler", "ddim", "--out", str(tmp_path / "y.png")) == 2
    assert "sampler must be one of ('euler', 'heun')" in capsys.readouterr().err
