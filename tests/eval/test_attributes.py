import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmjax.eval import attribute_accuracy
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
        assert row["eval/fd_judge"] > 0 and 0 <= row["eval/precision_judge"] <= 1
        assert -1 <= row["eval/clip_score"] <= 1


def test_in_loop_generation_is_off_by_default_and_names_bad_settings(cnn_run, clip_run):
    from mmjax.evaluate import in_loop_generation
    from tests.helpers import tiny_config

    assert in_loop_generation(tiny_config("vae_shapes")) is None
    with pytest.raises(ValueError, match="not a CLIP"):
        in_loop_generation(tiny_config("vae_shapes", f"eval.clip={cnn_run[0]}"))
    with pytest.raises(ValueError, match="does not generate"):
        in_loop_generation(tiny_config("clip_shapes", f"eval.judge={cnn_run[0]}"))
