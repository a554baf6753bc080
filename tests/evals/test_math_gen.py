"""Math generation: answer extraction on tricky strings, sources, stub and tiny-model runs."""

import dataclasses
import json

import pytest

from qdlm_jax.evals import math_gen
from qdlm_jax.evals.math_gen import extract_answer
from qdlm_jax.evals.tasks import BUILTIN, MathTask, run_task


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.", "1234"),
    ("#### 1,234", "1234"),
    ("so she has 5 apples and 3 pears\n#### 8\nQuestion: 2 more", "8"),
    ("It drops to -7 degrees", "-7"),
    ("5-3=2", "2"),  # a minus between digits is not a sign
    ("costs $12.50 in total", "12.5"),
    ("about 12.", "12"),  # trailing period
    ("3.0 cups", "3"),
    ("first 4, then 5, then 60", "60"),
    ("no number here", None),
    ("", None),
    ("the total is 10 ####", "10"),  # a marker with no number after it: last number
    ("#### 9, since 10 - 1", "9"),  # the first number after the marker
    ("1,2,3", "3"),  # not a grouped number: three numbers
    ("12,345,678 people", "12345678"),
    ("-0", "0"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_first_mode():
    assert extract_answer(" 46 Question: 1+2", "first") == "46"
    assert extract_answer(" 46 and 47", "first") == "46"
    with pytest.raises(ValueError, match="extract='middle'"):
        extract_answer("1", "middle")


def test_gsm8k_file_and_fewshot(tmp_path):
    p = tmp_path / "gsm.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"}
            for i in (1, 600, 3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shots, items = math_gen.load_problems(str(p), limit=None, num_fewshot=1, seed=0)
    assert [it.answer for it in items] == ["1200", "6"]
    assert shots[0].shot == "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\n"
    assert items[0].query == "Question: What is 600 + 600?\nAnswer:"


def test_gsm8k_bad_line(tmp_path):
    p = tmp_path / "gsm.jsonl"
    p.write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q", "answer": "none"}\n')
    with pytest.raises(ValueError, match=r"gsm.jsonl:2: answer 'none'"):
        math_gen.read_gsm8k_jsonl(p)
    p.write_text('{"question": "q"\n')
    with pytest.raises(ValueError, match=r"gsm.jsonl:1: not valid JSON"):
        math_gen.read_gsm8k_jsonl(p)


def test_stub_generation_known_accuracy():
    shots, items = math_gen.load_problems("arithmetic", limit=6, num_fewshot=2, seed=0)
    prompts_seen = []

    def stub(prompts):  # right on even items, wrong on odd ones
        prompts_seen.extend(prompts)
        return [f" {it.answer}\nQuestion: 9+9" if i % 2 == 0 else " 1000000"
                for i, it in enumerate(items)]

    r = math_gen.score_problems(shots, items, stub, extract="first")
    assert r["exact_match"] == 0.5 and r["n"] == 6
    assert all(p.startswith(shots[0].shot + shots[1].shot) for p in prompts_seen)
    assert prompts_seen[0].endswith(items[0].query)


def test_gsm_symbolic_from_reasoning_gym():
    shots, items = math_gen.load_problems("gsm_symbolic", limit=3, num_fewshot=1, seed=0)
    assert len(items) == 3 and len(shots) == 1
    assert "####" in shots[0].shot and items[0].query.startswith("Question: ")
    assert all(math_gen.canonical_number(it.answer) == it.answer for it in items)
    again = math_gen.load_problems("gsm_symbolic", limit=3, num_fewshot=1, seed=0)[1]
    assert again == items  # seeded


def test_tiny_model_end_to_end(tiny_llada, tiny_dream):
    spec = dataclasses.replace(BUILTIN["arithmetic"], limit=3)
    for tm in (tiny_llada, tiny_dream):
        r = run_task(tm, spec, progress=False)
        assert r["metric"] == "exact_match" and r["n"] == 3
        assert r["value"] in (0.0, 1 / 3, 2 / 3, 1.0)
        assert all(isinstance(e["completion"], str) for e in r["examples"])


def test_unknown_source_is_a_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        run_task(None, MathTask(name="m", source="nope.jsonl"))
