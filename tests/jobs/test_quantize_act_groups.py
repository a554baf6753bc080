"""The quantize job with per-group activation scales: the flags reach the spec, per-token and
per-group runs get different run directories, the report shows the group, and bad values
are one-line flag errors (a group size that does not divide a linear names the linear, K/V
channel groups must divide the head dim)."""

from pathlib import Path

import pytest

from qdlm_jax.errors import ConfigOverrideError
from qdlm_jax.jobs import quantize_report
from qdlm_jax.jobs.config_flags import apply_overrides, load_config_file
from qdlm_jax.jobs.quantize import run
from qdlm_jax.jobs.quantize_spec import job_spec

ROOT = Path(__file__).resolve().parents[2]
W4A4 = ("--config.method=rtn", "--config.bits=4", "--config.act_bits=4")


def _cfg(tmp_path, *overrides):
    return apply_overrides(load_config_file(ROOT / "configs/quantize.py"), [
        f"--config.out_dir={tmp_path}", "--config.eval.n_windows=1", "--config.eval.mc_num=8",
        "--config.eval.arith_n=2", "--config.eval.skip_fp=true", *overrides])


def test_per_group_flags_reach_the_spec_and_name_the_run_dir(tmp_path):
    per_token = job_spec(_cfg(tmp_path, *W4A4))
    g64 = job_spec(_cfg(tmp_path, *W4A4, "--config.act.granularity=per_group",
                        "--config.act.group_size=64"))
    assert (g64.wa.act.granularity, g64.wa.act.group_size) == ("per_group", 64)
    assert g64.act_group_size == 64 and per_token.act_group_size is None
    assert "-rtn-w4a4ag64g128-nocal-" in g64.run_name
    assert "-rtn-w4a4g128-nocal-" in per_token.run_name
    q = {"bits_per_token": 9.3, "ppl_bound": 640.0, "arith_acc": 0.0, "arith_n": 20}
    row = {"model": "assets/tiny-llada", "method": "rtn", "bits": 4, "act_bits": 4,
           "act_group_size": 64, "group_size": 128, "calibration": "none", "quantized": q,
           "linear_bytes_vs_bf16": 0.26, "quantize_s": 1.0}
    cells = [c.strip() for c in quantize_report.report([row]).splitlines()[2].split("|")]
    assert cells[3:6] == ["4", "4 g64", "128"]


def test_bad_activation_groups_are_flag_errors(tmp_path):
    for flags, needle in (
            (("--config.act.granularity=per_channel",), "--config.act.granularity"),
            (("--config.act.granularity=per_group", "--config.act.group_size=0"),
             "--config.act.group_size=0"),
            (("--config.act.granularity=per_group", "--config.act.group_size=48.0"),
             "--config.act.group_size")):
        with pytest.raises(ConfigOverrideError, match=needle):
            job_spec(_cfg(tmp_path, *W4A4, *flags))
    # 96 divides no width of tiny-llada (128, 512): refused before calibration or evaluation.
    with pytest.raises(ConfigOverrideError, match=r"^--config\.act\.group_size=96 does not "
                                                  r"divide the width 128 of layers\.0\.q_proj"):
        run(_cfg(tmp_path, *W4A4, "--config.act.granularity=per_group",
                 "--config.act.group_size=96"))
    with pytest.raises(ConfigOverrideError, match=r"^--config\.act\.kv\.group_size=64 does "
                                                  r"not divide the head dim 32"):
        run(_cfg(tmp_path, *W4A4, "--config.act.kv.bits=4",
                 "--config.act.kv.granularity=per_channel_group"))
