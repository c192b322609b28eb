"""Proximal Policy Optimization for language models with a learned critic (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback" (InstructGPT); Ziegler et al. 2019, "Fine-tuning language models
from human preferences"), implemented after Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (TRL's
PPOTrainer), plus two critic-free estimators on the same rollout loop: RLOO (Ahmadian et al. 2024, "Back to Basics:
Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs") and REINFORCE++ (Hu 2025,
"REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models").

One training step of Lightning (one batch of P prompts) is one *rollout*:

1. sample ``num_generations`` (G, default 1) completions per prompt with ``src.rollout.generate`` (the EOS is part of
   the completion and of its mask; everything after it is masked);
2. score each completion once, at its last real token: a trained reward model (``reward_model_path``, scored in
   process on the policy's tokens with ``src.modules.reward.sequence_scores``) and/or rule-based ``reward_funcs``
   (as GRPO); completions without EOS lose ``missing_eos_penalty``;
3. without gradient: per-token log-probs of the sampling policy (logits divided by the sampling temperature), of the
   frozen reference, and values of the critic;
4. per-token rewards ``r_t = −β·KL_t`` plus the score on the last token (``kl_penalized_rewards``, k1 by default), so
   ``Σ_t r_t = score − β·Σ_t KL_t``; β is fixed or follows the adaptive controller of Ziegler et al. (``kl_target``,
   ``kl_horizon``: ``β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)`` after every rollout, saved in checkpoints);
   optionally whitened over the batch's tokens, mean kept (``whiten_rewards``, TRL's PPOTrainer); a completion that
   no reward source scores (every reward function returned None, no reward model) leaves the losses, the
   advantage statistics and the RLOO baselines (advantage 0, as GRPO and TRL);
5. advantages, by ``advantage_estimator``:
   ``gae``: GAE(γ, λ) on the critic's values, returns = advantages + values (Schulman et al. 2016);
   ``rloo``: per sequence ``Σ_t r_t`` minus the mean of the other G − 1 samples of its prompt, on every token;
   ``reinforce_pp``: token-level returns ``Σ_{s≥t} γ^{s−t} r_s`` (γ = 1 by default), whitened across the batch;
   then whitened over the completion tokens of the batch (``whiten_advantages``, Huang et al. 2024);
6. ``ppo_epochs`` passes over the rollout in ``num_mini_batches`` shuffled mini-batches, each one optimizer step
   accumulated over micro-batches of ``micro_batch_size`` completions, minimising the clipped policy loss
   (``ppo_policy_loss``, optional ``dual_clip``) plus ``vf_coef`` × the clipped value loss (``ppo_value_loss``).
   Micro-batch losses are weighted by their share of the mini-batch's tokens, so the gradient is the same however a
   mini-batch is split.

The critic is a separate model (``critic: separate``; a sequence classifier whose head reads every position,
initialised from ``critic_model_name_or_path``, else from the reward model as in TRL, else from the policy with a
zero head) or a linear value head on the policy's own hidden states (``critic: shared``). Policy and critic share one
optimizer, or the critic gets its own (``critic_optimizer``). Dropout is off in policy and critic.

Metrics follow TRL: ``objective/kl`` (Σ_t KL per sequence), ``objective/entropy`` (−Σ_t log π per sequence),
``objective/non_score_reward`` (−β·Σ_t KL), ``objective/rlhf_reward`` (score + non-score reward),
``objective/scores``, ``objective/kl_coef``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
``policy/entropy_avg``, ``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg`` (TRL's name for the *value*
clip fraction), ``critic/vf_explained_var``, ``completions/mean_length``, ``completions/clipped_ratio``.
``trainer.max_steps`` counts optimizer steps: each rollout makes ``ppo_epochs × num_mini_batches`` of them (twice as
many with a separate ``critic_optimizer``: Lightning counts every optimizer's step).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from src.logprobs import completion_hidden, completion_logps, logps_from_hidden, scatter_tokens, unwrap
from src.losses import (
    adaptive_kl_update,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)
from src.models import disable_dropout
from src.modules import check_positive
from src.modules.online import OnlineModule
from src.modules.reward import SEQUENCE_CLASSIFIER, load_reward_model, score_head, sequence_scores
from src.rollout import SamplingConfig


def apply_missing_eos_penalty(scores: Tensor, is_truncated: Tensor, penalty: float | None) -> Tensor:
    """``score − penalty`` for completions that ended without EOS (TRL's ``missing_eos_penalty``); others unchanged."""
    if not penalty:
        return scores
    return scores - penalty * is_truncated.to(scores.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var(R − V) / Var(R)`` over the masked tokens: 1 is a perfect critic, ≤ 0 no better than a constant."""
    var = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var.clamp(min=1e-8)


class PPO(OnlineModule):
    """PPO with a critic, RLOO and REINFORCE++ (manual optimization).

    Args (sampling, rewards, ``micro_batch_size``, ``max_grad_norm``: :class:`~src.modules.online.OnlineModule`;
    ``reward_funcs: null`` needs ``reward_model_path``):
        reward_model_path: a sequence-classification directory (e.g. ``runs/rm/hf`` from ``configs/rm.yaml``) that
            shares the policy's tokenizer; scored in process, added to the reward functions' total.
        missing_eos_penalty: subtracted from the score of completions without EOS (None = off).
        advantage_estimator: ``gae`` (critic) | ``rloo`` (needs ``num_generations ≥ 2``) | ``reinforce_pp``.
        critic: ``separate`` (own model) | ``shared`` (value head on the policy backbone); used by ``gae`` only.
        critic_model_name_or_path: initialise a separate critic from this directory (default: the reward model,
            else the policy).
        critic_optimizer: the critic's own optimizer (e.g. AdamW with another lr); None = one joint optimizer.
        num_generations: completions per prompt (G; default 1 here).
        kl_coef: β, the initial coefficient with ``kl_target``; ``kl_estimator``: k1 (TRL) | k2 | k3.
        kl_target / kl_horizon: adaptive KL controller (Ziegler et al. 2019); ``kl_target=None`` keeps β fixed.
        gamma / lam: discount and GAE λ.
        whiten_advantages: whiten advantages over the batch's completion tokens (always on for REINFORCE++).
        whiten_rewards: whiten the per-token rewards (score + KL penalty) over the batch's completion tokens before
            the advantages, keeping their mean (TRL's ``whiten_rewards``; Huang et al. 2024).
        ppo_epochs: passes over each rollout; ``num_mini_batches``: optimizer steps per pass.
        clip_eps / dual_clip: policy ratio clip range and the dual-clip bound c > 1 (Ye et al. 2020).
        vf_coef / vf_clip: value-loss weight and clip range of the value change (None = unclipped).
    """

    data_kind = "prompt"
    summary_metrics = ("train/objective/scores", "train/objective/kl", "train/objective/rlhf_reward")

    def __init__(
        self,
        *args: Any,
        reward_model_path: str | None = None,
        missing_eos_penalty: float | None = None,
        advantage_estimator: Literal["gae", "rloo", "reinforce_pp"] = "gae",
        critic: Literal["separate", "shared"] = "separate",
        critic_model_name_or_path: str | None = None,
        critic_optimizer: OptimizerCallable | None = None,
        num_generations: int = 1,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k2", "k3"] = "k1",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        whiten_rewards: bool = False,
        ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        clip_eps: float = 0.2,
        dual_clip: float | None = None,
        vf_coef: float = 0.1,
        vf_clip: float | None = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, num_generations=num_generations, **kwargs)
        self.save_hyperparameters(ignore=["critic_optimizer"])
        if self.rewards is None and reward_model_path is None:
            raise ValueError("PPO needs a reward: give reward_funcs, reward_model_path, or both")
        if advantage_estimator == "rloo" and num_generations < 2:
            raise ValueError("advantage_estimator='rloo' needs num_generations >= 2 (a leave-one-out baseline)")
        check_positive("kl_coef", kl_coef, zero_ok=True)
        if ppo_epochs < 1 or num_mini_batches < 1:
            raise ValueError(f"ppo_epochs and num_mini_batches must be >= 1, got {ppo_epochs}, {num_mini_batches}")
        if kl_target is not None and (kl_target <= 0 or kl_horizon <= 0):
            raise ValueError(f"kl_target and kl_horizon must be > 0, got {kl_target}, {kl_horizon}")
        self.needs_reference = kl_coef > 0 or kl_target is not None
        self.critic_optimizer_factory = critic_optimizer
        self.kl_coef = float(kl_coef)  # the controller's state (saved in checkpoints)
        self.critic: nn.Module | None = None
        self.value_head: nn.Linear | None = None
        self._critic_init: nn.Module | None = None
        self.set_reward_model(None)

    def check_batch_size(self, batch_size: int) -> None:
        self.split_check(batch_size, "num_mini_batches", self.hparams.num_mini_batches)

    # -- models: policy + reference (base), reward model, critic ----------------------------------------------------
    def build_model(self) -> nn.Module:
        policy = super().build_model()
        h = self.hparams
        if h.advantage_estimator == "gae" and h.critic == "separate":
            path = h.critic_model_name_or_path or h.reward_model_path
            if path is not None:
                self._critic_init = load_reward_model(path, torch_dtype=h.torch_dtype)
            else:  # the policy's backbone (taken before LoRA wraps it) under a fresh zero head
                import transformers

                cfg = copy.deepcopy(policy.config)
                cfg.num_labels = 1
                critic = getattr(transformers, SEQUENCE_CLASSIFIER).from_config(cfg)
                critic.get_decoder().load_state_dict(policy.get_decoder().state_dict())
                nn.init.zeros_(score_head(critic).weight)
                self._critic_init = critic.to(dtype=next(policy.parameters()).dtype)
        return policy

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        h = self.hparams
        if h.reward_model_path is not None:
            self.set_reward_model(load_reward_model(h.reward_model_path, torch_dtype=h.torch_dtype))
            self._check_reward_tokenizer(h.reward_model_path)
        if h.advantage_estimator != "gae":
            return
        if h.critic == "shared":
            cfg = unwrap(self.model).config
            if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
                raise ValueError("critic='shared' needs a model without logit soft-capping/scaling; use 'separate'")
            self.value_head = nn.Linear(cfg.hidden_size, 1).to(next(self.model.parameters()))
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        else:
            critic, self._critic_init = self._critic_init, None
            if not h.dropout:
                disable_dropout(critic)
            if h.gradient_checkpointing:
                critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.critic = critic

    def set_reward_model(self, model: nn.Module | None) -> None:
        """Hold the frozen reward model outside the module tree (like the reference: not trained, not checkpointed)."""
        if model is not None:
            if model.config.num_labels != 1:
                raise ValueError(f"reward model must have num_labels=1, has {model.config.num_labels}")
            model.requires_grad_(False).eval()
        object.__setattr__(self, "_reward_model", model)

    @property
    def reward_model(self) -> nn.Module | None:
        if self._reward_model is not None and self.model is not None:
            p, q = next(self.model.parameters()), next(self._reward_model.parameters())
            if q.device != p.device:
                self._reward_model.to(p.device)
        return self._reward_model

    def _check_reward_tokenizer(self, path: str) -> None:
        """The reward model reads the policy's token ids: refuse a reward model with another vocabulary."""
        if self.tokenizer is None or not (Path(path) / "tokenizer_config.json").exists():
            return
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(path).get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(
                f"reward model {path!r} has another tokenizer than the policy; score it from text instead with "
                "reward_funcs=[{class_path: src.rewards.RewardModelScorer, init_args: {path: ...}}]"
            )

    def optimizer_parameters(self) -> list[nn.Parameter]:
        params = super().optimizer_parameters()
        return params if self.critic_optimizer_factory is not None else params + self.critic_parameters()

    def critic_parameters(self) -> list[nn.Parameter]:
        head = self.critic if self.critic is not None else self.value_head
        return [p for p in head.parameters() if p.requires_grad] if head is not None else []

    def configure_optimizers(self) -> Any:
        if self.critic_optimizer_factory is None or not self.critic_parameters():
            return super().configure_optimizers()
        total = max(1, int(self.trainer.estimated_stepping_batches) // 2) if self.attached_trainer() else 1
        policy_opt = self.build_optimizer(self.optimizer_factory, super().optimizer_parameters())
        critic_opt = self.build_optimizer(self.critic_optimizer_factory, self.critic_parameters())
        return [
            {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler(opt, total), "interval": "step"}}
            for opt in (policy_opt, critic_opt)
        ]

    # -- rollout and scoring ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self, batch: dict[str, Any], sampling: SamplingConfig | None = None, stage: str = "train"
    ) -> dict[str, Any]:
        """Sample and score (reward functions + reward model − EOS penalty); ``rewards`` holds the scores ``[B]``."""
        buf = super().rollout(batch, sampling, stage)
        scores = buf["rewards"]
        if self.reward_model is not None:
            rm = torch.cat(
                [
                    sequence_scores(self.reward_model, buf["input_ids"][s], buf["attention_mask"][s])
                    for s in self._chunks(scores.numel(), self.hparams.micro_batch_size)
                ]
            )
            # a reward model scores every sample: reward functions that all returned None then add nothing
            scores = torch.nan_to_num(scores, nan=0.0) + rm.to(scores.dtype)
            buf["reward_metrics"]["rewards/reward_model/mean"] = rm.mean()
        buf["rewards"] = apply_missing_eos_penalty(scores, buf["is_truncated"], self.hparams.missing_eos_penalty)
        return buf

    def forward_tokens(
        self, buf: dict[str, Any], rows: Tensor | slice, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Policy log-probs, entropies (or None) and values (None without a critic) ``[b, C]`` of the completion
        columns of ``rows``; logits are divided by the sampling temperature."""
        ids, attn, cmask = buf["input_ids"][rows], buf["attention_mask"][rows], buf["completion_mask"][rows]
        temperature = self.sampling.temperature or 1.0
        values = None
        if self.value_head is not None:  # one backbone pass feeds the LM head and the value head
            hidden, target = completion_hidden(self.model, ids, attn, cmask, self.accel)
            logps, entropy = logps_from_hidden(
                self.model, hidden, ids, target, temperature=temperature, with_entropy=with_entropy
            )
            values = scatter_tokens(self.value_head(hidden).squeeze(-1).float(), target)
        else:
            logps, entropy = completion_logps(
                self.model, ids, attn, cmask, temperature=temperature, with_entropy=with_entropy, accel=self.accel
            )
            if self.critic is not None:
                hidden, target = completion_hidden(self.critic, ids, attn, cmask, self.accel)
                values = scatter_tokens(score_head(self.critic)(hidden).squeeze(-1).float(), target)
        p = buf["prompt_len"]
        return logps[:, p:], None if entropy is None else entropy[:, p:], None if values is None else values[:, p:]

    # -- rewards and advantages -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, buf: dict[str, Any]) -> dict[str, Any]:
        """Add to the rollout buffer (completion columns only): ``mask``, ``loss_mask`` (``mask`` without the
        unscorable completions, whose score is NaN), ``old_logps``, ``ref_logps``, ``old_values``, per-token
        ``token_rewards`` and ``kl``, ``advantages`` and ``returns``."""
        h = self.hparams
        n, p = buf["input_ids"].shape[0], buf["prompt_len"]
        mask = buf["completion_mask"][:, p:]
        scorable = ~torch.isnan(buf["rewards"])
        loss_mask = mask * scorable.unsqueeze(-1).to(mask.dtype)
        parts = [self.forward_tokens(buf, s) for s in self._chunks(n, h.micro_batch_size)]
        old_logps = torch.cat([lp for lp, _, _ in parts])
        old_values = torch.cat([v for _, _, v in parts]) if parts[0][2] is not None else None
        if self.needs_reference:
            ids, attn, cmask = buf["input_ids"], buf["attention_mask"], buf["completion_mask"]
            temperature = self.sampling.temperature or 1.0
            ref_logps = torch.cat(
                [
                    self.reference_logps(ids[s], attn[s], cmask[s], temperature=temperature)[:, p:]
                    for s in self._chunks(n, h.micro_batch_size)
                ]
            )
        else:
            ref_logps = old_logps
        rewards, kl = kl_penalized_rewards(
            torch.nan_to_num(buf["rewards"], nan=0.0),
            old_logps,
            ref_logps,
            mask,
            beta=self.kl_coef,
            kind=h.kl_estimator,
        )
        if h.whiten_rewards:
            rewards = masked_whiten(rewards, loss_mask, shift_mean=False)
        advantages, returns = self.advantages(rewards, old_values, loss_mask, scorable)
        buf.update(
            mask=mask,
            loss_mask=loss_mask,
            old_logps=old_logps,
            ref_logps=ref_logps,
            old_values=old_values,
            token_rewards=rewards,
            kl=kl,
            advantages=advantages,
            returns=returns,
        )
        return buf

    def advantages(
        self, rewards: Tensor, values: Tensor | None, mask: Tensor, scorable: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Token advantages ``[B, C]`` and value targets (``None`` without a critic) for ``advantage_estimator``;
        rows outside ``scorable`` (``mask`` is 0 there) are left out of the RLOO baselines."""
        h = self.hparams
        returns = None
        if h.advantage_estimator == "gae":
            advantages, returns = gae(rewards, values, mask, gamma=h.gamma, lam=h.lam)
        elif h.advantage_estimator == "rloo":
            seq = rewards.sum(-1)
            if scorable is not None:
                seq = torch.where(scorable, seq, torch.full_like(seq, math.nan))
            advantages = rloo_advantages(seq, h.num_generations)[:, None] * mask
        else:  # reinforce_pp: discounted return-to-go = GAE with V = 0 and λ = 1
            advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=h.gamma, lam=1.0)
        if h.whiten_advantages or h.advantage_estimator == "reinforce_pp":
            advantages = masked_whiten(advantages, mask)
        return advantages, returns

    # -- the step ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        buf = self.prepare(self.rollout(batch))
        n = buf["input_ids"].shape[0]
        if n % h.num_mini_batches:
            raise ValueError(f"{n} completions do not split into num_mini_batches={h.num_mini_batches}")
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = [] if scheds is None else scheds if isinstance(scheds, list) else [scheds]
        # Mini-batch order from (run seed, step): reproducible, and identical after a resume.
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0")) * 1_000_003 + self.global_step
        gen = torch.Generator().manual_seed(seed % (2**63 - 1))
        size = n // h.num_mini_batches
        stats: dict[str, list[Tensor]] = {}
        for _ in range(h.ppo_epochs):
            perm = torch.randperm(n, generator=gen).to(self.device)
            for k in range(h.num_mini_batches):
                for key, v in self.update(buf, perm[k * size : (k + 1) * size], opts).items():
                    stats.setdefault(key, []).append(v)
                for sched in scheds:
                    sched.step()

        metrics = self.rollout_metrics(buf)
        metrics.update({k: torch.stack(v) for k, v in stats.items()})
        self.update_kl_coef(buf["kl"].sum(-1).mean(), n)
        loss = metrics["loss/policy_avg"].mean()
        if "loss/value_avg" in metrics:
            loss = loss + h.vf_coef * metrics["loss/value_avg"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.maybe_log_completions(buf)
        return self.step_output(loss, metrics, num_tokens=int(buf["attention_mask"].sum()), num_samples=n)

    def update(self, buf: dict[str, Any], rows: Tensor, opts: list) -> dict[str, Tensor]:
        """One optimizer step over ``rows`` of the buffer, accumulated over micro-batches (each weighted by its share
        of the rows' completion tokens: the gradient of the token mean over ``rows``)."""
        h = self.hparams
        n_tokens = buf["loss_mask"][rows].sum().clamp(min=1)
        acc: dict[str, Tensor] = {}
        for s in self._chunks(rows.numel(), h.micro_batch_size):
            idx = rows[s]
            mask = buf["loss_mask"][idx]
            weight = mask.sum() / n_tokens
            logps, entropy, values = self.forward_tokens(buf, idx, with_entropy=True)
            pg_loss, pg = ppo_policy_loss(
                logps, buf["old_logps"][idx], buf["advantages"][idx], mask, clip_eps=h.clip_eps, dual_clip=h.dual_clip
            )
            loss = pg_loss
            parts = {
                "loss/policy_avg": pg_loss.detach(),
                "policy/approxkl_avg": pg["approxkl"],
                "policy/clipfrac_avg": pg["clipfrac"],
                "policy/entropy_avg": masked_mean(entropy, mask),
            }
            if values is not None:
                old_values, returns = buf["old_values"][idx], buf["returns"][idx]
                vf_loss, vf = ppo_value_loss(values, old_values, returns, mask, clip_eps=h.vf_clip)
                loss = loss + h.vf_coef * vf_loss
                parts.update({"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf["vf_clipfrac"]})
            loss = loss * weight
            self.check_finite(loss, "PPO loss")
            self.manual_backward(loss)
            for k, v in parts.items():
                acc[k] = acc.get(k, 0.0) + v.float() * weight
        for opt in opts:
            if h.max_grad_norm:
                self.clip_grad_norm(opt, h.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return acc

    def rollout_metrics(self, buf: dict[str, Any]) -> dict[str, Tensor]:
        """Per-sequence objective statistics of the rollout (TRL's names)."""
        mask, kl = buf["mask"], buf["kl"]
        scores = buf["rewards"]
        non_score = (-self.kl_coef * kl).sum(-1)
        metrics = {
            "objective/scores": scores,
            "objective/kl": kl.sum(-1),
            "objective/entropy": -(buf["old_logps"] * mask).sum(-1),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": scores + non_score,
            "objective/kl_coef": scores.new_tensor([self.kl_coef]),
            "completions/mean_length": mask.sum(-1).float(),
            "completions/clipped_ratio": buf["is_truncated"].float(),
            **{k: v.reshape(1) for k, v in buf["reward_metrics"].items()},
        }
        if buf["returns"] is not None:
            ev = explained_variance(buf["old_values"], buf["returns"], buf["loss_mask"])
            metrics["critic/vf_explained_var"] = ev.reshape(1)
        return metrics

    def update_kl_coef(self, kl: Tensor, n: int) -> None:
        """Adaptive KL controller (Ziegler et al. 2019): one update per rollout from the mean per-sequence KL of all
        ranks, ``n_steps`` = completions in the global batch."""
        h = self.hparams
        if h.kl_target is None:
            return
        world = 1
        if self.attached_trainer() is not None:
            kl = self.trainer.strategy.reduce(kl.detach(), reduce_op="mean")
            world = self.trainer.world_size
        self.kl_coef = adaptive_kl_update(self.kl_coef, kl, target=h.kl_target, horizon=h.kl_horizon, n_steps=n * world)

    # -- validation and checkpoints ---------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        sampling = SamplingConfig(**{**vars(self.sampling), "num_generations": 1})
        buf = self.rollout(batch, sampling, stage="val")
        scores = buf["rewards"]  # NaN where unscorable: the metric means skip them
        metrics = {"objective/scores": scores, **{k: v.reshape(1) for k, v in buf["reward_metrics"].items()}}
        return self.step_output(scores.nanmean(), metrics)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.kl_coef = float(checkpoint.get("kl_coef", self.kl_coef))
