"""GAN family: the joint G/D step, ADA, exact resume, inversion, the projection head, the API."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import api, zoo
from mmjax.config import ConfigError
from mmjax.families import augment, gan
from mmjax.models.gan import SPECTRAL, spectral_normalize
from mmjax.train.loop import train
from tests.families.test_families import one_batch
from tests.helpers import init_family, tiny_config


def _psnr(a, b):
    mse = np.mean(np.square((np.asarray(a, np.float64) - np.asarray(b, np.float64)) / 2.0), axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def test_run_traces_the_joint_step_once_and_writes_outputs(gan_run):
    workdir, config, result = gan_run
    assert result.trace_count == 1
    assert result.step == config.train.num_steps
    rows = [r for r in _rows(workdir) if "discriminator/loss" in r]
    assert len(rows) == config.train.num_steps
    for key in ("discriminator/loss", "generator/loss", "discriminator/ada_p", "discriminator/r1",
                "discriminator/real_logit", "discriminator/mismatch_logit"):
        assert all(np.isfinite(r[key]) for r in rows), key
    # Lazy R1: non-zero exactly on the steps it runs (every r1_every, counting from step 0).
    r1 = {r["step"]: r["discriminator/r1"] for r in rows}
    every = config.loss.r1_every
    assert all((r1[s] > 0) == ((s - 1) % every == 0) for s in r1), r1
    assert os.listdir(os.path.join(workdir, "samples"))
    assert "eval/invert_psnr" in result.eval_metrics


def _rows(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_spectral_norm_holds_after_training(gan_run):
    _, _, result = gan_run
    params = jax.device_get(result.state.params["discriminator"])
    vectors = jax.device_get(result.state.model_state[SPECTRAL]["discriminator"])
    checked = 0

    def visit(p, s):
        nonlocal checked
        if "sn" in p:
            normalized, _, _ = spectral_normalize(p["sn"]["kernel"], s["sn"]["u"], 0)
            matrix = np.asarray(normalized).reshape(-1, normalized.shape[-1])
            assert np.linalg.svd(matrix, compute_uv=False)[0] == pytest.approx(1.0, abs=0.05)
            checked += 1
        for key in s:
            if key != "sn":
                visit(p[key], s[key])

    visit(params, vectors)
    assert checked >= 8  # every conv, the attention projections and both heads


def test_ada_probability_moves_toward_the_target():
    config = tiny_config("gan_shapes", "loss.ada_speed=0.05", "loss.ada_target=0.6", "loss.r1_gamma=0.0")
    family, model = zoo.FAMILIES["gan"], zoo.build_model(config)
    d_objective = family.objectives(model, config)[0]
    batch = one_batch(config)
    params, model_state = init_family(family, model, batch, config)
    loss = jax.jit(lambda p, s: d_objective.loss_fn(p, batch, jax.random.key(1), 1, s))
    for p0 in (0.0, 0.3, 0.79):
        state = {**model_state, "ada_p": jnp.float32(p0)}
        _, aux = loss(params, state)
        metrics, new_state = aux.metrics, aux.model_state
        direction = np.sign(float(metrics["ada_r_t"]) - 0.6)
        expected = np.clip(p0 + 0.05 * direction, 0.0, config.loss.ada_p_max)
        assert float(new_state["ada_p"]) == pytest.approx(expected, abs=1e-6)
        # The spectral vectors advanced (update=True on the real/fake batch).
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state[SPECTRAL], model_state[SPECTRAL])
        assert any(jax.tree.leaves(moved))


def test_augmentation_is_identity_at_p0_and_differentiable():
    images = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3), minval=-1, maxval=1)
    key = jax.random.key(1)
    np.testing.assert_array_equal(augment.augment(images, key, jnp.float32(0.0)), images)
    for kind in augment.KINDS:
        out = augment.augment(images, key, jnp.float32(1.0), (kind,), translation=0.25)
        assert out.shape == images.shape
        changed = np.mean(np.any(np.asarray(out != images), axis=(1, 2, 3)))
        assert changed >= 0.75, kind  # p=1: (almost) every image altered
        grad = jax.grad(lambda x: jnp.sum(augment.augment(x, key, jnp.float32(1.0), (kind,)) ** 2))(images)
        assert float(jnp.sum(jnp.abs(grad))) > 0, kind
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.augment(images, key, jnp.float32(1.0), ("flip",))


@pytest.mark.e2e
def test_exact_resume_including_augmentation_probability(tmp_path):
    # p starts mid-range and moves 0.05 a step, so it differs at every step; R1 off to keep
    # the compile short (its laziness across a resume follows the restored step counter).
    overrides = ("train.num_steps=12", "train.checkpoint_every=100", "train.eval_every=0", "train.sample_every=0",
                 "loss.ada_speed=0.05", "loss.ada_p_init=0.5", "loss.r1_gamma=0.0")
    straight = train(tiny_config("gan_shapes", *overrides), str(tmp_path / "straight"))
    train(tiny_config("gan_shapes", *overrides), str(tmp_path / "resumed"), stop_at=5)
    resumed = train(tiny_config("gan_shapes", *overrides), str(tmp_path / "resumed"))
    assert resumed.trace_count == 1 and resumed.step == 12
    a, b = jax.device_get(straight.state), jax.device_get(resumed.state)
    assert float(a.model_state["ada_p"]) != 0.5  # p moved, so the check below means something
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    rows_a = [r for r in _rows(str(tmp_path / "straight")) if "generator/loss" in r]
    rows_b = {r["step"]: r for r in _rows(str(tmp_path / "resumed")) if "generator/loss" in r}
    for row in rows_a:
        assert rows_b[row["step"]]["generator/loss"] == row["generator/loss"]
        assert rows_b[row["step"]]["discriminator/ada_p"] == row["discriminator/ada_p"]


def test_inversion_recovers_a_known_latent(gan_run):
    _, config, result = gan_run
    model = zoo.build_model(config)
    params = result.state.ema_params
    tokens = one_batch(config, 8)["tokens"]
    z_star = jax.random.normal(jax.random.key(7), (8, model.z_dim))
    target = gan._generate(model, params, z_star, tokens)
    invert = jax.jit(functools.partial(gan.invert, model, s=gan.settings(config), steps=100, plus=False))
    z0, _, before = jax.jit(functools.partial(gan.invert, model, s=gan.settings(config), steps=0, plus=False))(
        params, images=target, tokens=tokens)
    z, text, recon = invert(params, images=target, tokens=tokens)
    assert z.shape == (8, model.num_layers, model.z_dim) and text.shape == (8, model.text_dim)
    # The eight optimisations ran split over the eight devices, one image each.
    assert len(z.sharding.device_set) == 8 and not z.sharding.is_fully_replicated
    # The optimisation does the work: every image ends well above where the best of the
    # random starts began (which, for this tiny generator, can already be fair: 39 dB).
    start, end = np.median(_psnr(before, target)), np.min(_psnr(recon, target))
    assert end > 35 and end > start + 2, (start, end)
    assert float(jnp.mean(jnp.square(z[:, 0] - z_star))) < float(jnp.mean(jnp.square(z0[:, 0] - z_star)))


def test_projection_discriminator_prefers_matching_captions(gan_run):
    workdir, config, result = gan_run
    model = zoo.build_model(config)
    from mmjax.data import pipeline, tokenizer

    batch = next(pipeline.make_batches(pipeline.make_source(config.data, "test"), global_batch=256,
                                       tokenizer=tokenizer.for_config(config, workdir), seed=3, shuffle=False))
    images, tokens = jnp.asarray(batch["image"]), jnp.asarray(batch["tokens"])
    # Mismatched: another test caption of a different color.
    order = np.argsort(batch["color"], kind="stable")
    other = np.roll(order, 128)
    swapped = np.empty_like(order)
    swapped[order] = other
    differs = batch["color"][swapped] != batch["color"]
    params, spectral = result.state.params, result.state.model_state[SPECTRAL]
    score = jax.jit(lambda x, t: gan._discriminate(model, params, spectral, x, t, update=False)[0])
    own, wrong = np.asarray(score(images, tokens)), np.asarray(score(images, tokens[swapped]))
    preferred = np.mean(own[differs] > wrong[differs])
    # Chance is 0.5 (std 0.03 over these ~220 pairs); an untrained head sits there.
    assert preferred > 0.62, preferred
    assert np.mean(own[differs] - wrong[differs]) > 0


def test_api_generate_invert_edit_interpolate(gan_run):
    workdir, config, _ = gan_run
    model = api.load(workdir)
    assert model.methods == ["decode", "edit", "encode", "generate", "interpolate_images", "interpolate_latents",
                             "interpolate_prompts", "invert", "reconstruct"]
    images = model.generate(["a red circle", "a blue square"], num=2, seed=3)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, model.generate(["a red circle", "a blue square"], num=2, seed=3))
    assert not np.array_equal(images, model.generate(["a red circle", "a blue square"], num=2, seed=4))
    truncated = model.generate(["a red circle"], num=4, seed=3, truncation=0.5)
    assert truncated.shape == (4, 16, 16, 3)

    latents, recon = model.invert(images, ["a red circle"] * 2 + ["a blue square"] * 2, steps=30)
    assert latents["z"].shape[:2] == (4, model.module.num_layers) and recon.shape == images.shape
    assert np.mean(_psnr(recon.astype(np.float32) / 127.5 - 1, images.astype(np.float32) / 127.5 - 1)) > 20
    latents_free, _ = model.invert(images, steps=5)  # no captions: the text vector is optimised too
    assert latents_free["text"].shape == latents["text"].shape

    edited = model.edit(images, "a red circle", "a green circle", steps=10)
    assert edited.shape == images.shape
    # Keeping the source caption in the first two layers gives another image than in none.
    kept = model.edit(images, "a red circle", "a green circle", steps=10, source_layers=2)
    assert not np.array_equal(kept, edited)
    with pytest.raises(ValueError, match="source_layers must be in"):
        model.edit(images, "a red circle", "a green circle", steps=10, source_layers=3)
    path = model.interpolate_prompts("a red circle", "a blue circle", num=5, seed_a=0, seed_b=1)
    assert path.shape == (5, 16, 16, 3)
    ends = model.generate(["a red circle"], num=1, seed=0)
    # The path starts where (prompt a, seed a) generates.
    assert np.abs(path[0].astype(int) - ends[0].astype(int)).max() <= 1
    with pytest.raises(ValueError, match="truncation must be >= 0"):
        model.generate(["a red circle"], truncation=-1.0)
    with pytest.raises(TypeError, match="sampler"):
        model.generate(["a red circle"], sampler="ddim")


def test_inverted_latents_decode_and_interpolate(gan_run):
    model = api.load(gan_run[0])
    images = model.generate(["a red circle", "a blue square"], seed=3)
    latents, recon = model.invert(images, ["a red circle", "a blue square"], steps=10)
    np.testing.assert_array_equal(model.decode(latents), recon)  # decode is what invert reconstructed with
    first = {k: v[:1] for k, v in latents.items()}
    second = {k: v[1:] for k, v in latents.items()}
    path = model.interpolate_latents(first, second, num=4)
    assert path.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(path[0], recon[0])
    np.testing.assert_array_equal(path[-1], recon[1])
    with pytest.raises(ValueError, match="'z', 'text'"):
        model.decode(latents["z"])


def test_clip_guided_edit_runs_on_the_gan(gan_run, clip_run):
    workdir, _, _ = gan_run
    model = api.load(workdir)
    images = model.generate(["a red circle"], num=2, seed=0)
    out, history = model.edit(images, "a red circle", "a blue circle", clip=clip_run[0], steps=5,
                              return_history=True)
    assert out.shape == images.shape and history.shape == (6, 2)
    assert np.all(np.isfinite(history))


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="data.image_size"):
        tiny_config("gan_shapes", "data.image_size=32")
    with pytest.raises(ConfigError, match="loss.augment"):
        tiny_config("gan_shapes", "loss.augment=('translation','flip')")
    with pytest.raises(ConfigError, match="loss.r1_every"):
        tiny_config("gan_shapes", "loss.r1_every=0")
    with pytest.raises(ConfigError, match="optim_d.lr"):
        tiny_config("gan_shapes", "optim_d.lr=0.0")
    with pytest.raises(ConfigError, match="sample.edit_source_layers"):
        tiny_config("gan_shapes", "sample.edit_source_layers=3")


def test_evaluate_scores_inversion_and_color_edits(gan_run, cnn_run):
    from mmjax.evaluate import evaluate, format_table

    model, judge = api.load(gan_run[0]), api.load(cnn_run[0])
    results = evaluate(model, judge=judge, num=32, reconstructions=8, edits=8)
    assert results["reconstructed"] == 8 and 5 < results["psnr"] < 60
    assert results["edit"]["num"] == 8 and 0 <= results["edit"]["color"] <= 1
    assert results["_edited"].shape == (8, 16, 16, 3)
    assert "edit: color word" in format_table(results)


def test_sample_cli_invert(gan_run, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from tests.helpers import REPO

    workdir = gan_run[0]
    image = api.load(workdir).generate(["a red circle"], seed=1)[0]
    Image.fromarray(image).save(tmp_path / "in.png")
    env = {**os.environ, "XLA_FLAGS": ""}
    run = lambda *a: subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--workdir", workdir, *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    proc = run("--mode", "invert", "--image", str(tmp_path / "in.png"), "--prompt", "a red circle", "--steps", "20",
               "--out", str(tmp_path / "inv.png"))
    assert proc.returncode == 0, proc.stderr
    assert "inversion PSNR" in proc.stdout and Image.open(tmp_path / "inv.png").size[0] > 32
