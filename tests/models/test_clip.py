import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.clip import CLIPTiny, CLIPTinyViT, ViT


@pytest.mark.parametrize("ctor", [CLIPTiny, CLIPTinyViT])
def test_both_towers_embed_onto_the_unit_sphere(ctor):
    model = ctor()
    images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
    tokens = jnp.array([[1, 70, 71, 2, 0, 0]] * 3, jnp.int32)
    variables = model.init(jax.random.key(1), images, tokens)
    img, txt, scale, bias = model.apply(variables, images, tokens)
    assert img.shape == txt.shape == (3, 32) and img.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5) and float(bias) == -10.0
    # Different images, different embeddings: the tower reads its input.
    assert float(jnp.abs(img[0] - img[1]).max()) > 1e-4
    np.testing.assert_allclose(model.apply(variables, images, method=type(model).embed_images), img, atol=1e-6)


def test_vit_rejects_images_that_do_not_tile_into_patches():
    with pytest.raises(ValueError, match="not divisible into 4x4 patches"):
        ViT(patch=4, width=8, depth=1, num_heads=2).init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)))
