"""The quantized bundled model (tiny-llada, RTN W4 g128) runs its denoising loop (and its
forward pass) on the Pallas kernels in interpret mode and decodes the same tokens as XLA."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdlm_jax import load_model
from qdlm_jax.inference.generate import GenerationConfig, generate
from qdlm_jax.kernels import select_implementation, use_implementation
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.quant import QuantizedArray, QuantSpec, rtn_quantize_params

MODEL = Path(__file__).resolve().parents[2] / "assets" / "tiny-llada"
PROMPT = jnp.asarray([[1, 212, 37, 905, 14, 77, 301, 9]], jnp.int32)
GEN = GenerationConfig(steps=4, gen_length=8, block_length=8)
KERNELS = ("pallas_tpu", "pallas_gpu")


def _quantized(dtype):
    model = load_model(MODEL, dtype=dtype)
    qparams = rtn_quantize_params(get_params(model), QuantSpec(bits=4, group_size=128))
    return model_from_params(model.config, qparams)


@pytest.fixture(scope="module")
def qmodel():
    return _quantized("float32")


@pytest.fixture(scope="module")
def xla_tokens(qmodel):
    with use_implementation("xla"):
        return np.asarray(generate(qmodel, PROMPT, config=GEN))


def _assert_every_linear_runs(model, name, dtype):
    kernels = [v for v in get_params(model).values() if isinstance(v, QuantizedArray)]
    # q, k, v, o, gate, up, down in every layer
    assert len(kernels) == 7 * model.config.num_layers
    for w in kernels:
        h = jax.ShapeDtypeStruct((1, 16, w.shape[0]), dtype)
        assert select_implementation(h, w, implementation=name)[0] == name


@pytest.mark.parametrize("name", KERNELS)
def test_generation_matches_xla(qmodel, xla_tokens, name):
    _assert_every_linear_runs(qmodel, name, jnp.float32)
    with use_implementation(name, interpret=True):
        tokens = np.asarray(generate(qmodel, PROMPT, config=GEN))
    assert tokens.shape == (1, PROMPT.shape[1] + GEN.gen_length)
    assert (tokens[:, PROMPT.shape[1]:] != 3).all()  # every mask token was decoded
    np.testing.assert_array_equal(tokens, xla_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_forward_logits_match_xla(dtype, tol):
    model = _quantized(dtype)
    forward = nnx.jit(lambda m, ids: m(ids))
    with use_implementation("xla"):
        expect = np.asarray(forward(model, PROMPT).astype(jnp.float32))
    for name in KERNELS:
        _assert_every_linear_runs(model, name, jnp.dtype(dtype))
        with use_implementation(name, interpret=True):
            logits = np.asarray(forward(model, PROMPT).astype(jnp.float32))
        np.testing.assert_allclose(logits, expect, rtol=tol, atol=tol)
