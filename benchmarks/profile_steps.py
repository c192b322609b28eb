"""torch.profiler over steady training steps of a benchmark workload, through the same CLI path as ``run.py``.

    python benchmarks/profile_steps.py dpo [--artifacts DIR] [--skip 5] [--steps 10] [--threads N] [--out DIR]

Prints the top operators by self CPU time and by total CPU time, and writes a Chrome trace to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning import Callback  # noqa: E402

from benchmarks.run import DEFAULT_ARTIFACTS, WORKLOADS, cli_args  # noqa: E402


class ProfileSteps(Callback):
    """Profiles optimizer steps ``skip+1 .. skip+steps`` (batch start of the first to batch end of the last)."""

    def __init__(self, skip: int = 5, steps: int = 10) -> None:
        self.skip, self.steps = skip, steps
        self.prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            import torch.profiler as tp

            self.prof = tp.profile(activities=[tp.ProfilerActivity.CPU], record_shapes=True, with_stack=False)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is not None and batch_idx == self.skip + self.steps - 1:
            self.prof.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS))
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--out", default=None, help="directory for trace.json")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args, extra = ap.parse_known_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from src.cli import main as cli_main

    sys.argv = sys.argv[:1]
    with tempfile.TemporaryDirectory() as root_dir:
        cli = cli_main(
            cli_args(args.workload, Path(args.artifacts).resolve(), args.skip + args.steps, root_dir, extra)
            + [
                "--trainer.callbacks+=benchmarks.profile_steps.ProfileSteps",
                f"--trainer.callbacks.init_args.skip={args.skip}",
                f"--trainer.callbacks.init_args.steps={args.steps}",
            ]
        )
    prof = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ProfileSteps").prof
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(ka.table(sort_by="cpu_time_total", row_limit=args.rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.out, "trace.json"))


if __name__ == "__main__":
    main()
