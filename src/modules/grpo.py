"""Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"), with the options of TRL's GRPOTrainer:
DAPO (Yu et al. 2025: clip-higher, token-level loss), Dr. GRPO (Liu et al. 2025: no std scaling, constant
normaliser), GSPO (Zheng et al. 2025: sequence-level importance ratio) and RLOO advantages (Ahmadian et al. 2024).

One training step of Lightning (one batch of P prompts) is one *generation round*:

1. sample ``num_generations`` (G) completions per prompt with ``src.rollout.generate`` (KV cache, eval mode, no
   autograd); the EOS is part of the completion and of its mask, everything after it is masked;
2. score them with the reward functions (``src.rewards.RewardScorer``) and turn rewards into per-sequence
   advantages within each group of G (``group_advantages`` or ``rloo_advantages``);
3. compute old per-token log-probs (only when the policy moves before a sample is used: ``num_iterations > 1`` or
   ``steps_per_generation > 1``) and reference log-probs (only when ``beta > 0``);
4. ``num_iterations`` passes (μ) over the buffer, each split into ``steps_per_generation`` optimizer steps, each
   accumulated over micro-batches of ``micro_batch_size`` completions, minimising ``src.losses.grpo_loss``.

The ``dapo`` normaliser counts the active tokens of the whole optimizer step: every micro-batch and every rank.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from src.logprobs import completion_logits, logps_from_logits
from src.losses import group_advantages, grpo_loss, masked_mean, rloo_advantages
from src.modules.online import OnlineModule
from src.rollout import SamplingConfig


class GRPO(OnlineModule):
    """GRPO and its variants (manual optimization).

    Args (sampling, rewards, ``micro_batch_size``, ``max_grad_norm``: :class:`~src.modules.online.OnlineModule`):
        beta: KL coefficient (0 like TRL ≥ 0.19: no reference model is loaded); ``kl``: estimator k1 | k2 | k3.
        epsilon_low / epsilon_high: clip range ``[1 − ε_low, 1 + ε_high]`` (clip-higher when ε_high > ε_low).
        loss_type: ``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo`` (see ``src.losses.grpo_loss``).
        scale_rewards: ``group`` | ``batch`` | ``none`` (Dr. GRPO); ``advantage``: ``grpo`` | ``rloo``.
        num_iterations: μ, passes over each generation buffer (> 1 is off-policy reuse with a real clipped ratio).
        steps_per_generation: optimizer steps per generation buffer (the buffer is split into this many parts).
        mask_truncated_completions: completions without EOS get no loss (DAPO).
        importance_sampling_level: ``token`` | ``sequence`` (GSPO).
    """

    data_kind = "prompt"
    summary_metrics = ("train/reward", "train/kl", "train/completions/mean_length")

    def __init__(
        self,
        *args: Any,
        beta: float = 0.0,
        kl: Literal["k1", "k2", "k3"] = "k3",
        kl_ratio_correction: bool = True,
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        advantage: Literal["grpo", "rloo"] = "grpo",
        num_iterations: int = 1,
        steps_per_generation: int = 1,
        mask_truncated_completions: bool = False,
        importance_sampling_level: Literal["token", "sequence"] = "token",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self.needs_reference = beta > 0

    # -- advantages and log-probs (rollout, sampling and scoring: OnlineModule) ---------------------------------------
    def advantages(self, rewards: Tensor) -> Tensor:
        g = self.hparams.num_generations
        if self.hparams.advantage == "rloo":
            return rloo_advantages(rewards, g)
        return group_advantages(rewards, g, scale=self.hparams.scale_rewards)

    def scoring_logits(
        self, model: torch.nn.Module, buf: dict[str, Any], rows: slice | Tensor
    ) -> tuple[Tensor, Tensor]:
        """Completion-position logits ``[N, V]`` and selector of ``rows`` under ``model``; the generations of a prompt
        may run their shared prompt once (``accel`` feature ``prefix_sharing``)."""
        ids, attn, mask = buf["input_ids"][rows], buf["attention_mask"][rows], buf["completion_mask"][rows]
        return completion_logits(model, ids, attn, mask, self.accel)

    def token_logps(self, buf: dict[str, Any], rows: slice | Tensor, with_entropy: bool = False):
        logits, target = self.scoring_logits(self.model, buf, rows)
        return logps_from_logits(
            logits,
            buf["input_ids"][rows],
            target,
            temperature=self.sampling.temperature or 1.0,
            with_entropy=with_entropy,
        )

    def ref_token_logps(self, buf: dict[str, Any], rows: slice | Tensor) -> Tensor:
        """Per-token reference log-probs of ``rows`` (no autograd); the frozen copy shares prompts like the policy.
        Logits are divided by the sampling temperature, as the policy's (and TRL's): at step 0 the KL is exactly 0."""
        temperature = self.sampling.temperature or 1.0
        if self.ref_model is None:  # LoRA: the policy with its adapter disabled
            ids, attn, mask = buf["input_ids"][rows], buf["attention_mask"][rows], buf["completion_mask"][rows]
            return self.reference_logps(ids, attn, mask, temperature=temperature)
        with torch.no_grad():
            logits, target = self.scoring_logits(self.ref_model, buf, rows)
            return logps_from_logits(logits, buf["input_ids"][rows], target, temperature=temperature)[0]

    # -- the step -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        buf = self.rollout(batch)
        n = buf["input_ids"].shape[0]
        adv = self.advantages(buf["rewards"])
        loss_mask = buf["completion_mask"].clone()
        if h.mask_truncated_completions:
            loss_mask[buf["is_truncated"]] = 0
        buf["loss_mask"] = loss_mask
        reuse = h.num_iterations > 1 or h.steps_per_generation > 1
        with torch.no_grad():
            buf["old_logps"] = (
                torch.cat([self.token_logps(buf, s)[0] for s in self._chunks(n, h.micro_batch_size)]) if reuse else None
            )
            buf["ref_logps"] = (
                torch.cat([self.ref_token_logps(buf, s) for s in self._chunks(n, h.micro_batch_size)])
                if h.beta > 0
                else None
            )

        opt = self.optimizers()
        sched = self.lr_schedulers()
        step_metrics: dict[str, list[Tensor]] = {}
        losses = []
        if n % h.steps_per_generation:
            raise ValueError(f"{n} completions do not split into steps_per_generation={h.steps_per_generation}")
        per_step = n // h.steps_per_generation
        for _ in range(h.num_iterations):
            for k in range(h.steps_per_generation):
                rows = slice(k * per_step, (k + 1) * per_step)
                loss, metrics = self._optimizer_step(buf, adv, rows, opt)
                if sched is not None:
                    sched.step()
                losses.append(loss)
                for key, v in metrics.items():
                    step_metrics.setdefault(key, []).append(v)

        loss = torch.stack(losses).mean()
        lengths = buf["completion_mask"].sum(-1).float()
        rewards = buf["rewards"]
        group_std = rewards.view(-1, h.num_generations).std(-1) if h.num_generations > 1 else rewards.new_zeros(1)
        metrics = {
            "reward": rewards,
            "reward_std": group_std,
            "frac_reward_zero_std": (group_std < 1e-6).float(),
            "completions/mean_length": lengths,
            "completions/clipped_ratio": buf["is_truncated"].float(),
            **{k: torch.stack(v).reshape(-1) for k, v in step_metrics.items()},
            **{k: v.reshape(1) for k, v in buf["reward_metrics"].items()},
        }
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        # this step's mean for the progress bar (if any); loggers get LogProbMetrics' window mean of the same key
        trainer = self.attached_trainer()
        if trainer is not None and trainer.progress_bar_callback is not None:
            self.log("train/reward", rewards.mean(), prog_bar=True, logger=False, batch_size=n)
        self.maybe_log_completions(buf)
        num_tokens = int(buf["attention_mask"].sum())
        return self.step_output(loss.detach(), metrics, num_tokens=num_tokens, num_samples=n)

    def _optimizer_step(self, buf: dict[str, Any], adv: Tensor, rows: slice, opt) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimizer step over ``rows`` of the buffer, accumulated over micro-batches."""
        h = self.hparams
        mask = buf["loss_mask"][rows]
        num_items = mask.sum()
        world = self.trainer.world_size if self.attached_trainer() is not None else 1
        if world > 1 and dist.is_available() and dist.is_initialized():
            num_items = num_items.clone()
            dist.all_reduce(num_items)
        # DDP averages gradients over ranks, so each rank normalises by the global count / world size.
        num_items = num_items.float().clamp(min=1) / world
        total = torch.zeros((), device=self.device)
        acc: dict[str, Tensor] = {}
        n_rows = mask.shape[0]
        chunks = list(self._chunks(n_rows, h.micro_batch_size))
        for s in chunks:
            idx = torch.arange(rows.start, rows.stop, device=self.device)[s]
            logps, entropy = self.token_logps(buf, idx, with_entropy=True)
            m = buf["loss_mask"][idx]
            old = logps.detach() if buf["old_logps"] is None else buf["old_logps"][idx]
            ref = None if buf["ref_logps"] is None else buf["ref_logps"][idx]
            loss, metrics = grpo_loss(
                logps,
                old,
                ref,
                adv[idx],
                m,
                beta=h.beta,
                epsilon_low=h.epsilon_low,
                epsilon_high=h.epsilon_high,
                loss_type=h.loss_type,
                kl=h.kl,
                max_completion_length=h.max_new_tokens,
                num_items=num_items,
                importance_sampling_level=h.importance_sampling_level,
                kl_ratio_correction=h.kl_ratio_correction,
            )
            if h.loss_type in ("grpo", "bnpo", "dr_grpo"):
                loss = loss * (s.stop - s.start) / n_rows  # per-micro-batch means -> mean over the step's rows
            self.check_finite(loss, "GRPO loss")
            self.manual_backward(loss)
            total = total + loss.detach()
            metrics["entropy"] = masked_mean(entropy, buf["completion_mask"][idx])
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32) * (s.stop - s.start) / n_rows
        if h.max_grad_norm:
            self.clip_grad_norm(opt, h.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, acc

    # -- validation (held-out statistics and tables: OnlineModule) ----------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        sampling = SamplingConfig(**{**vars(self.sampling), "num_generations": 1})
        buf = self.rollout(batch, sampling, stage="val")
        rewards = buf["rewards"]
        self.log("val/reward", rewards.mean(), prog_bar=True, batch_size=rewards.numel(), sync_dist=True)
        return self.step_output(
            rewards.mean(), {"reward": rewards, **{k: v.reshape(1) for k, v in buf["reward_metrics"].items()}}
        )
