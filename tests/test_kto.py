"""KTO: the loss against hand values, the unpaired rows and KL pairs of the DataModule, the module at step 0, and (slow)
the job config learning on the embedded default."""

from __future__ import annotations

import json
import math

import pytest
import torch

from src.data import AlignmentDataModule, DataError
from src.losses import kto_loss
from src.modules.kto import KTO
from tests.conftest import FAST, column, read_metrics


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- the loss ------------------------------------------------------------------------------------------------------
def test_kto_loss_hand_values():
    # r = policy - ref = [0.5, -1.0, 2.0]; labels desirable, undesirable, undesirable; z0 = 0.3; beta = 0.1
    policy, ref = torch.tensor([-1.0, -2.0, -1.0]), torch.tensor([-1.5, -1.0, -3.0])
    labels = torch.tensor([True, False, False])
    losses, rewards, z0 = kto_loss(policy, ref, labels, torch.tensor(0.3), beta=0.1)
    expected = [1 - sigmoid(0.1 * (0.5 - 0.3)), 1 - sigmoid(0.1 * (0.3 + 1.0)), 1 - sigmoid(0.1 * (0.3 - 2.0))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.05, -0.1, 0.2], rel=1e-6) and z0.item() == pytest.approx(0.3)
    # weights scale each row's loss by its label's weight; a negative KL estimate is clamped to 0
    weighted, _, z0 = kto_loss(policy, ref, labels, torch.tensor(-0.4), desirable_weight=1.33, undesirable_weight=0.5)
    assert z0.item() == 0.0
    expected = [1.33 * (1 - sigmoid(0.05)), 0.5 * (1 - sigmoid(0.1)), 0.5 * (1 - sigmoid(-0.2))]
    assert weighted.tolist() == pytest.approx(expected, rel=1e-6)


def test_apo_zero_unpaired_hand_values_ignore_kl():
    policy, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    labels = torch.tensor([True, False])
    losses, _, z0 = kto_loss(policy, ref, labels, torch.tensor(5.0), beta=0.1, loss_type="apo_zero_unpaired")
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.05), sigmoid(-0.1)], rel=1e-6) and z0.item() == 0


def test_kto_loss_gradient_pushes_desirable_up_undesirable_down():
    policy = torch.zeros(2, requires_grad=True)
    losses, _, _ = kto_loss(policy, torch.zeros(2), torch.tensor([True, False]), torch.tensor(0.0))
    losses.mean().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # gradient descent raises the desirable log-prob, lowers the other


def test_kto_loss_rejects_an_unknown_type():
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(torch.zeros(1), torch.zeros(1), torch.ones(1, dtype=torch.bool), loss_type="bco")


# -- the data ------------------------------------------------------------------------------------------------------
def _dm(**kw) -> AlignmentDataModule:
    dm = AlignmentDataModule(kind="unpaired", val_size=0, shuffle=False, **kw)
    dm.setup()
    return dm


def test_preference_rows_split_and_interleave(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"ka mi {i}", "chosen": " ka mi", "rejected": f" {i} 7 9"} for i in range(3)]
    rows.append({"prompt": "zo", "completion": " zo", "label": False})  # an unpaired row in the same file
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = _dm(path=str(path), batch_size=2)
    ds, tok = dm.train_set, dm.tokenizer
    # the unpaired row first, then desirable i, undesirable i + n/2: pairs 0, 1, 2 -> d0 u1 d1 u2 d2 u0
    assert [r["label"] for r in ds] == [False, True, False, True, False, True, False]
    assert [tok.decode(r["completion_ids"][:-1]) for r in ds[1:3]] == [" ka mi", " 1 7 9"]
    assert [tok.decode(r["prompt_ids"][1:]) for r in ds[1:3]] == ["ka mi 0", "ka mi 1"]


def test_tiny_unpaired_task_and_kl_rows():
    dm = _dm(tiny_rows=8, batch_size=4)
    assert len(dm.train_set) == 16 and sum(r["label"] for r in dm.train_set) == 8
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.bool and batch["kl_input_ids"].shape[0] == 4
    for i in range(4):  # KL row i = prompt i + completion i - 1
        kl = batch["kl_input_ids"][i][batch["kl_attention_mask"][i].bool()].tolist()
        row, prev = dm.train_set[i], dm.train_set[(i - 1) % 4]
        assert kl == row["prompt_ids"] + prev["completion_ids"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a", "completion": " b", "label": "yes"}, "field 'label': expected true or false"),
        ({"prompt": "a", "completion": " b"}, "field 'label': missing"),
        ({"prompt": "a", "label": True}, "field 'completion': missing"),
    ],
)
def test_bad_unpaired_rows_name_the_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row))
    with pytest.raises(DataError, match=message):
        _dm(path=str(path))


# -- the module ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unpaired_batch():
    return next(iter(_dm(tiny_rows=8, batch_size=6).train_dataloader()))


def test_step0_loss_is_one_half_per_row(unpaired_batch):
    """Policy = reference: r = 0 and z0 = 0, so each row's loss is its weight times 1 - σ(0) = 1/2."""
    module = KTO(desirable_weight=1.5, undesirable_weight=0.5)
    module.configure_model()
    loss, metrics = module.compute_loss(unpaired_batch)
    labels = unpaired_batch["label"]
    expected = (torch.where(labels, 1.5, 0.5) * 0.5).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["kl"].item() == 0 and metrics["rewards/accuracies"].sum() == 0  # ties: no row on its side yet
    assert metrics["rewards/chosen"].numel() == int(labels.sum())


def test_batch_size_one_is_refused(run_cli):
    with pytest.raises(ValueError, match="batch_size >= 2"):
        run_cli(["fit", "--config", "kto.yaml", *FAST, "--data.batch_size=1"])


def test_apo_zero_unpaired_runs(run_cli):
    cli = run_cli(["fit", "--config", "kto.yaml", *FAST, "--model.init_args.loss_type=apo_zero_unpaired"])
    rows = read_metrics(cli.trainer.logger.log_dir)
    assert cli.trainer.global_step == 3 and set(column(rows, "train/kl")) == {0.0}


@pytest.mark.slow
def test_kto_config_learns(run_cli):
    """The job config as shipped: KTO's implied classifier (desirable iff r > z0) gets >= 85% of the rows right."""
    cli = run_cli(["fit", "--config", "kto.yaml", "--trainer.enable_progress_bar=false"])
    rows = read_metrics(cli.trainer.logger.log_dir)
    acc, loss = column(rows, "train/rewards/accuracies"), column(rows, "train/loss")
    assert acc[0] == 0.0 and loss[0] == pytest.approx(0.5, abs=1e-4)
    assert sum(acc[-3:]) / 3 >= 0.85, acc
    assert column(rows, "val/rewards/accuracies")[-1] >= 0.85
