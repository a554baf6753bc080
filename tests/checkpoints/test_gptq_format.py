"""The GPTQ export: a PyTorch dequantizer written from the format's definition reads back our
weights, our reader reads back our export, and a GPTQ checkpoint runs as a packed model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qdlm_jax import load_model
from qdlm_jax.checkpoints.gptq_format import load_gptq, save_gptq
from qdlm_jax.checkpoints.hf import key_map
from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.cli import main
from qdlm_jax.models import init_model
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.quant import QuantizedArray, QuantSpec, rtn_quantize_params
from qdlm_jax.quant.gptq_core import gptq


def torch_dequantize(sd: dict, prefix: str, bits: int) -> torch.Tensor:
    """The GPTQ v1 layout's definition: int32 words hold 32/bits values, lowest bits first;
    qweight packs input rows, qzeros packs output columns and stores zero - 1; scales fp16;
    W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]). Returns [out, in]."""
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    qw = sd[f"{prefix}.qweight"].to(torch.int64) & 0xFFFFFFFF  # [in/pack, out]
    q = ((qw[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qw.shape[1])
    qz = sd[f"{prefix}.qzeros"].to(torch.int64) & 0xFFFFFFFF  # [groups, out/pack]
    z = ((qz[:, :, None] >> shifts[None, None, :]) & mask).reshape(qz.shape[0], -1)
    z = (z + 1) & mask
    scales = sd[f"{prefix}.scales"].to(torch.float32)
    g = sd[f"{prefix}.g_idx"].to(torch.int64)
    return (scales[g] * (q - z[g]).to(torch.float32)).T


def _packed_params(family, bits, group, sym, act_order=False):
    config = tiny_config(family, hidden_size=128, intermediate_size=256)
    params = get_params(init_model(config, seed=1))
    if not act_order:
        return config, rtn_quantize_params(params, QuantSpec(bits=bits, group_size=group,
                                                             sym=sym))
    rng = np.random.default_rng(0)
    out = dict(params)
    for path, w in params.items():
        if path[-1] == "kernel" and path[0] == "layers":
            x = rng.standard_normal((256, w.shape[0])).astype(np.float32)
            r = gptq(w.T.astype(jnp.float32), jnp.asarray(2 * x.T @ x / 256), bits=bits,
                     group_size=group, sym=sym, act_order=True)
            out[path] = QuantizedArray.from_codes(r.codes, r.scales, r.zeros, bits=bits,
                                                  group_size=group, sym=sym, g_idx=r.g_idx)
    return config, out


# slow: LLaDA at 2 bits (the same layout as at 4 bits, with 2-bit codes)
@pytest.mark.parametrize("family,bits,group,sym,act_order", [
    ("llada", 4, 32, False, False), ("dream", 8, -1, True, False),
    pytest.param("llada", 2, 64, False, False, marks=pytest.mark.slow),
    ("dream", 4, 32, False, True)])
def test_export_reads_back_in_pytorch_and_in_qdlm(tmp_path, family, bits, group, sym,
                                                  act_order):
    config, params = _packed_params(family, bits, group, sym, act_order)
    out = save_gptq(config, params, tmp_path / "gptq")
    hf = json.loads((out / "config.json").read_text())
    q = hf["quantization_config"]
    assert q == {**q, "quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                 "desc_act": act_order, "checkpoint_format": "gptq"}
    sd = load_file(str(out / "model.safetensors"))
    n_linear = 0
    for m in key_map(config):
        v = params[m.path]
        if not isinstance(v, QuantizedArray):
            assert m.hf_name in sd
            continue
        n_linear += 1
        prefix = m.hf_name[: -len(".weight")]
        assert sd[f"{prefix}.qweight"].dtype == torch.int32
        assert sd[f"{prefix}.scales"].dtype == torch.float16
        ours = QuantizedArray(packed=v.packed, scale=v.scale.astype(jnp.float16), zero=v.zero,
                              g_idx=v.g_idx, bits=v.bits, group_size=v.group_size,
                              shape=v.shape, orientation=v.orientation)
        np.testing.assert_array_equal(torch_dequantize(sd, prefix, bits).numpy(),
                                      np.asarray(ours.dequantize_storage(jnp.float32)))
    assert n_linear == 7 * config.num_layers

    config2, back = load_gptq(out)
    assert config2.to_dict() == config.to_dict()
    for path, v in params.items():
        if isinstance(v, QuantizedArray):
            b = back[path]
            np.testing.assert_array_equal(np.asarray(b.codes()), np.asarray(v.codes()))
            np.testing.assert_array_equal(np.asarray(b.zeros()), np.asarray(v.zeros()))
            np.testing.assert_array_equal(np.asarray(b.scale, np.float32),
                                          np.asarray(v.scale.astype(jnp.float16), np.float32))
            assert (b.g_idx is None) == (not act_order)


def test_qdlm_export_command_and_loading_the_export(tmp_path, capsys):
    config, params = _packed_params("llada", 4, 32, False)
    from qdlm_jax.checkpoints.orbax_format import save_checkpoint
    src = save_checkpoint(tmp_path / "packed", config, params)
    assert main(["export", str(src), str(tmp_path / "gptq"), "--format", "gptq"]) == 0
    assert "4-bit, group 32" in capsys.readouterr().out
    assert main(["export", str(src), str(tmp_path / "gptq")]) == 2  # never overwritten
    exported = load_model(tmp_path / "gptq")
    assert load_model(tmp_path / "gptq", dtype="bfloat16").config.dtype == "bfloat16"
    assert main(["info", str(tmp_path / "gptq")]) == 0
    assert "GPTQ export" in capsys.readouterr().out
    packed = model_from_params(config, params)
    ids = jnp.asarray(np.arange(24)[None] % 200)
    a, b = np.asarray(packed(ids)), np.asarray(exported(ids))
    assert np.max(np.abs(a - b)) < 2e-2 * np.max(np.abs(a))  # fp16 scales: close, not equal


def test_export_refuses_float_and_3_bit_models(tmp_path):
    config = tiny_config("llada", hidden_size=128, intermediate_size=256)
    params = get_params(init_model(config))
    with pytest.raises(ValueError, match="no quantized linear"):
        save_gptq(config, params, tmp_path / "a")
    q3 = rtn_quantize_params(params, QuantSpec(bits=3, group_size=32))
    with pytest.raises(ValueError, match="3-bit"):
        save_gptq(config, q3, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _fp16_scales(params):
    """The packed model as the GPTQ layout stores it: every scale rounded to fp16 once."""
    from qdlm_jax.quant.act_kernel import inner_weight, with_weight
    out = {}
    for p, v in params.items():
        w = inner_weight(v)
        if isinstance(w, QuantizedArray):
            w = w.replace(scale=jnp.asarray(w.scale).astype(jnp.float16).astype(w.scale.dtype))
        out[p] = with_weight(v, w)
    return out


# What the quantize job can produce, and whether the GPTQ layout can hold it.
JOB_MODELS = [
    ("rtn", dict(bits=4, group_size=128), True),
    ("gptq", dict(bits=4, group_size=128), True),
    ("gptq", dict(bits=8, group_size=-1, sym=True), True),
    ("awq", {"bits": 4, "group_size": 128, "awq.grid": 4}, True),
    ("daq", {"bits": 2, "group_size": 128, "daq.iters": 2, "daq.compensate": "none"},
     "binary planes"),
    ("smoothquant", dict(bits=8, act_bits=8, group_size=-1), "8-bit activation"),
    ("quarot", dict(bits=4, act_bits=4, group_size=-1), "online hadamard"),
    ("duquant", dict(bits=4, act_bits=4, group_size=-1), "online duquant"),
    ("rtn", dict(bits=4, act_bits=4, group_size=-1), "4-bit activation"),
]


@pytest.fixture(scope="module")
def tiny_dream():
    from pathlib import Path
    return str(Path(__file__).resolve().parents[2] / "assets" / "tiny-dream")


# slow: the longest quantizations (DAQ, AWQ's grid, QuaRot) and GPTQ's second setting; an
# exact export (RTN, GPTQ W4) and a refusal before writing (SmoothQuant, DuQuant, A4) run in
# `make test`
def _job_id(method, settings):
    return f"{method}-{'-'.join(f'{k}{v}' for k, v in settings.items() if '.' not in k)}"


SLOW_JOB_MODELS = ("daq", "awq", "quarot", "gptq-bits8-group_size-1-symTrue")


@pytest.mark.parametrize("method,settings,expect", [
    pytest.param(m, s, e, marks=[pytest.mark.slow] if {m, _job_id(m, s)} & set(SLOW_JOB_MODELS)
                 else [], id=_job_id(m, s))
    for m, s, e in JOB_MODELS])
def test_every_job_model_exports_exactly_or_is_refused(tmp_path, tiny_dream, method, settings,
                                                       expect):
    """An export either computes what the packed model computes (weights and logits equal
    up to the fp16 scales the layout stores) or is refused before anything is written."""
    from qdlm_jax.jobs.config_flags import load_config_file
    from qdlm_jax.jobs.quantize import quantize_from_config
    cfg = load_config_file("configs/quantize.py")
    cfg.model, cfg.method, cfg.calibration = tiny_dream, method, "clean"
    cfg.calib.n_samples, cfg.calib.seq_len = 4, 32
    for k, v in settings.items():
        *parents, leaf = k.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        node[leaf] = v
    qmodel, _ = quantize_from_config(cfg)
    params = get_params(qmodel)
    dst = tmp_path / "export"
    if expect is not True:
        with pytest.raises(ValueError, match="export --format gptq: the model uses") as e:
            save_gptq(qmodel.config, params, dst)
        assert expect in str(e.value).lower() and "\n" not in str(e.value)
        assert not dst.exists()
        return
    save_gptq(qmodel.config, params, dst)
    cfg_json = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert cfg_json["group_size"] == settings["group_size"]  # 128-wide linears: one group
    _, back = load_gptq(dst)
    stored = _fp16_scales(params)
    from qdlm_jax.quant.act_kernel import inner_weight
    for path, v in stored.items():
        w = inner_weight(v)
        if isinstance(w, QuantizedArray):
            np.testing.assert_array_equal(np.asarray(back[path].dequantize(jnp.float32)),
                                          np.asarray(w.dequantize(jnp.float32)), str(path))
    ids = jnp.asarray(np.arange(3, 40)[None])
    want = np.asarray(model_from_params(qmodel.config, stored)(ids))
    got = np.asarray(load_model(dst, dtype="float32")(ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# slow: a QuaRot job before the refusal (other refusals run in `make test`)
@pytest.mark.slow
def test_export_command_refuses_a_quarot_model_in_one_line(tmp_path, capsys, tiny_dream):
    from qdlm_jax.checkpoints.orbax_format import save_checkpoint
    from qdlm_jax.jobs.config_flags import load_config_file
    from qdlm_jax.jobs.quantize import quantize_from_config
    cfg = load_config_file("configs/quantize.py")
    cfg.model, cfg.method, cfg.bits, cfg.act_bits, cfg.group_size = tiny_dream, "quarot", 4, 4, -1
    cfg.calib.n_samples, cfg.calib.seq_len = 2, 16
    qmodel, _ = quantize_from_config(cfg)
    src = save_checkpoint(tmp_path / "packed", qmodel.config, get_params(qmodel))
    capsys.readouterr()  # the quantization's progress bars
    assert main(["export", str(src), str(tmp_path / "gptq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "online hadamard transforms" in err[0], err
    assert not (tmp_path / "gptq").exists()


def test_packed_experts_are_refused_naming_the_tensor():
    """The GPTQ layout has no 3-D per-expert tensors: a model with packed experts is refused
    in one line naming one, before anything is written."""
    from qdlm_jax.checkpoints.gptq_format import check_representable
    from qdlm_jax.errors import CheckpointError
    from qdlm_jax.quant.qexperts import QuantizedExperts
    from qdlm_jax.quant.quantizer_core import QuantSpec
    experts = QuantizedExperts.quantize(
        jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 8)), jnp.float32),
        QuantSpec(bits=4, group_size=8))
    with pytest.raises(CheckpointError, match=r"routed experts packed per expert .* \(e\.g\. "
                                              r"layers\.0\.experts\.down, 1 tensors\)"):
        check_representable({("layers", 0, "experts", "down"): experts})
