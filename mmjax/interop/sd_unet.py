"""A diffusers `UNet2DConditionModel` (SD 1.x / 2.x config.json + weights) as the project's SDUNet.

`module_kwargs(config)` keeps the config keys SDUNet builds and refuses the ones it does not
(an unknown block type, class embeddings, SDXL's added time ids: named in the error);
`params_from_tensors(tensors, kwargs)` maps the diffusers tensor names onto the parameter tree.
"""

from __future__ import annotations

import numpy as np

from mmjax.interop.autoencoder_kl import _Reader
from mmjax.models.sd_unet import DOWN_BLOCKS, UP_BLOCKS

KEPT = ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
        "layers_per_block", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
        "use_linear_projection", "upcast_attention", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
        "freq_shift")
# Keys whose non-default values change the architecture in ways SDUNet does not build.
UNSUPPORTED = {"addition_embed_type": None, "class_embed_type": None, "encoder_hid_dim": None,
               "num_class_embeds": None, "time_cond_proj_dim": None, "dual_cross_attention": False,
               "only_cross_attention": False, "resnet_time_scale_shift": "default", "act_fn": "silu",
               "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False,
               "downsample_padding": 1, "mid_block_scale_factor": 1, "num_attention_heads": None,
               "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default"}


def module_kwargs(config: dict) -> dict:
    for key, default in UNSUPPORTED.items():
        value = config.get(key, default)
        if value != default and not (isinstance(value, list) and not any(value)):
            raise ValueError(f"UNet config: {key}={value!r} is not supported (SD 1.x/2.x UNets have {default!r}); "
                             "SDXL and other variants are not built yet")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in KEPT}
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        bad = [b for b in kwargs.get(key, ()) if b not in allowed]
        if bad:
            raise ValueError(f"UNet config: {key} {bad[0]!r} is not supported (supported: {allowed})")
    return kwargs


def _attention(r: _Reader, name: str, heads: int) -> dict:
    """to_q/to_k/to_v (SD's have no bias: zeros here) and to_out.0 as layers.Attention's."""
    out = {}
    for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
        kernel = r.take(f"{name}.{theirs}.weight").T
        width = kernel.shape[1]
        bias = r.take(f"{name}.{theirs}.bias") if f"{name}.{theirs}.bias" in r.tensors else np.zeros(width, kernel.dtype)
        out[ours] = {"kernel": kernel.reshape(kernel.shape[0], heads, width // heads),
                     "bias": bias.reshape(heads, width // heads)}
    kernel, bias = r.take(f"{name}.to_out.0.weight").T, r.take(f"{name}.to_out.0.bias")
    out["out"] = {"kernel": kernel.reshape(heads, kernel.shape[0] // heads, kernel.shape[1]), "bias": bias}
    return out


def _layer_norm(r: _Reader, name: str) -> dict:
    return {"LayerNorm_0": {"scale": r.take(f"{name}.weight"), "bias": r.take(f"{name}.bias")}}


def _dense(r: _Reader, name: str) -> dict:
    weight = r.take(f"{name}.weight")
    return {"kernel": weight.T, "bias": r.take(f"{name}.bias")}


def _transformer(r: _Reader, name: str, heads: int, depth: int, linear: bool) -> dict:
    project = (lambda n: _dense(r, n)) if linear else r.conv  # noqa: E731
    out = {"norm": r.norm(f"{name}.norm"), "proj_in": project(f"{name}.proj_in"),
           "proj_out": project(f"{name}.proj_out")}
    for i in range(depth):
        block = f"{name}.transformer_blocks.{i}"
        out[f"block{i}"] = {"norm1": _layer_norm(r, f"{block}.norm1"), "norm2": _layer_norm(r, f"{block}.norm2"),
                            "norm3": _layer_norm(r, f"{block}.norm3"),
                            "attn1": _attention(r, f"{block}.attn1", heads), "attn2": _attention(r, f"{block}.attn2", heads),
                            "ff_in": _dense(r, f"{block}.ff.net.0.proj"), "ff_out": _dense(r, f"{block}.ff.net.2")}
    return out


def _resnet(r: _Reader, name: str) -> dict:
    out = r.resnet(name)
    out["time_emb_proj"] = _dense(r, f"{name}.time_emb_proj")
    return out


def params_from_tensors(tensors: dict[str, np.ndarray], kwargs: dict) -> dict:
    """The SDUNet `params` tree from diffusers-named tensors; refuses missing and unused ones."""
    from mmjax.models.sd_unet import SDUNet, _per_block

    defaults = SDUNet()
    get = lambda key: kwargs.get(key, getattr(defaults, key))  # noqa: E731
    channels, per_block = get("block_out_channels"), get("layers_per_block")
    levels = len(channels)
    heads = _per_block(get("attention_head_dim"), levels, "attention_head_dim")
    depths = _per_block(get("transformer_layers_per_block"), levels, "transformer_layers_per_block")
    linear = get("use_linear_projection")
    r = _Reader(tensors)
    params = {"conv_in": r.conv("conv_in"), "norm_out": r.norm("conv_norm_out"), "conv_out": r.conv("conv_out"),
              "time_linear_1": _dense(r, "time_embedding.linear_1"),
              "time_linear_2": _dense(r, "time_embedding.linear_2")}
    for i, kind in enumerate(get("down_block_types")):
        for j in range(per_block):
            params[f"down{i}_res{j}"] = _resnet(r, f"down_blocks.{i}.resnets.{j}")
            if kind == "CrossAttnDownBlock2D":
                params[f"down{i}_attn{j}"] = _transformer(r, f"down_blocks.{i}.attentions.{j}", heads[i], depths[i], linear)
        if i < levels - 1:
            params[f"down{i}_sample"] = r.conv(f"down_blocks.{i}.downsamplers.0.conv")
    params["mid_res0"] = _resnet(r, "mid_block.resnets.0")
    params["mid_attn"] = _transformer(r, "mid_block.attentions.0", heads[-1], depths[-1], linear)
    params["mid_res1"] = _resnet(r, "mid_block.resnets.1")
    up_heads, up_depths = heads[::-1], depths[::-1]
    for i, kind in enumerate(get("up_block_types")):
        for j in range(per_block + 1):
            params[f"up{i}_res{j}"] = _resnet(r, f"up_blocks.{i}.resnets.{j}")
            if kind == "CrossAttnUpBlock2D":
                params[f"up{i}_attn{j}"] = _transformer(r, f"up_blocks.{i}.attentions.{j}", up_heads[i], up_depths[i], linear)
        if i < levels - 1:
            params[f"up{i}_sample"] = r.conv(f"up_blocks.{i}.upsamplers.0.conv")
    unused = sorted(set(tensors) - r.used)
    if unused:
        raise ValueError(f"UNet weights: {len(unused)} tensors this config does not use, e.g. {unused[:3]}")
    return params
