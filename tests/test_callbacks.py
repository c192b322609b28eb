"""LogProbMetrics logs window means only on Lightning's logging steps (plus step 1 and the last step); FitSummary
records every optimizer step from the step outputs. One 7-step DPO run with ``log_every_n_steps=3`` serves all tests."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
from lightning import Callback

from src.callbacks import FitSummary
from src.callbacks.logprob import MeanAccumulator
from tests.conftest import CONFIGS, FAST, column, read_metrics

KEYS = ("rewards/accuracies", "rewards/margins")
STEPS, EVERY = 7, 3


class StepRecorder(Callback):
    """Per optimizer step: the per-sample metric values of its micro-batches, and what ``callback_metrics`` held
    for ``train/<key>`` when the next step started (i.e. after the previous step's logging)."""

    def __init__(self) -> None:
        self.samples: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.seen: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.seen[step] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx) -> None:
        per_key = self.samples.setdefault(trainer.global_step, {})
        for key in KEYS:
            per_key.setdefault(key, []).append(outputs["metrics"][key].detach().clone().double())

    def on_train_end(self, trainer, pl_module) -> None:
        self.seen[trainer.global_step] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")
        }

    def mean(self, key: str, steps: range) -> float:
        """Mean of the per-sample values of ``steps`` (1-based optimizer steps), pooled as LogProbMetrics pools."""
        return torch.cat([v for s in steps for v in self.samples[s][key]]).mean().item()


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    from src.cli import main

    tmp = tmp_path_factory.mktemp("callbacks")
    env = dict(os.environ)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        cli = main(
            [
                "fit",
                "--config",
                str(CONFIGS / "dpo.yaml"),
                *FAST,
                f"--trainer.max_steps={STEPS}",
                f"--trainer.log_every_n_steps={EVERY}",
                "--trainer.callbacks+=tests.test_callbacks.StepRecorder",
            ]
        )
        rows = read_metrics(os.path.abspath(cli.trainer.logger.log_dir))
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, StepRecorder)]
    assert sorted(recorder.samples) == list(range(1, STEPS + 1))
    return cli, recorder, rows


def test_train_metrics_are_window_means_on_logging_steps(dpo_run):
    _, rec, rows = dpo_run
    for key in KEYS:
        logged = [(int(r["step"]), float(r[f"train/{key}"])) for r in rows if r.get(f"train/{key}")]
        # Lightning logs after optimizer steps 3 and 6 (CSV step = steps done before it); step 1 and the last step
        # (7) are flushed to callback_metrics only. Windows: since the previous flush.
        assert [s for s, _ in logged] == [EVERY - 1, 2 * EVERY - 1]
        windows = [range(2, 4), range(4, 7)]
        for (_, value), window in zip(logged, windows):
            assert value == pytest.approx(rec.mean(key, window), abs=1e-6), (key, window)
        assert rec.seen[STEPS][f"train/{key}"] == pytest.approx(rec.mean(key, range(STEPS, STEPS + 1)), abs=1e-6)
    # The margins of different steps differ, so a per-step (unwindowed) value would fail the comparison above.
    margins = "rewards/margins"
    assert abs(rec.mean(margins, range(6, 7)) - rec.mean(margins, range(4, 7))) > 1e-6
    assert len(column(rows, "train/loss")) == 2  # the module's own self.log follows the same logging steps


def test_step_one_values_are_in_callback_metrics(dpo_run):
    _, rec, _ = dpo_run
    for key in KEYS:
        step1 = rec.mean(key, range(1, 2))
        assert rec.seen[1][f"train/{key}"] == pytest.approx(step1, abs=1e-6)
        # Not a logging step: callback_metrics still holds the step-1 window after step 2.
        assert rec.seen[2][f"train/{key}"] == pytest.approx(step1, abs=1e-6)
    assert rec.seen[1]["train/rewards/accuracies"] == 0.0  # policy == reference at step 1: no pair is ranked right
    assert "train/rewards/margins" not in rec.seen[0]


def test_fit_summary_uses_every_step_from_the_outputs(dpo_run):
    cli, rec, _ = dpo_run
    (summary,) = [c for c in cli.trainer.callbacks if isinstance(c, FitSummary)]
    history = summary.history
    for key in KEYS:
        per_step = [rec.mean(key, range(s, s + 1)) for s in range(1, STEPS + 1)]
        assert history[f"train/{key}"] == pytest.approx(per_step, abs=1e-6)
        n = STEPS // 2  # window 10 > half the run: the first and last 3 steps
        first, last = summary.summary(cli.trainer)[f"train/{key}"]
        assert first == pytest.approx(sum(per_step[:n]) / n, abs=1e-6)
        assert last == pytest.approx(sum(per_step[-n:]) / n, abs=1e-6)
    assert len(history["train/loss"]) == STEPS and history["train/loss"][0] == pytest.approx(math.log(2), abs=1e-6)


def test_mean_accumulator_pools_finite_values():
    acc = MeanAccumulator()
    acc.update({"a": torch.tensor([1.0, float("nan"), 3.0]), "b": torch.tensor([float("nan")] * 3)})
    acc.update({"a": torch.tensor([5.0, float("inf")]), "c": torch.tensor(2.0, dtype=torch.float64)})
    acc.update({"c": torch.tensor([4.0])})
    means = acc.pop_means()
    assert set(means) == {"a", "c"}  # "b" had no finite value
    assert means["a"].item() == pytest.approx(3.0) and means["c"].item() == pytest.approx(3.0)
    assert len(acc) == 0 and acc.pop_means() == {}
