"""Side by side with TRL 1.16: our ORPO and CPO modules' losses, gradients and metrics against TRL's own
``trl.experimental.orpo.ORPOTrainer`` and ``trl.experimental.cpo.CPOTrainer`` code.

Both trainers compute their loss in ``get_batch_loss_metrics`` -> ``concatenated_forward`` (log-probs from the
model's full logits, the chosen NLL by cross-entropy) -> ``odds_ratio_loss`` / ``cpo_loss``. We call those methods
unbound on a ``SimpleNamespace`` holding the attributes they read, with a stand-in model that returns given logits
``[2B, T, V]`` (random, float64); our side is the production path, ``ORPO`` / ``CPO.compute_loss`` with the plain
scoring path (``accel: off``) over the same stand-in. Both gradients are taken w.r.t. those logits. Rows have left
and right padding and prompts of different lengths (no empty completion: TRL's length-averaged log-probs are 0/0 there).

Known, documented difference: TRL's experimental ORPO takes its NLL over the prompt tokens too (its labels come from
the attention mask, orpo_trainer.py ``concatenated_forward``); ours, like the paper's Eq. 2, over the completion. The
comparisons give TRL's NLL the completion tokens alone by handing it the completion mask as the attention mask (the
stand-in ignores it); ``test_trl_orpo_nll_also_counts_the_prompt`` shows the gap with the real mask.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

from src.modules.cpo import CPO  # noqa: E402
from src.modules.orpo import ORPO  # noqa: E402
from tests.test_orpo_cpo import _batch as random_batch  # noqa: E402

B, T, V = 4, 10, 23
LAYOUTS = [(0, 2, 5), (1, 3, 4), (0, 4, 1), (2, 1, 7), (0, 3, 3), (0, 2, 8), (1, 2, 2), (0, 5, 1)]  # chosen, rejected


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(seed, LAYOUTS, T, V)


class _Logits(torch.nn.Module):
    """Stands in for a causal LM: returns the given logits ``[2B, T, V]`` whatever the inputs."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, *_: object, **__: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def trl_loss(trainer: type, batch: dict, cfg: dict, nll_mask: str = "completion_mask"):
    """TRL's loss, its gradient w.r.t. the logits and its metrics; ``nll_mask`` is the attention mask TRL sees."""
    logits = batch["logits"].clone().requires_grad_()
    ids, mask = batch["input_ids"], batch["completion_mask"]
    labels = torch.where(mask.bool(), ids, -100)
    attn = batch[nll_mask]
    inputs = {}
    for part, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        inputs[f"{part}_input_ids"] = ids[rows]
        inputs[f"{part}_attention_mask"] = attn[rows]
        inputs[f"{part}_labels"] = labels[rows]
    ns = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        is_encoder_decoder=False,
        padding_value=0,
        pad_token_id=0,
        aux_loss_enabled=False,
        beta=cfg.get("beta", 0.1),
        loss_type=cfg.get("loss_type", "sigmoid"),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        simpo_gamma=cfg.get("simpo_gamma", 0.5),
        cpo_alpha=cfg.get("cpo_alpha", 1.0),
        alpha=0.0,  # CPOConfig.alpha (AlphaPO's reward transform), off by default
        concatenated_inputs=trainer.concatenated_inputs,
        get_batch_logps=trainer.get_batch_logps,
    )
    ns.concatenated_forward = lambda model, b: trainer.concatenated_forward(ns, model, b)
    if trainer is ORPOTrainer:
        ns.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(ns, c, r)
    else:
        ns.cpo_loss = lambda c, r: CPOTrainer.cpo_loss(ns, c, r)
    loss, metrics = trainer.get_batch_loss_metrics(ns, _Logits(logits), inputs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad, metrics


def our_loss(module_cls: type, batch: dict, cfg: dict):
    logits = batch["logits"].clone().requires_grad_()
    module = module_cls(accel="off", **cfg)
    module.model = _Logits(logits)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss, metrics = module.compute_loss(inputs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad, {k: v.double().mean().item() for k, v in metrics.items()}


PREFERENCE = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
ORPO_METRICS = (*PREFERENCE, "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")
CPO_METRICS = (*PREFERENCE, "logps/chosen", "logps/rejected", "nll_loss")


def _compare(ours: tuple, theirs: tuple, names: tuple[str, ...]) -> None:
    loss, grad, metrics = ours
    their_loss, their_grad, their_metrics = theirs
    assert torch.isfinite(loss) and loss.item() != 0
    torch.testing.assert_close(loss, their_loss, rtol=1e-6, atol=1e-6)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, their_grad, rtol=1e-6, atol=1e-6)
    for name in names:
        assert metrics[name] == pytest.approx(their_metrics[name], rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_matches_trl(beta):
    batch = _batch()
    _compare(our_loss(ORPO, batch, dict(beta=beta)), trl_loss(ORPOTrainer, batch, dict(beta=beta)), ORPO_METRICS)


def test_trl_orpo_nll_also_counts_the_prompt():
    batch = _batch()
    ours = our_loss(ORPO, batch, {})
    theirs = trl_loss(ORPOTrainer, batch, {}, nll_mask="attention_mask")
    assert abs(ours[2]["nll_loss"] - theirs[2]["nll_loss"]) > 1e-2  # prompt tokens in TRL's NLL, not in ours
    assert ours[2]["log_odds_ratio"] == pytest.approx(theirs[2]["log_odds_ratio"], rel=1e-6)


CPO_CONFIGS = [
    dict(),
    dict(loss_type="sigmoid", label_smoothing=0.1, beta=0.3),
    dict(loss_type="hinge"),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0, label_smoothing=0.2),  # SimPO alone
    dict(loss_type="sigmoid", cpo_alpha=0.5),
]


@pytest.mark.parametrize("cfg", CPO_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_cpo_matches_trl(cfg):
    batch = _batch(seed=1)
    _compare(our_loss(CPO, batch, cfg), trl_loss(CPOTrainer, batch, cfg), CPO_METRICS)
