"""Side by side with TRL 1.16: our DPO module's loss, gradients and metrics against TRL's own ``DPOTrainer`` code.

TRL computes the DPO losses inside ``DPOTrainer._compute_loss``, from the per-token log-probs its fused LM head
returns. We call that method unbound on a ``SimpleNamespace`` holding the attributes it reads, with stand-in models
that return given per-token log-probs (``log_probs``, and ``log_sum_sq_probs`` for WPO). Our side is the production
path, ``DPO.compute_loss``, with ``policy_token_logps`` / ``reference_logps`` returning the same numbers. The inputs
have left and right padding, prompts, and an empty completion; TRL's head gives 0 at ignored positions, ours get NaN
there (they must never reach a loss, a metric or a gradient).

Known, documented differences (not compared): TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (ours is cDPO), and
for length-normalised losses (``ipo``, ``sigmoid_norm``) we log per-token rewards and log-probs (TRL: summed).
``alpha_divergence`` runs in float32: TRL looks up a clamp value by dtype and has none for float64. TRL 1.16 fails on
``sft`` with ``use_weighting`` (an in-place multiply of the expanded NLL); ours weights it per pair as TRL's code means
to, ``NLL · mean(w)``, which ``test_wpo_weights_the_nll_term`` checks without TRL.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

from src.modules.dpo import DPO  # noqa: E402

B, T = 4, 9
NAN = float("nan")


def _batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """B chosen then B rejected rows: (left padding, prompt, completion, right padding), position 0 never completion;
    the chosen completion of pair 2 is empty, and a rejected one is one token long."""
    layouts = [  # (left pad, prompt, completion) per row; T columns in all
        (0, 2, 5),
        (1, 3, 4),
        (0, 4, 0),  # an empty chosen completion
        (2, 1, 6),
        (0, 3, 3),
        (0, 2, 7),
        (1, 2, 2),
        (0, 5, 1),
    ]
    attn = torch.zeros(2 * B, T, dtype=torch.long)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, (pad, prompt, completion) in enumerate(layouts):
        attn[i, pad : pad + prompt + completion] = 1
        mask[i, pad + prompt : pad + prompt + completion] = 1
    g = torch.Generator().manual_seed(0)
    policy = -3 * torch.rand(2 * B, T, generator=g, dtype=torch.float64)
    ref = policy + 0.6 * torch.randn(2 * B, T, generator=g, dtype=torch.float64)
    log_sum_sq = -2 * torch.rand(2 * B, T, generator=g, dtype=torch.float64) - 0.5
    ids = torch.randint(3, 50, (2 * B, T), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "completion_mask": mask,
        "policy": policy.to(dtype),
        "ref": ref.to(dtype),
        "log_sum_sq": log_sum_sq.to(dtype),
    }


class _Head(torch.nn.Module):
    """Stands in for a causal LM under TRL's fused LM head: returns the given per-token outputs ``[2B, T-1]``."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs: torch.Tensor, log_sum_sq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq

    def forward(self, **_: object) -> SimpleNamespace:
        zeros = torch.zeros_like(self.log_probs.detach())
        return SimpleNamespace(
            log_probs=self.log_probs,
            log_sum_sq_probs=self.log_sum_sq,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            aux_loss=None,
        )


def trl_loss(batch: dict, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """TRL's loss, the gradient w.r.t. the policy's per-token log-probs ``[2B, T]``, and TRL's logged metrics."""
    keep = batch["completion_mask"][:, 1:].bool()
    zero = torch.zeros((), dtype=batch["policy"].dtype)
    policy = torch.where(keep, batch["policy"][:, 1:], zero).requires_grad_()  # TRL's head: 0 at ignored labels
    ref = torch.where(keep, batch["ref"][:, 1:], zero)
    log_sum_sq = torch.where(keep, batch["log_sum_sq"][:, 1:], zero)
    types = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
    trainer = SimpleNamespace(
        model=_Head(policy, log_sum_sq),
        ref_model=_Head(ref),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        args=SimpleNamespace(discopop_tau=cfg.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
        beta=cfg.get("beta", 0.1),
        loss_types=types,
        loss_weights=cfg.get("loss_weights") or [1.0] * len(types),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        ld_alpha=cfg.get("ld_alpha"),
        f_divergence_type=cfg.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=cfg.get("f_alpha_divergence_coef", 0.5),
        use_weighting=cfg.get("use_weighting", False),
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), torch.nn.functional.pad(grad, (1, 0)), metrics


def our_loss(batch: dict, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Our DPO module's loss on the same numbers (NaN at every position outside the completions)."""
    mask = batch["completion_mask"].bool()
    policy = torch.where(mask, batch["policy"], NAN).requires_grad_()
    ref = torch.where(mask, batch["ref"], NAN)
    log_sum_sq = torch.where(mask, batch["log_sum_sq"], NAN)
    module = DPO(**cfg)
    module.policy_token_logps = lambda _batch: (policy, log_sum_sq if module.hparams.use_weighting else None)
    module.reference_logps = lambda ids, attn, completion_mask: ref
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss, metrics = module.compute_loss(inputs)
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.detach(), grad, {k: v.double().mean().item() for k, v in metrics.items()}


EXISTING = [
    dict(loss_type="sigmoid"),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="hinge"),
    dict(loss_type="ipo"),
    dict(loss_type="exo_pair", label_smoothing=1e-3),
    dict(loss_type="nca_pair"),
    dict(loss_type="apo_zero"),
    dict(loss_type="apo_down"),
    dict(loss_type="sppo_hard"),
]
NEW_LOSSES = [
    dict(loss_type="bco_pair"),
    dict(loss_type="aot"),
    dict(loss_type="aot", label_smoothing=0.2),
    dict(loss_type="aot_unpaired"),
    dict(loss_type="aot_unpaired", label_smoothing=0.2),
    dict(loss_type="discopop"),
    dict(loss_type="discopop", discopop_tau=0.5, beta=0.5),
    dict(loss_type="sigmoid_norm"),
    dict(loss_type="sft"),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3]),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type=["ipo", "hinge"]),  # default weights 1, 1
]
F_DIVERGENCE = [
    dict(loss_type=loss_type, f_divergence_type=f, **extra)
    for f in ("forward_kl", "js_divergence")
    for loss_type, extra in [
        ("sigmoid", {}),
        ("hinge", {}),
        ("ipo", {}),
        ("robust", dict(label_smoothing=0.1)),
        ("exo_pair", dict(label_smoothing=1e-3)),
        ("discopop", {}),
        ("sigmoid_norm", {}),
        (["sigmoid", "sft"], {}),
    ]
]
LD_AND_WPO = [
    dict(loss_type="sigmoid", ld_alpha=0.5),
    dict(loss_type="sigmoid", ld_alpha=0.0),
    dict(loss_type="ipo", ld_alpha=0.3),
    dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5),
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type="ipo", use_weighting=True),
    dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], use_weighting=True),
    dict(loss_type="sigmoid", ld_alpha=0.5, use_weighting=True, f_divergence_type="js_divergence"),
]
# Metrics that mean the same in both (per-token ones differ by design for length-normalised losses: module docstring)
SAME_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _name(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def _compare(cfg: dict, trl_cfg: dict | None = None, dtype: torch.dtype = torch.float64, tol: float = 1e-6) -> None:
    batch = _batch(dtype)
    ours, our_grad, our_metrics = our_loss(batch, cfg)
    theirs, their_grad, their_metrics = trl_loss(batch, trl_cfg or cfg)
    assert torch.isfinite(ours) and ours.item() != 0
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    mask = batch["completion_mask"].bool()
    assert (our_grad[~mask] == 0).all()  # prompt and padding get no gradient (and their NaN does not leak)
    assert our_grad[mask].abs().sum() > 0
    torch.testing.assert_close(our_grad[mask], their_grad[mask], rtol=tol, atol=tol)
    types = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
    first = next(t for t in [*types, "sigmoid"] if t != "sft")
    # a length-normalised first loss logs per-token rewards and log-probs, TRL summed ones (documented)
    names = () if first in ("ipo", "sigmoid_norm") else (*SAME_METRICS, "logps/chosen", "logps/rejected")
    for name in names:
        assert our_metrics[name] == pytest.approx(their_metrics[name], rel=tol, abs=tol), name


@pytest.mark.parametrize("cfg", EXISTING, ids=_name)
def test_existing_loss_types_match_trl(cfg):
    _compare(cfg)


@pytest.mark.parametrize("cfg", NEW_LOSSES, ids=_name)
def test_new_loss_types_and_loss_lists_match_trl(cfg):
    _compare(cfg)


@pytest.mark.parametrize("cfg", F_DIVERGENCE, ids=_name)
def test_f_divergences_match_trl(cfg):
    _compare(cfg)


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop"])
def test_alpha_divergence_matches_trl_in_float32(loss_type, alpha):
    cfg = dict(loss_type=loss_type, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=alpha)
    _compare(cfg, dtype=torch.float32, tol=2e-6)


@pytest.mark.parametrize("cfg", LD_AND_WPO, ids=_name)
def test_ld_alpha_and_wpo_weighting_match_trl(cfg):
    _compare(cfg)


def test_rpo_alpha_is_trls_sigmoid_plus_sft():
    _compare(
        dict(loss_type="sigmoid", rpo_alpha=0.4), trl_cfg=dict(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.4])
    )


def test_cdpo_label_smoothing_is_ours_alone():
    # TRL 1.16's sigmoid ignores label_smoothing; ours is conservative DPO (documented): the harness sees the gap
    batch = _batch(torch.float64)
    ours = our_loss(batch, dict(loss_type="sigmoid", label_smoothing=0.2))[0]
    theirs = trl_loss(batch, dict(loss_type="sigmoid", label_smoothing=0.2))[0]
    assert abs(ours.item() - theirs.item()) > 1e-3
    assert trl_loss(batch, dict(loss_type="sigmoid"))[0].item() == pytest.approx(theirs.item(), rel=1e-12)


def test_wpo_weights_the_nll_term():
    batch = _batch(torch.float64)
    weighted = our_loss(batch, dict(loss_type=["sigmoid", "sft"], use_weighting=True))[0]
    sigmoid = trl_loss(batch, dict(loss_type="sigmoid", use_weighting=True))[0]
    mask = batch["completion_mask"][:B].bool()
    nll = -batch["policy"][:B][mask].mean()
    lengths = batch["completion_mask"][:, 1:].sum(-1).clamp(min=1)
    keep = batch["completion_mask"].bool()
    aligned = torch.where(keep, batch["policy"] - batch["log_sum_sq"], 0).sum(-1) / lengths
    w = aligned.exp()
    torch.testing.assert_close(weighted, sigmoid + nll * (w[:B] * w[B:]).mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.6, 0.25, 1.0])
def test_reference_sync_matches_trl_sync_ref_model_callback(alpha):
    """TR-DPO's mix ``θ_ref ← α·θ + (1 − α)·θ_ref`` (DPO's ``ref_model_sync_steps``, GRPO's ``sync_ref_model``) equals
    TRL's ``SyncRefModelCallback._sync_target_model`` parameter by parameter."""
    from trl.trainer.callbacks import SyncRefModelCallback

    from src.data.tiny import build_model
    from src.models import mix_into_

    torch.manual_seed(0)
    policy, ref = build_model({"num_hidden_layers": 1}), build_model({"num_hidden_layers": 1})
    theirs = build_model({"num_hidden_layers": 1})
    theirs.load_state_dict(ref.state_dict())
    before = [p.detach().clone() for p in ref.parameters()]
    mix_into_(ref, policy, alpha)
    SyncRefModelCallback._sync_target_model(policy, theirs, alpha)
    for (name, a), b, p, a0 in zip(ref.named_parameters(), theirs.parameters(), policy.parameters(), before):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(a, alpha * p + (1 - alpha) * a0, atol=1e-6, rtol=0, msg=name)
        assert not torch.equal(a, a0) or torch.equal(p, a0), name  # the reference moved
