"""`qdlm convert` / `qdlm info` on checkpoint directories made by the tests."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import hf_tensors, tiny_config, write_hf_checkpoint
from qdlm_jax.cli import main
from qdlm_jax.errors import ConfigOverrideError
from qdlm_jax.jobs.config_flags import apply_overrides

IDS = jnp.asarray(np.arange(10, dtype=np.int32).reshape(2, 5))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_convert_then_info_then_load(tmp_path, capsys, family):
    config = tiny_config(family, param_dtype="bfloat16")
    src = write_hf_checkpoint(tmp_path / "src", config, seed=4)
    (src / "tokenizer.json").write_text("{}")
    assert main(["convert", str(src), str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = sum(int(np.prod(v.shape)) for v in hf_tensors(config).values())
    assert info["params"] == n
    assert info["config"]["family"] == family and info["config"]["param_dtype"] == "bfloat16"
    assert main(["info", str(src)]) == 0
    assert f"params: {n:,}" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "q")(IDS)),
                                  np.asarray(load_model(src)(IDS)))
    # And back to the HF layout.
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "hf")(IDS)),
                                  np.asarray(load_model(src)(IDS)))


def test_failed_convert_writes_nothing(tmp_path, capsys):
    config = tiny_config("llada")
    t = hf_tensors(config)
    t["model.transformer.ln_f.weight"] = t["model.transformer.ln_f.weight"][:10]
    src = write_hf_checkpoint(tmp_path / "src", config, t)
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "model.transformer.ln_f.weight" in err and "expected [64]" in err
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp dirs left behind


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    src = write_hf_checkpoint(tmp_path / "src", tiny_config("dream"))
    (tmp_path / "dst").mkdir()
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_info_on_bad_path(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err


def test_config_overrides_keep_types():
    import ml_collections
    cfg = ml_collections.ConfigDict({"gen": {"steps": 8, "temp": 0.0, "alg": "origin",
                                             "flag": False}})
    apply_overrides(cfg, ["--config.gen.steps=64", "--config.gen.temp=0.5",
                          "--config.gen.flag=true", "--config.gen.alg=entropy"])
    assert cfg.gen.steps == 64 and cfg.gen.temp == 0.5 and cfg.gen.flag is True
    with pytest.raises(ConfigOverrideError, match="gen.stepz"):
        apply_overrides(cfg, ["--config.gen.stepz=3"])
    with pytest.raises(ConfigOverrideError, match="expected an integer"):
        apply_overrides(cfg, ["--config.gen.steps=abc"])


@pytest.mark.parametrize("override,message", [
    ("--config.bits=5", "--config.bits=5 is not supported"),
    ("--config.method=sparsegpt", "--config.method='sparsegpt'"),
    ("--config.method=smoothquant", "needs --config.act_bits=8 or 4"),
    ("--config.act_bits=6", "--config.act_bits=6"),
    ("--config.calibration=noisy", "calibration='noisy'"),
])
def test_quantize_rejects_bad_config_before_work(capsys, override, message):
    assert main(["quantize", "--config", "configs/quantize.py", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_convert_checks_its_destination_before_loading(tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    # The source does not even exist: the destination check must come first.
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    assert "dst: already exists" in capsys.readouterr().err


def test_quantize_help_lists_the_config_keys_with_defaults_and_choices(capsys, monkeypatch,
                                                                      tmp_path):
    monkeypatch.chdir(tmp_path)  # the default config is found from any directory
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert "--config.method='gptq'" in out and "smoothquant | quarot | duquant" in out
    assert "--config.calib.n_samples=32" in out and "--config.overwrite=False" in out


def test_a_config_key_given_as_a_flag_gets_a_did_you_mean(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "gptq"])
    assert "did you mean --config.method=gptq?" in capsys.readouterr().err


def test_data_source_errors_are_one_line_without_traceback(capsys, monkeypatch):
    from qdlm_jax.errors import DataSourceError

    def fail(*a, **k):
        raise DataSourceError("bigbench-wikipedia: archive not reachable\nsecond line")

    monkeypatch.setattr("qdlm_jax.jobs.study.run_study", fail)
    # the spec is not built: resolving the default text source prints its own line
    monkeypatch.setattr("qdlm_jax.jobs.study.study_spec", lambda cfg: None)
    assert main(["study"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "qdlm study: error: bigbench-wikipedia: archive not reachable"


def test_demo_help_prints_help_and_runs_nothing(capsys):
    from qdlm_jax.jobs import demo
    assert demo.main(["--help"]) == 0
    assert "make demo" in capsys.readouterr().out
    assert (demo.ROOT / "configs" / "quantize.py").is_file()
