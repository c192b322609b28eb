"""Contrastive Preference Optimization (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries
of LLM Performance in Machine Translation"): DPO without a reference model plus an NLL term on the chosen completion,
with the loss types and definitions of TRL 1.16's ``trl.experimental.cpo.CPOTrainer``.

Per step, chosen and rejected sequences of B pairs go through one concatenated forward (2B rows); the sequence
log-prob is the sum over the completion tokens (EOS included), averaged over them for ``ipo`` and ``simpo``. The loss is

    L = mean(ℓ(β, log π(y_w) − log π(y_l))) + cpo_alpha · NLL(chosen),

with ``ℓ`` of ``loss_type`` (``src.losses.cpo_loss``: ``sigmoid`` is the paper's Eq. 3, plus ``hinge``, ``ipo``
and ``simpo``, the last being SimPO's ``−log σ(β·Δ − γ)``, CPO-SimPO with ``cpo_alpha > 0``) and the NLL the
per-token mean over the batch's chosen completion tokens (``src.losses.nll_loss``).

Metrics (TRL's names): ``rewards/chosen`` / ``rewards/rejected`` (``β·log π``, per token for ``ipo`` / ``simpo``),
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen`` / ``logps/rejected`` (per token for ``ipo`` / ``simpo``)
and ``nll_loss``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from src.losses import cpo_loss, masked_sum, nll_loss
from src.modules import check_positive
from src.modules.base import AlignmentModule


class CPO(AlignmentModule):
    """CPO on preference rows, reference-free.

    Args:
        beta: β of the preference term.
        loss_type: ``sigmoid`` | ``hinge`` | ``ipo`` | ``simpo``.
        label_smoothing: ``sigmoid`` / ``simpo``: conservative labels (the probability that a pair is flipped).
        simpo_gamma: γ, SimPO's target margin (``loss_type: simpo``).
        cpo_alpha: weight of the chosen completions' NLL (0 = the preference term alone, e.g. plain SimPO).
        **kwargs: model, optimizer and scheduler options of :class:`AlignmentModule`.
    """

    data_kind = "preference"
    summary_metrics = ("train/loss", "train/rewards/accuracies", "train/rewards/margins")

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        cpo_alpha: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_positive("beta", beta)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        self.save_hyperparameters()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        mask = batch["completion_mask"]
        token_logps, _ = self.policy_logps(batch)  # [2B, T]: B chosen rows, then B rejected
        b = token_logps.shape[0] // 2
        seq = masked_sum(token_logps, mask, dim=-1)
        lengths = mask[:, 1:].sum(-1)  # completion tokens (position 0 is never one)
        losses, chosen_r, rejected_r = cpo_loss(
            seq[:b],
            seq[b:],
            lengths[:b],
            lengths[b:],
            beta=h.beta,
            loss_type=h.loss_type,
            label_smoothing=h.label_smoothing,
            simpo_gamma=h.simpo_gamma,
        )
        nll = nll_loss(token_logps[:b], mask[:b]) if h.cpo_alpha else torch.zeros((), device=seq.device)
        logps = seq / lengths.clamp(min=1) if h.loss_type in ("ipo", "simpo") else seq
        metrics = {
            "rewards/chosen": chosen_r,
            "rewards/rejected": rejected_r,
            "rewards/accuracies": (chosen_r > rejected_r).float(),
            "rewards/margins": chosen_r - rejected_r,
            "logps/chosen": logps[:b].detach(),
            "logps/rejected": logps[b:].detach(),
            "nll_loss": nll.detach().expand(b),
        }
        return losses.mean() + h.cpo_alpha * nll, metrics
