"""LogProbMetrics: aggregates the per-sample metrics a step already computed, plus held-out log-prob statistics.

Every algorithm's ``training_step`` / ``validation_step`` returns ``{"loss", "metrics": {name: tensor[B]}}`` computed
from the log-probs of its own forward (no second forward). This callback accumulates them in torchmetrics metrics
(:class:`FiniteMean`: a float64 sum and count per key on the values' device, no host sync per step) and logs:

* ``train/<name>``: the mean of the finite per-sample values over the *logging window* (every micro-batch of every
  optimizer step since the last flush), as TRL averages its logged metrics. It calls ``pl_module.log`` only when
  Lightning sends the step to the loggers (``trainer.log_every_n_steps``), on the first optimizer step of a fit (so
  step 1 shows, e.g., DPO's ln 2), on the last step of the fit and when the trainer is stopping. Between flushes
  ``trainer.callback_metrics["train/<name>"]`` holds the last window's mean. ``self.log`` costs ~0.5 ms a call in
  Lightning's result collection, which logging every key on every step made 2–3% of a small-model step.
* ``val/<name>``: the mean over the validation epoch, logged on epoch end.

Under ``torch.distributed`` (world size > 1) torchmetrics sums the states over processes at each flush, so every
rank logs the global mean. Every ``every_n_steps`` the callback also scores a fixed held-out batch without gradient:
per-token mean log-prob, policy entropy and KL to the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor
from torchmetrics import Metric


class FiniteMean(Metric):
    """Mean of the finite entries of every tensor passed to :meth:`update` (NaN marks a sample without a value, e.g.
    a GRPO completion no reward function scored). A torchmetrics ``Metric``: states live on the values' device, are
    summed over processes in :meth:`compute` and never read back before it, so an update costs no host sync.
    (``MeanMetric(nan_strategy="disable")`` would do, but torchmetrics 1.9 drops its ``weight`` in that mode.)"""

    full_state_update = False

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")

    def update(self, value: Tensor) -> None:
        value = value.detach()
        finite = torch.isfinite(value)
        self.total += torch.where(finite, value, 0).sum(dtype=self.total.dtype)
        self.count += finite.sum(dtype=self.count.dtype)

    def compute(self) -> Tensor:
        return (self.total / self.count).float()  # NaN when no value was finite


class MetricWindow:
    """One :class:`FiniteMean` per key, created on the device of the key's first values (float64; float32 on MPS)."""

    def __init__(self) -> None:
        self.metrics: dict[str, FiniteMean] = {}

    def __len__(self) -> int:
        return sum(m.update_count > 0 for m in self.metrics.values())

    def clear(self) -> None:
        for m in self.metrics.values():
            m.reset()

    def update(self, values: dict[str, Tensor]) -> None:
        for key, value in values.items():
            if key not in self.metrics:
                dtype = torch.float32 if value.device.type == "mps" else torch.float64
                self.metrics[key] = FiniteMean(dtype).to(value.device)
            self.metrics[key].update(value)

    def totals(self) -> dict[str, tuple[Tensor, Tensor]]:
        """This process's (sum, count) of every updated key, as scalar tensors on the values' device (no sync)."""
        return {k: (m.total, m.count) for k, m in self.metrics.items() if m.update_count > 0}

    def pop_means(self, device: torch.device | None = None) -> dict[str, Tensor]:
        """The mean of every key with at least one finite value since the last call (float32 scalars on ``device``),
        over all processes under ``torch.distributed`` (every rank must call it with the same keys: they come from
        the same step outputs); then starts over. One host sync to drop the keys without a finite value."""
        updated = sorted(k for k, m in self.metrics.items() if m.update_count > 0)
        if not updated:
            return {}
        means = [self.metrics[k].compute().to(device) if device else self.metrics[k].compute() for k in updated]
        self.clear()
        finite = torch.stack([m.to(means[0].device) for m in means]).isfinite().tolist()
        return {k: m for k, m, ok in zip(updated, means, finite) if ok}


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
        self.train = MetricWindow()
        self.val = MetricWindow()
        self._last_step = -1
        self._first_step = True
        self._heldout: list[dict[str, Any]] | None = None

    @staticmethod
    def _update(acc: MetricWindow, stage: str, outputs: Any) -> None:
        acc.update({f"{stage}/{name}": value for name, value in step_metrics(outputs).items()})

    @staticmethod
    def _flush(acc: MetricWindow, pl_module: LightningModule, on_step: bool) -> dict[str, Tensor]:
        means = acc.pop_means(pl_module.device)
        for key, mean in means.items():
            pl_module.log(key, mean, on_step=on_step, on_epoch=not on_step)
        return means

    @staticmethod
    def write_first_row(trainer: Trainer, pl_module: LightningModule, outputs: Any, means: dict[str, Tensor]) -> None:
        """The first optimizer step of a fit is written to the loggers even when it is not a logging step (so
        ``metrics.csv`` has a step-1 row, e.g. DPO's ln 2), at the step number Lightning would have used."""
        row = {key: float(mean) for key, mean in means.items()}
        if isinstance(outputs, dict) and "loss" in outputs:
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            if scale == 1:  # under accumulation the output holds the last micro-batch only: leave it to FitSummary
                row["train/loss"] = float(outputs["loss"])
        step = (trainer.fit_loop.total_batch_idx + 1) // trainer.accumulate_grad_batches - 1
        for logger in trainer.loggers:
            logger.log_metrics(row, step=step)

    @staticmethod
    def should_flush(trainer: Trainer) -> bool:
        """Called in ``on_train_batch_end`` after an optimizer step: whether the train window is logged now, i.e.
        whether Lightning sends this step to the loggers (its cadence counts stepped batches, which the public
        ``fit_loop.total_batch_idx`` gives), the fit is stopping or this is its last step."""
        stepped = (trainer.fit_loop.total_batch_idx + 1) // trainer.accumulate_grad_batches
        if trainer.log_every_n_steps and stepped % trainer.log_every_n_steps == 0:
            return True
        if trainer.fast_dev_run or trainer.should_stop:
            return True
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
            logging_now = self.should_flush(trainer)
            if self._first_step or logging_now:
                means = self._flush(self.train, pl_module, on_step=True)
                if self._first_step and not logging_now:
                    self.write_first_row(trainer, pl_module, outputs, means)
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
