"""Decode-loop speed paths of ``src.rollout.generate``: the lean one-token decoder (``fast_decode``) and KV cache
layers that append into a preallocated buffer (``growing_cache``).

``fast_decode``: a lean one-token decode step for Llama-family Hugging Face models.

Decoding a small batch on CPU is overhead-bound: a 16-row step of a tiny Llama is ~0.2 ms of GEMM work, while the
Hugging Face module forward (mask construction, cache objects, ~40 module calls per layer) costs ~4 ms. This module
runs the same computation with plain torch ops on the model's own weights:

* RMSNorm exactly as ``LlamaRMSNorm`` (fp32 variance, ``rsqrt``, weight multiply);
* one fused ``q|k|v`` matmul and one fused ``gate|up`` matmul over weights concatenated once per rollout (each output
  element is the same dot product as in the separate projections);
* RoPE with ``cos``/``sin`` from the model's own ``rotary_emb`` (so any rope scaling it implements is kept),
  precomputed for every decode position;
* ``scaled_dot_product_attention`` over a preallocated ``[B, KV, capacity, D]`` key/value buffer, filled from the
  prefill cache, with the padding mask of each row; with grouped-query attention the query heads of a KV head are
  its query rows (no per-head copies of the keys and values);
* SwiGLU MLP, final norm, LM head on the new position only;
* every projection and the LM head through oneDNN with its weight prepacked once per rollout for the step's row
  count (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the kernels torch's inductor uses for
  frozen CPU linears): the same dot products as ``F.linear`` in fp32, but a decode step is a few rows against every
  weight of the model, i.e. bound by how fast the weights stream from memory, and the packed layout streams them
  ~1.8x faster than MKL's ``sgemm`` (random weights of SmolLM2-135M's shapes, 8 rows, 2 threads: 30-36 ms per step
  against 55-80 ms for ``(W @ x^T)^T`` and 100-120 ms for ``F.linear``; the checkpoint's 2 x 4 rows x 64 tokens
  4.5-5.0 -> 3.1-3.3 s). Packing all 135M weights costs ~0.2-0.3 s per rollout. Where oneDNN is missing (a torch
  build without it, another device or dtype) each projection is ``(W @ x^T)^T``, which MKL streams ~1.7x faster than
  ``F.linear`` for a few rows (74 -> 44 ms per step at those shapes).

Only architectures whose decoder layer is exactly that are accepted (``model_type`` in :data:`SUPPORTED`, plain
``nn.Linear`` projections, ``silu``, full attention, no q/k norms, no logit scaling); :meth:`FastDecoder.build`
returns ``None`` otherwise and the caller uses the Hugging Face forward. LoRA/peft-wrapped models fall back too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.accel import onednn

__all__ = ["SUPPORTED", "FastDecoder", "Projection", "preallocate_cache"]

SUPPORTED = frozenset({"llama", "mistral", "qwen2"})


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``LlamaRMSNorm.forward``: fp32 statistics, weight applied in the input dtype. For fp32 inputs torch's fused
    ``rms_norm`` (one kernel instead of six; the same values on the benchmark model) is used."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` for the few rows of a decode step, as ``(W @ x^T)^T``."""
    y = torch.mm(weight, x.t()).t()
    return y if bias is None else y + bias


def _pack(weight: Tensor, rows: int) -> Tensor | None:
    """oneDNN's prepacked copy of an fp32 CPU weight ``[out, in]`` for products with ``rows`` rows, or ``None`` where
    torch has no oneDNN (or the op is refused), under autocast (whose matmuls run in its dtype) and in a job of
    several processes (not measured there; the abort at exit once blamed on it, 2 of 8 runs of a 2-process gloo DPO
    test, happened without it too: process-group teardown, fixed in ``src/__main__.py``)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn.available():
        return None
    if torch.is_autocast_enabled("cpu") or onednn.several_processes():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    except (AttributeError, RuntimeError):  # a build without the op
        return None


class Projection:
    """``F.linear(x, weight, bias)`` for the few rows of a decode step: oneDNN over a prepacked copy of ``weight``
    where :func:`_pack` gives one (``packed`` is then True), else :func:`_linear`."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int) -> None:
        packed = _pack(weight, rows)
        self.packed = packed is not None
        self.weight = weight if packed is None else packed
        self.bias = bias

    @classmethod
    def concat(cls, layers: list[nn.Linear], rows: int) -> Projection:
        """One projection computing ``layers`` side by side (outputs concatenated, same dot products)."""
        weight = torch.cat([lin.weight for lin in layers], 0)
        bias = None
        if any(lin.bias is not None for lin in layers):
            zeros = [lin.weight.new_zeros(lin.out_features) for lin in layers]
            bias = torch.cat([z if lin.bias is None else lin.bias for z, lin in zip(zeros, layers)])
        return cls(weight, bias, rows)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed:
            return onednn.matmul(x, self.weight, self.bias)
        return _linear(x, self.weight, self.bias)


def _supported(model: nn.Module, capacity: int) -> str | None:
    """``None`` if the fast path computes what ``model``'s forward computes, else the reason it does not."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return f"model_type {getattr(cfg, 'model_type', None)!r} not in {sorted(SUPPORTED)}"
    if type(model).__name__ not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        return f"{type(model).__name__} is not a plain *ForCausalLM"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r}"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return "logit soft-capping / scaling"
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) and window is not None and window < capacity:
        return "sliding-window attention shorter than the sequence"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "unexpected module layout"
    if type(inner.embed_tokens) is not nn.Embedding or type(model.lm_head) is not nn.Linear:
        return "wrapped embedding / LM head"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "unexpected attention block"
        lins = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        lins += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(lin) is not nn.Linear for lin in lins):
            return "projections are not plain nn.Linear (LoRA, quantized, ...)"
        if not hasattr(layer, "input_layernorm") or not hasattr(layer, "post_attention_layernorm"):
            return "unexpected norms"
    return None


class FastDecoder:
    """Decodes one token per row per :meth:`step` over a preallocated KV buffer (see the module docstring).

    Build it with :meth:`build` after a Hugging Face prefill: it takes the prefill's per-layer keys/values (already
    rotated), repeats each prompt's rows ``repeats`` times and copies them into ``[B, KV, capacity, D]`` buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_kv: list[tuple[Tensor, Tensor]],
        attn_mask: Tensor,
        positions: Tensor,
        repeats: int,
    ) -> None:
        inner = model.model
        cfg = model.config
        attn0 = inner.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.scale = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.eps = float(cfg.rms_norm_eps)
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        batch, capacity = attn_mask.shape
        self.lm_head = Projection(model.lm_head.weight, model.lm_head.bias, batch)
        self.layers: list[dict[str, Any]] = []
        for layer, (k, v) in zip(inner.layers, layer_kv):
            a, m = layer.self_attn, layer.mlp
            n = k.shape[-2]
            kbuf = k.new_empty(batch, self.n_kv, capacity, self.head_dim)
            vbuf = v.new_empty(batch, self.n_kv, capacity, self.head_dim)
            kbuf[:, :, :n] = k.repeat_interleave(repeats, dim=0) if repeats > 1 else k
            vbuf[:, :, :n] = v.repeat_interleave(repeats, dim=0) if repeats > 1 else v
            self.layers.append(
                dict(
                    ln1=layer.input_layernorm.weight,
                    ln2=layer.post_attention_layernorm.weight,
                    qkv=Projection.concat([a.q_proj, a.k_proj, a.v_proj], batch),
                    o=Projection(a.o_proj.weight, a.o_proj.bias, batch),
                    gate_up=Projection.concat([m.gate_proj, m.up_proj], batch),
                    down=Projection(m.down_proj.weight, m.down_proj.bias, batch),
                    k=kbuf,
                    v=vbuf,
                )
            )
        self.filled = layer_kv[0][0].shape[-2]
        self.intermediate = int(inner.layers[0].mlp.down_proj.in_features)
        # additive mask [B, 1, 1, capacity] (0 / -inf): SDPA's CPU kernel is ~25% faster with it than with a bool mask
        # for one query row, and adding 0 leaves every unmasked score as it is.
        self.mask = torch.zeros(attn_mask.shape, dtype=self.embed.dtype, device=attn_mask.device)
        self.mask = self.mask.masked_fill_(~attn_mask.bool(), float("-inf"))[:, None, None, :]
        # cos/sin of every decode position from the model's own rotary embedding, [max_new, B, 1, D]; sin carries the
        # sign of rotate_half so that rotate_half(x) * sin == swap_halves(x) * signed_sin exactly.
        cos, sin = inner.rotary_emb(self.embed[:1], positions)
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        self.cos = cos.transpose(0, 1).unsqueeze(2).contiguous()
        self.sin = sin.transpose(0, 1).unsqueeze(2).contiguous()

    @classmethod
    def build(
        cls, model: nn.Module, cache: Any, attn_mask: Tensor, positions: Tensor, repeats: int
    ) -> FastDecoder | None:
        """A decoder over ``cache`` (a transformers cache after the prefill), or ``None`` if unsupported.

        Args:
            model: The causal LM that ran the prefill.
            cache: Its cache; every layer must hold ``keys``/``values`` of shape ``[N, KV, P, D]``.
            attn_mask: ``[N * repeats, P + max_new]`` 1 where a row may attend (prompt mask, then ones).
            positions: ``[N * repeats, max_new]`` position id of each decode step's input token.
            repeats: rows per prompt (the cache holds one row per prompt).
        """
        if _supported(model, attn_mask.shape[1]) is not None:
            return None
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(model.model.layers):
            return None
        kv = []
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, Tensor) or not isinstance(v, Tensor) or k.dim() != 4:
                return None
            kv.append((k, v))
        return cls(model, kv, attn_mask, positions, repeats)

    def step(self, tokens: Tensor, t: int) -> Tensor:
        """Logits ``[B, V]`` of the next token after feeding ``tokens`` (``[B]``) as decode step ``t`` (0-based)."""
        pos = self.filled
        end = pos + 1
        b = tokens.shape[0]
        h_heads, kv_heads, d = self.n_heads, self.n_kv, self.head_dim
        qk_heads, group = h_heads + kv_heads, h_heads // kv_heads
        cos, sin = self.cos[t], self.sin[t]  # [B, 1, D]
        mask = self.mask[..., :end]
        x = F.embedding(tokens, self.embed)  # [B, H]
        for L in self.layers:
            h = _rms_norm(x, L["ln1"], self.eps)
            qkv = L["qkv"](h).view(b, qk_heads + kv_heads, d)
            qk = qkv[:, :qk_heads]
            swapped = qk.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
            qk = qk * cos + swapped * sin  # RoPE on q and k at once
            L["k"][:, :, pos] = qk[:, h_heads:]
            L["v"][:, :, pos] = qkv[:, qk_heads:]
            # the query heads of one KV head as its "query rows" (head h reads KV head h // group, as repeat_kv does):
            # one kernel over the buffers, no copies of K/V per query head
            attn = F.scaled_dot_product_attention(
                qk[:, :h_heads].reshape(b, kv_heads, group, d),
                L["k"][:, :, :end],
                L["v"][:, :, :end],
                attn_mask=mask,
                scale=self.scale,
            )
            x = x + L["o"](attn.reshape(b, h_heads * d))
            h = _rms_norm(x, L["ln2"], self.eps)
            gate, up = L["gate_up"](h).split(self.intermediate, dim=-1)
            x = x + L["down"](F.silu(gate) * up)
        self.filled = end
        return self.lm_head(_rms_norm(x, self.final_norm, self.eps)).contiguous()


# ------------------------------------------------------------------------------------------------- growing_cache
# Subclasses transformers' ``cache_utils.DynamicLayer`` and writes its ``keys``/``values`` attributes: checked
# against transformers 5.x (measured with 5.24); src.accel refuses the feature on other majors.
_GROWING_LAYER: Any = False


def _growing_layer_class() -> Any:
    """A ``DynamicLayer`` that appends into a preallocated buffer instead of ``torch.cat`` (None if unavailable)."""
    global _GROWING_LAYER
    if _GROWING_LAYER is not False:
        return _GROWING_LAYER
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # no per-layer cache objects
        _GROWING_LAYER = None
        return None

    class GrowingLayer(DynamicLayer):
        """Full-attention KV layer over a ``[B, H, capacity, D]`` buffer; ``keys``/``values`` view the filled part."""

        def __init__(self, keys: Tensor, values: Tensor, capacity: int):
            super().__init__()
            n = keys.shape[-2]
            self._k = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
            self._v = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
            self._k[:, :, :n] = keys
            self._v[:, :, :n] = values
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if self._k is None or end > self._k.shape[-2]:  # out of room (or reordered): plain concatenation
                self._k = self._v = None
                return super().update(key_states, value_states, *args, **kwargs)
            self._k[:, :, start:end] = key_states
            self._v[:, :, start:end] = value_states
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def reorder_cache(self, beam_idx: Tensor) -> None:
            super().reorder_cache(beam_idx)
            self._k = self._v = None

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._k = self._v = None

        def batch_select_indices(self, indices: Tensor) -> None:
            super().batch_select_indices(indices)
            self._k = self._v = None

    _GROWING_LAYER = GrowingLayer
    return GrowingLayer


def preallocate_cache(cache: Any, capacity: int) -> bool:
    """Move every filled full-attention ``DynamicLayer`` of ``cache`` into a ``capacity``-long buffer that later
    decode steps append into (no per-step ``torch.cat``; attention over the filled length only). Same keys, values
    and attention as the plain cache. Returns whether any layer moved."""
    growing = _growing_layer_class()
    layers = getattr(cache, "layers", None)
    if growing is None or layers is None:
        return False
    from transformers.cache_utils import DynamicLayer

    moved = False
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel() > 0:
            layers[i] = growing(layer.keys, layer.values, capacity)
            moved = True
    return moved
