"""The fused LM head (issue 16, "Memory for real vocabularies"): :func:`src.losses.linear_token_logps_and_entropy`
against the materialised path (``F.linear`` then :func:`src.losses.token_logps_and_entropy`) on a 32K vocabulary, the
largest tensor it creates, the plain path of ``src/logprobs.py`` on a tiny Llama with a 32K vocabulary (tied and
untied, ``accel`` off and auto), its fallbacks, and whole fits with gradient checkpointing and bf16-mixed on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

import src.logprobs
import src.losses
from src.accel import Accel
from src.logprobs import completion_logps, linear_head
from src.losses import linear_token_logps_and_entropy, token_logps_and_entropy
from tests.conftest import FAST, SMALL_LLAMA, column, read_metrics

N, H, V = 64, 32, 32768


def _inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(V, (N,), generator=g)
    labels[::7] = -100  # padding: log-prob 0, no gradient
    return hidden, weight, bias, labels


def _both(hidden, weight, bias, labels, *, temperature=1.0, entropy_grad=False):
    """Log-probs, entropies and gradients (hidden, weight, bias) of the fused and of the materialised path."""
    g = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(temperature=temperature, with_entropy=True, entropy_grad=entropy_grad)
    out = []
    for fused in (True, False):
        if fused:
            lp, ent = linear_token_logps_and_entropy(hidden, weight, labels, bias=bias, **kw)
        else:
            lp, ent = token_logps_and_entropy(F.linear(hidden, weight, bias), labels, **kw)
        loss = (lp * g.to(lp.dtype)).sum() + ((ent * g.flip(0).to(ent.dtype)).sum() if entropy_grad else 0)
        out.append((lp, ent, *torch.autograd.grad(loss, (hidden, weight, bias))))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunks", ["one", "several"])
def test_fused_head_equals_the_materialised_logits(monkeypatch, chunks, temperature):
    if chunks == "several":
        monkeypatch.setattr(src.losses, "_CHUNK_ELEMENTS", 5 * V)  # 13 chunks: the first of 4 rows, then 5 each
    spans = src.losses._row_chunks(torch.empty(N, 1), V)
    assert len(spans) == (1 if chunks == "one" else 13) and spans[-1][1] - spans[-1][0] == (N if chunks == "one" else 5)
    hidden, weight, bias, labels = _inputs(torch.float64)
    heads = []  # the head's chunk logits computed: every chunk in forward, all but the last (kept) in backward
    z = src.losses._TokenLogps._z
    record = lambda *a: (a[2] is not None and heads.append(a[-2:])) or z(*a)  # noqa: E731
    monkeypatch.setattr(src.losses._TokenLogps, "_z", staticmethod(record))
    fused, plain = _both(hidden, weight, bias, labels, temperature=temperature)
    assert heads == spans + spans[:-1]
    for name, a, b in zip(("logps", "entropy", "grad hidden", "grad weight", "grad bias"), fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    pad = labels < 0
    assert (fused[0][pad] == 0).all() and (fused[2][pad] == 0).all()  # padding: 0, no gradient to its states
    assert fused[0][~pad].lt(0).all() and fused[1].gt(0).all()


def test_fused_head_entropy_gradient_equals_the_materialised_logits(monkeypatch):
    """The entropy bonus (``entropy_grad``): dH/dz flows through the fused head as through the logits."""
    monkeypatch.setattr(src.losses, "_CHUNK_ELEMENTS", 5 * V)
    fused, plain = _both(*_inputs(torch.float64), temperature=0.7, entropy_grad=True)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    nograd, _ = _both(*_inputs(torch.float64), temperature=0.7)
    assert not torch.allclose(fused[3], nograd[3])  # the entropy term changed the weight's gradient


@pytest.mark.parametrize("chunks", ["one", "several"])
def test_fused_head_bf16_upcasts_the_softmax_and_returns_bf16_gradients(monkeypatch, chunks):
    if chunks == "several":
        monkeypatch.setattr(src.losses, "_CHUNK_ELEMENTS", 5 * V)
    fused, plain = _both(*_inputs(torch.bfloat16), temperature=0.7)
    assert fused[0].dtype == fused[1].dtype == torch.float32
    assert [t.dtype for t in fused[2:]] == [torch.bfloat16] * 3
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)  # the same bf16 matmul, the same float32 softmax
    torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=0)
    for a, b in zip(fused[2:], plain[2:]):
        if chunks == "one":
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:  # the weight and bias gradients are bf16 sums over 13 chunks: a rounding per chunk
            assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-2


def test_fused_head_under_autocast_matches_autocast_logits(monkeypatch):
    """bf16-mixed: float32 weights, the head's matmul in bf16 under autocast; gradients come back in float32."""
    monkeypatch.setattr(src.losses, "_CHUNK_ELEMENTS", 5 * V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, plain = _both(*_inputs(torch.float32), temperature=0.7)
    assert [t.dtype for t in fused] == [torch.float32] * 5
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    for a, b in zip(fused[2:], plain[2:]):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op returns (forward and backward run on this thread on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel, *(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))])
        return out


def test_fused_head_never_creates_the_n_by_v_logits(monkeypatch):
    n, h = 256, 16
    monkeypatch.setattr(src.losses, "_CHUNK_ELEMENTS", 4 * V)  # [4 rows, V] chunks; [V, H] is the weight's gradient
    hidden, weight = torch.randn(n, h, requires_grad=True), torch.randn(V, h, requires_grad=True)
    labels = torch.randint(V, (n,))
    largest = {}
    for fused in (True, False):
        with _Largest() as mode:
            if fused:
                lp, _ = linear_token_logps_and_entropy(hidden, weight, labels, temperature=0.7, with_entropy=True)
            else:
                lp, _ = token_logps_and_entropy(F.linear(hidden, weight), labels, temperature=0.7, with_entropy=True)
            lp.sum().backward()
        largest[fused] = mode.numel
    assert largest[False] >= n * V  # the measure sees the materialised logits
    assert largest[True] <= max(4 * V, V * h) < n * V // 8, largest


# -- the plain path on a model -------------------------------------------------------------------------------------
def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMALL_LLAMA, "vocab_size": V, "tie_word_embeddings": tied})
    return LlamaForCausalLM(cfg).double()


def _rows(vocab: int = V):
    """Four rows ``[pad] prompt completion [pad]``: two prompts, each completed twice (``accel: auto`` shares them);
    rows 1 and 3 left- and right-padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, 24), generator=g)
    ids[2:, :10] = ids[:2, :10]
    attn, comp = torch.ones_like(ids), torch.zeros_like(ids)
    attn[1::2, :3] = attn[1, 20:] = attn[3, 16:] = 0
    comp[:, 10:] = attn[:, 10:]
    return ids * attn, attn, comp


@pytest.mark.parametrize("accel", ["off", "auto"])
@pytest.mark.parametrize("tied", [False, True])
def test_completion_logps_fused_equals_materialised_on_a_32k_vocabulary(monkeypatch, tied, accel):
    model = _llama(tied)
    head = linear_head(model)
    assert head is model.lm_head and (head.weight is model.model.embed_tokens.weight) == tied
    monkeypatch.setattr(src.losses, "_CHUNK_ELEMENTS", 8 * V)  # several chunks in forward and backward
    ids, attn, comp = _rows()
    results = []
    for fused in (True, False):
        monkeypatch.setattr(src.logprobs, "linear_head", linear_head if fused else lambda m: None)
        model.zero_grad()
        acc = Accel.resolve(accel, model, "cpu")
        assert (acc.completion_hidden(model, ids, attn, comp) is None) == (accel == "off")  # auto: shared prompts
        lp, ent = completion_logps(model, ids, attn, comp, temperature=0.7, with_entropy=True, accel=acc)
        (lp * torch.linspace(-1, 1, lp.shape[-1], dtype=lp.dtype)).sum().backward()
        assert head.weight.grad.abs().sum() > 0
        results.append((lp, ent, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp, ent, grads), (lp_ref, ent_ref, grads_ref) = results
    assert lp[comp.bool()].lt(0).all() and (lp[comp == 0] == 0).all()
    torch.testing.assert_close(lp, lp_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_ref.keys() and ("lm_head.weight" in grads) != tied
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_heads_that_are_more_than_a_linear_layer_keep_the_logits_path():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def small(**kw):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, **kw})).double()

    assert isinstance(linear_head(small()), torch.nn.Linear)
    lora_body = get_peft_model(small(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert linear_head(lora_body) is lora_body.get_base_model().lm_head  # LoRA elsewhere: the head is plain
    lora_head = get_peft_model(small(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert linear_head(lora_head) is None
    capped = small()
    capped.config.final_logit_softcapping = 30.0
    assert linear_head(capped) is None
    hooked = small()
    hooked.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    assert linear_head(hooked) is None
    patched = small()  # accelerate's offload hooks replace the module's forward
    patched.lm_head.forward = lambda x: F.linear(x, patched.lm_head.weight) * 2
    assert linear_head(patched) is None
    # a LoRA-wrapped head scores through its logits: the adapter's term counts, as in the model's own forward
    lora_head.base_model.model.lm_head.lora_B["default"].weight.data.normal_()
    ids, attn, comp = _rows(64)
    with torch.no_grad():
        lp = completion_logps(lora_head, ids, attn, comp)[0]
        pos = src.logprobs.position_ids_from_mask(attn)
        logits = lora_head(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, :-1]
        full = F.pad(torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0)) * comp
        with lora_head.disable_adapter():
            base = completion_logps(lora_head, ids, attn, comp)[0]
    torch.testing.assert_close(lp, full, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(lp, base)


# -- whole fits ----------------------------------------------------------------------------------------------------
SMALL_FIT = {
    "dpo": ["--data.batch_size=4"],
    "grpo": ["--data.batch_size=2", "--model.init_args.max_new_tokens=4"],
}


def _fit(run_cli, algo: str, *extra: str) -> dict[str, list[float]]:
    args = ["fit", "--config", f"{algo}.yaml", *FAST, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]
    cli = run_cli([*args, *SMALL_FIT[algo], *extra])
    rows = read_metrics(cli.trainer.logger.log_dir)
    return {k: column(rows, k) for k in ("train/loss", "train/grad_norm")}


@pytest.mark.parametrize("algo", ["dpo", "grpo"])
def test_gradient_checkpointing_gives_the_same_steps(run_cli, algo):
    """With activation checkpointing (each decoder layer recomputed in backward), ``accel: off`` and ``auto``: the
    same losses and gradient norms as without, over two optimizer steps (the second step's loss follows the first
    step's update)."""
    plain = _fit(run_cli, algo, "--model.init_args.accel=off")
    assert len(plain["train/loss"]) == len(plain["train/grad_norm"]) == 2 and plain["train/grad_norm"][0] > 0
    for accel in ("off", "auto"):
        ckpt = _fit(run_cli, algo, f"--model.init_args.accel={accel}", "--model.init_args.gradient_checkpointing=true")
        for key, values in plain.items():
            assert ckpt[key] == pytest.approx(values, rel=1e-5, abs=1e-6), (accel, key, ckpt, plain)


@pytest.mark.parametrize("algo", ["dpo", "grpo"])
def test_bf16_mixed_fits_on_cpu(run_cli, algo):
    fit = _fit(run_cli, algo, "--trainer.precision=bf16-mixed")
    assert len(fit["train/loss"]) == 2 and all(math.isfinite(x) for v in fit.values() for x in v), fit
    assert fit["train/grad_norm"][0] > 0
    if algo == "dpo":  # the policy starts as the reference
        assert fit["train/loss"][0] == pytest.approx(math.log(2), abs=1e-6)
