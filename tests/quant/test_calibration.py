"""Each calibration mode produces the statistics it claims."""

import numpy as np
import pytest

from qdlm_jax.quant.calibration import (
    CalibSpec,
    certainty_weights,
    mask_windows,
    masked_timesteps,
    tmas_quota,
    trajectory_states,
)

MASK = 99


def test_masked_mode_ratio_follows_timestep_per_sample():
    windows = np.random.default_rng(0).integers(0, 90, (16, 4000))
    ids, is_masked = mask_windows(windows, MASK, prefix_frac=0.0, seed=1)
    ts = masked_timesteps(16)
    np.testing.assert_allclose(ts, (np.arange(16) + 1) / 16)
    ratio = is_masked.mean(1)
    # 4000 Bernoulli(t) draws per sample: std <= 0.008.
    np.testing.assert_allclose(ratio, ts, atol=0.03)
    assert np.all((ids == MASK) == is_masked)
    assert np.all(ids[~is_masked] == windows[~is_masked])


def test_masked_mode_keeps_the_prefix_visible():
    windows = np.random.default_rng(0).integers(0, 90, (8, 100))
    ids, is_masked = mask_windows(windows, MASK, prefix_frac=0.25, seed=0)
    assert not is_masked[:, :25].any()
    assert is_masked[-1, 25:].all()  # t = 1 masks everything after the prefix
    np.testing.assert_array_equal(ids[:, :25], windows[:, :25])


def test_tmas_quota_is_u_shaped_and_sums():
    assert tmas_quota(10).tolist() == [3, 2, 2, 3]
    assert tmas_quota(7).sum() == 7


def test_trajectory_states_remask_later_decoded_positions():
    n, t, steps, prompt = 40, 12, 8, 4
    rng = np.random.default_rng(0)
    final = rng.integers(0, 90, (n, t))
    order = np.full((n, t), -1)
    for i in range(n):
        order[i, prompt:] = rng.permutation(np.repeat(np.arange(steps), 1))[: t - prompt]
    ids, masked, ks = trajectory_states(final, order, steps, prompt, MASK, seed=3)
    for i in range(n):
        expect = order[i] >= ks[i]
        expect[:prompt] = False
        np.testing.assert_array_equal(masked[i], expect)
        np.testing.assert_array_equal(ids[i][~expect], final[i][~expect])
    # Stage quota: 30% of states from the first quarter of steps, 30% from the last.
    stage = np.minimum(ks * 4 // steps, 3)
    assert np.bincount(stage, minlength=4).tolist() == tmas_quota(n).tolist()


def test_certainty_weights():
    is_masked = np.array([[True, False, False, True]])
    conf = np.array([[0.5, 0.9, 0.9, 1.0]], np.float32)
    w = certainty_weights(is_masked, conf, unmasked_weight=0.7, beta=1.0)
    raw = np.array([1.5, 0.7, 0.7, 2.0])
    np.testing.assert_allclose(w[0], raw / raw.mean(), rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)


def test_bad_calibration_mode_is_rejected():
    with pytest.raises(ValueError, match="calibration='noisy'"):
        CalibSpec(mode="noisy")
