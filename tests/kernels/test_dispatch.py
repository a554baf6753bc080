"""qmatmul's dispatch: platform default, the implementation setting (context, global, env
var, jit cache key), silent fallback to XLA, and the routing of quantized_matmul."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.kernels import (
    Setting,
    current_setting,
    platform_default,
    qmatmul,
    select_implementation,
    set_implementation,
    use_implementation,
)
from qdlm_jax.models import project
from tests.kernels import kernel_cases as kc
from tests.kernels import numpy_qmatmul as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _operands(bits=4, group_size=128):
    rng = np.random.default_rng(0)
    w = ref.random_weight(rng, 256, 128, bits=bits, group_size=group_size, sym=False)
    return jnp.asarray(rng.standard_normal((3, 256)), jnp.float32), w


def _has_pallas(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_cpu_default_is_xla_and_matches_numpy():
    x, w = _operands()
    assert jax.default_backend() == "cpu" and platform_default() == "xla"
    assert current_setting() == Setting("auto", False)
    assert select_implementation(x, w) == ("xla", "requested 'auto'")
    assert not _has_pallas(qmatmul, x, w)
    np.testing.assert_allclose(np.asarray(qmatmul(x, w)), ref.weight_only(x, w), rtol=2e-5,
                               atol=2e-5)


def test_context_argument_and_nesting():
    x, w = _operands()
    with use_implementation("pallas_tpu", interpret=True):
        assert current_setting() == Setting("pallas_tpu", True)
        assert select_implementation(x, w)[0] == "pallas_tpu"
        assert _has_pallas(qmatmul, x, w)
        assert not _has_pallas(lambda x, w: qmatmul(x, w, implementation="xla"), x, w)
        with use_implementation("pallas_gpu"):
            assert current_setting() == Setting("pallas_gpu", False)
            assert select_implementation(x, w, implementation="auto")[0] == "xla"
        assert current_setting().name == "pallas_tpu"
    assert current_setting() == Setting("auto", False)


def test_quantized_matmul_routes_through_qmatmul():
    x, w = _operands()
    assert not _has_pallas(project, x, w)
    with use_implementation("pallas_gpu", interpret=True):
        assert _has_pallas(project, x, w)
        y = jax.jit(project)(x, w)
    np.testing.assert_allclose(np.asarray(y), ref.weight_only(x, w), rtol=2e-5, atol=2e-5)


def test_unsupported_calls_fall_back_to_xla_without_error():
    x, w3 = _operands(bits=3)
    with use_implementation("pallas_tpu", interpret=True):
        name, reason = select_implementation(x, w3)
        assert name == "xla" and "pallas_tpu does not support" in reason and "3-bit" in reason
        assert not _has_pallas(qmatmul, x, w3)
        y = qmatmul(x, w3)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ np.asarray(w3.dequantize()),
                               rtol=2e-5, atol=2e-5)
    # Grouped weights with act_bits: the kernels need per-channel; XLA still computes it.
    x, w = _operands()
    name, reason = select_implementation(x, w, act_bits=8, implementation="pallas_gpu")
    assert name == "xla" and "per-channel" in reason
    sds = jax.ShapeDtypeStruct((4, 4096), jnp.bfloat16)
    assert select_implementation(sds, kc.abstract_weight(4096, 512),
                                 implementation="pallas_tpu")[0] == "pallas_tpu"


def test_act_groups_dispatch_to_the_kernels_or_fall_back():
    rng = np.random.default_rng(1)
    w = ref.random_weight(rng, 256, 128, bits=4, group_size=-1, sym=True)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    expect = np.asarray(qmatmul(x, w, act_bits=4, act_group_size=64, implementation="xla"))
    with use_implementation("pallas_tpu", interpret=True):
        assert select_implementation(x, w, act_bits=4, act_group_size=64)[0] == "pallas_tpu"
        assert _has_pallas(lambda x, w: qmatmul(x, w, act_bits=4, act_group_size=64), x, w)
        np.testing.assert_array_equal(
            np.asarray(qmatmul(x, w, act_bits=4, act_group_size=64)), expect)
        name, reason = select_implementation(x, w, act_bits=4, act_group_size=16)
        assert name == "xla" and "act_group_size=16" in reason
    with pytest.raises(ValueError, match="act_group_size=100"):
        qmatmul(x, w, act_bits=4, act_group_size=100)


def test_jitted_functions_retrace_when_the_setting_changes():
    x, w = _operands()
    traced = []

    @jax.jit
    def f(x, w):
        traced.append(current_setting().name)
        return project(x, w)

    y0 = f(x, w)
    with use_implementation("pallas_tpu", interpret=True):
        y1 = f(x, w)
        f(x, w)
    f(x, w)
    assert traced == ["auto", "pallas_tpu"]
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)


def test_set_implementation_and_bad_names():
    try:
        set_implementation("pallas_gpu", interpret=True)
        assert current_setting() == Setting("pallas_gpu", True)
        with use_implementation("xla"):
            assert current_setting().name == "xla"
        assert current_setting().name == "pallas_gpu"
    finally:
        set_implementation("auto")
    assert current_setting() == Setting("auto", False)
    x, w = _operands()
    with pytest.raises(ValueError, match="'triton' is unknown"):
        qmatmul(x, w, implementation="triton")
    with pytest.raises(ValueError, match="'cuda' is unknown"):
        with use_implementation("cuda"):
            pass
    with pytest.raises(ValueError, match="act_bits=16"):
        qmatmul(x, w, act_bits=16)


def test_environment_variable_sets_the_default():
    env = dict(os.environ, QDLM_QMATMUL_IMPLEMENTATION="pallas_tpu:interpret",
               JAX_PLATFORMS="cpu")
    code = "from qdlm_jax.kernels import current_setting; print(tuple(current_setting()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "('pallas_tpu', True)"


def test_a_jitted_function_traces_once_before_and_after_the_first_quantized_matmul():
    """A fresh process that never imported the kernels: a jitted function traced before the
    first quantized matmul is not traced again after it (the implementation setting must
    exist before any trace, or the trace context changes and everything recompiles)."""
    code = """
import jax, jax.numpy as jnp
from qdlm_jax.models.project import project
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec
traces = []
@jax.jit
def f(x):
    traces.append(1)
    return x * 2
f(jnp.ones(3))
w = QuantizedArray.quantize(jnp.ones((64, 8)), QuantSpec(bits=4, group_size=32, sym=True))
jax.jit(project)(jnp.ones((2, 64)), w)
f(jnp.ones(3))
print(len(traces))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "1"
