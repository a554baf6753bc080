"""Multiple choice by Monte Carlo likelihood per option.

For item (context c, options o_1..o_K, gold g), every option is scored with the same Monte
Carlo key (`backends.context_key(seed, prompt)`), so the options share their noise draws:

    ll_k = LoglikFn(prompt(c), " " + o_k)      (a lower bound on log p(o_k | c))
    pred = argmax_k ll_k                         acc      = mean [pred == g]
    pred_norm = argmax_k ll_k / bytes(o_k)       acc_norm = mean [pred_norm == g]

(`acc_norm` is lm-eval's length normalisation by the UTF-8 byte length of the option.)
Ties go to the lower index. Prompts lose trailing spaces (the option carries the separating
space, as in lm-eval's `target_delimiter`).

Accepted files (`read_items`):

- lm-eval style JSONL, one object per line, with one field of each group:
  context: `query` | `context` | `ctx` | `question` | `input` | `prompt`
  options: `choices` | `endings` | `options` (a list of strings), or BIG-bench style
           `target_scores` ({option: score}, gold = the highest score)
  gold:    `gold` | `label` | `answer` | `target`: an int index; or a string, read as the
           text of an option if it equals one, else as an index if it is a digit string,
           else as a letter `A`.. (at most 26 options).
  (e.g. `{"query": ..., "choices": [...], "gold": 1}` or HellaSwag's
  `{"ctx": ..., "endings": [...], "label": "2"}`).
- BIG-bench `task.json`: `examples[*].input` and `examples[*].target_scores`, formatted
  the way BIG-bench's JSON tasks format them: task_prefix + example_input_prefix (default
  "\\nQ: ") + input [+ choice_prefix (default "\\n  choice: ") + each option, if
  append_choices_to_input (default true)] + example_output_prefix (default "\\nA: ").
- `bigbench:<task>` (e.g. `bigbench:social_iqa`): that BIG-bench task from the offline
  BIG-bench sdist (`data.sources.fetch_bigbench_task`).
- `synthetic:compare`: SYNTHETIC_N distinct held-out items of `data.synthetic`'s
  comparison task (which of four 2-digit numbers is the largest / smallest).

Few-shot: the first `num_fewshot` items are used as solved examples (prompt + gold option,
separated by blank lines) in front of every other item and are not scored.
"""

from __future__ import annotations

import dataclasses
import json
import string
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from qdlm_jax.evals.backends import LoglikFn, context_key
from qdlm_jax.evals.files import jsonl_records

CONTEXT_FIELDS = ("query", "context", "ctx", "question", "input", "prompt")
CHOICE_FIELDS = ("choices", "endings", "options")
GOLD_FIELDS = ("gold", "label", "answer", "target")
BIGBENCH_PREFIX = "bigbench:"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_TASKS = ("compare",)
SYNTHETIC_N = 400


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One question: `prompt` (the text scored against), `choices`, `gold` index."""

    prompt: str
    choices: tuple[str, ...]
    gold: int


def _where(path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _gold_index(value, choices: Sequence[str], where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: gold={value!r}: expected an option index, letter or text")
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and value in choices:
        return list(choices).index(value)
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    elif (isinstance(value, str) and len(value.strip()) == 1 and value.strip().isupper()
          and len(choices) <= 26):
        idx = string.ascii_uppercase.index(value.strip())
    else:
        raise ValueError(f"{where}: gold={value!r}: expected an index in 0..{len(choices) - 1}, "
                         f"a letter or the text of one of {len(choices)} choices")
    if not 0 <= idx < len(choices):
        raise ValueError(f"{where}: gold={value!r}: expected an index in 0..{len(choices) - 1}")
    return idx


def _from_target_scores(scores, where: str) -> tuple[tuple[str, ...], int]:
    if not isinstance(scores, dict) or len(scores) < 2:
        raise ValueError(f"{where}: target_scores: expected an object of >= 2 "
                         f"{{option: score}} pairs, got {scores!r:.80}")
    choices = tuple(str(k) for k in scores)
    values = [float(v) for v in scores.values()]
    return choices, int(np.argmax(values))


def item_from_record(rec: dict, where: str) -> MCItem:
    """One lm-eval-style JSON object -> MCItem (see the module docstring for the schemas)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    ctx_key = next((k for k in CONTEXT_FIELDS if k in rec), None)
    if ctx_key is None or not isinstance(rec[ctx_key], str):
        raise ValueError(f"{where}: no context field: expected a string in one of "
                         f"{list(CONTEXT_FIELDS)}; keys are {sorted(rec)}")
    if "target_scores" in rec and not any(k in rec for k in CHOICE_FIELDS):
        choices, gold = _from_target_scores(rec["target_scores"], where)
        return MCItem(rec[ctx_key].rstrip(" "), choices, gold)
    ch_key = next((k for k in CHOICE_FIELDS if k in rec), None)
    if ch_key is None:
        raise ValueError(f"{where}: no choices field: expected a list in one of "
                         f"{list(CHOICE_FIELDS)} (or target_scores); keys are {sorted(rec)}")
    choices = rec[ch_key]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: {ch_key}: expected a list of >= 2 strings, "
                         f"got {choices!r:.80}")
    gold_key = next((k for k in GOLD_FIELDS if k in rec), None)
    if gold_key is None:
        raise ValueError(f"{where}: no gold field: expected one of {list(GOLD_FIELDS)}; "
                         f"keys are {sorted(rec)}")
    return MCItem(rec[ctx_key].rstrip(" "), tuple(choices),
                  _gold_index(rec[gold_key], choices, where))


def read_jsonl_items(path) -> list[MCItem]:
    """lm-eval-style JSONL -> items; a bad line raises ValueError naming file and line."""
    return [item_from_record(rec, where)
            for where, rec in jsonl_records(path, "lm-eval-style multiple-choice JSONL")]


def bigbench_items(task: dict, where: str) -> list[MCItem]:
    """BIG-bench task.json dict -> items, with BIG-bench's JSON-task prompt format."""
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise ValueError(f"{where}: expected a BIG-bench task object with an 'examples' list")
    task_prefix = task.get("task_prefix", "")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append = task.get("append_choices_to_input", True)
    items = []
    for i, ex in enumerate(task["examples"]):
        w = f"{where}: examples[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise ValueError(f"{w}: expected an object with a string 'input'")
        if "target_scores" not in ex:
            raise ValueError(f"{w}: no 'target_scores' (not a multiple-choice example)")
        choices, gold = _from_target_scores(ex["target_scores"], w)
        prompt = task_prefix + in_prefix + ex["input"]
        if append:
            prompt += "".join(choice_prefix + c for c in choices)
        prompt = (prompt + out_prefix).strip()
        items.append(MCItem(prompt, choices, gold))
    if not items:
        raise ValueError(f"{where}: no examples")
    return items


def read_items(path: str, fmt: str = "auto") -> list[MCItem]:
    """Items from `bigbench:<task>`, `synthetic:compare`, a BIG-bench task.json or an
    lm-eval-style JSONL file."""
    if path.startswith(SYNTHETIC_PREFIX):
        return synthetic_items(path[len(SYNTHETIC_PREFIX):])
    if path.startswith(BIGBENCH_PREFIX):
        from qdlm_jax.data.sources import fetch_bigbench_task
        name = path[len(BIGBENCH_PREFIX):]
        return bigbench_items(fetch_bigbench_task(name), path)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a .jsonl file, a BIG-bench "
                                "task.json or bigbench:<task>)")
    if fmt == "auto":
        fmt = "bigbench" if p.suffix == ".json" else "jsonl"
    if fmt == "bigbench":
        try:
            task = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return bigbench_items(task, path)
    if fmt == "jsonl":
        return read_jsonl_items(p)
    raise ValueError(f"format={fmt!r}: expected 'auto', 'jsonl' or 'bigbench'")


def synthetic_items(name: str, n: int = SYNTHETIC_N, seed: int = 0) -> list[MCItem]:
    """Held-out items of a `data.synthetic` multiple-choice task (distinct, seeded)."""
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"{SYNTHETIC_PREFIX}{name}: unknown synthetic task; expected one of "
                         f"{[SYNTHETIC_PREFIX + t for t in SYNTHETIC_TASKS]}")
    from qdlm_jax.data import synthetic
    return [MCItem(it.prompt, it.choices, it.gold)
            for it in synthetic.compare_items(n, seed=seed, split="heldout", unique=True)]


def fewshot_split(items: Sequence[MCItem], k: int) -> tuple[str, list[MCItem]]:
    """(few-shot preamble from the first k items, the items to score)."""
    if k < 0 or k >= len(items):
        raise ValueError(f"num_fewshot={k}: expected 0 <= k < {len(items)} (the item count)")
    shots = "".join(f"{it.prompt} {it.choices[it.gold]}\n\n" for it in items[:k])
    return shots, list(items[k:])


def score_items(items: Sequence[MCItem], loglik: LoglikFn, *, seed: int = 0,
                preamble: str = "", progress: bool = True, desc: str = "mc") -> dict:
    """Accuracy of argmax-likelihood choices (see the module docstring for the formulas)."""
    t0 = time.time()
    correct = correct_norm = 0
    examples = []
    for it in tqdm(items, desc=f"{desc} (items; each option scored by Monte Carlo)",
                   unit="item", disable=not progress):
        prompt = preamble + it.prompt
        key = context_key(seed, prompt)
        lls = np.asarray([loglik(prompt, " " + c, key) for c in it.choices], np.float64)
        norm = lls / np.asarray([max(1, len((" " + c).encode("utf-8"))) for c in it.choices])
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(norm))
        correct += pred == it.gold
        correct_norm += pred_norm == it.gold
        if len(examples) < 5:
            examples.append({"prompt": it.prompt[-200:], "choices": list(it.choices),
                             "gold": it.gold, "pred": pred, "loglik": lls.round(4).tolist()})
    n = len(items)
    chance = float(np.mean([1.0 / len(it.choices) for it in items])) if n else 0.0
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n, "chance": chance,
            "time_s": time.time() - t0, "examples": examples}
