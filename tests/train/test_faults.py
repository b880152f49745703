"""train.py as a process meets kills, preemption, damaged checkpoints, a full disk and out of
memory. After each fault a restart must end exactly where an uninterrupted run ends: bitwise
the same state and the same loss at every step (a step trained again after a resume logs the
same loss twice). In-process versions of these scenarios are in tests/test_checkpoint.py and
tests/train/test_loop.py; here the process really dies, or really exits with a code. Last,
determinism: identical runs give identical losses and byte-identical PNGs, and sample.py on a
read-only workdir changes nothing.

The faults use the tiny CNN on one device, with hooks (tests/train/processes.py) that slow a
step or a commit, or inject the failure. Its steps take milliseconds, so the restarts cost
about what a process start costs.
"""
import hashlib
import pathlib
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax.checkpoint import restore_numpy
from tests.helpers import read_metrics
from tests.test_checkpoint import delete_metadata, empty_directory, overwrite_data, truncate_data
from tests.train import processes
from tests.train.processes import (DISK_FULL_AT_SAVE, OOM_AT_STEP, SLOW_COMMIT, SLOW_STEPS, Run,
                                   finished_steps, logged_steps, run, temporary_entries)

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

STEPS = 16
# Log every step (the test watches metrics.jsonl), save every 4 and keep all four saves, no
# evaluation (the tiny CNN judge has no preview either): only what the faults need.
ARGS = (f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
        "--config.train.checkpoint_every=4", "--config.train.keep_latest=4",
        "--config.train.eval_every=0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return ARGS + (processes.shared_cache(tmp_path_factory),)


@pytest.fixture(scope="module")
def reference(runs, args):
    """The uninterrupted run, with a grain worker process: a clean exit leaves the last step
    finished, no temporary directory and no worker behind."""
    r = run(runs / "reference", *args, "--config.data.worker_count=1")
    assert r.proc.returncode == 0, r.output[-3000:]
    assert f"finished at step {STEPS}" in r.output
    leftover = r.leftover_processes()
    assert not leftover, f"outlived train.py: {leftover}"
    assert finished_steps(r.workdir) == [4, 8, 12, 16] and not temporary_entries(r.workdir)
    return r.workdir


def assert_same_as_reference(workdir, reference):
    """Final state bitwise equal; every loss logged for a step equals the reference's."""
    want, got = processes.final_params(reference, None), processes.final_params(workdir, None)
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    want_losses, got_losses = processes.losses(reference), processes.losses(workdir)
    assert sorted(got_losses) == list(range(1, STEPS + 1))
    for step, values in got_losses.items():
        assert values == [want_losses[step][0]] * len(values), f"step {step}: {values} vs {want_losses[step]}"
    assert finished_steps(workdir)[-1] == STEPS and not temporary_entries(workdir)


def assert_no_traceback_through_mmjax(output: str):
    """The run ended with its message, not a crash. (Orbax's and tensorstore's abandoned
    reads and writes may still print tracebacks of their own event loop.)"""
    # Only the project's own files: CI's virtual environment lives inside the clone too.
    for own in ("mmjax", "train.py", "sample.py"):
        assert f'File "{os.path.join(processes.REPO, own)}' not in output, output[-5000:]


def resumed_from(output: str) -> int:
    found = re.findall(r"resumed from step (\d+)", output)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


def test_kill_9_at_a_random_step_then_resume_is_exact(runs, args, reference):
    kill_at = random.randint(2, STEPS - 2)
    workdir = runs / f"kill9_at_{kill_at}"
    first = Run(workdir, *args, hooks=SLOW_STEPS.format(seconds=0.05))
    first.wait_until(lambda: any(s >= kill_at for s in logged_steps(workdir)), f"step {kill_at}")
    first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    killed_at = max(logged_steps(workdir))
    saved = finished_steps(workdir)
    assert killed_at < STEPS, "the run finished before the kill"

    second = run(workdir, *args)
    assert second.proc.returncode == 0, second.output[-3000:]
    if saved:
        assert resumed_from(second.output) == saved[-1], (kill_at, killed_at, saved)
    else:
        assert "resumed" not in second.output
    assert_same_as_reference(workdir, reference)


def test_kill_9_during_an_async_save_never_loads_the_unfinished_step(runs, args, reference):
    workdir = runs / "kill9_in_save"
    first = Run(workdir, *args, hooks=SLOW_COMMIT.format(step=8, seconds=30))
    first.wait_until(lambda: any(e.startswith("8.") for e in temporary_entries(workdir)),
                     "the save of step 8")
    first.kill()
    # Killed inside the save: its temporary directory stays, step 8 never finished.
    assert finished_steps(workdir) == [4]
    assert [e for e in temporary_entries(workdir) if e.startswith("8.")]
    assert max(logged_steps(workdir)) >= 8

    second = run(workdir, *args)
    assert second.proc.returncode == 0, second.output[-3000:]
    assert resumed_from(second.output) == 4
    assert_same_as_reference(workdir, reference)


def test_sigterm_saves_at_the_next_step_and_exits_0_then_resumes(runs, args, reference):
    workdir = runs / "sigterm"
    first = Run(workdir, *args, hooks=SLOW_STEPS.format(seconds=0.05))
    first.wait_until(lambda: any(s >= 6 for s in logged_steps(workdir)), "step 6")
    signalled_at = max(logged_steps(workdir))
    first.signal(signal.SIGTERM)
    assert first.wait() == 0, first.output[-3000:]
    stopped = int(re.search(r"stopped \(preempted\) and saved at step (\d+)", first.output).group(1))
    assert signalled_at <= stopped < STEPS
    assert finished_steps(workdir)[-1] == stopped == max(logged_steps(workdir))
    assert not temporary_entries(workdir) and not first.leftover_processes()

    second = run(workdir, *args)
    assert second.proc.returncode == 0, second.output[-3000:]
    assert resumed_from(second.output) == stopped
    assert_same_as_reference(workdir, reference)


def test_damaged_latest_checkpoints_fall_back_loudly_or_exit_1(runs, args, reference):
    """Three damaged newest steps (truncated file, overwritten bytes, missing metadata) are
    each named with their error, and the run resumes from step 4; with every step damaged
    (the fourth as an empty directory) train.py exits 1 and says so."""
    workdir = runs / "damaged"
    shutil.copytree(reference, workdir)
    for step, damage in ((16, truncate_data), (12, overwrite_data), (8, delete_metadata)):
        damage(workdir / "checkpoints" / str(step))
    r = run(workdir, *args)
    assert r.proc.returncode == 0, r.output[-3000:]
    for step in (16, 12, 8):
        assert re.search(rf"WARNING .*checkpoint step {step} in .* cannot be restored, trying an "
                         rf"older step: \w+", r.output), (step, r.output[-3000:])
    assert resumed_from(r.output) == 4
    assert len(list((workdir / "checkpoints.damaged").iterdir())) == 3
    assert_same_as_reference(workdir, reference)

    all_bad = runs / "all_damaged"
    shutil.copytree(reference, all_bad)
    for step, damage in ((16, empty_directory), (12, truncate_data), (8, overwrite_data),
                         (4, delete_metadata)):
        damage(all_bad / "checkpoints" / str(step))
    r = run(all_bad, *args)
    assert r.proc.returncode == 1, r.output[-3000:]
    message = r.output[r.output.index("train.py: CheckpointError: every checkpoint in"):]
    assert all(f"step {s}:" in message for s in (16, 12, 8, 4)), message
    assert_no_traceback_through_mmjax(r.output)


def test_failed_async_save_exits_1_and_leaves_no_unfinished_step(runs, args):
    workdir = runs / "disk_full"
    # Piped output: the file-size limit would stop a log file as well.
    r = run(workdir, *args, hooks=DISK_FULL_AT_SAVE.format(step=8, limit=64 * 1024), pipe=True)
    assert r.proc.returncode == 1, r.output[-3000:]
    assert re.search(r"train.py: CheckpointError: saving checkpoint step 8 .* failed: .*File too large",
                     r.output), r.output[-3000:]
    assert finished_steps(workdir) == [4] and not temporary_entries(workdir)
    assert max(logged_steps(workdir)) < STEPS and not r.leftover_processes()


def test_out_of_memory_says_what_to_change_and_leaves_the_last_save_finished(runs, args):
    """An exception exit while step 8's save is still being written (its commit held back),
    with a grain worker running: step 8 ends finished, nothing temporary, no worker left."""
    workdir = runs / "oom"
    hooks = (SLOW_COMMIT.format(step=8, seconds=2) + OOM_AT_STEP.format(step=10, workdir=str(workdir)))
    r = run(workdir, *args, "--config.data.worker_count=1", hooks=hooks)
    assert r.proc.returncode == 1, r.output[-3000:]
    assert "save in flight at OOM: True" in r.output
    message = r.output[r.output.index("train.py: MemoryError: out of device memory"):]
    for advice in ("--config.train.batch_size (now 16", "--config.train.grad_accum (now 1",
                   "--config.dtype=bfloat16 (now float32)", "RESOURCE_EXHAUSTED"):
        assert advice in message, message
    assert_no_traceback_through_mmjax(r.output)
    assert finished_steps(workdir) == [4, 8] and not temporary_entries(workdir)
    assert restore_numpy(workdir).step == 8
    leftover = r.leftover_processes()
    assert not leftover, f"outlived train.py: {leftover}"


# --- determinism ----------------------------------------------------------------------------


def _tree(path: pathlib.Path) -> dict:
    """Every entry under `path`: kind, mode, size, mtime and content hash."""
    out = {}
    for p in sorted([path, *path.rglob("*")]):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(path))] = (p.is_dir(), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return out


SAMPLE_BOTH = """
import sys
sys.path.insert(0, {repo!r})
import sample
for workdir, out in (({a!r}, {a_out!r}), ({b!r}, {b_out!r})):
    code = sample.main(["--workdir", workdir, "--prompt", "a large red circle at the top",
                        "--prompt", "a small blue square", "--num", "2", "--seed", "3", "--out", out])
    if code:
        sys.exit(code)
"""


def test_identical_runs_give_identical_losses_previews_and_samples(vae_run, tmp_path):
    """Run one is this session's tiny VAE, trained inside pytest on 8 devices. Run two is
    train.py in a new process, same config and devices, given run one's step-10 checkpoint
    (beside run one, so it shares its compilation cache): steps 11-20 give the same losses,
    bitwise the same state and a byte-identical preview. (Whole runs from scratch are compared
    on the CNN by every fault test above: fresh processes, same loss at every step.) Then
    sample.py draws from run two and from a read-only copy of run one: byte-identical PNGs,
    and the copy is unchanged, file by file. (As root the copy's modes do not stop a write;
    the comparison does.)"""
    first, _, _ = vae_run
    first = pathlib.Path(first)
    second = first.parent / "vae_shapes_from_10"
    shutil.copytree(first / "checkpoints", second / "checkpoints")
    for step in finished_steps(second):
        if step > 10:
            shutil.rmtree(second / "checkpoints" / str(step))
    assert finished_steps(second) == [10]
    r = run(second, devices=8, config=str(processes.REPO / "configs" / "vae_shapes.py") + ":tiny")
    assert r.proc.returncode == 0, r.output[-3000:]
    assert resumed_from(r.output) == 10

    a, b = read_metrics(first), read_metrics(second)
    assert sorted(b) == list(range(11, 21)) and all(b[s] == a[s] for s in b)
    assert (first / "samples" / "preview_0000020.png").read_bytes() == \
        (second / "samples" / "preview_0000020.png").read_bytes()
    from mmjax.checkpoint import _paths

    want, got = restore_numpy(first, step=20).state, restore_numpy(second, step=20).state
    assert _paths(want) == _paths(got)
    for path, x, y in zip(_paths(want), jax.tree.leaves(want), jax.tree.leaves(got)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path

    frozen = tmp_path / "read_only_copy"
    shutil.copytree(first, frozen, ignore=shutil.ignore_patterns("eval.json"))
    try:
        for p in [frozen, *frozen.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        before = _tree(frozen)
        code = SAMPLE_BOTH.format(repo=str(processes.REPO), a=str(second), a_out=str(tmp_path / "second.png"),
                                  b=str(frozen), b_out=str(tmp_path / "frozen.png"))
        env = dict(processes.child_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
        sampled = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 timeout=300)
        assert sampled.returncode == 0, sampled.stderr[-3000:]
        assert _tree(frozen) == before
        assert (tmp_path / "frozen.png").read_bytes() == (tmp_path / "second.png").read_bytes()
    finally:
        for p in [frozen, *frozen.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
