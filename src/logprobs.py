"""The plain log-prob path: one Hugging Face forward, the completion positions, a chunked fused LM head.

Every algorithm scores sequences the same way::

    hidden = model.get_decoder()(input_ids, attention_mask, position_ids)   # [B, T, H], one forward
    states = hidden[:, :-1][completion_mask[:, 1:]]                         # [N, H]: positions predicting a completion
    logits = lm_head(states) / T                                             # [N, V], chunk by chunk: never all at once
    logps  = logits[label] - logsumexp(logits)                               # src.losses.linear_token_logps_and_entropy

then puts the ``N`` per-token values back at their ``[B, T]`` places (0 elsewhere). Only the ``N`` completion positions
go through the LM head (the ``logits_to_keep`` idea), so the ``[B, T, V]`` logits of a full forward never exist; and
when the head is a plain ``nn.Linear`` (:func:`linear_head`), neither do the ``[N, V]`` ones: the head and the
log-softmax run together over row chunks, forward and backward (a fused linear cross-entropy). Any other head (LoRA on
the head, a sharded weight, soft-capped logits) and callers that need the logits themselves (WPO's ``sum p^2``,
distillation's divergences) use :func:`completion_logits` and :func:`logps_from_logits`: the same values.

``accel`` (an :class:`src.accel.Accel`, or ``None``) may replace the one forward by a faster layout that returns the
same ``[N, H]`` states (prefix sharing, packed rows, length groups; see ``src/accel/``) and run the linear layers of
these forwards by another kernel (oneDNN on CPU). With ``accel: off`` or on any model or device where those are not
verified, this file is the whole computation.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.losses import linear_token_logps_and_entropy, token_logps_and_entropy


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_lm_head(model: nn.Module) -> bool:
    """Whether the model generates (a causal LM head), unlike a sequence classifier (a reward model)."""
    return getattr(unwrap(model), "get_output_embeddings", lambda: None)() is not None


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that follow the attention mask, so left- and right-padded rows score the same."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last-layer hidden states ``[B, T, H]`` of a Hugging Face decoder (causal LM or sequence classifier; the
    backbone only, no head), with mask-aware ``position_ids``."""
    decoder = unwrap(model).get_decoder()
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def completion_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, accel: Any = None
) -> tuple[Tensor, Tensor]:
    """Hidden states ``[N, H]`` of the N positions that predict a completion token, and that ``[B, T-1]`` selector
    (a value head reads the same states as the LM head). ``accel`` may compute the same states faster."""
    target = completion_mask[:, 1:].bool()
    with nullcontext() if accel is None else accel.scoring(model):
        states = None if accel is None else accel.completion_hidden(model, input_ids, attention_mask, completion_mask)
        if states is None:
            states = decoder_hidden(model, input_ids, attention_mask)[:, :-1][target]
    return states, target


def head_is_last(inner: nn.Module) -> bool:
    """Whether the logits are the LM head's output on the decoder's states (no soft-capping or scaling after it)."""
    cfg = getattr(inner, "config", None)
    scaled = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
    return not scaled and hasattr(inner, "get_decoder")


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when log-probs can skip its ``[N, V]`` logits: a plain ``nn.Linear`` (tied embeddings included)
    whose weight is an ordinary tensor and that no hook, replaced ``forward`` or later scaling changes. ``None`` for a
    LoRA-wrapped or quantized head, an FSDP2 (DTensor) or ZeRO-3 shard, an accelerate-offloaded head, soft-capped or
    scaled logits."""
    inner = unwrap(model)
    head = getattr(inner, "get_output_embeddings", lambda: None)()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        return None
    if not head_is_last(inner):
        return None
    return head if type(head.weight.data) is Tensor and not hasattr(head.weight, "ds_id") else None


def completion_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, accel: Any = None
) -> tuple[Tensor, Tensor]:
    """Logits ``[N, V]`` of only the N positions that predict a completion token, and that ``[B, T-1]`` selector.

    Models whose head does more than a linear layer (logit soft-capping or scaling) run their own full forward."""
    inner = unwrap(model)
    if head_is_last(inner) and inner.get_output_embeddings() is not None:
        hidden, target = completion_hidden(model, input_ids, attention_mask, completion_mask, accel)
        return inner.get_output_embeddings()(hidden), target
    target = completion_mask[:, 1:].bool()
    position_ids = position_ids_from_mask(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, :-1][target], target


def scatter_tokens(values: Tensor, target: Tensor) -> Tensor:
    """Put per-completion-token ``values [N]`` back at their ``[B, T]`` positions (0 elsewhere)."""
    return F.pad(torch.zeros_like(target, dtype=values.dtype).masked_scatter(target, values), (1, 0))


def logps_from_logits(
    logits: Tensor,
    input_ids: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``[B, T]`` log-probs (and entropies, without gradient unless ``entropy_grad``) of the completion tokens from
    the ``[N, V]`` logits and the ``[B, T-1]`` selector of :func:`completion_logits`; logits are divided by the
    sampling ``temperature``."""
    labels = input_ids[:, 1:][target]
    logps, entropy = token_logps_and_entropy(
        logits, labels, temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad
    )
    return scatter_tokens(logps, target), None if entropy is None else scatter_tokens(entropy, target)


def logps_from_hidden(
    model: nn.Module, hidden: Tensor, input_ids: Tensor, target: Tensor, **kw: Any
) -> tuple[Tensor, Tensor | None]:
    """:func:`logps_from_logits` (same keywords) of the LM head's logits on ``hidden [N, H]``: for a
    :func:`linear_head` chunk by chunk, the ``[N, V]`` logits never existing; otherwise from ``head(hidden)``."""
    head = linear_head(model)
    if head is None:
        return logps_from_logits(unwrap(model).get_output_embeddings()(hidden), input_ids, target, **kw)
    labels = input_ids[:, 1:][target]
    logps, entropy = linear_token_logps_and_entropy(hidden, head.weight, labels, bias=head.bias, **kw)
    return scatter_tokens(logps, target), None if entropy is None else scatter_tokens(entropy, target)


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    accel: Any = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs ``[B, T]`` of the completion tokens (0 elsewhere), aligned with ``input_ids``, and with
    ``with_entropy`` the per-token entropy of ``softmax(logits / temperature)`` (no gradient unless
    ``entropy_grad``)."""
    kw = dict(temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)
    if linear_head(model) is None:  # a head that is more than a plain linear layer: its [N, V] logits
        logits, target = completion_logits(model, input_ids, attention_mask, completion_mask, accel)
        return logps_from_logits(logits, input_ids, target, **kw)
    with nullcontext() if accel is None else accel.scoring(model):  # the fused head's matmul too
        hidden, target = completion_hidden(model, input_ids, attention_mask, completion_mask, accel)
        return logps_from_hidden(model, hidden, input_ids, target, **kw)
