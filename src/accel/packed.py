"""Packed prefix-sharing rows and the sparse last layer (features ``packed_rows`` and ``sparse_last_layer``).

``packed_rows``: the ``[prompt | completion 1 | completion 2 | ...]`` rows of the tree layout (``src/accel/prefix.py``)
become one ``[1, N]`` sequence, so embeddings, norms, q/k/v/o and MLP see only real tokens; attention runs per row
and per block of the tree (the prompt causally, each completion over ``[prompt | itself]``) on the packed states
through a function registered with transformers' ``AttentionInterface`` (:func:`_packed_sdpa`), selected for the call
by switching ``config._attn_implementation`` and passing the rows as a keyword argument, which transformers forwards
to attention. A guard raises if a model's attention does not dispatch through the interface. Measured on CPU
(2 cores, benchmark DPO: step -8 to -11%; GRPO within noise; attention by blocks instead of one masked call per row:
SmolLM2-135M DPO at 512 tokens, SDPA forward time -44%, step about -10%).

``sparse_last_layer``: in the packed rows every position is a key/value for later ones, but only the positions that
predict a completion token are read; the last layer computes queries, attention output and MLP only there (same
values; benchmark DPO -5%, CPU).

Private library surface used here, checked against transformers 5.x (measured with 5.24): ``AttentionInterface.
_global_mapping``, ``config._attn_implementation``, the module layout of Llama/Mistral/Qwen2 decoder layers
(``self_attn.{q,k,v,o}_proj``, ``head_dim``, ``scaling``, ``rotary_emb``). ``src.accel`` turns these features off,
with one log line, on any other major version.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.accel.decode import SUPPORTED
from src.data.collate import long_tensor


def bool_mask_ok(inner: nn.Module) -> bool:
    """Whether a custom 4D bool mask (True = attend) reaches attention as-is: SDPA under transformers >= 5."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return getattr(inner.config, "_attn_implementation", None) == "sdpa" and major >= 5


class PackedRows:
    """Tree rows packed end to end (``[1, N]`` tokens, no padding): row ``r`` holds tokens ``bounds[r]``, its prompt
    ``[0, prompt_len[r])`` then its completions ``spans[r]`` (row-local ``(start, end)``); ``masks[r]``
    (``[1, 1, L_r, L_r]``, True = attend) is the row's whole prefix-sharing mask. ``calls`` counts the attention calls
    that used it."""

    def __init__(
        self,
        bounds: list[tuple[int, int]],
        masks: list[Tensor],
        prompt_len: list[int],
        spans: list[list[tuple[int, int]]],
    ) -> None:
        self.bounds, self.masks, self.prompt_len, self.spans, self.calls = bounds, masks, prompt_len, spans, 0
        self._completion_masks: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def from_segments(cls, seg: list[list[int]], device: torch.device | str) -> PackedRows:
        """The rows given by each token's segment id (``0`` the prompt, then ``1, 2, ...`` one per completion), packed
        end to end in order."""
        bounds, masks, prompt_len, spans, start = [], [], [], [], 0
        for s in seg:
            t = torch.tensor(s)
            mask = torch.ones(len(s), len(s), dtype=torch.bool).tril() & ((t == 0) | (t[:, None] == t))
            ends = np.cumsum(np.bincount(s)).tolist()  # end of the prompt, then of each completion
            bounds.append((start, start + len(s)))
            masks.append(mask[None, None].to(device))
            prompt_len.append(ends[0])
            spans.append(list(zip(ends[:-1], ends[1:])))
            start += len(s)
        return cls(bounds, masks, prompt_len, spans)

    def completion_mask(self, prompt: int, n: int, device: torch.device) -> Tensor:
        """``[1, 1, n, prompt + n]``: a completion of ``n`` tokens sees the whole prompt and itself causally."""
        if (prompt, n) not in self._completion_masks:
            mask = torch.ones(n, prompt + n, dtype=torch.bool)
            mask[:, prompt:] = torch.ones(n, n, dtype=torch.bool).tril()
            self._completion_masks[prompt, n] = mask[None, None].to(device)
        return self._completion_masks[prompt, n]


_PACKED_ATTENTION = "lightning_align_packed_sdpa"


def _packed_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed: PackedRows | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """SDPA over packed tree rows (registered with transformers' ``AttentionInterface``) on views of the packed
    queries/keys/values, so neither the linear layers nor attention see padding. Per row, by blocks of the tree: the
    prompt attends to itself causally, then each completion to ``[prompt | itself]`` (its keys next to the prompt's),
    so no work goes to the masked-out blocks between completions (one row ``[P | C | C]`` at P = C: 4.5 P^2 scores
    instead of 9 P^2). Without ``packed`` it is transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    packed.calls += 1
    gqa = query.shape[1] != key.shape[1]

    def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None, enable_gqa=gqa
        )
        return out.transpose(1, 2)

    # one split per tensor into its tree blocks (prompt, completion 1, ...): backward concatenates the blocks'
    # gradients once, where slicing would zero-fill a full-size gradient per slice
    sizes = [n for p, spans in zip(packed.prompt_len, packed.spans) for n in (p, *(e - s for s, e in spans))]
    blocks = zip(*(t.split(sizes, dim=2) for t in (query, key, value)))
    out = []
    for p, spans in zip(packed.prompt_len, packed.spans):
        q_p, k_p, v_p = next(blocks)
        out.append(sdpa(q_p, k_p, v_p, None))
        for s, e in spans:
            q_c, k_c, v_c = next(blocks)
            mask = packed.completion_mask(p, e - s, query.device)
            out.append(sdpa(q_c, torch.cat([k_p, k_c], 2), torch.cat([v_p, v_c], 2), mask))
    return torch.cat(out, dim=1), None


def packs_rows(inner: nn.Module) -> bool:
    """Whether tree rows can run packed (:func:`_packed_sdpa`): SDPA under transformers >= 5 (extra keyword arguments
    reach the attention function), in a Llama-family decoder, whose attention dispatches through
    ``AttentionInterface``. Registers the packed attention function on first use."""
    if not bool_mask_ok(inner) or getattr(inner.config, "model_type", None) not in SUPPORTED:
        return False
    from transformers import AttentionInterface

    if _PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_PACKED_ATTENTION, _packed_sdpa)
    return True


class attention_implementation:
    """Context manager: ``config._attn_implementation = name`` inside, the previous value after."""

    def __init__(self, config: Any, name: str) -> None:
        self.config, self.name = config, name

    def __enter__(self) -> None:
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc: Any) -> None:
        self.config._attn_implementation = self.previous


def packed_tree_hidden(
    inner: nn.Module,
    rows: list[list[int]],
    pos: list[list[int]],
    seg: list[list[int]],
    local: list[np.ndarray],
    row_of: list[int],
    device: torch.device,
    sparse: bool,
) -> Tensor:
    """The tree rows of :func:`src.accel.prefix.tree_hidden` packed end to end (``[1, N]`` tokens, no padding), each
    row attending through its own mask (:func:`_packed_sdpa`); with ``sparse`` the last layer runs only where states
    are read (:func:`_decoder_keeping`). Returns the ``[N_read, H]`` states at ``local`` positions of each completion
    (row ``row_of[b]``)."""
    packed = PackedRows.from_segments(seg, device)
    prompt_len, starts = packed.prompt_len, np.array([a for a, _ in packed.bounds])
    ids = long_tensor([t for r in rows for t in r])[None].to(device)
    pos_t = long_tensor([t for q in pos for t in q])[None].to(device)
    with attention_implementation(inner.config, _PACKED_ATTENTION):
        if sparse:
            # the last layer's queries: per row the contiguous positions from the prompt's last token to the row's
            # second-to-last token (every read position, plus the unread last token of each non-final completion)
            q_bounds = [(a + p - 1, b - 1) for (a, b), p in zip(packed.bounds, prompt_len)]
            q_start = np.cumsum([b - a for a, b in q_bounds]) - [b - a for a, b in q_bounds]
            read = np.concatenate(
                [q_start[row_of[b]] + local[b] - (prompt_len[row_of[b]] - 1) for b in range(len(local))]
            )
            states = _decoder_keeping(inner, ids, pos_t, packed, q_bounds)
        else:
            read = np.concatenate([starts[row_of[b]] + local[b] for b in range(len(local))])
            states = inner.get_decoder()(input_ids=ids, position_ids=pos_t, use_cache=False, packed=packed)
            states = states.last_hidden_state[0]
    if packed.calls != inner.config.num_hidden_layers:
        raise RuntimeError(
            f"packed tree rows: {packed.calls} of {inner.config.num_hidden_layers} attention layers ran the packed "
            f"attention; {type(inner).__name__} does not dispatch it through transformers' AttentionInterface"
        )
    return states.index_select(0, torch.from_numpy(read).to(device))


def reads_last_layer_sparsely(inner: nn.Module) -> bool:
    """Whether :func:`_decoder_keeping` applies: a Llama-family decoder (pre-norm layers of ``self_attn`` with
    ``q/k/v/o_proj``, ``mlp``, two norms; rotary embeddings; no q/k norms) under SDPA, with plain parameters
    (sharded FSDP/DeepSpeed modules must run through their root module's forward)."""
    cfg = inner.config
    if getattr(cfg, "model_type", None) not in SUPPORTED or not bool_mask_ok(inner):
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
    packed: PackedRows,
    q_bounds: list[tuple[int, int]],
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
    for (a, b), (qa, qb), m, p in zip(packed.bounds, q_bounds, packed.masks, packed.prompt_len):
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
