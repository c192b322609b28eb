"""Every speed path of ``src/accel/`` against the plain path of ``src/logprobs.py`` / ``src/rollout.py``: the same
states, log-probs and gradients (float64 on the tiny Llama and small GQA Llama / Qwen2 models), the ``accel``
switch's resolution, and whole DPO/GRPO runs with ``accel: off`` vs ``auto``. (The decode-loop features are checked
token for token in ``tests/test_rollout.py``.)
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import pytest
import torch

from src.accel import FEATURES, Accel, packed, prefix
from src.logprobs import completion_hidden, completion_logps, decoder_hidden
from src.models import load_causal_lm
from tests.conftest import FAST, ROOT, read_metrics


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_causal_lm("tiny").double()  # float64: rounding differences (~1e-7) stay far below the tolerances


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
    monkeypatch.setattr(prefix, "_TREE_MAX_ATTENTION", float("inf") if request.param == "tree" else 0.0)
    used = []
    for name in ("tree_hidden", "cached_hidden"):
        fn = getattr(prefix, name)
        monkeypatch.setattr(prefix, name, lambda *a, _fn=fn, _name=name, **k: used.append(_name) or _fn(*a, **k))
    return request.param, used


def _assert_same_grads(fast: torch.Tensor, plain: torch.Tensor, params: list[torch.Tensor]) -> None:
    g_plain = torch.autograd.grad(plain.square().mean(), params, retain_graph=True)
    g_fast = torch.autograd.grad(fast.square().mean(), params, retain_graph=True)
    for a, b in zip(g_fast, g_plain):
        assert ((a - b).norm() / b.norm().clamp(min=1e-30)).item() < 1e-5


@pytest.mark.parametrize("layout", list(_layouts()))
def test_completion_hidden_matches_one_plain_forward(model, layout, shared_layout):
    """Prefix sharing (tree or cache layout) and length groups: the same states, log-probs and gradients as the
    plain path's one forward."""
    accel = Accel(FEATURES)
    prompts, completions, left_pad, shares = _layouts()[layout]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    assert (prefix.shared_prompt_hidden(model, ids, attn, comp) is not None) == shares
    assert used_layout(shared_layout) == (shared_layout[0] if shares else None)
    if layout == "unique_prompts_grouped":
        assert prefix.length_groups(attn, comp) is not None
    params = list(model.model.parameters())
    plain, target = completion_hidden(model, ids, attn, comp)
    fast, fast_target = completion_hidden(model, ids, attn, comp, accel)
    assert used_layout(shared_layout) == (shared_layout[0] if shares else None)
    assert torch.equal(fast_target, target)
    assert fast.shape == plain.shape
    torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-9)
    _assert_same_grads(fast, plain, params)
    lp_plain = completion_logps(model, ids, attn, comp, temperature=0.7)[0]
    lp_fast = completion_logps(model, ids, attn, comp, temperature=0.7, accel=accel)[0]
    torch.testing.assert_close(lp_fast, lp_plain, rtol=1e-9, atol=1e-9)
    _assert_same_grads(lp_fast, lp_plain, params)


def used_layout(shared_layout) -> str | None:
    used = shared_layout[1]
    name = {"tree_hidden": "tree", "cached_hidden": "cache"}.get(used[-1]) if used else None
    used.clear()
    return name


def test_tree_layout_with_eager_attention_uses_an_additive_mask(monkeypatch):
    monkeypatch.setattr(prefix, "_TREE_MAX_ATTENTION", float("inf"))
    used = []
    real = prefix.tree_hidden
    monkeypatch.setattr(prefix, "tree_hidden", lambda *a, **k: used.append("tree") or real(*a, **k))
    torch.manual_seed(0)
    eager = load_causal_lm("tiny", attn_implementation="eager").double()
    assert not packed.bool_mask_ok(eager)
    prompts, completions, left_pad, _ = _layouts()["dpo_4_rows_shared"]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    plain = decoder_hidden(eager, ids, attn)[:, :-1][comp[:, 1:].bool()]
    # eager attention takes its softmax in float32, so the packed rows agree to float32 rounding, not float64
    shared = prefix.shared_prompt_hidden(eager, ids, attn, comp, packed=True, sparse=True)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    assert used == ["tree"]


def test_layout_rule_prefers_the_tree_while_its_attention_is_cheap():
    # benchmark-like DPO: 8 prompts of 50 tokens, each with two completions of 50: tree 8*150^2 vs cache 1.3x less
    pairs = {tuple(range(i, i + 50)): [i, i + 8] for i in range(8)}
    assert prefix.shared_prompt_layout(pairs, [[3] * 50] * 16) == "tree"
    # GRPO with 16 long generations of one short prompt: the packed row's square is far larger than the cache's
    assert prefix.shared_prompt_layout({tuple(range(20)): list(range(16))}, [[3] * 200] * 16) == "cache"
    # packed rows attend by tree blocks (the cache layout's work without padding): the tree, as long as the masks fit
    assert prefix.shared_prompt_layout({tuple(range(20)): list(range(16))}, [[3] * 200] * 16, packed=True) == "tree"
    grpo = {tuple(range(64)): [0, 1, 2, 3], tuple(range(1, 65)): [4, 5, 6, 7]}  # the real GRPO benchmark at 128
    assert prefix.shared_prompt_layout(grpo, [[3] * 64] * 8) == "cache"
    assert prefix.shared_prompt_layout(grpo, [[3] * 64] * 8, packed=True) == "tree"
    # a mask over the element budget is never built
    assert prefix.shared_prompt_layout({(1,): [0, 1]}, [[3] * 3000] * 2) == "cache"
    assert prefix.shared_prompt_layout({(1,): [0, 1]}, [[3] * 3000] * 2, packed=True) == "cache"


def test_no_sharing_with_activation_checkpointing_or_irregular_rows(model):
    g = torch.Generator().manual_seed(1)
    p = _random_tokens(g, 10)
    ids, attn, comp = _batch([p, p], [_random_tokens(g, 5), _random_tokens(g, 7)], left_pad_prompts=False)
    assert prefix.shared_prompt_hidden(model, ids, attn, comp) is not None
    holey = comp.clone()
    holey[0, 12] = 0  # a completion with a hole: not [prompt][completion]
    assert prefix.shared_prompt_hidden(model, ids, attn, holey) is None
    empty = comp.clone()
    empty[1] = 0  # a row without completion tokens
    assert prefix.shared_prompt_hidden(model, ids, attn, empty) is None
    checkpointed = load_causal_lm("tiny")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert prefix.shared_prompt_hidden(checkpointed, ids, attn, comp) is None


def test_packed_rows_run_the_last_layer_only_where_states_are_read(model, monkeypatch):
    """The tree layout's last layer computes queries, attention output and MLP only at the positions whose states
    are read (keys/values everywhere): same states as the full packed forward."""
    monkeypatch.setattr(prefix, "_TREE_MAX_ATTENTION", float("inf"))
    assert packed.reads_last_layer_sparsely(model)
    prompts, completions, left_pad, _ = _layouts()["dpo_16_rows_shared"]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    sparse = prefix.shared_prompt_hidden(model, ids, attn, comp, packed=True, sparse=True)
    full = prefix.shared_prompt_hidden(model, ids, attn, comp, packed=True, sparse=False)
    torch.testing.assert_close(sparse, full, rtol=1e-9, atol=1e-9)
    _assert_same_grads(sparse, full, list(model.model.parameters()))
    eager = load_causal_lm("tiny", attn_implementation="eager")
    assert not packed.reads_last_layer_sparsely(eager)


def test_sharded_models_keep_the_models_own_forward():
    """FSDP-wrapped layers or sharded (ZeRO-3) parameters must run through their root module's forward: the sparse
    last layer, which calls the layers itself, is off for them."""
    m = load_causal_lm("tiny")
    assert packed.reads_last_layer_sparsely(m)
    layer = m.model.layers[0]
    layer.__class__ = type("FSDPLlamaDecoderLayer", (type(layer),), {})
    assert not packed.reads_last_layer_sparsely(m)
    m = load_causal_lm("tiny")
    m.model.norm.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks its partitioned parameters
    assert not packed.reads_last_layer_sparsely(m)


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
    monkeypatch.setattr(prefix, "_TREE_MAX_ATTENTION", float("inf"))
    model = model if kind == "tiny" else _gqa_model(kind.split("_")[0])
    prompts, completions, left_pad, _ = _layouts()["dpo_16_rows_shared"]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    shapes = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: shapes.append(i[0].shape))
    rows = prefix.shared_prompt_hidden(model, ids, attn, comp, packed=True, sparse=True)
    hook.remove()
    real = sum(len(p) for p in prompts[:8]) + sum(len(c) for c in completions)  # 8 prompts, each once
    assert shapes == [(1, real, model.config.hidden_size)]
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward
    plain = decoder_hidden(model, ids, attn)[:, :-1][comp[:, 1:].bool()]
    torch.testing.assert_close(rows, plain, rtol=1e-9, atol=1e-9)
    _assert_same_grads(rows, plain, list(model.model.parameters()))
    no_sparse = prefix.shared_prompt_hidden(model, ids, attn, comp, packed=True, sparse=False)
    torch.testing.assert_close(no_sparse, plain, rtol=1e-9, atol=1e-9)
    padded = prefix.shared_prompt_hidden(model, ids, attn, comp, packed=False)
    torch.testing.assert_close(rows, padded, rtol=1e-9, atol=1e-9)


def test_packed_rows_take_the_tree_where_padded_rows_take_the_cache_layout(model, monkeypatch):
    """GRPO-like rows (4 generations of a prompt as long as it): padded tree rows would cost 2.8x the cache layout's
    attention, packed ones attend by blocks, so packing runs one packed forward, and gives the cache layout's states."""
    g = torch.Generator().manual_seed(3)
    prompts = [p for p in (_random_tokens(g, 16), _random_tokens(g, 16)) for _ in range(4)]
    ids, attn, comp = _batch(prompts, [_random_tokens(g, 16) for _ in range(8)], left_pad_prompts=True)
    used = []
    for name in ("tree_hidden", "cached_hidden"):
        fn = getattr(prefix, name)
        monkeypatch.setattr(prefix, name, lambda *a, _fn=fn, _name=name, **k: used.append(_name) or _fn(*a, **k))
    packed = prefix.shared_prompt_hidden(model, ids, attn, comp, packed=True, sparse=True)
    cached = prefix.shared_prompt_hidden(model, ids, attn, comp, packed=False)
    assert used == ["tree_hidden", "cached_hidden"]
    torch.testing.assert_close(packed, cached, rtol=1e-9, atol=1e-9)


def test_packed_attention_runs_by_blocks_of_the_tree(monkeypatch):
    """Per packed row, attention runs the prompt causally and each completion over ``[prompt | itself]``: the same
    outputs and gradients as one SDPA call over the row's whole prefix-sharing mask, with no scores computed for the
    blocks where completions would see each other."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    prompt_len, completions = [4, 2], [[1, 5, 3], [2]]  # two packed rows: 4 + 9 and 2 + 2 tokens
    seg = [[0] * p + [i + 1 for i, n in enumerate(c) for _ in range(n)] for p, c in zip(prompt_len, completions)]
    n = sum(map(len, seg))
    q = torch.randn(1, 6, n, 8, generator=g, dtype=torch.float64, requires_grad=True)  # 6 query heads, 2 KV heads
    k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rows = packed.PackedRows.from_segments(seg, "cpu")
    assert rows.prompt_len == prompt_len and rows.spans == [[(4, 5), (5, 10), (10, 13)], [(2, 4)]]
    scores, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(
        F,
        "scaled_dot_product_attention",
        lambda q_, k_, *a, **kw: scores.append(q_.shape[2] * k_.shape[2]) or sdpa(q_, k_, *a, **kw),
    )
    out, _ = packed._packed_sdpa(None, q, k, v, None, scaling=0.3, packed=rows)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    dense = torch.cat(
        [
            sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], attn_mask=m, scale=0.3, enable_gqa=True).transpose(1, 2)
            for (a, b), m in zip(rows.bounds, rows.masks)
        ],
        1,
    )
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(dense.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert sum(scores) == (16 + 1 * 5 + 5 * 9 + 3 * 7) + (4 + 2 * 4)  # prompt^2 + sum c (p + c), not 13^2 + 4^2
    assert rows.calls == 1


def test_packed_rows_refuse_a_model_that_ignores_the_attention_interface(model, monkeypatch):
    """If a model's attention does not dispatch through transformers' AttentionInterface, the packed rows would attend
    across rows: this is detected and raised, never silently computed."""
    import contextlib

    monkeypatch.setattr(prefix, "_TREE_MAX_ATTENTION", float("inf"))
    monkeypatch.setattr(packed, "attention_implementation", lambda *a: contextlib.nullcontext())
    prompts, completions, left_pad, _ = _layouts()["dpo_4_rows_shared"]
    ids, attn, comp = _batch(prompts, completions, left_pad_prompts=left_pad)
    with pytest.raises(RuntimeError, match="AttentionInterface"):
        prefix.shared_prompt_hidden(model, ids, attn, comp, packed=True)


# --------------------------------------------------------------------------------------------- the switch itself
def test_auto_turns_on_only_what_was_measured_for_the_device_and_family(monkeypatch):
    from src.accel import onednn

    monkeypatch.setattr(onednn, "intel_cpu", lambda: False)
    llama = load_causal_lm("tiny")
    # onednn_linear from hidden size 512 (slower on the tiny model, faster on SmolLM2-135M)
    assert Accel.resolve("auto", llama, "cpu").features == frozenset(FEATURES) - {"onednn_linear"}
    wide = type("Wide", (torch.nn.Module,), {"config": type("C", (), {"model_type": "llama", "hidden_size": 576})()})
    assert Accel.resolve("auto", wide(), "cpu").features == frozenset(FEATURES)
    monkeypatch.setattr(onednn, "intel_cpu", lambda: True)  # MKL's own kernels are as fast there
    assert Accel.resolve("auto", wide(), "cpu").features == frozenset(FEATURES) - {"onednn_linear"}
    assert Accel.resolve(["onednn_linear"], wide(), "cpu").features == {"onednn_linear"}  # asked for: on
    monkeypatch.setattr(onednn, "intel_cpu", lambda: False)
    assert Accel.resolve("off", llama, "cpu").features == frozenset()
    assert Accel.resolve(None, llama, "cpu").features == frozenset()
    assert Accel.resolve("auto", llama, "cuda").features == frozenset()  # nothing measured on a GPU yet
    assert Accel.resolve("auto", llama, "meta").features == frozenset()

    class OtherFamily(torch.nn.Module):
        config = type("Config", (), {"model_type": "gemma2"})()

    any_model = {"growing_cache", "clip_with_norm", "dot_norm", "malloc", "own_weights", "early_adam_state"}
    any_model.add("concurrent_reference")
    assert Accel.resolve("auto", OtherFamily(), "cpu").features == any_model
    OtherFamily.config.hidden_size = 2048
    assert Accel.resolve("auto", OtherFamily(), "cpu").features == any_model | {"onednn_linear"}
    # a list is taken as given (each path still checks that it applies)
    assert Accel.resolve(["packed_rows", "prefix_sharing"], llama, "cuda").features == {"packed_rows", "prefix_sharing"}
    with pytest.raises(ValueError, match="unknown feature.*'packd_rows'"):
        Accel.resolve(["packd_rows"], llama, "cpu")


def test_intel_cpu_reads_the_vendor_of_proc_cpuinfo(monkeypatch, tmp_path):
    import builtins

    from src.accel import onednn

    real_open = builtins.open
    for vendor, intel in (("GenuineIntel", True), ("AuthenticAMD", False)):
        info = tmp_path / vendor
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 6\n")
        monkeypatch.setattr(
            builtins, "open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k)
        )
        assert onednn.intel_cpu() is intel
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("/proc/cpuinfo")))
    assert onednn.intel_cpu() is False


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_onednn_linear_equals_f_linear_forward_and_backward():
    """OneDnnLinear gives F.linear's outputs and gradients (x, W, b) to fp32 rounding; the mode routes nn.Linear
    through it for fp32 CPU tensors and leaves float64 and autocast to F.linear."""
    from src.accel import onednn

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160)
    x = torch.randn(3, 7, 96, requires_grad=True)
    g = torch.randn(3, 7, 160)
    y_plain = lin(x)
    grads_plain = torch.autograd.grad(y_plain, [x, lin.weight, lin.bias], g)
    calls = []
    real_apply = onednn.OneDnnLinear.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onednn.OneDnnLinear, "apply", lambda *a: calls.append(1) or real_apply(*a))
        with onednn.LinearMode():
            y = lin(x)
            y64 = torch.nn.Linear(96, 160).double()(x.detach().double())  # float64: F.linear
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y_bf16 = lin(x)  # autocast: F.linear in bf16
    assert len(calls) == 1
    assert y64.dtype == torch.float64 and y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(y, [x, lin.weight, lin.bias], g), grads_plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_onednn_linear_scores_like_the_plain_path():
    """completion_logps with onednn_linear (alone and with the packed prefix layout): the plain path's log-probs and
    gradients to fp32 rounding, the fused LM head's forward included; the mode is not left active afterwards."""
    from torch.overrides import _get_current_function_mode_stack

    from src.accel import onednn

    torch.manual_seed(0)
    model = load_causal_lm("tiny")  # float32: oneDNN's dtype
    ids, attn, comp = _batch(*_layouts()["dpo_4_rows_shared"][:2], left_pad_prompts=False)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = completion_logps(model, ids, attn, comp)[0]
    calls = []
    real_apply = onednn.OneDnnLinear.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onednn.OneDnnLinear, "apply", lambda *a: calls.append(a[1].shape) or real_apply(*a))
        for features in (["onednn_linear"], ["onednn_linear", "prefix_sharing", "packed_rows", "sparse_last_layer"]):
            calls.clear()
            fast = completion_logps(model, ids, attn, comp, accel=Accel(features))[0]
            torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
            _assert_same_grads(fast, plain, params)
            layers = model.config.num_hidden_layers
            assert len(calls) >= 7 * layers and model.lm_head.weight.shape in calls  # every projection and the head
    assert not _get_current_function_mode_stack()


def test_onednn_paths_stay_off_in_a_job_of_several_processes(monkeypatch):
    """Several ranks (not measured there): no oneDNN mode for scoring, no packed decode weights."""
    from torch.overrides import _get_current_function_mode_stack

    from src.accel.decode import Projection

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    with Accel(["onednn_linear"]).scoring(torch.nn.Linear(2, 2)):
        assert not _get_current_function_mode_stack()
    assert not Projection(torch.randn(8, 4), None, 2).packed
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 1)
    assert Projection(torch.randn(8, 4), None, 2).packed == torch.backends.mkldnn.is_available()


def test_an_unchecked_transformers_version_falls_back_to_the_plain_path(monkeypatch, caplog):
    import src.accel as accel

    monkeypatch.setattr(accel, "_transformers_major", lambda: 6)
    with caplog.at_level(logging.WARNING, logger="src.accel"):
        chosen = Accel.resolve("auto", load_causal_lm("tiny"), "cpu")
    # the ones that read no transformers internals
    assert chosen.features == {
        "clip_with_norm",
        "dot_norm",
        "concurrent_reference",
        "length_groups",
        "malloc",
        "own_weights",
        "early_adam_state",
    }
    assert len(caplog.records) == 1 and "not a checked version" in caplog.records[0].getMessage()


def test_an_unknown_feature_fails_when_the_module_is_built():
    from src.modules.dpo import DPO

    with pytest.raises(ValueError, match="accel: unknown feature"):
        DPO(accel=["fast"])


def test_tune_malloc_sets_glibc_thresholds_unless_the_user_chose(monkeypatch):
    """``malloc`` keeps glibc from unmapping large buffers between steps (mallopt), unless the user opted out or set
    the MALLOC_*_ variables; it is a no-op where the C library has no mallopt."""
    import ctypes
    import platform

    from src.accel import runtime

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    for k in ("ALIGN_MALLOC", *runtime._MALLOC_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert runtime.tune_malloc() is True
    assert calls == [(-3, 1 << 30), (-1, -1), (-2, 64 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (never), M_TOP_PAD
    calls.clear()
    monkeypatch.setattr(FakeLibc, "mallopt", lambda self, p, v: calls.append((p, v)) or int(p != -3))
    assert runtime.tune_malloc() is False and len(calls) == 3  # a refused threshold does not skip the others
    calls.clear()
    monkeypatch.setenv("ALIGN_MALLOC", "default")
    assert runtime.tune_malloc() is False and calls == []
    monkeypatch.delenv("ALIGN_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert runtime.tune_malloc() is False and calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")

    class NoMallopt:
        pass

    monkeypatch.setattr(ctypes, "CDLL", lambda name: NoMallopt())
    assert runtime.tune_malloc() is False
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        for k in ("ALIGN_MALLOC", *runtime._MALLOC_ENV):
            monkeypatch.delenv(k, raising=False)
        assert runtime.tune_malloc() is True  # the real glibc accepts the values


def test_malloc_applies_when_a_cpu_fit_starts_not_at_import(monkeypatch, run_cli):
    from src.accel import runtime

    calls = []
    monkeypatch.setattr(runtime, "tune_malloc", lambda: calls.append(1) or True)
    import src.cli  # noqa: F401  (importing the CLI changes nothing)

    assert calls == []
    run_cli(["fit", "--config", "dpo.yaml", *FAST, "--model.init_args.accel=off"])
    assert calls == []
    run_cli(["fit", "--config", "dpo.yaml", *FAST, "--model.init_args.accel=[malloc]"])
    assert calls == [1]


def test_own_weights_and_early_adam_state_apply_when_a_fit_starts(monkeypatch, run_cli):
    from src.accel import runtime

    calls = []
    monkeypatch.setattr(runtime, "own_weights", lambda module: calls.append(type(module).__name__) or 0)
    monkeypatch.setattr(runtime, "early_adam_state", lambda opts: calls.append([type(o).__name__ for o in opts]))
    run_cli(["fit", "--config", "dpo.yaml", *FAST, "--model.init_args.accel=[clip_with_norm]"])
    assert calls == []
    run_cli(["fit", "--config", "dpo.yaml", *FAST, "--model.init_args.accel=[own_weights,early_adam_state]"])
    assert calls == ["DPO", ["AdamW"]]


def _file_mapped(tensor: torch.Tensor, path) -> bool:
    """Whether ``tensor``'s memory lies in a mapping of the file ``path`` (``/proc/self/maps``)."""
    ptr = tensor.untyped_storage().data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_own_weights_copies_trained_parameters_out_of_the_checkpoint_mapping(tmp_path):
    """A safetensors checkpoint loads as views of the mapped file; ``own_weights`` copies the trainable parameters
    into memory of their own (same values, same Parameter objects, tied weights still tied) and leaves frozen ones
    mapped."""
    from src.accel.runtime import own_weights

    load_causal_lm("tiny", model_config={"tie_word_embeddings": True}).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path))
    file = (tmp_path / "model.safetensors").resolve()
    params = dict(model.named_parameters())
    mapped = {n for n, p in params.items() if _file_mapped(p, file)}
    if not mapped:
        pytest.skip("this transformers copies checkpoints into memory at load (nothing to do)")
    frozen = "model.layers.1.mlp.down_proj.weight"
    params[frozen].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in params.items()}
    ids = {n: id(p) for n, p in params.items()}
    copied = own_weights(model)
    assert copied == sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    after = dict(model.named_parameters())
    assert {n: id(p) for n, p in after.items()} == ids
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert {n for n, p in after.items() if _file_mapped(p, file)} == {frozen} & mapped
    assert model.lm_head.weight is model.model.embed_tokens.weight

    class FlatParameter(torch.nn.Parameter):  # FSDP's: a view-backed subclass, left as it is
        pass

    holder = torch.nn.Module()
    holder.flat = FlatParameter(torch.ones(3))
    ptr = holder.flat.data_ptr()
    assert own_weights(holder) == 0 and holder.flat.data_ptr() == ptr


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize(
    "variant",
    [dict(fused=True), dict(foreach=True), dict(foreach=False), dict(amsgrad=True), dict(fused=True, amsgrad=True)],
)
def test_early_adam_state_equals_the_lazy_state_of_the_first_step(cls, variant):
    """State allocated before the first step is what that step would allocate: two steps give the same parameters
    and state, bit for bit; parameters with state already, frozen ones and other optimizers are left alone."""
    from src.accel.runtime import early_adam_state

    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    runs = []
    for early in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = cls(params, lr=0.1, weight_decay=0.01, **variant)
        if early:
            assert early_adam_state([opt]) == len(params)
            assert all(torch.count_nonzero(v) == 0 for st in opt.state.values() for v in st.values())
            assert early_adam_state([opt]) == 0  # already there: kept
        for g in grads:
            for p, x in zip(params, g):
                p.grad = x.clone()
            opt.step()
        runs.append((params, opt.state_dict()["state"]))
    (p0, s0), (p1, s1) = runs
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert s0.keys() == s1.keys()
    for i in s0:
        assert s0[i].keys() == s1[i].keys()
        for k in s0[i]:
            a, b = s0[i][k], s1[i][k]
            assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), (i, k)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    assert early_adam_state([cls([frozen], lr=0.1, **variant), sgd]) == 0


def test_gradients_are_freed_after_each_optimizer_step_not_between_accumulated_batches(run_cli, monkeypatch):
    """Automatic optimization drops the gradients right after the optimizer step (as the HF Trainer does), so they
    are not held beside the next step's activations; between accumulated micro-batches they are kept."""
    from src.modules.base import AlignmentModule

    seen, start = [], AlignmentModule.on_train_batch_start

    def record(self, batch, batch_idx):
        seen.append(any(p.grad is not None for p in self.parameters()))
        return start(self, batch, batch_idx)

    monkeypatch.setattr(AlignmentModule, "on_train_batch_start", record)
    args = [*FAST, "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=2", "--model.init_args.accel=off"]
    cli = run_cli(["fit", "--config", "dpo.yaml", *args])
    assert cli.trainer.global_step == 2
    assert seen == [False, True, False, True]


def test_dot_norm_is_the_global_gradient_norm():
    """``dot_norm``: the norm of fp32 CPU gradients by BLAS dot products, closer to a float64 sum than torch's own
    (a 28M-element tensor like SmolLM2's embedding gradient included); NaN / Inf propagate; anything else (another
    dtype, a non-contiguous or sparse gradient) goes to ``torch.nn.utils.get_total_norm``."""
    from src.accel import runtime

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(49152, 576, generator=g) * 1e-3, torch.randn(1536, 576, generator=g), torch.randn(576)]
    exact = sum(float(t.double().square().sum()) for t in grads) ** 0.5
    norm = Accel(["dot_norm"]).total_norm(grads)
    assert norm.dtype == torch.float32 and norm.shape == ()
    plain = Accel().total_norm(grads)
    assert abs(float(norm) - exact) / exact < 2e-5
    assert abs(float(norm) - exact) <= abs(float(plain) - exact)
    assert float(plain) == pytest.approx(float(norm), rel=1e-3)
    for bad, check in ((float("nan"), math.isnan), (float("inf"), math.isinf)):
        poisoned = [t.clone() for t in grads[1:]]
        poisoned[0][3, 4] = bad
        assert check(float(runtime.dot_norm(poisoned)))
    assert runtime.dot_norm([grads[1].t()]) is None  # not contiguous
    assert runtime.dot_norm([grads[2].double()]) is None
    assert runtime.dot_norm([torch.eye(3).to_sparse()]) is None
    assert runtime.dot_norm([]) is None
    odd = [grads[1].t(), grads[2]]
    torch.testing.assert_close(Accel(["dot_norm"]).total_norm(odd), torch.nn.utils.get_total_norm(odd))


def test_together_runs_the_reference_on_a_worker_thread_with_one_thread_each(request):
    """``concurrent_reference``: the reference callable runs on the worker thread without autograd, each side with one
    intra-op thread, and this thread's count is restored; an error in either side is raised here, after both ran;
    under autocast (thread-local) and without a separate reference model both run here, one after the other."""
    import threading

    from src.accel import runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the worker needs two threads to split (restored below)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    seen = {}

    def side(name):
        def run():
            seen[name] = (threading.current_thread().name, torch.is_grad_enabled(), torch.get_num_threads())
            return name

        return run

    ref_model = torch.nn.Linear(2, 2)
    accel = Accel(["concurrent_reference"])
    assert accel.together(side("policy"), side("reference"), ref_model) == ("policy", "reference")
    assert seen["policy"][0] == threading.current_thread().name and seen["policy"][1:] == (True, 1)
    assert seen["reference"][0].startswith("align-reference") and seen["reference"][1:] == (False, 1)
    assert torch.get_num_threads() == 2

    def boom():
        raise RuntimeError("reference failed")

    with pytest.raises(RuntimeError, match="reference failed"):
        accel.together(side("policy"), boom, ref_model)
    assert torch.get_num_threads() == 2
    seen.clear()
    for run in (
        lambda: accel.together(side("policy"), side("reference"), None),  # LoRA's reference / precomputed
        lambda: Accel().together(side("policy"), side("reference"), ref_model),  # feature off
    ):
        run()
        assert seen["reference"][0] == threading.current_thread().name and seen["reference"][1] is True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runtime.together(side("policy"), side("reference"))
    assert seen["reference"][0] == threading.current_thread().name and seen["reference"][1] is False  # no autograd


def test_concurrent_reference_gives_the_sequential_losses(run_cli, monkeypatch):
    """The embedded DPO default with the reference's forward on the worker thread: the same per-step losses (1e-6)."""
    from src.accel import runtime

    args = ["fit", "--config", "dpo.yaml", *FAST, "--trainer.max_steps=4", "--trainer.limit_val_batches=0"]
    calls = []
    monkeypatch.setattr(runtime, "together", lambda *a, real=runtime.together: calls.append(1) or real(*a))
    together = _train_losses(run_cli([*args, "--model.init_args.accel=[concurrent_reference]"]))
    assert len(calls) == 4  # one per training step
    alone = _train_losses(run_cli([*args, "--model.init_args.accel=off"]))
    assert len(together) == len(alone) == 4
    assert max(abs(a - b) for a, b in zip(together, alone)) < 1e-6


# ------------------------------------------------------------------------------------------------ whole runs
def _train_losses(cli) -> list[float]:
    rows = read_metrics(cli.trainer.logger.log_dir)
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_clipping_with_the_logged_norm_equals_lightnings_clipping(run_cli, monkeypatch):
    """``clip_with_norm`` reuses the norm computed for ``train/grad_norm`` (one pass over the gradients) and, with the
    fused AdamW of the configs, leaves the scaling to the optimizer's kernel (``grad_scale``, for that step only): with
    a clip that binds at every step, the trained weights equal those of Lightning's own ``clip_grad_norm_``."""
    from src.accel import runtime

    args = ["fit", "--config", "dpo.yaml", *FAST, "--trainer.gradient_clip_val=1e-2", "--trainer.limit_val_batches=0"]
    used, norms, scales = [], [], []
    real = runtime.clip_with_norm

    def spy(trainer, optimizer, max_norm, norm):
        norms.append(float(norm))
        used.append(real(trainer, optimizer, max_norm, norm))
        scales.append(float(optimizer.grad_scale))  # 1 / clip coefficient, read by the fused kernel
        return used[-1]

    monkeypatch.setattr(runtime, "clip_with_norm", spy)
    cli = run_cli([*args, "--model.init_args.accel=[clip_with_norm]"])
    reused, initial = cli.model.model.state_dict(), cli.model.ref_model.state_dict()  # the reference: initial weights
    assert used == [True] * 3 and min(norms) > 1e-2  # the clip binds at every step
    assert scales == pytest.approx([(n + 1e-6) / 1e-2 for n in norms], rel=1e-6)
    assert getattr(cli.model.optimizers().optimizer, "grad_scale", None) is None  # unset after each step
    lightning = run_cli([*args, "--model.init_args.accel=off"]).model.model.state_dict()
    assert len(used) == 3  # the plain run clipped through Lightning
    for k, v in reused.items():
        # g / (1 / c) and g * c differ in the last bit; Adam's m / sqrt(v) of near-zero gradients turns that into
        # up to ~6e-7 after three steps of lr 5e-4 (the weights moved ~1.5e-3)
        torch.testing.assert_close(v, lightning[k], rtol=1e-5, atol=2e-6, msg=k)
    assert any(not torch.equal(v, initial[k]) for k, v in reused.items())  # training moved the weights


@pytest.mark.slow
def test_dpo_losses_are_the_same_with_accel_off_and_auto(run_cli):
    """The embedded DPO default: per-step losses of the plain path and of every CPU speed path within 1e-5."""
    args = ["fit", "--config", "dpo.yaml", *FAST, "--trainer.max_steps=12", "--trainer.limit_val_batches=0"]
    off = _train_losses(run_cli([*args, "--model.init_args.accel=off"]))
    auto_cli = run_cli([*args, "--model.init_args.accel=auto"])
    assert auto_cli.model.accel.features == frozenset(FEATURES) - {"onednn_linear"}  # hidden 128 < 512
    auto = _train_losses(auto_cli)
    assert len(off) == len(auto) == 12
    assert off[0] == pytest.approx(0.693147, abs=1e-6) and min(off[-3:]) < off[0]
    assert max(abs(a - b) for a, b in zip(off, auto)) < 1e-5


@pytest.mark.slow
def test_grpo_rewards_rise_the_same_with_accel_off_and_auto(run_cli):
    """The embedded GRPO default (sampling, scoring and update): the same first-step rewards (same weights and noise:
    the same samples), and the same rise. Later steps sample from weights that differ by float rounding, so a sample
    near a boundary may flip: the curves agree in trend, not bit for bit. 60 steps: both runs reach the task's ceiling
    (~0.05 -> ~0.95), so the rises differ by sampling noise, not by where each run happens to be on the way (on an
    Intel Xeon VM at 40 steps the ``off`` run sat on a plateau at ~0.4 that it left by step 43: rises 0.33 vs 0.75)."""
    args = ["fit", "--config", "grpo.yaml", *FAST, "--trainer.max_steps=60", "--trainer.limit_val_batches=0"]
    runs = {}
    for accel in ("off", "auto"):
        cli = run_cli([*args, f"--model.init_args.accel={accel}"])
        rows = read_metrics(cli.trainer.logger.log_dir)
        runs[accel] = [float(r["train/reward"]) for r in rows if r.get("train/reward")]
    off, auto = runs["off"], runs["auto"]
    assert len(off) == len(auto) == 60
    assert off[0] == pytest.approx(auto[0], abs=1e-6)
    rise = {k: sum(v[-4:]) / 4 - sum(v[:4]) / 4 for k, v in runs.items()}
    assert rise["off"] > 0 and rise["auto"] > 0, runs  # both learn
    assert abs(rise["off"] - rise["auto"]) < 0.5 * rise["off"], runs


BENCH = (ROOT / ".." / "shared" / "bench" / "artifacts").resolve()


@pytest.mark.slow
@pytest.mark.skipif(not (BENCH / "dpo_pairs.jsonl").exists(), reason=f"no benchmark workload at {BENCH}")
def test_benchmark_dpo_losses_are_the_same_with_accel_off_and_auto(run_cli):
    """The shared benchmark workload (30 steps x 8 pairs): per-step losses of ``accel: off`` and ``auto`` within
    1e-5."""
    args = [
        "fit", "--config", "bench/dpo.yaml", f"--model.init_args.model_name_or_path={BENCH / 'model'}",
        f"--data.path={BENCH / 'dpo_pairs.jsonl'}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir=runs", "--trainer.log_every_n_steps=1",
    ]  # fmt: skip
    off = _train_losses(run_cli([*args, "--model.init_args.accel=off"]))
    auto = _train_losses(run_cli([*args, "--model.init_args.accel=auto"]))
    assert len(off) == len(auto) == 30
    assert max(abs(a - b) for a, b in zip(off, auto)) < 1e-5


def _saved_bytes(fn) -> int:
    """Bytes of the non-parameter tensors autograd keeps for backward while ``fn`` runs."""
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_fused_layers_give_the_plain_outputs_and_gradients_and_keep_less_for_backward(precision):
    """``fused_layers``: RMSNorm and MLP modules switched while the context is open, then restored; outputs equal
    bit for bit, gradients to float rounding (fp32, and under CPU autocast to bf16), less kept for backward."""
    from src.accel.layers import fused_layers

    torch.manual_seed(0)
    lm = load_causal_lm("tiny")
    layers = lm.config.num_hidden_layers
    ids = torch.randint(3, 2048, (3, 40))

    def step(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        lm.zero_grad(set_to_none=True)
        out: list[torch.Tensor] = []
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        with fused_layers(lm) if fused else contextlib.nullcontext(layers * 3 + 1) as switched, amp:
            kept = _saved_bytes(lambda: out.append(lm(input_ids=ids).logits))
        assert switched == layers * 3 + 1  # two norms and an MLP per layer, the final norm
        out[0].float().logsumexp(-1).mean().backward()
        return out[0].detach(), {k: p.grad.clone() for k, p in lm.named_parameters()}, kept

    plain, plain_grads, plain_kept = step(False)
    fused, fused_grads, fused_kept = step(True)
    assert all("forward" not in vars(m) for m in lm.modules())  # restored
    assert torch.equal(fused, plain)
    # bf16 matmuls round a float32 difference of one unit in the last place to one of bf16's (~4e-3)
    tol = 5e-6 if precision == "fp32" else 1e-2
    for k, g in plain_grads.items():
        assert (fused_grads[k] - g).norm() <= tol * g.norm(), (k, ((fused_grads[k] - g).norm() / g.norm()).item())
    assert fused_kept < 0.8 * plain_kept, (fused_kept, plain_kept)


def test_fused_layers_leave_wrapped_hooked_and_checkpointed_modules_alone():
    from src.accel.layers import fused_layers

    torch.manual_seed(0)
    lm = load_causal_lm("tiny")
    layers = lm.model.layers

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA or quantised layer
        pass

    wrapped = Wrapped(lm.config.intermediate_size, lm.config.hidden_size, bias=False)
    layers[0].mlp.down_proj = wrapped
    own = layers[1].input_layernorm.forward = layers[1].input_layernorm.forward  # its own (a hook library's)
    with fused_layers(lm) as switched:
        assert switched == len(layers) * 3 + 1 - 2
        assert "forward" not in vars(layers[0].mlp) and "forward" in vars(layers[0].input_layernorm)
        assert vars(layers[1].input_layernorm)["forward"] is own
        with fused_layers(lm) as nested:  # a scoring forward inside another: already switched, left to the outer
            assert nested == 0
        assert "forward" in vars(layers[0].input_layernorm)
    assert vars(layers[1].input_layernorm)["forward"] is own  # kept, not removed with the others
    assert "forward" not in vars(layers[0].input_layernorm)
    lm.gradient_checkpointing_enable()
    with fused_layers(lm) as switched:
        assert switched == 0


def _rope_inputs(half_equal: bool = True) -> tuple[torch.Tensor, ...]:
    """q ``[2, 6, 40, 16]`` and k ``[2, 2, 40, 16]`` laid out as transformers' attention makes them (projections viewed
    per head, then transposed), cos / sin ``[2, 40, 16]``: the halves equal as a rotary embedding makes them, or not."""
    torch.manual_seed(0)
    q = torch.randn(2, 40, 6, 16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 40, 2, 16).transpose(1, 2).requires_grad_()
    angles = torch.rand(2, 40, 8) * 6
    angles = torch.cat([angles, angles if half_equal else torch.rand(2, 40, 8)], -1)
    return q, k, angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("half_equal", [True, False])
def test_fused_rotary_gives_transformers_outputs_and_gradients_bit_for_bit(half_equal, dtype):
    from transformers.models.llama import modeling_llama

    from src.accel.layers import RotaryFunction

    q, k, cos, sin = (t.detach().to(dtype).requires_grad_(t.requires_grad) for t in _rope_inputs(half_equal))
    plain = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    fused = RotaryFunction.apply(q, k, cos.unsqueeze(1), sin.unsqueeze(1))
    grads = [torch.randn_like(t) for t in plain]
    for a, b in zip(plain, fused):
        assert torch.equal(a, b) and a.stride() == b.stride()
    fused_grads = torch.autograd.grad(fused, (q, k), grads, retain_graph=True)
    for a, b in zip(torch.autograd.grad(plain, (q, k), grads), fused_grads):
        assert torch.equal(a, b)
    # the gradient is the rotation's transpose: <R x, g> == <x, R^T g>
    (gq,) = torch.autograd.grad(fused[0], q, grads[0])
    assert torch.allclose(
        (fused[0] * grads[0]).double().sum(), (q * gq).double().sum(), rtol=1e-5 if dtype == torch.float32 else 2e-2
    )


def test_fused_rotary_is_what_attention_calls_inside_the_context_counted_across_threads():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    from src.accel import layers

    originals = modeling_llama.apply_rotary_pos_emb, modeling_qwen2.apply_rotary_pos_emb
    calls = []
    forward = layers.RotaryFunction.forward
    lm = load_causal_lm("tiny")
    ids = torch.randint(3, 2048, (2, 24))
    plain = lm(input_ids=ids).logits
    entered, release = threading.Event(), threading.Event()

    def reference_scoring() -> None:  # a reference's scoring context on another thread, open until released
        with layers.fused_layers(lm):
            entered.set()
            release.wait(30)

    try:
        layers.RotaryFunction.forward = staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a))
        with ThreadPoolExecutor(1) as pool:
            with layers.fused_layers(lm):
                assert modeling_llama.apply_rotary_pos_emb is not originals[0]
                assert modeling_qwen2.apply_rotary_pos_emb is not originals[1]
                held = pool.submit(reference_scoring)
                assert entered.wait(30) and layers._ROTARY_USERS == 2
                with layers.fused_layers(lm):  # nested
                    assert layers._ROTARY_USERS == 3
                    fused = lm(input_ids=ids).logits
            assert layers._ROTARY_USERS == 1  # the policy's context closed first: the reference's still has it
            assert modeling_llama.apply_rotary_pos_emb is not originals[0]
            assert len(calls) == lm.config.num_hidden_layers
            lm.gradient_checkpointing_enable()  # this thread, outside its context: transformers' function, so that
            lm.train()  # a checkpointed forward's recomputation in backward saves what the forward saved
            lm(input_ids=ids).logits.sum().backward()
            with layers.fused_layers(lm):  # checkpointed: not fused inside the context either
                lm(input_ids=ids).logits.sum().backward()
            assert len(calls) == lm.config.num_hidden_layers
            release.set()
            held.result()
    finally:
        layers.RotaryFunction.forward = forward
        release.set()
    assert torch.equal(fused, plain)
    assert (modeling_llama.apply_rotary_pos_emb, modeling_qwen2.apply_rotary_pos_emb) == originals
    assert layers._ROTARY_USERS == 0
    # mixed dtypes (bf16 projections, fp32 cos / sin under autocast) promote op by op: transformers' function runs
    with layers.fused_rotary():
        q, k, cos, sin = _rope_inputs()
        out = modeling_llama.apply_rotary_pos_emb(q.bfloat16(), k.bfloat16(), cos, sin)
        assert out[0].dtype == torch.float32 and "Rotary" not in type(out[0].grad_fn).__name__
        assert torch.equal(out[0], originals[0](q.bfloat16(), k.bfloat16(), cos, sin)[0])
