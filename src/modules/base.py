"""Shared mechanics of every algorithm: model loading (tiny default, local HF dirs, LoRA), the reference model,
completion-only log-probs, optimizer + scheduler, and the NaN/Inf guard. Each algorithm subclasses
:class:`AlignmentModule` in its own file and only writes its step.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from src.data import tiny
from src.data.collate import long_tensor
from src.losses import token_logps_and_entropy
from src.rollout import Rollout, SamplingConfig, generate

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- model loading
def load_causal_lm(
    name_or_path: str,
    *,
    model_config: dict[str, Any] | None = None,
    torch_dtype: str | None = None,
    attn_implementation: str | None = None,
    auto_class: str = "AutoModelForCausalLM",
    **kwargs: Any,
) -> nn.Module:
    """``"tiny"`` builds the embedded tiny Llama from config (``model_config`` overrides its fields); anything else is
    loaded with ``from_pretrained`` from a local directory (or the local HF cache; nothing is downloaded)."""
    import transformers

    if name_or_path == tiny.TINY:
        if auto_class != "AutoModelForCausalLM":
            from transformers import LlamaConfig

            cfg = LlamaConfig(**{**tiny.TINY_MODEL_CONFIG, **(model_config or {}), **kwargs})
            return getattr(transformers, auto_class).from_config(cfg)
        return tiny.build_model(model_config, attn_implementation)
    if not Path(name_or_path).exists():
        if name_or_path.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
        log.info("model %s is not a local path; trying the local Hugging Face cache", name_or_path)
    extra: dict[str, Any] = dict(kwargs)
    if torch_dtype is not None:
        extra["dtype"] = getattr(torch, torch_dtype) if torch_dtype != "auto" else "auto"
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    try:
        return getattr(transformers, auto_class).from_pretrained(name_or_path, **extra)
    except OSError as e:
        raise FileNotFoundError(f"model {name_or_path!r}: not a local directory nor in the HF cache ({e})") from e


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------------------------------------------- log-probs
def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that follow the attention mask, so left- and right-padded rows score the same."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last-layer hidden states ``[B, T, H]`` of a Hugging Face decoder (causal LM or sequence classifier; the
    backbone only, no head), with mask-aware ``position_ids``."""
    return (
        unwrap(model)
        .get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        .last_hidden_state
    )


# A CPU batch of at least 2 * _GROUP_MIN_ROWS rows runs through the decoder in length-sorted groups when that cuts
# its padded positions by at least _GROUP_MIN_SAVING (benchmark DPO, 16 rows of ~100 tokens: -9% positions, -7% step
# time with 2 threads, -14% with 1; see benchmarks/README.md).
_GROUP_MIN_ROWS = 8
_GROUP_MIN_SAVING = 0.05


def length_groups(attention_mask: Tensor, completion_mask: Tensor) -> list[tuple[list[int], int]] | None:
    """``[(rows, width)]``: rows sorted by length, split in halves while a half-split removes enough padding; each
    group is run over its first ``width`` columns. ``None``: one forward over the batch as it is (GPU batches,
    small batches, or no padding to save; on GPU a second forward's launches cost more than the padding saved)."""
    B, T = attention_mask.shape
    if attention_mask.device.type != "cpu" or B < 2 * _GROUP_MIN_ROWS:
        return None
    used = attention_mask.bool() | completion_mask.bool()
    ends = torch.where(used.any(-1), T - used.flip(-1).int().argmax(-1), 0).tolist()  # last used column + 1

    def split(rows: list[int]) -> list[list[int]]:
        if len(rows) < 2 * _GROUP_MIN_ROWS:
            return [rows]
        a, b = rows[: len(rows) // 2], rows[len(rows) // 2 :]
        if len(a) * ends[a[-1]] + len(b) * ends[b[-1]] > (1 - _GROUP_MIN_SAVING) * len(rows) * ends[rows[-1]]:
            return [rows]
        return split(a) + split(b)

    groups = split(sorted(range(B), key=ends.__getitem__))
    if len(groups) == 1:
        return None
    return [(g, max(2, ends[g[-1]])) for g in groups]


def _row_major(parts: list[Tensor], grouped_rows: list[int], counts: list[int]) -> Tensor:
    """Concatenate per-group ``[n_g, H]`` states (rows in ``grouped_rows`` order, ``counts[r]`` states per row) back
    into the batch's row-major order."""
    start, offset = [0] * len(counts), 0
    for r in grouped_rows:
        start[r], offset = offset, offset + counts[r]
    order = long_tensor([i for r in range(len(counts)) for i in range(start[r], start[r] + counts[r])])
    return torch.cat(parts).index_select(0, order.to(parts[0].device))


def _decoder_cache_kwarg(decoder: nn.Module) -> str | None:
    """Name of the KV-cache argument of a HF decoder's ``forward`` (``cache`` in transformers 5, else
    ``past_key_values``); ``None`` if it takes neither."""
    params = inspect.signature(decoder.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _shares_prompts(inner: nn.Module) -> bool:
    """Whether rows may run their shared prompt once through the KV cache: a plain full-attention decoder (no sliding
    window or hybrid layers, no gradient checkpointing, which turns the cache off)."""
    cfg = getattr(inner, "config", None)
    if cfg is None or not hasattr(inner, "get_decoder") or getattr(cfg, "is_encoder_decoder", False):
        return False
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # transformers >= 5.x; older: is_gradient_...
    if checkpointing if checkpointing is not None else getattr(inner, "is_gradient_checkpointing", False):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return not getattr(cfg, "sliding_window", None)


# Rows that share a prompt run it once. Two layouts (same states up to float rounding; see shared_prompt_hidden):
# "tree": one forward over [prompt | completion 1 | completion 2 | ...] per prompt, each completion attending to the
# prompt and to itself (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"); on CPU
# under SDPA the tree rows are packed end to end without padding and attention runs per row on views of the packed
# states (_packed_sdpa), otherwise the rows are padded and take a 4D mask; "cache": the prompts once, then the
# completions on their prompt's KV cache (two or more forwards). The tree needs one decoder call instead of several
# but its attention covers every row's full square, so it is used while that costs at most _TREE_MAX_ATTENTION x the
# cache layout's attention (padded widths, conservative for packed rows) and its mask stays small (benchmark DPO,
# 8 pairs: 1.4x the attention, -14% step time, then -8 to -11% from packing; GRPO, 4 x 4: 1.9x, -8%; see
# benchmarks/README.md).
_TREE_MAX_ATTENTION = 2.5
_TREE_MAX_MASK = 1 << 24  # elements of the [rows, 1, W, W] mask


def _shared_prompts(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[dict[tuple[int, ...], list[int]], list[list[int]]] | None:
    """``({prompt: [rows]}, completions)`` when every row is ``[pad] prompt completion [pad]`` with a non-empty prompt
    and completion and at least two rows share a prompt; ``None`` otherwise."""
    ids, attn, comp = input_ids.tolist(), attention_mask.tolist(), completion_mask.tolist()
    T = input_ids.shape[1]
    groups: dict[tuple[int, ...], list[int]] = {}
    completions = []
    for b in range(len(ids)):
        a, c = attn[b], comp[b]
        if 1 not in c or 1 not in a:
            return None
        s, p, e = a.index(1), c.index(1), T - a[::-1].index(1)  # prompt [s, p), completion [p, e)
        if not s < p < e or 0 in a[s:e] or 0 in c[p:e] or 1 in c[:p] or 1 in c[e:]:
            return None
        groups.setdefault(tuple(ids[b][s:p]), []).append(b)
        completions.append(ids[b][p:e])
    return (groups, completions) if len(groups) < len(ids) else None


def _bool_mask_ok(inner: nn.Module) -> bool:
    """Whether a custom 4D bool mask (True = attend) reaches attention as-is: SDPA under transformers >= 5."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return getattr(inner.config, "_attn_implementation", None) == "sdpa" and major >= 5


class _PackedRows:
    """Tree rows packed end to end (``[1, N]`` tokens, no padding): row ``r`` holds tokens ``bounds[r]`` and attends
    through ``masks[r]`` (``[1, 1, L_r, L_r]``, True = attend). ``calls`` counts the attention calls that used it."""

    def __init__(self, bounds: list[tuple[int, int]], masks: list[Tensor]) -> None:
        self.bounds, self.masks, self.calls = bounds, masks, 0


_PACKED_ATTENTION = "lightning_align_packed_sdpa"


def _packed_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed: _PackedRows | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """SDPA over packed tree rows (registered with transformers' ``AttentionInterface``): one call per row on views of
    the packed queries/keys/values, so neither the linear layers nor attention see padding. Without ``packed`` it is
    transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    packed.calls += 1
    gqa = query.shape[1] != key.shape[1]
    out = [
        F.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            attn_mask=m,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        ).transpose(1, 2)
        for (a, b), m in zip(packed.bounds, packed.masks)
    ]
    return torch.cat(out, dim=1), None


def _packs_rows(inner: nn.Module, device: torch.device) -> bool:
    """Whether tree rows may run packed (:func:`_packed_sdpa`): on CPU (measured there; on accelerators one SDPA
    launch per row per layer may cost more than the padding saved, so they keep the padded rows), SDPA under
    transformers >= 5 (extra keyword arguments reach the attention function), in a Llama-family decoder, whose
    attention dispatches through ``AttentionInterface``."""
    from src.fast_decode import SUPPORTED

    cpu = device.type == "cpu"
    if not cpu or not _bool_mask_ok(inner) or getattr(inner.config, "model_type", None) not in SUPPORTED:
        return False
    from transformers import AttentionInterface

    if _PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_PACKED_ATTENTION, _packed_sdpa)
    return True


class _attention_implementation:
    """Context manager: ``config._attn_implementation = name`` inside, the previous value after."""

    def __init__(self, config: Any, name: str) -> None:
        self.config, self.name = config, name

    def __enter__(self) -> None:
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc: Any) -> None:
        self.config._attn_implementation = self.previous


def _tree_hidden(
    inner: nn.Module, groups: dict[tuple[int, ...], list[int]], completions: list[list[int]], device: torch.device
) -> Tensor:
    """The "tree" layout: one row per prompt, ``[prompt | its completions]``; completion tokens see the prompt and the
    earlier tokens of their own completion (positions continue from the prompt). Where :func:`_packs_rows` holds the
    rows run packed end to end (``[1, N]``, attention per row); otherwise padded to ``[rows, W]`` with a 4D mask."""
    rows, pos, seg, where = [], [], [], []
    for prompt, members in groups.items():
        p = len(prompt)
        r, q, s = list(prompt), list(range(p)), [0] * p
        for i, b in enumerate(members):
            where.append((b, len(rows), p, len(r), len(completions[b])))
            r += completions[b]
            q += range(p, p + len(completions[b]))
            s += [i + 1] * len(completions[b])
        rows.append(r)
        pos.append(q)
        seg.append(s)
    lengths = [len(r) for r in rows]
    # completion token j is predicted by the previous position: the prompt's last token for j = 0 (row-local indices)
    local: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(completions)
    row_of = [0] * len(completions)
    for b, g, p, start, n in where:
        local[b], row_of[b] = np.r_[p - 1, start + np.arange(n - 1)], g
    if not _packs_rows(inner, device):
        W = max(lengths)
        ids = long_tensor([r + [0] * (W - len(r)) for r in rows]).to(device)
        pos_t = long_tensor([q + [0] * (W - len(q)) for q in pos]).to(device)
        seg_t = long_tensor([s + [-1] * (W - len(s)) for s in seg])
        key, query = seg_t[:, None, :], seg_t[:, :, None]
        allowed = torch.ones(W, W, dtype=torch.bool).tril() & (key >= 0) & ((key == 0) | (key == query))
        allowed[:, :, 0] |= seg_t < 0  # no empty softmax row for pad queries (their states are never read)
        if _bool_mask_ok(inner):
            mask = allowed[:, None]
        else:  # additive float mask: what eager attention and transformers 4.x take as-is
            dtype = next(inner.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask.to(device), position_ids=pos_t, use_cache=False)
        read = np.concatenate([row_of[b] * W + local[b] for b in range(len(completions))])
        return hidden.last_hidden_state.reshape(len(rows) * W, -1).index_select(0, torch.from_numpy(read).to(device))
    starts = np.cumsum(lengths) - lengths
    masks = []
    for s in seg:
        t = torch.tensor(s)
        masks.append((torch.ones(len(s), len(s), dtype=torch.bool).tril() & ((t == 0) | (t[:, None] == t))).to(device))
    packed = _PackedRows([(int(a), int(a) + n) for a, n in zip(starts, lengths)], [m[None, None] for m in masks])
    ids = long_tensor([t for r in rows for t in r])[None].to(device)
    pos_t = long_tensor([t for q in pos for t in q])[None].to(device)
    sparse = _reads_last_layer_sparsely(inner, device)  # before the switch: it checks for SDPA
    with _attention_implementation(inner.config, _PACKED_ATTENTION):
        if sparse:
            # the last layer's queries: per row the contiguous positions from the prompt's last token to the row's
            # second-to-last token (every read position, plus the unread last token of each non-final completion)
            prompt_len = [len(k) for k in groups]
            q_bounds = [(int(a) + p - 1, int(a) + n - 1) for a, n, p in zip(starts, lengths, prompt_len)]
            q_start = np.cumsum([b - a for a, b in q_bounds]) - [b - a for a, b in q_bounds]
            read = np.concatenate(
                [q_start[row_of[b]] + local[b] - (prompt_len[row_of[b]] - 1) for b in range(len(completions))]
            )
            states = _decoder_keeping(inner, ids, pos_t, packed, q_bounds, prompt_len)
        else:
            read = np.concatenate([starts[row_of[b]] + local[b] for b in range(len(completions))])
            states = inner.get_decoder()(input_ids=ids, position_ids=pos_t, use_cache=False, packed=packed)
            states = states.last_hidden_state[0]
    if packed.calls != inner.config.num_hidden_layers:
        raise RuntimeError(
            f"packed tree rows: {packed.calls} of {inner.config.num_hidden_layers} attention layers ran the packed "
            f"attention; {type(inner).__name__} does not dispatch it through transformers' AttentionInterface"
        )
    return states.index_select(0, torch.from_numpy(read).to(device))


def _reads_last_layer_sparsely(inner: nn.Module, device: torch.device) -> bool:
    """Whether :func:`_decoder_keeping` applies: a Llama-family decoder (pre-norm layers of ``self_attn`` with
    ``q/k/v/o_proj``, ``mlp``, two norms; rotary embeddings; no q/k norms) under SDPA, on CPU with plain parameters
    (sharded FSDP/DeepSpeed modules must run through their root module's forward)."""
    from src.fast_decode import SUPPORTED

    cfg = inner.config
    if device.type != "cpu" or getattr(cfg, "model_type", None) not in SUPPORTED or not _bool_mask_ok(inner):
        return False
    decoder = inner.get_decoder()
    if not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    last = decoder.layers[-1]
    attn = getattr(last, "self_attn", None)
    if attn is None or hasattr(attn, "q_norm") or hasattr(attn, "k_norm") or not hasattr(last, "mlp"):
        return False
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return False
    if any("FSDP" in type(m).__name__ or "FullyShardedDataParallel" in type(m).__name__ for m in decoder.modules()):
        return False
    params = list(decoder.parameters())  # DTensor (FSDP2) and ZeRO-3 (ds_id) parameters are shards
    return bool(params) and all(type(p.data) is Tensor and not hasattr(p, "ds_id") for p in params)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama's ``apply_rotary_pos_emb`` for one tensor ``[B, heads, T, D]`` (``cos``/``sin``: ``[B, T, D]``)."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]


def _decoder_keeping(
    inner: nn.Module,
    ids: Tensor,
    pos: Tensor,
    packed: _PackedRows,
    q_bounds: list[tuple[int, int]],
    prompt_len: list[int],
) -> Tensor:
    """Final-norm decoder states at the packed positions ``q_bounds`` (per row, concatenated: ``[Q, H]``) of the
    packed tree rows ``ids`` (``[1, N]``): every layer but the last as the model's own modules run it; the last layer
    computes keys and values at every position (later positions attend to them) but its queries, attention output
    and MLP only from each row's last prompt token on. Same values as the full forward; on the benchmark's DPO rows
    ~1/3 of the last layer's positions are prompt tokens."""
    decoder = inner.get_decoder()
    x = decoder.embed_tokens(ids)
    cos, sin = decoder.rotary_emb(x, pos)
    *body, last = decoder.layers
    for layer in body:
        out = layer(x, position_ids=pos, position_embeddings=(cos, sin), use_cache=False, packed=packed)
        x = out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples
    attn = last.self_attn
    d = attn.head_dim
    h = last.input_layernorm(x)
    k = _rotate(attn.k_proj(h).view(*h.shape[:2], -1, d).transpose(1, 2), cos, sin)
    v = attn.v_proj(h).view(*h.shape[:2], -1, d).transpose(1, 2)
    take = torch.from_numpy(np.concatenate([np.arange(a, b) for a, b in q_bounds])).to(ids.device)
    hq, xq = h[0].index_select(0, take), x[0].index_select(0, take)
    cq, sq = cos[0].index_select(0, take)[None], sin[0].index_select(0, take)[None]
    q = _rotate(attn.q_proj(hq).view(1, hq.shape[0], -1, d).transpose(1, 2), cq, sq)
    o, at = [], 0
    for (a, b), (qa, qb), m, p in zip(packed.bounds, q_bounds, packed.masks, prompt_len):
        o.append(
            F.scaled_dot_product_attention(
                q[:, :, at : at + qb - qa],
                k[:, :, a:b],
                v[:, :, a:b],
                attn_mask=m[:, :, p - 1 : p - 1 + qb - qa],
                dropout_p=attn.attention_dropout if attn.training else 0.0,
                scale=attn.scaling,
                enable_gqa=q.shape[1] != k.shape[1],
            ).transpose(1, 2)
        )
        at += qb - qa
    packed.calls += 1
    xq = xq + attn.o_proj(torch.cat(o, dim=1).reshape(at, -1))
    xq = xq + last.mlp(last.post_attention_layernorm(xq))
    return decoder.norm(xq)


def _cached_hidden(
    inner: nn.Module, groups: dict[tuple[int, ...], list[int]], completions: list[list[int]], device: torch.device
) -> Tensor | None:
    """The "cache" layout: each distinct prompt once (left-padded), then the completions (right-padded, in
    length-sorted groups where that saves padding) on their prompt's keys/values."""
    from transformers import DynamicCache

    decoder = inner.get_decoder()
    cache_kwarg = _decoder_cache_kwarg(decoder)
    if cache_kwarg is None:
        return None
    prompts = list(groups)
    prompt_of_row = [0] * len(completions)
    for u, members in enumerate(groups.values()):
        for b in members:
            prompt_of_row[b] = u
    width = max(map(len, prompts))
    p_ids = long_tensor([[0] * (width - len(k)) + list(k) for k in prompts])
    p_mask = long_tensor([[0] * (width - len(k)) + [1] * len(k) for k in prompts])
    cache = DynamicCache()
    out = decoder(
        input_ids=p_ids.to(device),
        attention_mask=p_mask.to(device),
        position_ids=position_ids_from_mask(p_mask).to(device),
        use_cache=True,
        **{cache_kwarg: cache},
    )
    prompt_last = out.last_hidden_state[:, -1:]  # predicts the first completion token
    kv = [(layer[0], layer[1]) for layer in cache]
    p_len = p_mask.sum(-1)
    n = [len(c) for c in completions]
    c_ids = long_tensor([c + [0] * (max(n) - len(c)) for c in completions])
    c_mask = long_tensor([[1] * k + [0] * (max(n) - k) for k in n])
    groups_ = (length_groups(c_mask, c_mask) if device.type == "cpu" else None) or [(list(range(len(n))), max(n))]
    parts, grouped_rows = [], []
    for rows, w in groups_:
        u = torch.tensor([prompt_of_row[r] for r in rows])
        ud = u.to(device)
        pairs = [(k.index_select(0, ud), v.index_select(0, ud)) for k, v in kv]
        # transformers 4.x: from_legacy_cache; 5.x: the per-layer (key, value) pairs are the first argument
        group_cache = (
            DynamicCache.from_legacy_cache(tuple(pairs))
            if hasattr(DynamicCache, "from_legacy_cache")
            else DynamicCache(pairs)
        )
        hidden = decoder(
            input_ids=c_ids[rows, :w].to(device),
            attention_mask=torch.cat([p_mask[u], c_mask[rows, :w]], -1).to(device),
            position_ids=(p_len[u, None] + torch.arange(w)).to(device),
            use_cache=True,
            **{cache_kwarg: group_cache},
        ).last_hidden_state
        states = torch.cat([prompt_last.index_select(0, ud), hidden[:, :-1]], 1)
        keep = torch.arange(w)[None] < torch.tensor([n[r] for r in rows])[:, None]
        parts.append(states[keep.to(device)])
        grouped_rows += rows
    return _row_major(parts, grouped_rows, n)


def shared_prompt_layout(groups: dict[tuple[int, ...], list[int]], completions: list[list[int]]) -> str:
    """``"tree"`` or ``"cache"``: the tree while its attention work (every packed row's ``W²``) stays within
    ``_TREE_MAX_ATTENTION`` x the cache layout's (``P²`` per prompt, ``C·(P + C)`` per completion, padded widths) and
    its mask within ``_TREE_MAX_MASK`` elements."""
    p = max(map(len, groups))
    c = max(map(len, completions))
    w = max(len(k) + sum(len(completions[b]) for b in rows) for k, rows in groups.items())
    tree, cached = len(groups) * w * w, len(groups) * p * p + len(completions) * c * (p + c)
    return "tree" if tree <= _TREE_MAX_ATTENTION * cached and tree <= _TREE_MAX_MASK else "cache"


def shared_prompt_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> Tensor | None:
    """:func:`completion_hidden` for batches whose rows share prompts (DPO: chosen and rejected; GRPO: the
    generations of a prompt), with each distinct prompt computed once: same states as one forward over the rows
    (exact up to float rounding; gradients reach the prompt through every completion that attends to it).

    Layout per :func:`shared_prompt_layout`: ``tree`` (one forward per batch over ``[prompt | completions]`` rows
    with a prefix-sharing 4D mask) or ``cache`` (prompts once, completions on their KV cache). Returns ``None`` (run
    the rows as they are) unless every row is ``[pad] prompt completion [pad]`` with a non-empty prompt and completion,
    at least two rows share a prompt, and the model is a plain full-attention decoder (eager or SDPA attention for
    the tree).
    """
    inner = unwrap(model)
    if input_ids.shape[0] < 2 or not _shares_prompts(inner):
        return None
    parsed = _shared_prompts(input_ids, attention_mask, completion_mask)
    if parsed is None:
        return None
    groups, completions = parsed
    attn_impl = getattr(inner.config, "_attn_implementation", None)
    if attn_impl in ("sdpa", "eager") and shared_prompt_layout(groups, completions) == "tree":
        return _tree_hidden(inner, groups, completions, input_ids.device)
    return _cached_hidden(inner, groups, completions, input_ids.device)


def completion_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Hidden states ``[N, H]`` of only the N positions that predict a completion token, and that ``[B, T-1]``
    selector (a value head reads the same states as the LM head).

    Rows that share a prompt run it once (:func:`shared_prompt_hidden`); large CPU batches run in length-sorted groups
    trimmed of their all-padding columns (:func:`length_groups`). Both give the same states for every real position
    with fewer positions through the decoder."""
    target = completion_mask[:, 1:].bool()
    shared = shared_prompt_hidden(model, input_ids, attention_mask, completion_mask)
    if shared is not None:
        return shared, target
    groups = length_groups(attention_mask, completion_mask)
    if groups is None:
        return decoder_hidden(model, input_ids, attention_mask)[:, :-1][target], target
    parts, grouped_rows = [], []
    for rows, width in groups:
        idx = torch.tensor(rows, device=input_ids.device)
        hidden = decoder_hidden(model, input_ids[idx, :width], attention_mask[idx, :width])
        parts.append(hidden[:, :-1][target[idx, : width - 1]])
        grouped_rows += rows
    return _row_major(parts, grouped_rows, target.sum(-1).tolist()), target


def completion_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Logits ``[N, V]`` of only the N positions that predict a completion token, and that ``[B, T-1]`` selector.

    Prompt and padding positions never go through the LM head. Models with logit soft-capping or scaling fall back
    to the full forward. ``position_ids`` follow the attention mask, so left- and right-padded rows score the same.
    """
    inner = unwrap(model)
    cfg = getattr(inner, "config", None)
    fused_head = not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))
    if fused_head and hasattr(inner, "get_decoder") and inner.get_output_embeddings() is not None:
        hidden, target = completion_hidden(model, input_ids, attention_mask, completion_mask)
        return inner.get_output_embeddings()(hidden), target
    target = completion_mask[:, 1:].bool()
    position_ids = position_ids_from_mask(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, :-1][target], target


def scatter_tokens(values: Tensor, target: Tensor) -> Tensor:
    """Put per-completion-token ``values [N]`` back at their ``[B, T]`` positions (0 elsewhere)."""
    return F.pad(torch.zeros_like(target, dtype=values.dtype).masked_scatter(target, values), (1, 0))


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs ``[B, T]`` of the completion tokens (0 elsewhere), aligned with ``input_ids``.

    Only completion positions go through the LM head (:func:`completion_logits`) and no full log-softmax copy is
    kept (log-prob = logit − logsumexp). ``with_entropy`` adds the per-token entropy (no gradient).
    """
    logits, target = completion_logits(model, input_ids, attention_mask, completion_mask)
    return logps_from_logits(logits, input_ids, target, temperature=temperature, with_entropy=with_entropy)


def logps_from_logits(
    logits: Tensor, input_ids: Tensor, target: Tensor, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``[B, T]`` log-probs (and entropies, no gradient) of the completion tokens from the ``[N, V]`` logits and the
    ``[B, T-1]`` selector of :func:`completion_logits`; logits are divided by the sampling ``temperature``."""
    labels = input_ids[:, 1:][target]
    logps, entropy = token_logps_and_entropy(logits, labels, temperature=temperature, with_entropy=with_entropy)
    return scatter_tokens(logps, target), None if entropy is None else scatter_tokens(entropy, target)


# -------------------------------------------------------------------------------------------------------- the module
class AlignmentModule(LightningModule):
    """Base LightningModule: owns the policy, an optional frozen reference, optimizer and scheduler.

    Args:
        model_name_or_path: ``"tiny"`` (embedded tiny Llama) or a local HF causal-LM directory.
        optimizer: any ``torch.optim`` optimizer, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-5}}``.
        lr_scheduler: ``constant`` | ``linear`` | ``cosine``, after ``warmup_steps`` (a fraction of the run if < 1).
        model_config: overrides of the tiny model's ``LlamaConfig`` fields (tiny default only).
        torch_dtype / attn_implementation: passed to ``from_pretrained``.
        lora: ``peft.LoraConfig`` keyword arguments (``r``, ``lora_alpha``, ``target_modules``...); ``None`` = full.
        gradient_checkpointing: recompute activations in backward (less memory, ~20% slower).
        dropout: keep the model's dropout; ``False`` (default, as TRL) sets every dropout to 0.
        nan_policy: ``raise`` stops at the first non-finite loss naming the step; ``skip`` skips and counts it.
    """

    data_kind: str = "sft"
    needs_reference: bool = False
    summary_metrics: tuple[str, ...] = ("train/loss",)

    def __init__(
        self,
        model_name_or_path: str = tiny.TINY,
        *,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Literal["constant", "linear", "cosine"] = "constant",
        warmup_steps: float = 0.0,
        model_config: dict[str, Any] | None = None,
        torch_dtype: str | None = None,
        attn_implementation: str | None = None,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        dropout: bool = False,
        nan_policy: Literal["raise", "skip"] = "raise",
        ref_model_name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.model: nn.Module | None = None
        self.set_reference(None)
        self.skipped_steps = 0

    # -- models ---------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        h = self.hparams
        return load_causal_lm(
            h.model_name_or_path,
            model_config=h.model_config,
            torch_dtype=h.torch_dtype,
            attn_implementation=h.attn_implementation,
        )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        model = self.build_model()
        if not h.dropout:
            disable_dropout(model)
        if self.needs_reference and h.lora is None:
            # A frozen copy of the initial policy, taken before any checkpoint restore (so resume stays exact).
            self.set_reference(
                copy.deepcopy(model)
                if h.ref_model_name_or_path is None
                else load_causal_lm(h.ref_model_name_or_path, torch_dtype=h.torch_dtype)
            )
        if h.lora is not None:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as e:
                raise ImportError("lora needs peft: pip install -e '.[lora]'") from e
            model = get_peft_model(model, LoraConfig(**{"task_type": "CAUSAL_LM", **h.lora}))
            if self.needs_reference and h.ref_model_name_or_path is not None:
                self.set_reference(load_causal_lm(h.ref_model_name_or_path, torch_dtype=h.torch_dtype))
        if h.gradient_checkpointing:
            unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes

    def set_reference(self, model: nn.Module | None) -> None:
        """Hold the frozen reference outside the module tree: not trained, not wrapped by DDP/FSDP, not in the state
        dict, no optimizer state; always in eval mode."""
        if model is not None:
            model.requires_grad_(False).eval()
        object.__setattr__(self, "_ref", model)

    @property
    def ref_model(self) -> nn.Module | None:
        """The frozen reference on the policy's device and dtype (``None`` for LoRA: the adapter is disabled)."""
        if self._ref is not None:
            p = next(self.model.parameters())
            q = next(self._ref.parameters())
            if q.device != p.device or (q.dtype != p.dtype and q.is_floating_point()):
                self._ref.to(device=p.device, dtype=p.dtype)
        return self._ref

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        """Reference logits ``[N, V]`` at the completion positions, without autograd (the frozen copy or
        checkpoint, or the LoRA policy with its adapter disabled)."""
        with torch.no_grad():
            if self.ref_model is None:
                with self.model.disable_adapter():
                    return completion_logits(self.model, input_ids, attention_mask, completion_mask)[0]
            return completion_logits(self.ref_model, input_ids, attention_mask, completion_mask)[0]

    def reference_logps(
        self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *, temperature: float = 1.0
    ) -> Tensor:
        """Per-token reference log-probs ``[B, T]`` (0 outside the completion), without autograd; logits are divided
        by ``temperature`` (the sampling temperature, as for the policy in GRPO/PPO)."""
        logits = self.reference_logits(input_ids, attention_mask, completion_mask)
        return logps_from_logits(logits, input_ids, completion_mask[:, 1:].bool(), temperature=temperature)[0]

    def policy_logps(self, batch: dict[str, Any], **kw: Any) -> tuple[Tensor, Tensor | None]:
        return completion_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kw)

    # -- optimisation ---------------------------------------------------------------------------------------------
    def optimizer_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains (the policy's trainable parameters; PPO adds its critic)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self, factory: OptimizerCallable, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """``factory(params)``; a fused optimizer falls back to its unfused kernel under mixed precision, where
        Lightning's AMP plugin clips gradients itself and refuses optimizers that unscale internally."""
        optimizer = factory(params)
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if "mixed" in precision and optimizer.defaults.get("fused"):
            for group in optimizer.param_groups:
                group["fused"] = False
            optimizer.defaults["fused"] = False
            optimizer._step_supports_amp_scaling = False
            log.info("%s: fused=False under %s precision", type(optimizer).__name__, precision)
        return optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer(self.optimizer_factory, self.optimizer_parameters())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def lr_scheduler(
        self, optimizer: torch.optim.Optimizer, total: int | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """``lr_scheduler`` after ``warmup_steps`` over ``total`` steps (default: the trainer's stepping batches)."""
        if total is None:
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        w = self.hparams.warmup_steps
        warmup = int(w * total) if 0 < w < 1 else int(w)
        kind = self.hparams.lr_scheduler

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if kind == "linear":
                return 1.0 - progress
            if kind == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def check_finite(self, value: Tensor, name: str) -> bool:
        """``True`` if finite; otherwise raise naming the step and the quantity, or count a skipped step."""
        if bool(torch.isfinite(value).all()):
            return True
        what = "NaN" if bool(torch.isnan(value).any()) else "Inf"
        msg = f"{type(self).__name__}: {name} is {what} at global step {self.global_step} (batch {self._batch_idx})"
        if self.hparams.nan_policy == "raise":
            raise FloatingPointError(msg + "; set model.nan_policy=skip to skip such steps")
        self.skipped_steps += 1
        log.warning("%s; skipping the step (%d skipped so far)", msg, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps))
        return False

    _pre_clip_norm: Tensor | None = None

    def grad_norm(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """Global L2 norm of the gradients of ``optimizer``'s parameters (summed over ranks for sharded strategies);
        ``None`` when no parameter has a gradient."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if (
            self._trainer is not None
            and self.trainer.world_size > 1
            and not isinstance(self.trainer.strategy, DDPStrategy)
        ):  # sharded gradients: every rank must take the same decision
            norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        return norm

    def clip_grad_norm(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Manual optimization (GRPO, PPO): clip to a global norm of ``max_norm`` through Lightning (strategy- and
        precision-aware), keeping the norm before clipping for ``train/grad_norm``, which is what automatic
        optimization logs (Lightning clips after ``on_before_optimizer_step``) and what TRL logs."""
        self._pre_clip_norm = self.grad_norm(optimizer)
        if not self._clip_with_norm(optimizer, max_norm, self._pre_clip_norm):
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def _clip_with_norm(self, optimizer: torch.optim.Optimizer, max_norm: float, norm: Tensor | None) -> bool:
        """Clip ``optimizer``'s gradients to ``max_norm`` with their already computed global ``norm`` (one pass over
        the gradients instead of two) where that is what Lightning's clipping computes: whole gradients on every rank
        (one device or DDP) under fp32 or AMP precision without a loss scaler. ``False`` (nothing done) otherwise."""
        t = self._trainer
        if norm is None or t is None or not hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch < 2.6
            return False
        plugin = t.precision_plugin
        plain = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
        if not plain or type(t.strategy) not in (SingleDeviceStrategy, DDPStrategy):
            return False
        grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)
        return True

    _step_norm: Tensor | None = None  # automatic optimization: the norm logged this step, reused for clipping

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping (``trainer.gradient_clip_val``), reusing the norm ``on_before_optimizer_step`` just
        computed for ``train/grad_norm`` where :meth:`_clip_with_norm` applies."""
        norm, self._step_norm = self._step_norm, None
        if not (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and self._clip_with_norm(optimizer, float(gradient_clip_val), norm)
        ):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm (before clipping) and catch NaN/Inf gradients in the step they appear. Under
        ``nan_policy: skip`` the gradients are dropped, so the optimizer leaves every parameter and its state as is."""
        norm, self._pre_clip_norm = self._pre_clip_norm, None
        if norm is None:
            norm = self.grad_norm(optimizer)
        if norm is None:
            return
        if self._trainer is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        if not self.check_finite(norm, "gradient norm"):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        if self.automatic_optimization:
            self._step_norm = norm

    _batch_idx = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        cut = getattr(dm, "truncated", None)
        if cut and self.logger is not None:
            self.logger.log_metrics({f"data/truncated_{k}": float(v) for k, v in cut.items()}, step=0)

    # -- the step of the automatically optimized modules (SFT, reward model, DPO): they only write compute_loss ------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean loss of a batch and per-sample metric tensors (logged by ``LogProbMetrics``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss or its own training_step")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        loss, metrics = self.compute_loss(batch)
        if not self.check_finite(loss, f"{type(self).__name__} loss"):
            return None  # nan_policy=skip: Lightning skips the backward and the optimizer step
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["index"].numel(), sync_dist=True)
        return self.step_output(loss, metrics)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        loss, metrics = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["index"].numel(), sync_dist=True)
        return self.step_output(loss, metrics)

    def heldout_sequences(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Sequences scored by the held-out statistics of ``LogProbMetrics`` (training-style batches as they are)."""
        return batch if "input_ids" in batch else None

    @staticmethod
    def step_output(loss: Tensor, metrics: dict[str, Tensor], **extra: Any) -> dict[str, Any]:
        """What a step returns: the loss plus per-sample metric tensors the LogProbMetrics callback aggregates."""
        return {"loss": loss, "metrics": {k: v.detach() for k, v in metrics.items()}, **extra}


# ----------------------------------------------------------------------------------------------- online algorithms
STAGES = ("train", "val", "heldout")


class RolloutModule(AlignmentModule):
    """Shared mechanics of the online algorithms (GRPO, PPO): sample completions of a prompt batch with
    ``src.rollout.generate``, decode and score them with reward functions, slice buffers into micro-batches, and log
    a completions table. Subclasses set ``self.sampling`` (a ``SamplingConfig``), ``self.rewards`` (a
    ``src.rewards.RewardScorer``, or None when scores come from elsewhere) and take a
    ``log_completions_every_n_steps`` hyper-parameter; they use manual optimization.
    """

    data_kind = "prompt"
    sampling: SamplingConfig
    rewards: Any = None
    tokenizer: Any = None

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and self.tokenizer is None:
            self.tokenizer = dm.tokenizer

    @torch.no_grad()
    def rollout(
        self, batch: dict[str, Any], sampling: SamplingConfig | None = None, stage: str = "train"
    ) -> dict[str, Any]:
        """Sample, decode and score completions for a prompt batch; returns the training buffer."""
        sampling = sampling or self.sampling
        tok = self.tokenizer
        out: Rollout = generate(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            sampling,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            noise=self.sampling_noise(batch["index"], sampling, stage),
        )
        g = sampling.num_generations
        completions = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch["columns"].items()}
        if self.rewards is not None:
            rewards, reward_metrics = self.rewards(prompts, completions, columns)
        else:
            rewards, reward_metrics = torch.zeros(len(completions)), {}
        rewards = rewards.to(self.device)
        completion_mask = out.completion_mask
        prompt_len = out.prompt_ids.shape[1]
        return {
            "input_ids": out.input_ids,
            "attention_mask": out.attention_mask,
            "completion_mask": torch.cat([torch.zeros_like(out.prompt_mask), completion_mask], 1),
            "prompt_len": prompt_len,
            "rewards": rewards,
            "reward_metrics": reward_metrics,
            "is_truncated": out.is_truncated,
            "prompts": prompts,
            "completions": completions,
        }

    def sampling_noise(self, index: Tensor, sampling: SamplingConfig, stage: str) -> Tensor:
        """Uniform numbers for sampling, seeded per (run seed, stage, epoch, prompt row): the same prompt gets the same
        samples however prompts are batched, split across ranks, or resumed from a checkpoint."""
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        epoch = self.current_epoch if self._trainer is not None else 0
        rows = []
        for i in index.tolist():
            seed = base
            for part in (STAGES.index(stage), epoch, i):
                seed = (seed * 1_000_003 + part) % (2**63 - 1)
            g = torch.Generator().manual_seed(seed)
            rows.append(torch.rand(sampling.num_generations, sampling.max_new_tokens, generator=g, dtype=torch.float64))
        return torch.cat(rows).to(self.device)

    @staticmethod
    def _chunks(n: int, size: int | None):
        size = size or n
        for start in range(0, n, size):
            yield slice(start, min(n, start + size))

    def heldout_sequences(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Greedy completions of the held-out prompts, scored by ``LogProbMetrics`` (entropy, KL to reference)."""
        sampling = SamplingConfig(**{**vars(self.sampling), "num_generations": 1, "temperature": 0.0})
        return self.rollout(batch, sampling, stage="heldout")

    def maybe_log_completions(self, buf: dict[str, Any], rewards: Tensor | None = None) -> None:
        """Every ``log_completions_every_n_steps`` steps: a ``completions`` table to W&B and the best one to the
        console. ``rewards`` defaults to the buffer's."""
        every = self.hparams.log_completions_every_n_steps
        if not every or self.global_step % every != 0 or self._trainer is None:
            return
        rewards = (buf["rewards"] if rewards is None else rewards).tolist()
        rows = [[self.global_step, p, c, r] for p, c, r in zip(buf["prompts"], buf["completions"], rewards)]
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("completions", columns=["step", "prompt", "completion", "reward"], data=rows)
        best = max(range(len(rows)), key=lambda i: rewards[i])
        self.print(f"step {self.global_step} best completion (reward {rewards[best]:.3f}): {rows[best][2]!r}")
