"""Handles of the families that read images rather than make them: CLIP and the CNN judge."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from mmjax.handles.base import Model, _positive_int


class CLIPModel(Model):
    """A two-tower image-text model: embeddings, similarity and zero-shot classification."""

    def embed_images(self, images, batch_size: int = 256) -> np.ndarray:
        """Unit-norm image embeddings `[N, D]` float32."""
        images, batch_size = self._images(images), _positive_int(batch_size, "batch_size")
        return np.concatenate([np.asarray(self._call("embed_images", images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    def embed_texts(self, prompts: Sequence[str] | str, batch_size: int = 256) -> np.ndarray:
        """Unit-norm caption embeddings `[N, D]` float32."""
        tokens, batch_size = self._tokens(prompts), _positive_int(batch_size, "batch_size")
        return np.concatenate([np.asarray(self._call("embed_texts", tokens[i:i + batch_size]))
                               for i in range(0, len(tokens), batch_size)])

    def similarity(self, images, prompts: Sequence[str] | str) -> np.ndarray:
        """Cosine similarity `[num_images, num_prompts]`."""
        return self.embed_images(images) @ self.embed_texts(prompts).T

    def zero_shot(self, images, classes: dict[str, Sequence[str]] | str) -> list[str]:
        """The best-matching class per image. `classes` maps each class name to its prompts
        (their mean embedding stands for the class), or names a `shapes` attribute ('color',
        'shape', 'size', 'position') whose prompt ensembles are built in."""
        if isinstance(classes, str):
            from mmjax.data import shapes

            if classes not in shapes.ATTRIBUTES:
                raise ValueError(f"classes names no shapes attribute: {classes!r}; known: {list(shapes.ATTRIBUTES)}")
            classes = dict(zip(shapes.ATTRIBUTES[classes], shapes.attribute_prompts(classes)))
        if (not isinstance(classes, dict) or not classes
                or any(isinstance(p, str) or not p for p in classes.values())):
            raise ValueError("classes must map each class name to a non-empty list of prompts")
        names = list(classes)
        tokens = self._tokens([p for name in names for p in classes[name]])
        counts = tuple(len(classes[name]) for name in names)
        images = self._images(images)
        scores = np.concatenate([np.asarray(self._call("zero_shot", images[i:i + 256], tokens, counts=counts))
                                 for i in range(0, len(images), 256)])
        return [names[i] for i in np.argmax(scores, axis=1)]


class Classifier(Model):
    """The CNN judge: one head per shapes attribute."""

    def classify(self, images) -> dict[str, np.ndarray]:
        """Predicted label ids per attribute head."""
        logits, _ = self._call("classify", self._images(images))
        return {k: np.asarray(jnp.argmax(v, -1)) for k, v in logits.items()}

    def features(self, images) -> np.ndarray:
        """The classifier's penultimate features (for Fréchet distances in judge space)."""
        _, features = self._call("classify", self._images(images))
        return np.asarray(features)
