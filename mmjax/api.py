"""The notebook face: `model = mmjax.load(path)`, then `model.generate(prompts)` and friends.

`load` reads a model for inference only: its family, its module config and its EMA weights,
checked against the shapes the module's `init` gives (under `jax.eval_shape`, so nothing is
computed). No optimizer, train state or train step is built or imported. The weights land on
whatever devices are present (a run trained on eight GPUs loads on one CPU), and nothing is
written to `path`. What comes back is the handle of the model's family (`mmjax.handles`):
its methods are exactly what that family can do.
"""

from __future__ import annotations

import warnings

import jax
import ml_collections
import numpy as np

from mmjax import model_files, sharding, zoo
from mmjax.data.tokenizer import TOKENIZER_FILE
from mmjax.families.family import example_batch
from mmjax.handles import HANDLES, Model
from mmjax.images import make_grid
from mmjax.model_files import EXPORT_MANIFEST, EXPORT_PARAMS  # noqa: F401  (the export layout)


def _abstract_params(family, module, config):
    def init():
        return family.init(module, jax.random.key(0), example_batch(config), config)[0]

    return jax.eval_shape(init)


def _match(stored, abstract, path: str, where: str):
    """`stored` (numpy) cast to the dtypes of `abstract`, or a clear error naming the first
    leaves that do not match (a checkpoint of another model, or a changed architecture)."""
    flat_stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    flat_wanted = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    problems = [f"{k}: missing" for k in flat_wanted if k not in flat_stored]
    problems += [f"{k}: not in the model" for k in flat_stored if k not in flat_wanted]
    problems += [f"{k}: stored {flat_stored[k].shape}, the model has {flat_wanted[k].shape}"
                 for k in flat_wanted if k in flat_stored and flat_stored[k].shape != flat_wanted[k].shape]
    if problems:
        raise ValueError(f"{path}: the weights do not fit the {where} its config describes "
                         f"(written by another version of mmjax?):\n  " + "\n  ".join(problems[:10]))
    return jax.tree.map(lambda s, a: np.asarray(s).astype(a.dtype), stored, abstract)


def load(path: str, step: int | None = None, *, dtype=None, compute_dtype=None, tokenizer: str | None = None,
         configs: dict | None = None) -> Model:
    """The model in `path` (a train.py workdir, read-only, or an export such as
    `pretrained/ldm_shapes`), as the handle of its family. `step` picks a workdir's
    checkpoint (default: the newest good one).

    `path` may also be a diffusers-format Stable Diffusion 1.x/2.x folder (`model_index.json`,
    `unet/`, `vae/`, ...): its weights keep their stored dtype unless `dtype` (e.g. 'float32')
    asks for another, and run in float32 unless `compute_dtype` (e.g. 'bfloat16') says. Or a
    single original-format SD `.safetensors` file, with `tokenizer` (a folder holding the
    tokenizer it lacks) and, for what its shapes cannot tell, `configs` (e.g.
    `{"scheduler": {"prediction_type": "v_prediction"}}`)."""
    from mmjax.interop import diffusers_pipeline, single_file

    weights_dtype = None if dtype is None else np.dtype(dtype)
    if diffusers_pipeline.is_pipeline(path) or single_file.is_single_file(path):
        from mmjax.handles.stable_diffusion import StableDiffusion

        if diffusers_pipeline.is_pipeline(path):
            return StableDiffusion(diffusers_pipeline.read(path, weights_dtype), compute_dtype)
        return StableDiffusion(single_file.read(path, tokenizer, weights_dtype, configs), compute_dtype)
    stored = model_files.read(path, step)
    config = ml_collections.ConfigDict(stored.config)
    family = zoo.FAMILIES.get(config.get("family"))
    if family is None:
        raise ValueError(f"{path}: a model of unknown family {config.get('family')!r}; "
                         f"known: {sorted(zoo.FAMILIES)}")
    if config.variant not in family.variants:
        raise ValueError(f"{path}: unknown {config.family} variant {config.variant!r}; "
                         f"known: {sorted(family.variants)}")
    module = zoo.build_model(config)
    params = _match(stored.params, _abstract_params(family, module, config), path,
                    f"{config.family} {config.variant!r} model")
    params = jax.device_put(params, sharding.replicated(sharding.make_mesh()))
    return HANDLES[config.family](config, module, params, stored.step, path)


def export(workdir: str, out_dir: str, step: int | None = None, dtype: str | None = None) -> str:
    """Writes the EMA weights and config of `workdir` (a few MB, no optimizer state) to
    `out_dir`, which `load` reads like a workdir; never half-written, never overwriting.
    `dtype` ('float16' or 'bfloat16') stores floating weights at half the size; `load` casts
    them back to float32. Measure the exported model: rounding can change samples."""
    if dtype not in (None,) + model_files.EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {model_files.EXPORT_DTYPES}, got {dtype!r}")
    model = load(workdir, step=step)  # the weights must load before anything is written
    stored = model_files.StoredModel(model.config.to_dict(), jax.device_get(model.params), model.step, workdir)
    files = {TOKENIZER_FILE: model.tokenizer.spec} if model.tokenizer.kind == "word" else {}
    return model_files.write_export(out_dir, stored, dtype or "float32", files=files)


def grid(images, ncols: int | None = None, captions=None, min_cell: int = 128):
    """uint8 images -> one PIL image to look at: each cell upscaled (nearest) to at least
    `min_cell` pixels (0: as they are), captions under the cells when given."""
    return make_grid(np.asarray(images), ncols=ncols, captions=captions, min_cell=min_cell, upscale=True)


def __getattr__(name):
    if name == "LoadedModel":
        warnings.warn("mmjax.api.LoadedModel is deprecated: load() returns a per-family handle; "
                      "use mmjax.handles.Model for isinstance checks", DeprecationWarning, stacklevel=2)
        return Model
    raise AttributeError(f"module 'mmjax.api' has no attribute {name!r}")
