"""CLIP text encoder and safetensors reading, against transformers' CLIPTextModel (fixtures)."""

import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mmjax.interop import clip_text, safetensors_io
from mmjax.models.clip_text import CLIPTextTransformer

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "clip_text")
TOKENS = jnp.asarray(json.load(open(os.path.join(FIXTURE, "made_by.json")))["tokens"], jnp.int32)


def _load(folder, output="last", dtype=np.float32):
    config = json.load(open(os.path.join(FIXTURE, folder, "config.json")))
    kwargs = clip_text.module_kwargs(config, output=output)
    tensors = safetensors_io.read(os.path.join(FIXTURE, folder, "model.safetensors"), dtype=dtype)
    params = clip_text.params_from_tensors(tensors, kwargs["depth"], kwargs["num_heads"])
    return CLIPTextTransformer(**kwargs), params


@pytest.mark.parametrize("variant, folder, atol", [("sd1", "sd1", 2e-5), ("sd2", "sd2", 2e-5),
                                                   ("sd1", "sd1_fp16", 2e-2)])  # float16 weights: rounding
def test_outputs_match_transformers(variant, folder, atol):
    expected = np.load(os.path.join(FIXTURE, f"{variant}_expected.npz"))
    model, params = _load(folder)
    context, aux = model.apply({"params": params}, TOKENS)
    np.testing.assert_allclose(context, expected["last"], atol=atol)
    np.testing.assert_allclose(aux["pooled"], expected["pooled"], atol=atol)
    assert aux["mask"].all()
    context2, _ = CLIPTextTransformer(**_kwargs(folder, "penultimate")).apply({"params": params}, TOKENS)
    np.testing.assert_allclose(context2, expected["penultimate"], atol=atol)


def _kwargs(folder, output):
    return clip_text.module_kwargs(json.load(open(os.path.join(FIXTURE, folder, "config.json"))), output=output)


def test_reader_matches_the_safetensors_library_and_keeps_dtypes(tmp_path):
    from safetensors.numpy import load_file

    path = os.path.join(FIXTURE, "sd1_fp16", "model.safetensors")
    ours, theirs = safetensors_io.read(path), load_file(path)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == np.float16
        np.testing.assert_array_equal(ours[name], theirs[name])
    # bfloat16, which the library's numpy reader cannot return.
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = values.astype(ml_dtypes.bfloat16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, len(raw)]},
                         "__metadata__": {"format": "pt"}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw)
    read = safetensors_io.read(str(path))
    assert read["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(safetensors_io.read(str(path), dtype=np.float32)["w"], values)


def test_damaged_files_and_wrong_architectures_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        safetensors_io.read(str(tmp_path / "nope.safetensors"))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_io.read(str(short))
    data = open(os.path.join(FIXTURE, "sd1", "model.safetensors"), "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="damaged"):
        safetensors_io.read(str(cut))
    tensors = safetensors_io.read(os.path.join(FIXTURE, "sd1", "model.safetensors"))
    with pytest.raises(ValueError, match="tensors this architecture does not use.*num_hidden_layers"):
        clip_text.params_from_tensors(tensors, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="is missing"):
        clip_text.params_from_tensors(tensors, depth=4, num_heads=4)
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        clip_text.module_kwargs({"hidden_act": "relu"})
