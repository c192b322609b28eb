"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization"): alignment from unpaired thumbs-up / thumbs-down rows, with the options of TRL 1.16's ``KTOTrainer``.

Rows are ``{"prompt", "completion", "label": bool}`` (the DataModule's ``unpaired`` kind; preference rows are split
into one desirable and one undesirable row, as TRL does). Per step, for a batch of B rows:

1. the policy's and the reference's summed completion log-probs ``log π(y|x)``, ``log π_ref(y|x)`` (one forward each);
2. KTO's reference point: the policy's and the reference's log-probs of B *mismatched* pairs, prompt ``i`` with
   completion ``i − 1`` of the same batch (TRL's rule; built by the collator), without gradient;
   ``z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x)))``, averaged over ranks before the clamp;
3. ``src.losses.kto_loss``: desirable rows ``λ_D (1 − σ(β (r − z0)))``, undesirable ``λ_U (1 − σ(β (z0 − r)))``,
   mean over the batch (``loss_type: apo_zero_unpaired`` drops ``z0`` and the mismatched forwards).

Metrics (TRL's names): ``kl`` (``z0``), ``rewards/chosen`` / ``rewards/rejected`` (``β r`` of the desirable /
undesirable rows), ``rewards/margins`` (the difference of the two means, per batch), ``logps/chosen`` /
``logps/rejected``, ``entropy``; and ours: ``rewards/accuracies``, the fraction of rows KTO's implied classifier gets
right (desirable iff ``r > z0``), which TRL's KTO does not log.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from src.losses import kto_loss, masked_mean, masked_sum
from src.modules import check_positive
from src.modules.base import AlignmentModule


class KTO(AlignmentModule):
    """KTO on unpaired rows against a frozen reference.

    Args:
        beta: β, the temperature of the implied reward ``β·(log π − log π_ref)``.
        loss_type: ``kto`` | ``apo_zero_unpaired`` (``src.losses.kto_loss``).
        desirable_weight / undesirable_weight: λ_D, λ_U. With unbalanced data the paper (Eq. 8) advises
            ``λ_D·n_D / (λ_U·n_U)`` in ``[1, 4/3]``.
        **kwargs: model, reference, optimizer and scheduler options of :class:`AlignmentModule`.
    """

    data_kind = "unpaired"
    needs_reference = True
    summary_metrics = ("train/loss", "train/rewards/accuracies", "train/kl")

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: Literal["kto", "apo_zero_unpaired"] = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_positive("beta", beta)
        if desirable_weight < 0 or undesirable_weight < 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight} and {undesirable_weight}"
            )
        self.save_hyperparameters()

    # -- KTO's reference point from the mismatched pairs ---------------------------------------------------------
    def mismatched_kl(self, batch: dict[str, Any]) -> Tensor:
        """``mean(log π(y'|x) − log π_ref(y'|x))`` over the batch's mismatched rows, without gradient, averaged over
        ranks (the unclamped ``kl`` of ``kto_loss``)."""
        ids, attn, mask = batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"]
        with torch.no_grad():
            policy = self.policy_logps({"input_ids": ids, "attention_mask": attn, "completion_mask": mask})[0]
            ref = self.reference_logps(ids, attn, mask)
            kl = (masked_sum(policy, mask, dim=-1) - masked_sum(ref, mask, dim=-1)).mean()
        trainer = self.attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            kl = trainer.strategy.reduce(kl, reduce_op="mean")
        return kl

    # -- the loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        labels = batch["label"].bool()
        token_logps, entropy = self.policy_logps(batch, with_entropy=True)
        logps = masked_sum(token_logps, mask, dim=-1)
        ref_logps = masked_sum(self.reference_logps(ids, attn, mask), mask, dim=-1)
        kl = self.mismatched_kl(batch) if h.loss_type == "kto" else None
        losses, rewards, z0 = kto_loss(
            logps,
            ref_logps,
            labels,
            kl,
            beta=h.beta,
            loss_type=h.loss_type,
            desirable_weight=h.desirable_weight,
            undesirable_weight=h.undesirable_weight,
        )
        chosen, rejected = rewards[labels], rewards[~labels]
        margin = chosen.mean() - rejected.mean() if len(chosen) and len(rejected) else rewards.new_full((), torch.nan)
        correct = torch.where(labels, rewards > h.beta * z0, rewards < h.beta * z0)
        metrics = {
            "kl": z0.detach().reshape(1),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": margin.reshape(1),  # NaN (left out of the window mean) without both kinds of row
            "rewards/accuracies": correct.float(),
            "logps/chosen": logps.detach()[labels],
            "logps/rejected": logps.detach()[~labels],
            "entropy": masked_mean(entropy, mask).reshape(1),
        }
        return losses.mean(), metrics

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        if self.hparams.loss_type == "kto" and dm is not None and dm.hparams.batch_size < 2:
            raise ValueError(
                "loss_type='kto' needs data.batch_size >= 2: its KL reference point pairs each prompt with another "
                "row's completion of the same batch (TRL refuses a batch size of 1 too)"
            )
