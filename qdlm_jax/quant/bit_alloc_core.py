"""Mixed-precision bit allocation: which width each part of a model gets under a mean budget.

Parts i = 1..n (the transformer blocks) hold p_i linear weights. S_i(b) is the damage of
quantizing part i alone at width b (the model's output KL to fp, `kl_bits_per_window`), and
the damage of a plan is taken as the sum of its parts' damages (the additive first-order
model of mixed-precision allocation, as in HAWQ-v2). With candidate widths W and a budget B
(mean bits per linear weight, parameter-weighted), a plan b = (b_1, ..., b_n), b_i in W, is

    feasible  iff  sum_i p_i b_i <= B sum_i p_i

and `allocate_bits` returns the feasible plan that is best in this order (lexicographic):

    1. largest  sum_i p_i b_i         the mean width as close to B as the widths allow
    2. smallest sum_i S_i(b_i)        the bits go where they remove the most damage
    3. smallest sum_i p_i b_i^2       of equally damaging plans, the most even one
    4. the one found first             (deterministic; ties this deep are exact duplicates)

Algorithm: an exact dynamic programme over the weighted total (a multiple-choice knapsack).
Costs become integers c_i(b) = p_i b / g with g = gcd of all p_i b, the capacity is
C = floor(B sum_i p_i / g) with B read as the exact decimal it is written as (3.5 = 7/2), and

    best_0 = {0: (0, 0)}
    best_i[t + c_i(b)] = min over (t, b) of best_{i-1}[t] + (S_i(b), p_i b_i^2),  t + c_i(b) <= C

keeps, for every reachable total, the lexicographically best (damage, evenness) pair; the
answer is the largest reachable total's entry, traced back. Both keys are sums over parts, so
the best plan's restriction to parts 1..i is the best for its own total (optimal
substructure) and the programme is exact: its plan is optimal over all |W|^n plans (the tests
compare it with brute-force enumeration). Damages are added as exact rationals (every float
is one), so equal sums compare equal whatever the order of addition. Work: O(n |W| R) with
R <= C + 1 reachable totals; for parts of one size p (the blocks of a dense model)
g = p gcd(W) and C = floor(n B / gcd(W)), a few hundred totals for an 80-block model.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

LN2 = math.log(2.0)


def kl_bits_per_window(logits_ref: Float[Array, "N T V"],
                       logits: Float[Array, "N T V"]) -> Float[Array, " N"]:
    """Mean KL(p_ref || p) over the positions of each window, in bits:

        KL_n = 1 / (T ln 2) sum_t sum_v p_ref[n, t, v] (log p_ref[n, t, v] - log p[n, t, v])

    with p = softmax over the vocabulary (fp32); the job's `KL to FP` column averages the
    same quantity over its held-out windows."""
    a = jax.nn.log_softmax(logits_ref.astype(jnp.float32), axis=-1)
    b = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(a) * (a - b), axis=(1, 2)) / (logits_ref.shape[1] * LN2)


def mean_bits(params: Sequence[int], bits: Sequence[int]) -> Fraction:
    """The parameter-weighted mean width sum_i p_i b_i / sum_i p_i, exactly."""
    return Fraction(sum(int(p) * int(b) for p, b in zip(params, bits)), sum(map(int, params)))


def _checked(params, widths, sensitivity, budget):
    params = [int(p) for p in params]
    widths = [int(w) for w in widths]
    s = np.asarray(sensitivity, np.float64)
    if not params or min(params) <= 0:
        raise ValueError(f"params={params}: expected one positive weight count per part")
    if not widths or min(widths) <= 0 or len(set(widths)) != len(widths):
        raise ValueError(f"widths={widths}: expected distinct positive widths")
    if s.shape != (len(params), len(widths)):
        raise ValueError(f"sensitivity has shape {s.shape}, expected (parts, widths) = "
                         f"{(len(params), len(widths))}")
    if not np.all(np.isfinite(s)):
        raise ValueError("sensitivity: every entry must be finite")
    b = Fraction(str(budget))
    if b < min(widths):
        raise ValueError(f"budget={budget}: below the smallest candidate width "
                         f"{min(widths)}, no plan fits; raise the budget or add a narrower "
                         "width")
    return params, widths, s, b


def allocate_bits(params: Sequence[int], widths: Sequence[int],
                  sensitivity: Float[np.ndarray, "parts widths"],
                  budget: float) -> tuple[int, ...]:
    """The plan (one width per part) of the module docstring: mean width <= `budget` and as
    close to it as the widths allow, then the least total damage, then the most even.
    `sensitivity[i, k]` is part i's damage at `widths[k]`. Raises ValueError when no plan
    fits (a budget below the smallest width) or an input is malformed."""
    params, widths, s, b = _checked(params, widths, sensitivity, budget)
    costs = [[p * w for w in widths] for p in params]
    g = math.gcd(*[c for row in costs for c in row])
    cap = math.floor(b * sum(params) / g)
    units = [[c // g for c in row] for row in costs]
    # The cheapest completion of parts i.. : a total above cap - rest[i] cannot finish.
    rest = [sum(min(row) for row in units[i:]) for i in range(len(units) + 1)]
    best = {0: (Fraction(0), 0)}
    back = []  # back[i][t] = (total before part i, index of part i's width)
    for i, p in enumerate(params):
        nxt, how = {}, {}
        for t, (dmg, even) in best.items():
            for k, w in enumerate(widths):
                t2 = t + units[i][k]
                if t2 + rest[i + 1] > cap:
                    continue
                key = (dmg + Fraction(float(s[i, k])), even + p * w * w)
                if t2 not in nxt or key < nxt[t2]:
                    nxt[t2], how[t2] = key, (t, k)
        best = nxt
        back.append(how)
    t = max(best)
    plan = []
    for how in reversed(back):
        t, k = how[t]
        plan.append(widths[k])
    return tuple(reversed(plan))


__all__ = ["allocate_bits", "kl_bits_per_window", "mean_bits"]
