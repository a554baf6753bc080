"""Per-expert GPTQ against a plain NumPy statement of the routing and the Hessians: each
expert's gram over the (token, choice) rows routed to it, for the experts' input (the token)
and for the down projection's input (the expert's own intermediate), then the project's GPTQ
core run expert by expert; with an expert that sees many rows, one with a single row and one
with none, under both thin-expert rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.models.experts import gelu_tanh, grouped_matmul, sort_by_expert
from qdlm_jax.quant.gptq_core import gptq
from qdlm_jax.quant.gptq_experts_core import ThinExperts, expert_grams, gptq_experts

E, D, INTER, N = 4, 32, 16, 40
SPEC = dict(bits=4, group_size=16, sym=False, block_size=16)


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x[:, 3] *= 8  # an outlier input channel: GPTQ's Hessian matters
    gate_up = (rng.standard_normal((E, D, 2 * INTER)) / np.sqrt(D)).astype(np.float32)
    # expert 0 and 1 for every token but one, which picks 0 and 2: counts 40, 39, 1, 0
    top = np.tile([0, 1], (N, 1))
    top[7] = [0, 2]
    return x, gate_up, top


def _numpy_grams(rows_of):
    """{e: (gram, count)} from {e: list of rows}, in float64."""
    out = {}
    for e in range(E):
        rows = np.asarray(rows_of[e], np.float64).reshape(-1, rows_of["dim"])
        out[e] = (rows.T @ rows, rows.shape[0])
    return out


def _numpy_routed(x, gate_up, top):
    """Rows routed to each expert: the token (gate_up input) and act(gate) * up (down input)."""
    xs = {"dim": D, **{e: [] for e in range(E)}}
    inter = {"dim": INTER, **{e: [] for e in range(E)}}
    for t in range(N):
        for e in top[t]:
            xs[e].append(x[t])
            h = x[t].astype(np.float64) @ gate_up[e].astype(np.float64)
            gate = np.asarray(gelu_tanh(jnp.asarray(h[:INTER], jnp.float32)), np.float64)
            inter[e].append(gate * h[INTER:])
    return xs, inter


def _ours_routed(x, gate_up, top):
    _, token, sizes = sort_by_expert(jnp.asarray(top, jnp.int32), E)
    rows = jnp.asarray(x)[token]
    h = grouped_matmul(rows, jnp.asarray(gate_up), sizes)
    return rows, gelu_tanh(h[:, :INTER]) * h[:, INTER:], sizes


def test_grams_equal_numpy_for_both_projections(layer):
    x, gate_up, top = layer
    xs, inter = _numpy_routed(x, gate_up, top)
    rows, a, sizes = _ours_routed(x, gate_up, top)
    for ours_rows, ref_rows in ((rows, xs), (a, inter)):
        grams, counts = expert_grams(ours_rows, sizes)
        ref = _numpy_grams(ref_rows)
        assert [int(c) for c in counts] == [ref[e][1] for e in range(E)] == [40, 39, 1, 0]
        for e in range(E):
            np.testing.assert_allclose(np.asarray(grams[e]), ref[e][0], rtol=2e-5,
                                       atol=2e-4 * max(1.0, np.abs(ref[e][0]).max()))


def _reference(w, ref, rule, damp=0.01, all_gram=None):
    """gptq_core.gptq expert by expert with the Hessians the rule states (NumPy)."""
    out = []
    for e in range(E):
        gram, n = ref[e]
        if n >= rule.min_rows:
            h, d = 2 * gram / n, damp
        elif rule.fallback == "all_tokens":
            h, d = 2 * all_gram / N, damp
        elif n == 0:
            h, d = np.eye(gram.shape[0]), rule.thin_damp
        else:
            h, d = 2 * gram / n, rule.thin_damp
        out.append(gptq(jnp.asarray(w[e]), jnp.asarray(h, jnp.float32), damp=d, **SPEC))
    return out


@pytest.mark.parametrize("fallback", ["damp", "all_tokens"])
def test_per_expert_gptq_equals_the_core_run_expert_by_expert(layer, fallback):
    x, gate_up, top = layer
    xs, _ = _numpy_routed(x, gate_up, top)
    ref = _numpy_grams(xs)
    rows, _, sizes = _ours_routed(x, gate_up, top)
    grams, counts = expert_grams(rows, sizes)
    w = np.swapaxes(gate_up, 1, 2)  # [E, out, in]: the paper orientation GPTQ takes
    rule = ThinExperts(min_rows=16, fallback=fallback, thin_damp=0.2)
    all_grams = jnp.broadcast_to(jnp.asarray(x.T @ x), (E, D, D))  # every token, each expert
    ours, how = gptq_experts(w, grams, counts, rule=rule, all_grams=all_grams,
                             all_counts=jnp.full((E,), N), **SPEC)
    want = _reference(w, ref, rule, all_gram=x.astype(np.float64).T @ x)
    assert how == (["routed", "routed", "thin-damped", "thin-identity"] if fallback == "damp"
                   else ["routed", "routed", "thin-all-tokens", "thin-all-tokens"])
    for e in range(E):
        np.testing.assert_array_equal(np.asarray(ours[e].codes), np.asarray(want[e].codes),
                                      err_msg=f"expert {e}")
        np.testing.assert_allclose(np.asarray(ours[e].scales), np.asarray(want[e].scales),
                                   rtol=1e-6)


def test_an_expert_without_rows_is_rounded_to_nearest_not_zeroed(layer):
    """H = I: GPTQ spreads no error, so the codes are RTN's (a zero gram would mark every input
    dead and zero the weight)."""
    from qdlm_jax.quant.quantizer_core import rtn_codes
    _, gate_up, _ = layer
    w = np.swapaxes(gate_up, 1, 2)
    res, how = gptq_experts(w[3:], jnp.zeros((1, D, D)), jnp.zeros((1,)), **SPEC)
    assert how == ["thin-identity"]
    codes, _, _ = rtn_codes(jnp.asarray(w[3]), bits=4, group_size=16, sym=False)
    np.testing.assert_array_equal(np.asarray(res[0].codes), np.asarray(codes))
    assert np.abs(np.asarray(res[0].w_dequantized)).max() > 0


@pytest.mark.parametrize("kw,message", [
    (dict(min_rows=-1), "min_rows=-1"), (dict(fallback="shared"), "fallback='shared'"),
    (dict(thin_damp=-0.1), "thin_damp=-0.1")])
def test_bad_rules_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        ThinExperts(**kw)


def test_all_tokens_rule_needs_the_all_token_grams(layer):
    _, gate_up, _ = layer
    with pytest.raises(ValueError, match="all-token gram"):
        gptq_experts(np.swapaxes(gate_up, 1, 2), jnp.zeros((E, D, D)), jnp.zeros((E,)),
                     rule=ThinExperts(fallback="all_tokens"), **SPEC)


def test_weighted_rows():
    """Calibration weights scale each row's contribution to its expert's gram and count."""
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((5, 3)).astype(np.float32)
    c = np.array([1.0, 2.0, 0.5, 3.0, 1.0], np.float32)
    grams, counts = expert_grams(rows, jnp.asarray([2, 0, 3]), c)
    np.testing.assert_allclose(np.asarray(counts), [3.0, 0.0, 4.5])
    want = (rows[2:] * c[2:, None]).T @ rows[2:]
    np.testing.assert_allclose(np.asarray(grams[2]), want, rtol=1e-5)
    assert jax.numpy.all(grams[1] == 0)
