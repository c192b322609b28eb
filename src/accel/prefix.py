"""Prefix sharing and length groups (features ``prefix_sharing`` and ``length_groups``): the same completion-position
states as :func:`src.logprobs.completion_hidden`'s one forward, computed over fewer positions.

``prefix_sharing``: rows that share a prompt (DPO's chosen and rejected, GRPO's generations) run the prompt once,
either as one "tree" row ``[prompt | completion 1 | completion 2 ...]`` with a prefix-sharing mask or with the
completions on the prompt's KV cache (benchmark DPO, 8 pairs: tree -14% step time; GRPO 4 x 4: -8%; CPU, 2 cores).
``length_groups``: a large batch runs in length-sorted groups cut to their own width (benchmark DPO, 16 rows of
~100 tokens: -9% positions, -7% step time with 2 threads; CPU).

Library surface used: the decoder's 4D-mask and KV-cache arguments of transformers 5.x (``DynamicCache``,
``config._attn_implementation`` read to pick the mask form), measured with 5.24.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor, nn

from src.accel.packed import bool_mask_ok, packed_tree_hidden, packs_rows, reads_last_layer_sparsely
from src.data.collate import long_tensor
from src.logprobs import decoder_hidden, position_ids_from_mask, unwrap

# length_groups: a batch of at least 2 * _GROUP_MIN_ROWS rows runs through the decoder in length-sorted groups when
# that cuts its padded positions by at least _GROUP_MIN_SAVING (benchmark DPO, 16 rows of ~100 tokens: -9% positions,
# -7% step time with 2 threads, -14% with 1; see benchmarks/README.md).
_GROUP_MIN_ROWS = 8
_GROUP_MIN_SAVING = 0.05


def length_groups(attention_mask: Tensor, completion_mask: Tensor) -> list[tuple[list[int], int]] | None:
    """``[(rows, width)]``: rows sorted by length, split in halves while a half-split removes enough padding; each
    group is run over its first ``width`` columns. ``None``: one forward over the batch as it is (small batches, or
    no padding to save). Measured on CPU only; on GPU a second forward's launches may cost more than the padding."""
    B, T = attention_mask.shape
    if B < 2 * _GROUP_MIN_ROWS:
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


def row_major(parts: list[Tensor], grouped_rows: list[int], counts: list[int]) -> Tensor:
    """Concatenate per-group ``[n_g, H]`` states (rows in ``grouped_rows`` order, ``counts[r]`` states per row) back
    into the batch's row-major order."""
    start, offset = [0] * len(counts), 0
    for r in grouped_rows:
        start[r], offset = offset, offset + counts[r]
    order = long_tensor([i for r in range(len(counts)) for i in range(start[r], start[r] + counts[r])])
    return torch.cat(parts).index_select(0, order.to(parts[0].device))


def decoder_cache_kwarg(decoder: nn.Module) -> str | None:
    """Name of the KV-cache argument of a HF decoder's ``forward`` (``cache`` in transformers 5, else
    ``past_key_values``); ``None`` if it takes neither."""
    params = inspect.signature(decoder.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def shares_prompts(inner: nn.Module) -> bool:
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
# prompt and to itself (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"); with
# packed_rows the tree rows are packed end to end without padding (src/accel/packed.py), otherwise they are padded
# and take a 4D mask; "cache": the prompts once, then the
# completions on their prompt's KV cache (two or more forwards). The tree needs one decoder call instead of several
# but padded tree rows attend over every row's full square, so the tree is used while that costs at most
# _TREE_MAX_ATTENTION x the cache layout's attention (padded widths) and its mask stays small (benchmark DPO,
# 8 pairs: 1.4x the attention, -14% step time, then -8 to -11% from packing; GRPO, 4 x 4: 1.9x, -8%; see
# benchmarks/README.md). Packed rows attend by blocks, no more work than the cache layout, so the rule then counts
# the blocks and the packed tree is taken whenever its masks fit (SmolLM2-135M GRPO, 2 x 4 generations, 2-vCPU Xeon VM:
# +2-5% tokens/s at 128, 256 and 512 tokens and 290-330 MiB less peak memory than the cache layout, 2 runs each).
_TREE_MAX_ATTENTION = 2.5
_TREE_MAX_MASK = 1 << 24  # elements of the [rows, 1, W, W] mask


def shared_prompts(
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


def tree_hidden(
    inner: nn.Module,
    groups: dict[tuple[int, ...], list[int]],
    completions: list[list[int]],
    device: torch.device,
    *,
    packed: bool = False,
    sparse: bool = False,
) -> Tensor:
    """The "tree" layout: one row per prompt, ``[prompt | its completions]``; completion tokens see the prompt and the
    earlier tokens of their own completion (positions continue from the prompt). With ``packed`` (where
    :func:`src.accel.packed.packs_rows` holds) the rows run packed end to end (``[1, N]``, attention per row by tree
    blocks), with ``sparse`` also the sparse last layer; otherwise padded to ``[rows, W]`` with a 4D mask."""
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
    if packed and packs_rows(inner):
        sparse = sparse and reads_last_layer_sparsely(inner)
        return packed_tree_hidden(inner, rows, pos, seg, local, row_of, device, sparse)
    W = max(lengths)
    ids = long_tensor([r + [0] * (W - len(r)) for r in rows]).to(device)
    pos_t = long_tensor([q + [0] * (W - len(q)) for q in pos]).to(device)
    seg_t = long_tensor([s + [-1] * (W - len(s)) for s in seg])
    key, query = seg_t[:, None, :], seg_t[:, :, None]
    allowed = torch.ones(W, W, dtype=torch.bool).tril() & (key >= 0) & ((key == 0) | (key == query))
    allowed[:, :, 0] |= seg_t < 0  # no empty softmax row for pad queries (their states are never read)
    if bool_mask_ok(inner):
        mask = allowed[:, None]
    else:  # additive float mask: what eager attention and transformers 4.x take as-is
        dtype = next(inner.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask.to(device), position_ids=pos_t, use_cache=False)
    read = np.concatenate([row_of[b] * W + local[b] for b in range(len(completions))])
    return hidden.last_hidden_state.reshape(len(rows) * W, -1).index_select(0, torch.from_numpy(read).to(device))


def cached_hidden(
    inner: nn.Module,
    groups: dict[tuple[int, ...], list[int]],
    completions: list[list[int]],
    device: torch.device,
    *,
    grouped: bool = False,
) -> Tensor | None:
    """The "cache" layout: each distinct prompt once (left-padded), then the completions (right-padded, in
    length-sorted groups where that saves padding, with ``grouped``) on their prompt's keys/values."""
    from transformers import DynamicCache

    decoder = inner.get_decoder()
    cache_kwarg = decoder_cache_kwarg(decoder)
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
    groups_ = (length_groups(c_mask, c_mask) if grouped else None) or [(list(range(len(n))), max(n))]
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
    return row_major(parts, grouped_rows, n)


def shared_prompt_layout(
    groups: dict[tuple[int, ...], list[int]], completions: list[list[int]], *, packed: bool = False
) -> str:
    """``"tree"`` or ``"cache"``: the tree while its attention work stays within ``_TREE_MAX_ATTENTION`` x the cache
    layout's (``P²`` per prompt, ``C·(P + C)`` per completion, padded widths) and its mask within ``_TREE_MAX_MASK``
    elements. The tree's work is every padded row's ``W²``, or with ``packed`` rows (attention by tree blocks) the
    same block sums as the cache layout's without padding."""
    p = max(map(len, groups))
    c = max(map(len, completions))
    w = max(len(k) + sum(len(completions[b]) for b in rows) for k, rows in groups.items())
    mask, cached = len(groups) * w * w, len(groups) * p * p + len(completions) * c * (p + c)
    tree = mask
    if packed:
        tree = sum(
            len(k) ** 2 + sum(len(completions[b]) * (len(k) + len(completions[b])) for b in rows)
            for k, rows in groups.items()
        )
    return "tree" if tree <= _TREE_MAX_ATTENTION * cached and mask <= _TREE_MAX_MASK else "cache"


def shared_prompt_hidden(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    packed: bool = False,
    sparse: bool = False,
    grouped: bool = False,
) -> Tensor | None:
    """:func:`src.logprobs.completion_hidden`'s states for batches whose rows share prompts (DPO: chosen and rejected;
    GRPO: the generations of a prompt), with each distinct prompt computed once: same states as one forward over the
    rows (exact up to float rounding; gradients reach the prompt through every completion that attends to it).

    Layout per :func:`shared_prompt_layout`: ``tree`` (one forward over ``[prompt | completions]`` rows with a
    prefix-sharing mask) or ``cache`` (prompts once, completions on their KV cache). Returns ``None`` (run the rows
    as they are) unless every row is ``[pad] prompt completion [pad]`` with a non-empty prompt and completion, at least
    two rows share a prompt, and the model is a plain full-attention decoder (eager or SDPA attention for the tree).
    """
    inner = unwrap(model)
    if input_ids.shape[0] < 2 or not shares_prompts(inner):
        return None
    parsed = shared_prompts(input_ids, attention_mask, completion_mask)
    if parsed is None:
        return None
    groups, completions = parsed
    attn_impl = getattr(inner.config, "_attn_implementation", None)
    packed = packed and packs_rows(inner)
    if attn_impl in ("sdpa", "eager") and shared_prompt_layout(groups, completions, packed=packed) == "tree":
        return tree_hidden(inner, groups, completions, input_ids.device, packed=packed, sparse=sparse)
    return cached_hidden(inner, groups, completions, input_ids.device, grouped=grouped)


def grouped_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> Tensor | None:
    """:func:`src.logprobs.completion_hidden`'s states with the rows run in length-sorted groups trimmed of their
    all-padding columns (:func:`length_groups`); ``None`` when grouping saves nothing."""
    groups = length_groups(attention_mask, completion_mask)
    if groups is None:
        return None
    target = completion_mask[:, 1:].bool()
    parts, grouped_rows = [], []
    for rows, width in groups:
        idx = torch.tensor(rows, device=input_ids.device)
        hidden = decoder_hidden(model, input_ids[idx, :width], attention_mask[idx, :width])
        parts.append(hidden[:, :-1][target[idx, : width - 1]])
        grouped_rows += rows
    return row_major(parts, grouped_rows, target.sum(-1).tolist())
