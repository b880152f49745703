"""train.py as a two-process `jax.distributed` job on localhost, one CPU device per process,
as on two hosts: disjoint data shards, identical parameters on both processes, agreement with
one process on the same global batch, outputs from process 0 only, and a SIGTERM that reaches
one process making both save the same step.
"""
import math
import re
import signal
import socket

import numpy as np
import pytest

from mmjax.train.loop import _StopFlag
from tests.train import processes
from tests.train.processes import CNN_PREVIEW, SLOW_STEPS, Run, finished_steps, logged_steps, run

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

STEPS = 16
ARGS = (f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
        "--config.train.checkpoint_every=4", "--config.train.keep_latest=4",
        "--config.train.eval_every=16", "--config.train.sample_every=8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return ARGS + (processes.shared_cache(tmp_path_factory),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two(workdir, *args, hooks: str = "") -> list[Run]:
    coordinator = f"localhost:{free_port()}"
    return [Run(workdir, *args, "--coordinator", coordinator, "--num-processes", "2",
                "--process-id", str(i), hooks=hooks, name=f"{workdir.name}.p{i}") for i in range(2)]


def wait_all(procs: list[Run], timeout: float = 180) -> list[int]:
    try:
        return [p.wait(timeout) for p in procs]
    finally:
        for p in procs:  # a process left waiting in a collective for its dead peer
            if p.proc.poll() is None:
                p.kill()


def shard_digests(output: str, process: int, count: int) -> list[str]:
    found = re.findall(rf"data shard of process {process}/{count}: batch 0 holds \d+ examples: ([0-9a-f ]+)", output)
    assert len(found) == 1, output[-3000:]
    return found[0].split()


def state_fingerprint(output: str, step: int) -> str:
    found = re.findall(rf"ends at step {step} with state fingerprint ([0-9a-f]+)", output)
    assert len(found) == 1, output[-3000:]
    return found[0]


@pytest.fixture(scope="module")
def one_process(runs, args):
    r = run(runs / "one", *args, hooks=CNN_PREVIEW)
    assert r.proc.returncode == 0, r.output[-3000:]
    return r


@pytest.fixture(scope="module")
def two_processes(runs, args):
    """A two-process job preempted on process 1 only, then resumed to the end.

    (Two runs, not three: JAX's persistent cache serves process 0 alone, so every process-1
    start compiles afresh; exact resume itself is checked on one process in test_faults.py.)
    """
    workdir = runs / "two"
    preempted = start_two(workdir, *args, hooks=CNN_PREVIEW + SLOW_STEPS.format(seconds=0.1))
    preempted[0].wait_until(lambda: any(s >= 3 for s in logged_steps(workdir)), "step 3")
    signalled_at = max(logged_steps(workdir))
    preempted[1].signal(signal.SIGTERM)  # a preemption notice to the second host only
    assert wait_all(preempted) == [0, 0], "\n\n".join(p.output[-3000:] for p in preempted)
    stopped_steps = finished_steps(workdir)
    resumed = start_two(workdir, *args, hooks=CNN_PREVIEW)
    assert wait_all(resumed) == [0, 0], "\n\n".join(p.output[-3000:] for p in resumed)
    return preempted, resumed, signalled_at, stopped_steps


def test_sigterm_to_one_process_stops_both_at_the_same_step(two_processes):
    preempted, resumed, signalled_at, stopped_steps = two_processes
    # The processes compare their flags every SYNC_EVERY steps: they stop at the first such
    # step after the signal, and both save it.
    expected = math.ceil(signalled_at / _StopFlag.SYNC_EVERY) * _StopFlag.SYNC_EVERY
    assert expected < STEPS
    for p in preempted:
        assert f"stopped (preempted) and saved at step {expected}" in p.output, p.output[-3000:]
    assert "SIGTERM reached process 1" in preempted[0].output
    assert stopped_steps[-1] == expected
    assert state_fingerprint(preempted[0].output, expected) == state_fingerprint(preempted[1].output, expected)
    for p in resumed:
        assert f"resumed from step {expected}" in p.output and f"finished at step {STEPS}" in p.output


def test_two_processes_read_disjoint_shards_and_agree_with_one(one_process, two_processes):
    preempted, resumed, _, _ = two_processes
    for i, p in enumerate(preempted):
        assert f"[process {i}/2] " in p.output  # log lines say which process wrote them

    # What each process really read first: disjoint halves of the one-process batch.
    first = [shard_digests(p.output, i, 2) for i, p in enumerate(preempted)]
    single = shard_digests(one_process.output, 0, 1)
    assert len(first[0]) == len(first[1]) == len(single) // 2
    assert not set(first[0]) & set(first[1])
    assert sorted(first[0] + first[1]) == sorted(single)

    # Both processes hold bitwise the same state; it agrees with one process on the same
    # global batch up to float reassociation (the gradient mean is split in two).
    assert state_fingerprint(resumed[0].output, STEPS) == state_fingerprint(resumed[1].output, STEPS)
    one, two = processes.final_params(one_process.workdir), processes.final_params(resumed[0].workdir)
    assert one.keys() == two.keys()
    for path in one:
        np.testing.assert_allclose(two[path], one[path], rtol=2e-4, atol=2e-5, err_msg=path)
    a, b = processes.losses(one_process.workdir), processes.losses(resumed[0].workdir)
    np.testing.assert_allclose([b[s] for s in range(1, STEPS + 1)], [a[s] for s in range(1, STEPS + 1)],
                               rtol=1e-4)


def test_only_process_0_writes_metrics_previews_and_tensorboard(one_process, two_processes):
    workdir = two_processes[1][0].workdir
    # One row per step: a second writer would have doubled them.
    assert {s: len(v) for s, v in processes.losses(workdir).items()} == {s: 1 for s in range(1, STEPS + 1)}
    assert len(list((workdir / "tensorboard").iterdir())) == 2  # one per run
    assert (workdir / "config.json").is_file()
    # Previews need every process (the batch spans them), then process 0 draws the grid.
    from PIL import Image

    names = sorted(p.name for p in (workdir / "samples").iterdir())
    assert names == ["preview_0000008.png", "preview_0000016.png"]
    for name in names:
        with Image.open(workdir / "samples" / name) as two, \
                Image.open(one_process.workdir / "samples" / name) as one:
            assert two.size == one.size
