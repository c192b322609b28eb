"""Reward model: ln 2 at equal scores, last-real-token pooling, training + export that PPO/GRPO can load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from src.data import AlignmentDataModule
from src.modules.reward import RewardModel, last_token_index, score_head, sequence_scores
from src.rewards import RewardModelScorer
from tests.conftest import FAST, column, read_metrics


@pytest.fixture(scope="module")
def pref_batch():
    dm = AlignmentDataModule(kind="preference", tiny_rows=16, val_size=0, shuffle=False, batch_size=8)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def fresh_rm(**kw) -> RewardModel:
    torch.manual_seed(0)
    m = RewardModel(**kw)
    m.configure_model()
    return m


def test_fresh_zero_head_gives_ln2_and_no_preference(pref_batch):
    m = fresh_rm()
    assert torch.count_nonzero(score_head(m.model).weight) == 0
    loss, metrics = m.compute_loss(pref_batch)
    assert loss.item() == torch.tensor(math.log(2)).item()  # exactly (in float32): every score is 0
    assert torch.equal(metrics["margin"], torch.zeros(8)) and metrics["accuracy"].sum() == 0
    loss.backward()  # the head gets a gradient (scores can move), the backbone not yet (head = 0)
    assert score_head(m.model).weight.grad.abs().sum() > 0


def test_centering_term_and_random_head(pref_batch):
    m = fresh_rm(zero_init_head=False)
    loss, metrics = m.compute_loss(pref_batch)
    c, r = metrics["rewards/chosen"], metrics["rewards/rejected"]
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(c - r).mean().item(), rel=1e-6)
    m.hparams.center_rewards_coefficient = 0.5
    centered, _ = m.compute_loss(pref_batch)
    assert centered.item() == pytest.approx(loss.item() + 0.5 * ((c + r) ** 2).mean().item(), rel=1e-5)


def _margin_rows(tmp_path, margins):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i, m in enumerate(margins):
            row = {"prompt": f"p{i} tamezi", "chosen": " tamezi", "rejected": " 12 34"}
            if m is not ...:
                row["margin"] = m
            f.write(json.dumps(row) + "\n")
    return path


def test_margin_column_reaches_the_loss(tmp_path):
    """Llama 2's per-pair margin from a ``margin`` column: -log s(r_w - r_l - m); a fresh zero head scores 0, so the
    loss of each pair is -log s(-m) = softplus(m)."""
    margins = [0.0, 1.0, 2.5, -1.0]
    dm = AlignmentDataModule(
        kind="preference", path=str(_margin_rows(tmp_path, margins)), val_size=0, shuffle=False, batch_size=4
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["margin"], torch.tensor(margins))
    loss, _ = fresh_rm().compute_loss(batch)
    expected = sum(math.log1p(math.exp(m)) for m in margins) / len(margins)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "margins, message",
    [([0.5, "big", 1.0], "row 2: field 'margin': expected a finite number, got 'big'"),
     ([0.5, True], "row 2: field 'margin': expected a finite number"),
     ([0.5, ..., 1.0], "row 2: field 'margin': given on some rows only"),
     ([..., 0.5], "row 2: field 'margin': given on some rows only")],
)  # fmt: skip
def test_bad_margin_column_names_file_row_and_field(tmp_path, margins, message):
    from src.data.datamodule import DataError

    path = _margin_rows(tmp_path, margins)
    dm = AlignmentDataModule(kind="preference", path=str(path), val_size=0, shuffle=False, batch_size=2)
    with pytest.raises(DataError, match=message) as err:
        dm.setup()
    assert str(path) in str(err.value)


def test_score_is_read_at_the_last_real_token_for_any_padding():
    m = fresh_rm(zero_init_head=False)
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask_r = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    mask_l = mask_r.flip(-1)
    assert last_token_index(mask_r).item() == 4 and last_token_index(mask_l).item() == 7
    with torch.no_grad():
        s = sequence_scores(m.model, ids, torch.ones_like(ids))
        s_r = sequence_scores(m.model, right, mask_r)
        s_l = sequence_scores(m.model, left, mask_l)
        hf = m.model(input_ids=right, attention_mask=mask_r).logits[:, 0]  # HF pooling: last non-pad token
    torch.testing.assert_close(s_r, s, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s_l, s, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hf, s, atol=1e-5, rtol=1e-4)


def test_rm_trains_and_exports_a_scorer(run_cli, tmp_path):
    cli = run_cli(["fit", "--config", "rm.yaml", *FAST, "--hf_export.dirpath=rm_hf", "--trainer.max_steps=4"])
    rows = read_metrics(cli.trainer.logger.log_dir)
    assert column(rows, "train/accuracy") and column(rows, "val/accuracy") and column(rows, "train/margin")
    assert column(rows, "train/rewards/chosen") and column(rows, "val/rewards/rejected")
    assert column(rows, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    scorer = RewardModelScorer(tmp_path / "rm_hf", device="cpu", template="{prompt}{completion}</s>")
    prompt = "bada 12 kelo"
    # Text scoring of the export equals the module's own score of the same tokens.
    tok = cli.datamodule.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"] + tok(" bada 12 kelo", add_special_tokens=False)["input_ids"] + [2]])
    with torch.no_grad():
        own = sequence_scores(cli.model.model, ids, torch.ones_like(ids)).item()
    assert scorer([prompt], [" bada 12 kelo"])[0] == pytest.approx(own, abs=1e-4)
