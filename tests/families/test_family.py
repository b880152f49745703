"""The one calling convention every family keeps (mmjax/families/family.py)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import zoo
from mmjax.config import ConfigError
from mmjax.families import cnn
from mmjax.families.family import LossAux, example_batch
from tests.helpers import REPO, tiny_config


@pytest.mark.parametrize("name", sorted(zoo.FAMILIES))
def test_init_and_every_loss_keep_the_contract(name):
    # Shapes only (jax.eval_shape): the contract is about structure, and tracing is cheap.
    config = tiny_config(f"{name}_shapes")
    family, model = zoo.FAMILIES[name], zoo.build_model(config)
    batch = {k: jnp.asarray(v) for k, v in example_batch(config, batch_size=2).items()}
    out = jax.eval_shape(lambda: family.init(model, jax.random.key(0), batch, config))
    assert isinstance(out, tuple) and len(out) == 2, type(out)
    params, model_state = out
    assert jax.tree.leaves(params)
    for objective in family.objectives(model, config):
        loss, aux = jax.eval_shape(
            lambda p, s, o=objective: o.loss_fn(p, batch, jax.random.key(1), jnp.int32(0), s), params, model_state)
        assert loss.shape == () and jnp.issubdtype(loss.dtype, jnp.floating), (objective.name, loss)
        assert isinstance(aux, LossAux), (objective.name, type(aux))
        assert isinstance(aux.metrics, dict), (objective.name, type(aux.metrics))
        assert all(m.shape == () for m in aux.metrics.values()), (objective.name, aux.metrics)
        assert jax.tree.structure(aux.model_state) == jax.tree.structure(model_state), objective.name
        assert jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype),
                            aux.model_state, model_state) == jax.tree.map(lambda _: True, model_state)


def test_a_stateless_loss_hands_back_the_model_state_it_was_given():
    config = tiny_config("cnn_shapes")
    family, model = zoo.FAMILIES["cnn"], zoo.build_model(config)
    batch = {k: jnp.asarray(v) for k, v in example_batch(config, batch_size=2).items()}
    params, model_state = jax.eval_shape(lambda: family.init(model, jax.random.key(0), batch, config))
    assert model_state is None
    given = {"anything": jax.ShapeDtypeStruct((3,), jnp.float32)}
    (objective,) = family.objectives(model, config)
    _, aux = jax.eval_shape(lambda p, s: objective.loss_fn(p, batch, jax.random.key(1), 0, s), params, given)
    assert jax.tree.structure(aux.model_state) == jax.tree.structure(given)
    assert (aux.model_state["anything"].shape, aux.model_state["anything"].dtype) == ((3,), jnp.float32)


def test_cnn_cross_entropy_matches_optax():
    logits = jax.random.normal(jax.random.key(0), (5, 7)) * 3
    labels = jnp.array([0, 6, 3, 3, 1])
    np.testing.assert_allclose(cnn.cross_entropy(logits, labels),
                               optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-6)


@pytest.mark.e2e
def test_loading_the_families_does_not_import_optax():
    # Sampling from a model needs its family, never the optimizer library.
    code = ("import sys; import mmjax.families.cnn, mmjax.families.vae, mmjax.families.clip, "
            "mmjax.families.diffusion, mmjax.families.flow; print('optax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.parametrize("variant", ["", ":tiny"])
def test_ldm_config_without_a_vae_workdir_is_refused(variant):
    from mmjax.config import load_config

    with pytest.raises(ConfigError, match=r"latent\.vae_workdir.*--config\.latent\.vae_workdir=runs/vae"):
        load_config(os.path.join(REPO, "configs", f"ldm_shapes.py{variant}"))
