"""Synthetic tasks a tiny dLLM can learn on 2 CPU cores, one per evaluation category.

* math: the arithmetic problems of :mod:`qdlm_jax.data.arithmetic`: 2-digit addition, and
  the harder splits, 2-digit subtraction with a non-negative result
  (``Question: 83-47=? Answer: 36``) and 3-digit addition (``Question: 347+582=? Answer: 929``).
* code (:class:`CodeProblem`): a short spec drawn from a grammar of integer operations, to be
  completed as the one-line body of a Python function::

      def f(x):
          "add 3, then multiply by 2"
          return (x + 3) * 2

  The prompt ends with ``return``; the completion is `` (x + 3) * 2``. Ops are ``add K``
  (K in 1..19), ``subtract K`` (1..19), ``multiply by K`` (2..9), ``modulo K`` (2..9), 1 to 3
  of them applied left to right; the reference expression parenthesises every earlier step
  (``((x + 3) * 2) % 5``). Hidden tests (:meth:`CodeProblem.test`) check ``f`` on
  :data:`CODE_TEST_INPUTS`; any function equal on those inputs passes.
* multiple choice (:class:`CompareItem`): which of four distinct 2-digit numbers is the
  largest (or smallest): ``Question: Which is the largest: 47, 83, 12, 55? Answer:`` with
  options ``47``, ``83``, ``12``, ``55`` (chance 25%).

Train / held-out separation is a property of the item (as in `arithmetic`): an item is held
out iff a salted hash of its canonical key (:attr:`CodeProblem.key`, :attr:`CompareItem.key`)
falls below the held-out fraction, so no training draw with any seed contains a held-out
item. For comparisons the key is the kind and the *set* of numbers, so a held-out item is
not seen in training in another order either.

:func:`sft_rows` turns (prompt, answer) pairs into LLaDA-SFT rows: ``[BOS] prompt`` (never
masked) then an answer field of fixed length (the answer's tokens, then EOS padding, as in
LLaDA's SFT data), right-padded with PAD that attention does not see. :func:`canvas_rows`
turns them into a block-diffusion model's rows: the prompt for the encoder, the answer on the
canvas.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from qdlm_jax.data import arithmetic

__all__ = [
    "CODE_OPS",
    "CODE_TEST_INPUTS",
    "TASKS",
    "CanvasRows",
    "CodeProblem",
    "CompareItem",
    "SftRows",
    "canvas_rows",
    "check_code_answer",
    "code_problems",
    "compare_items",
    "heldout_hash",
    "sft_rows",
    "task_pairs",
]

Split = Literal["train", "heldout"]
HELDOUT_FRACTION = 0.1
SALT = "qdlm-synth-v1"

# name -> (python operator, constant range)
CODE_OPS: dict[str, tuple[str, tuple[int, int]]] = {
    "add": ("+", (1, 19)),
    "subtract": ("-", (1, 19)),
    "multiply by": ("*", (2, 9)),
    "modulo": ("%", (2, 9)),
}
CODE_TEST_INPUTS: tuple[int, ...] = (-7, -2, 0, 1, 3, 4, 10, 23, 58)


def heldout_hash(key: str, fraction: float = HELDOUT_FRACTION, salt: str = SALT) -> bool:
    """Whether an item with canonical `key` is held out (depends on the key and salt only)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r}: expected a value in (0, 1)")
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


# ---------------------------------------------------------------------------------- code


@dataclasses.dataclass(frozen=True)
class CodeProblem:
    """`ops`: ((op name, constant), ...) applied to x left to right."""

    ops: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not self.ops:
            raise ValueError("CodeProblem.ops: expected at least one operation")
        for name, k in self.ops:
            if name not in CODE_OPS:
                raise ValueError(f"CodeProblem op {name!r}: expected one of {list(CODE_OPS)}")
            lo, hi = CODE_OPS[name][1]
            if not lo <= k <= hi:
                raise ValueError(f"CodeProblem op {name!r} {k}: expected {lo}..{hi}")

    @property
    def key(self) -> str:
        return ";".join(f"{n} {k}" for n, k in self.ops)

    @property
    def spec(self) -> str:
        return ", then ".join(f"{n} {k}" for n, k in self.ops)

    @property
    def expression(self) -> str:
        e = "x"
        for i, (name, k) in enumerate(self.ops):
            e = f"{e} {CODE_OPS[name][0]} {k}" if i == 0 else f"({e}) {CODE_OPS[name][0]} {k}"
        return e

    @property
    def prompt(self) -> str:
        return f'def f(x):\n    "{self.spec}"\n    return'

    @property
    def completion(self) -> str:
        return f" {self.expression}"

    @property
    def task_id(self) -> str:
        return f"synthetic_code/{self.key}"

    def value(self, x: int) -> int:
        for name, k in self.ops:
            op = CODE_OPS[name][0]
            x = x + k if op == "+" else x - k if op == "-" else x * k if op == "*" else x % k
        return x

    @property
    def test(self) -> str:
        """HumanEval-style hidden test: `check(f)` asserts f on CODE_TEST_INPUTS."""
        lines = ["def check(candidate):"]
        lines += [f"    assert candidate({x}) == {self.value(x)}" for x in CODE_TEST_INPUTS]
        return "\n".join(lines) + "\n"

    def program(self, completion: str) -> str:
        """The test program of a completion (the layout of `evals.code_gen.program`)."""
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck(f)\n"


def _draw_code(rng: random.Random, n_ops: Sequence[int]) -> CodeProblem:
    ops = []
    for _ in range(rng.choice(tuple(n_ops))):
        name = rng.choice(tuple(CODE_OPS))
        lo, hi = CODE_OPS[name][1]
        ops.append((name, rng.randint(lo, hi)))
    return CodeProblem(tuple(ops))


def code_problems(n: int, *, seed: int, split: Split = "train", n_ops: Sequence[int] = (1, 2, 3),
                  unique: bool = False) -> list[CodeProblem]:
    """`n` problems of `split` with 1..3 ops (drawn from `n_ops`); deterministic in `seed`."""
    return _draw(n, seed, split, unique, lambda rng: _draw_code(rng, n_ops), "code")


_IDENT_RE = re.compile(r"[A-Za-z_]+")


def check_code_answer(problem: CodeProblem, completion: str) -> bool:
    """In-process check of a completion *for tests and training diagnostics only* (the
    evaluation runs the program in the sandbox): the expression is evaluated with x bound and
    no builtins, after refusing any identifier but `x`."""
    expr = completion.strip()
    if not expr or any(w != "x" for w in _IDENT_RE.findall(expr)):
        return False
    try:
        return all(eval(expr, {"__builtins__": {}}, {"x": x}) == problem.value(x)  # noqa: S307
                   for x in CODE_TEST_INPUTS)
    except Exception:  # noqa: BLE001  (any error is a wrong answer)
        return False


# ------------------------------------------------------------------------ comparisons


@dataclasses.dataclass(frozen=True)
class CompareItem:
    """Which of four distinct numbers is the largest / smallest."""

    numbers: tuple[int, ...]
    kind: str = "largest"

    def __post_init__(self) -> None:
        if self.kind not in ("largest", "smallest"):
            raise ValueError(f"CompareItem.kind={self.kind!r}: expected largest or smallest")
        if len(set(self.numbers)) != len(self.numbers) or len(self.numbers) < 2:
            raise ValueError(f"CompareItem.numbers={self.numbers}: expected >= 2 distinct")

    @property
    def key(self) -> str:
        return f"{self.kind}:{','.join(map(str, sorted(self.numbers)))}"

    @property
    def prompt(self) -> str:
        return (f"Question: Which is the {self.kind}: "
                f"{', '.join(map(str, self.numbers))}? Answer:")

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(str(x) for x in self.numbers)

    @property
    def gold(self) -> int:
        pick = max if self.kind == "largest" else min
        return self.numbers.index(pick(self.numbers))

    @property
    def answer(self) -> str:
        return f" {self.numbers[self.gold]}"


def _draw_compare(rng: random.Random, kinds: Sequence[str]) -> CompareItem:
    return CompareItem(tuple(rng.sample(range(10, 100), 4)), rng.choice(tuple(kinds)))


def compare_items(n: int, *, seed: int, split: Split = "train",
                  kinds: Sequence[str] = ("largest", "smallest"),
                  unique: bool = False) -> list[CompareItem]:
    return _draw(n, seed, split, unique, lambda rng: _draw_compare(rng, kinds), "compare")


def _draw(n, seed, split, unique, draw, name):
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    rng = random.Random(f"qdlm-synth-{name}:{seed}")
    want = split == "heldout"
    out, seen, attempts = [], set(), 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"could only draw {len(out)} of {n} {split} {name} items")
        item = draw(rng)
        if heldout_hash(item.key) != want:
            continue
        if unique:
            if item.key in seen:
                continue
            seen.add(item.key)
        out.append(item)
    return out


# ---------------------------------------------------------------------- training rows

# Task name -> (prompt, answer) pairs of its train split; the mix of `jobs.train` names these.
TASKS = ("add1", "add2", "add3", "sub2", "sub3", "code1", "code2", "code3", "compare")


def task_pairs(task: str, n: int, *, seed: int, split: Split = "train") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a training task: `addD` / `subD` (D-digit addition /
    subtraction with a non-negative result), `codeK` (code problems with K ops), `compare`
    (largest / smallest of four)."""
    if task[:3] in ("add", "sub") and task[3:].isdigit():
        spec = arithmetic.ArithmeticSpec(digits=(int(task[3:]),),
                                         ops=("+",) if task[:3] == "add" else ("-",))
        ps = arithmetic.generate_problems(n, seed=seed, split=split, spec=spec)
        return [(p.prompt, p.answer_text) for p in ps]
    if task.startswith("code") and task[4:].isdigit():
        return [(p.prompt, p.completion)
                for p in code_problems(n, seed=seed, split=split, n_ops=(int(task[4:]),))]
    if task == "compare":
        return [(it.prompt, it.answer) for it in compare_items(n, seed=seed, split=split)]
    raise ValueError(f"task={task!r}: expected one of {TASKS}")


@dataclasses.dataclass(frozen=True)
class SftRows:
    tokens: np.ndarray  # int32 [n, L]
    answer: np.ndarray  # bool [n, L]: the answer field (maskable); the prompt never is
    valid: np.ndarray  # bool [n, L]: attention mask (False on right padding)


def sft_rows(pairs: Sequence[tuple[str, str]], tokenizer, *, seq_len: int, answer_len: int,
             bos_id: int, eos_id: int, pad_id: int) -> SftRows:
    """One row per pair: ``[BOS] prompt | answer EOS.. (answer_len) | PAD..`` (module
    docstring). A pair that does not fit raises ValueError."""
    prompts = tokenizer.encode_batch([p for p, _ in pairs], add_special_tokens=False)
    answers = tokenizer.encode_batch([a for _, a in pairs], add_special_tokens=False)
    n = len(pairs)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    answer = np.zeros((n, seq_len), bool)
    valid = np.zeros((n, seq_len), bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p, a = p.ids, a.ids
        if len(a) > answer_len or 1 + len(p) + answer_len > seq_len:
            raise ValueError(f"pair {pairs[i]!r}: prompt {len(p)} + answer {len(a)} tokens do "
                             f"not fit answer_len={answer_len}, seq_len={seq_len}")
        row = [bos_id, *p, *a] + [eos_id] * (answer_len - len(a))
        tokens[i, :len(row)] = row
        answer[i, 1 + len(p):len(row)] = True
        valid[i, :len(row)] = True
    return SftRows(tokens, answer, valid)


@dataclasses.dataclass(frozen=True)
class CanvasRows:
    """Rows of a block-diffusion model (DiffusionGemma): a prompt read by the causal encoder
    and one canvas the decoder denoises."""

    prompt: np.ndarray  # int32 [n, P]: [BOS] prompt, left-padded with PAD
    prompt_valid: np.ndarray  # bool [n, P]: False on the left padding
    canvas: np.ndarray  # int32 [n, L]: answer, EOS, then PAD to the canvas length
    answer: np.ndarray  # bool [n, L]: the positions noised and scored


def canvas_rows(pairs: Sequence[tuple[str, str]], tokenizer, *, prompt_len: int,
                canvas_length: int, bos_id: int, eos_id: int, pad_id: int) -> CanvasRows:
    """One row per pair: prompt ``PAD.. [BOS] prompt`` (`prompt_len` tokens) and canvas
    ``answer EOS PAD..`` (`canvas_length` tokens), every canvas position scored: the sampler
    writes PAD after the first EOS, so the model learns to be sure of those positions too. A
    pair that does not fit raises ValueError."""
    prompts = _encode_texts(tokenizer, [p for p, _ in pairs])
    answers = _encode_texts(tokenizer, [a for _, a in pairs])
    n = len(pairs)
    prompt = np.full((n, prompt_len), pad_id, np.int32)
    valid = np.zeros((n, prompt_len), bool)
    canvas = np.full((n, canvas_length), pad_id, np.int32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p, a = [bos_id, *p], [*a, eos_id]
        if len(p) > prompt_len or len(a) > canvas_length:
            raise ValueError(f"pair {pairs[i]!r}: [BOS] + prompt {len(p)} tokens and answer + "
                             f"EOS {len(a)} tokens do not fit prompt_len={prompt_len}, "
                             f"canvas_length={canvas_length}")
        prompt[i, prompt_len - len(p):] = p
        valid[i, prompt_len - len(p):] = True
        canvas[i, :len(a)] = a
    return CanvasRows(prompt, valid, canvas, np.ones((n, canvas_length), bool))


def _encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text without special tokens, from a `tokenizers.Tokenizer` (batched) or a
    checkpoint's tokenizer (`encode(text) -> ids`)."""
    if hasattr(tokenizer, "encode_batch"):
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    return [list(tokenizer.encode(t)) for t in texts]
