"""ORPO and CPO: the pure losses against hand values (``math``), the modules' full objectives on given logits with
padding that must not count, and (slow) the job configs learning on the embedded default."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from src.losses import CPO_LOSS_TYPES, cpo_loss, log1mexp, orpo_loss, simpo_loss
from src.modules.cpo import CPO
from src.modules.orpo import ORPO
from tests.conftest import column, read_metrics


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def log_odds(a: float) -> float:
    """log(p / (1 - p)) with p = exp(a), a the mean token log-prob (< 0)."""
    return a - math.log(-math.expm1(a))


# -- ORPO's odds-ratio term ------------------------------------------------------------------------------------------
def test_orpo_loss_hand_values():
    # Per pair, p = exp(mean logp):  log_odds = log(p_w/(1-p_w)) - log(p_l/(1-p_l)),  loss = -λ·logσ(log_odds)
    # (the pure function is the odds-ratio term alone; the module adds the chosen NLL), rewards λ·a.
    chosen, rejected, lam = [-0.5, -1.2, -1e-6], [-1.0, -0.8, -30.0], 0.25
    losses, chosen_r, rejected_r, lo = orpo_loss(
        torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64), beta=lam
    )
    expected_lo = [log_odds(c) - log_odds(r) for c, r in zip(chosen, rejected)]
    # pair 1 spelled out: p_w = e^-0.5 = 0.60653, p_l = e^-1 = 0.36788 -> log odds 0.43275 - (-0.54132) = 0.97408
    p_w, p_l = math.exp(-0.5), math.exp(-1.0)
    assert expected_lo[0] == pytest.approx(math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l)), rel=1e-12)
    assert expected_lo[0] == pytest.approx(0.974077, abs=1e-6)
    assert lo.tolist() == pytest.approx(expected_lo, rel=1e-6, abs=1e-6)
    assert lo[1] < 0  # the rejected completion is the likelier one in pair 2
    assert losses.tolist() == pytest.approx([-lam * log_sigmoid(x) for x in expected_lo], rel=1e-6, abs=1e-6)
    assert chosen_r.tolist() == pytest.approx([lam * c for c in chosen], rel=1e-6)
    assert rejected_r.tolist() == pytest.approx([lam * r for r in rejected], rel=1e-6)
    assert not (chosen_r.requires_grad or rejected_r.requires_grad or lo.requires_grad)


def test_orpo_loss_float32_near_the_ends():
    # log1mexp keeps log(1 - e^a) accurate for a -> 0 (P -> 1) and a -> -inf (P -> 0), where the naive form fails.
    a = torch.tensor([-1e-7, -1e-3, -0.6931, -0.7, -5.0, -40.0])
    expected = [math.log(-math.expm1(x)) for x in a.double().tolist()]
    assert log1mexp(a).tolist() == pytest.approx(expected, rel=1e-6)
    losses, *_, lo = orpo_loss(torch.tensor([-1e-7]), torch.tensor([-40.0]), beta=1.0)
    expected_lo = log_odds(-1e-7) - log_odds(-40.0)  # ≈ 16.118 + 40
    assert lo.item() == pytest.approx(expected_lo, rel=1e-6)
    assert losses.item() == pytest.approx(-log_sigmoid(expected_lo), rel=1e-5, abs=1e-12)


# -- CPO's preference term -------------------------------------------------------------------------------------------
# Two pairs of summed completion log-probs: h = c - r = [1.5, -1.0]; per token (ipo, simpo):
# c/|y_w| = [-1.0, -1.0], r/|y_l| = [-0.9, -2.0], h' = [-0.1, 1.0].
C, R, LC, LR = [-3.0, -5.0], [-4.5, -4.0], [3, 5], [5, 2]


def _cpo(loss_type: str, **kw):
    return cpo_loss(
        torch.tensor(C, dtype=torch.float64),
        torch.tensor(R, dtype=torch.float64),
        torch.tensor(LC),
        torch.tensor(LR),
        loss_type=loss_type,
        **kw,
    )


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cpo_sigmoid_hand_values(ls):
    # loss = -(1-ls)·logσ(β(c-r)) - ls·logσ(-β(c-r)) (Eq. 3, the reference log-probs 0), rewards β·c, β·r
    beta = 0.5
    losses, chosen_r, rejected_r = _cpo("sigmoid", beta=beta, label_smoothing=ls)
    z = [beta * (c - r) for c, r in zip(C, R)]  # [0.75, -0.5]
    expected = [-(1 - ls) * log_sigmoid(x) - ls * log_sigmoid(-x) for x in z]
    if ls == 0:
        assert expected == pytest.approx([math.log1p(math.exp(-0.75)), math.log1p(math.exp(0.5))], rel=1e-12)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen_r.tolist() == pytest.approx([-1.5, -2.5], rel=1e-6)
    assert rejected_r.tolist() == pytest.approx([-2.25, -2.0], rel=1e-6)


@pytest.mark.parametrize("beta, expected", [(0.1, [0.85, 1.1]), (2.0, [0.0, 3.0])])
def test_cpo_hinge_hand_values(beta, expected):
    # loss = relu(1 - β(c-r)): β=0.1 -> [1 - 0.15, 1 + 0.1]; β=2 -> [relu(-2), 1 + 2]
    losses, chosen_r, rejected_r = _cpo("hinge", beta=beta)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert chosen_r.tolist() == pytest.approx([beta * c for c in C], rel=1e-6)
    assert rejected_r.tolist() == pytest.approx([beta * r for r in R], rel=1e-6)


def test_cpo_ipo_hand_values():
    # loss = (h' - 1/(2β))², h' on per-token log-probs: β=0.5 -> (-0.1 - 1)² = 1.21, (1.0 - 1)² = 0
    losses, chosen_r, rejected_r = _cpo("ipo", beta=0.5)
    assert losses.tolist() == pytest.approx([1.21, 0.0], rel=1e-6, abs=1e-12)
    assert chosen_r.tolist() == pytest.approx([-0.5, -0.5], rel=1e-6)  # β·c/|y_w|
    assert rejected_r.tolist() == pytest.approx([-0.45, -1.0], rel=1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_cpo_simpo_hand_values(ls):
    # u = β·h' - γ, loss = -(1-ls)·logσ(u) - ls·logσ(-u): β=2, γ=0.5 -> u = [-0.7, 1.5]; rewards β·c/|y_w|, β·r/|y_l|
    beta, gamma = 2.0, 0.5
    losses, chosen_r, rejected_r = _cpo("simpo", beta=beta, simpo_gamma=gamma, label_smoothing=ls)
    u = [beta * (c / lc - r / lr) - gamma for c, r, lc, lr in zip(C, R, LC, LR)]
    assert u == pytest.approx([-0.7, 1.5], rel=1e-12)
    expected = [-(1 - ls) * log_sigmoid(x) - ls * log_sigmoid(-x) for x in u]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen_r.tolist() == pytest.approx([-2.0, -2.0], rel=1e-6)
    assert rejected_r.tolist() == pytest.approx([-1.8, -4.0], rel=1e-6)
    direct = simpo_loss(
        torch.tensor(C, dtype=torch.float64),
        torch.tensor(R, dtype=torch.float64),
        torch.tensor(LC),
        torch.tensor(LR),
        beta=beta,
        gamma=gamma,
        label_smoothing=ls,
    )
    for ours, theirs in zip(direct, (losses, chosen_r, rejected_r)):
        torch.testing.assert_close(ours, theirs)


def test_cpo_unknown_loss_type():
    with pytest.raises(ValueError, match="Unknown CPO loss_type"):
        _cpo("robust")


# -- the modules: full objectives from given logits, padding that must not count -----------------------------------
B, T, V = 2, 8, 11
# (left pad, prompt, completion) for chosen rows 0-1, then rejected rows 2-3
LAYOUTS = [(0, 2, 4), (1, 3, 2), (0, 3, 5), (2, 2, 3)]


class _Logits(torch.nn.Module):
    """Stands in for a causal LM (no ``get_decoder``: the scoring takes its full-forward path) and returns the given
    logits ``[2B, T, V]`` whatever the inputs."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, *_: object, **__: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def _batch(seed: int = 0, layouts: list[tuple[int, int, int]] = LAYOUTS, t: int = T, v: int = V) -> dict:
    """Random ids and float64 logits ``[len(layouts), t, v]`` with the rows' padding and completion masks."""
    n = len(layouts)
    attn = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, (pad, prompt, completion) in enumerate(layouts):
        attn[i, pad : pad + prompt + completion] = 1
        mask[i, pad + prompt : pad + prompt + completion] = 1
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, v, (n, t), generator=g)
    logits = 2 * torch.randn(n, t, v, generator=g, dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": mask, "logits": logits}


def _padded(batch: dict[str, torch.Tensor], left: int = 2, right: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """The same rows with ``left`` / ``right`` more padding columns holding random ids and logits; the ids and logits at
    the existing padding positions are scrambled too."""
    g = torch.Generator().manual_seed(seed)
    n = batch["input_ids"].shape[0]
    attn, mask = batch["attention_mask"], batch["completion_mask"]
    ids = torch.where(attn.bool(), batch["input_ids"], torch.randint(0, V, attn.shape, generator=g))
    # logits at a pad position, or at a completion's last token (they predict a pad), are never read
    read = attn.bool() & torch.nn.functional.pad(mask[:, 1:], (0, 1)).bool()
    noise = 50 * torch.randn(batch["logits"].shape, generator=g, dtype=torch.float64)
    logits = torch.where(read[..., None], batch["logits"], noise)

    def cat(x, fill):
        return torch.cat([fill(left), x, fill(right)], dim=1)

    return {
        "input_ids": cat(ids, lambda k: torch.randint(0, V, (n, k), generator=g)),
        "attention_mask": cat(attn, lambda k: torch.zeros(n, k, dtype=torch.long)),
        "completion_mask": cat(mask, lambda k: torch.zeros(n, k, dtype=torch.long)),
        "logits": cat(logits, lambda k: 50 * torch.randn(n, k, V, generator=g, dtype=torch.float64)),
    }


def _token_logps(batch: dict[str, torch.Tensor]) -> list[list[float]]:
    """Each row's completion-token log-probs, by hand: log_softmax(logits[t-1])[ids[t]] over the completion."""
    logp = torch.log_softmax(batch["logits"], -1)
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        ts = batch["completion_mask"][i].nonzero().flatten().tolist()
        rows.append([logp[i, t - 1, batch["input_ids"][i, t]].item() for t in ts])
    return rows


def _module_loss(module_cls: type, batch: dict[str, torch.Tensor], **cfg):
    module = module_cls(accel="off", **cfg)
    module.model = _Logits(batch["logits"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss, metrics = module.compute_loss(inputs)
    return loss.item(), {k: v.double().tolist() for k, v in metrics.items()}


def test_orpo_module_hand_value_and_padding():
    # L = NLL(chosen) + λ·mean(-logσ(log odds)), NLL = -(sum of the chosen completion-token logps) / their count
    lam = 0.3
    batch = _batch()
    rows = _token_logps(batch)
    assert [len(r) for r in rows] == [c for _, _, c in LAYOUTS]
    avg = [sum(r) / len(r) for r in rows]
    nll = -sum(sum(r) for r in rows[:B]) / sum(len(r) for r in rows[:B])
    lo = [log_odds(avg[i]) - log_odds(avg[B + i]) for i in range(B)]
    expected = nll + lam * sum(-log_sigmoid(x) for x in lo) / B
    loss, metrics = _module_loss(ORPO, batch, beta=lam)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert metrics["nll_loss"] == pytest.approx([nll] * B, rel=1e-6)
    assert metrics["log_odds_chosen"] == pytest.approx(lo, rel=1e-6)
    assert metrics["log_odds_ratio"] == pytest.approx([log_sigmoid(x) for x in lo], rel=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(avg[:B], rel=1e-6)
    assert metrics["rewards/margins"] == pytest.approx([lam * (avg[i] - avg[B + i]) for i in range(B)], rel=1e-6)
    assert metrics["rewards/accuracies"] == [float(avg[i] > avg[B + i]) for i in range(B)]

    padded_loss, padded_metrics = _module_loss(ORPO, _padded(batch), beta=lam)
    assert padded_loss == pytest.approx(loss, rel=1e-12)
    for name, values in metrics.items():
        assert padded_metrics[name] == pytest.approx(values, rel=1e-12), name


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_cpo_module_hand_value_and_padding(loss_type):
    # L = mean(ℓ) + α·NLL(chosen); ℓ on summed completion logps (per token for ipo / simpo), lengths = completion tokens
    beta, alpha, gamma = 0.4, 0.7, 0.3
    batch = _batch(seed=2)
    rows = _token_logps(batch)
    seq, n = [sum(r) for r in rows], [len(r) for r in rows]
    nll = -sum(seq[:B]) / sum(n[:B])
    if loss_type in ("ipo", "simpo"):
        seq = [s / k for s, k in zip(seq, n)]
    h = [seq[i] - seq[B + i] for i in range(B)]
    pref = {
        "sigmoid": lambda x: -log_sigmoid(beta * x),
        "hinge": lambda x: max(0.0, 1 - beta * x),
        "ipo": lambda x: (x - 1 / (2 * beta)) ** 2,
        "simpo": lambda x: -log_sigmoid(beta * x - gamma),
    }[loss_type]
    expected = sum(pref(x) for x in h) / B + alpha * nll
    cfg = dict(beta=beta, loss_type=loss_type, cpo_alpha=alpha, simpo_gamma=gamma)
    loss, metrics = _module_loss(CPO, batch, **cfg)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert metrics["nll_loss"] == pytest.approx([nll] * B, rel=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(seq[:B], rel=1e-6)
    assert metrics["logps/rejected"] == pytest.approx(seq[B:], rel=1e-6)
    assert metrics["rewards/margins"] == pytest.approx([beta * x for x in h], rel=1e-6)

    padded_loss, padded_metrics = _module_loss(CPO, _padded(batch), **cfg)
    assert padded_loss == pytest.approx(loss, rel=1e-12)
    for name, values in metrics.items():
        assert padded_metrics[name] == pytest.approx(values, rel=1e-12), name


# -- the job configs learn on the embedded tiny default -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config", ["orpo.yaml", "cpo.yaml"])
def test_config_learns(run_cli, config):
    """The job config as shipped: the validation reward accuracy (mean / per-token log-prob of chosen > rejected)
    reaches >= 0.9 (measured 0.93 for both) and the training loss falls."""
    cli = run_cli(["fit", "--config", config, "--trainer.enable_progress_bar=false"])
    rows = read_metrics(cli.trainer.logger.log_dir)
    loss, val_acc = column(rows, "train/loss"), column(rows, "val/rewards/accuracies")
    assert len(loss) >= 10 and len(val_acc) == 3, (len(loss), val_acc)
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5, loss
    assert val_acc[-1] >= 0.9, val_acc
