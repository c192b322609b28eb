"""The common base of the online algorithms (GRPO, PPO): sampling and reward arguments, rollouts, reproducible
sampling noise, micro-batch slicing and the completions table."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from src.modules import check_positive
from src.modules.base import AlignmentModule
from src.rewards import RewardScorer
from src.rollout import Rollout, SamplingConfig, generate

STAGES = ("train", "val", "heldout")
# Lightning 2.6's ModelCheckpoint warns at every save under manual optimization that it stores the state after the
# optimizer step: that is the state an exact resume needs (tests/test_resume.py), so the warning is noise here.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class OnlineModule(AlignmentModule):
    """Shared mechanics of the online algorithms (GRPO, PPO): sample completions of a prompt batch with
    ``src.rollout.generate``, decode and score them with reward functions, slice buffers into micro-batches, and log
    a completions table. Manual optimization.

    Args:
        reward_funcs: reward functions by import path (``src.rewards.digit_fraction``, the built-in default), callables,
            or ``{class_path, init_args}`` (e.g. ``src.rewards.RewardModelScorer``); see ``src/rewards.py``. None: no
            reward function (PPO with a reward model only).
        reward_weights: one weight per function (default 1 each); the total is the weighted sum, None-safe.
        reward_timeout_s: a reward function that runs longer raises ``TimeoutError``.
        num_generations: completions per prompt (G, one group).
        max_new_tokens / temperature / top_p / top_k / min_p: sampling (``src.rollout.SamplingConfig``).
        micro_batch_size: completions per forward/backward (gradient accumulation inside a step); None = all.
        log_completions_every_n_steps: a table of prompts/completions/rewards to W&B (and the console) every N steps.
        max_grad_norm: global gradient-norm clipping (manual optimization: ``trainer.gradient_clip_val`` is unused).
        **kwargs: model, optimizer and scheduler options of :class:`~src.modules.base.AlignmentModule`.
    """

    data_kind = "prompt"
    tokenizer: Any = None

    def __init__(
        self,
        *args: Any,
        reward_funcs: list[str | Callable] | str | None = "src.rewards.digit_fraction",
        reward_weights: list[float] | None = None,
        reward_timeout_s: float | None = None,
        num_generations: int = 4,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        micro_batch_size: int | None = None,
        log_completions_every_n_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_positive("num_generations", num_generations)
        check_positive("max_new_tokens", max_new_tokens)
        if micro_batch_size is not None:
            check_positive("micro_batch_size", micro_batch_size)
        self.automatic_optimization = False
        funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self.rewards = RewardScorer(funcs, reward_weights, reward_timeout_s) if funcs else None
        self.sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            num_generations=num_generations,
        )

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and self.tokenizer is None:
            self.tokenizer = dm.tokenizer
        if stage == "fit" and dm is not None and hasattr(dm, "hparams") and "batch_size" in dm.hparams:
            self.check_batch_size(dm.hparams.batch_size)

    def split_check(self, batch_size: int, option: str, parts: int) -> None:
        """``option`` = ``parts`` must divide the ``batch_size × num_generations`` completions of a batch."""
        n = batch_size * self.hparams.num_generations
        if n % parts:
            raise ValueError(
                f"{option}={parts} does not divide the {n} completions of a batch (data.batch_size={batch_size} x "
                f"num_generations={self.hparams.num_generations}): choose values whose product it divides"
            )

    @torch.no_grad()
    def rollout(
        self, batch: dict[str, Any], sampling: SamplingConfig | None = None, stage: str = "train"
    ) -> dict[str, Any]:
        """Sample, decode and score completions for a prompt batch; returns the training buffer."""
        sampling = sampling or self.sampling
        tok = self.tokenizer
        out: Rollout = generate(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            sampling,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            noise=self.sampling_noise(batch["index"], sampling, stage),
            accel=self.accel,
        )
        g = sampling.num_generations
        completions = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch["columns"].items()}
        if self.rewards is not None:  # NaN where every reward function returned None (src.rewards.combine_rewards)
            per_func = self.rewards.score(prompts, completions, columns)
            rewards, reward_metrics = self.rewards.combine(per_func)
        else:
            per_func = torch.zeros(len(completions), 0)
            rewards, reward_metrics = torch.zeros(len(completions)), {}
        rewards = rewards.to(self.device)
        completion_mask = out.completion_mask
        prompt_len = out.prompt_ids.shape[1]
        return {
            "input_ids": out.input_ids,
            "attention_mask": out.attention_mask,
            "completion_mask": torch.cat([torch.zeros_like(out.prompt_mask), completion_mask], 1),
            "prompt_len": prompt_len,
            "rewards": rewards,
            "rewards_per_func": per_func.to(self.device),
            "reward_metrics": reward_metrics,
            "is_truncated": out.is_truncated,
            "prompts": prompts,
            "completions": completions,
        }

    def sampling_noise(self, index: Tensor, sampling: SamplingConfig, stage: str) -> Tensor:
        """Uniform numbers for sampling, seeded per (run seed, stage, epoch, prompt row): the same prompt gets the same
        samples however prompts are batched, split across ranks, or resumed from a checkpoint."""
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        epoch = self.current_epoch if self.attached_trainer() is not None else 0
        rows = []
        for i in index.tolist():
            seed = base
            for part in (STAGES.index(stage), epoch, i):
                seed = (seed * 1_000_003 + part) % (2**63 - 1)
            g = torch.Generator().manual_seed(seed)
            rows.append(torch.rand(sampling.num_generations, sampling.max_new_tokens, generator=g, dtype=torch.float64))
        return torch.cat(rows).to(self.device)

    @staticmethod
    def _chunks(n: int, size: int | None):
        size = size or n
        for start in range(0, n, size):
            yield slice(start, min(n, start + size))

    def heldout_sequences(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Greedy completions of the held-out prompts, scored by ``LogProbMetrics`` (entropy, KL to reference)."""
        sampling = SamplingConfig(**{**vars(self.sampling), "num_generations": 1, "temperature": 0.0})
        return self.rollout(batch, sampling, stage="heldout")

    def maybe_log_completions(self, buf: dict[str, Any], rewards: Tensor | None = None) -> None:
        """Every ``log_completions_every_n_steps`` steps: a ``completions`` table to W&B and the best one to the
        console. ``rewards`` defaults to the buffer's."""
        every = self.hparams.log_completions_every_n_steps
        if not every or self.global_step % every != 0 or self.attached_trainer() is None:
            return
        rewards = (buf["rewards"] if rewards is None else rewards).tolist()
        rows = [[self.global_step, p, c, r] for p, c, r in zip(buf["prompts"], buf["completions"], rewards)]
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("completions", columns=["step", "prompt", "completion", "reward"], data=rows)
        scored = [i for i, r in enumerate(rewards) if r == r]  # NaN: unscorable
        if scored:
            best = max(scored, key=lambda i: rewards[i])
            self.print(f"step {self.global_step} best completion (reward {rewards[best]:.3f}): {rows[best][2]!r}")
