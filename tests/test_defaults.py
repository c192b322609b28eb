"""Every default, as shipped, visibly learns its task (the README's "what you should see"). Slow tier: each is a
full ~1-minute fit on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import column, read_metrics

RUN = ["--trainer.enable_progress_bar=false"]


def fit(run_cli, job: str):
    cli = run_cli(["fit", "--config", f"{job}.yaml", *RUN])
    assert cli.trainer.state.finished and cli.trainer.global_step == cli.trainer.max_steps
    return cli, read_metrics(cli.trainer.logger.log_dir)


@torch.no_grad()
def held_out_exact_match(cli, n: int = 128) -> float:
    """Fraction of the first ``n`` validation prompts whose greedy completion is exactly the data's completion."""
    from src.rollout import SamplingConfig, generate

    dm, module = cli.datamodule, cli.model
    tok, rows = dm.tokenizer, dm.val_set.rows[:n]
    hits = 0
    for row in rows:
        target = tok.decode(row["completion_ids"], skip_special_tokens=True).strip()
        ids = torch.tensor([row["prompt_ids"]])
        sampling = SamplingConfig(max_new_tokens=len(row["completion_ids"]) + 4, temperature=0.0)
        special = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        out = generate(module.model, ids, torch.ones_like(ids), sampling, **special)
        hits += tok.decode(out.completion_ids[0], skip_special_tokens=True).strip() == target
    return hits / len(rows)


@pytest.mark.slow
def test_sft_default_learns_to_copy_held_out_prompts(run_cli):
    cli, rows = fit(run_cli, "sft")
    start, val = column(rows, "train/loss")[0], column(rows, "val/loss")
    assert val[-1] <= 0.5 * start, (start, val)  # step 1's loss is that of the initial weights
    assert held_out_exact_match(cli) >= 0.5


@pytest.mark.slow
def test_rm_default_ranks_held_out_pairs(run_cli):
    _, rows = fit(run_cli, "rm")
    assert column(rows, "train/loss")[0] == pytest.approx(0.693147, abs=1e-5)
    assert column(rows, "val/accuracy")[-1] >= 0.85


@pytest.mark.slow
def test_dpo_default_prefers_copies(run_cli):
    _, rows = fit(run_cli, "dpo")
    acc = column(rows, "train/rewards/accuracies")
    assert acc[0] == 0.0 and column(rows, "train/loss")[0] == pytest.approx(0.693147, abs=1e-5)
    assert column(rows, "val/rewards/accuracies")[-1] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize(("job", "key"), [("grpo", "train/reward"), ("ppo", "train/objective/scores")])
def test_online_defaults_raise_their_reward(run_cli, job, key):
    """End-of-run mean reward (the last 5 logged steps) at least 3x the first step's."""
    _, rows = fit(run_cli, job)
    reward = column(rows, key)
    assert sum(reward[-5:]) / 5 >= 3 * reward[0] > 0, reward
