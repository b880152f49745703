"""The record a family hands to the shared training code.

A family is a model plus the objective(s) that train it plus what it can do once trained
(generate, reconstruct, classify ...). Shared code never asks which family it holds: it reads
this record. A family with two networks (a GAN) lists two objectives, each updating its own
subtree of the parameters with its own optimizer; the shared step runs them in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

# (params, batch, rng, step) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Mapping[str, Any], Any, Any], tuple[Any, dict]]


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
    # (model, rng, example_batch, config) -> params
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
