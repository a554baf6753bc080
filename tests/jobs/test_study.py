"""The study sweep: resumable cells, deduplicated results, the table and the plots."""

import json
from pathlib import Path

import pytest

from qdlm_jax.jobs import study
from qdlm_jax.evals.tasks import BUILTIN, task_from_mapping

ROOT = Path(__file__).resolve().parents[2]
TASKS = (BUILTIN["wikipedia_bound"], BUILTIN["social_iqa"], BUILTIN["arithmetic"],
         BUILTIN["humaneval"])


class Killed(RuntimeError):
    pass


def make_spec(tmp_path, **kw):
    model = tmp_path / "tiny-model"
    model.mkdir(exist_ok=True)
    args = dict(models=(str(model),), methods=("rtn", "gptq"), bits=(8, 4), tasks=TASKS,
                out_dir=str(tmp_path / "study"),
                quantize_config=str(ROOT / "configs" / "quantize.py"), progress=False)
    return study.StudySpec(**(args | kw))


def fake_quality(label, task):
    """A known value per cell: quality falls with fewer bits, GPTQ above RTN."""
    base = {"fp": 0.8, "rtn-w8": 0.78, "rtn-w4": 0.5, "gptq-w8": 0.79, "gptq-w4": 0.7}[label]
    return base if task.higher_is_better else 10 - 5 * base


class Counter:
    def __init__(self, fail_after=None):
        self.calls, self.variants, self.fail_after = [], [], fail_after

    def make_variant(self, spec, model, v, fp_tm):
        self.variants.append(v.label)
        return v.label

    def evaluate(self, label, task):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise Killed("simulated kill")
        self.calls.append((label, task.name))
        return {"metric": task.metric, "value": fake_quality(label, task),
                "higher_is_better": task.higher_is_better, "n": 3}


def lines(spec):
    return (Path(spec.out_dir) / study.RESULTS).read_text().splitlines()


def test_full_run_table_and_plots(tmp_path):
    spec = make_spec(tmp_path)
    c = Counter()
    r = study.run_study(spec, evaluate=c.evaluate, make_variant=c.make_variant)
    assert r["ran"] == 5 * 4 == len(lines(spec)) == len(c.calls)
    table = r["table"].splitlines()
    assert table[0].split("|")[4:8] == [" Language modelling ", " Multiple choice ",
                                        " Math ", " Code "]
    assert "**wikipedia_bound** (bits/tok ↓)" in table[2]
    end = next(i for i, row in enumerate(table) if row.startswith("| *reference*"))
    rows = [row.split("|")[2:4] for row in table[3:end]]
    assert rows == [[" FP ", " – "], [" RTN ", " 8 "], [" RTN ", " 4 "], [" GPTQ ", " 8 "],
                    [" GPTQ ", " 4 "]]
    assert "one standard error" in r["table"]
    assert table[3].split("|")[4:6] == [" 6.000 ", " 80.0 "]
    assert (Path(spec.out_dir) / "table.md").read_text() == r["table"]
    png = Path(r["plots"][0]).read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 20_000
    # A second run finds everything done: nothing is evaluated or quantized again.
    c2 = Counter()
    r2 = study.run_study(spec, evaluate=c2.evaluate, make_variant=c2.make_variant)
    assert r2["ran"] == 0 and c2.calls == [] and c2.variants == []
    assert r2["table"] == r["table"]


def test_killed_study_resumes_without_redoing_cells(tmp_path):
    spec = make_spec(tmp_path)
    c = Counter(fail_after=8)  # killed after fp and rtn-w8 are done
    with pytest.raises(Killed):
        study.run_study(spec, evaluate=c.evaluate, make_variant=c.make_variant)
    assert len(lines(spec)) == 8
    c2 = Counter()
    r = study.run_study(spec, evaluate=c2.evaluate, make_variant=c2.make_variant)
    assert r["ran"] == 12 and not set(c.calls) & set(c2.calls)
    # The fp model is loaded (to quantize from); rtn-w8 is not quantized again.
    assert c2.variants == ["fp", "rtn-w4", "gptq-w8", "gptq-w4"]
    keys = [json.loads(x)["key"] for x in lines(spec)]
    assert len(keys) == len(set(keys)) == 20


def test_torn_last_line_and_duplicates_are_repaired(tmp_path):
    spec = make_spec(tmp_path)
    c = Counter(fail_after=5)
    with pytest.raises(Killed):
        study.run_study(spec, evaluate=c.evaluate, make_variant=c.make_variant)
    path = Path(spec.out_dir) / study.RESULTS
    text = path.read_text().splitlines(keepends=True)
    # A duplicate of line 2 and a line cut short by a kill mid-write.
    path.write_text("".join(text) + text[1] + text[4][: len(text[4]) // 2])
    c2 = Counter()
    r = study.run_study(spec, evaluate=c2.evaluate, make_variant=c2.make_variant)
    assert r["ran"] == 15 and len(c2.calls) == 15
    keys = [json.loads(x)["key"] for x in lines(spec)]  # every line parses
    assert len(keys) == len(set(keys)) == 20


def test_changed_task_settings_make_new_cells(tmp_path):
    spec = make_spec(tmp_path, methods=("rtn",), bits=(4,))
    c = Counter()
    study.run_study(spec, evaluate=c.evaluate, make_variant=c.make_variant)
    changed = task_from_mapping({"base": "arithmetic", "limit": 3})
    spec2 = make_spec(tmp_path, methods=("rtn",), bits=(4,),
                      tasks=(TASKS[0], TASKS[1], changed, TASKS[3]))
    c2 = Counter()
    assert study.run_study(spec2, evaluate=c2.evaluate, make_variant=c2.make_variant)["ran"] \
        == 2
    assert c2.calls == [("fp", "arithmetic"), ("rtn-w4", "arithmetic")]


def test_quantize_config_passes_methods_and_overrides_through(tmp_path):
    spec = make_spec(tmp_path, quantize={"group_size": 64, "calib": {"n_samples": 4}},
                     method_overrides={"gptq": {"calibration": "masked"}})
    cfg = study.quantize_config(spec, spec.models[0], study.Variant("gptq", 3))
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.calib.n_samples, cfg.calibration) == \
        ("gptq", 3, 64, 4, "masked")
    assert study.quantize_config(spec, spec.models[0],
                                 study.Variant("rtn", 3)).calibration == "clean"
    h = {study.quant_hash(spec, spec.models[0], study.Variant(m, b))
         for m in ("rtn", "gptq") for b in (8, 4)}
    assert len(h) == 4
    # A key added to the config file with a default does not change the cell keys.
    extra = tmp_path / "quantize.py"
    extra.write_text((ROOT / "configs" / "quantize.py").read_text().replace(
        "    return c", "    c.new_knob = 1\n    return c"))
    spec2 = make_spec(tmp_path, quantize_config=str(extra), quantize=spec.quantize,
                      method_overrides=spec.method_overrides)
    v = study.Variant("rtn", 4)
    assert study.quant_hash(spec2, spec2.models[0], v) == study.quant_hash(spec, spec.models[0],
                                                                           v)
    assert study.quantize_config(spec2, spec2.models[0], v).new_knob == 1


def test_weight_activation_variants(tmp_path):
    """W<b>A<b> variants: the job gets act_bits = bits and the WA overrides, their cells are
    distinct from the weight-only cells of the same method, and the table labels them."""
    spec = make_spec(tmp_path, methods=("rtn",), bits=(4,), tasks=TASKS[:2],
                     quantize={"group_size": 128}, wa_methods=("rtn", "quarot"),
                     wa_bits=(8, 4), wa_quantize={"group_size": -1})
    assert [v.label for v in spec.variants] == ["fp", "rtn-w4", "rtn-w8a8", "rtn-w4a4",
                                                "quarot-w8a8", "quarot-w4a4"]
    wo = study.quantize_config(spec, spec.models[0], study.Variant("rtn", 4))
    wa = study.quantize_config(spec, spec.models[0], study.Variant("quarot", 4, 4))
    assert (wo.act_bits, wo.group_size) == (16, 128)
    assert (wa.method, wa.bits, wa.act_bits, wa.group_size) == ("quarot", 4, 4, -1)
    quality = {"fp": 0.8, "rtn-w4": 0.5, "rtn-w8a8": 0.79, "rtn-w4a4": 0.3,
               "quarot-w8a8": 0.795, "quarot-w4a4": 0.6}
    r = study.run_study(spec, make_variant=lambda sp, m, v, fp: v.label,
                        evaluate=lambda label, t: {"metric": t.metric, "value": quality[label],
                                                   "higher_is_better": True, "n": 1})
    assert r["ran"] == 6 * 2
    keys = {json.loads(x)["key"].split("|")[1:3] == ["rtn", "w4a4"] for x in lines(spec)}
    assert True in keys
    rows = [row.split("|")[2:5] for row in r["table"].splitlines()[3:]
            if row.startswith("|") and not row.startswith("| *reference*")]
    assert [[c.strip() for c in row] for row in rows] == [
        ["FP", "–", "80.0"], ["RTN", "4", "50.0"], ["RTN", "W8A8", "79.0"],
        ["RTN", "W4A4", "30.0"], ["QUAROT", "W8A8", "79.5"], ["QUAROT", "W4A4", "60.0"]]
    assert Path(r["plots"][0]).read_bytes()[:4] == b"\x89PNG"


def config(**kw):
    from qdlm_jax.jobs.config_flags import load_config_file
    c = load_config_file(ROOT / "configs" / "study.py")
    c.quantize_config = str(ROOT / "configs" / "quantize.py")
    c.models = (str(ROOT / "assets" / "tiny-llada"),)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_default_config_is_valid():
    from qdlm_jax.jobs.config_flags import load_config_file
    c = load_config_file(ROOT / "configs" / "study.py")
    assert c.models == ("assets/tiny-llada", "assets/tiny-dream")
    spec = study.study_spec(config())
    assert [v.label for v in spec.variants] == ["fp"] + [
        f"{m}-w{b}" for m in ("rtn", "gptq", "awq") for b in (8, 4, 3)] + [
        f"{m}-w{b}a{b}" for m in ("rtn", "smoothquant", "quarot", "duquant") for b in (8, 4)]
    assert {t.category for t in spec.tasks} == {"language_modeling", "multiple_choice",
                                                "math", "code"}


@pytest.mark.parametrize("kw, message", [
    (dict(tasks=["nope"]), r"--config.tasks\[0\]: unknown task 'nope'"),
    (dict(methods=("rtn", "magic")), "method='magic'"),
    (dict(models=("no/such/model",)), "no/such/model: no such checkpoint"),
    (dict(tasks=["arithmetic", "arithmetic"]), "duplicate task names"),
    (dict(wa_bits=()), "expected --config.wa_bits too"),
    (dict(wa_methods=("quarot",), wa_bits=(3,)), "act_bits"),
])
def test_bad_config_is_rejected_up_front(kw, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        study.study_spec(config(**kw))


@pytest.mark.slow
def test_real_tiny_study(tmp_path):
    cfg = config(methods=("rtn",), bits=(4,), out_dir=str(tmp_path / "s"), progress=False,
                 tasks=[{"base": "arithmetic", "limit": 2}])
    r = study.run_study(study.study_spec(cfg))
    assert r["ran"] == 2 and len(r["records"]) == 2


def test_axis_limits_do_not_zoom_noise():
    lo, hi = study.axis_limits([9.341, 9.343], percent=False)
    assert hi - lo >= 0.1 and lo < 9.341 and hi > 9.343
    lo, hi = study.axis_limits([8.0, 9.0], percent=False)
    assert lo <= 8.0 and hi >= 9.0 and hi - lo < 1.2
    lo, hi = study.axis_limits([98.0, 99.0], percent=True)
    assert hi == 100.0 and hi - lo >= 10


def test_table_cells_carry_standard_errors():
    rec = {"value": 0.25, "se": 0.0433, "higher_is_better": True}
    assert study._fmt(rec) == "25.0 ± 4.3"
    assert study._fmt({"value": 9.3412, "se": 0.012, "higher_is_better": False}) == \
        "9.341 ± 0.012"
