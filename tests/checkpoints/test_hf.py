"""Converters: layouts read, bit-exact round trip, bad input gives one clear error."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import load_file as torch_load_file

from qdlm_jax import load_model
from qdlm_jax.checkpoints import CheckpointError, load_hf_params, save_hf
from qdlm_jax.checkpoints.random_init import hf_tensors, tiny_config, write_hf_checkpoint
from qdlm_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from qdlm_jax.errors import ConfigError


def _logits(path, ids):
    return np.asarray(load_model(path, dtype="float32")(jnp.asarray(ids)))


IDS = np.arange(12, dtype=np.int32).reshape(2, 6)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, family, dtype):
    config = tiny_config(family, param_dtype=dtype)
    tensors = hf_tensors(config, seed=3)
    src = write_hf_checkpoint(tmp_path / "src", config, tensors)
    loaded_config, params = load_hf_params(src)
    assert loaded_config.param_dtype == dtype
    out = save_hf(loaded_config, params, tmp_path / "out")
    # Read back with the official safetensors library (torch backend handles bf16).
    back = torch_load_file(str(out / "model.safetensors"))
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        got = back[k]
        if dtype == "bfloat16":
            got = got.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            got = got.numpy()
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(v).view(np.uint8)), k
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text())


def test_our_writer_matches_official_reader(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
    write_safetensors(tmp_path / "x.safetensors", arrays)
    back = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
    safetensors.numpy.save_file(arrays, str(tmp_path / "y.safetensors"))
    f = SafetensorsFile(tmp_path / "y.safetensors")
    for k in arrays:
        np.testing.assert_array_equal(f.get(k), arrays[k])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sharded_and_bin_layouts_give_same_model(tmp_path, family):
    config = tiny_config(family)
    tensors = hf_tensors(config, seed=5)
    one = write_hf_checkpoint(tmp_path / "one", config, tensors)
    sharded = write_hf_checkpoint(tmp_path / "sharded", config, tensors, num_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = write_hf_checkpoint(tmp_path / "bin", config, tensors, fmt="bin", num_shards=2)
    ref = _logits(one, IDS)
    np.testing.assert_array_equal(_logits(sharded, IDS), ref)
    np.testing.assert_array_equal(_logits(binary, IDS), ref)


def test_export_in_shards_reloads(tmp_path):
    config = tiny_config("llada")
    src = write_hf_checkpoint(tmp_path / "src", config, seed=2)
    cfg, params = load_hf_params(src)
    out = save_hf(cfg, params, tmp_path / "out", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    np.testing.assert_array_equal(_logits(out, IDS), _logits(src, IDS))


def test_dtype_cast_on_load(tmp_path):
    config = tiny_config("dream", param_dtype="bfloat16")
    src = write_hf_checkpoint(tmp_path / "src", config)
    cfg, params = load_hf_params(src, dtype="float32")
    assert cfg.param_dtype == "float32" and cfg.dtype == "float32"
    assert all(v.dtype == jnp.float32 for v in params.values())


# ---- bad input ----------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    config = tiny_config("llada")
    return config, hf_tensors(config, seed=0)


def _expect(tmp_path, match, exc=CheckpointError):
    with pytest.raises(exc, match=match):
        load_model(tmp_path / "ckpt")


def test_missing_tensor(tmp_path, good):
    config, t = good
    del t["model.transformer.blocks.1.up_proj.weight"]
    write_hf_checkpoint(tmp_path / "ckpt", config, t)
    _expect(tmp_path, r"missing tensor 'model\.transformer\.blocks\.1\.up_proj\.weight' "
                      r"\(expected shape \[96, 64\]\)")


def test_unexpected_tensor(tmp_path, good):
    config, t = good
    t["model.transformer.blocks.0.extra.weight"] = np.zeros((2, 2), np.float32)
    write_hf_checkpoint(tmp_path / "ckpt", config, t)
    _expect(tmp_path, r"model\.safetensors: unexpected tensor "
                      r"'model\.transformer\.blocks\.0\.extra\.weight'")


def test_misshaped_tensor(tmp_path, good):
    config, t = good
    t["model.transformer.blocks.0.q_proj.weight"] = np.zeros((64, 32), np.float32)
    write_hf_checkpoint(tmp_path / "ckpt", config, t)
    _expect(tmp_path, r"model\.safetensors: tensor 'model\.transformer\.blocks\.0\.q_proj\."
                      r"weight' has shape \[64, 32\], expected \[64, 64\]")


def test_unknown_model_type(tmp_path, good):
    config, t = good
    path = write_hf_checkpoint(tmp_path / "ckpt", config, t)
    hf = json.loads((path / "config.json").read_text())
    hf["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(hf))
    _expect(tmp_path, r"config\.json: unknown model_type='gpt2'", ConfigError)


def test_truncated_safetensors(tmp_path, good):
    config, t = good
    path = write_hf_checkpoint(tmp_path / "ckpt", config, t)
    f = path / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    _expect(tmp_path, r"model\.safetensors: truncated safetensors file: tensor .* needs bytes")


def test_nonexistent_path(tmp_path):
    _expect(tmp_path, r"ckpt: no such file or directory")


def test_missing_shard_listed_in_index(tmp_path, good):
    config, t = good
    path = write_hf_checkpoint(tmp_path / "ckpt", config, t, num_shards=2)
    os.remove(path / "model-00002-of-00002.safetensors")
    _expect(tmp_path, r"lists shard 'model-00002-of-00002\.safetensors', which is missing")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_drop_resident_releases_pages_and_keeps_views_valid(tmp_path):
    """After `drop_resident` the file pages a read touched leave the resident set (RssFile
    falls by most of the tensor), and a view handed out before still reads the same values:
    the streaming pass relies on both."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((2048, 4096)).astype(np.float32)  # 32 MiB
    write_safetensors(tmp_path / "big.safetensors", {"w": big})
    f = SafetensorsFile(tmp_path / "big.safetensors")

    def rss_file_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024

    view = f.get("w")
    assert float(view.sum()) == float(big.sum())  # every page touched
    before = rss_file_mib()
    f.drop_resident()
    after = rss_file_mib()
    assert before - after > 24, (before, after)
    np.testing.assert_array_equal(view, big)
