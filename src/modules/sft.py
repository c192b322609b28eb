"""Supervised fine-tuning with a completion-only loss (prompt and padding tokens are masked out).

The loss is the mean negative log-likelihood over the completion tokens of the batch (EOS included). With
gradient accumulation Lightning averages micro-batch means, which weights micro-batches equally rather than
tokens; set ``normalize: sequence`` for a per-sequence mean that is invariant to how a batch is split.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from src.losses import masked_mean
from src.modules.base import AlignmentModule


class SFT(AlignmentModule):
    """Completion-only SFT. ``normalize``: ``token`` (mean over all completion tokens of the batch, as TRL) or
    ``sequence`` (mean over sequences of each sequence's token mean)."""

    data_kind = "sft"
    summary_metrics = ("train/loss", "train/mean_token_logp")

    def __init__(self, *args: Any, normalize: Literal["token", "sequence"] = "token", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch["completion_mask"]
        logps, _ = self.policy_logps(batch)
        if self.hparams.normalize == "token":
            loss = -masked_mean(logps, mask)
        else:
            loss = -masked_mean(logps, mask, dim=-1).mean()
        seq_nll = -masked_mean(logps.detach(), mask, dim=-1)
        return loss, {"nll_per_sequence": seq_nll, "mean_token_logp": -seq_nll}
