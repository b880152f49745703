"""The record a family hands to the shared training code.

A family is a model plus the objective(s) that train it plus what it can do once trained
(generate, reconstruct, classify ...). Shared code never asks which family it holds: it reads
this record. A family with two networks (a GAN) lists two objectives, each updating its own
subtree of the parameters with its own optimizer; the shared step runs them in order, each
seeing the parameters and model state the previous one left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

# (params, batch, rng, step) -> (scalar loss, dict of scalar metrics); a stateful objective
# takes the model state as a fifth argument and returns (loss, (metrics, new model state)).
LossFn = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss_fn: LossFn
    params_key: str | None = None  # top-level params entry it updates; None = all params
    optim_section: str = "optim"  # config section holding its optimizer settings
    # Reads and updates the train state's `model_state` (variables no gradient trains:
    # spectral-norm power-iteration vectors, an adaptive augmentation probability).
    stateful: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    variants: Mapping[str, Callable[..., nn.Module]]
    # (model, rng, example_batch, config) -> params, or (params, model_state) when `stateful`
    init: Callable[..., Any]
    # (model, config) -> tuple[Objective, ...]
    objectives: Callable[..., tuple[Objective, ...]]
    # (model, params, batch, config) -> dict of scalars; jit-compiled by the caller
    evaluate: Callable[..., dict] | None = None
    # metric from `evaluate` that picks the best checkpoint, and "max" or "min"
    best_metric: tuple[str, str] | None = None
    # (model, params, batch, rng, config) -> images in [-1, 1], written as a PNG grid
    preview: Callable[..., Any] | None = None
    # What a trained model can do; None where the family cannot. Each takes
    # (model, params, config, ...) and is wrapped by mmjax.api.
    abilities: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    # (config) -> None: fills config fields derived from elsewhere (e.g. a frozen VAE's
    # settings read from its checkpoint), after overrides and before validation.
    resolve: Callable[[Any], None] | None = None
    # (config) -> None: family-specific checks; raise ValueError naming the config key.
    validate: Callable[[Any], None] | None = None
    # (params, config, batches) -> params: at a fresh start only (never on resume), e.g. to
    # load frozen pretrained weights. `batches` yields host training batches.
    prepare: Callable[..., Any] | None = None
    # The family keeps non-gradient variables in the train state's `model_state` (see
    # Objective.stateful); they are checkpointed and restored with everything else.
    stateful: bool = False
