"""The study sweep: resumable cells, deduplicated results, the table and the plots; the
activation-granularity and bit-budget dimensions (labels, job configs, one-line errors)."""

import json
from pathlib import Path

import pytest

from qdlm_jax.evals.tasks import BUILTIN, task_from_mapping
from qdlm_jax.jobs import study, study_report

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
        f"{m}-w{b}a{b}" for m in ("rtn", "smoothquant", "quarot", "duquant") for b in (8, 4)] \
        + ["quarot-w4a4+kv4", "quarot-w4a4+kv4-iaaq"]
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


def _job(spec, v):
    from qdlm_jax.jobs.quantize_spec import job_spec
    return job_spec(study.quantize_config(spec, spec.models[0], v))


def test_wa_rows_pass_kv_and_iaaq_to_the_job_and_label_the_table(tmp_path):
    """The default extra rows reach the main job's spec as 4-bit K/V (and IA-AQ of K and V on
    masked calibration); the plain QuaRot row keeps float K/V. The fake quality below is a
    function of the spec the job receives, so a dropped K/V setting shows in the table."""
    spec = make_spec(tmp_path, methods=(), bits=(), tasks=TASKS[:2], wa_methods=("quarot",),
                     wa_bits=(4,), wa_quantize={"group_size": -1},
                     wa_rows=tuple(study.wa_row(n, "t") for n in study.WA_ROWS))
    assert [v.label for v in spec.variants] == ["fp", "quarot-w4a4", "quarot-w4a4+kv4",
                                                "quarot-w4a4+kv4-iaaq"]
    plain, kv4, iaaq = (_job(spec, v) for v in spec.variants[1:])
    assert plain.wa.kv is None and not plain.wa.iaaq
    for job in (kv4, iaaq):
        assert (job.wa.kv.bits, job.wa.kv.granularity, job.wa.kv.sym) == (4, "per_head", False)
        assert (job.act_bits, job.ptq.weight.bits, job.ptq.weight.group_size) == (4, 4, -1)
    assert not kv4.wa.iaaq and (iaaq.wa.iaaq, iaaq.wa.iaaq_keys) == (True, True)
    assert (kv4.calib.mode, iaaq.calib.mode) == ("clean", "masked")
    assert len({study.quant_hash(spec, spec.models[0], v) for v in spec.variants[1:]}) == 3

    def make_variant(sp, model, v, fp):
        if v.method == study.FP:
            return 0.8
        job = _job(sp, v)
        return 0.6 - 0.1 * (job.wa.kv is not None) + 0.05 * job.wa.iaaq

    r = study.run_study(spec, make_variant=make_variant, evaluate=lambda q, t: {
        "metric": t.metric, "value": q, "higher_is_better": True, "n": 1})
    assert r["ran"] == 4 * 2
    table = r["table"].splitlines()
    rows = [[c.strip() for c in row.split("|")[2:5]] for row in table[3:]
            if row.startswith("|") and not row.startswith("| *reference*")]
    assert rows == [["FP", "–", "80.0"], ["QUAROT", "W4A4", "60.0"],
                    ["QUAROT", "W4A4, KV4", "50.0"],
                    ["QUAROT + IA-AQ (K,V; masked)", "W4A4, KV4", "55.0"]]
    assert ("Row quarot-w4a4+kv4-iaaq (`wa_rows`) sets, on top of the study's "
            "weight-activation settings: `act.iaaq.enabled=True`, `act.iaaq.search_keys=True`, "
            "`act.kv.bits=4`, `calibration=masked`.") in r["table"]
    recs = {(x["variant"], x["task"]): x for x in r["records"]}
    assert recs["kv4", "social_iqa"]["kv"]["bits"] == 4 and recs["kv4", "social_iqa"]["iaaq"] \
        is None
    assert recs["kv4-iaaq", "social_iqa"]["iaaq"]["search_keys"] is True
    assert recs[None, "social_iqa"]["kv"] is None  # fp and plain QuaRot: float K/V
    assert Path(r["plots"][0]).read_bytes()[:4] == b"\x89PNG"


def test_wa_quantize_takes_main_job_keys_from_the_command_line(tmp_path):
    """`--config.wa_quantize.act.kv.bits=4` (a key the study config does not list) is typed
    and checked against configs/quantize.py and reaches every weight-activation job only."""
    cfg = config(methods=("rtn",), bits=(4,), wa_methods=("rtn", "quarot"), wa_bits=(4,),
                 wa_rows=[])
    plain = study.study_spec(cfg)
    study.apply_study_overrides(cfg, ["--config.wa_quantize.act.kv.bits=4",
                                      "--config.wa_quantize.act.kv.sym=true",
                                      "--config.quantize.calib.n_samples=4"])
    spec = study.study_spec(cfg)
    assert spec.wa_quantize == {"group_size": -1, "act": {"kv": {"bits": 4, "sym": True}}}
    for v in spec.variants[1:]:
        job = _job(spec, v)
        assert job.calib.n_samples == 4
        assert (job.wa is None) if v.act_bits is None else \
            ((job.wa.kv.bits, job.wa.kv.sym) == (4, True))
    wa = study.Variant("quarot", 4, 4)
    assert study.quant_hash(spec, spec.models[0], wa) != study.quant_hash(plain,
                                                                          plain.models[0], wa)
    records = [{"model_name": "m", "method": "quarot", "bits": 4, "act_bits": 4, "task": "x",
                "value": 0.5, "se": None, "higher_is_better": True,
                **study.kv_settings(study.quantize_config(spec, spec.models[0], wa).to_dict())}]
    row = study.markdown_table(records, [task_from_mapping({"base": "arithmetic",
                                                            "name": "x"})]).splitlines()[3]
    assert row.split("|")[3].strip() == "W4A4, KV4 sym"


@pytest.mark.parametrize("override, message", [
    ("--config.wa_quantize.act.kv.bitz=4", r"--config.wa_quantize.act.kv.bitz=4: .*unknown "
                                           r"key 'bitz'"),
    ("--config.wa_quantize.act.kv.bits=four", r"kv.bits=four: .*expected an integer"),
    ("--config.method_overrides.gptq=1", "method_overrides.<method>.<key>"),
    ("--config.wa_rows=nope", r"--config.wa_rows\[0\]='nope': unknown row"),
])
def test_bad_study_override_names_the_flag(override, message):
    with pytest.raises(ValueError, match=message):
        study.study_spec(study.apply_study_overrides(config(), [override]))


@pytest.mark.parametrize("row, message", [
    (dict(name="x", method="quarot", bits=4, quantize={"act.kv.bitz": 4}),
     r"--config.wa_rows\[0\] \(quarot-w4a4\+x\): .*unknown key 'bitz'"),
    (dict(name="x", method="quarot", bits=4, kv=4), r"--config.wa_rows\[0\].kv: unknown key"),
    (dict(name="x", method="quarot", bits=4, quantize={"act": {"iaaq": {"enabled": True}}}),
     r"--config.wa_rows\[0\] \(quarot-w4a4\+x\): IA-AQ .*K/V"),
    (dict(name="a b", method="quarot", bits=4), r"wa_rows\[0\].name='a b'"),
    (dict(method="quarot", bits=4), "missing 'name'"),
])
def test_bad_wa_row_is_rejected_up_front(row, message):
    with pytest.raises(ValueError, match=message):
        study.study_spec(config(wa_rows=[row]))


# slow: a real quantization (the rows' job configs are checked without one)
@pytest.mark.slow
def test_real_kv4_row_quantizes_attention(tmp_path):
    """End to end on the bundled tiny LLaDA through the study's own quantize path: the KV4
    row's model is further from fp (KL on fixed masked inputs) than the plain QuaRot W4A4
    row's, so its K/V setting was not dropped on the way; a `wa_rows` mapping with
    `act.kv.bits=16` (float K/V) is the plain row's model exactly."""
    import numpy as np

    from qdlm_jax.evals.basic import output_kl

    cfg = config(methods=(), bits=(), include_fp=False, wa_methods=("quarot",), wa_bits=(4,),
                 wa_rows=["quarot-w4a4+kv4", {"name": "kv16", "method": "quarot", "bits": 4,
                                              "quantize": {"act": {"kv": {"bits": 16}}}}],
                 out_dir=str(tmp_path / "s"), progress=False,
                 tasks=[{"base": "arithmetic", "limit": 1}])
    spec = study.study_spec(cfg)
    windows = np.random.default_rng(0).integers(5, 1000, size=(2, 48))  # tiny vocab: 1024
    fp_model = {}

    def make_variant(sp, model, v, fp_tm):
        tm = study._make_variant(sp, model, v, fp_tm)
        if v.method == study.FP:
            fp_model["m"] = tm.model
        return tm

    def evaluate(tm, task):
        kl = output_kl(fp_model["m"], tm.model, windows)["kl_bits"]
        return {"metric": "kl", "value": kl, "higher_is_better": False, "n": 1}

    r = study.run_study(spec, make_variant=make_variant, evaluate=evaluate)
    kl = {rec["variant"]: rec["value"] for rec in r["records"]}
    # A dropped K/V setting gives exactly the plain row's KL (as the float-K/V row does), so
    # the 4-bit K/V row must be strictly further from fp. Measured (kv4 vs plain): 0.0187 vs
    # 0.0079 on the first tiny LLaDA, 0.0079 vs 0.0057 on the step-3100 one, 0.112 vs 0.095
    # on the step-5400 one, whose W4A4 error is larger beside the same K/V error.
    assert kl[None] > 0 and kl["kv4"] > kl[None]
    assert kl["kv16"] == kl[None]


@pytest.mark.slow
def test_real_tiny_study(tmp_path):
    cfg = config(methods=("rtn",), bits=(4,), out_dir=str(tmp_path / "s"), progress=False,
                 tasks=[{"base": "arithmetic", "limit": 2}], wa_methods=(), wa_bits=(),
                 wa_rows=[])
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
    assert study_report._fmt(rec) == "25.0 ± 4.3"
    assert study_report._fmt({"value": 9.3412, "se": 0.012, "higher_is_better": False}) == \
        "9.341 ± 0.012"


def test_decoding_dimension_reruns_generation_tasks_on_selected_rows(tmp_path):
    """Issue 15's decoding dimension on a tiny sweep: each setting reruns the generation
    tasks (arithmetic, humaneval) as `<task>@<setting>` on the named rows only, the cells
    record tokens per step, the table shows both and marks rows not run that way."""
    dec = (study.decoding_setting("dual-tau0.9", "d[0]"),
           study.decoding_setting({"cache": "prefix", "factor": 1.0}, "d[1]"))
    assert dec[1].name == "prefix-f1.0"
    spec = make_spec(tmp_path, decoding=dec, decoding_rows=("fp", "gptq-w4"))
    tasks = {t.name: t for t in spec.tasks_for(study.Variant("fp"))}
    g = tasks["arithmetic@dual-tau0.9"].gen
    assert (g.cache, g.threshold, g.factor) == ("dual", 0.9, None)
    assert tasks["humaneval@prefix-f1.0"].gen.factor == 1.0
    assert [t.name for t in spec.tasks_for(study.Variant("rtn", 4))] == [t.name for t in TASKS]
    c = Counter()

    def evaluate(label, task):
        r = c.evaluate(label, task)
        return r | {"tokens_per_step": 2.5 if "@" in task.name else 1.0}

    r = study.run_study(spec, evaluate=evaluate, make_variant=c.make_variant)
    decoded = sorted((lab, t) for lab, t in c.calls if "@" in t)
    assert decoded == sorted((lab, f"{t}@{d}") for lab in ("fp", "gptq-w4")
                             for t in ("arithmetic", "humaneval")
                             for d in ("dual-tau0.9", "prefix-f1.0"))
    assert r["ran"] == 5 * 4 + len(decoded)
    rec = next(x for x in r["records"] if x["task"] == "arithmetic@dual-tau0.9")
    assert (rec["decoding"], rec["tokens_per_step"]) == ("dual-tau0.9", 2.5)
    assert rec["task_spec"]["gen"]["threshold"] == 0.9
    table = r["table"].splitlines()
    assert "**arithmetic@dual-tau0.9** (exact_match %)" in table[2]
    fp_row = next(row for row in table if row.startswith("| tiny-model | FP"))
    rtn4 = next(row for row in table if "| RTN | 4 |" in row)
    assert fp_row.count("(2.50 tok/step)") == 4 and "tok/step" not in rtn4
    assert rtn4.rstrip(" |").endswith("–")
    assert "Fast-dLLM decoding" in r["table"]
    again = study.run_study(spec, evaluate=evaluate, make_variant=c.make_variant)
    assert again["ran"] == 0


@pytest.mark.parametrize("kw, message", [
    (dict(decoding=["dual-tau2"]), r"--config.decoding\[0\]: threshold=2.0"),
    (dict(decoding=["full"]), r"cache='full'"),
    (dict(decoding=["dual-x0.9"]), "expected <cache>"),
    (dict(decoding=["dual-tau0.9"], decoding_rows=["gptq-w5"]), r"\['gptq-w5'\] are not rows"),
    (dict(decoding=["dual-tau0.9"], tasks=["social_iqa"]), "no task of this study generates"),
])
def test_bad_decoding_setting_is_rejected_up_front(kw, message):
    with pytest.raises(ValueError, match=message):
        study.study_spec(config(**kw))


def test_evaluate_task_adds_the_decoding_figures(monkeypatch):
    import qdlm_jax.evals.tasks as tasks_mod

    class Stub:
        counts = {"stale": 1}

        def take_decode_stats(self):
            out, self.counts = self.counts, {}
            return out

    def run_task(tm, task, progress=True, reference=None):
        tm.counts = {"tokens_per_step": 3.0, "forward_passes": 8}
        return {"value": 0.5, "reference": reference}

    monkeypatch.setattr(tasks_mod, "run_task", run_task)
    r = study.evaluate_task(Stub(), BUILTIN["arithmetic"], reference="fp")
    assert r == {"value": 0.5, "reference": "fp", "tokens_per_step": 3.0, "forward_passes": 8}


def test_study_prints_its_plan_and_time_left(tmp_path, capsys):
    spec = make_spec(tmp_path)
    c = Counter()
    study.run_study(spec, evaluate=c.evaluate, make_variant=c.make_variant)
    err = capsys.readouterr().err
    assert "plan: 1 model(s) x 5 variants (fp, rtn-w8, rtn-w4, gptq-w8, gptq-w4)" in err
    assert "= 20 cells, 20 to run" in err
    assert "4/20 cells done; about" in err and "min left" in err


def test_plot_means_leave_out_tasks_the_fp_model_cannot_do():
    tasks = (BUILTIN["arithmetic"], BUILTIN["gsm_symbolic"])
    recs = [{"model_name": "m", "method": "fp", "task": "arithmetic", "value": 0.9,
             "chance": None},
            {"model_name": "m", "method": "fp", "task": "gsm_symbolic", "value": 0.0,
             "chance": None}]
    assert study.fp_can_do(tasks[0], recs, "m") and not study.fp_can_do(tasks[1], recs, "m")
    assert study.fp_can_do(BUILTIN["wikipedia_bound"], recs, "m")  # no fp record: kept


# ---- the activation-granularity and bit-budget dimensions (the spec; no quantization) ----

def wa_config(**kw):
    return config(**{"methods": (), "wa_methods": ("rtn", "quarot"), "wa_bits": (4,),
                     "wa_act_bits": (4, 8), "act_granularities": ("per_token", "g128", "g32"),
                     "wa_rows": [], **kw})


def budget_config(**kw):
    return config(**{"methods": ("rtn", "gptq"), "bits": (4, 3), "bits_budgets": (3.0, 3.5),
                     "wa_methods": (), "wa_rows": [], **kw})


def test_activation_granularities_expand_into_labelled_rows_with_their_job_configs():
    spec = study.study_spec(wa_config())
    assert [v.label for v in spec.variants] == ["fp"] + [
        f"{m}-w4a{a}{g}" for m in ("rtn", "quarot") for a in (4, 8)
        for g in ("", "-ag128", "-ag32")]
    for v in spec.variants[1:]:
        job = _job(spec, v)
        assert (job.method, job.ptq.weight.bits, job.ptq.weight.group_size, job.act_bits) == \
            (v.method, 4, -1, v.act_bits)  # per-channel weights, A4 or A8
        assert job.act_group_size == v.act_group
        assert job.wa.act.granularity == ("per_token" if v.act_group is None else "per_group")
    keys = {study.cell_key(spec.models[0], v, study.quant_hash(spec, spec.models[0], v),
                           spec.tasks[0]) for v in spec.variants}
    assert len(keys) == len(spec.variants)
    assert "|quarot|w4a4-ag32|" in next(k for k in keys if "ag32" in k and "quarot" in k
                                         and "w4a4" in k)


def test_per_token_rows_keep_the_default_studys_cells():
    """The per-token rows of a granularity study are the default study's rows: same main-job
    settings, same cell keys (a study sharing its out_dir reuses them)."""
    default = study.study_spec(config())
    grouped = study.study_spec(wa_config(wa_methods=("rtn", "smoothquant", "quarot",
                                                     "duquant"), wa_act_bits=()))
    m = default.models[0]
    for method in ("rtn", "smoothquant", "quarot", "duquant"):
        v = study.Variant(method, 4, 4)
        assert v in default.variants and v in grouped.variants
        assert study.quant_hash(default, m, v) == study.quant_hash(grouped, m, v)
        assert "act" not in study.quant_overrides(default, v)
    assert all(v.act_group is None and v.budget is None for v in default.variants)
    assert default.act_groups == (None,) and default.bits_budgets == () \
        and default.wa_act_bits == ()


def test_bit_budgets_expand_into_mixed_precision_rows():
    spec = study.study_spec(budget_config())
    assert [v.label for v in spec.variants] == [
        "fp", "rtn-w4", "rtn-w3", "rtn-wmix3", "rtn-wmix3.5",
        "gptq-w4", "gptq-w3", "gptq-wmix3", "gptq-wmix3.5"]
    mix = study.Variant("gptq", budget=3.5)
    assert mix in spec.variants
    over = study.quant_overrides(spec, mix)
    assert over["bits_budget"] == 3.5 and "bits" not in over
    job = _job(spec, mix)
    assert (job.method, job.budget.budget, job.ptq.weight.group_size, job.act_bits) == \
        ("gptq", 3.5, 128, 16)
    uniform3 = _job(spec, study.Variant("gptq", 3))
    assert uniform3.budget is None and uniform3.ptq.weight.bits == 3
    m = spec.models[0]
    assert study.quant_hash(spec, m, study.Variant("rtn", budget=3.0)) != \
        study.quant_hash(spec, m, study.Variant("rtn", 3))
    assert study.cell_key(m, mix, "h", spec.tasks[0]).split("|")[1:3] == ["gptq", "wmix3.5"]


def test_study_flags_parse_from_the_command_line():
    cfg = study.apply_study_overrides(config(), [
        "--config.methods=rtn", "--config.bits=3", "--config.bits_budgets=3.0,3.5",
        "--config.wa_methods=quarot", "--config.wa_bits=4", "--config.wa_act_bits=4,8",
        "--config.act_granularities=per_token,g32", "--config.wa_rows=",
        "--config.only_tasks=arithmetic,synthetic_code"])
    spec = study.study_spec(cfg)
    assert [v.label for v in spec.variants] == [
        "fp", "rtn-w3", "rtn-wmix3", "rtn-wmix3.5", "quarot-w4a4", "quarot-w4a4-ag32",
        "quarot-w4a8", "quarot-w4a8-ag32"]
    assert [t.name for t in spec.tasks] == ["arithmetic", "synthetic_code"]


def test_table_labels_activation_groups_and_budget_rows(tmp_path):
    spec = study.StudySpec(
        models=(str(ROOT / "assets" / "tiny-llada"),), methods=("gptq",), bits=(4, 3),
        bits_budgets=(3.5,), wa_methods=("quarot",), wa_bits=(4,), wa_act_bits=(8, 4),
        act_groups=(None, 32), tasks=(BUILTIN["arithmetic"],), out_dir=str(tmp_path),
        quantize_config=str(ROOT / "configs" / "quantize.py"), progress=False)

    def make_variant(sp, model, v, fp):
        return study.Made(v.label, {"bit_plan": [4, 3, 3, 4]} if v.budget else {})

    r = study.run_study(spec, make_variant=make_variant, evaluate=lambda label, t: {
        "metric": t.metric, "value": 0.5, "higher_is_better": True, "n": 1})
    rows = [[c.strip() for c in row.split("|")[2:4]] for row in r["table"].splitlines()[3:]
            if row.startswith("| tiny")]
    assert rows == [["FP", "–"], ["GPTQ", "4"], ["GPTQ", "mix3.5 (4 3 3 4)"], ["GPTQ", "3"],
                    ["QUAROT", "W4A8"], ["QUAROT", "W4A8 ag32"], ["QUAROT", "W4A4"],
                    ["QUAROT", "W4A4 ag32"]]
    assert "`mix<B>`" in r["table"] and "`W<b>A<a> ag<g>`" in r["table"]
    recs = {(x["method"], x["bits"], x["act_bits"], x["act_group_size"]): x
            for x in r["records"]}
    assert recs["gptq", 3.5, None, None]["bit_plan"] == [4, 3, 3, 4]
    assert recs["gptq", 3.5, None, None]["bits_budget"] == 3.5
    assert recs["quarot", 4, 4, 32]["act_granularity"] == "per_group"
    assert recs["quarot", 4, 8, None]["act_granularity"] == "per_token"
    assert Path(r["plots"][0]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kw, message", [
    (dict(act_granularities=("per_token", "per_group")),
     r"^--config.act_granularities\[1\]='per_group': expected per_token or g<group size>"),
    (dict(act_granularities=("g1",)), r"^--config.act_granularities\[0\]='g1': a group"),
    (dict(act_granularities=("g32", "g32")), r"^--config.act_granularities=g32,g32: dupl"),
    (dict(act_granularities=()), r"^--config.act_granularities: expected at least one"),
    (dict(act_granularities=("g96",)),
     r"^--config.act_granularities: g96 does not divide tiny-llada's hidden_size 128"),
    (dict(wa_methods=()), r"^--config.wa_act_bits: sets the weight-activation rows"),
    (dict(wa_methods=(), wa_act_bits=()), r"^--config.act_granularities: sets the weight-"),
    (dict(wa_act_bits=("eight",)), r"^--config.wa_act_bits\[0\]='eight': expected an integ"),
    (dict(wa_act_bits=(3,)), r"^row rtn-w4a3: --config.act_bits=3"),
    (dict(wa_quantize={"group_size": -1, "act": {"granularity": "per_group"}}),
     r"^--config.wa_quantize.act.granularity: the activation granularity .* "
     r"--config.act_granularities"),
    (dict(only_tasks=("arithmetc",)), r"^--config.only_tasks: \['arithmetc'\] are not tasks"),
])
def test_bad_activation_dimension_values_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        study.study_spec(wa_config(**kw))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, message", [
    (dict(bits_budgets=("three",)), r"^--config.bits_budgets\[0\]='three': expected a mean"),
    (dict(bits_budgets=(0.0,)), r"^--config.bits_budgets\[0\]=0.0: expected a positive"),
    (dict(bits_budgets=(3.5, 3.5)), r"^--config.bits_budgets=3.5,3.5: duplicate"),
    (dict(bits_budgets=(1.5,)), r"^--config.bits_budgets=1.5 \(row rtn-wmix1.5\): .*below "
                                r"the narrowest candidate width 2"),
    (dict(methods=("rtn", "daq")), r"^--config.bits_budgets=3,3.5: mixed precision spreads "
                                   r"the widths of rtn, gptq, awq; --config.methods also has "
                                   r"daq"),
    (dict(methods=()), r"^--config.bits_budgets=3,3.5: adds mixed-precision rows"),
])
def test_bad_bit_budgets_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        study.study_spec(budget_config(**kw))
    assert "\n" not in str(e.value)
