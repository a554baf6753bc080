"""DiffusionGemma weight-only RTN: the coverage plan accounts for every tensor, 16 bits is the
fp model bit for bit, the guard fails naming a tensor the pass skipped, and the packed model
saves and loads back with identical logits."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qdlm_jax  # noqa: F401  (binds the packed types to their ops)
from qdlm_jax import load_model
from qdlm_jax.checkpoints.orbax_format import save_checkpoint
from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.models.diffusion_gemma import init_cache, init_model, model_from_params
from qdlm_jax.models.params import get_params, path_str
from qdlm_jax.quant import gemma_rtn
from qdlm_jax.quant.coverage import CoverageError, check_coverage, coverage_table
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec, gemma_plan, tensor_kind
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec

CONFIG = tiny_config("diffusion_gemma")  # [sliding, full], 4 experts top-2, H 32, I 48, moe 24
W4 = GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=8))


@pytest.fixture(scope="module")
def fp_model():
    return init_model(CONFIG, seed=0)


@pytest.fixture(scope="module")
def w4(fp_model):
    """(fp params, W4 g8 params, plan)."""
    params = get_params(fp_model)
    return (params, *gemma_rtn.rtn_quantize_gemma(params, W4))


@nnx.jit
def _logits(model, ids, canvas, sc):
    cache = model.encode(ids, None, init_cache(model.config, ids.shape[0],
                                               ids.shape[1] + canvas.shape[1]))
    return model.decode(canvas, sc, cache)


def logits(model):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 6)), jnp.int32)
    canvas = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, CONFIG.canvas_length)),
                         jnp.int32)
    sc = jnp.asarray(rng.standard_normal((2, CONFIG.canvas_length, CONFIG.vocab_size)),
                     jnp.float32)
    return np.asarray(_logits(model, ids, canvas, sc))


def test_the_plan_accounts_for_every_tensor(fp_model):
    params = get_params(fp_model)
    plan = gemma_plan({p: v.shape for p, v in params.items()}, W4)
    assert [t.path for t in plan.tensors] == list(params)
    assert sum(t.params for t in plan.tensors) == sum(v.size for v in params.values())
    assert sum(t.share for t in plan.tensors) == pytest.approx(1.0)
    action = {t.name: t.action for t in plan.tensors}
    kinds = {t.name: t.kind for t in plan.tensors}
    for i in range(CONFIG.num_layers):
        for name in ("gate_up", "down"):
            assert kinds[f"layers.{i}.experts.{name}"] == f"expert {name}"
            assert action[f"layers.{i}.experts.{name}"] == "rtn W4 g8"
        assert action[f"layers.{i}.self_attn.q_proj.kernel"] == "rtn W4 g8"
        assert action[f"layers.{i}.mlp.down_proj.kernel"] == "rtn W4 g8"
        assert action[f"layers.{i}.router.proj.kernel"].startswith("kept (router")
        assert action[f"layers.{i}.router.per_expert_scale"].startswith("kept")
        assert action[f"layers.{i}.layer_scalar_encoder"].startswith("kept")
        assert action[f"layers.{i}.pre_feedforward_layernorm_2.scale"] == "kept (norm weight)"
    assert kinds["self_conditioning.mlp.up_proj.kernel"] == "self-conditioning MLP"
    assert action["embed"] == "kept (embedding and tied LM head)"
    assert kinds["layers.1.self_attn.k_norm.scale"] == "norm"
    expert_share = sum(t.share for t in plan.tensors if t.kind.startswith("expert"))
    table = coverage_table(plan.rows())
    assert f"| expert gate_up | 2 | {2 * 4 * 32 * 48:,} |" in table
    assert f"{100 * plan.quantized_share:.2f}% of the parameters quantized" in table
    assert 0.4 < expert_share < plan.quantized_share < 1

    routed = gemma_plan({p: v.shape for p, v in params.items()},
                        GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=8),
                                     quantize_router=True))
    changed = {t.name for t, u in zip(plan.tensors, routed.tensors) if t.action != u.action}
    assert changed == {f"layers.{i}.router.proj.kernel" for i in range(CONFIG.num_layers)}

    with pytest.raises(ValueError, match=r"layers.0.experts.down \(expert down, input width "
                                         r"24\): group_size=16 does not divide"):
        gemma_plan({p: v.shape for p, v in params.items()},
                   GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=16)))
    with pytest.raises(ValueError, match="layers.0.mystery: not a DiffusionGemma tensor"):
        tensor_kind(("layers", 0, "mystery"))


def test_rtn_packs_every_planned_tensor_and_16_bits_is_the_fp_model(fp_model, w4, tmp_path):
    params, qparams, plan = w4
    for t in plan.tensors:
        v = qparams[t.path]
        if t.kind.startswith("expert"):
            assert isinstance(v, QuantizedExperts) and (v.bits, v.group_size) == (4, 8)
        elif t.quantized:
            assert isinstance(v, QuantizedArray)
        else:
            assert v is params[t.path]
    fp = logits(fp_model)
    kept, plan16 = gemma_rtn.rtn_quantize_gemma(params, GemmaPTQSpec(weight=None))
    assert not plan16.paths() and all(t.action == "kept (16 bits)" for t in plan16.tensors)
    np.testing.assert_array_equal(logits(model_from_params(CONFIG, kept)), fp)
    save_checkpoint(tmp_path / "w16", CONFIG, kept)  # and through the saved checkpoint
    np.testing.assert_array_equal(logits(load_model(tmp_path / "w16")), fp)


def test_the_guard_names_a_tensor_the_pass_skipped(w4, monkeypatch):
    params, qparams, plan = w4
    real = gemma_rtn.quantize_experts

    def skip_layer_1(params, paths, spec):
        return real(params, [p for p in paths if p[1] != 1], spec)

    monkeypatch.setattr(gemma_rtn, "quantize_experts", skip_layer_1)
    with pytest.raises(CoverageError) as failed:
        gemma_rtn.rtn_quantize_gemma(params, W4)
    monkeypatch.undo()
    message = str(failed.value)
    assert message.startswith("2 tensor(s) depart from the quantization plan: ")
    assert ("layers.1.experts.gate_up (expert gate_up, 6,144 params): planned rtn W4 g8 as "
            "QuantizedExperts, but the result holds a float32 array (4, 32, 48); it was not "
            "quantized") in message
    assert "layers.1.experts.down (expert down, 3,072 params)" in message
    assert "layers.0.experts" not in message

    router = ("layers", 0, "router", "proj", "kernel")
    changed = {**qparams, router: QuantizedArray.quantize(params[router], W4.weight)}
    with pytest.raises(CoverageError, match=r"layers.0.router.proj.kernel \(router, 128 "
                                            r"params\): planned kept \(router: expert "
                                            r"choices stay exact\), but the result holds a "
                                            r"QuantizedArray"):
        check_coverage(plan, params, changed)
    missing = {p: v for p, v in qparams.items() if path_str(p) != "final_norm.scale"}
    with pytest.raises(CoverageError, match=r"final_norm.scale \(norm, 32 params\): missing"):
        check_coverage(plan, params, missing)


# slow: a save and load (the job's packed model is loaded and run in tests/jobs)
@pytest.mark.slow
def test_packed_model_saves_and_loads_with_identical_logits(fp_model, w4, tmp_path):
    _, qparams, _ = w4
    save_checkpoint(tmp_path / "q", CONFIG, qparams)
    loaded = load_model(tmp_path / "q")
    gate_up = loaded.layers[1].experts.gate_up[...]
    assert isinstance(gate_up, QuantizedExperts) and gate_up.shape == (4, 32, 48)
    assert isinstance(loaded.layers[0].self_attn.o_proj.kernel[...], QuantizedArray)
    q = logits(model_from_params(CONFIG, qparams))
    np.testing.assert_array_equal(logits(loaded), q)
    assert 0 < np.max(np.abs(q - logits(fp_model))) < 1.0  # quantized, and close

    from qdlm_jax.quant.act_core import ActSpec  # W4A8: the experts' ActKernel round trip
    a8, _ = gemma_rtn.rtn_quantize_gemma(w4[0], dataclasses.replace(W4, act=ActSpec(bits=8)))
    save_checkpoint(tmp_path / "a8", CONFIG, a8)
    loaded = load_model(tmp_path / "a8")
    gate_up = loaded.layers[1].experts.gate_up[...]
    assert isinstance(gate_up.weight, QuantizedExperts) and gate_up.act.bits == 8
    np.testing.assert_array_equal(logits(loaded), logits(model_from_params(CONFIG, a8)))


def test_parts_and_router_width_choose_what_is_quantized_and_how(w4):
    params = w4[0]
    shapes = {p: v.shape for p, v in params.items()}
    experts_only = gemma_plan(shapes, GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=8),
                                                   parts=("experts",)))
    assert {t.kind for t in experts_only.tensors if t.quantized} == {"expert gate_up",
                                                                     "expert down"}
    action = {t.name: t.action for t in experts_only.tensors}
    assert action["layers.0.self_attn.q_proj.kernel"] == "kept (attention not in parts " \
                                                          "(experts))"
    assert action["self_conditioning.mlp.up_proj.kernel"].startswith(
        "kept (self_conditioning not in parts")
    attention_only = gemma_plan(shapes, GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=8),
                                                     parts=("attention",)))
    assert {t.kind for t in attention_only.tensors if t.quantized} == {"attention"}

    spec = GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=8), quantize_router=True,
                        router_weight=QuantSpec(bits=8, group_size=8), parts=("experts",))
    out, plan = gemma_rtn.rtn_quantize_gemma(params, spec)
    router = ("layers", 1, "router", "proj", "kernel")
    assert {t.name: t.action for t in plan.tensors}["layers.1.router.proj.kernel"] == \
        "rtn W8 g8"
    assert out[router].bits == 8 and out[("layers", 1, "experts", "down")].bits == 4
    w = np.asarray(params[router], np.float64)
    err8 = np.abs(np.asarray(out[router].dequantize(), np.float64) - w).max()
    err4 = np.abs(np.asarray(QuantizedArray.quantize(params[router], W4.weight).dequantize(),
                             np.float64) - w).max()
    assert err8 < err4 / 8  # 8 bits: 17x finer steps than 4
    q_proj = ("layers", 0, "self_attn", "q_proj", "kernel")
    assert out[q_proj] is params[q_proj]  # attention not in parts: the fp array itself
    with pytest.raises(ValueError, match=r"parts=\('experts', 'mlp'\): expected distinct "
                                         r"names among"):
        GemmaPTQSpec(parts=("experts", "mlp"))


def test_activation_bits_quantize_the_inputs_of_every_quantized_tensor(fp_model, w4):
    """W4A8: every planned tensor wrapped so its inputs are quantized (the plan says A8, the
    guard fails a tensor left with float inputs); the experts' rows are quantized one by one
    (NumPy statement of the routed layer); A8 stays closer to A16 than A4."""
    from qdlm_jax.models.experts import moe
    from qdlm_jax.quant.act_core import ActSpec
    from qdlm_jax.quant.act_kernel import ActKernel
    from tests.quant.test_act_core import _numpy_fake_quant
    from tests.quant.test_gemma_awq import _gelu

    params, qparams, _ = w4
    spec8 = GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=8), act=ActSpec(bits=8))
    out, plan = gemma_rtn.rtn_quantize_gemma(params, spec8)
    assert {t.action for t in plan.tensors if t.quantized} == {"rtn W4A8 g8"}
    for t in plan.tensors:
        v = out[t.path]
        assert isinstance(v, ActKernel) == t.quantized
        if t.quantized:
            assert v.act.bits == 8 and type(v.weight) is type(qparams[t.path])
    path = ("layers", 1, "experts", "down")
    with pytest.raises(CoverageError, match=r"layers.1.experts.down \(expert down, 3,072 "
                                            r"params\): planned rtn W4A8 g8, but the result's "
                                            r"inputs are float"):
        check_coverage(plan, params, {**out, path: out[path].weight})

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 4, (6, 2)), jnp.int32)
    wts = jnp.asarray(rng.uniform(0.2, 1.0, (6, 2)), jnp.float32)
    gu, dn = out[("layers", 1, "experts", "gate_up")], out[path]
    got = np.asarray(moe(x, gu, dn, ids, wts))
    gu_w = np.asarray(gu.weight.dequantize(jnp.float32), np.float64)
    dn_w = np.asarray(dn.weight.dequantize(jnp.float32), np.float64)
    xq, _ = _numpy_fake_quant(np.asarray(x), 8, True, 1.0, True)
    want = np.zeros((6, 32))
    for t in range(6):
        for e, w in zip(np.asarray(ids[t]), np.asarray(wts[t])):
            h = xq[t] @ gu_w[e]
            a = _gelu(h[:24]).astype(np.float64) * h[24:]
            aq, _ = _numpy_fake_quant(a[None], 8, True, 1.0, True)
            want[t] += w * (aq[0] @ dn_w[e])
    # a tenth of what quantizing the rows changes (float inputs miss by about 1% of the
    # output's scale here)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())

    a16 = logits(model_from_params(CONFIG, qparams))
    a8 = logits(model_from_params(CONFIG, out))
    a4 = logits(model_from_params(CONFIG, gemma_rtn.rtn_quantize_gemma(
        params, dataclasses.replace(spec8, act=ActSpec(bits=4)))[0]))
    assert 0 < np.abs(a8 - a16).max() < np.abs(a4 - a16).max()
