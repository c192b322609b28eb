# Cells of 04_dpo_and_grpo_losses.ipynb (built by _build.py). ("md" | "code", source)

CELLS = [
    ("md", r"""
# 04 · DPO and GRPO losses, and the KL estimators behind them

The last two algorithms of the notes remove pieces of the PPO machinery of notebook 03:

* **DPO** removes the reward model *and* the sampling loop: it trains on preference pairs with a classification-like
  loss whose "logit" is an **implicit reward** $\beta \log \frac{\pi_\theta}{\pi_\text{ref}}$.
* **GRPO** keeps sampling but removes the critic: the advantage of a completion is its reward relative to the
  other completions of the same prompt, and the KL to the reference model becomes an explicit loss term.

Everything is computed with the project's `src.losses` (`dpo_loss`, `group_advantages`, `grpo_loss`, `kl_estimate`,
`token_logps`). Where the notes' code differs — its GRPO has no completion mask, no KL term and no per-sequence
length normalisation, and uses `F` without importing it — the notes' version is reproduced, clearly labelled, and
compared numerically.
"""),
    ("code", r"""
%matplotlib inline
import math
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
import torch.nn as nn
import torch.nn.functional as F

from src.losses import dpo_loss, group_advantages, grpo_loss, kl_estimate, token_logps

torch.set_num_threads(1)
torch.set_printoptions(precision=4, sci_mode=False)
"""),
    ("md", r"""
## Part 1 · DPO

From the notes: the RLHF objective "maximise reward, stay close to $\pi_\text{ref}$ (KL weight $\beta$)" has the
closed-form optimum $\pi^*(y\mid x) \propto \pi_\text{ref}(y\mid x)\,e^{r(x,y)/\beta}$. Solving for the reward,
$r(x,y) = \beta \log\frac{\pi^*(y|x)}{\pi_\text{ref}(y|x)} + \text{const}(x)$, and substituting it into the
Bradley–Terry preference model turns reward learning into a binary cross-entropy on the policy itself:

$$\mathcal{L}_{\text{DPO}} = -\,\mathbb{E}_{(x, y_w, y_l)}\Big[\log \sigma\Big(\beta \log \frac{\pi_\theta(y_w | x)}{\pi_{\text{ref}}(y_w | x)} - \beta \log \frac{\pi_\theta(y_l | x)}{\pi_{\text{ref}}(y_l | x)}\Big)\Big].$$

Notation used below: $c = \log\frac{\pi_\theta(y_w)}{\pi_\text{ref}(y_w)}$, $r = \log\frac{\pi_\theta(y_l)}{\pi_\text{ref}(y_l)}$
(sequence log-probabilities, i.e. sums over completion tokens), the log-ratio margin $h = c - r$, and the implicit
rewards $\beta c$ (chosen) and $\beta r$ (rejected).

The notes' `DPOLoss` is correct; we check `src.losses.dpo_loss` against it (the library returns per-pair losses,
the notes their mean), and the textbook fact that at $\pi_\theta = \pi_\text{ref}$ every pair costs $\ln 2$.
"""),
    ("code", r"""
# ---- the notes' DPOLoss, verbatim apart from translated comments ----
class DPOLoss(nn.Module):
    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        pi_logratios = policy_chosen_logps - policy_rejected_logps
        ref_logratios = reference_chosen_logps - reference_rejected_logps
        logits = pi_logratios - ref_logratios
        losses = (-F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
                  - F.logsigmoid(-self.beta * logits) * self.label_smoothing)
        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        return losses.mean(), chosen_rewards, rejected_rewards


g = torch.Generator().manual_seed(0)
n_pairs = 6
ref_chosen, ref_rejected = -40 + 5 * torch.randn(n_pairs, generator=g), -45 + 5 * torch.randn(n_pairs, generator=g)
pol_chosen = ref_chosen + 2 * torch.randn(n_pairs, generator=g)  # a policy that has moved away from the reference
pol_rejected = ref_rejected + 2 * torch.randn(n_pairs, generator=g)

for beta, ls in [(0.1, 0.0), (0.5, 0.2)]:
    losses, chosen_rewards, rejected_rewards = dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected,
                                                        beta=beta, loss_type="sigmoid", label_smoothing=ls)
    notes_loss, notes_chosen, notes_rejected = DPOLoss(beta, ls)(pol_chosen, pol_rejected, ref_chosen, ref_rejected)
    assert torch.allclose(losses.mean(), notes_loss, atol=1e-6)
    assert torch.allclose(chosen_rewards, notes_chosen) and torch.allclose(rejected_rewards, notes_rejected)
print("per-pair losses:", losses)
print("implicit rewards, chosen  :", chosen_rewards)
print("implicit rewards, rejected:", rejected_rewards)
print("reward accuracy (chosen > rejected):", (chosen_rewards > rejected_rewards).float().mean().item())

# at policy = reference every log-ratio is 0: loss = -log sigmoid(0) = ln 2, whatever beta
for beta in (0.01, 0.1, 1.0):
    losses0, c0, r0 = dpo_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected, beta=beta)
    assert torch.allclose(losses0, torch.full_like(losses0, math.log(2)), atol=1e-6)
    assert torch.all(c0 == 0) and torch.all(r0 == 0)
print(f"at policy = reference: loss = {losses0[0]:.6f} = ln 2 = {math.log(2):.6f}")
"""),
    ("md", r"""
### β and label smoothing

* **β** sets how many nats of log-ratio margin it takes to saturate the sigmoid: the gradient with respect to the
  margin, $-\beta\,\sigma(-\beta h)$, is $-\beta/2$ at the start and dies off once $h \gg 1/\beta$. Small β
  tolerates (and needs) a large departure from the reference; large β keeps the policy close.
* **Label smoothing** $\varepsilon$ (conservative DPO, "cDPO") assumes each label is flipped with probability
  $\varepsilon$: the target becomes a soft label, and the loss $-(1-\varepsilon)\log\sigma(\beta h) -
  \varepsilon\log\sigma(-\beta h)$ is minimised at a *finite* margin $h^* = \frac1\beta \log\frac{1-\varepsilon}{\varepsilon}$ instead
  of pushing $h\to\infty$. The `robust` variant (rDPO) uses the same $\varepsilon$ differently: it is an unbiased
  estimate of the clean loss under label noise, and keeps pushing the margin up.
"""),
    ("code", r"""
h = torch.linspace(-40, 80, 1201, dtype=torch.float64, requires_grad=True)  # log-ratio margin c - r
zeros = torch.zeros_like(h)


def dpo_curve(beta, loss_type="sigmoid", ls=0.0):
    # split h symmetrically into c = h/2, r = -h/2 (only h matters for sigmoid/robust/hinge/ipo/exo_pair)
    losses, _, _ = dpo_loss(h / 2, -h / 2, zeros, zeros, beta=beta, loss_type=loss_type, label_smoothing=ls)
    (grad,) = torch.autograd.grad(losses.sum(), h)
    return losses.detach(), grad


fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for beta in (0.05, 0.1, 0.5):
    loss, grad = dpo_curve(beta)
    assert abs(grad[h.detach().abs().argmin()] + beta / 2) < 1e-6  # gradient -beta/2 at h = 0
    axes[0].plot(h.detach(), loss, label=rf"$\beta$ = {beta}")
axes[0].set_xlabel(r"log-ratio margin $h = c - r$")
axes[0].set_ylabel("DPO loss (sigmoid)")
axes[0].legend()

beta = 0.1
for ls in (0.0, 0.1, 0.25):
    loss, grad = dpo_curve(beta, ls=ls)
    axes[1].plot(h.detach(), loss, label=rf"cDPO, $\varepsilon$ = {ls}")
    if ls > 0:
        h_star = math.log((1 - ls) / ls) / beta
        h_grid_min = h.detach()[loss.argmin()].item()
        print(f"label smoothing {ls}: argmin over the grid h = {h_grid_min:.2f}, formula h* = {h_star:.2f}")
        assert abs(h_grid_min - h_star) < 0.1 + 1e-9
        axes[1].axvline(h_star, color="gray", ls=":", lw=1)
robust, robust_grad = dpo_curve(beta, "robust", ls=0.1)
assert torch.all(robust_grad < 0)  # rDPO: the margin is pushed up everywhere
axes[1].plot(h.detach(), robust, "--", label=r"robust (rDPO), $\varepsilon$ = 0.1")
axes[1].set_xlabel(r"log-ratio margin $h$ ($\beta$ = 0.1)")
axes[1].set_ylim(-1, 6)
axes[1].legend()
plt.tight_layout()
plt.show()
"""),
    ("md", r"""
### The implicit reward *is* a reward model

A tiny check of the derivation: one prompt, four possible responses, a reference policy, and a true reward $r(y)$.
If the preferences follow Bradley–Terry, $P(y_i \succ y_j) = \sigma(r_i - r_j)$, then the *expected* DPO loss of the
pair $(y_i, y_j)$ is exactly `dpo_loss` with chosen $y_i$ and `label_smoothing` $= 1 - \sigma(r_i - r_j)$ (the
probability the label goes the other way). Minimising it over a tabular policy must give implicit rewards
$\beta\log\frac{\pi_\theta(y)}{\pi_\text{ref}(y)}$ equal to $r(y)$ up to a constant — and the policy must equal the
RLHF optimum $\pi_\text{ref}\,e^{r/\beta}/Z$.
"""),
    ("code", r"""
beta = 0.1
true_reward = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64)
ref_logp = torch.log_softmax(torch.tensor([0.5, 1.0, -0.5, 0.0], dtype=torch.float64), 0)
theta = ref_logp.clone().requires_grad_(True)  # tabular policy logits, initialised at the reference
pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]


def expected_dpo_loss():
    logp = torch.log_softmax(theta, 0)
    total = 0.0
    for i, j in pairs:
        p_i_wins = torch.sigmoid(true_reward[i] - true_reward[j]).item()
        losses, _, _ = dpo_loss(logp[i : i + 1], logp[j : j + 1], ref_logp[i : i + 1], ref_logp[j : j + 1],
                                beta=beta, label_smoothing=1 - p_i_wins)
        total = total + losses.sum()
    return total


opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)


def closure():
    opt.zero_grad()
    loss = expected_dpo_loss()
    loss.backward()
    return loss


opt.step(closure)
logp = torch.log_softmax(theta.detach(), 0)
implicit_reward = beta * (logp - ref_logp)
shift = (true_reward - implicit_reward).mean()
print("true reward          :", true_reward.numpy().round(4))
print("implicit reward + c  :", (implicit_reward + shift).numpy().round(4))
assert torch.allclose(implicit_reward + shift, true_reward, atol=1e-4)
rlhf_optimum = torch.softmax(ref_logp + true_reward / beta, 0)
print("DPO policy           :", logp.exp().numpy().round(4))
print("pi_ref e^(r/beta) / Z:", rlhf_optimum.numpy().round(4))
assert torch.allclose(logp.exp(), rlhf_optimum, atol=1e-4)
"""),
    ("md", r"""
### The loss variants, on one plot

`dpo_loss` implements TRL's pairwise variants. They differ in what they do with the margin: saturate (sigmoid,
cDPO), stop at a margin (hinge, IPO), regress the chosen and rejected log-ratios separately (NCA, APO, SPPO), ...
To put them on one scale the plot uses $\beta = 1$ and splits the margin symmetrically, $c = h/2$, $r = -h/2$ (the
last four variants look at $c$ and $r$ separately, so their curves depend on that choice). With
`label_smoothing=0`, `robust` coincides with `sigmoid`; `exo_pair` needs its $\varepsilon$ = `label_smoothing` > 0
(the EXO paper's $10^{-3}$).
"""),
    ("code", r"""
LOSS_TYPES = ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard"]
x = torch.linspace(-4, 4, 401, dtype=torch.float64)
z = torch.zeros_like(x)
fig, ax = plt.subplots(figsize=(8, 4.5))
curves = {}
for loss_type in LOSS_TYPES:
    ls = 1e-3 if loss_type == "exo_pair" else 0.0  # EXO's ε must be > 0 (the paper's 1e-3)
    curves[loss_type], _, _ = dpo_loss(x / 2, -x / 2, z, z, beta=1.0, loss_type=loss_type, label_smoothing=ls)
    ax.plot(x, curves[loss_type], ls="--" if loss_type == "robust" else "-", label=loss_type)
assert torch.allclose(curves["robust"], curves["sigmoid"])  # identical without label smoothing
assert torch.allclose(curves["hinge"], torch.relu(1 - x))
assert torch.allclose(curves["ipo"], (x - 0.5) ** 2)
ax.axvline(0, color="k", lw=0.5)
ax.axhline(math.log(2), color="gray", ls=":", lw=1)
ax.text(-3.9, math.log(2) + 0.05, "ln 2", color="gray")
ax.set_ylim(-0.1, 4)
ax.set_xlabel(r"$\beta h$ (log-ratio margin, $\beta = 1$, $c = h/2$, $r = -h/2$)")
ax.set_ylabel("loss")
ax.set_title("dpo_loss variants")
ax.legend(ncol=3, fontsize=8)
plt.show()
"""),
    ("md", r"""
## Part 2 · GRPO

### Group-relative advantages

For each prompt GRPO samples a group of $G$ completions, scores them, and uses the reward relative to the group as
the advantage of every token of a completion: $\hat A_i = \frac{r_i - \text{mean}(r_{\text{group}})}{\text{std}(r_{\text{group}}) + \epsilon}$.
The notes' argument for normalising *within* the group: with one baseline for the whole batch, an easy prompt's
high rewards raise the baseline and a hard prompt's best answer gets a negative advantage.

`group_advantages(rewards, group_size, scale=...)` always centres within the group; `scale` chooses the divisor:
`"group"` (original GRPO), `"batch"` (std of the whole batch), `"none"` (Dr. GRPO).
"""),
    ("code", r"""
rewards = torch.tensor([0.9, 1.0, 0.8, 0.7,    # prompt A (easy): G = 4 completions
                        0.1, 0.4, 0.0, 0.1,    # prompt B (hard)
                        1.0, 1.0, 1.0, 1.0])   # prompt C: every completion gets the same reward
G = 4
adv = group_advantages(rewards, G, scale="group")
batch_whitened = (rewards - rewards.mean()) / rewards.std()  # one baseline for the whole batch (PPO-style)
print("rewards            :", rewards.reshape(-1, G))
print("group advantages   :", adv.reshape(-1, G))
print("batch-whitened     :", batch_whitened.reshape(-1, G))
print("scale='batch'      :", group_advantages(rewards, G, scale="batch").reshape(-1, G))
print("scale='none'       :", group_advantages(rewards, G, scale="none").reshape(-1, G))

assert torch.allclose(adv.reshape(-1, G).sum(1), torch.zeros(3), atol=1e-5)  # centred within each group
assert torch.all(adv[8:] == 0)  # identical rewards: no learning signal from prompt C (TRL logs frac_reward_zero_std)
best_of_hard = 4 + rewards[4:8].argmax()
assert adv[best_of_hard] > 0 and batch_whitened[best_of_hard] < 0  # the notes' point
"""),
    ("md", r"""
### The GRPO loss and its four aggregations

From the notes, the objective (to maximise) is

$$\frac{1}{G}\sum_{i = 1}^G \frac{1}{|o_i|}\sum_{t = 1}^{|o_i|} \Big\{ \min\big(w_{i,t}\hat{A}_{i}, \text{clip}(w_{i,t}, 1-\epsilon, 1+\epsilon)\hat{A}_{i}\big) - \beta\, D_{\text{KL}}[\pi_\theta \Vert \pi_{\text{ref}}]_{i,t} \Big\},
\qquad w_{i,t} = \frac{\pi_\theta(o_{i,t}|q, o_{i,<t})}{\pi_{\text{old}}(o_{i,t}|q, o_{i,<t})},$$

with the per-token KL estimated by $k_3$ (Part 3). `grpo_loss` returns its negative, aggregated in one of four
ways over a batch of $B$ completions padded to $T$ tokens ($\ell_{i,t}$ = per-token loss, $m_{i,t}$ = completion
mask):

| `loss_type` | aggregation | per-token weight |
|---|---|---|
| `grpo` | $\frac1B \sum_i \frac{1}{\lvert o_i\rvert}\sum_t m_{i,t}\ell_{i,t}$ (the formula above) | $\frac{1}{B\,\lvert o_i\rvert}$ |
| `bnpo` | $\sum_{i,t} m_{i,t}\ell_{i,t} \,/\, \sum_{i,t} m_{i,t}$ | $\frac{1}{\sum_j \lvert o_j\rvert}$ |
| `dr_grpo` | $\sum_{i,t} m_{i,t}\ell_{i,t} \,/\, (B \cdot L_\text{max})$ | $\frac{1}{B\,L_\text{max}}$ |
| `dapo` | $\sum_{i,t} m_{i,t}\ell_{i,t} \,/\, N_\text{items}$ (real tokens in the *global* batch) | $\frac{1}{N_\text{items}}$ |

The weights matter: with `grpo`, each token of a short completion gets a larger share of the gradient than a token
of a long one, so short correct answers are reinforced more per token and long wrong answers are penalised less per
token — the length bias Dr. GRPO (Liu et al. 2025) removes with a constant normaliser.

A toy batch: one prompt, $G = 4$ completions of lengths 2, 6, 3, 5, right-padded to $T = 6$. The per-token
log-probabilities come from random "model" logits through the notes' `_get_per_token_logps` (which calls
`F.log_softmax` — the notes never import `F`; we did above) and through `src.losses.token_logps`; they agree.
On-policy, as in TRL's default of one optimisation step per generation batch: `old_logps = logps.detach()`.
"""),
    ("code", r"""
# ---- the notes' _get_per_token_logps, with the model call replaced by given logits (and without `self`) ----
def notes_get_per_token_logps(logits, input_ids, logits_to_keep):
    completion_logits = logits[:, -(logits_to_keep + 1) : -1, :]  # logits predict the *next* token: shift by one
    completion_labels = input_ids[:, -logits_to_keep:]
    log_probs = F.log_softmax(completion_logits, dim=-1)  # needs `import torch.nn.functional as F`
    return log_probs.gather(dim=-1, index=completion_labels.unsqueeze(-1)).squeeze(-1)


g = torch.Generator().manual_seed(0)
PAD, VOCAB, PROMPT_LEN, T = 0, 11, 3, 6
lengths = torch.tensor([2, 6, 3, 5])
B = len(lengths)
mask = (torch.arange(T) < lengths[:, None]).double()  # 1 on real completion tokens
completion_ids = torch.randint(1, VOCAB, (B, T), generator=g).masked_fill(mask == 0, PAD)
input_ids = torch.cat([torch.randint(1, VOCAB, (B, PROMPT_LEN), generator=g), completion_ids], 1)
policy_logits = torch.randn(B, PROMPT_LEN + T, VOCAB, generator=g, dtype=torch.float64)
ref_logits = policy_logits + 0.3 * torch.randn(policy_logits.shape, generator=g, dtype=torch.float64)

notes_logps = notes_get_per_token_logps(policy_logits, input_ids, T)
lib_logps = token_logps(policy_logits[:, PROMPT_LEN - 1 : -1], completion_ids)
assert torch.allclose(notes_logps, lib_logps)

logps = lib_logps.clone().requires_grad_(True)  # [B, T]; the pad positions hold log p(PAD): real numbers, not 0
old_logps = logps.detach()  # on-policy
ref_logps = token_logps(ref_logits[:, PROMPT_LEN - 1 : -1], completion_ids)
# two correct (short) and two wrong (long) completions
completion_rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
advantages = group_advantages(completion_rewards, G)
print("mask:\n", mask)
print("advantages:", advantages)
"""),
    ("code", r"""
BETA, L_MAX = 0.04, T
n_real = mask.sum()
kl_tok = kl_estimate(lib_logps, ref_logps, "k3")  # per-token k3; at ratio 1 the surrogate is just -A
per_token = (-advantages[:, None] + BETA * kl_tok) * mask
by_hand = {
    "grpo": (per_token.sum(1) / mask.sum(1)).mean(),
    "bnpo": per_token.sum() / n_real,
    "dr_grpo": per_token.sum() / (B * L_MAX),
    "dapo": per_token.sum() / n_real,  # num_items defaults to the local mask.sum()
}
weights, library = {}, {}
for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
    loss, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=BETA, loss_type=loss_type,
                              max_completion_length=L_MAX)
    library[loss_type] = loss.item()
    assert torch.allclose(loss, by_hand[loss_type], atol=1e-10), loss_type
    # gradient of the surrogate alone (beta = 0): d loss / d logp_{i,t} = -A_i * weight_i on real tokens, 0 on padding
    surrogate, _ = grpo_loss(logps, old_logps, None, advantages, mask, beta=0.0, loss_type=loss_type,
                             max_completion_length=L_MAX)
    (grad,) = torch.autograd.grad(surrogate, logps)
    assert torch.all(grad[mask == 0] == 0)
    weights[loss_type] = (grad / -advantages[:, None])[:, 0]  # the same for every token of a completion
    print(f"{loss_type:>8}: loss = {loss.item():+.5f}   kl metric = {metrics['kl']:.5f}   "
          f"per-token weight of each completion = {weights[loss_type].numpy().round(4)}")
ones = torch.ones(B, dtype=torch.float64)
expected_weights = {"grpo": 1 / (B * lengths.double()), "bnpo": ones / n_real, "dr_grpo": ones / (B * L_MAX),
                    "dapo": ones / n_real}
for loss_type, w in expected_weights.items():
    assert torch.allclose(weights[loss_type], w, atol=1e-12), loss_type
"""),
    ("md", r"""
Why `dapo` has a `num_items` argument: with gradient accumulation (or several GPUs) a step sees several
micro-batches. Averaging per micro-batch token means (`bnpo` on each) weights the tokens of a small micro-batch
more; dividing each micro-batch's token *sum* by the token count of the whole step (`dapo` with `num_items`) gives
exactly the token mean of the full batch.
"""),
    ("code", r"""
halves = [slice(0, 1), slice(1, 4)]  # two micro-batches: 2 tokens and 14 tokens
kw = dict(beta=BETA, max_completion_length=L_MAX)
full_token_mean = grpo_loss(logps, old_logps, ref_logps, advantages, mask, loss_type="bnpo", **kw)[0]
accumulated_dapo = sum(grpo_loss(logps[s], old_logps[s], ref_logps[s], advantages[s], mask[s], loss_type="dapo",
                                 num_items=int(n_real), **kw)[0] for s in halves)
averaged_bnpo = sum(grpo_loss(logps[s], old_logps[s], ref_logps[s], advantages[s], mask[s], loss_type="bnpo",
                              **kw)[0] for s in halves) / len(halves)
print(f"token mean of the full batch: {full_token_mean:.5f}   dapo accumulated: {accumulated_dapo:.5f}   "
      f"mean of per-micro-batch bnpo: {averaged_bnpo:.5f}")
assert torch.allclose(accumulated_dapo, full_token_mean, atol=1e-10)
assert not torch.allclose(averaged_bnpo, full_token_mean, atol=1e-3)
"""),
    ("md", r"""
### The notes' GRPO loss — the WRONG version, for comparison

Reproduced below from the notes' `compute_grpo_loss` (inputs passed directly instead of through `self` and a
model). It has three problems, and calls the *ratio* $w = e^{\log\pi - \log\pi_\text{old}}$ `log_ratios`:

1. **no completion mask** — `per_token_loss.mean()` averages over the padding too, so pad positions receive
   gradient (they would push up the probability of the pad token after a positive advantage);
2. **no KL term** — the $-\beta D_\text{KL}$ of the formula it implements is missing;
3. **no per-sequence length normalisation** — a flat mean over the $[B, T]$ tensor is not the
   $\frac1G\sum_i\frac1{|o_i|}\sum_t$ written in the notes.

We fix them one at a time and land on `grpo_loss(loss_type="grpo")`.
"""),
    ("code", r"""
def notes_compute_grpo_loss_WRONG(per_token_logps, old_per_token_logps, advantages, clip_eps=0.2):
    # WRONG, reproduced from the notes: no completion mask, no KL term, no per-sequence length normalisation
    log_ratios1 = torch.exp(per_token_logps - old_per_token_logps)  # misnamed: this is the ratio, not a log-ratio
    log_ratios2 = torch.clamp(log_ratios1, 1 - clip_eps, 1 + clip_eps)
    surr1 = log_ratios1 * advantages.unsqueeze(-1)
    surr2 = log_ratios2 * advantages.unsqueeze(-1)
    per_token_loss = -torch.min(surr1, surr2)
    return per_token_loss.mean()


def surrogate_per_token(logps, old_logps, advantages, clip_eps=0.2):
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages[:, None])


steps = {}
steps["notes (wrong)"] = notes_compute_grpo_loss_WRONG(logps, old_logps, advantages)
s_tok = surrogate_per_token(logps, old_logps, advantages)
steps["+ mask"] = (s_tok * mask).sum() / mask.sum()
steps["+ per-sequence normalisation"] = ((s_tok * mask).sum(1) / mask.sum(1)).mean()
k3 = kl_estimate(logps, ref_logps, "k3")
steps["+ KL term"] = (((s_tok + BETA * k3) * mask).sum(1) / mask.sum(1)).mean()



def lib(loss_type, beta):
    return grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=beta, loss_type=loss_type,
                     max_completion_length=L_MAX)[0]


assert torch.allclose(steps["+ mask"], lib("bnpo", 0.0))  # masked flat mean = token-level (bnpo/DAPO) loss
assert torch.allclose(steps["+ per-sequence normalisation"], lib("grpo", 0.0))
assert torch.allclose(steps["+ KL term"], lib("grpo", BETA))  # = the formula in the notes
assert not torch.allclose(steps["notes (wrong)"], lib("grpo", BETA))

grads = {name: torch.autograd.grad(loss, logps, retain_graph=True)[0] for name, loss in steps.items()}
for name, loss in steps.items():
    print(f"{name:>30}: loss = {loss.item():+.6f}   |grad| on padding = {grads[name][mask == 0].abs().sum():.4f}   "
          f"|grad| on real tokens = {grads[name][mask == 1].abs().sum():.4f}")
assert grads["notes (wrong)"][mask == 0].abs().sum() > 0  # padding gets gradient
assert torch.all(grads["+ KL term"][mask == 0] == 0)
# on real tokens the notes' flat mean weights every token by 1/(B*T): Dr. GRPO's constant, not 1/(B*|o_i|)
assert torch.allclose(grads["notes (wrong)"][mask == 1], torch.autograd.grad(lib("dr_grpo", 0.0), logps)[0][mask == 1])
"""),
    ("md", r"""
On-policy, the surrogate's *value* is $-\frac1B\sum_i \hat A_i = 0$ both for the notes' version and for the fixed
`grpo` loss (the advantages of a group sum to zero), which is why GRPO loss curves start near 0 and are not a
progress signal — the information is in the gradient. The gradient per token, by completion, under each
aggregation (and the notes' version, which also hands gradient to the pad positions):
"""),
    ("code", r"""
fig, ax = plt.subplots(figsize=(8, 3.6))
names = ["grpo", "bnpo", "dr_grpo", "dapo"]
width = 0.16
idx = np.arange(B)
for k, name in enumerate(names):
    ax.bar(idx + (k - 2) * width, weights[name].numpy(), width, label=name)
notes_weight = grads["notes (wrong)"] / -advantages[:, None]  # [B, T]: the same 1/(B*T) at every position
assert torch.allclose(notes_weight, torch.full_like(notes_weight, 1 / (B * T)))
ax.bar(idx + 2 * width, notes_weight[:, 0].numpy(), width, color="k", alpha=0.6,
       label="notes (wrong): every position, padding included")
ax.set_xticks(idx, [f"completion {i}\n|o| = {n}, A = {a:+.2f}"
                   for i, (n, a) in enumerate(zip(lengths.tolist(), advantages.tolist()))])
ax.set_ylabel(r"per-token gradient weight ($|\partial L / \partial \log\pi| / |A|$)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
"""),
    ("md", r"""
## Part 3 · KL estimators

GRPO's KL term (and PPO's KL reward penalty) needs $D_\text{KL}[\pi_\theta\Vert\pi_\text{ref}] = \mathbb{E}_{y\sim\pi_\theta}\big[\log\frac{\pi_\theta(y)}{\pi_\text{ref}(y)}\big]$
per token, but summing over a 100k-token vocabulary at every position is wasteful; one estimates it from the
sampled token alone (Schulman 2020). With $d = \log\pi_\text{ref}(y) - \log\pi_\theta(y)$, $y \sim \pi_\theta$:

* $k_1 = -d$: unbiased, but high variance and negative for half the samples;
* $k_2 = \tfrac12 d^2$: low variance, biased (good only for nearby distributions);
* $k_3 = e^{d} - d - 1$: unbiased (since $\mathbb{E}[e^d] = 1$), always $\ge 0$ (since $e^d \ge 1 + d$), and lower
  variance than $k_1$ — GRPO's choice. It is $k_1$ plus the control variate $e^d - 1$, which has mean zero and is
  negatively correlated with $k_1$.

Check with two categorical distributions over 10 tokens, exact KL against 200,000 samples. In the figure below,
left: the three estimators as functions of $d$, with the ten tokens as dots (size $\propto \pi_\theta(y)$); middle
and right: bias and spread as the reference moves further away.
"""),
    ("code", r"""
g = torch.Generator().manual_seed(0)
V = 10
z, noise = torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)


def kl_experiment(scale, n=200_000):
    logp = torch.log_softmax(z, 0)  # policy pi_theta
    logq = torch.log_softmax(z + scale * noise, 0)  # reference pi_ref
    exact = (logp.exp() * (logp - logq)).sum()
    y = torch.multinomial(logp.exp(), n, replacement=True, generator=g)  # samples from the policy
    return exact, {kind: kl_estimate(logp[y], logq[y], kind) for kind in ("k1", "k2", "k3")}


exact, samples = kl_experiment(scale=1.0)
print(f"exact KL = {exact:.4f}")
for kind, est in samples.items():
    se = est.std() / len(est) ** 0.5
    print(f"  {kind}: mean = {est.mean():.4f} +- {se:.4f}   std = {est.std():.4f}   min = {est.min():+.4f}")
for kind in ("k1", "k3"):  # unbiased: within 4 standard errors of the exact KL
    est = samples[kind]
    assert abs(est.mean() - exact) < 4 * est.std() / len(est) ** 0.5, kind
assert abs(samples["k2"].mean() - exact) > 10 * samples["k2"].std() / len(samples["k2"]) ** 0.5  # k2 is biased here
assert torch.all(samples["k3"] >= 0) and (samples["k1"] < 0).any()
assert samples["k3"].var() < samples["k1"].var() / 4
"""),
    ("code", r"""
scales = [0.1, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0]
table = {kind: {"bias": [], "std": []} for kind in ("k1", "k2", "k3")}
exacts = []
for scale in scales:
    ex, est = kl_experiment(scale, n=50_000)
    exacts.append(ex.item())
    for kind, e in est.items():
        table[kind]["bias"].append((e.mean() / ex - 1).item())
        table[kind]["std"].append((e.std() / ex).item())

fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
# left: each estimator as a function of d = log pi_ref(y) - log pi(y); dots = the 10 tokens, size ~ pi(y)
d = torch.linspace(-2.5, 2.5, 201, dtype=torch.float64)
for kind in ("k1", "k2", "k3"):
    axes[0].plot(d, kl_estimate(torch.zeros_like(d), d, kind), label=kind)
logp, logq = torch.log_softmax(z, 0), torch.log_softmax(z + 1.0 * noise, 0)
d_tok = logq - logp
axes[0].scatter(d_tok, kl_estimate(logp, logq, "k3"), s=400 * logp.exp(), color="tab:green", alpha=0.5, zorder=3)
axes[0].scatter(d_tok, kl_estimate(logp, logq, "k1"), s=400 * logp.exp(), color="tab:blue", alpha=0.5, zorder=3)
axes[0].axhline(exact, color="k", ls="--", lw=1, label=f"exact KL = {exact:.2f}")
axes[0].set_xlabel(r"$d = \log\pi_\mathrm{ref}(y) - \log\pi_\theta(y)$")
axes[0].set_ylim(-2.5, 3)
axes[0].legend(fontsize=8)
for kind in table:
    axes[1].semilogx(exacts, table[kind]["bias"], "o-", label=kind)
    axes[2].loglog(exacts, table[kind]["std"], "o-", label=kind)
axes[1].axhline(0, color="k", lw=0.5)
axes[1].set_xlabel("exact KL")
axes[1].set_ylabel("relative bias  E[k]/KL - 1")
axes[2].set_xlabel("exact KL")
axes[2].set_ylabel("relative std  std[k]/KL")
for ax in axes[1:]:
    ax.legend()
plt.tight_layout()
plt.show()
"""),
    ("md", r"""
## Takeaways

* DPO is a logistic loss on the margin of implicit rewards $\beta\log\frac{\pi_\theta}{\pi_\text{ref}}$; it starts at
  $\ln 2$, β sets the scale of the margin, label smoothing stops it at a finite margin, and at its optimum the
  implicit reward equals the Bradley–Terry reward up to a constant.
* GRPO replaces the critic by group-centred rewards; how the per-token losses are averaged (`grpo`, `bnpo`,
  `dr_grpo`, `dapo`) changes each token's gradient weight, and masking the padding is not optional.
* The notes' GRPO code differs from its own formula in three ways (mask, KL, length normalisation); `grpo_loss`
  implements the formula and its variants.
* $k_3$ is the KL estimator to use per token: unbiased, non-negative, low variance; $k_2$ is biased once the
  policy moves far from the reference.
"""),
]
