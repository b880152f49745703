"""CLIP/SigLIP: the loss over the global batch, the prompt tables, zero-shot and the API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import sharding, zoo
from mmjax.data import shapes
from mmjax.families import clip
from tests.helpers import init_family, tiny_config


def _embeddings(n=16, d=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (n, d))
    txt = jax.random.normal(k2, (n, d))
    return img / jnp.linalg.norm(img, axis=1, keepdims=True), txt / jnp.linalg.norm(txt, axis=1, keepdims=True)


def _tokens(n=16, repeats=((0, 5), (3, 9), (9, 12))):
    tokens = np.arange(n * 6, dtype=np.int32).reshape(n, 6) + 3
    for a, b in repeats:
        tokens[b] = tokens[a]
    return jnp.asarray(tokens)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_over_eight_devices_equals_the_single_device_loss(kind):
    # The negatives are the whole global batch: the same global batch split over 8 devices
    # gives the loss one device computes, through the family's own loss function.
    assert jax.device_count() == 8
    config = tiny_config("clip_shapes", f"loss.kind={kind}")
    family, model = zoo.FAMILIES["clip"], zoo.build_model(config)
    (objective,) = family.objectives(model, config)
    from tests.families.test_families import one_batch

    batch = one_batch(config, size=16)
    params, model_state = init_family(family, model, batch, config)
    loss = jax.jit(lambda p, b: objective.loss_fn(p, b, jax.random.key(1), 0, model_state)[0])

    one = jax.devices()[0]
    single = float(loss(jax.device_put(params, one), jax.device_put(batch, one)))
    mesh = sharding.make_mesh()
    sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    assert len(sharded_batch["image"].sharding.device_set) == 8
    multi = float(loss(jax.device_put(params, NamedSharding(mesh, PartitionSpec())), sharded_batch))
    assert multi == pytest.approx(single, rel=1e-5, abs=1e-6)
    # ... and it is not the mean of per-shard losses (which would miss cross-shard negatives).
    img, txt = _embeddings(16)
    pos = clip.positives(_tokens(16))
    whole = clip.clip_loss(img, txt, 10.0, pos)
    shards = np.mean([clip.clip_loss(img[i:i + 2], txt[i:i + 2], 10.0, pos[i:i + 2, i:i + 2]) for i in range(0, 16, 2)])
    assert abs(float(whole) - shards) > 0.1


def test_positives_are_identical_captions():
    pos = np.asarray(clip.positives(_tokens()))
    assert pos[0, 5] and pos[5, 0] and pos[3, 9] and pos[9, 12] and pos[3, 12]
    assert pos.sum() == 16 + 2 + 6  # the diagonal, one pair, one triple
    assert np.array_equal(np.asarray(clip.positives(_tokens(), multi_positive=False)), np.eye(16, dtype=bool))


def test_clip_and_siglip_losses_match_their_definitions():
    img, txt = _embeddings(6, 4, seed=3)
    pos = np.asarray(clip.positives(_tokens(6, repeats=((1, 4),))))
    logits = 5.0 * np.asarray(img) @ np.asarray(txt).T

    def xent(rows, targets):
        logp = rows - np.log(np.exp(rows).sum(1, keepdims=True))
        return -(targets / targets.sum(1, keepdims=True) * logp).sum(1).mean()

    expected = 0.5 * (xent(logits, pos.astype(float)) + xent(logits.T, pos.T.astype(float)))
    assert float(clip.clip_loss(img, txt, 5.0, jnp.asarray(pos))) == pytest.approx(expected, rel=1e-5)
    z = logits - 2.0
    signs = np.where(pos, 1.0, -1.0)
    expected = -np.sum(np.log(1 / (1 + np.exp(-signs * z)))) / 6
    assert float(clip.siglip_loss(img, txt, 5.0, -2.0, jnp.asarray(pos))) == pytest.approx(expected, rel=1e-5)
    # Aligned embeddings and a sharp temperature: the softmax loss goes to zero.
    assert float(clip.clip_loss(img, img, 100.0, jnp.eye(6, dtype=bool))) < 1e-3


def test_prompt_tables_follow_the_labels():
    captions = shapes.full_captions()
    assert len(captions) == 3 * 8 * 2 * 9
    labels = {"shape": 2, "color": 4, "size": 1, "position": 7}
    assert captions[shapes.label_index(labels)] == shapes.caption_for(
        labels, include_size=True, include_position=True, template=0) == "a large purple triangle at the bottom"
    color = shapes.attribute_prompts("color")
    assert len(color) == 8 and color[0] == ["a red circle", "a red square", "a red triangle"]
    position = shapes.attribute_prompts("position")
    assert len(position) == 9 and all(len(p) == 24 for p in position)
    assert all("at the top left" in p for p in position[0])
    with pytest.raises(ValueError, match="unknown attribute"):
        shapes.attribute_prompts("texture")


def test_zero_shot_learns_from_captions_alone(clip_run):
    workdir, result = clip_run
    untrained = tiny_config("clip_shapes")
    family, model = zoo.FAMILIES["clip"], zoo.build_model(untrained)
    from tests.families.test_families import one_batch

    batch = one_batch(untrained, size=64)
    fresh = family.evaluate(model, family.init(model, jax.random.key(5), batch, untrained)[0], batch, untrained)
    # Untrained: near chance (color 1/8, shape 1/3).
    assert float(fresh["zero_shot_color"]) < 0.35 and float(fresh["zero_shot_shape"]) < 0.6
    trained = result.eval_metrics
    # Color is what 16-pixel images show best; shape needs more pixels and steps (the README
    # measures every attribute on the 32x32 model).
    assert trained["eval/zero_shot_color"] > 0.6, trained
    assert trained["eval/t2i_recall1"] > float(fresh["t2i_recall1"]) + 0.1
    # The same zero-shot from prompts in the caption grammar's held-out phrasings.
    assert 0 <= trained["eval/zero_shot_heldout_phrasing_color"] <= 1


def test_evaluate_reports_zero_shot_and_retrieval(clip_run):
    import mmjax
    from mmjax.evaluate import evaluate, format_table

    workdir, _ = clip_run
    results = evaluate(mmjax.load(workdir), num=128, gallery=64)
    c = results["clip"]
    assert c["gallery"] == 64 and set(c["zero_shot"]) == {"shape", "color", "size", "position"}
    assert c["zero_shot"]["color"] > 0.6
    for name in ("t2i", "i2t"):
        assert 0 < c[f"{name}_recall@1"] <= c[f"{name}_recall@5"] <= 1
    assert "t2i retrieval" in format_table(results)


def test_api_embeds_and_classifies(clip_run):
    import mmjax
    from mmjax.data.pipeline import make_source

    workdir, _ = clip_run
    model = mmjax.load(workdir)
    assert model.methods == ["embed_images", "embed_texts", "similarity", "zero_shot"]
    source = make_source(model.config.data, "test")
    records = [source[i] for i in range(64)]
    images = np.stack([r["image"] for r in records])
    emb = model.embed_images(images)
    assert emb.shape == (64, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    sim = model.similarity(images[:3], ["a red circle", "a blue square"])
    assert sim.shape == (3, 2) and np.all(np.abs(sim) <= 1 + 1e-5)
    predicted = model.zero_shot(images, "color")
    truth = [shapes.COLOR_NAMES[r["color"]] for r in records]
    assert np.mean([p == t for p, t in zip(predicted, truth)]) > 0.6
    custom = model.zero_shot(images[:4], {"red": ["a red circle"], "blue": ["a blue circle", "a blue square"]})
    assert set(custom) <= {"red", "blue"} and len(custom) == 4
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        model.zero_shot(images[:2], {"red": "a red circle"})
    with pytest.raises(NotImplementedError, match="cannot generate"):
        model.generate("a red circle")
    assert not hasattr(model, "generate")  # what a family cannot do is no attribute of its handle


def test_clip_guidance_raises_similarity_to_the_target(clip_run, vae_run):
    # CLIP guidance on the tiny VAE: each Adam step follows the gradient of the CLIP
    # similarity, so the similarity to the target prompt climbs; zero steps is plain decoding.
    import mmjax
    from mmjax.editing.clip_guidance import clip_guided_latents

    clip_dir, _ = clip_run
    vae_dir, _, _ = vae_run
    vae, clip_model = mmjax.load(vae_dir), mmjax.load(clip_dir)
    images = np.zeros((4, vae.image_size, vae.image_size, 3), np.uint8)
    images[:, 4:12, 4:12] = (220, 30, 30)
    edited, history = vae.edit(images, "a red square", "a blue circle", clip=clip_dir,
                               steps=8, lr=0.1, anchor=0.0, condition="source", return_history=True)
    assert edited.shape == images.shape and edited.dtype == np.uint8
    assert history.shape == (9, 4)
    assert np.all(history[-1] > history[0] + 1e-3), history
    with pytest.warns(DeprecationWarning, match="guidance='clip'"):  # the old spelling, for one release
        plain = vae.edit(images, "a red square", "a blue circle", guidance="clip", clip=clip_model, steps=0,
                         condition="source")
    assert np.array_equal(plain, vae.reconstruct(images, ["a red square"] * 4))
    with pytest.raises(ValueError, match="guidance"):
        vae.edit(images, "a", "b", guidance="clipp", clip=clip_model)
    with pytest.raises(ValueError, match="needs clip="):
        vae.edit(images, "a", "b", clip=None)
    with pytest.raises(NotImplementedError, match="cannot edit"):
        clip_model.edit(images, "a", "b", clip=clip_model)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        clip_guided_latents(lambda z: z, lambda x: x, jnp.zeros((1, 2)), jnp.zeros((1, 2)), steps=-1)
