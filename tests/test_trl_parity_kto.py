"""Side by side with TRL 1.16: our KTO module's loss, gradients and metrics against TRL's own ``KTOTrainer`` code, and
our unpaired rows and KL pairs against TRL's data rules.

TRL computes the KTO loss inside ``KTOTrainer._compute_loss`` (trl/trainer/kto_trainer.py, from line 1370), from the
per-token log-probs its fused LM head returns for the matched rows and (``_compute_kl_logps``) the mismatched KL rows.
We call those methods unbound on a ``SimpleNamespace`` holding the attributes they read, with stand-in models that
return given per-token log-probs; our side is the production path, ``KTO.compute_loss``, with ``policy_logps`` /
``reference_logps`` returning the same numbers. Inputs have left and right padding, prompts, an empty completion, and
batches with one or no row of a label; TRL's head gives 0 at ignored positions, ours get NaN there (they must never
reach a loss, a metric or a gradient). ``rewards/accuracies`` is ours alone (TRL's KTO logs none).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl.data_utils import unpair_preference_dataset  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from src.modules.kto import KTO  # noqa: E402

T = 9
NAN = float("nan")
LAYOUTS = [(0, 2, 5), (1, 3, 4), (0, 4, 0), (2, 1, 6), (0, 3, 3), (0, 2, 7)]  # (left pad, prompt, completion)
KL_LAYOUTS = [(0, 2, 7), (1, 3, 5), (0, 4, 4), (2, 1, 0), (0, 3, 6), (0, 2, 3)]  # prompt i + completion i - 1


def _masks(layouts: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    attn = torch.zeros(len(layouts), T, dtype=torch.long)
    mask = torch.zeros(len(layouts), T, dtype=torch.long)
    for i, (pad, prompt, completion) in enumerate(layouts):
        attn[i, pad : pad + prompt + completion] = 1
        mask[i, pad + prompt : pad + prompt + completion] = 1
    return attn, mask


def _batch(labels: list[bool], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attn, mask = _masks(LAYOUTS)
    kl_attn, kl_mask = _masks(KL_LAYOUTS)
    b = len(LAYOUTS)

    def logps(scale: float = 3.0) -> torch.Tensor:
        return -scale * torch.rand(b, T, generator=g, dtype=torch.float64)

    policy, kl_policy = logps(), logps()
    return {
        "input_ids": torch.randint(3, 50, (b, T), generator=g),
        "attention_mask": attn,
        "completion_mask": mask,
        "KL_input_ids": torch.randint(3, 50, (b, T), generator=g),
        "KL_attention_mask": kl_attn,
        "KL_completion_mask": kl_mask,
        "label": torch.tensor(labels),
        "policy": policy,
        "ref": policy + 0.8 * torch.randn(b, T, generator=g, dtype=torch.float64),
        "kl_policy": kl_policy,
        "kl_ref": kl_policy + 0.8 * torch.randn(b, T, generator=g, dtype=torch.float64) - 0.3,
    }


class _Head(torch.nn.Module):
    """Stands in for a causal LM under TRL's fused LM head: the given per-token log-probs ``[B, T-1]`` of the matched
    rows, or of the KL rows when called on ``KL_input_ids``."""

    is_gradient_checkpointing = False

    def __init__(self, kl_ids: torch.Tensor, log_probs: torch.Tensor, kl_log_probs: torch.Tensor) -> None:
        super().__init__()
        self.kl_ids, self.log_probs, self.kl_log_probs = kl_ids, log_probs, kl_log_probs

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        out = self.kl_log_probs if input_ids is self.kl_ids else self.log_probs
        zeros = torch.zeros_like(out.detach())
        return SimpleNamespace(log_probs=out, entropy=zeros, mean_logits=zeros, aux_loss=None)


def _shifted(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, 1:].bool(), values[:, 1:], torch.zeros((), dtype=values.dtype))


def trl_loss(batch: dict, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """TRL's loss, its gradient w.r.t. the policy's per-token log-probs ``[B, T]``, and TRL's logged metrics."""
    policy = _shifted(batch["policy"], batch["completion_mask"]).requires_grad_()
    ref = _shifted(batch["ref"], batch["completion_mask"])
    kl_policy = _shifted(batch["kl_policy"], batch["KL_completion_mask"])
    kl_ref = _shifted(batch["kl_ref"], batch["KL_completion_mask"])
    loss_type = cfg.get("loss_type", "kto")
    ns = SimpleNamespace(
        model=_Head(batch["KL_input_ids"], policy, kl_policy),
        ref_model=_Head(batch["KL_input_ids"], ref, kl_ref),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        beta=cfg.get("beta", 0.1),
        loss_type=loss_type,
        desirable_weight=cfg.get("desirable_weight", 1.0),
        undesirable_weight=cfg.get("undesirable_weight", 1.0),
        calculate_KL=loss_type not in ["apo_zero_unpaired"],  # KTOTrainer.__init__, kto_trainer.py line 815
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    ns._compute_kl_logps = lambda model, b: KTOTrainer._compute_kl_logps(ns, model, b)
    inputs = {k: v for k, v in batch.items() if k not in ("policy", "ref", "kl_policy", "kl_ref")}
    loss = KTOTrainer._compute_loss(ns, ns.model, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy)
    metrics = {k: v[-1] for k, v in ns._metrics["train"].items()}
    return loss.detach(), torch.nn.functional.pad(grad, (1, 0)), metrics


def our_loss(batch: dict, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Our KTO module's loss on the same numbers (NaN at every position outside the completions)."""
    mask, kl_mask = batch["completion_mask"].bool(), batch["KL_completion_mask"].bool()
    policy = torch.where(mask, batch["policy"], NAN).requires_grad_()
    ref = torch.where(mask, batch["ref"], NAN)
    kl_policy = torch.where(kl_mask, batch["kl_policy"], NAN)
    kl_ref = torch.where(kl_mask, batch["kl_ref"], NAN)
    kl_ids = batch["KL_input_ids"]
    module = KTO(**cfg)
    module.policy_logps = lambda b, **_: (
        (kl_policy, None) if b["input_ids"] is kl_ids else (policy, torch.zeros_like(policy))
    )
    module.reference_logps = lambda ids, attn, m: kl_ref if ids is kl_ids else ref
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": batch["completion_mask"],
        "label": batch["label"],
        "kl_input_ids": kl_ids,
        "kl_attention_mask": batch["KL_attention_mask"],
        "kl_completion_mask": batch["KL_completion_mask"],
    }
    loss, metrics = module.compute_loss(inputs)
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.detach(), grad, metrics


MIXED = [True, False, True, True, False, False]
CONFIGS = [
    dict(),
    dict(beta=0.5),
    dict(desirable_weight=1.33, undesirable_weight=0.7),
    dict(loss_type="apo_zero_unpaired"),
    dict(loss_type="apo_zero_unpaired", beta=0.3, desirable_weight=0.5),
]
LABELS = {"mixed": MIXED, "one_undesirable": [True] * 5 + [False], "all_desirable": [True] * 6}
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _name(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"


@pytest.mark.parametrize("labels", list(LABELS), ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_name)
def test_kto_matches_trl(cfg, labels):
    batch = _batch(LABELS[labels])
    ours, our_grad, our_metrics = our_loss(batch, cfg)
    theirs, their_grad, their_metrics = trl_loss(batch, cfg)
    assert torch.isfinite(ours) and ours.item() != 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    mask = batch["completion_mask"].bool()
    assert (our_grad[~mask] == 0).all()  # prompt and padding get no gradient (and their NaN does not leak)
    assert our_grad[mask].abs().sum() > 0
    torch.testing.assert_close(our_grad[mask], their_grad[mask], rtol=1e-6, atol=1e-6)
    for name in METRICS:
        if name not in their_metrics:  # TRL logs no rewards/rejected (nor margins) for a batch without such rows
            assert our_metrics[name].numel() == 0 or our_metrics[name].isnan().all(), name
            continue
        assert our_metrics[name].double().mean().item() == pytest.approx(their_metrics[name], rel=1e-6, abs=1e-6), name


def test_the_kl_reference_point_is_clamped_and_used():
    batch = _batch(MIXED)
    batch["kl_ref"] = batch["kl_policy"] + 0.5  # mean log-ratio < 0: z0 = max(0, kl) = 0
    assert our_loss(batch, {})[2]["kl"].item() == 0 == trl_loss(batch, {})[2]["kl"]
    batch = _batch(MIXED)
    assert our_loss(batch, {})[2]["kl"].item() > 0.1  # the default batch has a positive reference point


def test_unpaired_rows_follow_trls_unpair_preference_dataset():
    from datasets import Dataset

    from src.data.datamodule import unpair_rows

    pairs = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}", "extra": i} for i in range(5)]
    theirs = unpair_preference_dataset(Dataset.from_list(pairs)).to_list()
    ours = [row for _, row in unpair_rows(list(enumerate(pairs, 1)))]
    key = ("prompt", "completion", "label", "extra")
    # the same rows; ours interleaved (src.data.datamodule.unpair_rows says why), TRL's desirable ones first
    assert sorted(tuple(r[k] for k in key) for r in ours) == sorted(tuple(r[k] for k in key) for r in theirs)
    assert [r["label"] for r in ours] == [True, False] * 5


def test_kl_rows_rotate_completions_as_trl():
    from src.data.collate import UnpairedCollator

    rows = [
        {"prompt_ids": [1, 10 + i], "completion_ids": [20 + i] * (i + 1) + [2], "label": i % 2 == 0, "index": i}
        for i in range(4)
    ]
    batch = UnpairedCollator(pad_token_id=0)(rows)
    completions = [r["completion_ids"] for r in rows]
    rotated = [completions[-1]] + completions[:-1]  # TRL's add_kl_completion_ids (kto_trainer.py line 1150)
    for i, row in enumerate(rows):
        kl = batch["kl_input_ids"][i][batch["kl_attention_mask"][i].bool()].tolist()
        assert kl == row["prompt_ids"] + rotated[i]
        assert batch["kl_completion_mask"][i].sum() == len(rotated[i])
