"""Text-to-image diffusion, in pixel space or on the latents of a frozen VAE.

Training: sample t, noise the clean input x0 to x_t, and regress the UNet's output on the
prediction target (`loss.prediction`: eps, v or x0), weighted uniformly or by min-SNR-γ. The
caption is replaced by the empty caption with probability `loss.p_uncond`, so one network
learns both the conditional and the unconditional prediction that classifier-free guidance
mixes at sampling time.

Latent diffusion (`latent.vae_workdir` set): x0 is the VAE encoder's posterior mean,
normalised per channel by statistics measured on training data at the start of the run. The
VAE's weights and those statistics live in the parameters beside the UNet (`vae`, `latent`),
frozen (the one objective updates only `unet`), so a checkpoint is self-contained: it samples
without the VAE's workdir. The VAE's family, variant and model fields are copied into
`latent.vae_config` when the config is resolved, so the module can be rebuilt from any
checkpoint.

Everything a trained model does (generate, img2img, inpaint, edit, interpolate) builds one
guided denoiser `(x_t, t) -> (x0, eps)` and hands it to `mmjax.sampling`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.tokenizer import ABSENT_TEXT, ByteTokenizer, encoder_settings, text_settings
from mmjax.families.family import Family, LossAux, Objective
from mmjax.models.text import configure_text
from mmjax.models.dit import DiTB2, DiTS2, DiTShapes, DiTTiny
from mmjax.models.unet import DDPM32, LDM64, DDPM32Text, UNetLatentSmall, UNetSmall, UNetTiny
from mmjax.sampling import attention_maps as attention_lib
from mmjax.sampling import samplers
from mmjax.sampling import schedules as sched

log = logging.getLogger("mmjax.diffusion")

VARIANTS = {
    "tiny": UNetTiny,
    "tiny_uncond": functools.partial(UNetTiny, text=None, cross_attn_levels=()),
    "small": UNetSmall,
    "latent_small": UNetLatentSmall,
    "ddpm32": DDPM32,
    "ddpm32_text": DDPM32Text,
    "ldm64": LDM64,
    # Diffusion transformers (models/dit.py): the same interface, so either objective drives them.
    "dit_tiny": DiTTiny,
    "dit_shapes": DiTShapes,
    "dit_s2": DiTS2,
    "dit_b2": DiTB2,
}

WEIGHTINGS = ("uniform", "min_snr")
SCHEDULES = ("linear", "cosine")


# ---------------------------------------------------------------------------------------------
# Config: defaults, resolution of the VAE, validation
# ---------------------------------------------------------------------------------------------

def add_defaults(c) -> None:
    """The `loss`, `sample` and `latent` fields a diffusion config has (config files call this)."""
    c.loss.schedule = "cosine"
    c.loss.num_timesteps = 1000
    c.loss.prediction = "eps"
    c.loss.weighting = "min_snr"
    c.loss.snr_gamma = 5.0
    c.loss.p_uncond = 0.1
    c.sample.sampler = "ddim"
    c.sample.steps = 50
    c.sample.guidance = 3.0
    c.sample.eta = 0.0
    c.sample.preview_steps = 25
    add_latent_defaults(c)


def add_latent_defaults(c) -> None:
    """The `latent` section: a frozen VAE under the model, or pixel space."""
    c.latent = type(c)()
    c.latent.vae_workdir = ""  # "" = pixel space
    c.latent.vae_step = -1  # -1 = the VAE's latest good step
    c.latent.vae_config = ""  # filled by `resolve` from the VAE checkpoint (JSON)
    c.latent.stats_batches = 16  # training batches used to measure the latent mean and std


def resolve(config) -> None:
    """Copies the VAE's family/variant/model/data fields into `latent.vae_config`.

    `latent.vae_workdir` is a VAE's run directory or its export (`pretrained/vae_shapes`)."""
    workdir = config.latent.vae_workdir
    if not workdir or config.latent.vae_config:
        return
    from mmjax import model_files  # the VAE's saved config, read as files: no loader, no train code

    if not os.path.isdir(workdir):
        raise ValueError(f"config key 'latent.vae_workdir': no such directory {workdir!r} "
                         "(train a VAE first: python train.py --config configs/vae_shapes.py --workdir runs/vae, "
                         "or use the shipped one: pretrained/vae_shapes)")
    saved = model_files.read_config(workdir, None if config.latent.vae_step < 0 else config.latent.vae_step)
    if saved.get("family") != "vae":
        raise ValueError(f"config key 'latent.vae_workdir': {workdir!r} holds a {saved.get('family')!r} "
                         "model, not a VAE")
    vae_cfg = {k: saved[k] for k in ("variant", "model", "dtype")}
    # The VAE's encoder reads the same tokens as the UNet: both must tokenize alike.
    vae_cfg["text"] = {k: v for k, v in text_settings(saved).items() if k != "vocab_records"}
    vae_cfg["image_size"] = saved["data"]["image_size"]
    vae_cfg["max_len"] = saved["data"]["max_len"]
    ours = text_settings(config)
    alike = all(ours[k] == vae_cfg["text"][k] for k in ("tokenizer", "normalize", "vocab_size"))
    if alike and ours["tokenizer"] == "word" and saved["data"]["max_len"] == config.data.max_len:
        from mmjax.data import tokenizer as tokenizers

        if tokenizers.WordTokenizer.load(workdir, config.data.max_len) != tokenizers.for_config(config):
            raise ValueError(f"config key 'latent.vae_workdir': the word vocabulary in {workdir!r} is not "
                             "the one this config's train captions build (the data or text settings "
                             "differ), so the VAE would read other words than the UNet; use the VAE's "
                             "data and text settings")
    config.latent.vae_config = json.dumps(vae_cfg, sort_keys=True)


def validate(config) -> None:
    loss = config.loss
    if loss.prediction not in sched.PREDICTIONS:
        raise ValueError(f"config key 'loss.prediction' must be one of {sched.PREDICTIONS}, got {loss.prediction!r}")
    if loss.weighting not in WEIGHTINGS:
        raise ValueError(f"config key 'loss.weighting' must be one of {WEIGHTINGS}, got {loss.weighting!r}")
    if loss.schedule not in SCHEDULES:
        raise ValueError(f"config key 'loss.schedule' must be one of {SCHEDULES}, got {loss.schedule!r}")
    if not 0.0 <= loss.p_uncond < 1.0:
        raise ValueError(f"config key 'loss.p_uncond' must be in [0, 1), got {loss.p_uncond}")
    if config.sample.sampler not in samplers.SAMPLERS:
        raise ValueError(f"config key 'sample.sampler' must be one of {samplers.SAMPLERS}, "
                         f"got {config.sample.sampler!r}")
    validate_latent(config, VARIANTS)


def validate_latent(config, variants) -> None:
    """The backbone predicts what it runs on (image or latent channels); a frozen VAE reads
    captions with the same tokenizer and sizes as the model above it."""
    if not config.latent.vae_config:
        variant = variants[config.variant]
        kwargs = {**getattr(variant, "keywords", {}), **config.model}
        predicts = kwargs.get("out_channels", getattr(variant, "func", variant).out_channels)
        channels = config.data.get("channels", 3)
        if predicts != channels:
            raise ValueError(
                f"variant {config.variant!r} predicts {predicts}-channel inputs but the images have "
                f"{channels} (config key 'data.channels'); a latent variant trains on a VAE's "
                "latents: set config key 'latent.vae_workdir' to a trained VAE's run directory "
                "(--config.latent.vae_workdir=runs/vae)")
    if config.latent.vae_config:
        vae_cfg = json.loads(config.latent.vae_config)
        for key in ("image_size", "max_len"):
            if vae_cfg[key] != config.data[key]:
                raise ValueError(f"config key 'data.{key}' is {config.data[key]} but the VAE in "
                                 f"{config.latent.vae_workdir!r} was trained with {vae_cfg[key]}")
        ours = {k: v for k, v in text_settings(config).items() if k != "vocab_records"}
        theirs = {**ABSENT_TEXT, **vae_cfg.get("text", {})}
        for key in ("tokenizer", "normalize", "vocab_size"):
            if ours[key] != theirs[key]:
                raise ValueError(f"config key 'text.{key}' is {ours[key]!r} but the VAE in "
                                 f"{config.latent.vae_workdir!r} reads captions with {theirs[key]!r}: "
                                 "the latent model feeds it the same tokens, so set them alike")


# ---------------------------------------------------------------------------------------------
# Pieces shared by training and sampling
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """The part of a diffusion config that sampling and editing read (hashable: it is baked
    into compiled programs). Sampling defaults (sampler, steps, guidance) are not here: the
    caller passes them."""
    schedule: str
    num_timesteps: int
    prediction: str
    image_size: int
    channels: int
    max_len: int
    vae_config: str = ""  # JSON of the frozen VAE's variant/model fields; "" = pixel space
    dtype: str = "float32"


def settings(config) -> Settings:
    return Settings(schedule=config.loss.schedule, num_timesteps=config.loss.num_timesteps,
                    prediction=config.loss.prediction, image_size=config.data.image_size,
                    channels=config.data.get("channels", 3), max_len=config.data.max_len,
                    vae_config=config.latent.vae_config, dtype=config.dtype)


@functools.lru_cache(maxsize=8)
def _vae_module(vae_config_json: str, dtype: str):
    from mmjax.families import vae as vae_family  # a latent model rides on a VAE

    cfg = json.loads(vae_config_json)
    module = vae_family.VARIANTS[cfg["variant"]](**cfg["model"], dtype=jnp.dtype(dtype))
    return configure_text(module, **encoder_settings({"text": cfg.get("text") or {}}))


def vae_module(s: Settings):
    """The frozen VAE's module, or None in pixel space."""
    return _vae_module(s.vae_config, s.dtype) if s.vae_config else None


def noise_schedule(s: Settings) -> sched.Schedule:
    return sched.make_schedule(s.schedule, s.num_timesteps)


def x0_shape(s: Settings) -> tuple[int, int, int]:
    """The shape the diffusion runs on: the image, or the VAE latent."""
    vae = vae_module(s)
    if vae is None:
        return (s.image_size, s.image_size, s.channels)
    side = s.image_size // (2 ** (len(vae.widths) - 1))
    return (side, side, vae.latent_channels)


@functools.lru_cache(maxsize=8)
def _empty_tokens(max_len: int) -> np.ndarray:
    return ByteTokenizer(max_len).encode([""])[0]


def empty_tokens(s: Settings, batch: int) -> jax.Array:
    """The empty caption (BOS, EOS, padding): what the unconditional branch sees."""
    return jnp.broadcast_to(jnp.asarray(_empty_tokens(s.max_len)), (batch, s.max_len))


def encode(params, s: Settings, images, tokens):
    """Images in [-1, 1] -> what the diffusion runs on (normalised latents, or the images)."""
    vae = vae_module(s)
    if vae is None:
        return images
    mean, _ = vae.apply({"params": params["vae"]}, images, tokens, method=type(vae).encode)
    stats = params["latent"]
    return (jax.lax.stop_gradient(mean) - stats["mean"]) / stats["std"]


def decode(params, s: Settings, x0, tokens):
    """The inverse of `encode` (through the VAE decoder, reading the caption if it does)."""
    vae = vae_module(s)
    if vae is None:
        return jnp.clip(x0, -1, 1)
    stats = params["latent"]
    z = x0 * stats["std"] + stats["mean"]
    return jnp.clip(vae.apply({"params": params["vae"]}, z, tokens, method=type(vae).decode), -1, 1)


def _reads_text(model) -> bool:
    return model.text is not None


# ---------------------------------------------------------------------------------------------
# Init and the objective
# ---------------------------------------------------------------------------------------------

def init(model, rng, batch, config):
    return init_params(model, rng, batch, settings(config))


def init_params(model, rng, batch, s):
    """The backbone's parameters (`unet`, whichever network it is) and, on latents, placeholders
    for the frozen VAE and the latent statistics that `prepare` fills."""
    unet_key, vae_key = jax.random.split(rng)
    shape = x0_shape(s)
    x = jnp.zeros((1,) + shape, jnp.float32)
    tokens = batch["tokens"][:1] if _reads_text(model) else None
    params = {"unet": model.init({"params": unet_key}, x, jnp.zeros((1,), jnp.int32), tokens)["params"]}
    vae = vae_module(s)
    if vae is not None:
        # Placeholder weights of the right shapes; `prepare` loads the trained VAE.
        variables = vae.init({"params": vae_key, "noise": vae_key}, batch["image"][:1], batch["tokens"][:1])
        params["vae"] = variables["params"]
        params["latent"] = {"mean": jnp.zeros((shape[-1],), jnp.float32),
                            "std": jnp.ones((shape[-1],), jnp.float32)}
    return params, None


def prepare(params, config, batches):
    """At a fresh start of a latent run: the trained VAE's weights and the latent statistics.

    `batches` yields training batches (host numpy); the per-channel mean and std of the
    posterior means over `latent.stats_batches` of them normalise the latents to unit scale.
    """
    if not config.latent.vae_config:
        return params
    from mmjax import model_files  # the VAE's weights, read as files: no loader, no train code

    step = None if config.latent.vae_step < 0 else config.latent.vae_step
    vae = model_files.read(config.latent.vae_workdir, step=step)
    if vae.config.get("family") != "vae":
        raise ValueError(f"config key 'latent.vae_workdir': {config.latent.vae_workdir!r} holds a "
                         f"{vae.config.get('family')!r} model, not a VAE")
    module = _vae_module(config.latent.vae_config, config.dtype)  # any family's config that has `latent`
    encode_fn = jax.jit(lambda p, x, tok: module.apply({"params": p}, x, tok, method=type(module).encode)[0])
    means = []
    for _, batch in zip(range(max(1, config.latent.stats_batches)), batches):
        means.append(np.asarray(encode_fn(vae.params, jnp.asarray(batch["image"]), jnp.asarray(batch["tokens"]))))
    z = np.concatenate(means).reshape(-1, means[0].shape[-1])
    stats = {"mean": z.mean(0).astype(np.float32), "std": np.maximum(z.std(0), 1e-3).astype(np.float32)}
    log.info("latent diffusion on %s (VAE step %d): latent shape %s, channel std %s",
             config.latent.vae_workdir, vae.step, means[0].shape[1:], np.round(stats["std"], 3).tolist())
    return {**params, "vae": vae.params, "latent": stats}


def objectives(model, config):
    s = settings(config)
    schedule = noise_schedule(s)
    loss_cfg = config.loss
    text = _reads_text(model)

    def loss_fn(params, batch, rng, step, model_state):
        images, tokens = batch["image"], batch["tokens"]
        x0 = encode(params, s, images, tokens)
        t_key, noise_key, drop_key, dropout_key = jax.random.split(rng, 4)
        batch_size = x0.shape[0]
        t = jax.random.randint(t_key, (batch_size,), 0, schedule.num_timesteps)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        x_t = sched.q_sample(schedule, x0, t, noise)
        cond = None
        if text:
            drop = jax.random.bernoulli(drop_key, loss_cfg.p_uncond, (batch_size,))
            cond = jnp.where(drop[:, None], empty_tokens(s, batch_size), tokens)
        out = model.apply({"params": params["unet"]}, x_t, t, cond, train=True, rngs={"dropout": dropout_key})
        target = sched.model_target(loss_cfg.prediction, x0, noise, schedule, t)
        per_example = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
        weights = sched.loss_weights(loss_cfg.weighting, loss_cfg.prediction, schedule, t, loss_cfg.snr_gamma)
        loss = jnp.mean(weights * per_example)
        return loss, LossAux({"mse": jnp.mean(per_example)}, model_state)

    return (Objective("diffusion", loss_fn, params_key="unet"),)


def evaluate(model, params, batch, config):
    """Denoising error on test data at fixed noise levels and noise: comparable across steps."""
    s = settings(config)
    schedule = noise_schedule(s)
    x0 = encode(params, s, batch["image"], batch["tokens"])
    metrics = {}
    for frac in (0.1, 0.5, 0.9):
        t = jnp.full((x0.shape[0],), int(frac * (schedule.num_timesteps - 1)), jnp.int32)
        noise = jax.random.normal(jax.random.key(int(frac * 1000)), x0.shape)
        x_t = sched.q_sample(schedule, x0, t, noise)
        out = model.apply({"params": params["unet"]}, x_t, t, batch["tokens"] if _reads_text(model) else None)
        x0_hat, _ = sched.predict_x0_eps(s.prediction, out.astype(jnp.float32), x_t, schedule, t)
        metrics[f"x0_mse_t{int(frac * 100)}"] = jnp.mean(jnp.square(x0_hat - x0))
    metrics["x0_mse"] = jnp.mean(jnp.stack(list(metrics.values())))
    return metrics


# ---------------------------------------------------------------------------------------------
# The guided denoiser, and what a trained model does with it. Each ability takes
# (model, params, settings, arrays..., guidance, uncond_tokens, *, static options); the
# caller (mmjax.handles) fills the sampling defaults from the config's `sample` section.
# ---------------------------------------------------------------------------------------------

def _text(model, params, tokens):
    return model.apply({"params": params["unet"]}, tokens, method=type(model).encode_text)


def guided(model, params, s, tokens, uncond_tokens, guidance, weights=None, tokens_b=None):
    """`(x, t) -> out`: the backbone's output with classifier-free guidance, float32.

    One call per step evaluates the conditional and unconditional rows together:
    `out = out_u + guidance * (out_c - out_u)` (guidance 1 = conditional, 0 = unconditional).
    `uncond_tokens` (None = the empty caption) is what guidance steers away from: a negative
    prompt. With `tokens_b` and per-row `weights`, the conditional output is the blend
    `(1 - w) * out(a) + w * out(b)`: interpolation between two prompts. Any objective whose
    target is linear in the output (eps, v, x0, a flow's velocity) can be guided this way.
    """
    variables = {"params": params["unet"]}
    denoise = type(model).denoise
    if not _reads_text(model):
        return lambda x, t: model.apply(variables, x, t, None, method=denoise).astype(jnp.float32)
    if uncond_tokens is None:
        uncond_tokens = empty_tokens(s, tokens.shape[0])
    groups = [tokens, uncond_tokens] + ([tokens_b] if tokens_b is not None else [])
    text = _text(model, params, jnp.concatenate(groups))
    n = len(groups)

    def raw(x, t):
        out = model.apply(variables, jnp.concatenate([x] * n), jnp.concatenate([t] * n), text,
                          method=denoise).astype(jnp.float32)
        parts = jnp.split(out, n)
        out_c, out_u = parts[0], parts[1]
        if tokens_b is not None:
            w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
            out_c = (1 - w) * out_c + w * parts[2]
        return out_u + guidance * (out_c - out_u)

    return raw


def make_denoiser(model, params, s: Settings, tokens, uncond_tokens, guidance, weights=None, tokens_b=None):
    """`(x_t, t) -> (x0, eps)` from the `guided` output. In pixel space the x0 estimate is
    clipped to [-1, 1]."""
    schedule = noise_schedule(s)
    pixel = vae_module(s) is None
    raw = guided(model, params, s, tokens, uncond_tokens, guidance, weights, tokens_b)

    def denoise(x, t):
        x0, eps = sched.predict_x0_eps(s.prediction, raw(x, t).astype(jnp.float32), x, schedule, t)
        if pixel:
            alpha, sigma = sched.alpha_sigma(schedule, t)
            shape = (-1,) + (1,) * (x.ndim - 1)
            x0 = jnp.clip(x0, -1, 1)
            eps = (x - alpha.reshape(shape) * x0) / sigma.reshape(shape)
        return x0, eps

    return denoise


def generate(model, params, s: Settings, tokens, rng, guidance, uncond_tokens=None, *, sampler, steps, eta):
    """One image per row of `tokens`, from noise; `uncond_tokens` is the negative prompt."""
    noise_key, sample_key = jax.random.split(rng)
    x_T = jax.random.normal(noise_key, (tokens.shape[0],) + x0_shape(s))
    denoise = make_denoiser(model, params, s, tokens, uncond_tokens, guidance)
    x0 = samplers.sample(denoise, noise_schedule(s), x_T, sample_key, sampler=sampler, steps=steps, eta=eta)
    return decode(params, s, x0, tokens)


def img2img(model, params, s: Settings, images, tokens, rng, guidance, uncond_tokens=None, *, strength,
            sampler, steps):
    """SDEdit: noise the images to `strength` of the way and denoise them toward the prompt."""
    x0 = encode(params, s, images, tokens)
    denoise = make_denoiser(model, params, s, tokens, uncond_tokens, guidance)
    out = samplers.img2img(denoise, noise_schedule(s), x0, rng, strength=strength, sampler=sampler, steps=steps)
    return decode(params, s, out, tokens)


def inpaint(model, params, s: Settings, images, masks, tokens, rng, guidance, uncond_tokens=None, *, steps,
            resample=4):
    """Regenerates where `masks` [N, H, W] is 1 and keeps the pixels where it is 0.

    In latent space the mask is resized to the latent grid (a latent cell is regenerated if
    any of its pixels is masked) and the decoded result is composited back onto the input,
    so unmasked pixels come back exactly as given.
    """
    x0 = encode(params, s, images, tokens)
    masks = masks.astype(jnp.float32)
    if x0.shape[1:3] != images.shape[1:3]:
        factor = images.shape[1] // x0.shape[1]
        small = masks.reshape(masks.shape[0], x0.shape[1], factor, x0.shape[2], factor).max(axis=(2, 4))
    else:
        small = masks
    latent_mask = jnp.broadcast_to(small[..., None], x0.shape)
    denoise = make_denoiser(model, params, s, tokens, uncond_tokens, guidance)
    out = samplers.inpaint(denoise, noise_schedule(s), x0, latent_mask, rng, steps=steps, resample=resample)
    decoded = decode(params, s, out, tokens)
    return jnp.where(masks[..., None] > 0.5, decoded, images)


def edit(model, params, s: Settings, images, source_tokens, target_tokens, rng, guidance, uncond_tokens=None, *,
         strength, steps, sampler="ddim", eta=0.0):
    """Prompt edit: DDIM-invert the images under their own caption (unguided) up to
    `strength` of the noise schedule, then sample back with the target caption, guidance and
    `sampler`: what the two prompts share (the layout, the position, the size) survives the
    round trip. `rng` drives stochastic samplers (ddpm, or ddim with eta > 0)."""
    schedule = noise_schedule(s)
    t_end = max(1, int(round(strength * (schedule.num_timesteps - 1))))
    sub_steps = max(1, int(round(strength * steps)))
    x0 = encode(params, s, images, source_tokens)
    invert = make_denoiser(model, params, s, source_tokens, None, 1.0)
    x_t = samplers.ddim_invert(invert, schedule, x0, steps=sub_steps, t_end=t_end)
    regen = make_denoiser(model, params, s, target_tokens, uncond_tokens, guidance)
    out = samplers.sample(regen, schedule, x_t, rng, sampler=sampler, steps=sub_steps, eta=eta, t_start=t_end)
    return decode(params, s, out, target_tokens)


def _slerp(a, b, w):
    a_flat, b_flat = a.reshape(-1), b.reshape(-1)
    cos = jnp.dot(a_flat, b_flat) / (jnp.linalg.norm(a_flat) * jnp.linalg.norm(b_flat))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    safe = jnp.maximum(jnp.sin(theta), 1e-6)
    slerped = (jnp.sin((1 - w) * theta) * a + jnp.sin(w * theta) * b) / safe
    return jnp.where(theta < 1e-4, (1 - w) * a + w * b, slerped)


def interpolate_prompts(model, params, s: Settings, tokens_a, tokens_b, rng_a, rng_b, guidance, *, num,
                        sampler, steps):
    """`num` images on a path from (prompt a, seed a) to (prompt b, seed b): the starting
    noise is slerped, the prompts blended in the denoiser's conditional output. Same prompt
    at both ends: seed interpolation; same seed: prompt interpolation."""
    shape = x0_shape(s)
    noise_a = jax.random.normal(rng_a, shape)
    noise_b = jax.random.normal(rng_b, shape)
    weights = jnp.linspace(0.0, 1.0, num)
    x_T = jax.vmap(lambda w: _slerp(noise_a, noise_b, w))(weights)
    ta = jnp.broadcast_to(tokens_a, (num,) + tokens_a.shape)
    tb = jnp.broadcast_to(tokens_b, (num,) + tokens_b.shape)
    denoise = make_denoiser(model, params, s, ta, None, guidance, weights=weights, tokens_b=tb)
    x0 = samplers.sample(denoise, noise_schedule(s), x_T, jax.random.key(0), sampler=sampler, steps=steps, eta=0.0)
    decode_tokens = jnp.where(weights[:, None] < 0.5, ta, tb)
    return decode(params, s, x0, decode_tokens)


def attention_maps(model, params, s: Settings, tokens, rng, guidance, uncond_tokens=None, *, sampler, steps,
                   eta, noise_levels=(0.2, 0.4, 0.6, 0.8)):
    """Images as `generate` makes them, and per-token cross-attention maps `[B, H, W, L]`
    (image resolution) averaged over heads, cross-attention layers and `noise_levels`: the
    sample is re-noised to each level and the conditional UNet run once there, with the
    explicit-attention path that sows its probabilities (models/layers.py). The sampling
    itself runs the fast path."""
    noise_key, sample_key = jax.random.split(rng)  # as `generate` splits it: the same images
    maps_key = jax.random.fold_in(rng, 1)
    x_T = jax.random.normal(noise_key, (tokens.shape[0],) + x0_shape(s))
    denoise = make_denoiser(model, params, s, tokens, uncond_tokens, guidance)
    schedule = noise_schedule(s)
    x0 = samplers.sample(denoise, schedule, x_T, sample_key, sampler=sampler, steps=steps, eta=eta)
    text = _text(model, params, tokens)

    def maps_at(x_t, t):
        _, state = model.apply({"params": params["unet"]}, x_t, t, text, method=type(model).denoise,
                               mutable=[attention_lib.COLLECTION])
        return state

    levels = [int(f * (schedule.num_timesteps - 1)) for f in noise_levels]
    maps = attention_lib.timestep_average(maps_at, schedule, x0, levels, maps_key, size=(s.image_size,) * 2)
    return decode(params, s, x0, tokens), maps


def preview(model, params, batch, rng, config):
    """For the first `sample.num` test examples: the real image, then a sample from its caption."""
    n = config.sample.num
    images, tokens = batch["image"][:n], batch["tokens"][:n]
    sampled = generate(model, params, settings(config), tokens, rng, config.sample.guidance,
                       sampler=config.sample.sampler, steps=config.sample.preview_steps, eta=config.sample.eta)
    return jnp.stack([images, sampled], axis=1).reshape((-1,) + images.shape[1:])


FAMILY = Family(
    name="diffusion",
    variants=VARIANTS,
    init=init,
    objectives=objectives,
    evaluate=evaluate,
    best_metric=("x0_mse", "min"),
    preview=preview,
    settings=settings,
    abilities={"generate": generate, "img2img": img2img, "inpaint": inpaint, "edit": edit,
               "interpolate_prompts": interpolate_prompts, "attention_maps": attention_maps},
    resolve=resolve,
    validate=validate,
    prepare=prepare,
)
