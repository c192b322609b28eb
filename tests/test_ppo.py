"""PPO module: KL-shaped rewards, advantages (GAE / RLOO / REINFORCE++), the adaptive KL controller, the EOS penalty,
micro-batch invariance, and the SFT -> RM -> PPO pipeline by paths. The pure losses (gae against a hand-unrolled
example, policy clipping and dual clip, value clipping, masked whitening) are tested in tests/test_losses.py."""

from __future__ import annotations

import math

import pytest
import torch

from src.losses import adaptive_kl_update, masked_mean, masked_var, masked_whiten
from src.modules.ppo import PPO, apply_missing_eos_penalty
from src.modules.reward import score_head
from tests.conftest import FAST, RecordingOptimizer, column, read_metrics


def offline_ppo(tokenizer, perturb: float = 0.0, eos_bias: float | None = None, **kw) -> PPO:
    """A PPO module driven without a Trainer. ``perturb`` moves the policy away from its reference (KL > 0);
    ``eos_bias`` adds a bias to the EOS logit so that some completions end early."""
    torch.manual_seed(0)
    m = PPO(**{"max_new_tokens": 8, **kw})
    m.tokenizer = tokenizer
    m.configure_model()
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn_like(p) * perturb)
        if eos_bias is not None:
            head = m.model.lm_head
            biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
            biased.weight.copy_(head.weight)
            biased.bias.zero_()[tokenizer.eos_token_id] = eos_bias
            m.model.lm_head = biased
    m.manual_backward = lambda loss: loss.backward()
    m.clip_gradients = lambda *a, **k: None
    return m


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=tol, rtol=tol)


def last_index(mask):
    return (mask.shape[-1] - 1) - mask.flip(-1).long().argmax(-1)


# ------------------------------------------------------------------------------------------------ rewards and KL
def test_kl_shaped_rewards_sum_to_score_minus_beta_kl(prompt_batch):
    batch, tok = prompt_batch
    m = offline_ppo(tok, perturb=0.02, kl_coef=0.1, temperature=0.7, num_generations=2)
    buf = m.prepare(m.rollout(batch))
    mask, kl, rewards, scores = buf["mask"], buf["kl"], buf["token_rewards"], buf["rewards"]
    assert kl.abs().sum() > 0 and torch.all(kl[mask == 0] == 0)
    close(kl, (buf["old_logps"] - buf["ref_logps"]) * mask)  # k1 per token
    close(rewards.sum(-1), scores - 0.1 * kl.sum(-1))  # Σ_t r_t = score − β·Σ_t KL_t
    rows, last = torch.arange(len(scores)), last_index(mask)
    close((rewards + 0.1 * kl)[rows, last], scores)  # the score sits on the last real token only
    rest = (rewards + 0.1 * kl).clone()
    rest[rows, last] = 0
    assert torch.all(rest == 0)
    # log-probs are those of softmax(logits / T), the distribution that sampled
    p = buf["prompt_len"]
    with torch.no_grad():
        logits = m.model(input_ids=buf["input_ids"], attention_mask=buf["attention_mask"]).logits[:, p - 1 : -1]
    direct = torch.log_softmax(logits / 0.7, -1).gather(-1, buf["input_ids"][:, p:, None]).squeeze(-1)
    close(buf["old_logps"], direct * mask, tol=1e-4)


def test_missing_eos_penalty_hits_rows_without_eos_only(prompt_batch):
    close(
        apply_missing_eos_penalty(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]), 0.5), [0.5, 2, 2.5]
    )
    batch, tok = prompt_batch
    kw = dict(eos_bias=5.0, num_generations=4, reward_funcs="src.rewards.copy_reward")
    plain = offline_ppo(tok, **kw).rollout(batch)
    penalised = offline_ppo(tok, missing_eos_penalty=1.0, **kw).rollout(batch)
    assert torch.equal(plain["input_ids"], penalised["input_ids"])  # same samples
    truncated = plain["is_truncated"]
    assert truncated.any() and (~truncated).any()
    close(penalised["rewards"][truncated], plain["rewards"][truncated] - 1.0)
    close(penalised["rewards"][~truncated], plain["rewards"][~truncated])


# ------------------------------------------------------------------------------------------------ advantages
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_gae_advantages_are_whitened_over_the_completion_mask(prompt_batch, critic):
    batch, tok = prompt_batch
    m = offline_ppo(tok, perturb=0.02, critic=critic, num_generations=2)
    assert (m.critic is not None) == (critic == "separate") and (m.value_head is not None) == (critic == "shared")
    buf = m.prepare(m.rollout(batch))
    mask, adv = buf["mask"], buf["advantages"]
    close(masked_mean(adv, mask), 0.0)
    close(masked_var(adv, mask), 1.0, tol=1e-4)
    assert torch.all(adv[mask == 0] == 0) and torch.all(buf["returns"][mask == 0] == 0)
    m.hparams.whiten_advantages = False
    raw, returns = m.advantages(buf["token_rewards"], buf["old_values"], mask)
    close(returns, (raw + buf["old_values"]) * mask)
    close(masked_whiten(raw, mask), adv)


def test_rloo_advantages_leave_one_out(prompt_batch):
    batch, tok = prompt_batch
    m = offline_ppo(tok, perturb=0.02, advantage_estimator="rloo", num_generations=4, whiten_advantages=False)
    assert m.critic is None and m.value_head is None  # critic-free
    buf = m.prepare(m.rollout(batch))
    r = buf["token_rewards"].sum(-1).view(-1, 4)  # sequence reward: score − β·ΣKL
    expected = 4 / 3 * (r - r.mean(-1, keepdim=True))  # G/(G−1)·(r − mean)
    loo = r - (r.sum(-1, keepdim=True) - r) / 3  # r_i − mean of the others
    close(expected, loo)
    close(buf["advantages"], expected.reshape(-1, 1) * buf["mask"])
    assert buf["returns"] is None and buf["old_values"] is None
    with pytest.raises(ValueError, match="num_generations"):
        PPO(advantage_estimator="rloo", num_generations=1)


def test_reinforce_pp_whitens_token_returns(prompt_batch):
    batch, tok = prompt_batch
    m = offline_ppo(tok, perturb=0.02, advantage_estimator="reinforce_pp", kl_coef=0.1, num_generations=2)
    buf = m.prepare(m.rollout(batch))
    mask, r = buf["mask"], buf["token_rewards"]
    to_go = r.flip(-1).cumsum(-1).flip(-1) * mask  # γ = 1: Σ_{s ≥ t} r_s
    close(buf["advantages"], masked_whiten(to_go, mask))


# ------------------------------------------------------------------------------------------------ the update
def test_micro_batches_give_the_same_gradient_and_start_on_policy(prompt_batch):
    batch, tok = prompt_batch
    m = offline_ppo(tok, perturb=0.02, num_generations=4, dual_clip=3.0)
    buf = m.prepare(m.rollout(batch))
    opt = RecordingOptimizer(m.optimizer_parameters())
    rows = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    full = m.update(buf, rows, [opt])
    m.hparams.micro_batch_size = 5  # uneven micro-batches: weighted by their share of tokens
    acc = m.update(buf, rows, [opt])
    for key in full:
        close(acc[key], full[key], tol=1e-5)
    for g_full, g_acc in zip(*opt.grads):
        torch.testing.assert_close(g_acc, g_full, atol=1e-6, rtol=1e-4)
    assert full["policy/clipfrac_avg"] == 0 and full["policy/approxkl_avg"] < 1e-10  # ratio 1 before any step
    head = score_head(m.critic).weight
    assert opt.grads[0][[p is head for p in opt.params].index(True)].abs().sum() > 0  # value loss trains the critic


def test_adaptive_kl_controller_module_level(prompt_batch):
    _, tok = prompt_batch
    m = offline_ppo(tok, kl_coef=0.1, kl_target=6.0, kl_horizon=100)
    m.update_kl_coef(torch.tensor(9.0), 16)
    close(m.kl_coef, 0.1 * (1 + 0.2 * 16 / 100))  # error clipped at +0.2
    beta = m.kl_coef
    m.update_kl_coef(torch.tensor(5.4), 16)
    close(m.kl_coef, beta * (1 - 0.1 * 16 / 100))
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    fresh = offline_ppo(tok, kl_coef=0.1, kl_target=6.0, kl_horizon=100)
    fresh.on_load_checkpoint(ckpt)
    assert fresh.kl_coef == m.kl_coef
    fixed = offline_ppo(tok, kl_coef=0.1)
    fixed.update_kl_coef(torch.tensor(100.0), 16)
    assert fixed.kl_coef == 0.1


# ------------------------------------------------------------------------------------------------ CLI runs
PPO_METRICS = [
    "objective/kl",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/kl_coef",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "critic/vf_explained_var",
    "completions/mean_length",
]


def test_adaptive_kl_shared_critic_own_optimizer_and_resume(run_cli, tmp_path):
    args = [
        "fit",
        "--config",
        "ppo.yaml",
        *FAST,
        "--model.init_args.critic=shared",
        "--model.init_args.critic_optimizer=torch.optim.SGD",
        "--model.init_args.critic_optimizer.lr=0.01",
        "--model.init_args.kl_target=1.0",
        "--model.init_args.kl_horizon=64",
        "--model.init_args.kl_coef=0.05",
        "--model.init_args.ppo_epochs=1",
        "--model.init_args.num_mini_batches=1",
        "--model.init_args.missing_eos_penalty=0.5",
        "--model.init_args.dual_clip=3.0",
        "--data.batch_size=8",
    ]
    cli = run_cli([*args, "--trainer.max_steps=6"])  # two optimizers: Lightning counts 2 steps per update
    assert len(cli.trainer.optimizers) == 2 and cli.trainer.global_step == 6
    rows = read_metrics(cli.trainer.logger.log_dir)
    for key in PPO_METRICS:
        assert column(rows, f"train/{key}"), key
    assert column(rows, "val/objective/scores")
    kl, beta = column(rows, "train/objective/kl"), column(rows, "train/objective/kl_coef")
    assert len(kl) == len(beta) == 3 and beta[0] == pytest.approx(0.05)
    for k in range(2):  # β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after every rollout of n = 8
        assert beta[k + 1] == pytest.approx(adaptive_kl_update(beta[k], kl[k], target=1.0, horizon=64, n_steps=8))
    expected = adaptive_kl_update(beta[2], kl[2], target=1.0, horizon=64, n_steps=8)
    assert cli.model.kl_coef == pytest.approx(expected, rel=1e-5)

    ckpt = tmp_path / "ppo.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["kl_coef"] == cli.model.kl_coef
    resumed = run_cli([*args, "--trainer.max_steps=8", f"--ckpt_path={ckpt}"])
    assert resumed.trainer.global_step == 8
    new_rows = read_metrics(resumed.trainer.logger.log_dir)
    assert column(new_rows, "train/objective/kl_coef")[-1] == pytest.approx(cli.model.kl_coef, rel=1e-5)


def test_sft_rm_ppo_pipeline_by_paths(run_cli, tmp_path):
    from src.models import load_causal_lm
    from src.modules.reward import load_reward_model

    run_cli(["fit", "--config", "sft.yaml", *FAST, "--hf_export.dirpath=sft/hf"])
    rm = run_cli(
        [
            "fit",
            "--config",
            "rm.yaml",
            *FAST,
            "--model.init_args.model_name_or_path=sft/hf",
            "--hf_export.dirpath=rm/hf",
        ]
    )
    rm_rows = read_metrics(rm.trainer.logger.log_dir)
    assert column(rm_rows, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # fresh zero head on the SFT model
    ppo = run_cli(
        [
            "fit",
            "--config",
            "ppo.yaml",
            *FAST,
            "--model.init_args.model_name_or_path=sft/hf",
            "--model.init_args.reward_model_path=rm/hf",
            "--model.init_args.reward_funcs=null",
            "--hf_export.dirpath=ppo/hf",
        ]
    )
    sft_model = load_causal_lm(str(tmp_path / "sft/hf"))
    rm_model = load_reward_model(str(tmp_path / "rm/hf"))
    ref = ppo.model.ref_model  # the frozen initial policy = the SFT export
    for a, b in zip(ref.state_dict().values(), sft_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ppo.model.reward_model.state_dict().values(), rm_model.state_dict().values()):
        assert torch.equal(a, b)  # the reward model is the RM export, frozen
    assert ppo.model.critic is not None
    rows = read_metrics(ppo.trainer.logger.log_dir)
    scores, rm_mean = column(rows, "train/objective/scores"), column(rows, "train/rewards/reward_model/mean")
    assert scores and scores == pytest.approx(rm_mean, abs=1e-5)  # the score is the reward model's
    assert (tmp_path / "ppo/hf/config.json").exists()


# ------------------------------------------------------------------------------------------------ unscorable samples
def none_for_rows_1_and_5(prompts, completions, **_):
    return [None if i in (1, 5) else float(len(c) % 5) for i, c in enumerate(completions)]


@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_unscorable_completions_leave_the_update(prompt_batch, estimator):
    """A completion no reward function scores used to get score 0 and enter the baselines; now it has advantage 0,
    no policy or value loss, and the RLOO baseline of its group averages the scorable siblings only."""
    batch, tok = prompt_batch
    m = offline_ppo(
        tok, perturb=0.02, num_generations=4, advantage_estimator=estimator, reward_funcs=[none_for_rows_1_and_5]
    )
    with pytest.warns(UserWarning, match="All reward functions returned None"):
        buf = m.prepare(m.rollout(batch))
    scores, mask, loss_mask = buf["rewards"], buf["mask"], buf["loss_mask"]
    assert scores[[1, 5]].isnan().all() and torch.isfinite(buf["token_rewards"]).all()
    assert torch.all(loss_mask[[1, 5]] == 0) and torch.equal(loss_mask[[0, 2, 3, 4]], mask[[0, 2, 3, 4]])
    assert torch.all(buf["advantages"][[1, 5]] == 0) and torch.isfinite(buf["advantages"]).all()
    if estimator == "rloo":
        m.hparams.whiten_advantages = False
        raw, _ = m.advantages(buf["token_rewards"], None, loss_mask, ~scores.isnan())
        r = buf["token_rewards"].sum(-1)
        for rows in ([0, 2, 3], [4, 6, 7]):
            sub = r[rows]
            close(raw[rows].sum(-1) / loss_mask[rows].sum(-1), sub - (sub.sum() - sub) / 2)
    stats = m.update(buf, torch.arange(16), [RecordingOptimizer(m.optimizer_parameters())])
    assert all(torch.isfinite(v) for v in stats.values())


def test_whiten_rewards_whitens_token_rewards_keeping_their_mean(prompt_batch):
    batch, tok = prompt_batch
    kw = dict(perturb=0.02, num_generations=2, kl_coef=0.1)
    plain = offline_ppo(tok, **kw).prepare(offline_ppo(tok, **kw).rollout(batch))
    m = offline_ppo(tok, whiten_rewards=True, **kw)
    buf = m.prepare(m.rollout(batch))
    mask = buf["mask"]
    raw = plain["token_rewards"]
    close(buf["token_rewards"], masked_whiten(raw, mask, shift_mean=False))
    close(masked_mean(buf["token_rewards"], mask), masked_mean(raw, mask))
    close(masked_var(buf["token_rewards"], mask), 1.0, tol=1e-4)
    close(buf["kl"], plain["kl"])  # the KL itself (and objective/* metrics) is not whitened
