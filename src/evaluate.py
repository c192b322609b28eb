"""Evaluate a trained policy the way a paper reports it.

Pure metrics: :func:`pass_at_k` (Chen et al. 2021) and :func:`win_rate` (ties half). :class:`Evaluation` is the callback
behind ``python -m src predict`` (completions of held-out prompts -> ``predictions.jsonl``) and ``python -m src test``
(their rewards, accuracy, pass@k, length, KL and win rate against the reference -> ``test/*``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.logprobs import completion_logps, has_lm_head
from src.losses import masked_sum
from src.rewards import RewardModelScorer, RewardScorer
from src.rollout import SamplingConfig, generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` are correct (Chen et al. 2021, "Evaluating
    Large Language Models Trained on Code", eq. 1): ``1 − C(n−c, k) / C(n, k)``, computed as the stable product
    ``1 − Π_{i=n−c+1}^{n} (1 − k/i)``. Needs ``n ≥ k``; ``n − c < k`` gives 1."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (samples per prompt), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(samples: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``samples[i]`` are the correctness flags of problem ``i``'s ``n_i`` samples."""
    if not samples:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(pass_at_k(len(s), sum(bool(x) for x in s), k) for s in samples) / len(samples)


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> float:
    """Fraction of prompts where the policy's score beats the reference's, ties counted half (AlpacaEval's
    convention; TRL's ``WinRateCallback`` counts a judge's preference the same way)."""
    if len(policy) != len(reference) or not policy:
        raise ValueError(f"win_rate: need equally many (> 0) scores, got {len(policy)} and {len(reference)}")
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference))
    return wins / len(policy)


# ---------------------------------------------------------------------------------------- predict / test (the CLI)
class Evaluation(BasePredictionWriter):
    """Generation and scoring for ``python -m src predict`` and ``python -m src test`` (CLI group ``--eval.*``).

    ``predict`` writes one ``predictions.jsonl`` row per prompt × sample: ``index`` (the prompt's row), ``sample``,
    ``prompt``, ``completion``, ``num_tokens``, ``truncated``, ``logp`` and ``ref_logp`` (sequence log-probs under the
    policy and the reference, ``null`` without one), ``rewards`` (each reward function's value, ``null`` where it
    does not apply) and the row's other columns. Each rank writes its shard while it goes; rank 0 merges them in
    prompt order (Lightning's predict sampler gives every prompt to exactly one rank).
    ``test`` logs ``test/*``: the mean of each reward function and of their weighted total, ``accuracy`` (the mean
    of the first answer-checked function: one with the attribute ``answer_checked = True``, as
    ``src.rewards.accuracy``) and ``pass@k`` (unbiased, :func:`pass_at_k`, for each ``k ≤ num_samples``),
    ``completions/mean_length``, ``kl`` (mean of ``logp − ref_logp``, a sequence-level
    estimate of KL(π‖π_ref) under the policy's samples) and ``win_rate`` against the reference's own completions of
    the same prompts, by total reward, ties half. ``test_summary.md`` and ``test_summary.csv`` with the same numbers
    go next to the run; with W&B on, the completions are logged as the table ``test/completions``.
    During ``fit``, ``every_n_steps > 0`` computes the same metrics as ``eval/*`` on the first ``num_prompts``
    held-out prompts every ``every_n_steps`` optimizer steps, so accuracy or win rate vs step is a curve.

    Args:
        num_samples: completions per prompt.
        max_new_tokens / temperature / top_p / top_k: sampling; ``temperature: 0`` is greedy.
        reward_model_path: a reward model (sequence-classification directory, e.g. ``runs/rm/hf``) that judges the
            completions, alone or, when ``reward_funcs`` are given, beside them (last in ``reward_weights``).
        reward_funcs / reward_weights: reward functions (import paths, see ``src/rewards.py``); ``None`` = the
            module's own (GRPO, PPO), else none.
        k: the ``k`` of pass@k (those ≤ ``num_samples``; default ``[1, num_samples]``).
        reference_path: a model directory to compare with (win rate, KL) instead of the module's reference (the
            initial weights); required for jobs without one (SFT).
        output: the predictions file (default ``predictions.jsonl`` in the run directory).
        every_n_steps / num_prompts: evaluation during fit (0 = off) and its fixed held-out subset.
    """

    def __init__(
        self,
        num_samples: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        reward_funcs: list[str] | str | None = None,
        reward_weights: list[float] | None = None,
        reward_model_path: str | None = None,
        k: list[int] | None = None,
        reference_path: str | None = None,
        output: str | None = None,
        every_n_steps: int = 0,
        num_prompts: int = 32,
    ) -> None:
        super().__init__(write_interval="batch")
        self.sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_generations=num_samples,
        )
        self.k = sorted({1, num_samples} if k is None else set(k))
        if any(not 1 <= x <= num_samples for x in self.k):
            raise ValueError(f"eval.k: every k must lie in [1, eval.num_samples={num_samples}], got {self.k}")
        self.reward_funcs, self.reward_weights = reward_funcs, reward_weights
        self.reward_model_path = reward_model_path
        self.reference_path, self.output = reference_path, output
        self.scorer: RewardScorer | None = None
        self._reference: nn.Module | None = None
        self._rows: list[dict[str, Any]] = []
        self._shard: Path | None = None
        if every_n_steps < 0 or num_prompts < 1:
            raise ValueError(
                f"eval.every_n_steps must be >= 0 and eval.num_prompts >= 1, got {every_n_steps}, {num_prompts}"
            )
        self.every_n_steps, self.num_prompts = every_n_steps, num_prompts
        self._fit_batches: list[dict[str, Any]] = []
        self._last_step = -1

    # -- set-up ---------------------------------------------------------------------------------------------------
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start(trainer, pl_module, "predict")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start(trainer, pl_module, "test")

    def start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the model, resolve rewards and reference, start this rank's predictions shard."""
        self.prepare(trainer, pl_module, stage)
        self._rows = []
        out = self.predictions_path(trainer)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._shard = out.with_name(f"{out.stem}.rank{trainer.global_rank}.jsonl")
        self._shard.unlink(missing_ok=True)

    def prepare(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check that the model generates; resolve the reward functions and the reference."""
        if not has_lm_head(pl_module.model):
            raise ValueError(f"{type(pl_module).__name__} has no language-model head: {stage} generates completions")
        if getattr(pl_module, "tokenizer", None) is None:
            pl_module.tokenizer = trainer.datamodule.tokenizer
        funcs = [self.reward_funcs] if isinstance(self.reward_funcs, str) else self.reward_funcs
        if self.reward_model_path is not None:
            judge = RewardModelScorer(self.reward_model_path, device=pl_module.device)
            judge.name = "reward_model"  # test/rewards/reward_model/mean
            funcs = [*(funcs or []), judge]
        if funcs is not None:
            weights, n = self.reward_weights, len(funcs)
            if weights is not None and len(weights) != n:
                judges = "eval.reward_funcs" + (" and eval.reward_model_path" if self.reward_model_path else "")
                raise ValueError(f"eval.reward_weights has {len(weights)} weights for the {n} judges of {judges}")
            self.scorer = RewardScorer(funcs, weights)
        else:
            self.scorer = getattr(pl_module, "rewards", None)
        if self.reference_path is not None:
            from src.models import load_causal_lm

            path = Path(self.reference_path)
            if not path.is_dir():
                raise FileNotFoundError(f"eval.reference_path: {str(path)!r} is not a model directory")
            self._reference = load_causal_lm(str(path)).eval()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``every_n_steps``: resolve rewards and reference, and fix this rank's share of the held-out subset."""
        if not self.every_n_steps:
            return
        self.prepare(trainer, pl_module, "evaluation during fit (eval.every_n_steps)")
        batches, taken = [], 0
        for batch in trainer.datamodule.predict_dataloader():
            batches.append(batch)
            taken += len(batch["prompts"])
            if taken >= self.num_prompts:
                break
        self._fit_batches = batches[trainer.global_rank :: trainer.world_size]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == self._last_step:
            return  # (under gradient accumulation the step repeats for every micro-batch)
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        rows = []
        for held_out in self._fit_batches:
            rows += pl_module.test_step(trainer.strategy.batch_to_device(held_out), 0)
        pl_module.train(was_training)
        metrics = test_metrics(self.gather(trainer, rows), self.scorer, self.k)
        pl_module.log_dict({f"eval/{k}": v for k, v in metrics.items()}, rank_zero_only=True, batch_size=len(rows))

    def predictions_path(self, trainer: Trainer) -> Path:
        return Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.jsonl"

    # -- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def complete(self, module: LightningModule, batch: dict[str, Any], reference: bool = False) -> list[dict]:
        """Sampled completions of a prompt batch (policy, or the reference with ``reference=True``), with their
        sequence log-probs under policy and reference and their rewards."""
        tok = module.tokenizer
        g = self.sampling.num_generations
        model = self.reference_model(module) if reference else module.model
        if model is None:
            raise ValueError("no reference to compare with: set eval.reference_path to a model directory")
        with adapter_disabled(module) if reference and model is module.model else contextlib.nullcontext():
            out = generate(
                model,
                batch["prompt_ids"],
                batch["prompt_mask"],
                self.sampling,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                noise=sampling_noise(batch["index"], self.sampling, module.device, salt=int(reference)),
                accel=module.accel,
            )
        ids, attn = out.input_ids, out.attention_mask
        mask = torch.cat([torch.zeros_like(out.prompt_mask), out.completion_mask], 1)
        logp = masked_sum(
            module.policy_logps({"input_ids": ids, "attention_mask": attn, "completion_mask": mask})[0], mask, dim=-1
        )
        ref = self.reference_model(module)
        ref_logp = None
        if ref is not None:
            with adapter_disabled(module) if ref is module.model else contextlib.nullcontext():
                ref_logp = masked_sum(completion_logps(ref, ids, attn, mask, accel=module.accel)[0], mask, dim=-1)
        completions = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch["columns"].items()}
        rewards = self.scorer.score(prompts, completions, columns) if self.scorer is not None else None
        rows = []
        for i, completion in enumerate(completions):
            row = {
                "index": int(batch["index"][i // g]),
                "sample": i % g,
                "prompt": prompts[i],
                "completion": completion,
                "num_tokens": int(out.completion_lengths[i]),
                "truncated": bool(out.is_truncated[i]),
                "logp": float(logp[i]),
                "ref_logp": None if ref_logp is None else float(ref_logp[i]),
                "rewards": {}
                if rewards is None
                else {n: _none_if_nan(float(v)) for n, v in zip(self.scorer.names, rewards[i].tolist())},
            }
            row.update({k: v[i] for k, v in columns.items() if k not in row})
            rows.append(row)
        return rows

    def reference_model(self, module: LightningModule) -> nn.Module | None:
        """``eval.reference_path``'s model, else the module's frozen reference, the LoRA base, or ``None``."""
        if self._reference is not None:
            return self._reference.to(module.device)
        ref = getattr(module, "ref_model", None)
        if ref is not None:
            return ref
        return module.model if hasattr(module.model, "disable_adapter") else None

    # -- predict: write ---------------------------------------------------------------------------------------------
    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:  # noqa: ANN001 - Lightning's signature
        with open(self._shard, "a", encoding="utf-8") as f:
            for row in prediction:
                f.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            out = self.predictions_path(trainer)
            rows = merge_shards(sorted(out.parent.glob(f"{out.stem}.rank*.jsonl")))
            out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            rank_zero_info(f"predictions: {out} ({len(rows)} rows)")
        trainer.strategy.barrier()

    # -- test: score ------------------------------------------------------------------------------------------------
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._rows.extend(outputs)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self.gather(trainer, self._rows)
        metrics = test_metrics(rows, self.scorer, self.k)
        for name, value in metrics.items():
            pl_module.log(f"test/{name}", value, rank_zero_only=True, batch_size=len(rows))
        if not trainer.is_global_zero:
            return
        out = self.predictions_path(trainer).with_name("test_summary.md")  # its directory made by start()
        lines = ["| metric | value |", "|---|---|", *(f"| test/{k} | {v:.4f} |" for k, v in metrics.items())]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out.with_suffix(".csv").write_text(
            "metric,value\n" + "".join(f"test/{k},{v}\n" for k, v in metrics.items()), encoding="utf-8"
        )
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # WandbLogger: the completions behind the numbers
                cols = ["index", "sample", "prompt", "completion", "reward", "reference_completion"]
                weights = weights_of(self.scorer)
                data = [
                    [
                        p["index"],
                        p["sample"],
                        p["prompt"],
                        p["completion"],
                        total_reward(p, weights),
                        r["reference"]["completion"] if r["reference"] else None,
                    ]
                    for r in rows
                    for p in [r["policy"]]
                ]
                logger.log_table(key="test/completions", columns=cols, data=data)
        rank_zero_info(f"test summary ({len(rows)} completions): {out} (and .csv)")

    @staticmethod
    def gather(trainer: Trainer, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every rank's ``{"policy", "reference"}`` rows, once each (the test sampler may repeat a prompt to even
        out the ranks)."""
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        seen, unique = set(), []
        for r in rows:
            key = (r["policy"]["index"], r["policy"]["sample"])
            if key not in seen:
                seen.add(key)
                unique.append(r)
        return unique


def test_metrics(rows: list[dict[str, Any]], scorer: RewardScorer | None, ks: list[int]) -> dict[str, float]:
    """``test/*`` values of ``{"policy": row, "reference": row | None}`` pairs (see :class:`Evaluation`)."""
    policy = [r["policy"] for r in rows]
    out: dict[str, float] = {"completions/mean_length": sum(r["num_tokens"] for r in policy) / len(policy)}
    kl = [r["logp"] - r["ref_logp"] for r in policy if r["ref_logp"] is not None]
    if kl:
        out["kl"] = sum(kl) / len(kl)
    if scorer is None:
        return out
    weights = weights_of(scorer)
    for name in scorer.names:
        values = [r["rewards"][name] for r in policy if r["rewards"][name] is not None]
        if values:
            out[f"rewards/{name}/mean"] = sum(values) / len(values)
    out["reward"] = sum(total_reward(r, weights) for r in policy) / len(policy)
    checked = next((n for n, f in zip(scorer.names, scorer.funcs) if getattr(f, "answer_checked", False)), None)
    by_prompt: dict[int, list[bool]] = {}
    for r in policy if checked is not None else ():
        if r["rewards"][checked] is not None:
            by_prompt.setdefault(r["index"], []).append(r["rewards"][checked] == 1.0)
    if by_prompt:
        flags = list(by_prompt.values())
        out["accuracy"] = sum(sum(f) for f in flags) / sum(len(f) for f in flags)
        for k in ks:
            if all(len(f) >= k for f in flags):
                out[f"pass@{k}"] = mean_pass_at_k(flags, k)
    pairs = [
        (total_reward(r["policy"], weights), total_reward(r["reference"], weights)) for r in rows if r["reference"]
    ]
    if pairs:
        out["win_rate"] = win_rate([p for p, _ in pairs], [q for _, q in pairs])
    return out


def weights_of(scorer: RewardScorer | None) -> dict[str, float]:
    """Each reward function's weight by its metric name (none without a scorer)."""
    return dict(zip(scorer.names, scorer.weights.tolist())) if scorer is not None else {}


def total_reward(row: dict[str, Any], weights: dict[str, float]) -> float:
    """Weighted sum of a row's rewards, ``None`` entries left out (TRL's ``nansum``)."""
    return sum(weights[n] * v for n, v in row["rewards"].items() if v is not None)


def merge_shards(shards: list[Path]) -> list[dict[str, Any]]:
    """Rows of the per-rank prediction shards in (prompt, sample) order; the shards are removed."""
    rows = []
    for shard in shards:
        with open(shard, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
        shard.unlink()
    return sorted(rows, key=lambda r: (r["index"], r["sample"]))


def sampling_noise(index: Tensor, sampling: SamplingConfig, device: torch.device, salt: int = 0) -> Tensor:
    """Uniform numbers per (seed, prompt row): a prompt gets the same samples however prompts are batched or split
    across ranks; ``salt`` gives the reference its own."""
    base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
    rows = []
    for i in index.tolist():
        g = torch.Generator().manual_seed((base * 1_000_003 + 7919 * salt + int(i)) % (2**63 - 1))
        rows.append(torch.rand(sampling.num_generations, sampling.max_new_tokens, generator=g, dtype=torch.float64))
    return torch.cat(rows).to(device)


def adapter_disabled(module: LightningModule):
    """The LoRA policy with its adapter disabled (the reference of a LoRA run)."""
    return module.model.disable_adapter()


def evaluation_of(trainer: Trainer) -> Evaluation:
    """The trainer's :class:`Evaluation` callback (the CLI adds one; a plain ``Trainer`` needs it in ``callbacks``)."""
    for cb in trainer.callbacks:
        if isinstance(cb, Evaluation):
            return cb
    raise ValueError("predict/test need the src.evaluate.Evaluation callback in trainer.callbacks (the CLI adds it)")


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x
