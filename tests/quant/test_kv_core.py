"""K/V quantization inside attention and DLLMQuant's IA-AQ search: 16 bits is the identity,
8 bits changes logits little and 4 bits more, QuaRot's key rotation leaves the float model
unchanged, the search returns the grid point with the lowest importance-weighted error
(against a NumPy statement), and the quantized model saves and loads."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdlm_jax.checkpoints.orbax_format import load_checkpoint, save_checkpoint
from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.models import init_model
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.quant import kv_core
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.act_kernel import ActKernel
from qdlm_jax.quant.calibration import CalibSpec, build_calibration
from qdlm_jax.quant.kv_core import KVSpec
from qdlm_jax.quant.quantizer_core import QuantSpec
from qdlm_jax.quant.wa import WASpec, quantize_model_wa


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _model(family, seed=0):
    config = tiny_config(family, hidden_size=128, intermediate_size=256, num_layers=2)
    return init_model(config, seed=seed)


def _ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 240, (2, 24)))


# ---- NumPy statement ---------------------------------------------------------------------

def np_fake_quant(x, bits, sym, clip):
    """Per (token, head) over hd, clip [H] (kv_core's docstring)."""
    x = x.astype(np.float64)
    c = np.asarray(clip, np.float64)[None, None, :, None]
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        s = np.maximum(c * np.maximum(-lo, hi), 1e-5) / qmax
        return s * np.clip(np.round(x / s), -qmax - 1, qmax)
    maxq = 2 ** bits - 1
    s = np.maximum(c * hi - c * lo, 1e-5) / maxq
    z = np.round(-c * lo / s)
    return s * (np.clip(np.round(x / s) + z, 0, maxq) - z)


def np_probs(q, k):
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.reshape(b, t, kv, g, d).astype(np.float64)
    s = np.einsum("bqkgd,bskd->bkgqs", qg, k.astype(np.float64)) / np.sqrt(d)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(-1, keepdims=True)  # [b, kv, g, q, s]


def np_errors(q, k, v, grid, bits, sym, which):
    p = np_probs(q, k)
    imp = p.sum(axis=3).mean(axis=2)  # [b, kv, s]: how much the other tokens read token s
    n_kv = k.shape[2]
    out = np.zeros((len(grid), n_kv))
    for gi, c in enumerate(grid):
        clip = np.full(n_kv, c)
        if which == "v":
            dv = v - np_fake_quant(v, bits, sym, clip)
            e = np.einsum("bkgqs,bskd->bkgqd", p, dv)
        else:
            dp = np_probs(q, np_fake_quant(k, bits, sym, clip)) - p
            e = np.einsum("bkgqs,bskd->bkgqd", dp, v.astype(np.float64))
        out[gi] = np.einsum("bkq,bkgqd->k", imp, e * e)
    return out


# ---- tests -------------------------------------------------------------------------------

def test_kv_fake_quant_16_bits_is_the_identity_and_bounds_the_error():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 10, 3, 16)), jnp.float32)
    assert kv_core.kv_fake_quant(x, KVSpec(bits=16)) is x
    assert kv_core.kv_fake_quant(x, None) is x
    for gran in ("per_head", "per_token_group"):
        for sym in (True, False):
            spec = KVSpec(bits=8, granularity=gran, sym=sym, group_size=4)
            err = np.abs(np.asarray(kv_core.kv_fake_quant(x, spec)) - np.asarray(x))
            span = float(np.ptp(np.asarray(x)))
            assert err.max() <= span / 254 + 1e-6
    np.testing.assert_allclose(
        np.asarray(kv_core.kv_fake_quant(x, KVSpec(bits=4, sym=False), jnp.full(3, 0.8))),
        np_fake_quant(np.asarray(x), 4, False, np.full(3, 0.8)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sym", [True, False])
def test_per_channel_group_is_per_head_on_each_channel_slice(sym):
    """Each slice of `group_size` channels of a head is quantized as its own head (the
    per-head NumPy statement on the slice), with the head's clip ratio; group_size = hd is
    per_head bit for bit."""
    x = np.random.default_rng(2).normal(size=(2, 6, 3, 16)).astype(np.float32)
    x[..., 5] *= 20.0  # an outlier channel: only its group's grid coarsens
    clip = np.array([1.0, 0.9, 0.8], np.float32)
    spec = KVSpec(bits=4, granularity="per_channel_group", sym=sym, group_size=4)
    ours = np.asarray(kv_core.kv_fake_quant(jnp.asarray(x), spec, jnp.asarray(clip)))
    ref = np.concatenate([np_fake_quant(x[..., a:a + 4], 4, sym, clip)
                          for a in range(0, 16, 4)], axis=-1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    per_head = kv_core.kv_fake_quant(jnp.asarray(x), KVSpec(bits=4, sym=sym))
    whole = kv_core.kv_fake_quant(jnp.asarray(x), KVSpec(bits=4, sym=sym, group_size=16,
                                                         granularity="per_channel_group"))
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(per_head))
    grouped = np.asarray(kv_core.kv_fake_quant(jnp.asarray(x), spec))  # no clipping either
    assert np.sum((grouped - x) ** 2) < 0.5 * np.sum((np.asarray(per_head) - x) ** 2)
    with pytest.raises(ValueError, match="group_size=6 does not divide the head dim 16"):
        kv_core.kv_fake_quant(jnp.asarray(x), KVSpec(bits=4, granularity="per_channel_group",
                                                     group_size=6))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_kv_16_is_identity_8_bits_changes_logits_little_4_bits_more(family):
    model = _model(family)
    ids = _ids()
    ref = np.asarray(_forward(model, ids))
    errs = {}
    for bits in (16, 8, 4):
        q, _ = quantize_model_wa(model, None, WASpec(method="rtn", weight=None, act=None,
                                                     kv=KVSpec(bits=bits)), progress=False)
        assert isinstance(q.layers[0].k_proj.kernel[...], ActKernel)
        out = np.asarray(_forward(q, ids))
        errs[bits] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert errs[16] == 0.0
    assert 0 < errs[8] < 0.01
    assert errs[4] > 4 * errs[8]


def test_quarot_key_rotation_leaves_the_float_model_unchanged():
    model = _model("llada")
    ids = _ids()
    ref = np.asarray(_forward(model, ids))
    q, _ = quantize_model_wa(model, None, WASpec(method="quarot", weight=None, act=None,
                                                 kv=KVSpec(bits=16)), progress=False)
    assert q.layers[0].k_proj.kernel[...].kv_rotate
    np.testing.assert_allclose(np.asarray(_forward(q, ids)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which, sym", [("v", False), ("v", True), ("k", False)])
def test_iaaq_search_returns_the_lowest_weighted_error_grid_point(which, sym):
    rng = np.random.default_rng(3)
    b, t, h, kv, d = 2, 12, 4, 2, 8
    q = rng.normal(size=(b, t, h, d)).astype(np.float32) * 1.5
    k = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    v = rng.standard_t(2, size=(b, t, kv, d)).astype(np.float32)  # heavy tails: clipping pays
    grid = kv_core.default_grid(10, 0.5)
    spec = KVSpec(bits=3, sym=sym)
    fn = kv_core.v_errors if which == "v" else kv_core.k_errors
    errs = np.asarray(fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), spec, grid))
    ref = np_errors(q, k, v, grid, 3, sym, which)
    np.testing.assert_allclose(errs, ref, rtol=2e-3, atol=1e-9)
    best = np.asarray(kv_core.best_clip(jnp.asarray(errs), grid))
    np.testing.assert_array_equal(best, grid[np.argmin(ref, axis=0)])


# slow: a whole QuaRot + IA-AQ job with save and load
@pytest.mark.slow
def test_quarot_w4a4_kv4_with_iaaq_runs_saves_and_loads(tmp_path):
    model = _model("dream")
    windows = np.random.default_rng(0).integers(0, 240, (8, 24))
    calib = build_calibration(model, windows, CalibSpec(n_samples=8, seq_len=24))
    spec = dict(method="quarot", weight=QuantSpec(bits=4, group_size=64),
                act=ActSpec(bits=4), kv=KVSpec(bits=4))
    q, stats = quantize_model_wa(model, calib, WASpec(**spec, iaaq=True, iaaq_keys=True),
                                 progress=False)
    kv_stats = stats["layers"][0]["kv"]
    assert len(kv_stats["v_clip"]) == model.config.num_kv_heads
    assert kv_stats["v_err_ratio"] <= 1.0 and kv_stats["k_err_ratio"] <= 1.0
    kk = q.layers[1].k_proj.kernel[...]
    assert kk.kv.bits == 4 and kk.kv_rotate and kk.kv_clip.shape == (2,)
    path = save_checkpoint(tmp_path / "q", q.config, get_params(q))
    config, params = load_checkpoint(path)
    loaded = model_from_params(config, params)
    ids = _ids()
    np.testing.assert_array_equal(np.asarray(_forward(loaded, ids)),
                                  np.asarray(_forward(q, ids)))
