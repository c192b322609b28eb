"""Tests for src.rollout: the batched KV-cache sampler."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from src.accel import Accel
from src.rollout import Rollout, SamplingConfig, generate, sample_from_logits
from tests.conftest import SMALL_LLAMA

PAD, BOS, EOS = 0, 1, 2
VOCAB = 64


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**SMALL_LLAMA)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 5, 3 and 7 (no EOS inside)."""
    g = torch.Generator().manual_seed(1)
    lengths = [5, 3, 7]
    width = max(lengths)
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.cat([torch.tensor([BOS]), torch.randint(3, VOCAB, (n - 1,), generator=g)])
        mask[row, width - n :] = 1
    return ids, mask


def _run(model, ids, mask, seed: int | None = 0, accel=None, **cfg) -> Rollout:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return generate(
        model, ids, mask, SamplingConfig(**cfg), eos_token_id=EOS, pad_token_id=PAD, generator=gen, accel=accel
    )


class ForceEOS(nn.Module):
    """Wraps a causal LM and forces EOS for row ``r`` as completion token ``eos_at[r]`` (0-based); counts calls."""

    def __init__(self, inner: nn.Module, eos_at: dict[int, int]):
        super().__init__()
        self.inner, self.eos_at, self.calls = inner, eos_at, 0
        self.config = inner.config

    def forward(self, *, cache=None, logits_to_keep=0, **kwargs):
        out = self.inner(cache=cache, logits_to_keep=logits_to_keep, **kwargs)
        logits = out.logits.clone()
        logits[..., EOS] = -1e4  # no EOS unless forced
        for row, step in self.eos_at.items():
            if step == self.calls:
                logits[row, -1, EOS] = 1e4
        self.calls += 1
        out.logits = logits
        return out


class LegacySignature(nn.Module):
    """A causal LM whose forward names the cache ``past_key_values`` and has no ``logits_to_keep``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=use_cache,
        )


def _check_eos_layout(r: Rollout) -> None:
    """Mask is 1 up to and including the first EOS, 0 after, where ids are PAD."""
    for row in range(r.completion_ids.size(0)):
        ids, m = r.completion_ids[row].tolist(), r.completion_mask[row].tolist()
        n = m.index(0) if 0 in m else len(m)
        assert m == [1] * n + [0] * (len(m) - n)
        assert EOS not in ids[: max(n - 1, 0)]
        assert ids[n:] == [PAD] * (len(m) - n)
        assert bool(r.is_truncated[row]) == (n == 0 or ids[n - 1] != EOS)


def test_stops_at_eos_and_masks_after(model, prompts):
    ids, mask = prompts
    wrapped = ForceEOS(model, {0: 2, 1: 4})  # row 2 never ends
    r = _run(wrapped, ids, mask, max_new_tokens=6)
    assert r.completion_ids.shape == (3, 6)
    assert r.completion_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1] * 6]
    assert r.completion_ids[0, 2] == EOS and r.completion_ids[1, 4] == EOS
    assert r.completion_ids[0, 3:].eq(PAD).all() and r.completion_ids[1, 5] == PAD
    assert r.is_truncated.tolist() == [False, False, True]
    _check_eos_layout(r)


def test_stops_loop_when_all_rows_finished(model, prompts):
    ids, mask = prompts
    wrapped = ForceEOS(model, {0: 1, 1: 3, 2: 0})
    r = _run(wrapped, ids, mask, max_new_tokens=10)
    assert wrapped.calls == 4  # prefill + 3 decode steps, not 10
    assert r.completion_ids.shape == (3, 4)
    assert r.completion_mask.sum(1).tolist() == [2, 4, 1]
    assert r.completion_lengths.tolist() == [2, 4, 1]
    assert not r.is_truncated.any()
    _check_eos_layout(r)


def test_multiple_eos_ids(model, prompts):
    ids, mask = prompts
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    free = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD)
    stop = int(free.completion_ids[0, 1])  # make row 0's second token a stop token
    r = generate(model, ids, mask, cfg, eos_token_id=[EOS, stop], pad_token_id=PAD)
    assert r.completion_mask[0].sum() <= 2
    assert not r.is_truncated[0]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_matches_hf_generate(model, prompts, cache):
    ids, mask = prompts
    r = _run(model, ids, mask, seed=None, max_new_tokens=12, temperature=0, cache=cache)
    hf = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD
    )[:, ids.size(1) :]
    width = r.completion_ids.size(1)
    assert hf.size(1) == width
    assert torch.equal(r.completion_ids * r.completion_mask, hf * r.completion_mask)
    _check_eos_layout(r)


def test_legacy_forward_signature(model, prompts):
    ids, mask = prompts
    a = _run(model, ids, mask, max_new_tokens=8, temperature=0, return_logps=True, num_generations=2)
    b = _run(LegacySignature(model), ids, mask, max_new_tokens=8, temperature=0, return_logps=True, num_generations=2)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logps, b.logps)


def test_peft_wrapped_model(model, prompts):
    peft = pytest.importorskip("peft")
    import copy

    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids, mask = prompts
    a = _run(model, ids, mask, max_new_tokens=8, temperature=0)
    b = _run(lora, ids, mask, max_new_tokens=8, temperature=0)  # LoRA starts as the identity
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_rejects_right_padded_prompts(model):
    ids = torch.tensor([[BOS, 5, PAD]])
    with pytest.raises(ValueError, match="left-padded"):
        _run(model, ids, (ids != PAD).long(), max_new_tokens=2)


def test_top_k_one_equals_greedy(model, prompts):
    ids, mask = prompts
    greedy = _run(model, ids, mask, max_new_tokens=10, temperature=0)
    top1 = _run(model, ids, mask, max_new_tokens=10, temperature=1.3, top_k=1)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    assert torch.equal(greedy.completion_mask, top1.completion_mask)


def test_num_generations_repeats_prompts_consecutively(model, prompts):
    ids, mask = prompts
    r = _run(model, ids, mask, max_new_tokens=8, num_generations=3)
    assert torch.equal(r.prompt_ids, ids.repeat_interleave(3, dim=0))
    assert torch.equal(r.prompt_mask, mask.repeat_interleave(3, dim=0))
    assert r.completion_ids.size(0) == 9
    assert r.input_ids.shape == r.attention_mask.shape == (9, ids.size(1) + r.completion_ids.size(1))
    # Greedy with shared prefill equals greedy on the explicitly repeated prompts.
    shared = _run(model, ids, mask, max_new_tokens=8, num_generations=3, temperature=0)
    explicit = _run(model, r.prompt_ids, r.prompt_mask, max_new_tokens=8, temperature=0)
    assert torch.equal(shared.completion_ids, explicit.completion_ids)
    # Sampled copies of a prompt differ (same prompt, independent draws).
    assert len({tuple(row) for row in r.completion_ids[:3].tolist()}) > 1


def _full_forward_logps(model, r: Rollout, temperature: float) -> torch.Tensor:
    input_ids, attn = r.input_ids, r.attention_mask
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids).logits
    p, c = r.prompt_ids.size(1), r.completion_ids.size(1)
    logp = (logits[:, p - 1 : p + c - 1].float() / temperature).log_softmax(-1)
    return logp.gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask


@pytest.mark.parametrize(
    "cfg",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5, top_p=0.9),  # filters shape sampling, not the reported log-prob
        dict(temperature=1.0, min_p=0.1, num_generations=2),
        dict(temperature=0.0),  # greedy reports temperature-1 log-probs
    ],
)
def test_logps_match_full_forward(model, prompts, cfg):
    ids, mask = prompts
    r = _run(model, ids, mask, max_new_tokens=10, return_logps=True, **cfg)
    expected = _full_forward_logps(model, r, cfg["temperature"] or 1.0)
    assert r.logps is not None and r.logps.shape == r.completion_ids.shape
    assert r.logps[r.completion_mask == 0].eq(0).all()
    torch.testing.assert_close(r.logps, expected, atol=1e-5, rtol=0)


def test_no_logps_unless_asked(model, prompts):
    assert _run(model, *prompts, max_new_tokens=3).logps is None


def test_reproducible_with_generator(model, prompts):
    ids, mask = prompts
    a = _run(model, ids, mask, seed=123, max_new_tokens=10, num_generations=2)
    b = _run(model, ids, mask, seed=123, max_new_tokens=10, num_generations=2)
    c = _run(model, ids, mask, seed=321, max_new_tokens=10, num_generations=2)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_restores_train_eval_modes(model, prompts):
    model.train()
    model.model.layers[0].eval()  # a mixed state must survive as is
    try:
        _run(model, *prompts, max_new_tokens=3)
        assert model.training and model.model.layers[1].training
        assert not model.model.layers[0].training
        assert torch.is_grad_enabled()  # generate's no_grad does not leak
    finally:
        model.eval()


def test_outputs_feed_a_training_forward(model, prompts):
    r = _run(model, *prompts, max_new_tokens=4, return_logps=True, num_generations=2)
    assert not r.logps.requires_grad
    assert not any(t.is_inference() for t in (r.input_ids, r.attention_mask, r.logps, r.is_truncated))
    model.zero_grad()
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits
    (logits.log_softmax(-1).mean() + r.logps.sum() * 0).backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad()


def test_all_padding_columns_are_harmless(model, prompts):
    ids, mask = prompts
    padded_ids = torch.cat([torch.full((3, 4), PAD), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(3, 4, dtype=torch.long), mask], dim=1)
    a = _run(model, ids, mask, max_new_tokens=6, temperature=0)
    b = _run(model, padded_ids, padded_mask, max_new_tokens=6, temperature=0)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert b.prompt_ids.shape == padded_ids.shape


def test_filters_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    for cfg, allowed in [
        (SamplingConfig(top_k=2), {0, 1}),
        (SamplingConfig(top_p=0.7), {0, 1}),
        (SamplingConfig(top_p=0.4), {0}),
        (SamplingConfig(min_p=0.35), {0, 1}),  # threshold 0.175 drops 0.15 and 0.05
        (SamplingConfig(), {0, 1, 2, 3}),
    ]:
        tokens, _ = sample_from_logits(logits, cfg, g)
        assert set(tokens.tolist()) == allowed, cfg


def test_sampling_frequencies_follow_softmax():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.clamp_min(1e-30).log().repeat(20000, 1)
    tokens, logps = sample_from_logits(logits, SamplingConfig(return_logps=True), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    torch.testing.assert_close(logps, probs.log()[tokens])


def test_invalid_config():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="num_generations"):
        SamplingConfig(num_generations=0)


# --------------------------------------------------------------- accel: fast_decode and growing_cache vs plain
FAST = Accel(["fast_decode", "growing_cache"])


def _llama_variant(kind: str) -> nn.Module:
    """Small models of the supported families: GQA Llama with biases, and Qwen2 (q/k/v biases)."""
    torch.manual_seed(3)
    common = dict(SMALL_LLAMA)
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common, attention_bias=True, mlp_bias=True)).eval()


@pytest.mark.parametrize("variant", ["base", "llama_bias", "qwen2"])
@pytest.mark.parametrize("cfg", [dict(temperature=0.0), dict(temperature=1.0, num_generations=3)])
def test_fast_decode_matches_hf_forward(model, prompts, variant, cfg):
    """The lean decoder samples the same tokens and reports the same log-probs as the Hugging Face forward."""
    from src.accel.decode import FastDecoder

    m = model if variant == "base" else _llama_variant(variant)
    ids, mask = prompts
    kw = dict(max_new_tokens=12, return_logps=True, **cfg)
    fast = _run(m, ids, mask, accel=FAST, **kw)
    slow = _run(m, ids, mask, accel=None, **kw)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)
    torch.testing.assert_close(fast.logps, slow.logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.logps, _full_forward_logps(m, fast, cfg["temperature"] or 1.0), atol=1e-5, rtol=0)
    if cfg["temperature"] == 0:
        hf = m.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD
        )[:, ids.size(1) :]
        width = fast.completion_ids.size(1)
        assert torch.equal(fast.completion_ids * fast.completion_mask, hf[:, :width] * fast.completion_mask)
    # the fast path is really taken for these models
    from transformers import DynamicCache

    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    full = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)
    assert FastDecoder.build(m, cache, full, mask.sum(1, keepdim=True) + torch.arange(4), 1) is not None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 8])
def test_decode_projection_matches_linear(bias, rows):
    """A decode projection (oneDNN over a prepacked weight where torch has oneDNN, else ``(W @ x^T)^T``) computes
    ``F.linear`` to fp32 rounding, q|k|v concatenated ones too; on a torch with oneDNN the packed path is taken."""
    from src.accel.decode import Projection

    torch.manual_seed(0)
    lins = [nn.Linear(96, out, bias=bias) for out in (64, 32, 32)]
    x = torch.randn(rows, 96)
    single, fused = Projection(lins[0].weight, lins[0].bias, rows), Projection.concat(lins, rows)
    with torch.inference_mode():
        torch.testing.assert_close(single(x), lins[0](x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused(x), torch.cat([lin(x) for lin in lins], -1), atol=1e-5, rtol=1e-5)
        assert single.packed == fused.packed == torch.backends.mkldnn.is_available()
        plain = Projection(lins[0].weight.double(), None, rows)  # not fp32: the (W @ x^T)^T path
        assert not plain.packed
        torch.testing.assert_close(plain(x.double()), x.double() @ lins[0].weight.double().T)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: its dtype's matmul, as the model's forward
            mixed = Projection(lins[0].weight, lins[0].bias, rows)
            assert not mixed.packed
            torch.testing.assert_close(mixed(x).float(), lins[0](x).float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("cfg", [dict(temperature=0.0), dict(temperature=1.0, num_generations=3)])
def test_growing_cache_matches_the_plain_cache(model, prompts, cfg, monkeypatch):
    """KV layers that append into a preallocated buffer give the same tokens and log-probs as transformers' cache."""
    from src.accel import decode

    ids, mask = prompts
    moved = []
    real = decode.preallocate_cache
    monkeypatch.setattr(decode, "preallocate_cache", lambda *a: moved.append(real(*a)) or moved[-1])
    kw = dict(max_new_tokens=12, return_logps=True, **cfg)
    grown = _run(model, ids, mask, accel=Accel(["growing_cache"]), **kw)
    plain = _run(model, ids, mask, accel=None, **kw)
    assert moved == [True]  # the buffers were really used
    assert torch.equal(grown.completion_ids, plain.completion_ids)
    torch.testing.assert_close(grown.logps, plain.logps, atol=1e-6, rtol=0)


def test_fast_decode_falls_back_for_other_models(model, prompts):
    """Wrapped or unsupported models decode through their own forward (the wrapper's EOS forcing is honoured)."""
    from src.accel.decode import FastDecoder

    ids, mask = prompts
    wrapped = ForceEOS(model, {0: 2})
    r = _run(wrapped, ids, mask, accel=FAST, max_new_tokens=6)
    assert r.completion_mask[0].sum() == 3 and wrapped.calls >= 3
    assert FastDecoder.build(wrapped, None, mask, mask, 1) is None
