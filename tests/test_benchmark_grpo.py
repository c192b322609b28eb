"""CI smoke test of the GRPO benchmark runner (``benchmarks/run.py grpo``): 2 steps on a tiny stand-in workload,
checks the JSON keys shared with ``../shared/bench/trl_grpo.py``. Not timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

KEYS = (
    "steps",
    "train_wall_s",
    "steps_per_s",
    "tokens_per_s",
    "tokens_total",
    "peak_rss_mib",
    "final_loss",
    "reward_first_step",
    "reward_last_step",
    "rewards",
    "median_step_s_excl_first",
    "first_step_s",
    "setup_s",
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """A stand-in for ``../shared/bench/artifacts``: the embedded tiny Llama and its tokenizer, 16 prompts."""
    from src.data import tiny

    root = tmp_path_factory.mktemp("grpo_artifacts")
    model = tiny.build_model(None)
    model.save_pretrained(root / "model")
    tiny.load_tokenizer().save_pretrained(root / "model")
    with open(root / "grpo_prompts.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"count {i} then {i + 1} and"}) + "\n")
    return root


def test_grpo_runner_smoke(artifacts):
    from benchmarks.run import run

    r = run("grpo", artifacts, steps=2)
    missing = [k for k in KEYS if k not in r]
    assert not missing, missing
    assert r["steps"] == 2 and len(r["rewards"]) == 2 and len(r["losses"]) == 2
    # prompt tokens with BOS + completion tokens with EOS, no padding: at least 16 completions of >= 1 token per step
    assert r["tokens_total"] >= 2 * 16 * 2
    assert r["tokens_total"] <= r["tokens_padded_total"]
    assert 0.0 <= r["reward_first_step"] <= 1.0
