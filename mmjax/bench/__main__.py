"""`python -m mmjax.bench`: measure training, sampling and kernels on whatever device is here.

    python -m mmjax.bench                                  # every preset, every suite
    python -m mmjax.bench --preset ddpm32 --preset ldm64 --suite train
    python -m mmjax.bench --size full                      # the full presets even on a CPU (slow)
    python -m mmjax.bench --config configs/vae_shapes.py:tiny --config.train.batch_size=16
    python -m mmjax.bench --preset ldm64 --suite sample --sample-batch 64 --sample-steps 50

Prints a table and appends one JSON record (device, versions, settings, every number) to
`--out`. While it runs, the record so far sits in `<out>.partial.json`, so a run cut short
still leaves its numbers. `--profile DIR` writes a jax.profiler trace of three train steps
per target (TensorBoard / Perfetto); `--dump-hlo DIR` writes each step's optimised HLO.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import traceback

SUITES = ("train", "sample", "kernels")


def parse_args(argv):
    from mmjax.bench.suites import PRESETS

    p = argparse.ArgumentParser(prog="python -m mmjax.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="a benchmark shape (repeatable); default: all, unless --config is given")
    p.add_argument("--config", help="a config spec (path.py[:arg]) to benchmark instead of / beside presets")
    p.add_argument("--size", choices=("auto", "tiny", "full"), default="auto",
                   help="presets at full size or as CPU-sized twins (auto: tiny on a CPU, full elsewhere)")
    p.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="same as --size tiny")
    p.add_argument("--suite", action="append", choices=SUITES, help="default: all")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="compute dtype of presets (parameters stay float32)")
    p.add_argument("--batch-size", type=int, help="override every target's train batch size")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                   help="attention kernel inside the models (auto: cuDNN where eligible)")
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sampler", default=None, help="default: each config's sample.sampler")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-batch", type=int, default=None, help="default: the train batch size")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--matmul-size", type=int, default=None, help="side of the peak-measuring matmul")
    p.add_argument("--out", default="bench_results.jsonl", help="JSON-lines file the record is appended to")
    p.add_argument("--cache-dir", default=None,
                   help="persistent compilation cache (default: a fresh temporary one, so the cold "
                        "compile is cold and the first jit call shows the warm start); 'off' disables")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="skip the second compile that times a start from the persistent cache")
    p.add_argument("--profile", metavar="DIR")
    p.add_argument("--dump-hlo", metavar="DIR")
    args, rest = p.parse_known_args(argv)
    from mmjax.config import split_override_args

    try:
        args.overrides = split_override_args(rest)
    except ValueError as e:
        p.error(str(e))
    if args.overrides and not args.config and not args.preset:
        p.error("--config.* overrides need --config or --preset")
    if not args.preset and not args.config:
        args.preset = list(PRESETS)
    args.suite = args.suite or list(SUITES)
    for name in ("steps", "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _table(rows, columns) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_report(record: dict) -> str:
    out = [f"device: {record['device']['device_kind']} x{record['device']['device_count']} "
           f"({record['device']['platform']}), jax {record['versions']['jax']}"]
    c = record["ceilings"]
    out.append(f"measured peak: matmul {c['matmul']['n']}^3 {c['matmul']['dtype']} "
               f"{_fmt(c['matmul']['tflops'])} TFLOP/s (datasheet {_fmt(c.get('datasheet_tflops'))}); "
               f"copy {_fmt(c.get('copy', {}).get('gbps'))} GB/s")
    if record["train"]:
        out += ["", "train step"]
        rows = [{"target": t["target"], **t} for t in record["train"]]
        out.append(_table(rows, ["target", "variant", "batch_size", "params", "compile_s", "warm_compile_s",
                                 "step_s_median", "images_per_s", "achieved_tflops", "mfu",
                                 "steady_compiles", "error"]))
        out.append(_table([{"target": t["target"], **t.get("hlo", {})} for t in record["train"]],
                          ["target", "cudnn_attention", "cudnn_conv", "conditionals", "while_loops",
                           "host_transfers", "fusions"]))
    if record["sample"]:
        out += ["", "sampling"]
        out.append(_table([{"target": t["target"], **t} for t in record["sample"]],
                          ["target", "sampler", "steps", "guidance", "batch_size", "compile_s", "seconds",
                           "images_per_s", "error"]))
    if record["kernels"]:
        out += ["", "kernels"]
        out.append(_table(record["kernels"], ["kernel", "shape", "impl", "ran", "mode", "seconds", "tflops",
                                              "gbps", "roofline", "rel_err", "error"]))
    return "\n".join(out)


def _versions() -> dict:
    import flax
    import jax
    import jaxlib
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    cache = args.cache_dir or tempfile.mkdtemp(prefix="mmjax_bench_cache_")
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    import jax.numpy as jnp

    from mmjax import config as config_lib
    from mmjax import zoo
    from mmjax.bench import core, suites

    info = core.device_info()
    accelerator = info["platform"] != "cpu"
    tiny = args.size == "tiny" or (args.size == "auto" and not accelerator)
    if tiny and args.size == "auto":
        print("on a CPU: the presets' tiny twins (--size full for the full shapes)", flush=True)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m mmjax.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": info, "versions": _versions(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "settings": {k: v for k, v in vars(args).items() if k != "overrides"} | {"overrides": args.overrides},
        "ceilings": {}, "train": [], "sample": [], "kernels": [],
    }
    partial = args.out + ".partial.json"

    def checkpoint_record():
        os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
        with open(partial, "w") as f:
            json.dump(record, f, indent=1)

    n = args.matmul_size or (8192 if accelerator else 512)
    matmul = core.measure_matmul_peak(n, jnp.bfloat16)
    datasheet = core.datasheet_tflops(info["device_kind"])
    record["ceilings"] = {"matmul": matmul, "datasheet_tflops": datasheet}
    peak = matmul["tflops"]
    checkpoint_record()
    print(f"peak: {matmul['tflops']:.4g} TFLOP/s bf16 matmul (datasheet {datasheet})", flush=True)

    targets = []
    for name in args.preset or []:
        targets.append((name, suites.preset_config(name, tiny=tiny, dtype=args.dtype,
                                                   batch_size=args.batch_size, overrides=args.overrides)))
    if args.config:
        config = config_lib.load_config(args.config, args.overrides)
        if args.batch_size:
            config_lib.set_value(config, "train.batch_size", args.batch_size)
        targets.append((args.config, config))
    implementation = None if args.attention == "auto" else args.attention
    targets = [(name, suites.with_attention(config, implementation)) for name, config in targets]

    for name, config in targets:
        if "train" in args.suite:
            try:
                result = suites.bench_train(config, steps=args.steps, warmup=args.warmup, peak_tflops=peak,
                                            profile_dir=args.profile, dump_hlo=args.dump_hlo, name=name,
                                            warm_start=args.warm_start)
            except Exception as e:  # one target failing must not lose the others' numbers
                traceback.print_exc()
                result = {"variant": config.variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                if args.attention == "auto" and accelerator:
                    # cuDNN attention can pass JAX's checks and still fail in XLA: say so, and
                    # measure the step with XLA's attention rather than nothing.
                    error = result["error"]
                    try:
                        result = suites.bench_train(suites.with_attention(config, "xla"), steps=args.steps,
                                                    warmup=args.warmup, peak_tflops=peak, name=name)
                        result["auto_attention_error"] = error
                        result["attention"] = "xla (fallback)"
                    except Exception as e2:
                        traceback.print_exc()
                        result["fallback_error"] = f"{type(e2).__name__}: {str(e2)[:300]}"
            record["train"].append({"target": name, **result})
            checkpoint_record()
            print(json.dumps({"train": record["train"][-1]}), flush=True)
        if "sample" in args.suite and "generate" in zoo.FAMILIES[config.family].abilities:
            batch = args.sample_batch or config.train.batch_size
            try:
                result = suites.bench_sample(config, batch_size=batch, sampler=args.sampler,
                                             steps=args.sample_steps, guidance=args.guidance)
            except Exception as e:
                traceback.print_exc()
                result = {"variant": config.variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            record["sample"].append({"target": name, **result})
            checkpoint_record()
            print(json.dumps({"sample": record["sample"][-1]}), flush=True)

    # The copy that measures bandwidth allocates gigabytes: after the targets, so that the
    # allocator's peak they report is theirs.
    copy = core.measure_copy_bandwidth((2 << 30) if accelerator else (64 << 20))
    record["ceilings"]["copy"] = copy
    print(f"peak: {copy['gbps']:.4g} GB/s device copy", flush=True)
    if "kernels" in args.suite:
        record["kernels"] = suites.bench_kernels(tiny=tiny or not accelerator, dtype=jnp.dtype(args.dtype),
                                                 peak_tflops=peak, peak_gbps=copy["gbps"])
        checkpoint_record()

    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    os.remove(partial)
    print(format_report(record))
    print(f"\nrecord appended to {args.out}")
    failed = [t["target"] for t in record["train"] + record["sample"] if "error" in t]
    if failed:
        print(f"FAILED targets: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
