"""A transformers `CLIPTextModel` (config.json + weights) as the project's CLIPTextTransformer.

`module_kwargs(config)` translates the config; `params_from_tensors(tensors, ...)` maps the
weights (a dict of numpy arrays by their transformers names, as `safetensors_io.read` gives) onto
the module's parameter tree. PyTorch stores a Linear's weight as `[out, in]`; the project's
Dense kernels are `[in, out]`, and its attention projections `[in, heads, head_dim]`.
"""

from __future__ import annotations

import numpy as np

from mmjax.models.clip_text import ACTIVATIONS

PREFIXES = ("text_model.", "")  # transformers 4 saved under text_model., transformers 5 without


def module_kwargs(config: dict, output: str = "last") -> dict:
    """CLIPTextTransformer fields from a transformers CLIPTextConfig (its config.json)."""
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"CLIP text config: hidden_act {act!r} is not supported (supported: {ACTIVATIONS})")
    eos = config.get("eos_token_id", 49407)
    return {
        "vocab_size": int(config.get("vocab_size", 49408)),
        "width": int(config.get("hidden_size", 512)),
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 8)),
        "mlp_dim": int(config.get("intermediate_size", 2048)),
        "max_len": int(config.get("max_position_embeddings", 77)),
        "act": act,
        "eps": float(config.get("layer_norm_eps", 1e-5)),
        # CLIP's first configs said eos 2 and meant "the largest id" (the end token is the last id).
        "eos_id": None if eos == 2 else int(eos),
        "output": output,
    }


def _linear(tensors, name, used):
    used.update((f"{name}.weight", f"{name}.bias"))
    return {"kernel": tensors[f"{name}.weight"].T, "bias": tensors[f"{name}.bias"]}


def _norm(tensors, name, used):
    used.update((f"{name}.weight", f"{name}.bias"))
    return {"LayerNorm_0": {"scale": tensors[f"{name}.weight"], "bias": tensors[f"{name}.bias"]}}


def _projection(tensors, name, num_heads, used, out=False):
    weight, bias = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
    used.update((f"{name}.weight", f"{name}.bias"))
    width = weight.shape[0]
    head_dim = width // num_heads
    if out:  # [width, heads * d] (out, in) -> [heads, d, width]
        return {"kernel": weight.T.reshape(num_heads, head_dim, width), "bias": bias}
    return {"kernel": weight.T.reshape(weight.shape[1], num_heads, head_dim), "bias": bias.reshape(num_heads, head_dim)}


def params_from_tensors(tensors: dict[str, np.ndarray], depth: int, num_heads: int, prefix: str | None = None) -> dict:
    """The module's `params` tree. Refuses missing tensors and, naming a few, unused ones.
    `prefix` None: `text_model.` when the tensors have it, else none."""
    if prefix is None:
        prefix = next(p for p in PREFIXES if any(k.startswith(p) for k in tensors) or not p)
    names = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    names.pop("embeddings.position_ids", None)  # a buffer older checkpoints carry
    used: set[str] = set()
    try:
        params = {
            "token_embed": {"embedding": names["embeddings.token_embedding.weight"]},
            "pos_embed": names["embeddings.position_embedding.weight"],
            "final_norm": _norm(names, "final_layer_norm", used),
        }
        used.update(("embeddings.token_embedding.weight", "embeddings.position_embedding.weight"))
        for i in range(depth):
            layer = f"encoder.layers.{i}"
            params[f"layers_{i}"] = {
                "norm1": _norm(names, f"{layer}.layer_norm1", used),
                "norm2": _norm(names, f"{layer}.layer_norm2", used),
                "self_attn": {
                    "query": _projection(names, f"{layer}.self_attn.q_proj", num_heads, used),
                    "key": _projection(names, f"{layer}.self_attn.k_proj", num_heads, used),
                    "value": _projection(names, f"{layer}.self_attn.v_proj", num_heads, used),
                    "out": _projection(names, f"{layer}.self_attn.out_proj", num_heads, used, out=True),
                },
                "fc1": _linear(names, f"{layer}.mlp.fc1", used),
                "fc2": _linear(names, f"{layer}.mlp.fc2", used),
            }
    except KeyError as e:
        raise ValueError(f"CLIP text weights: tensor {prefix}{e.args[0]} is missing "
                         f"(for {depth} layers)") from None
    unused = sorted(set(names) - used)
    if unused:
        raise ValueError(f"CLIP text weights: {len(unused)} tensors this architecture does not use, e.g. "
                         f"{[prefix + n for n in unused[:3]]}; check num_hidden_layers")
    return params
