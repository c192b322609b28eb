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
from src.callbacks.logprob import MetricWindow
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
        # (7) are flushed to callback_metrics; step 1 also goes to the loggers. Windows: since the previous flush.
        # Step 1 is written too (CSV step 0), though it is not a logging step.
        assert [s for s, _ in logged] == [0, EVERY - 1, 2 * EVERY - 1]
        windows = [range(1, 2), range(2, 4), range(4, 7)]
        for (_, value), window in zip(logged, windows):
            assert value == pytest.approx(rec.mean(key, window), abs=1e-6), (key, window)
        assert rec.seen[STEPS][f"train/{key}"] == pytest.approx(rec.mean(key, range(STEPS, STEPS + 1)), abs=1e-6)
    # The margins of different steps differ, so a per-step (unwindowed) value would fail the comparison above.
    margins = "rewards/margins"
    assert abs(rec.mean(margins, range(6, 7)) - rec.mean(margins, range(4, 7))) > 1e-6
    assert len(column(rows, "train/loss")) == 3  # the module's own self.log: the logging steps, plus step 1


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


def test_metric_window_pools_finite_values():
    acc = MetricWindow()
    acc.update({"a": torch.tensor([1.0, float("nan"), 3.0]), "b": torch.tensor([float("nan")] * 3)})
    acc.update({"a": torch.tensor([5.0, float("inf")]), "c": torch.tensor(2.0, dtype=torch.float64)})
    acc.update({"c": torch.tensor([4.0])})
    assert {k: (float(s), float(n)) for k, (s, n) in acc.totals().items()} == {
        "a": (9.0, 3.0),
        "b": (0.0, 0.0),
        "c": (6.0, 2.0),
    }
    means = acc.pop_means()
    assert set(means) == {"a", "c"}  # "b" had no finite value
    assert means["a"].item() == pytest.approx(3.0) and means["c"].item() == pytest.approx(3.0)
    assert len(acc) == 0 and acc.pop_means() == {}
    acc.update({"a": torch.tensor([7.0])})  # starts over after a pop
    assert acc.pop_means()["a"].item() == pytest.approx(7.0)


def test_a_plain_trainer_logs_the_metrics_without_the_cli(tmp_path):
    """``AlignmentModule.configure_callbacks`` adds LogProbMetrics, TokenThroughput and FitSummary to a trainer built
    in Python; under gradient accumulation the windows are flushed on the steps Lightning itself logs."""
    from lightning import Trainer
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    from src.callbacks import LogProbMetrics, TokenThroughput
    from src.data import AlignmentDataModule
    from src.modules.dpo import DPO

    trainer = Trainer(
        max_steps=7,
        accumulate_grad_batches=2,
        log_every_n_steps=3,
        limit_val_batches=0,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TokenThroughput(window=2)],
    )
    trainer.fit(DPO(), AlignmentDataModule(batch_size=4, tiny_rows=128))
    kinds = [type(c) for c in trainer.callbacks]
    assert kinds.count(TokenThroughput) == 1 and LogProbMetrics in kinds and FitSummary in kinds
    assert isinstance(trainer.callbacks[kinds.index(TokenThroughput)], ThroughputMonitor)
    rows = read_metrics(trainer.logger.log_dir)
    steps = {key: [int(r["step"]) for r in rows if r.get(key)] for key in ("train/loss", "train/rewards/accuracies")}
    assert steps["train/rewards/accuracies"] == [0, 2, 5]  # step 1, then after optimizer steps 3 and 6
    assert steps["train/loss"] == [2, 5]  # under accumulation the step-1 row leaves the loss to the logging steps
    by_step: dict[int, dict[str, float]] = {}  # Lightning's monitor and self.log write separate rows of a step
    for r in rows:
        by_step.setdefault(int(r["step"]), {}).update({k: float(v) for k, v in r.items() if v and k != "step"})
    throughput = [m for m in by_step.values() if "train/tokens_per_s" in m]
    assert throughput  # the 2-batch window is full from the second batch on
    for m in throughput:
        assert m["train/tokens_per_s"] == pytest.approx(m["train/device/items_per_sec"], rel=1e-5)
        assert m["train/samples_per_s"] == pytest.approx(m["train/device/samples_per_sec"], rel=1e-5)
        assert m["train/tokens_per_s"] > m["train/samples_per_s"] > 0


def test_fit_summary_shows_a_held_out_greedy_completion_before_and_after(tmp_path, caplog):
    """The end-of-fit summary (rank zero, plain ``Trainer`` too) prints the first held-out prompt's greedy completion
    at the start and at the end, and the data's completion; a reward model (no LM head) gets none."""
    from lightning import Trainer

    from src.callbacks.summary import greedy_sample
    from src.data import AlignmentDataModule
    from src.modules.dpo import DPO
    from src.modules.reward import RewardModel

    def fit(module, steps=4):
        trainer = Trainer(
            max_steps=steps,
            limit_val_batches=0,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        dm = AlignmentDataModule(batch_size=4, tiny_rows=64)
        trainer.fit(module, dm)
        return trainer, dm

    with caplog.at_level("INFO"):
        trainer, dm = fit(DPO(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)))
    text = caplog.text
    row = dm.val_set[0]
    prompt = dm.tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)
    chosen = dm.tokenizer.decode(row["chosen_ids"], skip_special_tokens=True)
    assert f"greedy completion of the held-out prompt {prompt!r}:" in text
    lines = text[text.index("greedy completion of") :].splitlines()
    before, after, data = (line.split(": ", 1) for line in lines[1:4])
    assert before[0].strip() == "step 0" and after[0].strip() == "step 4" and data == ["    data", repr(chosen)]
    now = greedy_sample(trainer, trainer.lightning_module)  # greedy: the trained policy gives the same text again
    assert repr(now["completion"]) == after[1] and now["step"] == 4
    assert before[1] != after[1]  # 4 steps at lr 1e-2 change the greedy text
    caplog.clear()
    with caplog.at_level("INFO"):
        trainer, _ = fit(RewardModel(), steps=1)
    assert greedy_sample(trainer, trainer.lightning_module) is None and "greedy completion" not in caplog.text


def test_fit_summary_counts_held_out_exact_matches_like_one_prompt_at_a_time(caplog):
    """``fit_summary.exact_match`` (the SFT default's copy accuracy): a policy that memorised 8 training rows is shown
    them as held-out prompts beside 8 it never saw; the batched, left-padded count equals greedy generation of one
    unpadded prompt at a time, and the start -> end line is printed."""
    from lightning import Trainer

    from src.callbacks.summary import exact_matches
    from src.data import AlignmentDataModule
    from src.data.datamodule import RowDataset
    from src.modules.sft import SFT
    from src.rollout import SamplingConfig, generate

    torch.manual_seed(0)
    dm = AlignmentDataModule(kind="sft", batch_size=8, tiny_rows=64, shuffle=False, val_size=0.25)
    module = SFT(optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), lr_scheduler="constant", warmup_steps=0)
    trainer = Trainer(
        max_steps=80, limit_train_batches=1, limit_val_batches=0, gradient_clip_val=1.0, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[FitSummary(exact_match=16, generation=False)],
    )  # fmt: skip
    with caplog.at_level("INFO"):
        trainer.fit(module, dm)
    end, n_val = exact_matches(trainer, module, 16)
    assert f"held-out greedy completions equal to the data's: 0/{n_val} at the start -> {end}/{n_val}" in caplog.text
    seen, unseen = dm.train_set.rows[:8], dm.val_set.rows[:8]
    dm.val_set = RowDataset(unseen[:4] + seen + unseen[4:])
    tok = dm.tokenizer
    alone = 0
    for row in dm.val_set.rows:
        ids = torch.tensor([row["prompt_ids"]])
        out = generate(
            module.model, ids, torch.ones_like(ids), SamplingConfig(len(row["completion_ids"]) + 4, temperature=0.0),
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        text = tok.decode(out.completion_ids[0], skip_special_tokens=True).strip()
        alone += text == tok.decode(row["completion_ids"], skip_special_tokens=True).strip()
    hits, n = exact_matches(trainer, module, 16)
    assert n == 16 and hits == alone and alone >= 6, (hits, alone)  # the memorised rows copy, the others mostly not
