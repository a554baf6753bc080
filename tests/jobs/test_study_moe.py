"""The study's MoE rows on the bundled tiny DiffusionGemma, end to end at small n: the
fidelity task against the fp model (KL 0 and no changed expert choice for fp itself, choices
changed once the routers are quantized), the sampler's figures per generation cell, the MoE
table, and cells resumed from the results file."""

import json
from pathlib import Path

import pytest

from qdlm_jax.jobs import study
from qdlm_jax.jobs.config_flags import load_config_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def moe_study(tmp_path_factory):
    cfg = study.apply_study_overrides(load_config_file(ROOT / "configs/study_moe.py"), [
        "--config.methods=", "--config.rows=router4", "--config.wa_methods=",
        "--config.wa_bits=", "--config.wa_act_bits=",
        f"--config.out_dir={tmp_path_factory.mktemp('study_moe')}", "--config.progress=false",
        "--config.only_tasks=arithmetic,kl_to_fp"])
    cfg.tasks = [{**t, **small} for t in cfg.tasks
                 for small in [{"arithmetic": {"limit": 8, "batch_size": 8},
                                "kl_to_fp": {"n_windows": 2}}.get(t.get("name") or t["base"],
                                                                  {})]]
    spec = study.study_spec(cfg)
    return spec, study.run_study(spec)


def test_moe_rows_run_end_to_end(moe_study):
    spec, r = moe_study
    assert [v.label for v in spec.variants] == ["fp", "rtn-w4+router4"]
    assert r["ran"] == 2 * 2
    rec = {(x["variant"] or x["method"], x["task"]): x for x in r["records"]}
    fp_kl, q_kl = rec["fp", "kl_to_fp"], rec["router4", "kl_to_fp"]
    assert fp_kl["value"] == 0.0 and fp_kl["expert_choices_changed"] == 0.0
    assert q_kl["value"] > 0 and q_kl["se"] > 0 and q_kl["expert_choices_changed"] > 0
    # windows x layers x tokens (48 prompt + 16 canvas) x k
    assert q_kl["result"]["expert_choices"] == 2 * 4 * (48 + 16) * 2
    for row in ("fp", "router4"):
        a = rec[row, "arithmetic"]
        assert a["n"] == 8 and a["tokens_per_step"] >= 1.0
        assert a["forward_passes_per_row"] * 8 == a["result"]["forward_passes"]
    table = Path(r["out_dir"], "table_moe.md").read_text()
    assert "| tiny-diffusiongemma | RTN 4 +router4 | " in table
    assert "**expert choices changed** (%)" in table
    assert Path(r["out_dir"], "decoding_tiny-diffusiongemma.png").stat().st_size > 0
    # moe.router_bits etc. are named under the table (`rows`)
    assert "`moe.router_bits=4`" in Path(r["out_dir"], "table.md").read_text()


def test_moe_cells_resume_from_the_results_file(moe_study):
    spec, r = moe_study
    path = Path(r["out_dir"]) / study.RESULTS
    kept = path.read_text().splitlines()
    dropped = json.loads(kept[-1])
    path.write_text("\n".join(kept[:-1]) + "\n" + kept[-1][:40])  # a torn last line
    again = study.run_study(spec)
    assert again["ran"] == 1
    redone = next(x for x in again["records"] if x["key"] == dropped["key"])
    assert redone["value"] == dropped["value"]  # greedy decoding and fixed noise
