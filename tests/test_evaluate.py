"""pass@k and win rate against their closed forms on hand-built sets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest

from src.evaluate import mean_pass_at_k, pass_at_k, win_rate
from tests.conftest import CONFIGS, FAST, fresh_env


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (10, 0, 3), (5, 5, 2), (20, 7, 8), (4, 1, 4), (3, 1, 3)])
def test_pass_at_k_is_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2) = 1/6
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    # three problems, 4 samples each: (1 − 1/6) + 0 + 1, averaged
    flags = [[True, False, True, False], [False] * 4, [True, True, True, False]]
    assert mean_pass_at_k(flags, 2) == pytest.approx((5 / 6 + 0 + 1) / 3)


def test_pass_at_k_refuses_bad_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.5, 0.2, 0.0], [0.0, 0.5, 0.3, 0.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    same = [0.1, 0.7, 0.3]
    assert win_rate(same, same) == 0.5
    with pytest.raises(ValueError, match="equally many"):
        win_rate([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------- predict / test
def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = [{"prompt": f"kitele {i} pemo {i + 1}", "answer": str(i)} for i in range(5)]
EVAL = ["--eval.max_new_tokens=8", "--eval.temperature=1.0", "--trainer.enable_progress_bar=false"]


def test_predict_after_the_grpo_default_writes_one_row_per_prompt_and_sample(run_cli, tmp_path):
    run_cli(["fit", "--config", "grpo.yaml", *FAST])
    prompts = write_prompts(tmp_path / "heldout.jsonl", PROMPTS)
    cli = run_cli(
        [
            "predict",
            "--config",
            "grpo.yaml",
            "--ckpt_path=runs/grpo/checkpoints/last.ckpt",
            *EVAL,
            f"--data.predict_path={prompts}",
            "--eval.num_samples=3",
            "--data.batch_size=2",
            "--eval.reward_funcs=[src.rewards.digit_fraction,src.rewards.accuracy]",
        ]
    )
    out = Path(cli.trainer.log_dir) / "predictions.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(5) for s in range(3)]
    assert not list(out.parent.glob("predictions.rank*.jsonl"))  # shards merged and removed
    for r in rows:
        assert r["prompt"] == PROMPTS[r["index"]]["prompt"] and r["answer"] == PROMPTS[r["index"]]["answer"]
        assert set(r["rewards"]) == {"digit_fraction", "accuracy"} and 0 <= r["rewards"]["digit_fraction"] <= 1
        assert 1 <= r["num_tokens"] <= 8 and r["logp"] < 0 and r["ref_logp"] < 0
    assert len({r["completion"] for r in rows}) > 5  # sampled, not one greedy answer repeated


def test_test_of_the_untrained_policy_against_itself_is_a_coin_flip(run_cli):
    """Policy = reference (no training): win rate 0.5 ± 0.05 over their sampled completions; KL ~ 0."""
    cli = run_cli(
        [
            "test",
            "--config",
            "grpo.yaml",
            *EVAL,
            "--eval.num_samples=4",
            "--eval.k=[1,4]",
            "--eval.reward_funcs=[src.rewards.copy_reward]",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert abs(float(metrics["test/win_rate"]) - 0.5) <= 0.05
    assert abs(float(metrics["test/kl"])) < 1e-4  # the same model scores its own samples
    summary = (Path(cli.trainer.log_dir) / "test_summary.md").read_text()
    assert "| test/win_rate |" in summary and "| test/rewards/copy_reward/mean |" in summary


def test_test_reports_accuracy_and_pass_at_k_of_an_answer_checked_reward():
    from src.evaluate import test_metrics
    from src.rewards import RewardScorer

    scorer = RewardScorer(["src.rewards.digit_fraction", "src.rewards.accuracy"])

    def row(index, sample, acc, length=4):
        return {
            "index": index,
            "sample": sample,
            "num_tokens": length,
            "logp": -2.0,
            "ref_logp": -2.5,
            "rewards": {"digit_fraction": 0.5, "accuracy": acc},
        }

    flags = [[1.0, 0.0, 1.0, 0.0], [0.0] * 4, [1.0, 1.0, 1.0, 0.0]]
    rows = [{"policy": row(i, s, a), "reference": row(i, s, 0.0)} for i, f in enumerate(flags) for s, a in enumerate(f)]
    got = test_metrics(rows, scorer, [1, 2, 4])
    assert got["accuracy"] == pytest.approx(5 / 12) and got["pass@1"] == pytest.approx(5 / 12)
    assert got["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3) and got["pass@4"] == pytest.approx(2 / 3)
    assert got["kl"] == pytest.approx(0.5) and got["completions/mean_length"] == 4
    # policy total 0.5 + acc vs reference 0.5: wins where acc = 1 (5 of 12), ties elsewhere
    assert got["win_rate"] == pytest.approx((5 + 0.5 * 7) / 12)


@pytest.mark.slow  # two spawned processes (~10 s): the default tier stays under 5 minutes on 2 cores
def test_predict_under_two_process_ddp_writes_each_prompt_once(tmp_path):
    prompts = write_prompts(tmp_path / "heldout.jsonl", [{"prompt": f"pemo {i}"} for i in range(7)])
    env = fresh_env(OMP_NUM_THREADS="1")
    args = [
        "predict",
        "--config",
        str(CONFIGS / "grpo.yaml"),
        *EVAL,
        f"--data.predict_path={prompts}",
        "--data.batch_size=2",
        "--eval.num_samples=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        f"--eval.output={tmp_path / 'p.jsonl'}",
    ]
    proc = subprocess.run([sys.executable, "-m", "src", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(7) for s in range(2)]


def test_bad_predict_input_is_one_clear_error(run_cli, tmp_path):
    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": "pemo"}, {"question": "no prompt here"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2: field 'prompt'"):
        run_cli(["predict", "--config", "grpo.yaml", *EVAL, f"--data.predict_path={bad}"])
    run_cli(["fit", "--config", "dpo.yaml", *FAST])
    with pytest.raises(ValueError, match=r"checkpoint of src\.modules\.dpo\.DPO, but this config builds .*GRPO"):
        run_cli(["predict", "--config", "grpo.yaml", "--ckpt_path=runs/dpo/checkpoints/last.ckpt", *EVAL])
    with pytest.raises(SystemExit, match=r"eval\.reference_path: '.*nope': not a local directory"):
        run_cli(["test", "--config", "grpo.yaml", *EVAL, f"--eval.reference_path={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="has no language-model head"):
        run_cli(["predict", "--config", "rm.yaml", *EVAL])


def test_a_reward_model_judges_the_win_rate(run_cli, tmp_path):
    """--eval.reward_model_path: a trained reward model (the RM default's export) is the judge. Greedy policy =
    reference (nothing trained), so every pair ties: win rate exactly 0.5; the model's score is logged by name."""
    run_cli(["fit", "--config", "rm.yaml", *FAST])
    judge = ["--eval.reward_model_path=runs/rm/hf", "--eval.reward_funcs=null", "--eval.reward_weights=null"]
    cli = run_cli(["test", "--config", "dpo.yaml", *EVAL, "--eval.temperature=0", *judge])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["test/win_rate"] == 0.5
    assert [k for k in metrics if k.startswith("test/rewards/")] == ["test/rewards/reward_model/mean"], metrics
    assert math.isfinite(metrics["test/rewards/reward_model/mean"])
    with pytest.raises(ValueError, match=r"eval\.reward_weights has 2 weights for the 3 judges"):  # dpo.yaml's 2 + RM
        run_cli(["test", "--config", "dpo.yaml", *EVAL, "--eval.reward_model_path=runs/rm/hf"])
    with pytest.raises(SystemExit, match=r"eval\.reward_model_path: '.*no_rm'"):
        run_cli(["test", "--config", "dpo.yaml", *EVAL, f"--eval.reward_model_path={tmp_path / 'no_rm'}"])


def test_evaluation_during_fit_logs_eval_metrics_every_n_steps(run_cli):
    """--eval.every_n_steps N: the test metrics on a fixed held-out subset, as eval/* rows of metrics.csv."""
    cli = run_cli(
        [
            "fit",
            "--config",
            "grpo.yaml",
            *FAST,
            "--eval.every_n_steps=2",
            "--eval.num_prompts=4",
            "--eval.max_new_tokens=8",
            "--eval.num_samples=2",
            "--eval.reward_funcs=[src.rewards.digit_fraction,src.rewards.accuracy]",
        ]
    )
    import csv

    with open(Path(cli.trainer.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/win_rate")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)) >= 1  # once per evaluation step, not once per micro-batch
    for r in rows:
        assert 0 <= float(r["eval/win_rate"]) <= 1 and 0 <= float(r["eval/rewards/digit_fraction/mean"]) <= 1
        assert float(r["eval/completions/mean_length"]) >= 1 and r["eval/pass@2"] != ""
    assert cli.model.training  # evaluation puts the module back in training mode


@pytest.mark.slow
def test_trained_dpo_default_beats_its_reference_under_the_default_judge(run_cli):
    """Done-when of issue 23: ``test`` of the trained DPO default, judged by configs/dpo.yaml's eval rewards (the
    tiny preference: copy the prompt, fewer numbers), wins ≥ 0.7 against the reference (its initial weights)."""
    run_cli(["fit", "--config", "dpo.yaml", "--trainer.enable_progress_bar=false"])
    cli = run_cli(["test", "--config", "dpo.yaml", "--ckpt_path=runs/dpo/checkpoints/last.ckpt"])
    metrics = cli.trainer.callback_metrics
    assert float(metrics["test/win_rate"]) >= 0.7
    assert float(metrics["test/rewards/digit_fraction/mean"]) < 0.1  # the reference's text is ~20% digits
    assert (Path(cli.trainer.log_dir) / "test_summary.csv").read_text().startswith("metric,value\n")
