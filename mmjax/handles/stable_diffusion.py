"""The handle of a Stable Diffusion checkpoint: what `mmjax.load("path/to/sd-folder")` returns.

Same calling conventions as the zoo's diffusion handle (uint8 images in and out, one prompt or
one per image, `seed`, `guidance`, `negative_prompt`, `sampler`, `steps`), plus `height` and
`width` (any multiples of the VAE's factor, 8 for SD) and `latents` (your own starting noise,
`[N, h, w, 4]`, as diffusers' `latents=` takes it). Samplers: 'ddim', 'euler', 'dpmpp_2m',
'ddpm', each walking the timesteps the checkpoint's scheduler config prescribes.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import sharding
from mmjax.families import stable_diffusion as sd
from mmjax.handles.base import Model, _finite, _fraction, _positive_int, _seed
from mmjax.images import to_float, to_uint8

SAMPLERS = ("ddim", "euler", "dpmpp_2m", "ddpm")


class StableDiffusion(Model):
    """A diffusers-format SD 1.x / 2.x pipeline: `unet`, `vae`, `text_encoder` params in
    `params`; the modules, tokenizer and scheduler spec beside them."""

    def __init__(self, pipeline, compute_dtype=None):
        self.pipeline = pipeline
        self.path = pipeline.path
        self.step = 0
        self.tokenizer = pipeline.tokenizer
        self.scheduler = pipeline.scheduler
        self.config = ml_collections.ConfigDict({
            "family": "stable_diffusion", "variant": pipeline.index.get("_class_name"),
            "sample": {"sampler": "ddim", "steps": 50, "guidance": 7.5}})
        dtype = {} if compute_dtype is None else {"dtype": jnp.dtype(compute_dtype)}
        self.modules = sd.SDModules(pipeline.unet.module.clone(**dtype), pipeline.vae.module.clone(**dtype),
                                    pipeline.text_encoder.module.clone(**dtype), pipeline.scheduler.prediction,
                                    pipeline.scheduler.clip_sample)
        params = {"unet": pipeline.unet.params, "vae": pipeline.vae.params,
                  "text_encoder": pipeline.text_encoder.params}
        self.params = jax.device_put(params, sharding.replicated(sharding.make_mesh()))
        self._compiled = {}

    def __repr__(self):
        return f"StableDiffusion(variant={self.config.variant!r}, prediction={self.scheduler.prediction!r}, path={self.path!r})"

    @property
    def factor(self) -> int:
        return self.modules.vae.downsample_factor

    @property
    def image_size(self) -> int:
        """The size the UNet was trained at (its config's sample_size, in pixels)."""
        return int(self.pipeline.unet.config.get("sample_size", 64)) * self.factor

    # -- compiled calls ------------------------------------------------------------------------------

    def _run(self, name: str, *args, **static):
        key = (name, tuple(sorted(static.items())))
        if key not in self._compiled:
            fn, modules = getattr(sd, name), self.modules
            self._compiled[key] = jax.jit(lambda params, *a: fn(modules, params, *a, **static))
        return self._compiled[key](self.params, *args)

    # -- inputs --------------------------------------------------------------------------------------

    def _size(self, height, width) -> tuple[int, int]:
        height = self.image_size if height is None else _positive_int(height, "height")
        width = self.image_size if width is None else _positive_int(width, "width")
        if height % self.factor or width % self.factor:
            raise ValueError(f"height and width must be multiples of {self.factor} (the VAE's factor), "
                             f"got {height}x{width}")
        return height, width

    def _options(self, sampler, steps, guidance):
        sampler = self.config.sample.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        steps = _positive_int(self.config.sample.steps if steps is None else steps, "steps")
        guidance = jnp.float32(_finite(self.config.sample.guidance if guidance is None else guidance, "guidance"))
        return sampler, steps, guidance

    def _uncond(self, negative_prompt, count: int):
        return self._prompts_for("" if negative_prompt is None else negative_prompt, count, "negative prompts")

    def _noise(self, latents, shape, seed, scale: float):
        if latents is None:
            noise = jax.random.normal(jax.random.key(_seed(seed)), shape, jnp.float32)
        else:
            noise = np.asarray(latents, np.float32)
            if noise.shape != shape:
                raise ValueError(f"latents must have shape {shape} (N, height/{self.factor}, width/{self.factor}, "
                                 f"channels), got {noise.shape}")
            noise = jnp.asarray(noise)
        return noise * scale

    @staticmethod
    def _steps_key(seed) -> jax.Array:
        """The key of a stochastic sampler's (ddpm's) per-step noise: the seed's, apart from the
        starting noise's."""
        return jax.random.fold_in(jax.random.key(_seed(seed)), 1)

    def _sd_images(self, images, what: str = "images") -> jax.Array:
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3 or not len(x):
            raise ValueError(f"{what} must be [N, H, W, 3] (or one [H, W, 3]), got shape {np.asarray(images).shape}")
        self._size(x.shape[1], x.shape[2])
        return jnp.asarray(to_float(x))

    def _path(self, sampler, steps, strength=1.0):
        return tuple(jnp.asarray(a) for a in self.scheduler.path(sampler, steps, strength))

    def export_diffusers(self, out_dir: str) -> str:
        """Writes these parameters as a diffusers folder at `out_dir` (new): the same tensor
        names, shapes and dtypes as the folder they came from, so unchanged weights come back
        byte for byte and fine-tuned ones load in diffusers."""
        from mmjax.interop import diffusers_export

        if "_single_file" in self.pipeline.index:
            raise NotImplementedError(f"{self.path}: exporting a single-file load is not built yet; load the "
                                      "diffusers folder of the same model to export")
        components = {}
        for name in ("unet", "vae", "text_encoder"):
            part = getattr(self.pipeline, name)
            layout, metadata = diffusers_export.layout_of(part.files["weights"])
            tensors = diffusers_export.tensors_from_params(part.convert, self.params[name], layout,
                                                           f"{self.path}/{name}")
            components[name] = (os.path.basename(part.files["weights"]), tensors, metadata)
        return diffusers_export.write_folder(out_dir, self.path, components)

    # -- what it can do ------------------------------------------------------------------------------

    def sample_latents(self, prompts, num: int = 1, seed: int = 0, *, guidance: float | None = None,
                       negative_prompt=None, sampler: str | None = None, steps: int | None = None,
                       height: int | None = None, width: int | None = None, latents=None) -> np.ndarray:
        """The final scaled latents `[len(prompts) * num, height/8, width/8, 4]` float32 of a
        text-to-image run (what `generate` decodes)."""
        sampler, steps, guidance = self._options(sampler, steps, guidance)
        height, width = self._size(height, width)
        tokens = jnp.repeat(self._tokens(prompts), _positive_int(num, "num"), axis=0)
        shape = (len(tokens), height // self.factor, width // self.factor, self.modules.vae.latent_channels)
        noise = self._noise(latents, shape, seed, self.scheduler.noise_scale(sampler, steps))
        out = self._run("generate", tokens, self._uncond(negative_prompt, len(tokens)), noise,
                        self._path(sampler, steps), guidance, self._steps_key(seed), sampler=sampler)
        return np.asarray(jax.device_get(out))

    def decode(self, latents) -> np.ndarray:
        """Scaled latents -> uint8 images."""
        return to_uint8(jax.device_get(self._run("decode", jnp.asarray(latents, jnp.float32))))

    def encode(self, images) -> np.ndarray:
        """uint8 images -> scaled latents (the VAE posterior's mean)."""
        return np.asarray(jax.device_get(self._run("encode", self._sd_images(images))))

    def generate(self, prompts, num: int = 1, seed: int = 0, *, guidance: float | None = None,
                 negative_prompt=None, sampler: str | None = None, steps: int | None = None,
                 height: int | None = None, width: int | None = None, latents=None) -> np.ndarray:
        """`num` images per prompt, prompt-major: `[len(prompts) * num, height, width, 3]` uint8.
        Defaults: DDIM, 50 steps, guidance 7.5, the UNet's own resolution."""
        return self.decode(self.sample_latents(prompts, num, seed, guidance=guidance, negative_prompt=negative_prompt,
                                               sampler=sampler, steps=steps, height=height, width=width,
                                               latents=latents))

    def attention_maps(self, prompts, num: int = 1, seed: int = 0, *, guidance: float | None = None,
                       negative_prompt=None, sampler: str | None = None, steps: int | None = None,
                       height: int | None = None, width: int | None = None):
        """Images as `generate` makes them (same seed, same images) and a heat map per word of
        each prompt (its BPE tokens' cross-attention, summed): an `AttentionMaps` (images,
        words, maps `[num, words, H, W]`), or a list of them for a list of prompts."""
        import jax.numpy as jnp

        from mmjax.handles.generators import AttentionMaps
        from mmjax.sampling import attention_maps as amaps

        single = isinstance(prompts, str)
        prompts = self._prompt_list(prompts)
        spans = [self.tokenizer.word_spans(p) for p in prompts]
        for prompt, words in zip(prompts, spans):
            if not words:
                raise ValueError(f"the prompt {prompt!r} has no words to map")
        num = _positive_int(num, "num")
        sampler, steps, guidance = self._options(sampler, steps, guidance)
        height, width = self._size(height, width)
        tokens = jnp.repeat(self._tokens(prompts), num, axis=0)
        shape = (len(tokens), height // self.factor, width // self.factor, self.modules.vae.latent_channels)
        noise = self._noise(None, shape, seed, self.scheduler.noise_scale(sampler, steps))
        latents, maps = self._run("attention_maps", tokens, self._uncond(negative_prompt, len(tokens)), noise,
                                  self._path(sampler, steps), guidance, jnp.asarray(self.scheduler.alphas_cumprod),
                                  self._steps_key(seed), sampler=sampler, size=(height, width))
        images, maps = self.decode(latents), np.asarray(maps)
        results = []
        for i, words in enumerate(spans):
            rows = slice(i * num, (i + 1) * num)
            per_word = amaps.normalise(jnp.moveaxis(amaps.word_maps(maps[rows], words), -1, 1))
            results.append(AttentionMaps(images[rows], [w for w, _, _ in words], np.asarray(per_word)))
        return results[0] if single else results

    def img2img(self, images, prompts, strength: float = 0.6, seed: int = 0, *, guidance: float | None = None,
                negative_prompt=None, sampler: str | None = None, steps: int | None = None) -> np.ndarray:
        """SDEdit as diffusers does it: the last `strength` of the `steps` timesteps, from the
        image's latents noised to the first of them."""
        x = self._sd_images(images)
        sampler, steps, guidance = self._options(sampler, steps, guidance)
        tokens = self._prompts_for(prompts, len(x))
        shape = (len(x), x.shape[1] // self.factor, x.shape[2] // self.factor, self.modules.vae.latent_channels)
        noise = self._noise(None, shape, seed, 1.0)
        out = self._run("img2img", x, tokens, self._uncond(negative_prompt, len(x)), noise,
                        self._path(sampler, steps, _fraction(strength, "strength")), guidance, self._steps_key(seed),
                        sampler=sampler)
        return self.decode(out)

    def inpaint(self, images, masks, prompts, seed: int = 0, *, guidance: float | None = None,
                negative_prompt=None, sampler: str | None = None, steps: int | None = None) -> np.ndarray:
        """Regenerates where `masks` (`[N, H, W]` or `[H, W]`, nonzero = regenerate) is set;
        the other pixels come back exactly as given. A latent cell is regenerated when any of
        its pixels is masked. Ordinary checkpoints blend latents; inpainting ones (9 input
        channels) read the mask."""
        x = self._sd_images(images)
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = np.broadcast_to(masks, (len(x),) + masks.shape)
        if masks.shape != x.shape[:3]:
            raise ValueError(f"masks must be [N, H, W] matching the images {tuple(x.shape[:3])}, got shape {masks.shape}")
        pixel = masks != 0
        f = self.factor
        cells = pixel.reshape(len(x), x.shape[1] // f, f, x.shape[2] // f, f).any(axis=(2, 4))
        sampler, steps, guidance = self._options(sampler, steps, guidance)
        tokens = self._prompts_for(prompts, len(x))
        shape = cells.shape + (self.modules.vae.latent_channels,)
        noise = self._noise(None, shape, seed, self.scheduler.noise_scale(sampler, steps))
        out = self._run("inpaint", x, jnp.asarray(cells[..., None], jnp.float32), tokens,
                        self._uncond(negative_prompt, len(x)), noise, self._path(sampler, steps), guidance,
                        self._steps_key(seed), sampler=sampler)
        return np.where(pixel[..., None], self.decode(out), to_uint8(np.asarray(x)))

    def edit(self, images, source_prompts, target_prompts, *, strength: float = 0.8, steps: int | None = None,
             guidance: float | None = None, negative_prompt=None) -> np.ndarray:
        """Prompt edit: DDIM inversion of each image under its source caption up to `strength`
        of the schedule, then guided DDIM back down under the target caption."""
        x = self._sd_images(images)
        _, steps, guidance = self._options("ddim", steps, guidance)
        source = self._prompts_for(source_prompts, len(x), "source prompts")
        target = self._prompts_for(target_prompts, len(x), "target prompts")
        out = self._run("edit", x, source, target, self._uncond(negative_prompt, len(x)),
                        self._path("ddim", steps, _fraction(strength, "strength")), guidance, sampler="ddim")
        return self.decode(out)
