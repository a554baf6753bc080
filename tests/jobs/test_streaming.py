"""The streaming pass: block by block from the checkpoint's memory maps, resumable, and equal
bit for bit to the in-memory pass (and to itself after a kill at a random point)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.orbax_format import load_checkpoint, read_meta
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.errors import CheckpointError
from qdlm_jax.jobs.streaming import assemble, config_shim, quantize_streaming, save_packed
from qdlm_jax.models.params import cast_floats, get_params
from qdlm_jax.quant import CalibSpec, PTQSpec, QuantizedArray, QuantSpec, build_calibration
from qdlm_jax.quant.layerwise import quantize_model

ROOT = Path(__file__).resolve().parents[2]


def _leaves(params):
    out = {}
    for p, v in params.items():
        if isinstance(v, QuantizedArray):
            for name, leaf in zip(("packed", "scale", "zero", "g_idx"),
                                  (v.packed, v.scale, v.zero, v.g_idx)):
                if leaf is not None:
                    out[p + (name,)] = np.asarray(leaf)
        else:
            out[p] = np.asarray(v)
    return out


def _assert_bit_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert set(la) == set(lb)
    for k in la:
        assert la[k].dtype == lb[k].dtype, k
        assert np.array_equal(la[k].view(np.uint8), lb[k].view(np.uint8)), k


def _setup(tmp_path, family, layers=3):
    config = tiny_config(family, num_layers=layers, hidden_size=128, intermediate_size=256)
    src = write_hf_checkpoint(tmp_path / "src", config, seed=4)
    windows = np.random.default_rng(0).integers(0, 240, (8, 32)).astype(np.int32)
    calib = build_calibration(config_shim(config), windows,
                              CalibSpec(mode="masked", n_samples=8, seq_len=32))
    return src, calib


# slow: Dream with AWQ's grid and LLaDA with RTN (LLaDA with GPTQ, the same block driver with
# Hessians, runs in `make test`)
@pytest.mark.parametrize("family,method", [("llada", "gptq"),
                                           pytest.param("dream", "awq", marks=pytest.mark.slow),
                                           pytest.param("llada", "rtn", marks=pytest.mark.slow)])
def test_streaming_equals_the_in_memory_pass(tmp_path, family, method):
    src, calib = _setup(tmp_path, family)
    spec = PTQSpec(method=method, weight=QuantSpec(bits=4, group_size=64), awq_grid=4)
    model = load_model(src, dtype="float32")
    qmodel, _ = quantize_model(model, calib, spec, progress=False)
    _, stats = quantize_streaming(src, calib, spec, tmp_path / "work", progress=False)
    assert stats["resumed_at"] == 0
    config, params = assemble(src, tmp_path / "work")
    assert config.num_layers == 3
    _assert_bit_equal(get_params(qmodel), params)


# slow: on an 8-device mesh (the single-device streaming pass runs in `make test`)
@pytest.mark.slow
def test_streaming_on_a_mesh_holds_a_share_of_each_block_and_equals_the_in_memory_pass(
        tmp_path, monkeypatch):
    """On a (data 2, model 4) mesh of this process's 8 CPU devices: each block is read onto
    the mesh (a column-parallel kernel's device shard is a quarter of it), the result equals
    the in-memory pass on the same mesh bit for bit, and a run stopped mid-way resumes to
    it; a work dir started on another mesh shape is refused."""
    from jax.sharding import PartitionSpec as P

    from qdlm_jax.jobs import streaming
    from qdlm_jax.models.sharding import make_mesh
    src, calib = _setup(tmp_path, "llada")
    spec = PTQSpec(method="gptq", weight=QuantSpec(bits=4, group_size=64))
    mesh = make_mesh(model=4, data=2)
    qmodel, _ = quantize_model(load_model(src, dtype="float32", mesh=mesh), calib, spec,
                               progress=False)
    real, seen = streaming.quantize_block, []

    def stops_at_block_2(block, inputs, x, index, spec, **kw):
        kernel = block.q_proj.kernel[...]
        seen.append((kernel.sharding.spec, kernel.addressable_shards[0].data.shape,
                     kernel.shape, x.sharding.spec))
        if index == 2:
            raise KeyboardInterrupt
        return real(block, inputs, x, index, spec, **kw)

    monkeypatch.setattr(streaming, "quantize_block", stops_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(src, calib, spec, tmp_path / "work", progress=False, mesh=mesh)
    monkeypatch.setattr(streaming, "quantize_block", real)
    for kernel_spec, shard, full, x_spec in seen:
        assert kernel_spec == P(None, "model") and shard == (full[0], full[1] // 4)
        assert x_spec == P(None, None, "model")
    with pytest.raises(CheckpointError, match="other settings"):
        quantize_streaming(src, calib, spec, tmp_path / "work", progress=False,
                           mesh=make_mesh(model=8))
    _, stats = quantize_streaming(src, calib, spec, tmp_path / "work", progress=False,
                                  mesh=mesh)
    assert stats["resumed_at"] == 2
    _assert_bit_equal(get_params(qmodel), assemble(src, tmp_path / "work")[1])


# slow: a second streamed job that saves packed blocks
@pytest.mark.slow
def test_save_packed_writes_block_by_block_what_assemble_holds(tmp_path):
    """The checkpoint written one part at a time loads to the assembled model with its
    unquantized tensors in the source dtype (bf16 here), bit for bit."""
    config = tiny_config("dream", num_layers=3, hidden_size=128, intermediate_size=256,
                         param_dtype="bfloat16", dtype="bfloat16")
    src = write_hf_checkpoint(tmp_path / "src", config, seed=4)
    windows = np.random.default_rng(0).integers(0, 240, (4, 32)).astype(np.int32)
    calib = build_calibration(config_shim(config), windows,
                              CalibSpec(mode="clean", n_samples=4, seq_len=32))
    spec = PTQSpec(method="gptq", weight=QuantSpec(bits=4, group_size=64))
    work = tmp_path / "work"
    with pytest.raises(CheckpointError, match="block 0 is not finished"):
        save_packed(src, work, tmp_path / "early", progress=False)
    assert not (tmp_path / "early").exists()
    quantize_streaming(src, calib, spec, work, progress=False)
    cfg = save_packed(src, work, tmp_path / "packed", meta={"method": "gptq"}, progress=False)
    assert cfg.param_dtype == "bfloat16"
    parts = read_meta(tmp_path / "packed")["parts"]
    assert len(parts) == 1 + 1 + 3 + 1  # final norm, embedding, 3 blocks, head
    loaded_cfg, loaded = load_checkpoint(tmp_path / "packed")
    assert loaded_cfg.param_dtype == "bfloat16"
    acfg, params = assemble(src, work)
    expected = cast_floats(params, acfg.param_dtype)
    assert loaded[("layers", 0, "attn_norm", "scale")].dtype == jnp.bfloat16
    _assert_bit_equal(expected, loaded)


def test_a_work_dir_with_other_settings_is_refused(tmp_path):
    src, calib = _setup(tmp_path, "llada", layers=1)
    spec = PTQSpec(method="rtn", weight=QuantSpec(bits=4, group_size=64))
    quantize_streaming(src, calib, spec, tmp_path / "work", progress=False)
    other = PTQSpec(method="rtn", weight=QuantSpec(bits=3, group_size=64))
    with pytest.raises(ValueError, match="other settings"):
        quantize_streaming(src, calib, other, tmp_path / "work", progress=False)


SCRIPT = """
import sys, numpy as np
from qdlm_jax.quant import CalibSpec, PTQSpec, QuantSpec, build_calibration
from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.jobs.streaming import config_shim, quantize_streaming
config = tiny_config("llada", num_layers=6, hidden_size=128, intermediate_size=256)
windows = np.random.default_rng(0).integers(0, 240, (8, 32)).astype(np.int32)
calib = build_calibration(config_shim(config), windows,
                          CalibSpec(mode="masked", n_samples=8, seq_len=32))
spec = PTQSpec(method="gptq", weight=QuantSpec(bits=3, group_size=64))
_, stats = quantize_streaming(sys.argv[1], calib, spec, sys.argv[2], progress=False)
print("RESUMED_AT", stats["resumed_at"])
"""


def test_a_run_stopped_mid_way_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from qdlm_jax.jobs import streaming
    src, calib = _setup(tmp_path, "dream", layers=4)
    spec = PTQSpec(method="gptq", weight=QuantSpec(bits=3, group_size=64))
    quantize_streaming(src, calib, spec, tmp_path / "ref", progress=False)
    real = streaming.quantize_block

    def dies_at_block_2(block, inputs, x, index, spec, **kw):
        if index == 2:
            raise KeyboardInterrupt  # what a kill leaves: blocks 0-1 committed, 2 not
        return real(block, inputs, x, index, spec, **kw)

    monkeypatch.setattr(streaming, "quantize_block", dies_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(src, calib, spec, tmp_path / "work", progress=False)
    monkeypatch.setattr(streaming, "quantize_block", real)
    _, stats = quantize_streaming(src, calib, spec, tmp_path / "work", progress=False)
    assert stats["resumed_at"] == 2
    _assert_bit_equal(assemble(src, tmp_path / "ref")[1], assemble(src, tmp_path / "work")[1])


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    """SIGKILL at random points (three times), then a run to the end."""
    config = tiny_config("llada", num_layers=6, hidden_size=128, intermediate_size=256)
    src = write_hf_checkpoint(tmp_path / "src", config, seed=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def launch(work):
        return subprocess.Popen([sys.executable, "-c", SCRIPT, str(src), str(work)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    ref = launch(tmp_path / "ref")
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]
    rng = np.random.default_rng(int(time.time()))
    work = tmp_path / "killed"
    kills = 0
    for _ in range(3):  # kill at random points, then let a last run finish
        p = launch(work)
        time.sleep(float(rng.uniform(2.0, 8.0)))
        if p.poll() is None:
            p.kill()
            kills += 1
        p.communicate()
    p = launch(work)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert not list(work.glob(".*"))  # no temp dir or staging file left behind
    _assert_bit_equal(assemble(src, tmp_path / "ref")[1], assemble(src, work)[1])
    json.loads((work / "state.json").read_text())
    assert kills >= 1 or "RESUMED_AT" in out
