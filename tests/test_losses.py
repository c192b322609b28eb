"""src.losses against hand-computed values (expected numbers are written out or computed with `math`)."""

import math

import pytest
import torch

from src import losses as L
from src.losses import (
    adaptive_kl_update,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    group_advantages,
    grpo_loss,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    simpo_loss,
    token_logps,
)

D = torch.float64
LN2 = math.log(2.0)


def t(x, **kw):
    return torch.tensor(x, dtype=D, **kw)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def close(a, b, tol=1e-10):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ token_logps


def test_token_logps_hand_value():
    logits = torch.log(t([[1.0, 2.0, 3.0], [4.0, 4.0, 8.0]]))
    out = token_logps(logits, torch.tensor([2, 0]))
    close(out, [math.log(0.5), math.log(0.25)])


def test_token_logps_matches_log_softmax_values_and_grads():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=D, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3))
    for temperature in (1.0, 0.7):
        ref_logits = logits.detach().clone().requires_grad_()
        ref = torch.log_softmax(ref_logits / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
        out = token_logps(logits, labels, temperature=temperature)
        assert out.shape == (2, 3) and out.dtype == D
        close(out, ref)
        w = torch.randn(2, 3, dtype=D)
        (g,) = torch.autograd.grad((out * w).sum(), logits)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), ref_logits)
        close(g, g_ref)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, labels, temperature=0.7), (logits,))


def test_token_logps_any_leading_shape_noncontiguous_and_ignore_index():
    torch.manual_seed(1)
    full = torch.randn(2, 5, 6, dtype=D)
    logits = full[:, :-1]  # the usual shifted slice: not viewable as [N, V]
    labels = torch.randint(0, 6, (2, 4))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(token_logps(logits, labels), ref)
    close(token_logps(logits.reshape(8, 6), labels.reshape(8)), ref.reshape(8))
    labels[0, 1] = -100
    out = token_logps(logits, labels)
    assert out[0, 1] == 0.0
    close(out[1], ref[1])


def test_token_logps_chunked_path(monkeypatch):
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 10)  # forces one row per chunk
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    labels = torch.randint(0, 5, (3, 4))
    out = token_logps(logits, labels, temperature=1.3)
    ref = torch.log_softmax(logits / 1.3, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(out, ref)
    (g,) = torch.autograd.grad(out.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    close(g, g_ref)


@pytest.mark.parametrize("chunk", [10, 1 << 24])
def test_token_logps_and_entropy_share_one_log_softmax(monkeypatch, chunk):
    """Same log-probs (values and gradients) as token_logps and the entropy of entropy_from_logits, in one pass; the
    entropy carries no gradient; masked vocabulary entries (-inf) count as 0 log 0 = 0."""
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 6, dtype=D)
    logits[0, 0, :3] = -math.inf
    logits.requires_grad_(True)
    labels = torch.randint(3, 6, (3, 4))
    labels[2, 3] = -100
    logps, entropy = L.token_logps_and_entropy(logits, labels, temperature=0.7)
    ref = token_logps(logits, labels, temperature=0.7)
    close(logps, ref)
    close(entropy, entropy_from_logits(logits.detach() / 0.7))
    assert not entropy.requires_grad and entropy[0, 0] < math.log(3) + 1e-9  # 3 live entries at most ln 3
    (g,) = torch.autograd.grad(logps.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    close(g, g_ref)
    assert L.token_logps_and_entropy(logits, labels, with_entropy=False)[1] is None


def test_token_logps_bf16_upcasts_to_float32():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 11).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 11, (2, 3))
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.detach().float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # exact up to fp32 rounding of bf16 inputs
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()


def test_entropy_from_logits():
    close(entropy_from_logits(torch.zeros(2, 3, 8, dtype=D)), torch.full((2, 3), math.log(8), dtype=D))
    p = [1 / 6, 2 / 6, 3 / 6]
    close(entropy_from_logits(torch.log(t(p))), -sum(q * math.log(q) for q in p))
    close(entropy_from_logits(t([0.0, 0.0, -math.inf])), LN2)  # masked-out vocabulary entries: 0 log 0 = 0
    # outside autograd the log-probs are clamped and multiplied in place; through autograd the same value and
    # dH/dz = -p (log p + H) (0 on masked entries), the input untouched
    z = t([[0.3, -1.2, 2.0, -math.inf], [0.0, 1.0, -0.5, 0.25]]).requires_grad_()
    h = entropy_from_logits(z)
    close(h, entropy_from_logits(z.detach()))
    (g,) = torch.autograd.grad(h.sum(), z)
    p = torch.softmax(z.detach(), -1)
    close(g, torch.where(p > 0, -p * (p.log() + h.detach()[:, None]), 0.0))
    assert z[0, 3] == -math.inf


# ------------------------------------------------------------------------------------------------ masked stats

X = [[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]]
M = [[1, 1, 0], [1, 1, 1]]


def test_masked_mean_sum_var():
    x, m = t(X), torch.tensor(M)
    close(masked_mean(x, m), 3.0)  # (1+2+3+4+5)/5
    close(masked_mean(x, m, dim=1), [1.5, 4.0])
    close(masked_sum(x, m), 15.0)
    close(masked_sum(x, m, dim=0), [4.0, 6.0, 5.0])
    close(masked_var(x, m), 2.5)  # squared deviations 4+1+0+1+4 = 10, / 4
    close(masked_var(x, m, unbiased=False), 2.0)
    close(masked_var(x, m, dim=1), [0.5, 1.0])
    close(masked_mean(x, torch.zeros(2, 3)), 0.0)  # empty mask -> 0, not NaN
    close(masked_var(t([7.0]), torch.ones(1)), 0.0)  # a single entry -> 0, not NaN


def test_masked_whiten():
    x, m = t(X), torch.tensor(M)
    s = math.sqrt(2.5 + 1e-8)
    close(masked_whiten(x, m), [[-2 / s, -1 / s, 0.0], [0.0, 1 / s, 2 / s]])
    close(masked_whiten(x, m, shift_mean=False), [[3 - 2 / s, 3 - 1 / s, 0.0], [3.0, 3 + 1 / s, 3 + 2 / s]])


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -1e30, 12345.0])
def test_masked_stats_ignore_padding_garbage(garbage):
    x = t(X, requires_grad=True)
    bad = x.detach().clone()
    bad[0, 2] = garbage
    bad.requires_grad_()
    m = torch.tensor(M)
    for fn in (masked_mean, masked_sum, masked_var, masked_whiten):
        a, b = fn(x, m), fn(bad, m)
        close(a, b)
        (gb,) = torch.autograd.grad(b.sum(), bad)
        assert torch.isfinite(gb).all() and gb[0, 2] == 0


# ------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_hand_values():
    logp, ref = t([-1.0]), t([-1.5])
    close(kl_estimate(logp, ref, "k1"), [0.5])
    close(kl_estimate(logp, ref, "k2"), [0.125])
    close(kl_estimate(logp, ref, "k3"), [math.exp(-0.5) - 0.5])
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_expectations_and_nonnegativity():
    # Under y ~ p, E[k1] = E[k3] = KL(p || q) exactly (Schulman 2020).
    p, q = [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    logp, logq = torch.log(t(p)), torch.log(t(q))
    close((t(p) * kl_estimate(logp, logq, "k1")).sum(), kl)
    close((t(p) * kl_estimate(logp, logq, "k3")).sum(), kl)
    torch.manual_seed(0)
    a, b = torch.randn(1000, dtype=D) * 3, torch.randn(1000, dtype=D) * 3
    assert (kl_estimate(a, b, "k3") >= 0).all() and (kl_estimate(a, b, "k2") >= 0).all()


def test_kl_penalized_rewards():
    logps = t([[9.0, -1.0, -2.0, 9.0], [-1.0, -1.0, -1.0, -1.0], [7.0, 7.0, 7.0, 7.0]])
    ref = t([[9.0, -1.5, -1.0, 9.0], [-1.0, -2.0, -0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    scores = t([2.0, -1.0, 5.0])
    rewards, kl = kl_penalized_rewards(scores, logps, ref, mask, beta=0.1)
    close(kl, [[0.0, 0.5, -1.0, 0.0], [0.0, 1.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(rewards, [[0.0, -0.05, 0.1 + 2.0, 0.0], [0.0, -0.1, 0.05, -1.0], [0.0, 0.0, 0.0, 0.0]])
    close(rewards.sum(-1)[:2], scores[:2] - 0.1 * kl.sum(-1)[:2])
    _, kl3 = kl_penalized_rewards(scores, logps, ref, mask, beta=0.1, kind="k3")
    close(kl3[0, 1], math.exp(-0.5) - 0.5)


def test_adaptive_kl_update():
    close(adaptive_kl_update(0.1, 6.0, target=6.0, horizon=10000, n_steps=256), 0.1)
    close(adaptive_kl_update(0.1, 5.4, target=6.0, horizon=10000, n_steps=256), 0.1 * (1 - 0.1 * 256 / 10000))
    close(adaptive_kl_update(0.1, 9.0, target=6.0, horizon=10000, n_steps=256), 0.1 * (1 + 0.2 * 0.0256))  # clip
    close(adaptive_kl_update(0.1, t(0.0), target=6.0, horizon=10000, n_steps=256), 0.1 * (1 - 0.2 * 0.0256))


# ------------------------------------------------------------------------------------------------ DPO & friends

BETA = 0.1


def _dpo(loss_type, ls=0.0, pc=-10.0, pr=-12.0, rc=-11.0, rr=-11.0, beta=BETA):
    return dpo_loss(t([pc]), t([pr]), t([rc]), t([rr]), beta=beta, loss_type=loss_type, label_smoothing=ls)


@pytest.mark.parametrize(
    "loss_type,ls,expected",
    [
        ("sigmoid", 0.0, LN2),
        ("sigmoid", 0.1, LN2),
        ("sigmoid", 0.3, LN2),
        ("robust", 0.0, LN2),
        ("robust", 0.2, LN2),
        ("hinge", 0.0, 1.0),
        ("ipo", 0.0, 1 / (4 * BETA**2)),
        ("exo_pair", 1e-3, -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3))),
        ("exo_pair", 0.01, -LN2 - 0.5 * math.log(0.01 * 0.99)),
        ("nca_pair", 0.0, 2 * LN2),
        ("sppo_hard", 0.0, 0.5 / BETA**2),
        ("apo_zero", 0.0, 1.0),
        ("apo_down", 0.0, 1.0),
    ],
)
def test_dpo_step0_identities(loss_type, ls, expected):
    # policy == reference: every log-ratio is 0, whatever the log-probs themselves are
    torch.manual_seed(0)
    c, r = -torch.rand(4, dtype=D) * 20, -torch.rand(4, dtype=D) * 20
    losses, cr, rr = dpo_loss(c, r, c.clone(), r.clone(), beta=BETA, loss_type=loss_type, label_smoothing=ls)
    close(losses, torch.full((4,), expected, dtype=D))
    close(cr, torch.zeros(4))
    close(rr, torch.zeros(4))


@pytest.mark.parametrize(
    "loss_type,ls,expected",
    [  # c = 1, r = -1, h = 2, beta * h = 0.2
        ("sigmoid", 0.0, math.log1p(math.exp(-0.2))),
        ("sigmoid", 0.1, 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))),
        ("robust", 0.1, (0.9 * math.log1p(math.exp(-0.2)) - 0.1 * math.log1p(math.exp(0.2))) / 0.8),
        ("hinge", 0.0, 0.8),
        ("ipo", 0.0, (2 - 5) ** 2),
        (
            "exo_pair",
            1e-3,
            sig(0.2) * (logsig(0.2) - math.log(0.999)) + sig(-0.2) * (logsig(-0.2) - math.log(0.001)),
        ),
        ("nca_pair", 0.0, -logsig(0.1) - 0.5 * logsig(-0.1) - 0.5 * logsig(0.1)),
        ("apo_zero", 0.0, 1 - sig(0.1) + sig(-0.1)),
        ("apo_down", 0.0, sig(0.1) + 1 - sig(0.2)),
        ("sppo_hard", 0.0, (1 - 5) ** 2 + (-1 + 5) ** 2),
        ("bco_pair", 0.0, -2 * logsig(0.1)),
        ("discopop", 0.0, (1 - sig(0.2 / 0.05)) * -logsig(0.2) + sig(0.2 / 0.05) * math.exp(-0.2)),
        ("sigmoid_norm", 0.0, -logsig(0.2)),  # no lengths given: the inputs are taken as length-averaged
    ],
)
def test_dpo_hand_values(loss_type, ls, expected):
    losses, chosen_rewards, rejected_rewards = _dpo(loss_type, ls)
    close(losses, [expected])
    close(chosen_rewards, [0.1])
    close(rejected_rewards, [-0.1])
    assert not chosen_rewards.requires_grad


@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_dpo_gradient_pushes_chosen_up_rejected_down(loss_type):
    pc, pr = t([-10.0], requires_grad=True), t([-12.0], requires_grad=True)
    ls = 1e-3 if loss_type == "exo_pair" else 0.0
    losses, cr, _ = dpo_loss(pc, pr, t([-10.0]), t([-12.0]), beta=BETA, loss_type=loss_type, label_smoothing=ls)
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    if loss_type == "apo_down":  # APO-down lowers both; at step 0 the chosen gradient is exactly 0
        close(gc, [0.0])
    elif loss_type == "discopop":
        # DiscoPOP is non-convex: at h = 0 its slope is -3/4 + (1 - ln 2) / (4 tau) (> 0 for the default tau = 0.05),
        # d/dh of (1 - s(x/tau))(-log s(x)) + s(x/tau) exp(-x) at x = beta h = 0, times beta
        slope = -0.75 + (1 - LN2) / (4 * 0.05)
        close(gc, [BETA * slope])
        close(gr, [-BETA * slope])
        return
    else:
        assert gc.item() < 0  # gradient descent increases log pi(chosen)
    assert gr.item() > 0  # and decreases log pi(rejected)


def test_dpo_bad_arguments():
    with pytest.raises(ValueError, match="sigmoid"):
        _dpo("kto")
    with pytest.raises(ValueError):
        _dpo("robust", ls=0.5)
    with pytest.raises(ValueError, match="label_smoothing.*exo_pair"):  # ε = 0 is log 0: TRL raises as well
        _dpo("exo_pair", ls=0.0)


def test_dpo_length_normalised_losses_divide_by_the_lengths():
    # c = 1 over 2 tokens, r = -1 over 4 tokens: per-token margin 1/2 + 1/4 = 3/4
    lengths = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]))
    losses, cr, rr = dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=BETA, loss_type="ipo", **lengths)
    close(losses, [(0.75 - 5) ** 2])
    close(cr, [0.05])  # per-token rewards: beta * c / |y_w|
    close(rr, [-0.025])
    losses, _, _ = dpo_loss(
        t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=BETA, loss_type="sigmoid_norm", **lengths
    )
    close(losses, [-logsig(0.075)])
    losses, cr, _ = dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=BETA, loss_type="sigmoid", **lengths)
    close(losses, [-logsig(0.2)])  # the other losses ignore the lengths
    close(cr, [0.1])


def test_aot_sorts_over_the_batch():
    # policy log-ratios log pi(y_w) - log pi(y_l) = [2, -1] -> sorted [-1, 2]; reference [0, 1] -> [0, 1]; d = [-1, 1]
    args = (t([-10.0, -5.0]), t([-12.0, -4.0]), t([-11.0, -5.0]), t([-11.0, -6.0]))
    losses, cr, rr = dpo_loss(*args, beta=BETA, loss_type="aot")
    close(losses, [-logsig(-0.1), -logsig(0.1)])
    close(cr, [0.1, 0.0])  # rewards stay per pair: beta * (log pi - log pi_ref)
    close(rr, [-0.1, 0.2])
    losses, _, _ = dpo_loss(*args, beta=BETA, loss_type="aot", label_smoothing=0.1)
    close(losses, [-0.9 * logsig(-0.1) - 0.1 * logsig(0.1), -0.9 * logsig(0.1) - 0.1 * logsig(-0.1)])
    # unpaired: c = [1, 0] -> [0, 1], r = [-1, 2] -> [-1, 2]; d = [1, -1]
    losses, _, _ = dpo_loss(*args, beta=BETA, loss_type="aot_unpaired")
    close(losses, [-logsig(0.1), -logsig(-0.1)])


@pytest.mark.parametrize(
    "f_divergence_type,alpha,h",
    [  # c = 1, r = -1; h = f(c) - f(r)
        ("reverse_kl", 0.5, 2.0),
        ("forward_kl", 0.5, (1 - math.exp(-1)) - (1 - math.exp(1))),  # f = 1 - 1/u
        ("js_divergence", 0.5, logsig(1) - logsig(-1)),  # f = log 2 + log s(log u); = 1
        ("alpha_divergence", 0.5, 2 * (1 - math.exp(-0.5)) - 2 * (1 - math.exp(0.5))),  # f = (u^-1/2 - 1) / (-1/2)
        ("alpha_divergence", 0.25, ((math.exp(-0.75) - 1) - (math.exp(0.75) - 1)) / -0.75),
        ("alpha_divergence", 1.0, 2.0),  # the alpha -> 1 limit is the reverse KL
    ],
)
def test_f_dpo_hand_values(f_divergence_type, alpha, h):
    kw = dict(beta=BETA, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=alpha)
    losses, cr, rr = _dpo_kw("sigmoid", **kw)
    close(losses, [-logsig(BETA * h)])
    close(cr, [0.1])  # rewards stay beta * log-ratio
    close(rr, [-0.1])
    losses, _, _ = _dpo_kw("hinge", **kw)
    close(losses, [max(0.0, 1 - BETA * h)])
    # IPO averages the scores f(c) / |y_w| (TRL): |y_w| = 2, |y_l| = 4
    args = (t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]))
    losses, _, _ = dpo_loss(
        *args, loss_type="ipo", chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]), **kw
    )
    fc = L.f_divergence_score(t([1.0]), f_divergence_type, alpha).item()
    fr = L.f_divergence_score(t([-1.0]), f_divergence_type, alpha).item()
    assert fc - fr == pytest.approx(h, rel=1e-12)
    close(losses, [(fc / 2 - fr / 4 - 1 / (2 * BETA)) ** 2])


def test_f_dpo_rejects_losses_without_a_score_difference():
    with pytest.raises(ValueError, match=r"f_divergence_type='forward_kl'.*loss_type='nca_pair'"):
        _dpo_kw("nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="Unknown f_divergence_type"):
        _dpo_kw("sigmoid", f_divergence_type="tv")


def _dpo_kw(loss_type, **kw):
    return dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), loss_type=loss_type, **kw)


NAN = float("nan")


def test_nll_loss_masks_prompt_and_padding():
    logps = t([[NAN, -1.0, -2.0, NAN], [NAN, -3.0, NAN, NAN]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    loss = L.nll_loss(logps, mask)
    close(loss, 2.0)  # (1 + 2 + 3) / 3 tokens
    (g,) = torch.autograd.grad(loss, logps)
    close(g, [[0.0, -1 / 3, -1 / 3, 0.0], [0.0, -1 / 3, 0.0, 0.0]])
    close(L.nll_loss(logps.detach(), torch.zeros_like(mask)), 0.0)


def test_ld_dpo_logps():
    # pair 1: |y_w| = 3, |y_l| = 1 -> l = 1: chosen = -1 + a (-2 - 3), rejected = -4
    # pair 2: an empty rejected completion -> l = 0: chosen = a * (-1), rejected = 0
    chosen = t([[NAN, -1.0, -2.0, -3.0, NAN], [NAN, NAN, NAN, -1.0, NAN]], requires_grad=True)
    rejected = t([[NAN, -4.0, NAN, NAN, NAN], [NAN, NAN, NAN, NAN, NAN]])
    cm = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 0]])
    rm = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    c, r = L.ld_dpo_logps(chosen, rejected, cm, rm, 0.5)
    close(c, [-1 - 0.5 * 5, -0.5])
    close(r, [-4.0, 0.0])
    (g,) = torch.autograd.grad(c.sum(), chosen)
    close(g, [[0.0, 1.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.5, 0.0]])
    c1, r1 = L.ld_dpo_logps(chosen.detach(), rejected, cm, rm, 1.0)  # alpha = 1: plain sums
    close(c1, [-6.0, -1.0])
    close(r1, [-4.0, 0.0])


def test_log_sum_sq_probs_and_wpo_weights():
    logits = torch.log(t([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [2.0, 1.0, 1.0]]))  # p = (1/4, 1/4, 1/2) (permuted)
    out = L.log_sum_sq_probs(logits)
    close(out, [math.log(0.375)] * 3)  # 1/16 + 1/16 + 1/4
    assert not out.requires_grad
    # WPO: w = exp(mean over completion tokens of log p(y_t) - log sum_v p_v^2)
    logps = t([[NAN, math.log(0.5), math.log(0.25)], [NAN, NAN, NAN]], requires_grad=True)
    lss = t([[NAN, math.log(0.375), math.log(0.5)], [NAN, NAN, NAN]])
    w = L.wpo_weights(logps, lss, torch.tensor([[0, 1, 1], [0, 0, 0]]))
    close(w, [math.sqrt((0.5 / 0.375) * (0.25 / 0.5)), 1.0])  # an empty completion weighs 1
    assert not w.requires_grad


def test_simpo_loss():
    # avg logps: chosen -4/4 = -1, rejected -9/6 = -1.5; u = 2 * 0.5 - 0.5 = 0.5
    args = (t([-4.0]), t([-9.0]), torch.tensor([4]), torch.tensor([6]))
    losses, cr, rr = simpo_loss(*args, beta=2.0, gamma=0.5)
    close(losses, [math.log1p(math.exp(-0.5))])
    close(cr, [-2.0])
    close(rr, [-3.0])
    losses, _, _ = simpo_loss(*args, beta=2.0, gamma=0.5, label_smoothing=0.2)
    close(losses, [0.8 * math.log1p(math.exp(-0.5)) + 0.2 * math.log1p(math.exp(0.5))])


def test_bradley_terry_loss():
    close(bradley_terry_loss(t([0.3, -2.0]), t([0.3, -2.0])), [LN2, LN2])
    close(bradley_terry_loss(t([[2.0]]), t([[0.5]])), [math.log1p(math.exp(-1.5))])  # [B, 1] scores
    close(bradley_terry_loss(t([2.0]), t([0.5]), margin=t([0.5])), [math.log1p(math.exp(-1.0))])
    out = bradley_terry_loss(t([2.0]), t([0.5]), center_rewards_coefficient=0.01)
    close(out, [math.log1p(math.exp(-1.5)) + 0.01 * 2.5**2])


# ------------------------------------------------------------------------------------------------ advantages

R = [1.0, 2.0, 3.0, 0.0, 0.0, 6.0]


def test_group_advantages_hand_values():
    r = t(R)
    e = 1e-4
    s2 = math.sqrt(12.0)  # group 2: deviations -2, -2, 4 -> (4 + 4 + 16) / 2 = 12
    close(group_advantages(r, 3), [-1 / (1 + e), 0.0, 1 / (1 + e), -2 / (s2 + e), -2 / (s2 + e), 4 / (s2 + e)])
    sb = math.sqrt(26 / 5)  # all six: mean 2, squared deviations 1+0+1+4+4+16 = 26
    close(group_advantages(r, 3, scale="batch"), [x / (sb + e) for x in [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]])
    close(group_advantages(r, 3, scale="none"), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    for scale in ("group", "batch", "none"):
        close(group_advantages(r, 3, scale=scale).view(2, 3).sum(1), [0.0, 0.0])
    close(group_advantages(t([1.0, 1.0, 5.0, 5.0]), 2), [0.0, 0.0, 0.0, 0.0])  # zero-std groups stay finite
    with pytest.raises(ValueError):
        group_advantages(r, 4)
    with pytest.raises(ValueError):
        group_advantages(r, 3, scale="rank")


def test_rloo_advantages():
    close(rloo_advantages(t(R), 3), [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0])
    with pytest.raises(ValueError):
        rloo_advantages(t(R), 4)
    with pytest.raises(ValueError):
        rloo_advantages(t(R), 1)


# ------------------------------------------------------------------------------------------------ GRPO

GM = torch.tensor([[1, 1, 0], [1, 1, 1]])
GLOGPS = [[-1.0, -2.0, 0.0], [-0.5, -1.0, -1.5]]
GREF = [[-1.5, -2.0, 0.0], [-0.5, -0.5, -1.0]]
GA = [1.0, -0.5]
K_A = math.exp(-0.5) - 0.5  # k3 at d = ref - logp = -0.5
K_B = math.exp(0.5) - 1.5  # k3 at d = +0.5
B04 = 0.04
# on-policy per-token losses -A + beta * KL; the padded token is excluded
ROW0 = [-1 + B04 * K_A, -1.0]
ROW1 = [0.5, 0.5 + B04 * K_B, 0.5 + B04 * K_B]
TOTAL = sum(ROW0) + sum(ROW1)


@pytest.mark.parametrize(
    "loss_type,kw,expected",
    [
        ("grpo", {}, (sum(ROW0) / 2 + sum(ROW1) / 3) / 2),
        ("bnpo", {}, TOTAL / 5),
        ("dr_grpo", {"max_completion_length": 4}, TOTAL / (2 * 4)),
        ("dapo", {}, TOTAL / 5),
        ("dapo", {"num_items": 10}, TOTAL / 10),
        ("dapo", {"num_items": torch.tensor(10)}, TOTAL / 10),
    ],
)
def test_grpo_on_policy_hand_values(loss_type, kw, expected):
    logps = t(GLOGPS, requires_grad=True)
    loss, metrics = grpo_loss(logps, logps.detach(), t(GREF), t(GA), GM, beta=B04, loss_type=loss_type, **kw)
    close(loss, expected)
    close(metrics["kl"], (K_A + 2 * K_B) / 5)
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        close(metrics[k], 0.0)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_grpo_padding_garbage_is_ignored():
    def run(pad):
        logps = t(GLOGPS)
        logps[0, 2] = pad
        logps.requires_grad_()
        old, ref = logps.detach().clone(), t(GREF)
        old[0, 2], ref[0, 2] = -pad, pad
        out = grpo_loss(logps, old, ref, t(GA), GM, loss_type="grpo")[0]
        return out, torch.autograd.grad(out, logps)[0]

    loss, grad = run(0.0)
    for pad in (float("nan"), float("inf"), 1e4):
        loss2, grad2 = run(pad)
        close(loss2, loss)
        close(grad2, grad)


RATIOS = [1.3, 1.25, 0.7, 0.85, 1.5, 0.5]
ADVS = [1.0, 1.0, -1.0, -1.0, -1.0, 1.0]


def test_grpo_clip_higher():
    # eps_low = 0.2, eps_high = 0.28: per-token -min(wA, clip(w, 0.8, 1.28) A)
    logps = torch.log(t(RATIOS)).unsqueeze(-1).requires_grad_()
    old, mask = torch.zeros(6, 1, dtype=D), torch.ones(6, 1)
    loss, metrics = grpo_loss(logps, old, None, t(ADVS), mask, beta=0.0, epsilon_high=0.28, loss_type="bnpo")
    per_token = [-1.28, -1.25, 0.8, 0.85, 1.5, -0.5]  # clipped: token 0 (high), token 2 (low)
    close(loss, sum(per_token) / 6)
    close(metrics["clip_ratio/high_mean"], 1 / 6)
    close(metrics["clip_ratio/low_mean"], 1 / 6)
    close(metrics["clip_ratio/region_mean"], 2 / 6)
    close(metrics["kl"], 0.0)
    # d/dlogp of -wA is -wA on unclipped tokens, 0 on clipped ones
    (g,) = torch.autograd.grad(loss, logps)
    close(g.squeeze(-1), [0.0, -1.25 / 6, 0.0, 0.85 / 6, 1.5 / 6, -0.5 / 6])

    # symmetric clipping (epsilon_high=None -> 0.2) clips 1.25 as well
    loss, metrics = grpo_loss(logps, old, None, t(ADVS), mask, beta=0.0, loss_type="bnpo")
    close(loss, (-1.2 - 1.2 + 0.8 + 0.85 + 1.5 - 0.5) / 6)
    close(metrics["clip_ratio/high_mean"], 2 / 6)


def test_grpo_sequence_level_importance_sampling():
    # GSPO: one ratio per sequence from the mean token log-ratio over real tokens
    logps = t([[0.1, 0.3, 99.0], [0.0, 0.3, -0.6]], requires_grad=True)
    old = torch.zeros(2, 3, dtype=D)
    w1 = math.exp(-0.1)  # row 0: exp(0.2) = 1.2214 > 1.2 with A = +1 -> clipped to 1.2
    loss, metrics = grpo_loss(
        logps, old, None, t([1.0, -1.0]), GM, beta=0.0, loss_type="grpo", importance_sampling_level="sequence"
    )
    close(loss, (-1.2 + w1) / 2)
    close(metrics["clip_ratio/high_mean"], 0.5)  # fraction of sequences, as in TRL
    close(metrics["clip_ratio/low_mean"], 0.0)
    (g,) = torch.autograd.grad(loss, logps)
    close(g, [[0.0, 0.0, 0.0], [w1 / 3 / 2, w1 / 3 / 2, w1 / 3 / 2]])


def test_grpo_kl_ratio_correction_gradient():
    # one token, on-policy, ref - logp = -1: KL = e^-1, dKL/dlogp = 1 - e^-1; the corrected term w*KL adds KL
    logps = t([[0.0]], requires_grad=True)
    kw = dict(beta=0.5, loss_type="bnpo")
    for correction, expected in ((True, 0.5), (False, 0.5 * (1 - math.exp(-1)))):
        loss, m = grpo_loss(
            logps, logps.detach(), t([[-1.0]]), t([0.0]), torch.ones(1, 1), **kw, kl_ratio_correction=correction
        )
        close(loss, 0.5 * math.exp(-1))
        close(torch.autograd.grad(loss, logps)[0], [[expected]])
    # off-policy: the KL term is importance-weighted, w = e^0.5
    loss, m = grpo_loss(t([[0.5]]), t([[0.0]]), t([[0.0]]), t([0.0]), torch.ones(1, 1), **kw)
    close(loss, 0.5 * math.exp(0.5) * (math.exp(-0.5) - 0.5))
    close(m["kl"], math.exp(0.5) * (math.exp(-0.5) - 0.5))


@pytest.mark.parametrize("kind,expected", [("k1", 0.5), ("k2", 0.125), ("k3", math.exp(-0.5) - 0.5)])
def test_grpo_kl_kinds(kind, expected):
    logps = t([[-1.0]])
    loss, m = grpo_loss(logps, logps, t([[-1.5]]), t([0.0]), torch.ones(1, 1), beta=1.0, kl=kind)
    close(loss, expected)
    close(m["kl"], expected)


def test_grpo_dapo_gradient_accumulation_equivalence():
    torch.manual_seed(0)
    B, T = 16, 5
    logps = (-torch.rand(B, T, dtype=D) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(B, T, dtype=D)
    ref = logps.detach() + 0.3 * torch.randn(B, T, dtype=D)
    adv = torch.randn(B, dtype=D)
    lengths = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).to(D)
    kw = dict(beta=0.04, epsilon_high=0.28, loss_type="dapo")
    full, _ = grpo_loss(logps, old, ref, adv, mask, **kw)
    (g_full,) = torch.autograd.grad(full, logps)
    n = int(mask.sum())
    g_acc = torch.zeros_like(logps)
    for sl in (slice(0, 8), slice(8, 16)):
        half, _ = grpo_loss(logps[sl], old[sl], ref[sl], adv[sl], mask[sl], num_items=n, **kw)
        g_acc = g_acc + torch.autograd.grad(half, logps)[0]
    close(g_acc, g_full)
    assert g_full.abs().sum() > 0


def test_grpo_bad_arguments():
    logps = t(GLOGPS)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, logps, None, t(GA), GM, beta=0.04)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, logps, t(GREF), t(GA), GM, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="dapo"):
        grpo_loss(logps, logps, t(GREF), t(GA), GM, loss_type="ppo")
    with pytest.raises(ValueError):
        grpo_loss(logps, logps, t(GREF), t(GA), GM, importance_sampling_level="batch")


# ------------------------------------------------------------------------------------------------ PPO


def test_gae_hand_unrolled_with_padding():
    nan = float("nan")
    rewards = t([[nan, 0.0, 0.0, 1.0, nan], [0.0, 0.0, 0.0, 0.0, 2.0]])
    values = t([[nan, 0.5, 0.6, 0.7, nan], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])

    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    a3 = 1.0 - 0.7  # V beyond the last real token is 0
    a2 = (0.7 - 0.6) + 0.95 * a3
    a1 = (0.6 - 0.5) + 0.95 * a2
    b4 = 2.0 - 1.0
    b3 = 0.95 * b4
    b2, b1, b0 = 0.95 * b3, 0.95**3 * b4, 0.95**4 * b4
    close(adv, [[0.0, a1, a2, a3, 0.0], [b0, b1, b2, b3, b4]])
    close(ret, [[0.0, a1 + 0.5, a2 + 0.6, a3 + 0.7, 0.0], [b0 + 1, b1 + 1, b2 + 1, b3 + 1, b4 + 1]])

    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    a3 = 1.0 - 0.7
    a2 = (0.9 * 0.7 - 0.6) + 0.9 * 0.95 * a3
    a1 = (0.9 * 0.6 - 0.5) + 0.9 * 0.95 * a2
    close(adv[0], [0.0, a1, a2, a3, 0.0])
    close(adv[1, 4], 1.0)
    close(adv[1, 3], (0.9 * 1.0 - 1.0) + 0.855 * 1.0)


def _ppo_inputs(pad=0.0):
    # ratios 1.5, 0.5, 0.5, 3.0 and a padded last token
    logps = t([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(3.0), pad]], requires_grad=True)
    return logps, torch.zeros(1, 5, dtype=D), t([[1.0, 1.0, -1.0, -1.0, pad]]), torch.tensor([[1, 1, 1, 1, 0]])


def test_ppo_policy_loss_clipping_and_dual_clip():
    logps, old, adv, mask = _ppo_inputs()
    loss, m = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    # max(-wA, -clip(w)A): -1.2 (clipped), -0.5, 0.8 (clipped), 3.0
    close(loss, (-1.2 - 0.5 + 0.8 + 3.0) / 4)
    close(m["clipfrac"], 0.5)
    close(m["approxkl"], 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(3.0) ** 2) / 4)
    (g,) = torch.autograd.grad(loss, logps)
    close(g, [[0.0, -0.5 / 4, 0.0, 3.0 / 4, 0.0]])

    loss, _ = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2, dual_clip=2.0)
    close(loss, (-1.2 - 0.5 + 0.8 + 2.0) / 4)  # A < 0 and w = 3: capped at -c A = 2
    with pytest.raises(ValueError):
        ppo_policy_loss(logps, old, adv, mask, dual_clip=0.5)

    for pad in (float("nan"), float("inf")):
        lp, old2, adv2, _ = _ppo_inputs(pad)
        old2[0, 4] = pad
        loss2, _ = ppo_policy_loss(lp, old2, adv2, mask)
        close(loss2, (-1.2 - 0.5 + 0.8 + 3.0) / 4)
        assert torch.isfinite(torch.autograd.grad(loss2, lp)[0]).all()


def test_ppo_policy_loss_sequence_advantages_broadcast():
    logps = t([[0.0, 0.0], [0.0, 0.0]])
    loss, m = ppo_policy_loss(logps, logps, t([1.0, -3.0]), torch.ones(2, 2))
    close(loss, (-1 - 1 + 3 + 3) / 4)
    close(m["clipfrac"], 0.0)
    close(m["approxkl"], 0.0)


def test_ppo_value_loss():
    values = t([[1.0, 0.6, 0.0, 2.0, 7.0]], requires_grad=True)
    old = t([[0.5, 0.5, 0.5, 1.0, -7.0]])
    returns = t([[2.0, 0.0, 0.0, 0.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # v_clip = 0.7, 0.6, 0.3, 1.2; max(err, err_clip) = 1.69*, 0.36, 0.09*, 4.0  (* = clipped branch active)
    loss, m = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    close(loss, 0.5 * (1.69 + 0.36 + 0.09 + 4.0) / 4)
    close(m["vf_clipfrac"], 0.5)
    (g,) = torch.autograd.grad(loss, values)
    close(g, [[0.0, 0.5 * 2 * 0.6 / 4, 0.0, 0.5 * 2 * 2.0 / 4, 0.0]])
    loss, m = ppo_value_loss(values, old, returns, mask, clip_eps=None)
    close(loss, 0.5 * (1.0 + 0.36 + 0.0 + 4.0) / 4)
    close(m["vf_clipfrac"], 0.0)


# ------------------------------------------------------------------------------------------------ unscorable rewards
# NaN marks a completion no reward function scored (src.rewards.combine_rewards): TRL 1.16 leaves it out of the
# baseline (nanmean / nanstd) and gives it advantage 0.

NAN = float("nan")
E4 = 1e-4


def test_group_advantages_leave_nan_out_of_the_baseline():
    r = t([1.0, NAN, 3.0, 2.0, 2.0, NAN, NAN, NAN, 4.0])
    a = 1 / (math.sqrt(2.0) + E4)  # group 1: {1, 3}, mean 2, unbiased std sqrt(2)
    # group 2: {2, 2}: std 0; group 3: a single scorable reward, std undefined -> 0 (TRL: NaN -> nan_to_num)
    close(group_advantages(r, 3), [-a, 0.0, a, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    close(group_advantages(r, 3, scale="none"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    sb = math.sqrt(1.3)  # batch std over {1, 3, 2, 2, 4}: mean 2.4, squared deviations 5.2, / 4
    close(group_advantages(r, 3, scale="batch"), [-1 / (sb + E4), 0.0, 1 / (sb + E4), 0, 0, 0, 0, 0, 0])
    # a NaN-free batch takes the plain mean / std path: nothing changed for it
    plain = t([0.3, 0.1, 0.7, 0.2])
    g = plain.view(2, 2)
    assert torch.equal(
        group_advantages(plain, 2), ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + E4)).view(-1)
    )


def test_rloo_advantages_leave_nan_out_of_the_baseline():
    r = t([1.0, NAN, 3.0, 5.0, NAN, 2.0, NAN, NAN])
    # group 1: scorable {1, 3, 5}: baselines (9 - r) / 2 = 4, 3, 2; group 2: one scorable completion -> 0
    close(rloo_advantages(r, 4), [-3.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    # normalize_advantages: over the scorable subset {-3, 0, 3}: mean 0, std 3
    close(rloo_advantages(r, 4, normalize=True), [-3 / (3 + E4), 0.0, 0.0, 3 / (3 + E4), 0, 0, 0, 0])
    # NaN-free normalisation: (A - mean) / (std + eps) over the batch
    a = rloo_advantages(t(R), 3)
    close(rloo_advantages(t(R), 3, normalize=True), (a - a.mean()) / (a.std() + E4))


def test_decoupled_group_advantages_hand_values():
    rpf = t([[1.0, 0.0], [3.0, 2.0], [0.0, NAN], [2.0, 1.0], [NAN, NAN], [NAN, NAN]])
    a = 1 / (math.sqrt(2.0) + E4)  # every complete per-function group here is {x, x + 2}: z = -a, +a
    # weights (1, 0.5); group 2's second function has one value: its z is NaN and the nansum skips it; group 3 is
    # unscorable
    s = [-1.5 * a, 1.5 * a, -a, a]
    std = math.sqrt(sum(x * x for x in s) / 3)  # mean 0 over the 4 scorable rows
    close(L.decoupled_group_advantages(rpf, t([1.0, 0.5]), 2), [x / (std + E4) for x in s] + [0.0, 0.0])


def test_combined_reward_nan_rows_have_no_advantage_anywhere():
    r = t([NAN, 1.0, 2.0, 4.0])
    for adv in (group_advantages(r, 4), group_advantages(r, 4, scale="batch"), rloo_advantages(r, 4)):
        assert adv[0] == 0.0 and torch.isfinite(adv).all()


# ------------------------------------------------------------------------------------------------ GRPO loss types


def one_token(logps, ratios):
    """``[B, 1]`` log-probs with grad and old log-probs giving the importance ratios ``ratios``."""
    lp = t(logps).unsqueeze(-1).requires_grad_()
    return lp, lp.detach() - torch.log(t(ratios)).unsqueeze(-1), torch.ones(len(logps), 1)


def test_grpo_cispo_hand_values():
    # MiniMax-M1 Eq. 4: -sg(min(w, eps_high)) A log p, summed / num_items
    logps, old, mask = one_token([-1.0, -2.0, -0.5], [1.0, 6.0, 0.5])
    loss, m = grpo_loss(logps, old, None, t([1.0, 1.0, -1.0]), mask, beta=0.0, loss_type="cispo", epsilon_high=5.0)
    close(loss, (1.0 + 10.0 - 0.25) / 3)  # weights 1, 5 (capped), 0.5
    close(torch.autograd.grad(loss, logps)[0].squeeze(-1), [-1 / 3, -5 / 3, 0.5 / 3])  # the weight is detached
    close(m["cispo_clip_ratio"], 1 / 3)
    assert "clip_ratio/region_mean" not in m


def test_grpo_sapo_hand_values():
    # SAPO Eq. 5: -(4 / tau) s(tau (w - 1)) A; tau = 1.0 for A > 0, 1.05 otherwise; per-sequence means
    logps, old, mask = one_token([-1.0, -1.0, -1.0], [1.0, 1.5, 0.8])
    loss, _ = grpo_loss(logps, old, None, t([1.0, -1.0, 0.0]), mask, beta=0.0, loss_type="sapo")
    tau = torch.tensor(1.05, dtype=torch.float32).item()  # TRL builds the temperatures in float32
    close(loss, (-2.0 + 4 / tau * sig(tau * 0.5)) / 3)
    g = torch.autograd.grad(loss, logps)[0].squeeze(-1)
    s1 = sig(tau * 0.5)
    close(g, [-4 * 0.25 / 3, 4 * s1 * (1 - s1) * 1.5 / 3, 0.0])  # d/dlogp = -4 s (1 - s) w A


def test_vespo_weights_and_loss():
    lr = t([[0.5, -0.5, 99.0], [0.3, math.log(2) - 0.3, 0.0]])  # sequence log-ratio sums 0 and ln 2; one pad
    phi = L.vespo_weights(t([1.0, -1.0]), lr, GM)
    close(phi.squeeze(-1), [1.0, math.exp(2 - 4) * 8])  # phi(1) = 1; A < 0: exp(2 + 3 ln 2 - 2 * 2)
    # the loss: -phi A log p summed over tokens / num_items, phi without gradient
    logps = t(GLOGPS, requires_grad=True)
    loss, m = grpo_loss(logps, logps.detach() - lr, None, t([1.0, -1.0]), GM, beta=0.0, loss_type="vespo")
    p1 = math.exp(-2) * 8
    close(loss, (-(1.0) * (-3.0) + p1 * (-3.0)) / 5)
    close(m["vespo/phi_seq_mean"], (1 + p1) / 2)
    close(torch.autograd.grad(loss, logps)[0], [[-0.2, -0.2, 0.0], [p1 / 5, p1 / 5, p1 / 5]])


def test_grpo_luspo_sums_tokens_per_sequence():
    logps = t(GLOGPS, requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), t(GREF), t(GA), GM, beta=B04, loss_type="luspo")
    close(loss, (sum(ROW0) + sum(ROW1)) / 2)


def test_grpo_delta_caps_the_unclipped_branch():
    # INTELLECT-2: min(w, delta); token 4 (w = 1.5, A = -1) contributes 1.5 without delta, 1.4 with delta = 1.4
    logps = torch.log(t(RATIOS)).unsqueeze(-1).requires_grad_()
    old, mask = torch.zeros(6, 1, dtype=D), torch.ones(6, 1)
    kw = dict(beta=0.0, epsilon_high=0.28, loss_type="bnpo")
    per_token = [-1.28, -1.25, 0.8, 0.85, 1.5, -0.5]
    capped, _ = grpo_loss(logps, old, None, t(ADVS), mask, delta=1.4, **kw)
    close(capped, (sum(per_token) - 1.5 + 1.4) / 6)
    (g,) = torch.autograd.grad(capped, logps)
    close(g.squeeze(-1), [0.0, -1.25 / 6, 0.0, 0.85 / 6, 0.0, -0.5 / 6])


def test_off_policy_sequence_mask_hand_values():
    logps = t([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    sampling = t([[0.0, 0.0], [-0.4, -0.2], [-0.2, 9.0]])  # mean KL 1.0 (A >= 0), 0.7, 0.8 (one token is padding)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    keep = L.off_policy_sequence_mask(t([1.0, -1.0, -1.0]), logps, sampling, mask, threshold=0.75)
    close(keep.squeeze(-1), [1.0, 1.0, 0.0])  # row 0 keeps (A >= 0), row 1 KL 0.7 <= 0.75, row 2 KL 0.8 drops
    # in the loss: the dropped sequence contributes no policy term (KL term kept)
    lp = logps.clone().requires_grad_()
    loss, _ = grpo_loss(
        lp,
        sampling,
        None,
        t([1.0, -1.0, -1.0]),
        mask,
        beta=0.0,
        loss_type="bnpo",
        epsilon_low=10.0,
        off_policy_mask_threshold=0.75,
    )
    # ratios exp(logp - sampling), unclipped (eps 10): row 0 -w A = -e^-1 twice, row 1 -min(-w, -w) = w, row 2 dropped
    close(loss, (-2 * math.exp(-1.0) + math.exp(-0.6) + math.exp(-0.8)) / 5)


def test_high_entropy_mask_hand_values():
    ent = t([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # quantile_{0.6} of {1, ..., 5}: position 0.6 * 4 = 2.4 -> 3.4
    assert L.high_entropy_mask(ent, mask, 0.4).tolist() == [[False, False, False], [True, True, False]]
    assert L.high_entropy_mask(ent, mask, 1.0).tolist() == mask.bool().tolist()
    assert L.high_entropy_mask(ent, mask, 0.0).tolist() == [[False, False, False], [False, True, False]]
    pool = t([10.0, 20.0])  # a wider pool (other ranks): threshold 10 + 0.6 * 10 = 16, nothing here passes
    assert not L.high_entropy_mask(ent, mask, 0.4, pool=pool).any()
    assert not L.high_entropy_mask(ent, torch.zeros(2, 3), 0.5).any()
    with pytest.raises(ValueError):
        L.high_entropy_mask(ent, mask, 1.5)


def test_entropy_bonus_and_adaptive_coefficient():
    ent = t([[1.0, 2.0, 7.0], [3.0, 4.0, 5.0]])
    close(L.entropy_bonus_loss(ent, GM, 0.1), -0.1 * (1 + 2 + 3 + 4 + 5) / 5)
    kw = dict(target=0.2, delta=0.005, coef_min=0.0, coef_max=0.012)
    assert L.adaptive_entropy_coef(0.01, 0.1, **kw) == pytest.approx(0.012)  # below target: up, capped at max
    assert L.adaptive_entropy_coef(0.01, 0.2, **kw) == pytest.approx(0.012)  # at the target: up
    assert L.adaptive_entropy_coef(0.01, 0.5, **kw) == pytest.approx(0.005)  # above: down
    assert L.adaptive_entropy_coef(0.003, 0.5, **kw) == 0.0  # floored at min


def test_token_entropy_gradient():
    torch.manual_seed(0)
    for temperature in (1.0, 0.7):
        logits = torch.randn(5, 11, dtype=D, requires_grad=True)
        labels = torch.randint(0, 11, (5,))
        a, b = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
        lp, ent = L.token_logps_and_entropy(logits, labels, temperature=temperature, entropy_grad=True)
        (g,) = torch.autograd.grad(lp @ a + ent @ b, logits)
        ref = (logits / temperature).log_softmax(-1)
        h = -(ref.exp() * ref).sum(-1)
        (g_ref,) = torch.autograd.grad(ref.gather(-1, labels[:, None]).squeeze(-1) @ a + h @ b, logits)
        close(ent, h)
        close(g, g_ref)
        assert not L.token_logps_and_entropy(logits, labels, temperature=temperature)[1].requires_grad


# ------------------------------------------------------------------------------------------------ RLOO objective


def test_rloo_loss_one_ratio_per_sequence():
    # row 0: log-ratio sum ln 1.3 with A = +1 -> clipped at 1.2; row 1: ln 0.9 with A = -1 -> 0.9; row 1's pad ignored
    logps = t([[0.1, math.log(1.3) - 0.1, 0.0], [-0.2, 0.1, 5.0]], requires_grad=True)
    old = torch.zeros(2, 3, dtype=D)
    old[1, 2] = -7.0
    old[1, 1] = 0.1 - (math.log(0.9) + 0.2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, m = L.rloo_loss(logps, old, t([1.0, -1.0]), mask)
    close(loss, (-1.2 + 0.9) / 2)
    close(torch.autograd.grad(loss, logps)[0], [[0.0, 0.0, 0.0], [0.45, 0.45, 0.0]])  # d(-wA)/dlogp_t = -wA / 2
    close(m["clip_ratio/high_mean"], 0.5)
    close(m["clip_ratio/region_mean"], 0.5)
    # an empty completion: w = 1, loss -A
    close(L.rloo_loss(t([[0.3]]), t([[0.0]]), t([2.0]), torch.zeros(1, 1))[0], -2.0)


def test_sequence_kl_penalty():
    close(L.sequence_kl_penalty(t(GLOGPS), t(GREF), GM), [0.5, -1.0])  # sum of logp - ref over real tokens


# ------------------------------------------------------------------------------------------------ PPO whiten_rewards


def test_masked_whiten_of_rewards_keeps_the_mean():
    # TRL's whiten_rewards: masked_whiten(rewards, mask, shift_mean=False); mean 2, unbiased var 1 over {1, 2, 3}
    r = t([[1.0, 3.0, 99.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    s = 1 / math.sqrt(1 + 1e-8)
    close(masked_whiten(r, mask, shift_mean=False), [[2 - s, 2 + s, 0.0], [2.0, 0.0, 0.0]])
