"""Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"), with the options of TRL 1.16's GRPOTrainer
and RLOOTrainer: DAPO (Yu et al. 2025: clip-higher, token-level loss), Dr. GRPO (Liu et al. 2025: no std scaling,
constant normaliser), GSPO (Zheng et al. 2025: sequence-level importance ratio), CISPO (MiniMax-M1), SAPO, VESPO and
LUSPO loss types, INTELLECT-2's two-sided clip (``delta``), DeepSeek-V3.2's off-policy sequence mask, high-entropy
token selection (``top_entropy_quantile``), a fixed or adaptive entropy bonus (Skywork-OR1), GDPO's per-reward
normalisation (``multi_objective_aggregation``), TR-DPO-style reference sync, and RLOO (Ahmadian et al. 2024):
leave-one-out advantages (``advantage: rloo``) and, with ``loss_type: rloo`` too, TRL's own RLOO objective.

One training step of Lightning (one batch of P prompts) is one *generation round*:

1. sample ``num_generations`` (G) completions per prompt with ``src.rollout.generate`` (KV cache, eval mode, no
   autograd); the EOS is part of the completion and of its mask, everything after it is masked;
2. score them with the reward functions (``src.rewards.RewardScorer``; a completion no function scores gets NaN);
3. compute old per-token log-probs (only when the policy moves before a sample is used: ``num_iterations > 1`` or
   ``steps_per_generation > 1``, or for RLOO's KL penalty) and reference log-probs (only when ``beta > 0``), all
   from ``logits / temperature``;
4. turn rewards into per-sequence advantages within each group of G (``group_advantages``, ``rloo_advantages`` or
   ``decoupled_group_advantages``; unscorable completions get 0 and stay out of the baseline);
5. ``num_iterations`` passes (μ) over the buffer, each split into ``steps_per_generation`` optimizer steps, each
   accumulated over micro-batches of ``micro_batch_size`` completions, minimising ``src.losses.grpo_loss`` (or
   ``src.losses.rloo_loss``), minus the entropy bonus.

The ``dapo`` / ``cispo`` / ``vespo`` normaliser counts the active tokens of the whole optimizer step: every
micro-batch and every rank. Selecting RLOO: ``advantage: rloo`` keeps GRPO's per-token clipped loss (with its KL
term) on leave-one-out advantages; ``advantage: rloo`` plus ``loss_type: rloo`` is TRL's RLOOTrainer (one ratio per
sequence, ``β·Σ_t (log π_old − log π_ref)`` subtracted from the reward; ``normalize_advantages``,
``reward_clip_range``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from src.logprobs import completion_logps
from src.losses import (
    CLIPPED_GRPO_LOSS_TYPES,
    adaptive_entropy_coef,
    decoupled_group_advantages,
    entropy_bonus_loss,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    masked_mean,
    masked_sum,
    nanstd,
    rloo_advantages,
    rloo_loss,
    sequence_kl_penalty,
)
from src.models import ReferenceSync
from src.modules import check_positive
from src.modules.online import OnlineModule
from src.rollout import SamplingConfig

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo", "rloo"]
# Loss types whose value is a mean over the micro-batch: accumulation weights each by its share of the step's rows.
MEAN_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "sapo", "luspo", "rloo")


class GRPO(OnlineModule):
    """GRPO and its variants (manual optimization). Option names and defaults are TRL 1.16's ``GRPOConfig`` /
    ``RLOOConfig`` (``epsilon`` is ``epsilon_low`` here); combinations that mean nothing fail at construction.

    Args (sampling, rewards, ``micro_batch_size``, ``max_grad_norm``: :class:`~src.modules.online.OnlineModule`):
        beta: KL coefficient (0 like TRL ≥ 0.19: no reference model is loaded); ``kl``: estimator k1 | k2 | k3 (the
            per-token loss term; ``loss_type: rloo`` always subtracts the summed k1 from the reward, as TRL's RLOO).
        epsilon_low / epsilon_high: clip range ``[1 − ε_low, 1 + ε_high]`` (clip-higher when ε_high > ε_low); for
            ``cispo`` ε_high is the absolute cap of the weight (MiniMax-M1 / ScaleRL: 5.0).
        loss_type: ``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo`` | ``cispo`` | ``sapo`` | ``vespo`` | ``luspo`` (see
            ``src.losses.grpo_loss``) | ``rloo`` (``src.losses.rloo_loss``; needs ``advantage: rloo``).
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio is capped at δ (> 1 + ε_high); None = off.
        sapo_temperature_pos / sapo_temperature_neg: SAPO's gate temperatures for A > 0 / A ≤ 0.
        vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg: VESPO's gamma-weight shape per sign of A.
        scale_rewards: ``group`` | ``batch`` | ``none`` (Dr. GRPO); ``advantage``: ``grpo`` | ``rloo``.
        multi_objective_aggregation: ``sum_then_normalize`` (weighted sum of the reward functions, then the group
            normalisation) | ``normalize_then_sum`` (GDPO: each function normalised per group, then summed and
            normalised over the batch; ``scale_rewards`` does not apply).
        normalize_advantages / reward_clip_range: RLOO's batch whitening of the advantages (``advantage: rloo``) and
            clamp of the total reward to ``[min, max]`` before the KL penalty and the advantages.
        num_iterations: μ, passes over each generation buffer (> 1 is off-policy reuse with a real clipped ratio).
        steps_per_generation: optimizer steps per generation buffer (the buffer is split into this many parts).
        mask_truncated_completions: completions without EOS get no loss (DAPO).
        importance_sampling_level: ``token`` | ``sequence`` (GSPO; ``luspo`` is meant for it, ``vespo`` for
            ``token``: TRL's warnings are repeated here).
        off_policy_mask_threshold: DeepSeek-V3.2's δ: sequences with A < 0 whose mean KL from the sampling policy
            exceeds it get no policy loss; None = off.
        top_entropy_quantile: ρ (Wang et al. 2025): only the top-ρ fraction of tokens by entropy (per micro-batch,
            all ranks) get a policy loss; 1 = all.
        entropy_coef: entropy bonus ``−c · mean_t H_t`` over the policy-loss tokens (0 = off).
        use_adaptive_entropy / entropy_coef_min / entropy_coef_max / entropy_coef_delta / entropy_target: Skywork-OR1's
            controller: ``c ± δ`` after each optimizer step as the step's entropy is below / above the target, and
            the bonus applies only while the previous step's entropy was at or below it (checkpointed).
        sync_ref_model / ref_model_mixup_alpha / ref_model_sync_steps: TR-DPO's reference update
            ``θ_ref ← α·θ + (1 − α)·θ_ref`` after every ``ref_model_sync_steps``-th optimizer step (needs β > 0 and a
            full model, not LoRA; checkpointed).
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
        loss_type: LossType = "dapo",
        delta: float | None = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        scale_rewards: Literal["group", "batch", "none"] = "group",
        advantage: Literal["grpo", "rloo"] = "grpo",
        multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
        normalize_advantages: bool = False,
        reward_clip_range: tuple[float, float] | None = None,
        num_iterations: int = 1,
        steps_per_generation: int = 1,
        mask_truncated_completions: bool = False,
        importance_sampling_level: Literal["token", "sequence"] = "token",
        off_policy_mask_threshold: float | None = None,
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
        use_adaptive_entropy: bool = False,
        entropy_coef_min: float = 0.0,
        entropy_coef_max: float = 1.0,
        entropy_coef_delta: float = 0.005,
        entropy_target: float = 0.2,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        check_options(self.hparams, has_rewards=self.rewards is not None)
        self.needs_reference = beta > 0
        self.entropy_bonus = entropy_coef != 0.0 or use_adaptive_entropy
        # Controller state (checkpointed): the coefficient, and the entropy of the last optimizer step (inf: the first
        # step of an adaptive run applies no bonus, as TRL's).
        self.entropy_coef = float(entropy_coef)
        self.last_entropy = math.inf
        # TR-DPO's reference update after optimizer steps (checkpointed); a buffer's reference log-probs are those of
        # its generation round, as in TRL, so an update takes effect from the next round
        self.sync_reference = ReferenceSync(ref_model_sync_steps if sync_ref_model else 0, ref_model_mixup_alpha)

    def check_batch_size(self, batch_size: int) -> None:
        self.split_check(batch_size, "steps_per_generation", self.hparams.steps_per_generation)

    # -- advantages and log-probs (rollout, sampling and scoring: OnlineModule) ---------------------------------------
    def advantages(self, rewards: Tensor, buf: dict[str, Any] | None = None) -> Tensor:
        """Per-sequence advantages ``[B]`` of the buffer's rewards (NaN = unscorable: advantage 0, not in any
        baseline); for ``loss_type: rloo`` with β > 0 the reward first loses ``β·Σ_t (log π_old − log π_ref)``."""
        h = self.hparams
        g = h.num_generations
        if h.multi_objective_aggregation == "normalize_then_sum":
            return decoupled_group_advantages(buf["rewards_per_func"], self.rewards.weights, g)
        if h.reward_clip_range is not None:
            rewards = rewards.clamp(min=h.reward_clip_range[0], max=h.reward_clip_range[1])
        if h.loss_type == "rloo" and h.beta > 0:
            rewards = rewards - h.beta * buf["seq_kl"].to(rewards.dtype)
        if h.advantage == "rloo":
            return rloo_advantages(rewards, g, normalize=h.normalize_advantages)
        return group_advantages(rewards, g, scale=h.scale_rewards)

    def token_logps(
        self, buf: dict[str, Any], rows: slice | Tensor, with_entropy: bool = False, entropy_grad: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token policy log-probs (and entropies) of ``rows``; logits are divided by the sampling temperature.
        The generations of a prompt may run their shared prompt once (``accel`` feature ``prefix_sharing``)."""
        ids, attn, mask = buf["input_ids"][rows], buf["attention_mask"][rows], buf["completion_mask"][rows]
        t, kw = self.sampling.temperature or 1.0, dict(with_entropy=with_entropy, entropy_grad=entropy_grad)
        return completion_logps(self.model, ids, attn, mask, temperature=t, accel=self.accel, **kw)

    def ref_token_logps(self, buf: dict[str, Any], rows: slice | Tensor) -> Tensor:
        """Per-token reference log-probs of ``rows`` (no autograd); the frozen copy shares prompts like the policy.
        Logits are divided by the sampling temperature, as the policy's (and TRL's): at step 0 the KL is exactly 0."""
        ids, attn, mask = buf["input_ids"][rows], buf["attention_mask"][rows], buf["completion_mask"][rows]
        return self.reference_logps(ids, attn, mask, temperature=self.sampling.temperature or 1.0)

    # -- the step -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        buf = self.rollout(batch)
        n = buf["input_ids"].shape[0]
        loss_mask = buf["completion_mask"].clone()
        if h.mask_truncated_completions:
            loss_mask[buf["is_truncated"]] = 0
        buf["loss_mask"] = loss_mask
        reuse = h.num_iterations > 1 or h.steps_per_generation > 1
        rloo_kl = h.loss_type == "rloo" and h.beta > 0
        chunks = list(self._chunks(n, h.micro_batch_size))
        with torch.no_grad():
            sampling = torch.cat([self.token_logps(buf, s)[0] for s in chunks]) if reuse or rloo_kl else None
            buf["old_logps"] = sampling if reuse else None
            buf["ref_logps"] = torch.cat([self.ref_token_logps(buf, s) for s in chunks]) if h.beta > 0 else None
            if rloo_kl:  # RLOO: the KL of the sampling policy to the reference is part of the reward
                buf["seq_kl"] = sequence_kl_penalty(sampling, buf["ref_logps"], loss_mask)
                buf["rloo_kl"] = masked_sum(sampling - buf["ref_logps"], loss_mask) / loss_mask.sum().clamp(min=1)
        adv = self.advantages(buf["rewards"], buf)

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
        rewards = buf["rewards"]  # NaN where unscorable: the metric means skip them
        g = h.num_generations
        group_std = nanstd(rewards.view(-1, g), dim=-1) if g > 1 else rewards.new_zeros(1)
        metrics = {
            "reward": rewards,
            "reward_std": group_std,
            "frac_reward_zero_std": (group_std < 1e-6).float(),
            "completions/mean_length": lengths,
            "completions/clipped_ratio": buf["is_truncated"].float(),
            **{k: torch.stack(v).reshape(-1) for k, v in step_metrics.items()},
            **{k: v.reshape(1) for k, v in buf["reward_metrics"].items()},
        }
        if "rloo_kl" in buf:
            metrics["kl"] = buf["rloo_kl"].reshape(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        # this step's mean for the progress bar (if any); loggers get LogProbMetrics' window mean of the same key
        trainer = self.attached_trainer()
        if trainer is not None and trainer.progress_bar_callback is not None:
            self.log("train/reward", rewards.nanmean(), prog_bar=True, logger=False, batch_size=n)
        self.maybe_log_completions(buf)
        num_tokens = int(buf["attention_mask"].sum())
        return self.step_output(loss.detach(), metrics, num_tokens=num_tokens, num_samples=n)

    def _optimizer_step(self, buf: dict[str, Any], adv: Tensor, rows: slice, opt) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimizer step over ``rows`` of the buffer, accumulated over micro-batches."""
        h = self.hparams
        mask = buf["loss_mask"][rows]
        num_items = self._global_sum(mask.sum())
        # DDP averages gradients over ranks, so each rank normalises by the global count / world size.
        num_items = num_items.float().clamp(min=1) / self._world()
        # the entropy bonus of this step: TRL's adaptive gate uses the entropy of the previous optimizer step
        coef = self.entropy_coef
        if h.use_adaptive_entropy and not self.last_entropy <= h.entropy_target:
            coef = 0.0
        window = torch.zeros(2, device=self.device)  # entropy sum and token count over the step (adaptive control)
        total = policy_total = torch.zeros((), device=self.device)
        acc: dict[str, Tensor] = {}
        n_rows = mask.shape[0]
        for s in self._chunks(n_rows, h.micro_batch_size):
            idx = torch.arange(rows.start, rows.stop, device=self.device)[s]
            share = (s.stop - s.start) / n_rows
            logps, entropy = self.token_logps(buf, idx, with_entropy=True, entropy_grad=self.entropy_bonus)
            m = buf["loss_mask"][idx]
            old = logps.detach() if buf["old_logps"] is None else buf["old_logps"][idx]
            token_mask = None
            if h.top_entropy_quantile < 1.0:
                ent = entropy.detach()
                token_mask = high_entropy_mask(ent, m, h.top_entropy_quantile, pool=self._gather_pool(ent[m.bool()]))
            if h.loss_type == "rloo":
                loss, metrics = rloo_loss(
                    logps, old, adv[idx], m, epsilon_low=h.epsilon_low, epsilon_high=h.epsilon_high
                )
            else:
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
                    delta=h.delta,
                    sapo_temperature_pos=h.sapo_temperature_pos,
                    sapo_temperature_neg=h.sapo_temperature_neg,
                    vespo_k_pos=h.vespo_k_pos,
                    vespo_lambda_pos=h.vespo_lambda_pos,
                    vespo_k_neg=h.vespo_k_neg,
                    vespo_lambda_neg=h.vespo_lambda_neg,
                    off_policy_mask_threshold=h.off_policy_mask_threshold,
                    token_mask=token_mask,
                )
            if h.loss_type in MEAN_LOSS_TYPES:
                loss = loss * share  # per-micro-batch means -> mean over the step's rows
            if self.entropy_bonus:
                effective = m if token_mask is None else token_mask
                policy_total = policy_total + loss.detach()
                loss = loss + entropy_bonus_loss(entropy, effective, coef) * share
                ent = entropy.detach()
                window += torch.stack([masked_sum(ent, effective), effective.sum().to(window.dtype)])
            self.check_finite(loss, "GRPO loss")
            self.manual_backward(loss)
            total = total + loss.detach()
            metrics["entropy"] = masked_mean(entropy.detach(), m)  # over the loss tokens (TRL: kept completions)
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32) * share
        if h.max_grad_norm:
            self.clip_grad_norm(opt, h.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if h.use_adaptive_entropy:
            window = self._global_sum(window)
            self.last_entropy = float(window[0] / window[1].clamp(min=1))
            self.entropy_coef = adaptive_entropy_coef(
                self.entropy_coef,
                self.last_entropy,
                target=h.entropy_target,
                delta=h.entropy_coef_delta,
                coef_min=h.entropy_coef_min,
                coef_max=h.entropy_coef_max,
            )
        if self.entropy_bonus:  # TRL's names: the loss without the bonus, and the coefficient after this step
            acc["policy_loss"] = policy_total.float()
            acc["entropy_coef"] = torch.tensor(self.entropy_coef)
        self.sync_reference(self.ref_model, self.model, self.global_step)
        return total, acc

    # -- distributed helpers, reference sync, checkpoints ---------------------------------------------------------
    def _world(self) -> int:
        return self.trainer.world_size if self.attached_trainer() is not None else 1

    def _global_sum(self, x: Tensor) -> Tensor:
        """``x`` summed over ranks (itself on one process)."""
        if self._world() > 1 and dist.is_available() and dist.is_initialized():
            x = x.clone()
            dist.all_reduce(x)
        return x

    def _gather_pool(self, values: Tensor) -> Tensor:
        """Every rank's ``values`` (1-d, of any length) concatenated: the pool of TRL's entropy quantile."""
        if not (self._world() > 1 and dist.is_available() and dist.is_initialized()):
            return values
        sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(self._world())]
        dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device))
        longest = int(max(int(x) for x in sizes))
        padded = torch.full((longest,), -1e9, dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(self._world())]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(k)] for p, k in zip(parts, sizes)])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.sync_reference.save(checkpoint, self._ref)
        if self.entropy_bonus:
            checkpoint["entropy_control"] = {"entropy_coef": self.entropy_coef, "last_entropy": self.last_entropy}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.sync_reference.load(checkpoint, self._ref)
        state = checkpoint.get("entropy_control")
        if state is not None:
            self.entropy_coef, self.last_entropy = float(state["entropy_coef"]), float(state["last_entropy"])

    # -- validation (held-out statistics and tables: OnlineModule) ----------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        sampling = SamplingConfig(**{**vars(self.sampling), "num_generations": 1})
        buf = self.rollout(batch, sampling, stage="val")
        rewards = buf["rewards"]  # NaN where unscorable
        self.log("val/reward", rewards.nanmean(), prog_bar=True, batch_size=rewards.numel(), sync_dist=True)
        return self.step_output(
            rewards.nanmean(), {"reward": rewards, **{k: v.reshape(1) for k, v in buf["reward_metrics"].items()}}
        )


# ---------------------------------------------------------------------------------------------------- the options
def check_options(h: Any, *, has_rewards: bool) -> None:
    """Refuse, at construction, the option combinations that mean nothing (each error names both options); repeat
    TRL's warnings on the importance-sampling level of ``luspo`` / ``vespo`` / token-sum losses."""
    lt = h.loss_type
    check_positive("beta", h.beta, zero_ok=True)
    check_positive("num_iterations", h.num_iterations)
    check_positive("steps_per_generation", h.steps_per_generation)
    if h.num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (a group to compare completions in), got {h.num_generations}")
    if lt == "rloo" and h.advantage != "rloo":
        raise ValueError("loss_type='rloo' is TRL's RLOO objective and needs advantage='rloo' (leave-one-out baseline)")
    if lt == "rloo" and h.importance_sampling_level != "token":
        raise ValueError("loss_type='rloo' has its own sequence ratio; importance_sampling_level must stay 'token'")
    if h.normalize_advantages and h.advantage != "rloo":
        raise ValueError("normalize_advantages is RLOO's batch whitening and needs advantage='rloo'")
    if h.delta is not None:
        if lt not in CLIPPED_GRPO_LOSS_TYPES:
            raise ValueError(
                f"delta (two-sided clipping) needs a clipped loss_type {CLIPPED_GRPO_LOSS_TYPES}, not {lt!r}"
            )
        eps_high = h.epsilon_low if h.epsilon_high is None else h.epsilon_high
        if h.delta <= 1 + eps_high:
            warnings.warn(
                f"delta={h.delta} is meant to exceed 1 + epsilon_high = {1 + eps_high} (INTELLECT-2)", stacklevel=3
            )
    if lt == "cispo" and h.epsilon_high is None:
        raise ValueError("loss_type='cispo' needs epsilon_high, CISPO's absolute cap of the weight (e.g. 5.0)")
    if h.off_policy_mask_threshold is not None:
        if lt == "rloo":
            raise ValueError("off_policy_mask_threshold cannot be combined with loss_type='rloo' (TRL's RLOO has none)")
        if h.off_policy_mask_threshold < 0:
            raise ValueError(f"off_policy_mask_threshold must be >= 0, got {h.off_policy_mask_threshold}")
    if not 0.0 <= h.top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {h.top_entropy_quantile}")
    if h.top_entropy_quantile < 1.0 and lt == "rloo":
        raise ValueError("top_entropy_quantile cannot be combined with loss_type='rloo' (a per-sequence objective)")
    if h.use_adaptive_entropy and not h.entropy_coef_min <= h.entropy_coef <= h.entropy_coef_max:
        raise ValueError(
            f"use_adaptive_entropy needs entropy_coef_min <= entropy_coef <= entropy_coef_max, got "
            f"{h.entropy_coef_min}, {h.entropy_coef}, {h.entropy_coef_max}"
        )
    if h.multi_objective_aggregation == "normalize_then_sum":
        if h.advantage != "grpo":
            raise ValueError("multi_objective_aggregation='normalize_then_sum' (GDPO) needs advantage='grpo'")
        if h.scale_rewards != "group":
            raise ValueError(
                "scale_rewards has no effect with multi_objective_aggregation='normalize_then_sum' (GDPO normalises "
                "each reward per group, then the sum over the batch): leave scale_rewards at 'group'"
            )
        if h.reward_clip_range is not None:
            raise ValueError(
                "reward_clip_range clips the summed reward; multi_objective_aggregation must then be "
                "'sum_then_normalize'"
            )
        if not has_rewards:
            raise ValueError("multi_objective_aggregation='normalize_then_sum' needs reward_funcs")
    if h.reward_clip_range is not None and not h.reward_clip_range[0] <= h.reward_clip_range[1]:
        raise ValueError(f"reward_clip_range must be (min, max) with min <= max, got {h.reward_clip_range}")
    if h.sync_ref_model:
        if h.beta == 0:
            raise ValueError("sync_ref_model=True needs beta > 0: with beta=0 there is no reference model to update")
        if h.lora is not None:
            raise ValueError(
                "sync_ref_model=True cannot be combined with lora: the LoRA reference is the policy with its adapter "
                "disabled, so there is no separate reference to update"
            )
        if h.ref_model_sync_steps < 1 or not 0.0 <= h.ref_model_mixup_alpha <= 1.0:
            raise ValueError(
                f"sync_ref_model needs ref_model_sync_steps >= 1 and ref_model_mixup_alpha in [0, 1], got "
                f"{h.ref_model_sync_steps}, {h.ref_model_mixup_alpha}"
            )
    level = h.importance_sampling_level
    if lt == "luspo" and level != "sequence":
        warnings.warn(
            "loss_type='luspo' is meant for importance_sampling_level='sequence' (the paper's setup; TRL warns too)",
            stacklevel=3,
        )
    if lt == "vespo" and level != "token":
        warnings.warn(
            "loss_type='vespo' computes its sequence weights itself: importance_sampling_level should be 'token'",
            stacklevel=3,
        )
    if level == "sequence" and lt in ("bnpo", "dr_grpo", "dapo", "cispo"):
        warnings.warn(
            f"importance_sampling_level='sequence' with loss_type={lt!r} sums per-token terms, which weights each "
            "sequence by its length; GSPO's setup is loss_type='grpo' (TRL warns too)",
            stacklevel=3,
        )
