"""evals/basic.py: the deterministic fidelity measure `output_kl`."""

import numpy as np
import pytest

from qdlm_jax.evals.basic import output_kl
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.quant.quantizer_core import QuantSpec, rtn_spec


def _perturbed(model, bits):
    """A copy of `model` with every linear kernel rounded to `bits` (RTN, per channel)."""
    params = dict(get_params(model))
    spec = QuantSpec(bits=bits, group_size=-1, sym=False)
    for path, w in params.items():
        if path[0] == "layers" and path[-1] == "kernel":
            params[path] = np.asarray(rtn_spec(np.asarray(w).T, spec)).T.astype(w.dtype)
    return model_from_params(model.config, params)


@pytest.mark.parametrize("family", ["llada", pytest.param("dream", marks=pytest.mark.slow)])
def test_output_kl_matches_numpy_and_orders_bit_widths(family, tiny_llada, tiny_dream):
    import jax

    tm = tiny_llada if family == "llada" else tiny_dream
    model = tm.model
    rng = np.random.default_rng(0)
    windows = rng.integers(10, model.config.vocab_size - 10, (3, 24)).astype(np.int32)
    assert output_kl(model, model, windows)["kl_bits"] == pytest.approx(0.0, abs=1e-6)

    q2, q4 = _perturbed(model, 2), _perturbed(model, 4)
    kl2 = output_kl(model, q2, windows, batch_size=2)["kl_bits"]
    kl4 = output_kl(model, q4, windows, batch_size=2)["kl_bits"]
    assert 0 < kl4 < kl2
    # NumPy statement on the same masked input (seed 0, ratio 0.5).
    noisy = np.where(np.random.default_rng(0).random(windows.shape) < 0.5,
                     model.config.mask_token_id, windows)
    a = np.asarray(jax.nn.log_softmax(np.asarray(model(noisy), np.float64), axis=-1))
    b = np.asarray(jax.nn.log_softmax(np.asarray(q2(noisy), np.float64), axis=-1))
    per_window = (np.exp(a) * (a - b)).sum(-1).mean(-1) / np.log(2)
    assert kl2 == pytest.approx(per_window.mean(), rel=1e-3)
    se = output_kl(model, q2, windows, batch_size=2)["kl_bits_se"]
    assert se == pytest.approx(per_window.std(ddof=1) / np.sqrt(len(per_window)), rel=1e-2)


def test_standard_errors():
    from qdlm_jax.evals.basic import binomial_se, mean_se
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.0, 10) == 0.0 and binomial_se(0.3, 0) == 0.0
    v = np.array([1.0, 2.0, 4.0, 7.0])
    assert mean_se(v) == pytest.approx(np.std(v, ddof=1) / 2)
    assert mean_se([3.0]) == 0.0


def test_output_kl_bad_input(tiny_llada):
    with pytest.raises(ValueError, match="mask_ratio"):
        output_kl(tiny_llada.model, tiny_llada.model, np.zeros((1, 4), np.int32),
                  mask_ratio=2.0)
    with pytest.raises(ValueError, match="windows"):
        output_kl(tiny_llada.model, tiny_llada.model, np.zeros((4,), np.int32))
