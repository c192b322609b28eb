"""The benchmark runner (``benchmarks/run.py``) and the forward-pass savings it measures.

* A smoke run of the shared CPU workload through the CLI (2 steps, not timed): JSON keys, step-1 loss = ln 2.
* The savings in :func:`src.modules.base.completion_hidden` compute the same states and gradients as one plain
  forward over the rows: rows sharing a prompt run it once (DPO chosen/rejected, GRPO generations), large CPU batches
  run in length-sorted groups.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.modules import base

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = (Path(__file__).parents[1] / ".." / "shared" / "bench" / "artifacts").resolve()
KEYS = {
    "steps", "train_wall_s", "steps_per_s", "tokens_per_s", "tokens_total", "tokens_padded_total", "peak_rss_mib",
    "final_loss", "losses", "first_step_s", "median_step_s_excl_first", "setup_s",
}  # fmt: skip


@pytest.mark.skipif(
    not (ARTIFACTS / "model").exists() or not (ARTIFACTS / "dpo_pairs.jsonl").exists(),
    reason=f"benchmark workload not built at {ARTIFACTS} (python ../shared/bench/workload.py --out DIR)",
)
def test_run_dpo_two_steps_through_the_cli():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "dpo", "--artifacts", str(ARTIFACTS), "--steps", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result), KEYS - set(result)
    assert result["steps"] == 2 and len(result["losses"]) == 2
    assert result["first_loss"] == pytest.approx(0.693147, abs=1e-6)  # policy == reference at step 1: ln 2
    assert result["losses"][0] == pytest.approx(0.69315, abs=1e-5)  # the curve is rounded to 5 digits, as TRL's
    assert result["tokens_total"] < result["tokens_padded_total"]
    assert result["tokens_per_s"] > 0 and result["peak_rss_mib"] > 0


# ------------------------------------------------------------------------------------- same states, fewer positions
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return base.load_causal_lm("tiny").double()  # float64: rounding differences (~1e-7) stay far below the tolerances


def _batch(prompts, completions, *, left_pad_prompts: bool):
    """``[pad] prompt completion [pad]`` rows (prompts left-aligned on a common column if ``left_pad_prompts``)."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    ids = torch.zeros(len(prompts), P + C, dtype=torch.long)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        s = P - len(p) if left_pad_prompts else 0
        ids[i, s : s + len(p) + len(c)] = torch.tensor(p + c)
        attn[i, s : s + len(p) + len(c)] = 1
        comp[i, s + len(p) : s + len(p) + len(c)] = 1
    return ids, attn, comp


def _random_tokens(g, n):
    return torch.randint(3, 2048, (n,), generator=g).tolist()


def _layouts():
    g = torch.Generator().manual_seed(0)
    lengths = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    prompts8 = [_random_tokens(g, lengths(20, 40)) for _ in range(8)]
    dpo = ([*prompts8, *prompts8], [_random_tokens(g, lengths(10, 40)) for _ in range(16)])
    prompts4 = [_random_tokens(g, lengths(10, 30)) for _ in range(4)]
    grpo = ([p for p in prompts4 for _ in range(4)], [_random_tokens(g, lengths(1, 20)) for _ in range(16)])
    unique = tuple([_random_tokens(g, lengths(5, 40)) for _ in range(16)] for _ in range(2))
    return {
        "dpo_16_rows_shared": (*dpo, False, True),
        "dpo_4_rows_shared": ([*prompts8[:2], *prompts8[:2]], dpo[1][:4], False, True),
        "grpo_left_padded_shared": (*grpo, True, True),
        "unique_prompts_grouped": (*unique, False, False),
    }


@pytest.fixture(params=["tree", "cache"])
def shared_layout(request, monkeypatch):
    """Force one of the two shared-prompt layouts (the default picks by attention cost)."""
    monkeypatch.setattr(base, "_TREE_MAX_ATTENTION", float("inf") if request.param == "tree" else 0.0)
    used = []
    for name in ("_tree_hidden", "_cached_hidden"):
        fn = getattr(base, name)
        monkeypatch.setattr(base, name, lambda *a, _fn=fn, _name=name: used.append(_name) or _fn(*a))
    return request.param, used


@pytest.mark.parametrize("layout", list(_layouts()))
def test_completion_hidden_matches_one_plain_forward(model, layout, shared_layout):
    prompts, completions, left_pad, shares = _layouts()[layout]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    assert (base.shared_prompt_hidden(model, ids, attn, comp) is not None) == shares
    assert used_layout(shared_layout) == (shared_layout[0] if shares else None)
    if layout == "unique_prompts_grouped":
        assert base.length_groups(attn, comp) is not None
    params = list(model.model.parameters())
    target = comp[:, 1:].bool()
    plain = base.decoder_hidden(model, ids, attn)[:, :-1][target]
    fast, fast_target = base.completion_hidden(model, ids, attn, comp)
    assert torch.equal(fast_target, target)
    assert fast.shape == plain.shape
    torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-9)
    g_plain = torch.autograd.grad(plain.square().mean(), params)
    g_fast = torch.autograd.grad(fast.square().mean(), params)
    for a, b in zip(g_fast, g_plain):
        assert ((a - b).norm() / b.norm().clamp(min=1e-30)).item() < 1e-5


def used_layout(shared_layout) -> str | None:
    used = shared_layout[1]
    name = {"_tree_hidden": "tree", "_cached_hidden": "cache"}.get(used[-1]) if used else None
    used.clear()
    return name


def test_tree_layout_with_eager_attention_uses_an_additive_mask(monkeypatch):
    monkeypatch.setattr(base, "_TREE_MAX_ATTENTION", float("inf"))
    used = []
    monkeypatch.setattr(base, "_tree_hidden", lambda *a, _fn=base._tree_hidden: used.append("tree") or _fn(*a))
    torch.manual_seed(0)
    eager = base.load_causal_lm("tiny", attn_implementation="eager").double()
    assert not base._bool_mask_ok(eager)
    prompts, completions, left_pad, _ = _layouts()["dpo_4_rows_shared"]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    plain = base.decoder_hidden(eager, ids, attn)[:, :-1][comp[:, 1:].bool()]
    # eager attention takes its softmax in float32, so the packed rows agree to float32 rounding, not float64
    torch.testing.assert_close(base.shared_prompt_hidden(eager, ids, attn, comp), plain, rtol=1e-4, atol=1e-5)
    assert used == ["tree"]


def test_layout_rule_prefers_the_tree_while_its_attention_is_cheap():
    # benchmark-like DPO: 8 prompts of 50 tokens, each with two completions of 50: tree 8*150^2 vs cache 1.3x less
    pairs = {tuple(range(i, i + 50)): [i, i + 8] for i in range(8)}
    assert base.shared_prompt_layout(pairs, [[3] * 50] * 16) == "tree"
    # GRPO with 16 long generations of one short prompt: the packed row's square is far larger than the cache's
    assert base.shared_prompt_layout({tuple(range(20)): list(range(16))}, [[3] * 200] * 16) == "cache"
    # a mask over the element budget is never built
    assert base.shared_prompt_layout({(1,): [0, 1]}, [[3] * 3000] * 2) == "cache"


def test_no_sharing_with_activation_checkpointing_or_irregular_rows(model):
    g = torch.Generator().manual_seed(1)
    p = _random_tokens(g, 10)
    ids, attn, comp = _batch([p, p], [_random_tokens(g, 5), _random_tokens(g, 7)], left_pad_prompts=False)
    assert base.shared_prompt_hidden(model, ids, attn, comp) is not None
    holey = comp.clone()
    holey[0, 12] = 0  # a completion with a hole: not [prompt][completion]
    assert base.shared_prompt_hidden(model, ids, attn, holey) is None
    empty = comp.clone()
    empty[1] = 0  # a row without completion tokens
    assert base.shared_prompt_hidden(model, ids, attn, empty) is None


def test_packed_rows_run_the_last_layer_only_where_states_are_read(model, monkeypatch):
    """The tree layout's last layer computes queries, attention output and MLP only at the positions whose states
    are read (keys/values everywhere): same states as the full packed forward."""
    monkeypatch.setattr(base, "_TREE_MAX_ATTENTION", float("inf"))
    assert base._reads_last_layer_sparsely(model, torch.device("cpu"))
    prompts, completions, left_pad, _ = _layouts()["dpo_16_rows_shared"]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    sparse = base.shared_prompt_hidden(model, ids, attn, comp)
    monkeypatch.setattr(base, "_reads_last_layer_sparsely", lambda *a: False)
    full = base.shared_prompt_hidden(model, ids, attn, comp)
    torch.testing.assert_close(sparse, full, rtol=1e-9, atol=1e-9)
    eager = base.load_causal_lm("tiny", attn_implementation="eager")
    assert not base._reads_last_layer_sparsely(eager, torch.device("cpu"))


def test_sharded_models_keep_the_models_own_forward():
    """FSDP-wrapped layers or sharded (ZeRO-3) parameters must run through their root module's forward: the sparse
    last layer, which calls the layers itself, is off for them."""
    m = base.load_causal_lm("tiny")
    cpu = torch.device("cpu")
    assert base._reads_last_layer_sparsely(m, cpu)
    layer = m.model.layers[0]
    layer.__class__ = type("FSDPLlamaDecoderLayer", (type(layer),), {})
    assert not base._reads_last_layer_sparsely(m, cpu)
    m = base.load_causal_lm("tiny")
    m.model.norm.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks its partitioned parameters
    assert not base._reads_last_layer_sparsely(m, cpu)
    assert not base._reads_last_layer_sparsely(base.load_causal_lm("tiny"), torch.device("meta"))


def _gqa_model(kind: str):
    """Small GQA models of the other supported families: Llama with biases, Qwen2 (q/k/v biases), float64."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tests.conftest import SMALL_LLAMA

    torch.manual_seed(0)
    cfg = dict(SMALL_LLAMA, vocab_size=2048, attn_implementation="sdpa")
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**cfg)).double()
    return LlamaForCausalLM(LlamaConfig(**cfg, attention_bias=True, mlp_bias=True)).double()


@pytest.mark.parametrize("kind", ["tiny", "llama_gqa_bias", "qwen2"])
def test_tree_rows_run_packed_without_padding(model, monkeypatch, kind):
    """Under SDPA on CPU the tree rows run packed end to end: the linear layers see only real tokens ([1, N]),
    attention runs per row, and the states and gradients equal those of one plain forward and of the padded rows with a
    4D mask (the fallback elsewhere), with and without the sparse last layer."""
    monkeypatch.setattr(base, "_TREE_MAX_ATTENTION", float("inf"))
    model = model if kind == "tiny" else _gqa_model(kind.split("_")[0])
    prompts, completions, left_pad, _ = _layouts()["dpo_16_rows_shared"]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    shapes = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: shapes.append(i[0].shape))
    packed = base.shared_prompt_hidden(model, ids, attn, comp)
    hook.remove()
    real = sum(len(p) for p in prompts[:8]) + sum(len(c) for c in completions)  # 8 prompts, each once
    assert shapes == [(1, real, model.config.hidden_size)]
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward
    plain = base.decoder_hidden(model, ids, attn)[:, :-1][comp[:, 1:].bool()]
    torch.testing.assert_close(packed, plain, rtol=1e-9, atol=1e-9)
    params = list(model.model.parameters())
    g_plain = torch.autograd.grad(plain.square().mean(), params)
    for a, b in zip(torch.autograd.grad(packed.square().mean(), params), g_plain):
        assert ((a - b).norm() / b.norm().clamp(min=1e-30)).item() < 1e-5
    monkeypatch.setattr(base, "_reads_last_layer_sparsely", lambda *a: False)
    torch.testing.assert_close(base.shared_prompt_hidden(model, ids, attn, comp), plain, rtol=1e-9, atol=1e-9)
    monkeypatch.setattr(base, "_packs_rows", lambda inner, device: False)
    padded = base.shared_prompt_hidden(model, ids, attn, comp)
    torch.testing.assert_close(packed, padded, rtol=1e-9, atol=1e-9)


def test_packed_rows_refuse_a_model_that_ignores_the_attention_interface(model, monkeypatch):
    """If a model's attention does not dispatch through transformers' AttentionInterface, the packed rows would attend
    across rows: this is detected and raised, never silently computed."""
    import contextlib

    monkeypatch.setattr(base, "_TREE_MAX_ATTENTION", float("inf"))
    monkeypatch.setattr(base, "_attention_implementation", lambda *a: contextlib.nullcontext())
    prompts, completions, left_pad, _ = _layouts()["dpo_4_rows_shared"]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    with pytest.raises(RuntimeError, match="AttentionInterface"):
        base.shared_prompt_hidden(model, ids, attn, comp)
