"""Measure a trained model on the `shapes` test split, by what it can do.

    python -m mmjax.evaluate --workdir runs/vae --judge runs/judge --num 1000

- classify: attribute accuracy against the true labels (this is how the judge is checked);
- reconstruct: PSNR of reconstructions of real test images;
- generate: images from the test captions, judged per attribute the caption names, also on
  the (color, shape) combinations held out of training.
Prints a table and writes `eval.json` into the workdir (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from mmjax.data.shapes import ShapesSource, parse_caption
from mmjax.eval.attributes import ATTRIBUTES, attribute_accuracy


def test_split(image_size: int, num: int, seed: int = 0) -> dict:
    source = ShapesSource("test", image_size=image_size, seed=seed)
    if num > len(source):
        raise ValueError(f"--num {num} exceeds the test split ({len(source)} images)")
    records = [source[i] for i in range(num)]
    out = {k: np.stack([r[k] for r in records]) for k in ("image", *ATTRIBUTES, "unseen")}
    out["caption"] = [r["caption"] for r in records]
    return out


def _named_labels(captions: list[str]) -> dict[str, np.ndarray]:
    """Attribute ids each caption asks for; -1 where the caption leaves it open."""
    parsed = [parse_caption(c) for c in captions]
    return {a: np.array([-1 if p[a] is None else p[a] for p in parsed], np.int32) for a in ATTRIBUTES}


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = np.mean(np.square(a.astype(np.float64) / 255 - b.astype(np.float64) / 255), axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def evaluate(model, *, judge=None, num: int = 1000, batch_size: int = 250, seed: int = 0) -> dict:
    data = test_split(model.image_size, num)
    results: dict = {"num": num, "step": model.step, "family": model.config.family}
    batches = range(0, num, batch_size)
    if "classify" in model.abilities:
        labels = {a: data[a] for a in ATTRIBUTES}
        results["accuracy"] = attribute_accuracy(data["image"], labels, model)
        results["accuracy_unseen"] = attribute_accuracy(data["image"], labels, model, mask=data["unseen"])
    if "reconstruct" in model.abilities:
        recon = np.concatenate([model.reconstruct(data["image"][i:i + batch_size],
                                                  data["caption"][i:i + batch_size]) for i in batches])
        results["psnr"] = float(np.mean(_psnr(recon, data["image"])))
    if "generate" in model.abilities and judge is not None:
        start = time.perf_counter()
        images = np.concatenate([model.generate(data["caption"][i:i + batch_size], num=1, seed=seed + i)
                                 for i in batches])
        results["generate_seconds"] = time.perf_counter() - start
        named = _named_labels(data["caption"])
        results["generated_accuracy"] = attribute_accuracy(images, named, judge)
        results["generated_accuracy_unseen"] = attribute_accuracy(images, named, judge, mask=data["unseen"])
    return results


def format_table(results: dict) -> str:
    lines = [f"{results['family']} at step {results['step']}, {results['num']} test images"]
    for key in ("accuracy", "accuracy_unseen", "generated_accuracy", "generated_accuracy_unseen"):
        if key in results:
            cells = "  ".join(f"{a} {results[key][a]:.3f} (n={results[key][a + '_count']})" for a in ATTRIBUTES)
            lines.append(f"  {key:<26} {cells}")
    if "psnr" in results:
        lines.append(f"  {'reconstruction PSNR':<26} {results['psnr']:.2f} dB")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--judge", help="workdir of a trained CNN judge (configs/cnn_shapes.py)")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest good one)")
    args = parser.parse_args(argv)

    from mmjax import api
    from mmjax.checkpoint import CheckpointError

    try:
        model = api.load(args.workdir, step=args.step)
        judge = api.load(args.judge) if args.judge else None
        results = evaluate(model, judge=judge, num=args.num, seed=args.seed)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"mmjax.evaluate: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    path = os.path.join(args.workdir, "eval.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
