"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model") and its variants, as one LightningModule.

Per step, chosen and rejected sequences of B pairs go through one concatenated forward (2B rows). The sequence
log-prob is the sum of the completion tokens' log-probs (EOS included; prompt and padding masked). The loss is
``src.losses.dpo_loss`` (sigmoid, robust, hinge, ipo, exo_pair, nca_pair, apo_zero, apo_down, sppo_hard) or
``src.losses.simpo_loss`` (reference-free). Reference log-probs come from a frozen copy of the initial policy, a
separate checkpoint, the LoRA policy with its adapter disabled, or are precomputed once before training.

Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected`` (``β·(log π − log π_ref)``), ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``. One deliberate difference: with ``loss_type: ipo`` the
rewards and log-probs are *length-averaged* (per token), where TRL logs the summed ones for every loss. IPO's loss is a
regression of the length-averaged margin onto ``1/(2β)``, so logging the quantity the loss acts on makes
``rewards/margins`` converge to ``1/2`` (and ``rewards/accuracies`` count the pairs the loss ranks correctly) instead of
mixing in each pair's length difference.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from src.losses import dpo_loss, simpo_loss
from src.modules.base import AlignmentModule

LossType = Literal[
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard", "simpo"
]


class DPO(AlignmentModule):
    """DPO and friends.

    Args:
        beta: temperature of the implicit reward ``β·(log π − log π_ref)`` (SimPO: of the length-normalised log-prob).
        loss_type: see module docstring; ``ipo`` averages log-probs per token as in the IPO paper (and TRL).
        label_smoothing: conservative DPO / robust DPO noise rate ε.
        simpo_gamma: SimPO target margin γ (``loss_type: simpo``).
        rpo_alpha: weight of an NLL term on the chosen completions (RPO, Pang et al. 2024); ``None`` = off.
        precompute_ref_logps: compute reference log-probs once before training, cache them with the dataset and
            free the reference model.
        ref_model_sync_steps / ref_model_mixup_alpha: TR-DPO (Gorbatovski et al. 2024): every k steps
            ``θ_ref ← α·θ + (1 − α)·θ_ref``; 0 = never.
        **kwargs: model, optimizer and scheduler options of :class:`AlignmentModule`.
    """

    data_kind = "preference"
    needs_reference = True
    summary_metrics = ("train/loss", "train/rewards/accuracies", "train/rewards/margins")

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: LossType = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rpo_alpha: float | None = None,
        precompute_ref_logps: bool = False,
        ref_model_sync_steps: int = 0,
        ref_model_mixup_alpha: float = 0.6,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss_type == "simpo":
            self.needs_reference = False
        if ref_model_sync_steps:
            # TR-DPO moves the reference: there must be one, of its own, whose log-probs are computed live.
            if precompute_ref_logps:
                raise ValueError(
                    "precompute_ref_logps=True cannot be combined with ref_model_sync_steps > 0: TR-DPO updates the "
                    "reference during training, so precomputed reference log-probs go stale (TRL refuses this too)"
                )
            if self.hparams.lora is not None:
                raise ValueError(
                    "ref_model_sync_steps > 0 cannot be combined with lora: the LoRA reference is the policy with "
                    "its adapter disabled, so there is no separate reference to update"
                )
            if loss_type == "simpo":
                raise ValueError("ref_model_sync_steps > 0 cannot be combined with loss_type='simpo' (no reference)")
        if loss_type == "exo_pair" and label_smoothing == 0:
            raise ValueError(
                "label_smoothing must be > 0 for loss_type='exo_pair' (it is EXO's ε; the paper recommends 1e-3), "
                "as in TRL"
            )
        self.save_hyperparameters()
        self._synced_step = 0  # TR-DPO: the global step of the last reference update

    # -- one concatenated forward ---------------------------------------------------------------------------------
    def pair_logps(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Policy and reference sequence log-probs of the B chosen and B rejected completions."""
        h = self.hparams
        mask = batch["completion_mask"]
        token_logps, _ = self.policy_logps(batch)
        lengths = mask[:, 1:].sum(-1).clamp(min=1).to(token_logps.dtype)  # position 0 is never a completion token
        seq = token_logps.sum(-1)
        average = h.loss_type in ("ipo", "simpo")
        if average:
            seq = seq / lengths
        b = seq.shape[0] // 2
        out = {"chosen": seq[:b], "rejected": seq[b:], "lengths": lengths, "token_logps": token_logps}
        if h.loss_type == "simpo":
            return out
        if "ref_chosen_logps" in batch:
            out["ref_chosen"], out["ref_rejected"] = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_seq = self.reference_logps(batch["input_ids"], batch["attention_mask"], mask).sum(-1)
            if average:
                ref_seq = ref_seq / lengths
            out["ref_chosen"], out["ref_rejected"] = ref_seq[:b], ref_seq[b:]
        return out

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        lp = self.pair_logps(batch)
        if h.loss_type == "simpo":
            b = lp["chosen"].shape[0]
            losses, chosen_r, rejected_r = simpo_loss(
                lp["chosen"] * lp["lengths"][:b],
                lp["rejected"] * lp["lengths"][b:],
                lp["lengths"][:b],
                lp["lengths"][b:],
                beta=h.beta,
                gamma=h.simpo_gamma,
                label_smoothing=h.label_smoothing,
            )
        else:
            losses, chosen_r, rejected_r = dpo_loss(
                lp["chosen"],
                lp["rejected"],
                lp["ref_chosen"],
                lp["ref_rejected"],
                beta=h.beta,
                loss_type=h.loss_type,
                label_smoothing=h.label_smoothing,
            )
        loss = losses.mean()
        metrics = {
            "rewards/chosen": chosen_r,
            "rewards/rejected": rejected_r,
            "rewards/accuracies": (chosen_r > rejected_r).float(),
            "rewards/margins": chosen_r - rejected_r,
            "logps/chosen": lp["chosen"],
            "logps/rejected": lp["rejected"],
        }
        if h.rpo_alpha is not None:
            b = lp["chosen"].shape[0]
            chosen_mask = batch["completion_mask"][:b]
            nll = -lp["token_logps"][:b].sum() / chosen_mask.sum().clamp(min=1)
            loss = loss + h.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach().expand(b)
        return loss, metrics

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.sync_reference()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self.sync_reference()  # validation after optimizer step k sees the reference of step k, as in TRL

    @torch.no_grad()
    def sync_reference(self) -> None:
        """TR-DPO: once after every ``ref_model_sync_steps``-th optimizer step, ``θ_ref ← α·θ + (1 − α)·θ_ref``.

        Checked before each forward (every micro-batch) but keyed on the optimizer step count, so gradient
        accumulation does not repeat it; the step of the last update is checkpointed so a resumed run does neither
        miss nor repeat one (TRL: ``SyncRefModelCallback.on_step_end``, once per optimizer step)."""
        k, step = self.hparams.ref_model_sync_steps, self.global_step
        if not k or step == 0 or step % k or step == self._synced_step or self.ref_model is None:
            return
        alpha = self.hparams.ref_model_mixup_alpha
        for p_ref, p in zip(self.ref_model.parameters(), self.model.parameters(), strict=True):
            p_ref.lerp_(p.detach().to(p_ref.dtype), alpha)
        self._synced_step = step

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.precompute_ref_logps and self.hparams.loss_type != "simpo":
            self.precompute_reference()

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """Score every train/val pair once with the reference, store the log-probs on the rows, free the reference."""
        dm = self.trainer.datamodule
        with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws a seed: keep the run's RNG stream
            self._precompute(dm)
        self.set_reference(None)
        self.needs_reference = False

    def _precompute(self, dm) -> None:
        for ds in (dm.train_set, dm.val_set):
            if ds is None or "ref_chosen_logps" in ds[0]:
                continue
            loader = torch.utils.data.DataLoader(ds, batch_size=dm.hparams.batch_size, collate_fn=dm.collator())
            chosen, rejected = [], []
            for batch in loader:
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                lengths = batch["completion_mask"][:, 1:].sum(-1).clamp(min=1)
                seq = self.reference_logps(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
                seq = seq.sum(-1)
                if self.hparams.loss_type == "ipo":
                    seq = seq / lengths
                b = seq.shape[0] // 2
                chosen += seq[:b].tolist()
                rejected += seq[b:].tolist()
            ds.add_column("ref_chosen_logps", chosen)
            ds.add_column("ref_rejected_logps", rejected)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.ref_model_sync_steps and self._ref is not None:
            checkpoint["ref_model_state_dict"] = self._ref.state_dict()
            checkpoint["ref_model_synced_step"] = self._synced_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ref_model_state_dict" in checkpoint and self._ref is not None:
            self._ref.load_state_dict(checkpoint["ref_model_state_dict"])
            self._synced_step = checkpoint.get("ref_model_synced_step", 0)
