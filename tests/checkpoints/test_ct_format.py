"""The compressed-tensors export: the `compressed-tensors` package's own packer and
decompressor read it back to our dequantized weights bit for bit, and transformers'
`from_pretrained` (compressed-tensors integration, dequantize=True) loads it to those weights
and our logits."""

import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationConfig
from transformers import CompressedTensorsConfig, DiffusionGemmaForBlockDiffusion

from qdlm_jax import load_model
from qdlm_jax.checkpoints.ct_format import pack_int32, save_compressed_tensors, unpack_int32
from qdlm_jax.checkpoints.diffusion_gemma import key_map
from qdlm_jax.checkpoints.hf import save_hf
from qdlm_jax.checkpoints.orbax_format import save_checkpoint
from qdlm_jax.checkpoints.safetensors_io import SafetensorsFile
from qdlm_jax.cli import main
from qdlm_jax.errors import CheckpointError
from qdlm_jax.models import diffusion_gemma
from qdlm_jax.models.params import get_params
from qdlm_jax.quant.act_core import ActSpec
from qdlm_jax.quant.act_kernel import inner_weight
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec
from qdlm_jax.quant.gemma_rtn import rtn_quantize_gemma
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec
from tests.checkpoints.test_diffusion_gemma_load import ATOL, hf_logits, inputs, our_logits

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "assets/tiny-diffusiongemma"
TOKENIZER = [ASSET / "tokenizer.json"]


@pytest.fixture(scope="module")
def tiny():
    """The bundled tiny DiffusionGemma in float32 (config, params)."""
    model = load_model(ASSET, dtype="float32")
    return model.config, get_params(model)


def quantized(tiny, bits, group, sym, act=None):
    config, params = tiny
    spec = GemmaPTQSpec(weight=QuantSpec(bits=bits, group_size=group, sym=sym), act=act)
    return rtn_quantize_gemma(params, spec)[0]


def dequantized(params):
    """Our packed params with every weight dequantized (activations left in float)."""
    out = {}
    for p, v in params.items():
        w = inner_weight(v)
        out[p] = w.dequantize() if isinstance(w, (QuantizedArray, QuantizedExperts)) else w
    return out


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def own_memory(model):
    """`model` with every parameter and buffer copied into torch's own (64-byte aligned)
    memory: tensors loaded from a safetensors file are views at the file's offsets, and the
    CPU GEMM kernels round differently for differently aligned operands, so two models with
    the same weights give exactly the same logits only from equally aligned memory."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    return model


def raw(t: torch.Tensor) -> bytes:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def read(path):
    f = SafetensorsFile(path / "model.safetensors")
    return {k: np.array(f.get(k)) for k in f.keys()}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packing_matches_the_packages_packer(bits):
    rng = np.random.default_rng(bits)
    for shape in ((3, 37), (5, 64), (1, 7)):
        codes = rng.integers(0, 1 << bits, shape).astype(np.uint8)
        theirs = pack_to_int32(torch.tensor(codes.astype(np.int16) - (1 << (bits - 1)),
                                            dtype=torch.int8), bits).numpy()
        ours = pack_int32(codes, bits)
        assert ours.dtype == np.int32 and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(unpack_int32(ours, bits, shape[1]), codes)


# slow: 3 bits (packed like 4 bits; the packer test covers every width)
@pytest.mark.parametrize("bits,group,sym,dtype", [(4, 32, False, "float32"),
                                                  pytest.param(3, 32, False, "float32",
                                                               marks=pytest.mark.slow),
                                                  (8, -1, True, "float32"),
                                                  (4, 64, True, "bfloat16")])
def test_the_packages_decompressor_gives_our_weights_bit_for_bit(tiny, tmp_path, bits, group,
                                                                 sym, dtype):
    if dtype != "float32":  # the asset's own dtype: bf16 scales, bf16 weights
        model = load_model(ASSET)
        tiny = (model.config, get_params(model))
    config, params = tiny
    q = quantized(tiny, bits, group, sym)
    save_compressed_tensors(config, q, tmp_path / "ct", dequantize_experts=True)
    hf = json.loads((tmp_path / "ct/config.json").read_text())
    qcfg = QuantizationConfig.model_validate(hf["quantization_config"])
    scheme = qcfg.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qcfg.format)
    tensors = read(tmp_path / "ct")
    n_linears = 0
    for m in key_map(config):
        w = inner_weight(q[m.path])
        if isinstance(w, QuantizedArray):
            prefix = m.hf_name[: -len(".weight")]
            state = {k[len(prefix) + 1:]: to_torch(v) for k, v in tensors.items()
                     if k.startswith(prefix + ".")}
            theirs = compressor.decompress(state, scheme)["weight"]
            ours = np.asarray(w.dequantize_storage())  # [out, in]
            assert str(theirs.dtype) == f"torch.{ours.dtype}", (theirs.dtype, ours.dtype)
            assert raw(theirs) == ours.tobytes(), prefix
            n_linears += 1
        elif isinstance(w, QuantizedExperts):  # written dequantized, [E, out, in]
            ours = np.swapaxes(np.asarray(w.dequantize()), -1, -2)
            assert tensors[m.hf_name].tobytes() == np.ascontiguousarray(ours).tobytes()
        else:  # kept: the source tensor, same bytes
            src = np.asarray(params[m.path])
            src = np.swapaxes(src, -1, -2) if m.transpose else src
            assert tensors[m.hf_name].tobytes() == np.ascontiguousarray(src).tobytes()
    assert n_linears == 4 * 3 + 3 + 4 * 3 + 3  # attention (q, k, [v], o), dense MLPs, SC MLP


# slow: W8A8 (its int-quantized weights read back bit for bit by the package's own
# decompressor in `make test`)
@pytest.mark.parametrize("row", ["w4a16", pytest.param("w8a8", marks=pytest.mark.slow)])
def test_transformers_loads_the_export_to_our_weights_and_logits(tiny, tmp_path, row):
    config, params = tiny
    if row == "w4a16":
        q = quantized(tiny, 4, 32, False)
    else:
        q = quantized(tiny, 8, -1, True, act=ActSpec(bits=8))
    save_compressed_tensors(config, q, tmp_path / "ct", dequantize_experts=True,
                            extra_files=TOKENIZER)
    theirs, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all("vision" in k for k in info["missing_keys"])
    flat = dequantized(q)
    state = theirs.state_dict()
    for m in key_map(config):  # every text tensor, bit for bit
        ours = np.asarray(flat[m.path])
        ours = np.swapaxes(ours, -1, -2) if m.transpose else ours
        assert state[m.hf_name].numpy().tobytes() == np.ascontiguousarray(ours).tobytes(), \
            m.hf_name
    args = inputs(config)
    got = hf_logits(own_memory(theirs).eval(), *args)
    ours_model = diffusion_gemma.model_from_params(config, flat)
    want = np.asarray(our_logits(ours_model, *map(jnp.asarray, args)))
    np.testing.assert_allclose(got, want, atol=ATOL)
    # the same as transformers on a float checkpoint of those weights, exactly
    save_hf(config, flat, tmp_path / "float")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "float",
                                                          dtype=torch.float32)
    np.testing.assert_array_equal(got, hf_logits(own_memory(ref).eval(), *args))


def test_refusals_are_one_line_and_write_nothing(tiny, tmp_path):
    config, params = tiny
    q = quantized(tiny, 4, 32, False)
    with pytest.raises(CheckpointError, match=r"packed routed experts .*--dequantize-experts"
                                              r".*\(e\.g\. layers\.0\.experts\.\w+, 8 tensors\)"):
        save_compressed_tensors(config, q, tmp_path / "a")
    with pytest.raises(CheckpointError, match="no quantized linear"):
        save_compressed_tensors(config, params, tmp_path / "b", dequantize_experts=True)
    w4a4 = quantized(tiny, 4, 32, False, act=ActSpec(bits=4))
    with pytest.raises(CheckpointError, match="4-bit per_token activations"):
        save_compressed_tensors(config, w4a4, tmp_path / "c", dequantize_experts=True)
    mixed = rtn_quantize_gemma(params, GemmaPTQSpec(
        weight=QuantSpec(bits=4, group_size=32, sym=False), quantize_router=True,
        router_weight=QuantSpec(bits=8, group_size=32, sym=False)))[0]
    with pytest.raises(CheckpointError, match="linears mix bits"):
        save_compressed_tensors(config, mixed, tmp_path / "d", dequantize_experts=True)
    assert not any(tmp_path.iterdir())


def test_export_command(tiny, tmp_path, capsys):
    config, params = tiny
    src = tmp_path / "packed"
    save_checkpoint(src, config, quantized(tiny, 4, 32, False))
    dst = tmp_path / "ct"
    assert main(["export", str(src), str(dst), "--format", "compressed-tensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dequantize-experts" in err[0] and not dst.exists()
    assert main(["export", str(src), str(dst), "--format", "compressed-tensors",
                 "--dequantize-experts"]) == 0
    out = capsys.readouterr().out
    assert ("compressed-tensors pack-quantized, W4 group 32 asym, 30 linears packed" in out
            and "8 expert tensors dequantized" in out), out
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert main(["export", str(src), str(tmp_path / "g"), "--dequantize-experts"]) == 2
