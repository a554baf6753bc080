"""`make demo` tables: every cell is a valid main-job config, and the rows say what they run."""

import pytest

from qdlm_jax.errors import ConfigOverrideError
from qdlm_jax.jobs import demo
from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
from qdlm_jax.jobs.quantize_spec import eval_task_specs, job_spec


def spec_of(cell):
    cfg = load_config_file(demo.ROOT / "configs" / "quantize.py")
    return job_spec(apply_overrides(cfg, [f"--config.model={demo.ROOT / 'assets' / 'tiny-llada'}",
                                          *cell]))


def test_weight_only_table_has_w4_w3_and_w2_rows_and_scores_the_tasks():
    specs = [spec_of(c) for c in demo.cells(False)]
    assert [(s.method, s.ptq.weight.bits, s.ptq.weight.group_size, s.wa) for s in specs] == [
        (m, b, 128, None) for m in ("rtn", "gptq", "awq") for b in (4, 3)] + [
        ("rtn", 2, 128, None), ("gptq", 2, 128, None)]
    spec = spec_of([demo.DEMO_TASKS])
    assert spec.eval_tasks == ("arithmetic_subtract", "synthetic_code", "synthetic_compare")
    assert [t.limit for t in eval_task_specs(spec)] == [100, 100, 100]


def test_eval_tasks_must_be_builtin():
    with pytest.raises(ConfigOverrideError, match="eval.tasks: 'nope'"):
        spec_of(["--config.eval.tasks=arithmetic,nope"])


def test_wa_table_ends_with_kv4_and_iaaq_rows():
    specs = [spec_of(c) for c in demo.cells(True)]
    assert len(specs) == 10
    assert all(s.act_bits == s.ptq.weight.bits and s.ptq.weight.group_size == -1
               for s in specs)
    assert all(s.wa.kv is None and not s.wa.iaaq for s in specs[:8])
    kv4, iaaq = specs[8:]
    for s in (kv4, iaaq):
        assert (s.method, s.ptq.weight.bits, s.act_bits) == ("quarot", 4, 4)
        assert (s.wa.kv.bits, s.wa.kv.granularity, s.wa.kv.sym) == (4, "per_head", False)
    assert not kv4.wa.iaaq and (iaaq.wa.iaaq, iaaq.wa.iaaq_keys) == (True, True)
    assert iaaq.calib.mode == "masked"


def test_w2_table_compares_daq_with_rtn_and_gptq():
    specs = [spec_of(c) for c in demo.cells(False, w2=True)]
    assert [(s.method, s.ptq.weight.bits, s.ptq.weight.group_size) for s in specs] == [
        ("rtn", 2, 128), ("gptq", 2, 128), ("daq", 2, 128)]
    assert (specs[2].calib.mode, specs[2].ptq.daq_ratio) == ("masked", 0.05)


def test_wa_and_w2_together_are_refused(capsys):
    assert demo.main(["--wa", "--w2"]) == 2
    assert "one at a time" in capsys.readouterr().err
    assert demo.main(["--moe", "--w2"]) == 2
