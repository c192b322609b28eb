# Cells of 01_bellman_value_iteration.ipynb (built by _build.py). ("md" | "code", source)

CELLS = [
    ("md", r"""
# 01 · Bellman equations, policy evaluation and value iteration

The RL notes start from the **Bellman equations**, "the basis of most RL algorithms". This notebook makes them
concrete on a gridworld small enough that we can write the whole MDP down as matrices and check every claim
numerically:

1. build a Markov decision process (states, actions, slippery transitions, rewards, discount $\gamma$);
2. **policy evaluation**: solve the Bellman *expectation* equation for $V^\pi$ twice — by fixed-point iteration
   and by an exact linear solve — and check they agree (and agree with Monte Carlo rollouts);
3. get $Q^\pi$ from $V^\pi$ with the notes' action-value equation;
4. **value iteration**: iterate the Bellman *optimality* operator to its fixed point $V^*$ and verify the fixed
   point numerically (residual $< 10^{-8}$);
5. check that the greedy policy of $V^*$ is optimal by comparing it with **policy iteration**;
6. plot $V^*$ as a heatmap with the greedy arrows.

Only numpy is used; the gridworld lives in [`gridworld.py`](gridworld.py) next to this notebook so that
notebook 02 (Q-learning) can reuse exactly the same environment.
"""),
    ("code", r"""
%matplotlib inline
import sys
import pathlib

# Jupyter and `pytest --nbmake` both start the kernel in this notebook's folder, where gridworld.py lives.
sys.path.insert(0, str(pathlib.Path.cwd()))

import numpy as np
import matplotlib.pyplot as plt

from gridworld import ACTIONS, GridWorld

np.set_printoptions(precision=3, suppress=True)
"""),
    ("md", r"""
## 1. The MDP

```
.....      S  start            G  goal: +1, episode ends
.##P.      #  wall             P  pit:  -1, episode ends
S...G      .  free cell        every other move costs -0.1
.....
```

* **States** $s$: the 18 non-wall cells. G and P are *absorbing*: every action keeps you there with reward 0, so
  $V(G)=V(P)=0$ and the episodic task can be written with ordinary matrices.
* **Actions** $a \in$ {up, right, down, left}.
* **Transitions** $p(s'\mid s,a)$: the floor is slippery — with probability $0.8$ you move where you wanted,
  with $0.1$ each you slip to one of the two perpendicular directions; bumping into a wall or the border leaves
  you in place. (`GridWorld(slip=0.0)` is the deterministic version.)
* **Rewards** $r(s,a,s')$: $+1$ for entering G, $-1$ for entering P, $-0.1$ otherwise. The Bellman equations only
  need the expected immediate reward $r(s,a)=\sum_{s'} p(s'\mid s,a)\,r(s,a,s')$.
* **Discount** $\gamma = 0.9$.

`env.P` has shape `[S, A, S]` and `env.R` shape `[S, A]`.
"""),
    ("code", r"""
env = GridWorld()  # slip=0.2, gamma=0.9, step_reward=-0.1
S, A, gamma = env.n_states, env.n_actions, env.gamma
nonterminal = ~env.terminal
print("\n".join(env.layout))
print(f"{S} states, {A} actions, gamma={gamma}, slip={env.slip}")

s = env.start
print(f"\nfrom the start cell {env.cells[s]}:")
for a, name in enumerate(ACTIONS):
    successors = {env.cells[j]: round(float(p), 2) for j, p in enumerate(env.P[s, a]) if p > 0}
    print(f"  {name:>5}: p(s'|s,a) = {successors}   r(s,a) = {env.R[s, a]:+.3f}")

assert np.allclose(env.P.sum(axis=-1), 1.0)  # every (s, a) row is a probability distribution
"""),
    ("md", r"""
## 2. Policy evaluation: the Bellman expectation equation

From the notes, for a policy $\pi(a\mid s)$:

$$V^{\pi}(s) = \mathbb{E}_{\pi}\left[R_{t+1} + \gamma V^{\pi}(S_{t+1}) \mid S_t = s\right]
= \sum_a \pi(a\mid s)\Big[r(s,a) + \gamma \sum_{s'} p(s'\mid s,a)\, V^\pi(s')\Big].$$

Averaging the model over the policy, $R_\pi(s)=\sum_a \pi(a|s)\,r(s,a)$ and
$P_\pi(s,s')=\sum_a \pi(a|s)\,p(s'|s,a)$, turns this into a *linear* system

$$V^\pi = R_\pi + \gamma P_\pi V^\pi \quad\Longleftrightarrow\quad (I-\gamma P_\pi)\,V^\pi = R_\pi ,$$

which we can solve in two ways:

* **exactly**, with `np.linalg.solve` ($I-\gamma P_\pi$ is invertible for $\gamma<1$);
* **iteratively**, applying the Bellman operator $T^\pi V = R_\pi + \gamma P_\pi V$ until nothing changes.
  $T^\pi$ is a $\gamma$-contraction in the max-norm, so the error shrinks at least by a factor $\gamma$ per sweep:
  $\|V_k - V^\pi\|_\infty \le \gamma^k \|V_0 - V^\pi\|_\infty$.

We evaluate the uniformly random policy.
"""),
    ("code", r"""
def policy_matrices(env, pi):
    # pi: [S, A] action probabilities  ->  P_pi [S, S], R_pi [S]
    P_pi = np.einsum("sa,sat->st", pi, env.P)
    R_pi = (pi * env.R).sum(axis=1)
    return P_pi, R_pi


def evaluate_exact(env, pi):
    P_pi, R_pi = policy_matrices(env, pi)
    return np.linalg.solve(np.eye(env.n_states) - env.gamma * P_pi, R_pi)


def evaluate_iterative(env, pi, tol=1e-12, max_iter=10_000):
    P_pi, R_pi = policy_matrices(env, pi)
    V = np.zeros(env.n_states)
    history = [V]
    for _ in range(max_iter):
        V_new = R_pi + env.gamma * P_pi @ V  # one application of the Bellman expectation operator
        history.append(V_new)
        if np.max(np.abs(V_new - V)) < tol:
            break
        V = V_new
    return V_new, history


pi_random = np.full((S, A), 1.0 / A)
V_exact = evaluate_exact(env, pi_random)
V_iter, history = evaluate_iterative(env, pi_random)

print(f"iterative evaluation converged after {len(history) - 1} sweeps")
print("V^pi (random policy), exact solve:\n", env.to_grid(V_exact))
max_diff = np.max(np.abs(V_iter - V_exact))
print(f"max |V_iter - V_exact| = {max_diff:.2e}")
assert max_diff < 1e-8
"""),
    ("code", r"""
errors = np.array([np.max(np.abs(V - V_exact)) for V in history])
k = np.arange(len(errors))
bound = gamma**k * errors[0]
assert np.all(errors <= bound + 1e-12), "T^pi must be a gamma-contraction"

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.semilogy(k, errors, label=r"$\|V_k - V^\pi\|_\infty$")
ax.semilogy(k, bound, "--", label=r"bound $\gamma^k \|V_0 - V^\pi\|_\infty$")
ax.set_xlabel("sweep k")
ax.set_ylabel("max-norm error")
ax.set_title("Iterative policy evaluation contracts")
ax.legend()
plt.show()
"""),
    ("md", r"""
The notes write $V^\pi$ as an **expectation** over trajectories. A Monte Carlo estimate — average the discounted
return of many episodes that follow $\pi$ from the start cell — must therefore land on the same number, up to
sampling error. (Monte Carlo needs only samples, not $P$ and $R$; that idea returns in notebook 02.)
"""),
    ("code", r"""
rng = np.random.default_rng(0)


def rollout_return(env, pi, s, rng, horizon=200):
    # discounted return of one episode; gamma**200 ~ 7e-10, so truncation is negligible
    G, discount = 0.0, 1.0
    for _ in range(horizon):
        a = rng.choice(env.n_actions, p=pi[s])
        s, r, done = env.step(s, a, rng)
        G += discount * r
        discount *= env.gamma
        if done:
            break
    return G


returns = np.array([rollout_return(env, pi_random, env.start, rng) for _ in range(1000)])
mc, se = returns.mean(), returns.std(ddof=1) / np.sqrt(len(returns))
print(f"Monte Carlo V^pi(start) = {mc:.4f} +- {se:.4f}   exact = {V_exact[env.start]:.4f}")
assert abs(mc - V_exact[env.start]) < 4 * se
"""),
    ("md", r"""
## 3. From $V^\pi$ to $Q^\pi$

The notes' action-value equation looks one step ahead from a *fixed* first action:

$$Q^{\pi}(s, a) = r(s, a) + \gamma \sum_{s'}p(s' \mid s, a)\,V^{\pi}(s').$$

Averaging over the policy's first action gives back $V^\pi(s) = \sum_a \pi(a|s)\,Q^\pi(s,a)$ — a useful check.
"""),
    ("code", r"""
def q_from_v(env, V):
    # Q(s,a) = r(s,a) + gamma * sum_s' p(s'|s,a) V(s')
    return env.R + env.gamma * env.P @ V


Q_random = q_from_v(env, V_exact)
print("Q^pi at the start cell:", {name: round(float(q), 3) for name, q in zip(ACTIONS, Q_random[env.start])})
assert np.allclose((pi_random * Q_random).sum(axis=1), V_exact, atol=1e-10)
"""),
    ("md", r"""
## 4. Value iteration: the Bellman optimality equation

The optimal value function satisfies the **Bellman optimality equation** — the expectation over the policy's
action is replaced by a max:

$$V^*(s) = \max_a \Big[r(s,a) + \gamma \sum_{s'} p(s'\mid s,a)\, V^*(s')\Big] = \max_a Q^*(s,a).$$

This is no longer linear, but the operator $T^*V = \max_a[r + \gamma P V]$ is still a $\gamma$-contraction, so it has
exactly one fixed point and iterating it from *any* start converges there. That is **value iteration**. We stop
when the Bellman residual $\|T^*V - V\|_\infty$ is below $10^{-10}$, then verify the fixed point separately.
"""),
    ("code", r"""
def bellman_optimality(env, V):
    return q_from_v(env, V).max(axis=1)


def value_iteration(env, V0=None, tol=1e-10, max_iter=10_000):
    V = np.zeros(env.n_states) if V0 is None else V0.copy()
    residuals = []
    for _ in range(max_iter):
        V_new = bellman_optimality(env, V)
        residuals.append(np.max(np.abs(V_new - V)))
        V = V_new
        if residuals[-1] < tol:
            break
    return V, residuals


V_star, residuals = value_iteration(env)
print(f"value iteration: {len(residuals)} sweeps")
print("V*:\n", env.to_grid(V_star))

# the fixed point, checked numerically: applying T* once more changes nothing
optimality_residual = np.max(np.abs(bellman_optimality(env, V_star) - V_star))
print(f"Bellman optimality residual ||T*V* - V*|| = {optimality_residual:.2e}")
assert optimality_residual < 1e-8

# ... and it is *the* fixed point: starting from a wild random V0 lands on the same V* (terminals stay at 0)
V0 = np.random.default_rng(1).normal(scale=10.0, size=S) * nonterminal
V_star_2, _ = value_iteration(env, V0=V0)
assert np.max(np.abs(V_star_2 - V_star)) < 1e-8
# the optimal values dominate the random policy's values in every state
assert np.all(V_star >= V_exact - 1e-12)
"""),
    ("md", r"""
## 5. The greedy policy of $V^*$ is optimal

Acting greedily with respect to $Q^* = r + \gamma P V^*$ gives a deterministic policy $\pi^*(s)=\arg\max_a Q^*(s,a)$.
Two independent checks that it is optimal:

* evaluating $\pi^*$ exactly (section 2) must give back $V^*$;
* **policy iteration** — alternate exact evaluation and greedy improvement, starting from "always go up" —
  must stop at the same policy. Policy iteration never looks at $V^*$, and it terminates only when its policy is
  greedy with respect to its own value function, i.e. when it satisfies the Bellman optimality equation.

The *gap* between the best and second-best action tells us whether the optimal action is unique (so that
comparing policies action-by-action is meaningful).
"""),
    ("code", r"""
Q_star = q_from_v(env, V_star)
pi_star = Q_star.argmax(axis=1)
sorted_q = np.sort(Q_star, axis=1)
action_gap = (sorted_q[:, -1] - sorted_q[:, -2])[nonterminal]
print(f"smallest gap between best and second-best action: {action_gap.min():.3f} (> 0: unique optimal actions)")
assert action_gap.min() > 1e-3

one_hot = np.eye(A)
V_pi_star = evaluate_exact(env, one_hot[pi_star])
assert np.max(np.abs(V_pi_star - V_star)) < 1e-8


def policy_iteration(env):
    pi = np.zeros(env.n_states, dtype=int)  # start from "always up"
    for it in range(1, 100):
        V = evaluate_exact(env, np.eye(env.n_actions)[pi])  # policy evaluation
        new_pi = q_from_v(env, V).argmax(axis=1)  # greedy policy improvement
        if np.array_equal(new_pi, pi):
            return pi, V, it
        pi = new_pi
    raise RuntimeError("policy iteration did not converge")


pi_pi, V_pi, n_pi = policy_iteration(env)
print(f"policy iteration converged after {n_pi} improvements")
print("greedy(V*):            policy iteration:")
for row_vi, row_pi in zip(env.render_policy(pi_star).split("\n"), env.render_policy(pi_pi).split("\n")):
    print(f"  {row_vi}                 {row_pi}")
assert np.array_equal(pi_pi[nonterminal], pi_star[nonterminal])
assert np.max(np.abs(V_pi - V_star)) < 1e-8
"""),
    ("md", r"""
## 6. Picture: $V^*$ with the greedy arrows

Left, the random policy's $V^\pi$; middle, $V^*$ of the slippery world with $\pi^*$; right, the deterministic
world (`slip=0`) for comparison. All three share one colour scale; G and P are coloured by the reward for entering
them.

Every state is worth less on ice: slipping costs extra steps and sometimes drops you into the pit. It also changes
*what* is optimal. From the top-left cell, the route along the top row and the route down through the corridor
both take six steps, and on dry floor they tie exactly. On ice the top-left cell heads **down**: the top route
passes the pit twice (a slip while moving right in the cell above P, or while moving down in the cell to its right,
drops you in), the corridor route only once (moving right in the cell below P). (With `slip=0` many actions
tie, and `argmax` just shows the first of them.)
"""),
    ("code", r"""
env_dry = GridWorld(slip=0.0)
V_dry, _ = value_iteration(env_dry)
Q_dry = q_from_v(env_dry, V_dry)
pi_dry = Q_dry.argmax(axis=1)
assert np.all(V_dry >= V_star - 1e-12)  # slipping never helps here

top_left = env.index[(0, 0)]
UP, RIGHT, DOWN, LEFT = range(4)
print(f"dry: Q*(top-left, right) = {Q_dry[top_left, RIGHT]:.4f}, Q*(top-left, down) = {Q_dry[top_left, DOWN]:.4f}")
print(f"ice: Q*(top-left, right) = {Q_star[top_left, RIGHT]:.4f}, Q*(top-left, down) = {Q_star[top_left, DOWN]:.4f}")
assert abs(Q_dry[top_left, RIGHT] - Q_dry[top_left, DOWN]) < 1e-12  # a tie on dry floor
assert pi_star[top_left] == DOWN  # on ice: the route that passes the pit only once
n_tied = int(((Q_dry >= Q_dry.max(axis=1, keepdims=True) - 1e-12).sum(axis=1) > 1)[nonterminal].sum())
print(f"dry floor: {n_tied} of {int(nonterminal.sum())} states have several optimal actions")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
env.plot(axes[0], V_exact, title=r"$V^\pi$, uniform random policy")
env.plot(axes[1], V_star, pi_star, title=r"$V^*$ and greedy $\pi^*$ (slip=0.2)")
im = env_dry.plot(axes[2], V_dry, pi_dry, title=r"$V^*$ and greedy $\pi^*$ (slip=0)")
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()
"""),
    ("md", r"""
## Takeaways, and the road to language models

* The Bellman **expectation** equation is linear in $V^\pi$: solve it exactly or iterate it; both give the same
  answer, and so does averaging sampled returns.
* The Bellman **optimality** equation has a unique fixed point $V^*$; value iteration finds it, and the greedy
  policy of $V^*$ is optimal (policy iteration agrees).
* Everything here used the model $P, R$. **Notebook 02** drops the model and learns $Q^*$ from sampled transitions
  with Q-learning.

For an LLM the "state" is the prompt plus the tokens generated so far, the "action" is the next token, transitions
are deterministic (append the token) and the reward usually arrives at the end of the sequence ($\gamma=1$ is
common). The state space is astronomically large, so tables like `V_star` are impossible; instead we parametrise
the policy $\pi_\theta$ and follow the policy gradient — **notebook 03**.
"""),
]
