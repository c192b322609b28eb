# Cells of 03_policy_gradient_to_ppo.ipynb (built by _build.py). ("md" | "code", source)

CELLS = [
    ("md", r"""
# 03 · From the policy gradient to PPO

The notes' third idea: optimise the policy $\pi_\theta(a\mid s)$ *directly*, following

$$\nabla_\theta J(\theta) = \mathbb{E}_{\pi_\theta}\big[Q^{\pi_\theta}(s, a)\,\nabla_\theta \log\pi_\theta(a\mid s)\big].$$

This notebook walks from that formula to the PPO losses an RLHF trainer actually uses:

1. **REINFORCE** on a multi-armed bandit, and why subtracting a **baseline** matters (variance, measured);
2. the **PPO clipped objective** and its "working mechanism" from the notes, plotted with the project's
   `src.losses.ppo_policy_loss`;
3. the clipped **value loss** (`src.losses.ppo_value_loss`) and **GAE** (`src.losses.gae`), checked against
   hand computations, including padding;
4. the notes' `PPOTrainer` — which never sets its value loss — and a fixed version;
5. PPO training on the bandit.

All losses come from the package (`src/losses.py`); the notebook only re-derives them to check them.
"""),
    ("code", r"""
%matplotlib inline
import sys
import pathlib

# make `import src` work without `pip install -e .`: the kernel starts in notebooks/, the package is one level up
try:
    import src  # noqa: F401
except ImportError:
    sys.path.insert(0, str(pathlib.Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
import torch

from src.losses import gae, masked_whiten, ppo_policy_loss, ppo_value_loss

torch.set_num_threads(1)
torch.set_printoptions(precision=4, sci_mode=False)
"""),
    ("md", r"""
## 1. REINFORCE on a bandit

A bandit is a one-step MDP: a single state, $K$ actions ("arms"), and a noisy reward $r \sim \mathcal{N}(\mu_a, 1)$.
Then $Q^{\pi}(s,a) = \mu_a$ and the objective is the expected reward $J(\theta) = \sum_a \pi_\theta(a)\,\mu_a$.

The policy is a softmax over logits $\theta \in \mathbb{R}^K$, so $\nabla_\theta \log \pi_\theta(a) = e_a - \pi_\theta$
and the exact gradient is $\nabla J = \sum_a \pi(a)\,\mu_a\,(e_a - \pi)$.

**REINFORCE** replaces the expectation by samples: draw $a_i \sim \pi_\theta$, observe $r_i$, and use
$\hat g = \frac1N\sum_i r_i\,\nabla_\theta\log\pi_\theta(a_i)$. In code one never writes $\hat g$ by hand; one
writes a *surrogate loss* whose gradient is $-\hat g$, namely $-\frac1N\sum_i r_i \log\pi_\theta(a_i)$ — the same
trick every LLM trainer uses, with $\log\pi_\theta$ summed over the tokens of a completion.

The rewards here sit around 11, like the raw scores of a reward model that never centres its outputs.
"""),
    ("code", r"""
mu = torch.tensor([11.0, 11.5, 12.0, 11.2, 10.8])  # mean reward of each arm; arm 2 is best
K, SIGMA = len(mu), 1.0


def pull(arms, generator):
    return mu[arms] + SIGMA * torch.randn(arms.shape, generator=generator)


def exact_gradient(theta):
    pi = torch.softmax(theta, -1)
    return pi * (mu - pi @ mu)  # sum_a pi(a) mu_a (e_a - pi)


theta = torch.zeros(K, requires_grad=True)
g = torch.Generator().manual_seed(0)
arms = torch.multinomial(torch.softmax(theta, -1).detach(), 8, replacement=True, generator=g)
rewards = pull(arms, g)

surrogate = -(rewards * torch.log_softmax(theta, -1)[arms]).mean()
surrogate.backward()
by_hand = (rewards[:, None] * (torch.eye(K)[arms] - torch.softmax(theta, -1).detach())).mean(0)
print("autograd of the surrogate:", -theta.grad)
print("closed form g-hat        :", by_hand)
assert torch.allclose(-theta.grad, by_hand, atol=1e-6)
"""),
    ("md", r"""
### The baseline: same expectation, far less variance

Because $\sum_a \pi(a)\,\nabla\log\pi(a) = \sum_a \nabla\pi(a) = \nabla 1 = 0$, subtracting any action-independent
baseline $b$ leaves the expected gradient unchanged:
$\mathbb{E}[(r-b)\nabla\log\pi(a)] = \mathbb{E}[r\,\nabla\log\pi(a)]$. With $b = V^\pi = \mathbb{E}_\pi[r]$ the weight
becomes the **advantage** $A(s,a) = Q^\pi(s,a) - V^\pi(s)$, which is what PPO, GRPO and friends multiply
$\nabla\log\pi$ by.

Measured: 20,000 single-sample gradient estimates at the uniform policy, with and without the baseline.
"""),
    ("code", r"""
theta0 = torch.zeros(K)
pi0 = torch.softmax(theta0, -1)
score = torch.eye(K) - pi0  # row a: grad log pi(a) = e_a - pi
assert torch.allclose(pi0 @ score, torch.zeros(K), atol=1e-7)  # E_pi[grad log pi] = 0

g = torch.Generator().manual_seed(1)
M = 20_000
arms = torch.multinomial(pi0, M, replacement=True, generator=g)
r = pull(arms, g)
V = pi0 @ mu  # the baseline b = V^pi = expected reward
estimates = {"no baseline": r[:, None] * score[arms], "baseline b = V": (r - V)[:, None] * score[arms]}
true_grad = exact_gradient(theta0)
variance = {}
for name, est in estimates.items():
    mean, se = est.mean(0), est.std(0) / M**0.5
    variance[name] = est.var(0).sum().item()  # total variance (trace of the covariance)
    print(f"{name:>15}: mean = {mean.numpy().round(3)}  total variance = {variance[name]:8.3f}")
    assert torch.all((mean - true_grad).abs() < 5 * se), "both estimators are unbiased"
print(f"{'exact':>15}: {true_grad.numpy().round(3)}")
print(f"variance reduction: x{variance['no baseline'] / variance['baseline b = V']:.0f}")
assert variance["baseline b = V"] < variance["no baseline"] / 20
"""),
    ("md", r"""
### Training with and without the baseline

Ten independent runs of each (the ten seeds are run as one batch of ten policies), plain SGD with the same step
size, 16 pulls per step; the baseline is the batch's mean reward. Without it, every sampled arm gets pushed up by
a reward of about 11, and only the small differences between arms carry information: the runs wander.
"""),
    ("code", r"""
def reinforce(use_baseline, n_runs=10, steps=200, n_samples=16, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.zeros(n_runs, K, requires_grad=True)  # one row per independent run
    opt = torch.optim.SGD([theta], lr=lr)
    curve = []
    for _ in range(steps):
        pi = torch.softmax(theta, -1)
        curve.append((pi.detach() @ mu).numpy())  # exact expected reward J(theta) of each run
        arms = torch.multinomial(pi.detach(), n_samples, replacement=True, generator=g)
        r = pull(arms, g)
        b = r.mean(1, keepdim=True) if use_baseline else 0.0
        logp = torch.log_softmax(theta, -1).gather(1, arms)
        loss = -((r - b) * logp).mean(1).sum()  # REINFORCE surrogate, summed over the independent runs
        opt.zero_grad()
        loss.backward()
        opt.step()
    return np.array(curve)  # [steps, n_runs]


curves = {"no baseline": reinforce(False), "baseline (batch mean)": reinforce(True)}
fig, ax = plt.subplots(figsize=(6, 3.5))
for (name, c), color in zip(curves.items(), ["tab:orange", "tab:blue"]):
    ax.plot(c, color=color, alpha=0.3, lw=0.8)
    ax.plot(c.mean(1), color=color, lw=2, label=f"{name} (mean of 10 runs)")
ax.axhline(mu.max(), color="k", ls="--", lw=1, label="best arm")
ax.set_xlabel("SGD step")
ax.set_ylabel(r"expected reward $J(\theta)$")
ax.legend()
plt.show()

final = {name: c[-1] for name, c in curves.items()}
for name, f in final.items():
    print(f"{name:>22}: final J = {f.mean():.3f} +- {f.std():.3f} across runs")
assert final["baseline (batch mean)"].std() < final["no baseline"].std() / 3
assert final["baseline (batch mean)"].mean() > 11.6  # up from 11.3 at the uniform policy
"""),
    ("md", r"""
## 2. PPO's clipped objective

With a language model, sampling is the expensive part, so one would like to take *several* gradient steps on each
batch of samples. But the batch was drawn from the old policy $\pi_{\theta_\text{old}}$; PPO corrects with the
probability ratio and, to keep the new policy close to the old one, clips it. From the notes:

$$L^{CLIP}(\theta) = \hat{\mathbb{E}}_t\Big[\min\big(r_t(\theta)\hat{A}_t,\ \text{clip}(r_t(\theta), 1 - \epsilon, 1 + \epsilon)\hat{A}_t\big)\Big],
\qquad r_t(\theta) = \frac{\pi_\theta(a_t\mid s_t)}{\pi_{\theta_{\text{old}}}(a_t\mid s_t)} .$$

The "working mechanism" in the notes:

* $\hat A_t > 0$ (a good action): the objective rewards increasing $r_t$, but only up to $1+\epsilon$; beyond it the
  objective is flat, so the gradient is zero.
* $\hat A_t < 0$ (a bad action): the objective rewards decreasing $r_t$, but only down to $1-\epsilon$.

The `min` makes the objective *pessimistic*: clipping only ever removes the incentive to move further, never the
penalty for having moved the wrong way (for $\hat A<0$ and $r>1+\epsilon$ the unclipped, steeper term stays active).
The optional **dual clip** (Ye et al. 2020) additionally caps that penalty at $c\,|\hat A|$ for very large ratios.

Below, `ppo_policy_loss` — which returns the *loss* $-L^{CLIP}$, a masked mean — is evaluated one ratio at a time
($r = e^{\log\pi - \log\pi_\text{old}}$ with $\log\pi_\text{old}=0$), and compared with the formula.
"""),
    ("code", r"""
EPS = 0.2
ratios = torch.linspace(0.01, 3.5, 350, dtype=torch.float64)
logps = ratios.log().reshape(-1, 1).requires_grad_(True)  # [N, T=1]
old_logps = torch.zeros_like(logps)
mask = torch.ones_like(logps)


def objective_curve(adv, dual_clip=None):
    # -ppo_policy_loss for each ratio separately, and d objective / d log pi
    advantages = torch.full_like(old_logps, adv)
    losses = torch.stack([
        ppo_policy_loss(logps[i : i + 1], old_logps[i : i + 1], advantages[i : i + 1], mask[i : i + 1],
                        clip_eps=EPS, dual_clip=dual_clip)[0]
        for i in range(len(ratios))
    ])
    (grad,) = torch.autograd.grad(-losses.sum(), logps)
    return -losses.detach(), grad.squeeze(1)


curves = {}
for adv in (+1.0, -1.0):
    objective, grad = objective_curve(adv)
    by_formula = torch.minimum(ratios * adv, ratios.clamp(1 - EPS, 1 + EPS) * adv)
    assert torch.allclose(objective, by_formula, atol=1e-12)  # the library's loss is exactly -L^CLIP
    # the mechanism: zero gradient exactly where clipping removes the incentive
    away = ((ratios - (1 + EPS)).abs() > 1e-6) & ((ratios - (1 - EPS)).abs() > 1e-6)
    flat = (ratios > 1 + EPS) if adv > 0 else (ratios < 1 - EPS)
    assert torch.all(grad[flat & away] == 0) and torch.all(grad[~flat & away] != 0)
    curves[adv] = objective
dual_objective, _ = objective_curve(-1.0, dual_clip=3.0)
assert torch.allclose(dual_objective, torch.maximum(curves[-1.0], torch.tensor(-3.0, dtype=torch.float64)))

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharex=True)
for ax, adv in zip(axes, (+1.0, -1.0)):
    ax.plot(ratios, ratios * adv, ":", color="gray", label=r"unclipped $rA$")
    ax.plot(ratios, curves[adv], lw=2.5,
            label=r"$\min(rA,\ \mathrm{clip}(r,1-\epsilon,1+\epsilon)A)$ (ppo_policy_loss)")
    ax.axvspan(1 - EPS, 1 + EPS, color="tab:green", alpha=0.12, label=r"trust region $[1-\epsilon, 1+\epsilon]$")
    ax.set_xlabel(r"ratio $r = \pi_\theta / \pi_{\theta_\mathrm{old}}$")
    flat_where = "r > 1+eps" if adv > 0 else "r < 1-eps"
    ax.set_title(f"A = {adv:+.0f}: flat (no gradient) for {flat_where}")
axes[1].plot(ratios, dual_objective, "--", color="tab:red", label="with dual_clip = 3")
axes[0].set_ylabel("objective (= -loss)")
for ax in axes:
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
"""),
    ("md", r"""
## 3. The value loss and GAE

PPO's advantages come from a learned **critic** $V_\phi$. Its loss, from the notes, is a squared error to the
returns, optionally clipped around the old values so that the critic, too, moves only a little per batch:

$$L^{V} = \tfrac12\,\hat{\mathbb{E}}_t\Big[\max\big((V_t - R_t)^2,\ (V^{\text{old}}_t + \text{clip}(V_t - V^{\text{old}}_t, -\epsilon, \epsilon) - R_t)^2\big)\Big].$$

`ppo_value_loss` includes the factor $\tfrac12$ (the TRL / OpenAI-baselines convention); the notes' `ValueLoss`
does not, and its trainer multiplies by 0.5 instead — the same total.

The advantages themselves come from **generalized advantage estimation** (Schulman et al. 2016):
$\delta_t = r_t + \gamma V_{t+1} - V_t$ and $\hat A_t = \delta_t + \gamma\lambda \hat A_{t+1}$, i.e.
$\hat A_t = \sum_{l\ge0} (\gamma\lambda)^l\,\delta_{t+l}$, with $V$ and $\hat A$ zero after the last real token.
Two limits are worth knowing: $\lambda=0$ gives the one-step TD error $\delta_t$ (low variance, biased by the critic),
and $\gamma=\lambda=1$ gives the Monte Carlo **reward-to-go minus the value** (unbiased, high variance):
$\hat A_t = \sum_{k\ge t} r_k - V_t$.

The toy batch below has three completions of different lengths, right-padded to $T=6$. The padding holds `nan`:
the library must never let it leak (nothing in the notes masks padding).
"""),
    ("code", r"""
g = torch.Generator().manual_seed(0)
lengths = torch.tensor([6, 3, 4])
B, T = len(lengths), 6
mask = (torch.arange(T) < lengths[:, None]).float()
rewards = 0.1 * torch.randn(B, T, generator=g)  # e.g. per-token KL penalties ...
rewards[torch.arange(B), lengths - 1] += torch.tensor([1.0, -0.5, 2.0])  # ... plus the score on the last token
values = torch.randn(B, T, generator=g)
rewards = rewards.masked_fill(mask == 0, float("nan"))  # padding is garbage
values = values.masked_fill(mask == 0, float("nan"))
print("mask:\n", mask)

# gamma = lambda = 1: reward-to-go minus value
adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
r0, v0 = rewards.nan_to_num(0.0), values.nan_to_num(0.0)
reward_to_go = r0.flip(1).cumsum(1).flip(1)  # sum_{k >= t} r_k (padding contributes 0)
expected = (reward_to_go - v0) * mask
print("advantages (gamma=lambda=1):\n", adv)
assert torch.allclose(adv, expected, atol=1e-6)
assert torch.allclose(returns, reward_to_go * mask, atol=1e-6)  # returns = A + V = reward-to-go
assert not torch.isnan(adv).any() and not torch.isnan(returns).any()

# lambda = 0: one-step TD errors
next_v = torch.cat([v0[:, 1:], torch.zeros(B, 1)], 1) * torch.cat([mask[:, 1:], torch.zeros(B, 1)], 1)
adv0, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
assert torch.allclose(adv0, (r0 + next_v - v0) * mask, atol=1e-6)

# general gamma, lambda: the discounted sum of TD errors
gamma, lam = 0.99, 0.95
delta = (r0 + gamma * next_v - v0) * mask
by_sum = torch.stack([sum((gamma * lam) ** (k - t) * delta[:, k] for k in range(t, T)) for t in range(T)], 1)
adv_gl, _ = gae(rewards, values, mask, gamma=gamma, lam=lam)
assert torch.allclose(adv_gl, by_sum * mask, atol=1e-6)
print("gae matches reward-to-go - V (gamma=lambda=1), the TD error (lambda=0) and sum (gamma*lambda)^l delta")
"""),
    ("code", r"""
old_values = v0 + 0.3 * torch.randn(B, T, generator=g) * mask
new_values = (old_values + torch.tensor([0.5, -0.1, 0.05])[:, None]) * mask  # row 0 moved by more than eps
vloss, vmetrics = ppo_value_loss(new_values, old_values, returns, mask, clip_eps=0.2)

clipped = old_values + (new_values - old_values).clamp(-0.2, 0.2)
per_token = torch.maximum((new_values - returns) ** 2, (clipped - returns) ** 2)
by_hand = 0.5 * per_token[mask.bool()].mean()  # mean over the 13 real tokens only
print(f"ppo_value_loss = {vloss:.6f}   by hand = {by_hand:.6f}   vf_clipfrac = {vmetrics['vf_clipfrac']:.3f}")
assert torch.allclose(vloss, by_hand, atol=1e-6)
"""),
    ("md", r"""
## 4. The notes' `PPOTrainer`, and a fixed version

The notes' policy and value losses are right for unpadded tensors, but their trainer assigns the *policy* loss
attribute twice and never creates `value_loss_fn`:

```python
class PPOTrainer:
    def __init__(self):
        self.policy_loss_fn = PolicyLoss(clip_eps=0.2)
        self.policy_loss_fn = ValueLoss(clip_eps=0.2)   # BUG: meant self.value_loss_fn
```

Two consequences: `policy_loss_fn` is now a `ValueLoss`, so the "actor loss" silently computes
$(\log\pi - \hat A)^2$-style nonsense from `(log_probs, old_log_probs, advantages)`; and `compute_total_loss` then
crashes on `self.value_loss_fn`. We reproduce the notes' classes verbatim (comments translated) and watch it fail.
"""),
    ("code", r"""
import torch.nn as nn


# ---- the notes' code, verbatim apart from translated comments ----
class PolicyLoss(nn.Module):
    def __init__(self, clip_eps: float = 0.2):
        super().__init__()
        self.clip_eps = clip_eps

    def forward(self, log_probs, old_log_probs, advantages):
        ratio = (log_probs - old_log_probs).exp()
        surr1 = ratio * advantages
        surr2 = torch.clamp(ratio, 1 - self.clip_eps, 1 + self.clip_eps) * advantages
        return -torch.min(surr1, surr2).mean()  # .mean() over every position, padding included


class ValueLoss(nn.Module):
    def __init__(self, clip_eps: float = None):
        super().__init__()
        self.clip_eps = clip_eps

    def forward(self, values, old_values, returns):
        loss = (values - returns) ** 2
        if self.clip_eps is not None:
            values_clipped = old_values + torch.clamp(values - old_values, -self.clip_eps, self.clip_eps)
            loss_clipped = (values_clipped - returns) ** 2
            loss = torch.max(loss, loss_clipped)
        return loss.mean()


class NotesPPOTrainer:
    def __init__(self):
        self.policy_loss_fn = PolicyLoss(clip_eps=0.2)
        self.policy_loss_fn = ValueLoss(clip_eps=0.2)  # the bug: value_loss_fn is never set

    def compute_total_loss(self, batch):
        policy_loss = self.policy_loss_fn(batch["log_probs"], batch["old_log_probs"], batch["advantages"])
        value_loss = self.value_loss_fn(batch["values"], batch["old_values"], batch["returns"])
        total_loss = policy_loss + 0.5 * value_loss
        return {"total_loss": total_loss, "policy_loss": policy_loss, "value_loss": value_loss}


# an unpadded toy batch (the notes have no mask)
g = torch.Generator().manual_seed(3)
batch = {
    "log_probs": -torch.rand(4, 5, generator=g),
    "old_log_probs": -torch.rand(4, 5, generator=g),
    "advantages": torch.randn(4, 5, generator=g),
    "values": torch.randn(4, 5, generator=g),
    "old_values": torch.randn(4, 5, generator=g),
    "returns": torch.randn(4, 5, generator=g),
}
trainer = NotesPPOTrainer()
print("type(trainer.policy_loss_fn) =", type(trainer.policy_loss_fn).__name__)
assert isinstance(trainer.policy_loss_fn, ValueLoss)
try:
    trainer.compute_total_loss(batch)
    raise AssertionError("expected the notes' trainer to fail")
except AttributeError as err:
    print("AttributeError:", err)
"""),
    ("md", r"""
The fix sets both losses, passes a `mask` so that padding is ignored, and takes the losses from `src.losses`.
`vf_coef=1.0` reproduces the notes' weighting (their `0.5 *` is already inside `ppo_value_loss`); TRL's PPO
default is `vf_coef=0.1`.
"""),
    ("code", r"""
class PPOLoss:
    # the notes' PPOTrainer.compute_total_loss, fixed: both losses set, padding masked, losses from src.losses
    def __init__(self, clip_eps=0.2, value_clip_eps=0.2, vf_coef=1.0):
        self.clip_eps, self.value_clip_eps, self.vf_coef = clip_eps, value_clip_eps, vf_coef

    def __call__(self, batch):
        policy_loss, policy_metrics = ppo_policy_loss(
            batch["logps"], batch["old_logps"], batch["advantages"], batch["mask"], clip_eps=self.clip_eps)
        value_loss, value_metrics = ppo_value_loss(
            batch["values"], batch["old_values"], batch["returns"], batch["mask"], clip_eps=self.value_clip_eps)
        return {"total_loss": policy_loss + self.vf_coef * value_loss, "policy_loss": policy_loss,
                "value_loss": value_loss, **policy_metrics, **value_metrics}


ppo_loss = PPOLoss()
ours = ppo_loss({"logps": batch["log_probs"], "old_logps": batch["old_log_probs"], "mask": torch.ones(4, 5),
                 **{k: batch[k] for k in ("advantages", "values", "old_values", "returns")}})

# on an unpadded batch the fixed trainer equals what the notes *meant*: both notes' losses, correctly assigned
meant = PolicyLoss(0.2)(batch["log_probs"], batch["old_log_probs"], batch["advantages"]) + 0.5 * ValueLoss(0.2)(
    batch["values"], batch["old_values"], batch["returns"])
print(f"fixed total loss = {ours['total_loss']:.6f}   notes' intended total = {meant:.6f}")
assert torch.allclose(ours["total_loss"], meant, atol=1e-6)

# with padding the notes' .mean() averages over pad positions too; the masked loss uses real tokens only
pad_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).float()
masked, _ = ppo_policy_loss(batch["log_probs"], batch["old_log_probs"], batch["advantages"], pad_mask)
notes_on_real = PolicyLoss(0.2)(*(batch[k][pad_mask.bool()] for k in ("log_probs", "old_log_probs", "advantages")))
notes_with_pad = PolicyLoss(0.2)(batch["log_probs"], batch["old_log_probs"], batch["advantages"])
print(f"masked: {masked:.4f}   notes on real tokens: {notes_on_real:.4f}   notes incl. padding: {notes_with_pad:.4f}")
assert torch.allclose(masked, notes_on_real, atol=1e-6) and not torch.allclose(masked, notes_with_pad, atol=1e-3)
"""),
    ("md", r"""
## 5. PPO on the bandit

Putting it together on the bandit of section 1 (rewards around 11). One PPO iteration:

1. **rollout**: sample 64 arms from $\pi_{\theta_\text{old}}$, record $\log\pi_{\theta_\text{old}}(a)$, the critic's
   value and the rewards — each pull is a "sequence" of $T=1$ token;
2. **advantages**: `gae` ($\gamma=\lambda=1$, so $\hat A = r - V$), then whitened with `masked_whiten` (TRL's default;
   it makes the step size independent of the reward scale);
3. **optimisation**: 4 epochs over 4 minibatches of 16 with the fixed `PPOLoss` — sixteen gradient steps on
   one batch of samples, which is exactly what the clipping makes safe.

The critic is a single number $V$ (a bandit has one state), initialised at 0, which should learn the expected
reward; it uses the notes' value clipping ($\epsilon_V = 0.2$).
"""),
    ("code", r"""
def train_ppo(iterations=40, n_samples=64, epochs=4, minibatch=16, lr=0.05, critic_lr=0.5, value_clip_eps=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.zeros(K, requires_grad=True)  # actor: logits over arms
    v = torch.zeros(1, requires_grad=True)  # critic: the value of the single state
    # Adam moves each parameter by about lr per step: give the critic, which must climb to ~11, a larger one
    opt = torch.optim.Adam([{"params": [theta], "lr": lr}, {"params": [v], "lr": critic_lr}])
    loss_fn = PPOLoss(clip_eps=0.2, value_clip_eps=value_clip_eps, vf_coef=1.0)
    log = {"J": [], "V": [], "p_best": [], "clipfrac": [], "approxkl": []}
    for _ in range(iterations):
        with torch.no_grad():  # ---- rollout ----
            pi = torch.softmax(theta, -1)
            log["J"].append((pi @ mu).item())
            log["V"].append(v.item())
            log["p_best"].append(pi[mu.argmax()].item())
            arms = torch.multinomial(pi, n_samples, replacement=True, generator=g)
            rewards = pull(arms, g)[:, None]  # [B, T=1]
            mask = torch.ones_like(rewards)
            old_logps = torch.log_softmax(theta, -1)[arms][:, None]
            old_values = v.expand(n_samples)[:, None].clone()
            advantages, returns = gae(rewards, old_values, mask, gamma=1.0, lam=1.0)
            advantages = masked_whiten(advantages, mask)
        stats = []
        for _ in range(epochs):  # ---- several optimisation epochs on the same samples ----
            for idx in torch.randperm(n_samples, generator=g).split(minibatch):
                out = loss_fn({
                    "logps": torch.log_softmax(theta, -1)[arms[idx]][:, None],
                    "old_logps": old_logps[idx], "advantages": advantages[idx], "mask": mask[idx],
                    "values": v.expand(len(idx))[:, None], "old_values": old_values[idx], "returns": returns[idx],
                })
                opt.zero_grad()
                out["total_loss"].backward()
                opt.step()
                stats.append((out["clipfrac"].item(), out["approxkl"].item()))
        log["clipfrac"].append(np.mean([s[0] for s in stats]))
        log["approxkl"].append(np.mean([s[1] for s in stats]))
    return {k: np.array(x) for k, x in log.items()}


log = train_ppo()
print(f"expected reward: {log['J'][0]:.3f} -> {log['J'][-1]:.3f}  (best arm: {mu.max():.1f}); "
      f"P(best arm) = {log['p_best'][-1]:.3f}; critic V = {log['V'][-1]:.2f}")
assert log["J"][-1] > log["J"][0] + 0.5  # 11.3 at the uniform start -> close to 12
assert log["p_best"][-1] > 0.9
assert abs(log["V"][-10:].mean() - log["J"][-1]) < 0.15  # the critic has learned the expected reward

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
axes[0].plot(log["J"], label=r"expected reward $J(\theta)$")
axes[0].plot(log["V"], label=r"critic $V$")
axes[0].axhline(mu.max(), color="k", ls="--", lw=1, label="best arm")
axes[0].set_ylim(10.5, 12.3)
axes[0].set_xlabel("PPO iteration")
axes[0].legend()
axes[1].plot(log["clipfrac"], label="clipfrac")
axes[1].plot(log["approxkl"], label="approxkl")
axes[1].set_xlabel("PPO iteration")
axes[1].set_title("how far each iteration moved the policy")
axes[1].legend()
plt.tight_layout()
plt.show()
"""),
    ("md", r"""
The critic starts at 0 and reaches the reward scale within a few iterations (off the bottom of the left panel at
first); meanwhile whitening, which subtracts the batch mean, doubles as the baseline, so the policy does not wait
for it. The right panel shows the policy clipping at work: a sizeable fraction of clipped tokens while the policy
moves, next to none once it has converged. (Value clipping, unlike the ratio clip, depends on the reward scale;
PPO implementations therefore normalise rewards, and ablations such as Engstrom et al. 2020 and Andrychowicz et
al. 2021 found little benefit from it.)
"""),
    ("md", r"""
## Takeaways

* The policy gradient needs only $\nabla\log\pi$ of sampled actions times a weight; subtracting a baseline keeps it
  unbiased and, with rewards far from zero, cuts its variance by orders of magnitude.
* PPO's clipped ratio lets one batch of samples be reused for several gradient steps: outside
  $[1-\epsilon, 1+\epsilon]$ the incentive to move further vanishes (zero gradient), the penalty for moving the wrong
  way does not.
* `gae` interpolates between the TD error ($\lambda=0$) and reward-to-go minus value ($\gamma=\lambda=1$); every loss
  here masks padding, which the notes' code does not.
* The notes' trainer never sets `value_loss_fn` (and overwrites `policy_loss_fn` with a value loss); `PPOLoss` above
  is the fixed version.

**Notebook 04** drops the critic and the sampling loop: DPO learns from preference pairs directly, and GRPO replaces
the critic by group-relative advantages.
"""),
]
