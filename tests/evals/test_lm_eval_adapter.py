"""The lm-eval model `qdlm-jax` on local-JSON tasks (offline)."""

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")  # in the test extra; skipped only without it

from qdlm_jax.evals.lm_eval_adapter import QDLMJaxLM  # noqa: E402

ROWS = [{"query": "Question: 12+34=? Answer:", "choices": ["46", "47"], "gold": 0},
        {"query": "Question: 21+13=? Answer:", "choices": ["35", "34"], "gold": 1}]


def write_tasks(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\ndoc_to_text: \"{{query}}\"\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{gold}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\n"
        "doc_to_target: \"{{choices[gold]}}\"\n"
        "generation_kwargs:\n  until: [\"Question:\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    return tmp_path


class StubTextModel:
    """Prefers the gold option; generates the gold answer then a stop string."""

    def __init__(self):
        self.keys = {}
        self.gens = []

    def loglik(self, context, continuation, key, **kw):
        self.keys.setdefault(context, set()).add(str(key))
        gold = {r["query"]: r["choices"][r["gold"]] for r in ROWS}[context]
        return 0.0 if continuation.strip() == gold else -5.0

    def generate(self, prompts, gen, *, stops, **kw):
        self.gens.append((gen, tuple(stops)))
        gold = {r["query"]: r["choices"][r["gold"]] for r in ROWS}
        from qdlm_jax.evals.backends import cut_at_stops
        return [cut_at_stops(f" {gold[p]}\nQuestion: 1+1=?", stops).strip() for p in prompts]


def evaluate(lm, tmp_path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager
    r = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen"],
                                task_manager=TaskManager(include_path=str(write_tasks(tmp_path)),
                                                         include_defaults=False),
                                log_samples=False)
    return r["results"]


def test_stub_through_lm_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    stub = StubTextModel()
    lm = QDLMJaxLM(text_model=stub, gen_length=16, steps=16, block_length=8, progress=False)
    res = evaluate(lm, tmp_path)
    assert res["tiny_mc"]["acc,none"] == 1.0
    assert res["tiny_gen"]["exact_match,none"] == 1.0
    assert all(len(k) == 1 for k in stub.keys.values())  # options share the noise key
    gen, stops = stub.gens[0]
    assert stops == ("Question:",) and gen.gen_length == 8 and gen.block_length == 8


def test_gen_config_rounding():
    lm = QDLMJaxLM(text_model=object(), gen_length=256, steps=128, block_length=32)
    g = lm.gen_config({"max_gen_toks": 40})
    assert (g.gen_length, g.block_length, g.steps) == (64, 32, 32)
    g = lm.gen_config({"max_gen_toks": 10, "do_sample": True, "temperature": 0.5})
    assert (g.gen_length, g.block_length, g.steps, g.temperature) == (10, 10, 5, 0.5)
    assert lm.gen_config({}).gen_length == 256


def test_fast_dllm_model_args():
    """Fast-dLLM's eval argument names (as lm-eval passes them from model_args strings)."""
    def gen(**kw):
        return QDLMJaxLM(text_model=object(), **kw).gen_config({})
    assert (gen().cache, gen().threshold, gen().factor) == ("none", None, None)
    assert gen(use_cache="true").cache == "prefix"
    g = gen(use_cache=True, dual_cache=True, threshold="0.9")
    assert (g.cache, g.threshold) == ("dual", 0.9)
    assert gen(factor=1.0, threshold="None").factor == 1.0
    with pytest.raises(ValueError, match="dual_cache=true needs use_cache=true"):
        gen(dual_cache=True)
    with pytest.raises(ValueError, match="threshold='high'"):
        gen(threshold="high")
    with pytest.raises(ValueError, match="set one of them"):
        gen(threshold=0.9, factor=1.0)


def test_registered_and_needs_a_model():
    from lm_eval.api.registry import get_model
    assert get_model("qdlm-jax") is QDLMJaxLM
    with pytest.raises(ValueError, match="pretrained=PATH"):
        QDLMJaxLM()


@pytest.mark.slow
def test_tiny_model_through_lm_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    lm = QDLMJaxLM(pretrained=str(root / "assets" / "tiny-llada"), mc_num=8, mc_batch_size=8,
                   gen_length=8, steps=8, block_length=8, progress=False)
    res = evaluate(lm, tmp_path)
    assert 0.0 <= res["tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["tiny_gen"]["exact_match,none"] <= 1.0
