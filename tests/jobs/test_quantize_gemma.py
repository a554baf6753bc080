"""`qdlm quantize` on a DiffusionGemma checkpoint: RTN packs every expert (the report's
coverage table and the saved model say so), `qdlm generate` runs on the packed model; what
the pass does not do is refused in one line before any work."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from qdlm_jax.checkpoints.load import load_params
from qdlm_jax.checkpoints.orbax_format import read_meta
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.cli import main
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.bqexperts import BinaryPlanesExperts
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny bf16 DiffusionGemma hub checkpoint without a tokenizer."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("dg") / "tiny",
                               tiny_config("diffusion_gemma", param_dtype="bfloat16"), seed=3)


def quantize(model, out_dir, *flags):
    return main(["quantize", "--config", str(ROOT / "configs/quantize.py"),
                 f"--config.model={model}", f"--config.out_dir={out_dir}",
                 "--config.eval.n_windows=2", "--config.calib.seq_len=8", *flags])


@pytest.fixture(scope="module")
def rtn_run(gemma_dir, tmp_path_factory):
    """(run dir, stdout) of `qdlm quantize --config.method=rtn --config.bits=4
    --config.group_size=8` on the tiny checkpoint."""
    out_dir, out = tmp_path_factory.mktemp("runs"), io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = quantize(gemma_dir, out_dir, "--config.method=rtn", "--config.bits=4",
                      "--config.group_size=8")
    assert rc == 0
    (run_dir,) = out_dir.iterdir()
    return run_dir, out.getvalue()


def test_rtn_packs_every_expert_and_says_so(rtn_run):
    run_dir, out = rtn_run
    assert "has no tokenizer: KL to fp on windows of random token ids" in out
    assert run_dir.name.startswith("tiny-rtn-w4g8-nocal-")
    result = json.loads((run_dir / "results.json").read_text())
    assert result["experts_quantized"] and result["quantized"]["kl_input"] == "random token ids"
    assert 0 < result["quantized"]["kl_to_fp_bits"] < 1
    # per expert and output row: 4-bit codes, a fp32 scale and a 4-bit zero (rows padded to
    # whole bytes) per group of 8 inputs; gate_up 48 rows of 32 inputs, down 32 rows of 24
    row_bytes = {32: 16 + 4 * 4 + 2, 24: 12 + 3 * 4 + 2}
    packed = 2 * 4 * (48 * row_bytes[32] + 32 * row_bytes[24])
    weights = 2 * 4 * (32 * 48 + 24 * 32)  # 2 layers, 4 experts
    assert result["expert_bytes_vs_bf16"] == pytest.approx(packed / (2 * weights))
    assert result["bytes_vs_bf16"] < 0.65

    report = (run_dir / "report.md").read_text()
    table = report[report.index("| kind | tensors"):].splitlines()
    rows = {r.split(" | ")[0].lstrip("| "): r for r in table[2:]}
    for kind in ("expert gate_up", "expert down", "attention", "dense MLP",
                 "self-conditioning MLP"):
        assert rows[kind].endswith("| rtn W4 g8 |"), rows[kind]
    assert "| 2 | 12,288 | 27.35% | rtn W4 g8 |" in rows["expert gate_up"]  # 2 layers of 4x32x48
    assert "kept (router: expert choices stay exact)" in report
    assert table[-1].startswith("| all | 51 |") and report.endswith("quantized |\n")

    _, params = load_params(run_dir / "model")
    experts = {k: v for k, v in params.items() if k[2:3] == ("experts",)}
    assert len(experts) == 4 and all(isinstance(v, QuantizedExperts) and v.bits == 4
                                     and v.group_size == 8 for v in experts.values())
    assert isinstance(params[("layers", 1, "self_attn", "q_proj", "kernel")], QuantizedArray)
    assert params[("layers", 0, "router", "proj", "kernel")].dtype.name == "bfloat16"
    assert params[("embed",)].dtype.name == "bfloat16"
    assert read_meta(run_dir / "model")["meta"]["coverage"] == result["coverage"]



@pytest.mark.slow
def test_awq_packs_every_expert(gemma_dir, tmp_path, capsys):
    assert quantize(gemma_dir, tmp_path, "--config.method=awq", "--config.bits=4",
                    "--config.group_size=8", "--config.calib.n_samples=4",
                    "--config.moe.levels=1.0") == 0
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "results.json").read_text())
    assert result["experts_quantized"] and 0 < result["quantized"]["kl_to_fp_bits"] < 1
    _, params = load_params(run_dir / "model")
    for i in range(2):
        for name in ("gate_up", "down"):
            assert isinstance(params[("layers", i, "experts", name)], QuantizedExperts)
        assert isinstance(params[("layers", i, "self_attn", "o_proj", "kernel")],
                          QuantizedArray)


@pytest.mark.slow
def test_qdlm_generate_runs_on_the_packed_model(rtn_run, capsys):
    run_dir, _ = rtn_run
    assert main(["generate", "--model", str(run_dir / "model"), "--prompt", "17 33 5",
                 "--config.gemma.max_new_tokens=8", "--config.gemma.steps=2"]) == 0
    captured = capsys.readouterr()
    assert "quantized: rtn W4 g8" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("17 33 5 ")


def test_what_the_pass_does_not_do_is_refused_in_one_line(gemma_dir, tmp_path, capsys):
    for flags, line in [
            (("--config.method=omniquant",), "--config.method='omniquant': expected one "
             "of"),
            (("--config.method=daq", "--config.bits=8"), "--config.bits / moe.router_bits 8 "
             "with method=daq: its bits are a mean number of binary planes (2, 3 or 4)"),
            (("--config.method=awq", "--config.stream=true"), "--config.stream=true with "
             "method=awq act_bits=16 on diffusion_gemma: not yet (streaming runs weight-only "
             "gptq or daq"),
            (("--config.method=gptq", "--config.calibration=masked"),
             "--config.calibration=masked on diffusion_gemma: not yet"),
            (("--config.method=gptq", "--config.moe.thin_fallback=shared"),
             "--config.moe: fallback='shared'"),
            (("--config.method=duquant", "--config.act_bits=8", "--config.group_size=-1"),
             "--config.method=duquant on diffusion_gemma: not yet (its rotation folds"),
            (("--config.method=quarot", "--config.act_bits=8", "--config.wa.weight_quantizer=gptq"),
             "--config.wa.weight_quantizer=gptq with quarot on diffusion_gemma: not yet (rtn)"),
            (("--config.method=rtn", "--config.act_bits=8", "--config.act.kv.bits=4"),
             "--config.act.kv.bits=4 / act.iaaq on diffusion_gemma: not yet"),
            (("--config.method=rtn", "--config.group_size=16"),
             "--config.group_size=16: layers.0.experts.down (expert down, input width 24): "
             "group_size=16 does not divide")]:
        assert quantize(gemma_dir, tmp_path, *flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert line in err[-1]
        assert not any(tmp_path.iterdir())
    llada = write_hf_checkpoint(tmp_path / "src" / "llada", tiny_config("llada"))
    assert quantize(llada, tmp_path / "runs", "--config.method=rtn",
                    "--config.moe.quantize_router=true") == 2
    assert "has no router" in capsys.readouterr().err


@pytest.mark.slow
def test_with_a_tokenizer_kl_is_on_text_and_the_text_tasks_run(tmp_path, capsys):
    config = tiny_config("diffusion_gemma", vocab_size=1024, bos_token_id=1, eos_token_ids=(2,))
    path = write_hf_checkpoint(tmp_path / "tiny", config, seed=2)
    shutil.copy(ROOT / "assets" / "tiny-llada" / "tokenizer.json", path / "tokenizer.json")
    assert quantize(path, tmp_path / "runs", "--config.method=rtn", "--config.bits=4",
                    "--config.group_size=8", "--config.eval.arith_n=2") == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = json.loads((run_dir / "results.json").read_text())
    assert result["quantized"]["kl_input"] == "text"
    assert result["fp"]["arith_n"] == result["quantized"]["arith_n"] == 2
    assert "no tokenizer" not in capsys.readouterr().out
    assert (run_dir / "model" / "tokenizer.json").is_file()


# slow: GPTQ compiles for every linear and expert shape (about a minute); its driver's
# parts run in `make test` (tests/quant)
@pytest.mark.slow
def test_gptq_packs_every_expert_and_counts_the_expert_hessians(gemma_dir, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert quantize(gemma_dir, tmp_path, "--config.method=gptq", "--config.bits=4",
                        "--config.group_size=8", "--config.calib.n_samples=4",
                        "--config.moe.thin_min_rows=4") == 0
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "results.json").read_text())
    assert result["experts_quantized"] and result["method"] == "gptq"
    assert result["calibration"] == "two-mode (both), 4 windows"
    # 2 layers x 2 expert tensors x 4 experts, each Hessian formed one way or another
    assert sum(result["expert_hessians"].values()) == 16
    _, params = load_params(run_dir / "model")
    experts = [v for p, v in params.items() if len(p) > 2 and p[-2] == "experts"]
    assert len(experts) == 4 and all(isinstance(v, QuantizedExperts) for v in experts)


# slow: a second quantize run; the count itself is checked in tests/evals/test_canvas_kl.py
@pytest.mark.slow
def test_quantized_routers_report_the_changed_expert_choices(gemma_dir, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert quantize(gemma_dir, tmp_path, "--config.method=rtn", "--config.bits=2",
                        "--config.group_size=8", "--config.moe.quantize_router=true") == 0
    (run_dir,) = tmp_path.iterdir()
    q = json.loads((run_dir / "results.json").read_text())["quantized"]
    assert 0 < q["expert_choices_changed"] < 1
    assert q["expert_choices"] == 2 * 2 * (8 + 8) * 2  # windows x layers x tokens x k
    assert "of the fp model's top-k expert choices changed (routers quantized" in \
        (run_dir / "report.md").read_text()


# slow: a second quantize run (the wrapping and the experts' numerics are tested in
# tests/quant/test_gemma_rtn.py)
@pytest.mark.slow
def test_w4a8_run_quantizes_every_input_and_its_model_loads(gemma_dir, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert quantize(gemma_dir, tmp_path, "--config.method=rtn", "--config.bits=4",
                        "--config.group_size=8", "--config.act_bits=8") == 0
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "results.json").read_text())
    assert result["act_bits"] == 8 and result["experts_quantized"]
    report = (run_dir / "report.md").read_text()
    assert "| RTN | 4 (A8) | 8 |" in report and "rtn W4A8 g8" in report
    _, params = load_params(run_dir / "model")
    gate_up = params[("layers", 0, "experts", "gate_up")]
    assert isinstance(gate_up.weight, QuantizedExperts) and gate_up.act.bits == 8


# slow: DAQ compiles its block fits for every linear and expert shape (about a minute); the
# per-expert planes are checked in `make test` (tests/quant/test_gemma_daq.py)
@pytest.mark.slow
def test_daq_packs_every_tensor_as_binary_planes_and_the_model_generates(gemma_dir, tmp_path,
                                                                         capsys):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert quantize(gemma_dir, tmp_path / "runs", "--config.method=daq", "--config.bits=2",
                        "--config.group_size=8", "--config.calib.n_samples=4",
                        "--config.moe.thin_min_rows=4", "--config.daq.iters=4") == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = json.loads((run_dir / "results.json").read_text())
    assert result["experts_quantized"] and result["method"] == "daq"
    assert sum(result["expert_hessians"].values()) == 16
    assert "| expert gate_up | 2 |" in (run_dir / "report.md").read_text()
    assert all(r["action"] == "daq W2 g8" for r in result["coverage"]
               if r["kind"] in ("expert gate_up", "expert down", "attention", "dense MLP"))
    _, params = load_params(run_dir / "model")
    experts = [v for p, v in params.items() if len(p) > 2 and p[-2] == "experts"]
    assert len(experts) == 4 and all(isinstance(v, BinaryPlanesExperts) for v in experts)
    assert isinstance(params[("layers", 0, "self_attn", "q_proj", "kernel")], BinaryPlanesArray)
    capsys.readouterr()
    assert main(["generate", "--model", str(run_dir / "model"), "--prompt", "17 33 5",
                 "--config.gemma.max_new_tokens=8", "--config.gemma.steps=2"]) == 0
    captured = capsys.readouterr()
    assert "quantized: daq W2 g8" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("17 33 5 ")
    assert main(["export", str(run_dir / "model"), str(tmp_path / "ct"),
                 "--format", "compressed-tensors"]) == 2
    assert "DAQ's binary planes" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "ct").exists()
