"""The mixture prior's maths (models/prior.py) against direct numpy computations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import prior as prior_lib
from mmjax.models.prior import TextPrior
from tests.models.jit_helpers import KEY, key

LATENT = (2, 2, 3)


def random_mixture(batch: int, k: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"mean": jnp.asarray(rng.normal(size=(batch, k) + LATENT), jnp.float32),
            "logvar": jnp.asarray(rng.uniform(-1, 1, size=(batch, k) + LATENT), jnp.float32),
            "logits": jnp.asarray(rng.normal(size=(batch, k)), jnp.float32)}


def test_log_prob_matches_numpy():
    prior = random_mixture(3, 4)
    z = np.random.default_rng(1).normal(size=(3,) + LATENT)
    mean, logvar, logits = (np.asarray(prior[n], np.float64) for n in ("mean", "logvar", "logits"))
    expected = []
    for b in range(3):
        weights = np.exp(logits[b]) / np.exp(logits[b]).sum()
        density = 0.0
        for k in range(4):
            var = np.exp(logvar[b, k])
            density += weights[k] * np.prod(np.exp(-(z[b] - mean[b, k]) ** 2 / (2 * var)) / np.sqrt(2 * math.pi * var))
        expected.append(np.log(density))
    np.testing.assert_allclose(prior_lib.log_prob(prior, jnp.asarray(z, jnp.float32)), expected, rtol=1e-4)


def gaussian_kl(m, lv, pm, plv) -> float:
    m, v, pm, pv = (np.asarray(x, np.float64) for x in (m, np.exp(lv), pm, np.exp(plv)))
    return float(np.sum(0.5 * (np.log(pv / v) + (v + (m - pm) ** 2) / pv - 1)))


def test_kl_is_closed_form_for_one_component_and_a_tight_upper_bound_for_a_mixture():
    rng = np.random.default_rng(2)
    mean = jnp.asarray(rng.normal(size=(1,) + LATENT), jnp.float32)
    logvar = jnp.asarray(rng.uniform(-1, 0.5, size=(1,) + LATENT), jnp.float32)
    one = random_mixture(1, 1, seed=3)
    closed = gaussian_kl(mean[0], logvar[0], one["mean"][0, 0], one["logvar"][0, 0])
    np.testing.assert_allclose(prior_lib.kl(mean, logvar, one)[0], closed, rtol=1e-5)
    # All the weight on one component: exactly that component's KL.
    three = random_mixture(1, 3, seed=4)
    three["logits"] = jnp.array([[-1e9, 0.0, -1e9]], jnp.float32)
    per = [gaussian_kl(mean[0], logvar[0], three["mean"][0, k], three["logvar"][0, k]) for k in range(3)]
    np.testing.assert_allclose(prior_lib.kl(mean, logvar, three)[0], per[1], rtol=1e-5)
    # Spread weights: above the true KL (a many-sample estimate), at most the best single
    # component's KL - log weight.
    three["logits"] = jnp.log(jnp.array([[0.5, 0.3, 0.2]], jnp.float32))
    three["mean"] = three["mean"].at[0, 0].set(mean[0] + 0.3)  # a component near q
    bound = float(prior_lib.kl(mean, logvar, three)[0])
    n = 20000
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(KEY, (n,) + LATENT)
    tile = lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:])  # noqa: E731
    log_q = -0.5 * jnp.sum(logvar + jnp.square(z - mean) * jnp.exp(-logvar) + math.log(2 * math.pi), axis=(1, 2, 3))
    true_kl = float(jnp.mean(log_q - prior_lib.log_prob(jax.tree.map(tile, three), z)))
    per = [gaussian_kl(mean[0], logvar[0], three["mean"][0, k], three["logvar"][0, k]) for k in range(3)]
    assert true_kl - 0.05 <= bound <= min(p - math.log(w) for p, w in zip(per, (0.5, 0.3, 0.2))) + 1e-4
    assert bound - true_kl < 1.0  # tight when one component explains q


def test_sample_draws_components_by_weight_and_temperature_zero_is_the_mean():
    prior = random_mixture(1, 3)
    prior["logits"] = jnp.log(jnp.array([[0.6, 0.3, 0.1]], jnp.float32))
    n = 6000
    many = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), prior)
    z = prior_lib.sample(many, key(4), temperature=0.0)
    means = np.asarray(prior["mean"][0]).reshape(3, -1)
    chosen = np.argmin(((np.asarray(z).reshape(n, 1, -1) - means) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(z).reshape(n, -1), means[chosen])
    np.testing.assert_allclose(np.bincount(chosen, minlength=3) / n, [0.6, 0.3, 0.1], atol=0.03)
    spread = prior_lib.sample(many, key(4), temperature=1.0) - z
    std = np.exp(0.5 * np.asarray(prior["logvar"][0]))[chosen]
    np.testing.assert_allclose(np.std(np.asarray(spread) / std), 1.0, atol=0.03)


def test_text_prior_layout_and_start():
    pooled = jax.random.normal(KEY, (2, 16))
    context = jax.random.normal(key(1), (2, 5, 16))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    one = TextPrior(hidden=8)
    out = one.apply(one.init(KEY, pooled, LATENT), pooled, LATENT)
    assert out["mean"].shape == out["logvar"].shape == (2, 1) + LATENT and out["logits"].shape == (2, 1)
    # One component starts exactly at N(0, I).
    assert not np.any(out["mean"]) and not np.any(out["logvar"])
    many = TextPrior(hidden=8, components=4, attention_pool=True, num_heads=2)
    variables = many.init(KEY, pooled, LATENT, context, mask)
    out = many.apply(variables, pooled, LATENT, context, mask)
    assert out["mean"].shape == (2, 4) + LATENT and out["logits"].shape == (2, 4)
    # Components start apart (else they could never separate) with equal weights.
    assert np.min(np.abs(np.diff(np.asarray(out["mean"][0]).reshape(4, -1), axis=0)).sum(-1)) > 0.1
    np.testing.assert_array_equal(out["logits"], 0.0)
    # The attention read sees the tokens: real ones matter, padding does not (the output
    # layer starts at zero, so perturb the weights first).
    perturbed = jax.tree.map(lambda x: x + 0.1, variables)
    a = many.apply(perturbed, pooled, LATENT, context, mask)["mean"]
    b = many.apply(perturbed, pooled, LATENT, context.at[0, 0].add(1.0), mask)["mean"]
    assert not np.allclose(a[0], b[0])
    np.testing.assert_allclose(b[1], a[1], rtol=1e-6)
    padded = many.apply(perturbed, pooled, LATENT, context.at[0, 4].set(100.0), mask)["mean"]
    np.testing.assert_allclose(padded, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="token context"):
        many.apply(variables, pooled, LATENT)


def test_zero_components_is_an_error_naming_the_config_key():
    with pytest.raises(ValueError, match="model.prior_components"):
        TextPrior(components=0).init(KEY, jnp.zeros((1, 4)), LATENT)
