# Cells of 02_q_learning.ipynb (built by _build.py). ("md" | "code", source)

CELLS = [
    ("md", r"""
# 02 · Tabular Q-learning

Notebook 01 computed $V^*$ and $Q^*$ from the model $p(s'\mid s,a)$, $r(s,a)$. The notes' next step is
**Q-learning**, "a classic off-policy algorithm that learns the optimal action-value function $Q^*(s,a)$
directly" — from sampled transitions, without ever looking at the model. The update rule from the notes:

$$Q(s_t, a_t) \leftarrow Q(s_t, a_t) + \alpha\Big[r_t + \gamma \max_{a} Q(s_{t+1},a) - Q(s_t, a_t)\Big].$$

The bracket is the **TD error**: a one-sample estimate of the Bellman optimality equation's right-hand side minus
the current guess. When $Q = Q^*$ the bracket is zero *on average*, so $Q^*$ is the fixed point the update
drifts towards.

We run it on the same slippery gridworld (imported from [`gridworld.py`](gridworld.py)), with a fixed seed, and
check the result against value iteration: the learned greedy policy must equal the optimal one on every
non-terminal state, and $Q$ must be close to $Q^*$.
"""),
    ("code", r"""
%matplotlib inline
import sys
import pathlib

# Jupyter and `pytest --nbmake` both start the kernel in this notebook's folder, where gridworld.py lives.
sys.path.insert(0, str(pathlib.Path.cwd()))

import numpy as np
import matplotlib.pyplot as plt

from gridworld import GridWorld, q_from_v, value_iteration

np.set_printoptions(precision=3, suppress=True)

env = GridWorld()  # slip=0.2, gamma=0.9, step_reward=-0.1 -- the world of notebook 01
S, A, gamma = env.n_states, env.n_actions, env.gamma
nonterminal = ~env.terminal

# ground truth from notebook 01 (model-based); Q-learning below never touches env.P or env.R
V_star, _ = value_iteration(env)
Q_star = q_from_v(env, V_star)
pi_star = Q_star.argmax(axis=1)
print(env.render_policy(pi_star))
"""),
    ("md", r"""
## The algorithm

* **Behaviour policy: ε-greedy.** With probability ε take a uniformly random action, otherwise the greedy
  $\arg\max_a Q(s,a)$. Exploration is what guarantees that every $(s,a)$ keeps being tried.
* **Target: greedy.** The update bootstraps from $\max_a Q(s_{t+1}, a)$ — the value of acting *greedily* next,
  whatever the behaviour policy actually does. That mismatch is what "off-policy" means: we behave ε-greedily
  but learn the value of the greedy (optimal) policy.
* **Terminal transitions** bootstrap from 0: entering G or P ends the episode, and $V(G)=V(P)=0$.
* **Step size.** Stochastic transitions make each TD target noisy. With a constant α the estimate keeps jittering
  around $Q^*$; convergence needs a step size that decays per state-action pair with
  $\sum_n \alpha_n=\infty$, $\sum_n \alpha_n^2<\infty$ (Robbins–Monro). We use $\alpha = n(s,a)^{-0.8}$, where
  $n(s,a)$ counts the updates of that pair, and compare against a constant $\alpha=0.1$.
* **Exploring starts.** Each episode starts in a random non-terminal cell, so rarely reached cells are still
  visited often enough.
"""),
    ("code", r"""
def evaluate_policy(env, policy):
    # exact V of a deterministic policy (the linear solve of notebook 01), used only for monitoring
    P_pi = env.P[np.arange(env.n_states), policy]
    R_pi = env.R[np.arange(env.n_states), policy]
    return np.linalg.solve(np.eye(env.n_states) - env.gamma * P_pi, R_pi)


def q_learning(env, n_episodes, *, epsilon=0.5, alpha=lambda n: n**-0.8, seed=0, max_steps=100):
    rng = np.random.default_rng(seed)
    Q = np.zeros((env.n_states, env.n_actions))
    n_updates = np.zeros_like(Q)
    starts = np.flatnonzero(~env.terminal)
    checkpoints = set(np.unique(np.geomspace(1, n_episodes, 80).astype(int)).tolist())  # log-spaced
    log = {"episode": [], "q_error": [], "policy_agreement": [], "value_gap": []}
    for episode in range(1, n_episodes + 1):
        s = int(rng.choice(starts))  # exploring starts
        for _ in range(max_steps):
            # epsilon-greedy behaviour policy
            a = int(rng.integers(env.n_actions)) if rng.random() < epsilon else int(Q[s].argmax())
            s_next, r, done = env.step(s, a, rng)  # a sample from the environment -- no model needed
            # the notes' update: Q(s,a) += alpha * [r + gamma * max_a' Q(s',a') - Q(s,a)]
            target = r + (0.0 if done else env.gamma * Q[s_next].max())
            n_updates[s, a] += 1
            Q[s, a] += alpha(n_updates[s, a]) * (target - Q[s, a])
            s = s_next
            if done:
                break
        if episode in checkpoints:
            greedy = Q.argmax(axis=1)
            log["episode"].append(episode)
            log["q_error"].append(np.abs(Q - Q_star)[~env.terminal].max())
            log["policy_agreement"].append((greedy == pi_star)[~env.terminal].mean())
            # how much the greedy policy loses against the optimum, in the worst state (0 = optimal policy)
            log["value_gap"].append(np.max(V_star - evaluate_policy(env, greedy)))
    return Q, n_updates, {k: np.array(v) for k, v in log.items()}


N_EPISODES = 20_000
Q, n_updates, log = q_learning(env, N_EPISODES, seed=0)
Q_const, _, log_const = q_learning(env, N_EPISODES, seed=0, alpha=lambda n: 0.1)
print(f"{int(n_updates.sum())} updates; least-visited (s,a) pair updated {int(n_updates[nonterminal].min())} times")
"""),
    ("md", r"""
## Did it learn $Q^*$?

The key checks, against value iteration's answer from notebook 01:
"""),
    ("code", r"""
pi_learned = Q.argmax(axis=1)
q_error = np.abs(Q - Q_star)[nonterminal].max()
v_error = np.abs(Q.max(axis=1) - V_star)[nonterminal].max()
print("learned greedy policy:      value iteration's policy:")
for row_q, row_vi in zip(env.render_policy(pi_learned).split("\n"), env.render_policy(pi_star).split("\n")):
    print(f"  {row_q}                       {row_vi}")
print(f"max_(s,a) |Q - Q*|            = {q_error:.4f}")
print(f"max_s |max_a Q - V*|          = {v_error:.4f}")
print(f"constant alpha=0.1: |Q - Q*|  = {log_const['q_error'][-1]:.4f}  (stalls at a noise floor, see below)")

# 1. the greedy policy of the learned Q is the optimal policy in every non-terminal state
assert np.array_equal(pi_learned[nonterminal], pi_star[nonterminal])
# 2. Q is close to Q*, for every non-terminal state and every action (not only the greedy ones)
assert q_error < 0.1
assert v_error < 0.05
# 3. the greedy policy's true value (exact evaluation) is V*
assert np.max(np.abs(evaluate_policy(env, pi_learned) - V_star)) < 1e-8
# 4. a constant step size does not converge: it ends far less accurate than the decaying one
assert log_const["q_error"][-1] > 2 * q_error
"""),
    ("md", r"""
## Learning curves

Logged at log-spaced episodes:

* **Left:** the worst-case error $\max_{s,a}|Q-Q^*|$. With the decaying step size it keeps shrinking; with a constant
  $\alpha=0.1$ it stalls at a noise floor set by α and the slip noise — large enough that the greedy action of a
  state still flips now and then (middle and right panels).
* **Middle:** the fraction of non-terminal states whose greedy action is optimal.
* **Right:** how much the greedy policy loses against the optimum, $\max_s\,[V^*(s)-V^{\text{greedy}}(s)]$, with
  $V^{\text{greedy}}$ evaluated exactly (0 means the greedy policy *is* optimal).

The *policy* is right long before the *values* are accurate: the greedy action only needs the ordering of
$Q(s,\cdot)$ to be right, not its values.
"""),
    ("code", r"""
first_optimal = next(ep for ep, ok in zip(log["episode"], log["policy_agreement"]) if ok == 1.0)
error_then = log["q_error"][log["episode"].tolist().index(first_optimal)]
print(f"greedy policy first fully optimal at episode {first_optimal}, when max|Q - Q*| was still {error_then:.3f}")
assert np.all(log["policy_agreement"][log["episode"] >= first_optimal] == 1.0)  # and it stays optimal

fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
ax = axes[0]
ax.loglog(log["episode"], log["q_error"], label=r"$\alpha = n(s,a)^{-0.8}$")
ax.loglog(log_const["episode"], log_const["q_error"], label=r"$\alpha = 0.1$")
ax.set_ylabel(r"$\max_{s,a} |Q - Q^*|$")
ax.legend()
axes[1].semilogx(log["episode"], log["policy_agreement"], label=r"$\alpha = n(s,a)^{-0.8}$")
axes[1].semilogx(log_const["episode"], log_const["policy_agreement"], label=r"$\alpha = 0.1$")
axes[1].set_ylabel("fraction of states with optimal greedy action")
axes[1].legend()
axes[2].semilogx(log["episode"], log["value_gap"], label=r"$\alpha = n(s,a)^{-0.8}$")
axes[2].semilogx(log_const["episode"], log_const["value_gap"], label=r"$\alpha = 0.1$")
axes[2].set_ylabel(r"$\max_s [V^*(s) - V^{\mathrm{greedy}}(s)]$")
axes[2].legend()
for ax in axes:
    ax.set_xlabel("episode")
plt.tight_layout()
plt.show()
"""),
    ("code", r"""
fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.2))
env.plot(axes[0], Q.max(axis=1), pi_learned, title=r"Q-learning: $\max_a Q$ and greedy policy")
env.plot(axes[1], V_star, pi_star, title=r"value iteration: $V^*$ and $\pi^*$")
plt.show()
"""),
    ("md", r"""
## Takeaways

* Q-learning needs only samples $(s, a, r, s')$; the max in its target makes it learn $Q^*$ while behaving
  ε-greedily (off-policy).
* The greedy policy converges quickly; accurate values need many visits and a decaying step size.
* Tables do not scale to language: an LLM's "state" (prompt + prefix) is never seen twice. Deep Q-learning
  replaces the table with a network, but for LLMs the field went the other way — optimise the policy
  $\pi_\theta$ directly with the **policy gradient**, the subject of **notebook 03**.
"""),
]
