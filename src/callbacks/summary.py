"""TokenThroughput (tokens/s and samples/s in the progress bar, MFU) and FitSummary (where key metrics started and
ended)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from src.callbacks.logprob import MetricWindow, step_metrics


def _samples(batch: dict[str, Any]) -> int:
    return int(batch["num_samples"]) if "num_samples" in batch else int(batch["index"].numel())


def _tokens(batch: dict[str, Any]) -> int:
    return max(int(batch.get("num_tokens", 0)), _samples(batch))


class TokenThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` counting the tokens the collator (or, for GRPO/PPO, the step's rollout)
    counted on the host, so measuring needs no device sync (on CUDA Lightning synchronizes to time the step). It
    logs Lightning's ``train/device/*`` keys (``samples_per_sec``, ``items_per_sec``, ``flops_per_sec`` and ``mfu``
    where the device's peak FLOPs are known), and ``train/tokens_per_s`` (progress bar) and ``train/samples_per_s``
    over all processes. FLOPs per batch are estimated as 6 · trainable parameters · tokens (2 · for validation),
    the Kaplan et al. (2020) count, which leaves out the attention's quadratic term and the frozen reference.

    Args:
        window: number of batches of the rolling average (Lightning's ``window_size``).
    """

    def __init__(self, window: int = 10) -> None:
        super().__init__(batch_size_fn=_samples, length_fn=_tokens, window_size=max(2, window))
        self._params = 0
        self._logged_time: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if isinstance(trainer.strategy, FSDPStrategy):  # each rank holds a shard
            n = torch.tensor(float(self._params), device=pl_module.device)
            self._params = int(trainer.strategy.reduce(n, reduce_op="sum"))
        super().on_train_start(trainer, pl_module, *args)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        out = outputs if isinstance(outputs, dict) else {}
        counts = {"num_samples": out.get("num_samples", _samples(batch)), "num_tokens": out.get("num_tokens", 0)}
        counts["num_tokens"] = counts["num_tokens"] or batch.get("num_tokens", 0)
        pl_module.flops_per_batch = 6 * self._params * _tokens(counts)
        super().on_train_batch_end(trainer, pl_module, outputs, counts, *args)
        logged = trainer.logged_metrics
        if trainer.is_global_zero and logged.get("train/time") != self._logged_time:
            self._logged_time = logged.get("train/time")  # Lightning's monitor just computed a new window
            ws = trainer.world_size
            if "train/device/items_per_sec" in logged:
                tokens = float(logged["train/device/items_per_sec"]) * ws
                pl_module.log("train/tokens_per_s", tokens, prog_bar=True, rank_zero_only=True)
            if "train/device/samples_per_sec" in logged:
                samples = float(logged["train/device/samples_per_sec"]) * ws
                pl_module.log("train/samples_per_s", samples, rank_zero_only=True)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any, **kwargs: Any
    ) -> None:
        pl_module.flops_per_batch = 2 * self._params * _tokens(batch)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)


class FitSummary(Callback):
    """Prints, at the end of ``fit``, each of the module's ``summary_metrics`` averaged over the first and the last
    ``window`` optimizer steps (and the last validation value), so a run shows at a glance that it learned.

    Per-step values come from the step outputs, not from ``callback_metrics`` (which ``LogProbMetrics`` refreshes only
    on logging steps): ``train/loss`` is the step's loss and ``train/<name>`` the mean of the finite entries of
    ``outputs["metrics"][name]``, pooled over the micro-batches of an accumulated step. A key found in neither falls
    back to ``trainer.callback_metrics``. Values stay on the device until the end of training (no per-step host
    sync); under ``torch.distributed`` the per-step sums and counts are all-reduced once then, so the summary is of
    all ranks' samples.

    ``exact_match: N`` (> 0) also counts, before and after training, how many of the first ``N`` held-out prompts the
    policy completes greedily with exactly the data's completion (the SFT default's copy accuracy); 0 skips it.
    """

    def __init__(self, window: int = 10, generation: bool = True, exact_match: int = 0) -> None:
        self.window = window
        self.generation = generation
        self.exact_match = exact_match
        self._sample: dict[str, Any] | None = None  # the held-out prompt and its greedy completion at the start
        self._matches: tuple[int, int] | None = None  # (hits, prompts) at the start
        self._values: dict[str, list[Tensor]] = {}  # per optimizer step: (sum, count)
        self._step = MetricWindow()  # the current optimizer step's micro-batches
        self._last_step = -1
        self._first_step: int | None = None

    @property
    def history(self) -> dict[str, list[float]]:
        """Per-key values of every optimizer step (steps where a key had no finite value are left out)."""
        out = {}
        for key, values in self._values.items():
            if values:
                sums, counts = torch.stack([v.to(values[0].device) for v in values]).T.tolist()
                floats = [a / b for a, b in zip(sums, counts) if b > 0 and math.isfinite(a / b)]
                if floats:
                    out[key] = floats
        return out

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sample = greedy_sample(trainer, pl_module) if self.generation else None
        self._matches = exact_matches(trainer, pl_module, self.exact_match) if self.exact_match > 0 else None
        self._last_step = trainer.global_step
        self._first_step = None  # the global step of the first recorded step (31 when resuming after step 30)
        self._step.clear()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        keys = getattr(pl_module, "summary_metrics", ())
        metrics = step_metrics(outputs)
        found = {}
        for key in keys:
            name = key.split("/", 1)[1] if key.startswith("train/") else None
            if key == "train/loss" and isinstance(outputs, dict) and "loss" in outputs:
                loss = outputs["loss"].detach().float()
                if pl_module.automatic_optimization:  # Lightning divides the returned loss by the accumulation
                    loss = loss * trainer.accumulate_grad_batches
                found[key] = loss
            elif name is not None and name in metrics:
                found[key] = metrics[name]
        if found:
            self._step.update(found)
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if self._first_step is None:
            self._first_step = trainer.global_step
        totals = self._step.totals()
        self._step.clear()
        for key in keys:
            if key in totals:
                value = torch.stack(totals[key])
            elif (logged := trainer.callback_metrics.get(key)) is not None:
                value = torch.stack([logged.detach().float(), torch.ones_like(logged, dtype=torch.float)])
            else:
                continue
            self._values.setdefault(key, []).append(value)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sums the per-step sums and counts over ranks (one collective when every rank has the same steps)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        keys = list(getattr(pl_module, "summary_metrics", ()))
        device = pl_module.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        lengths = torch.tensor([len(self._values.get(k, [])) for k in keys], device=device, dtype=dtype)
        bounds = torch.stack([lengths, -lengths])
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        if not torch.equal(bounds[0], -bounds[1]):  # ranks disagree on the steps: keep each rank's own values
            return
        present = [k for k in keys if self._values.get(k)]
        if not present:
            return
        flat = torch.cat([torch.stack([v.to(device, dtype) for v in self._values[k]]) for k in present])
        dist.all_reduce(flat)
        for k, part in zip(present, flat.split([len(self._values[k]) for k in present])):
            self._values[k] = list(part)

    def summary(
        self, trainer: Trainer, history: dict[str, list[float]] | None = None
    ) -> dict[str, tuple[float, float]]:
        out = {}
        for key, values in (self.history if history is None else history).items():
            n = min(self.window, max(1, len(values) // 2))
            out[key] = (sum(values[:n]) / n, sum(values[-n:]) / n)
        return out

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        history = self.history
        first = self._first_step or 1
        lines = [
            f"  {k}: step {first} {history[k][0]:.4f} | mean of first steps {a:.4f} -> mean of last steps {b:.4f}"
            for k, (a, b) in self.summary(trainer, history).items()
        ]
        for key in getattr(pl_module, "summary_metrics", ()):
            val_key = "val/" + key.split("/", 1)[1]
            if val_key in trainer.callback_metrics:
                lines.append(f"  {val_key}: {float(trainer.callback_metrics[val_key]):.4f} (last validation)")
        if self._matches is not None and (after := exact_matches(trainer, pl_module, self.exact_match)) is not None:
            (a, n), (b, _) = self._matches, after
            lines.append(f"  held-out greedy completions equal to the data's: {a}/{n} at the start -> {b}/{n}")
        if self._sample is not None:
            before, after = self._sample, greedy_sample(trainer, pl_module, self._sample)
            lines.append(f"  greedy completion of the {before['source']} prompt {before['prompt']!r}:")
            lines.append(f"    step {before['step']}: {before['completion']!r}")
            lines.append(f"    step {after['step']}: {after['completion']!r}")
            if before.get("expected") is not None:
                lines.append(f"    data: {before['expected']!r}")
        if lines:
            rank_zero_info(f"{type(pl_module).__name__} finished {trainer.global_step} steps:\n" + "\n".join(lines))
        if where := outputs_of(trainer):
            rank_zero_info("Outputs:\n" + "\n".join(f"  {name}: {path}" for name, path in where.items()))


@torch.no_grad()
def greedy_sample(trainer: Trainer, pl_module: LightningModule, like: dict[str, Any] | None = None) -> dict | None:
    """The greedy completion of the first held-out prompt (the first training prompt without a validation set) by
    the policy as it is now; ``None`` for a model without an LM head (a reward model) or without a DataModule. Every
    rank generates (sharded models need all ranks in a forward); rank zero prints."""
    from src.logprobs import has_lm_head
    from src.rollout import SamplingConfig, generate

    dm, model = trainer.datamodule, getattr(pl_module, "model", None)
    tok = getattr(dm, "tokenizer", None)
    if model is None or tok is None or not has_lm_head(model):
        return None
    if like is None:
        sets = [("held-out", getattr(dm, "val_set", None)), ("training", getattr(dm, "train_set", None))]
        source, ds = next(((n, d) for n, d in sets if d is not None and len(d)), (None, None))
        if ds is None:
            return None
        row = ds[0]
        target = row.get("chosen_ids", row.get("completion_ids") if row.get("label", True) else None)
        sampling = getattr(pl_module, "sampling", None)
        n_new = sampling.max_new_tokens if sampling is not None else (min(128, len(target) + 8) if target else 32)
        like = {"source": source, "prompt_ids": list(row["prompt_ids"]), "max_new_tokens": n_new}
        like["prompt"] = tok.decode(row["prompt_ids"], skip_special_tokens=True)
        like["expected"] = None if target is None else tok.decode(target, skip_special_tokens=True)
    ids = torch.tensor([like["prompt_ids"]], device=pl_module.device)
    out = generate(
        model,
        ids,
        torch.ones_like(ids),
        SamplingConfig(max_new_tokens=like["max_new_tokens"], temperature=0.0),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        accel=getattr(pl_module, "accel", None),
    )
    completion = tok.decode(out.completion_ids[0], skip_special_tokens=True)
    return {**like, "step": trainer.global_step, "completion": completion}


@torch.no_grad()
def exact_matches(trainer: Trainer, pl_module: LightningModule, n: int, batch_size: int = 32) -> tuple[int, int] | None:
    """How many of the first ``n`` held-out prompts (rows with a target: ``completion_ids`` or ``chosen_ids``) the
    policy completes greedily with exactly the target's text, as ``(hits, prompts)``; ``None`` without a validation
    set, an LM head or targets. Prompts run left-padded in batches of ``batch_size``, up to the longest target + 4
    new tokens; every rank generates, as in :func:`greedy_sample`."""
    from src.data.collate import left_pad
    from src.logprobs import has_lm_head
    from src.rollout import SamplingConfig, generate

    dm, model = trainer.datamodule, getattr(pl_module, "model", None)
    tok, ds = getattr(dm, "tokenizer", None), getattr(dm, "val_set", None)
    if model is None or tok is None or ds is None or not has_lm_head(model):
        return None
    rows = [ds[i] for i in range(min(n, len(ds)))]
    pairs = [(r["prompt_ids"], r.get("chosen_ids", r.get("completion_ids"))) for r in rows]
    pairs = [(p, t) for p, t in pairs if t is not None]
    hits = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids, mask = (x.to(pl_module.device) for x in left_pad([p for p, _ in chunk], tok.pad_token_id))
        sampling = SamplingConfig(max_new_tokens=max(len(t) for _, t in chunk) + 4, temperature=0.0)
        out = generate(
            model, ids, mask, sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            accel=getattr(pl_module, "accel", None),
        )  # fmt: skip
        texts = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
        targets = tok.batch_decode([t for _, t in chunk], skip_special_tokens=True)
        hits += sum(a.strip() == b.strip() for a, b in zip(texts, targets))
    return (hits, len(pairs)) if pairs else None


def outputs_of(trainer: Trainer) -> dict[str, str]:
    """Where a fit wrote its outputs: run directory, metrics file, resolved config, checkpoints, W&B run, export."""
    from src.callbacks.export import HFExport

    out: dict[str, str] = {}
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(logger, CSVLogger) and log_dir:
            out["run directory"] = log_dir
            out["metrics"] = str(Path(log_dir) / "metrics.csv")
            if (Path(log_dir) / "config.yaml").exists():
                out["config"] = str(Path(log_dir) / "config.yaml")
            if (Path(log_dir) / "curves.png").exists():
                out["curves (python -m src plot RUN_DIR)"] = str(Path(log_dir) / "curves.png")
        elif isinstance(logger, WandbLogger) and logger.save_dir:
            out["W&B (offline: wandb sync DIR)"] = str(Path(logger.save_dir) / "wandb")
    if trainer.log_dir and "run directory" not in out:
        out["run directory"] = trainer.log_dir
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if path:
            out["checkpoint (resume: --ckpt_path last)" if "last" in Path(path).name else "checkpoint"] = path
    for cb in trainer.callbacks:
        if isinstance(cb, HFExport) and cb.dirpath:
            out["Hugging Face export"] = cb.dirpath
    return out
