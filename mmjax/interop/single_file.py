"""A single original-format Stable Diffusion `.safetensors` checkpoint (the CompVis / Stability
layout: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`).

The tensors are renamed to diffusers' names and the configs inferred from their shapes, then the
same readers as for a diffusers folder (`diffusers_pipeline`) build the modules:
- UNet: channels per level, layers per block, which levels attend, transformer depth, the text
  width and 1x1-conv or linear projections are read off the shapes. The head count is not in
  the weights: SD 1.x (768-wide text) has 8 heads, SD 2.x (1024) heads of 64 dimensions.
- VAE: channels per level, layers per block and latent channels from the shapes; SD's 32 norm
  groups and 0.18215 scaling factor.
- Text: CLIP ViT-L/14 (`cond_stage_model.transformer.*`, SD 1.x) or OpenCLIP ViT-H
  (`cond_stage_model.model.*`, SD 2.x: fused q/k/v split, the last layer dropped as SD 2 uses the
  penultimate one, gelu).
What shapes cannot tell is named with `configs` (per component overrides of the inferred
config, e.g. `{"scheduler": {"prediction_type": "v_prediction"}}`: SD 2.x 768-v and SD 2.x base
have the same tensors) or refused with a message that says which to pass. The file carries no
tokenizer: `tokenizer` names a folder with one (any SD folder's `tokenizer/`).
"""

from __future__ import annotations

import os
import re

import numpy as np

from mmjax.interop import diffusers_pipeline, safetensors_io, scheduler
from mmjax.interop.clip_tokenizer import ClipTokenizer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
IGNORED = re.compile(r"^(model_ema\.|cond_stage_model\.model\.(logit_scale|text_projection)$|alphas_cumprod|betas|"
                     r"alphas_cumprod_prev|sqrt_|log_one_minus|posterior_|model\.diffusion_model\.label_emb)")
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
                "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading"}
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _blocks(keys, prefix: str) -> set[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pattern.match(k))}


def _rename(tensors: dict, renames: list[tuple[str, str]]) -> dict:
    """Each tensor whose name starts with an old prefix, under the new one (longest match)."""
    out = {}
    for key, value in tensors.items():
        for old, new in renames:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise ValueError(f"tensor {key!r} has no place in an SD 1.x/2.x model")
    return out


def _resnet_renames(old: str, new: str) -> list[tuple[str, str]]:
    return [(f"{old}.{a}.", f"{new}.{b}.") for a, b in RESNET.items()]


def unet(tensors: dict) -> tuple[dict, dict]:
    """(diffusers-named tensors, UNet config) from `model.diffusion_model.*` names (prefix removed)."""
    keys = list(tensors)
    inputs = _blocks(keys, "input_blocks.")
    downsamplers = sorted(i for i in inputs if f"input_blocks.{i}.0.op.weight" in tensors)
    levels = len(downsamplers) + 1
    per_block = (max(inputs) - len(downsamplers)) // levels
    first = lambda i: 1 + i * (per_block + 1)  # noqa: E731
    channels = [int(tensors[f"input_blocks.{first(i)}.0.out_layers.3.weight"].shape[0]) for i in range(levels)]
    attends = [f"input_blocks.{first(i)}.1.proj_in.weight" in tensors for i in range(levels)]
    renames = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
               ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
               ("middle_block.1.", "mid_block.attentions.0.")]
    renames += _resnet_renames("middle_block.0", "mid_block.resnets.0")
    renames += _resnet_renames("middle_block.2", "mid_block.resnets.1")
    for i in range(levels):
        for j in range(per_block):
            k = first(i) + j
            renames += _resnet_renames(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}")
            renames.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            renames.append((f"input_blocks.{first(i) + per_block}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(per_block + 1):
            k = i * (per_block + 1) + j
            renames += _resnet_renames(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}")
            has_attention = f"output_blocks.{k}.1.proj_in.weight" in tensors
            if has_attention:
                renames.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}."))
            if j == per_block and i < levels - 1:
                renames.append((f"output_blocks.{k}.{2 if has_attention else 1}.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
    out = _rename(tensors, sorted(renames, key=lambda r: -len(r[0])))
    attn = next(i for i in range(levels) if attends[i])
    context = int(out[f"down_blocks.{attn}.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    depths = [len(_blocks(out, f"down_blocks.{i}.attentions.0.transformer_blocks.")) or 1 for i in range(levels)]
    config = {
        "in_channels": int(out["conv_in.weight"].shape[1]), "out_channels": int(out["conv_out.weight"].shape[0]),
        "block_out_channels": channels, "layers_per_block": per_block, "cross_attention_dim": context,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attends[::-1]],
        "transformer_layers_per_block": depths,
        "use_linear_projection": out[f"down_blocks.{attn}.attentions.0.proj_in.weight"].ndim == 2,
    }
    if context == 768:
        config["attention_head_dim"] = 8
    elif context == 1024:
        config["attention_head_dim"] = [c // 64 for c in channels]
    return out, config


def vae(tensors: dict) -> tuple[dict, dict]:
    """(diffusers-named tensors, AutoencoderKL config) from `first_stage_model.*` names."""
    levels = len(_blocks(tensors, "encoder.down."))
    per_block = len(_blocks(tensors, "encoder.down.0.block."))
    renames = [("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out.")]
    for part in ("encoder", "decoder"):
        renames += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0."),
                    (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1."),
                    (f"{part}.mid.attn_1.norm.", f"{part}.mid_block.attentions.0.group_norm.")]
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            renames.append((f"{part}.mid.attn_1.{a}.", f"{part}.mid_block.attentions.0.{b}."))
    for i in range(levels):
        for j in range(per_block):
            renames.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        renames.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
        up = levels - 1 - i  # the original numbers decoder levels from the bottom
        for j in range(per_block + 1):
            renames.append((f"decoder.up.{up}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        renames.append((f"decoder.up.{up}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    renames += [(p, p) for p in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                                 "quant_conv.", "post_quant_conv.")]
    out = _rename(tensors, sorted(renames, key=lambda r: -len(r[0])))
    out = {k.replace(".nin_shortcut.", ".conv_shortcut."): v for k, v in out.items()}
    channels = [int(out[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)]
    config = {"block_out_channels": channels, "layers_per_block": per_block,
              "latent_channels": int(out["post_quant_conv.weight"].shape[0]),
              "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "norm_num_groups": 32, "scaling_factor": 0.18215}
    return out, config


def clip_l(tensors: dict) -> tuple[dict, dict]:
    """CLIP ViT-L/14 text (SD 1.x): transformers' own names under `cond_stage_model.transformer.`."""
    out = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}
    return out, _text_config(out, "quick_gelu", 49407)


def open_clip(tensors: dict) -> tuple[dict, dict]:
    """OpenCLIP ViT-H text (SD 2.x), as the 23-layer CLIPTextModel that SD 2 conditions on."""
    layers = sorted(_blocks(tensors, "transformer.resblocks."))
    out = {"text_model.embeddings.token_embedding.weight": tensors["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": tensors["positional_embedding"],
           "text_model.final_layer_norm.weight": tensors["ln_final.weight"],
           "text_model.final_layer_norm.bias": tensors["ln_final.bias"]}
    for i in layers[:-1]:  # SD 2 reads the penultimate layer: the last one is never used
        old, new = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[f"{new}{b}.{p}"] = tensors[f"{old}{a}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = np.split(np.asarray(tensors[f"{old}attn.in_proj_{p}"]), 3, axis=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{new}self_attn.{name}.{p}"] = part
    unknown = [k for k in tensors if not (k.startswith(("token_embedding", "positional_embedding", "ln_final",
                                                         "transformer.resblocks.")))]
    if unknown:
        raise ValueError(f"tensor '{OPEN_CLIP}{unknown[0]}' has no place in an OpenCLIP text model")
    return out, _text_config(out, "gelu", 2)


def _text_config(out: dict, act: str, eos: int) -> dict:
    width = int(out["text_model.embeddings.token_embedding.weight"].shape[1])
    return {"vocab_size": int(out["text_model.embeddings.token_embedding.weight"].shape[0]), "hidden_size": width,
            "num_hidden_layers": len(_blocks(out, "text_model.encoder.layers.")), "num_attention_heads": width // 64 if width % 64 == 0 else None,
            "intermediate_size": int(out["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "max_position_embeddings": int(out["text_model.embeddings.position_embedding.weight"].shape[0]),
            "hidden_act": act, "eos_token_id": eos}


def _split(tensors: dict, path: str) -> dict[str, dict]:
    parts = {"unet": {}, "vae": {}, "clip_l": {}, "open_clip": {}}
    for key, value in tensors.items():
        if IGNORED.match(key):  # EMA copies, the training schedule's buffers, CLIP's image-side projection
            continue
        for name, prefix in (("unet", UNET), ("vae", VAE), ("clip_l", CLIP_L), ("open_clip", OPEN_CLIP)):
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            raise ValueError(f"{path}: tensor {key!r} is not part of an SD 1.x/2.x checkpoint")
    for name in ("unet", "vae"):
        if not parts[name]:
            raise ValueError(f"{path}: no {UNET if name == 'unet' else VAE}* tensors: not an original-format SD "
                             "checkpoint (a diffusers folder? pass the folder instead)")
    if not parts["clip_l"] and not parts["open_clip"]:
        raise ValueError(f"{path}: no text encoder ({CLIP_L}* or {OPEN_CLIP}*) in the checkpoint")
    return parts


def read(path: str, tokenizer: str | None = None, dtype=None, configs: dict | None = None):
    """The `diffusers_pipeline.Pipeline` in the single file `path`."""
    configs = dict(configs or {})
    unknown = set(configs) - {"unet", "vae", "text_encoder", "scheduler"}
    if unknown:
        raise ValueError(f"configs may override 'unet', 'vae', 'text_encoder' and 'scheduler', not {sorted(unknown)}")
    if tokenizer is None:
        raise ValueError(f"{path}: a single-file checkpoint carries no tokenizer; pass tokenizer='path/to/tokenizer' "
                         "(the tokenizer/ folder of an SD 1.x folder for CLIP ViT-L, of SD 2.x for OpenCLIP)")
    parts = _split(safetensors_io.read(path, dtype), path)
    built = {}
    text_kind = clip_l if parts["clip_l"] else open_clip
    for name, convert, tensors in (("unet", unet, parts["unet"]), ("vae", vae, parts["vae"]),
                                   ("text_encoder", text_kind, parts["clip_l"] or parts["open_clip"])):
        try:
            renamed, config = convert(tensors)
        except (KeyError, StopIteration) as e:
            raise ValueError(f"{path}: the {name} tensors are not in SD 1.x/2.x's layout (missing {e})") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        config.update(configs.get(name, {}))
        if name == "text_encoder" and config["num_attention_heads"] is None:
            raise ValueError(f"{path}: the text encoder's width {config['hidden_size']} is not CLIP's 64 per head, so "
                             "its head count is unknown; pass configs={'text_encoder': {'num_attention_heads': ...}}")
        if name == "unet" and "attention_head_dim" not in config:
            raise ValueError(f"{path}: the UNet's text width {config['cross_attention_dim']} is neither SD 1.x's "
                             "(768) nor SD 2.x's (1024), so its head count is unknown; pass "
                             "configs={'unet': {'attention_head_dim': ...}}")
        built[name] = diffusers_pipeline.build_component(name, config, renamed, f"{path} ({name}, inferred config)",
                                                         f"{path} ({name})")
    if text_kind is open_clip and "prediction_type" not in configs.get("scheduler", {}):
        raise ValueError(f"{path}: an SD 2.x checkpoint: the weights do not say whether it predicts v (the 768 "
                         "models) or epsilon (the base ones); pass configs={'scheduler': {'prediction_type': "
                         "'v_prediction'}} or 'epsilon'")
    spec = scheduler.from_config({**SD_SCHEDULER, **configs.get("scheduler", {})}, f"{path} (scheduler)")
    tok = ClipTokenizer.from_folder(tokenizer)
    index = {"_class_name": "StableDiffusionPipeline", "_single_file": os.path.abspath(path)}
    return diffusers_pipeline.assemble(built["unet"], built["vae"], built["text_encoder"], tok, spec, index, path)


def is_single_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".safetensors")
