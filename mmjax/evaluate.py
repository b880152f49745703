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

from mmjax.data.shapes import COLOR_NAMES, ShapesSource, parse_caption
from mmjax.eval.attributes import ATTRIBUTES, attribute_accuracy
from mmjax.eval.frechet import frechet_distance


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


def _judge_features(judge, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    return np.concatenate([judge.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _recolor(caption: str, old: int, new: int) -> str:
    """The caption with its color word replaced (color names never occur elsewhere)."""
    return caption.replace(COLOR_NAMES[old], COLOR_NAMES[new], 1)


def evaluate_edit(model, judge, data: dict, num: int, seed: int = 0) -> dict:
    """"Change the color word": edit test images from their caption to the caption with another
    color; the judge should see the new color, and the old shape and position."""
    rng = np.random.default_rng(seed)
    num = min(num, len(data["caption"]))
    new_colors = (data["color"][:num] + rng.integers(1, len(COLOR_NAMES), num)) % len(COLOR_NAMES)
    targets = [_recolor(c, o, n) for c, o, n in zip(data["caption"][:num], data["color"][:num], new_colors)]
    images, captions = data["image"][:num], data["caption"][:num]
    edited = np.concatenate([model.edit(images[i:i + 250], captions[i:i + 250], targets[i:i + 250])
                             for i in range(0, num, 250)])
    labels = {"color": new_colors, "shape": data["shape"][:num], "position": data["position"][:num]}
    return {"num": num, **attribute_accuracy(edited, labels, judge)}, edited


def evaluate_inpaint(model, judge, data: dict, num: int, seed: int = 0) -> dict:
    """Paint the test captions' objects into empty (black) images, the mask a window around the
    position the caption names; the judge checks the color, the kept pixels are compared."""
    from mmjax.data.shapes import GRID_FRACTIONS, SIZE_FRACTIONS, caption_for

    size = model.image_size
    num = min(num, len(data["caption"]))
    prompts, masks = [], np.zeros((num, size, size), bool)
    half = int(np.ceil((SIZE_FRACTIONS["large"] + 0.06) * size))
    for i in range(num):
        labels = {a: int(data[a][i]) for a in ATTRIBUTES}
        prompts.append(caption_for(labels, include_size=True, include_position=True, template=0))
        cy = int(GRID_FRACTIONS[labels["position"] // 3] * size)
        cx = int(GRID_FRACTIONS[labels["position"] % 3] * size)
        masks[i, max(0, cy - half):cy + half, max(0, cx - half):cx + half] = True
    empty = np.zeros((num, size, size, 3), np.uint8)
    painted = np.concatenate([model.inpaint(empty[i:i + 250], masks[i:i + 250], prompts[i:i + 250], seed=seed + i)
                              for i in range(0, num, 250)])
    kept = ~masks
    mse = np.mean((painted[kept].astype(np.float64) - empty[kept]) ** 2) / 255.0 ** 2
    labels = {"color": data["color"][:num], "shape": data["shape"][:num]}
    return {"num": num, "unmasked_psnr": float(min(100.0, 10 * np.log10(1.0 / max(mse, 1e-10)))),
            **attribute_accuracy(painted, labels, judge)}, painted


def evaluate(model, *, judge=None, num: int = 1000, batch_size: int = 250, seed: int = 0,
             generate_options: dict | None = None, edits: int = 0) -> dict:
    """`edits` > 0 also scores that many prompt edits and inpaintings (diffusion)."""
    data = test_split(model.image_size, num)
    results: dict = {"num": num, "step": model.step, "family": model.config.family}
    generate_options = generate_options or {}
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
        images = np.concatenate([model.generate(data["caption"][i:i + batch_size], num=1, seed=seed + i,
                                                **generate_options) for i in batches])
        results["generate_seconds"] = time.perf_counter() - start
        results["generate_options"] = generate_options
        named = _named_labels(data["caption"])
        results["generated_accuracy"] = attribute_accuracy(images, named, judge)
        results["generated_accuracy_unseen"] = attribute_accuracy(images, named, judge, mask=data["unseen"])
        results["fd_judge"] = frechet_distance(_judge_features(judge, images), _judge_features(judge, data["image"]))
        results["_images"] = images
    if edits and judge is not None and "edit" in model.abilities:
        results["edit"], results["_edited"] = evaluate_edit(model, judge, data, edits, seed)
    if edits and judge is not None and "inpaint" in model.abilities:
        results["inpaint"], results["_inpainted"] = evaluate_inpaint(model, judge, data, edits, seed)
    return results


def format_table(results: dict) -> str:
    lines = [f"{results['family']} at step {results['step']}, {results['num']} test images"]
    for key in ("accuracy", "accuracy_unseen", "generated_accuracy", "generated_accuracy_unseen"):
        if key in results:
            cells = "  ".join(f"{a} {results[key][a]:.3f} (n={results[key][a + '_count']})" for a in ATTRIBUTES)
            lines.append(f"  {key:<26} {cells}")
    if "psnr" in results:
        lines.append(f"  {'reconstruction PSNR':<26} {results['psnr']:.2f} dB")
    if "fd_judge" in results:
        lines.append(f"  {'FD-judge (generated/test)':<26} {results['fd_judge']:.3f}")
    if "edit" in results:
        e = results["edit"]
        lines.append(f"  {'edit: color word':<26} new color {e['color']:.3f}  shape kept {e['shape']:.3f}  "
                     f"position kept {e['position']:.3f} (n={e['num']})")
    if "inpaint" in results:
        e = results["inpaint"]
        lines.append(f"  {'inpaint into empty region':<26} color {e['color']:.3f}  shape {e['shape']:.3f}  "
                     f"unmasked PSNR {e['unmasked_psnr']:.1f} dB (n={e['num']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--judge", help="workdir of a trained CNN judge (configs/cnn_shapes.py)")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest good one)")
    parser.add_argument("--edits", type=int, default=0, help="diffusion: also score this many edits/inpaintings")
    parser.add_argument("--guidance", type=float, help="diffusion: guidance scale (default: the config's)")
    parser.add_argument("--sampler", help="diffusion: sampler (default: the config's)")
    parser.add_argument("--steps", type=int, help="diffusion: sampling steps (default: the config's)")
    parser.add_argument("--grid", help="also write a PNG of the first generated (and edited) images")
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("guidance", args.guidance), ("sampler", args.sampler), ("steps", args.steps))
               if v is not None}

    from mmjax import api
    from mmjax.checkpoint import CheckpointError

    try:
        model = api.load(args.workdir, step=args.step)
        judge = api.load(args.judge) if args.judge else None
        results = evaluate(model, judge=judge, num=args.num, seed=args.seed, generate_options=options,
                           edits=args.edits)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"mmjax.evaluate: {e}", file=sys.stderr)
        return 2
    images = {k: results.pop(k) for k in [k for k in results if k.startswith("_")]}
    if args.grid and images:
        from mmjax.images import save_png

        rows = [v[:16] for v in images.values()]
        save_png(api.grid(np.concatenate(rows), ncols=16), args.grid)
    print(format_table(results))
    path = os.path.join(args.workdir, "eval.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
