"""Stable Diffusion's conditional UNet against diffusers' UNet2DConditionModel (fixtures)."""

import json
import os

import numpy as np
import pytest

from mmjax.interop import safetensors_io
from mmjax.interop import sd_unet as interop
from mmjax.models.sd_unet import SDUNet, timestep_embedding

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "sd_unet")


def _load(name):
    kwargs = interop.module_kwargs(json.load(open(os.path.join(FIXTURE, name, "config.json"))))
    tensors = safetensors_io.read(os.path.join(FIXTURE, name, "diffusion_pytorch_model.safetensors"))
    return SDUNet(**kwargs), interop.params_from_tensors(tensors, kwargs), tensors, kwargs


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_prediction_matches_diffusers(name):
    expected = np.load(os.path.join(FIXTURE, f"{name}_expected.npz"))
    model, params, _, _ = _load(name)
    out = model.apply({"params": params}, expected["latents"], expected["timesteps"], expected["context"])
    assert out.shape == expected["out"].shape and out.dtype == np.float32
    scale = float(np.abs(expected["out"]).max())
    np.testing.assert_allclose(out, expected["out"], atol=1e-4 * max(scale, 1.0))


def test_timestep_embedding_layouts():
    emb = np.asarray(timestep_embedding(np.array([0.0, 5.0]), 8, flip_sin_to_cos=True, freq_shift=0))
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])  # cos first, at t = 0
    swapped = np.asarray(timestep_embedding(np.array([5.0]), 8, flip_sin_to_cos=False, freq_shift=0))
    np.testing.assert_allclose(swapped[0], np.concatenate([emb[1, 4:], emb[1, :4]]), rtol=1e-6)


def test_configs_it_cannot_build_are_refused_by_name():
    _, _, tensors, kwargs = _load("sd1")
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*SDXL"):
        interop.module_kwargs({"addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="down_block_types 'CrossAttnDownBlock3D'"):
        interop.module_kwargs({"down_block_types": ["CrossAttnDownBlock3D"]})
    with pytest.raises(ValueError, match="is missing"):
        interop.params_from_tensors(tensors, {**kwargs, "layers_per_block": 2})
    with pytest.raises(ValueError, match="attention_head_dim has 3 entries for 2 blocks"):
        interop.params_from_tensors(tensors, {**kwargs, "attention_head_dim": (2, 2, 2)})
