"""LogProbMetrics: aggregates the per-sample metrics a step already computed, plus held-out log-prob statistics.

Every algorithm's ``training_step`` / ``validation_step`` returns ``{"loss", "metrics": {name: tensor[B]}}`` computed
from the log-probs of its own forward (no second forward). This callback averages them with torchmetrics
(``MeanMetric``, synchronised across ranks), logs ``train/<name>`` once per optimizer step (micro-batches of an
accumulated step are pooled) and ``val/<name>`` once per validation epoch. Every ``every_n_steps`` it also scores a
fixed held-out batch without gradient: per-token mean log-prob, policy entropy and KL to the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torchmetrics import MeanMetric


class LogProbMetrics(Callback):
    """Args:
    every_n_steps: held-out statistics period in optimizer steps (0 = off).
    heldout_batches: number of validation batches that form the fixed held-out set.
    """

    def __init__(self, every_n_steps: int = 50, heldout_batches: int = 1) -> None:
        self.every_n_steps = every_n_steps
        self.heldout_batches = heldout_batches
        self.metrics: dict[str, MeanMetric] = {}
        self._last_step = -1
        self._heldout: list[dict[str, Any]] | None = None

    def _metric(self, key: str, device: torch.device) -> MeanMetric:
        if key not in self.metrics:
            self.metrics[key] = MeanMetric(sync_on_compute=True).to(device)
        return self.metrics[key]

    def _update(self, stage: str, outputs: Any, pl_module: LightningModule) -> None:
        if not isinstance(outputs, dict):
            return
        for name, value in outputs.get("metrics", {}).items():
            v = value.detach().float().reshape(-1)
            v = v[torch.isfinite(v)]  # None-like samples (NaN) are excluded from the mean
            self._metric(f"{stage}/{name}", pl_module.device).update(v) if v.numel() else None

    def _flush(self, stage: str, pl_module: LightningModule) -> None:
        for key, m in self.metrics.items():
            if key.startswith(stage + "/") and m.update_count > 0:
                pl_module.log(key, m.compute(), on_step=stage == "train", on_epoch=stage != "train")
                m.reset()

    # -- train ----------------------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update("train", outputs, pl_module)
        if trainer.global_step != self._last_step:  # an optimizer step just completed
            self._last_step = trainer.global_step
            self._flush("train", pl_module)
            if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
                self.log_heldout(trainer, pl_module)

    # -- validation -----------------------------------------------------------------------------------------------
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._update("val", outputs, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._flush("val", pl_module)

    # -- held-out statistics --------------------------------------------------------------------------------------
    def _heldout_batches(self, trainer: Trainer, pl_module: LightningModule) -> list[dict[str, Any]]:
        if self._heldout is None:
            self._heldout = []
            dm = trainer.datamodule
            loaders = dm.val_dataloader() if dm is not None else []
            if loaders:
                for i, batch in enumerate(loaders):
                    if i >= self.heldout_batches:
                        break
                    self._heldout.append(batch)
        return self._heldout

    @torch.no_grad()
    def log_heldout(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Per-token log-prob, entropy and exact KL(π‖π_ref) (summed over the vocabulary at each completion position)
        on a fixed validation set; logged as ``heldout/*``."""
        if not hasattr(pl_module, "heldout_sequences"):
            return
        from src.modules.base import completion_logits

        sums = {"logp_per_token": 0.0, "entropy": 0.0, "kl": 0.0}
        n_tokens = 0
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch in self._heldout_batches(trainer, pl_module):
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                seq = pl_module.heldout_sequences(batch)
                if seq is None:
                    return
                ids, attn, mask = seq["input_ids"], seq["attention_mask"], seq["completion_mask"]
                logits, target = completion_logits(pl_module.model, ids, attn, mask)
                logp = torch.log_softmax(logits.float(), -1)
                sums["logp_per_token"] += logp.gather(-1, ids[:, 1:][target][:, None]).sum()
                sums["entropy"] += -(logp.exp() * logp).sum()
                if getattr(pl_module, "needs_reference", False):
                    ref = torch.log_softmax(pl_module.reference_logits(ids, attn, mask).float(), -1)
                    sums["kl"] += (logp.exp() * (logp - ref)).sum()
                n_tokens += int(target.sum())
        finally:
            pl_module.train(was_training)
        if n_tokens == 0:
            return
        for name, total in sums.items():
            if name != "kl" or getattr(pl_module, "needs_reference", False):
                pl_module.log(f"heldout/{name}", torch.as_tensor(total, dtype=torch.float32) / n_tokens)
