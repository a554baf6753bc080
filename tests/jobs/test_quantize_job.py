"""The quantize job's run directories and packed output: one directory per resolved config,
reused on a rerun, and a packed model smaller than its source."""

import json
from pathlib import Path

import jax
import pytest

from qdlm_jax.checkpoints.load import load_params, param_summary, quantization_banner
from qdlm_jax.jobs import quantize_report
from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
from qdlm_jax.jobs.quantize import run

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *overrides):
    return apply_overrides(load_config_file(ROOT / "configs/quantize.py"), [
        f"--config.out_dir={tmp_path}", "--config.method=rtn", "--config.bits=3",
        "--config.eval.n_windows=1", "--config.eval.mc_num=8", "--config.eval.arith_n=2",
        "--config.eval.skip_fp=true", *overrides])


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()
               and f.name != "tokenizer.json")


def test_run_dirs_packed_size_and_reuse(tmp_path, capsys):
    r1 = run(_cfg(tmp_path))
    r2 = run(_cfg(tmp_path, f"--config.model={ROOT / 'assets/tiny-dream'}"))
    r3 = run(_cfg(tmp_path, "--config.sym=true"))
    dirs = {Path(r["run_dir"]) for r in (r1, r2, r3)}
    assert len(dirs) == 3  # another model or another setting never shares a directory
    assert Path(r1["run_dir"]).name.startswith("tiny-llada-rtn-w3g128-nocal-")
    assert Path(r2["run_dir"]).name.startswith("tiny-dream-rtn-w3g128-nocal-")
    saved = json.loads((Path(r3["run_dir"]) / "config.json").read_text())
    assert saved["sym"] is True and saved["bits"] == 3 and saved["model"].endswith("tiny-llada")

    # The packed model keeps bf16 for every unquantized tensor and is smaller than its source.
    model_dir = Path(r1["run_dir"]) / "model"
    config, params = load_params(model_dir)
    assert config.param_dtype == "bfloat16"
    floats = [v for v in params.values() if isinstance(v, jax.Array) and v.dtype.kind in "fV"
              or isinstance(v, jax.Array) and v.dtype.name == "bfloat16"]
    assert floats and all(v.dtype.name == "bfloat16" for v in floats)
    source = _dir_bytes(ROOT / "assets/tiny-llada")
    packed = _dir_bytes(model_dir)
    assert packed < 0.85 * source, (packed, source)
    summary = param_summary(params)
    assert summary["bytes"] < summary["bf16_bytes"]
    banner = quantization_banner(model_dir)
    assert banner.startswith("quantized: rtn W3 g128") and "x the bf16 size" in banner

    # The same config again: reused, not recomputed.
    capsys.readouterr()
    again = run(_cfg(tmp_path))
    assert again["run_dir"] == r1["run_dir"]
    assert "reusing its results" in capsys.readouterr().out


def test_fp_evaluation_is_cached_across_runs_and_tables_carry_errors(tmp_path, capsys,
                                                                      monkeypatch):
    from qdlm_jax.jobs import quantize
    real = quantize._fp_cache_file
    monkeypatch.setattr(quantize, "_fp_cache_file", lambda spec: tmp_path / real(spec).name)
    first = run(_cfg(tmp_path / "a", "--config.eval.skip_fp=false"))
    assert "evaluating the FP model" in capsys.readouterr().out
    second = run(_cfg(tmp_path / "b", "--config.eval.skip_fp=false", "--config.sym=true"))
    out = capsys.readouterr().out
    assert "FP model: evaluated before" in out and second["fp"] == first["fp"]
    fp = first["fp"]
    assert fp["n_windows"] == 1 and fp["bits_per_token_se"] == 0.0  # one window: no spread
    q = second["quantized"]
    assert q["kl_to_fp_bits_se"] >= 0 and 0 <= q["arith_se"] <= 0.5
    table = quantize_report.report([first, second])
    assert " ± " in table and "one standard error" in table
    assert "unigram reference" in table  # the bundled model's card records it


# slow: the streaming pass equals the in-memory one in tests/jobs/test_streaming.py (make test)
@pytest.mark.slow
def test_streaming_job_saves_the_same_packed_model_as_the_in_memory_job(tmp_path, capsys,
                                                                     assert_same_checkpoint):
    common = ("--config.method=gptq", "--config.calibration=masked", "--config.calib.n_samples=8",
              "--config.calib.seq_len=64")
    streamed = run(_cfg(tmp_path / "s", *common, "--config.stream=true"))
    assert "fp figures and KL to fp are skipped" in capsys.readouterr().out
    assert streamed["streaming"] and streamed["fp"] is None
    assert (Path(streamed["run_dir"]) / "blocks" / "block_0000" / "x_next.npy").is_file()
    in_memory = run(_cfg(tmp_path / "m", *common, "--config.stream=false"))
    assert_same_checkpoint(Path(streamed["run_dir"]) / "model",
                           Path(in_memory["run_dir"]) / "model")


# slow: streaming on a mesh is checked in `make test` block by block
# (tests/jobs/test_streaming.py), and the job's streaming path on one device above
@pytest.mark.slow
def test_streaming_job_on_a_mesh_saves_what_the_in_memory_mesh_job_saves(
        tmp_path, capsys, assert_same_checkpoint):
    """`qdlm quantize --mesh 2x4 --config.stream=true` in one process streams the blocks onto
    the mesh; its packed model equals the in-memory mesh job's bit for bit."""
    common = ("--config.method=gptq", "--config.calibration=masked", "--config.calib.n_samples=8",
              "--config.calib.seq_len=64")
    streamed = run(_cfg(tmp_path / "s", *common, "--config.stream=true"), mesh_shape=(2, 4))
    assert "on a {'data': 2, 'model': 4} mesh" in capsys.readouterr().out
    assert streamed["streaming"] and streamed["mesh"] == {"data": 2, "model": 4}
    in_memory = run(_cfg(tmp_path / "m", *common), mesh_shape=(2, 4))
    assert_same_checkpoint(Path(streamed["run_dir"]) / "model",
                           Path(in_memory["run_dir"]) / "model")


def test_streaming_refuses_what_it_cannot_do(tmp_path, capsys):
    import pytest

    from qdlm_jax.errors import ConfigOverrideError
    with pytest.raises(ConfigOverrideError, match="trajectory"):
        run(_cfg(tmp_path, "--config.method=gptq", "--config.calibration=trajectory",
                 "--config.stream=true"))
    with pytest.raises(ConfigOverrideError, match="weight-only"):
        run(_cfg(tmp_path, "--config.method=quarot", "--config.act_bits=8",
                 "--config.group_size=-1", "--config.stream=true"))


def test_report_names_what_ia_aq_searched_and_the_kv_bits():
    q = {"bits_per_token": 9.3, "ppl_bound": 640.0, "arith_acc": 0.0, "arith_n": 20,
         "kl_to_fp_bits": 0.02}
    base = {"model": "assets/tiny-llada", "method": "quarot", "bits": 4, "act_bits": 4,
            "kv_bits": 4, "group_size": -1, "calibration": "masked", "quantized": q,
            "linear_bytes_vs_bf16": 0.26, "quantize_s": 1.0}
    rows = [dict(base, iaaq=False), dict(base, iaaq=True, config={"act": {"iaaq": {
        "enabled": True, "search_keys": True}}}), dict(base, iaaq=True, config={"act": {
            "iaaq": {"enabled": True, "search_keys": False}}})]
    lines = [ln.split("|")[2:5] for ln in quantize_report.report(rows).splitlines()[2:5]]
    assert [[c.strip() for c in ln] for ln in lines] == [
        ["QUAROT", "4", "4, KV 4"], ["QUAROT + IA-AQ (K,V)", "4", "4, KV 4"],
        ["QUAROT + IA-AQ (V)", "4", "4, KV 4"]]


def test_report_has_a_column_per_extra_task():
    from qdlm_jax.jobs.quantize_report import report

    def ev(tasks):
        return {"bits_per_token": 8.0, "bits_per_token_se": 0.1, "ppl_bound": 256.0,
                "arith_acc": 0.9, "arith_se": 0.03, "arith_n": 100, "tasks": tasks,
                "kl_to_fp_bits": 0.01, "kl_to_fp_bits_se": 0.002}
    sub = {"metric": "exact_match", "value": 0.95, "se": 0.02, "n": 100}
    r = {"model": "m/tiny", "fp": ev({"arithmetic_subtract": sub}), "method": "rtn", "bits": 2,
         "group_size": 128, "calibration": "none", "linear_bytes_vs_bf16": 0.144,
         "quantize_s": 1.0, "quantized": ev({"arithmetic_subtract": dict(sub, value=0.5),
                                             "synthetic_code": dict(sub, metric="pass@1")})}
    lines = report([r]).splitlines()
    head = [c.strip() for c in lines[0].split("|")]
    assert head.index("2-digit sub acc") + 1 == head.index("code pass@1")
    fp_row = [c.strip() for c in lines[2].split("|")]
    q_row = [c.strip() for c in lines[3].split("|")]
    col = head.index("2-digit sub acc")
    assert fp_row[col] == "95.0 ± 2.0%" and q_row[col] == "50.0 ± 2.0%"
    assert fp_row[col + 1] == "–" and q_row[col + 1] == "95.0 ± 2.0%"
    assert len(fp_row) == len(q_row) == len(head)
