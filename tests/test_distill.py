"""On-policy distillation (GKD): the generalised JSD by hand and against TRL 1.16's own code, the chunked form against
the plain one, the module's wiring (teacher outside the module tree, lmbda, masks) and the tiny default learning."""

from __future__ import annotations

import math

import pytest
import torch

from src.losses import chunked_generalized_jsd, generalized_jsd
from tests.conftest import FAST, column, read_metrics

FAST = [*FAST, "--model.init_args.teacher_sft_steps=2", "--model.init_args.max_new_tokens=8"]


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# -- the pure loss, by hand ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_hand_values(beta, temperature):
    zs, zt = [1.0, -0.5, 0.2, 2.0], [0.1, 0.9, -1.0, 0.4]
    ps, pt = softmax([v / temperature for v in zs]), softmax([v / temperature for v in zt])
    if beta == 0.0:
        want = kl(pt, ps)  # forward KL(teacher || student)
    elif beta == 1.0:
        want = kl(ps, pt)  # reverse KL(student || teacher)
    else:
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        want = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    got = generalized_jsd(torch.tensor([zs]), torch.tensor([zt]), beta=beta, temperature=temperature)
    assert got.shape == (1,) and got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_generalized_jsd_is_zero_for_equal_distributions_and_symmetric_at_one_half():
    z = torch.randn(5, 11, dtype=torch.float64)
    w = torch.randn(5, 11, dtype=torch.float64)
    for beta in (0.0, 0.5, 1.0):
        assert generalized_jsd(z, z, beta=beta).abs().max() < 1e-12
    torch.testing.assert_close(generalized_jsd(z, w, beta=0.5), generalized_jsd(w, z, beta=0.5))
    assert (generalized_jsd(z, w, beta=0.5) <= math.log(2) + 1e-12).all()  # the JSD is bounded by log 2


def test_generalized_jsd_rejects_bad_options():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(z, z, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        generalized_jsd(z, torch.zeros(2, 4))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_equals_plain_values_and_gradients(beta):
    torch.manual_seed(0)
    n, hs, ht, v = 13, 8, 12, 37  # the teacher is wider than the student: only the vocabulary is shared
    h_s = torch.randn(n, hs, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(n, ht, dtype=torch.float64)
    head_s, head_t = torch.nn.Linear(hs, v, bias=False).double(), torch.nn.Linear(ht, v, bias=False).double()
    plain = generalized_jsd(head_s(h_s), head_t(h_t).detach(), beta=beta, temperature=0.7)
    g_plain = torch.autograd.grad(plain.sum(), [h_s, head_s.weight])
    chunked = chunked_generalized_jsd(h_s, h_t, head_s, head_t, beta=beta, temperature=0.7, chunk_size=4)
    g_chunked = torch.autograd.grad(chunked.sum(), [h_s, head_s.weight])
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-12)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert head_t.weight.grad is None


# -- side by side with TRL 1.16 -----------------------------------------------------------------------------------
def _padded_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t, v = 3, 6, 29
    zs = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = False  # right padding
    mask[2, :2] = False  # prompt positions
    return zs, zt, mask


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_matches_trl_gkd_generalized_jsd_loss(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    zs, zt, mask = _padded_inputs()
    labels = torch.where(mask, 1, -100)
    leaf_ours, leaf_trl = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(leaf_trl, zt, labels, beta=beta, temperature=temperature)
    ours = generalized_jsd(leaf_ours[mask], zt[mask], beta=beta, temperature=temperature).mean()
    assert abs(ours.item() - trl_loss.item()) < 1e-6 and ours.item() > 1e-3
    (g_ours,) = torch.autograd.grad(ours, leaf_ours)
    (g_trl,) = torch.autograd.grad(trl_loss, leaf_trl)
    assert (g_ours - g_trl).abs().max() < 1e-6
    assert g_ours[~mask].abs().max() == 0  # padding and prompt positions get no gradient


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_matches_trl_distillation_trainer(beta):
    dist = pytest.importorskip("trl.trainer.distillation_trainer")
    torch.manual_seed(1)
    b, k, hs, ht, v = 2, 5, 8, 10, 23
    h_s = torch.randn(b, k, hs, requires_grad=True)
    h_t = torch.randn(b, k, ht)
    w_s = torch.randn(v, hs, requires_grad=True)
    w_t = torch.randn(v, ht)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    trl_loss, _, n = dist._chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, temperature=0.9)
    g_trl = torch.autograd.grad(trl_loss, [h_s, w_s])
    head_s, head_t = torch.nn.Linear(hs, v, bias=False), torch.nn.Linear(ht, v, bias=False)
    head_s.weight, head_t.weight = torch.nn.Parameter(w_s), torch.nn.Parameter(w_t, requires_grad=False)
    sel = mask.bool()
    ours = chunked_generalized_jsd(h_s[sel], h_t[sel], head_s, head_t, beta=beta, temperature=0.9, chunk_size=3)
    g_ours = torch.autograd.grad(ours.mean(), [h_s, head_s.weight])
    assert int(n) == int(sel.sum()) and abs(ours.mean().item() - trl_loss.item()) < 1e-6
    for a, b_ in zip(g_ours, g_trl):
        assert (a - b_).abs().max() < 1e-6


# -- the module ---------------------------------------------------------------------------------------------------
def test_distill_runs_and_keeps_the_teacher_out_of_the_checkpoint(run_cli):
    cli = run_cli(["fit", "--config", "distill.yaml", *FAST, "--model.init_args.lmbda=1.0"])
    module = cli.trainer.lightning_module
    assert cli.trainer.global_step == 3
    assert not any(k.startswith("_teacher") or "teacher" in k for k in module.state_dict())
    assert not any(p is q for p in module.parameters() for q in module.teacher.parameters())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    student_width = module.model.config.hidden_size
    assert student_width == 64 and module.teacher.config.hidden_size == 128  # a narrower student, as shipped
    rows = read_metrics(cli.trainer.logger.log_dir)
    assert column(rows, "train/on_policy") and set(column(rows, "train/on_policy")) == {1.0}
    assert not column(rows, "train/divergence/dataset")  # lmbda 1: never trained on the dataset's completions
    assert column(rows, "val/divergence/on_policy") and column(rows, "val/divergence/dataset")


def test_lmbda_zero_never_samples(run_cli, monkeypatch):
    import src.modules.distill as distill

    def fail(*a, **k):
        raise AssertionError("lmbda 0 sampled during training")

    monkeypatch.setattr(distill, "generate", fail)
    args = ["fit", "--config", "distill.yaml", *FAST, "--model.init_args.lmbda=0.0", "--trainer.limit_val_batches=0"]
    cli = run_cli(args)
    rows = read_metrics(cli.trainer.logger.log_dir)
    assert cli.trainer.global_step == 3 and set(column(rows, "train/on_policy")) == {0.0}
    assert column(rows, "train/divergence/dataset") and not column(rows, "train/divergence/on_policy")


def test_on_policy_draws_are_seeded_by_step():
    from src.modules.distill import Distill

    m = Distill(lmbda=0.5)
    draws = []
    for step in range(400):
        m._batch_idx = step
        draws.append(m.on_policy_step())
    again = []
    for step in range(400):
        m._batch_idx = step
        again.append(m.on_policy_step())
    assert draws == again and 0.4 < sum(draws) / len(draws) < 0.6


def test_divergence_ignores_padding_and_prompt_tokens(run_cli):
    """Padding appended to every row (and garbage in its ids) leaves the per-token divergence unchanged."""
    cli = run_cli(["fit", "--config", "distill.yaml", *FAST, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    module = cli.trainer.lightning_module.eval()
    batch = next(iter(cli.datamodule.train_dataloader()))
    div, _ = module.divergence(batch)
    pad = torch.randint(0, 100, (batch["input_ids"].shape[0], 5))
    padded = {
        **batch,
        "input_ids": torch.cat([batch["input_ids"], pad], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros_like(pad)], 1),
        "completion_mask": torch.cat([batch["completion_mask"], torch.zeros_like(pad)], 1),
    }
    div_padded, _ = module.divergence(padded)
    assert div.shape == div_padded.shape == (int(batch["completion_mask"][:, 1:].sum()),)
    torch.testing.assert_close(div_padded, div, rtol=1e-5, atol=1e-6)


def test_bad_options_are_clear_errors():
    from src.modules.distill import Distill

    with pytest.raises(ValueError, match="beta"):
        Distill(beta=2.0)
    with pytest.raises(ValueError, match="lmbda"):
        Distill(lmbda=-0.1)


@pytest.mark.slow
def test_distill_config_learns(run_cli):
    """The job config as shipped: the student's divergence from the teacher, on its own samples and on the dataset's
    completions, ends at <= 50% of its start."""
    cli = run_cli(["fit", "--config", "distill.yaml", "--trainer.enable_progress_bar=false"])
    rows = read_metrics(cli.trainer.logger.log_dir)
    start = column(rows, "train/loss")[0]
    assert start > 0.05, start  # the built-in teacher is not the student's twin
    assert column(rows, "val/loss")[-1] <= 0.5 * start
    assert column(rows, "val/divergence/on_policy")[-1] <= 0.5 * column(rows, "train/divergence/on_policy")[0]
