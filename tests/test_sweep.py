"""Sweeps: the W&B sweep definitions in configs/sweeps/ resolve through the CLI, ``python -m src.sweep`` runs one
locally without W&B and writes ``summary.csv``, and W&B runs are grouped and tagged from the config."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from src.cli import config_tags
from src.sweep import as_cli, base_args, load_sweep, main, trials
from tests.conftest import CONFIGS

SWEEPS = sorted(p.name for p in (CONFIGS / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_definition_resolves(run_cli, name, capsys):
    """The W&B command (with the first grid point as W&B's ${args} would append it) parses with --print_config."""
    sweep = load_sweep(CONFIGS / "sweeps" / name)
    assert {"program", "method", "metric", "parameters", "command"} <= set(sweep)
    assert "${args}" in sweep["command"] and sweep["metric"]["goal"] in ("minimize", "maximize")
    points = trials(sweep)
    assert len(points) == len({tuple(p.items()) for p in points}) > 1
    args = [*base_args(sweep), *(f"--{k}={as_cli(v)}" for k, v in points[0].items())]
    with pytest.raises(SystemExit) as e:
        run_cli([*args, "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert f"group: {sweep['name']}" in printed and "offline: false" in printed


def test_trials_grid_and_random():
    sweep = {
        "method": "grid",
        "parameters": {"a": {"values": [1, 2]}, "b": {"values": ["x", "y", "z"]}, "c": {"value": 0}},
    }
    assert len(trials(sweep)) == 6 and trials(sweep, max_trials=2) == [
        {"a": 1, "b": "x", "c": 0},
        {"a": 1, "b": "y", "c": 0},
    ]
    sweep = {
        "method": "random",
        "run_cap": 20,
        "parameters": {
            "lr": {"distribution": "log_uniform_values", "min": 1e-6, "max": 1e-4},
            "g": {"min": 2, "max": 8},
            "kind": {"values": ["sigmoid", "ipo"]},
        },
    }
    points = trials(sweep, seed=1)
    assert len(points) == 20 and points == trials(sweep, seed=1)
    assert all(1e-6 <= p["lr"] <= 1e-4 and isinstance(p["g"], int) and 2 <= p["g"] <= 8 for p in points)
    with pytest.raises(ValueError, match="grid search needs"):
        trials({"method": "grid", "parameters": {"lr": {"min": 0.1, "max": 1.0}}})
    assert as_cli(True) == "true" and as_cli(None) == "null" and as_cli([1, 2]) == "[1, 2]"


def test_local_sweep_writes_summary(tmp_path, monkeypatch):
    """Two tiny DPO trials of the β sweep, offline, CSV only: summary.csv has one row per trial with the metric."""
    monkeypatch.chdir(tmp_path)
    smoke = ["--config", str(CONFIGS / "smoke.yaml"), "--trainer.limit_val_batches=1"]
    summary = main([str(CONFIGS / "sweeps" / "dpo_beta.yaml"), "--max-trials", "2", "--out", "sw", "--", *smoke])
    assert summary == Path("sw") / "summary.csv"
    with summary.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model.init_args.beta"] for r in rows] == ["0.01", "0.05"]
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert 0.0 <= float(r["val/rewards/accuracies/final"]) <= 1.0 and r["val/rewards/accuracies/best"]
        assert (Path(r["log_dir"]) / "metrics.csv").is_file()
    assert not list(Path("runs").glob("*/wandb"))  # the CSV logger replaced the command's W&B logger


def test_config_tags():
    assert config_tags(["configs/dpo.yaml", "/x/configs/papers/dpo_hh.yaml", "other/my.yaml"]) == [
        "dpo",
        "papers/dpo_hh",
        "my",
    ]


def test_wandb_offline_run_is_grouped_and_tagged(run_cli, tmp_path):
    cli = run_cli(
        ["fit", "--config", "dpo.yaml", "--config", "smoke.yaml", "--config", "logger/wandb.yaml"]
        + ["--trainer.logger.init_args.group=beta_sweep_42"]
    )
    wandb_cfg = cli.config.fit.trainer.logger[-1].init_args
    assert wandb_cfg.group == "beta_sweep_42" and wandb_cfg.tags == ["dpo", "smoke", "logger/wandb"]
    run_dirs = list((tmp_path / "runs" / "dpo" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    deadline = time.time() + 30  # wandb's service process writes the run file asynchronously
    while time.time() < deadline:
        data = b"".join(p.read_bytes() for p in run_dirs[0].glob("*.wandb"))
        if b"beta_sweep_42" in data and b"logger/wandb" in data:
            break
        time.sleep(0.5)
    assert b"beta_sweep_42" in data, "the group name is not in the offline run file"
    assert b"logger/wandb" in data  # a tag
