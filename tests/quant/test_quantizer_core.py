"""The AutoGPTQ-grid quantizer against a NumPy statement of AutoGPTQ's Quantizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.quant import quantizer_core as qc
from qdlm_jax.quant.quantizer_core import QuantSpec
from tests.quant.numpy_gptq import find_params, quantize


def _w(out=8, n_in=256, seed=0):
    return (np.random.default_rng(seed).standard_normal((out, n_in)) * 0.05).astype(np.float32)


def _numpy_rtn(w, bits, group_size, sym):
    g = w.shape[1] if group_size == -1 else group_size
    codes, deq, scales, zeros = [], [], [], []
    for c in range(0, w.shape[1], g):
        s, z = find_params(w[:, c:c + g], bits, sym)
        q, dq = quantize(w[:, c:c + g], s[:, None], z[:, None], bits)
        codes.append(q), deq.append(dq), scales.append(s), zeros.append(z)
    return (np.concatenate(codes, 1), np.concatenate(deq, 1), np.stack(scales, 1),
            np.stack(zeros, 1))


@jax.jit
def _all_grids(w):
    """rtn_codes and rtn for every (bits, group_size, sym), in one compiled function."""
    return {(b, g, s): (qc.rtn_codes(w, bits=b, group_size=g, sym=s),
                        qc.rtn(w, bits=b, group_size=g, sym=s))
            for b in (2, 3, 4, 8) for g in (-1, 32, 128) for s in (True, False)}


@pytest.fixture(scope="module")
def all_grids():
    w = _w()
    return w, _all_grids(jnp.asarray(w))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_autogptq_grid(all_grids, bits, group_size, sym):
    w, results = all_grids
    (codes, scale, zero), deq = results[bits, group_size, sym]
    ref_codes, ref_deq, ref_scale, ref_zero = _numpy_rtn(w, bits, group_size, sym)
    np.testing.assert_array_equal(np.asarray(scale), ref_scale)
    np.testing.assert_array_equal(np.asarray(zero), ref_zero)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)  # bit-exact, ties included
    np.testing.assert_array_equal(np.asarray(deq), ref_deq)
    assert codes.dtype == jnp.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
    assert scale.shape == (8, 1 if group_size == -1 else 256 // group_size)


def test_symmetric_min_tie_rounds_like_true_division():
    # sym: scale = 2 absmax / maxq, so the most negative weight lands on (or within an ulp
    # of) the tie w / scale = -maxq/2 and its code depends on the last bit of the division.
    # XLA would compute x * (1/scale); the codes must still match true division (torch).
    w = _w(out=512, n_in=32, seed=7)
    w[:, 0] = -np.abs(w).max(1) - 0.01  # the row minimum is the absmax
    s, z = qc.compute_params(jnp.asarray(w), bits=3, group_size=-1, sym=True)
    codes = np.asarray(qc.quantize_codes(jnp.asarray(w), s, z, bits=3))
    ref_s, ref_z = find_params(w, 3, True)
    ref_codes, _ = quantize(w, ref_s[:, None], ref_z[:, None], 3)
    np.testing.assert_array_equal(codes, ref_codes)
    by_reciprocal = np.clip(np.round(w[:, 0] * (np.float32(1) / ref_s)) + ref_z, 0, 7)
    assert (by_reciprocal != ref_codes[:, 0]).any()  # the case is sensitive to it


def test_autogptq_edge_cases():
    w = np.zeros((3, 4), np.float32)
    w[1] = [0.0, 1.0, 2.0, 3.0]  # no negatives: sym keeps xmin = 0 (AutoGPTQ's quirk)
    w[2] = [-4.0, -1.0, -2.0, -3.0]  # no positives: xmax clamps to 0
    for sym in (True, False):
        s, z = qc.compute_params(jnp.asarray(w), bits=4, group_size=-1, sym=sym)
        rs, rz = find_params(w, 4, sym)
        np.testing.assert_array_equal(np.asarray(s)[:, 0], rs)
        np.testing.assert_array_equal(np.asarray(z)[:, 0], rz)
    s, z = qc.compute_params(jnp.asarray(w), bits=4, group_size=-1, sym=False)
    assert float(s[0, 0]) == pytest.approx(2 / 15)  # all-zero row -> range [-1, 1]
    s, _ = qc.compute_params(jnp.asarray(w), bits=4, group_size=-1, sym=True)
    assert float(s[1, 0]) == pytest.approx(3 / 15)  # xmin stays 0: scale = xmax / maxq
    np.testing.assert_array_equal(np.asarray(qc.rtn(jnp.asarray(w[:1]), bits=4, group_size=-1,
                                                    sym=False)), 0.0)


def test_error_bound_and_clip_ratio():
    w = jnp.asarray(_w(seed=3))
    s, z = qc.compute_params(w, bits=4, group_size=32, sym=False)
    err = jnp.abs(qc.rtn(w, bits=4, group_size=32, sym=False) - w)
    bound = jnp.repeat(s, 32, axis=1) / 2 + 1e-7
    assert bool(jnp.all(err <= bound))
    s_clip, _ = qc.compute_params(w, bits=4, group_size=32, sym=False, clip_ratio=0.8)
    np.testing.assert_allclose(np.asarray(s_clip), 0.8 * np.asarray(s), rtol=1e-6)


def test_jit_and_spec():
    spec = QuantSpec(bits=3, group_size=64, sym=True)
    w = jnp.asarray(_w())
    out = jax.jit(qc.rtn_spec, static_argnums=1)(w, spec)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qc.rtn(w, bits=3, group_size=64,
                                                                     sym=True)))
    assert spec.maxq == 7 and spec.n_groups(256) == 4 and QuantSpec(group_size=-1).n_groups(96) == 1


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(bits=5), "bits=5", "(2, 3, 4, 8)"),
    (dict(bits=True), "bits=True", "(2, 3, 4, 8)"),
    (dict(group_size=0), "group_size=0", "-1 (per output channel)"),
    (dict(group_size=-2), "group_size=-2", "divid"),
    (dict(clip_ratio=1.5), "clip_ratio=1.5", "(0, 1]"),
    (dict(clip_ratio=0.0), "clip_ratio=0.0", "(0, 1]"),
    (dict(sym="yes"), "sym='yes'", "True or False"),
])
def test_bad_spec_values_name_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        QuantSpec(**kwargs)
    assert field in str(e.value) and allowed in str(e.value)


def test_group_size_must_divide_width():
    spec = QuantSpec(bits=4, group_size=128)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide the input width 96"):
        spec.check_width(96)
    with pytest.raises(ValueError, match="96"):
        qc.rtn_spec(jnp.zeros((4, 96)), spec)
