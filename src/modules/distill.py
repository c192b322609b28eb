"""On-policy knowledge distillation (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes"), with the options of TRL 1.16's ``GKDTrainer`` / ``DistillationTrainer``.

A frozen teacher (``teacher_model_name_or_path``, held outside the module tree like the reference) and a student
sharing its tokenizer. Per step, for a batch of B prompt/completion rows (the DataModule's ``sft`` kind):

1. with probability ``lmbda`` (one draw per step, seeded by the run seed and the step, so a resume redraws the same)
   the dataset completions are replaced by the student's own samples (``src.rollout.generate``; ``temperature``,
   ``max_new_tokens``...), otherwise the dataset's completions are used as they are;
2. one forward of each model gives the hidden states at the positions that predict a completion token
   (``src.logprobs.completion_hidden``: prompt and padding never reach a head);
3. ``src.losses.chunked_generalized_jsd``: the generalised JSD of the two next-token distributions at each completion
   position (``beta`` 0 = forward KL(teacher ‖ student), 1 = reverse KL(student ‖ teacher)), a chunk of positions at
   a time so that neither model's ``[N, V]`` logits exist at once;
4. the loss is the mean over the batch's completion tokens (TRL's ``sum / num_items``; under gradient accumulation
   Lightning averages micro-batch means, as for SFT).

Metrics: ``divergence/on_policy`` and ``divergence/dataset`` (per-sequence token-mean divergence, on the student's
samples or the dataset's completions), ``on_policy`` (1 when the step sampled), ``completion_length``. Validation
measures both on every validation batch: ``val/loss`` is the dataset divergence, ``val/divergence/on_policy`` the
divergence on the student's samples of the validation prompts.

``teacher_sft_steps`` > 0 first fine-tunes the teacher on the training completions (the embedded tiny default's
built-in teacher: a random tiny Llama would be a near-uniform, uninformative teacher). Real runs pass a trained
teacher and leave it at 0.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.data import tiny
from src.logprobs import completion_hidden, completion_logits, scatter_tokens, unwrap
from src.losses import chunked_generalized_jsd, generalized_jsd, masked_mean
from src.models import disable_dropout, load_causal_lm
from src.modules.base import AlignmentModule
from src.modules.online import OnlineModule
from src.rollout import generate


class Distill(OnlineModule):
    """GKD / on-policy distillation of a frozen teacher into the policy (the student).

    Args:
        teacher_model_name_or_path: the teacher (``"tiny"`` or a local HF directory); same tokenizer as the student.
        teacher_model_config: overrides of the tiny teacher's ``LlamaConfig`` fields (tiny teacher only).
        teacher_sft_steps / teacher_sft_lr: fine-tune the teacher first on the training completions (tiny default).
        beta: β of the generalised JSD in ``[0, 1]``: 0 forward KL, 1 reverse KL (TRL's GKD default 0.5).
        lmbda: fraction of steps trained on the student's own samples (1 = fully on-policy, TRL's
            ``DistillationTrainer``; 0 = supervised KD on the dataset completions).
        temperature: sampling temperature and the softmax temperature of both distributions in the loss (as TRL).
        chunk_size: completion positions per chunk of the divergence.
        **kwargs: sampling options of :class:`~src.modules.online.OnlineModule` (``max_new_tokens``, ``top_p``...)
            and the model, optimizer and scheduler options of :class:`~src.modules.base.AlignmentModule`.
            Automatic optimization: gradients are clipped at ``trainer.gradient_clip_val``, or at ``max_grad_norm``
            (the online modules' option) when the trainer sets none.
    """

    data_kind = "sft"
    summary_metrics = ("train/loss", "train/divergence/on_policy", "train/divergence/dataset")

    def __init__(
        self,
        *args: Any,
        teacher_model_name_or_path: str = tiny.TINY,
        teacher_model_config: dict[str, Any] | None = None,
        teacher_sft_steps: int = 0,
        teacher_sft_lr: float = 2e-3,
        beta: float = 0.5,
        lmbda: float = 0.5,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        kwargs.update(num_generations=1)
        kwargs.setdefault("reward_funcs", None)
        super().__init__(*args, temperature=temperature, **kwargs)
        self.automatic_optimization = True
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda (the on-policy fraction) must be in [0, 1], got {lmbda}")
        self.save_hyperparameters()
        object.__setattr__(self, "_teacher", None)

    # -- the teacher ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self._teacher is not None:
            return
        h = self.hparams
        with torch.random.fork_rng(devices=[]):  # the same teacher however the run got here (fresh or resumed)
            torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", "0")) + 1)
            teacher = load_causal_lm(
                h.teacher_model_name_or_path, model_config=h.teacher_model_config, torch_dtype=h.torch_dtype
            )
        disable_dropout(teacher)
        object.__setattr__(self, "_teacher", teacher.requires_grad_(False).eval())

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher on the student's device and dtype."""
        p = next(self.model.parameters())
        q = next(self._teacher.parameters())
        if q.device != p.device or q.dtype != p.dtype:
            self._teacher.to(device=p.device, dtype=p.dtype)
        return self._teacher

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.teacher_sft_steps > 0:
            self.fine_tune_teacher(self.hparams.teacher_sft_steps, self.hparams.teacher_sft_lr)

    def fine_tune_teacher(self, steps: int, lr: float) -> None:
        """``steps`` AdamW steps of completion-only SFT on the training rows, in order (deterministic: every rank and
        every resume builds the same teacher)."""
        dm = self.trainer.datamodule
        rows, collate, bs = dm.train_set, dm.collator(), dm.hparams.batch_size
        teacher = self.teacher.train().requires_grad_(True)
        opt = torch.optim.AdamW(teacher.parameters(), lr=lr, weight_decay=0.0)
        nll = torch.zeros(())
        for step in range(steps):
            batch = collate([rows[(step * bs + i) % len(rows)] for i in range(bs)])
            ids, attn, mask = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "completion_mask"))
            logits, target = completion_logits(teacher, ids, attn, mask)
            nll = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][target])
            opt.zero_grad(set_to_none=True)
            nll.backward()
            torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
            opt.step()
        teacher.requires_grad_(False).eval()
        rank_zero_info(f"teacher: {steps} SFT steps on the training completions, last token NLL {nll.item():.3f}")

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val is None:
            gradient_clip_val = self.hparams.max_grad_norm
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- on-policy samples ----------------------------------------------------------------------------------------
    def on_policy_step(self) -> bool:
        """One draw per optimizer step (and micro-batch), seeded by the run seed and the step."""
        lmbda = self.hparams.lmbda
        if lmbda in (0.0, 1.0):
            return lmbda == 1.0
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0")) * 1_000_003 + self.global_step * 1009 + self._batch_idx
        return random.Random(seed).random() < lmbda

    @torch.no_grad()
    def student_samples(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        """The batch's prompts with the student's sampled completions in place of the dataset's."""
        ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        is_prompt = attn.bool() & ~comp.bool()
        lengths = is_prompt.sum(-1)
        width = int(lengths.max())
        pad = self.tokenizer.pad_token_id
        prompt_ids = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
        prompt_mask = torch.zeros_like(prompt_ids)
        for i, n in enumerate(lengths.tolist()):  # left-pad for generation
            prompt_ids[i, width - n :] = ids[i][is_prompt[i]]
            prompt_mask[i, width - n :] = 1
        was_training = self.model.training
        out = generate(
            self.model.eval(),
            prompt_ids,
            prompt_mask,
            self.sampling,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad,
            noise=self.sampling_noise(batch["index"], self.sampling, stage),
            accel=self.accel,
        )
        self.model.train(was_training)
        return {
            **batch,
            "input_ids": out.input_ids,
            "attention_mask": out.attention_mask,
            "completion_mask": torch.cat([torch.zeros_like(out.prompt_mask), out.completion_mask], 1),
        }

    # -- the loss -------------------------------------------------------------------------------------------------
    def divergence(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Per-token generalised JSD ``[N]`` at the batch's completion positions and the ``[B, T-1]`` selector."""
        h = self.hparams
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        student, teacher = unwrap(self.model), self.teacher
        heads = student.get_output_embeddings(), teacher.get_output_embeddings()
        plain = all(
            head is not None
            and not getattr(m.config, "final_logit_softcapping", None)
            and not getattr(m.config, "logit_scale", None)
            for m, head in zip((student, teacher), heads)
        )
        if plain:
            h_s, target = completion_hidden(self.model, ids, attn, mask, self.accel)
            with torch.no_grad():
                h_t, _ = completion_hidden(teacher, ids, attn, mask)
            div = chunked_generalized_jsd(
                h_s, h_t, *heads, beta=h.beta, temperature=h.temperature, chunk_size=h.chunk_size
            )
        else:  # a head that scales or soft-caps its logits: each model's own forward (the [N, V] logits are held)
            z_s, target = completion_logits(self.model, ids, attn, mask, self.accel)
            with torch.no_grad():
                z_t, _ = completion_logits(teacher, ids, attn, mask)
            div = generalized_jsd(z_s, z_t, beta=h.beta, temperature=h.temperature)
        return div, target

    def compute_loss(self, batch: dict[str, Any], on_policy: bool | None = None, stage: str = "train"):
        on_policy = self.on_policy_step() if on_policy is None else on_policy
        if on_policy:
            batch = self.student_samples(batch, stage)
        div, target = self.divergence(batch)
        mask = batch["completion_mask"]
        per_seq = masked_mean(scatter_tokens(div.detach(), target), mask, dim=-1)
        empty = per_seq.new_zeros(0)
        metrics = {
            "divergence/on_policy": per_seq if on_policy else empty,
            "divergence/dataset": empty if on_policy else per_seq,
            "on_policy": per_seq.new_full((1,), float(on_policy)),
            "completion_length": mask.sum(-1).float(),
        }
        return div.mean(), metrics

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        loss, metrics = self.compute_loss(batch, on_policy=False, stage="val")
        _, sampled = self.compute_loss(batch, on_policy=True, stage="val")
        metrics["divergence/on_policy"] = sampled["divergence/on_policy"]
        del metrics["on_policy"]
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["index"].numel(), sync_dist=True)
        return self.step_output(loss, metrics)

    def heldout_sequences(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        return AlignmentModule.heldout_sequences(self, batch)
