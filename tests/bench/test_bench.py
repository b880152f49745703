"""The benchmark harness runs end to end on CPU with tiny twins and writes a complete record."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax.bench import core, suites
from mmjax.bench.__main__ import main
from tests.helpers import REPO


def run_bench(*args) -> subprocess.CompletedProcess:
    """The CLI in its own process: it points JAX's persistent compilation cache at a fresh
    directory, process-wide, which must not leak into the other tests' training runs."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mmjax.bench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.e2e
def test_train_and_kernel_suites_write_a_complete_record(tmp_path):
    out = tmp_path / "results.jsonl"
    # No --tiny: on a CPU the harness picks the presets' tiny twins by itself, and says so.
    proc = run_bench("--preset", "cnn64", "--suite", "train", "--suite", "kernels", "--steps", "2",
                     "--warmup", "1", "--out", str(out), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and not (tmp_path / "results.jsonl.partial.json").exists()
    record = json.loads(lines[0])
    assert record["device"]["platform"] == "cpu" and record["device"]["device_count"] == 8
    assert record["ceilings"]["matmul"]["tflops"] > 0 and record["ceilings"]["copy"]["gbps"] > 0
    (train,) = record["train"]
    assert train["target"] == "cnn64" and train["variant"] == "tiny" and train["batch_size"] == 8
    assert train["compile_s"] > 0 and train["step_s_median"] > 0
    assert train["images_per_s"] == pytest.approx(8 / min(train["step_s_median"], train["step_s_pipelined"]))
    # The steady state compiled nothing and moved nothing to the host (the guard was on).
    assert train["steady_compiles"] == 0 and train["steady_host_transfers_blocked"]
    # The restart path: the second compile came out of the persistent cache.
    assert train["warm_cache_hits"] >= 1 and train["warm_compiles"] == 0
    assert train["model_flops"] > 1e6 and 0 < train["mfu"]
    assert train["achieved_tflops"] == pytest.approx(train["model_flops"] / min(
        train["step_s_median"], train["step_s_pipelined"]) / 1e12)
    assert train["loss_finite"] and train["memory"]["argument_size_in_bytes"] > 0
    state_bytes = train["state_bytes_per_device"]
    assert train["param_sharding"] == "replicated" and train["devices"] == 8
    assert set(state_bytes) == {"replicated", "fsdp"} and 0 < state_bytes["fsdp"] <= state_bytes["replicated"]
    kernels = {(k["kernel"], k["shape"], k.get("impl"), k["mode"]) for k in record["kernels"]}
    assert ("attention", "cross_tiny", "auto", "fwd+bwd") in kernels and ("conv3x3", "conv_tiny", None, "fwd") in kernels
    for row in record["kernels"]:
        assert "error" not in row and row["seconds"] > 0
        if row["kernel"] == "attention" and row["mode"] == "fwd":
            assert row["ran"] == "xla" and row["rel_err"] < 1e-5
    report = proc.stdout
    assert "on a CPU: the presets' tiny twins" in report
    assert "train step" in report and "cnn64" in report and "kernels" in report


@pytest.mark.e2e
def test_sampling_suite_measures_guided_ddim(tmp_path):
    out = tmp_path / "r.jsonl"
    proc = run_bench("--tiny", "--preset", "ldm64", "--suite", "sample", "--sample-steps", "3", "--sample-batch", "4",
                     "--out", str(out), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sample,) = json.loads(out.read_text())["sample"]
    assert sample["sampler"] == "ddim" and sample["steps"] == 3 and sample["batch_size"] == 4
    assert sample["finite"] and sample["images_per_s"] == pytest.approx(4 / sample["seconds"])
    assert sample["network_evals_per_s"] == pytest.approx(4 * 3 * 2 / sample["seconds"])


def test_presets_name_the_benchmark_shapes():
    ddpm = suites.preset_config("ddpm32")
    assert (ddpm.variant, ddpm.data.image_size, ddpm.train.batch_size, ddpm.dtype) == ("ddpm32", 32, 128, "bfloat16")
    ldm = suites.preset_config("ldm64", batch_size=32)
    assert (ldm.variant, ldm.data.channels, ldm.data.max_len, ldm.train.batch_size) == ("ldm64", 4, 77, 32)
    scanned, unrolled = suites.preset_config("dit_b2"), suites.preset_config("dit_b2_unrolled")
    assert (scanned.family, scanned.variant, scanned.model.scan, unrolled.model.scan) == ("flow", "dit_b2", True, False)
    assert (scanned.data.image_size, scanned.data.channels, scanned.data.max_len) == (32, 4, 77)
    with pytest.raises(ValueError, match="unknown preset"):
        suites.preset_config("nope")


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])
    with pytest.raises(SystemExit):
        main(["--tiny", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_compile_counter_sees_a_new_shape_and_not_a_cached_call():
    f = jax.jit(lambda x: x * 2 + 1)
    f(np.ones(3, np.float32)).block_until_ready()
    with core.CompileCounter() as counter:
        f(np.ones(3, np.float32)).block_until_ready()
    assert counter.events == 0
    with core.CompileCounter() as counter:
        f(np.ones(5, np.float32)).block_until_ready()
    assert counter.events == 1 and counter.compiles + counter.cache_hits == 1


def test_hlo_facts_count_what_they_name():
    text = ('%a = custom-call(), custom_call_target="__cudnn$fmhaSoftmax"\n'
            '%b = (f32[]) conditional(%p, %x, %y)\n%c = f32[] while(%t)\n'
            '%d = custom-call(), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n')
    facts = core.hlo_facts(text)
    assert facts["cudnn_attention"] == 2 and facts["conditionals"] == 1 and facts["while_loops"] == 1
    assert core.hlo_facts("")["cudnn_attention"] == 0


def test_roofline_fraction_is_one_at_the_bound():
    # 1 TFLOP at 100 TFLOP/s = 10 ms; 1 GB at 1000 GB/s = 1 ms: compute-bound, 10 ms is the floor.
    assert core.roofline_fraction(1e12, 1e9, 0.01, 100.0, 1000.0) == pytest.approx(1.0)
    assert core.roofline_fraction(1e12, 1e9, 0.02, 100.0, 1000.0) == pytest.approx(0.5)
    assert core.datasheet_tflops("NVIDIA H200") == 989.0 and core.datasheet_tflops("cpu") is None


def test_synthetic_batch_has_padded_captions_and_the_configured_channels():
    config = suites.preset_config("ldm64")
    batch = suites.synthetic_batch(config, 4)
    assert batch["image"].shape == (4, 64, 64, 4) and batch["tokens"].shape == (4, 77)
    assert (batch["tokens"] == 0).any() and (batch["tokens"][:, 0] != 0).all()
    assert np.abs(batch["image"]).max() <= 1
