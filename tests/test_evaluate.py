"""pass@k and win rate against their closed forms on hand-built sets."""

from __future__ import annotations

from math import comb

import pytest

from src.evaluate import mean_pass_at_k, pass_at_k, win_rate


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (10, 0, 3), (5, 5, 2), (20, 7, 8), (4, 1, 4), (3, 1, 3)])
def test_pass_at_k_is_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2) = 1/6
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    # three problems, 4 samples each: (1 − 1/6) + 0 + 1, averaged
    flags = [[True, False, True, False], [False] * 4, [True, True, True, False]]
    assert mean_pass_at_k(flags, 2) == pytest.approx((5 / 6 + 0 + 1) / 3)


def test_pass_at_k_refuses_bad_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.5, 0.2, 0.0], [0.0, 0.5, 0.3, 0.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    same = [0.1, 0.7, 0.3]
    assert win_rate(same, same) == 0.5
    with pytest.raises(ValueError, match="equally many"):
        win_rate([1.0], [1.0, 2.0])
