"""A hub id works wherever a path does: resolved through a Hugging Face cache laid out on
disk, offline."""

import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.load import resolve_checkpoint
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.errors import CheckpointError


def _cache_layout(hub, repo_id, config):
    """models--org--name/{refs/main, snapshots/<commit>/...} as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub / f"models--{repo_id.replace('/', '--')}"
    write_hf_checkpoint(root / "snapshots" / commit, config)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_hub_id_loads_from_the_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _cache_layout(tmp_path / "hub", "GSAI-ML/LLaDA-tiny-test", tiny_config("llada"))
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    assert resolve_checkpoint("GSAI-ML/LLaDA-tiny-test") == snapshot
    model = load_model("GSAI-ML/LLaDA-tiny-test")
    assert model.config.family == "llada" and model.config.num_layers == 2


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load_model("nobody/nothing")


def test_local_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = write_hf_checkpoint(tmp_path / "org" / "name", tiny_config("dream"))
    assert resolve_checkpoint("org/name").resolve() == local.resolve()


def test_every_command_takes_a_hub_id(tmp_path, monkeypatch, capsys):
    """`qdlm info`, `convert` and the tokenizer of `generate` / `eval` read a hub id as
    `load_model` does (tokenizer files in the snapshot included)."""
    import json
    import shutil
    from pathlib import Path

    from qdlm_jax import load_tokenizer
    from qdlm_jax.checkpoints.load import read_model_config
    from qdlm_jax.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asset = Path(__file__).resolve().parents[2] / "assets" / "tiny-llada"
    config = read_model_config(asset).replace(num_layers=1, dtype="float32",
                                              param_dtype="float32")
    snapshot = _cache_layout(tmp_path / "hub", "GSAI-ML/LLaDA-tiny-Instruct", config)
    shutil.copy2(asset / "tokenizer.json", snapshot / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    assert main(["info", "GSAI-ML/LLaDA-tiny-Instruct", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(snapshot) and info["tokenizer"]["special_ids"]["mask"] == 3
    assert main(["convert", "GSAI-ML/LLaDA-tiny-Instruct", str(tmp_path / "conv")]) == 0
    assert load_tokenizer("GSAI-ML/LLaDA-tiny-Instruct").encode("12+34") == \
        load_tokenizer(asset).encode("12+34")
    assert main(["generate", "--model", "GSAI-ML/LLaDA-tiny-Instruct", "--prompt", "1+1=",
                 "--config.gen.steps=2", "--config.gen.gen_length=2",
                 "--config.gen.block_length=2", "--no-progress"]) == 0
