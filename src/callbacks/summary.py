"""Throughput (tokens/s, samples/s in the progress bar) and FitSummary (where key metrics started and ended)."""

from __future__ import annotations

import time
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class Throughput(Callback):
    """Tokens and samples per second over the last ``window`` optimizer steps, from ``num_tokens`` the collator
    (or the step's output) counted on the host, so measuring needs no device sync."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._t0: float | None = None
        self._tokens = self._samples = 0
        self._steps = 0
        self._last_step = -1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        out = outputs if isinstance(outputs, dict) else {}
        self._tokens += int(out.get("num_tokens", batch.get("num_tokens", 0)))
        self._samples += int(out.get("num_samples", batch["index"].numel()))
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        self._steps += 1
        if self._steps >= self.window and self._t0 is not None:
            dt = time.perf_counter() - self._t0
            ws = trainer.world_size
            pl_module.log("train/tokens_per_s", self._tokens * ws / dt, prog_bar=True, rank_zero_only=True)
            pl_module.log("train/samples_per_s", self._samples * ws / dt, rank_zero_only=True)
            self._t0, self._tokens, self._samples, self._steps = time.perf_counter(), 0, 0, 0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validation time is not training time: restart the window."""
        self._t0, self._tokens, self._samples, self._steps = None, 0, 0, 0


class FitSummary(Callback):
    """Prints, at the end of ``fit``, each of the module's ``summary_metrics`` averaged over the first and the last
    ``window`` logged steps (and the last validation value), so a run shows at a glance that it learned."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.history: dict[str, list[float]] = {}
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        for key in getattr(pl_module, "summary_metrics", ()):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history.setdefault(key, []).append(float(value))

    def summary(self, trainer: Trainer) -> dict[str, tuple[float, float]]:
        out = {}
        for key, values in self.history.items():
            n = min(self.window, max(1, len(values) // 2))
            out[key] = (sum(values[:n]) / n, sum(values[-n:]) / n)
        return out

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        lines = [
            f"  {k}: step 1 {self.history[k][0]:.4f} | mean of first steps {a:.4f} -> mean of last steps {b:.4f}"
            for k, (a, b) in self.summary(trainer).items()
        ]
        for key in getattr(pl_module, "summary_metrics", ()):
            val_key = "val/" + key.split("/", 1)[1]
            if val_key in trainer.callback_metrics:
                lines.append(f"  {val_key}: {float(trainer.callback_metrics[val_key]):.4f} (last validation)")
        if lines:
            rank_zero_info(f"{type(pl_module).__name__} finished {trainer.global_step} steps:\n" + "\n".join(lines))
