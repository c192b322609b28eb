"""TRL 1.16's DPOTrainer / GRPOTrainer on the real-model workload of ``benchmarks/real.py`` (SmolLM2-135M).

    python benchmarks/trl_real.py dpo  --length 256 [--artifacts benchmarks/real_artifacts] [--steps N] [--threads N]
    python benchmarks/trl_real.py grpo --length 256

Prints one JSON line (the last line of stdout) with the keys of ``benchmarks/run.py`` and the same definitions:
``train_wall_s`` = ``trainer.train()`` only (model / reference load and tokenisation are ``setup_s``),
``tokens_per_s`` = non-pad tokens (DPO: chosen + rejected sequences, prompt included; GRPO: prompt + completion
tokens of every sampled sequence) / ``train_wall_s``, step times from ``on_step_begin`` to ``on_step_end``,
``peak_rss_mib`` = ``ru_maxrss``. The hyper-parameters are ``benchmarks/real.py``'s ``DPO_SPEC`` / ``GRPO_SPEC``.

Stand-alone: it needs neither ``../shared/bench`` nor the project's ``src`` (only ``benchmarks/real.py`` for the spec
and ``benchmarks/run.py``'s step statistics and environment record, both importing nothing at module level beyond
the standard library), so the TRL process loads none of the code it is compared with.

One adjustment, DPO only: for chat rows TRL tokenizes ``template(prompt + chosen)`` and keeps everything after the
prompt, i.e. the template's ``"\\n"`` after the assistant's ``<|im_end|>`` too; ours ends a completion at the EOS
(where generation stops). :class:`RealDPOTrainer` drops the tokens after the last EOS of each completion, so both
sides score the same tokens (``L`` per sequence) and the per-step losses compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

t_script0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# benchmarks.run sets the offline / no-telemetry environment at import, before torch, transformers and TRL load
from benchmarks import real  # noqa: E402
from benchmarks.run import environment_info, step_stats  # noqa: E402

os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StepTimer(TrainerCallback):
    """Per-optimizer-step wall times: ``on_step_begin`` (batch fetched) -> ``on_step_end`` (optimizer stepped)."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kw) -> None:
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw) -> None:
        self.step_times.append(time.perf_counter() - self._t)


def _cut_after_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: len(ids) - ids[::-1].index(eos)] if eos in ids else ids


class RealDPOTrainer(DPOTrainer):
    """DPOTrainer that ends completions at their EOS (see the module doc) and records loss and tokens per step."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.bench_losses: list[float] = []
        self.bench_tokens: list[int] = []
        self.bench_tokens_padded: list[int] = []
        self.bench_completion_tokens: list[int] = []

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        eos = processing_class.eos_token_id

        def cut(example: dict[str, Any]) -> dict[str, Any]:
            return {k: _cut_after_eos(example[k], eos) for k in ("chosen_ids", "rejected_ids")}

        return dataset.map(cut)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.bench_losses.append(float(loss))
        self.bench_tokens.append(int(inputs["attention_mask"].sum()))
        self.bench_tokens_padded.append(int(inputs["attention_mask"].numel()))
        self.bench_completion_tokens.append(int(inputs["completion_mask"].sum()))
        return loss


class RealGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records the loss, the prompt + completion tokens and the reward of every optimizer step."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.bench_losses: list[float] = []
        self.bench_tokens: list[int] = []
        self.bench_metrics: dict[str, list[float]] = {"reward": [], "kl": [], "completions/mean_length": []}

    def training_step(self, model, inputs, num_items_in_batch):
        seen0 = self.state.num_input_tokens_seen
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.bench_losses.append(float(loss))
        self.bench_tokens.append(int(self.state.num_input_tokens_seen - seen0))
        for k in self.bench_metrics:  # TRL clears `_metrics` in log(): copy the step's values now
            v = self._metrics["train"].get(k)
            if v:
                self.bench_metrics[k].append(float(v[-1]))
        return loss


def _common_config(spec: dict[str, Any], steps: int, out_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=spec["per_device_train_batch_size"],
        gradient_accumulation_steps=spec["gradient_accumulation_steps"],
        max_steps=steps,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=spec["weight_decay"],
        adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"],
        adam_epsilon=spec["adam_epsilon"],
        max_grad_norm=spec["max_grad_norm"],
        beta=spec["beta"],
        seed=spec["train_seed"],
        data_seed=spec["train_seed"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=spec["gradient_checkpointing"],
        disable_dropout=True,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def make_trainer(algo: str, length: int, artifacts: str | Path, steps: int | None = None) -> Any:
    """TRL's trainer for the workload at ``length``, ready to ``train()`` (also used by ``profile_real.py``)."""
    n_completion = real.lengths(length)[1]
    p = real.check_built(artifacts, length, algo)
    spec = real.DPO_SPEC if algo == "dpo" else real.GRPO_SPEC
    tokenizer = AutoTokenizer.from_pretrained(p["model"])
    model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32)
    with open(p[algo], encoding="utf-8") as f:
        train_dataset = Dataset.from_list([json.loads(line) for line in f if line.strip()])
    out_dir = tempfile.mkdtemp(prefix=f"trl_real_{algo}_")
    common = _common_config(spec, steps or spec["max_steps"], out_dir)
    if algo == "dpo":
        config = DPOConfig(
            **common,
            loss_type=[spec["loss_type"]],
            max_length=length,
            precompute_ref_log_probs=False,
            train_sampling_strategy="sequential",
        )
        return RealDPOTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer)
    config = GRPOConfig(
        **common,
        num_generations=spec["num_generations"],
        steps_per_generation=1,
        num_iterations=spec["num_iterations"],
        max_completion_length=n_completion,
        temperature=spec["temperature"],
        top_p=spec["top_p"],
        top_k=spec["top_k"],
        epsilon=spec["epsilon"],
        loss_type=spec["loss_type"],
        scale_rewards=spec["scale_rewards"],
        shuffle_dataset=False,
        use_vllm=False,
        log_completions=False,
    )
    return RealGRPOTrainer(
        model=model,
        reward_funcs=real.overlap_reward,
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )


def quiet(trainer: Any) -> None:
    """No progress bar or printed logs: stdout keeps the JSON line only."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def silence() -> None:
    import datasets

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("algo", choices=["dpo", "grpo"])
    ap.add_argument("--length", type=int, required=True, help=f"sequence length, one of {real.LENGTHS}")
    ap.add_argument("--artifacts", default=str(real.DEFAULT_ARTIFACTS))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the spec's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    if not args.verbose:
        silence()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = real.DPO_SPEC if args.algo == "dpo" else real.GRPO_SPEC
    real.check_built(args.artifacts, args.length, args.algo)

    t_setup0 = time.perf_counter()
    trainer = make_trainer(args.algo, args.length, args.artifacts, args.steps)
    timer = StepTimer()
    trainer.add_callback(timer)
    if not args.verbose:
        quiet(trainer)
    setup_s = time.perf_counter() - t_setup0
    rss_before_train = peak_rss_mib()

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    trainer.train()
    train_wall_s = time.perf_counter() - t0
    train_cpu_s = time.process_time() - cpu0

    steps_done = trainer.state.global_step
    tokens = sum(trainer.bench_tokens)
    result: dict[str, Any] = dict(
        trainer=f"trl.{type(trainer).__mro__[1].__name__}",
        workload=f"real_{args.algo}",
        length=args.length,
        steps=steps_done,
        train_wall_s=round(train_wall_s, 4),
        train_cpu_s=round(train_cpu_s, 4),
        steps_per_s=round(steps_done / train_wall_s, 4),
        tokens_per_s=round(tokens / train_wall_s, 1),
        tokens_total=tokens,
        peak_rss_mib=round(peak_rss_mib(), 1),
        peak_rss_mib_before_train=round(rss_before_train, 1),
        final_loss=round(trainer.bench_losses[-1], 6),
        first_loss=round(trainer.bench_losses[0], 6),
        losses=[round(x, 5) for x in trainer.bench_losses],
        **step_stats(timer.step_times),
        step_times_s=[round(x, 4) for x in timer.step_times],
        setup_s=round(setup_s, 3),
        script_wall_s=round(time.perf_counter() - t_script0, 3),
        batch_size=spec["per_device_train_batch_size"],
    )
    if args.algo == "dpo":
        result["tokens_padded_total"] = sum(trainer.bench_tokens_padded)
        result["completion_tokens_total"] = sum(trainer.bench_completion_tokens)
        expected = steps_done * spec["per_device_train_batch_size"] * 2 * args.length
        if tokens != expected:  # the rows are exactly L tokens on our side: a mismatch means TRL tokenized otherwise
            print(f"warning: TRL saw {tokens} tokens, the workload has {expected}", file=sys.stderr)
    else:
        rewards = trainer.bench_metrics["reward"]
        result.update(
            reward_first_step=round(rewards[0], 4) if rewards else None,
            reward_last_step=round(rewards[-1], 4) if rewards else None,
            rewards=[round(x, 4) for x in rewards],
            kl=[round(x, 5) for x in trainer.bench_metrics["kl"]],
            completion_mean_length=[round(x, 2) for x in trainer.bench_metrics["completions/mean_length"]],
        )
    result.update(environment_info(("torch", "transformers", "trl")))
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    sys.stderr.flush()
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
