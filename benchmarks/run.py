"""Run the shared CPU benchmark workload (``../shared/bench``) through the project's own CLI and print one JSON line.

    python benchmarks/run.py dpo --artifacts ../shared/bench/artifacts [--steps N] [--threads N] [CLI OVERRIDES]

The run is exactly what a user runs (``python -m src fit --config configs/bench/<workload>.yaml ...``), in-process
through :func:`src.cli.main`, plus one measuring callback (:class:`StepRecorder`). The last stdout line is JSON with
the keys and measurement definitions of ``../shared/bench/trl_dpo.py``:

* ``train_wall_s``: ``perf_counter`` from ``on_train_start`` to ``on_train_end`` (the training loop only; CLI
  parsing, model / reference load, tokenisation and ``configure_optimizers`` are ``setup_s``).
* ``tokens_per_s``: DPO: ``attention_mask.sum()`` of every batch (prompt + response with BOS/EOS, chosen and
  rejected) summed over the run / ``train_wall_s``. ``tokens_padded_total``: ``attention_mask.numel()``.
* ``first_step_s`` / ``median_step_s_excl_first``: ``on_train_batch_start`` -> ``on_train_batch_end`` (batch fetched
  -> optimizer step done), as TRL's ``on_step_begin`` -> ``on_step_end``.
* ``peak_rss_mib``: ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end.

Adding a workload = one entry in :data:`WORKLOADS`: its config, its data file and how a batch counts tokens.
``real_dpo`` / ``real_grpo`` are the real-model workload of ``benchmarks/real.py`` (SmolLM2-135M, built into
``benchmarks/real_artifacts``); they take ``--length 128|256|512``, which picks the data file and sets
``max_length`` (DPO) or ``max_new_tokens`` (GRPO).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks.*` and `src` import from the repo root
    sys.path.insert(0, str(ROOT))
DEFAULT_ARTIFACTS = ROOT.parent / "shared" / "bench" / "artifacts"

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}.items():
    os.environ.setdefault(_k, _v)


# ------------------------------------------------------------------------------------------------------- workloads
def _dpo_tokens(batch: dict[str, Any], outputs: Any) -> tuple[int, int]:
    """(non-pad tokens, padded tokens) of one DPO batch: chosen + rejected rows, each with its prompt, BOS, EOS."""
    mask = batch["attention_mask"]
    return int(mask.sum()), int(mask.numel())


def _grpo_tokens(batch: dict[str, Any], outputs: Any) -> tuple[int, int]:
    """(prompt + sampled completion tokens without padding, padded) of one GRPO step, as the step reports them."""
    out = outputs if isinstance(outputs, dict) else {}
    n = int(out.get("num_tokens", 0))
    return n, int(out.get("num_tokens_padded", n))


def _real_dpo_args(length: int) -> list[str]:
    return ["--data.max_length", str(length)]


def _real_grpo_args(length: int) -> list[str]:
    from benchmarks.real import lengths

    return ["--model.init_args.max_new_tokens", str(lengths(length)[1])]


@dataclass(frozen=True)
class Workload:
    config: str  # relative to the repo root
    data_file: str  # relative to --artifacts; ``{length}`` is filled from --length
    count_tokens: Callable[[dict[str, Any], Any], tuple[int, int]]
    step_metrics: tuple[str, ...] = ()  # per-sample metrics of the step output recorded per step (mean)
    artifacts: Path = DEFAULT_ARTIFACTS  # default --artifacts
    build_hint: str = "python ../shared/bench/workload.py --out {artifacts}"
    length_args: Callable[[int], list[str]] | None = None  # CLI overrides of a --length (real workloads only)


REAL_ARTIFACTS = ROOT / "benchmarks" / "real_artifacts"
REAL_HINT = "python benchmarks/real.py build --out {artifacts}"
WORKLOADS: dict[str, Workload] = {
    "dpo": Workload("configs/bench/dpo.yaml", "dpo_pairs.jsonl", _dpo_tokens),
    "grpo": Workload("configs/bench/grpo.yaml", "grpo_prompts.jsonl", _grpo_tokens, ("reward", "kl")),
    "real_dpo": Workload(
        "configs/bench/real_dpo.yaml", "dpo_{length}.jsonl", _dpo_tokens, (), REAL_ARTIFACTS, REAL_HINT, _real_dpo_args
    ),
    "real_grpo": Workload(
        "configs/bench/real_grpo.yaml",
        "grpo_{length}.jsonl",
        _grpo_tokens,
        ("reward", "kl", "completions/mean_length"),
        REAL_ARTIFACTS,
        REAL_HINT,
        _real_grpo_args,
    ),
}


def data_file(workload: str, length: int | None) -> str:
    """The workload's data file name; a real workload needs a ``length``, the shared ones take none."""
    wl = WORKLOADS[workload]
    if (wl.length_args is None) != (length is None):
        need = "needs --length 128|256|512" if length is None else "takes no --length"
        raise SystemExit(f"{workload} {need}")
    if length is not None:
        from benchmarks.real import lengths

        lengths(length)  # exits naming the lengths there are
    return wl.data_file.format(length=length)


# ------------------------------------------------------------------------------------------------------ measurement
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _callback_base():
    from lightning import Callback

    return Callback


class StepRecorder(_callback_base()):
    """Wall clock of the training loop and of every optimizer step, tokens, per-step loss (and step metrics).

    The workload is looked up by name (``workload`` init arg) so this class can be given on the command line:
    ``--trainer.callbacks+=benchmarks.run.StepRecorder --trainer.callbacks.init_args.workload=dpo``.
    """

    def __init__(self, workload: str = "dpo") -> None:
        self.workload = workload
        self.t_train0 = self.t_train1 = None
        self.cpu_train0 = self.cpu_train1 = 0.0  # process CPU time (all threads): a load-robust diagnostic
        self.t_step0 = 0.0
        self.step_times: list[float] = []
        self.step_faults: list[int] = []  # minor page faults per step (fresh memory the kernel had to map)
        self.faults0 = 0
        self.losses: list[float] = []
        self.tokens: list[int] = []
        self.tokens_padded: list[int] = []
        self.completion_tokens: list[int] = []
        self.metrics: dict[str, list[float]] = {}
        self.rss_before_train = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.rss_before_train = peak_rss_mib()
        self.cpu_train0 = time.process_time()
        self.t_train0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.t_step0 = time.perf_counter()
        self.faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_times.append(time.perf_counter() - self.t_step0)
        self.step_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults0)
        n, n_pad = WORKLOADS[self.workload].count_tokens(batch, outputs)
        self.tokens.append(n)
        self.tokens_padded.append(n_pad)
        if "completion_mask" in batch:
            self.completion_tokens.append(int(batch["completion_mask"].sum()))
        out = outputs if isinstance(outputs, dict) else {}
        if "loss" in out:
            self.losses.append(float(out["loss"]))
        for name in WORKLOADS[self.workload].step_metrics:
            v = out.get("metrics", {}).get(name)
            if v is not None:
                self.metrics.setdefault(name, []).append(float(v.float().mean()))

    def on_train_end(self, trainer, pl_module) -> None:
        self.t_train1 = time.perf_counter()
        self.cpu_train1 = time.process_time()


def step_stats(step_times: list[float]) -> dict[str, float]:
    if not step_times:
        return {}
    steady = step_times[1:] if len(step_times) > 1 else step_times
    return dict(
        first_step_s=round(step_times[0], 4),
        median_step_s=round(statistics.median(step_times), 4),
        median_step_s_excl_first=round(statistics.median(steady), 4),
    )


def environment_info(packages: tuple[str, ...] = ("torch", "lightning", "transformers")) -> dict[str, Any]:
    """Python, the versions of ``packages``, torch's threads and the CPU (both runners record it)."""
    import importlib

    import torch

    info: dict[str, Any] = dict(python=platform.python_version())
    info.update({name: importlib.import_module(name).__version__ for name in packages})
    info.update(
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


# ------------------------------------------------------------------------------------------------------------- run
def cli_args(
    workload: str, artifacts: Path, steps: int | None, root_dir: str, extra: list[str], length: int | None = None
) -> list[str]:
    """The arguments given to ``src.cli.main``: the bench config, the artifact paths, the recorder callback (and a
    real workload's length overrides)."""
    wl = WORKLOADS[workload]
    args = [
        "fit",
        "--config",
        str(ROOT / wl.config),
        "--model.model_name_or_path",
        str(artifacts / "model"),
        "--data.path",
        str(artifacts / data_file(workload, length)),
        "--trainer.default_root_dir",
        root_dir,
        "--trainer.callbacks+=benchmarks.run.StepRecorder",
        f"--trainer.callbacks.init_args.workload={workload}",
    ]
    if wl.length_args is not None and length is not None:
        args += wl.length_args(length)
    if steps is not None:
        args += ["--trainer.max_steps", str(steps)]
    return args + extra


def run(
    workload: str,
    artifacts: str | Path | None = None,
    steps: int | None = None,
    extra: list[str] | None = None,
    length: int | None = None,
) -> dict:
    """Run one benchmark in this process and return the result dict (what ``main`` prints)."""
    t_script0 = time.perf_counter()
    if workload not in WORKLOADS:
        raise SystemExit(f"unknown workload {workload!r}; choose from {sorted(WORKLOADS)}")
    wl = WORKLOADS[workload]
    if not (ROOT / wl.config).exists():
        raise SystemExit(f"{workload}: {wl.config} does not exist yet (is the {workload} module implemented?)")
    artifacts = Path(artifacts if artifacts is not None else wl.artifacts).resolve()
    for need in ("model", data_file(workload, length)):
        if not (artifacts / need).exists():
            raise SystemExit(
                f"{artifacts / need} not found; build the workload with `{wl.build_hint.format(artifacts=artifacts)}`"
            )
    from src.cli import main as cli_main  # imports are not setup time (as in the TRL runner)

    argv0 = sys.argv
    with tempfile.TemporaryDirectory(prefix=f"bench_{workload}_") as root_dir:
        sys.argv = argv0[:1]  # the CLI gets its arguments from `args` only
        try:
            t_setup0 = time.perf_counter()
            cli = cli_main(cli_args(workload, artifacts, steps, root_dir, list(extra or []), length))
            t_end = time.perf_counter()
        finally:
            sys.argv = argv0
    rec = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "StepRecorder")
    if rec.t_train0 is None or rec.t_train1 is None:
        raise RuntimeError("the training loop did not run (on_train_start / on_train_end not reached)")
    train_wall_s = rec.t_train1 - rec.t_train0
    n_steps = cli.trainer.global_step
    tokens = sum(rec.tokens)
    result: dict[str, Any] = dict(
        trainer="lightning-align",
        workload=workload,
        steps=n_steps,
        train_wall_s=round(train_wall_s, 4),
        train_cpu_s=round(rec.cpu_train1 - rec.cpu_train0, 4),
        steps_per_s=round(n_steps / train_wall_s, 4),
        tokens_per_s=round(tokens / train_wall_s, 1),
        tokens_total=tokens,
        tokens_padded_total=sum(rec.tokens_padded),
        peak_rss_mib=round(peak_rss_mib(), 1),
        peak_rss_mib_before_train=round(rec.rss_before_train, 1),
        final_loss=round(rec.losses[-1], 6) if rec.losses else None,
        first_loss=round(rec.losses[0], 6) if rec.losses else None,
        losses=[round(x, 5) for x in rec.losses],
        **step_stats(rec.step_times),
        step_times_s=[round(x, 4) for x in rec.step_times],
        step_minor_faults=rec.step_faults,
        setup_s=round(rec.t_train0 - t_setup0, 3),
        fit_wall_s=round(t_end - t_setup0, 3),
        script_wall_s=round(time.perf_counter() - t_script0, 3),
        batch_size=cli.datamodule.hparams.batch_size,
    )
    if length is not None:
        result["length"] = length
    if rec.completion_tokens:
        result["completion_tokens_total"] = sum(rec.completion_tokens)
    for name, values in rec.metrics.items():
        if name == "completions/mean_length":  # TRL's runner's key
            result["completion_mean_length"] = [round(v, 2) for v in values]
            continue
        result[f"{name}_first_step"] = round(values[0], 4)
        result[f"{name}_last_step"] = round(values[-1], 4)
        result[f"{name}s" if not name.endswith("s") else name] = [round(v, 4) for v in values]
    result.update(environment_info())
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument(
        "--artifacts",
        default=None,
        help="workload dir built by ../shared/bench/workload.py (real_*: by benchmarks/real.py build); "
        "default: ../shared/bench/artifacts (real_*: benchmarks/real_artifacts)",
    )
    ap.add_argument("--length", type=int, default=None, help="real_* workloads: sequence length 128 | 256 | 512")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args, extra = ap.parse_known_args(argv)  # anything else is passed to the CLI, e.g. --trainer.max_steps=5
    extra = [a for a in extra if a != "--"]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run(args.workload, args.artifacts, args.steps, extra, args.length)
    sys.stderr.flush()
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
