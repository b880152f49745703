"""Measure a trained model on the `shapes` test split, by what it can do.

    python -m mmjax.evaluate --workdir runs/vae --judge runs/judge --num 1000

- classify: attribute accuracy against the true labels (this is how the judge is checked);
- reconstruct: PSNR/SSIM of reconstructions of real test images (a GAN's by inversion);
- generate: images from the test captions, judged per attribute the caption names, also on
  the (color, shape) combinations held out of training; FD-judge, KID-judge and k-NN
  precision/recall in the judge's features; with `--clip runs/clip`, the CLIP score;
- held-out phrasings (every text-conditioned family): the same test images' captions phrased
  with the caption grammar's held-out constructions (`heldout_phrasing_split`), which no
  training caption uses; generators are judged on images from them, CLIP classifies zero-shot
  from prompts in those phrasings; each also on the unseen (color, shape) pairs;
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
import re
import sys
import time

import numpy as np

from mmjax.data import captions as grammar
from mmjax.data import shapes
from mmjax.data.shapes import COLOR_NAMES, ShapesSource, parse_caption
from mmjax.eval import (ATTRIBUTES, attribute_accuracy, clip_score, frechet_distance, kernel_distance,
                        precision_recall, ssim)


def test_split(image_size: int, num: int, seed: int = 0, captions: str = shapes.ABSENT_CAPTIONS,
               heldout_phrasing_share: float = 0.0) -> dict:
    """The first `num` test records: images, labels, `unseen`, `heldout_phrasing`, captions.

    `captions` is the caption style the model was trained on (`shapes.caption_style(config.data)`),
    so the plain rows score a model on its own training phrasings; by default no caption is a
    held-out phrasing (those have their own rows, from `heldout_phrasing_split`)."""
    source = ShapesSource("test", image_size=image_size, seed=seed, captions=captions,
                          heldout_phrasing_share=heldout_phrasing_share)
    if num > len(source):
        raise ValueError(f"--num {num} exceeds the test split ({len(source)} images)")
    records = [source[i] for i in range(num)]
    out = {k: np.stack([r[k] for r in records]) for k in ("image", *ATTRIBUTES, "unseen", "heldout_phrasing")}
    out["caption"] = [r["caption"] for r in records]
    out["phrasing"] = [r["phrasing"] for r in records]
    return out


def heldout_phrasing_split(image_size: int, num: int, seed: int = 0) -> dict:
    """Test captions with held-out phrasings: the first `num` test records (the same images and
    labels as `test_split`), each caption phrased by the grammar with one of its held-out
    constructions (`captions.HELDOUT`: key-value lists, relative clauses, "I'd like ...",
    "sketch ..."), which no training caption uses, whatever style the model was trained on.
    Deterministic in (seed, num); `unseen` marks the held-out (color, shape) pairs."""
    return test_split(image_size, num, seed, captions="grammar", heldout_phrasing_share=1.0)


def _named_labels(captions: list[str]) -> dict[str, np.ndarray]:
    """Attribute ids each caption asks for; -1 where the caption leaves it open."""
    parsed = [parse_caption(c) for c in captions]
    return {a: np.array([-1 if p[a] is None else p[a] for p in parsed], np.int32) for a in ATTRIBUTES}


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from mmjax.eval import psnr

    return psnr(a, b)


def evaluate_clip(model, data: dict, gallery: int = 256) -> dict:
    """Zero-shot accuracy per attribute, from the built-in prompts and from prompts in held-out
    phrasings (`captions.heldout_attribute_prompts`), and retrieval among the first `gallery`
    test images with their full captions (a hit: the retrieved item has the query's four
    attributes)."""
    out: dict = {}
    unseen = data["unseen"]
    for row, prompts in (("zero_shot", shapes.attribute_prompts),
                         ("zero_shot_heldout_phrasing", grammar.heldout_attribute_prompts)):
        out[row], out[row + "_unseen"] = {}, {}
        for attribute in ATTRIBUTES:
            names = shapes.ATTRIBUTES[attribute]
            classes = dict(zip(names, prompts(attribute)))
            predicted = np.array([names.index(n) for n in model.zero_shot(data["image"], classes)])
            correct = predicted == data[attribute]
            out[row][attribute] = float(correct.mean())
            out[row + "_unseen"][attribute] = float(correct[unseen].mean()) if unseen.any() else None
    gallery = min(gallery, len(data["image"]))
    labels = {a: data[a][:gallery] for a in ATTRIBUTES}
    index = shapes.label_index(labels)
    captions = [shapes.full_captions()[i] for i in index]
    sim = model.embed_texts(captions) @ model.embed_images(data["image"][:gallery]).T
    match = index[:, None] == index[None, :]
    unseen = unseen[:gallery]
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
    """The caption with its color word replaced, in the caption's letter case (a color name
    occurs once, as a whole word)."""
    def swap(match: re.Match) -> str:
        found, word = match.group(), COLOR_NAMES[new]
        return word.upper() if found.isupper() else word.capitalize() if found[0].isupper() else word

    return re.sub(rf"\b{COLOR_NAMES[old]}\b", swap, caption, count=1, flags=re.IGNORECASE)


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
             reconstructions: int | None = None, attention: int = 0) -> dict:
    """`edits` > 0 also scores that many prompt edits and inpaintings (diffusion, GAN);
    `attention` > 0 scores how well the colour and shape words' cross-attention maps sit on the
    object, over that many test captions and as many in held-out phrasings (diffusion); `clip`
    (a loaded CLIP model) adds the CLIP score of generated images; `reconstructions` caps how
    many test images are reconstructed (a GAN reconstructs by inversion, an optimisation per
    image: slow on a CPU).

    Generators are also judged on the same test images' captions in held-out phrasings
    (`generated_accuracy_heldout_phrasing`, and `..._unseen` on the held-out pairs); CLIP's
    zero-shot rows are repeated with prompts in held-out phrasings."""
    judge = _scorer(judge, "judge", "classify", model.image_size)
    clip = _scorer(clip, "clip", "embed_images", model.image_size)
    style = shapes.caption_style(model.config.data)
    data = test_split(model.image_size, num, captions=style)
    results: dict = {"num": num, "step": model.step, "family": model.config.family, "captions": style}
    generate_options = generate_options or {}
    batches = range(0, num, batch_size)
    if "classify" in model.methods:
        labels = {a: data[a] for a in ATTRIBUTES}
        results["accuracy"] = attribute_accuracy(data["image"], labels, model)
        results["accuracy_unseen"] = attribute_accuracy(data["image"], labels, model, mask=data["unseen"])
    if "reconstruct" in model.methods:
        count = num if reconstructions is None else min(num, reconstructions)
        recon = np.concatenate([model.reconstruct(data["image"][i:min(i + batch_size, count)],
                                                  data["caption"][i:min(i + batch_size, count)])
                                for i in range(0, count, batch_size)])
        results["psnr"] = float(np.mean(_psnr(recon, data["image"][:count])))
        results["ssim"] = float(np.mean(ssim(recon, data["image"][:count])))
        results["reconstructed"] = count
    if "zero_shot" in model.methods:
        results["clip"] = evaluate_clip(model, data, gallery)
    if "generate" in model.methods and judge is not None:
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
        heldout = heldout_phrasing_split(model.image_size, num)
        images = np.concatenate([model.generate(heldout["caption"][i:i + batch_size], num=1, seed=seed + i,
                                                **generate_options) for i in batches])
        named = _named_labels(heldout["caption"])
        results["generated_accuracy_heldout_phrasing"] = attribute_accuracy(images, named, judge)
        results["generated_accuracy_heldout_phrasing_unseen"] = attribute_accuracy(images, named, judge,
                                                                                   mask=heldout["unseen"])
        results["_images_heldout_phrasing"] = images
    if edits and judge is not None and "edit" in model.methods:
        results["edit"], results["_edited"] = evaluate_edit(model, judge, data, edits, seed)
    if edits and judge is not None and "inpaint" in model.methods:
        results["inpaint"], results["_inpainted"] = evaluate_inpaint(model, judge, data, edits, seed)
    if attention and "attention_maps" in model.methods:
        from mmjax.eval.localisation import attention_localisation

        count = min(attention, num)
        results["attention"] = attention_localisation(model, data["caption"][:count], seed=seed,
                                                      **generate_options)
        results["attention_heldout_phrasing"] = attention_localisation(
            model, heldout_phrasing_split(model.image_size, count, seed)["caption"], seed=seed, **generate_options)
    return results


def _scorer(model, name: str, method: str, image_size: int):
    """A judge or CLIP model (loaded, or a path to load), checked before anything is generated."""
    if model is None:
        return None
    if isinstance(model, str):
        from mmjax import api

        model = api.load(model)
    if method not in getattr(model, "methods", ()):
        family = getattr(getattr(model, "config", None), "family", type(model).__name__)
        raise ValueError(f"{name}= holds a {family!r} model, which cannot {method}")
    if model.image_size != image_size:
        raise ValueError(f"{name}= sees {model.image_size}x{model.image_size} images, the evaluated model "
                         f"makes {image_size}x{image_size}")
    return model


def in_loop_generation(config):
    """The loop's generator evaluation from `config.eval`, or None when it is off.

    Returns `fn(ema_params) -> dict`: images from the first `eval.num_generated` test captions
    (fixed seed, so steps are comparable), judged per attribute the caption names
    (`gen_<attribute>`), and (with a judge) the same for the same many captions in held-out
    phrasings (`gen_heldout_phrasing_<attribute>`, and `gen_heldout_phrasing_unseen_<attribute>`
    on the held-out pairs: the test split's first captions have only a few of those, so these
    are noisy; attributes no caption asks for are left out), FD/KID-judge and k-NN
    precision/recall against the real test images (with a judge), and the CLIP score (with a
    CLIP model). Bad workdirs fail here, before any training.
    """
    from mmjax import zoo
    from mmjax.handles import HANDLES

    settings = config.get("eval")
    if settings is None or not (settings.judge or settings.clip):
        return None
    family = zoo.FAMILIES[config.family]
    if "generate" not in family.abilities:
        raise ValueError(f"config keys 'eval.judge'/'eval.clip' score generated images, but the "
                         f"{config.family!r} family does not generate")
    try:
        judge = _scorer(settings.judge or None, "judge", "classify", config.data.image_size)
        clip = _scorer(settings.clip or None, "clip", "embed_images", config.data.image_size)
    except ValueError as e:
        raise ValueError(f"config keys 'eval.judge'/'eval.clip': {e}") from e
    num = settings.num_generated
    data = test_split(config.data.image_size, num, captions=shapes.caption_style(config.data))
    named = _named_labels(data["caption"])
    heldout = heldout_phrasing_split(config.data.image_size, num)
    heldout_named = _named_labels(heldout["caption"])
    real = _judge_features(judge, data["image"]) if judge is not None else None
    # The family's handle, its weights swapped in at each evaluation: the handle's compiled
    # `generate` traces the weights, so every evaluation reuses one program.
    model = HANDLES[config.family](config, zoo.build_model(config), None, 0, "")

    def run(params) -> dict:
        model.params = params
        images = np.concatenate([model.generate(data["caption"][i:i + 250], seed=i) for i in range(0, num, 250)])
        out = {}
        if judge is not None:
            accuracy = attribute_accuracy(images, named, judge)
            out.update({f"gen_{a}": accuracy[a] for a in ATTRIBUTES})
            phrased = np.concatenate([model.generate(heldout["caption"][i:i + 250], seed=i) for i in range(0, num, 250)])
            for row, mask in (("gen_heldout_phrasing", None), ("gen_heldout_phrasing_unseen", heldout["unseen"])):
                accuracy = attribute_accuracy(phrased, heldout_named, judge, mask=mask)
                # An attribute no caption in the sample asks for has no score (not NaN in the logs).
                out.update({f"{row}_{a}": accuracy[a] for a in ATTRIBUTES if accuracy[f"{a}_count"]})
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
    lines = [f"{results['family']} at step {results['step']}, {results['num']} test images"
             + (f", trained on {results['captions']} captions" if "captions" in results else "")]
    rows = {"accuracy": "accuracy", "accuracy_unseen": "accuracy_unseen",
            "generated_accuracy": "generated_accuracy", "generated_accuracy_unseen": "generated_accuracy_unseen",
            "generated_accuracy_heldout_phrasing": "held-out phrasings",
            "generated_accuracy_heldout_phrasing_unseen": "held-out phr., unseen"}
    for key, label in rows.items():
        if key in results:
            cells = "  ".join(f"{a} {results[key][a]:.3f} (n={results[key][a + '_count']})" for a in ATTRIBUTES)
            lines.append(f"  {label:<26} {cells}")
    if "psnr" in results:
        lines.append(f"  {'reconstruction PSNR / SSIM':<26} {results['psnr']:.2f} dB / {results['ssim']:.4f} "
                     f"(n={results['reconstructed']})")
    if "clip" in results:
        c = results["clip"]
        for key, label in (("zero_shot", "zero_shot"), ("zero_shot_unseen", "zero_shot_unseen"),
                           ("zero_shot_heldout_phrasing", "zero-shot, held-out phr."),
                           ("zero_shot_heldout_phrasing_unseen", "zero-shot, h.-o. phr. unseen")):
            if key in c:
                cells = "  ".join(f"{a} {_f(c[key][a])}" for a in ATTRIBUTES)
                lines.append(f"  {label:<26} {cells}")
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
    for key, label in (("attention", "attention on the object"), ("attention_heldout_phrasing", "  held-out phrasings")):
        if key in results:
            a = results[key]
            lines.append(f"  {label:<26} color word {a['color_word']:.2f}x  shape word {a['shape_word']:.2f}x "
                         f"the box's share (n={a['num']}; 1 = uniform)")
    return "\n".join(lines)


# The judge shipped with the repository: generators are scored by it unless --judge names another.
DEFAULT_JUDGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained", "cnn_shapes")


def default_judge(model, judge: str | None) -> str | None:
    """`judge`, or the shipped judge for a generator when none is named and it is there."""
    if judge is None and "generate" in model.methods and os.path.isdir(DEFAULT_JUDGE):
        print(f"judge: {os.path.relpath(DEFAULT_JUDGE)} (the shipped CNN judge; --judge names another)")
        return DEFAULT_JUDGE
    return judge


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--judge", help="a trained CNN judge (configs/cnn_shapes.py); generators default to "
                                        "the shipped pretrained/cnn_shapes")
    parser.add_argument("--clip", help="workdir of a trained CLIP (configs/clip_shapes.py) for the CLIP score")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=256, help="CLIP: test images to retrieve among")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest good one)")
    parser.add_argument("--attention", type=int, default=0,
                        help="diffusion: score per-word attention maps on this many test captions")
    parser.add_argument("--edits", type=int, default=0,
                        help="diffusion, GAN: also score this many edits (and inpaintings, diffusion)")
    parser.add_argument("--reconstructions", type=int,
                        help="reconstruct only the first N test images (default: all --num; GAN inversion is slow)")
    parser.add_argument("--guidance", type=float, help="diffusion: guidance scale (default: the config's)")
    parser.add_argument("--sampler", help="diffusion: sampler (default: the config's)")
    parser.add_argument("--steps", type=int, help="diffusion: sampling steps (default: the config's)")
    parser.add_argument("--grid", help="also write a PNG of the first generated (and edited) images")
    parser.add_argument("--out", help="where to write the JSON results (default: <workdir>/eval.json)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="show libraries' INFO lines (-vv: DEBUG)")
    args = parser.parse_args(argv)
    from mmjax.logs import setup_logging

    setup_logging(args.verbose)
    options = {k: v for k, v in (("guidance", args.guidance), ("sampler", args.sampler), ("steps", args.steps))
               if v is not None}

    from mmjax import api
    from mmjax.checkpoint import CheckpointError

    try:
        model = api.load(args.workdir, step=args.step)
        results = evaluate(model, judge=default_judge(model, args.judge), clip=args.clip, num=args.num, seed=args.seed, generate_options=options,
                           edits=args.edits, gallery=args.gallery, reconstructions=args.reconstructions,
                           attention=args.attention)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"mmjax.evaluate: {e}", file=sys.stderr)
        return 2
    images = {k: results.pop(k) for k in [k for k in results if k.startswith("_")]}
    if args.grid and images:
        from mmjax.images import save_png

        rows = [v[:16] for v in images.values()]
        save_png(api.grid(np.concatenate(rows), ncols=16, min_cell=0), args.grid)
    print(format_table(results))
    path = args.out or os.path.join(args.workdir, "eval.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
