"""Tests for qdlm_jax.data.arithmetic."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qdlm_jax.data import arithmetic
from qdlm_jax.data.arithmetic import (
    ArithmeticProblem,
    ArithmeticSpec,
    extract_answer,
    generate_problems,
    is_heldout,
    render_answer,
    render_prompt,
    render_text,
    render_training_lines,
)


def test_format() -> None:
    p = ArithmeticProblem(47, "+", 38)
    assert render_prompt(p) == "Question: 47+38=? Answer:"
    assert render_answer(p) == " 85"
    assert render_text(p) == p.text == "Question: 47+38=? Answer: 85"
    assert ArithmeticProblem(50, "-", 8).text == "Question: 50-8=? Answer: 42"
    assert render_training_lines([p]) == [p.text]


def test_deterministic_per_seed() -> None:
    spec = ArithmeticSpec(digits=(2, 3))
    a = generate_problems(300, seed=7, spec=spec)
    assert a == generate_problems(300, seed=7, spec=spec)
    assert a != generate_problems(300, seed=8, spec=spec)


def test_answers_correct_and_digit_counts() -> None:
    spec = ArithmeticSpec(digits=(2, 4))
    problems = generate_problems(500, seed=1, spec=spec)
    assert {p.op for p in problems} == {"+", "-"}
    for p in problems:
        expected = p.a + p.b if p.op == "+" else p.a - p.b
        assert p.answer == expected
        assert int(p.answer_text) == expected
        assert extract_answer(p.text) == expected
        assert len(str(p.a)) == len(str(p.b)) and len(str(p.a)) in (2, 4)
        if p.op == "-":
            assert p.answer >= 0
    neg = generate_problems(
        200, seed=1, spec=ArithmeticSpec(digits=(2,), ops=("-",), allow_negative=True)
    )
    assert any(p.answer < 0 for p in neg)
    assert all(extract_answer(p.text) == p.answer for p in neg)


def test_heldout_disjoint_from_train_for_any_seed() -> None:
    spec = ArithmeticSpec(digits=(1, 2), heldout_fraction=0.2)
    heldout = generate_problems(300, seed=0, split="heldout", spec=spec)
    assert all(is_heldout(p, spec) for p in heldout)
    heldout_keys = {p.key for p in heldout}
    for seed in range(3):
        train = generate_problems(2000, seed=seed, spec=spec)
        assert not any(is_heldout(p, spec) for p in train)
        assert not {p.key for p in train} & heldout_keys
    # commutativity: a+b and b+a share a key, hence a split
    assert is_heldout(ArithmeticProblem(12, "+", 34), spec) == is_heldout(
        ArithmeticProblem(34, "+", 12), spec
    )


def test_all_2digit_additions_partitioned() -> None:
    spec = ArithmeticSpec(digits=(2,), ops=("+",))
    problems = [ArithmeticProblem(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    frac = sum(is_heldout(p, spec) for p in problems) / len(problems)
    assert 0.07 < frac < 0.13


def test_unique_and_exhaustion() -> None:
    spec = ArithmeticSpec(digits=(1,), ops=("+",), heldout_fraction=0.5)
    probs = generate_problems(10, seed=0, split="heldout", spec=spec, unique=True)
    assert len({(p.a, p.b) for p in probs}) == 10
    with pytest.raises(ValueError, match="could only draw"):
        generate_problems(200, seed=0, split="heldout", spec=spec, unique=True)


def test_extract_answer() -> None:
    prompt = "Question: 47+38=? Answer:"
    assert extract_answer(prompt + " 85") == 85
    assert extract_answer(prompt + " 85 Question: 1+2=? Answer: 3") == 85
    assert extract_answer(" -12 and more", prompt) == -12
    assert extract_answer(prompt + " 7", prompt) == 7
    assert extract_answer(" 85") == 85
    assert extract_answer(prompt + " no idea") is None


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="digits"):
        ArithmeticSpec(digits=())
    with pytest.raises(ValueError, match="ops"):
        ArithmeticSpec(ops=("*",))
    with pytest.raises(ValueError, match="heldout_fraction"):
        ArithmeticSpec(heldout_fraction=0.0)
    with pytest.raises(ValueError, match="op"):
        ArithmeticProblem(1, "/", 2)


def test_sft_rows_layout() -> None:
    """Each problem is [BOS] prompt + an answer field of answer_len tokens (answer, EOS pad);
    only the field is maskable, and decoding the field gives the answer."""
    from qdlm_jax.data import tokenizer as tok_lib

    tok = tok_lib.train_tokenizer(
        ["Question: 12+30=? Answer: 42 and more text 0123456789"] * 20,
        tok_lib.TokenizerSpec(vocab_size=300),
    )
    sp = tok_lib.special_token_ids(tok)
    problems = arithmetic.generate_problems(40, seed=1)
    tokens, maskable = arithmetic.sft_rows(
        problems, tok, seq_len=32, answer_len=6, bos_id=sp.bos, eos_id=sp.eos, max_rows=4
    )
    assert tokens.shape == maskable.shape == (4, 32)
    flat, fmask = tokens.reshape(-1), maskable.reshape(-1)
    starts = np.flatnonzero(flat == sp.bos)
    for p, s, e in zip(problems, starts[:-1], starts[1:]):
        unit, umask = flat[s:e], fmask[s:e]
        n_prompt = 1 + len(tok.encode(arithmetic.render_prompt(p)).ids)
        assert not umask[:n_prompt].any() and umask[n_prompt:].all()
        assert len(unit) == n_prompt + 6
        field = unit[n_prompt:].tolist()
        answer = field[: field.index(sp.eos)]
        assert tok.decode(answer) == arithmetic.render_answer(p)
        assert all(t == sp.eos for t in field[len(answer) :])
    with pytest.raises(ValueError, match="answer_len"):
        arithmetic.sft_rows(problems, tok, seq_len=32, answer_len=2, bos_id=sp.bos, eos_id=sp.eos)


def test_training_mix_follows_ops_and_digits_weights() -> None:
    """`train_job.arithmetic_rows` draws operators and digit counts with the config's
    repetition weights: ("+", "+", "+", "-") gives about 3/4 additions."""
    import ml_collections

    from qdlm_jax.data import tokenizer as tok_lib
    from qdlm_jax.jobs import train as train_job

    tok = tok_lib.train_tokenizer(
        ["Question: 12+30=? Answer: 42 - 0123456789"] * 20, tok_lib.TokenizerSpec(vocab_size=300)
    )
    sp = tok_lib.special_token_ids(tok)
    d = ml_collections.ConfigDict(
        dict(
            arith_digits=(2,),
            arith_ops=("+", "+", "+", "-"),
            arith_problems=2000,
            seq_len=64,
            arith_answer_len=8,
        )
    )
    tokens, _ = train_job.arithmetic_rows(tok, sp, d, n_rows=200, seed=0)
    text = tok.decode(tokens.reshape(-1).tolist(), skip_special_tokens=False)
    ops = re.findall(r"Question: (\d+)([+-])(\d+)=", text)
    assert len(ops) > 300
    frac_add = np.mean([op == "+" for _, op, _ in ops])
    assert 0.68 < frac_add < 0.82, frac_add
    assert all(len(a) == 2 and len(b) == 2 for a, _, b in ops)
