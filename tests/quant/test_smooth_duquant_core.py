"""SmoothQuant's factors by the formula; DuQuant's dual transform is orthogonal and flattens
planted outlier channels."""

import jax.numpy as jnp
import numpy as np

from qdlm_jax.quant import duquant_core, smoothquant_core


def test_smooth_scales_formula():
    rng = np.random.default_rng(0)
    act = rng.uniform(0.1, 50, 32).astype(np.float32)
    ws = [rng.standard_normal((16, 32)).astype(np.float32) for _ in range(3)]
    for alpha in (0.0, 0.5, 0.8):
        s = np.asarray(smoothquant_core.smooth_scales(jnp.asarray(act),
                                                      [jnp.asarray(w) for w in ws],
                                                      alpha=alpha))
        w_max = np.abs(np.concatenate(ws)).max(axis=0)
        np.testing.assert_allclose(s, act ** alpha / w_max ** (1 - alpha), rtol=1e-5)
    # alpha = 1 divides every channel by its own max: the smoothed maxima are all 1.
    s = np.asarray(smoothquant_core.smooth_scales(jnp.asarray(act), [jnp.asarray(ws[0])],
                                                  alpha=1.0))
    np.testing.assert_allclose(act / s, 1.0, rtol=1e-5)


def _planted(n=256, tokens=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n))
    x[:, [3, 40, 41, 200]] *= np.array([60.0, 25.0, 25.0, 40.0])
    return x


def _max_over_mean(x):
    return np.abs(x).max() / np.abs(x).mean()


def test_dual_transform_is_orthogonal_and_lowers_max_over_mean():
    x = _planted()
    r1, perm, r2 = duquant_core.dual_transform(np.abs(x).max(axis=0), block=64, steps=64)
    assert r1.shape == (4, 64, 64) and sorted(perm.tolist()) == list(range(256))
    t = duquant_core.dense_transform(r1, perm, r2)
    np.testing.assert_allclose(t @ t.T, np.eye(256), atol=1e-5)
    before, after = _max_over_mean(x), _max_over_mean(x @ t)
    assert after < 0.5 * before, (before, after)
    # The first rotation alone already lowers the largest channel of each outlier block.
    v = np.abs(x).max(axis=0)
    rotated = np.abs(x[:, :64] @ r1[0]).max()
    assert rotated < v[:64].max()


def test_zigzag_spreads_the_largest_channels_over_blocks():
    v = np.zeros(16)
    v[[0, 1, 2, 3]] = [10, 9, 8, 7]  # all in block 0 before the deal
    perm = duquant_core.zigzag_permutation(v, block=4)
    blocks = perm.reshape(4, 4)
    assert [int(np.isin(b, [0, 1, 2, 3]).sum()) for b in blocks] == [1, 1, 1, 1]
    assert blocks[0, 0] == 0 and blocks[3, 0] == 3  # ranks 0..3 dealt to blocks 0..3


def test_online_transform_applies_the_dense_dual_transform():
    """The model's online DuQuant stage computes x @ (R1 P R2), the matrix the core chose."""
    from qdlm_jax.quant.act_kernel import OnlineTransform, apply_transform

    x = _planted(n=256, tokens=16)
    r1, perm, r2 = duquant_core.dual_transform(np.abs(x).max(axis=0), block=64, steps=16)
    t = OnlineTransform(kind="duquant", r1=jnp.asarray(r1), perm=jnp.asarray(perm),
                        r2=jnp.asarray(r2))
    ours = np.asarray(apply_transform(t, jnp.asarray(x, jnp.float32)))
    dense = x @ duquant_core.dense_transform(r1, perm, r2)
    np.testing.assert_allclose(ours, dense, rtol=1e-4, atol=1e-3)


def test_flat_max_vector_still_gets_a_rotation():
    """A flat per-channel max (as after smoothing) gives no greedy step a lower max, yet each
    block still gets its first Hadamard rotation, so a per-token spike that the flat max
    vector hides is spread instead of passed through (the old rule returned R = I here)."""
    r1, _, r2 = duquant_core.dual_transform(np.ones(128), block=64, steps=8)
    for r in (*r1, *r2):
        np.testing.assert_allclose(r @ r.T, np.eye(64), atol=1e-6)
        assert np.abs(r).max() < 0.5  # dense, not a (signed) permutation
    spike = np.zeros(64)
    spike[5] = 1.0
    assert np.abs(spike @ r1[0]).max() < 0.5
