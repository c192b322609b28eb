"""LogProbMetrics: aggregates the per-sample metrics a step already computed, plus held-out log-prob statistics.

Every algorithm's ``training_step`` / ``validation_step`` returns ``{"loss", "metrics": {name: tensor[B]}}`` computed
from the log-probs of its own forward (no second forward). This callback accumulates them in plain tensors (a float64
sum and count per key where the values live; keys of equal size are updated together: a few small tensor ops per
step, no host sync) and logs:

* ``train/<name>``: the mean of the finite per-sample values over the *logging window* (every micro-batch of every
  optimizer step since the last flush), as TRL averages its logged metrics. It calls ``pl_module.log`` only when
  Lightning sends the step to the loggers (``trainer.log_every_n_steps``), on the first optimizer step of a fit (so
  step 1 shows, e.g., DPO's ln 2), on the last step of the fit and when the trainer is stopping. Between flushes
  ``trainer.callback_metrics["train/<name>"]`` holds the last window's mean. ``self.log`` costs ~0.5 ms a call in
  Lightning's result collection, which logging every key on every step made 2–3% of a small-model step.
* ``val/<name>``: the mean over the validation epoch, logged on epoch end.

Under ``torch.distributed`` (world size > 1) the sums and counts are all-reduced at each flush (one stacked tensor,
one ``all_reduce``), so every rank logs the global mean. Every ``every_n_steps`` the callback also scores a fixed
held-out batch without gradient: per-token mean log-prob, policy entropy and KL to the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from torch import Tensor


class MeanAccumulator:
    """Per-key running sum and count of the finite entries of tensors, kept on the tensors' device (float64;
    float32 on MPS, which has no float64) and never read back until :meth:`pop_means`. :meth:`update` stacks the keys
    whose tensors have the same size and reduces them together, so a step costs a handful of small tensor ops however
    many keys it has (a DPO step: one group of six)."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}  # keys -> (sums[K], counts[K])

    def __len__(self) -> int:
        return len(self.groups)

    def clear(self) -> None:
        self.groups.clear()

    def update(self, values: dict[str, Tensor]) -> None:
        by_shape: dict[tuple[int, torch.dtype, torch.device], list[str]] = {}
        for key, value in values.items():
            by_shape.setdefault((value.numel(), value.dtype, value.device), []).append(key)
        for (_, _, device), keys in by_shape.items():
            x = torch.stack([values[k].detach().reshape(-1) for k in keys])
            dtype = torch.float32 if device.type == "mps" else torch.float64
            finite = torch.isfinite(x)  # None-like samples (NaN) are excluded from the mean
            sums, counts = torch.where(finite, x, 0).sum(-1, dtype=dtype), finite.sum(-1, dtype=dtype)
            group = tuple(keys)
            if group in self.groups:
                self.groups[group][0].add_(sums)
                self.groups[group][1].add_(counts)
            else:
                self.groups[group] = (sums, counts)

    def totals(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Each key's (sum, count) as scalar tensors on the device of its values (views: no copy, no host sync)."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for group, (sums, counts) in self.groups.items():
            for i, key in enumerate(group):
                if key in out:
                    out[key] = (
                        out[key][0] + sums[i].to(out[key][0].device),
                        out[key][1] + counts[i].to(out[key][1].device),
                    )
                else:
                    out[key] = (sums[i], counts[i])
        return out

    def pop_means(self, device: torch.device | None = None) -> dict[str, Tensor]:
        """The mean of every key with at least one finite value since the last call (float32 scalars on ``device``,
        default: where the values were), over all ranks when ``torch.distributed`` runs more than one process (one
        stacked ``all_reduce``); then starts over. Every rank must call it at the same time with the same keys (they
        come from the same step outputs)."""
        if not self.groups:
            return {}
        totals = self.totals()
        self.clear()
        keys = sorted(totals)
        device = device or totals[keys[0]][0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        stats = torch.stack([torch.stack([t.to(device, dtype) for t in totals[k]]) for k in keys], 1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        counts = stats[1].tolist()
        means = (stats[0] / stats[1].clamp(min=1)).float()
        return {k: means[i] for i, k in enumerate(keys) if counts[i] > 0}


def step_metrics(outputs: Any) -> dict[str, Tensor]:
    """The per-sample metric tensors of a step's output (empty for a skipped step)."""
    return outputs.get("metrics", {}) if isinstance(outputs, dict) else {}


class LogProbMetrics(Callback):
    """Args:
    every_n_steps: held-out statistics period in optimizer steps (0 = off).
    heldout_batches: number of validation batches that form the fixed held-out set.
    """

    def __init__(self, every_n_steps: int = 50, heldout_batches: int = 1) -> None:
        self.every_n_steps = every_n_steps
        self.heldout_batches = heldout_batches
        self.train = MeanAccumulator()
        self.val = MeanAccumulator()
        self._last_step = -1
        self._first_step = True
        self._heldout: list[dict[str, Any]] | None = None

    @staticmethod
    def _update(acc: MeanAccumulator, stage: str, outputs: Any) -> None:
        acc.update({f"{stage}/{name}": value for name, value in step_metrics(outputs).items()})

    @staticmethod
    def _flush(acc: MeanAccumulator, pl_module: LightningModule, on_step: bool) -> None:
        for key, mean in acc.pop_means(pl_module.device).items():
            pl_module.log(key, mean, on_step=on_step, on_epoch=not on_step)

    @staticmethod
    def should_flush(trainer: Trainer) -> bool:
        """Called in ``on_train_batch_end`` after an optimizer step: whether the train window is logged now."""
        if trainer._logger_connector.should_update_logs or trainer.fast_dev_run or trainer.should_stop:
            return True  # Lightning sends this step to the loggers (the check LearningRateMonitor uses)
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True  # the last step of the fit
        max_epochs = trainer.max_epochs
        return bool(trainer.is_last_batch and max_epochs is not None and 0 < max_epochs <= trainer.current_epoch + 1)

    # -- train ----------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train.clear()
        self._last_step = trainer.global_step
        self._first_step = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update(self.train, "train", outputs)
        if trainer.global_step != self._last_step:  # an optimizer step just completed
            self._last_step = trainer.global_step
            if self._first_step or self.should_flush(trainer):
                self._flush(self.train, pl_module, on_step=True)
            self._first_step = False
            if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
                self.log_heldout(trainer, pl_module)

    # -- validation -----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.val.clear()

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
            self._update(self.val, "val", outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._flush(self.val, pl_module, on_step=False)

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
        from src.logprobs import completion_logits

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
