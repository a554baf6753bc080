"""Math word problems by generation: few-shot prompt -> denoising loop -> answer extraction
-> exact match.

Sources (`load_problems`):

- `arithmetic`: the project's seeded arithmetic set (held-out problems of
  `data.arithmetic`; few-shot examples from its train split), prompt
  `Question: 47+38=? Answer:`.
- `gsm_symbolic`: GSM8K-style problems generated at run time by the `reasoning-gym`
  package's GSM-Symbolic generators (seeded; never stored in the repository). Few-shot
  examples come from a second seed, with their `#### N` chain of thought.
- a GSM8K-format JSONL file: `{"question": ..., "answer": "... #### 72"}` per line (the
  answer may also be a bare number). Few-shot examples are its first `num_fewshot` lines,
  which are then not scored.

GSM-style prompts follow lm-eval's gsm8k: each shot is `Question: q\\nAnswer: cot\\n\\n`, the
query is `Question: q\\nAnswer:`; generation is cut at the stop strings (default
`Question:`, blank line).

Answer extraction (`extract_answer`): a number is `-?$?D(.d+)?` where D is digits or
comma-grouped digits (`1,234`); the minus sign counts only when not preceded by a letter,
digit or dot (so `5-3` reads 5 and 3). If the text has `####`, the first number after it
is the answer; otherwise the last (or, with mode="first", the first) number in the text.
Numbers are compared in canonical form: commas and `$` dropped, trailing zeros of a
fraction dropped (`3.50` -> `3.5`, `12.0` -> `12`); a trailing period is not part of a
number. No number -> None (counted wrong).
"""

from __future__ import annotations

import dataclasses
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Sequence

from qdlm_jax.evals.backends import GenerateFn
from qdlm_jax.evals.files import jsonl_records

_NUM_RE = re.compile(r"((?<![\w.])-)?\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
MARKER = "####"


@dataclasses.dataclass(frozen=True)
class MathItem:
    """`query`: the prompt of this problem; `shot`: the problem solved (for few-shot
    preambles); `answer`: the gold number in canonical form."""

    query: str
    shot: str
    answer: str


def canonical_number(text: str) -> str | None:
    """`-1,234.50` -> `-1234.5`; None if `text` is not a number."""
    t = text.replace(",", "").replace("$", "").strip()
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    s = format(d.normalize(), "f")
    return "0" if s in ("-0", "0") else s


def _numbers(text: str) -> list[str]:
    return [canonical_number("".join(g or "" for g in m.groups()).replace("$", ""))
            for m in _NUM_RE.finditer(text)]


def extract_answer(text: str, mode: str = "last") -> str | None:
    """The answer number of a completion in canonical form (see the module docstring)."""
    if mode not in ("last", "first"):
        raise ValueError(f"extract={mode!r}: expected 'last' or 'first'")
    if MARKER in text:
        after = _numbers(text.split(MARKER, 1)[1])
        if after:
            return after[0]
    nums = _numbers(text)
    if not nums:
        return None
    return nums[-1] if mode == "last" else nums[0]


def gsm_item(question: str, solution: str, answer: str) -> MathItem:
    gold = canonical_number(answer)
    if gold is None:
        raise ValueError(f"answer {answer!r} is not a number")
    return MathItem(query=f"Question: {question}\nAnswer:",
                    shot=f"Question: {question}\nAnswer: {solution}\n\n", answer=gold)


def read_gsm8k_jsonl(path) -> list[MathItem]:
    """GSM8K-format JSONL -> items; a bad line raises ValueError naming file and line."""
    items = []
    for where, rec in jsonl_records(path, "GSM8K-format JSONL"):
        if (not isinstance(rec, dict) or not isinstance(rec.get("question"), str)
                or not isinstance(rec.get("answer"), (str, int, float))):
            raise ValueError(f"{where}: expected an object with string 'question' and "
                             "'answer' (GSM8K format: '... #### N')")
        sol = str(rec["answer"])
        ans = extract_answer(sol) if MARKER in sol else canonical_number(sol)
        if ans is None:
            raise ValueError(f"{where}: answer {sol[-40:]!r}: expected '#### N' or a number")
        items.append(gsm_item(rec["question"], sol, ans))
    return items


def arithmetic_items(n: int, *, split: str, seed: int, digits=(2,), ops=("+",)) -> list[MathItem]:
    from qdlm_jax.data import arithmetic
    spec = arithmetic.ArithmeticSpec(digits=tuple(digits), ops=tuple(ops))
    probs = arithmetic.generate_problems(n, seed=seed, split=split, spec=spec,
                                         unique=split == "heldout")
    return [MathItem(query=p.prompt, shot=p.text + "\n", answer=str(p.answer)) for p in probs]


def gsm_symbolic_items(n: int, *, seed: int) -> list[MathItem]:
    """`n` GSM-Symbolic problems from reasoning-gym (`create_dataset('gsm_symbolic')`)."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ValueError(f"source 'gsm_symbolic' needs the reasoning-gym package ({e}); "
                         "install it with `pip install reasoning-gym==0.1.25` (it is in the "
                         "`test` extra) or use a GSM8K-format JSONL file") from None
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [gsm_item(x["question"], x["metadata"]["answer_cot"], str(x["answer"]))
            for x in ds]


def load_problems(source: str, *, limit: int | None, num_fewshot: int, seed: int,
                  digits=(2,), ops=("+",)) -> tuple[list[MathItem], list[MathItem]]:
    """(few-shot examples, problems to score) of `source` (see the module docstring)."""
    if source == "arithmetic":
        n = 100 if limit is None else limit
        return (arithmetic_items(num_fewshot, split="train", seed=seed + 1, digits=digits,
                                 ops=ops),
                arithmetic_items(n, split="heldout", seed=seed, digits=digits, ops=ops))
    if source == "gsm_symbolic":
        n = 100 if limit is None else limit
        shots = gsm_symbolic_items(num_fewshot, seed=seed + 10_000) if num_fewshot else []
        return shots, gsm_symbolic_items(n, seed=seed)
    items = read_gsm8k_jsonl(source)
    if num_fewshot >= len(items):
        raise ValueError(f"{source}: num_fewshot={num_fewshot} leaves no item to score "
                         f"({len(items)} items)")
    rest = items[num_fewshot:]
    return items[:num_fewshot], rest if limit is None else rest[:limit]


def chat_turns(shots: Sequence[MathItem], query: str) -> list[dict]:
    """The few-shot examples as earlier turns of a chat (each shot's question a user turn,
    its worked answer the assistant's), then the query as the last user turn."""
    turns = []
    for s in shots:
        answer = s.shot[len(s.query):] if s.shot.startswith(s.query) else s.shot
        turns += [{"role": "user", "content": s.query},
                  {"role": "assistant", "content": answer.strip()}]
    return turns + [{"role": "user", "content": query}]


def score_problems(shots: Sequence[MathItem], items: Sequence[MathItem],
                   generate_fn: GenerateFn, *, extract: str = "last",
                   multiturn: bool = False) -> dict:
    """Exact match of extracted answers: mean [extract(completion) == gold]. The few-shot
    examples precede each query as text, or as earlier chat turns when `multiturn`."""
    t0 = time.time()
    preamble = "".join(s.shot for s in shots)
    prompts = ([chat_turns(shots, it.query) for it in items] if multiturn
               else [preamble + it.query for it in items])
    completions = generate_fn(prompts)
    correct, examples = 0, []
    for it, text in zip(items, completions):
        got = extract_answer(text, extract)
        correct += got == it.answer
        if len(examples) < 5:
            examples.append({"query": it.query[-200:], "completion": text[:300],
                             "extracted": got, "answer": it.answer})
    n = len(items)
    return {"exact_match": correct / n, "n": n, "time_s": time.time() - t0,
            "examples": examples}
