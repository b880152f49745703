"""Handles of the generative families: diffusion, VAE and GAN.

Each class's public methods are what its family can do (the README's methods-by-family table).
Options a method takes come with their defaults from the model's `config.sample`; an option
a method does not take is a TypeError, never ignored.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.handles.base import Model, _finite, _fraction, _positive_int, _seed
from mmjax.sampling.samplers import SAMPLERS


class AttentionMaps(NamedTuple):
    images: np.ndarray  # uint8 [num, H, W, 3]
    words: list  # the prompt's words, in order
    maps: np.ndarray  # float32 [num, len(words), H, W], each map summing to 1

    def grid(self, caption: str | None = None):
        """A PIL image: one row per sample, the image then each word's heat map, labelled."""
        from mmjax.handles.maps import attention_grid

        return attention_grid([self], [caption])


class Generator(Model):
    """What every text-to-image family shares: `generate` and the old `interpolate` name."""

    def _interpolate_deprecated(self, image_a=None, image_b=None, num=8, prompt_a=None, prompt_b=None, **kwargs):
        images = image_a is not None or image_b is not None
        new = "interpolate_images" if images else "interpolate_prompts"
        warnings.warn(f"`model.interpolate` is deprecated and will be removed in the next release; use "
                      f"`model.{new}(...)`", DeprecationWarning, stacklevel=3)
        if images:
            return self.interpolate_images(image_a, image_b, num=num, prompt_a=prompt_a, prompt_b=prompt_b,
                                           **kwargs)
        return self.interpolate_prompts(prompt_a, prompt_b, num=num, **kwargs)

    def interpolate(self, *args, **kwargs):
        """Deprecated: `interpolate_prompts` (between prompts and seeds) or `interpolate_images`."""
        return self._interpolate_deprecated(*args, **kwargs)

    def _ends(self, prompt_a, prompt_b):
        """One prompt given serves both ends."""
        pa = prompt_a if prompt_a is not None else prompt_b
        pb = prompt_b if prompt_b is not None else prompt_a
        return pa, pb


class DiffusionModel(Generator):
    """A text-to-image diffusion model (pixel space, or on a frozen VAE's latents)."""

    def _sampling(self, sampler=None, steps=None, eta=None, stochastic: bool = True) -> dict:
        """The sampler options, defaulted from `config.sample`; without `stochastic`, no eta."""
        sample = self.config.sample
        sampler = sample.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        steps = _positive_int(sample.steps if steps is None else steps, "steps")
        if not stochastic:
            return {"sampler": sampler, "steps": steps}
        eta = _finite(sample.eta if eta is None else eta, "eta")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        return {"sampler": sampler, "steps": steps, "eta": eta}

    def _guidance(self, guidance) -> jax.Array:
        """A traced argument (changing it never recompiles), defaulting to the config's."""
        return jnp.float32(_finite(self.config.sample.guidance if guidance is None else guidance, "guidance"))

    def _negative(self, negative_prompt, count: int):
        """The caption guidance steers away from, per image; None = the empty caption."""
        if negative_prompt is None:
            return None
        return self._prompts_for(negative_prompt, count, "negative prompts")

    def generate(self, prompts, num: int = 1, seed: int = 0, *, guidance: float | None = None,
                 negative_prompt=None, sampler: str | None = None, steps: int | None = None,
                 eta: float | None = None) -> np.ndarray:
        """`num` images for each prompt, prompt-major: `[len(prompts) * num, H, W, 3]` uint8.

        `guidance`: classifier-free scale (1 = conditional only); `negative_prompt`: the
        caption guidance steers away from (default the empty one); `sampler` ('ddpm', 'ddim',
        'dpmpp_2m', 'euler'), `steps`, `eta`: as in the config's `sample` section by default.
        """
        num = _positive_int(num, "num")
        tokens = jnp.repeat(self._tokens(prompts), num, axis=0)
        out = self._call("generate", tokens, jax.random.key(_seed(seed)), self._guidance(guidance),
                         self._negative(negative_prompt, len(tokens)), **self._sampling(sampler, steps, eta))
        return self._out(out)

    def img2img(self, images, prompts, strength: float = 0.6, seed: int = 0, *, guidance: float | None = None,
                negative_prompt=None, sampler: str | None = None, steps: int | None = None) -> np.ndarray:
        """SDEdit: re-noise the images to `strength` in (0, 1] and denoise toward `prompts`."""
        x = self._images(images)
        tokens = self._prompts_for(prompts, len(x))
        options = self._sampling(sampler, steps, stochastic=False)
        out = self._call("img2img", x, tokens, jax.random.key(_seed(seed)), self._guidance(guidance),
                         self._negative(negative_prompt, len(x)), strength=_fraction(strength, "strength"),
                         **options)
        return self._out(out)

    def inpaint(self, images, masks, prompts, seed: int = 0, *, guidance: float | None = None,
                negative_prompt=None, steps: int | None = None, resample: int = 4) -> np.ndarray:
        """Regenerate where `masks` (`[N, H, W]` or `[H, W]`, nonzero = regenerate) is set;
        the other pixels come back exactly as given. `resample`: RePaint's jumps back per step,
        which harmonise the new region with the kept one."""
        x = self._images(images)
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = np.broadcast_to(masks, (len(x),) + masks.shape)
        if masks.shape != x.shape[:3]:
            raise ValueError(f"masks must be [N, H, W] matching the images {tuple(x.shape[:3])}, "
                             f"got shape {masks.shape}")
        tokens = self._prompts_for(prompts, len(x))
        out = self._call("inpaint", x, jnp.asarray(masks != 0), tokens, jax.random.key(_seed(seed)),
                         self._guidance(guidance), self._negative(negative_prompt, len(x)),
                         steps=self._sampling(steps=steps)["steps"], resample=_positive_int(resample, "resample"))
        return self._out(out)

    def edit(self, images, source_prompts, target_prompts, *, strength: float = 0.8, steps: int | None = None,
             sampler: str = "ddim", eta: float = 0.0, seed: int = 0, guidance: float | None = None,
             negative_prompt=None) -> np.ndarray:
        """Prompt edit: DDIM-invert each image under its own caption up to `strength` of the
        noise schedule, then sample back under the target caption with `sampler`. What the
        two captions share (layout, position, size) survives the round trip. `seed` matters
        for stochastic samplers (ddpm, or eta > 0)."""
        x = self._images(images)
        source = self._prompts_for(source_prompts, len(x), "source prompts")
        target = self._prompts_for(target_prompts, len(x), "target prompts")
        out = self._call("edit", x, source, target, jax.random.key(_seed(seed)), self._guidance(guidance),
                         self._negative(negative_prompt, len(x)), strength=_fraction(strength, "strength"),
                         **self._sampling(sampler, steps, eta))
        return self._out(out)

    def interpolate_prompts(self, prompt_a: str | None = None, prompt_b: str | None = None, num: int = 8, *,
                            seed_a: int = 0, seed_b: int | None = None, guidance: float | None = None,
                            sampler: str | None = None, steps: int | None = None) -> np.ndarray:
        """`num` images from (prompt_a, seed_a) to (prompt_b, seed_b): the starting noise is
        slerped, the prompts blended. Same prompt at both ends: a walk between seeds; same
        seed: between prompts."""
        pa, pb = self._ends(prompt_a, prompt_b)
        if pa is None:
            raise ValueError("give prompt_a and/or prompt_b")
        seed_b = seed_a if seed_b is None else seed_b
        options = self._sampling(sampler, steps, stochastic=False)
        out = self._call("interpolate_prompts", self._tokens([pa])[0], self._tokens([pb])[0],
                         jax.random.key(_seed(seed_a, "seed_a")), jax.random.key(_seed(seed_b, "seed_b")),
                         self._guidance(guidance), num=_positive_int(num, "num"), **options)
        return self._out(out)


    def attention_maps(self, prompts, num: int = 1, seed: int = 0, *, guidance: float | None = None,
                       negative_prompt=None, sampler: str | None = None, steps: int | None = None,
                       eta: float | None = None):
        """`num` images of each prompt (as `generate` makes them: same seed, same bytes) and one
        heat map per word of the prompt: cross-attention averaged over heads, layers and
        noise levels, mapped from tokens back to words, each map summing to 1.

        -> `AttentionMaps(images, words, maps)` for one prompt (a string), a list of them for a
        list of prompts (computed in one batch)."""
        return self._attention_maps(prompts, num, seed, guidance, negative_prompt,
                                    self._sampling(sampler, steps, eta))

    def _attention_maps(self, prompts, num, seed, guidance, negative_prompt, options: dict):
        from mmjax.sampling import attention_maps as amaps

        single = isinstance(prompts, str)
        prompts = self._prompt_list(prompts)
        num = _positive_int(num, "num")
        spans = [self.tokenizer.word_spans(p) for p in prompts]
        for prompt, words in zip(prompts, spans):
            if not words:
                raise ValueError(f"the prompt {prompt!r} has no words to map")
        tokens = jnp.repeat(self._tokens(prompts), num, axis=0)
        images, maps = self._call("attention_maps", tokens, jax.random.key(_seed(seed)), self._guidance(guidance),
                                  self._negative(negative_prompt, len(tokens)), **options)
        images, maps = self._out(images), np.asarray(maps)
        results = []
        for i, words in enumerate(spans):
            rows = slice(i * num, (i + 1) * num)
            per_word = amaps.normalise(jnp.moveaxis(amaps.word_maps(maps[rows], words), -1, 1))  # [num, words, H, W]
            results.append(AttentionMaps(images[rows], [w for w, _, _ in words], np.asarray(per_word)))
        return results[0] if single else results


class FlowModel(DiffusionModel):
    """A text-to-image flow-matching model (DiT or UNet backbone, pixel space or latents).

    The diffusion model's methods, sampled by integrating the probability-flow ODE:
    `sampler` is 'euler' or 'heun' (two backbone calls a step), `shift` (> 0) moves the time
    grid toward high noise (1: evenly spaced). There is no eta: the sampler is deterministic."""

    def _sampling(self, sampler=None, steps=None, eta=None, stochastic: bool = True, shift=None) -> dict:
        from mmjax.sampling.flow import SOLVERS

        if eta is not None:
            raise TypeError("eta does not apply to flow matching: its ODE samplers are deterministic")
        sample = self.config.sample
        sampler = sample.sampler if sampler is None else sampler
        if sampler not in SOLVERS:
            raise ValueError(f"sampler must be one of {SOLVERS}, got {sampler!r}")
        shift = _finite(sample.shift if shift is None else shift, "shift")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        return {"sampler": sampler, "steps": _positive_int(sample.steps if steps is None else steps, "steps"),
                "shift": shift}

    def generate(self, prompts, num: int = 1, seed: int = 0, *, guidance: float | None = None,
                 negative_prompt=None, sampler: str | None = None, steps: int | None = None,
                 shift: float | None = None) -> np.ndarray:
        """`num` images for each prompt, prompt-major: `[len(prompts) * num, H, W, 3]` uint8.

        `guidance`: classifier-free scale (1 = conditional only); `negative_prompt`: the caption
        guidance steers away from (default the empty one); `sampler` ('euler', 'heun'), `steps`,
        `shift`: as in the config's `sample` section by default."""
        num = _positive_int(num, "num")
        tokens = jnp.repeat(self._tokens(prompts), num, axis=0)
        out = self._call("generate", tokens, jax.random.key(_seed(seed)), self._guidance(guidance),
                         self._negative(negative_prompt, len(tokens)), **self._sampling(sampler, steps, shift=shift))
        return self._out(out)

    def attention_maps(self, prompts, num: int = 1, seed: int = 0, *, guidance: float | None = None,
                       negative_prompt=None, sampler: str | None = None, steps: int | None = None,
                       shift: float | None = None):
        """As the diffusion model's: images as `generate` makes them and one heat map per word,
        from the attention of image tokens to caption tokens at several points of the path."""
        return self._attention_maps(prompts, num, seed, guidance, negative_prompt,
                                    self._sampling(sampler, steps, shift=shift))

    def inpaint(self, images, masks, prompts, seed: int = 0, *, guidance: float | None = None,
                negative_prompt=None, sampler: str | None = None, steps: int | None = None) -> np.ndarray:
        """Regenerate where `masks` (`[N, H, W]` or `[H, W]`, nonzero = regenerate) is set; the
        other pixels come back exactly as given. After every ODE step the kept part is put back
        on its own path, so the new region grows in harmony with it."""
        x = self._images(images)
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = np.broadcast_to(masks, (len(x),) + masks.shape)
        if masks.shape != x.shape[:3]:
            raise ValueError(f"masks must be [N, H, W] matching the images {tuple(x.shape[:3])}, "
                             f"got shape {masks.shape}")
        tokens = self._prompts_for(prompts, len(x))
        out = self._call("inpaint", x, jnp.asarray(masks != 0), tokens, jax.random.key(_seed(seed)),
                         self._guidance(guidance), self._negative(negative_prompt, len(x)),
                         **self._sampling(sampler, steps))
        return self._out(out)

    def edit(self, images, source_prompts, target_prompts, *, strength: float = 0.8, steps: int | None = None,
             sampler: str | None = None, seed: int = 0, guidance: float | None = None,
             negative_prompt=None) -> np.ndarray:
        """Prompt edit: integrate the ODE backwards from each image under its own caption up to
        t = `strength`, then forwards under the target caption. What the two captions share
        (layout, position, size) survives the round trip. Deterministic; `seed` is accepted
        for the diffusion model's signature."""
        x = self._images(images)
        source = self._prompts_for(source_prompts, len(x), "source prompts")
        target = self._prompts_for(target_prompts, len(x), "target prompts")
        out = self._call("edit", x, source, target, jax.random.key(_seed(seed)), self._guidance(guidance),
                         self._negative(negative_prompt, len(x)), strength=_fraction(strength, "strength"),
                         **self._sampling(sampler, steps))
        return self._out(out)


class VAEModel(Generator):
    """A (caption-conditioned) VAE: generate from a caption, reconstruct, encode and decode."""

    def _optional_tokens(self, prompts, count: int):
        return None if prompts is None else self._prompts_for(prompts, count)

    def generate(self, prompts, num: int = 1, seed: int = 0, *, temperature: float = 1.0) -> np.ndarray:
        """`num` samples of the caption's prior per prompt, prompt-major; `temperature`
        scales the prior's spread."""
        num = _positive_int(num, "num")
        tokens = jnp.repeat(self._tokens(prompts), num, axis=0)
        temperature = _finite(temperature, "temperature")
        return self._out(self._call("generate", tokens, jax.random.key(_seed(seed)), temperature=temperature))

    def reconstruct(self, images, prompts=None) -> np.ndarray:
        """Encode to the posterior mean and decode (deterministic)."""
        x = self._images(images)
        return self._out(self._call("reconstruct", x, self._optional_tokens(prompts, len(x))))

    def encode(self, images, prompts=None) -> np.ndarray:
        """Images -> their posterior-mean latents `[N, h, w, c]` float32."""
        x = self._images(images)
        return np.asarray(self._call("encode_latent", x, self._optional_tokens(prompts, len(x))))

    def decode(self, latents, prompts=None) -> np.ndarray:
        """Latents (from `encode`, or any mix of them) -> images."""
        z = jnp.asarray(latents, jnp.float32)
        return self._out(self._call("decode_latent", z, self._optional_tokens(prompts, len(z))))

    def interpolate_images(self, image_a, image_b, num: int = 8, *, prompt_a: str | None = None,
                           prompt_b: str | None = None) -> np.ndarray:
        """`num` images decoded along the straight line between two images' latents."""
        a, b = self._images(image_a, "image_a")[0], self._images(image_b, "image_b")[0]
        pa, pb = self._ends(prompt_a, prompt_b)
        ta = None if pa is None else self._tokens([pa])[0]
        tb = None if pb is None else self._tokens([pb])[0]
        return self._out(self._call("interpolate", a, b, ta, tb, num=_positive_int(num, "num")))

    def edit(self, images, source_prompts, target_prompts, *, clip, steps: int = 50, lr: float = 0.05,
             anchor: float = 0.1, condition: str = "target", return_history: bool = False, guidance=None):
        """CLIP-guided edit: start from each image's latent, decode under the target caption
        (or the source one, `condition='source'`, so that CLIP alone makes the change), and
        follow the gradient of the CLIP similarity to the target prompt, pulled back to the
        start by `anchor`. `clip`: a loaded CLIP model or its path."""
        from mmjax.handles.clip_edit import clip_edit

        return clip_edit(self, images, source_prompts, target_prompts, clip, steps=steps, lr=lr, anchor=anchor,
                         condition=condition, return_history=return_history, guidance=guidance)


class GANModel(Generator):
    """A text-conditioned GAN: generate, invert real images to latents, decode and edit them."""

    def generate(self, prompts, num: int = 1, seed: int = 0, *, truncation: float | None = None) -> np.ndarray:
        """`num` images per prompt, prompt-major; `truncation` t > 0 draws z from [-t, t]."""
        num = _positive_int(num, "num")
        tokens = jnp.repeat(self._tokens(prompts), num, axis=0)
        return self._out(self._call("generate", tokens, jax.random.key(_seed(seed)),
                                    truncation=self._truncation(truncation)))

    def _truncation(self, truncation):
        if truncation is None:
            return None
        truncation = _finite(truncation, "truncation")
        if truncation < 0:
            raise ValueError(f"truncation must be >= 0 (0 = off), got {truncation}")
        return truncation

    def _inversion(self, steps, lr, restarts, seed) -> dict:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        return {"steps": steps, "lr": None if lr is None else _finite(lr, "lr"),
                "restarts": _positive_int(restarts, "restarts"), "seed": _seed(seed)}

    def invert(self, images, prompts=None, *, steps: int | None = None, lr: float | None = None,
               plus: bool = True, restarts: int = 8, seed: int = 0):
        """The latents that regenerate `images`, found for all images at once.

        -> `({"z": [N, layers, z_dim], "text": [N, text_dim]}, reconstructions uint8)`.
        `prompts`: the images' captions (one for all, or one each); without them the text
        vector is optimised too. `steps`/`lr` default to the config's `sample.invert_*`;
        `plus=False` keeps one z for every layer instead of z+. The latents go back in
        through `decode` and `interpolate_latents`.
        """
        x = self._images(images)
        tokens = None if prompts is None else self._prompts_for(prompts, len(x))
        z, text, recon = jax.device_get(self._call("invert", x, tokens, plus=bool(plus),
                                                   **self._inversion(steps, lr, restarts, seed)))
        return {"z": np.asarray(z), "text": np.asarray(text)}, self._out(recon)

    def encode(self, images, prompts=None, **options) -> dict:
        """Images -> latents by inversion (`invert` without the reconstructions)."""
        return self.invert(images, prompts, **options)[0]

    def decode(self, latents: dict) -> np.ndarray:
        """Latents from `invert`/`encode` (`{"z", "text"}`, or any mix of them) -> images."""
        z, text = self._latents(latents)
        return self._out(self._call("synthesize", z, text))

    def _latents(self, latents, what: str = "latents"):
        if not isinstance(latents, dict) or set(latents) != {"z", "text"}:
            raise ValueError(f"{what} must be the dict {{'z', 'text'}} that invert/encode return")
        z, text = jnp.asarray(latents["z"], jnp.float32), jnp.asarray(latents["text"], jnp.float32)
        if z.ndim == 2:
            z = z[None]
        if text.ndim == 1:
            text = text[None]
        if z.shape[0] != text.shape[0]:
            raise ValueError(f"{what}: z holds {z.shape[0]} latents but text {text.shape[0]}")
        return z, text

    def reconstruct(self, images, prompts=None, **options) -> np.ndarray:
        """Inversion's reconstructions."""
        return self.invert(images, prompts, **options)[1]

    def interpolate_latents(self, latents_a: dict, latents_b: dict, num: int = 8) -> np.ndarray:
        """`num` images on the straight path between two (single) inverted latents."""
        za, ta = self._latents(latents_a, "latents_a")
        zb, tb = self._latents(latents_b, "latents_b")
        w = jnp.linspace(0.0, 1.0, _positive_int(num, "num"))
        z = (1 - w)[:, None, None] * za[:1] + w[:, None, None] * zb[:1]
        text = (1 - w)[:, None] * ta[:1] + w[:, None] * tb[:1]
        return self._out(self._call("synthesize", z, text))

    def interpolate_images(self, image_a, image_b, num: int = 8, *, prompt_a: str | None = None,
                           prompt_b: str | None = None, **options) -> np.ndarray:
        """Inverts both images, then walks between their latents."""
        pa, pb = self._ends(prompt_a, prompt_b)
        a = self.encode(self._images(image_a, "image_a")[:1], pa, **options)
        b = self.encode(self._images(image_b, "image_b")[:1], pb, **options)
        return self.interpolate_latents(a, b, num)

    def interpolate_prompts(self, prompt_a: str | None = None, prompt_b: str | None = None, num: int = 8, *,
                            seed_a: int = 0, seed_b: int | None = None,
                            truncation: float | None = None) -> np.ndarray:
        """`num` images from (prompt_a, seed_a) to (prompt_b, seed_b): z slerped, the caption
        vectors blended."""
        pa, pb = self._ends(prompt_a, prompt_b)
        if pa is None:
            raise ValueError("give prompt_a and/or prompt_b")
        seed_b = seed_a if seed_b is None else seed_b
        out = self._call("interpolate_prompts", self._tokens([pa])[0], self._tokens([pb])[0],
                         jax.random.key(_seed(seed_a, "seed_a")), jax.random.key(_seed(seed_b, "seed_b")),
                         num=_positive_int(num, "num"), truncation=self._truncation(truncation))
        return self._out(out)

    def edit(self, images, source_prompts, target_prompts, *, steps: int | None = None, lr: float | None = None,
             restarts: int = 8, seed: int = 0, source_layers: int | None = None, clip=None, guidance=None,
             **clip_options):
        """Inverts each image under its caption, then regenerates its latent under the target
        caption (the coarse `source_layers` keep the source caption). With `clip=` (a CLIP
        model or path) the edit is CLIP-guided instead, as for the VAE (options `steps`, `lr`,
        `anchor`, `condition`)."""
        if clip is not None or guidance is not None:
            from mmjax.handles.clip_edit import clip_edit

            options = {k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}
            return clip_edit(self, images, source_prompts, target_prompts, clip, guidance=guidance, **options,
                             **clip_options)
        if clip_options:
            raise TypeError(f"edit() got unexpected options {sorted(clip_options)} (they need clip=)")
        x = self._images(images)
        source = self._prompts_for(source_prompts, len(x), "source prompts")
        target = self._prompts_for(target_prompts, len(x), "target prompts")
        out = self._call("edit", x, source, target, source_layers=source_layers,
                         **self._inversion(steps, lr, restarts, seed))
        return self._out(out)
