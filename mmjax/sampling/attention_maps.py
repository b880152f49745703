"""Per-word cross-attention heat maps of a text-conditioned denoiser, and how well they localise.

The denoiser's cross-attention layers sow their probabilities (mean over heads) when the
"attention_maps" collection is mutable (models/layers.py, `Attention`): one `[B, h, w, L]`
array per layer, at that layer's resolution, L = caption tokens. From those:

    maps = timestep_average(maps_at, schedule, x0, timesteps, key, size=(H, W))  # [B, H, W, L]
    spans = word_spans(prompt, max_len=L)               # [(word, first token, end token), ...]
    words = word_maps(maps, spans)                      # [B, H, W, len(spans)]
    score = localisation_score(words[b, ..., i][None], box[None])  # 1 = no better than chance

Everything here takes callables and arrays; which model sows the maps is the caller's business.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mmjax.sampling.schedules import Schedule, q_sample

COLLECTION = "attention_maps"  # the name models/layers.py sows under

# A word: letters or digits, with inner apostrophes or hyphens ("don't", "top-left");
# whitespace and punctuation separate words and belong to none.
WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")


def layer_maps(collection: Any) -> list[jax.Array]:
    """Every sown map in `collection`, in a fixed (sorted path) order.

    `collection` is what `apply(..., mutable=["attention_maps"])` returns as its second value,
    or that value's `["attention_maps"]` entry; each leaf is one layer's `[B, h, w, L]` map
    (or `[B, h*w, L]`), or a scanned stack of layers' `[depth, B, h, w, L]`, which counts as
    `depth` layers.
    """
    if isinstance(collection, dict) and COLLECTION in collection:
        collection = collection[COLLECTION]
    leaves = jax.tree.leaves(collection)
    if not leaves:
        raise ValueError(
            "no attention maps were sown: apply the model with mutable=['attention_maps'] "
            "and a caption (only cross-attention layers sow)"
        )
    return [layer for leaf in leaves for layer in (list(leaf) if leaf.ndim == 5 else [leaf])]


def _spatial(layer: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`[B, h, w, L]` as is; `[B, h*w, L]` unflattened with the aspect ratio of `size`."""
    if layer.ndim == 4:
        return layer
    if layer.ndim != 3:
        raise ValueError(f"a layer's map must be [B, h, w, L] or [B, h*w, L], got {layer.shape}")
    queries = layer.shape[1]
    h = round(math.sqrt(queries * size[0] / size[1]))
    w = queries // max(h, 1)
    if h * w != queries:
        raise ValueError(f"{queries} queries do not form a grid of aspect {size[0]}:{size[1]}")
    return layer.reshape(layer.shape[0], h, w, layer.shape[2])


def token_maps(collection: Any, size: tuple[int, int]) -> jax.Array:
    """Sown per-layer maps -> their mean over layers, `[B, *size, L]` float32.

    Each layer's map is resized bilinearly to `size` first (layers work at different
    resolutions), so every layer counts the same whatever its resolution. A query's map
    over tokens sums to 1, and so does the mean's.
    """
    size = tuple(int(s) for s in size)
    resized = []
    for layer in layer_maps(collection):
        layer = _spatial(jnp.asarray(layer, jnp.float32), size)
        shape = (layer.shape[0], *size, layer.shape[-1])
        resized.append(layer if layer.shape == shape else jax.image.resize(layer, shape, "bilinear"))
    return jnp.mean(jnp.stack(resized), axis=0)


def timestep_average(
    maps_at: Callable[[jax.Array, jax.Array], Any],
    schedule: Schedule,
    x0: jax.Array,
    timesteps: Sequence[int] | jax.Array,
    key: jax.Array,
    size: tuple[int, int] | None = None,
) -> jax.Array:
    """Token maps of clean samples `x0`, averaged over the noise levels in `timesteps`.

    For each t: x_t = q_sample(x0, t, fresh noise), then `maps_at(x_t, t)` (t int32 `[B]`)
    returns the sown collection of one denoiser call, e.g.

        lambda x, t: unet.apply(v, x, t, text, method=UNet.denoise,
                                mutable=["attention_maps"])[1]

    A single noise level is a noisy estimate: early (noisy) steps place the layout, late ones
    the detail, so a few spread over the schedule (e.g. 0.2, 0.4, 0.6 of T) give steadier maps.
    `size`: the heat maps' resolution, default x0's (pass the image size for latent models).
    Returns `[B, *size, L]` float32. Jittable with `timesteps` of static length.
    """
    size = tuple(x0.shape[1:3]) if size is None else size
    timesteps = jnp.asarray(timesteps, jnp.int32)
    if timesteps.ndim != 1 or timesteps.shape[0] == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {timesteps.shape}")
    total = 0.0
    for i in range(timesteps.shape[0]):
        t = jnp.full((x0.shape[0],), timesteps[i], jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, jnp.float32)
        x_t = q_sample(schedule, x0.astype(jnp.float32), t, noise)
        total = total + token_maps(maps_at(x_t, t), size)
    return total / timesteps.shape[0]


def word_spans(prompt: str, bos: int = 1, max_len: int | None = None) -> list[tuple[str, int, int]]:
    """`(word, start, end)` for each word of `prompt`: tokens `start:end` of its encoding.

    Assumes a byte-level layout: `bos` special tokens, then one token per UTF-8 byte, then one
    EOS (mmjax.data.tokenizer.ByteTokenizer: bos=1). With `max_len` (the token row length) the
    text is cut as the tokenizer cuts it, to `max_len - bos - 1` bytes at a character
    boundary: a word cut short keeps its surviving tokens, a word cut off entirely is dropped.
    """
    data = prompt.encode("utf-8")
    kept = len(data)
    if max_len is not None:
        room = max(max_len - bos - 1, 0)
        # Decoding the cut bytes drops a trailing partial character, as the tokenizer does.
        kept = len(data[:room].decode("utf-8", errors="ignore").encode("utf-8"))
    spans = []
    for match in WORD.finditer(prompt):
        start = len(prompt[: match.start()].encode("utf-8"))
        end = min(start + len(match.group().encode("utf-8")), kept)
        if start < end:
            spans.append((match.group(), bos + start, bos + end))
    return spans


def spans_from_offsets(prompt: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """`(word, start, end)` for each word of `prompt` that has a token: `offsets` are the
    character ranges of the row's content tokens (the row holds one start token first), and
    the tokens overlapping a word are its span. For subword and word tokenizers."""
    spans = []
    for match in WORD.finditer(prompt):
        inside = [i for i, (a, b) in enumerate(offsets) if a < match.end() and b > match.start()]
        if inside:
            spans.append((match.group(), 1 + inside[0], 2 + inside[-1]))
    return spans


def word_maps(maps: jax.Array, spans: Sequence[tuple[str, int, int]]) -> jax.Array:
    """Token maps `[..., L]` -> word maps `[..., len(spans)]`: each the sum over its tokens.

    A sum, not a mean: a pixel's attention to a word is the mass it puts on any of the word's
    bytes, whatever the word's length.
    """
    length = maps.shape[-1]
    for word, start, end in spans:
        if not 0 <= start < end <= length:
            raise ValueError(f"word {word!r} spans tokens {start}:{end}, outside the {length} tokens")
    positions = jnp.arange(length)[:, None]
    starts = jnp.asarray([s for _, s, _ in spans], jnp.int32).reshape(1, -1)
    ends = jnp.asarray([e for _, _, e in spans], jnp.int32).reshape(1, -1)
    select = ((positions >= starts) & (positions < ends)).astype(jnp.float32)
    return jnp.asarray(maps, jnp.float32) @ select


def normalise(maps: jax.Array) -> jax.Array:
    """`[..., H, W]` maps scaled to sum to 1 over H, W (an all-zero map stays zero)."""
    maps = jnp.asarray(maps, jnp.float32)
    total = jnp.sum(maps, axis=(-2, -1), keepdims=True)
    return maps / jnp.where(total > 0, total, 1.0)


def box_coverage(boxes: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Fraction of each pixel inside each box: `[N, 4]` -> `[N, H, W]` in [0, 1].

    Boxes are `(x0, y0, x1, y1)` in continuous pixel coordinates, pixel i covering [i, i + 1)
    (the convention of mmjax.data.shapes), so a box may cut pixels fractionally.
    """
    boxes = jnp.asarray(boxes, jnp.float32)

    def overlap(lo, hi, n):
        cells = jnp.arange(n, dtype=jnp.float32)
        return jnp.clip(jnp.minimum(cells + 1, hi[:, None]) - jnp.maximum(cells, lo[:, None]), 0.0, 1.0)

    rows = overlap(boxes[:, 1], boxes[:, 3], size[0])
    cols = overlap(boxes[:, 0], boxes[:, 2], size[1])
    return rows[:, :, None] * cols[:, None, :]


def localisation_score(maps: jax.Array, boxes: jax.Array) -> jax.Array:
    """Mass of each map inside its box over the box's share of the image: `[N]`.

    `maps` `[N, H, W]` (normalised here to sum 1), at the resolution the boxes are measured in;
    `boxes` `[N, 4]` as in `box_coverage`. 1 means no better than a uniform map; a map wholly
    inside a box covering a tenth of the image scores 10. NaN for a box outside the image.
    """
    maps = normalise(maps)
    coverage = box_coverage(boxes, maps.shape[-2:])
    area = jnp.mean(coverage, axis=(-2, -1))
    inside = jnp.sum(maps * coverage, axis=(-2, -1))
    return jnp.where(area > 0, inside / jnp.where(area > 0, area, 1.0), jnp.nan)
