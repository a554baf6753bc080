"""Super-outlier detection: the rule against a plain NumPy statement, the per-chunk sums, and
a tiny model with a planted residual channel."""

import numpy as np
import pytest

from qdlm_jax.evals import outliers
from qdlm_jax.evals import super_outliers as so


def rule_by_hand(channel_max, share, ratio, min_layers):
    """The docstring's rule, layer by layer: {(channel, first, last): (ratios, shares)}."""
    n_layers, n_channels = channel_max.shape
    found = {}
    for c in range(n_channels):
        run = []
        for layer in range(n_layers + 1):
            big = layer < n_layers and (channel_max[layer, c]
                                        >= ratio * np.median(channel_max[layer]))
            if big:
                run.append(layer)
                continue
            if len(run) >= min_layers:
                found[(c, run[0], run[-1])] = (
                    [channel_max[i, c] / np.median(channel_max[i]) for i in run],
                    [share[i, c] for i in run])
            run = []
    return found


@pytest.mark.parametrize("seed", range(4))
def test_rule_equals_its_numpy_statement(seed):
    rng = np.random.default_rng(seed)
    n_layers, d = 9, 33
    m = rng.uniform(0.5, 2.0, (n_layers, d))
    share = rng.dirichlet(np.ones(d), n_layers)
    m[1:5, 4] = 60.0  # layers 1..4: one run
    m[6:8, 9] = 500.0  # two layers only: too short at min_layers=3
    m[0:3, 12] = 40.0  # two runs of channel 12: 0..2 and 5..8
    m[5:9, 12] = 40.0
    m[2:6, 20] = 30.0  # every layer but 4 at or above 20 x median; layer 4 just below
    m[4, 20] = 19.0 * np.median(m[4])
    m[:, 30] = rng.uniform(10, 60, n_layers)  # random: whatever the rule says
    for ratio, min_layers in [(20.0, 3), (20.0, 1), (50.0, 2), (1.5, 4)]:
        spec = so.SuperOutlierSpec(ratio=ratio, min_layers=min_layers)
        runs = so.find_super_outliers(m, share, spec)
        expected = rule_by_hand(m, share, ratio, min_layers)
        assert {(r["channel"], r["first"], r["last"]) for r in runs} == set(expected)
        for r in runs:
            ratios, shares = expected[(r["channel"], r["first"], r["last"])]
            np.testing.assert_allclose(r["ratio"], ratios, rtol=1e-12)
            np.testing.assert_allclose(r["share"], shares, rtol=1e-12)
            assert r["layers"] == r["last"] - r["first"] + 1 >= min_layers
            assert r["ratio_peak"] == max(r["ratio"])
        assert [r["ratio_peak"] for r in runs] == sorted((r["ratio_peak"] for r in runs),
                                                         reverse=True)
    runs = so.find_super_outliers(m, share, so.SuperOutlierSpec())
    assert {(4, 1, 4), (12, 0, 2), (12, 5, 8)} <= {(r["channel"], r["first"], r["last"])
                                                   for r in runs}
    assert not {r["channel"] for r in runs} & {9, 20}


def test_chunk_sums_combine_to_the_statistics():
    rng = np.random.default_rng(0)
    hs = [rng.standard_normal((6, 10, 16)).astype(np.float32) for _ in range(3)]  # 3 layers
    hs[1][:, :, 7] *= 30
    hs[2][0, 0] = 0.0  # a zero token holds no share
    chunks = [{i: so.residual_reduce(h[a:b]) for i, h in enumerate(hs)}
              for a, b in [(0, 2), (2, 3), (3, 6)]]
    stats = so.residual_stats(chunks)
    assert stats.tokens == 60
    for i, h in enumerate(hs):
        flat = h.reshape(-1, 16).astype(np.float64)
        norm2 = (flat ** 2).sum(1, keepdims=True)
        share = np.divide(flat ** 2, norm2, out=np.zeros_like(flat), where=norm2 > 0)
        np.testing.assert_allclose(stats.channel_max[i], np.abs(flat).max(0), rtol=1e-6)
        np.testing.assert_allclose(stats.share_sum[i], share.sum(0), rtol=1e-5, atol=1e-6)
        top = np.bincount(np.abs(flat).argmax(1), minlength=16)
        np.testing.assert_array_equal(stats.top_count[i], top)
    assert stats.top_count[1, 7] > 50
    both = stats.pooled(stats)
    assert both.tokens == 120 and np.array_equal(both.channel_max, stats.channel_max)
    with pytest.raises(ValueError, match="ratio=1"):
        so.SuperOutlierSpec(ratio=1)
    with pytest.raises(ValueError, match="min_layers=0"):
        so.SuperOutlierSpec(min_layers=0)


PLANTED, CANCEL_AT = 17, 3  # channel; the block that removes it again


@pytest.fixture(scope="module")
def tiny_pair():
    """A random tiny LLaDA (4 blocks, 64 channels) and a copy that carries channel 17 at 40
    through blocks 0..2: the embedding writes 40 into it for every token, and block 3's MLP
    subtracts it with one neuron that reads it (with the channel dominating the stream, the
    normalised input holds sqrt(64) = 8 there, so silu(8) x 8 is that neuron's constant)."""
    from qdlm_jax.checkpoints.random_init import tiny_config
    from qdlm_jax.models.dllm import init_model

    config = tiny_config("llada", num_layers=4)
    plain, planted = init_model(config), init_model(config)
    value, neuron = 40.0, 5
    planted.embed[...] = planted.embed[...].at[:, PLANTED].set(value)
    block = planted.layers[CANCEL_AT]
    n = np.sqrt(config.hidden_size)
    for proj in (block.gate_proj, block.up_proj):
        proj.kernel[...] = proj.kernel[...].at[:, neuron].set(0).at[PLANTED, neuron].set(1)
    out = -value / (n / (1 + np.exp(-n)) * n)
    block.down_proj.kernel[...] = (block.down_proj.kernel[...].at[neuron].set(0)
                                   .at[neuron, PLANTED].set(out))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 250, (8, 32)).astype(np.int32)
    masked = np.where(rng.random(ids.shape) < 0.5, config.mask_token_id, ids)

    def sections(model, spec=so.SuperOutlierSpec()):
        ospec = outliers.OutlierSpec(batch_size=4)
        stats = {cond: outliers.layer_stats(model, x, np.ones_like(x), ospec)[1]
                 for cond, x in (("clean", ids), ("masked", masked))}
        return so.report(stats, spec)

    return sections, plain, planted


def test_planted_channel_is_found_with_its_span(tiny_pair):
    sections, plain, planted = tiny_pair
    section = sections(planted)
    assert section["found"] and section["tokens"] == 2 * 8 * 32
    [run] = section["runs"]
    assert (run["channel"], run["first"], run["last"]) == (PLANTED, 0, CANCEL_AT - 1)
    assert run["max_abs"] == pytest.approx(40.0, rel=0.01)
    assert min(run["ratio"]) > 100 and set(run["ratio_peak_by_condition"]) == {"clean",
                                                                              "masked"}
    assert min(run["share"]) > 0.99 and min(run["top_token_frac"]) == 1.0
    lines = so.markdown(section)
    assert lines[0].startswith("super-outliers: 1 (") and f"| {PLANTED} | 0..2 |" in lines[-1]

    none = sections(plain)
    assert not none["found"] and none["runs"] == [] and none["largest"]["ratio"] < 5
    assert so.markdown(none)[0].startswith("super-outliers: none (")
    # A run shorter than min_layers does not count.
    assert not sections(planted, so.SuperOutlierSpec(min_layers=CANCEL_AT + 1))["found"]
