"""GRPO module: a real generation round per step, every loss type, accumulation invariance, user prompts."""

from __future__ import annotations

import json

import pytest
import torch

from src.data.tiny import generate_rows
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
    return buf, m.advantages(buf["rewards"])


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
