"""Evaluation metrics a paper reports, as pure functions: pass@k (Chen et al. 2021) and win rate (ties half)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` are correct (Chen et al. 2021, "Evaluating
    Large Language Models Trained on Code", eq. 1): ``1 − C(n−c, k) / C(n, k)``, computed as the stable product
    ``1 − Π_{i=n−c+1}^{n} (1 − k/i)``. Needs ``n ≥ k``; ``n − c < k`` gives 1."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (samples per prompt), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(samples: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``samples[i]`` are the correctness flags of problem ``i``'s ``n_i`` samples."""
    if not samples:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(pass_at_k(len(s), sum(bool(x) for x in s), k) for s in samples) / len(samples)


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> float:
    """Fraction of prompts where the policy's score beats the reference's, ties counted half (AlpacaEval's
    convention; TRL's ``WinRateCallback`` counts a judge's preference the same way)."""
    if len(policy) != len(reference) or not policy:
        raise ValueError(f"win_rate: need equally many (> 0) scores, got {len(policy)} and {len(reference)}")
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference))
    return wins / len(policy)
