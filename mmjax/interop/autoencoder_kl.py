"""A diffusers `AutoencoderKL` (config.json + weights) as the project's AutoencoderKL module.

`module_kwargs(config)` translates the config and refuses what the module does not build;
`params_from_tensors(tensors, kwargs)` maps the diffusers tensor names onto the parameter tree.
PyTorch convolutions are `[out, in, kh, kw]`, the project's NHWC kernels `[kh, kw, in, out]`.
"""

from __future__ import annotations

import numpy as np

ENCODER_BLOCKS = ("DownEncoderBlock2D",)
DECODER_BLOCKS = ("UpDecoderBlock2D",)


def module_kwargs(config: dict) -> dict:
    """AutoencoderKL fields from a diffusers AutoencoderKL config.json."""
    act = config.get("act_fn", "silu")
    if act != "silu":
        raise ValueError(f"AutoencoderKL config: act_fn {act!r} is not supported (only 'silu')")
    for key, allowed in (("down_block_types", ENCODER_BLOCKS), ("up_block_types", DECODER_BLOCKS)):
        bad = [b for b in config.get(key, ()) if b not in allowed]
        if bad:
            raise ValueError(f"AutoencoderKL config: {key} {bad[0]!r} is not supported (only {allowed[0]})")
    return {
        "block_out_channels": tuple(int(c) for c in config.get("block_out_channels", (64,))),
        "layers_per_block": int(config.get("layers_per_block", 1)),
        "latent_channels": int(config.get("latent_channels", 4)),
        "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_channels", 3)),
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
        "scaling_factor": float(config.get("scaling_factor", 0.18215)),
        "shift_factor": None if config.get("shift_factor") is None else float(config["shift_factor"]),
        "use_quant_conv": bool(config.get("use_quant_conv", True)),
        "use_post_quant_conv": bool(config.get("use_post_quant_conv", True)),
        "mid_attention": bool(config.get("mid_block_add_attention", True)),
    }


class _Reader:
    """Takes tensors by name, converted to the project's layouts, and remembers what it took."""

    def __init__(self, tensors):
        self.tensors, self.used = tensors, set()

    def take(self, name):
        if name not in self.tensors:
            raise ValueError(f"AutoencoderKL weights: tensor {name!r} is missing")
        self.used.add(name)
        return np.asarray(self.tensors[name])

    def conv(self, name):
        return {"kernel": self.take(f"{name}.weight").transpose(2, 3, 1, 0), "bias": self.take(f"{name}.bias")}

    def norm(self, name):
        return {"GroupNorm_0": {"scale": self.take(f"{name}.weight"), "bias": self.take(f"{name}.bias")}}

    def linear(self, name):
        weight = self.take(f"{name}.weight")
        if weight.ndim == 4:  # very old checkpoints stored the attention projections as 1x1 convs
            weight = weight[:, :, 0, 0]
        return weight.T, self.take(f"{name}.bias")

    def resnet(self, name):
        out = {"norm1": self.norm(f"{name}.norm1"), "conv1": self.conv(f"{name}.conv1"),
               "norm2": self.norm(f"{name}.norm2"), "conv2": self.conv(f"{name}.conv2")}
        if f"{name}.conv_shortcut.weight" in self.tensors:
            out["shortcut"] = self.conv(f"{name}.conv_shortcut")
        return out

    def mid(self, name, attention):
        out = {"block1": self.resnet(f"{name}.resnets.0"), "block2": self.resnet(f"{name}.resnets.1")}
        if attention:
            attn = f"{name}.attentions.0"
            names = ("to_q", "to_k", "to_v", "to_out.0")
            if f"{attn}.query.weight" in self.tensors:  # the names diffusers used before 0.14
                names = ("query", "key", "value", "proj_attn")
            out["attn_norm"] = self.norm(f"{attn}.group_norm")
            projections = {}
            for ours, theirs in zip(("query", "key", "value"), names[:3]):
                kernel, bias = self.linear(f"{attn}.{theirs}")
                projections[ours] = {"kernel": kernel[:, None, :], "bias": bias[None, :]}
            kernel, bias = self.linear(f"{attn}.{names[3]}")
            projections["out"] = {"kernel": kernel[None, :, :], "bias": bias}
            out["attn"] = projections
        return out


def params_from_tensors(tensors: dict[str, np.ndarray], kwargs: dict) -> dict:
    """The module's `params` tree from diffusers-named tensors; refuses missing and unused ones."""
    r = _Reader(tensors)
    levels, per_block = len(kwargs["block_out_channels"]), kwargs["layers_per_block"]
    encoder = {"conv_in": r.conv("encoder.conv_in"), "mid": r.mid("encoder.mid_block", kwargs["mid_attention"]),
               "norm_out": r.norm("encoder.conv_norm_out"), "conv_out": r.conv("encoder.conv_out")}
    for i in range(levels):
        for j in range(per_block):
            encoder[f"down{i}_block{j}"] = r.resnet(f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            encoder[f"down{i}_sample"] = r.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv")
    decoder = {"conv_in": r.conv("decoder.conv_in"), "mid": r.mid("decoder.mid_block", kwargs["mid_attention"]),
               "norm_out": r.norm("decoder.conv_norm_out"), "conv_out": r.conv("decoder.conv_out")}
    for i in range(levels):
        for j in range(per_block + 1):
            decoder[f"up{i}_block{j}"] = r.resnet(f"decoder.up_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            decoder[f"up{i}_sample"] = r.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv")
    params = {"encoder": encoder, "decoder": decoder}
    if kwargs["use_quant_conv"]:
        params["quant_conv"] = r.conv("quant_conv")
    if kwargs["use_post_quant_conv"]:
        params["post_quant_conv"] = r.conv("post_quant_conv")
    unused = sorted(set(tensors) - r.used)
    if unused:
        raise ValueError(f"AutoencoderKL weights: {len(unused)} tensors this config does not use, e.g. "
                         f"{unused[:3]}; check block_out_channels and layers_per_block")
    return params
