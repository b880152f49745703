import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import sharding
from mmjax.checkpoint import Checkpointer, restore_numpy
from mmjax.train.loop import NonFiniteLossError, ResumeMismatchError, train
from tests.helpers import read_metrics, sibling_workdir, tiny_config


def test_run_writes_outputs_and_traces_once(vae_run):
    workdir, config, result = vae_run
    assert result.step == config.train.num_steps
    assert result.trace_count == 1
    assert os.path.isfile(os.path.join(workdir, "config.json"))
    assert sorted(read_metrics(workdir)) == list(range(1, config.train.num_steps + 1))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    previews = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert previews and all(p.endswith(".png") for p in previews)
    with Checkpointer(workdir, read_only=True) as ckpt:
        assert ckpt.latest_step() == config.train.num_steps
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    assert "eval/psnr" in result.eval_metrics


def test_loss_goes_down(vae_run):
    workdir, _, _ = vae_run
    losses = [row["mse"] for _, row in sorted(read_metrics(workdir).items())]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


def test_batch_is_sharded_across_devices():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh()
    batch = sharding.to_device({"image": np.zeros((16, 4, 4, 3), np.float32)}, mesh)
    shards = batch["image"].addressable_shards
    assert len(shards) == 8 and {s.data.shape[0] for s in shards} == {2}
    assert len({s.device for s in shards}) == 8


def test_exact_resume(vae_run, tmp_path):
    """20 steps straight == 10 steps, stop, resume, 10 more: same parameters and losses."""
    straight_dir, config, straight = vae_run
    workdir = sibling_workdir(straight_dir, "resumed")  # vae_run's compiles are cached there
    first = train(config, workdir, stop_at=10)
    assert first.step == 10 and first.stopped_early
    second = train(config, workdir)
    assert second.step == 20
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state.params),
                 jax.device_get(second.state.params))
    a, b = read_metrics(straight_dir), read_metrics(workdir)
    assert [a[s]["loss"] for s in range(1, 21)] == [b[s]["loss"] for s in range(1, 21)]


def test_resume_with_changed_model_is_refused(vae_run, tmp_path):
    workdir, _, _ = vae_run
    changed = tiny_config("vae_shapes", "variant=cond_small", "train.batch_size=32")
    with pytest.raises(ResumeMismatchError, match="variant") as info:
        train(changed, workdir)
    assert "train.batch_size" in str(info.value)


def test_indivisible_batch_fails_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        train(tiny_config("vae_shapes", "train.batch_size=12"), str(workdir))
    assert not workdir.exists()


@pytest.mark.e2e
def test_nonfinite_loss_halts_and_no_nonfinite_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    config = tiny_config("cnn_shapes", "optim.lr=1e38", "optim.grad_clip=0.0", "optim.warmup_steps=0",
                         "train.checkpoint_every=2", "train.log_every=1")
    with pytest.raises(NonFiniteLossError, match=r"steps \d+\.\.\d+"):
        train(config, workdir)
    # Whatever was saved before the halt is finite.
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        for leaf in jax.tree.leaves(restore_numpy(workdir).state):
            if np.issubdtype(np.asarray(leaf).dtype, np.floating):
                assert np.all(np.isfinite(leaf))


def test_restore_on_one_device(vae_run, tmp_path):
    """Saved from 8 devices; a 1-device process restores the same EMA parameters."""
    import subprocess
    import sys

    workdir, _, result = vae_run
    out = tmp_path / "params.npz"
    code = (
        "import jax, numpy as np, mmjax\n"
        "assert jax.device_count() == 1\n"
        f"m = mmjax.load({workdir!r})\n"
        "leaves = jax.tree.leaves(jax.device_get(m.params))\n"
        f"np.savez({str(out)!r}, *leaves)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    loaded = np.load(out)
    expected = jax.tree.leaves(jax.device_get(result.state.ema_params))
    assert len(loaded.files) == len(expected)
    for i, leaf in enumerate(expected):
        np.testing.assert_array_equal(loaded[f"arr_{i}"], leaf)


def test_persistent_compilation_cache_is_filled(vae_run):
    workdir, _, _ = vae_run
    cache = os.path.join(os.path.dirname(workdir), ".jax_cache")
    assert os.path.isdir(cache) and os.listdir(cache)


def test_each_run_in_a_process_caches_where_its_config_says(tmp_path):
    from jax.experimental.compilation_cache import compilation_cache

    from mmjax.train.loop import setup_compilation_cache

    def compile_something(k):  # a new function each time, so a new cache entry
        jax.jit(lambda x: jnp.sin(x) * k).lower(jnp.ones(3)).compile()

    before = jax.config.jax_compilation_cache_dir
    try:
        first = setup_compilation_cache(tiny_config("cnn_shapes", shared_cache=False), str(tmp_path / "a" / "run"))
        assert first == str(tmp_path / "a" / ".jax_cache")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        compile_something(1.0)
        assert os.listdir(first)
        # A second run elsewhere in the same process: JAX opened its cache at `first` already.
        second = setup_compilation_cache(tiny_config("cnn_shapes", "train.compilation_cache=" + str(tmp_path / "b")),
                                         str(tmp_path / "x" / "run"))
        assert second == str(tmp_path / "b")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        count = len(os.listdir(first))
        compile_something(2.0)
        assert os.listdir(second) and len(os.listdir(first)) == count
        assert setup_compilation_cache(tiny_config("cnn_shapes", "train.compilation_cache=off"), "run") is None
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        count = len(os.listdir(second))
        compile_something(3.0)
        assert len(os.listdir(second)) == count
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        compilation_cache.reset_cache()


def test_rerun_of_a_finished_run_changes_nothing(vae_run):
    workdir, config, result = vae_run
    again = train(config, workdir)
    assert again.step == result.step and not again.stopped_early
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.params),
                 jax.device_get(again.state.params))


def test_too_many_bad_images_stop_before_a_workdir_exists(tmp_path):
    from tests.data.files import bad_file_bytes, class_folder

    class_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(bad_file_bytes("truncated_png"))
    config = tiny_config("vae_shapes", "data.name=folder", f"data.path={tmp_path / 'data'}",
                         "data.max_bad_fraction=0.0")
    with pytest.raises(ValueError, match="data.max_bad_fraction"):
        train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_training_rate_is_written_for_every_interval(vae_run):
    workdir, config, _ = vae_run
    rates = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for row in map(json.loads, f):
            if "train/images_per_sec" in row:
                rates[row["step"]] = row["train/images_per_sec"]
    log_every = config.train.log_every
    assert sorted(rates) == list(range(log_every, config.train.num_steps + 1, log_every))
    assert all(rate > 0 for rate in rates.values())


WORD_PATH = ("text.tokenizer=word", "text.normalize=True", "text.positions=rotary")


@pytest.mark.e2e
def test_a_word_run_saves_exports_and_checks_its_vocabulary(tmp_path):
    from mmjax import api
    from mmjax.data import tokenizer as tokenizers
    from mmjax.train.loop import run_tokenizer

    workdir = str(tmp_path / "word")
    config = tiny_config("vae_shapes", *WORD_PATH, "train.num_steps=2", "train.checkpoint_every=2",
                         "train.eval_every=0", "train.sample_every=0")
    train(config, workdir)
    saved = tokenizers.WordTokenizer.load(workdir, config.data.max_len)
    assert saved == tokenizers.build_for(config) and saved.vocab_size > 40
    out = str(tmp_path / "exported")
    api.export(workdir, out)
    assert api.load(out).tokenizer == saved  # the vocabulary travels with the export
    os.remove(os.path.join(out, tokenizers.TOKENIZER_FILE))
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        api.load(out)
    with pytest.raises(ResumeMismatchError, match="text.positions"):
        train(tiny_config("vae_shapes", *WORD_PATH[:2], "text.positions=learned", "train.num_steps=2"), workdir)
    other = tokenizers.WordTokenizer.build(["a red square", "a red square"], config.data.max_len, 64)
    other.save(str(tmp_path))
    with pytest.raises(ResumeMismatchError, match="tokenizer.json is not the vocabulary"):
        run_tokenizer(config, str(tmp_path))
