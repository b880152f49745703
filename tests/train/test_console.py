"""What a user sees while training: a training rate that is the training rate, evaluation and
saving on their own lines, and no INFO chatter from other libraries unless asked (-v)."""

import io
import json
import logging
import os
import re

import pytest
from tqdm import tqdm

from mmjax import logs
from mmjax.train import loop
from mmjax.train.loop import TrainClock
from tests.helpers import REPO, tiny_config


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_train_clock_leaves_out_paused_time():
    time = FakeClock()
    clock = TrainClock(now=time)
    time.now += 2.0  # training
    with clock.paused() as span:
        time.now += 30.0  # evaluation
    assert span.seconds == 30.0
    time.now += 1.0
    assert clock.lap() == 3.0
    time.now += 4.0
    with clock.paused() as outer:  # a save, and the metrics flush inside it
        time.now += 5.0
        with clock.paused() as inner:
            time.now += 6.0
        time.now += 7.0
    assert (outer.seconds, inner.seconds) == (18.0, 6.0)
    time.now += 0.5
    assert clock.lap() == 4.5
    with clock.paused():
        time.now += 9.0
        assert clock.lap() == 0.0  # a lap read while paused counts nothing of the pause
    time.now += 1.0
    assert clock.lap() == 1.0


@pytest.fixture
def root_logging():
    """setup_logging changes the root logger; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _emit_samples():
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    logging.getLogger("jax._src.compilation_cache").debug("cache key details")
    logging.getLogger("absl").info("orbax wrote a file")
    logging.getLogger("jax._src.xla_bridge").warning("a jax warning")
    logging.getLogger("mmjax.train").info("step 10: saved checkpoint (0.2 s)")
    logging.getLogger("mmjax.train").debug("an mmjax debug line")


@pytest.mark.parametrize("verbosity, shown, hidden", [
    (0, ["a jax warning", "saved checkpoint"], ["backend 'tpu'", "orbax wrote", "cache key", "mmjax debug"]),
    (1, ["a jax warning", "saved checkpoint", "backend 'tpu'", "orbax wrote"], ["cache key", "mmjax debug"]),
    (2, ["a jax warning", "saved checkpoint", "backend 'tpu'", "orbax wrote", "cache key", "mmjax debug"], []),
])
def test_default_output_is_mmjax_info_and_warnings_and_v_shows_the_rest(root_logging, verbosity, shown, hidden):
    out = io.StringIO()
    logs.setup_logging(verbosity, stream=out)
    _emit_samples()
    text = out.getvalue()
    for line in shown:
        assert line in text
    for line in hidden:
        assert line not in text


def test_an_earlier_level_on_a_library_logger_does_not_override_the_flag(root_logging):
    logging.getLogger("absl").setLevel(logging.WARNING)  # as train.py used to do
    out = io.StringIO()
    logs.setup_logging(1, stream=out)
    logging.getLogger("absl").info("orbax wrote a file")
    assert "orbax wrote a file" in out.getvalue()


def test_log_lines_land_above_the_progress_bar(root_logging):
    out = io.StringIO()
    logs.setup_logging(0, stream=out)
    with tqdm(total=10, file=out, desc="progress", mininterval=0) as bar:
        bar.update(3)
        logging.getLogger("mmjax.train").info("step 3: eval psnr 12")
        bar.update(1)
    text = out.getvalue()
    line = next(part for part in text.split("\n") if "step 3: eval psnr 12" in part)
    # tqdm.write cleared the bar before the line: what is left of the row is only the line.
    assert line.rsplit("\r", 1)[-1].endswith("INFO mmjax.train: step 3: eval psnr 12")
    assert "progress" not in line.rsplit("\r", 1)[-1]


def test_train_py_accepts_verbose(root_logging, tmp_path, capsys):
    import train

    workdir = tmp_path / "run"
    argv = ["--config", os.path.join(REPO, "configs", "vae_shapes.py:tiny"), "--workdir", str(workdir)]
    # A typo'd override ends the run before anything is compiled; -vv got past the parser.
    assert train.main([*argv, "-vv", "--config.optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert logging.getLogger().level == logging.DEBUG
    assert train.main([*argv, "--verbose", "--config.optim.lrr=1"]) == 2
    assert logging.getLogger().level == logging.INFO
    assert train.main([*argv, "--config.optim.lrr=1"]) == 2
    assert not workdir.exists()


@pytest.mark.e2e
def test_rate_excludes_evaluation_and_checkpoint_time(tmp_path, monkeypatch, caplog):
    """Evaluation and every save take 1000 (fake) seconds; the images/s of every interval
    stays a training rate, and the two have their own lines with their time."""
    real = loop.time.perf_counter
    offset = [0.0]

    def slow_down():
        offset[0] += 1000.0

    def now():
        return real() + offset[0]

    monkeypatch.setattr(loop, "TrainClock", lambda: TrainClock(now=now))
    save = loop.Checkpointer.save

    def slow_save(self, *args, **kwargs):
        slow_down()
        return save(self, *args, **kwargs)

    monkeypatch.setattr(loop.Checkpointer, "save", slow_save)

    def extra_eval(params):
        slow_down()
        return {"slow": 1.0}

    workdir = str(tmp_path / "run")
    config = tiny_config("cnn_shapes", "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=10")
    with caplog.at_level(logging.INFO, logger="mmjax.train"):
        loop.train(config, workdir, extra_eval=extra_eval)
    rates = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for row in map(json.loads, f):
            if "train/images_per_sec" in row:
                rates[row["step"]] = row["train/images_per_sec"]
    assert sorted(rates) == [5, 10, 15, 20]
    # One interval holding a 1000 s pause would read 4 steps * 16 images / 1000 s < 0.1.
    assert min(rates.values()) > 1.0, rates
    lines = [r.getMessage() for r in caplog.records if r.name == "mmjax.train"]

    def seconds(prefix: str) -> float:
        found = [m for m in lines if m.startswith(prefix)]
        assert len(found) == 1, (prefix, lines)
        return float(re.search(r"\((\d+\.\d) s", found[0]).group(1))

    assert seconds("step 1: compiled the train step") < 1000
    assert seconds("step 10: eval ") >= 1000 and "slow 1" in next(m for m in lines if m.startswith("step 10: eval"))
    assert seconds("step 10: saved checkpoint") >= 1000
    assert seconds("step 20: saved checkpoint") >= 1000
