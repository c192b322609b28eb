"""Every paper config (``configs/papers/*.yaml``) is checked through the commands its header documents.

* ``Launch``: the exact multi-GPU command (strategy, precision and logger overlays included) must resolve with
  ``--print_config``; nothing is instantiated, so hub model names and data paths need not exist here.
* ``Smoke test``: must be the launch command with the hardware (``configs/trainer/``) and logger overlays removed,
  ``configs/smoke.yaml`` appended and at most a few sampling-size overrides, i.e. only model, data and sizes change.
  It runs for real on the tiny default through ``src.cli.main``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT

PAPERS = sorted(p.name for p in (CONFIGS / "papers").glob("*.yaml"))
HARDWARE_OR_LOGGER = ("configs/trainer/", "configs/logger/")
# What a smoke command may change besides configs/smoke.yaml: RL sampling sizes and the reward (a trained reward model
# is a model too: the smoke run swaps it for a rule-based reward on the tiny task).
SMOKE_OVERRIDES = {
    "--model.init_args.num_generations",
    "--model.init_args.max_new_tokens",
    "--model.init_args.micro_batch_size",
    "--model.init_args.reward_model_path",
    "--model.init_args.reward_funcs",
    "--model.init_args.critic_model_name_or_path",
}


def documented_command(path: Path, label: str) -> list[str]:
    """The ``python -m src fit ...`` command under the header line starting with ``# <label>``, as CLI args."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"# {label}")), None)
    assert start is not None, f"{path.name}: no '# {label}' header line"
    parts = []
    for line in lines[start + 1 :]:
        assert line.startswith("#   "), f"{path.name}: the {label} command must follow its header line"
        text = line[1:].strip()
        parts.append(text.removesuffix("\\").strip())
        if not text.endswith("\\"):
            break
    argv = shlex.split(" ".join(parts))
    assert argv[:4] == ["python", "-m", "src", "fit"], f"{path.name}: {label} must run `python -m src fit`"
    return argv[3:]


def configs_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]


def overrides_of(args: list[str]) -> list[str]:
    """Non-config options (``--key=value`` or ``--key value``) as their keys."""
    keys, skip = [], False
    for i, a in enumerate(args[1:], 1):
        if skip:
            skip = False
            continue
        if a == "--config":
            skip = True
        elif a.startswith("--"):
            keys.append(a.split("=", 1)[0])
            skip = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
    return keys


def absolute(args: list[str]) -> list[str]:
    """Config paths in the headers are relative to the repository root; the tests run in a temporary directory."""
    return [str(ROOT / a) if i > 0 and args[i - 1] == "--config" else a for i, a in enumerate(args)]


@pytest.mark.parametrize("paper", PAPERS)
def test_paper_commands(run_cli, paper, capsys):
    path = CONFIGS / "papers" / paper
    launch = documented_command(path, "Launch")
    smoke = documented_command(path, "Smoke test")
    own = f"configs/papers/{paper}"

    # The launch command names this file, after its job config, and every overlay it names exists.
    launch_configs = configs_of(launch)
    assert own in launch_configs and launch_configs.index(own) > 0, f"{paper}: launch must compose on a job config"
    missing = [c for c in launch_configs if not (ROOT / c).is_file()]
    assert not missing, f"{paper}: the launch command names missing configs {missing}"

    # The smoke command swaps only hardware/logging for configs/smoke.yaml (+ sampling sizes).
    expected = [c for c in launch_configs if not c.startswith(HARDWARE_OR_LOGGER)] + ["configs/smoke.yaml"]
    assert configs_of(smoke) == expected, f"{paper}: smoke configs {configs_of(smoke)} != {expected}"
    extra = set(overrides_of(smoke)) - SMOKE_OVERRIDES
    assert not extra, f"{paper}: the smoke command may only override sampling sizes, not {sorted(extra)}"

    with pytest.raises(SystemExit) as e:
        run_cli([*absolute(launch), "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path" in printed and "model_name_or_path: tiny" not in printed, f"{paper}: no real model named"

    cli = run_cli(absolute(smoke))
    assert cli.trainer.global_step >= 2  # PPO makes ppo_epochs x num_mini_batches optimizer steps per rollout
    assert cli.config.fit.model.init_args.model_name_or_path == "tiny"
