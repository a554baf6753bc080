"""DiffusionGemma GPTQ streamed layer by layer: the same packed model as the in-memory pass
(both modes, per-expert Hessians; the self-conditioning MLP also with self-conditioning on),
a run stopped mid-way resumes to the uninterrupted result, and the assembled checkpoint loads
with every planned tensor packed."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.orbax_format import load_checkpoint
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.errors import CheckpointError
from qdlm_jax.jobs import gemma_streaming
from qdlm_jax.jobs.gemma_streaming import gptq_streaming_gemma, save_packed_gemma
from qdlm_jax.models.diffusion_gemma import init_cache, model_from_params
from qdlm_jax.models.params import get_params, path_str
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts
from qdlm_jax.quant.gemma_calibration import GemmaCalibSpec
from qdlm_jax.quant.gemma_gptq import GemmaGPTQSettings, gptq_quantize_gemma
from qdlm_jax.quant.gemma_plan import GemmaPTQSpec
from qdlm_jax.quant.gemma_rtn import rtn_quantize_gemma
from qdlm_jax.quant.gptq_experts_core import ThinExperts
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts
from qdlm_jax.quant.quantizer_core import QuantSpec

ROOT = Path(__file__).resolve().parents[2]
SPEC = GemmaPTQSpec(weight=QuantSpec(bits=4, group_size=8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(hub dir, prompts [4, 8], canvases [4, L]) of a tiny float32 DiffusionGemma (the
    shapes of the job's calibration below, so the compiled passes are shared)."""
    config = tiny_config("diffusion_gemma")
    src = write_hf_checkpoint(tmp_path_factory.mktemp("dg") / "tiny", config, seed=5)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (4, 8))
    canvases = rng.integers(0, config.vocab_size, (4, config.canvas_length))
    return src, prompts, canvases


def _settings(self_condition):
    return GemmaGPTQSettings(calib=GemmaCalibSpec(levels=(0.5, 1.0),
                                                  self_condition=self_condition),
                             thin=ThinExperts(min_rows=4))


def _dequantized(v):
    v = getattr(v, "weight", v)
    packed = (QuantizedArray, QuantizedExperts, BinaryPlanesArray, BinaryPlanesExperts)
    return np.asarray(v.dequantize()) if isinstance(v, packed) else None


def _both_passes(src, prompts, canvases, work, self_condition, spec=SPEC):
    """(in-memory params, plan, how; streamed stats, the saved packed params)."""
    settings = _settings(self_condition)
    want, plan, how = gptq_quantize_gemma(load_model(src, dtype="float32"), prompts, canvases,
                                          spec, settings)
    stats = gptq_streaming_gemma(src, prompts, canvases, spec, settings, work / "work",
                                 progress=False)
    save_packed_gemma(src, work / "work", work / "packed", progress=False)
    return want, plan, how, stats, load_checkpoint(work / "packed")[1]


@pytest.fixture(scope="module")
def streamed(setup, tmp_path_factory):
    """`_both_passes` without self-conditioning, and the directory of the streamed run."""
    work = tmp_path_factory.mktemp("streamed")
    return (*_both_passes(*setup, work, False), work)


def _assert_equal(got, want, plan, paths):
    assert set(got) == set(want)
    for p in paths:
        a, b = _dequantized(got[p]), _dequantized(want[p])
        assert a is not None and np.array_equal(a, b), p
    for p in plan.paths():
        assert type(got[p]) is type(want[p]), p
    for t in plan.tensors:
        if not t.quantized:
            np.testing.assert_array_equal(np.asarray(got[t.path]), np.asarray(want[t.path]))


def test_streaming_equals_the_in_memory_pass(streamed):
    want, plan, how, stats, got, _ = streamed
    assert stats["how"] == how
    _assert_equal(got, want, plan, plan.paths())


# slow: self-conditioning on (the pass without it runs in `make test`, every part equal)
@pytest.mark.slow
def test_with_self_conditioning_the_sc_mlp_equals_the_in_memory_pass(setup, tmp_path):
    """The streamed pass takes the SC logits from the float model for every part; the
    in-memory pass does so only for the SC MLP, quantized first."""
    want, plan, how, stats, got = _both_passes(*setup, tmp_path, True)
    sc = [p for p in plan.paths() if p[0] == "self_conditioning"]
    assert len(sc) == 3
    _assert_equal(got, want, plan, sc)


# slow: DAQ compiles its block fits for every shape (about a minute); the streamed pass's
# statistics are the GPTQ case's above, and DAQ's per-expert planes run in tests/quant
@pytest.mark.slow
def test_daq_streams_to_binary_planes_that_beat_rtn(setup, tmp_path):
    """Not bit for bit: the two passes' Gram matrices differ in the last float32 bits (the
    streamed layer is its own program), and DAQ's sign choices, saliency threshold and
    ABMP check turn such differences into other planes. The streamed model holds every
    planned tensor as binary planes, formed its expert Hessians as the in-memory pass did,
    and its decoder logits are closer to fp than RTN's at the same 2 bits."""
    src, prompts, canvases = setup
    spec = GemmaPTQSpec(method="daq", weight=QuantSpec(bits=2, group_size=8))
    want, plan, how, stats, got = _both_passes(*setup, tmp_path, False, spec)
    assert stats["how"] == how
    for p in plan.paths():
        assert type(got[p]) is type(want[p]) and type(got[p]).__name__.startswith(
            "BinaryPlanes"), p
    fp = load_model(src, dtype="float32")
    config = fp.config
    rtn, _ = rtn_quantize_gemma(get_params(fp), dataclasses.replace(spec, method="rtn"))
    streamed = {p: (v if p in set(plan.paths()) else v.astype(np.float32))
                for p, v in got.items()}

    def err(params):
        m = model_from_params(config, {p: jax.numpy.asarray(v) if isinstance(v, np.ndarray)
                                       else v for p, v in params.items()})
        cache = m.encode(prompts, None, init_cache(config, *prompts.shape))
        ref = fp.decode(canvases, None, fp.encode(prompts, None,
                                                  init_cache(config, *prompts.shape)))
        return float(jax.numpy.mean((m.decode(canvases, None, cache) - ref) ** 2))

    assert err(streamed) < err(rtn)


def test_a_stopped_run_resumes_to_the_uninterrupted_result(setup, streamed, tmp_path,
                                                           monkeypatch, assert_same_checkpoint):
    src, prompts, canvases = setup
    full = streamed[-1]
    settings = _settings(False)
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
    assert_same_checkpoint(full / "packed", tmp_path / "b")
    other = dataclasses.replace(SPEC, weight=QuantSpec(bits=3, group_size=8))
    with pytest.raises(CheckpointError, match="other settings"):
        gptq_streaming_gemma(src, prompts, canvases, other, settings, tmp_path / "cut",
                             progress=False)
    assert jax.tree.leaves(stats["parts"])


def test_qdlm_quantize_streams_gptq_and_the_packed_model_generates(setup, tmp_path, capsys):
    import json

    from qdlm_jax.checkpoints.load import load_params
    from qdlm_jax.cli import main

    src, _, _ = setup
    common = ["quantize", "--config", str(ROOT / "configs/quantize.py"),
              f"--config.model={src}", f"--config.out_dir={tmp_path}", "--config.bits=4",
              "--config.group_size=8", "--config.calib.seq_len=8",
              "--config.calib.n_samples=4", "--config.stream=true",
              "--config.moe.levels=0.5,1.0", "--config.moe.self_condition=false",
              "--config.moe.thin_min_rows=4"]
    assert main(common + ["--config.method=gptq"]) == 0
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "results.json").read_text())
    assert result["streaming"] and result["experts_quantized"]
    assert sum(result["expert_hessians"].values()) == 2 * 2 * 4  # layers x tensors x experts
    assert "| expert gate_up |" in (run_dir / "report.md").read_text()
    _, params = load_params(run_dir / "model")
    by_name = {path_str(p): v for p, v in params.items()}
    assert set(by_name) == {t["name"] for t in result["coverage_tensors"]}
    for t in result["coverage_tensors"]:
        if not t["action"].startswith("kept"):
            want = QuantizedExperts if t["kind"].startswith("expert") else QuantizedArray
            assert isinstance(by_name[t["name"]], want), t["name"]
    capsys.readouterr()
    assert main(["generate", "--model", str(run_dir / "model"), "--prompt", "17 33 5",
                 "--config.gemma.max_new_tokens=8", "--config.gemma.steps=2"]) == 0
    captured = capsys.readouterr()
    assert "quantized: gptq W4 g8" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("17 33 5 ")
    assert main(common + ["--config.method=rtn", f"--config.out_dir={tmp_path / 'r'}"]) == 2
    assert "--config.stream=true with method=rtn" in capsys.readouterr().err


# slow: on an 8-device mesh (the single-device streaming pass runs in `make test`)
@pytest.mark.slow
def test_on_an_expert_mesh_each_layer_is_sharded_and_the_result_is_the_in_memory_pass(
        setup, tmp_path, monkeypatch):
    """On an (expert 4, model 2) mesh of 8 CPU devices: each layer is read onto the mesh with
    whole experts on the expert axis, and the packed model equals the in-memory pass on a
    model loaded onto the same mesh; a work dir started on another mesh is refused."""
    from jax.sharding import PartitionSpec as P

    from qdlm_jax.models.sharding import make_mesh

    src, prompts, canvases = setup
    settings = _settings(False)
    mesh = make_mesh(model=2, expert=4)
    model = load_model(src, dtype="float32", mesh=mesh)
    want, plan, _ = gptq_quantize_gemma(model, prompts, canvases, SPEC, settings)
    real, seen = gemma_streaming.gptq_part, []

    def spy(params, paths, layer, *a, **k):
        if layer is not None:
            w = params[("layers", layer, "experts", "gate_up")]
            seen.append((w.sharding.spec, w.addressable_shards[0].data.shape, w.shape))
        return real(params, paths, layer, *a, **k)

    monkeypatch.setattr(gemma_streaming, "gptq_part", spy)
    gptq_streaming_gemma(src, prompts, canvases, SPEC, settings, tmp_path / "work",
                         progress=False, mesh=mesh)
    assert len(seen) == 2
    for spec, shard, full in seen:
        assert spec == P("expert", None, "model")
        assert shard == (full[0] // 4, full[1], full[2] // 2)
    save_packed_gemma(src, tmp_path / "work", tmp_path / "packed", progress=False)
    _, got = load_checkpoint(tmp_path / "packed")
    for p in plan.paths():
        np.testing.assert_array_equal(_dequantized(got[p]), _dequantized(want[p]))
    with pytest.raises(CheckpointError, match="other settings"):
        gptq_streaming_gemma(src, prompts, canvases, SPEC, settings, tmp_path / "work",
                             progress=False, mesh=make_mesh(model=8))


def test_encoder_only_calibration_refuses_the_sc_mlp_as_the_in_memory_pass(setup, tmp_path):
    """The self-conditioning MLP runs in the decoder only: with encoder-only calibration both
    passes stop at it with the same one-line error."""
    src, prompts, canvases = setup
    settings = GemmaGPTQSettings(calib=GemmaCalibSpec(modes="encoder"))
    want = "no calibration input was recorded for self_conditioning.down_proj"
    with pytest.raises(ValueError, match=want):
        gptq_streaming_gemma(src, prompts, canvases, SPEC, settings, tmp_path / "w",
                             progress=False)
    with pytest.raises(ValueError, match=want):
        gptq_quantize_gemma(load_model(src, dtype="float32"), prompts, canvases, SPEC,
                            settings)
