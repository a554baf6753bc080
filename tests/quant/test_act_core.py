"""Activation fake quantization against a NumPy statement and its error bound."""

import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.quant import act_core
from qdlm_jax.quant.act_core import ActSpec


def _numpy_fake_quant(x, bits, sym, clip, per_token):
    x = np.asarray(x, np.float64)
    axis = -1 if per_token else None
    if sym:
        hi = np.maximum(clip * np.abs(x).max(axis=axis, keepdims=per_token), 1e-5)
        s = hi / (2 ** (bits - 1) - 1)
        q = np.clip(np.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return s * q, s
    lo = np.minimum(clip * x.min(axis=axis, keepdims=per_token), 0)
    hi = np.maximum(clip * x.max(axis=axis, keepdims=per_token), 0)
    s = np.maximum(hi - lo, 1e-5) / (2 ** bits - 1)
    z = np.round(-lo / s)
    q = np.clip(np.round(x / s) + z, 0, 2 ** bits - 1)
    return s * (q - z), s


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_per_token_matches_numpy_and_error_bound(bits, sym):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((6, 64)).astype(np.float32) * rng.uniform(0.1, 30, (6, 1))
    x[2, 7] = 400.0  # one outlier token: only its own scale grows
    spec = ActSpec(bits=bits, sym=sym)
    ours = np.asarray(act_core.fake_quant(jnp.asarray(x), spec))
    ref, s = _numpy_fake_quant(x, bits, sym, 1.0, per_token=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    # |x - x_hat| <= s / 2 token by token (no value is outside the unclipped range).
    err = np.abs(ours - x)
    assert np.all(err <= s / 2 * (1 + 1e-4) + 1e-6)
    # Per token: only the outlier token's grid is coarse.
    assert s.argmax() == 2 and s[2, 0] > 2 * np.delete(s, 2).max()


def test_clipping_and_static_per_tensor():
    x = jnp.asarray(np.linspace(-10, 10, 41, dtype=np.float32)[None])
    clipped = np.asarray(act_core.fake_quant(x, ActSpec(bits=8, clip_ratio=0.5)))
    # saturates at clip * max = 5 (and at -128/127 of it on the negative side)
    assert clipped.max() <= 5.0 + 1e-4 and clipped.min() >= -5.0 * 128 / 127 - 1e-4
    spec = ActSpec(bits=4, granularity="per_tensor", sym=False)
    with pytest.raises(ValueError, match="static_range"):
        act_core.fake_quant(x, spec)
    ours = np.asarray(act_core.fake_quant(x, spec, static_range=(-10.0, 10.0)))
    ref, _ = _numpy_fake_quant(np.asarray(x), 4, False, 1.0, per_token=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.all(np.asarray(act_core.fake_quant(jnp.zeros((2, 8)), ActSpec(bits=4))) == 0)


def test_spec_validation():
    with pytest.raises(ValueError, match="granularity"):
        ActSpec(granularity="per_channel")
    with pytest.raises(ValueError, match="bits"):
        ActSpec(bits=16)
