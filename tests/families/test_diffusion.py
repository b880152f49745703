"""Diffusion family: objective, guidance, the sampling/editing abilities, latent mode."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import api, zoo
from mmjax.config import ConfigError
from mmjax.families import diffusion
from mmjax.sampling import schedules as sched
from tests.families.test_families import fit, one_batch
from tests.helpers import REPO, tiny_config


def psnr(a_uint8, b_uint8) -> float:
    mse = np.mean((a_uint8.astype(np.float64) - b_uint8.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


@pytest.mark.e2e
@pytest.mark.slow  # 80 steps of the pixel UNet: the latent and flow families overfit in the default lane
def test_overfits_one_batch():
    config = tiny_config("diffusion_shapes", "optim.lr=3e-3", "optim.warmup_steps=0",
                         "optim.schedule=constant", "loss.weighting=uniform", "loss.p_uncond=0.0")
    *_, history = fit(config, 80)
    first = np.mean([h["mse"] for h in history[:10]])
    last = np.mean([h["mse"] for h in history[-10:]])
    assert last < 0.5 * first, (first, last)


# eps trains in the diffusion_run fixture and v in ldm_run (configs/ldm_shapes.py); x0 only here.
@pytest.mark.parametrize("prediction", [p for p in sched.PREDICTIONS if p not in ("eps", "v")])
@pytest.mark.e2e
def test_loss_is_finite_for_every_prediction(prediction):
    config = tiny_config("diffusion_shapes", f"loss.prediction={prediction}")
    *_, history = fit(config, 2)
    assert np.isfinite(history[-1]["loss"]) and history[-1]["nonfinite"] == 0


@pytest.mark.e2e
def test_unconditional_model_trains_and_samples():
    config = tiny_config("diffusion_shapes", "variant=tiny_uncond")
    _, model, state, batch, history = fit(config, 2)
    assert all(np.isfinite(h["loss"]) for h in history)
    out = diffusion.generate(model, state.ema_params, diffusion.settings(config), batch["tokens"][:2],
                             jax.random.key(0), 3.0, sampler="ddim", steps=3, eta=0.0)
    assert out.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(out)))


def test_run_traces_once_and_reports_eval(diffusion_run):
    _, _, result = diffusion_run
    assert result.trace_count == 1
    assert {"eval/x0_mse", "eval/x0_mse_t10", "eval/x0_mse_t90"} <= set(result.eval_metrics)


def _denoiser_parts(diffusion_run):
    workdir, config, _ = diffusion_run
    model = api.load(workdir)
    batch = one_batch(config, size=4)
    s = diffusion.noise_schedule(diffusion.settings(config))
    x = jax.random.normal(jax.random.key(1), batch["image"].shape)
    t = jnp.full((4,), 50, jnp.int32)
    return model, config, batch, s, x, t


def test_guidance_one_is_conditional_and_zero_unconditional(diffusion_run):
    model, config, batch, s, x, t = _denoiser_parts(diffusion_run)
    m, params = model.module, model.params
    settings = diffusion.settings(config)
    empty = diffusion.empty_tokens(settings, 4)

    def single(tokens):  # the plain, unguided prediction for these captions
        out = m.apply({"params": params["unet"]}, x, t, tokens)
        x0, _ = sched.predict_x0_eps(config.loss.prediction, out, x, s, t)
        return jnp.clip(x0, -1, 1)

    for guidance, tokens in ((1.0, batch["tokens"]), (0.0, empty)):
        denoise = diffusion.make_denoiser(m, params, settings, batch["tokens"], empty, guidance)
        np.testing.assert_allclose(denoise(x, t)[0], single(tokens), atol=1e-5)
    # ... and guidance 3 is neither (the model does read the caption).
    guided = diffusion.make_denoiser(m, params, settings, batch["tokens"], empty, 3.0)(x, t)[0]
    assert float(jnp.max(jnp.abs(guided - single(batch["tokens"])))) > 1e-4


def test_generate_deterministic_and_compiled_once(diffusion_run):
    workdir, config, _ = diffusion_run
    model = api.load(workdir)
    a = model.generate(["a red circle", "a blue square"], num=2, seed=3)
    b = model.generate(["a red circle", "a blue square"], num=2, seed=3)
    assert a.shape == (4, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    c = model.generate(["a green triangle", "a white circle"], num=2, seed=4, guidance=2.0)
    assert not np.array_equal(a, c)
    (fn,) = [f for k, f in model._compiled.items() if k[0] == "generate"]
    assert fn._cache_size() == 1  # new prompts, seed and guidance did not recompile
    for sampler in ("ddpm", "dpmpp_2m", "euler"):
        out = model.generate(["a red circle"], num=2, seed=0, sampler=sampler, steps=5)
        assert out.shape == (2, 16, 16, 3)
    neg = model.generate(["a red circle", "a blue square"], num=2, seed=3, negative_prompt="a green shape")
    assert not np.array_equal(a, neg)


def test_inpaint_keeps_unmasked_pixels(diffusion_run):
    workdir, config, _ = diffusion_run
    model = api.load(workdir)
    images = (np.asarray(one_batch(config, size=2)["image"]) * 127.5 + 127.5).round().astype(np.uint8)
    mask = np.zeros((2, 16, 16), bool)
    mask[:, 4:12, 4:12] = True
    out = model.inpaint(images, mask, "a red circle", seed=0, steps=5, resample=2)
    np.testing.assert_array_equal(out[~mask], images[~mask])
    assert not np.array_equal(out[mask], images[mask])


def test_img2img_and_inversion_round_trip(diffusion_run):
    workdir, config, _ = diffusion_run
    model = api.load(workdir)
    batch = one_batch(config, size=4)
    images = (np.asarray(batch["image"]) * 127.5 + 127.5).round().astype(np.uint8)
    captions = [str(c) for c in model.tokenizer.decode(np.asarray(batch["tokens"]))]
    near = model.img2img(images, captions, strength=0.02, seed=0)
    assert psnr(near, images) > 30, psnr(near, images)
    far = model.img2img(images, captions, strength=1.0, seed=0)
    assert psnr(far, images) < psnr(near, images) - 5
    # DDIM inversion under the caption, then DDIM sampling with the same caption, unguided,
    # from 80% of the schedule (the edit default). Half the steps lose accuracy (first order).
    back = model.edit(images, captions, captions, guidance=1.0, strength=0.8, steps=50)
    assert psnr(back, images) > 35, psnr(back, images)
    coarse = model.edit(images, captions, captions, guidance=1.0, strength=0.8, steps=10)
    assert psnr(coarse, images) < psnr(back, images)


def test_interpolate_ends_match_generate(diffusion_run):
    workdir, _, _ = diffusion_run
    model = api.load(workdir)
    path = model.interpolate_prompts("a red circle", "a blue square", seed_a=1, seed_b=2, num=3,
                                     sampler="ddim", steps=10)
    assert path.shape == (3, 16, 16, 3)
    ends = [model.generate(["a red circle"], seed=0, sampler="ddim", steps=10)]
    assert ends[0].shape == (1, 16, 16, 3)
    with pytest.raises(NotImplementedError, match="cannot interpolate_images"):
        model.interpolate_images(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))


def test_latent_run_freezes_the_vae_and_is_self_contained(ldm_run, vae_run, tmp_path):
    workdir, config, result = ldm_run
    assert result.trace_count == 1
    vae = api.load(vae_run[0])
    state = result.state
    for got in (state.params["vae"], state.ema_params["vae"]):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, vae.params)
    std = np.asarray(state.params["latent"]["std"])
    assert std.shape == (4,) and np.all(std > 0) and not np.allclose(std, 1.0)
    # The checkpoint samples without the VAE's workdir.
    copy = tmp_path / "ldm_copy"
    shutil.copytree(workdir, copy)
    model = api.load(str(copy))
    out = model.generate(["a large red circle"], num=2, seed=0, steps=5)
    assert out.shape == (2, 16, 16, 3)
    images = model.inpaint(out, np.pad(np.ones((8, 8), bool), 4), "a blue square", steps=4, resample=1)
    border = ~np.pad(np.ones((8, 8), bool), 4)
    np.testing.assert_array_equal(images[:, border], out[:, border])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="latent.vae_workdir"):
        tiny_config("ldm_shapes", f"latent.vae_workdir={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="loss.prediction"):
        tiny_config("diffusion_shapes", "loss.prediction=score")
    with pytest.raises(ConfigError, match="sample.sampler"):
        tiny_config("diffusion_shapes", "sample.sampler=heun")


def test_ldm_refuses_a_non_vae_workdir(cnn_run):
    with pytest.raises(ConfigError, match="not a VAE"):
        tiny_config("ldm_shapes", f"latent.vae_workdir={cnn_run[0]}")


def test_ldm_rides_on_an_exported_vae_with_the_same_vocabulary(vae_run, tmp_path):
    import json

    from mmjax.data.tokenizer import TOKENIZER_FILE, WordTokenizer

    exported = api.export(vae_run[0], str(tmp_path / "vae_export"))
    from_run = tiny_config("ldm_shapes", f"latent.vae_workdir={vae_run[0]}")
    from_export = tiny_config("ldm_shapes", f"latent.vae_workdir={exported}")
    assert from_export.latent.vae_config == from_run.latent.vae_config
    assert json.loads(from_export.latent.vae_config)["text"]["tokenizer"] == from_run.text.tokenizer == "word"
    # Another vocabulary (same settings, other words) would feed the VAE ids it never learned.
    other = WordTokenizer.build(["a red thing", "a red thing", "blue stuff", "blue stuff"],
                                max_len=from_run.data.max_len, capacity=from_run.text.vocab_size)
    with open(os.path.join(exported, TOKENIZER_FILE), "w", encoding="utf-8") as f:
        f.write(other.spec)
    with pytest.raises(ConfigError, match="latent.vae_workdir.*word vocabulary"):
        tiny_config("ldm_shapes", f"latent.vae_workdir={exported}")


def test_variants_are_registered():
    assert set(zoo.FAMILIES["diffusion"].variants) >= {"tiny", "small", "latent_small", "ddpm32", "ldm64"}


def test_export_round_trip_and_damage(diffusion_run, tmp_path):
    workdir, _, _ = diffusion_run
    out = str(tmp_path / "exported")
    api.export(workdir, out)
    a = api.load(workdir).generate(["a red circle"], num=2, seed=5, steps=5)
    b = api.load(out).generate(["a red circle"], num=2, seed=5, steps=5)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError):
        api.export(workdir, out)
    params = os.path.join(out, api.EXPORT_PARAMS)
    data = bytearray(open(params, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(params, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        api.load(out)


def _sample_main(*argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_main", os.path.join(REPO, "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


def test_sample_py_diffusion_modes(diffusion_run, tmp_path, capsys):
    from PIL import Image

    workdir, _, _ = diffusion_run
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((8, 8, 3), 255, np.uint8), ((4, 4), (4, 4), (0, 0)))).save(mask)
    common = ["--workdir", workdir, "--steps", "4"]
    runs = {
        "gen": ["--prompt", "a red circle", "--num", "2", "--sampler", "euler", "--guidance", "2",
                "--negative-prompt", "a blue square"],
        "i2i": ["--mode", "img2img", "--image", str(image), "--prompt", "a red circle", "--strength", "0.5"],
        "inp": ["--mode", "inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "a red circle"],
        "edit": ["--mode", "edit", "--image", str(image), "--prompt", "a red circle",
                 "--target-prompt", "a blue circle"],
        "interp": ["--mode", "interpolate", "--prompt", "a red circle", "--prompt", "a blue square",
                   "--num", "3", "--seed-b", "1"],
    }
    for name, args in runs.items():
        out = tmp_path / f"{name}.png"
        assert _sample_main(*common, *args, "--out", str(out)) == 0, (name, capsys.readouterr().err)
        assert out.exists()
    # edit takes the seed, strength and sampler the other modes take; nothing is ignored.
    edit = ["--mode", "edit", "--image", str(image), "--prompt", "a red circle", "--target-prompt", "a blue circle"]
    assert _sample_main(*common, *edit, "--seed", "3", "--strength", "0.5", "--sampler", "ddpm",
                        "--negative-prompt", "a green square", "--out", str(tmp_path / "e2.png")) == 0
    assert _sample_main(*common, "--prompt", "a red circle", "--attention-maps", "--out", str(tmp_path / "m.png")) == 0
    with Image.open(tmp_path / "m.png") as grid:  # the image, then one map per word ("a", "red", "circle")
        assert grid.width >= 4 * 16
    capsys.readouterr()
    assert _sample_main(*common, "--prompt", "a red circle", "--temperature", "0.5") == 2
    assert "--temperature does not apply to --mode generate of a diffusion model" in capsys.readouterr().err
    assert _sample_main(*common, "--mode", "reconstruct", "--image", str(image)) == 2
    assert "cannot reconstruct" in capsys.readouterr().err
    for bad, message in (([*edit[:-2]], "--target-prompt"), (["--prompt", "a", "--mask", str(mask)], "--mask"),
                         (["--mode", "interpolate", "--image", str(image)], "two --image")):
        with pytest.raises(SystemExit):
            _sample_main(*common, *bad)
        assert message in capsys.readouterr().err


def test_negative_prompts_reach_every_guided_mode(diffusion_run):
    model = api.load(diffusion_run[0])
    images = model.generate(["a red circle"], num=2, seed=1, steps=4)
    masks = np.zeros((2, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    calls = {"img2img": lambda **kw: model.img2img(images, "a blue circle", strength=0.7, steps=4, **kw),
             "inpaint": lambda **kw: model.inpaint(images, masks, "a blue circle", steps=4, resample=1, **kw),
             "edit": lambda **kw: model.edit(images, "a red circle", "a blue circle", steps=4, **kw)}
    for name, call in calls.items():
        plain, negative = call(), call(negative_prompt="a green square")
        assert not np.array_equal(plain, negative), name
        np.testing.assert_array_equal(negative, call(negative_prompt="a green square"))
    # edit's seed reaches a stochastic sampler, and not a deterministic one.
    stochastic = [model.edit(images, "a red circle", "a blue circle", steps=4, sampler="ddpm", seed=s) for s in (0, 1)]
    assert not np.array_equal(*stochastic)
    ddim = [model.edit(images, "a red circle", "a blue circle", steps=4, seed=s) for s in (0, 1)]
    np.testing.assert_array_equal(*ddim)


def test_attention_maps_map_words_and_match_generate(diffusion_run):
    model = api.load(diffusion_run[0])
    result = model.attention_maps("Please paint a RED circle, top-left!", num=2, seed=4, steps=4)
    assert result.words == ["Please", "paint", "a", "RED", "circle", "top-left"]
    assert result.maps.shape == (2, 6, 16, 16)
    np.testing.assert_allclose(result.maps.sum(axis=(2, 3)), 1.0, atol=1e-4)
    np.testing.assert_array_equal(result.images, model.generate("Please paint a RED circle, top-left!", num=2,
                                                                seed=4, steps=4))
    both = model.attention_maps(["a red circle", "Please paint a RED circle, top-left!"], num=2, seed=4, steps=4)
    assert [r.words for r in both] == [["a", "red", "circle"], result.words]
    with pytest.raises(ValueError, match="no words"):
        model.attention_maps(" ,.")


@pytest.mark.e2e
def test_pretrained_model_is_shipped_and_samples(tmp_path):
    out = tmp_path / "grid.png"
    assert _sample_main("--prompt", "a large purple triangle at the bottom", "--num", "2", "--steps", "10",
                        "--out", str(out)) == 0
    assert out.exists()
    size = sum(os.path.getsize(os.path.join(REPO, "pretrained", "ldm_shapes", f))
               for f in os.listdir(os.path.join(REPO, "pretrained", "ldm_shapes")))
    assert size <= 25e6
