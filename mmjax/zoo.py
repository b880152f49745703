"""The zoo: an explicit dict from family name to its Family record."""

from __future__ import annotations

import jax.numpy as jnp

from mmjax.families import clip, cnn, diffusion, gan, vae
from mmjax.families.family import Family

FAMILIES: dict[str, Family] = {
    "cnn": cnn.FAMILY,
    "vae": vae.FAMILY,
    "diffusion": diffusion.FAMILY,
    "clip": clip.FAMILY,
    "gan": gan.FAMILY,
}


def build_model(config):
    """The family's named variant, with `config.model` fields and the compute dtype."""
    family = FAMILIES[config.family]
    return family.variants[config.variant](**config.model, dtype=jnp.dtype(config.dtype))
