"""CLIP-guided editing for families with a differentiable decoder (VAE, GAN).

Start from each image's latent, decode it under a caption, and follow the gradient of the
CLIP similarity between the decoded image and the target prompt (`mmjax.editing`).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.handles.base import Model, _finite


def clip_edit(model: Model, images, source_prompts, target_prompts, clip, *, steps: int = 50, lr: float = 0.05,
              anchor: float = 0.1, condition: str = "target", return_history: bool = False, guidance=None):
    from mmjax.api import load
    from mmjax.editing.clip_guidance import clip_guided_latents

    if guidance is not None:
        if guidance != "clip":
            raise ValueError(f"this edit takes no guidance scale: give clip=<a CLIP model> (got guidance={guidance!r})")
        warnings.warn("edit(..., guidance='clip') is deprecated and will be removed in the next release: "
                      "clip=<a CLIP model> alone selects the CLIP-guided edit", DeprecationWarning, stacklevel=3)
    if clip is None:
        raise ValueError("a CLIP-guided edit needs clip=<a CLIP workdir or loaded CLIP model>")
    if condition not in ("target", "source"):
        raise ValueError(f"condition must be 'target' or 'source', got {condition!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    lr, anchor = _finite(lr, "lr"), _finite(anchor, "anchor")
    clip = load(clip) if isinstance(clip, str) else clip
    if "embed_images" not in clip.methods:
        raise ValueError(f"clip= holds a {clip.config.family!r} model, not a CLIP model")
    if clip.image_size != model.image_size:
        raise ValueError(f"the CLIP model sees {clip.image_size}px images, this model makes {model.image_size}px")
    x = model._images(images)
    source = model._prompts_for(source_prompts, len(x), "source prompts")
    target = model._prompts_for(target_prompts, len(x), "target prompts")
    clip_target = clip._prompts_for(model._prompt_list(target_prompts, "target prompts"), len(x), "target prompts")
    # The CLIP model itself in the key (not its id): the cache holds it, so no later object
    # can reuse the id and pick up a program closed over another model.
    key = ("clip_edit", steps, lr, anchor, condition, clip)
    if key not in model._compiled:
        abilities, clip_abilities = model.family.abilities, clip.family.abilities
        module, settings, clip_module, clip_settings = model.module, model.settings, clip.module, clip.settings

        def run(params, clip_params, x, source, target, clip_target):
            z0 = abilities["encode_latent"](module, params, settings, x, source)
            target_emb = clip_abilities["embed_texts"](clip_module, clip_params, clip_settings, clip_target)
            cond = target if condition == "target" else source

            def decode(z):
                return abilities["decode_latent"](module, params, settings, z, cond)

            def embed(img):
                return clip_abilities["embed_images"](clip_module, clip_params, clip_settings, img)

            z, history = clip_guided_latents(decode, embed, z0, target_emb, steps=steps, lr=lr, anchor=anchor)
            final = jnp.sum(embed(decode(z)) * target_emb, axis=-1)
            return decode(z), jnp.concatenate([history, final[None]])

        model._compiled[key] = jax.jit(run)
    out, history = model._compiled[key](model.params, clip.params, x, source, target, clip_target)
    images = model._out(out)
    return (images, np.asarray(history)) if return_history else images
