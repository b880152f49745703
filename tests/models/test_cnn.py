
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.models.cnn import CNNTiny, ResNetClassifier, add_coord_channels
from tests.models.jit_helpers import KEY, init, key

PALETTE = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], np.float32)
HEADS = dict(num_classes=(4, 2, 9), head_names=("color", "size", "position"))


def squares(n: int, seed: int, size: int = 16):
    """Coloured squares of two sizes on a 3x3 grid of positions, with jitter, on black."""
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, 3), -1.0, np.float32)
    labels = {
        "color": rng.integers(0, 4, n),
        "size": rng.integers(0, 2, n),
        "position": rng.integers(0, 9, n),
    }
    for i in range(n):
        half = 1 + 2 * labels["size"][i]
        row, col = divmod(labels["position"][i], 3)
        cy, cx = (np.array([row, col]) + 1) * size // 4 + rng.integers(-1, 2, 2)
        images[i, max(cy - half, 0) : cy + half, max(cx - half, 0) : cx + half] = PALETTE[
            labels["color"][i]
        ]
    return jnp.asarray(images), {k: jnp.asarray(v, jnp.int32) for k, v in labels.items()}


def test_coord_channels():
    out = add_coord_channels(jnp.zeros((2, 4, 6, 3)))
    assert out.shape == (2, 4, 6, 5)
    # Channel 3 is x (varies along width), channel 4 is y (varies along height).
    np.testing.assert_allclose(out[0, 0, :, 3], np.linspace(-1, 1, 6), atol=1e-6)
    np.testing.assert_allclose(out[0, :, 0, 4], np.linspace(-1, 1, 4), atol=1e-6)


def test_shapes_and_dtypes():
    images = jnp.zeros((2, 16, 16, 3))
    model = CNNTiny(dtype=jnp.bfloat16)
    # eval_shape checks shapes and dtype promotion without compiling.
    variables = jax.eval_shape(model.init, KEY, images)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, aux = jax.eval_shape(model.apply, variables, images)
    assert set(logits) == {"shape", "color", "size", "position"}
    for name, n in zip(model.head_names, model.num_classes):
        assert logits[name].shape == (2, n) and logits[name].dtype == jnp.float32
    # Mean, max, x- and y-moment of each final channel.
    assert aux["features"].shape == (2, 4 * model.widths[-1])
    assert aux["features"].dtype == jnp.float32


@pytest.mark.e2e
def test_learns_all_heads_including_position():
    """150 Adam steps fit colour, size and position, and position generalises to new images
    (global pooling alone discards where the object is). Held-out position: 98.8-100% over
    3 seeds; a plain ResNet with mean pooling only: 80-96%.
    """
    model = CNNTiny(**HEADS)
    train_x, train_y = squares(512, seed=0)
    test_x, test_y = squares(256, seed=1)
    params = init(model, train_x[:1])["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, key):
        idx = jax.random.choice(key, len(train_x), (128,), replace=False)
        x, y = train_x[idx], {k: v[idx] for k, v in train_y.items()}

        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x, train=True)
            return sum(
                optax.softmax_cross_entropy_with_integer_labels(logits[k], y[k]).mean()
                for k in logits
            )

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for i in range(150):
        params, opt_state = step(params, opt_state, key(i))

    @jax.jit
    def accuracy(params, x, y):
        logits, _ = model.apply({"params": params}, x)
        return {k: jnp.mean(jnp.argmax(logits[k], -1) == y[k]) for k in logits}

    train_acc = accuracy(params, train_x, train_y)
    assert all(float(a) >= 0.98 for a in train_acc.values()), train_acc
    test_acc = accuracy(params, test_x, test_y)
    assert float(test_acc["position"]) >= 0.97, test_acc


def test_rejects_mismatched_heads():
    model = ResNetClassifier(num_classes=(2, 3), head_names=("a",), widths=(8,), groups=4)
    try:
        init(model, jnp.zeros((1, 8, 8, 3)))
    except ValueError:
        return
    raise AssertionError("expected ValueError")
