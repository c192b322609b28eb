"""Where one step's time goes on the real-model workload, ours or TRL's: torch.profiler over steady steps, grouped.

    python benchmarks/profile_real.py ours dpo --length 256 [--skip 1] [--steps 1] [--accel auto|off] [--rows 25]
        [--by-name]
    python benchmarks/profile_real.py trl  grpo --length 256

Both sides run their benchmark path (``benchmarks/run.py``'s CLI arguments, ``benchmarks/trl_real.py``'s trainer)
with steps ``skip+1 .. skip+steps`` profiled. It prints, per profiled step:

* phases: policy forward, reference forward, backward, generation (GRPO), as ``record_function`` ranges put around
  each side's own methods (:data:`PHASES`); "rest" is the step minus those (optimizer, clipping, loss, data, Python);
* operator groups by self time: GEMMs split by shape into LM head (a ``vocab_size`` or vocabulary-tile dimension), MLP
  (``intermediate_size``) and attention projections (``hidden_size`` / key-value width), SDPA, (log-)softmax /
  logsumexp, AdamW, sampling, elementwise and copies, the rest;
* the top operators by self time.

With ``--json FILE`` the numbers are written there too. Timing under the profiler is slower than the benchmark's:
compare shares, not seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

PHASE = "phase: "


def _wrap(owner: type, name: str, tag: str | Callable[..., str]) -> None:
    """Put ``owner.name`` (a method) inside ``record_function(PHASE + tag)``; ``tag`` may be a function of the call's
    arguments (e.g. policy vs reference by which model is passed)."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        label = tag(*args, **kwargs) if callable(tag) else tag
        with record_function(PHASE + label):
            return fn(*args, **kwargs)

    setattr(owner, name, wrapped)


def label_ours(algo: str) -> None:
    from lightning import LightningModule

    _wrap(LightningModule, "backward", "backward")  # manual_backward (GRPO) reaches it through the strategy too
    if algo == "dpo":
        from src.modules.dpo import DPO

        _wrap(DPO, "policy_token_logps", "policy forward")
        _wrap(DPO, "reference_sequence_logps", "reference forward")
    else:
        from src.modules.grpo import GRPO
        from src.modules.online import OnlineModule

        _wrap(OnlineModule, "rollout", "generation + reward")
        _wrap(GRPO, "ref_token_logps", "reference forward")
        _wrap(GRPO, "token_logps", "policy forward")


def label_trl(algo: str, trainer: Any) -> None:
    from accelerate import Accelerator

    _wrap(Accelerator, "backward", "backward")
    if algo == "dpo":  # TRL calls the models' forward itself: hooks on the two modules
        for model, tag in ((trainer.model, "policy forward"), (trainer.ref_model, "reference forward")):
            ctx: dict[str, Any] = {}

            def pre(module: Any, args: Any, _tag: str = tag, _ctx: dict = ctx) -> None:
                _ctx["rf"] = record_function(PHASE + _tag)
                _ctx["rf"].__enter__()

            def post(module: Any, args: Any, out: Any, _ctx: dict = ctx) -> None:
                _ctx.pop("rf").__exit__(None, None, None)

            model.register_forward_pre_hook(pre)
            model.register_forward_hook(post)
    else:
        cls = type(trainer).__mro__[1]  # GRPOTrainer
        _wrap(cls, "_generate", "generation + reward")
        _wrap(cls, "_calculate_rewards", "generation + reward")
        ref = trainer.ref_model
        _wrap(
            cls,
            "_get_per_token_logps_and_entropies",
            lambda self, model, *a, **k: "reference forward" if model is ref else "policy forward",
        )


def groups(ka: Any, config: Any) -> dict[str, float]:
    """Self CPU time (ms) per operator group; GEMMs by the dimensions of their inputs."""
    vocab, inter = config.vocab_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv, heads = config.num_key_value_heads * head_dim, config.num_attention_heads * head_dim
    proj = {config.hidden_size, kv, heads, heads + 2 * kv}  # q|k|v fused in the decode loop
    mlp = {inter, 2 * inter}  # gate|up fused in the decode loop
    out: dict[str, float] = defaultdict(float)
    for e in ka:
        name, ms = e.key, e.self_cpu_time_total / 1000
        if name.startswith(PHASE) or ms == 0:
            continue
        dims = {d for shape in (e.input_shapes or []) if isinstance(shape, list) for d in shape}
        low = name.lower()
        gemms = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")
        if name.rstrip("_") in gemms or name == "mkldnn::_linear_pointwise":  # the latter: accel's oneDNN linears
            if vocab in dims or any(d >= 8192 for d in dims):  # TRL's CPU head runs vocabulary tiles of 16-32K
                out["GEMM: LM head (vocab)"] += ms
            elif dims & mlp:
                out["GEMM: MLP"] += ms
            elif dims & proj:
                out["GEMM: attention q/k/v/o"] += ms
            else:
                out["GEMM: other"] += ms
        elif "scaled_dot_product" in low or "flash_attention" in low or "attention" in low:
            out["attention (SDPA)"] += ms
        elif "softmax" in low or "logsumexp" in low:
            out["(log-)softmax / logsumexp"] += ms
        elif "adam" in low:
            out["AdamW"] += ms
        elif "norm" in low and ("linalg" in low or "foreach" in low):
            out["gradient norm / clipping"] += ms
        elif any(k in low for k in ("multinomial", "topk", "sort", "cumsum", "exponential", "argmax")):
            out["sampling"] += ms
        elif any(
            k in low
            for k in ("mul", "add", "sub", "div", "silu", "rsqrt", "pow", "mean", "neg", "exp", "sum", "where",
                      "copy", "cat", "clone", "index", "gather", "scatter", "fill", "zero", "embedding", "masked",
                      "_to_copy", "contiguous", "stack", "sigmoid", "cos", "sin", "max", "min")
        ):  # fmt: skip
            out["elementwise, reductions, copies, indexing"] += ms
        else:
            out["other ops"] += ms
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def phases(ka: Any) -> dict[str, float]:
    """Inclusive CPU time (ms) of each phase range."""
    return {e.key[len(PHASE) :]: e.cpu_time_total / 1000 for e in ka if e.key.startswith(PHASE)}


def report(prof: Any, step_s: float, n_steps: int, config: Any, rows: int, by_name: bool = False) -> dict[str, Any]:
    ka = prof.key_averages(group_by_input_shape=True)
    ph, gr = phases(prof.key_averages()), groups(ka, config)
    step_ms = 1000 * step_s / n_steps
    print(f"\nprofiled {n_steps} step(s): {step_ms:,.0f} ms per step under the profiler\n")
    print("| phase | ms / step | share |\n|---|---|---|")
    rest = step_ms
    for k, v in sorted(ph.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v / n_steps:,.0f} | {v / n_steps / step_ms:.0%} |")
        rest -= v / n_steps
    print(f"| rest (optimizer, clipping, loss, data, Python) | {rest:,.0f} | {rest / step_ms:.0%} |")
    total = sum(gr.values())
    print("\n| operator group (self time) | ms / step | share of op time |\n|---|---|---|")
    for k, v in gr.items():
        print(f"| {k} | {v / n_steps:,.0f} | {v / total:.0%} |")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=rows))
    if by_name:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return dict(
        step_ms=round(step_ms, 1),
        phases_ms={k: round(v / n_steps, 1) for k, v in ph.items()},
        rest_ms=round(rest, 1),
        groups_ms={k: round(v / n_steps, 1) for k, v in gr.items()},
    )


def _callback_base() -> type:
    from lightning import Callback

    return Callback


class OursWindow(_callback_base()):
    """Profiles Lightning's training batches ``skip .. skip+steps-1`` (batch start to batch end)."""

    def __init__(self, skip: int = 1, steps: int = 1) -> None:
        self.skip, self.steps = skip, steps
        self.prof: Any = None
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is not None and batch_idx == self.skip + self.steps - 1:
            self.t1 = time.perf_counter()
            self.prof.__exit__(None, None, None)


def profile_ours(algo: str, length: int, artifacts: str, skip: int, steps: int, extra: list[str]) -> tuple:
    from benchmarks.run import cli_args
    from src.cli import main as cli_main

    label_ours(algo)
    sys.argv = sys.argv[:1]
    with tempfile.TemporaryDirectory() as root_dir:
        cli = cli_main(
            cli_args(f"real_{algo}", Path(artifacts).resolve(), skip + steps, root_dir, extra, length)
            + [
                "--trainer.callbacks+=benchmarks.profile_real.OursWindow",
                f"--trainer.callbacks.init_args.skip={skip}",
                f"--trainer.callbacks.init_args.steps={steps}",
            ]
        )
    window = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "OursWindow")
    return window.prof, window.t1 - window.t0, cli.model.model.config


def profile_trl(algo: str, length: int, artifacts: str, skip: int, steps: int) -> tuple:
    from transformers import TrainerCallback

    from benchmarks import trl_real

    trl_real.silence()
    trainer = trl_real.make_trainer(algo, length, artifacts, skip + steps)
    trl_real.quiet(trainer)
    label_trl(algo, trainer)

    class Window(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.t0 = self.t1 = 0.0
            self.n = 0

        def on_step_begin(self, args, state, control, **kw) -> None:
            if self.n == skip:
                self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw) -> None:
            if self.prof is not None and self.n == skip + steps - 1:
                self.t1 = time.perf_counter()
                self.prof.__exit__(None, None, None)
            self.n += 1

    window = Window()
    trainer.add_callback(window)
    trainer.train()
    return window.prof, window.t1 - window.t0, trainer.model.config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("side", choices=["ours", "trl"])
    ap.add_argument("algo", choices=["dpo", "grpo"])
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--artifacts", default=str(ROOT / "benchmarks" / "real_artifacts"))
    ap.add_argument("--skip", type=int, default=1, help="steps before the profiled ones (warm-up)")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps")
    ap.add_argument("--accel", default=None, help="ours: --model.init_args.accel (auto | off)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--by-name", action="store_true", help="also print the operators grouped by name only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the phase and group numbers to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side == "ours":
        extra = [f"--model.init_args.accel={args.accel}"] if args.accel else []
        prof, wall, config = profile_ours(args.algo, args.length, args.artifacts, args.skip, args.steps, extra)
    else:
        prof, wall, config = profile_trl(args.algo, args.length, args.artifacts, args.skip, args.steps)
    out = report(prof, wall, args.steps, config, args.rows, args.by_name)
    out.update(side=args.side, algo=args.algo, length=args.length, accel=args.accel, threads=torch.get_num_threads())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
