"""Task specs from config, hashing, and the LM task on the tiny models."""

import dataclasses
import json

import numpy as np
import pytest

from qdlm_jax.evals import tasks
from qdlm_jax.inference.generate import GenerationConfig


def test_builtin_defaults_are_qdlm_settings():
    gsm = tasks.BUILTIN["gsm_symbolic"]
    assert (gsm.gen.gen_length, gsm.gen.steps, gsm.gen.block_length, gsm.num_fewshot) == \
        (256, 256, 32, 4)
    he = tasks.BUILTIN["humaneval"]
    assert (he.gen.gen_length, he.gen.steps, he.gen.block_length) == (512, 512, 32)
    assert tasks.BUILTIN["social_iqa"].mc_num == 128
    # every category has a built-in task but fidelity (it compares two models: the study's)
    assert {t.category for t in tasks.BUILTIN.values()} == set(tasks.CATEGORIES) - {"fidelity"}


def test_from_mapping_with_base_and_gen_overrides():
    spec = tasks.task_from_mapping({"base": "gsm_symbolic", "limit": 5,
                                    "gen": {"gen_length": 64, "steps": 32},
                                    "stops": ["Q:"]})
    assert spec.name == "gsm_symbolic" and spec.limit == 5 and spec.stops == ("Q:",)
    assert (spec.gen.gen_length, spec.gen.steps, spec.gen.block_length) == (64, 32, 32)
    mc = tasks.task_from_mapping({"type": "multiple_choice", "name": "mine",
                                  "path": "x.jsonl"})
    assert isinstance(mc, tasks.MCTask) and mc.mc_num == 128


@pytest.mark.parametrize("d, message", [
    ({"type": "essay", "name": "x"}, "type='essay': expected one of"),
    ({"base": "nope"}, "base='nope': unknown task"),
    ({"base": "social_iqa", "n_windows": 3}, r"unknown keys \['n_windows'\]"),
    ({"base": "arithmetic", "gen": {"stepz": 3}}, r"gen: generation config: unknown keys"),
    ({"base": "arithmetic", "gen": 3}, "gen=3: expected a mapping"),
    ({"type": "math", "name": "m"}, "missing 1 required keyword-only argument: 'source'"),
    ({"base": "social_iqa", "category": "vibes"}, "category='vibes'"),
    ({"base": "social_iqa", "mc_num": 10, "batch_size": 4}, "mc_num=10 is not divisible"),
    ({"base": "arithmetic", "limit": 0}, "task 'arithmetic': limit=0: expected a positive"),
    ({"base": "arithmetic", "extract": "all"}, "extract='all': expected one of"),
])
def test_bad_mappings(d, message):
    with pytest.raises(ValueError, match=message):
        tasks.task_from_mapping(d)


def test_task_file(tmp_path):
    p = tmp_path / "tasks.json"
    p.write_text(json.dumps([{"base": "arithmetic", "limit": 3}, "social_iqa",
                             {"type": "code", "name": "he", "limit": 1}]))
    specs = tasks.load_task_file(p)
    assert [s.name for s in specs] == ["arithmetic", "social_iqa", "he"]
    p.write_text("[{")
    with pytest.raises(ValueError, match="tasks.json: not valid JSON"):
        tasks.load_task_file(p)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.resolve_task("nope")


def test_spec_hash_tracks_settings():
    a = tasks.BUILTIN["arithmetic"]
    assert tasks.spec_hash(a) == tasks.spec_hash(dataclasses.replace(a))
    assert tasks.spec_hash(a) != tasks.spec_hash(dataclasses.replace(a, limit=7))
    assert tasks.spec_hash(a) != tasks.spec_hash(
        dataclasses.replace(a, gen=dataclasses.replace(a.gen, steps=4)))


def test_for_family_drops_the_other_familys_fields():
    from qdlm_jax.evals.backends import for_family
    g = GenerationConfig(steps=8, gen_length=8, block_length=8, alg="maskgit_plus")
    assert for_family(g, "llada").alg == GenerationConfig().alg
    assert for_family(g, "dream").block_length == GenerationConfig().block_length


def test_lm_task_on_local_text(tmp_path, tiny_llada, tiny_dream):
    docs = [f"The river number {i} flows past the old mill and the town of the valley."
            for i in range(400)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = tasks.LMTask(name="lm", source=str(src), seq_len=32, n_windows=2, mc_num=4,
                        batch_size=4)
    for tm in (tiny_llada, tiny_dream):
        r = tasks.run_task(tm, spec, progress=False)
        assert r["metric"] == "bits_per_token" and not r["higher_is_better"]
        assert np.isfinite(r["value"]) and r["value"] > 0 and r["n"] == 2
    with pytest.raises(ValueError, match=r"only \d+ windows of 32 tokens, asked for "
                                         "n_windows=5000"):
        tasks.run_task(tiny_llada, dataclasses.replace(spec, n_windows=5000))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_batched_bucketed_generation_equals_one_by_one(family, tiny_llada, tiny_dream):
    """TextModel.generate pads prompts to a bucketed width and fills the last batch up; the
    greedy completions equal those of each prompt generated alone without padding."""
    from qdlm_jax.evals.backends import for_family
    from qdlm_jax.inference.generate import generate

    tm = tiny_llada if family == "llada" else tiny_dream
    gen = GenerationConfig(steps=4, gen_length=8, block_length=8)
    prompts = ["The city of", "Question: 12+30=? Answer:", "In 1990 the band released its"]
    batched = tm.generate(prompts, gen, batch_size=2, progress=False)
    alone = []
    for p in prompts:
        ids = np.asarray([tm.prompt_ids(p)], np.int32)
        out = np.asarray(generate(tm.model, ids, None, config=for_family(gen, family)))
        alone.append(tm.decode_completion(out[0, ids.shape[1]:]))
    assert batched == alone


def test_generation_fields_added_later_keep_old_keys_at_their_defaults():
    a = tasks.BUILTIN["arithmetic"]
    assert "cache" not in tasks.spec_dict(a)["gen"] and "threshold" not in \
        tasks.spec_dict(a)["gen"]
    dual = dataclasses.replace(a, gen=dataclasses.replace(a.gen, cache="dual", threshold=0.9))
    assert tasks.spec_dict(dual)["gen"]["cache"] == "dual"
    assert tasks.spec_hash(dual) != tasks.spec_hash(a)


def test_code_task_sandbox_limits_reach_the_sandbox(monkeypatch):
    """`max_processes` / `tree_memory_mb` of a code task (config keys) bound its programs."""
    from qdlm_jax.evals import code_gen
    from qdlm_jax.evals.tasks import run_task, task_from_mapping
    seen = {}

    def fake_score(problems, gen_fn, limits, *, workers):
        seen["limits"] = limits
        return {"pass@1": 0.0, "n": len(problems)}

    monkeypatch.setattr(code_gen, "score_problems", fake_score)
    spec = task_from_mapping({"base": "synthetic_code", "limit": 2, "max_processes": 16,
                              "tree_memory_mb": 512})

    class Stub:
        def with_chat(self, setting):
            return self

        def generate_fn(self, *a, **k):
            return lambda prompts: [""] * len(prompts)

    run_task(Stub(), spec)
    assert (seen["limits"].max_processes, seen["limits"].tree_memory_bytes) == (16, 512 << 20)
    with pytest.raises(ValueError, match="max_processes=0"):
        task_from_mapping({"base": "humaneval", "max_processes": 0})


def test_fidelity_tasks_come_from_mappings_and_need_a_reference():
    from qdlm_jax.evals.tasks import FidelityTask, run_task, task_from_mapping

    spec = task_from_mapping({"type": "fidelity", "name": "kl", "n_windows": 4,
                              "source": "austen"})
    assert isinstance(spec, FidelityTask) and (spec.metric, spec.higher_is_better) == (
        "kl_bits", False)
    assert (spec.category, spec.seq_len, spec.noise_ratio) == ("fidelity", 48, 0.5)
    with pytest.raises(ValueError, match=r"noise_ratio=0.0: expected a value in \(0, 1\]"):
        task_from_mapping({"type": "fidelity", "name": "kl", "noise_ratio": 0.0})
    with pytest.raises(ValueError, match="a fidelity task compares two models; pass "
                                         "reference="):
        run_task(object(), spec)
