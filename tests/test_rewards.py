"""Tests for src.rewards: built-ins, the weighted combiner, its error messages and the reward-model scorer."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from src import rewards as R
from src.rewards import (
    LengthPenalty,
    RegexFormat,
    RewardModelScorer,
    RewardScorer,
    accuracy,
    combine_rewards,
    copy_reward,
    digit_fraction,
    extract_number,
    resolve_reward,
)

BENCH_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "bench" / "artifacts" / "model"


# --------------------------------------------------------------------------------------------------------------------
# Built-ins against hand values
# --------------------------------------------------------------------------------------------------------------------
def test_digit_fraction():
    out = digit_fraction(["p"] * 5, ["12 ab", "", "   ", "abc", " 7 8 9 "])
    assert out == [0.5, 0.0, 0.0, 0.0, 1.0]


def test_digit_fraction_matches_bench_workload():
    import importlib.util

    path = BENCH_TOKENIZER.parents[1] / "workload.py"
    if not path.exists():
        pytest.skip("bench workload not available")
    spec = importlib.util.spec_from_file_location("bench_workload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    completions = ["tamezi 47 daza", "", "12 3", " x y ", "9\n9 a"]
    assert digit_fraction([""] * 5, completions) == module.reward([""] * 5, completions)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is 42.", 42.0),
        ("3 apples + 4 = 7", 7.0),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", 72.0),
        ("#### 1,234", 1234.0),
        ("costs $5.50 total", 5.5),
        ("answer: \\boxed{-3} then 9", -3.0),
        ("no digits here", None),
        (12, 12.0),
        (None, None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_accuracy():
    completions = ["I think 72", "#### 71", "the result is 10.0", "x", "5"]
    answers = ["blah 48/2 = 24\n#### 72", "72", 10, "#### 3", None]
    assert accuracy([""] * 5, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, None]
    assert accuracy(["a"], ["1"]) == [None]  # no answer column


def test_copy_reward():
    prompts = ["tamezi 47 daza", "a b", "a b"]
    completions = [" tamezi daza 9 tamezi", "", "c d"]
    assert copy_reward(prompts, completions) == [0.75, 0.0, 0.0]


def test_regex_format():
    fmt = RegexFormat()
    assert fmt(
        [""] * 3,
        ["<think>x\ny</think> <answer>4</answer>", "<answer>4</answer>", " <think></think><answer>1</answer>\n"],
    ) == [
        1.0,
        0.0,
        1.0,
    ]
    digits = RegexFormat(r"\d+", mode="search", name="has_digit")
    assert digits(["", ""], ["ab 3", "ab"]) == [1.0, 0.0]
    assert R.reward_name(digits) == "has_digit"
    with pytest.raises(ValueError, match="mode"):
        RegexFormat(mode="match")


def test_length_penalty():
    over = LengthPenalty(target_chars=4, scale=2.0)
    assert over([""] * 3, ["ab", "abcd", "abcdef"]) == [0.0, 0.0, -1.0]
    both = LengthPenalty(target_chars=4, mode="abs")
    assert both([""] * 2, ["ab", "abcdef"]) == [-0.5, -0.5]


# --------------------------------------------------------------------------------------------------------------------
# Resolving by import path
# --------------------------------------------------------------------------------------------------------------------
def test_resolve_reward_paths():
    assert resolve_reward("src.rewards.digit_fraction") is digit_fraction
    assert resolve_reward("src.rewards:copy_reward") is copy_reward
    assert resolve_reward(accuracy) is accuracy
    assert isinstance(resolve_reward("src.rewards.RegexFormat"), RegexFormat)  # class without arguments
    penalty = resolve_reward({"class_path": "src.rewards.LengthPenalty", "init_args": {"target_chars": 10}})
    assert isinstance(penalty, LengthPenalty) and penalty.target_chars == 10


@pytest.mark.parametrize("spec", ["src.rewards.no_such_reward", "no_such_pkg.mod.func", "nodots"])
def test_resolve_reward_unknown_path(spec):
    with pytest.raises((ImportError, ValueError), match=spec.split(".")[-1]) as info:
        resolve_reward(spec)
    assert spec in str(info.value)


def test_resolve_reward_class_needing_arguments():
    with pytest.raises(ValueError, match="init_args"):
        resolve_reward("src.rewards.RewardModelScorer")


# --------------------------------------------------------------------------------------------------------------------
# RewardScorer: weights, None semantics, errors
# --------------------------------------------------------------------------------------------------------------------
def const(value):
    def f(prompts, completions, **_):
        return [value(i) if callable(value) else value for i in range(len(completions))]

    return f


def test_scorer_weights_and_none():
    def half_none(prompts, completions, **_):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    def linear(prompts, completions, **_):
        return [float(i) for i in range(len(completions))]

    scorer = RewardScorer([half_none, linear], weights=[2.0, 0.5])
    total, metrics = scorer(["p"] * 4, ["c"] * 4, {})
    # row i: 2*[1, None, 1, None][i] + 0.5*i
    torch.testing.assert_close(total, torch.tensor([2.0, 0.5, 3.0, 1.5]))
    assert metrics["rewards/half_none/mean"].item() == 1.0  # None excluded from the mean
    assert metrics["rewards/linear/mean"].item() == 1.5
    per_func = scorer.score(["p"] * 4, ["c"] * 4)
    assert per_func.shape == (4, 2) and per_func[1, 0].isnan()


def test_scorer_columns_are_passed():
    scorer = RewardScorer(["src.rewards.accuracy", "src.rewards.digit_fraction"])
    total, metrics = scorer(["q1", "q2"], ["12", "ab"], {"answer": ["#### 12", "#### 3"]})
    torch.testing.assert_close(total, torch.tensor([2.0, 0.0]))
    assert set(metrics) == {
        "rewards/accuracy/mean",
        "rewards/accuracy/std",
        "rewards/digit_fraction/mean",
        "rewards/digit_fraction/std",
    }


def test_scorer_all_none_row_warns_and_is_nan():
    """TRL 1.16: a sample no function scores is NaN (not 0), so that it cannot bias its group's baseline."""
    scorer = RewardScorer([const(None), accuracy])
    with pytest.warns(UserWarning, match="All reward functions returned None"):
        total, metrics = scorer(["p", "p"], ["1", "2"], {"answer": [None, "2"]})
    assert math.isnan(total[0].item()) and total[1].item() == 1.0
    assert math.isnan(metrics["rewards/f/mean"].item())


def test_combine_rewards_nansum_unless_all_none():
    nan = math.nan
    per_func = torch.tensor([[1.0, nan], [nan, nan], [2.0, 3.0], [nan, 4.0]])
    total = combine_rewards(per_func, torch.tensor([2.0, 0.5]))
    assert total[1].isnan()
    torch.testing.assert_close(total[[0, 2, 3]], torch.tensor([2.0, 5.5, 2.0]))


def test_scorer_duplicate_names_are_made_unique():
    scorer = RewardScorer([RegexFormat(r"a"), RegexFormat(r"b")])
    assert scorer.names == ["format", "format_1"]


def test_scorer_weights_length_mismatch():
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        RewardScorer([digit_fraction], weights=[1.0, 2.0])


def test_scorer_function_raises_names_function_sample_and_prompt():
    def picky(prompts, completions, **_):
        return [1.0 / (len(c) - 3) for c in completions]  # fails on a 3-char completion

    scorer = RewardScorer([digit_fraction, picky])
    with pytest.raises(RuntimeError, match=r"'picky' raised on sample 2 \(prompt 'third prompt'\)") as info:
        scorer(["first", "second", "third prompt"], ["a", "ab", "abc"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_scorer_wrong_length():
    with pytest.raises(ValueError, match=r"'short' returned 1 values, expected 3"):
        RewardScorer([_named("short", lambda p, c, **_: [1.0])])(["p"] * 3, ["c"] * 3)


def test_scorer_wrong_type():
    with pytest.raises(ValueError, match=r"'text' returned str for sample 0"):
        RewardScorer([_named("text", lambda p, c, **_: ["1"] * len(c))])(["p"], ["c"])
    with pytest.raises(ValueError, match=r"'scalar' must return a list"):
        RewardScorer([_named("scalar", lambda p, c, **_: 1.0)])(["p"], ["c"])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_scorer_nan_or_inf(bad):
    func = _named("broken", lambda p, c, **_: [0.0, bad])
    with pytest.raises(ValueError, match=r"'broken' returned (nan|inf) for sample 1"):
        RewardScorer([func])(["p", "p"], ["c", "c"])


def test_scorer_accepts_tensor_output():
    total, _ = RewardScorer([_named("t", lambda p, c, **_: torch.tensor([1.0, 2.0]))])(["p", "p"], ["c", "c"])
    torch.testing.assert_close(total, torch.tensor([1.0, 2.0]))


def test_scorer_timeout():
    def sleepy(prompts, completions, **_):
        time.sleep(5)
        return [0.0] * len(completions)

    scorer = RewardScorer([digit_fraction, sleepy], timeout_s=0.2)
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="'sleepy' did not return within 0.2 s"):
        scorer(["p"], ["c"])
    assert time.perf_counter() - start < 2.0
    # Fast functions still work under a timeout, and their exceptions keep their type in the chain.
    assert RewardScorer([digit_fraction], timeout_s=1.0)(["p"], ["1"])[0].item() == 1.0


def hanging_reward(prompts, completions, **_):
    """Importable by path for the CLI test below: hangs (for 3 s)."""
    time.sleep(3)
    return [0.0] * len(completions)


def test_reward_timeout_is_an_option_of_the_grpo_config(run_cli):
    """``reward_timeout_s`` reaches the scorer from the command line (GRPO and PPO share it: OnlineModule)."""
    from tests.conftest import FAST

    args = [
        "--model.init_args.reward_funcs=[tests.test_rewards.hanging_reward]",
        "--model.init_args.reward_timeout_s=0.3",
    ]
    with pytest.raises(TimeoutError, match="'hanging_reward' did not return within 0.3 s"):
        run_cli(["fit", "--config", "grpo.yaml", *FAST, "--trainer.max_steps=1", *args])


def _named(name, func):
    func.__name__ = name
    return func


# --------------------------------------------------------------------------------------------------------------------
# RewardModelScorer
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from src.data.tiny import load_tokenizer

    tokenizer = load_tokenizer()  # the shipped tiny tokenizer (the same file as the bench workload's)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_scorer_matches_manual_forward(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = ["tamezi 47 daza", "vedi", "a b c d e f g"]
    completions = [" 12 13", " tigu vepe sigo togo", ""]
    scorer = RewardModelScorer(reward_model_dir, batch_size=2, device="cpu")
    scores = scorer(prompts, completions, answer=[1, 2, 3])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    with torch.no_grad():
        manual = [
            model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, completions)
        ]
    assert scores == pytest.approx(manual, abs=1e-5)
    assert R.reward_name(scorer) == reward_model_dir.name


def test_reward_model_scorer_from_class_path(reward_model_dir):
    spec = {"class_path": "src.rewards.RewardModelScorer", "init_args": {"path": str(reward_model_dir)}}
    scorer = RewardScorer([spec, digit_fraction], weights=[1.0, 0.0])
    total, metrics = scorer(["p", "q"], [" 1", " x"])
    assert total.shape == (2,) and torch.isfinite(total).all()
    assert f"rewards/{reward_model_dir.name}/mean" in metrics


def test_reward_model_scorer_with_a_missing_path_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"^reward model path '/no/such/rm' does not exist$"):
        RewardModelScorer("/no/such/rm", device="cpu")
    monkeypatch.chdir(tmp_path)  # a relative name that is no directory here: the local HF cache is tried, offline
    with pytest.raises(FileNotFoundError, match=r"^reward model 'runs/rm/hf': not a local directory") as e:
        RewardModelScorer("runs/rm/hf", device="cpu")
    assert "\n" not in str(e.value)
