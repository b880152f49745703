"""CLIP / SigLIP: contrastive image-text training, zero-shot classification and retrieval.

The loss sees the **whole global batch**: the step's batch is one array sharded over the
devices (and processes), so `image_emb @ text_emb.T` is the global similarity matrix and XLA
gathers the other shards' embeddings inside the compiled step. Every image is contrasted with
every caption of the global batch, not only its own shard's (tests/families/test_clip.py
checks the loss on 8 devices equals the loss on one).

`loss.kind`: "clip" (softmax over the batch in both directions, learned temperature) or
"siglip" (an independent sigmoid per pair, learned temperature and bias). Identical captions
in one batch are all positives of each other's images (`loss.multi_positive`): the shapes data
repeat captions often, and calling a true match a negative teaches the towers to separate
images the caption cannot tell apart.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import shapes
from mmjax.data import tokenizer as tokenizers
from mmjax.families.family import Family, LossAux, Objective
from mmjax.models.clip import CLIP64, CLIPSmall, CLIPSmallViT, CLIPTiny, CLIPTinyViT

VARIANTS = {"tiny": CLIPTiny, "tiny_vit": CLIPTinyViT, "small": CLIPSmall, "small_vit": CLIPSmallViT,
            "64": CLIP64}
LOSSES = ("clip", "siglip")


def add_defaults(c) -> None:
    c.loss.kind = "clip"
    c.loss.multi_positive = True


def validate(config) -> None:
    if config.loss.kind not in LOSSES:
        raise ValueError(f"config key 'loss.kind' must be one of {LOSSES}, got {config.loss.kind!r}")


def init(model, rng, batch, config):
    return model.init({"params": rng}, batch["image"], batch["tokens"])["params"], None


# ---------------------------------------------------------------------------------------------
# Losses over the global batch
# ---------------------------------------------------------------------------------------------

def positives(tokens: jax.Array, multi_positive: bool = True) -> jax.Array:
    """`[B, B]` bool: caption j describes image i. The diagonal always; with `multi_positive`
    also every pair of identical captions."""
    eye = jnp.eye(tokens.shape[0], dtype=bool)
    if not multi_positive:
        return eye
    return eye | jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)


def clip_loss(image_emb, text_emb, scale, pos) -> jax.Array:
    """Symmetric softmax cross-entropy over the batch; targets spread evenly over positives."""
    logits = scale * image_emb @ text_emb.T
    targets = pos.astype(jnp.float32)
    image_to_text = _soft_cross_entropy(logits, targets / targets.sum(1, keepdims=True))
    text_to_image = _soft_cross_entropy(logits.T, targets.T / targets.T.sum(1, keepdims=True))
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def _soft_cross_entropy(logits, probs) -> jax.Array:
    """Per-row cross-entropy against target distributions (written out so that loading a
    family for inference does not import optax)."""
    return -jnp.sum(probs * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def siglip_loss(image_emb, text_emb, scale, bias, pos) -> jax.Array:
    """SigLIP: -1/B sum_ij log sigmoid(z_ij (scale x_i.y_j + bias)), z = +1 positive, -1 not."""
    logits = scale * image_emb @ text_emb.T + bias
    signs = 2.0 * pos.astype(jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / image_emb.shape[0]


def contrastive_loss(config, image_emb, text_emb, scale, bias, tokens):
    pos = positives(tokens, config.loss.multi_positive)
    if config.loss.kind == "siglip":
        return siglip_loss(image_emb, text_emb, scale, bias, pos), pos
    return clip_loss(image_emb, text_emb, scale, pos), pos


def objectives(model, config):
    def loss_fn(params, batch, rng, step, model_state):
        image_emb, text_emb, scale, bias = model.apply(
            {"params": params}, batch["image"], batch["tokens"], train=True, rngs={"dropout": rng})
        loss, pos = contrastive_loss(config, image_emb, text_emb, scale, bias, batch["tokens"])
        sim = image_emb @ text_emb.T
        hit = jnp.take_along_axis(pos, jnp.argmax(sim, axis=1)[:, None], axis=1)
        metrics = {"batch_i2t_top1": jnp.mean(hit), "temperature": 1.0 / scale, "bias": bias}
        return loss, LossAux(metrics, model_state)

    return (Objective("contrastive", loss_fn),)


# ---------------------------------------------------------------------------------------------
# Abilities: embeddings, similarity, zero-shot
# ---------------------------------------------------------------------------------------------

def embed_images(model, params, s, images):
    return model.apply({"params": params}, images, method=type(model).embed_images)


def embed_texts(model, params, s, tokens):
    return model.apply({"params": params}, tokens, method=type(model).embed_texts)


def similarity(model, params, s, images, tokens):
    """Cosine similarity `[num_images, num_texts]`."""
    return embed_images(model, params, s, images) @ embed_texts(model, params, s, tokens).T


def class_embeddings(model, params, s, prompt_tokens, counts):
    """One unit vector per class: the mean of its prompts' embeddings (prompt ensembling).
    `prompt_tokens` `[P, L]` hold every class's prompts in order, `counts` how many each has."""
    emb = embed_texts(model, params, s, prompt_tokens)
    segments = np.repeat(np.arange(len(counts)), counts)
    means = jax.ops.segment_sum(emb, jnp.asarray(segments), num_segments=len(counts))
    return means / jnp.linalg.norm(means, axis=-1, keepdims=True)


def zero_shot(model, params, s, images, prompt_tokens, *, counts):
    """`[num_images, num_classes]` cosine similarity to each class's prompt ensemble."""
    return embed_images(model, params, s, images) @ class_embeddings(model, params, s, prompt_tokens, counts).T


@functools.lru_cache(maxsize=16)
def shapes_prompts(attribute: str, tokenizer, heldout_phrasing: bool = False) -> tuple[np.ndarray, tuple[int, ...]]:
    """Tokens and per-class counts of the zero-shot prompts for a shapes attribute: the
    built-in ones, or the same labels phrased with the caption grammar's held-out
    constructions (which no training caption uses)."""
    if heldout_phrasing:
        from mmjax.data import captions

        prompts = captions.heldout_attribute_prompts(attribute)
    else:
        prompts = shapes.attribute_prompts(attribute)
    flat = [p for per_class in prompts for p in per_class]
    return tokenizer.encode_texts(flat)[0], tuple(len(p) for p in prompts)


@functools.lru_cache(maxsize=4)
def _full_caption_table(tokenizer) -> np.ndarray:
    return tokenizer.encode_texts(shapes.full_captions())[0]


def full_caption_tokens(batch, tokenizer) -> jax.Array:
    """The full caption (shape, color, size, position) of each image's labels."""
    return jnp.asarray(_full_caption_table(tokenizer))[shapes.label_index(batch)]


def same_labels(batch) -> jax.Array:
    """`[B, B]` bool: images i and j have every attribute equal."""
    index = shapes.label_index(batch)
    return index[:, None] == index[None, :]


def evaluate(model, params, batch, config):
    """Zero-shot accuracy per attribute, and retrieval within the batch with full captions
    (a hit: the retrieved item has the query's attributes)."""
    images = batch["image"]
    image_emb = embed_images(model, params, None, images)
    tokenizer = tokenizers.for_config(config)  # the train captions' vocabulary, as the run saved it
    out = {}
    for attribute in shapes.ATTRIBUTES:
        tokens, counts = shapes_prompts(attribute, tokenizer)
        scores = image_emb @ class_embeddings(model, params, None, jnp.asarray(tokens), counts).T
        out[f"zero_shot_{attribute}"] = jnp.mean(jnp.argmax(scores, axis=1) == batch[attribute])
        tokens, counts = shapes_prompts(attribute, tokenizer, heldout_phrasing=True)
        scores = image_emb @ class_embeddings(model, params, None, jnp.asarray(tokens), counts).T
        out[f"zero_shot_heldout_phrasing_{attribute}"] = jnp.mean(jnp.argmax(scores, axis=1) == batch[attribute])
    text_emb = embed_texts(model, params, None, full_caption_tokens(batch, tokenizer))
    match = same_labels(batch)
    sim = text_emb @ image_emb.T
    out["t2i_recall1"] = jnp.mean(jnp.take_along_axis(match, jnp.argmax(sim, 1)[:, None], 1))
    out["i2t_recall1"] = jnp.mean(jnp.take_along_axis(match, jnp.argmax(sim.T, 1)[:, None], 1))
    out["zero_shot_mean"] = jnp.mean(jnp.stack([out[f"zero_shot_{a}"] for a in shapes.ATTRIBUTES]))
    return out


FAMILY = Family(
    name="clip",
    variants=VARIANTS,
    init=init,
    objectives=objectives,
    evaluate=evaluate,
    best_metric=("zero_shot_mean", "max"),
    abilities={"embed_images": embed_images, "embed_texts": embed_texts, "similarity": similarity,
               "zero_shot": zero_shot},
    validate=validate,
)
