"""Shared mechanics of every algorithm: the policy (``src/models.py``, LoRA), the frozen reference, optimizer +
scheduler, gradient-norm logging and clipping, and the NaN/Inf guard. Each algorithm subclasses
:class:`AlignmentModule` in its own file and writes its step; sequences are scored by ``src/logprobs.py``, through the
speed paths of ``src/accel/`` that the ``accel`` switch turns on.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from contextlib import nullcontext
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.accel import Accel, AccelSpec, parse
from src.data import tiny
from src.logprobs import completion_logits, completion_logps, unwrap
from src.models import disable_dropout, load_causal_lm

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------------- the module
class AlignmentModule(LightningModule):
    """Base LightningModule: owns the policy, an optional frozen reference, optimizer and scheduler.

    Args:
        model_name_or_path: ``"tiny"`` (embedded tiny Llama) or a local HF causal-LM directory.
        optimizer: any ``torch.optim`` optimizer, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-5}}``.
        lr_scheduler: ``constant`` | ``linear`` | ``cosine``, after ``warmup_steps`` (a fraction of the run if < 1).
        model_config: overrides of the tiny model's ``LlamaConfig`` fields (tiny default only).
        torch_dtype / attn_implementation: passed to ``from_pretrained``.
        lora: ``peft.LoraConfig`` keyword arguments (``r``, ``lora_alpha``, ``target_modules``...); ``None`` = full.
        gradient_checkpointing: recompute activations in backward (less memory, ~20% slower).
        dropout: keep the model's dropout; ``False`` (default, as TRL) sets every dropout to 0.
        nan_policy: ``raise`` stops at the first non-finite loss naming the step; ``skip`` skips and counts it.
        ref_model_name_or_path: the reference, if not the initial policy.
        accel: ``auto`` (the speed paths verified for this device and model family), ``off`` (the plain path of
            ``src/logprobs.py``) or a list of ``src.accel.FEATURES``.
    """

    data_kind: str = "sft"
    needs_reference: bool = False
    summary_metrics: tuple[str, ...] = ("train/loss",)

    def __init__(
        self,
        model_name_or_path: str = tiny.TINY,
        *,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Literal["constant", "linear", "cosine"] = "constant",
        warmup_steps: float = 0.0,
        model_config: dict[str, Any] | None = None,
        torch_dtype: str | None = None,
        attn_implementation: str | None = None,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        dropout: bool = False,
        nan_policy: Literal["raise", "skip"] = "raise",
        ref_model_name_or_path: str | None = None,
        accel: AccelSpec = "auto",
    ) -> None:
        super().__init__()
        parse(accel)  # an unknown feature fails here, at start
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.model: nn.Module | None = None
        self.set_reference(None)
        self.skipped_steps = 0
        self._accel: Accel | None = None

    # -- models ---------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        h = self.hparams
        return load_causal_lm(
            h.model_name_or_path,
            model_config=h.model_config,
            torch_dtype=h.torch_dtype,
            attn_implementation=h.attn_implementation,
        )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        model = self.build_model()
        if not h.dropout:
            disable_dropout(model)
        if self.needs_reference and h.lora is None:
            # A frozen copy of the initial policy, taken before any checkpoint restore (so resume stays exact).
            self.set_reference(
                copy.deepcopy(model)
                if h.ref_model_name_or_path is None
                else load_causal_lm(h.ref_model_name_or_path, torch_dtype=h.torch_dtype)
            )
        if h.lora is not None:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as e:
                raise ImportError("lora needs peft: pip install -e '.[lora]'") from e
            model = get_peft_model(model, LoraConfig(**{"task_type": "CAUSAL_LM", **h.lora}))
            if self.needs_reference and h.ref_model_name_or_path is not None:
                self.set_reference(load_causal_lm(h.ref_model_name_or_path, torch_dtype=h.torch_dtype))
        if h.gradient_checkpointing:
            unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes

    def set_reference(self, model: nn.Module | None) -> None:
        """Hold the frozen reference outside the module tree: not trained, not wrapped by DDP/FSDP, not in the state
        dict, no optimizer state; always in eval mode."""
        if model is not None:
            model.requires_grad_(False).eval()
        object.__setattr__(self, "_ref", model)

    @property
    def accel(self) -> Accel:
        """The speed paths in effect for the policy on its current device (``src.accel``)."""
        device = self.device
        if self._accel is None or self._accel_device != device.type:
            self._accel, self._accel_device = Accel.resolve(self.hparams.accel, unwrap(self.model), device), device.type
            rank_zero_info(f"accel={self.hparams.accel!r} on {device.type}: {sorted(self._accel.features) or 'off'}")
        return self._accel

    def attached_trainer(self) -> Trainer | None:
        """The trainer, or ``None`` when the module is used on its own."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    @property
    def ref_model(self) -> nn.Module | None:
        """The frozen reference on the policy's device and dtype (``None`` for LoRA: the adapter is disabled)."""
        if self._ref is not None:
            p = next(self.model.parameters())
            q = next(self._ref.parameters())
            if q.device != p.device or (q.dtype != p.dtype and q.is_floating_point()):
                self._ref.to(device=p.device, dtype=p.dtype)
        return self._ref

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        """Reference logits ``[N, V]`` at the completion positions, without autograd (the frozen copy or
        checkpoint, or the LoRA policy with its adapter disabled)."""
        with torch.no_grad(), self.model.disable_adapter() if self.ref_model is None else nullcontext():
            ref = self.model if self.ref_model is None else self.ref_model
            return completion_logits(ref, input_ids, attention_mask, completion_mask, self.accel)[0]

    def reference_logps(
        self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *, temperature: float = 1.0
    ) -> Tensor:
        """Per-token reference log-probs ``[B, T]`` (0 outside the completion) of that model, without autograd;
        logits are divided by ``temperature`` (the sampling temperature, as for the policy in GRPO/PPO)."""
        args, kw = (input_ids, attention_mask, completion_mask), dict(temperature=temperature, accel=self.accel)
        with torch.no_grad(), self.model.disable_adapter() if self.ref_model is None else nullcontext():
            return completion_logps(self.model if self.ref_model is None else self.ref_model, *args, **kw)[0]

    def policy_logps(self, batch: dict[str, Any], **kw: Any) -> tuple[Tensor, Tensor | None]:
        """Per-token policy log-probs ``[B, T]`` of the batch's completion tokens (``src.logprobs``)."""
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        return completion_logps(self.model, ids, attn, mask, accel=self.accel, **kw)

    # -- optimisation ---------------------------------------------------------------------------------------------
    def optimizer_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains (the policy's trainable parameters; PPO adds its critic)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self, factory: OptimizerCallable, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """``factory(params)``; a fused optimizer is rebuilt unfused under mixed precision, where Lightning's AMP
        plugin clips gradients itself and refuses optimizers that unscale internally."""
        optimizer = factory(params)
        trainer = self.attached_trainer()
        precision = str(trainer.precision) if trainer is not None else ""
        if "mixed" in precision and optimizer.defaults.get("fused"):
            accepted = inspect.signature(type(optimizer)).parameters
            kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
            optimizer = type(optimizer)(params, **{**kwargs, "fused": False})
            log.info("%s: fused=False under %s precision", type(optimizer).__name__, precision)
        return optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer(self.optimizer_factory, self.optimizer_parameters())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def lr_scheduler(
        self, optimizer: torch.optim.Optimizer, total: int | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """``lr_scheduler`` after ``warmup_steps`` over ``total`` steps (default: the trainer's stepping batches)."""
        if total is None:
            trainer = self.attached_trainer()
            total = max(1, int(trainer.estimated_stepping_batches)) if trainer is not None else 1
        w = self.hparams.warmup_steps
        warmup = int(w * total) if 0 < w < 1 else int(w)
        kind = self.hparams.lr_scheduler

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}.get(kind, 1.0)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def check_finite(self, value: Tensor, name: str) -> bool:
        """``True`` if finite; otherwise raise naming the step and the quantity, or count a skipped step."""
        if bool(torch.isfinite(value).all()):
            return True
        what = "NaN" if bool(torch.isnan(value).any()) else "Inf"
        msg = f"{type(self).__name__}: {name} is {what} at global step {self.global_step} (batch {self._batch_idx})"
        if self.hparams.nan_policy == "raise":
            raise FloatingPointError(msg + "; set model.nan_policy=skip to skip such steps")
        self.skipped_steps += 1
        log.warning("%s; skipping the step (%d skipped so far)", msg, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps))
        return False

    _pre_clip_norm: Tensor | None = None

    def grad_norm(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """Global L2 norm of the gradients of ``optimizer``'s parameters (summed over ranks for sharded strategies);
        ``None`` when no parameter has a gradient."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        norm = self.accel.total_norm(grads)
        trainer = self.attached_trainer()
        if trainer is not None and trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            norm = trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()  # sharded: every rank decides alike
        return norm

    def clip_grad_norm(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Manual optimization (GRPO, PPO): clip to a global norm of ``max_norm`` through Lightning (strategy- and
        precision-aware), keeping the norm before clipping for ``train/grad_norm``, which is what automatic
        optimization logs (Lightning clips after ``on_before_optimizer_step``) and what TRL logs."""
        self._pre_clip_norm = self.grad_norm(optimizer)
        if not self.accel.clip(self.attached_trainer(), optimizer, max_norm, self._pre_clip_norm):
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    _step_norm: Tensor | None = None  # automatic optimization: the norm logged this step, reused for clipping

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping; ``accel`` feature ``clip_with_norm`` reuses the norm logged as ``train/grad_norm``."""
        norm, self._step_norm = self._step_norm, None
        if not (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and self.accel.clip(self.attached_trainer(), optimizer, float(gradient_clip_val), norm)
        ):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm (before clipping) and catch NaN/Inf gradients in the step they appear. Under
        ``nan_policy: skip`` the gradients are dropped, so the optimizer leaves every parameter and its state as is."""
        norm, self._pre_clip_norm = self._pre_clip_norm, None
        if norm is None:
            norm = self.grad_norm(optimizer)
        if norm is None:
            return
        if self.attached_trainer() is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        if not self.check_finite(norm, "gradient norm"):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        if self.automatic_optimization:
            self._step_norm = norm

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, then the gradients freed (as the HF Trainer does): none sit beside the next activations."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_callbacks(self) -> list[Callback]:
        """The metrics callbacks (``LogProbMetrics``, ``TokenThroughput``, ``FitSummary``) of a trainer built in Python
        without them; the CLI's own (configurable) instances are left as they are."""
        from src.callbacks import FitSummary, LogProbMetrics, TokenThroughput

        have = self.trainer.callbacks
        return [
            cls() for cls in (LogProbMetrics, TokenThroughput, FitSummary) if not any(isinstance(c, cls) for c in have)
        ]

    _batch_idx = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse, before the fit, a ``data.batch_size`` this module's options cannot split (one-line ``ValueError``
        naming both); the CLI calls it before ``fit``, online modules also at ``setup``."""

    def on_fit_start(self) -> None:
        self.accel.on_fit_start(self, self.trainer.optimizers)
        dm = getattr(self.trainer, "datamodule", None)
        cut = getattr(dm, "truncated", None)
        if cut and self.logger is not None:
            self.logger.log_metrics({f"data/truncated_{k}": float(v) for k, v in cut.items()}, step=0)

    # -- the step of the automatically optimized modules (SFT, reward model, DPO): they only write compute_loss ------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean loss of a batch and per-sample metric tensors (logged by ``LogProbMetrics``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss or its own training_step")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        loss, metrics = self.compute_loss(batch)
        if not self.check_finite(loss, f"{type(self).__name__} loss"):
            return None  # nan_policy=skip: Lightning skips the backward and the optimizer step
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["index"].numel(), sync_dist=True)
        return self.step_output(loss, metrics)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        loss, metrics = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["index"].numel(), sync_dist=True)
        return self.step_output(loss, metrics)

    def heldout_sequences(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Sequences scored by the held-out statistics of ``LogProbMetrics`` (training-style batches as they are)."""
        return batch if "input_ids" in batch else None

    # -- predict / test: completions of held-out prompts, written or scored by src.evaluate.Evaluation ------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        from src.evaluate import evaluation_of

        return evaluation_of(self.trainer).complete(self, batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        from src.evaluate import evaluation_of

        ev = evaluation_of(self.trainer)
        policy = ev.complete(self, batch)
        ref = ev.complete(self, batch, reference=True) if ev.reference_model(self) is not None else [None] * len(policy)
        return [{"policy": p, "reference": r} for p, r in zip(policy, ref)]

    @staticmethod
    def step_output(loss: Tensor, metrics: dict[str, Tensor], **extra: Any) -> dict[str, Any]:
        """What a step returns: the loss plus per-sample metric tensors the LogProbMetrics callback aggregates."""
        return {"loss": loss, "metrics": {k: v.detach() for k, v in metrics.items()}, **extra}
