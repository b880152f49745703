"""Jitted, cached init/apply for model tests: one compiled program instead of op-by-op
dispatch, which costs several times more XLA compile time on CPU."""

import functools

import jax


def key(seed: int) -> jax.Array:
    # rbg keys: with the default (partitionable) threefry, XLA:CPU spends ~10 s compiling the
    # random initialisers of even a tiny model; rbg compiles in a fraction of that.
    return jax.random.key(seed, impl="rbg")


KEY = key(0)


@functools.lru_cache
def _jitted(method, static_kwargs):
    return jax.jit(functools.partial(method, **dict(static_kwargs)))


# Jitted (and cached per module and static arguments): one compiled program instead of eager
# op-by-op dispatch, which costs several times more XLA compile time on CPU.
def _split(kwargs):
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, dict))}
    return arrays, tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))


def init(model, *args, **kwargs):
    arrays, static = _split(kwargs)
    return _jitted(model.init, static)(KEY, *args, **arrays)


def apply(model, variables, *args, **kwargs):
    arrays, static = _split(kwargs)
    return _jitted(model.apply, static)(variables, *args, **arrays)
