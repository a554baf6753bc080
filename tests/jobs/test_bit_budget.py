"""`qdlm quantize --config.bits_budget=3.5`: a bit plan made before quantizing, saved in the
run dir and the checkpoint, followed block by block by the packed model, the same through the
streaming pass, and kept by a resumed run."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import qdlm_jax
from qdlm_jax.checkpoints.orbax_format import load_checkpoint, read_meta
from qdlm_jax.errors import ConfigOverrideError
from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
from qdlm_jax.jobs.quantize import run
from qdlm_jax.quant import QuantizedArray

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *overrides):
    return apply_overrides(load_config_file(ROOT / "configs/quantize.py"), [
        f"--config.out_dir={tmp_path}", "--config.method=rtn", "--config.bits_budget=3.5",
        "--config.calib.seq_len=32", "--config.mixed.samples=4", "--config.eval.n_windows=1",
        "--config.eval.mc_num=2", "--config.eval.arith_n=1", "--config.eval.skip_fp=true",
        *overrides])


def _widths(model_dir: Path) -> tuple[dict, Fraction]:
    """({block: {bits of its packed linears}}, parameter-weighted mean bits of the blocks)."""
    _, params = load_checkpoint(model_dir)
    per_block, weighted, total = {}, 0, 0
    for path, v in params.items():
        if path[0] == "layers" and path[-1] == "kernel":
            assert isinstance(v, QuantizedArray), path
            per_block.setdefault(path[1], set()).add(v.bits)
            n = v.shape[0] * v.shape[1]
            weighted, total = weighted + n * v.bits, total + n
    assert not isinstance(params[("lm_head", "kernel")], QuantizedArray)
    return per_block, Fraction(weighted, total)


# slow: a whole budget job (the plan and its per-block widths are tested without one)
@pytest.mark.slow
def test_a_budget_run_packs_each_block_at_its_planned_width_and_generates(tmp_path):
    r = run(_cfg(tmp_path))
    run_dir = Path(r["run_dir"])
    assert run_dir.name.startswith("tiny-llada-rtn-wmix3.5g128-")
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["budget"] == 3.5 and plan["widths"] == [2, 3, 4, 8]
    assert len(plan["bits"]) == 4 and len(set(plan["bits"])) > 1  # not the uniform plan
    assert np.array(plan["sensitivity"]).shape == (4, 4)
    per_block, mean = _widths(run_dir / "model")
    assert per_block == {i: {b} for i, b in enumerate(plan["bits"])}
    assert mean == Fraction(7, 2) and float(mean) == plan["mean_bits"] == r["bits"]
    assert read_meta(run_dir / "model")["meta"]["bit_plan"] == plan == r["bit_plan"]
    report = (run_dir / "report.md").read_text()
    assert "| RTN | 3.5 mixed |" in report and "Bit plan of " + run_dir.name in report
    assert f"| 0 | {plan['bits'][0]} | 262,144 |" in report

    model = qdlm_jax.load_model(run_dir / "model")
    ids, mask = qdlm_jax.left_pad([[1, 5, 6, 7]], model.config.pad_token_id)
    tokens = qdlm_jax.generate(model, ids, mask, gen_length=4, steps=4, block_length=4)
    assert tokens.shape == (1, 8) and not np.any(np.asarray(tokens) == 3)  # no mask left

    with pytest.raises(ConfigOverrideError, match="daq's bits are a mean number"):
        run(_cfg(tmp_path, "--config.method=daq"))
    with pytest.raises(ConfigOverrideError, match="--config.bits_budget=1.5: below"):
        run(_cfg(tmp_path, "--config.bits_budget=1.5"))


# slow: streaming with a plan and a resumed run (the in-memory budget run is in `make test`;
# streaming resumes are checked without a plan in tests/jobs/test_streaming.py)
@pytest.mark.slow
def test_streaming_makes_the_same_plan_and_a_resumed_run_keeps_it(tmp_path, monkeypatch,
                                                                  assert_same_checkpoint):
    from qdlm_jax.jobs import quantize, streaming
    in_memory = run(_cfg(tmp_path / "m"))
    real = streaming.quantize_block

    def dies_at_block_2(block, inputs, x, index, spec, **kw):
        if index == 2:
            raise KeyboardInterrupt  # a kill: blocks 0-1 committed, the plan already saved
        return real(block, inputs, x, index, spec, **kw)

    monkeypatch.setattr(streaming, "quantize_block", dies_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tmp_path / "s", "--config.stream=true", "--config.eval.n_windows=0"))
    monkeypatch.setattr(streaming, "quantize_block", real)
    run_dir = next((tmp_path / "s").iterdir())
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["bits"] == in_memory["bit_plan"]["bits"]
    np.testing.assert_allclose(plan["sensitivity"], in_memory["bit_plan"]["sensitivity"],
                               rtol=1e-5)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the resumed run measured the sensitivity again")

    monkeypatch.setattr(quantize, "stream_sensitivity", no_second_pass)
    streamed = run(_cfg(tmp_path / "s", "--config.stream=true", "--config.eval.n_windows=0"))
    assert streamed["stats"]["resumed_at"] == 2 and streamed["bit_plan"] == plan
    assert_same_checkpoint(run_dir / "model", Path(in_memory["run_dir"]) / "model")
