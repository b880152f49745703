"""The notebook face: `model = mmjax.load(workdir)`, then `model.generate(prompts)` and friends.

`load` restores the EMA weights of the latest good checkpoint onto whatever devices are
present (a run trained on eight GPUs loads on one CPU), without writing anything to the
workdir. Every method takes and returns uint8 images `[N, H, W, 3]`; the same seed gives the
same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from mmjax import sharding, zoo
from mmjax.checkpoint import Checkpointer
from mmjax.data.tokenizer import ByteTokenizer
from mmjax.images import make_grid, to_float, to_uint8
from mmjax.train.state import create_state, make_optimizers


class LoadedModel:
    """A trained model with its config; methods exist where the family has the ability."""

    def __init__(self, config, module, params, step: int, workdir: str):
        self.config = config
        self.family = zoo.FAMILIES[config.family]
        self.module = module
        self.params = params
        self.step = step
        self.workdir = workdir
        self.tokenizer = ByteTokenizer(config.data.max_len)
        self._compiled: dict[str, object] = {}

    def __repr__(self):
        return (f"LoadedModel(family={self.config.family!r}, variant={self.config.variant!r}, "
                f"step={self.step}, workdir={self.workdir!r})")

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def abilities(self) -> list[str]:
        return sorted(self.family.abilities)

    def _ability(self, name: str, **static):
        if name not in self.family.abilities:
            raise NotImplementedError(
                f"the {self.config.family!r} family cannot {name}; it can: {self.abilities}")
        params = inspect.signature(self.family.abilities[name]).parameters
        unknown = [k for k in static if k not in params]
        if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            known = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
            raise ValueError(f"the {self.config.family!r} family's {name} takes no option(s) {unknown}; "
                             f"its options: {known}")
        key = (name, tuple(sorted(static.items())))
        if key not in self._compiled:
            fn = functools.partial(self.family.abilities[name], self.module)
            # Positional and keyword array arguments are traced (new values do not recompile);
            # `static` options (sampler, steps, ...) are baked in, one program per setting.
            self._compiled[key] = jax.jit(
                lambda params, *args, **kwargs: fn(params, self.config, *args, **kwargs, **static))
        return self._compiled[key]

    def _tokens(self, prompts: Sequence[str]) -> jax.Array:
        if isinstance(prompts, str):
            prompts = [prompts]
        return jnp.asarray(self.tokenizer.encode(list(prompts)))

    def _images(self, images) -> jax.Array:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"this model works on {self.image_size}x{self.image_size} images, "
                             f"got {images.shape[1]}x{images.shape[2]}")
        return jnp.asarray(to_float(images))

    def _prompts_for(self, prompts, count: int, what: str = "prompts") -> jax.Array:
        """One caption per image: a single prompt serves every image."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1:
            prompts = prompts * count
        if len(prompts) != count:
            raise ValueError(f"got {len(prompts)} {what} for {count} images; give one, or one per image")
        return self._tokens(prompts)

    def generate(self, prompts: Sequence[str] | str, num: int = 1, seed: int = 0, *,
                 guidance: float | None = None, negative_prompt: str | None = None, **options) -> np.ndarray:
        """`num` images for each prompt, prompt-major: [len(prompts) * num, H, W, 3] uint8.

        Diffusion: `guidance` (classifier-free scale; 1 = conditional only), `negative_prompt`
        (the caption guidance steers away from; default the empty one) and static options
        `sampler` ('ddpm', 'ddim', 'dpmpp_2m', 'euler'), `steps`, `eta`. VAE: `temperature`.
        """
        tokens = jnp.repeat(self._tokens(prompts), num, axis=0)
        dynamic = self._guidance(guidance, "generate")
        if negative_prompt is not None:
            dynamic["uncond_tokens"] = self._prompts_for(negative_prompt, len(tokens), "negative prompts")
        fn = self._ability("generate", **options)
        return to_uint8(jax.device_get(fn(self.params, tokens, jax.random.key(seed), **dynamic)))

    def img2img(self, images, prompts, strength: float = 0.6, seed: int = 0, *,
                guidance: float | None = None, **options) -> np.ndarray:
        """SDEdit: re-noise the images to `strength` in (0, 1] and denoise toward `prompts`."""
        x = self._images(images)
        tokens = self._prompts_for(prompts, len(x))
        fn = self._ability("img2img", strength=float(strength), **options)
        out = fn(self.params, x, tokens, jax.random.key(seed), **self._guidance(guidance, "img2img"))
        return to_uint8(jax.device_get(out))

    def inpaint(self, images, masks, prompts, seed: int = 0, *, guidance: float | None = None,
                **options) -> np.ndarray:
        """Regenerate where `masks` ([N, H, W] or [H, W], nonzero = regenerate) is set."""
        x = self._images(images)
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = np.broadcast_to(masks, (len(x),) + masks.shape)
        if masks.shape != x.shape[:3]:
            raise ValueError(f"masks must be [N, H, W] matching the images {tuple(x.shape[:3])}, got {masks.shape}")
        tokens = self._prompts_for(prompts, len(x))
        fn = self._ability("inpaint", **options)
        return to_uint8(jax.device_get(fn(self.params, x, jnp.asarray(masks != 0), tokens, jax.random.key(seed),
                                          **self._guidance(guidance, "inpaint"))))

    def edit(self, images, source_prompts, target_prompts, *, guidance: float | str | None = None,
             clip=None, **options) -> np.ndarray:
        """Prompt edit: invert each image under its caption, regenerate under the target one.

        `guidance="clip"` edits by CLIP guidance instead (VAE; GAN when it lands): start from
        each image's latent, decode under the target caption, and follow the gradient of the
        CLIP similarity to the target prompt. `clip` is a loaded CLIP model or its workdir;
        options `steps` (default 50), `lr` (0.05), `anchor` (0.1, the pull back to the start),
        `condition` ('target', or 'source' to decode under the source caption so that the
        CLIP gradient alone makes the change).
        """
        if isinstance(guidance, str):
            if guidance != "clip":
                raise ValueError(f"guidance must be a number or 'clip', got {guidance!r}")
            return self._clip_edit(images, source_prompts, target_prompts, clip, **options)
        x = self._images(images)
        source = self._prompts_for(source_prompts, len(x), "source prompts")
        target = self._prompts_for(target_prompts, len(x), "target prompts")
        fn = self._ability("edit", **options)
        return to_uint8(jax.device_get(fn(self.params, x, source, target, **self._guidance(guidance, "edit"))))

    def _clip_edit(self, images, source_prompts, target_prompts, clip, *, steps: int = 50, lr: float = 0.05,
                   anchor: float = 0.1, condition: str = "target", return_history: bool = False):
        from mmjax.editing.clip_guidance import clip_guided_latents

        if not {"encode_latent", "decode_latent"} <= set(self.family.abilities):
            raise NotImplementedError(f"CLIP guidance needs a differentiable decoder from a latent; the "
                                      f"{self.config.family!r} family has none (it can: {self.abilities})")
        if clip is None:
            raise ValueError("guidance='clip' needs clip=<a CLIP workdir or loaded CLIP model>")
        if condition not in ("target", "source"):
            raise ValueError(f"condition must be 'target' or 'source', got {condition!r}")
        clip = load(clip) if isinstance(clip, str) else clip
        if "embed_images" not in clip.abilities:
            raise ValueError(f"clip= holds a {clip.config.family!r} model, not a CLIP model")
        if clip.image_size != self.image_size:
            raise ValueError(f"the CLIP model sees {clip.image_size}px images, this model makes {self.image_size}px")
        x = self._images(images)
        source = self._prompts_for(source_prompts, len(x), "source prompts")
        target = self._prompts_for(target_prompts, len(x), "target prompts")
        prompts = [target_prompts] * len(x) if isinstance(target_prompts, str) else list(target_prompts)
        clip_target = clip._prompts_for(prompts, len(x), "target prompts")
        # The CLIP model itself in the key (not its id): the cache holds it, so no later object
        # can reuse the id and pick up a program closed over another model.
        key = ("clip_edit", int(steps), float(lr), float(anchor), condition, clip)
        if key not in self._compiled:
            abilities, clip_abilities = self.family.abilities, clip.family.abilities

            def run(params, clip_params, x, source, target, clip_target):
                z0 = abilities["encode_latent"](self.module, params, self.config, x, source)
                target_emb = clip_abilities["embed_texts"](clip.module, clip_params, clip.config, clip_target)
                cond = target if condition == "target" else source
                decode = lambda z: abilities["decode_latent"](self.module, params, self.config, z, cond)  # noqa: E731
                embed = lambda img: clip_abilities["embed_images"](clip.module, clip_params, clip.config, img)  # noqa: E731
                z, history = clip_guided_latents(decode, embed, z0, target_emb, steps=steps, lr=lr, anchor=anchor)
                final = jnp.sum(embed(decode(z)) * target_emb, axis=-1)
                return decode(z), jnp.concatenate([history, final[None]])

            self._compiled[key] = jax.jit(run)
        out, history = self._compiled[key](self.params, clip.params, x, source, target, clip_target)
        images = to_uint8(jax.device_get(out))
        return (images, np.asarray(history)) if return_history else images

    def _guidance(self, guidance, ability: str) -> dict:
        """The guidance scale as a traced argument (always passed, so that changing it never
        recompiles), defaulting to the config's; {} for abilities without guidance."""
        fn = self.family.abilities.get(ability)
        if fn is None or "guidance" not in inspect.signature(fn).parameters:
            if guidance is not None:
                raise ValueError(f"the {self.config.family!r} family's {ability} takes no guidance")
            return {}
        return {"guidance": jnp.float32(self.config.sample.guidance if guidance is None else guidance)}

    def invert(self, images, prompts: Sequence[str] | str | None = None, *, steps: int | None = None,
               lr: float | None = None, plus: bool = True, restarts: int = 8, seed: int = 0):
        """GAN inversion: the latents that regenerate `images`, found for all images at once.

        -> `({"z": [N, layers, z_dim], "text": [N, text_dim]}, reconstructions uint8)`.
        `prompts`: the images' captions (one for all, or one each); without them the text
        vector is optimised too. `steps`/`lr` default to the config's `sample.invert_*`;
        `plus=False` keeps one z for every layer instead of z+.
        """
        x = self._images(images)
        tokens = None if prompts is None else self._prompts_for(prompts, len(x))
        fn = self._ability("invert", steps=steps, lr=lr, plus=bool(plus), restarts=int(restarts), seed=int(seed))
        z, text, recon = jax.device_get(fn(self.params, x, tokens))
        return {"z": np.asarray(z), "text": np.asarray(text)}, to_uint8(recon)

    def reconstruct(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
        tokens = None if prompts is None else self._tokens(prompts)
        return to_uint8(jax.device_get(self._ability("reconstruct")(self.params, self._images(images), tokens)))

    def interpolate(self, image_a=None, image_b=None, num: int = 8, prompt_a: str | None = None,
                    prompt_b: str | None = None, *, seed_a: int = 0, seed_b: int | None = None,
                    **options) -> np.ndarray:
        """`num` images on a path between two ends.

        Autoencoders: between two images (`image_a`, `image_b`; prompts optional). Diffusion:
        between (prompt_a, seed_a) and (prompt_b, seed_b); the same prompt at both ends walks
        between seeds (slerp of the starting noise), the same seed between prompts.
        """
        if "interpolate_noise" in self.family.abilities:
            if image_a is not None or image_b is not None:
                raise ValueError(f"the {self.config.family!r} family interpolates between prompts and "
                                 "seeds, not images: pass prompt_a/prompt_b and seed_a/seed_b")
            pa = prompt_a if prompt_a is not None else prompt_b
            pb = prompt_b if prompt_b is not None else prompt_a
            if pa is None:
                raise ValueError("give prompt_a and/or prompt_b")
            seed_b = seed_a if seed_b is None else seed_b
            fn = self._ability("interpolate_noise", num=num, **options)
            out = fn(self.params, self._tokens([pa])[0], self._tokens([pb])[0], jax.random.key(seed_a),
                     jax.random.key(seed_b))
            return to_uint8(jax.device_get(out))
        if image_a is None or image_b is None:
            raise ValueError("give image_a and image_b")
        a, b = self._images(image_a)[0], self._images(image_b)[0]
        # One prompt given serves both ends.
        pa = prompt_a if prompt_a is not None else prompt_b
        pb = prompt_b if prompt_b is not None else prompt_a
        ta = None if pa is None else self._tokens([pa])[0]
        tb = None if pb is None else self._tokens([pb])[0]
        fn = self._ability("interpolate", num=num)
        return to_uint8(jax.device_get(fn(self.params, a, b, ta, tb)))

    def classify(self, images) -> dict[str, np.ndarray]:
        """Predicted label ids per attribute head."""
        logits, _ = self._ability("classify")(self.params, self._images(images))
        return {k: np.asarray(jnp.argmax(v, -1)) for k, v in logits.items()}

    def features(self, images) -> np.ndarray:
        """The classifier's penultimate features (for Fréchet distances in judge space)."""
        _, features = self._ability("classify")(self.params, self._images(images))
        return np.asarray(features)

    # CLIP -------------------------------------------------------------------------------------

    def embed_images(self, images, batch_size: int = 256) -> np.ndarray:
        """Unit-norm image embeddings `[N, D]` float32."""
        images = self._images(images)
        fn = self._ability("embed_images")
        return np.concatenate([np.asarray(fn(self.params, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    def embed_texts(self, prompts: Sequence[str] | str, batch_size: int = 256) -> np.ndarray:
        """Unit-norm caption embeddings `[N, D]` float32."""
        tokens = self._tokens(prompts)
        fn = self._ability("embed_texts")
        return np.concatenate([np.asarray(fn(self.params, tokens[i:i + batch_size]))
                               for i in range(0, len(tokens), batch_size)])

    def similarity(self, images, prompts: Sequence[str] | str) -> np.ndarray:
        """Cosine similarity `[num_images, num_prompts]`."""
        return self.embed_images(images) @ self.embed_texts(prompts).T

    def zero_shot(self, images, classes: dict[str, Sequence[str]] | str) -> list[str]:
        """The best-matching class per image. `classes` maps each class name to its prompts
        (their mean embedding stands for the class), or names a `shapes` attribute ('color',
        'shape', 'size', 'position') whose prompt ensembles are built in."""
        if "zero_shot" not in self.family.abilities:
            raise NotImplementedError(f"the {self.config.family!r} family cannot zero_shot; it can: {self.abilities}")
        if isinstance(classes, str):
            from mmjax.data import shapes

            classes = dict(zip(shapes.ATTRIBUTES[classes], shapes.attribute_prompts(classes)))
        if not classes or any(isinstance(p, str) or not p for p in classes.values()):
            raise ValueError("classes must map each class name to a non-empty list of prompts")
        names = list(classes)
        tokens = self._tokens([p for name in names for p in classes[name]])
        fn = self._ability("zero_shot", counts=tuple(len(classes[name]) for name in names))
        images = self._images(images)
        scores = np.concatenate([np.asarray(fn(self.params, images[i:i + 256], tokens))
                                 for i in range(0, len(images), 256)])
        return [names[i] for i in np.argmax(scores, axis=1)]


def grid(images, ncols: int | None = None, captions=None):
    """uint8 images -> one PIL image (captions under each cell when given)."""
    return make_grid(np.asarray(images), ncols=ncols, captions=captions)


EXPORT_PARAMS = "ema_params.msgpack"
EXPORT_MANIFEST = "manifest.json"


def _abstract_params(config):
    family = zoo.FAMILIES.get(config.family)
    if family is None:
        raise ValueError(f"checkpoint is of unknown family {config.family!r}")
    module = zoo.build_model(config)
    objectives = family.objectives(module, config)
    optimizers, _ = make_optimizers(objectives, config)
    abstract = jax.eval_shape(functools.partial(create_state, family, module, config, optimizers, objectives))
    return family, module, abstract


def export(workdir: str, out_dir: str, step: int | None = None, dtype: str | None = None) -> str:
    """Writes the EMA weights and config of `workdir` (a few MB, no optimizer state) to
    `out_dir`, which `load` reads like a workdir. Written to a temporary directory and renamed
    into place, so `out_dir` is never half-written; an existing `out_dir` is refused.

    `dtype` ('float16' or 'bfloat16') stores floating weights at half the size; `load` casts
    them back to float32. Measure the exported model: rounding can change samples.
    """
    if os.path.exists(out_dir):
        raise FileExistsError(f"refusing to overwrite {out_dir!r}; remove it first")
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise ValueError(f"export dtype must be float32, float16 or bfloat16, got {dtype!r}")
    model = load(workdir, step=step)
    params = jax.device_get(model.params)
    if dtype not in (None, "float32"):
        params = jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, params)
    data = serialization.to_bytes(params)
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        f.write(model.config.to_json(indent=2))
    with open(os.path.join(tmp, EXPORT_PARAMS), "wb") as f:
        f.write(data)
    manifest = {"step": model.step, "source": workdir, "stored_dtype": dtype or "float32",
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(tmp, EXPORT_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, out_dir)
    return out_dir


def _load_export(path: str) -> LoadedModel:
    with open(os.path.join(path, EXPORT_MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    with open(os.path.join(path, EXPORT_PARAMS), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"{path}: {EXPORT_PARAMS} is damaged (its sha256 does not match {EXPORT_MANIFEST})")
    _, module, abstract = _abstract_params(config)
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.ema_params)
    stored = serialization.from_bytes(template, data)
    params = jax.tree.map(lambda x, t: np.asarray(x).astype(t.dtype), stored, template)
    params = jax.device_put(params, sharding.replicated(sharding.make_mesh()))
    return LoadedModel(config, module, params, int(manifest["step"]), path)


def load(workdir: str, step: int | None = None) -> LoadedModel:
    """Restores the EMA weights from `workdir` (read-only) onto the devices present.

    `workdir` is a train.py workdir, or a directory written by `export` (e.g. `pretrained/`).
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir not found: {workdir!r}")
    if os.path.exists(os.path.join(workdir, EXPORT_MANIFEST)):
        if step is not None:
            raise ValueError(f"{workdir} is an exported model with one step; do not pass step")
        return _load_export(workdir)
    with Checkpointer(workdir, read_only=True) as ckpt:
        saved = ckpt.restore_config(step)
        config = ml_collections.ConfigDict(saved)
        try:
            _, module, abstract = _abstract_params(config)
        except ValueError as e:
            raise ValueError(f"{workdir}: {e}") from e
        replicated = sharding.replicated(sharding.make_mesh())
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
        restored = ckpt.restore(target, step=step)
    return LoadedModel(config, module, restored.state.ema_params, int(restored.step), workdir)
