"""Faults (issue 17): a fit SIGKILLed anywhere (also during a checkpoint write) resumes with ``--ckpt_path last`` to the
uninterrupted run's per-step losses, and never loads a half-written checkpoint; a DDP worker that dies or hangs ends
the survivor within a bounded time, naming the cause."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from src.callbacks.checkpoint_io import check_checkpoint
from tests.conftest import CONFIGS, fresh_env

# The job configs' own ModelCheckpoint (runs/<job>/checkpoints: step=N.ckpt, then last.ckpt) every 2 steps; metrics
# flushed every step so a killed run's losses are on disk up to the kill.
EVERY_2 = [
    "--trainer.callbacks.every_n_train_steps=2",
    "--trainer.limit_val_batches=0",
    "--trainer.log_every_n_steps=1",
    "--trainer.logger.init_args.flush_logs_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.tiny_rows=96",
    "--plot.enabled=false",
]


def start(args: list[str], cwd: Path, log: str) -> subprocess.Popen:
    """``python -m src ARGS`` in a fresh process; stdout and stderr go to ``cwd/LOG`` (a pipe could fill and block)."""
    env = fresh_env(OMP_NUM_THREADS="1")
    with open(cwd / log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "src", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_until(proc: subprocess.Popen, cond: Callable[[], object], what: str, timeout: float = 180) -> None:
    """Poll ``cond`` every 0.5 ms while ``proc`` runs; fail if it ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.0005)


def losses(log_dir: Path) -> dict[int, float]:
    """``train/loss`` by CSV step of a run, killed or not (a row cut by the kill is skipped)."""
    path = log_dir / "metrics.csv"
    if not path.exists():
        return {}
    out = {}
    for row in csv.DictReader(path.open()):
        try:
            out[int(row["step"])] = float(row["train/loss"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def global_step(ckpt: Path) -> int:
    check_checkpoint(ckpt)  # loads in full: a complete Lightning checkpoint
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def writing(ckpts: Path, kind: str, step: int) -> list[Path]:
    """The temporary files (``AtomicCheckpointIO``: ``.<name>.<random>.tmp``) of a write of ``kind`` ("step": a
    ``step=N.ckpt`` with N >= ``step``; "last": ``last.ckpt`` once ``step=<step>.ckpt`` or a later one exists)."""
    tmps = list(ckpts.glob(".*.tmp"))
    if kind == "step":
        return [t for t in tmps if t.name.startswith(".step=") and int(t.name[6:].split(".")[0]) >= step]
    done = [int(p.stem[5:]) for p in ckpts.glob("step=*.ckpt")]
    return [t for t in tmps if t.name.startswith(".last.ckpt.")] if max(done, default=0) >= step else []


def kill_during_write(proc: subprocess.Popen, ckpts: Path, kind: str, step: int) -> list[Path]:
    """SIGKILL ``proc`` while a temporary checkpoint file of that write exists: SIGSTOP it when one shows up, kill it
    if the file is still there (else the write just ended: let it run on to the next). Returns the files left."""
    while True:
        wait_until(proc, lambda: writing(ckpts, kind, step), f"a write of {kind} >= {step}")
        os.kill(proc.pid, signal.SIGSTOP)
        if tmps := writing(ckpts, kind, step):
            proc.kill()
            proc.wait()
            return tmps
        os.kill(proc.pid, signal.SIGCONT)


JOBS = [  # job, steps of the uninterrupted run, options, seconds of a step here (scales the random kill delay)
    ("dpo", 12, [], 0.4),
    ("grpo", 12, ["--model.init_args.micro_batch_size=8"], 0.3),
    ("sft", 16, [], 0.15),
]


@pytest.mark.slow  # ~25 s a job: four processes
@pytest.mark.parametrize("job,steps,extra,step_s", JOBS, ids=[j[0] for j in JOBS])
def test_kill_anywhere_resumes_exactly(tmp_path, job, steps, extra, step_s):
    """Run A is killed during a checkpoint write (seeded: which write), B resumes it with ``--ckpt_path last`` and is
    killed at a seeded random moment, C resumes B to the end. A's temporary file is left, never loaded: B starts at
    the ``last.ckpt`` that A had completed. A, B and C log the uninterrupted run's losses (abs 1e-6) at every step
    they run."""
    rng = random.Random(f"faults-{job}{os.environ.get('FAULTS_SEED', '')}")  # FAULTS_SEED=N: other kill points
    base = ["fit", "--config", str(CONFIGS / f"{job}.yaml"), *EVERY_2, f"--trainer.max_steps={steps}", *extra]
    (tmp_path / "full").mkdir()
    (tmp_path / "kill").mkdir()
    full = start([*base, "--trainer.logger.init_args.version=full"], tmp_path / "full", "full.log")
    assert full.wait(timeout=300) == 0, (tmp_path / "full/full.log").read_text()[-3000:]
    ref = losses(tmp_path / f"full/runs/{job}/full")
    assert sorted(ref) == list(range(steps))

    cwd, runs = tmp_path / "kill", tmp_path / f"kill/runs/{job}"
    ckpts, last = runs / "checkpoints", runs / "checkpoints/last.ckpt"
    kind, at = rng.choice(["step", "last"]), rng.choice([4, 6])
    a = start([*base, "--trainer.logger.init_args.version=a"], cwd, "a.log")
    left = kill_during_write(a, ckpts, kind, at)
    assert a.returncode == -signal.SIGKILL and left  # killed mid-write: the temporary file is still there
    s1 = global_step(last)  # the last complete write, not the temporary one
    assert 2 <= s1 < at

    b = start([*base, "--trainer.logger.init_args.version=b", "--ckpt_path=last"], cwd, "b.log")
    target = s1 + rng.randint(2, 5)  # a random step after B's first checkpoint, then a random time into it
    wait_until(b, lambda: max(losses(runs / "b"), default=-1) >= target, f"step {target} of the resumed run")
    time.sleep(rng.uniform(0, step_s))
    b.kill()
    assert b.wait() == -signal.SIGKILL, "B ended before the kill: raise steps"
    s2 = global_step(last)
    assert s2 > s1

    c = start([*base, "--trainer.logger.init_args.version=c", "--ckpt_path=last"], cwd, "c.log")
    assert c.wait(timeout=300) == 0, (cwd / "c.log").read_text()[-3000:]
    assert set(left) <= set(ckpts.glob(".*.tmp"))  # a temporary file is left as it was, never renamed or loaded
    assert global_step(last) == steps

    got_a, got_b, got_c = losses(runs / "a"), losses(runs / "b"), losses(runs / "c")
    print(f"{job}: A killed writing {kind} >= {at} (resumed at {s1}), B killed at step {max(got_b)} (resumed at {s2})")
    assert min(got_a) == 0 and min(got_b) == s1 and max(got_b) >= target  # each resumed where last.ckpt was
    assert sorted(got_c) == list(range(s2, steps))
    for name, got in (("A", got_a), ("B", got_b), ("C", got_c)):
        for step, loss in got.items():
            assert loss == pytest.approx(ref[step], abs=1e-6), (name, step)


def children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux ``/proc``): the ranks Lightning's DDP launcher started."""
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie not reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


DDP_FAULTS = [  # the worker hit, what happens to it, the strategy timeout, what the survivor's error names
    ("rank1", "kill", None, ("Connection reset by peer", "Connection closed by peer")),
    ("rank0", "kill", None, ("Connection reset by peer", "Connection closed by peer")),
    ("rank1", "hang", "0:00:10", ("Timed out waiting 10000ms", "Application timeout caused pair closure")),
]


@pytest.mark.slow  # ~11 s (kill), ~21 s (hang): two gloo processes start, run two steps, then one dies or hangs
@pytest.mark.parametrize("victim,fault,timeout,cause", DDP_FAULTS, ids=[f"{v}-{f}" for v, f, _, _ in DDP_FAULTS])
def test_lost_ddp_worker_ends_the_survivor(tmp_path, victim, fault, timeout, cause):
    """A 2-process CPU DDP fit (gloo) loses one worker mid-fit: SIGKILL (the survivor's next collective fails at
    once, whatever the timeout) or SIGSTOP (a hung worker: the survivor's collective times out after the strategy's
    ``timeout``). The survivor exits non-zero within seconds, its output naming the cause; nothing is left running."""
    args = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "trainer/ddp.yaml")]
    args += ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=1000", "--data.batch_size=4"]
    args += [a for a in EVERY_2 if "every_n_train_steps" not in a]
    if timeout:
        args.append(f"--trainer.strategy.init_args.timeout={timeout}")
    proc = start(args, tmp_path, "fit.log")
    ranks = [proc.pid]
    try:
        wait_until(proc, lambda: len(losses(tmp_path / "runs/dpo/version_0")) >= 2, "two logged steps")
        ranks += children(proc.pid)
        assert len(ranks) == 2, ranks
        hit, survivor = (ranks[1], ranks[0]) if victim == "rank1" else (ranks[0], ranks[1])
        os.kill(hit, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        while not gone(survivor) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert gone(survivor), "the surviving worker still runs 60 s after losing the other"
        if survivor == proc.pid:
            assert proc.wait() not in (0, None)
        out = (tmp_path / "fit.log").read_text()
        rank = "rank0" if survivor == proc.pid else "rank1"
        assert any(f"[{rank}]: RuntimeError: " in line and any(c in line for c in cause) for line in out.splitlines())
        print(f"{victim} {fault}: the survivor exited {took:.1f} s later")
        assert took < (20 if timeout else 10), took
    finally:
        for pid in ranks:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
