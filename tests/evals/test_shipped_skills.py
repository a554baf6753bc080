"""The bundled tiny models can do the synthetic tasks (issue 14), and quantization damage shows
on them.

Fast: each shipped model's fp score on a small held-out sample of each synthetic task is far
above chance. The floors sit several standard errors below the scores the model cards
report (n=400 / 200), so sampling noise on the smaller samples here does not trip them,
while a model at chance (0% exact match / pass@1, 25% on the 4-way comparisons) fails.

Slow: W2 RTN lowers 2-digit addition exact match by a clear margin while W4 GPTQ stays
within a few points of fp, on the same items: quantization quality is measured, not assumed.
"""

import dataclasses

import pytest

from qdlm_jax.evals.tasks import BUILTIN, run_task

# task -> (sample size, floor). Chance: 0 for exact match and pass@1, 0.25 for comparisons.
SAMPLES = {
    "arithmetic": (60, 0.60),
    "arithmetic_subtract": (60, 0.60),
    "synthetic_code": (40, 0.35),
    "synthetic_compare": (40, 0.55),
}


def small(name: str):
    n, _ = SAMPLES[name]
    spec = BUILTIN[name]
    extra = {"mc_num": 8, "batch_size": 8} if name == "synthetic_compare" else {}
    return dataclasses.replace(spec, limit=n, **extra)


# slow: the second family of code, subtraction and the comparisons (Monte Carlo scores of 4
# options); `make test` checks every category on at least one family, addition on both
SLOW_SKILLS = {("dream", "synthetic_compare"), ("llada", "synthetic_code"),
               ("dream", "arithmetic_subtract")}


@pytest.mark.parametrize("family,name", [
    pytest.param(f, n, marks=[pytest.mark.slow] if (f, n) in SLOW_SKILLS else [])
    for n in sorted(SAMPLES) for f in ("llada", "dream")])
def test_shipped_model_scores_far_above_chance(name, family, tiny_llada, tiny_dream):
    tm = tiny_llada if family == "llada" else tiny_dream
    r = run_task(tm, small(name), progress=False)
    n, floor = SAMPLES[name]
    assert r["n"] == n
    assert r["value"] >= floor, (name, family, r["value"], r.get("examples", [])[:3])


@pytest.mark.slow
def test_w2_rtn_breaks_arithmetic_while_w4_gptq_keeps_it(tiny_llada):
    from qdlm_jax.evals.backends import TextModel
    from qdlm_jax.jobs.config_flags import PROJECT_ROOT, apply_overrides, load_config_file
    from qdlm_jax.jobs.quantize import quantize_from_config

    spec = dataclasses.replace(BUILTIN["arithmetic"], limit=100)
    fp = run_task(tiny_llada, spec, progress=False)["value"]
    scores = {}
    for method, bits in (("rtn", 2), ("gptq", 4)):
        cfg = apply_overrides(load_config_file(PROJECT_ROOT / "configs" / "quantize.py"), [
            f"--config.model={PROJECT_ROOT / 'assets' / 'tiny-llada'}",
            f"--config.method={method}", f"--config.bits={bits}", "--config.group_size=128"])
        qmodel, _ = quantize_from_config(cfg, model=tiny_llada.model)
        scores[method] = run_task(TextModel(qmodel, tiny_llada.tokenizer), spec,
                                  progress=False)["value"]
    assert fp >= 0.8
    assert scores["gptq"] >= fp - 0.08, (fp, scores)
    assert scores["rtn"] <= fp - 0.25, (fp, scores)
