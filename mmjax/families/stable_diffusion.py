"""Stable Diffusion (SD 1.x / 2.x checkpoints from `mmjax.interop`): text to latents and back.

Pure functions over the three modules (`SDModules`) and their parameters (`{"unet", "vae",
"text_encoder"}`), for the handle to compile:
- `text_context`: token rows -> the text encoder's hidden states the UNet attends to;
- `guided`: the classifier-free-guided denoiser on the project's variance-preserving latents
  (`x = sqrt(abar) * z0 + sqrt(1 - abar) * noise`), whatever the checkpoint predicts;
- `generate`, `img2img`, `inpaint`, `edit`: sampling along a scheduler path
  (`interop.scheduler.SchedulerSpec.path`), in `lax.scan` through `sampling.samplers.run_path`.
Latents are the VAE's, times its `scaling_factor`, as diffusers keeps them; a 9-channel UNet (an
inpainting checkpoint) reads the mask and the masked image's latents beside them.

A path's levels and timesteps are arrays in the call, so the step count and sampler are the only
things that recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmjax.sampling.samplers import invert_path, run_path


@dataclasses.dataclass(frozen=True)
class SDModules:
    unet: object
    vae: object
    text_encoder: object
    prediction: str  # "eps", "v" or "x0"
    clip_sample: float | None = None

    @property
    def inpainting(self) -> bool:
        return self.unet.in_channels == self.vae.latent_channels * 2 + 1


def text_context(m: SDModules, params, tokens) -> jax.Array:
    return m.text_encoder.apply({"params": params["text_encoder"]}, tokens)[0]


def encode(m: SDModules, params, images) -> jax.Array:
    """Images in [-1, 1] -> scaled latents (the posterior mean)."""
    mean, _ = m.vae.apply({"params": params["vae"]}, images, method="encode")
    shift = m.vae.shift_factor or 0.0
    return (mean - shift) * m.vae.scaling_factor


def decode(m: SDModules, params, latents) -> jax.Array:
    """Scaled latents -> images in [-1, 1] (not clipped)."""
    shift = m.vae.shift_factor or 0.0
    return m.vae.apply({"params": params["vae"]}, latents / m.vae.scaling_factor + shift, method="decode")


def guided(m: SDModules, params, context, uncond, guidance, extra=None):
    """`denoise_at(x, t, abar) -> (x0_hat, eps_hat)`: the UNet on the conditional and the
    unconditional context in one batch, mixed as uncond + guidance * (cond - uncond) in the
    model's own output space (epsilon, v or sample; the mix is the same in all, being affine).
    `extra` (inpainting checkpoints): channels concatenated to every input."""
    both = jnp.concatenate([uncond, context], axis=0)

    def denoise_at(x, t, abar):
        inputs = x if extra is None else jnp.concatenate([x, extra.astype(x.dtype)], axis=-1)
        inputs = jnp.concatenate([inputs, inputs], axis=0)
        out = m.unet.apply({"params": params["unet"]}, inputs, jnp.full((inputs.shape[0],), t, jnp.float32), both)
        out_uncond, out_cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
        out = out_uncond + guidance * (out_cond - out_uncond)
        alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        if m.prediction == "eps":
            x0, eps = (x - sigma * out) / alpha, out
        elif m.prediction == "v":
            x0, eps = alpha * x - sigma * out, sigma * x + alpha * out
        else:
            x0, eps = out, (x - alpha * out) / sigma
        if m.clip_sample is not None:  # as diffusers' DDIM: x0 clamped, eps kept
            x0 = jnp.clip(x0, -m.clip_sample, m.clip_sample)
        return x0, eps

    return denoise_at


def generate(m: SDModules, params, tokens, uncond_tokens, noise, path, guidance, key, *, sampler: str):
    """`noise` (unit normal, already scaled by the path's start) -> final scaled latents."""
    context, uncond = text_context(m, params, tokens), text_context(m, params, uncond_tokens)
    extra = None
    if m.inpainting:  # an inpainting checkpoint asked for plain text-to-image: everything masked
        shape = noise.shape[:-1] + (1,)
        extra = jnp.concatenate([jnp.ones(shape), jnp.zeros(noise.shape[:-1] + (m.vae.latent_channels,))], -1)
    denoise = guided(m, params, context, uncond, guidance, extra)
    t, level, nxt = path
    return run_path(denoise, noise, key, t, level, nxt, sampler=sampler)[0]


def img2img(m: SDModules, params, images, tokens, uncond_tokens, noise, path, guidance, key, *, sampler: str):
    """SDEdit as diffusers' img2img: the image's latents noised to the path's first level."""
    z0 = encode(m, params, images)
    t, level, nxt = path
    x = jnp.sqrt(level[0]) * z0 + jnp.sqrt(1.0 - level[0]) * noise
    context, uncond = text_context(m, params, tokens), text_context(m, params, uncond_tokens)
    denoise = guided(m, params, context, uncond, guidance)
    return run_path(denoise, x, key, t, level, nxt, sampler=sampler)[0]


def inpaint(m: SDModules, params, images, masks, tokens, uncond_tokens, noise, path, guidance, key, *,
            sampler: str):
    """Regenerates latents where `masks` (`[B, h, w, 1]` at latent size, 1 = regenerate) is set.
    An ordinary checkpoint blends: after every step the kept latents are put back, noised to the
    level reached. An inpainting checkpoint reads the mask and the masked image instead."""
    z0 = encode(m, params, images)
    t, level, nxt = path
    context, uncond = text_context(m, params, tokens), text_context(m, params, uncond_tokens)
    if m.inpainting:
        pixel_masks = jax.image.resize(masks, images.shape[:3] + (1,), "nearest")
        kept = encode(m, params, images * (1.0 - pixel_masks))  # diffusers zeroes the masked pixels
        denoise = guided(m, params, context, uncond, guidance, jnp.concatenate([masks, kept], axis=-1))
        return run_path(denoise, noise, key, t, level, nxt, sampler=sampler)[0]
    denoise = guided(m, params, context, uncond, guidance)

    def keep_known(x, abar):
        return masks * x + (1.0 - masks) * (jnp.sqrt(abar) * z0 + jnp.sqrt(1.0 - abar) * noise)

    return run_path(denoise, noise, key, t, level, nxt, sampler=sampler, after=keep_known)[0]


def edit(m: SDModules, params, images, source_tokens, target_tokens, uncond_tokens, path, guidance, *,
         sampler: str):
    """Prompt edit: DDIM-invert the image's latents under the source caption (unguided) up the
    path's levels, then sample back down under the target caption with guidance."""
    z0 = encode(m, params, images)
    t, level, nxt = path
    uncond = text_context(m, params, uncond_tokens)
    source = guided(m, params, text_context(m, params, source_tokens), uncond, 1.0)
    x = invert_path(source, z0, t[::-1], level[::-1])
    target = guided(m, params, text_context(m, params, target_tokens), uncond, guidance)
    return run_path(target, x, jax.random.key(0), t, level, nxt, sampler=sampler)[0]


def attention_maps(m: SDModules, params, tokens, uncond_tokens, noise, path, guidance, alphas_cumprod, key, *,
                   sampler: str, size: tuple[int, int], noise_levels=(0.2, 0.4, 0.6, 0.8)):
    """Final latents as `generate` makes them, and per-token cross-attention maps `[B, *size, L]`
    (image resolution), averaged over heads, layers and `noise_levels`: the sample re-noised
    to each level of the training schedule, the conditional UNet run once there, sowing its
    attention probabilities (models/layers.py)."""
    from mmjax.sampling import attention_maps as amaps
    from mmjax.sampling.schedules import Schedule

    z0 = generate(m, params, tokens, uncond_tokens, noise, path, guidance, key, sampler=sampler)
    context = text_context(m, params, tokens)

    def maps_at(x_t, t):
        return m.unet.apply({"params": params["unet"]}, x_t, t.astype(jnp.float32), context,
                            mutable=[amaps.COLLECTION])[1]

    schedule = Schedule(alphas_cumprod=alphas_cumprod)
    levels = [int(f * (alphas_cumprod.shape[0] - 1)) for f in noise_levels]
    return z0, amaps.timestep_average(maps_at, schedule, z0, levels, jax.random.fold_in(key, 2), size=size)
