"""The record a family hands to the shared training code.

A family is a model plus the objective(s) that train it plus what it can do once trained
(generate, reconstruct, classify ...). Shared code never asks which family it holds: it reads
this record. A family with two networks (a GAN) lists two objectives, each updating its own
subtree of the parameters with its own optimizer; the shared step runs them in order, each
seeing the parameters and model state the previous one left.

One calling convention for every family, so shared code never branches on what a family keeps:
`init(model, rng, batch, config) -> (params, model_state)` and
`loss_fn(params, batch, rng, step, model_state) -> (loss, LossAux(metrics, model_state))`.
`model_state` holds the variables no gradient trains (spectral-norm vectors, an adaptive
augmentation probability); it is None for a family without any, and a loss that does not update
it returns the one it was given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import numpy as np


class LossAux(NamedTuple):
    """What a loss returns beside the scalar it is differentiated by."""
    metrics: dict  # scalar metrics, logged under the objective's prefix
    model_state: Any  # the model state after this loss; None for a family without one


# (params, batch, rng, step, model_state) -> (scalar loss, LossAux)
LossFn = Callable[..., tuple[Any, LossAux]]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss_fn: LossFn
    params_key: str | None = None  # top-level params entry it updates; None = all params
    optim_section: str = "optim"  # config section holding its optimizer settings


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    variants: Mapping[str, Callable[..., nn.Module]]
    # (model, rng, example_batch, config) -> (params, model_state); model_state None if none
    init: Callable[..., Any]
    # (model, config) -> tuple[Objective, ...]
    objectives: Callable[..., tuple[Objective, ...]]
    # (model, params, batch, config) -> dict of scalars; jit-compiled by the caller
    evaluate: Callable[..., dict] | None = None
    # metric from `evaluate` that picks the best checkpoint, and "max" or "min"
    best_metric: tuple[str, str] | None = None
    # (model, params, batch, rng, config) -> images in [-1, 1], written as a PNG grid
    preview: Callable[..., Any] | None = None
    # What a trained model can do. Each takes (model, params, settings, arrays..., *, static
    # options) and is compiled and wrapped by the family's handle in mmjax.handles.
    abilities: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    # (config) -> the part of the config the abilities read, as a hashable value (a frozen
    # dataclass); None: the abilities read no config.
    settings: Callable[[Any], Any] | None = None
    # (config) -> None: fills config fields derived from elsewhere (e.g. a frozen VAE's
    # settings read from its checkpoint), after overrides and before validation.
    resolve: Callable[[Any], None] | None = None
    # (config) -> None: family-specific checks; raise ValueError naming the config key.
    validate: Callable[[Any], None] | None = None
    # (params, config, batches) -> params: at a fresh start only (never on resume), e.g. to
    # load frozen pretrained weights. `batches` yields host training batches.
    prepare: Callable[..., Any] | None = None


def example_batch(config, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Zeros shaped like one pipeline batch: enough to initialise any family's model."""
    size = config.data.image_size
    labels = {k: np.zeros((batch_size,), np.int32) for k in ("shape", "color", "size", "position")}
    return {
        "image": np.zeros((batch_size, size, size, 3), np.float32),
        "tokens": np.zeros((batch_size, config.data.max_len), np.int32),
        **labels,
    }
