"""Stable Diffusion folders through `mmjax.load`, against diffusers' own pipeline runs (fixtures)."""

import functools
import json
import os
import shutil

import numpy as np
import pytest

import mmjax
from mmjax.interop import scheduler

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "sd_pipeline")
RECORD = json.load(open(os.path.join(FIXTURE, "made_by.json")))


@functools.cache
def _model(name):
    """One handle per fixture per process, so tests that ask for the same program share its compile."""
    return mmjax.load(os.path.join(FIXTURE, name), dtype="float32")


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request):
    name = request.param
    return name, _model(name), np.load(os.path.join(FIXTURE, f"{name}_expected.npz"))


def test_timesteps_are_the_schedulers_own():
    for name in ("sd1", "sd2"):
        spec = scheduler.read(os.path.join(FIXTURE, name, "scheduler"))
        for sampler in ("ddim", "euler"):
            np.testing.assert_array_equal(spec.path(sampler, 10)[0], RECORD["variants"][name][f"{sampler}_timesteps"])


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_guided_sampling_matches_diffusers(case, sampler):
    name, model, expected = case
    latents = expected["latents"]
    out = model.sample_latents(RECORD["prompts"], guidance=RECORD["guidance"], negative_prompt=RECORD["negative"],
                               sampler=sampler, steps=RECORD["steps"], height=RECORD["height"],
                               width=RECORD["width"], latents=latents)
    reference = expected[f"{sampler}_trajectory"][:, -1]
    assert out.shape == reference.shape
    np.testing.assert_allclose(out, reference, atol=1e-3)
    images = model.decode(out).astype(np.float32)
    np.testing.assert_allclose(images, expected[f"{sampler}_images"] * 255, atol=1.01)


def test_tokens_match_the_pipelines(case):
    name, model, expected = case
    np.testing.assert_array_equal(model.tokenizer.encode(RECORD["prompts"] + RECORD["negative"]), expected["tokens"])


def test_stored_dtype_is_kept_unless_asked():
    model = mmjax.load(os.path.join(FIXTURE, "sd2"))  # its UNet is stored in float16
    leaf = model.params["unet"]["conv_in"]["kernel"]
    assert leaf.dtype == np.float16 and model.params["vae"]["quant_conv"]["kernel"].dtype == np.float32


@pytest.mark.e2e  # whole sampling programs end to end (several UNet + VAE compiles), as the zoo's are
def test_editing_api_on_any_multiple_of_8():
    model = _model("sd1")
    images = model.generate("a red square", num=2, steps=3, height=40, width=24, sampler="dpmpp_2m")
    assert images.shape == (2, 40, 24, 3) and images.dtype == np.uint8
    assert np.array_equal(images, model.generate("a red square", num=2, steps=3, height=40, width=24,
                                                 sampler="dpmpp_2m"))
    changed = model.img2img(images, "a blue circle", strength=0.5, steps=4)
    assert changed.shape == images.shape
    mask = np.zeros((40, 24), bool)
    mask[8:24, 8:16] = True
    filled = model.inpaint(images, mask, "a green triangle", steps=3, sampler="euler")
    assert np.array_equal(filled[:, ~mask], images[:, ~mask]) and not np.array_equal(filled, images)
    edited = model.edit(images, "a red square", "a red circle", strength=0.6, steps=4)
    assert edited.shape == images.shape
    with pytest.raises(ValueError, match="multiples of 8"):
        model.generate("x", height=36)
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.generate("x", sampler="plms")


def _copy(tmp_path, name="sd1"):
    folder = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURE, name), folder)
    return folder


def test_bad_folders_are_refused_by_name(tmp_path):
    folder = _copy(tmp_path)
    shutil.rmtree(os.path.join(folder, "vae"))
    with pytest.raises(FileNotFoundError, match="vae/ folder"):
        mmjax.load(folder)
    folder = _copy(tmp_path / "b")
    path = os.path.join(folder, "unet", "config.json")
    config = json.load(open(path))
    json.dump({**config, "down_block_types": ["CrossAttnDownBlock2D", "SimpleDownBlock2D"]}, open(path, "w"))
    with pytest.raises(ValueError, match="config.json.*'SimpleDownBlock2D' is not supported"):
        mmjax.load(folder)
    json.dump({**config, "cross_attention_dim": 48}, open(path, "w"))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors: tensor 'down_blocks.0.attentions.0"
                                         r".transformer_blocks.0.attn2.to_k.weight' has the wrong shape"):
        mmjax.load(folder)
    folder = _copy(tmp_path / "c")
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    json.dump({**json.load(open(path)), "use_magic": True}, open(path, "w"))
    with pytest.raises(ValueError, match="scheduler_config.json: unknown scheduler field 'use_magic'"):
        mmjax.load(folder)
    folder = _copy(tmp_path / "d")
    weights = os.path.join(folder, "text_encoder", "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated|damaged"):
        mmjax.load(folder)


def test_scheduler_configs_as_shipped_and_refused():
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    spec = scheduler.from_config(sd15)
    assert spec.prediction == "eps" and spec.spacing == "leading" and spec.clip_sample is None
    t, level, nxt = spec.path("ddim", 50)
    assert t[0] == 981 and t[-1] == 1 and nxt[-1] == spec.alphas_cumprod[0]
    assert level[0] == pytest.approx(spec.alphas_cumprod[981])
    assert scheduler.from_config({"_class_name": "EulerDiscreteScheduler"}).spacing == "linspace"
    assert scheduler.from_config({"_class_name": "DDIMScheduler"}).clip_sample == 1.0
    _, level, _ = spec.path("euler", 10, strength=0.3)
    assert len(level) == 3
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        scheduler.from_config({**sd15, "thresholding": True})
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        scheduler.from_config({**sd15, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        scheduler.from_config({**sd15, "beta_schedule": "sigmoid"})


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_export_gives_back_the_same_bytes(tmp_path, name):
    model = mmjax.load(os.path.join(FIXTURE, name))
    out = model.export_diffusers(str(tmp_path / "out"))
    for part in ("unet", "vae", "text_encoder"):
        stem = "model" if part == "text_encoder" else "diffusion_pytorch_model"
        source = open(os.path.join(FIXTURE, name, part, f"{stem}.safetensors"), "rb").read()
        assert open(os.path.join(out, part, f"{stem}.safetensors"), "rb").read() == source, part
    assert mmjax.load(out).methods == model.methods
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        model.export_diffusers(out)
    changed = model.params["unet"]["up1_attn0"]["block0"]["attn1"]["query"]
    model.params["unet"]["up1_attn0"]["block0"]["attn1"]["query"] = {**changed, "bias": changed["bias"] + 1}
    with pytest.raises(ValueError, match="nonzero values the diffusers format has no tensor for"):
        model.export_diffusers(str(tmp_path / "again"))
    assert not os.path.exists(tmp_path / "again")


@pytest.mark.e2e  # whole sampling programs end to end (several UNet + VAE compiles), as the zoo's are
def test_sample_py_on_a_diffusers_folder(tmp_path, capsys):
    import sample
    from PIL import Image

    out = str(tmp_path / "grid.png")
    assert sample.main(["--workdir", os.path.join(FIXTURE, "sd1"), "--prompt", "a red square", "--num", "2",
                        "--steps", "2", "--height", "40", "--width", "24", "--out", out]) == 0
    assert Image.open(out).size[0] >= 2 * 24
    assert sample.main(["--workdir", os.path.join(FIXTURE, "sd1"), "--prompt", "x", "--height", "36",
                        "--steps", "2", "--out", out]) == 2
    assert "multiples of 8" in capsys.readouterr().err


SINGLE = {"sd1": {"vae": {"norm_num_groups": 4}, "unet": {"norm_num_groups": 8, "attention_head_dim": 2},
                  "text_encoder": {"num_attention_heads": 4}},
          "sd2": {"vae": {"norm_num_groups": 4}, "text_encoder": {"num_attention_heads": 4},
                  "unet": {"norm_num_groups": 8, "attention_head_dim": [2, 4], "upcast_attention": True},
                  "scheduler": {"prediction_type": "v_prediction", "timestep_spacing": "linspace"}}}


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_file_loads_the_same_model(name):
    """Original-format files (made from the folders by make_sd_single_file.py, checked there with
    diffusers' own converters): every parameter equal, and the same samples."""
    import jax

    folder = _model(name)
    single = mmjax.load(os.path.join(FIXTURE, f"{name}_single.safetensors"), configs=SINGLE[name],
                        tokenizer=os.path.join(FIXTURE, name, "tokenizer"))
    assert jax.tree.structure(single.params) == jax.tree.structure(folder.params)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(folder.params)):
        np.testing.assert_array_equal(a, b)
    assert single.modules.unet.use_linear_projection == (name == "sd2")
    assert single.scheduler.prediction == folder.scheduler.prediction
    assert single.modules.text_encoder.act == folder.modules.text_encoder.act


def test_single_file_asks_for_what_its_shapes_cannot_tell(tmp_path):
    path = os.path.join(FIXTURE, "sd2_single.safetensors")
    with pytest.raises(ValueError, match="carries no tokenizer"):
        mmjax.load(path)
    tokenizer = os.path.join(FIXTURE, "sd2", "tokenizer")
    with pytest.raises(ValueError, match="head count is unknown"):
        mmjax.load(path, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="whether it predicts v"):
        mmjax.load(path, tokenizer=tokenizer, configs={k: v for k, v in SINGLE["sd2"].items() if k != "scheduler"})
    from mmjax.interop import safetensors_io

    tensors = safetensors_io.read(path)
    stray = str(tmp_path / "stray.safetensors")
    safetensors_io.write(stray, {**tensors, "model.diffusion_model.extra_block.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="extra_block.weight' has no place"):
        mmjax.load(stray, tokenizer=tokenizer, configs=SINGLE["sd2"])


@pytest.mark.parametrize("model", ["sd15", "sd21"])
def test_full_size_layouts_map_both_ways(model):
    """Every tensor of full-size SD 1.5 / 2.1 (names and shapes recorded by make_sd_layouts.py)
    lands on a parameter of the project's module of the same config, of the right shape, and
    every parameter is provided. Zero-stride stand-ins: nothing of full size is allocated."""
    import jax

    from mmjax.interop import diffusers_pipeline

    layouts = json.load(open(os.path.join(os.path.dirname(FIXTURE), "sd_layouts.json")))[model]
    for part, layout in layouts.items():
        tensors = {k: np.broadcast_to(np.float32(0), v) for k, v in layout["tensors"].items()}
        tensors.pop("text_model.embeddings.position_ids", None)
        built = diffusers_pipeline.build_component(part, layout["config"], tensors, part, part)
        count = sum(int(np.prod(v)) for k, v in layout["tensors"].items() if "position_ids" not in k)
        assert sum(x.size for x in jax.tree.leaves(built.params)) >= count


@pytest.mark.e2e  # whole sampling programs end to end (several UNet + VAE compiles), as the zoo's are
def test_attention_maps_per_word():
    model = _model("sd2")
    result = model.attention_maps("a small RED square, top-left", num=2, steps=3, height=32, width=24)
    assert result.words == ["a", "small", "RED", "square", "top-left"]
    assert result.maps.shape == (2, 5, 32, 24) and np.allclose(result.maps.sum(axis=(2, 3)), 1, atol=1e-4)
    images = model.generate("a small RED square, top-left", num=2, steps=3, height=32, width=24)
    assert np.array_equal(result.images, images)  # the same seed draws the same images
    assert not np.allclose(result.maps[:, 1], result.maps[:, 3])  # words look at different places


def test_ddpm_steps_follow_the_seed():
    model = _model("sd1")
    z = np.random.default_rng(0).normal(size=(1, 4, 4, 4)).astype(np.float32)
    run = lambda seed: model.sample_latents("a red square", steps=3, sampler="ddpm", height=32, width=32,  # noqa: E731
                                            latents=z, seed=seed)
    first = run(0)
    assert not np.allclose(first, run(1)) and np.array_equal(first, run(0))
