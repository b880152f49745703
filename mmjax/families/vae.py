"""VAE family: a convolutional VAE, optionally conditioned on the caption.

Loss: per-pixel squared error plus a KL term normalised per pixel, weighted by `loss.beta`
(the decoder's assumed noise variance, in effect) and warmed up linearly over
`loss.kl_warmup_steps` so that the encoder learns to carry information before the prior pulls
on it. A caption-conditioned model learns its prior p(z | caption) too (models/prior.py): the KL
is then to that prior, and generation decodes samples from it, so the caption's words put the
latent where training images with those words put theirs. With a mixture prior
(`model.prior_components` > 1) the KL has no closed form and a deterministic upper bound
takes its place; with one Gaussian it is exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmjax.families.family import Family, LossAux, Objective
from mmjax.models import prior as prior_lib
from mmjax.models.vae import VAE, CondVAE64, CondVAESmall, CondVAETiny, VAE64, VAESmall, VAETiny

VARIANTS = {
    "tiny": VAETiny, "small": VAESmall, "64": VAE64,
    "cond_tiny": CondVAETiny, "cond_small": CondVAESmall, "cond_64": CondVAE64,
}


def _tokens(model, batch_or_tokens):
    """The caption tokens when the model reads captions, else None."""
    if model.text is None:
        return None
    return batch_or_tokens["tokens"] if isinstance(batch_or_tokens, dict) else batch_or_tokens


def init(model, rng, batch, config):
    params_key, noise_key = jax.random.split(rng)
    variables = model.init({"params": params_key, "noise": noise_key}, batch["image"], _tokens(model, batch))
    return variables["params"], None


def psnr(images, references) -> jax.Array:
    """Per-image PSNR in dB on the [0, 1] scale; inputs in [-1, 1], predictions clipped."""
    a = (jnp.clip(images, -1, 1) + 1) / 2
    b = (references + 1) / 2
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def kl_per_pixel(mean, logvar, prior: dict, num_pixels: int) -> jax.Array:
    """KL(q || p) summed over the latent (closed form for one Gaussian, an upper bound for a
    mixture: see models/prior.py), averaged over the batch, divided by the number of pixel
    values so that `beta` does not depend on image size."""
    return jnp.mean(prior_lib.kl(mean, logvar, prior)) / num_pixels


def objectives(model, config):
    beta, warmup = config.loss.beta, config.loss.kl_warmup_steps

    def loss_fn(params, batch, rng, step, model_state):
        images = batch["image"]
        recon, aux = model.apply({"params": params}, images, _tokens(model, batch), train=True,
                                 rngs={"noise": rng, "dropout": jax.random.fold_in(rng, 1)})
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - images))
        kl = kl_per_pixel(aux["mean"], aux["logvar"], aux["prior"], images[0].size)
        kl_weight = beta * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        loss = mse + kl_weight * kl
        return loss, LossAux({"mse": mse, "kl": kl, "kl_weight": kl_weight}, model_state)

    return (Objective("vae", loss_fn),)


def reconstruct(model, params, s, images, tokens=None):
    """Encode to the posterior mean and decode: deterministic."""
    tokens = _tokens(model, tokens)
    mean, _ = model.apply({"params": params}, images, tokens, method=VAE.encode)
    return jnp.clip(model.apply({"params": params}, mean, tokens, method=VAE.decode), -1, 1)


def encode_latent(model, params, s, images, tokens=None):
    """Images -> posterior means (the latents an edit starts from)."""
    return model.apply({"params": params}, images, _tokens(model, tokens), method=VAE.encode)[0]


def decode_latent(model, params, s, z, tokens=None):
    """Latents -> images in [-1, 1] (differentiable: CLIP guidance steers through it)."""
    return jnp.clip(model.apply({"params": params}, z, _tokens(model, tokens), method=VAE.decode), -1, 1)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The part of a VAE config its abilities read."""
    image_size: int


def settings(config) -> Settings:
    return Settings(image_size=config.data.image_size)


def latent_shape(model, s: Settings) -> tuple[int, int, int]:
    side = s.image_size // (2 ** (len(model.widths) - 1))
    return (side, side, model.latent_channels)


def generate(model, params, s: Settings, tokens, rng, *, temperature: float = 1.0):
    """One image per row of `tokens`: z from the prior (learned p(z | caption), or N(0, I)):
    a mixture component by its weight, its spread scaled by `temperature`; then decoded."""
    tokens = _tokens(model, tokens) if model.text is not None else jnp.zeros((tokens.shape[0], 1), jnp.int32)
    shape = latent_shape(model, s)
    prior = model.apply({"params": params}, tokens, shape, method=VAE.prior)
    z = prior_lib.sample(prior, rng, temperature)
    return jnp.clip(model.apply({"params": params}, z, _tokens(model, tokens), method=VAE.decode), -1, 1)


def interpolate_images(model, params, s, image_a, image_b, tokens_a=None, tokens_b=None, *, num: int):
    """Decodes `num` evenly spaced points between the two images' posterior means.

    Integer tokens cannot be blended: with a caption-reading model the first half of the path
    is decoded with caption a, the second half with caption b.
    """
    a = model.apply({"params": params}, image_a[None], _tokens(model, None if tokens_a is None else tokens_a[None]),
                    method=VAE.encode)[0]
    b = model.apply({"params": params}, image_b[None], _tokens(model, None if tokens_b is None else tokens_b[None]),
                    method=VAE.encode)[0]
    weights = jnp.linspace(0.0, 1.0, num)[:, None, None, None]
    z = (1 - weights) * a + weights * b
    tokens = None
    if model.text is not None:
        tokens = jnp.where(weights[:, 0, 0] < 0.5, tokens_a[None], tokens_b[None])
    return jnp.clip(model.apply({"params": params}, z, tokens, method=VAE.decode), -1, 1)


def evaluate(model, params, batch, config):
    recon = reconstruct(model, params, settings(config), batch["image"], batch.get("tokens"))
    return {"psnr": jnp.mean(psnr(recon, batch["image"])),
            "mse": jnp.mean(jnp.square(recon - batch["image"]))}


def preview(model, params, batch, rng, config):
    """For the first `sample.num` test examples: input, reconstruction, sample from the caption."""
    n = config.sample.num
    images, tokens = batch["image"][:n], batch["tokens"][:n]
    s = settings(config)
    recon = reconstruct(model, params, s, images, tokens)
    sampled = generate(model, params, s, tokens, rng)
    return jnp.stack([images, recon, sampled], axis=1).reshape((-1,) + images.shape[1:])


FAMILY = Family(
    name="vae",
    variants=VARIANTS,
    init=init,
    objectives=objectives,
    evaluate=evaluate,
    best_metric=("psnr", "max"),
    preview=preview,
    settings=settings,
    abilities={"generate": generate, "reconstruct": reconstruct, "interpolate": interpolate_images,
               "encode_latent": encode_latent, "decode_latent": decode_latent},
)
