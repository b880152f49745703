"""A diffusers-format Stable Diffusion folder as the project's modules and parameters.

The folder (what `StableDiffusionPipeline.save_pretrained` writes, and what the Hub holds):

    model_index.json   unet/  vae/  text_encoder/  tokenizer/  scheduler/

Each model component is a `config.json` and its weights (`*.safetensors`; a `.fp16` or other
variant file is used when it is the only one). Weights are read with the project's safetensors
reader into numpy, so PyTorch is never needed, and keep their stored dtype (float16, bfloat16)
unless `dtype` asks for another. Before anything is compiled every tensor is checked against the
shapes the config's modules declare (`jax.eval_shape` of their `init`); a missing or unexpected
tensor, or a wrong shape, is an error naming the file, the tensor and both shapes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.interop import autoencoder_kl, clip_text, safetensors_io, scheduler, sd_unet
from mmjax.interop.clip_tokenizer import ClipTokenizer
from mmjax.models.autoencoder_kl import AutoencoderKL
from mmjax.models.clip_text import CLIPTextTransformer
from mmjax.models.sd_unet import SDUNet

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


@dataclasses.dataclass
class Component:
    """One model of the pipeline: its module, parameters and where they came from."""

    module: object
    params: dict
    config: dict
    files: dict  # "config" and "weights": the paths read
    convert: object = None  # tensors -> params, as imported (the export inverts it)


@dataclasses.dataclass
class Pipeline:
    unet: Component
    vae: Component
    text_encoder: Component
    tokenizer: ClipTokenizer
    scheduler: scheduler.SchedulerSpec
    index: dict
    path: str


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def weights_file(folder: str, stem: str) -> str:
    """`folder`/`stem`.safetensors, or the only `stem`.*.safetensors variant (e.g. `.fp16`)."""
    plain = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(plain):
        return plain
    variants = sorted(glob.glob(os.path.join(folder, f"{stem}.*.safetensors")))
    if len(variants) == 1:
        return variants[0]
    if variants:
        raise ValueError(f"{folder}: several weight variants {[os.path.basename(v) for v in variants]}; "
                         f"keep one, or name it {stem}.safetensors")
    sharded = glob.glob(os.path.join(folder, f"{stem}*.safetensors.index.json"))
    if sharded:
        raise ValueError(f"{folder}: sharded weights ({os.path.basename(sharded[0])}) are not supported yet")
    if glob.glob(os.path.join(folder, "*.bin")):
        raise ValueError(f"{folder}: only PyTorch .bin weights; mmjax reads .safetensors (convert them with "
                         "diffusers' save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors")


def check_shapes(params, abstract, sources, weights: str) -> None:
    """Every leaf of `params` has the shape `abstract` (the module's eval_shape) declares; else an
    error naming the weights file, the tensor behind the leaf (`sources()`: leaf -> tensor name,
    asked only on failure) and both shapes."""
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    for key in want:
        if key not in got:
            raise ValueError(f"{weights}: nothing provides the parameter {key} the config asks for")
    for key, value in got.items():
        if key not in want:
            name = sources().get(key, key)
            raise ValueError(f"{weights}: {name} is not part of the architecture the config describes")
        if tuple(value.shape) != tuple(want[key].shape):
            name = sources().get(key, key)
            raise ValueError(f"{weights}: tensor {name!r} has the wrong shape for the config: as parameter {key} "
                             f"it must be {tuple(want[key].shape)}, the file's gives {tuple(value.shape)}")


def _sources(convert, tensors: dict) -> dict:
    """Which tensor each parameter leaf came from: the conversion run on constant stand-ins
    (zero-stride views, so nothing is allocated), each filled with its tensor's number."""
    names = sorted(tensors)
    stand_ins = {n: np.broadcast_to(np.int64(i + 1), tensors[n].shape) for i, n in enumerate(names)}
    try:
        tree = convert(stand_ins)
    except Exception:  # noqa: BLE001 - the real conversion reports its own error
        return {}
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        first = int(np.asarray(leaf).reshape(-1)[0]) if np.size(leaf) else 0
        out[jax.tree_util.keystr(path)] = names[first - 1] if first > 0 else "(a bias the format leaves out)"
    return out


def build_component(name: str, config: dict, tensors: dict, config_where: str, weights_where: str) -> Component:
    """The module `config` describes for component `name` ('unet', 'vae', 'text_encoder'),
    with `tensors` (diffusers names) as its parameters, checked against its declared shapes."""
    kwargs_of, module_class, convert, example_args = KINDS[name]
    try:
        kwargs = kwargs_of(config)
        module = module_class(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_where}: {e}") from None
    try:
        params = convert(tensors, kwargs)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{weights_where}: {e}") from None
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args(module))["params"])
    check_shapes(params, abstract, lambda: _sources(lambda t: convert(t, kwargs), tensors), weights_where)
    return Component(module, params, config, {"config": config_where, "weights": weights_where},
                     lambda t: convert(t, kwargs))


def _component(folder: str, name: str, dtype) -> Component:
    where = os.path.join(folder, name)
    if not os.path.isdir(where):
        raise FileNotFoundError(f"{folder}: the {name}/ folder is missing")
    config_path = os.path.join(where, "config.json")
    config = _read_json(config_path)
    weights = weights_file(where, WEIGHT_NAMES[name])
    return build_component(name, config, safetensors_io.read(weights, dtype), config_path, weights)


def _unet_example(module):
    size = module.downsample_factor
    return (jnp.zeros((1, size, size, module.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, module.cross_attention_dim)))


def _vae_example(module):
    return (jnp.zeros((1, module.downsample_factor, module.downsample_factor, module.in_channels)),)


def _text_example(module):
    return (jnp.zeros((1, module.max_len), jnp.int32),)


def read(folder: str, dtype=None, text_output: str = "last") -> Pipeline:
    """The pipeline in `folder`. `dtype` (e.g. np.float32) converts the floating weights;
    `text_output` 'penultimate' conditions on the text encoder's second-last layer (clip skip)."""
    index_path = os.path.join(folder, "model_index.json")
    index = _read_json(index_path)
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ValueError(f"{index_path}: a {kind!r}; mmjax loads {PIPELINES} (SD 1.x and 2.x)")
    for name in COMPONENTS:
        if not index.get(name) or index[name][0] is None:
            raise ValueError(f"{index_path}: the pipeline has no {name}")
        if not os.path.isdir(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder}: the {name}/ folder that model_index.json lists is missing")
    unet, vae = _component(folder, "unet", dtype), _component(folder, "vae", dtype)
    text = _component(folder, "text_encoder", dtype)
    if text_output != "last":
        text.module = text.module.clone(output=text_output)
    tokenizer = ClipTokenizer.from_folder(os.path.join(folder, "tokenizer"))
    spec = scheduler.read(os.path.join(folder, "scheduler"))
    return assemble(unet, vae, text, tokenizer, spec, index, folder)


def assemble(unet, vae, text, tokenizer, spec, index: dict, folder: str) -> Pipeline:
    """The pipeline of these parts, once they are checked to fit together."""
    if text.module.width != unet.module.cross_attention_dim:
        raise ValueError(f"{folder}: the text encoder's width {text.module.width} is not the UNet's "
                         f"cross_attention_dim {unet.module.cross_attention_dim}")
    if vae.module.latent_channels not in (unet.module.in_channels, unet.module.in_channels - 5):
        raise ValueError(f"{folder}: the VAE has {vae.module.latent_channels} latent channels, the UNet "
                         f"takes {unet.module.in_channels}")
    if tokenizer.max_len > text.module.max_len:
        raise ValueError(f"{folder}: the tokenizer pads to {tokenizer.max_len} tokens, the text encoder has "
                         f"{text.module.max_len} positions")
    return Pipeline(unet, vae, text, tokenizer, spec, index, folder)


KINDS = {  # component -> (config -> module kwargs, module class, (tensors, kwargs) -> params, example inputs)
    "unet": (sd_unet.module_kwargs, SDUNet, sd_unet.params_from_tensors, _unet_example),
    "vae": (autoencoder_kl.module_kwargs, AutoencoderKL, autoencoder_kl.params_from_tensors, _vae_example),
    "text_encoder": (clip_text.module_kwargs, CLIPTextTransformer,
                     lambda t, k: clip_text.params_from_tensors(t, k["depth"], k["num_heads"]), _text_example),
}


def is_pipeline(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))
