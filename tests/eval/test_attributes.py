import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mmjax.eval import ATTRIBUTES, attribute_accuracy
from tests.helpers import REPO


class FixedJudge:
    """Predicts labels given up front, so accuracy can be computed by hand."""

    def __init__(self, predictions):
        self.predictions = predictions
        self.calls = 0

    def classify(self, images):
        start = self.calls
        self.calls += len(images)
        return {k: v[start:start + len(images)] for k, v in self.predictions.items()}


def test_attribute_accuracy_by_hand():
    judge = FixedJudge({"shape": np.array([0, 1, 2, 0]), "color": np.array([3, 3, 3, 3])})
    labels = {"shape": np.array([0, 1, 0, 0]), "color": np.array([3, -1, 2, -1])}
    result = attribute_accuracy(np.zeros((4, 8, 8, 3), np.uint8), labels, judge, batch_size=3)
    assert result["shape"] == pytest.approx(0.75) and result["shape_count"] == 4
    assert result["color"] == pytest.approx(0.5) and result["color_count"] == 2  # -1 = not asked


def test_attribute_accuracy_mask_and_unknown_head():
    judge = FixedJudge({"shape": np.array([0, 1, 2, 0])})
    labels = {"shape": np.array([0, 0, 2, 1])}
    result = attribute_accuracy(np.zeros((4, 8, 8, 3), np.uint8), labels, judge,
                                mask=np.array([True, False, True, False]))
    assert result["shape"] == 1.0 and result["shape_count"] == 2
    with pytest.raises(KeyError, match="size"):
        attribute_accuracy(np.zeros((4, 8, 8, 3), np.uint8), {"size": np.zeros(4, int)},
                           FixedJudge({"shape": np.zeros(4, int)}))


def test_evaluate_cli_judges_generations(vae_run, cnn_run, clip_run):
    vae_dir, _, _ = vae_run
    judge_dir, _, _ = cnn_run
    clip_dir, _ = clip_run
    proc = subprocess.run([sys.executable, "-m", "mmjax.evaluate", "--workdir", vae_dir, "--judge", judge_dir,
                           "--clip", clip_dir, "--num", "64"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(vae_dir, "eval.json")) as f:
        results = json.load(f)
    assert results["num"] == 64 and 0 < results["psnr"] < 100
    for attribute in ("shape", "color", "size", "position"):
        assert 0.0 <= results["generated_accuracy"][attribute] <= 1.0
    assert results["generated_accuracy"]["color_count"] == 64  # every caption names the color
    assert results["generated_accuracy"]["size_count"] < 64  # some captions leave size open
    assert 0 < results["ssim"] <= 1 and results["fd_judge"] > 0
    assert abs(results["kid_judge"]) < 1e3 and results["kid_judge_std"] >= 0
    assert 0 <= results["precision_judge"] <= 1 and 0 <= results["recall_judge"] <= 1
    assert -1 <= results["clip_score"] <= 1 and -1 <= results["clip_score_real"] <= 1
    assert "KID-judge" in proc.stdout and "CLIP score" in proc.stdout
    assert results["captions"] == "grammar" and "held-out phrasings" in proc.stdout
    for key in ("generated_accuracy_heldout_phrasing", "generated_accuracy_heldout_phrasing_unseen"):
        assert results[key]["color_count"] == (64 if key.endswith("phrasing") else results[key]["shape_count"])
        assert 0.0 <= results[key]["shape"] <= 1.0
    os.remove(os.path.join(vae_dir, "eval.json"))  # the shared run stays as sample tests expect


def test_judge_classifies_real_images(cnn_run):
    import mmjax
    from mmjax.evaluate import evaluate

    workdir, _, _ = cnn_run
    judge = mmjax.load(workdir)
    results = evaluate(judge, num=64)
    assert set(results["accuracy"]) >= {"shape", "color", "size", "position"}
    assert results["accuracy"]["shape_count"] == 64


def test_generators_are_scored_in_the_loop(tmp_path, cnn_run, clip_run):
    from mmjax.evaluate import in_loop_generation
    from mmjax.train.loop import train
    from tests.helpers import tiny_config

    judge_dir, clip_dir = cnn_run[0], clip_run[0]
    config = tiny_config("vae_shapes", f"eval.judge={judge_dir}", f"eval.clip={clip_dir}", "eval.num_generated=32",
                         "train.num_steps=10", "train.eval_every=5")
    workdir = str(tmp_path / "vae")
    train(config, workdir, extra_eval=in_loop_generation(config))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    scored = {r["step"]: r for r in rows if "eval/gen_color" in r}
    assert set(scored) == {5, 10}
    for row in scored.values():
        assert "eval/psnr" in row  # the family's own evaluation still runs beside it
        assert 0 <= row["eval/gen_color"] <= 1 and 0 <= row["eval/gen_shape"] <= 1
        assert 0 <= row["eval/gen_heldout_phrasing_color"] <= 1 and 0 <= row["eval/gen_heldout_phrasing_shape"] <= 1
        assert row["eval/fd_judge"] > 0 and 0 <= row["eval/precision_judge"] <= 1
        assert -1 <= row["eval/clip_score"] <= 1


def test_in_loop_generation_is_off_by_default_and_names_bad_settings(cnn_run, clip_run):
    from mmjax.evaluate import in_loop_generation
    from tests.helpers import tiny_config

    assert in_loop_generation(tiny_config("vae_shapes")) is None
    with pytest.raises(ValueError, match="eval.clip.*cannot embed_images"):
        in_loop_generation(tiny_config("vae_shapes", f"eval.clip={cnn_run[0]}"))
    with pytest.raises(ValueError, match="does not generate"):
        in_loop_generation(tiny_config("clip_shapes", f"eval.judge={cnn_run[0]}"))


# ----------------------------------------------------------------------------- held-out phrasings
# Fakes that read and write labels as pixels, so the rows can be checked by hand: image[0, 0] holds
# (shape, color, size), image[0, 1, 0] the position.

def _vocabulary():
    from mmjax.data import ShapesSource

    source = ShapesSource("train", image_size=16, num_records=5000)
    return {w for i in range(len(source)) for w in re.findall(r"[a-z']+", source[i]["caption"].lower())}


def _encode(labels: dict) -> np.ndarray:
    image = np.zeros((16, 16, 3), np.uint8)
    image[0, 0] = (labels["shape"], labels["color"], labels["size"])
    image[0, 1, 0] = labels["position"]
    return image


def _decode(images) -> dict:
    images = np.asarray(images)
    return {"shape": images[:, 0, 0, 0].astype(int), "color": images[:, 0, 0, 1].astype(int),
            "size": images[:, 0, 0, 2].astype(int), "position": images[:, 0, 1, 0].astype(int)}


class OracleJudge:
    methods = ("classify",)
    image_size = 16

    def classify(self, images):
        return _decode(images)

    def features(self, images):
        decoded = _decode(images)
        onehots = [np.eye(n)[decoded[a]] for a, n in (("shape", 3), ("color", 8), ("size", 2), ("position", 9))]
        noise = np.random.default_rng(len(images)).normal(0, 0.1, (len(images), 22))
        return np.concatenate(onehots, axis=1) + noise


class MemorisingGenerator:
    """Draws exactly what a caption names, unless the caption holds a word no train caption has:
    then it gets the color wrong, as a model that memorised its captions' wording does."""

    methods = ("generate",)
    image_size = 16
    step = 0

    def __init__(self):
        import ml_collections

        self.config = ml_collections.ConfigDict({"family": "fake", "data": {"captions": "grammar"}})
        self.vocabulary = _vocabulary()

    def generate(self, captions, num=1, seed=0, **options):
        from mmjax.data.shapes import parse_caption

        images = []
        for caption in captions:
            labels = {k: v or 0 for k, v in parse_caption(caption).items()}
            if set(re.findall(r"[a-z']+", caption.lower())) - self.vocabulary:
                labels["color"] = (labels["color"] + 1) % 8
            images.append(_encode(labels))
        return np.stack(images)


def test_heldout_phrasing_split_is_deterministic_and_labelled():
    from mmjax.data.shapes import parse_caption
    from mmjax.evaluate import heldout_phrasing_split, test_split

    a, b = heldout_phrasing_split(16, 300), heldout_phrasing_split(16, 300)
    assert a["caption"] == b["caption"] and a["heldout_phrasing"].all()
    plain = test_split(16, 300, captions="grammar")
    assert not plain["heldout_phrasing"].any()
    assert (a["image"] == plain["image"]).all() and (a["unseen"] == plain["unseen"]).all()
    assert sum(x != y for x, y in zip(a["caption"], plain["caption"])) == 300
    assert 10 < a["unseen"].sum() < 80
    for i, caption in enumerate(a["caption"]):
        parsed = parse_caption(caption)
        assert parsed["color"] == a["color"][i] and parsed["shape"] == a["shape"][i]
    # A model trained on the templates is scored on the templates; its held-out rows the same.
    old = test_split(16, 5, captions="templates")
    assert old["caption"][0] == "a large green triangle at the top right"
    assert heldout_phrasing_split(16, 5, seed=1)["caption"] != a["caption"][:5]


def test_evaluate_reports_heldout_phrasing_rows():
    from mmjax.evaluate import evaluate, format_table

    results = evaluate(MemorisingGenerator(), judge=OracleJudge(), num=96, batch_size=50)
    assert results["captions"] == "grammar"
    assert results["generated_accuracy"]["color"] == 1.0 and results["generated_accuracy"]["color_count"] == 96
    heldout = results["generated_accuracy_heldout_phrasing"]
    assert heldout["color"] == 0.0 and heldout["color_count"] == 96
    assert heldout["shape"] == 1.0 and heldout["position"] == 1.0
    unseen = results["generated_accuracy_heldout_phrasing_unseen"]
    assert unseen["color"] == 0.0 and 0 < unseen["color_count"] < 96
    assert results["_images_heldout_phrasing"].shape == (96, 16, 16, 3)
    table = format_table({k: v for k, v in results.items() if not k.startswith("_")})
    assert "held-out phrasings" in table and "held-out phr., unseen" in table and "grammar captions" in table


class MemorisingClip:
    """Zero-shot from pixels, but a class whose prompts hold words no train caption has is never
    chosen: a model that matches the wording it was trained on."""

    methods = ("zero_shot", "embed_images", "embed_texts")

    def __init__(self):
        self.vocabulary = _vocabulary()

    def zero_shot(self, images, classes):
        from mmjax.data import shapes

        attribute = next(a for a, names in shapes.ATTRIBUTES.items() if list(classes) == list(names))
        names = list(classes)
        understood = [not any(set(re.findall(r"[a-z']+", p.lower())) - self.vocabulary for p in classes[n])
                      for n in names]
        truth = _decode(images)[attribute]
        return [names[t] if understood[t] else names[(t + 1) % len(names)] for t in truth]

    def embed_images(self, images):
        from mmjax.data import shapes

        return np.eye(432)[shapes.label_index(_decode(images))]

    def embed_texts(self, captions):
        from mmjax.data import shapes
        from mmjax.data.shapes import parse_caption

        return np.eye(432)[[shapes.label_index(parse_caption(c)) for c in captions]]


def test_clip_zero_shot_from_heldout_phrasing_prompts():
    from mmjax.evaluate import evaluate_clip, format_table, test_split

    data = test_split(16, 64)
    data["image"] = np.stack([_encode({a: data[a][i] for a in ATTRIBUTES}) for i in range(64)])
    out = evaluate_clip(MemorisingClip(), data, gallery=32)
    assert all(out["zero_shot"][a] == 1.0 for a in ATTRIBUTES)
    assert all(out["zero_shot_heldout_phrasing"][a] == 0.0 for a in ATTRIBUTES)
    assert all(out["zero_shot_heldout_phrasing_unseen"][a] == 0.0 for a in ATTRIBUTES)
    assert out["t2i_recall@1"] == 1.0
    table = format_table({"family": "clip", "step": 0, "num": 64, "clip": out})
    assert "zero-shot, held-out phr." in table


def test_recolor_swaps_the_whole_color_word_in_its_case():
    from mmjax.evaluate import _recolor

    assert _recolor("a square colored red", 0, 2) == "a square colored blue"
    assert _recolor("A RED SQUARE", 0, 3) == "A YELLOW SQUARE"
    assert _recolor("Red Square At The Top", 0, 1) == "Green Square At The Top"


def test_generators_default_to_the_shipped_judge(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from mmjax import evaluate

    generator, judge = SimpleNamespace(methods=["generate"]), SimpleNamespace(methods=["classify"])
    monkeypatch.setattr(evaluate, "DEFAULT_JUDGE", str(tmp_path / "missing"))
    assert evaluate.default_judge(generator, None) is None  # not shipped here: no judge, as before
    monkeypatch.setattr(evaluate, "DEFAULT_JUDGE", str(tmp_path))
    assert evaluate.default_judge(generator, None) == str(tmp_path) and "shipped CNN judge" in capsys.readouterr().out
    assert evaluate.default_judge(generator, "runs/judge") == "runs/judge"
    assert evaluate.default_judge(judge, None) is None


def test_the_default_judge_is_where_the_repository_ships_it():
    from mmjax.evaluate import DEFAULT_JUDGE

    assert DEFAULT_JUDGE == os.path.join(REPO, "pretrained", "cnn_shapes")
