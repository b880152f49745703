"""What the harness measures: the shared train step, sampling, and kernels at model shapes.

Each suite returns a flat-ish dict of numbers (JSON-ready). The train step benchmarked is the
one `train.py` runs (`make_train_step`, jitted with the same shardings and donation), fed a
synthetic batch already on the devices, so input pipelines stay out of the number.
"""

from __future__ import annotations

import functools
import inspect
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import sharding, zoo
from mmjax.bench import core
from mmjax.train.state import create_state, make_optimizers
from mmjax.train.step import make_train_step

# ---------------------------------------------------------------------------------------------
# Presets: the shapes the performance targets name, and a tiny twin of each for CPUs and tests
# ---------------------------------------------------------------------------------------------

PRESETS = {
    # The DDPM CIFAR-10 UNet (35.7M), pixels.
    "ddpm32": ("diffusion_shapes.py", {"variant": "ddpm32", "data.image_size": 32, "train.batch_size": 128},
               {"variant": "tiny_uncond", "data.image_size": 16, "train.batch_size": 8}),
    # The text-conditioned latent UNet (147M + 13M text encoder) on 64x64x4 latents, 77 tokens.
    "ldm64": ("diffusion_shapes.py", {"variant": "ldm64", "data.image_size": 64, "data.channels": 4,
                                      "data.max_len": 77, "train.batch_size": 64},
              {"variant": "tiny", "data.image_size": 16, "data.max_len": 16, "train.batch_size": 8}),
    # The families' 64x64 accelerator configs.
    "cnn64": ("cnn_shapes.py", {"variant": "64", "data.image_size": 64, "train.batch_size": 256},
              {"variant": "tiny", "data.image_size": 16, "train.batch_size": 8}),
    "vae64": ("vae_shapes.py", {"variant": "cond_64", "data.image_size": 64, "train.batch_size": 128},
              {"variant": "cond_tiny", "data.image_size": 16, "train.batch_size": 8}),
    # The GAN's joint G/D step (hinge + mismatch + lazy R1 + augmentation), 64x64.
    "gan64": ("gan_shapes.py", {"variant": "64", "model.g_widths": (512, 256, 128, 64),
                                "model.d_widths": (64, 128, 256, 512), "data.image_size": 64,
                                "train.batch_size": 128},
              {"variant": "tiny", "data.image_size": 16, "train.batch_size": 8}),
    # Diffusion transformers with flow matching on 32x32x4 latents (256x256 images), patch 2, 77
    # tokens: DiT-S/2 and DiT-B/2 with scanned blocks, and DiT-B/2 unrolled (compile time). The
    # config file's pixel-space `:tiny` is the base (the full one needs a VAE to validate).
    "dit_s2": ("flow_shapes.py:tiny", {"variant": "dit_s2", "data.image_size": 32, "data.channels": 4,
                                  "model.out_channels": 4, "data.max_len": 77, "train.batch_size": 256},
               {"variant": "dit_tiny", "data.image_size": 16, "data.max_len": 16, "train.batch_size": 8}),
    "dit_b2": ("flow_shapes.py:tiny", {"variant": "dit_b2", "data.image_size": 32, "data.channels": 4,
                                  "model.out_channels": 4, "data.max_len": 77, "train.batch_size": 256},
               {"variant": "dit_tiny", "data.image_size": 16, "data.max_len": 16, "train.batch_size": 8}),
    "dit_b2_unrolled": ("flow_shapes.py:tiny", {"variant": "dit_b2", "model.scan": False, "data.image_size": 32,
                                           "data.channels": 4, "model.out_channels": 4, "data.max_len": 77,
                                           "train.batch_size": 256},
                        {"variant": "dit_tiny", "model.scan": False, "data.image_size": 16, "data.max_len": 16,
                         "train.batch_size": 8}),
}

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs")


def preset_config(name: str, *, tiny: bool = False, dtype: str = "bfloat16", batch_size: int | None = None,
                  overrides=()):
    """The ConfigDict a preset names. Presets set fields directly (a latent-shaped UNet on
    synthetic 4-channel inputs is not a trainable `shapes` config), so the family's data
    checks are not run here; `--config` specs go through the full validation instead."""
    from mmjax import config as config_lib

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    file, full, small = PRESETS[name]
    # A file named with its variant (the latent configs' pixel-space `:tiny`) keeps it.
    config = config_lib.load_config(os.path.join(CONFIG_DIR, file) + (":tiny" if tiny and ":" not in file else ""))
    for key, value in {**(small if tiny else full), "dtype": dtype}.items():
        config_lib.set_value(config, key, value)
    if batch_size:
        config_lib.set_value(config, "train.batch_size", batch_size)
    config_lib.apply_overrides(config, overrides)
    return config


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random host data shaped like a pipeline batch (images in [-1, 1], non-empty captions)."""
    rng = np.random.default_rng(seed)
    size, channels, length = config.data.image_size, config.data.get("channels", 3), config.data.max_len
    tokens = rng.integers(3, 259, (batch_size, length)).astype(np.int32)
    lengths = rng.integers(length // 4 + 1, length + 1, batch_size)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0  # padded captions, as the tokenizer makes
    batch = {"image": rng.uniform(-1, 1, (batch_size, size, size, channels)).astype(np.float32),
             "tokens": tokens}
    for key, classes in (("shape", 3), ("color", 8), ("size", 2), ("position", 9)):
        batch[key] = rng.integers(0, classes, batch_size).astype(np.int32)
    return batch


def with_attention(config, implementation):
    """A copy of `config` whose model runs attention with `implementation` (None = auto)."""
    import copy

    config = copy.deepcopy(config)
    family = zoo.FAMILIES[config.family]
    fields = getattr(family.variants[config.variant], "func", family.variants[config.variant])
    if "implementation" in getattr(fields, "__dataclass_fields__", {}):
        with config.unlocked():
            config.model.implementation = implementation
    return config


def model_flops(config, batch_size: int) -> float | None:
    """FLOPs of one train step: XLA's cost analysis of the *unoptimised* program, lowered for
    the CPU with XLA's attention. The same count on every device: a compiled GPU program
    hides its convolutions and cuDNN attention in custom calls that count no FLOPs, and
    GPU backends cannot analyse an unoptimised program."""
    xla_config = with_attention(config, "xla")
    step_fn, init_fn = _make_step(xla_config)
    abstract = jax.eval_shape(init_fn)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in synthetic_batch(config, batch_size).items()}
    with jax.default_device(jax.devices("cpu")[0]):
        return core.cost(jax.jit(step_fn).lower(abstract, batch))["flops"]


def _make_step(config):
    family = zoo.FAMILIES[config.family]
    model = zoo.build_model(config)
    objectives = family.objectives(model, config)
    optimizers, schedules = make_optimizers(objectives, config)
    init_fn = functools.partial(create_state, family, model, config, optimizers, objectives)
    step_fn = make_train_step(objectives, optimizers, schedules, ema_decay=config.train.ema_decay,
                              grad_accum=config.train.grad_accum)
    return step_fn, init_fn


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def bench_train(config, *, steps: int = 20, warmup: int = 3, peak_tflops: float | None = None,
                profile_dir: str | None = None, dump_hlo: str | None = None, name: str = "train",
                warm_start: bool = True) -> dict:
    """Compile time (lower and compile apart), the first call through `jax.jit` (a persistent
    compilation-cache hit when the cache is on), steady-state step time, images/s, FLOPs,
    MFU, memory, and the guards: no compilation and no host transfer in steady state."""
    mesh = sharding.make_mesh()
    batch_size = config.train.batch_size
    sharding.check_batch_divisible(batch_size, mesh, per_device_multiple=config.train.grad_accum)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    step_fn, init_fn = _make_step(config)
    abstract = jax.eval_shape(init_fn)
    mode = config.train.get("param_sharding", "replicated")
    state_shardings = sharding.state_shardings(abstract, mesh, mode)
    # The state's bytes on the most loaded device under either mode, for this mesh.
    state_bytes = {m: sharding.bytes_per_device(jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
        sharding.state_shardings(abstract, mesh, m))) for m in sharding.PARAM_SHARDINGS}
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    host_batch = synthetic_batch(config, batch_size)
    batch = jax.device_put(host_batch, batch_sharding)
    batch_shardings = jax.tree.map(lambda _: batch_sharding, batch)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)

    with core.CompileCounter() as cold:
        t0 = time.perf_counter()
        lowered = jitted.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    hlo = compiled.as_text() or ""
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, f"{name}.optimized.hlo.txt"), "w") as f:
            f.write(hlo)
    facts = core.hlo_facts(hlo)
    compiled_cost = core.cost(compiled)
    print(f"[{name}] lowered in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s", flush=True)
    flops = model_flops(config, batch_size)

    # First call through jit: traces and lowers again, then compiles or loads the executable
    # from the persistent cache (what a restarted run pays), then runs one step.
    with core.CompileCounter() as first:
        t3 = time.perf_counter()
        state, metrics = jitted(state, batch)
        core.block((state, metrics))
        first_call = time.perf_counter() - t3

    # Warm start: drop every in-memory cache and compile again, as a restarted process would:
    # with the persistent compilation cache on, this is a cache hit, not a compile.
    warm = core.CompileCounter()
    warm_compile = None
    if warm_start:
        jax.clear_caches()
        with warm:
            t5 = time.perf_counter()
            jitted.lower(state, batch).compile()
            warm_compile = time.perf_counter() - t5

    def one_step():
        nonlocal state, metrics
        state, metrics = jitted(state, batch)
        return state, metrics

    with core.CompileCounter() as steady, core.no_host_transfers():
        step_seconds, times = core.median_time(one_step, warmup=warmup, iters=steps)
        # Back to back, as the training loop runs: dispatch runs ahead of the device.
        t4 = time.perf_counter()
        for _ in range(steps):
            one_step()
        core.block((state, metrics))
        pipelined = (time.perf_counter() - t4) / steps

    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        with jax.profiler.trace(os.path.join(profile_dir, name)):
            for _ in range(3):
                one_step()
            core.block((state, metrics))

    loss = float(jax.device_get(metrics["loss"] if "loss" in metrics else next(iter(metrics.values()))))
    best = min(step_seconds, pipelined)
    result = {
        "family": config.family, "variant": config.variant, "dtype": config.dtype,
        "batch_size": batch_size, "image_size": config.data.image_size,
        "params": count_params(state.params), "param_sharding": mode, "devices": mesh.devices.size,
        "state_bytes_per_device": state_bytes,
        "lower_s": t1 - t0, "compile_s": t2 - t1, "cold_compiles": cold.compiles,
        "first_call_s": first_call, "first_call_compiles": first.compiles,
        "warm_compile_s": warm_compile, "warm_compiles": warm.compiles, "warm_cache_hits": warm.cache_hits,
        "step_s_median": step_seconds, "step_s_min": min(times), "step_s_pipelined": pipelined,
        "images_per_s": batch_size / best,
        "steady_compiles": steady.events,
        "steady_host_transfers_blocked": True,
        "model_flops": flops, "compiled_flops": compiled_cost["flops"],
        "compiled_bytes": compiled_cost["bytes"],
        "loss_finite": bool(np.isfinite(loss)),
        "hlo": facts,
        "memory": core.memory_analysis(compiled),
        # The allocator's peak over the process so far (GPU/TPU): this target's, unless an
        # earlier target in the same run needed more; `memory` is XLA's account of this step.
        "peak_bytes_in_use": core.peak_memory_bytes(),
    }
    if flops:
        result["achieved_tflops"] = flops / best / 1e12
        if peak_tflops:
            result["mfu"] = result["achieved_tflops"] / peak_tflops
    return result


def bench_sample(config, *, batch_size: int, sampler: str | None = None, steps: int = 50, guidance: float = 3.0,
                 iters: int = 2) -> dict:
    """Images/s of the family's `generate` (one compiled program, `lax.scan` over steps).
    `sampler` None: the config's `sample.sampler`."""
    family = zoo.FAMILIES[config.family]
    if "generate" not in family.abilities:
        raise ValueError(f"family {config.family!r} cannot generate")
    model = zoo.build_model(config)
    host = synthetic_batch(config, batch_size)
    params, _ = jax.jit(lambda: family.init(model, jax.random.key(0), {k: jnp.asarray(v) for k, v in host.items()},
                                            config))()
    generate = family.abilities["generate"]
    settings = family.settings(config) if family.settings else None
    # The sampler settings a family's `generate` takes (diffusion, flow); a one-shot decoder
    # takes none.
    accepted = inspect.signature(generate).parameters
    sample = config.get("sample", {})
    sampler = sample.get("sampler") if sampler is None else sampler
    kwargs = {k: v for k, v in (("guidance", guidance), ("sampler", sampler), ("steps", steps), ("eta", 0.0),
                                ("shift", sample.get("shift", 1.0))) if k in accepted}
    fn = jax.jit(lambda p, tokens, rng: generate(model, p, settings, tokens, rng, **kwargs))
    tokens, rng = jnp.asarray(host["tokens"]), jax.random.key(1)
    t0 = time.perf_counter()
    compiled = fn.lower(params, tokens, rng).compile()
    compile_s = time.perf_counter() - t0
    facts = core.hlo_facts(compiled.as_text() or "")
    images = np.asarray(compiled(params, tokens, rng))  # also the warm-up
    seconds, _ = core.median_time(lambda: compiled(params, tokens, rng), warmup=0, iters=iters)
    out = {"family": config.family, "variant": config.variant, "dtype": config.dtype, "batch_size": batch_size,
           "compile_s": compile_s, "seconds": seconds, "images_per_s": batch_size / seconds,
           "finite": bool(np.isfinite(images).all()), "hlo": facts}
    if "steps" in kwargs:
        out.update({"sampler": sampler, "steps": steps, "guidance": guidance,
                    "network_evals_per_s": batch_size * steps * (2 if guidance != 1.0 else 1) / seconds})
    return out


# ---------------------------------------------------------------------------------------------
# Kernels at the shapes the models use
# ---------------------------------------------------------------------------------------------

def attention_shapes(tiny: bool) -> list[dict]:
    """(name, B, T, S, heads, head_dim, masked) of the models' attention layers."""
    if tiny:
        return [dict(name="self_tiny", B=4, T=64, S=64, N=2, H=16, mask=False),
                dict(name="cross_tiny", B=4, T=64, S=15, N=2, H=16, mask=True)]
    return [
        dict(name="ddpm32_self_16x16", B=128, T=256, S=256, N=1, H=256, mask=False),
        dict(name="ldm64_self_64x64", B=64, T=4096, S=4096, N=8, H=24, mask=False),
        # The same layer as 3 heads of 64: what a head_dim=64 LDM64 would run instead.
        dict(name="ldm64_self_64x64_3x64", B=64, T=4096, S=4096, N=3, H=64, mask=False),
        dict(name="ldm64_self_32x32", B=64, T=1024, S=1024, N=8, H=48, mask=False),
        dict(name="ldm64_cross_64x64", B=64, T=4096, S=77, N=8, H=24, mask=True),
        dict(name="ldm64_text_self", B=64, T=77, S=77, N=8, H=64, mask=True),
        dict(name="reference_4096", B=16, T=4096, S=4096, N=16, H=128, mask=False),
    ]


def bench_attention(shape: dict, implementations, dtype, peak_tflops, peak_gbps, iters=10) -> list[dict]:
    from mmjax.models.layers import attention

    B, T, S, N, H = shape["B"], shape["T"], shape["S"], shape["N"], shape["H"]
    keys = jax.random.split(jax.random.key(2), 3)
    q = core.random_like((B, T, N, H), dtype, keys[0])
    k = core.random_like((B, S, N, H), dtype, keys[1])
    v = core.random_like((B, S, N, H), dtype, keys[2])
    mask = None
    if shape["mask"]:
        lengths = jnp.asarray(np.random.default_rng(0).integers(S // 4 + 1, S + 1, B))
        mask = jnp.arange(S)[None, :] < lengths[:, None]
    itemsize = jnp.dtype(dtype).itemsize
    fwd_flops = 4.0 * B * N * T * S * H
    fwd_bytes = itemsize * (2 * B * T * N * H + 2 * B * S * N * H)
    reference = np.asarray(jax.jit(lambda q, k, v, m: attention(q, k, v, m, "xla"))(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask))
    rows = []
    for impl in implementations:
        if impl == "cudnn" and any(r.get("impl") == "auto" and r.get("ran") == "cudnn" for r in rows):
            continue  # auto already ran cuDNN: the forced run would time the same kernel again
        label = impl or "auto"
        fwd = jax.jit(lambda q, k, v, m, impl=impl: attention(q, k, v, m, impl))
        bwd = jax.jit(jax.grad(lambda q, k, v, m, impl=impl: jnp.sum(
            attention(q, k, v, m, impl).astype(jnp.float32)), argnums=(0, 1, 2)))
        for mode, fn, flops, moved in (("fwd", fwd, fwd_flops, fwd_bytes),
                                       ("fwd+bwd", bwd, 3.5 * fwd_flops, 3 * fwd_bytes)):
            row = {"kernel": "attention", "shape": shape["name"], "impl": label, "mode": mode}
            try:
                compiled = fn.lower(q, k, v, mask).compile()
                seconds, _ = core.median_time(lambda: compiled(q, k, v, mask), warmup=2, iters=iters)
            except Exception as e:  # not eligible on this device: say so, keep going
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                continue
            if mode == "fwd":  # correct first: against float32 XLA attention on the same inputs
                out = np.asarray(compiled(q, k, v, mask)).astype(np.float32)
                row["rel_err"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            row.update(seconds=seconds, tflops=flops / seconds / 1e12,
                       ran=("cudnn" if core.hlo_facts(compiled.as_text() or "")["cudnn_attention"] else "xla"))
            if peak_tflops and peak_gbps:
                row["roofline"] = core.roofline_fraction(flops, moved, seconds, peak_tflops, peak_gbps)
            rows.append(row)
    return rows


def conv_shapes(tiny: bool) -> list[dict]:
    if tiny:
        return [dict(name="conv_tiny", B=4, HW=16, C=16, O=16)]
    return [dict(name="ddpm32_conv_32x32x128", B=128, HW=32, C=128, O=128),
            dict(name="ldm64_conv_64x64x192", B=64, HW=64, C=192, O=192),
            dict(name="ldm64_conv_16x16x768", B=64, HW=16, C=768, O=768)]


def bench_conv(shape: dict, dtype, peak_tflops, peak_gbps, iters=10) -> list[dict]:
    """3x3 NHWC convolution, forward and forward+backward (input and weight gradients)."""
    B, HW, C, O = shape["B"], shape["HW"], shape["C"], shape["O"]
    x = core.random_like((B, HW, HW, C), dtype, jax.random.key(3))
    w = core.random_like((3, 3, C, O), dtype, jax.random.key(4)) * 0.05

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w).astype(jnp.float32)), argnums=(0, 1)))
    flops = 2.0 * B * HW * HW * C * O * 9
    moved = jnp.dtype(dtype).itemsize * (B * HW * HW * (C + O) + 9 * C * O)
    rows = []
    for mode, fn, f, m in (("fwd", jax.jit(conv), flops, moved), ("fwd+bwd", grad, 3 * flops, 3 * moved)):
        seconds, _ = core.median_time(lambda: fn(x, w), warmup=2, iters=iters)
        row = {"kernel": "conv3x3", "shape": shape["name"], "mode": mode, "seconds": seconds,
               "tflops": f / seconds / 1e12}
        if peak_tflops and peak_gbps:
            row["roofline"] = core.roofline_fraction(f, m, seconds, peak_tflops, peak_gbps)
        rows.append(row)
    return rows


def bench_groupnorm(shape: dict, dtype, peak_tflops, peak_gbps, iters=10) -> list[dict]:
    """The models' GroupNorm (float32 statistics, output in `dtype`): memory-bound, so GB/s."""
    from mmjax.models.layers import GroupNorm32

    B, HW, C = shape["B"], shape["HW"], shape["C"]
    x = core.random_like((B, HW, HW, C), dtype, jax.random.key(5))
    module = GroupNorm32(32, dtype=dtype)
    params = module.init(jax.random.key(0), x)
    fn = jax.jit(lambda p, x: module.apply(p, x))
    seconds, _ = core.median_time(lambda: fn(params, x), warmup=2, iters=iters)
    moved = 2 * x.size * jnp.dtype(dtype).itemsize
    row = {"kernel": "groupnorm", "shape": shape["name"], "mode": "fwd", "seconds": seconds,
           "gbps": moved / seconds / 1e9}
    if peak_tflops and peak_gbps:
        row["roofline"] = core.roofline_fraction(10.0 * x.size, moved, seconds, peak_tflops, peak_gbps)
    return [row]


def bench_kernels(*, tiny: bool, dtype, peak_tflops, peak_gbps) -> list[dict]:
    on_gpu = jax.default_backend() == "gpu"
    implementations = (None, "xla", "cudnn") if on_gpu else (None, "xla")
    rows = []
    for shape in attention_shapes(tiny):
        rows += bench_attention(shape, implementations, dtype, peak_tflops, peak_gbps)
    for shape in conv_shapes(tiny):
        rows += bench_conv(shape, dtype, peak_tflops, peak_gbps)
        rows += bench_groupnorm(shape, dtype, peak_tflops, peak_gbps)
    return rows
