"""DAQ + ABMP (Quant-dLLM): the RSR objective never increases, one plane without data
weighting is the closed-form binarization, ABMP averages exactly the requested planes,
the packed binary planes round-trip, qmatmul equals the dequantized matmul, checkpoints
save/load, and the layer-wise driver runs end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.kernels import qmatmul, select_implementation
from qdlm_jax.quant import daq_core
from qdlm_jax.quant.bqarray import BinaryPlanesArray


def _w(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 0.02, shape), jnp.float32)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rsr_never_increases_the_objective(k):
    rng = np.random.default_rng(k)
    w = jnp.asarray(rng.standard_t(3, (48, 64)) * 0.02, jnp.float32)
    omega = jnp.asarray(rng.uniform(0.2, 3.0, (48, 64)), jnp.float32)
    fit = daq_core.init_planes(w, omega, k)
    losses = [float(daq_core.objective(w, omega, fit))]
    for _ in range(10):  # every sub-step, not just every round
        for p in range(k):
            fit = daq_core.update_row(w, omega, fit, p)
            losses.append(float(daq_core.objective(w, omega, fit)))
            fit = daq_core.update_col(w, omega, fit, p)
            losses.append(float(daq_core.objective(w, omega, fit)))
        fit = daq_core.update_signs(w, fit)
        losses.append(float(daq_core.objective(w, omega, fit)))
    diffs = np.diff(losses)
    assert np.all(diffs <= 1e-6 * losses[0]), diffs.max()
    assert losses[-1] < losses[0]
    # more planes fit better
    jitted = daq_core.fit_planes(w, omega, k=k, iters=10)
    assert float(daq_core.objective(w, omega, jitted)) == pytest.approx(losses[-1], rel=1e-4)


def test_one_plane_without_data_weighting_is_the_closed_form_binarization():
    w = _w((40, 32), seed=3)
    wn = np.asarray(w, np.float64)
    ones = jnp.ones_like(w)
    # the first row update (c = 1): XNOR-Net's sign(W) * mean_j |W_ij|
    fit0 = daq_core.update_row(w, ones, daq_core.init_planes(w, ones, 1), 0)
    xnor = np.sign(wn) * np.abs(wn).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(daq_core.reconstruct(*fit0)), xnor, rtol=1e-5,
                               atol=1e-8)
    # the fixed point: sign(W) times the best rank-1 approximation of |W| (NumPy SVD)
    fit = daq_core.fit_planes(w, ones, k=1, iters=200)
    u, s, vt = np.linalg.svd(np.abs(wn))
    closed = np.sign(wn) * (s[0] * np.outer(u[:, 0], vt[0]))
    np.testing.assert_allclose(np.asarray(daq_core.reconstruct(*fit)), closed, rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_array_equal(np.asarray(fit.signs[0]), np.where(wn >= 0, 1.0, -1.0))
    # the whole-matrix entry point with no data, one block, lambda = 1 gives the same
    r = daq_core.daq_quantize(w, None, bits=1, block=-1, iters=200, salient=1.0,
                              scale_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(r.w_hat), closed, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 7, 10, 32, 33])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.3, 0.5])
def test_abmp_average_is_exactly_the_requested_planes(n_blocks, ratio):
    scores = np.random.default_rng(n_blocks).random(n_blocks)
    planes = daq_core.allocate_planes(scores, bits=2, ratio=ratio)
    assert planes.sum() == 2 * n_blocks
    assert set(planes.tolist()) <= {1, 2, 3}
    if ratio > 0 and n_blocks >= 2:
        assert planes[np.argmax(scores)] == 3 and planes[np.argmin(scores)] == 1
    hi = planes == 3
    if hi.any() and (planes < 3).any():
        assert scores[hi].min() >= scores[~hi].max()


# slow: the two larger matrices (the whole-row case without blocks runs in `make test`)
@pytest.mark.parametrize("shape, block", [pytest.param((24, 256), 128, marks=pytest.mark.slow),
                                          pytest.param((8, 96), 32, marks=pytest.mark.slow),
                                          ((5, 64), -1)])
def test_abmp_on_whole_matrices_and_packing_round_trip(shape, block):
    w = _w(shape, seed=1)
    x = np.random.default_rng(2).normal(size=(200, shape[1])).astype(np.float32)
    h = jnp.asarray(2 * x.T @ x / len(x))
    r = daq_core.daq_quantize(w, h, bits=2, block=block, ratio=0.25, iters=5)
    g = shape[1] if block == -1 else block
    assert r.planes.mean() == 2.0 and len(r.planes) == shape[1] // g
    q = BinaryPlanesArray.from_planes(r.signs, r.row, r.col, r.slot_block)
    np.testing.assert_array_equal(np.asarray(q.planes()), np.asarray(r.signs))
    np.testing.assert_array_equal(np.asarray(q.row, np.float32), np.asarray(r.row))
    np.testing.assert_allclose(np.asarray(q.dequantize(jnp.float32)).T, np.asarray(r.w_hat),
                               rtol=1e-6, atol=1e-9)
    assert q.shape == (shape[1], shape[0]) and q.mean_planes == 2.0
    # true storage: 2 sign bits, 2 x 16 bits of row scale per block row, column scales
    out, n_in = shape
    expect = (2 * n_in * out / 8 + 2 * (n_in // g) * out * 2 + 2 * n_in * 2
              + 4 * len(r.slot_block)) * 8 / (out * n_in)
    assert q.bits_per_weight == pytest.approx(expect)


def test_qmatmul_equals_the_dequantized_matmul():
    w = _w((48, 256), seed=4)
    r = daq_core.daq_quantize(w, None, bits=2, block=128, ratio=0.5, iters=4)
    q = BinaryPlanesArray.from_planes(r.signs, r.row, r.col, r.slot_block)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 7, 256)), jnp.float32)
    y = qmatmul(x, q)
    ref = np.asarray(x, np.float64) @ np.asarray(q.dequantize(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    assert select_implementation(x, q, implementation="pallas_gpu")[0] == "xla"
    y_jit = jax.jit(lambda a, b: qmatmul(a, b))(x, q)
    np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="weight-only"):
        qmatmul(x, q, act_bits=8)


def test_error_compensation_lowers_the_output_error():
    rng = np.random.default_rng(7)
    w = _w((32, 256), seed=7)
    x = rng.normal(size=(512, 256)).astype(np.float32)
    x[:, :8] *= 10  # outlier inputs
    x = x @ (np.eye(256) + 0.3 * rng.normal(size=(256, 256)) / 16).astype(np.float32)
    h = jnp.asarray(2 * x.T @ x / len(x))

    def err(r):
        return float(np.linalg.norm((np.asarray(w) - np.asarray(r.w_hat)) @ x.T))

    plain = daq_core.daq_quantize(w, h, bits=2, block=128, compensate="none", ratio=0.0)
    comp = daq_core.daq_quantize(w, h, bits=2, block=128, compensate="block", ratio=0.0)
    assert err(comp) < err(plain)
    col = daq_core.daq_quantize(w, h, bits=2, block=128, compensate="column", ratio=0.0)
    assert err(col) < err(plain)
    q = BinaryPlanesArray.from_planes(col.signs, col.row, col.col, col.slot_block)
    np.testing.assert_allclose(np.asarray(q.dequantize(jnp.float32)).T, np.asarray(col.w_hat),
                               rtol=1e-6, atol=1e-9)


# slow: DAQ's full driver; its core (RSR, ABMP, packing, compensation) runs in `make test`
@pytest.mark.slow
def test_driver_runs_saves_loads_and_beats_rtn_w2(tmp_path):
    from flax import nnx

    from qdlm_jax.checkpoints.orbax_format import load_checkpoint, save_checkpoint
    from qdlm_jax.checkpoints.random_init import tiny_config
    from qdlm_jax.models import init_model
    from qdlm_jax.models.params import get_params, model_from_params
    from qdlm_jax.quant.calibration import CalibSpec, build_calibration
    from qdlm_jax.quant.layerwise import PTQSpec, quantize_model
    from qdlm_jax.quant.quantizer_core import QuantSpec

    config = tiny_config("dream", hidden_size=128, intermediate_size=256, num_layers=1)
    model = init_model(config, seed=0)
    windows = np.random.default_rng(0).integers(0, 240, (8, 32))
    calib = build_calibration(model, windows, CalibSpec(mode="masked", n_samples=8,
                                                        seq_len=32))
    w = QuantSpec(bits=2, group_size=64)
    q, stats = quantize_model(model, calib, PTQSpec(method="daq", weight=w, daq_ratio=0.5,
                                                    daq_iters=5), progress=False)
    k = q.layers[0].q_proj.kernel[...]
    assert isinstance(k, BinaryPlanesArray) and k.mean_planes == 2.0
    assert sorted(stats["layers"][0]["daq"]["q_proj"]["planes"]) in ([1, 3], [2, 2])
    rtn, _ = quantize_model(model, None, PTQSpec(method="rtn", weight=w), progress=False)
    ids = jnp.asarray(windows)
    ref = model(ids)
    assert float(jnp.linalg.norm(q(ids) - ref)) < float(jnp.linalg.norm(rtn(ids) - ref))
    path = save_checkpoint(tmp_path / "daq", q.config, get_params(q))
    cfg2, params = load_checkpoint(path)
    loaded = model_from_params(cfg2, params)
    assert isinstance(loaded.layers[0].down_proj.kernel[...], BinaryPlanesArray)
    fwd = nnx.jit(lambda m, i: m(i))
    np.testing.assert_array_equal(np.asarray(fwd(loaded, ids)), np.asarray(fwd(q, ids)))


def test_abmp_check_never_loses_to_uniform_planes():
    rng = np.random.default_rng(11)
    w = _w((16, 256), seed=11)
    x = rng.normal(size=(300, 256)).astype(np.float32)
    x[:, 130:] *= 0.05  # the second block's inputs barely matter
    h = jnp.asarray(2 * x.T @ x / len(x))

    def err(r):
        e = np.asarray(w, np.float64) - np.asarray(r.w_hat, np.float64)
        return float(np.sum((e @ np.asarray(h, np.float64)) * e))

    checked = daq_core.daq_quantize(w, h, bits=2, block=128, ratio=0.5, iters=5)
    uniform = daq_core.daq_quantize(w, h, bits=2, block=128, ratio=0.0, iters=5)
    abmp = daq_core.daq_quantize(w, h, bits=2, block=128, ratio=0.5, iters=5,
                                 abmp_check=False)
    assert checked.planes.mean() == 2.0
    assert err(checked) <= min(err(uniform), err(abmp)) * (1 + 1e-6)
