"""Weight-activation PTQ: the transforms leave the float model unchanged, rotations beat
smoothing and plain RTN at W4A4 on a model with outlier channels, quantized models save and
load, and sharded params give the single-device result."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdlm_jax import load_model
from qdlm_jax.checkpoints.orbax_format import load_checkpoint, save_checkpoint
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.models import init_model
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.models.sharding import make_mesh
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.act_kernel import ActKernel
from qdlm_jax.quant.calibration import CalibSpec, build_calibration
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec
from qdlm_jax.quant.wa import WASpec, quantize_model_wa


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _calib(model, n=8, t=32, seed=0):
    windows = np.random.default_rng(seed).integers(4, model.config.vocab_size - 4, (n, t))
    return windows, build_calibration(model, windows, CalibSpec(n_samples=n, seq_len=t))


# slow: Dream (LLaDA's run in `make test`; Dream's W4A4 transforms in test_rotations_*)
@pytest.mark.parametrize("family", ["llada", pytest.param("dream", marks=pytest.mark.slow)])
def test_transforms_leave_the_float_model_unchanged(family):
    """Smoothing folds, QuaRot's norm folding + rotations + online Hadamards, DuQuant's online
    rotations: before any rounding, the logits of the bundled fp32 model do not move."""
    model = load_model(f"assets/tiny-{family}", dtype="float32")
    windows, calib = _calib(model)
    ids = jnp.asarray(windows[:2])
    ref = np.asarray(_forward(model, ids))
    for method in ("smoothquant", "quarot", "duquant"):
        t, _ = quantize_model_wa(model, calib, WASpec(method=method, weight=None, act=None,
                                                      rotation_steps=16), progress=False)
        out = np.asarray(_forward(t, ids))
        assert np.max(np.abs(out - ref)) < 1e-4 * max(1.0, np.abs(ref).max() / 10), method
        kinds = {type(getattr(t.layers[0], n).kernel[...]).__name__
                 for n in ("q_proj", "down_proj")}
        assert ("ActKernel" in kinds) == (method != "smoothquant"), (method, kinds)


def _outlier_model():
    """One block whose residual stream has a few large channels, as trained LLMs do."""
    config = tiny_config("llada", hidden_size=128, intermediate_size=256, num_layers=2)
    model = init_model(config, seed=0)
    emb = np.asarray(model.embed[...]).copy()
    emb[:, [5, 77, 100]] *= np.array([40.0, 25.0, 30.0])
    model.embed.value = jnp.asarray(emb)
    return model


def test_rotations_beat_smoothing_and_rtn_at_w4a4():
    model = _outlier_model()
    windows, calib = _calib(model, n=16)
    ids = jnp.asarray(windows)
    ref = _forward(model, ids)
    w4, a4 = QuantSpec(bits=4, group_size=-1, sym=True), ActSpec(bits=4)
    err = {}
    for method in ("rtn", "smoothquant", "quarot", "duquant"):
        q, _ = quantize_model_wa(model, calib, WASpec(method=method, weight=w4, act=a4,
                                                      rotation_steps=32), progress=False)
        err[method] = float(jnp.linalg.norm(_forward(q, ids) - ref) / jnp.linalg.norm(ref))
    assert err["quarot"] < min(err["rtn"], err["smoothquant"]), err
    assert err["duquant"] < min(err["rtn"], err["smoothquant"]), err


# slow: a QuaRot W4A4 model saves and loads in tests/quant/test_kv_core.py (make test)
@pytest.mark.slow
def test_quantized_model_round_trips_through_a_checkpoint(tmp_path):
    model = _outlier_model()
    _, calib = _calib(model)
    for method in ("quarot", "duquant"):
        q, _ = quantize_model_wa(model, calib, WASpec(
            method=method, weight=QuantSpec(bits=4, group_size=64),
            act=ActSpec(bits=8, granularity="per_tensor", sym=False), rotation_steps=8),
            progress=False)
        k = q.layers[1].down_proj.kernel[...]
        assert isinstance(k, ActKernel) and isinstance(k.weight, QuantizedArray)
        assert k.transform is not None and k.act.bits == 8 and k.act_range.shape == (2,)
        path = save_checkpoint(tmp_path / method, q.config, get_params(q))
        config, params = load_checkpoint(path)
        loaded = model_from_params(config, params)
        ids = jnp.asarray(np.arange(24, dtype=np.int32)[None] + 4)
        np.testing.assert_array_equal(np.asarray(_forward(loaded, ids)),
                                      np.asarray(_forward(q, ids)))


# Slow, and kept out of `make test`: twice under pytest-xdist on the loaded 2-core machine this
# test stopped making progress inside a sharded computation (GPTQ on DuQuant-rotated weights,
# 8 fake CPU devices) with both processes idle; run alone it passes in about 76 s.
@pytest.mark.slow
def test_sharded_equals_single_device(tmp_path):
    config = tiny_config("llada", num_heads=8, num_kv_heads=8, hidden_size=128,
                         intermediate_size=256, num_layers=1)
    path = write_hf_checkpoint(tmp_path / "ckpt", config, seed=2)
    windows = np.random.default_rng(0).integers(0, 240, (8, 32))
    outs = []
    for mesh in (None, make_mesh(model=8)):
        model = load_model(path, mesh=mesh)
        if mesh is not None:
            assert len(model.layers[0].q_proj.kernel[...].sharding.device_set) == 8
        calib = build_calibration(model, windows, CalibSpec(n_samples=8, seq_len=32))
        spec = WASpec(method="duquant", weight=QuantSpec(bits=4, group_size=64),
                      act=ActSpec(bits=8), weight_quantizer="gptq", rotation_steps=8)
        q, _ = quantize_model_wa(model, calib, spec, progress=False)
        outs.append(np.asarray(_forward(q, jnp.asarray(windows[:2]))))
        quarot, _ = quantize_model_wa(model, None, WASpec(
            method="quarot", weight=QuantSpec(bits=4, group_size=64), act=ActSpec(bits=4)),
            progress=False)
        outs.append(np.asarray(_forward(quarot, jnp.asarray(windows[:2]))))
    np.testing.assert_allclose(outs[0], outs[2], atol=2e-3)
    np.testing.assert_allclose(outs[1], outs[3], atol=2e-3)
