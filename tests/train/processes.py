"""Run `train.py` in a subprocess the way a cluster does, so that a test can kill it, preempt it,
or starve it of memory or disk. Shared by test_faults.py and test_multihost.py.

Each run gets its own session (process group): a test kills the group, and after a run has
ended an empty group proves that no worker process outlived it. Runs of one test module share
a parent directory, hence the loop's compilation cache (`<workdir>/../.jax_cache`).

Hooks are test-only code that the child runs before `train.main` (`python -c`): they slow a
step or an Orbax commit, or inject a failure, without any production flag.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
CNN_TINY = str(REPO / "configs" / "cnn_shapes.py") + ":tiny"

# Sleeps before each host-to-device batch transfer: steps slow enough to be caught mid-run.
SLOW_STEPS = """
import time, mmjax.sharding as _sharding
_to_device = _sharding.to_device
def _slow_to_device(*args, **kwargs):
    time.sleep({seconds})
    return _to_device(*args, **kwargs)
_sharding.to_device = _slow_to_device
"""

# Holds Orbax's commit (the rename of `<step>.orbax-checkpoint-tmp` to `<step>`) of one step:
# its files are written, the step is not finished, the training goes on meanwhile.
SLOW_COMMIT = """
import asyncio, os
from orbax.checkpoint._src.path import atomicity as _atomicity
_finalize = _atomicity.AtomicRenameTemporaryPath.finalize
async def _slow_finalize(self):
    if os.path.basename(str(self.get())).startswith("{step}."):
        await asyncio.sleep({seconds})
    await _finalize(self)
_atomicity.AtomicRenameTemporaryPath.finalize = _slow_finalize
"""

# Out of device memory when the batch of train step `step` reaches the devices (the host to
# device copy is where a real one often strikes). Prints whether a save was in flight then.
OOM_AT_STEP = """
import glob, os, jax, mmjax.sharding as _sharding
from mmjax.train import loop as _loop
_to_device, _seen = _sharding.to_device, []
_log_data_shard = _loop._log_data_shard
_loop._log_data_shard = lambda *a: (_seen.append(0), _log_data_shard(*a))
_train_batches = []
def _oom_to_device(*args, **kwargs):
    if _seen:  # train batches only (eval batches are placed before the first one)
        _train_batches.append(0)
        if len(_train_batches) == {step}:
            tmp = glob.glob(os.path.join({workdir!r}, "checkpoints", "*.orbax-checkpoint-tmp*"))
            print("save in flight at OOM:", bool(tmp), flush=True)
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.")
    return _to_device(*args, **kwargs)
_sharding.to_device = _oom_to_device
"""

# The disk "fills up" under the save of `step`: a file-size limit makes its background writes
# fail with EFBIG (chmod would not stop root). The limit stays: later writes fail too.
DISK_FULL_AT_SAVE = """
import resource, signal
from mmjax.checkpoint import Checkpointer as _Checkpointer
_save = _Checkpointer.save
def _save_then_fill_disk(self, step, *args, **kwargs):
    if step == {step}:
        self.wait()  # the earlier saves finish on a disk with room
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
    return _save(self, step, *args, **kwargs)
_Checkpointer.save = _save_then_fill_disk
"""

# A preview for the CNN judge, which has none: its first test images. Lets a cheap config
# exercise the loop's previews (computed by every process, written by process 0).
CNN_PREVIEW = """
import dataclasses
from mmjax import zoo as _zoo
def _preview(model, params, batch, rng, config):
    return batch["image"][: config.sample.num]
_zoo.FAMILIES["cnn"] = dataclasses.replace(_zoo.FAMILIES["cnn"], preview=_preview)
"""

MAIN = "\nimport sys, train\nsys.exit(train.main(sys.argv[1:]))\n"


def shared_cache(tmp_path_factory) -> str:
    """One compilation cache for the process tests of a session: the same tiny CNN on one
    device compiles once for test_faults.py and test_multihost.py together."""
    path = tmp_path_factory.getbasetemp() / "process_runs_jax_cache"
    path.mkdir(exist_ok=True)
    return f"--config.train.compilation_cache={path}"


def child_env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


class Run:
    """One `train.py` process; its stdout and stderr go to `<workdir>.<n>.log`, or to a pipe
    (`pipe=True`) where the run limits the size of the files it writes."""

    def __init__(self, workdir, *args: str, config: str = CNN_TINY, hooks: str = "",
                 devices: int = 1, name: str | None = None, pipe: bool = False):
        self.workdir = pathlib.Path(workdir)
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while (self.workdir.parent / f"{name or self.workdir.name}.{n}.log").exists():
            n += 1
        self.log_path = self.workdir.parent / f"{name or self.workdir.name}.{n}.log"
        argv = ["--config", config, "--workdir", str(self.workdir), "--config.train.progress=false", *args]
        command = ([sys.executable, "-c", hooks + MAIN, *argv] if hooks
                   else [sys.executable, str(REPO / "train.py"), *argv])
        self._log = subprocess.PIPE if pipe else open(self.log_path, "w")
        self._piped = ""
        self.proc = subprocess.Popen(command, cwd=REPO, env=child_env(devices), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, text=pipe)

    @property
    def output(self) -> str:
        return self._piped if self._log is subprocess.PIPE else self.log_path.read_text()

    def wait(self, timeout: float = 240) -> int:
        try:
            if self._log is subprocess.PIPE:
                self._piped = self.proc.communicate(timeout=timeout)[0]
                self.log_path.write_text(self._piped)
            else:
                self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"train.py did not end within {timeout} s:\n{self.output[-3000:]}")
        finally:
            if self._log is not subprocess.PIPE:
                self._log.close()
        return self.proc.returncode

    def signal(self, signum=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait_until(self, predicate, what: str, timeout: float = 180) -> None:
        """Polls `predicate()` until true; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"train.py ended (rc {self.proc.returncode}) before {what}:\n"
                                     f"{self.output[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output[-3000:]}")
            time.sleep(0.01)

    def leftover_processes(self, grace: float = 20.0) -> list[str]:
        """After the process ended: the live processes it started (grain workers) that remain.

        Python's multiprocessing resource tracker is not counted: it outlives its parent by
        design until it reads the end of its pipe, and the test waits `grace` seconds for it.
        """
        deadline = time.monotonic() + grace
        while True:
            members = _group_members(self.proc.pid)
            others = [cmd for cmd in members if "multiprocessing.resource_tracker" not in cmd]
            if others or not members or time.monotonic() > deadline:
                return others + [cmd for cmd in members if cmd not in others]
            time.sleep(0.05)


def _group_members(pgid: int) -> list[str]:
    """Command lines of the live (not zombie) processes in process group `pgid`."""
    members = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(cmdline.strip())
    return members


def run(workdir, *args, timeout: float = 240, **kwargs) -> Run:
    r = Run(workdir, *args, **kwargs)
    r.wait(timeout)
    return r


def logged_steps(workdir) -> list[int]:
    """Steps with a loss in metrics.jsonl so far (a half-written last line is skipped)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


def losses(workdir) -> dict[int, list[float]]:
    """Every loss logged for each step: a step run again after a resume is listed twice."""
    out: dict[int, list[float]] = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out.setdefault(row["step"], []).append(row["loss"])
    return out


def finished_steps(workdir) -> list[int]:
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def temporary_entries(workdir) -> list[str]:
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if "tmp" in p.name) if root.exists() else []


def final_params(workdir, parts=("params", "ema_params")) -> dict[str, np.ndarray]:
    """Leaves of the newest checkpoint's state by path, as numpy (`parts=None`: all of it)."""
    from mmjax.checkpoint import _paths, restore_numpy

    state = restore_numpy(workdir).state
    trees = state if parts is None else {k: state[k] for k in parts}
    return dict(zip(_paths(trees), (np.asarray(x) for x in jax.tree.leaves(trees))))
