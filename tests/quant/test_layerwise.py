"""The layer-wise pipeline: AWQ folding is exact in float, GPTQ/AWQ blocks beat RTN on a
model with real activation structure, and sharded params give the single-device result."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.models import init_model
from qdlm_jax.models.sharding import make_mesh
from qdlm_jax.quant.block import GROUPS, PRODUCERS, fold
from qdlm_jax.quant.calibration import CalibSpec, build_calibration
from qdlm_jax.quant.layerwise import PTQSpec, quantize_model
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_awq_scale_folding_leaves_the_float_model_unchanged(family):
    config = tiny_config(family, hidden_size=128, intermediate_size=256)
    model = init_model(config, seed=3)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 240, (2, 16)))
    before = np.asarray(model(ids))
    rng = np.random.default_rng(1)
    for block in model.layers:
        for group in GROUPS:
            producer, kind = PRODUCERS[group]
            width = block.__getattribute__(group[0]).kernel[...].shape[0]
            if kind == "linear" and block.__getattribute__(producer).kernel[...].shape[1] != width:
                continue  # GQA: v -> o has no exact fold (the driver skips it too)
            s = jnp.asarray(np.exp(rng.normal(0, 0.5, width)), jnp.float32)
            fold(block, group, producer, kind, s)
    after = np.asarray(model(ids))
    assert np.max(np.abs(after - before)) < 1e-4 * max(1.0, np.max(np.abs(before)))


def _outlier_model(family):
    """A model whose residual stream has a few large channels, as trained LLMs do."""
    config = tiny_config(family, hidden_size=128, intermediate_size=256, num_layers=1)
    model = init_model(config, seed=0)
    emb = np.asarray(model.embed[...]).copy()
    emb[:, [5, 77]] *= 20.0
    model.embed.value = jnp.asarray(emb)
    return model


# slow: AWQ (its driver's clipping and token use run in `make test`)
@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_calibrated_methods_beat_rtn_on_block_output(method):
    model = _outlier_model("llada")
    windows = np.random.default_rng(0).integers(0, 240, (16, 32))
    calib = build_calibration(model, windows, CalibSpec(n_samples=16, seq_len=32))
    spec = dict(weight=QuantSpec(bits=3, group_size=64))
    rtn_model, _ = quantize_model(model, None, PTQSpec(method="rtn", **spec), progress=False)
    q_model, stats = quantize_model(model, calib, PTQSpec(method=method, **spec),
                                    progress=False)
    # Output error on the calibration inputs (what both methods minimise, block by block).
    ids = jnp.asarray(windows)
    ref = model(ids)
    err_rtn = float(jnp.linalg.norm(rtn_model(ids) - ref))
    err_ours = float(jnp.linalg.norm(q_model(ids) - ref))
    assert stats["layers"][0]["block_out_rel_err"] > 0
    assert err_ours < err_rtn, (err_ours, err_rtn)
    k = q_model.layers[0].down_proj.kernel[...]
    assert isinstance(k, QuantizedArray) and k.bits == 3


# slow: sharded GPTQ equal to one device is checked in `make test` by the streaming
# pass on a mesh (tests/jobs/test_streaming.py) and by the two-process command
@pytest.mark.slow
def test_sharded_gptq_equals_single_device(tmp_path):
    config = tiny_config("llada", num_heads=8, num_kv_heads=8, hidden_size=128,
                         intermediate_size=256, num_layers=1)
    path = write_hf_checkpoint(tmp_path / "ckpt", config, seed=2)
    windows = np.random.default_rng(0).integers(0, 240, (8, 32))
    spec = PTQSpec(method="gptq", weight=QuantSpec(bits=4, group_size=64))
    results = []
    for mesh in (None, make_mesh(model=8)):
        model = load_model(path, mesh=mesh)
        if mesh is not None:  # the second run really starts from params split over 8 devices
            assert len(model.layers[0].q_proj.kernel[...].sharding.device_set) == 8
        calib = build_calibration(model, windows, CalibSpec(n_samples=8, seq_len=32))
        q, _ = quantize_model(model, calib, spec, progress=False)
        results.append(q)
    single, sharded = results
    for name in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        a = getattr(single.layers[0], name).kernel[...]
        b = getattr(sharded.layers[0], name).kernel[...]
        same = np.mean(np.asarray(a.codes()) == np.asarray(b.codes()))
        assert same > 0.999, (name, same)
        np.testing.assert_allclose(np.asarray(a.dequantize()), np.asarray(b.dequantize()),
                                   atol=1e-3)



# slow: Dream in bf16 (LLaDA fp32 and Dream without kept hidden states run in `make test`)
@pytest.mark.parametrize("family,dtype,keep_hidden", [
    ("llada", "float32", True),
    pytest.param("dream", "bfloat16", True, marks=pytest.mark.slow),
    ("dream", "float32", False)])
def test_group_grams_equal_whole_block_captures(tmp_path, family, dtype, keep_hidden):
    """GroupGrams runs each part of the block once; the reference reruns the whole block for
    each group (the pass before it did so). With the earlier groups quantized in between,
    every group's Gram matrix and the quantized block's output are the same bits (chunks of
    3 over 8 rows, padded rows, Dream's GQA and q/k/v biases; the MLP's hidden activations
    kept or recomputed for the output)."""
    from qdlm_jax.quant.block import BlockRunner, GroupGrams, block_inputs, quantize_gptq
    from qdlm_jax.quant.gptq_core import hessian

    config = tiny_config(family, hidden_size=128, intermediate_size=256, num_layers=1,
                         num_heads=8, num_kv_heads=8 if family == "llada" else 2)
    model = load_model(write_hf_checkpoint(tmp_path / "ckpt", config, seed=3), dtype=dtype)
    windows = np.random.default_rng(1).integers(0, 240, (8, 32))
    calib = build_calibration(model, windows, CalibSpec(mode="masked", n_samples=8,
                                                        seq_len=32))
    mask = np.array(calib.attention_mask)
    mask[:3, :6] = 0
    calib = dataclasses.replace(calib, attention_mask=mask)
    inputs = block_inputs(model.embed[...], model.config, calib)
    block = model.layers[0]
    runner = BlockRunner(block, inputs, 3)
    grams = GroupGrams(block, inputs, inputs.x, 3, keep_hidden=keep_hidden)
    pending = {}
    for k, group in enumerate(GROUPS):
        name = "layers.0." + group[0]
        want = runner.run(inputs.x, (name,), weighted=True)[1][name]
        got = grams.gram(k)
        assert np.array_equal(np.asarray(got), np.asarray(want)), group
        quantize_gptq(block, group, hessian(got, inputs.weight_sum),
                      QuantSpec(bits=3, group_size=32), pending, damp=0.01, block_size=32)
    want, _ = runner.run(inputs.x)
    got = grams.output()
    assert got.dtype == want.dtype
    assert np.array_equal(np.asarray(got.astype(jnp.float32)),
                          np.asarray(want.astype(jnp.float32)))
    with pytest.raises(ValueError, match="before"):
        GroupGrams(block, inputs, inputs.x, 3).gram(1)


def _block_and_runner(family, seed=0):
    """Layer 0 of a one-layer outlier model with its calibration inputs (8 x 32 tokens)."""
    from qdlm_jax.quant.block import BlockRunner, block_inputs

    model = _outlier_model(family)
    windows = np.random.default_rng(seed).integers(0, 240, (8, 32))
    calib = build_calibration(model, windows, CalibSpec(n_samples=8, seq_len=32))
    inputs = block_inputs(model.embed[...], model.config, calib)
    return model.layers[0], BlockRunner(model.layers[0], inputs, chunk=4), inputs.x


@pytest.mark.parametrize("family, group, inspect", [
    ("llada", ("q_proj", "k_proj", "v_proj"), "block"),
    pytest.param("llada", ("gate_proj", "up_proj"), "block", marks=pytest.mark.slow),
    ("dream", ("q_proj", "k_proj", "v_proj"), "attention"),
    pytest.param("dream", ("gate_proj", "up_proj"), "mlp", marks=pytest.mark.slow),
])
def test_awq_scale_search_scores_the_module_llm_awq_inspects(family, group, inspect):
    """LLaDA: the whole block (fed the group's captured input, as llm-awq's module2inspect=
    module); Dream: the attention module / the MLP. Checked at ratio 0 (s = 1), where the
    candidate is plain Q(W), against the module run eagerly with Q(W) swapped in."""
    import jax
    from flax import nnx

    from qdlm_jax.quant import awq, awq_core
    from qdlm_jax.quant.block import set_kernel, weight

    block, runner, x = _block_and_runner(family)
    _, cap = runner.run(x, ("layers.0." + group[0],), weighted=False)
    xg = cap["layers.0." + group[0]]
    kw = dict(bits=3, group_size=64, sym=False)
    s, ratio, losses, got = awq.search_group_scales(
        block, group, xg, key_bias=runner.key_bias, cos=runner.cos, sin=runner.sin, **kw)
    assert got == inspect and losses.shape == (20,)
    assert float(losses[0]) > 0 and float(losses.min()) <= float(losses[0])

    def module(b):
        if inspect == "block":
            return b(xg, None, runner.cos, runner.sin)
        if inspect == "attention":
            return b.attention(xg, runner.key_bias, runner.cos, runner.sin, None)
        return b.down_proj(jax.nn.silu(b.gate_proj(xg)) * b.up_proj(xg))

    ref = module(block)
    qblock = nnx.merge(*nnx.split(block))
    for name in group:
        w = weight(qblock, name)
        set_kernel(qblock, name, awq_core.pseudo_quantize(w.T, **kw).T.astype(w.dtype))
    loss0 = float(jnp.mean((ref - module(qblock)).astype(jnp.float32) ** 2))
    np.testing.assert_allclose(float(losses[0]), loss0, rtol=1e-4)
    # the stacked linear outputs alone (the old objective) give a different loss
    stacked = awq_core.search_scales(xg, [weight(block, n).T for n in group], **kw)[2]
    assert abs(float(stacked[0]) - loss0) > 1e-3 * loss0


@pytest.mark.parametrize("family", ["llada", pytest.param("dream", marks=pytest.mark.slow)])
def test_awq_driver_clips_neither_q_nor_k_and_uses_every_token(family, monkeypatch):
    from qdlm_jax.quant import awq

    block, runner, x = _block_and_runner(family)
    seen = []
    search_clip = awq._search_clip

    def spy(xs, w, **kw):
        seen.append((xs.shape[0], w.shape))
        return search_clip(xs, w, **kw)

    monkeypatch.setattr(awq, "_search_clip", spy)
    spec = PTQSpec(method="awq", weight=QuantSpec(bits=4, group_size=64))
    pending = {}
    info = awq.quantize_block(block, runner, x, "layers.0.", spec, pending)
    c = block.config
    # v, o, gate, up, down ([out, in]): every linear but q_proj and k_proj
    d, kv, h, f = c.hidden_size, c.num_kv_heads * c.head_dim, c.num_heads * c.head_dim, \
        c.intermediate_size
    assert [w for _, w in seen] == [(kv, d), (d, h), (f, d), (f, d), (d, f)]
    # all 8 x 32 captured tokens reach the search; search_clip itself
    # takes every (256 // 512 -> 1)-th of them
    assert all(n == 256 for n, _ in seen)
    assert set(pending) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"}
    assert info["q_proj"]["inspected"] == ("block" if family == "llada" else "attention")
    if family == "dream":  # GQA: no v -> o fold
        assert info["o_proj"]["ratio"] is None
    else:
        assert info["o_proj"]["inspected"] == "linear"
