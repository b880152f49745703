"""Attention localisation: boxes found in generated images, scores of a fake model's maps."""

import numpy as np
import pytest

from mmjax.data.shapes import ShapesSource
from mmjax.eval.localisation import attention_localisation, object_boxes
from mmjax.handles.generators import AttentionMaps


def test_object_boxes_surround_the_rendered_shape():
    source = ShapesSource("test", image_size=32)
    images = np.stack([source[i]["image"] for i in range(8)] + [np.zeros((32, 32, 3), np.uint8)])
    boxes = object_boxes(images)
    assert np.isnan(boxes[-1]).all()  # nothing drawn, no box
    for image, (x0, y0, x1, y1) in zip(images[:-1], boxes[:-1]):
        inside = image[int(y0):int(y1), int(x0):int(x1)].max(axis=-1) > 40
        assert inside.sum() == (image.max(axis=-1) > 40).sum()  # every object pixel is in the box
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # tight


class FakeModel:
    """Draws a square at the top left; the colour word looks at it, every other word everywhere."""

    def attention_maps(self, prompts, seed=0, **options):
        out = []
        for prompt in prompts:
            words = prompt.split()
            image = np.zeros((1, 16, 16, 3), np.uint8)
            image[0, 0:4, 0:4] = 200
            maps = np.full((1, len(words), 16, 16), 1 / 256, np.float32)
            for i, word in enumerate(words):
                if word.lower() == "red":
                    maps[0, i] = 0
                    maps[0, i, 0:4, 0:4] = 1 / 16
            out.append(AttentionMaps(image, words, maps))
        return out


def test_scores_the_colour_and_shape_words():
    result = attention_localisation(FakeModel(), ["a RED square", "a red circle", "a square"], batch_size=2)
    assert result["color_word"] == pytest.approx(16.0)  # all mass in a box of 1/16 of the image
    assert result["shape_word"] == pytest.approx(1.0)  # uniform
    assert result["num_color_word"] == 2 and result["num_shape_word"] == 3 and result["num"] == 3
