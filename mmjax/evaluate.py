"""Measure a trained model on the `shapes` test split, by what it can do.

    python -m mmjax.evaluate --workdir runs/vae --judge runs/judge --num 1000

- classify: attribute accuracy against the true labels (this is how the judge is checked);
- reconstruct: PSNR/SSIM of reconstructions of real test images (a GAN's by inversion);
- generate: images from the test captions, judged per attribute the caption names, also on
  the (color, shape) combinations held out of training; FD-judge, KID-judge and k-NN
  precision/recall in the judge's features; with `--clip runs/clip`, the CLIP score;
- CLIP models: zero-shot accuracy per attribute (also on the unseen combinations) and
  retrieval recall@1/@5 among `--gallery` test images with full captions;
- edit (`--edits N`): "change the color word" on N test images, judged for the new color and
  the kept shape and position.
Prints a table and writes `eval.json` into the workdir (or `--out`), atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from mmjax.data import shapes
from mmjax.data.shapes import COLOR_NAMES, ShapesSource, parse_caption
from mmjax.eval import (ATTRIBUTES, attribute_accuracy, clip_score, frechet_distance, kernel_distance,
                        precision_recall, ssim)


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
    from mmjax.eval import psnr

    return psnr(a, b)


def evaluate_clip(model, data: dict, gallery: int = 256) -> dict:
    """Zero-shot accuracy per attribute, and retrieval among the first `gallery` test images
    with their full captions (a hit: the retrieved item has the query's four attributes)."""
    out: dict = {"zero_shot": {}, "zero_shot_unseen": {}}
    for attribute in ATTRIBUTES:
        names = shapes.ATTRIBUTES[attribute]
        predicted = np.array([names.index(n) for n in model.zero_shot(data["image"], attribute)])
        correct = predicted == data[attribute]
        out["zero_shot"][attribute] = float(correct.mean())
        out["zero_shot_unseen"][attribute] = float(correct[data["unseen"]].mean()) if data["unseen"].any() else None
    gallery = min(gallery, len(data["image"]))
    labels = {a: data[a][:gallery] for a in ATTRIBUTES}
    index = shapes.label_index(labels)
    captions = [shapes.full_captions()[i] for i in index]
    sim = model.embed_texts(captions) @ model.embed_images(data["image"][:gallery]).T
    match = index[:, None] == index[None, :]
    unseen = data["unseen"][:gallery]
    for name, scores in (("t2i", sim), ("i2t", sim.T)):
        top = np.argsort(-scores, axis=1)[:, :5]
        hits = np.take_along_axis(match, top, axis=1)
        for k in (1, 5):
            hit = hits[:, :k].any(axis=1)
            out[f"{name}_recall@{k}"] = float(hit.mean())
            out[f"{name}_recall@{k}_unseen"] = float(hit[unseen].mean()) if unseen.any() else None
    out["gallery"] = gallery
    out["gallery_unseen"] = int(unseen.sum())
    return out


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


def evaluate(model, *, judge=None, clip=None, num: int = 1000, batch_size: int = 250, seed: int = 0,
             generate_options: dict | None = None, edits: int = 0, gallery: int = 256,
             reconstructions: int | None = None) -> dict:
    """`edits` > 0 also scores that many prompt edits and inpaintings (diffusion, GAN); `clip`
    (a loaded CLIP model) adds the CLIP score of generated images; `reconstructions` caps how
    many test images are reconstructed (a GAN reconstructs by inversion, an optimisation per
    image: slow on a CPU)."""
    data = test_split(model.image_size, num)
    results: dict = {"num": num, "step": model.step, "family": model.config.family}
    generate_options = generate_options or {}
    batches = range(0, num, batch_size)
    if "classify" in model.abilities:
        labels = {a: data[a] for a in ATTRIBUTES}
        results["accuracy"] = attribute_accuracy(data["image"], labels, model)
        results["accuracy_unseen"] = attribute_accuracy(data["image"], labels, model, mask=data["unseen"])
    if "reconstruct" in model.abilities:
        count = num if reconstructions is None else min(num, reconstructions)
        recon = np.concatenate([model.reconstruct(data["image"][i:min(i + batch_size, count)],
                                                  data["caption"][i:min(i + batch_size, count)])
                                for i in range(0, count, batch_size)])
        results["psnr"] = float(np.mean(_psnr(recon, data["image"][:count])))
        results["ssim"] = float(np.mean(ssim(recon, data["image"][:count])))
        results["reconstructed"] = count
    if "zero_shot" in model.abilities:
        results["clip"] = evaluate_clip(model, data, gallery)
    if "generate" in model.abilities and judge is not None:
        start = time.perf_counter()
        images = np.concatenate([model.generate(data["caption"][i:i + batch_size], num=1, seed=seed + i,
                                                **generate_options) for i in batches])
        results["generate_seconds"] = time.perf_counter() - start
        results["generate_options"] = generate_options
        named = _named_labels(data["caption"])
        results["generated_accuracy"] = attribute_accuracy(images, named, judge)
        results["generated_accuracy_unseen"] = attribute_accuracy(images, named, judge, mask=data["unseen"])
        fake, real = _judge_features(judge, images), _judge_features(judge, data["image"])
        results["fd_judge"] = frechet_distance(fake, real)
        kid = kernel_distance(fake, real, subset_size=min(500, num))
        results["kid_judge"], results["kid_judge_std"] = kid["kid"], kid["kid_std"]
        results.update({f"{k}_judge": v for k, v in precision_recall(real, fake).items()})
        if clip is not None:
            results["clip_score"] = clip_score(clip, images, data["caption"])
            results["clip_score_real"] = clip_score(clip, data["image"], data["caption"])
        results["_images"] = images
    if edits and judge is not None and "edit" in model.abilities:
        results["edit"], results["_edited"] = evaluate_edit(model, judge, data, edits, seed)
    if edits and judge is not None and "inpaint" in model.abilities:
        results["inpaint"], results["_inpainted"] = evaluate_inpaint(model, judge, data, edits, seed)
    return results


def in_loop_generation(config):
    """The loop's generator evaluation from `config.eval`, or None when it is off.

    Returns `fn(ema_params) -> dict`: images from the first `eval.num_generated` test captions
    (fixed seed, so steps are comparable), judged per attribute the caption names
    (`gen_<attribute>`), FD/KID-judge and k-NN precision/recall against the real test images
    (with a judge), and the CLIP score (with a CLIP model). Bad workdirs fail here, before
    any training.
    """
    import jax

    from mmjax import api, sharding, zoo
    from mmjax.data.tokenizer import ByteTokenizer

    settings = config.get("eval")
    if settings is None or not (settings.judge or settings.clip):
        return None
    family = zoo.FAMILIES[config.family]
    if "generate" not in family.abilities:
        raise ValueError(f"config keys 'eval.judge'/'eval.clip' score generated images, but the "
                         f"{config.family!r} family does not generate")
    judge = api.load(settings.judge) if settings.judge else None
    clip = api.load(settings.clip) if settings.clip else None
    if judge is not None and "classify" not in judge.abilities:
        raise ValueError(f"config key 'eval.judge': {settings.judge!r} holds a {judge.config.family!r} model, not a judge")
    if clip is not None and "embed_images" not in clip.abilities:
        raise ValueError(f"config key 'eval.clip': {settings.clip!r} holds a {clip.config.family!r} model, not a CLIP")
    num = settings.num_generated
    data = test_split(config.data.image_size, num)
    named = _named_labels(data["caption"])
    real = _judge_features(judge, data["image"]) if judge is not None else None
    module = zoo.build_model(config)
    generate = jax.jit(lambda params, tokens, rng: family.abilities["generate"](module, params, config, tokens, rng))
    replicated = sharding.replicated(sharding.make_mesh())
    tokens = jax.device_put(ByteTokenizer(config.data.max_len).encode(data["caption"]), replicated)

    def run(params) -> dict:
        from mmjax.images import to_uint8

        chunks = [jax.device_get(generate(params, tokens[i:i + 250], jax.random.key(i)))
                  for i in range(0, num, 250)]
        images = to_uint8(np.concatenate(chunks))
        out = {}
        if judge is not None:
            accuracy = attribute_accuracy(images, named, judge)
            out.update({f"gen_{a}": accuracy[a] for a in ATTRIBUTES})
            fake = _judge_features(judge, images)
            out["fd_judge"] = frechet_distance(fake, real)
            out["kid_judge"] = kernel_distance(fake, real, subset_size=min(500, num))["kid"]
            out.update({f"{k}_judge": v for k, v in precision_recall(real, fake).items()})
        if clip is not None:
            out["clip_score"] = clip_score(clip, images, data["caption"])
        return out

    return run


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: dict) -> str:
    lines = [f"{results['family']} at step {results['step']}, {results['num']} test images"]
    for key in ("accuracy", "accuracy_unseen", "generated_accuracy", "generated_accuracy_unseen"):
        if key in results:
            cells = "  ".join(f"{a} {results[key][a]:.3f} (n={results[key][a + '_count']})" for a in ATTRIBUTES)
            lines.append(f"  {key:<26} {cells}")
    if "psnr" in results:
        lines.append(f"  {'reconstruction PSNR / SSIM':<26} {results['psnr']:.2f} dB / {results['ssim']:.4f} "
                     f"(n={results['reconstructed']})")
    if "clip" in results:
        c = results["clip"]
        for key in ("zero_shot", "zero_shot_unseen"):
            cells = "  ".join(f"{a} {_f(c[key][a])}" for a in ATTRIBUTES)
            lines.append(f"  {key:<26} {cells}")
        for name in ("t2i", "i2t"):
            lines.append(f"  {name + ' retrieval':<26} recall@1 {_f(c[name + '_recall@1'])}  "
                         f"recall@5 {_f(c[name + '_recall@5'])}  unseen queries: recall@1 "
                         f"{_f(c[name + '_recall@1_unseen'])} (gallery {c['gallery']}, "
                         f"{c['gallery_unseen']} unseen)")
    if "fd_judge" in results:
        lines.append(f"  {'FD-judge (generated/test)':<26} {results['fd_judge']:.3f}")
        lines.append(f"  {'KID-judge':<26} {results['kid_judge']:.4f} ± {results['kid_judge_std']:.4f}")
        lines.append(f"  {'precision / recall (judge)':<26} {results['precision_judge']:.3f} / "
                     f"{results['recall_judge']:.3f}")
    if "clip_score" in results:
        lines.append(f"  {'CLIP score':<26} {results['clip_score']:.4f} (real test images: "
                     f"{results['clip_score_real']:.4f})")
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
    parser.add_argument("--clip", help="workdir of a trained CLIP (configs/clip_shapes.py) for the CLIP score")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=256, help="CLIP: test images to retrieve among")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest good one)")
    parser.add_argument("--edits", type=int, default=0,
                        help="diffusion, GAN: also score this many edits (and inpaintings, diffusion)")
    parser.add_argument("--reconstructions", type=int,
                        help="reconstruct only the first N test images (default: all --num; GAN inversion is slow)")
    parser.add_argument("--guidance", type=float, help="diffusion: guidance scale (default: the config's)")
    parser.add_argument("--sampler", help="diffusion: sampler (default: the config's)")
    parser.add_argument("--steps", type=int, help="diffusion: sampling steps (default: the config's)")
    parser.add_argument("--grid", help="also write a PNG of the first generated (and edited) images")
    parser.add_argument("--out", help="where to write the JSON results (default: <workdir>/eval.json)")
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("guidance", args.guidance), ("sampler", args.sampler), ("steps", args.steps))
               if v is not None}

    from mmjax import api
    from mmjax.checkpoint import CheckpointError

    try:
        model = api.load(args.workdir, step=args.step)
        judge = api.load(args.judge) if args.judge else None
        clip = api.load(args.clip) if args.clip else None
        if clip is not None and "embed_images" not in clip.abilities:
            raise ValueError(f"--clip {args.clip!r} holds a {clip.config.family!r} model, not a CLIP model")
        results = evaluate(model, judge=judge, clip=clip, num=args.num, seed=args.seed, generate_options=options,
                           edits=args.edits, gallery=args.gallery, reconstructions=args.reconstructions)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"mmjax.evaluate: {e}", file=sys.stderr)
        return 2
    images = {k: results.pop(k) for k in [k for k in results if k.startswith("_")]}
    if args.grid and images:
        from mmjax.images import save_png

        rows = [v[:16] for v in images.values()]
        save_png(api.grid(np.concatenate(rows), ncols=16), args.grid)
    print(format_table(results))
    path = args.out or os.path.join(args.workdir, "eval.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
