"""CLIP score: the mean cosine similarity between generated images and the prompts they were
generated from, in the project's own CLIP (configs/clip_shapes.py). Higher is better; real
test images with their own captions give the ceiling to read it against."""

from __future__ import annotations

import numpy as np


def clip_score(clip_model, images, prompts, batch_size: int = 256) -> float:
    images = np.asarray(images)
    prompts = list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if "embed_images" not in clip_model.methods:
        raise ValueError(f"the {clip_model.config.family!r} model is not a CLIP model")
    scores = []
    for i in range(0, len(images), batch_size):
        img = clip_model.embed_images(images[i:i + batch_size])
        txt = clip_model.embed_texts(prompts[i:i + batch_size])
        scores.append(np.sum(img * txt, axis=1))
    return float(np.mean(np.concatenate(scores)))
