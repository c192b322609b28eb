"""``curves.png`` at the end of every default job's fit, and ``python -m src plot RUN_DIR``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402 - a matplotlib dependency

from src.plot import panels_of, plot_run, read_curves  # noqa: E402

# the panels each default job's short fit must show (more may appear)
EXPECTED = {
    "sft.yaml": {"loss", "grad norm"},
    "rm.yaml": {"loss", "accuracy", "grad norm"},
    "dpo.yaml": {"loss", "reward", "accuracy", "reward margin", "grad norm"},
    "grpo.yaml": {"loss", "reward", "KL", "completion length", "grad norm"},
    "ppo.yaml": {"loss", "reward", "KL", "grad norm"},
}


def panel_titles(png: Path) -> list[str]:
    return Image.open(png).info["Description"].split("\n")


@pytest.mark.plots
@pytest.mark.parametrize("config", sorted(EXPECTED))
def test_every_default_fit_draws_its_curves(run_cli, config):
    cli = run_cli(["fit", "--config", config, *FAST])
    png = Path(cli.trainer.logger.log_dir) / "curves.png"
    assert png.exists() and Image.open(png).size[0] > 400
    titles = panel_titles(png)
    assert EXPECTED[config] <= set(titles), titles
    assert len(titles) == len(set(titles))  # one panel per curve family


@pytest.mark.slow  # a fresh `python -m src` process (~6-8 s): the default tier stays under 5 minutes
def test_plot_command_from_its_own_process(tmp_path):
    run = tmp_path / "runs" / "job" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss,train/kl,train/reward,other\n"
        "0,0,1.0,,0.0,0.1,7\n0,1,0.5,0.7,0.01,,7\n0,2,0.25,,0.02,0.4,nan\n"
    )
    out = tmp_path / "fig.png"
    proc = subprocess.run(
        [sys.executable, "-m", "src", "plot", str(tmp_path / "runs"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert panel_titles(out) == ["loss", "reward", "KL"]
    curves = read_curves(run / "metrics.csv")
    assert curves["train/loss"] == ([0.0, 1.0, 2.0], [1.0, 0.5, 0.25]) and curves["val/loss"] == ([1.0], [0.7])
    assert curves["train/reward"] == ([0.0, 2.0], [0.1, 0.4])  # empty cells are not zeros
    assert panels_of(curves)["loss"] == ["train/loss", "val/loss"]


def test_plot_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        plot_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("epoch,step,foo\n0,0,1\n")
    with pytest.raises(ValueError, match="metrics.csv: none of its columns"):
        plot_run(tmp_path)


@pytest.mark.slow  # a fresh `python -m src` process (~6-8 s): the default tier stays under 5 minutes
def test_plot_command_names_a_missing_run_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "src", "plot", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: run directory")
