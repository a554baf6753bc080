"""DiffusionGemma GPTQ streamed layer by layer: the same packed model as the in-memory pass
(both modes, per-expert Hessians; the self-conditioning MLP also with self-conditioning on),
a run stopped mid-way resumes to the uninterrupted result, and the assembled checkpoint loads
with every planned tensor packed."""

import dataclasses

import jax
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.orbax_format import load_checkpoint
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.errors import CheckpointError
from qdlm_jax.jobs import gemma_streaming
from qdlm_jax.jobs.gemma_streaming import gptq_streaming_gemma, save_packed_gemma
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec
from qdlm_jax.quant.gemma_gptq import GemmaGPTQSettings, gptq_quantize_gemma
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec
from qdlm_jax.quant.gptq_experts_core import ThinExperts
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec

SPEC = GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(hub dir, prompts [4, 10], canvases [4, L]) of a tiny float32 DiffusionGemma."""
    config = tiny_config("diffusion_gemma")
    src = write_hf_checkpoint(tmp_path_factory.mktemp("dg") / "tiny", config, seed=5)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (4, 10))
    canvases = rng.integers(0, config.vocab_size, (4, config.canvas_length))
    return src, prompts, canvases


def _settings(self_condition):
    return GemmaGPTQSettings(calib=GemmaCalibSpec(levels=(0.5, 1.0),
                                                  self_condition=self_condition),
                             thin=ThinExperts(min_rows=4))


def _dequantized(v):
    v = getattr(v, "weight", v)
    return np.asarray(v.dequantize()) if isinstance(v, (QuantizedArray, QuantizedExperts)) \
        else None


@pytest.mark.parametrize("self_condition", [False, True])
def test_streaming_equals_the_in_memory_pass(setup, tmp_path, self_condition):
    src, prompts, canvases = setup
    settings = _settings(self_condition)
    model = load_model(src, dtype="float32")
    want, plan, how = gptq_quantize_gemma(model, prompts, canvases, SPEC, settings)
    stats = gptq_streaming_gemma(src, prompts, canvases, SPEC, settings, tmp_path / "work",
                                 progress=False)
    save_packed_gemma(src, tmp_path / "work", tmp_path / "packed", progress=False)
    _, got = load_checkpoint(tmp_path / "packed")
    assert set(got) == set(want)
    assert stats["how"] == how
    # With self-conditioning the streamed pass takes the SC logits from the float model for
    # every part; the in-memory pass does so only for the SC MLP, quantized first.
    same = [p for p in plan.paths() if not self_condition or p[0] == "self_conditioning"]
    assert len(same) >= 3
    for p in same:
        a, b = _dequantized(got[p]), _dequantized(want[p])
        assert a is not None and np.array_equal(a, b), p
    for p in plan.paths():
        assert type(got[p]) is type(want[p]), p
    for t in plan.tensors:
        if not t.quantized:
            np.testing.assert_array_equal(np.asarray(got[t.path]), np.asarray(want[t.path]))


def test_a_stopped_run_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch,
                                                           assert_same_checkpoint):
    src, prompts, canvases = setup
    settings = _settings(True)
    gptq_streaming_gemma(src, prompts, canvases, SPEC, settings, tmp_path / "full",
                         progress=False)
    save_packed_gemma(src, tmp_path / "full", tmp_path / "a", progress=False)

    real, calls = gemma_streaming.hidden_layer_stats, []

    def stop_at_layer_1(model, layer, *a, **k):
        calls.append(layer)
        if layer == 1 and len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, layer, *a, **k)

    monkeypatch.setattr(gemma_streaming, "hidden_layer_stats", stop_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        gptq_streaming_gemma(src, prompts, canvases, SPEC, settings, tmp_path / "cut",
                             progress=False)
    with pytest.raises(CheckpointError, match="layer_0001: not finished"):
        save_packed_gemma(src, tmp_path / "cut", tmp_path / "b", progress=False)
    stats = gptq_streaming_gemma(src, prompts, canvases, SPEC, settings, tmp_path / "cut",
                                 progress=False)
    assert stats["resumed_at"] == "layer 1"
    save_packed_gemma(src, tmp_path / "cut", tmp_path / "b", progress=False)
    assert_same_checkpoint(tmp_path / "a", tmp_path / "b")
    other = dataclasses.replace(SPEC, weight=QuantSpec(bits=3, group_size=8))
    with pytest.raises(CheckpointError, match="other settings"):
        gptq_streaming_gemma(src, prompts, canvases, other, settings, tmp_path / "cut",
                             progress=False)
    assert jax.tree.leaves(stats["parts"])
