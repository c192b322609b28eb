"""Completion log-probs of groups of rows that share a prompt, with the prompt run once per group.

GRPO scores ``G`` completions of the same prompt. Under causal attention the prompt positions of those ``G`` rows
have identical hidden states, so the scoring forward (policy, with autograd, and reference) can run each distinct
prompt once, repeat its key/value cache ``G`` times, and run only the completions on top of it: the same log-probs
as one forward over the concatenated rows (up to rounding), for ``P + G·C`` positions per group instead of
``G·(P + C)`` (about half of them on the benchmark workload). Gradients flow into the shared prompt computation
through the cache (``repeat_interleave`` sums the ``G`` copies' gradients in backward).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["grouped_completion_logits"]


def _decoder(model: nn.Module) -> nn.Module | None:
    if hasattr(model, "get_base_model"):  # peft: the adapters live inside the base model's modules
        model = model.get_base_model()
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else None


def grouped_completion_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    prompt_len: int,
    group: int,
) -> tuple[Tensor, Tensor] | None:
    """Logits ``[N, V]`` of the N positions that predict a completion token and the ``[B, T-1]`` selector, as
    :func:`src.modules.base.completion_logits` returns them, computed with one prompt forward per group.

    ``input_ids`` is ``[B, prompt_len + C]``: left-padded prompts, then right-padded completions; rows
    ``g·i … g·i + g − 1`` must share their prompt. Returns ``None`` (the caller runs the plain forward) when the
    rows are not grouped that way, the model is not a Hugging Face decoder with a KV cache, or there is nothing to
    share.
    """
    from transformers import DynamicCache

    from src.rollout import _forward_kwargs

    b, t = input_ids.shape
    c = t - prompt_len
    if group < 2 or b % group or prompt_len < 1 or c < 1:
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = _decoder(model), getattr(inner, "get_output_embeddings", lambda: None)()
    cfg = getattr(inner, "config", None)
    if decoder is None or head is None or cfg is None:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    if getattr(inner, "is_gradient_checkpointing", False) and torch.is_grad_enabled():
        return None  # checkpointed layers run without a cache in training
    prompt_ids, prompt_mask = input_ids[:, :prompt_len], attention_mask[:, :prompt_len]
    n = b // group
    first_ids, first_mask = prompt_ids[::group], prompt_mask[::group]
    if not (
        torch.equal(prompt_ids.view(n, group, -1), first_ids[:, None].expand(n, group, prompt_len))
        and torch.equal(prompt_mask.view(n, group, -1), first_mask[:, None].expand(n, group, prompt_len))
    ):
        return None
    if not bool(first_mask[:, -1].all()):  # prompts must be left-padded (the last prompt column is real)
        return None
    # drop columns that are padding in every prompt
    start = int(first_mask.bool().any(0).int().argmax())
    first_ids, first_mask = first_ids[:, start:], first_mask[:, start:].long()
    prompt_pos = (first_mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=cfg)
    kwargs = _forward_kwargs(decoder, cache)
    prefix = decoder(
        input_ids=first_ids, attention_mask=first_mask, position_ids=prompt_pos, use_cache=True, **kwargs
    ).last_hidden_state[:, -1]  # [n, H]: predicts the first completion token
    layers = getattr(cache, "layers", None)
    if not layers or any(not isinstance(getattr(layer, "keys", None), Tensor) for layer in layers):
        return None
    for layer in layers:
        layer.keys = layer.keys.repeat_interleave(group, dim=0)
        layer.values = layer.values.repeat_interleave(group, dim=0)
    comp_ids, comp_mask = input_ids[:, prompt_len:], completion_mask[:, prompt_len:]
    rep_mask = first_mask.repeat_interleave(group, dim=0)
    full_mask = torch.cat([rep_mask, attention_mask[:, prompt_len:].long()], dim=1)
    comp_pos = rep_mask.sum(1, keepdim=True) + torch.arange(c, device=input_ids.device)
    hidden = decoder(
        input_ids=comp_ids, attention_mask=full_mask, position_ids=comp_pos, use_cache=True, **kwargs
    ).last_hidden_state  # [B, C, H]
    # position j of the completion is predicted by the hidden state before it
    before = torch.cat([prefix.repeat_interleave(group, dim=0)[:, None], hidden[:, :-1]], dim=1)
    selected = before[comp_mask.bool()]
    target = completion_mask[:, 1:].bool()
    return head(selected), target
