"""``python -m src plot RUN_DIR``: a PNG of a run's curves from its CSV log, for users without W&B.

One panel per curve family that the run logged: loss, reward, accuracy, reward margin, KL, entropy, completion
length, gradient norm and learning rate; train and validation values of a family share a panel. ``RUN_DIR`` is a
CSV logger's directory (``runs/<job>/version_N``) or any directory above one (the newest ``metrics.csv`` below it is
used). The figure is written next to the log as ``curves.png``; its panel titles are stored in the PNG's
``Description`` metadata (one per line) so tools and tests can read what it shows. :class:`PlotCurves` does the same at
the end of every fit of the CLI (``--plot.enabled false`` turns it off).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

# (panel title, pattern of the metric names it shows), in display order; a metric goes to the first panel it matches
PANELS: tuple[tuple[str, str], ...] = (
    ("loss", r"^(train|val)/loss$"),
    ("reward", r"^(train|val)/(reward|objective/scores|objective/rlhf_reward|rewards/chosen|rewards/rejected)$"),
    ("accuracy", r"^(train|val)/(rewards/accuracies|accuracy|exact_match)$"),
    ("reward margin", r"^(train|val)/rewards/margins$"),
    ("KL", r"^(train|val)/(kl|objective/kl|policy/approxkl_avg)$"),
    ("entropy", r"^(train|val)/(entropy|objective/entropy)$"),
    ("completion length", r"^(train|val)/completions/mean_length$"),
    ("grad norm", r"^train/grad_norm$"),
    ("learning rate", r"^(lr|lr-.*|train/lr)$"),
)


def find_metrics(run_dir: str | Path) -> Path:
    """``run_dir/metrics.csv``, or the newest ``metrics.csv`` below ``run_dir``."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
    if (path / "metrics.csv").exists():
        return path / "metrics.csv"
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{path}: no metrics.csv below it (plot needs the CSV logger's output)")
    return found[-1]


def read_curves(metrics: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (steps, values)}`` of every numeric column of a Lightning ``metrics.csv`` (empty cells skipped)."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    with open(metrics, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or not value:
                    continue
                try:
                    x, y = float(step), float(value)
                except ValueError:
                    continue
                if math.isfinite(y):
                    steps, values = curves.setdefault(key, ([], []))
                    steps.append(x)
                    values.append(y)
    return curves


def panels_of(curves: dict[str, tuple[list[float], list[float]]]) -> dict[str, list[str]]:
    """``{panel title: [metric names]}`` for the panels that have at least one curve, in display order."""
    out: dict[str, list[str]] = {}
    for key in sorted(curves):
        title = next((t for t, pattern in PANELS if re.match(pattern, key)), None)
        if title is not None:
            out.setdefault(title, []).append(key)
    return {t: out[t] for t, _ in PANELS if t in out}


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves (one panel per family, see :data:`PANELS`) into ``out`` (default ``curves.png`` next
    to ``metrics.csv``); returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    metrics = find_metrics(run_dir)
    curves = read_curves(metrics)
    panels = panels_of(curves)
    if not panels:
        raise ValueError(f"{metrics}: none of its columns is a curve this plot knows ({[t for t, _ in PANELS]})")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            steps, values = curves[key]
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(str(metrics.parent), fontsize=9)
    fig.tight_layout()
    path = Path(out) if out is not None else metrics.parent / "curves.png"
    fig.savefig(path, dpi=100, metadata={"Title": "curves", "Description": "\n".join(panels)})
    plt.close(fig)
    return path


class PlotCurves(Callback):
    """At the end of training, ``curves.png`` from each CSV logger's ``metrics.csv`` (rank zero; skipped with one
    line when matplotlib is missing). Runs in ``on_train_end``, before the summary lists the outputs."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                continue
            logger.save()  # flush the rows still buffered
            try:
                plot_run(logger.log_dir)
            except ImportError:
                rank_zero_info("curves.png skipped: matplotlib is not installed (pip install matplotlib)")
            except (FileNotFoundError, ValueError) as e:
                rank_zero_info(f"curves.png skipped: {e}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m src plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a CSV logger directory (runs/<job>/version_N) or a directory above one")
    parser.add_argument("--out", default=None, help="output PNG (default: curves.png next to metrics.csv)")
    args = parser.parse_args(argv)
    path = plot_run(args.run_dir, args.out)
    print(path)
    return path
