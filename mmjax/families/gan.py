"""GAN family: a text-conditioned GAN (models/gan.py) trained in one compiled step.

Objectives, in this order inside the shared train step (one jit, traced once):
1. `discriminator` (optimizer section `optim_d`): hinge loss on real images with their own
   captions (should score high), generated images with the same captions (low) and real images
   with another example's caption (low, weighted by `loss.mismatch_weight`): the last term
   is what makes the projection head judge image-text agreement, not realism alone. Every
   `loss.r1_every` steps the R1 penalty `gamma / 2 * |grad_x D(x)|^2` on real images, scaled
   by `r1_every` so its average strength does not depend on how lazily it runs.
2. `generator` (section `optim`): `-D(G(z, caption), caption)` with the discriminator just
   updated. Two optimizers, two learning rates (TTUR).

Both networks see the same differentiable augmentation (families/augment.py) of real and fake
images, each transform applied with probability p. p adapts as in ADA: the sign of the
discriminator's output on real images, averaged over the batch (r_t), above `loss.ada_target`
means the discriminator is growing confident on reals (overfitting), and p rises by
`loss.ada_speed` per step; below it p falls. p and the spectral-norm power-iteration vectors
live in the train state's `model_state`, so they are checkpointed and a resume is exact.

Sampling uses the EMA of the generator. Inversion (`invert`) finds, per image, the latent
that reconstructs it: Adam on z (and, with `plus`, a per-layer offset: "z+") under `vmap`,
from the best of a few random starts, every image its own optimisation, all in one compiled
`lax.scan` and sharded over the devices along the batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmjax import sharding
from mmjax.families import augment as aug
from mmjax.families.family import Family, LossAux, Objective
from mmjax.models.gan import GAN, GAN64, SPECTRAL, GANSmall, GANTiny

VARIANTS = {"tiny": GANTiny, "small": GANSmall, "64": GAN64}


def init(model, rng, batch, config):
    params_key, z_key = jax.random.split(rng)
    images, tokens = batch["image"], batch["tokens"]
    z = jax.random.normal(z_key, (images.shape[0], model.z_dim))
    variables = model.init({"params": params_key}, z, tokens, images)
    model_state = {SPECTRAL: variables[SPECTRAL], "ada_p": jnp.asarray(config.loss.ada_p_init, jnp.float32)}
    return variables["params"], model_state


def _discriminate(model, params, spectral, images, tokens, update: bool):
    variables = {"params": params, SPECTRAL: spectral}
    if update:
        logits, new = model.apply(variables, images, tokens, True, method=GAN.discriminate, mutable=[SPECTRAL])
        return logits, new[SPECTRAL]
    return model.apply(variables, images, tokens, False, method=GAN.discriminate), spectral


def _generate(model, params, z, tokens):
    return model.apply({"params": params}, z, tokens, method=GAN.generate)


def objectives(model, config):
    loss_cfg = config.loss
    kinds = tuple(loss_cfg.augment)

    def augment(images, key, p):
        return aug.augment(images, key, p, kinds, loss_cfg.translation) if kinds else images

    def d_loss(params, batch, rng, step, model_state):
        real, tokens = batch["image"], batch["tokens"]
        k_z, k_aug, k_r1 = jax.random.split(rng, 3)
        z = jax.random.normal(k_z, (real.shape[0], model.z_dim))
        fake = jax.lax.stop_gradient(_generate(model, params, z, tokens))
        mismatched = jnp.roll(tokens, 1, axis=0)
        p = model_state["ada_p"]
        images = augment(jnp.concatenate([real, fake, real]), k_aug, p)
        logits, spectral = _discriminate(model, params, model_state[SPECTRAL], images,
                                         jnp.concatenate([tokens, tokens, mismatched]), update=True)
        real_logit, fake_logit, mismatch_logit = jnp.split(logits.astype(jnp.float32), 3)
        loss_real = jnp.mean(jax.nn.relu(1.0 - real_logit))
        loss_fake = jnp.mean(jax.nn.relu(1.0 + fake_logit))
        loss_mismatch = jnp.mean(jax.nn.relu(1.0 + mismatch_logit))
        loss = loss_real + loss_fake + loss_cfg.mismatch_weight * loss_mismatch

        def r1_penalty(_):
            # Gradient of the summed logits w.r.t. the (augmented) real images: each image's
            # gradient is its own, since the discriminator treats images independently.
            real_aug = images[: real.shape[0]]
            grad = jax.grad(lambda x: jnp.sum(
                _discriminate(model, params, spectral, x, tokens, update=False)[0].astype(jnp.float32)))(real_aug)
            return jnp.mean(jnp.sum(jnp.square(grad.astype(jnp.float32)), axis=(1, 2, 3)))

        r1 = jnp.float32(0.0)
        if loss_cfg.r1_gamma > 0:
            r1 = jax.lax.cond(step % loss_cfg.r1_every == 0, r1_penalty, lambda _: jnp.float32(0.0), None)
            loss = loss + 0.5 * loss_cfg.r1_gamma * loss_cfg.r1_every * r1

        # ADA: r_t = E[sign(D(real))]; p moves toward keeping r_t at the target.
        r_t = jnp.mean(jnp.sign(jax.lax.stop_gradient(real_logit)))
        new_p = p
        if kinds and loss_cfg.ada_speed > 0:
            new_p = jnp.clip(p + jnp.sign(r_t - loss_cfg.ada_target) * loss_cfg.ada_speed, 0.0, loss_cfg.ada_p_max)
        metrics = {"real_logit": jnp.mean(real_logit), "fake_logit": jnp.mean(fake_logit),
                   "mismatch_logit": jnp.mean(mismatch_logit), "r1": r1, "ada_r_t": r_t, "ada_p": p}
        return loss, LossAux(metrics, {**model_state, SPECTRAL: spectral, "ada_p": new_p})

    def g_loss(params, batch, rng, step, model_state):
        tokens = batch["tokens"]
        k_z, k_aug = jax.random.split(rng)
        z = jax.random.normal(k_z, (tokens.shape[0], model.z_dim))
        fake = _generate(model, params, z, tokens)
        logits, _ = _discriminate(model, params, model_state[SPECTRAL], augment(fake, k_aug, model_state["ada_p"]),
                                  tokens, update=False)
        loss = -jnp.mean(logits.astype(jnp.float32))
        return loss, LossAux({}, model_state)

    return (Objective("discriminator", d_loss, params_key="discriminator", optim_section="optim_d"),
            Objective("generator", g_loss, params_key="generator", optim_section="optim"))


# --- sampling and editing (params: the EMA parameters of both networks) ----------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """The part of a GAN config its abilities read: defaults of sampling and inversion."""
    max_len: int
    truncation: float = 0.0  # 0 = off
    invert_steps: int = 300
    invert_lr: float = 0.05
    invert_z_reg: float = 1e-3
    invert_offset_reg: float = 1e-2
    edit_source_layers: int | None = None  # None = half the generator's layers


def settings(config) -> Settings:
    sample = config.sample
    return Settings(max_len=config.data.max_len, truncation=sample.get("truncation", 0.0),
                    invert_steps=sample.get("invert_steps", 300), invert_lr=sample.get("invert_lr", 0.05),
                    invert_z_reg=sample.get("invert_z_reg", 1e-3),
                    invert_offset_reg=sample.get("invert_offset_reg", 1e-2),
                    edit_source_layers=sample.get("edit_source_layers", None))


def _latents(model, rng, n: int, truncation: float | None):
    """z ~ N(0, I); with `truncation` t, each coordinate from the normal truncated to [-t, t]
    (the truncation trick: less variety, more typical images)."""
    if truncation is None:
        return jax.random.normal(rng, (n, model.z_dim))
    if truncation <= 0:
        raise ValueError(f"truncation must be positive, got {truncation}")
    return jax.random.truncated_normal(rng, -truncation, truncation, (n, model.z_dim))


def generate(model, params, s: Settings, tokens, rng, *, truncation: float | None = None):
    """One image per row of `tokens` from the EMA generator."""
    truncation = s.truncation if truncation is None else truncation
    z = _latents(model, rng, tokens.shape[0], truncation or None)
    return _generate(model, params, z, tokens)


def encode_text(model, params, tokens):
    return model.apply({"params": params}, tokens, method=GAN.encode_text)


def synthesize(model, params, s, z, text):
    """Latents (z [N, z_dim] or z+ [N, layers, z_dim]) and caption vectors -> images."""
    return model.apply({"params": params}, z, text, method=GAN.synthesize)


def _shard_batch(x):
    """Constrains `x` to be split along the batch over the devices where it divides evenly:
    the images' optimisations then run in parallel, one share per device."""
    mesh = sharding.make_mesh()
    if mesh.devices.size > 1 and x.shape[0] % mesh.devices.size == 0:
        return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))
    return x


def invert(model, params, s: Settings, images, tokens=None, *, steps: int | None = None, lr: float | None = None,
           plus: bool = True, restarts: int = 8, seed: int = 0):
    """Latents that reconstruct `images` [N, H, W, 3] in [-1, 1].

    -> `(z [N, num_layers, z_dim], text [N, text_dim], reconstructions)`. With `tokens` (the
    images' captions) the text vector is the caption's and only z moves; without, the text
    vector is optimised too, from the empty caption's. `plus` adds a per-layer offset to z
    (z+), kept small by `sample.invert_offset_reg`; z itself is pulled toward the prior by
    `sample.invert_z_reg`. Each image starts from the best of `restarts` random z.
    """
    import optax  # inversion's optimizer: only a GAN that inverts pays for the import

    steps = s.invert_steps if steps is None else steps
    lr = s.invert_lr if lr is None else lr
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps} and {restarts}")
    n, layers, z_dim = images.shape[0], model.num_layers, model.z_dim
    images = _shard_batch(images.astype(jnp.float32))
    optimize_text = tokens is None
    if tokens is None:
        tokens = jnp.zeros((n, s.max_len), jnp.int32)
    text0 = _shard_batch(encode_text(model, params, tokens))

    # The best of `restarts` random starting points per image, all in one batched call.
    candidates = jax.random.normal(jax.random.key(seed), (restarts, n, z_dim))
    trial = synthesize(model, params, s, candidates.reshape(restarts * n, z_dim), jnp.tile(text0, (restarts, 1)))
    errors = jnp.mean(jnp.square(trial.reshape((restarts, n) + images.shape[1:]) - images[None]), axis=(2, 3, 4))
    z0 = _shard_batch(jnp.take_along_axis(candidates, jnp.argmin(errors, axis=0)[None, :, None], axis=0)[0])

    z_reg, offset_reg = s.invert_z_reg, s.invert_offset_reg
    optimizer = optax.adam(lr)

    def compose(latent):
        z = jnp.broadcast_to(latent["z"][None], (layers, z_dim))
        return z + latent["offset"] if plus else z

    def one_image(image, text, z_start):
        latent = {"z": z_start, "offset": jnp.zeros((layers, z_dim)), "text": text}

        def loss(lat):
            out = synthesize(model, params, s, compose(lat)[None], (lat["text"] if optimize_text else text)[None])[0]
            mse = jnp.mean(jnp.square(out - image))
            return mse + z_reg * jnp.mean(jnp.square(lat["z"])) + offset_reg * jnp.mean(jnp.square(lat["offset"]))

        def body(carry, _):
            lat, opt_state = carry
            grads = jax.grad(loss)(lat)
            updates, opt_state = optimizer.update(grads, opt_state, lat)
            return (optax.apply_updates(lat, updates), opt_state), None

        (latent, _), _ = jax.lax.scan(body, (latent, optimizer.init(latent)), None, length=steps)
        final_text = latent["text"] if optimize_text else text
        return compose(latent), final_text

    z, text = jax.vmap(one_image)(images, text0, z0)
    return z, text, synthesize(model, params, s, z, text)


def reconstruct(model, params, s: Settings, images, tokens=None, *, steps: int | None = None, lr: float | None = None,
                plus: bool = True, restarts: int = 8, seed: int = 0):
    """Inversion's reconstructions (what `mmjax.evaluate` scores as PSNR/SSIM)."""
    return invert(model, params, s, images, tokens, steps=steps, lr=lr, plus=plus, restarts=restarts,
                  seed=seed)[2]


def edit(model, params, s: Settings, images, source_tokens, target_tokens, *, steps: int | None = None,
         lr: float | None = None, plus: bool = True, restarts: int = 8, seed: int = 0,
         source_layers: int | None = None):
    """Inverts each image under its caption, then regenerates its latent under the target
    caption: what the latent holds stays, what the text says changes.

    `source_layers` (default `sample.edit_source_layers`, else half the layers) keeps the source caption in that
    many of the first, coarse layers (the 4x4 stem, the 8x8 block, ...), where this generator
    decides shape and place, and gives the target caption to the rest, where the color is
    painted: 0 regenerates wholly under the target caption.
    """
    if source_layers is None:
        source_layers = model.num_layers // 2 if s.edit_source_layers is None else s.edit_source_layers
    if not 0 <= source_layers < model.num_layers:
        raise ValueError(f"source_layers must be in [0, {model.num_layers - 1}], got {source_layers}")
    z, source_text, _ = invert(model, params, s, images, source_tokens, steps=steps, lr=lr, plus=plus,
                               restarts=restarts, seed=seed)
    target_text = encode_text(model, params, target_tokens)
    text = jnp.stack([source_text if i < source_layers else target_text for i in range(model.num_layers)], axis=1)
    return synthesize(model, params, s, z, text)


def encode_latent(model, params, s: Settings, images, tokens=None):
    """Images -> z+ latents [N, num_layers, z_dim] by inversion (CLIP guidance starts here)."""
    return invert(model, params, s, images, tokens)[0]


def decode_latent(model, params, s: Settings, z, tokens=None):
    """z (or z+) latents -> images under the caption (differentiable: CLIP guidance steers it)."""
    if tokens is None:
        tokens = jnp.zeros((z.shape[0], s.max_len), jnp.int32)
    return synthesize(model, params, s, z, encode_text(model, params, tokens))


def _slerp(a, b, t):
    cos = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-12)
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    so = jnp.sin(omega)
    lerp = (1 - t) * a + t * b
    slerp = (jnp.sin((1 - t) * omega) * a + jnp.sin(t * omega) * b) / jnp.where(so < 1e-6, 1.0, so)
    return jnp.where(so < 1e-6, lerp, slerp)


def interpolate_prompts(model, params, s: Settings, tokens_a, tokens_b, rng_a, rng_b, *, num: int,
                      truncation: float | None = None):
    """`num` images from (prompt a, seed a) to (prompt b, seed b): z slerped, the caption
    vectors blended linearly. Same prompt at both ends walks between latents; same seed,
    between prompts."""
    truncation = s.truncation if truncation is None else truncation
    za = _latents(model, rng_a, 1, truncation or None)[0]
    zb = _latents(model, rng_b, 1, truncation or None)[0]
    texts = encode_text(model, params, jnp.stack([tokens_a, tokens_b]))
    weights = jnp.linspace(0.0, 1.0, num)
    z = jax.vmap(lambda t: _slerp(za, zb, t))(weights)
    text = (1 - weights)[:, None] * texts[0] + weights[:, None] * texts[1]
    return synthesize(model, params, s, z, text)


def evaluate(model, params, batch, config):
    """Inversion quality of the EMA generator on the first images of a test batch: a short
    z+ inversion under their captions and its PSNR (dB), a number that rises as the
    generator learns to cover the data."""
    n = min(16, batch["image"].shape[0])
    images = batch["image"][:n]
    _, _, recon = invert(model, params, settings(config), images, batch["tokens"][:n], steps=50)
    mse = jnp.mean(jnp.square((jnp.clip(recon, -1, 1) - images) / 2.0), axis=(1, 2, 3))
    return {"invert_psnr": jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))}


def preview(model, params, batch, rng, config):
    """For the first `sample.num` test examples: the real image, then two samples of its caption."""
    n = config.sample.num
    images, tokens = batch["image"][:n], batch["tokens"][:n]
    k1, k2 = jax.random.split(rng)
    a = generate(model, params, settings(config), tokens, k1)
    b = generate(model, params, settings(config), tokens, k2)
    return jnp.stack([images, a, b], axis=1).reshape((-1,) + images.shape[1:])


def validate(config):
    model_cfg = dict(config.model)
    variant = VARIANTS[config.variant](**model_cfg)
    size = config.data.image_size
    if variant.image_size != size:
        raise ValueError(f"config key 'data.image_size' is {size}, but the {config.variant!r} generator "
                         f"makes {variant.image_size}px images (4 * 2**len(model.g_widths)); "
                         f"set data.image_size={variant.image_size} or change model.g_widths")
    if size // 2 ** len(variant.d_widths) < 1:
        raise ValueError(f"config key 'model.d_widths' has {len(variant.d_widths)} down-blocks, too many "
                         f"for {size}px images")
    loss = config.loss
    if not isinstance(loss.r1_every, int) or loss.r1_every < 1:
        raise ValueError(f"config key 'loss.r1_every' must be a positive integer, got {loss.r1_every!r}")
    if loss.r1_gamma < 0:
        raise ValueError(f"config key 'loss.r1_gamma' must be >= 0, got {loss.r1_gamma}")
    unknown = set(loss.augment) - set(aug.KINDS)
    if unknown:
        raise ValueError(f"config key 'loss.augment' has unknown augmentation(s) {sorted(unknown)}; "
                         f"known: {list(aug.KINDS)}")
    if not 0.0 < loss.ada_target < 1.0:
        raise ValueError(f"config key 'loss.ada_target' must be in (0, 1), got {loss.ada_target}")
    if not 0.0 <= loss.ada_p_init <= loss.ada_p_max <= 1.0:
        raise ValueError("config keys 'loss.ada_p_init' and 'loss.ada_p_max' need "
                         f"0 <= ada_p_init <= ada_p_max <= 1, got {loss.ada_p_init} and {loss.ada_p_max}")
    if loss.ada_speed < 0:
        raise ValueError(f"config key 'loss.ada_speed' must be >= 0, got {loss.ada_speed}")
    if not 0.0 <= loss.translation <= 0.5:
        raise ValueError(f"config key 'loss.translation' must be in [0, 0.5], got {loss.translation}")
    if config.optim_d.lr <= 0:
        raise ValueError(f"config key 'optim_d.lr' must be positive, got {config.optim_d.lr}")
    if config.optim_d.name != "adamw":
        raise ValueError(f"config key 'optim_d.name': unknown optimizer {config.optim_d.name!r}; known: ['adamw']")
    if not 0 <= config.sample.edit_source_layers < variant.num_layers:
        raise ValueError(f"config key 'sample.edit_source_layers' must be in [0, {variant.num_layers - 1}] "
                         f"(the generator has {variant.num_layers} layers), got {config.sample.edit_source_layers}")
    if config.sample.invert_steps < 0:
        raise ValueError(f"config key 'sample.invert_steps' must be >= 0, got {config.sample.invert_steps}")


FAMILY = Family(
    name="gan",
    variants=VARIANTS,
    init=init,
    objectives=objectives,
    evaluate=evaluate,
    best_metric=None,
    preview=preview,
    settings=settings,
    abilities={"generate": generate, "invert": invert, "reconstruct": reconstruct, "edit": edit,
               "synthesize": synthesize, "interpolate_prompts": interpolate_prompts,
               "encode_latent": encode_latent, "decode_latent": decode_latent},
    validate=validate,
)
