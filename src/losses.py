"""Loss functions and advantage estimators for aligning language models.

Everything here is a pure function of tensors: no model, no Lightning, no distributed calls. Shapes follow one
convention: ``B`` sequences, ``T`` completion tokens, ``V`` vocabulary entries; ``mask`` is 1 (or True) on real
completion tokens and 0 on prompt and padding. Values at masked-out positions never reach a result, neither its
value nor its gradient, even when they hold NaN or Inf (inputs are filtered with ``torch.where`` before any
arithmetic, so no ``0 * nan`` can leak).

Definitions follow TRL (the loss-type names, the metric names, the aggregation conventions) and each docstring
names the paper an equation comes from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "CLIPPED_GRPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "LENGTH_NORMALISED_LOSS_TYPES",
    "adaptive_entropy_coef",
    "adaptive_kl_update",
    "bradley_terry_loss",
    "chunked_generalized_jsd",
    "decoupled_group_advantages",
    "dpo_loss",
    "entropy_bonus_loss",
    "entropy_from_logits",
    "f_divergence_score",
    "gae",
    "generalized_jsd",
    "group_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "kl_estimate",
    "kl_penalized_rewards",
    "ld_dpo_logps",
    "log_sum_sq_probs",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "nanstd",
    "nll_loss",
    "off_policy_sequence_mask",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
    "rloo_loss",
    "sequence_kl_penalty",
    "simpo_loss",
    "token_logps",
    "token_logps_and_entropy",
    "vespo_weights",
    "wpo_weights",
]

DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "sppo_hard",
    "bco_pair",
    "aot",
    "aot_unpaired",
    "discopop",
    "sigmoid_norm",
)
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "sigmoid_norm")  # dpo_loss divides their scores by the completion lengths
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses of the chosen-rejected score difference alone: the f-DPO reparameterisation leaves a beta log Z(x) term
# that cancels only there (TRL's list; "sft" does not use the scores at all).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
# The loss types of the clipped surrogate (the ones ``delta`` and the clip_ratio metrics apply to).
CLIPPED_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
KL_ESTIMATORS = ("k1", "k2", "k3")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Elements of float32 scratch space a chunk of logits may occupy (64 MiB) in token_logps / entropy_from_logits.
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _row_chunks(x: Tensor, per_row: int | None = None) -> list[tuple[int, int]]:
    """Slices ``[start, stop)`` along dim 0 so that each slice holds at most ``_CHUNK_ELEMENTS`` elements (of
    ``per_row`` each; by default the size of a row of ``x``); a shorter remainder comes first (the fused head keeps
    the last chunk's logits from forward: the full one)."""
    n = x.shape[0]
    per_row = per_row or (max(1, x[0].numel()) if n else 1)
    step = max(1, _CHUNK_ELEMENTS // per_row)
    return [(max(0, e - step), e) for e in range(n, 0, -step)][::-1]


class _TokenLogps(torch.autograd.Function):
    """log softmax(z / temperature)[label], chunked over dim 0 in forward and backward; ``z`` is ``x`` (logits), or
    with ``weight`` the LM head's logits ``x @ weight.T + bias`` of the states ``x``, computed one chunk at a time.

    Only the inputs and ``labels`` are saved, so no ``[..., V]`` copy is kept for backward; the ``[..., V]`` scratch
    space (log-softmax in forward, softmax in backward) is one chunk at a time. The fused head (``weight``) recomputes
    each chunk's logits in backward except the last chunk's, kept from forward (with one chunk, no recompute, as the
    plain path keeps the logits).
    """

    @staticmethod
    def _z(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, s: int, e: int) -> Tensor:
        """Rows ``s:e`` of ``z / temperature`` in the compute dtype (float32 for fp16/bf16)."""
        z = x[s:e] if weight is None else F.linear(x[s:e], weight, bias)  # the head's own matmul (autocast's dtype)
        ctx.mm_dtype = z.dtype
        z = z.to(_compute_dtype(z.dtype))
        return z / ctx.temperature if ctx.temperature != 1.0 else z

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        labels: Tensor,
        temperature: float,
        with_entropy: bool,
        entropy_grad: bool = False,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        ctx.temperature, ctx.entropy_grad = temperature, with_entropy and entropy_grad
        ctx.spans = _row_chunks(x, None if weight is None else weight.shape[0])
        dtype = _compute_dtype(x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype))
        out = x.new_zeros(labels.shape, dtype=dtype)
        entropy = x.new_zeros(labels.shape if with_entropy else (0,), dtype=dtype)
        z = None
        for s, e in ctx.spans:
            z = _TokenLogps._z(ctx, x, weight, bias, s, e)
            # log_softmax of one chunk (a fused kernel; faster than logsumexp on CPU), then gather and drop it
            logp = torch.log_softmax(z, dim=-1)
            out[s:e] = logp.gather(-1, labels[s:e].unsqueeze(-1)).squeeze(-1)
            if with_entropy:  # the same log-softmax gives H = -sum p log p (no gradient)
                entropy[s:e] = _entropy_from_logp(logp)
        keep = weight is not None and any(ctx.needs_input_grad)  # the last chunk's logits
        ctx.save_for_backward(x, labels, weight, bias, z if keep else None)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, labels, weight, bias, kept = ctx.saved_tensors
        need_x, *_, need_w, need_b = ctx.needs_input_grad
        grad = None if (len(ctx.spans) == 1 and weight is None) or not need_x else torch.empty_like(x)
        grad_w = grad_b = None  # the head's: the first chunk's product, then summed over the others
        mm = ctx.mm_dtype if ctx.spans else x.dtype  # the head's matmuls run in forward's dtype (autocast's)
        h, w, b = (
            (x, None, None) if weight is None else (x.to(mm), weight.to(mm), None if bias is None else bias.to(mm))
        )
        for s, e in ctx.spans:
            z = kept if kept is not None and e == len(x) else _TokenLogps._z(ctx, h, w, b, s, e)
            g = grad_out[s:e].to(z.dtype).unsqueeze(-1)
            if ctx.entropy_grad:
                # d/dz_j of H = -sum p log p is -p_j (log p_j + H); with the log-prob term: p (-g - g_H (log p + H))
                logp = torch.log_softmax(z, dim=-1)
                ent = _entropy_from_logp(logp).unsqueeze(-1)
                g_h = grad_entropy[s:e].to(z.dtype).unsqueeze(-1)
                chunk = logp.exp() * (-g - g_h * (logp.clamp(min=torch.finfo(logp.dtype).min) + ent))
            else:
                # d/dz [log softmax(z)_y] = onehot(y) - softmax(z); chain rule through z = logits / temperature.
                chunk = torch.softmax(z, dim=-1).mul_(-g)
            chunk.scatter_add_(-1, labels[s:e].unsqueeze(-1), g)
            if ctx.temperature != 1.0:
                chunk.div_(ctx.temperature)
            if weight is None and grad is None:  # a single chunk of logits: it is the gradient
                return chunk.to(x.dtype), None, None, None, None, None, None
            if weight is None:
                grad[s:e] = chunk
                continue
            chunk = chunk.to(mm)  # the logits' gradient through the head: dx = dz @ W, dW = dz.T @ x, db = sum dz
            if need_x:
                grad[s:e] = chunk @ w
            if need_w and grad_w is None:  # no zero-filled [V, H] buffer to add the first product to
                grad_w = (chunk.T @ h[s:e]).to(weight.dtype)
            elif need_w:  # under autocast a float32 weight sums the bf16 products in float32
                grad_w.addmm_(chunk.T, h[s:e]) if grad_w.dtype == mm else grad_w.add_(chunk.T @ h[s:e])
            if need_b:
                grad_b = chunk.sum(0).to(bias.dtype) if grad_b is None else grad_b + chunk.sum(0)
        return grad, None, None, None, None, grad_w, grad_b


def _entropy_from_logp(logp: Tensor) -> Tensor:
    """``-sum p log p`` over the last dim from log-probabilities, with ``0 log 0 = 0`` (masked vocabulary: a log-prob
    of -inf is clamped to the most negative finite value, which ``p = 0`` turns into 0). One ``exp`` and one dot
    product per row: ~3x cheaper on CPU than ``where``-masking the ``[..., V]`` product. Outside autograd ``logp`` is
    clamped and ``p`` multiplied in place: one ``[..., V]`` temporary instead of three (same values)."""
    graph, p, low = logp.requires_grad and torch.is_grad_enabled(), logp.exp(), torch.finfo(logp.dtype).min
    return -(p * logp.clamp(min=low) if graph else p.mul_(logp.clamp_(min=low))).sum(-1)  # autograd: out of place


def token_logps(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    ``log p(y) = z_y - logsumexp(z)`` with ``z = logits / temperature``, computed chunk by chunk over the leading
    dimension (at most ~64 MiB of float32 scratch per chunk): the full ``log_softmax`` is never materialised and no
    copy of the logits is kept for backward (the gradient ``(onehot(y) - softmax(z)) / temperature`` is recomputed
    chunk-wise). fp16/bf16 logits are upcast per chunk and the result is float32; float32/float64 logits keep
    their dtype.

    Args:
        logits: ``[..., V]`` (e.g. ``[B, T, V]`` or ``[N, V]``).
        labels: ``[...]`` token ids. Negative ids (e.g. ``-100`` padding) yield 0 and receive no gradient.
        temperature: sampling temperature the logits are divided by (as in TRL's GRPO/PPO).

    Returns:
        ``[...]`` log-probabilities.
    """
    return token_logps_and_entropy(logits, labels, temperature=temperature, with_entropy=False)[0]


def token_logps_and_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logps` and, from the same chunk-wise log-softmax, the entropy of ``softmax(logits /
    temperature)`` at each position (what :func:`entropy_from_logits` computes, without a second pass over the
    ``[..., V]`` logits). ``with_entropy=False`` returns ``(logps, None)``. The entropy has no gradient unless
    ``entropy_grad`` (an entropy bonus): then backward also recomputes ``dH/dz = -p (log p + H) / temperature``
    chunk-wise."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on leading dims")
    if logits.dim() == 1:  # a single position
        lp, ent = token_logps_and_entropy(
            logits.unsqueeze(0),
            labels.unsqueeze(0),
            temperature=temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )
        return lp.squeeze(0), None if ent is None else ent.squeeze(0)
    labels = labels.long()
    valid = labels >= 0
    logps, entropy = _TokenLogps.apply(logits, labels.clamp(min=0), float(temperature), with_entropy, entropy_grad)
    logps = torch.where(valid, logps, torch.zeros((), dtype=logps.dtype, device=logps.device))
    return logps, entropy if with_entropy else None


def linear_token_logps_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logps_and_entropy` of the logits ``z = hidden @ weight.T + bias`` without materialising them (a
    fused linear cross-entropy: Liger Kernel, Hsu et al. 2024; "Cut Your Losses in Large-Vocabulary Language Models",
    Wijmans et al. 2024).

    ``log p(y) = z_y / T - logsumexp(z / T)`` and, with ``with_entropy``, ``H = -sum_v p_v log p_v`` of
    ``p = softmax(z / T)``, over row chunks of at most ``_CHUNK_ELEMENTS`` logits (64 MiB of float32): the ``[N, V]``
    logits never exist. Backward recomputes each chunk's logits and their gradient
    ``dz = g (onehot(y) - p) / T`` (plus ``-g_H p (log p + H) / T`` with ``entropy_grad``), then
    ``grad_hidden = dz @ W``, ``grad_W += dz.T @ hidden``, ``grad_bias += sum dz``; the last chunk's logits are kept
    from forward instead (when one chunk holds all ``N`` rows, no recompute: the plain path's speed). The
    matmul runs as the LM head's own (the inputs' dtype; autocast's under autocast), the softmax in float32 for
    fp16/bf16; log-probs are float32 (float64 for float64 inputs), gradients come back in the inputs' dtypes.

    Args:
        hidden: ``[N, H]`` states that predict the labels.
        weight: ``[V, H]`` LM head weight (tied embeddings included); ``bias``: ``[V]`` or ``None``.
        labels: ``[N]`` token ids. Negative ids (e.g. ``-100``) yield 0 and receive no gradient.
        temperature: sampling temperature the logits are divided by.
        with_entropy, entropy_grad: as :func:`token_logps_and_entropy`.

    Returns:
        ``([N] log-probs, [N] entropies or None)``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    labels = labels.long()
    args = (float(temperature), with_entropy, entropy_grad, weight, bias)
    logps, entropy = _TokenLogps.apply(hidden, labels.clamp(min=0), *args)
    return logps.masked_fill(labels < 0, 0.0), entropy if with_entropy else None


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``p = softmax(logits)`` at each position: ``H = -sum_v p_v log p_v``.

    Computed chunk-wise over the leading dimension in float32 (or float64) to bound scratch memory; usually
    called under ``torch.no_grad()`` for the ``entropy`` metric (TRL logs the same quantity).

    Args:
        logits: ``[..., V]``.

    Returns:
        ``[...]`` entropies in nats.
    """
    if logits.dim() == 1:
        return entropy_from_logits(logits.unsqueeze(0)).squeeze(0)
    dtype = _compute_dtype(logits.dtype)
    parts = []
    for s, e in _row_chunks(logits):
        parts.append(_entropy_from_logp(torch.log_softmax(logits[s:e].to(dtype), dim=-1)))
    return torch.cat(parts, dim=0) if parts else logits.new_zeros(logits.shape[:-1], dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------


def _mask_like(x: Tensor, mask: Tensor) -> Tensor:
    return torch.broadcast_to(mask.bool(), x.shape)


def _zero_fill(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask``, else 0 (NaN/Inf outside the mask neither propagate nor send NaN gradients)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_i m_i x_i`` over all entries (``dim=None``) or along ``dim``; entries with ``m_i = 0`` are ignored."""
    m = _mask_like(x, mask)
    x = _zero_fill(x, m)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_i m_i x_i / sum_i m_i`` over all entries or along ``dim``; entries with ``m_i = 0`` are ignored.

    An empty mask (or an empty row when ``dim`` is given) yields 0 rather than NaN.
    """
    m = _mask_like(x, mask)
    total = _zero_fill(x, m)
    count = m.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, *, dim: int | None = None) -> Tensor:
    """Variance of the masked entries: ``sum_i m_i (x_i - mean)^2 / n``, times ``n / (n - 1)`` when ``unbiased``.

    ``n = sum_i m_i``. With ``n <= 1`` the Bessel correction is skipped (the result is the biased variance, 0 for
    a single entry) instead of dividing by zero.
    """
    m = _mask_like(x, mask)
    x = _zero_fill(x, m)
    mean = masked_mean(x, m, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    centered = _zero_fill(x - mean, m)
    count = m.to(x.dtype).sum() if dim is None else m.to(x.dtype).sum(dim)
    sq = centered.pow(2).sum() if dim is None else centered.pow(2).sum(dim)
    var = sq / count.clamp(min=1)
    if unbiased:
        var = var * torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten the masked entries: ``(x - mean) / sqrt(var + eps)``, mean and (unbiased) variance over the mask.

    With ``shift_mean=False`` the mean is added back: ``(x - mean) / sqrt(var + eps) + mean`` (TRL / OpenRLHF,
    used to normalise PPO advantages, Huang et al. 2024 "The N+ implementation details of RLHF with PPO").
    Masked-out positions are set to 0.
    """
    m = _mask_like(x, mask)
    x = _zero_fill(x, m)  # before any arithmetic, so that no 0 * nan reaches a gradient
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_fill(whitened, m)


# ----------------------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------------------


def kl_estimate(logps: Tensor, ref_logps: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimator of ``KL(pi || pi_ref)`` from samples of ``pi`` (Schulman 2020, "Approximating KL
    divergence", http://joschu.net/blog/kl-approx.html).

    With ``d = log pi_ref(y) - log pi(y)``:
    ``k1 = -d`` (unbiased, high variance, can be negative); ``k2 = d^2 / 2`` (biased, low variance);
    ``k3 = exp(d) - d - 1`` (unbiased, always >= 0; the GRPO estimator of Shao et al. 2024).
    """
    if kind == "k1":
        return logps - ref_logps
    if kind == "k2":
        return 0.5 * (logps - ref_logps).pow(2)
    if kind == "k3":
        d = ref_logps - logps
        return torch.expm1(d) - d  # exp(d) - 1 - d, accurate for small d
    raise ValueError(f"Unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


def kl_penalized_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, *, beta: float, kind: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards ``r_t = -beta * KL_t``, plus the sequence score on the last real token.

    Ziegler et al. 2019 ("Fine-tuning language models from human preferences"); the token-level form follows
    Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"). Summed over a sequence,
    ``sum_t r_t = score - beta * sum_t KL_t``. Sequences without real tokens get no score.

    Args:
        scores: ``[B]`` scalar rewards (reward model or reward functions).
        logps, ref_logps: ``[B, T]`` token log-probabilities of the sampling policy and of the reference.
        mask: ``[B, T]`` completion mask (may have leading and trailing zeros).
        beta: KL coefficient.
        kind: KL estimator, see :func:`kl_estimate` (TRL's PPO uses k1).

    Returns:
        ``(rewards [B, T], kl [B, T])``, both 0 outside the mask.
    """
    m = _mask_like(logps, mask)
    kl = _zero_fill(kl_estimate(_zero_fill(logps, m), _zero_fill(ref_logps, m), kind), m)
    rewards = -beta * kl
    T = m.shape[-1]
    last = (T - 1) - m.flip(-1).to(torch.int8).argmax(-1)  # index of the last real token of each row
    score = torch.where(m.any(-1), scores.reshape(-1).to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    rewards = rewards + torch.zeros_like(rewards).scatter(-1, last.unsqueeze(-1), score.unsqueeze(-1))
    return rewards, kl


def adaptive_kl_update(
    kl_coef: float, current_kl: float | Tensor, *, target: float, horizon: int, n_steps: int
) -> float:
    """Adaptive KL controller (Ziegler et al. 2019, Sec. 2.2): ``beta <- beta * (1 + e * n_steps / horizon)`` with
    proportional error ``e = clip(KL / target - 1, -0.2, 0.2)``.

    Args:
        kl_coef: current coefficient ``beta``.
        current_kl: measured KL (per sequence) of the latest batch.
        target: target KL.
        horizon: horizon ``K_beta`` in samples.
        n_steps: number of samples the measurement covers.
    """
    kl = float(current_kl)
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return float(kl_coef) * (1.0 + error * n_steps / horizon)


# ----------------------------------------------------------------------------------------------------------------
# Preference losses
# ----------------------------------------------------------------------------------------------------------------


def f_divergence_score(logratio: Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """``f'(u)`` at ``u = pi/pi_ref``, from ``log u``: the per-sequence score f-DPO puts in place of the log-ratio
    (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", arXiv:2309.16240), as TRL 1.16 computes it:

    - ``reverse_kl``: ``log u`` (DPO);
    - ``forward_kl``: ``1 - 1/u = 1 - exp(-log u)``;
    - ``js_divergence``: ``log(2u / (1 + u)) = log 2 + log s(log u)``;
    - ``alpha_divergence``: ``(u^(alpha-1) - 1) / (alpha - 1)`` (``alpha`` = TRL's ``f_alpha_divergence_coef``;
      ``log u`` when ``|alpha - 1| < 1e-6``). ``(alpha-1) log u`` is clamped at 80 (11 in fp16) before ``exp`` and
      computed in float32 for fp16/bf16 inputs, as in TRL.
    """
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        x = (alpha - 1.0) * logratio
        x = x.float() if x.dtype in _LOW_PRECISION else x
        x = x.clamp(max=11.0 if logratio.dtype == torch.float16 else 80.0)
        return torch.expm1(x).to(logratio.dtype) / (alpha - 1.0)
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCES}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization and its pairwise variants, per pair, with TRL 1.16's definitions.

    Let ``c = log pi(y_w) - log pi_ref(y_w)``, ``r = log pi(y_l) - log pi_ref(y_l)``, ``ls = label_smoothing``, and
    ``h = f(c) - f(r)`` with ``f`` = :func:`f_divergence_score` (f-DPO; ``f(u) = u`` for the default ``reverse_kl``,
    which only the losses marked * accept otherwise):

    - ``sigmoid`` *: ``-(1-ls) log s(beta h) - ls log s(-beta h)``; DPO (Rafailov et al. 2023), with ``ls > 0`` the
      conservative cDPO variant (Mitchell 2023; TRL 1.16's sigmoid has no ``ls``).
    - ``robust`` *: ``(-(1-ls) log s(beta h) + ls log s(-beta h)) / (1 - 2 ls)`` (Chowdhury et al. 2024, rDPO).
    - ``hinge`` *: ``relu(1 - beta h)`` (SLiC, Zhao et al. 2023).
    - ``ipo`` *: ``(h - 1/(2 beta))^2`` on length-averaged scores ``f(c)/|y_w| - f(r)/|y_l|`` (Azar et al. 2023,
      Eq. 17; the averaging is TRL's, confirmed with the IPO authors).
    - ``exo_pair`` *: ``s(beta h)(log s(beta h) - log(1-eps)) + s(-beta h)(log s(-beta h) - log eps)`` with
      ``eps = ls``, which must be > 0 (Ji et al. 2024, EXO, Eq. 16; the paper uses 1e-3; TRL raises for 0 too).
    - ``nca_pair``: ``-log s(beta c) - 0.5 log s(-beta c) - 0.5 log s(-beta r)`` (Chen et al. 2024, NCA).
    - ``apo_zero``: ``1 - s(beta c) + s(beta r)``; ``apo_down``: ``s(beta c) + 1 - s(beta (c - r))``
      (D'Oosterlinck et al. 2024, APO, Eqs. 7-8).
    - ``sppo_hard``: ``(c - 1/(2 beta))^2 + (r + 1/(2 beta))^2`` (Wu et al. 2024, SPPO with hard labels).
    - ``bco_pair``: ``-log s(beta c) - log s(-beta r)`` (Jung et al. 2024, BCO, as TRL: without BCO's running
      reward shift delta).
    - ``aot``: ``-(1-ls) log s(beta d) - ls log s(-beta d)`` with ``d = sort(log pi(y_w) - log pi(y_l)) -
      sort(log pi_ref(y_w) - log pi_ref(y_l))``, sorted over the batch (Melnyk et al. 2024, AOT, paired);
      ``aot_unpaired``: the same with ``d = sort(c) - sort(r)`` (AOT, unpaired). Both couple the pairs of a
      batch (per micro-batch and per rank, as TRL per device), so a per-pair value means nothing on its own.
    - ``discopop`` *: ``(1 - m) (-log s(beta h)) + m exp(-beta h)`` with ``m = s(beta h / tau)`` (Lu et al. 2024,
      DiscoPOP / LRML, Eq. 5; ``tau = discopop_tau``). ``m exp(-beta h)`` is evaluated as
      ``exp(log s(beta h / tau) - beta h)``, which does not overflow to ``inf * 0``.
    - ``sigmoid_norm`` *: ``-log s(beta (f(c)/|y_w| - f(r)/|y_l|))``, length-normalised DPO (Lambert et al. 2024,
      Tulu 3).

    ``s`` is the logistic sigmoid. All log-prob inputs are ``[B]`` sequence log-probabilities (summed over the
    completion tokens). The length-normalised losses (``ipo``, ``sigmoid_norm``) divide by ``chosen_lengths`` /
    ``rejected_lengths`` (completion token counts, clamped to >= 1); without them they take their inputs as given, so
    a caller may also pass length-averaged log-probs.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``, rewards ``beta * c`` and ``beta * r``
        (detached); per token (``beta * c / |y_w|``) for the length-normalised losses when lengths are given.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is not defined for loss_type={loss_type!r} (only for "
            f"{F_DIVERGENCE_LOSS_TYPES}, whose loss depends on the chosen-rejected score difference alone, as in TRL)"
        )
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    chosen_s = f_divergence_score(chosen, f_divergence_type, f_alpha_divergence_coef)
    rejected_s = f_divergence_score(rejected, f_divergence_type, f_alpha_divergence_coef)
    if loss_type in LENGTH_NORMALISED_LOSS_TYPES and chosen_lengths is not None and rejected_lengths is not None:
        chosen_len = chosen_lengths.to(chosen.dtype).clamp(min=1)
        rejected_len = rejected_lengths.to(rejected.dtype).clamp(min=1)
        chosen, rejected = chosen / chosen_len, rejected / rejected_len  # the rewards the loss compares
        chosen_s, rejected_s = chosen_s / chosen_len, rejected_s / rejected_len
    logits = beta * (chosen_s - rejected_s)
    ls = label_smoothing

    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits)
    elif loss_type == "robust":
        if not 0.0 <= ls < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {ls}")
        losses = (-(1 - ls) * F.logsigmoid(logits) + ls * F.logsigmoid(-logits)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    elif loss_type == "ipo":
        losses = (chosen_s - rejected_s - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        if not 0.0 < ls < 1.0:
            raise ValueError(
                f"label_smoothing must lie in (0, 1) for loss_type='exo_pair' (EXO's ε; the paper recommends 1e-3), "
                f"got {ls}"
            )
        losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-ls)) + torch.sigmoid(-logits) * (
            F.logsigmoid(-logits) - math.log(ls)
        )
    elif loss_type == "nca_pair":
        c, r = beta * chosen, beta * rejected
        losses = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    elif loss_type == "sppo_hard":
        losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    elif loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            policy = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
            delta = policy - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
        else:
            delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
        losses = -(1 - ls) * F.logsigmoid(beta * delta) - ls * F.logsigmoid(-beta * delta)
    else:  # discopop
        if discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
        losses = -F.logsigmoid(logits) * torch.sigmoid(-logits / discopop_tau) + torch.exp(
            F.logsigmoid(logits / discopop_tau) - logits
        )

    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024), reference-free with length-normalised rewards and a target margin.

    ``u = beta * (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma``,
    ``loss = -(1-ls) log s(u) - ls log s(-u)`` (TRL's CPOTrainer with ``loss_type="simpo"``, where
    ``gamma = simpo_gamma``).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed sequence log-probabilities.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (clamped to >= 1).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``, rewards ``beta * log pi(y) / |y|`` (detached).
    """
    chosen_avg = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    rejected_avg = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)
    u = beta * (chosen_avg - rejected_avg) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    return losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach()


def nll_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Negative log-likelihood per completion token over the whole batch: ``-sum_bt m log p / sum_bt m`` (0 for an
    empty mask). TRL's ``loss_type: sft`` on the chosen completions, i.e. RPO's NLL term (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization") and MPO's generation loss (Wang et al. 2024).

    Args:
        token_logps, mask: ``[B, T]`` log-probs of the chosen completions' tokens and their mask.

    Returns:
        A scalar.
    """
    return -masked_sum(token_logps, mask) / _mask_like(token_logps, mask).sum().clamp(min=1).to(token_logps.dtype)


def ld_dpo_logps(
    chosen_token_logps: Tensor, rejected_token_logps: Tensor, chosen_mask: Tensor, rejected_mask: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """LD-DPO sequence log-probs (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
    arXiv:2409.06411): with ``l = min(|y_w|, |y_l|)`` completion tokens shared by the pair,
    ``log pi_ld(y) = sum_{t <= l} log p(y_t) + alpha sum_{t > l} log p(y_t)``: the verbose tail past the shorter
    completion's length is down-weighted by ``alpha`` in [0, 1] (1 = plain DPO, 0 = masked). As TRL's ``ld_alpha``.

    Args:
        chosen_token_logps, rejected_token_logps: ``[B, T]`` per-token log-probs; ``t`` counts masked tokens only.
        chosen_mask, rejected_mask: ``[B, T]`` completion masks.

    Returns:
        ``(chosen [B], rejected [B])``.
    """
    cm, rm = _mask_like(chosen_token_logps, chosen_mask), _mask_like(rejected_token_logps, rejected_mask)
    shared = torch.minimum(cm.sum(-1), rm.sum(-1)).unsqueeze(-1)

    def weighted(x: Tensor, m: Tensor) -> Tensor:
        head = m & (m.long().cumsum(-1) <= shared)
        return _zero_fill(x, head).sum(-1) + alpha * _zero_fill(x, m & ~head).sum(-1)

    return weighted(chosen_token_logps, cm), weighted(rejected_token_logps, rm)


@torch.no_grad()
def log_sum_sq_probs(logits: Tensor) -> Tensor:
    """``log sum_v p_v^2`` of ``p = softmax(logits)`` at each position, ``logsumexp(2 z) - 2 logsumexp(z)``, chunked
    over the leading dimension, no gradient (WPO's per-token normaliser; TRL's fused LM head output of that name).

    Args:
        logits: ``[..., V]``.

    Returns:
        ``[...]`` (float32 for fp16/bf16 logits).
    """
    if logits.dim() == 1:
        return log_sum_sq_probs(logits.unsqueeze(0)).squeeze(0)
    dtype = _compute_dtype(logits.dtype)
    parts = []
    for s, e in _row_chunks(logits):
        z = logits[s:e].to(dtype)
        parts.append(torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1))
    return torch.cat(parts, dim=0) if parts else logits.new_zeros(logits.shape[:-1], dtype=dtype)


def wpo_weights(token_logps: Tensor, log_sum_sq: Tensor, mask: Tensor) -> Tensor:
    """WPO sequence weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2
    with the sampling-aligned per-token probability of Sec. 3.2), as TRL's ``use_weighting``:
    ``w(y) = exp(1/|y| sum_t (log p(y_t) - log sum_v p(v)^2))``, detached. A pair's loss is multiplied by
    ``w(y_w) w(y_l)``.

    Args:
        token_logps: ``[B, T]`` policy log-probs of the completion tokens.
        log_sum_sq: ``[B, T]`` :func:`log_sum_sq_probs` of the policy at the same positions.
        mask: ``[B, T]`` completion mask.

    Returns:
        ``[B]`` weights (1 for an empty completion).
    """
    return torch.exp(masked_mean((token_logps - log_sum_sq).detach(), mask, dim=-1))


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Pairwise reward-model loss under the Bradley-Terry model (Ouyang et al. 2022, InstructGPT).

    ``loss = -log s(r_w - r_l - margin) + coef * (r_w + r_l)^2``; the optional margin follows Llama 2 (Touvron
    et al. 2023), the centering term Eisenstein et al. 2023, as in TRL's RewardTrainer (its batch loss is the mean
    of these per-pair values). Equal scores give ``ln 2``.

    Args:
        chosen_scores, rejected_scores: ``[B]`` (or ``[B, 1]``) scalar rewards.

    Returns:
        ``[B]`` per-pair losses.
    """
    if chosen_scores.dim() > 1 and chosen_scores.shape[-1] == 1:
        chosen_scores = chosen_scores.squeeze(-1)
    if rejected_scores.dim() > 1 and rejected_scores.shape[-1] == 1:
        rejected_scores = rejected_scores.squeeze(-1)
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Group-relative advantages (GRPO, RLOO)
# ----------------------------------------------------------------------------------------------------------------


def _grouped(rewards: Tensor, group_size: int, min_size: int = 1) -> Tensor:
    if group_size < min_size:
        raise ValueError(f"group_size must be >= {min_size}, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased std over the non-NaN entries, NaN where fewer than 2 remain (TRL's ``nanstd``). Without any NaN it
    is ``x.std`` itself, so NaN-free rewards give bit for bit the advantages they always gave."""
    if not bool(torch.isnan(x).any()) and (x.shape[dim] if dim is not None else x.numel()) > 1:
        return x.std(dim, keepdim=keepdim) if dim is not None else x.std()
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(x.dtype)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(count, math.nan))
    std = var.sqrt()
    if not keepdim:
        std = std.squeeze(dim) if dim is not None else std.reshape(())
    return std


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2):
    ``A_i = (r_i - mean(group)) / (std(group) + eps)``, with the std taken as

    - ``"group"``: ``std(group)`` (unbiased std, the original GRPO);
    - ``"batch"``: ``std(all rewards)`` (Hu 2025, REINFORCE++ / TRL ``scale_rewards="batch"``);
    - ``"none"``: no division (Liu et al. 2025, Dr. GRPO).

    Groups are ``group_size`` consecutive entries of ``rewards`` (``[B]``, ``B`` divisible by ``group_size``).
    A NaN reward marks an unscorable completion (every reward function returned None): it is left out of its group's
    mean and std (``nanmean`` / ``nanstd``) and gets advantage 0, as in TRL 1.16's GRPOTrainer; so does every member
    of a group with a single scorable completion under ``"group"`` scaling (its std is undefined). A group of size 1
    has std 0 (its advantage is 0).
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"Unknown scale {scale!r}; expected 'group', 'batch' or 'none'")
    grouped = _grouped(rewards, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    adv = grouped - mean
    if scale == "group":
        std = nanstd(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        adv = adv / (std + eps)
    elif scale == "batch":
        std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        adv = adv / (std + eps)
    return torch.nan_to_num(adv, nan=0.0).reshape(rewards.shape)


def rloo_advantages(rewards: Tensor, group_size: int, *, normalize: bool = False, eps: float = 1e-4) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to basics", Eq. 7; Kool et al. 2019):

    ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(group))`` with ``G = group_size >= 2`` consecutive
    entries per group. With ``normalize`` (TRL's ``normalize_advantages``) they are then whitened over the batch,
    ``(A - mean(A)) / (std(A) + eps)``.

    A NaN reward (unscorable completion) is left out: the baseline averages the scorable siblings only,
    ``(sum_{j scorable} r_j - r_i) / (n_scorable - 1)``, the normalisation skips it, and its advantage is 0; a group
    with a single scorable completion gives 0 too (TRL 1.16's RLOOTrainer).
    """
    grouped = _grouped(rewards, group_size, min_size=2)
    nan = torch.isnan(grouped)
    if not bool(nan.any()):
        adv = (grouped - grouped.mean(dim=1, keepdim=True)) * (group_size / (group_size - 1))
    else:
        count = (~nan).sum(dim=1, keepdim=True).to(grouped.dtype)
        adv = grouped - (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (count - 1)
    adv = adv.reshape(rewards.shape)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def decoupled_group_advantages(
    rewards_per_func: Tensor, weights: Tensor, group_size: int, *, eps: float = 1e-4
) -> Tensor:
    """GDPO advantages, TRL's ``multi_objective_aggregation="normalize_then_sum"`` (Liu et al. 2026, "GDPO: Group
    reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization", arXiv:2601.05242):
    each reward function ``k`` is normalised within its group first, ``z_ik = (r_ik - mean_g(r_k)) / (std_g(r_k) +
    eps)``, then summed with the weights, ``s_i = sum_k w_k z_ik``, and the sum is normalised over the batch,
    ``A_i = (s_i - mean(s)) / (std(s) + eps)``.

    NaN entries (a function returned None) are skipped by every mean, std and sum; a completion with NaN for every
    function is unscorable: it is left out of the batch statistics and gets advantage 0.

    Args:
        rewards_per_func: ``[B, F]`` raw rewards, NaN for None.
        weights: ``[F]`` reward weights.
        group_size: ``G`` consecutive rows per prompt.

    Returns:
        ``[B]`` advantages.
    """
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [B, F], got {tuple(rewards_per_func.shape)}")
    n_funcs = rewards_per_func.shape[1]
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    grouped = _grouped(rewards_per_func.reshape(-1), group_size * n_funcs).reshape(-1, group_size, n_funcs)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean_k)
    z = ((grouped - mean_k) / (std_k + eps)).reshape(-1, n_funcs)
    summed = torch.nansum(z * weights.to(z).unsqueeze(0), dim=1)
    summed = torch.where(unscorable, torch.full_like(summed, math.nan), summed)
    std = nanstd(summed) if summed.numel() > 1 else torch.zeros_like(summed)
    adv = (summed - torch.nanmean(summed)) / (std + eps)
    return torch.nan_to_num(adv, nan=0.0)


def sequence_kl_penalty(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """``sum_t (log pi(y_t) - log pi_ref(y_t))`` over each completion's real tokens (k1 summed, ``[B]``): the KL
    RLOO subtracts from the sequence reward, ``r - beta * KL`` (Ahmadian et al. 2024, Sec. 3; TRL's RLOOTrainer)."""
    return masked_sum(kl_estimate(logps, ref_logps, "k1"), mask, dim=-1)


def rloo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The RLOO objective of TRL 1.16's RLOOTrainer (Ahmadian et al. 2024, "Back to basics", Eq. 7-8, with a
    PPO-style clip for off-policy reuse): one importance ratio per *sequence*,
    ``w = exp(sum_t log pi(y_t) - sum_t log pi_old(y_t))``, and ``loss = mean_i -min(w_i A_i, clip(w_i, 1 - eps_low,
    1 + eps_high) A_i)``. The KL to the reference is not in the loss: it is folded into the reward
    (:func:`sequence_kl_penalty`) before the leave-one-out advantages (:func:`rloo_advantages`).

    Args:
        logps, old_logps: ``[B, T]`` token log-probs of the current and of the sampling policy.
        advantages: ``[B]`` sequence advantages.
        mask: ``[B, T]`` completion mask (an empty completion has ``w = 1``).

    Returns:
        ``(loss, metrics)``: the mean over sequences and detached ``clip_ratio/{low,high,region}_mean`` (fractions of
        sequences).
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    seq = masked_sum(logps, mask, dim=-1)
    old_seq = masked_sum(old_logps.to(logps.dtype), mask, dim=-1)
    advantages = advantages.reshape(-1).to(logps.dtype)
    ratio = torch.exp(seq - old_seq)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    loss = (-torch.min(ratio * advantages, clipped * advantages)).mean()
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
        metrics = {
            "clip_ratio/low_mean": low.float().mean(),
            "clip_ratio/high_mean": high.float().mean(),
            "clip_ratio/region_mean": (low | high).float().mean(),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------


def off_policy_sequence_mask(
    advantages: Tensor, logps: Tensor, sampling_logps: Tensor, mask: Tensor, threshold: float
) -> Tensor:
    """Off-policy sequence mask of DeepSeek-V3.2 (DeepSeek-AI 2025, arXiv:2512.02556, Eq. 9), TRL's
    ``off_policy_mask_threshold``: a sequence with negative advantage whose mean token KL from the sampling policy,
    ``mean_t (log pi_old(y_t) - log pi(y_t))``, exceeds ``threshold`` (the paper's delta) is dropped:
    ``M_i = 1[A_i >= 0 or KL_i <= threshold]``. No gradient; NaN sampling log-probs count as 0.

    Returns:
        ``[B, 1]`` mask (1 keep, 0 drop) in ``mask``'s float dtype.
    """
    m = _mask_like(logps, mask)
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    avg = _zero_fill(kl, m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1).to(kl.dtype)
    adv = advantages.reshape(-1, 1) if advantages.dim() == 1 else advantages
    dtype = mask.dtype if mask.is_floating_point() else logps.dtype
    return ((adv >= 0) | (avg <= threshold)).to(dtype)


def high_entropy_mask(
    entropies: Tensor, mask: Tensor, top_entropy_quantile: float, *, pool: Tensor | None = None
) -> Tensor:
    """Tokens in the top ``rho = top_entropy_quantile`` of entropies (Wang et al. 2025, "Beyond the 80/20 Rule:
    High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning", arXiv:2506.01939, Eq. 8),
    TRL's ``top_entropy_quantile``: ``M_t = 1[H_t >= quantile_{1 - rho}(H)]``, the quantile over the real tokens
    (float32, linear interpolation as ``torch.quantile``). ``rho = 1`` keeps every token, ``rho = 0`` the highest.

    Args:
        entropies, mask: ``[B, T]``.
        pool: the entropies the quantile is taken over, when wider than this batch (TRL: every rank's micro-batch);
            default: ``entropies`` at ``mask``.

    Returns:
        ``[B, T]`` bool mask (always False outside ``mask``).
    """
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {top_entropy_quantile}")
    m = _mask_like(entropies, mask)
    values = (entropies[m] if pool is None else pool).float()
    if values.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(values, 1.0 - top_entropy_quantile)
    return (_zero_fill(entropies, m) >= threshold) & m


@torch.no_grad()
def vespo_weights(
    advantages: Tensor,
    log_ratio: Tensor,
    mask: Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> Tensor:
    """VESPO's gamma weights of the sequence importance ratio (Variational Sequence-Level Soft Policy Optimization,
    arXiv:2602.10693), as TRL 1.16's ``get_gamma_weights``: with ``w = exp(clamp(sum_t clamp(log_ratio_t, -20, 20),
    log 1e-8, 20))``, ``phi(w) = exp(lambda + k log w - lambda w)`` (``= e^lambda w^k e^(-lambda w)``, so
    ``phi(1) = 1``), ``(k, lambda) = (k_pos, lambda_pos)`` where ``A >= 0`` else ``(k_neg, lambda_neg)``; lambda is
    clamped at 1e-4. No gradient: ``phi`` only scales ``A * grad log pi``. Non-finite values become 0.

    Returns:
        ``[B, 1]`` weights.
    """
    m = _mask_like(log_ratio, mask)
    lower = math.log(1e-8)
    seq = _zero_fill(torch.clamp(log_ratio, -20.0, 20.0), m).sum(-1, keepdim=True)
    log_w = torch.clamp(seq, lower, 20.0)
    adv = advantages.reshape(-1, 1) if advantages.dim() == 1 else advantages
    nonneg = adv >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def entropy_bonus_loss(entropies: Tensor, mask: Tensor, coef: float) -> Tensor:
    """Entropy regularisation ``-coef * mean_t H_t`` over the masked tokens (Williams & Peng 1991; Mnih et al. 2016,
    A3C, Eq. 1's entropy term), TRL's GRPO ``entropy_coef``: the mean per-token entropy whatever the ``loss_type``
    normaliser, so ``coef`` means the same for every loss type. ``entropies`` must carry a gradient for the bonus
    to act (``token_logps_and_entropy(..., entropy_grad=True)``)."""
    return -coef * masked_mean(entropies, mask)


def adaptive_entropy_coef(
    coef: float, entropy: float | Tensor, *, target: float, delta: float, coef_min: float, coef_max: float
) -> float:
    """Adaptive entropy control of Skywork-OR1 (He et al. 2025, arXiv:2505.22312, Sec. 3.2.5), TRL's
    ``use_adaptive_entropy``: after each optimizer step ``c <- min(c + delta, c_max)`` if the measured entropy is at
    or below ``target``, else ``c <- max(c - delta, c_min)``. (The bonus of a step is applied only while the previous
    step's entropy was at or below the target.)"""
    if float(entropy) <= target:
        return min(float(coef) + delta, coef_max)
    return max(float(coef) - delta, coef_min)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    kl: str = "k3",
    max_completion_length: int | None = None,
    num_items: int | Tensor | None = None,
    importance_sampling_level: str = "token",
    kl_ratio_correction: bool = True,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
    sampling_logps: Tensor | None = None,
    token_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate GRPO loss (Shao et al. 2024) with TRL 1.16's variants (``GRPOTrainer._compute_loss``).

    With ``w_t = exp(logp_t - old_logp_t)`` (``importance_sampling_level="sequence"``: GSPO, Zheng et al. 2025, one
    weight per sequence, ``w = exp(mean_t(logp_t - old_logp_t))`` over its real tokens), the per-token policy term is

    - ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``: ``-min(w_t A, clip(w_t, 1 - eps_low, 1 + eps_high) A)``;
      ``eps_high`` defaults to ``eps_low``, a larger one is DAPO's clip-higher (Yu et al. 2025); with ``delta`` the
      unclipped branch is capped too, ``min(w_t, delta)`` (two-sided clipping, INTELLECT-2, Prime Intellect 2025,
      arXiv:2505.07291, Sec. 3.3; recommended ``delta > 1 + eps_high``);
    - ``cispo``: ``-sg(min(w_t, eps_high)) A logp_t`` (MiniMax-M1, MiniMax 2025, arXiv:2506.13585, Eq. 4: the
      clipped weight is detached and scales REINFORCE's gradient; ``eps_high`` is the absolute bound, e.g. 5.0);
    - ``sapo``: ``-(4 / tau) s(tau (w_t - 1)) A``, ``tau = sapo_temperature_pos`` if ``A > 0`` else
      ``sapo_temperature_neg`` (Soft Adaptive Policy Optimization, Gao et al. 2025, arXiv:2511.20347, Eq. 5);
    - ``vespo``: ``-phi(W) A logp_t`` with :func:`vespo_weights` ``phi`` of the sequence ratio ``W`` (VESPO);

    multiplied by the off-policy mask (:func:`off_policy_sequence_mask` with ``off_policy_mask_threshold``, from
    ``sampling_logps``, default ``old_logps``) and by ``token_mask`` (e.g. :func:`high_entropy_mask`), then
    ``+ beta * KL_t`` with ``KL_t = kl_estimate(logp_t, ref_logp_t, kl)``, importance-weighted ``w_t KL_t`` when
    ``kl_ratio_correction`` (TRL ``use_bias_correction_kl``; the uncapped ``w``).

    Aggregation (``loss_type``):

    - ``"grpo"``, ``"sapo"``: mean over the tokens of each sequence, then mean over sequences (Shao et al. 2024);
    - ``"bnpo"``: ``sum_t l_t / sum(mask)`` over the local batch;
    - ``"dr_grpo"``: ``sum_t l_t / (B * max_completion_length)`` (Liu et al. 2025, Dr. GRPO);
    - ``"dapo"``, ``"cispo"``, ``"vespo"``: ``sum_t l_t / num_items`` (Yu et al. 2025, DAPO token-level loss),
      ``num_items`` being the number of real tokens of the whole global batch, across accumulation steps and ranks
      (default: local ``mask.sum()``). The caller owns the reduction convention: Lightning divides a training-step
      loss by ``accumulate_grad_batches`` and DDP averages gradients over ranks, so pass
      ``num_items / (accumulate_grad_batches * world_size)`` (TRL passes ``num_items / num_processes``) to get
      exactly ``sum over all tokens / num_items``;
    - ``"luspo"``: ``mean_i sum_t l_t``, each sequence's loss scaled by its length (Length-Unbiased Sequence Policy
      Optimization, arXiv:2602.05261; meant for ``importance_sampling_level="sequence"``).

    Args:
        logps: ``[B, T]`` current policy token log-probs (with grad).
        old_logps: ``[B, T]`` log-probs of the policy that sampled (``logps.detach()`` when on-policy).
        ref_logps: ``[B, T]`` reference log-probs, or None when ``beta == 0``.
        advantages: ``[B]`` per-sequence advantages (broadcast over tokens) or ``[B, T]``.
        mask: ``[B, T]`` completion mask.

    Returns:
        ``(loss, metrics)``: a 0-d loss and detached 0-d tensors ``kl`` (masked mean of the per-token KL term,
        importance-weighted when corrected, 0 when ``beta == 0``); for the clipped losses ``clip_ratio/low_mean``
        (``w < 1 - eps_low`` and ``A < 0``), ``clip_ratio/high_mean`` (``w > 1 + eps_high`` and ``A > 0``) and
        ``clip_ratio/region_mean`` (either), as fractions of real tokens (of sequences for GSPO, as in TRL);
        ``cispo_clip_ratio`` (``w > eps_high`` and ``A > 0``) for CISPO, ``vespo/phi_seq_mean`` for VESPO.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"Unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {kl!r}; expected one of {KL_ESTIMATORS}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' requires max_completion_length")
    eps_low = epsilon_low
    eps_high = epsilon_low if epsilon_high is None else epsilon_high

    m = _mask_like(logps, mask)
    mf = m.to(logps.dtype)
    logps = _zero_fill(logps, m)
    old_logps = _zero_fill(old_logps, m)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    else:
        advantages = _zero_fill(advantages, m)
    advantages = advantages.to(logps.dtype)

    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = (log_ratio * mf).sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_w)  # [B, T] or [B, 1]

    per_token_kl = None
    if beta != 0.0:
        assert ref_logps is not None
        per_token_kl = kl_estimate(logps, _zero_fill(ref_logps, m), kl)
        if kl_ratio_correction:
            per_token_kl = per_token_kl * ratio

    extra: dict[str, Tensor] = {}
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * advantages * logps
    elif loss_type == "sapo":
        tau = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg).to(logps.dtype)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    elif loss_type == "vespo":
        phi = vespo_weights(
            advantages,
            log_ratio,
            m,
            k_pos=vespo_k_pos,
            lambda_pos=vespo_lambda_pos,
            k_neg=vespo_k_neg,
            lambda_neg=vespo_lambda_neg,
        )
        extra["vespo/phi_seq_mean"] = phi.mean()
        per_token = -phi * advantages * logps
    else:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)  # TRL: the capped ratio also feeds the clip metrics
        per_token = -torch.min(ratio * advantages, clipped * advantages)

    if off_policy_mask_threshold is not None:
        sampling = old_logps if sampling_logps is None else _zero_fill(sampling_logps.to(logps.dtype), m)
        per_token = per_token * off_policy_sequence_mask(advantages, logps, sampling, mf, off_policy_mask_threshold)
    if token_mask is not None:
        per_token = per_token * _mask_like(logps, token_mask).to(logps.dtype)
    if per_token_kl is not None:
        per_token = per_token + beta * per_token_kl
    per_token = per_token * mf  # broadcasts the [B, 1] case; padding is exactly 0 here

    if loss_type in ("grpo", "sapo"):
        loss = (per_token.sum(-1) / mf.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mf.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type == "luspo":
        loss = per_token.sum(-1).mean()
    else:  # dapo, cispo, vespo
        normalizer = mf.sum() if num_items is None else num_items
        if isinstance(normalizer, Tensor):
            normalizer = normalizer.to(per_token.dtype).clamp(min=1)
        else:
            normalizer = max(float(normalizer), 1.0)
        loss = per_token.sum() / normalizer

    with torch.no_grad():
        n_tok = mf.sum().clamp(min=1)

        def batch_mean(x: Tensor) -> Tensor:
            if x.shape[-1] == 1 and m.shape[-1] != 1:  # sequence-level ratio: mean over sequences (TRL)
                return x.float().mean()
            return (x.to(mf.dtype) * mf).sum() / n_tok

        metrics = {
            "kl": batch_mean(per_token_kl.detach()) if per_token_kl is not None else logps.new_zeros(()).detach()
        }
        if loss_type in CLIPPED_GRPO_LOSS_TYPES:
            low = (ratio < 1 - eps_low) & (advantages < 0)
            high = (ratio > 1 + eps_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"] = batch_mean(low)
            metrics["clip_ratio/high_mean"] = batch_mean(high)
            metrics["clip_ratio/region_mean"] = batch_mean(low | high)
        elif loss_type == "cispo":
            metrics["cispo_clip_ratio"] = batch_mean((ratio > eps_high) & (advantages > 0))
        metrics.update({k: v.detach() for k, v in extra.items()})
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016).

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, ``returns_t = A_t + V_t``,
    where ``V`` and ``A`` beyond the last real token are 0. Masked positions are not time steps: they get 0
    advantage and return, and the recursion passes over them (leading zeros from prompt/left padding and trailing
    zeros from right padding are both fine).

    Args:
        rewards, values: ``[B, T]`` per-token rewards (e.g. :func:`kl_penalized_rewards`) and value estimates.
        mask: ``[B, T]`` completion mask.

    Returns:
        ``(advantages [B, T], returns [B, T])``, 0 outside the mask. Callers normally pass detached values.
    """
    m = _mask_like(values, mask)
    r = _zero_fill(rewards.to(values.dtype), m)
    v = _zero_fill(values, m)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    advantages = []
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        mt = m[:, t]
        adv_t = torch.where(mt, adv_t, torch.zeros_like(adv_t))
        advantages.append(adv_t)
        next_value = torch.where(mt, v[:, t], next_value)
        next_adv = torch.where(mt, adv_t, next_adv)
    adv = torch.stack(advantages[::-1], dim=1)
    returns = _zero_fill(adv + v, m)
    return adv, returns


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017): masked mean of ``max(-w A, -clip(w, 1-eps, 1+eps) A)``.

    ``w = exp(logp - old_logp)``. With ``dual_clip = c > 1`` (Ye et al. 2020, "Mastering complex control in MOBA
    games"), tokens with ``A < 0`` are additionally capped: ``min(max(-w A, -clip(w) A), -c A)``.

    Args:
        logps, old_logps: ``[B, T]`` token log-probs of the current and the sampling policy.
        advantages: ``[B, T]`` (or ``[B]``, broadcast over tokens).
        mask: ``[B, T]`` completion mask.

    Returns:
        ``(loss, metrics)`` with detached ``clipfrac`` (fraction of real tokens where the clipped branch is the
        active one) and ``approxkl`` (``0.5 * mean((logp - old_logp)^2)``, as in TRL).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = _mask_like(logps, mask)
    logps = _zero_fill(logps, m)
    old_logps = _zero_fill(old_logps, m)
    advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else _zero_fill(advantages, m)
    advantages = advantages.to(logps.dtype)

    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = torch.max(loss1, loss2)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.min(per_token, -dual_clip * advantages), per_token)
    loss = masked_mean(per_token, m)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((loss2 > loss1).to(logps.dtype), m),
            "approxkl": 0.5 * masked_mean(log_ratio.detach().pow(2), m),
        }
    return loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_eps: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO (Schulman et al. 2017; the OpenAI baselines form used by TRL):

    ``0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))`` with ``v_clip = v_old + clamp(v - v_old, -eps, eps)``;
    ``clip_eps=None`` gives the unclipped ``0.5 * masked_mean((v - R)^2)``.

    Returns:
        ``(loss, metrics)`` with detached ``vf_clipfrac`` (fraction of real tokens where the clipped error is
        larger, i.e. active).
    """
    m = _mask_like(values, mask)
    values = _zero_fill(values, m)
    returns = _zero_fill(returns.to(values.dtype), m)
    err = (values - returns).pow(2)
    if clip_eps is None:
        loss = 0.5 * masked_mean(err, m)
        return loss, {"vf_clipfrac": values.new_zeros(()).detach()}
    old_values = _zero_fill(old_values.to(values.dtype), m)
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_clipped = (clipped - returns).pow(2)
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), m)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), m)}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# KTO (unpaired preferences)
# ----------------------------------------------------------------------------------------------------------------

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kahneman-Tversky Optimization on unpaired rows (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", Eq. 7, with TRL 1.16's ``KTOTrainer`` definitions).

    With ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z0 = max(0, kl)`` (no gradient), where ``kl``
    is the batch mean of ``log pi(y'|x) - log pi_ref(y'|x)`` over *mismatched* prompt/completion pairs (KTO's
    estimate of ``KL(pi || pi_ref)``, averaged over ranks before the clamp):

    - ``kto``: desirable ``lambda_D (1 - s(beta (r - z0)))``, undesirable ``lambda_U (1 - s(beta (z0 - r)))``;
    - ``apo_zero_unpaired``: desirable ``lambda_D (1 - s(beta r))``, undesirable ``lambda_U s(beta r)``
      (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", APO-zero, unpaired; no ``kl`` needed).

    ``s`` is the logistic sigmoid, ``lambda_D = desirable_weight``, ``lambda_U = undesirable_weight``; the batch loss
    is the mean over all ``B`` rows (TRL's ``losses.nanmean()``).

    Args:
        policy_logps, ref_logps: ``[B]`` summed completion log-probabilities.
        labels: ``[B]`` bool, ``True`` for a desirable completion.
        kl: scalar mean log-ratio of the mismatched pairs (``kto``); ``None`` counts as 0.

    Returns:
        ``(losses [B] (weighted), rewards [B] = beta * r (detached), z0)``.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    labels = labels.bool()
    logratio = policy_logps - ref_logps
    z0 = torch.zeros((), dtype=logratio.dtype, device=logratio.device)
    if loss_type == "kto" and kl is not None:
        z0 = kl.detach().to(logratio.dtype).clamp(min=0)
    if loss_type == "kto":
        desirable = 1 - torch.sigmoid(beta * (logratio - z0))
        undesirable = 1 - torch.sigmoid(beta * (z0 - logratio))
    else:
        desirable = 1 - torch.sigmoid(beta * logratio)
        undesirable = torch.sigmoid(beta * logratio)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    return losses, (beta * logratio).detach(), z0


__all__ += ["KTO_LOSS_TYPES", "kto_loss"]  # each section at the end extends the list itself


# ----------------------------------------------------------------------------------------------------------------
# ORPO and CPO (reference-free preference losses)
# ----------------------------------------------------------------------------------------------------------------

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, without cancellation: ``log(-expm1(x))`` above ``-ln 2``, else
    ``log1p(-exp(x))`` (Mächler 2012, "Accurately Computing log(1 - exp(-|a|))")."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    Eqs. 4-7), per pair.

    With the length-averaged log-probabilities ``a_w = log P(y_w|x)``, ``a_l`` (the paper's ``P`` is the geometric
    mean of the token probabilities) and ``odds(y) = P / (1 - P)``:
    ``log_odds = log odds(y_w) - log odds(y_l) = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))`` and
    ``loss = beta * -log s(log_odds)``; the full ORPO objective adds the NLL of the chosen completion
    (``L = L_SFT + lambda L_OR`` with ``lambda = beta``, TRL's name; :func:`nll_loss`).

    Args:
        chosen_avg_logps, rejected_avg_logps: ``[B]`` per-token mean log-probabilities of the completions (< 0).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B], log_odds [B])``; rewards ``beta * a`` (detached),
        ``log_odds`` detached (TRL logs ``mean(log s(log_odds))`` as ``log_odds_ratio``, ``mean(log_odds)`` as
        ``log_odds_chosen``).
    """
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, (beta * chosen_avg_logps).detach(), (beta * rejected_avg_logps).detach(), log_odds.detach()


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Contrastive Preference Optimization's preference term (Xu et al. 2024, "Contrastive Preference Optimization:
    Pushing the Boundaries of LLM Performance in Machine Translation", Eq. 3), per pair, with TRL's loss types.

    CPO is DPO with the reference log-probabilities set to 0 (its ``beta -> 0`` approximation of a uniform
    reference), so with ``h = log pi(y_w) - log pi(y_l)``, ``ls = label_smoothing``:

    - ``sigmoid``: ``-(1-ls) log s(beta h) - ls log s(-beta h)`` (Eq. 3; :func:`dpo_loss`'s ``sigmoid``);
    - ``hinge``: ``relu(1 - beta h)``; ``ipo``: ``(h' - 1/(2 beta))^2`` on length-averaged log-probs ``h'``;
    - ``simpo``: SimPO's ``-log s(beta h' - gamma)`` with ``gamma = simpo_gamma`` (Meng et al. 2024;
      :func:`simpo_loss`).

    The full CPO objective adds ``cpo_alpha`` times the NLL of the chosen completion (:func:`nll_loss`).

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed completion log-probabilities.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (``ipo`` and ``simpo`` average over them).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``, rewards ``beta * log pi(y)`` (detached; per token
        for ``ipo`` and ``simpo``, as TRL).
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"Unknown CPO loss_type {loss_type!r}; expected one of {CPO_LOSS_TYPES}")
    if loss_type == "simpo":
        return simpo_loss(
            chosen_logps,
            rejected_logps,
            chosen_lengths,
            rejected_lengths,
            beta=beta,
            gamma=simpo_gamma,
            label_smoothing=label_smoothing,
        )
    zeros = torch.zeros_like(chosen_logps)
    return dpo_loss(
        chosen_logps,
        rejected_logps,
        zeros,
        zeros,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


__all__ += ["CPO_LOSS_TYPES", "cpo_loss", "log1mexp", "orpo_loss"]


# ----------------------------------------------------------------------------------------------------------------
# Knowledge distillation: GKD / on-policy distillation
# ----------------------------------------------------------------------------------------------------------------


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, temperature: float = 1.0):
    """Per-position generalised Jensen-Shannon divergence between a student and a teacher, over the last (vocabulary)
    dimension; GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes", Eq. 1), in TRL's convention (``GKDTrainer.generalized_jsd_loss``, ``DistillationTrainer``)::

        p_S = softmax(z_S / T),  p_T = softmax(z_T / T),  M = β·p_T + (1 − β)·p_S
        JSD_β = β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M)                      0 < β < 1
        β = 0: KL(p_T ‖ p_S)  (forward KL, mean-seeking: what SFT on teacher samples minimises)
        β = 1: KL(p_S ‖ p_T)  (reverse KL, mode-seeking)

    Args:
        student_logits / teacher_logits: ``[..., V]`` (same vocabulary); computed in float32 at least.
        beta: β in ``[0, 1]``.
        temperature: T > 0, applied to both.

    Returns:
        ``[...]`` divergences in nats (gradient through the student only if the teacher is detached).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "student and teacher must share a tokenizer (vocabulary)"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    kl_teacher = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_student = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def chunked_generalized_jsd(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_head: torch.nn.Module,
    teacher_head: torch.nn.Module,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """:func:`generalized_jsd` of ``student_head(student_hidden)`` and ``teacher_head(teacher_hidden)`` for ``N``
    positions (``[N, H_S]``, ``[N, H_T]``: the widths may differ, the vocabulary may not), ``chunk_size`` positions
    at a time. Each chunk's ``[chunk, V]`` logits of both models are built, used and dropped; under autograd the chunk
    is recomputed in backward (activation checkpointing), so the ``[N, V]`` logits of neither model are ever held
    (with a 49K vocabulary and 8K completion tokens: 2 × 1.6 GB in float32 otherwise). The teacher gets no gradient.
    Returns ``[N]``."""

    def chunk(h_s: Tensor, h_t: Tensor) -> Tensor:
        with torch.no_grad():
            z_t = teacher_head(h_t)
        return generalized_jsd(student_head(h_s), z_t, beta=beta, temperature=temperature)

    teacher_hidden = teacher_hidden.detach()
    grad = torch.is_grad_enabled() and (
        student_hidden.requires_grad or any(p.requires_grad for p in student_head.parameters())
    )
    parts = []
    for start in range(0, student_hidden.shape[0], chunk_size):
        h_s, h_t = student_hidden[start : start + chunk_size], teacher_hidden[start : start + chunk_size]
        if grad:
            parts.append(torch.utils.checkpoint.checkpoint(chunk, h_s, h_t, use_reentrant=False))
        else:
            parts.append(chunk(h_s, h_t))
    if not parts:
        return student_hidden.new_zeros(0, dtype=torch.promote_types(student_hidden.dtype, torch.float32))
    return torch.cat(parts)
