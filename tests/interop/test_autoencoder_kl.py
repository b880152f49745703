"""Stable Diffusion's KL autoencoder against diffusers' AutoencoderKL (fixture)."""

import json
import os

import numpy as np
import pytest

from mmjax.interop import autoencoder_kl as interop
from mmjax.interop import safetensors_io
from mmjax.models.autoencoder_kl import AutoencoderKL

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "autoencoder_kl")


def _load():
    kwargs = interop.module_kwargs(json.load(open(os.path.join(FIXTURE, "config.json"))))
    tensors = safetensors_io.read(os.path.join(FIXTURE, "diffusion_pytorch_model.safetensors"))
    return AutoencoderKL(**kwargs), interop.params_from_tensors(tensors, kwargs), tensors, kwargs


def test_encode_and_decode_match_diffusers():
    expected = np.load(os.path.join(FIXTURE, "expected.npz"))
    model, params, _, _ = _load()
    mean, logvar = model.apply({"params": params}, expected["image"], method=AutoencoderKL.encode)
    np.testing.assert_allclose(mean, expected["mean"], atol=1e-4)
    np.testing.assert_allclose(logvar, expected["logvar"], atol=1e-4)
    decoded = model.apply({"params": params}, expected["latent"], method=AutoencoderKL.decode)
    np.testing.assert_allclose(decoded, expected["decoded"], atol=1e-4)
    assert model.scaling_factor == pytest.approx(0.18215) and model.downsample_factor == 2


def test_config_and_weights_that_do_not_fit_are_named():
    _, _, tensors, kwargs = _load()
    with pytest.raises(ValueError, match="tensors this config does not use"):
        interop.params_from_tensors(tensors, {**kwargs, "block_out_channels": (16,)})
    with pytest.raises(ValueError, match="is missing"):
        interop.params_from_tensors(tensors, {**kwargs, "layers_per_block": 2})
    with pytest.raises(ValueError, match="act_fn 'gelu'"):
        interop.module_kwargs({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types 'AttnDownEncoderBlock2D'"):
        interop.module_kwargs({"down_block_types": ["AttnDownEncoderBlock2D"]})
