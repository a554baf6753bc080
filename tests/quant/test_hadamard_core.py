"""The Hadamard transform: scipy's matrices on powers of two, orthogonal everywhere, the real
model widths factor, and the fast transform equals the dense product."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from qdlm_jax.quant import hadamard_core as H


@pytest.mark.parametrize("n", [1, 2, 4, 16, 128, 1024])
def test_matches_scipy_on_powers_of_two(n):
    assert np.array_equal(H.hadamard_matrix(n), scipy.linalg.hadamard(n))
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    ours = np.asarray(H.hadamard_transform(jnp.asarray(x)))
    np.testing.assert_allclose(ours, x @ scipy.linalg.hadamard(n) / np.sqrt(n), atol=1e-5)


@pytest.mark.parametrize("n", [12, 20, 28, 48, 148, pytest.param(3584, marks=pytest.mark.slow)])
def test_non_power_of_two_widths_are_orthogonal(n):
    m = H.hadamard_matrix(n).astype(np.float64)
    assert set(np.unique(m)) == {-1.0, 1.0}
    np.testing.assert_array_equal(m @ m.T, n * np.eye(n))
    x = np.random.default_rng(0).standard_normal((4, n)).astype(np.float32)
    y = np.asarray(H.hadamard_transform(jnp.asarray(x)))
    np.testing.assert_allclose(y, x @ m / np.sqrt(n), atol=2e-5)
    back = np.asarray(H.rotate_transpose(jnp.asarray(y)))
    np.testing.assert_allclose(back, x, atol=2e-5)


# slow: the 8B models' widths (the non-power-of-two construction runs at smaller widths)
@pytest.mark.slow
def test_real_model_widths():
    assert H.hadamard_factor(4096) == (1, 4096)  # LLaDA-8B hidden
    assert H.hadamard_factor(12288) == (12, 1024)  # LLaDA-8B FFN
    assert H.hadamard_factor(3584) == (28, 128)  # Dream-7B hidden
    assert H.hadamard_factor(18944) == (148, 128)  # Dream-7B FFN
    for n in (12288, 18944):  # norm preserved and inverted at full width
        x = jnp.asarray(np.random.default_rng(n).standard_normal((2, n)), jnp.float32)
        y = H.hadamard_transform(x)
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                                   rtol=1e-5)
        np.testing.assert_allclose(np.asarray(H.rotate_transpose(y)), np.asarray(x), atol=1e-4)
    with pytest.raises(ValueError, match="n=7"):
        H.hadamard_factor(7)


def test_random_rotation_is_orthogonal_and_spreads_an_outlier():
    import jax
    signs = H.random_signs(jax.random.key(0), 64)
    q = np.asarray(H.rotate(jnp.eye(64), signs))
    np.testing.assert_allclose(q @ q.T, np.eye(64), atol=1e-5)
    x = np.zeros((1, 64), np.float32)
    x[0, 9] = 100.0
    y = np.asarray(H.rotate(jnp.asarray(x), signs))
    np.testing.assert_allclose(np.abs(y), 100.0 / 8.0, rtol=1e-5)  # spread evenly
