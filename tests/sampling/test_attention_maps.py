import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data.tokenizer import ByteTokenizer
from mmjax.sampling.attention_maps import (
    box_coverage,
    layer_maps,
    localisation_score,
    normalise,
    timestep_average,
    token_maps,
    word_maps,
    word_spans,
)
from mmjax.sampling.schedules import make_schedule


def _decode(tokens, start, end):
    return ByteTokenizer(8).decode(tokens[start:end])[0]


@pytest.mark.parametrize("prompt", ["Please paint a small red square", "a café, crème-brûlée square!"])
def test_word_spans_cover_each_words_tokens(prompt):
    tokens = ByteTokenizer(64).encode([prompt])[0]
    spans = word_spans(prompt)
    words = [w for w, _, _ in spans]
    if prompt.startswith("Please"):
        assert words == ["Please", "paint", "a", "small", "red", "square"]
        assert spans[0][1:] == (1, 7)  # BOS at 0
    else:
        assert words == ["a", "café", "crème-brûlée", "square"]
    for word, start, end in spans:
        assert _decode(tokens, start, end) == word
    # Nothing but separators between words.
    assert _decode(tokens, spans[-1][2], spans[-1][2] + 1) in ("", "!")


def test_word_spans_follow_the_tokenizers_truncation():
    prompt = "red café square"
    max_len = 2 + len("red caf") + 1  # keeps "red caf" + the first byte of "é": cut back to "caf"
    tokens = ByteTokenizer(max_len).encode([prompt])[0]
    spans = word_spans(prompt, max_len=max_len)
    assert [(w, _decode(tokens, s, e)) for w, s, e in spans] == [("red", "red"), ("café", "caf")]
    assert spans[-1][2] < max_len and tokens[spans[-1][2]] == ByteTokenizer.eos_id


def test_word_maps_sum_their_tokens():
    maps = jax.random.uniform(jax.random.key(0), (2, 4, 4, 9))
    spans = [("ab", 1, 3), ("c", 4, 5)]
    words = word_maps(maps, spans)
    assert words.shape == (2, 4, 4, 2)
    np.testing.assert_allclose(words[..., 0], maps[..., 1] + maps[..., 2], rtol=1e-6)
    np.testing.assert_allclose(words[..., 1], maps[..., 4], rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        word_maps(maps, [("x", 8, 10)])


def test_token_maps_resize_and_average_layers_of_two_resolutions():
    # A coarse layer hot in its top-left cell, a fine one hot in its bottom-right quarter.
    coarse = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0, 1].set(1.0)
    fine = jnp.zeros((1, 4, 4, 3)).at[0, 2:, 2:, 2].set(1.0)
    collection = {"attention_maps": {"mid": {"attn": {"weights": (coarse,)}},
                                     "up": {"attn": {"weights": (fine.reshape(1, 16, 3),)}}}}
    assert len(layer_maps(collection)) == len(layer_maps(collection["attention_maps"])) == 2
    maps = token_maps(collection, (8, 8))
    assert maps.shape == (1, 8, 8, 3)
    token1, token2 = maps[0, ..., 1], maps[0, ..., 2]
    # Each layer counts half; a constant map resizes to itself.
    np.testing.assert_allclose(token_maps({"a": (jnp.ones((1, 2, 2, 3)),), "b": (fine,)}, (8, 8))[0, 0, 0, 0],
                               0.5, atol=1e-6)
    # Bilinear interpolation spreads a cell over its neighbours, but most stays in its quarter.
    assert float(token1[:4, :4].sum()) > 0.7 * float(token1.sum())
    assert float(token2[4:, 4:].sum()) > 0.7 * float(token2.sum())
    assert float(token1[6:, 6:].sum()) == 0.0 and float(token2[:3, :3].sum()) == 0.0
    np.testing.assert_allclose(float(token2[6:, 6:].mean()), 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="no attention maps"):
        token_maps({"attention_maps": {}}, (8, 8))
    # A scanned stack of layers sows [depth, B, h, w, L]: each of its layers counts once.
    stacked = {"blocks": {"weights": (jnp.stack([coarse, jnp.ones((1, 2, 2, 3))]),)}}
    layers = layer_maps(stacked)
    assert len(layers) == 2 and layers[0].shape == (1, 2, 2, 3)
    np.testing.assert_allclose(token_maps(stacked, (4, 4))[0, 0, 0, 1], 1.0, atol=1e-6)


def test_timestep_average_noises_x0_at_each_timestep():
    schedule = make_schedule("linear", 100)
    x0 = jnp.zeros((2, 4, 4, 1))
    seen = []

    def maps_at(x_t, t):
        seen.append((t, x_t))
        # A map that is the timestep everywhere (a constant map resizes to itself).
        return {"layer": (jnp.broadcast_to(t[:, None, None, None].astype(jnp.float32), (2, 2, 2, 5)),)}

    maps = timestep_average(maps_at, schedule, x0, [10, 30, 80], jax.random.key(0), size=(8, 8))
    assert maps.shape == (2, 8, 8, 5)
    np.testing.assert_allclose(maps, 40.0, rtol=1e-6)
    assert [int(t[0]) for t, _ in seen] == [10, 30, 80]
    assert all(t.shape == (2,) and t.dtype == jnp.int32 for t, _ in seen)
    # x0 = 0: x_t is pure scaled noise, sigma_t wide, and fresh for every timestep.
    stds = [float(jnp.std(x)) for _, x in seen]
    assert stds[0] < stds[1] < stds[2] and not np.allclose(seen[0][1] / stds[0], seen[1][1] / stds[1])
    jitted = jax.jit(lambda x, k: timestep_average(maps_at, schedule, x, jnp.array([10, 30, 80]), k))
    np.testing.assert_allclose(jitted(x0, jax.random.key(0)), 40.0, rtol=1e-6)


def test_box_coverage_is_fractional_at_edges():
    cover = box_coverage(jnp.array([[1.5, 0.0, 3.0, 2.0]]), (4, 4))
    np.testing.assert_allclose(cover[0, 0], [0.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(cover[0, 2:], 0.0)
    assert float(cover.sum()) == pytest.approx(3.0)  # 1.5 x 2 pixels


def test_localisation_score():
    boxes = jnp.array([[8.0, 8.0, 16.0, 16.0], [0.0, 0.0, 32.0, 32.0], [4.5, 2.0, 10.0, 7.5]])
    uniform = jnp.ones((3, 32, 32))
    np.testing.assert_allclose(localisation_score(uniform, boxes), 1.0, rtol=1e-5)
    # All mass inside a box covering 1/16 of the image: 16; the whole image as box: 1.
    inside = jnp.zeros((3, 32, 32)).at[:, 10:14, 10:14].set(1.0)
    np.testing.assert_allclose(localisation_score(inside, boxes)[:2], [16.0, 1.0], rtol=1e-5)
    assert float(localisation_score(inside, boxes)[2]) == 0.0  # all mass outside the third box
    # Scale does not matter: maps are normalised first.
    np.testing.assert_allclose(localisation_score(7.0 * inside, boxes), localisation_score(inside, boxes),
                               rtol=1e-5)
    np.testing.assert_allclose(normalise(7.0 * inside).sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    assert np.isnan(float(localisation_score(uniform[:1], jnp.array([[40.0, 40.0, 50.0, 50.0]]))[0]))
