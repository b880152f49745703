"""Measurement primitives: timing, ceilings, compile counting, XLA cost analysis, HLO facts.

Everything here is backend-neutral: the same code measures a 2-core CPU and an H200. Times
are wall-clock around calls whose outputs are synchronised with `block_until_ready`, after
warm-up, reported as the median of the timed calls.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 matrix rates from vendors' datasheets (TFLOP/s, no sparsity), printed beside the
# rate this run measures. Leads, never the denominator of MFU.
DATASHEET_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
}

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def block(tree) -> None:
    jax.block_until_ready(tree)


def median_time(fn: Callable[[], Any], *, warmup: int, iters: int) -> tuple[float, list[float]]:
    """Median seconds of `iters` synchronised calls of `fn()` after `warmup` untimed ones."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def device_info() -> dict:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
    }


def datasheet_tflops(device_kind: str) -> float | None:
    for name, value in DATASHEET_BF16_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return value
    return None


def measure_matmul_peak(n: int, dtype=jnp.bfloat16, *, iters: int = 10) -> dict:
    """Achieved FLOP/s of an n x n x n matrix product on random data (never zeros: they can
    run faster than real data). Three input pairs rotate so repeated calls do not measure a
    cache."""
    keys = jax.random.split(jax.random.key(0), 6)
    mats = [jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in keys]
    pairs = [(mats[i], mats[i + 3]) for i in range(3)]
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
    calls = iter(range(10**9))

    def call():
        a, b = pairs[next(calls) % 3]
        return matmul(a, b)

    seconds, _ = median_time(call, warmup=2, iters=iters)
    return {"n": n, "dtype": jnp.dtype(dtype).name, "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def measure_copy_bandwidth(num_bytes: int, *, iters: int = 10) -> dict:
    """Achieved bytes/s of a device-to-device copy (`x + 1` on float32), counting bytes read
    plus bytes written: the memory roofline's slope."""
    n = num_bytes // 4
    x = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    seconds, _ = median_time(lambda: copy(x), warmup=2, iters=iters)
    return {"bytes": 2 * 4 * n, "seconds": seconds, "gbps": 2 * 4 * n / seconds / 1e9}


class CompileCounter:
    """Counts requests for an executable while active: `events` (every backend compile
    request, a persistent-cache hit included), `cache_hits`, and `compiles` (the requests
    XLA really compiled)."""

    def __init__(self):
        self.events = 0
        self.cache_hits = 0

    @property
    def compiles(self) -> int:
        return max(self.events - self.cache_hits, 0)

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            self.events += 1

    def _on_event(self, event: str, **kwargs) -> None:
        if event == _CACHE_HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)


@contextlib.contextmanager
def no_host_transfers():
    """Any implicit host<->device transfer inside raises (jax.transfer_guard)."""
    with jax.transfer_guard("disallow"):
        yield


def cost(stage) -> dict:
    """FLOPs and bytes accessed from XLA's cost analysis of a lowered or compiled stage."""
    try:
        analysis = stage.cost_analysis()
    except Exception:  # some backends do not implement it
        return {"flops": None, "bytes": None}
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    flops = analysis.get("flops")
    moved = analysis.get("bytes accessed")
    return {"flops": float(flops) if flops is not None else None,
            "bytes": float(moved) if moved is not None else None}


def peak_memory_bytes() -> int | None:
    """The device allocator's peak, where the backend reports one (GPU, TPU; not CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def memory_analysis(compiled) -> dict:
    """XLA's own account of a compiled program's buffers (all backends)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return {}
    if m is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


def hlo_facts(hlo_text: str) -> dict:
    """What the optimised HLO says about how the program runs on the device.

    `cudnn_attention`: cuDNN fused-attention calls (forward and backward each count);
    `conditionals`/`while_loops`: control flow (XLA:GPU syncs with the host for each);
    `host_transfers`: send/recv/outfeed/infeed and host callbacks.
    """
    return {
        "cudnn_attention": len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo_text)),
        "cudnn_conv": len(re.findall(r'custom_call_target="__cudnn\$conv', hlo_text)),
        "cublas_gemm": len(re.findall(r'custom_call_target="__cublas\$(?:lt\$matmul|gemm)', hlo_text)),
        "triton_gemm": len(re.findall(r'__triton_gemm', hlo_text)),
        "fusions": len(re.findall(r"\bfusion\(", hlo_text)),
        "transposes": len(re.findall(r"\btranspose\(", hlo_text)),
        "conditionals": len(re.findall(r"\bconditional\(", hlo_text)),
        "while_loops": len(re.findall(r"\bwhile\(", hlo_text)),
        "host_transfers": len(re.findall(
            r"\b(?:send|recv|outfeed|infeed)\(|xla_python_(?:cpu|gpu)_callback|host_callback", hlo_text)),
    }


def roofline_fraction(flops: float, num_bytes: float, seconds: float, peak_tflops: float,
                      peak_gbps: float) -> float:
    """Achieved speed over the roofline's bound for this kernel's intensity: 1.0 is the ceiling."""
    bound = max(flops / (peak_tflops * 1e12), num_bytes / (peak_gbps * 1e9))
    return bound / seconds


def random_like(shape, dtype, key) -> jax.Array:
    if np.issubdtype(np.dtype(dtype), np.integer):
        return jax.random.randint(key, shape, 1, 200, dtype)
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)
