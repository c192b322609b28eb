"""Reward functions for GRPO and PPO: the API, built-ins, a reward-model scorer and a weighted combiner.

A reward function has the signature (as in TRL)::

    f(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` holds the dataset's other columns for the batch (e.g. ``answer``), one value per sample; functions take
what they need and ignore the rest via ``**_``. ``None`` means "not applicable to this sample": it is left out of
that function's mean and contributes nothing to the total. A sample for which *every* function returns None is
unscorable: its total is NaN, which the advantage estimators of ``src.losses`` leave out of the baseline and turn
into advantage 0 (TRL 1.16's semantics). In YAML a function is named by its import path
(``src.rewards.digit_fraction``, or ``pkg.mod:func``); a parameterised one is a class given with ``class_path`` and
``init_args``, whose instances are callable.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import inspect
import math
import numbers
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RewardFunction",
    "resolve_reward",
    "reward_name",
    "digit_fraction",
    "accuracy",
    "extract_number",
    "copy_reward",
    "RegexFormat",
    "LengthPenalty",
    "RewardModelScorer",
    "RewardScorer",
    "combine_rewards",
]

RewardFunction = Callable[..., list[float | None]]


# --------------------------------------------------------------------------------------------------------------------
# Resolving functions named in YAML
# --------------------------------------------------------------------------------------------------------------------
def resolve_reward(spec: str | Callable | dict) -> Callable:
    """Turn a reward spec into a callable.

    Accepts a callable (returned as is), an import path ``"pkg.mod.func"`` / ``"pkg.mod:func"`` (a class found there
    is instantiated without arguments), or a ``{"class_path": ..., "init_args": {...}}`` mapping.
    """
    if callable(spec) and not isinstance(spec, type):
        return spec
    if isinstance(spec, dict):
        if "class_path" not in spec:
            raise ValueError(f"reward spec {spec!r} is a mapping without 'class_path'")
        cls = _import_object(spec["class_path"])
        try:
            return cls(**(spec.get("init_args") or {}))
        except Exception as err:
            raise ValueError(f"could not construct reward {spec['class_path']!r}: {err}") from err
    if isinstance(spec, type):
        obj = spec
        spec = f"{obj.__module__}.{obj.__qualname__}"
    elif isinstance(spec, str):
        obj = _import_object(spec)
    else:
        raise TypeError(f"reward spec must be a callable, an import path or a class_path mapping, got {spec!r}")
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as err:
            raise ValueError(
                f"reward class {spec!r} needs arguments; give it as class_path + init_args: {err}"
            ) from err
    if not callable(obj):
        raise TypeError(f"reward {spec!r} resolved to {type(obj).__name__}, which is not callable")
    return obj


def _import_object(path: str) -> Any:
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"cannot import reward {path!r}: expected 'package.module.name' or 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import reward {path!r}: module {module_name!r} not found ({err})") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"cannot import reward {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def reward_name(func: Callable) -> str:
    """Name used in metrics: a ``name`` attribute, else ``__name__``, else the class name."""
    name = getattr(func, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(func, functools.partial):
        return reward_name(func.func)
    return getattr(func, "__name__", None) or type(func).__name__


def _text(completion: Any) -> str:
    """Completion text; a conversational completion (list of messages) gives its last message's content."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


# --------------------------------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------------------------------
def digit_fraction(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """Fraction of the non-whitespace characters of each completion that are ASCII digits (0.0 when empty).

    Identical to the benchmark workload's reward (``shared/bench/workload.py``).
    """
    out = []
    for completion in completions:
        chars = [c for c in _text(completion) if not c.isspace()]
        out.append(sum(c in "0123456789" for c in chars) / len(chars) if chars else 0.0)
    return out


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_number(text: Any) -> float | None:
    """The final numeric answer in ``text``, GSM8K style, or None if there is none.

    Looks, in order, after the last ``####``, inside the last ``\\boxed{...}``, then anywhere, and takes the last
    number found there. Thousands separators and ``$`` are ignored. Numbers (int/float) are returned as floats.
    """
    if text is None:
        return None
    if isinstance(text, numbers.Real) and not isinstance(text, bool):
        return float(text)
    text = _text(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    else:
        boxed = _BOXED.findall(text)
        if boxed:
            text = boxed[-1]
    found = _NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def accuracy(
    prompts: list[str], completions: list[str], answer: Sequence[Any] | None = None, **_: Any
) -> list[float | None]:
    """1.0 if the completion's final number equals the ``answer`` column's, else 0.0 (GSM8K-style).

    ``answer`` may be a number or a string such as a GSM8K solution ending in ``#### 42``. Samples without an
    answer (no column, or a None value, or no number in it) get None.
    """
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        target = extract_number(gold)
        if target is None:
            out.append(None)
            continue
        got = extract_number(completion)
        out.append(float(got is not None and math.isclose(got, target, rel_tol=1e-6, abs_tol=1e-6)))
    return out


accuracy.answer_checked = True  # src.evaluate reports its mean as accuracy and its pass@k


def copy_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """Fraction of the completion's whitespace-separated words that occur in its prompt (0.0 when empty).

    Rewards copying, the slow-to-learn preference of the project's tiny synthetic task.
    """
    out = []
    for prompt, completion in zip(prompts, completions):
        words = _text(completion).split()
        vocab = set(_text(prompt).split())
        out.append(sum(w in vocab for w in words) / len(words) if words else 0.0)
    return out


class RegexFormat:
    """1.0 if the completion matches ``pattern``, else 0.0.

    Args:
        pattern: A regular expression; the default is the ``<think>…</think><answer>…</answer>`` format reward.
        mode: ``"fullmatch"`` (the whole completion, after stripping surrounding whitespace) or ``"search"``.
        dotall: Let ``.`` match newlines.
        name: Metric name; defaults to ``format``.
    """

    def __init__(
        self,
        pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>",
        mode: str = "fullmatch",
        dotall: bool = True,
        name: str = "format",
    ):
        if mode not in ("fullmatch", "search"):
            raise ValueError(f"mode must be 'fullmatch' or 'search', got {mode!r}")
        self.regex = re.compile(pattern, re.DOTALL if dotall else 0)
        self.mode, self.name = mode, name

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        if self.mode == "fullmatch":
            return [float(self.regex.fullmatch(_text(c).strip()) is not None) for c in completions]
        return [float(self.regex.search(_text(c)) is not None) for c in completions]


class LengthPenalty:
    """Non-positive reward for length in characters: ``-scale * excess / target_chars``.

    ``excess`` is ``max(len - target_chars, 0)`` with ``mode="over"`` (only overlong completions pay) and
    ``|len - target_chars|`` with ``mode="abs"`` (any deviation pays).
    """

    def __init__(self, target_chars: int = 200, scale: float = 1.0, mode: str = "over", name: str = "length_penalty"):
        if target_chars <= 0:
            raise ValueError(f"target_chars must be > 0, got {target_chars}")
        if mode not in ("over", "abs"):
            raise ValueError(f"mode must be 'over' or 'abs', got {mode!r}")
        self.target_chars, self.scale, self.mode, self.name = target_chars, scale, mode, name

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        out = []
        for completion in completions:
            diff = len(_text(completion)) - self.target_chars
            excess = abs(diff) if self.mode == "abs" else max(diff, 0)
            out.append(-self.scale * excess / self.target_chars)
        return out


# --------------------------------------------------------------------------------------------------------------------
# A trained reward model as a reward source
# --------------------------------------------------------------------------------------------------------------------
class RewardModelScorer:
    """Scores ``template.format(prompt=..., completion=...)`` with a sequence-classification checkpoint.

    The score is the model's single logit, read at the last real token (Hugging Face's pooling; the tokenizer pads on
    the right). Runs in eval mode without autograd, in batches of similar length. Put any special tokens the reward
    model was trained with (e.g. a trailing EOS) into ``template``.

    Args:
        path: Local directory with the model and its tokenizer (or a cached hub name).
        batch_size: Texts per forward pass.
        device: Where to run; defaults to CUDA when available, else CPU.
        template: How prompt and completion are joined into the scored text.
        max_length: Truncate scored texts to this many tokens (None: no truncation).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        template: str = "{prompt}{completion}",
        max_length: int | None = None,
    ):
        from transformers import AutoTokenizer

        from src.models import load_causal_lm

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_causal_lm(str(path), auto_class="AutoModelForSequenceClassification", what="reward model")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {str(path)!r} must have num_labels=1, has {self.model.config.num_labels}")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False)
        self.batch_size, self.template, self.max_length = batch_size, template, max_length
        self.name = Path(str(path)).name or "reward_model"

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        texts = [self.template.format(prompt=_text(p), completion=_text(c)) for p, c in zip(prompts, completions)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = [0.0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            for i, value in zip(idx, logits[:, 0].float().tolist()):
                scores[i] = value
        return scores


# --------------------------------------------------------------------------------------------------------------------
# Combining several reward functions
# --------------------------------------------------------------------------------------------------------------------
def combine_rewards(rewards_per_func: Tensor, weights: Tensor) -> Tensor:
    """The weighted total of ``[B, F]`` per-function rewards (NaN for None), as TRL 1.16's GRPO/RLOO trainers:
    ``nansum_k(w_k r_k)`` where at least one function scored the sample, NaN where none did (an unscorable sample;
    ``nansum`` alone would make it 0 and let it bias its group's baseline)."""
    total = torch.nansum(rewards_per_func * weights.to(rewards_per_func).unsqueeze(0), dim=1)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    return torch.where(unscorable, torch.full_like(total, math.nan), total)


class RewardScorer:
    """Calls several reward functions, checks their output and combines them with weights (TRL semantics).

    Per-function rewards form ``[B, F]`` with NaN for None; the total is :func:`combine_rewards`,
    ``nansum(rewards * weights, dim=1)``, so a None contributes nothing. A sample where every function returns None
    triggers a warning (as in TRL) and gets total NaN: GRPO, RLOO and PPO leave it out of their baselines and give it
    advantage 0. Metrics ``rewards/<name>/mean`` and ``rewards/<name>/std`` are over that function's non-None samples
    (NaN if it returned None for all).

    Args:
        funcs: Reward functions, import paths or ``class_path`` mappings (see :func:`resolve_reward`).
        weights: One weight per function (default 1.0 each).
        timeout_s: If set, each call runs in a daemon worker thread and a function that has not returned after
            ``timeout_s`` seconds raises ``TimeoutError`` (the stuck thread is abandoned, not killed).
    """

    def __init__(
        self,
        funcs: Sequence[str | Callable | dict],
        weights: Sequence[float] | None = None,
        timeout_s: float | None = None,
    ):
        if isinstance(funcs, (str, dict)) or callable(funcs):
            funcs = [funcs]
        if not funcs:
            raise ValueError("RewardScorer needs at least one reward function")
        self.funcs = [resolve_reward(f) for f in funcs]
        if weights is None:
            weights = [1.0] * len(self.funcs)
        if len(weights) != len(self.funcs):
            raise ValueError(f"got {len(weights)} reward weights for {len(self.funcs)} reward functions")
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.names = _unique([reward_name(f) for f in self.funcs])

    def score(
        self, prompts: list[str], completions: list[str], columns: dict[str, Sequence] | None = None, **extra: Any
    ) -> Tensor:
        """Raw rewards ``[B, F]`` (float32, NaN where a function returned None)."""
        batch = len(completions)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} completions")
        kwargs = dict(columns or {})
        for key, values in kwargs.items():
            if len(values) != batch:
                raise ValueError(f"column {key!r} has {len(values)} values for {batch} completions")
        kwargs.update(extra)
        out = torch.full((batch, len(self.funcs)), math.nan, dtype=torch.float32)
        for j, (func, name) in enumerate(zip(self.funcs, self.names)):
            values = self._call(func, name, prompts, completions, kwargs)
            out[:, j] = torch.tensor(_check_output(values, name, batch), dtype=torch.float32)
        return out

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, Sequence] | None = None, **extra: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total reward ``[B]`` (NaN where every function returned None) and per-function metrics
        ``{"rewards/<name>/mean": ..., ".../std": ...}``."""
        return self.combine(self.score(prompts, completions, columns, **extra))

    def combine(self, per_func: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`combine_rewards` of raw ``[B, F]`` rewards from :meth:`score`, and the per-function metrics."""
        all_none = per_func.isnan().all(dim=1)
        if all_none.any():
            rows = all_none.nonzero().flatten().tolist()
            warnings.warn(
                f"All reward functions returned None for samples {rows[:10]}{' ...' if len(rows) > 10 else ''}; "
                "their total reward is NaN: they get advantage 0 and stay out of their group's baseline. Make sure "
                "at least one reward function applies to every sample.",
                stacklevel=3,
            )
        total = combine_rewards(per_func, self.weights)
        metrics: dict[str, Tensor] = {}
        for j, name in enumerate(self.names):
            col = per_func[:, j]
            valid = col[~col.isnan()]
            metrics[f"rewards/{name}/mean"] = valid.mean() if valid.numel() else torch.tensor(math.nan)
            metrics[f"rewards/{name}/std"] = valid.std() if valid.numel() > 1 else torch.tensor(math.nan)
        return total, metrics

    def _call(self, func: Callable, name: str, prompts: list, completions: list, kwargs: dict) -> Any:
        try:
            if self.timeout_s is None:
                return func(prompts, completions, **kwargs)
            return _call_with_timeout(func, name, self.timeout_s, prompts, completions, kwargs)
        except TimeoutError:
            raise
        except Exception as err:
            raise _locate_failure(func, name, prompts, completions, kwargs, err) from err


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}_{count}")
    return out


def _call_with_timeout(
    func: Callable, name: str, timeout_s: float, prompts: list, completions: list, kwargs: dict
) -> Any:
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(func(prompts, completions, **kwargs))
        except BaseException as err:  # handed to the caller
            future.set_exception(err)

    # A daemon thread, so that a function that never returns cannot block interpreter exit.
    threading.Thread(target=run, name=f"reward-{name}", daemon=True).start()
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"reward function {name!r} did not return within {timeout_s} s") from None


def _locate_failure(
    func: Callable, name: str, prompts: list, completions: list, kwargs: dict, err: Exception
) -> RuntimeError:
    """Name the first sample that fails, re-running sample by sample (only on this error path)."""
    bad: int | None = 0 if len(completions) == 1 else None
    if bad is None and not inspect.iscoroutinefunction(func):
        for i in range(len(completions)):
            single = {k: v[i : i + 1] if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
            try:
                func(prompts[i : i + 1], completions[i : i + 1], **single)
            except Exception:  # only the index matters here
                bad = i
                break
    where = f"sample {bad}" if bad is not None else f"a batch of {len(completions)} samples"
    prompt = _text(prompts[bad or 0]) if prompts else ""
    prompt = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    return RuntimeError(f"reward function {name!r} raised on {where} (prompt {prompt!r}): {type(err).__name__}: {err}")


def _check_output(values: Any, name: str, batch: int) -> list[float]:
    if isinstance(values, Tensor):
        values = values.detach().cpu().flatten().tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy arrays
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(
            f"reward function {name!r} must return a list of {batch} floats or None, got {type(values).__name__}"
        )
    if len(values) != batch:
        raise ValueError(f"reward function {name!r} returned {len(values)} values, expected {batch}")
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise ValueError(
                f"reward function {name!r} returned {type(value).__name__} for sample {i}, expected float or None"
            )
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"reward function {name!r} returned {value} for sample {i}; use None to skip a sample")
        out.append(value)
    return out
