"""Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
Model"): SFT on the chosen completion plus an odds-ratio penalty on the rejected one, in one stage and without a
reference model, with the definitions of TRL 1.16's ``trl.experimental.orpo.ORPOTrainer``.

Per step, chosen and rejected sequences of B pairs go through one concatenated forward (2B rows). Each completion's
log-probability is the *mean* over its tokens (EOS included), ``a = log P(y|x)``; the loss is

    L = NLL(chosen) + β · mean(−log σ(log odds(y_w) − log odds(y_l))),   odds(y) = P(y|x) / (1 − P(y|x)),

(``src.losses.orpo_loss`` and ``nll_loss``; the paper's λ is TRL's ``beta``). The NLL is the per-token mean over the
batch's chosen *completion* tokens, as the paper's Eq. 2 defines it; TRL's experimental trainer also counts the
prompt tokens (its labels come from the attention mask), a documented difference.

Metrics (TRL's names): ``rewards/chosen`` / ``rewards/rejected`` (``β·a``), ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen`` / ``logps/rejected`` (``a``), ``nll_loss``, ``log_odds_ratio``
(``log σ(log odds ratio)``) and ``log_odds_chosen`` (the log odds ratio).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from src.losses import masked_mean, nll_loss, orpo_loss
from src.modules import check_positive
from src.modules.base import AlignmentModule


class ORPO(AlignmentModule):
    """ORPO on preference rows, reference-free.

    Args:
        beta: λ, the weight of the odds-ratio term against the chosen completions' NLL (TRL's ``beta``).
        **kwargs: model, optimizer and scheduler options of :class:`AlignmentModule`.
    """

    data_kind = "preference"
    summary_metrics = ("train/loss", "train/rewards/accuracies", "train/rewards/margins")

    def __init__(self, *args: Any, beta: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_positive("beta", beta)
        self.save_hyperparameters()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch["completion_mask"]
        token_logps, _ = self.policy_logps(batch)  # [2B, T]: B chosen rows, then B rejected
        b = token_logps.shape[0] // 2
        avg = masked_mean(token_logps, mask, dim=-1)
        losses, chosen_r, rejected_r, log_odds = orpo_loss(avg[:b], avg[b:], beta=self.hparams.beta)
        nll = nll_loss(token_logps[:b], mask[:b])
        metrics = {
            "rewards/chosen": chosen_r,
            "rewards/rejected": rejected_r,
            "rewards/accuracies": (chosen_r > rejected_r).float(),
            "rewards/margins": chosen_r - rejected_r,
            "logps/chosen": avg[:b].detach(),
            "logps/rejected": avg[b:].detach(),
            "nll_loss": nll.detach().expand(b),
            "log_odds_ratio": F.logsigmoid(log_odds),
            "log_odds_chosen": log_odds,
        }
        return nll + losses.mean(), metrics
