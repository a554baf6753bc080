"""The bit allocator: the budget used as fully as the widths allow, bits where they buy the
most, and the same optimum as brute-force enumeration of every plan."""

import itertools
import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.quant.bit_alloc_core import allocate_bits, kl_bits_per_window, mean_bits

WIDTHS = (2, 3, 4, 8)


def _convex_table(n, scale=1.0):
    """A damage falling with width as RTN's does: about 4x per bit."""
    return np.array([[scale * 4.0 ** -w for w in WIDTHS]] * n)


def _brute_force(params, widths, s, budget):
    """(total, damage) of the best plan by enumerating all |W|^n plans."""
    cap = Fraction(str(budget)) * sum(params)
    best = None
    for plan in itertools.product(range(len(widths)), repeat=len(params)):
        total = sum(p * widths[k] for p, k in zip(params, plan))
        if total > cap:
            continue
        key = (-total, sum(Fraction(float(s[i, k])) for i, k in enumerate(plan)))
        best = key if best is None or key < best else best
    return -best[0], best[1]


@pytest.mark.parametrize("params,budget,expected_mean", [
    ([100] * 4, 3.5, Fraction(7, 2)),  # 14 bits over 4 equal blocks: exact
    ([100] * 4, 3.0, Fraction(3)),
    ([100] * 5, 3.3, Fraction(16, 5)),  # 16.5 bits is impossible: 16 is the closest below
    ([100] * 3, 2.9, Fraction(8, 3)),  # 8.7 -> 8
    ([300, 100, 200], 3.5, Fraction(7, 2)),  # 2100 weight-bits: 300*4 + 100*3 + 200*3
    ([65536, 196608, 65536, 196608], 2.75, Fraction(11, 4)),
    ([100] * 4, 9.0, Fraction(8)),  # above the widest width: everything at 8
])
def test_the_plan_meets_the_budget_exactly_or_closest_below(params, budget, expected_mean):
    rng = np.random.default_rng(0)
    s = _convex_table(len(params)) * rng.uniform(0.5, 2.0, (len(params), 1))
    plan = allocate_bits(params, WIDTHS, s, budget)
    assert len(plan) == len(params) and set(plan) <= set(WIDTHS)
    assert mean_bits(params, plan) == expected_mean
    assert mean_bits(params, plan) <= Fraction(str(budget))


@pytest.mark.parametrize("budget,expected", [(3.0, 3), (4.0, 4), (2.0, 2), (8.0, 8)])
def test_equal_sensitivities_give_the_uniform_plan(budget, expected):
    assert allocate_bits([100] * 6, WIDTHS, _convex_table(6), budget) == (expected,) * 6
    # and with no damage difference at all, the evenness key still picks the uniform plan
    assert allocate_bits([100] * 6, WIDTHS, np.zeros((6, 4)), budget) == (expected,) * 6


def test_the_most_sensitive_block_gets_the_most_bits():
    s = _convex_table(4)
    s[2] *= 1000.0
    plan = allocate_bits([100] * 4, WIDTHS, s, 3.5)
    assert plan[2] == max(plan) and plan[2] > min(plan)
    assert sum(plan) == 14
    s[2] *= 1e6  # so sensitive that 8 bits beat anything else the budget buys
    assert allocate_bits([100] * 4, WIDTHS, s, 3.5)[2] == 8


def test_the_extra_bits_go_where_they_remove_the_most_damage():
    s = _convex_table(4) * np.array([[1.0], [10.0], [3.0], [30.0]])
    assert allocate_bits([100] * 4, WIDTHS, s, 2.0) == (2, 2, 2, 2)
    # two bits to spend: 2 -> 3 on the 10x and 30x blocks removes (10 + 30) * 3/64, more
    # than 2 -> 4 on the 30x block alone (30 * 15/256) or any other choice
    assert allocate_bits([100] * 4, WIDTHS, s, 2.5) == (2, 3, 2, 3)
    assert allocate_bits([100] * 4, WIDTHS, s, 4.0) == (4, 4, 4, 4)


@pytest.mark.parametrize("seed", range(6))
def test_equals_brute_force_on_small_cases(seed):
    rng = np.random.default_rng(seed)
    widths = (2, 3, 4)
    params = [int(p) for p in rng.choice([64, 128, 192, 256], 4)]
    # random damages, not monotone in width and with ties, to exercise every key
    s = np.round(rng.exponential(1.0, (4, 3)), 1)
    for budget in (2.0, 2.4, 2.75, 3.0, 3.3, 3.9):
        plan = allocate_bits(params, widths, s, budget)
        total = sum(p * b for p, b in zip(params, plan))
        damage = sum(Fraction(float(s[i, widths.index(b)])) for i, b in enumerate(plan))
        assert (total, damage) == _brute_force(params, widths, s, budget), (budget, plan)


def test_refuses_what_no_plan_fits():
    with pytest.raises(ValueError, match="below the smallest candidate width"):
        allocate_bits([100] * 2, WIDTHS, _convex_table(2), 1.5)
    with pytest.raises(ValueError, match="shape"):
        allocate_bits([100] * 2, WIDTHS, _convex_table(3), 3.0)
    with pytest.raises(ValueError, match="finite"):
        allocate_bits([100], WIDTHS, np.array([[np.nan, 1.0, 1.0, 1.0]]), 3.0)


def test_kl_bits_per_window_is_the_mean_kl_over_positions_in_bits():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))  # 3 positions, 5 tokens
    got = np.asarray(kl_bits_per_window(jnp.asarray(a[None]), jnp.asarray(b[None])))
    pa = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    expected = (pa * np.log(pa / pb)).sum() / (a.shape[0] * math.log(2))
    np.testing.assert_allclose(got, [expected], rtol=1e-5)
    assert float(kl_bits_per_window(jnp.asarray(a[None]), jnp.asarray(a[None]))[0]) == 0.0
