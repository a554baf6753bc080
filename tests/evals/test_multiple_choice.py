"""Multiple choice: file formats, scoring with a stub likelihood, the tiny model end to end."""

import json

import jax
import numpy as np
import pytest

from qdlm_jax.evals import multiple_choice as mc
from qdlm_jax.evals.tasks import MCTask, run_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_schemas(tmp_path):
    rows = [
        {"query": "Q1?", "choices": ["a", "b", "c"], "gold": 2},
        {"ctx": "A man ", "endings": ["runs", "sits"], "label": "1"},
        {"question": "Q3?", "options": ["x", "y"], "answer": "B"},
        {"context": "Q4?", "choices": ["yes", "no"], "answer": "no"},
        {"input": "Q5?", "target_scores": {"p": 0, "q": 1, "r": 0}},
        {"query": "Q6?", "choices": ["10", "2", "7"], "gold": "7"},  # text beats index
    ]
    items = mc.read_items(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert [it.gold for it in items] == [2, 1, 1, 1, 1, 2]
    assert items[1].prompt == "A man"  # trailing space moves to the option
    assert items[4].choices == ("p", "q", "r")


def test_bigbench_format(tmp_path):
    task = {"task_prefix": "Answer.\n", "examples": [
        {"input": "Is water wet?", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "2+2?", "target_scores": {"3": 0, "4": 1}}]}
    p = tmp_path / "task.json"
    p.write_text(json.dumps(task))
    items = mc.read_items(str(p))
    assert items[0].prompt == "Answer.\n\nQ: Is water wet?\n  choice: Yes\n  choice: No\nA:"
    assert [it.gold for it in items] == [0, 1]
    task["append_choices_to_input"] = False
    p.write_text(json.dumps(task))
    assert mc.read_items(str(p))[1].prompt == "Answer.\n\nQ: 2+2?\nA:"


@pytest.mark.parametrize("line, expected", [
    ('{"query": "q", "choices": ["a", "b"], "gold": 1', "t.jsonl:2: not valid JSON"),
    ('{"query": "q", "gold": 0}', "t.jsonl:2: no choices field"),
    ('{"choices": ["a", "b"], "gold": 0}', "t.jsonl:2: no context field"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 5}', "t.jsonl:2: gold=5"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', "t.jsonl:2: choices: expected a list of >= 2"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, expected):
    p = tmp_path / "t.jsonl"
    p.write_text('{"query": "ok", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        mc.read_items(str(p))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        mc.read_items("nope.jsonl")


def test_stub_likelihood_known_accuracy():
    # The stub prefers the shortest option: accuracy is the share of items whose gold option
    # is the shortest one.
    items = [mc.MCItem("q1", ("aa", "a", "aaa"), 1), mc.MCItem("q2", ("bbb", "b"), 1),
             mc.MCItem("q3", ("c", "cccc"), 1), mc.MCItem("q4", ("dd", "d"), 0)]
    r = mc.score_items(items, lambda c, x, key: -float(len(x)), progress=False)
    assert r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 4)  # 1/options
    assert r["acc"] == 0.5 and r["n"] == 4
    gold_only = [it for it in items if len(it.choices[it.gold]) == min(map(len, it.choices))]
    assert mc.score_items(gold_only, lambda c, x, key: -float(len(x)),
                          progress=False)["acc"] == 1.0


def test_options_share_the_noise_key():
    seen = {}

    def stub(context, continuation, key):
        seen.setdefault(context, set()).add(tuple(np.asarray(jax.random.key_data(key))))
        return 0.0

    items = [mc.MCItem("q1", ("a", "b", "c"), 0), mc.MCItem("q2", ("a", "b"), 0)]
    mc.score_items(items, stub, seed=3, progress=False)
    assert all(len(keys) == 1 for keys in seen.values())  # one key per context
    assert seen["q1"] != seen["q2"]


def test_fewshot_preamble():
    items = [mc.MCItem(f"q{i}", ("x", "y"), i % 2) for i in range(4)]
    pre, rest = mc.fewshot_split(items, 2)
    assert pre == "q0 x\n\nq1 y\n\n" and [it.prompt for it in rest] == ["q2", "q3"]
    with pytest.raises(ValueError, match="num_fewshot=4"):
        mc.fewshot_split(items, 4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tiny_model_end_to_end(tmp_path, request, family):
    tm = request.getfixturevalue(f"tiny_{family}")
    # Options of equal token length share one compiled Monte Carlo loop.
    rows = [{"query": "Question: 12+34=? Answer:", "choices": ["46", "47"], "gold": 0},
            {"query": "Question: 21+13=? Answer:", "choices": ["35", "34"], "gold": 1}]
    spec = MCTask(name="tiny", path=str(write_jsonl(tmp_path / "t.jsonl", rows)), mc_num=8,
                  batch_size=8)
    r = run_task(tm, spec, progress=False)
    assert r["metric"] == "acc" and r["n"] == 2 and r["value"] in (0.0, 0.5, 1.0)
    assert all(np.isfinite(e["loglik"]).all() for e in r["examples"])
    assert r == run_task(tm, spec, progress=False) | {"time_s": r["time_s"]}  # seeded
