"""Text-to-image flow matching (rectified flow), on a DiT or a UNet, in pixel or latent space.

Training: draw t (logit-normal by default, as SD3 does), put x_t on the straight line
`(1 - t) x0 + t noise`, and regress the backbone's output on the velocity `noise - x0`
(sampling/flow.py). The caption is dropped with probability `loss.p_uncond`, for classifier-free
guidance. The backbone sees the time as `1000 t`, the range its sinusoidal features were made for.

Sampling integrates the probability-flow ODE from noise (t = 1) to data (t = 0) with Euler or
Heun steps, optionally shifted toward high noise (`sample.shift`). Editing reuses the same ODE:
img2img starts on the line at t = strength, inpainting blends the known part back after every
step, and a prompt edit inverts the ODE under the source caption and integrates it back under
the target.

Everything around the objective (the frozen VAE, its latent statistics, the caption encoder,
classifier-free guidance, the backbone registry) is the diffusion family's: only the objective
and the samplers differ.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmjax.families import diffusion
from mmjax.families.family import Family, LossAux, Objective
from mmjax.sampling import attention_maps as attention_lib
from mmjax.sampling import flow

VARIANTS = diffusion.VARIANTS  # DiTs and UNets: any backbone with the UNet's interface
TIME_SCALE = 1000.0  # the backbone's time input is TIME_SCALE * t


def add_defaults(c) -> None:
    """The `loss`, `sample` and `latent` fields a flow-matching config has."""
    c.loss.time_sampling = "logit_normal"  # or "uniform"
    c.loss.time_mean = 0.0  # logit-normal location and scale (SD3: 0 and 1)
    c.loss.time_std = 1.0
    c.loss.time_shift = 1.0  # training times moved by flow.shift_time; 1 = unchanged
    c.loss.p_uncond = 0.1
    c.sample.sampler = "euler"  # or "heun" (two backbone calls a step)
    c.sample.steps = 25
    c.sample.shift = 1.0  # sampling grid moved toward high noise; 1 = evenly spaced
    c.sample.guidance = 3.0
    c.sample.preview_steps = 10
    diffusion.add_latent_defaults(c)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What sampling and editing read from the config (hashable: baked into compiled programs)."""
    image_size: int
    channels: int
    max_len: int
    vae_config: str = ""
    dtype: str = "float32"


def settings(config) -> Settings:
    return Settings(image_size=config.data.image_size, channels=config.data.get("channels", 3),
                    max_len=config.data.max_len, vae_config=config.latent.vae_config, dtype=config.dtype)


def validate(config) -> None:
    loss = config.loss
    if loss.time_sampling not in flow.TIME_SAMPLING:
        raise ValueError(f"config key 'loss.time_sampling' must be one of {flow.TIME_SAMPLING}, "
                         f"got {loss.time_sampling!r}")
    if not loss.time_std > 0:
        raise ValueError(f"config key 'loss.time_std' must be > 0, got {loss.time_std}")
    for key, value in (("loss.time_shift", loss.time_shift), ("sample.shift", config.sample.shift)):
        if not value > 0:
            raise ValueError(f"config key '{key}' must be > 0, got {value}")
    if not 0.0 <= loss.p_uncond < 1.0:
        raise ValueError(f"config key 'loss.p_uncond' must be in [0, 1), got {loss.p_uncond}")
    if config.sample.sampler not in flow.SOLVERS:
        raise ValueError(f"config key 'sample.sampler' must be one of {flow.SOLVERS}, got {config.sample.sampler!r}")
    diffusion.validate_latent(config, VARIANTS)


def init(model, rng, batch, config):
    return diffusion.init_params(model, rng, batch, settings(config))


def _backbone(model, params, x_t, t, tokens, **kwargs):
    return model.apply({"params": params["unet"]}, x_t, TIME_SCALE * t, tokens, **kwargs).astype(jnp.float32)


def objectives(model, config):
    s, loss_cfg = settings(config), config.loss
    text = diffusion._reads_text(model)

    def loss_fn(params, batch, rng, step, model_state):
        del step
        images, tokens = batch["image"], batch["tokens"]
        x0 = diffusion.encode(params, s, images, tokens)
        t_key, noise_key, drop_key, dropout_key = jax.random.split(rng, 4)
        batch_size = x0.shape[0]
        t = flow.sample_time(t_key, batch_size, loss_cfg.time_sampling, loss_cfg.time_mean, loss_cfg.time_std,
                             loss_cfg.time_shift)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        cond = None
        if text:
            drop = jax.random.bernoulli(drop_key, loss_cfg.p_uncond, (batch_size,))
            cond = jnp.where(drop[:, None], diffusion.empty_tokens(s, batch_size), tokens)
        v = _backbone(model, params, flow.interpolant(x0, noise, t), t, cond, train=True,
                      rngs={"dropout": dropout_key})
        per_example = flow.loss(v, x0, noise)
        return jnp.mean(per_example), LossAux({"mse": jnp.mean(per_example)}, model_state)

    return (Objective("flow", loss_fn, params_key="unet"),)


def evaluate(model, params, batch, config):
    """The x0 error implied by the velocity on test data at fixed times and noise (the
    diffusion family's metric, so the two compare)."""
    s = settings(config)
    x0 = diffusion.encode(params, s, batch["image"], batch["tokens"])
    metrics = {}
    for frac in (0.1, 0.5, 0.9):
        t = jnp.full((x0.shape[0],), frac, jnp.float32)
        noise = jax.random.normal(jax.random.key(int(frac * 1000)), x0.shape)
        x_t = flow.interpolant(x0, noise, t)
        v = _backbone(model, params, x_t, t, batch["tokens"] if diffusion._reads_text(model) else None)
        x0_hat, _ = flow.estimates(x_t, t, v)
        metrics[f"x0_mse_t{int(frac * 100)}"] = jnp.mean(jnp.square(x0_hat - x0))
    metrics["x0_mse"] = jnp.mean(jnp.stack(list(metrics.values())))
    return metrics


# ---------------------------------------------------------------------------------------------
# What a trained model does. Each ability takes (model, params, settings, arrays..., guidance,
# uncond_tokens, *, static options: sampler, steps, shift ...), as the diffusion family's do.
# ---------------------------------------------------------------------------------------------

def make_velocity(model, params, s: Settings, tokens, uncond_tokens, guidance, weights=None, tokens_b=None):
    """`(x_t, t) -> v` with classifier-free guidance (`diffusion.guided`: the velocity is
    linear in the output, so guiding it is guiding the prediction)."""
    raw = diffusion.guided(model, params, s, tokens, uncond_tokens, guidance, weights, tokens_b)
    return lambda x, t: raw(x, TIME_SCALE * t)


def _noise(rng, count, s):
    return jax.random.normal(rng, (count,) + diffusion.x0_shape(s))


def generate(model, params, s: Settings, tokens, rng, guidance, uncond_tokens=None, *, sampler, steps, shift):
    """One image per row of `tokens`, from noise; `uncond_tokens` is the negative prompt."""
    velocity = make_velocity(model, params, s, tokens, uncond_tokens, guidance)
    x0 = flow.sample(velocity, _noise(rng, tokens.shape[0], s), steps, sampler, shift)
    return diffusion.decode(params, s, x0, tokens)


def img2img(model, params, s: Settings, images, tokens, rng, guidance, uncond_tokens=None, *, strength,
            sampler, steps, shift):
    """Start on the line from the image's latent to fresh noise at t = `strength`, integrate to 0."""
    x0 = diffusion.encode(params, s, images, tokens)
    velocity = make_velocity(model, params, s, tokens, uncond_tokens, guidance)
    out = flow.img2img(velocity, x0, jax.random.normal(rng, x0.shape), strength, steps, sampler, shift)
    return diffusion.decode(params, s, out, tokens)


def inpaint(model, params, s: Settings, images, masks, tokens, rng, guidance, uncond_tokens=None, *,
            sampler, steps, shift):
    """Regenerates where `masks` [N, H, W] is 1 and keeps the pixels where it is 0 (a latent
    cell is regenerated if any of its pixels is masked; the decoded result is composited back
    onto the input, so unmasked pixels come back exactly)."""
    x0 = diffusion.encode(params, s, images, tokens)
    masks = masks.astype(jnp.float32)
    small = masks
    if x0.shape[1:3] != images.shape[1:3]:
        factor = images.shape[1] // x0.shape[1]
        small = masks.reshape(masks.shape[0], x0.shape[1], factor, x0.shape[2], factor).max(axis=(2, 4))
    velocity = make_velocity(model, params, s, tokens, uncond_tokens, guidance)
    out = flow.inpaint(velocity, x0, small[..., None] > 0.5, jax.random.normal(rng, x0.shape), steps, sampler, shift)
    return jnp.where(masks[..., None] > 0.5, diffusion.decode(params, s, out, tokens), images)


def edit(model, params, s: Settings, images, source_tokens, target_tokens, rng, guidance, uncond_tokens=None, *,
         strength, sampler, steps, shift):
    """Prompt edit: integrate the ODE backwards from the image under its own caption
    (unguided) to t = `strength`, then forwards under the target caption with guidance. What
    the two captions share survives the round trip. Deterministic (`rng` is unused)."""
    del rng
    sub_steps = max(1, int(round(strength * steps)))
    x0 = diffusion.encode(params, s, images, source_tokens)
    x_t = flow.invert(make_velocity(model, params, s, source_tokens, None, 1.0), x0, sub_steps, sampler, shift,
                      t_end=strength)
    regen = make_velocity(model, params, s, target_tokens, uncond_tokens, guidance)
    out = flow.integrate(regen, x_t, flow.time_grid(sub_steps, shift, strength), sampler)
    return diffusion.decode(params, s, out, target_tokens)


def interpolate_prompts(model, params, s: Settings, tokens_a, tokens_b, rng_a, rng_b, guidance, *, num,
                        sampler, steps, shift):
    """`num` images from (prompt a, seed a) to (prompt b, seed b): slerped noise, blended prompts."""
    shape = diffusion.x0_shape(s)
    noise_a, noise_b = jax.random.normal(rng_a, shape), jax.random.normal(rng_b, shape)
    weights = jnp.linspace(0.0, 1.0, num)
    x1 = jax.vmap(lambda w: diffusion._slerp(noise_a, noise_b, w))(weights)
    ta = jnp.broadcast_to(tokens_a, (num,) + tokens_a.shape)
    tb = jnp.broadcast_to(tokens_b, (num,) + tokens_b.shape)
    velocity = make_velocity(model, params, s, ta, None, guidance, weights=weights, tokens_b=tb)
    x0 = flow.sample(velocity, x1, steps, sampler, shift)
    return diffusion.decode(params, s, x0, jnp.where(weights[:, None] < 0.5, ta, tb))


def attention_maps(model, params, s: Settings, tokens, rng, guidance, uncond_tokens=None, *, sampler, steps,
                   shift, noise_levels=(0.2, 0.4, 0.6, 0.8)):
    """Images as `generate` makes them, and per-token attention maps `[B, H, W, L]` averaged
    over heads, layers and `noise_levels`: the sample is put back on the line at each level
    and the conditional backbone run once there with the path that sows its probabilities."""
    images_key, maps_key = rng, jax.random.fold_in(rng, 1)
    velocity = make_velocity(model, params, s, tokens, uncond_tokens, guidance)
    x0 = flow.sample(velocity, _noise(images_key, tokens.shape[0], s), steps, sampler, shift)
    text = diffusion._text(model, params, tokens)
    size = (s.image_size,) * 2
    total = 0.0
    for i, level in enumerate(noise_levels):
        t = jnp.full((x0.shape[0],), level, jnp.float32)
        x_t = flow.interpolant(x0, jax.random.normal(jax.random.fold_in(maps_key, i), x0.shape), t)
        _, state = model.apply({"params": params["unet"]}, x_t, TIME_SCALE * t, text,
                               method=type(model).denoise, mutable=[attention_lib.COLLECTION])
        total = total + attention_lib.token_maps(state, size)
    return diffusion.decode(params, s, x0, tokens), total / len(noise_levels)


def preview(model, params, batch, rng, config):
    """For the first `sample.num` test examples: the real image, then a sample from its caption."""
    n = config.sample.num
    images, tokens = batch["image"][:n], batch["tokens"][:n]
    sampled = generate(model, params, settings(config), tokens, rng, config.sample.guidance,
                       sampler=config.sample.sampler, steps=config.sample.preview_steps, shift=config.sample.shift)
    return jnp.stack([images, sampled], axis=1).reshape((-1,) + images.shape[1:])


FAMILY = Family(
    name="flow",
    variants=VARIANTS,
    init=init,
    objectives=objectives,
    evaluate=evaluate,
    best_metric=("x0_mse", "min"),
    preview=preview,
    settings=settings,
    abilities={"generate": generate, "img2img": img2img, "inpaint": inpaint, "edit": edit,
               "interpolate_prompts": interpolate_prompts, "attention_maps": attention_maps},
    resolve=diffusion.resolve,
    validate=validate,
    prepare=diffusion.prepare,
)
