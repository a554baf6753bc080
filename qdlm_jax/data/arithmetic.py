"""Seeded generator of integer arithmetic question / answer pairs.

Problems look like ``Question: 47+38=? Answer: 85``. The prompt part
(``Question: 47+38=? Answer:``) and the answer part (`` 85``) are available
separately, so a model can be trained on the full line and evaluated by
completing the prompt.

Train / held-out separation is a property of the problem itself, not of the
random seed: a problem is held out iff a hash of its canonical key falls below
``heldout_fraction`` (addition is commutative, so ``a+b`` and ``b+a`` share a
key). Training sets drawn with any seed therefore never contain a held-out
problem, e.g. "held-out 2-digit additions" are never seen in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "OPS",
    "ArithmeticProblem",
    "ArithmeticSpec",
    "extract_answer",
    "generate_problems",
    "is_heldout",
    "render_answer",
    "render_prompt",
    "render_text",
    "render_training_lines",
    "sft_rows",
]

OPS = ("+", "-")
Split = Literal["train", "heldout"]


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    """One problem ``a op b``."""

    a: int
    op: str
    b: int

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"ArithmeticProblem.op={self.op!r}: expected one of {OPS}")

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def key(self) -> tuple[int, str, int]:
        """Canonical key used for the held-out hash (operands sorted for ``+``)."""
        if self.op == "+":
            return (min(self.a, self.b), "+", max(self.a, self.b))
        return (self.a, self.op, self.b)

    @property
    def prompt(self) -> str:
        return render_prompt(self)

    @property
    def answer_text(self) -> str:
        return render_answer(self)

    @property
    def text(self) -> str:
        return render_text(self)


@dataclasses.dataclass(frozen=True)
class ArithmeticSpec:
    """What problems to draw.

    ``digits``: operand digit counts to draw from (both operands of a problem
    have the same count, chosen uniformly from this tuple; 1 digit means 0-9).
    ``ops``: operators to draw from. ``allow_negative``: if False, subtraction
    operands are ordered so the answer is >= 0. ``heldout_fraction`` and
    ``heldout_salt`` define the held-out set (see :func:`is_heldout`).
    """

    digits: tuple[int, ...] = (1, 2, 3)
    ops: tuple[str, ...] = OPS
    allow_negative: bool = False
    heldout_fraction: float = 0.1
    heldout_salt: str = "qdlm-arith-v1"

    def __post_init__(self) -> None:
        if not self.digits or any(not isinstance(d, int) or d < 1 or d > 18 for d in self.digits):
            raise ValueError(
                f"ArithmeticSpec.digits={self.digits!r}: expected a non-empty tuple of ints "
                "in 1..18"
            )
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(
                f"ArithmeticSpec.ops={self.ops!r}: expected a non-empty tuple drawn from {OPS}"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(
                f"ArithmeticSpec.heldout_fraction={self.heldout_fraction!r}: expected a value in "
                "(0, 1)"
            )


def render_prompt(problem: ArithmeticProblem) -> str:
    """``Question: 47+38=? Answer:`` (no trailing space)."""
    return f"Question: {problem.a}{problem.op}{problem.b}=? Answer:"


def render_answer(problem: ArithmeticProblem) -> str:
    """`` 85`` -- the completion of :func:`render_prompt`, with its leading space."""
    return f" {problem.answer}"


def render_text(problem: ArithmeticProblem) -> str:
    """A full training line: ``Question: 47+38=? Answer: 85``."""
    return render_prompt(problem) + render_answer(problem)


def is_heldout(problem: ArithmeticProblem, spec: ArithmeticSpec = ArithmeticSpec()) -> bool:
    """Whether ``problem`` belongs to the held-out set (depends only on the problem and the
    spec's salt)."""
    a, op, b = problem.key
    digest = hashlib.sha256(f"{spec.heldout_salt}:{a}{op}{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < spec.heldout_fraction


def _draw_operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def generate_problems(
    n: int,
    *,
    seed: int,
    split: Split = "train",
    spec: ArithmeticSpec = ArithmeticSpec(),
    unique: bool = False,
) -> list[ArithmeticProblem]:
    """Draw ``n`` problems of the given split; deterministic given ``seed`` and ``spec``.

    Problems are drawn at random and kept if they fall in ``split``. With
    ``unique=True`` no problem repeats (raises ``ValueError`` if the spec has
    too few problems in that split).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    if n < 0:
        raise ValueError(f"n={n}: expected >= 0")
    want_heldout = split == "heldout"
    rng = random.Random(f"qdlm-arith:{seed}")
    out: list[ArithmeticProblem] = []
    seen: set[tuple[int, str, int]] = set()
    max_attempts = 200 * n + 10_000
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could only draw {len(out)} of {n} {'unique ' if unique else ''}{split} problems "
                f"after {max_attempts} attempts with {spec}; use more digits or unique=False"
            )
        digits = rng.choice(spec.digits)
        op = rng.choice(spec.ops)
        a = _draw_operand(rng, digits)
        b = _draw_operand(rng, digits)
        if op == "-" and not spec.allow_negative and b > a:
            a, b = b, a
        problem = ArithmeticProblem(a, op, b)
        if is_heldout(problem, spec) != want_heldout:
            continue
        if unique:
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
        out.append(problem)
    return out


def render_training_lines(problems: Sequence[ArithmeticProblem]) -> list[str]:
    """Full text lines for training, one per problem."""
    return [render_text(p) for p in problems]


_INT_RE = re.compile(r"-?\d+")
_ANSWER_MARK = "Answer:"


def extract_answer(text: str, prompt: str | None = None) -> int | None:
    """The first integer after the prompt in ``text`` (``None`` if there is none).

    If ``prompt`` is given and ``text`` starts with it, the prompt is removed.
    Otherwise, if ``text`` contains ``"Answer:"``, everything up to the first
    ``"Answer:"`` is removed. A bare completion such as ``" 85"`` also works.
    """
    rest = text
    if prompt is not None and rest.startswith(prompt):
        rest = rest[len(prompt) :]
    elif _ANSWER_MARK in rest:
        rest = rest.split(_ANSWER_MARK, 1)[1]
    match = _INT_RE.search(rest)
    return int(match.group()) if match else None


def sft_rows(
    problems: Sequence[ArithmeticProblem],
    tokenizer,
    *,
    seq_len: int,
    answer_len: int,
    bos_id: int,
    eos_id: int,
    max_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instruction-style training rows, the layout of the denoising loop's exact-match task.

    Each problem is ``[BOS] prompt`` followed by an answer field of ``answer_len`` tokens (the
    answer's tokens, then EOS padding, as in LLaDA's SFT data); problems are concatenated and
    cut into rows of ``seq_len``. Returns int32 tokens ``[n, seq_len]`` and a bool ``maskable``
    of the same shape that is True on answer fields only, so the prompt stays visible and the
    loss falls on the answer, exactly what generation with ``gen_length=answer_len`` asks for.
    A problem whose answer does not fit in ``answer_len`` tokens raises ``ValueError``.
    """
    if answer_len < 2:
        raise ValueError(f"answer_len={answer_len}: expected >= 2 (answer tokens plus EOS)")
    ids: list[int] = []
    flags: list[bool] = []
    needed = None if max_rows is None else max_rows * seq_len
    for p in problems:
        prompt = tokenizer.encode(render_prompt(p)).ids
        answer = tokenizer.encode(render_answer(p)).ids
        if len(answer) >= answer_len:
            raise ValueError(
                f"answer {render_answer(p)!r} takes {len(answer)} tokens: "
                f"expected < answer_len={answer_len}"
            )
        field = answer + [eos_id] * (answer_len - len(answer))
        ids += [bos_id, *prompt, *field]
        flags += [False] * (1 + len(prompt)) + [True] * answer_len
        if needed is not None and len(ids) >= needed:
            break
    n = len(ids) // seq_len
    if max_rows is not None:
        n = min(n, max_rows)
    tokens = np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)
    maskable = np.asarray(flags[: n * seq_len], bool).reshape(n, seq_len)
    return tokens, maskable
