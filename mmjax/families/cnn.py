"""CNN family: a ResNet classifier with one head per shapes attribute.

Trained on `shapes`, it is the project's judge: `mmjax.eval.attribute_accuracy` scores
generated images against the attributes their prompts asked for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.families.family import Family, LossAux, Objective
from mmjax.models.cnn import CNN64, CNNSmall, CNNTiny

VARIANTS = {"tiny": CNNTiny, "small": CNNSmall, "64": CNN64}


def init(model, rng, batch, config):
    return model.init({"params": rng}, batch["image"])["params"], None


def cross_entropy(logits, labels) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, in float32 (written out so that
    loading a family for inference does not import optax)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _head_metrics(model, logits: dict, batch) -> tuple[jax.Array, dict]:
    losses, metrics = [], {}
    for name in model.head_names:
        labels = batch[name]
        ce = cross_entropy(logits[name], labels).mean()
        losses.append(ce)
        metrics[f"accuracy_{name}"] = jnp.mean(jnp.argmax(logits[name], -1) == labels)
    metrics["accuracy_mean"] = jnp.mean(jnp.stack([metrics[f"accuracy_{n}"] for n in model.head_names]))
    return jnp.sum(jnp.stack(losses)), metrics


def objectives(model, config):
    def loss_fn(params, batch, rng, step, model_state):
        logits, _ = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        loss, metrics = _head_metrics(model, logits, batch)
        return loss, LossAux(metrics, model_state)

    return (Objective("classifier", loss_fn),)


def evaluate(model, params, batch, config):
    logits, _ = model.apply({"params": params}, batch["image"])
    loss, metrics = _head_metrics(model, logits, batch)
    return {"loss": loss, **metrics}


def classify(model, params, s, images):
    """Images in [-1, 1] -> (dict of logits per attribute, penultimate features)."""
    logits, aux = model.apply({"params": params}, images)
    return logits, aux["features"]


FAMILY = Family(
    name="cnn",
    variants=VARIANTS,
    init=init,
    objectives=objectives,
    evaluate=evaluate,
    best_metric=("accuracy_mean", "max"),
    abilities={"classify": classify},
)
