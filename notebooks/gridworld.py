"""A tiny tabular gridworld shared by notebooks 01 and 02 (numpy only, no gym).

Layout characters::

    .  free cell            S  start cell (also free)
    #  wall (not a state)   G  goal: entering it pays +1 and ends the episode
    P  pit: entering it pays -1 and ends the episode

Dynamics. Actions are 0=up, 1=right, 2=down, 3=left. With probability ``1 - slip`` the agent moves in the
chosen direction; with probability ``slip / 2`` each it slips to one of the two perpendicular directions.
Moving into a wall or off the grid leaves the agent where it is. ``slip=0`` gives deterministic transitions.

Rewards. A transition into G pays ``goal_reward``, into P pays ``pit_reward``, anything else pays
``step_reward``. G and P are absorbing terminal states: every action keeps you there with reward 0, so
V(G) = V(P) = 0 and the MDP can be written with ordinary (non-episodic) matrices.

The model is exposed as matrices, the form the Bellman equations use:

    P[s, a, s'] = p(s' | s, a)          shape [S, A, S]
    R[s, a]     = sum_s' P[s, a, s'] r(s, a, s')   shape [S, A]   (expected immediate reward)
"""

from __future__ import annotations

import numpy as np

ACTIONS = ("up", "right", "down", "left")
ARROWS = ("\u2191", "\u2192", "\u2193", "\u2190")
DELTAS = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (d_row, d_col)

DEFAULT_LAYOUT = (
    ".....",
    ".##P.",
    "S...G",
    ".....",
)


class GridWorld:
    def __init__(self, layout=DEFAULT_LAYOUT, *, slip=0.2, gamma=0.9, step_reward=-0.1,
                 goal_reward=1.0, pit_reward=-1.0):
        self.layout = tuple(layout)
        self.n_rows, self.n_cols = len(layout), len(layout[0])
        self.slip, self.gamma = slip, gamma
        self.step_reward, self.goal_reward, self.pit_reward = step_reward, goal_reward, pit_reward

        # states = non-wall cells, numbered row-major
        self.cells = [(r, c) for r in range(self.n_rows) for c in range(self.n_cols) if layout[r][c] != "#"]
        self.index = {cell: i for i, cell in enumerate(self.cells)}
        self.n_states, self.n_actions = len(self.cells), len(ACTIONS)
        kinds = [layout[r][c] for r, c in self.cells]
        self.terminal = np.array([k in "GP" for k in kinds])
        self.start = kinds.index("S") if "S" in kinds else 0

        S, A = self.n_states, self.n_actions
        self.P = np.zeros((S, A, S))
        self.r_next = np.array([goal_reward if k == "G" else pit_reward if k == "P" else step_reward
                                for k in kinds])  # reward for *entering* each state
        self.R = np.zeros((S, A))
        for s, cell in enumerate(self.cells):
            if self.terminal[s]:
                self.P[s, :, s] = 1.0  # absorbing, reward 0
                continue
            for a in range(A):
                for direction, prob in ((a, 1 - slip), ((a + 1) % 4, slip / 2), ((a + 3) % 4, slip / 2)):
                    if prob > 0:
                        self.P[s, a, self._move(cell, direction)] += prob
                self.R[s, a] = self.P[s, a] @ self.r_next
        self._cumP = np.cumsum(self.P, axis=-1)

    def _move(self, cell, direction):
        r, c = cell[0] + DELTAS[direction][0], cell[1] + DELTAS[direction][1]
        if 0 <= r < self.n_rows and 0 <= c < self.n_cols and self.layout[r][c] != "#":
            return self.index[(r, c)]
        return self.index[cell]

    # ---- sampling interface (used by Q-learning, which must NOT look at P and R) ----
    def step(self, s, a, rng):
        """Sample one transition: returns (s_next, reward, done)."""
        s_next = int(np.searchsorted(self._cumP[s, a], rng.random() * self._cumP[s, a, -1], side="right"))
        s_next = min(s_next, self.n_states - 1)
        return s_next, float(self.r_next[s_next]), bool(self.terminal[s_next])

    # ---- display helpers ----
    def to_grid(self, values, fill=np.nan):
        """Scatter a per-state vector into a [rows, cols] array (walls get ``fill``)."""
        grid = np.full((self.n_rows, self.n_cols), fill, dtype=float)
        for s, (r, c) in enumerate(self.cells):
            grid[r, c] = values[s]
        return grid + 0.0  # turn -0.0 into 0.0 for printing

    def render_policy(self, policy):
        """Text picture of a deterministic policy (array of action ids)."""
        rows = []
        for r in range(self.n_rows):
            row = ""
            for c in range(self.n_cols):
                ch = self.layout[r][c]
                row += ch if ch in "#GP" else ARROWS[policy[self.index[(r, c)]]]
            rows.append(row)
        return "\n".join(rows)

    def plot(self, ax, values, policy=None, title=None, vmin=-1.0, vmax=1.0, cmap="RdYlGn"):
        """Heatmap of a state-value vector with arrows for a deterministic ``policy`` (array of action ids).

        All panels share the colour scale [vmin, vmax]; G and P are coloured by the reward for entering them,
        walls are grey.
        """
        colour_values = np.where(self.terminal, self.r_next, values)
        im = ax.imshow(np.ma.masked_invalid(self.to_grid(colour_values)), cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_facecolor("0.35")  # walls
        for s, (r, c) in enumerate(self.cells):
            kind = self.layout[r][c]
            if kind in "GP":
                ax.text(c, r, kind, ha="center", va="center", fontsize=15, weight="bold")
                continue
            if policy is not None:
                dr, dc = DELTAS[policy[s]]
                ax.annotate("", xy=(c + 0.3 * dc, r - 0.1 + 0.3 * dr), xytext=(c - 0.3 * dc, r - 0.1 - 0.3 * dr),
                            arrowprops=dict(arrowstyle="-|>", color="black", lw=1.5))
            ax.text(c, r + 0.33, f"{values[s]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title)
        return im


def value_iteration(env, tol=1e-12, max_iter=10_000):
    """V_{k+1}(s) = max_a [R(s,a) + gamma * sum_s' P(s'|s,a) V_k(s')] until the sup-norm change < tol."""
    V = np.zeros(env.n_states)
    for it in range(1, max_iter + 1):
        V_new = (env.R + env.gamma * env.P @ V).max(axis=1)
        if np.max(np.abs(V_new - V)) < tol:
            return V_new, it
        V = V_new
    return V, max_iter


def q_from_v(env, V):
    """Q(s,a) = r(s,a) + gamma * sum_s' p(s'|s,a) V(s')   (the notes' action-value Bellman equation)."""
    return env.R + env.gamma * env.P @ V
