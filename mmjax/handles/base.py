"""What every loaded model shares: its weights, its config, input checks and compiled calls.

A handle's public methods are exactly what its family can do; `Model.methods` lists them.
Every method takes and returns uint8 images `[N, H, W, 3]` (greyscale `[N, H, W]` and
`[N, H, W, 1]` are converted), and the same seed gives the same bytes.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import zoo
from mmjax.data import tokenizer as tokenizers
from mmjax.images import to_float, to_uint8


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _seed(value, name: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _fraction(value, name: str) -> float:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class UnsupportedMethodError(NotImplementedError, AttributeError):
    """The model's family cannot do this (an AttributeError too, so `hasattr` says False)."""


class Model:
    """A trained model: `config`, `params` (the EMA weights), `step`, and the family's methods."""

    def __init__(self, config, module, params, step: int, path: str):
        self.config = config
        self.family = zoo.FAMILIES[config.family]
        self.module = module
        self.params = params
        self.step = step
        self.path = path
        # The part of the config the family's abilities read (hashable: baked into programs).
        self.settings = self.family.settings(config) if self.family.settings else None
        self.tokenizer = tokenizers.for_config(config, path or None)
        self._compiled: dict[tuple, object] = {}

    def __repr__(self):
        return (f"{type(self).__name__}(family={self.config.family!r}, variant={self.config.variant!r}, "
                f"step={self.step}, path={self.path!r})")

    @property
    def workdir(self) -> str:
        return self.path

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    # Old spellings that still work for one release, with a DeprecationWarning.
    _DEPRECATED = frozenset({"interpolate"})

    @classmethod
    def method_names(cls) -> list[str]:
        base = set(dir(Model))
        return sorted(name for name in dir(cls) if not name.startswith("_") and name not in base
                      and name not in cls._DEPRECATED and callable(getattr(cls, name)))

    @property
    def methods(self) -> list[str]:
        """What this model can do."""
        return self.method_names()

    @property
    def abilities(self) -> list[str]:
        warnings.warn("`model.abilities` is deprecated; use `model.methods`", DeprecationWarning, stacklevel=2)
        return self.methods

    def __getattr__(self, name):
        # Only reached for attributes the handle lacks: say what this family can do instead.
        if name.startswith("_") or name in ("config", "family"):
            raise AttributeError(name)
        known = {n for cls in Model.__subclasses__() for n in _all_method_names(cls)}
        if name in known:
            raise UnsupportedMethodError(
                f"the {self.config.family!r} family cannot {name}; it can: {self.methods}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- compiled calls --------------------------------------------------------------------------

    def _call(self, ability: str, *args, **static):
        """Runs the family's `ability(module, params, settings, *args, **static)`, compiled once
        per `static` setting (arrays in `args` are traced: new values do not recompile)."""
        key = (ability, tuple(sorted(static.items())))
        if key not in self._compiled:
            fn = functools.partial(self.family.abilities[ability], self.module)
            settings = self.settings
            self._compiled[key] = jax.jit(lambda params, *a: fn(params, settings, *a, **static))
        return self._compiled[key](self.params, *args)

    # -- inputs ------------------------------------------------------------------------------------

    def _prompt_list(self, prompts, what: str = "prompts") -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")
        return list(prompts)

    def _tokens(self, prompts, what: str = "prompts") -> jax.Array:
        return jnp.asarray(self.tokenizer.encode(self._prompt_list(prompts, what)))

    def _prompts_for(self, prompts, count: int, what: str = "prompts") -> jax.Array:
        """One caption per image: a single prompt serves every image."""
        prompts = self._prompt_list(prompts, what)
        if len(prompts) == 1:
            prompts = prompts * count
        if len(prompts) != count:
            raise ValueError(f"got {len(prompts)} {what} for {count} images; give one, or one per image")
        return self._tokens(prompts, what)

    def _images(self, images, what: str = "images") -> jax.Array:
        """uint8 (or [-1, 1] float) images as the model's float input `[N, H, W, 3]`.

        Accepts `[N, H, W, 3]`, one image `[H, W, 3]`, greyscale `[N, H, W]`, `[N, H, W, 1]`
        or `[H, W]`."""
        given = np.asarray(images)
        x = given
        if x.ndim == 2:  # one greyscale image
            x = x[None]
        if x.ndim == 3 and x.shape[-1] == 3:  # one RGB image
            x = x[None]
        if x.ndim == 3:  # a greyscale batch
            x = x[..., None]
        if x.ndim == 4 and x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
            raise ValueError(f"{what} must be [N, H, W, 3] (or greyscale [N, H, W]), got shape {given.shape}")
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"this model works on {self.image_size}x{self.image_size} {what}, "
                             f"got {x.shape[1]}x{x.shape[2]} (shape {given.shape})")
        return jnp.asarray(to_float(x))

    @staticmethod
    def _out(images) -> np.ndarray:
        return to_uint8(jax.device_get(images))


def _all_method_names(cls) -> set[str]:
    names = set(cls.method_names())
    for sub in cls.__subclasses__():
        names |= _all_method_names(sub)
    return names
