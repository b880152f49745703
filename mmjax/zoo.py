"""The zoo: an explicit dict from family name to its Family record."""

from __future__ import annotations

import jax.numpy as jnp

from mmjax.data.tokenizer import encoder_settings
from mmjax.families import clip, cnn, diffusion, flow, gan, vae
from mmjax.families.family import Family
from mmjax.models.text import configure_text

FAMILIES: dict[str, Family] = {
    "cnn": cnn.FAMILY,
    "vae": vae.FAMILY,
    "diffusion": diffusion.FAMILY,
    "flow": flow.FAMILY,
    "clip": clip.FAMILY,
    "gan": gan.FAMILY,
}


def build_model(config):
    """The family's named variant, with `config.model` fields, the compute dtype and the text
    encoder the config's `text` section describes."""
    family = FAMILIES[config.family]
    module = family.variants[config.variant](**config.model, dtype=jnp.dtype(config.dtype))
    return configure_text(module, **encoder_settings(config))
