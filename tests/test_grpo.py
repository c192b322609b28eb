"""GRPO module: a real generation round per step, every loss type, accumulation invariance, user prompts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from src.data.tiny import generate_rows
from src.losses import group_advantages
from src.modules.grpo import GRPO
from tests.conftest import FAST, RecordingOptimizer, column, read_metrics


def offline_module(tokenizer, **kw) -> GRPO:
    """A GRPO module driven without a Trainer: backward is plain autograd, the optimizer records gradients."""
    torch.manual_seed(0)
    m = GRPO(**kw)
    m.configure_model()
    m.tokenizer = tokenizer
    m.manual_backward = lambda loss: loss.backward()
    m.clip_gradients = lambda *a, **k: None
    return m


def buffer(m: GRPO, batch):
    buf = m.rollout(batch)
    buf["loss_mask"] = buf["completion_mask"]
    buf["old_logps"] = buf["ref_logps"] = None
    if m.hparams.beta > 0:
        buf["ref_logps"] = m.reference_logps(buf["input_ids"], buf["attention_mask"], buf["completion_mask"])
    return buf, m.advantages(buf["rewards"], buf)


def drive(m: GRPO, optimizer) -> GRPO:
    """Let ``training_step`` run without a Trainer: ``optimizer`` steps, no scheduler, no logging."""
    m.optimizers = lambda: optimizer
    m.lr_schedulers = lambda: None
    m.log = lambda *a, **k: None
    return m


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_micro_batches_give_the_same_gradient(prompt_batch, loss_type):
    batch, tok = prompt_batch
    m = offline_module(tok, beta=0.04, loss_type=loss_type)
    buf, adv = buffer(m, batch)
    assert buf["input_ids"].shape[0] == 16 and adv.abs().sum() > 0
    opt = RecordingOptimizer(m.model.parameters())
    full_loss, _ = m._optimizer_step(buf, adv, slice(0, 16), opt)
    m.hparams.micro_batch_size = 8
    acc_loss, _ = m._optimizer_step(buf, adv, slice(0, 16), opt)
    assert acc_loss.item() == pytest.approx(full_loss.item(), rel=1e-5, abs=1e-7)
    for g_full, g_acc in zip(*opt.grads):
        assert torch.allclose(g_full, g_acc, atol=1e-6, rtol=1e-4)


def test_on_policy_loss_is_minus_advantage_plus_kl(prompt_batch):
    batch, tok = prompt_batch
    m = offline_module(tok, beta=0.0, loss_type="bnpo")
    buf, adv = buffer(m, batch)
    mask = buf["completion_mask"].float()
    expected = -(adv[:, None] * mask).sum() / mask.sum()  # ratio = 1, β = 0: per token −A, averaged over tokens
    loss, metrics = m._optimizer_step(buf, adv, slice(0, 16), RecordingOptimizer(m.model.parameters()))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["clip_ratio/region_mean"].item() == 0.0


def test_rollout_masks_and_groups(prompt_batch):
    batch, tok = prompt_batch
    m = offline_module(tok)
    buf = m.rollout(batch)
    ids, cmask = buf["input_ids"], buf["completion_mask"]
    p = buf["prompt_len"]
    assert cmask[:, :p].sum() == 0  # prompt tokens never enter the loss
    for g in range(4):  # each prompt's 4 completions are consecutive rows with the same prompt
        assert all(torch.equal(ids[4 * g, :p], ids[4 * g + j, :p]) for j in range(4))
    for row in range(16):
        comp = ids[row, p:][cmask[row, p:].bool()].tolist()
        if tok.eos_token_id in comp:
            assert comp.index(tok.eos_token_id) == len(comp) - 1  # nothing after EOS is in the mask


def test_off_policy_iterations_use_a_real_ratio(run_cli):
    cli = run_cli(
        [
            "fit",
            "--config",
            "grpo.yaml",
            *FAST,
            "--model.init_args.num_iterations=2",
            "--model.init_args.steps_per_generation=2",
            "--model.init_args.advantage=rloo",
            "--trainer.max_steps=8",
            "--model.init_args.importance_sampling_level=sequence",
        ]
    )
    # max_steps counts optimizer steps: each batch makes μ × steps_per_generation = 4 of them
    assert cli.trainer.global_step == 8
    rows = read_metrics(cli.trainer.logger.log_dir)
    assert column(rows, "train/reward") and column(rows, "train/entropy")


def test_grad_norm_metric_is_the_norm_before_clipping(run_cli):
    """Manual optimization clips before ``on_before_optimizer_step``: the logged norm must still be the unclipped one
    (as with automatic optimization and TRL), so a 1e-6 clip cannot show up as a 1e-6 gradient norm."""
    cli = run_cli(["fit", "--config", "grpo.yaml", *FAST, "--model.init_args.max_grad_norm=1e-6"])
    norms = [float(v) for v in column(read_metrics(cli.trainer.logger.log_dir), "train/grad_norm")]
    assert norms and min(norms) > 1e-4, norms


def test_user_prompts_file_trains(run_cli, tmp_path):
    path = tmp_path / "my_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_rows("prompt", 24, seed=5)))
    cli = run_cli(["fit", "--config", "grpo.yaml", *FAST, f"--data.path={path}", "--data.val_size=4"])
    rows = read_metrics(cli.trainer.logger.log_dir)
    for key in (
        "train/reward",
        "train/reward_std",
        "train/kl",
        "train/completions/mean_length",
        "train/rewards/digit_fraction/mean",
        "train/frac_reward_zero_std",
        "train/clip_ratio/region_mean",
    ):
        assert column(rows, key), key
    assert column(rows, "val/reward")


def test_reward_function_error_names_the_function(run_cli, tmp_path):
    # the message names the function, then quotes its own error
    with pytest.raises(RuntimeError, match=r"reward function '[\w.]*boom' raised on .*ValueError: boom"):
        run_cli(["fit", "--config", "grpo.yaml", *FAST, "--model.init_args.reward_funcs=[tests.test_grpo.boom]"])


def boom(prompts, completions, **_):
    raise ValueError("boom")


def test_reference_uses_the_sampling_temperature(run_cli):
    """Policy and reference score ``logits / T`` alike: at step 1 they are the same weights, so with T != 1 and β > 0
    the logged KL is exactly 0 (it was ~0.005 when the reference scored raw logits)."""
    cli = run_cli(
        ["fit", "--config", "grpo.yaml", *FAST, "--model.init_args.temperature=0.7", "--model.init_args.beta=0.04"]
    )
    rows = read_metrics(cli.trainer.logger.log_dir)
    first = next(r for r in rows if r.get("train/kl"))
    assert int(first["step"]) <= 1 and float(first["train/kl"]) == 0.0, first


def unscorable_rows(prompts, completions, **_):
    """Rows 1, 5 and 6 get None (row 1 in group 0, rows 5-6 in group 1); the others a spread of values."""
    return [None if i in (1, 5, 6) else float(len(c) % 7) + 0.1 * i for i, c in enumerate(completions)]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_unscorable_completions_get_no_advantage_and_stay_out_of_the_baseline(prompt_batch, advantage):
    """An all-None completion used to score 0 and enter its group's mean and std (TRL: NaN, left out, advantage 0)."""
    batch, tok = prompt_batch
    m = offline_module(tok, reward_funcs=[unscorable_rows], advantage=advantage)
    with pytest.warns(UserWarning, match="All reward functions returned None"):
        buf, adv = buffer(m, batch)
    rewards = buf["rewards"]
    assert rewards[[1, 5, 6]].isnan().all() and torch.isfinite(rewards[[0, 2, 3, 4, 7]]).all()
    assert torch.all(adv[[1, 5, 6]] == 0)
    for rows in ([0, 2, 3], [4, 7]):  # the scorable rows' advantages are those of their group without the others
        r = rewards[rows].double()
        if advantage == "grpo":
            expected = (r - r.mean()) / (r.std() + 1e-4)
        else:
            expected = r - (r.sum() - r) / (len(rows) - 1)
        torch.testing.assert_close(adv[rows].double(), expected, rtol=1e-5, atol=1e-6)
    # nothing of it reaches the loss
    loss, _ = m._optimizer_step(buf, adv, slice(0, 16), RecordingOptimizer(m.model.parameters()))
    assert math.isfinite(loss.item())


def test_normalize_then_sum_is_gdpo(prompt_batch):
    batch, tok = prompt_batch
    funcs = [lambda prompts, completions, **_: [float(len(c) % 7) for c in completions], "src.rewards.digit_fraction"]
    m = offline_module(
        tok, reward_funcs=funcs, reward_weights=[1.0, 2.0], multi_objective_aggregation="normalize_then_sum"
    )
    buf, adv = buffer(m, batch)
    per_func = buf["rewards_per_func"].double()
    z = torch.stack([group_advantages(per_func[:, k], 4) for k in range(2)], 1)  # per function, per group
    s = z @ torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(adv.double(), (s - s.mean()) / (s.std() + 1e-4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"loss_type": "rloo"}, "loss_type='rloo'.*advantage='rloo'"),
        ({"loss_type": "rloo", "advantage": "rloo", "importance_sampling_level": "sequence"}, "importance_sampling"),
        ({"normalize_advantages": True}, "normalize_advantages.*advantage='rloo'"),
        ({"delta": 2.0, "loss_type": "sapo"}, "delta.*loss_type"),
        ({"loss_type": "cispo"}, "cispo.*epsilon_high"),
        ({"sync_ref_model": True}, "sync_ref_model.*beta"),
        ({"sync_ref_model": True, "beta": 0.04, "lora": {"r": 4}}, "sync_ref_model.*lora"),
        ({"multi_objective_aggregation": "normalize_then_sum", "advantage": "rloo"}, "normalize_then_sum.*advantage"),
        ({"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "none"}, "scale_rewards.*normalize"),
        ({"top_entropy_quantile": 0.2, "loss_type": "rloo", "advantage": "rloo"}, "top_entropy_quantile.*rloo"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
        ({"off_policy_mask_threshold": 0.5, "loss_type": "rloo", "advantage": "rloo"}, "off_policy.*rloo"),
        ({"reward_clip_range": (1.0, 0.0)}, "reward_clip_range"),
    ],
)
def test_options_that_need_each_other_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        GRPO(**kw)
    assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"loss_type": "luspo"}, "luspo.*sequence"),
        ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "vespo.*token"),
        ({"loss_type": "dapo", "importance_sampling_level": "sequence"}, "sequence.*dapo"),
    ],
)
def test_trl_importance_sampling_warnings(kw, match):
    with pytest.warns(UserWarning, match=match):
        GRPO(**kw)


class SteppingSGD(torch.optim.SGD):
    """SGD that counts its steps: stands in for the trainer's optimizer-step counter (``global_step``)."""

    steps = 0

    def step(self, closure=None):
        super().step(closure)
        SteppingSGD.steps += 1


class CountingGRPO(GRPO):
    @property
    def global_step(self) -> int:
        return SteppingSGD.steps


def test_reference_sync_once_per_optimizer_step(prompt_batch):
    """TR-DPO sync inside one generation round of μ × steps_per_generation = 4 optimizer steps (each accumulated
    over 2 micro-batches): with ref_model_sync_steps=2 exactly two updates, after steps 2 and 4."""
    batch, tok = prompt_batch
    torch.manual_seed(0)
    m = CountingGRPO(
        beta=0.04,
        sync_ref_model=True,
        ref_model_sync_steps=2,
        ref_model_mixup_alpha=0.25,
        num_iterations=2,
        steps_per_generation=2,
        micro_batch_size=4,
    )
    m.configure_model()
    m.tokenizer = tok
    m.manual_backward = lambda loss: loss.backward()
    m.clip_gradients = lambda *a, **k: None
    SteppingSGD.steps = 0
    seen = []
    opt = SteppingSGD(m.model.parameters(), lr=0.5)
    original = m.sync_reference

    def record(ref, policy_model, step):
        before = [p.detach().clone() for p in ref.parameters()]
        policy = [p.detach().clone() for p in policy_model.parameters()]
        original(ref, policy_model, step)
        seen.append((step, before, policy))

    m.sync_reference = record
    drive(m, opt).training_step(batch, 0)
    assert [s for s, *_ in seen] == [1, 2, 3, 4]
    for step, before, policy in seen:  # θ_ref ← α θ + (1 − α) θ_ref after steps 2 and 4 only
        after = seen[step][1] if step < 4 else [p.detach() for p in m.ref_model.parameters()]
        for b, p, a in zip(before, policy, after):
            expected = 0.25 * p + 0.75 * b if step % 2 == 0 else b
            torch.testing.assert_close(a, expected)
    assert original.synced_step == 4
