"""The notebook face: `model = mmjax.load(workdir)`, then `model.generate(prompts)` and friends.

`load` restores the EMA weights of the latest good checkpoint onto whatever devices are
present (a run trained on eight GPUs loads on one CPU), without writing anything to the
workdir. Every method takes and returns uint8 images `[N, H, W, 3]`; the same seed gives the
same bytes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import sharding, zoo
from mmjax.checkpoint import Checkpointer
from mmjax.data.tokenizer import ByteTokenizer
from mmjax.images import make_grid, to_float, to_uint8
from mmjax.train.state import create_state, make_optimizer


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
        key = (name, tuple(sorted(static.items())))
        if key not in self._compiled:
            fn = functools.partial(self.family.abilities[name], self.module)
            self._compiled[key] = jax.jit(lambda params, *args: fn(params, self.config, *args, **static))
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

    def generate(self, prompts: Sequence[str] | str, num: int = 1, seed: int = 0, **options) -> np.ndarray:
        """`num` images for each prompt, prompt-major: [len(prompts) * num, H, W, 3] uint8."""
        tokens = jnp.repeat(self._tokens(prompts), num, axis=0)
        fn = self._ability("generate", **options)
        return to_uint8(jax.device_get(fn(self.params, tokens, jax.random.key(seed))))

    def reconstruct(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
        tokens = None if prompts is None else self._tokens(prompts)
        return to_uint8(jax.device_get(self._ability("reconstruct")(self.params, self._images(images), tokens)))

    def interpolate(self, image_a, image_b, num: int = 8, prompt_a: str | None = None,
                    prompt_b: str | None = None) -> np.ndarray:
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


def grid(images, ncols: int | None = None, captions=None):
    """uint8 images -> one PIL image (captions under each cell when given)."""
    return make_grid(np.asarray(images), ncols=ncols, captions=captions)


def load(workdir: str, step: int | None = None) -> LoadedModel:
    """Restores the EMA weights from `workdir` (read-only) onto the devices present."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir not found: {workdir!r}")
    with Checkpointer(workdir, read_only=True) as ckpt:
        saved = ckpt.restore_config(step)
        config = ml_collections.ConfigDict(saved)
        family = zoo.FAMILIES.get(config.family)
        if family is None:
            raise ValueError(f"{workdir}: checkpoint is of unknown family {config.family!r}")
        module = zoo.build_model(config)
        objectives = family.objectives(module, config)
        optimizers = {o.name: make_optimizer(config[o.optim_section], config.train.num_steps)[0]
                      for o in objectives}
        abstract = jax.eval_shape(functools.partial(create_state, family, module, config, optimizers, objectives))
        replicated = sharding.replicated(sharding.make_mesh())
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
        restored = ckpt.restore(target, step=step)
    return LoadedModel(config, module, restored.state.ema_params, int(restored.step), workdir)
