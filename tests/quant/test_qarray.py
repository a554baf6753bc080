"""QuantizedArray: packed storage, dequantization, project(), jit, nnx, qwix, model size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.models import init_model, project
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.quant import QuantizedArray, QuantSpec, quantized_param_bytes
from qdlm_jax.quant import quantizer_core as qc
from qdlm_jax.quant.rtn import rtn_quantize_params


def _kernel(n_in=256, n_out=64, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (n_in, n_out), dtype) * 0.05


@pytest.mark.parametrize("bits, sym", [(2, True), (3, False), (4, False), (8, True)])
def test_dequantize_matches_core_and_orientations(bits, sym):
    kernel = _kernel()  # [in, out]
    spec = QuantSpec(bits=bits, group_size=64, sym=sym)
    q = QuantizedArray.quantize(kernel, spec)
    expected = qc.rtn(kernel.T, bits=bits, group_size=64, sym=sym).T  # core works on [out, in]
    assert q.shape == (256, 64) and q.storage_shape == (64, 256) and q.sym == sym
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(expected))
    q_oi = QuantizedArray.quantize(kernel.T, spec, orientation="out_in")
    assert q_oi.shape == (64, 256)
    np.testing.assert_array_equal(np.asarray(q_oi.dequantize()), np.asarray(expected.T))
    x = jax.random.normal(jax.random.key(1), (3, 5, 256))
    np.testing.assert_allclose(np.asarray(project(x, q)), np.asarray(x @ q.dequantize()),
                               rtol=1e-5, atol=1e-5)
    y = jax.random.normal(jax.random.key(2), (3, 64))
    np.testing.assert_allclose(np.asarray(project(y, q_oi)), np.asarray(y @ q_oi.dequantize()),
                               rtol=1e-5, atol=1e-5)


def test_storage_bytes_are_real():
    q = QuantizedArray.quantize(_kernel(1024, 512), QuantSpec(bits=4, group_size=128, sym=False))
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (512, 512)  # half a byte / weight
    assert q.zero.shape == (512, 4)  # 8 groups of 4-bit zero points
    assert q.nbytes == 512 * 512 + 512 * 8 * 4 + 512 * 4
    q3 = QuantizedArray.quantize(_kernel(1024, 512), QuantSpec(bits=3, group_size=-1, sym=True))
    assert q3.packed.shape == (512, 384) and q3.zero is None  # 3 bits / weight


def test_pytree_jit_and_g_idx():
    kernel = _kernel()
    q = QuantizedArray.quantize(kernel, QuantSpec(bits=4, group_size=128, sym=False))
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 3  # packed, scale, zero (g_idx None); metadata is static
    q2 = jax.tree.unflatten(treedef, leaves)
    x = jnp.ones((2, 256))
    f = jax.jit(lambda x, q: project(x, q))
    np.testing.assert_allclose(np.asarray(f(x, q2)), np.asarray(x @ q.dequantize()), rtol=1e-5)
    # A permuted group map (act-order GPTQ): column j uses scale[:, g_idx[j]].
    codes = np.asarray(q.codes()).astype(np.int32)
    g_idx = jnp.asarray(np.random.default_rng(0).permutation(256) // 128)
    qg = QuantizedArray.from_codes(jnp.asarray(codes), q.scale, q.zeros(), bits=4,
                                   group_size=128, sym=False, g_idx=g_idx)
    expected = (np.asarray(q.scale)[:, g_idx] * (codes - np.asarray(q.zeros())[:, g_idx])).T
    np.testing.assert_allclose(np.asarray(qg.dequantize()), expected, rtol=1e-6)


def test_qwix_round_trip():
    qwix_qarray = pytest.importorskip("qwix._src.core.qarray")
    for bits, sym in [(4, False), (3, True)]:
        q = QuantizedArray.quantize(_kernel(), QuantSpec(bits=bits, group_size=64, sym=sym))
        qa = q.to_qwix()
        assert qa.qvalue.shape == (256, 64) and qa.scale.shape == (4, 64)
        assert (qa.zero_point is None) == sym
        qwix_qarray.validate_qarray(qa)
        np.testing.assert_allclose(np.asarray(qwix_qarray.dequantize(qa)),
                                   np.asarray(q.dequantize()), rtol=1e-6, atol=1e-7)
        back = QuantizedArray.from_qwix(qa)
        assert (back.bits, back.group_size, back.shape) == (bits, 64, (256, 64))
        np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(q.packed))
    # A qwix-quantized kernel (int8 absmax, tiled along the input axis) imports as-is.
    qa = qwix_qarray.quantize_api(_kernel(), jnp.int8, channelwise_axes=(1,),
                                  tiled_axes={0: 128})
    ours = QuantizedArray.from_qwix(qa)
    np.testing.assert_allclose(np.asarray(ours.dequantize()),
                               np.asarray(qwix_qarray.dequantize(qa)), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_w4_model():
    # width 256 so group 128 divides every linear input (hidden 256, FFN 512)
    config = tiny_config("llada", hidden_size=256, intermediate_size=512, num_heads=4,
                         num_kv_heads=4, num_layers=1)
    model = init_model(config, seed=0)
    params = get_params(model)
    qparams = rtn_quantize_params(params, QuantSpec(bits=4, group_size=128, sym=False))
    return config, params, qparams


def test_tiny_model_runs_from_packed_params(tiny_w4_model):
    config, params, qparams = tiny_w4_model
    quantized = [p for p, v in qparams.items() if isinstance(v, QuantizedArray)]
    assert len(quantized) == 7 * config.num_layers  # LM head skipped by default
    dequantized = {p: v.dequantize() if isinstance(v, QuantizedArray) else v
                   for p, v in qparams.items()}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 8)))
    qmodel = model_from_params(config, qparams)
    fmodel = model_from_params(config, dequantized)
    assert isinstance(qmodel.layers[0].q_proj.kernel.get_value(), QuantizedArray)

    @nnx.jit
    def forward(m, ids):
        return m(ids)

    np.testing.assert_allclose(np.asarray(forward(qmodel, ids)),
                               np.asarray(forward(fmodel, ids)), rtol=1e-5, atol=1e-5)
    # Setting one kernel in place on a float model (nnx.Param holding a QuantizedArray).
    model = model_from_params(config, params)
    layer = model.layers[0]
    layer.q_proj.kernel.set_value(qparams[("layers", 0, "q_proj", "kernel")])
    x = jnp.ones((1, 3, config.hidden_size))
    np.testing.assert_allclose(np.asarray(layer.q_proj(x)),
                               np.asarray(x @ dequantized[("layers", 0, "q_proj", "kernel")]),
                               rtol=1e-5, atol=1e-5)


def test_w4_g128_linear_weights_take_at_most_028x_of_bf16(tiny_w4_model):
    _, params, qparams = tiny_w4_model
    q_bytes = quantized_param_bytes([v for v in qparams.values()
                                     if isinstance(v, QuantizedArray)])
    n_weights = sum(int(np.prod(v.shape)) for v in qparams.values()
                    if isinstance(v, QuantizedArray))
    ratio = q_bytes / (2 * n_weights)
    assert ratio <= 0.28, ratio  # 4 bits + fp32 scale + 4-bit zero per 128 = 0.268x


def test_rtn_driver_names_the_kernel_whose_width_does_not_fit():
    params = {("layers", 0, "q_proj", "kernel"): jnp.zeros((96, 32))}
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.kernel: group_size=128 does not "
                                         r"divide the input width 96"):
        rtn_quantize_params(params, QuantSpec(bits=4, group_size=128))
