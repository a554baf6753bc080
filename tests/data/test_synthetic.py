"""The synthetic task generators: formats, disjoint splits, answer checkers, SFT rows."""

import pytest

from qdlm_jax.data import arithmetic
from qdlm_jax.data import synthetic as S


def test_code_format_and_value():
    p = S.CodeProblem((("add", 3), ("multiply by", 2), ("modulo", 5)))
    assert p.spec == "add 3, then multiply by 2, then modulo 5"
    assert p.prompt == 'def f(x):\n    "add 3, then multiply by 2, then modulo 5"\n    return'
    assert p.completion == " ((x + 3) * 2) % 5"
    assert [p.value(x) for x in (0, 1, -7)] == [1, 3, 2]
    for x in S.CODE_TEST_INPUTS:
        assert p.value(x) == eval(p.expression, {}, {"x": x})
    with pytest.raises(ValueError, match="modulo"):
        S.CodeProblem((("modulo", 0),))


def test_code_checker_right_and_wrong():
    for p in S.code_problems(200, seed=3, n_ops=(1, 2, 3)):
        assert S.check_code_answer(p, p.completion)
        assert S.check_code_answer(p, f" ({p.expression})")  # equal function, other text
    p = S.CodeProblem((("add", 3), ("multiply by", 2)))
    assert not S.check_code_answer(p, " x + 3 * 2")  # precedence wrong
    assert not S.check_code_answer(p, " (x * 2) + 3")
    assert not S.check_code_answer(p, "")
    assert not S.check_code_answer(p, " (x + 3) *")  # syntax error
    assert not S.check_code_answer(p, " __import__('os')")  # only x is allowed


def test_code_hidden_tests_in_sandbox():
    """The hidden tests pass the reference function and fail wrong ones (run in the sandbox)."""
    from qdlm_jax.evals.sandbox import SandboxLimits, run_programs
    p = S.CodeProblem((("subtract", 4), ("multiply by", 3)))
    progs = [p.program(p.completion), p.program(" x - 4 * 3"), p.program(" (x * 3) - 4"),
             p.program(" (x - 4) *"), p.program(" (x - 4) * 3 + 1")]
    res = run_programs(progs, SandboxLimits(timeout_s=20.0, memory_mb=512))
    assert [r.passed for r in res] == [True, False, False, False, False], [r.stderr for r in res]


@pytest.mark.parametrize("make", [
    lambda n, split, seed: S.code_problems(n, seed=seed, split=split, n_ops=(2,)),
    lambda n, split, seed: S.code_problems(n, seed=seed, split=split, n_ops=(1, 2, 3)),
    lambda n, split, seed: S.compare_items(n, seed=seed, split=split),
])
def test_splits_disjoint_for_any_seed(make):
    held = {it.key for it in make(150, "heldout", 0)}
    assert all(S.heldout_hash(k) for k in held)
    for seed in (0, 1, 2):
        train = {it.key for it in make(3000, "train", seed)}
        assert not train & held
        assert not any(S.heldout_hash(k) for k in train)
    assert make(50, "train", 5) == make(50, "train", 5) != make(50, "train", 6)


def test_compare_key_ignores_order():
    a, b = S.CompareItem((12, 47, 83, 55)), S.CompareItem((83, 12, 55, 47))
    assert a.key == b.key and S.heldout_hash(a.key) == S.heldout_hash(b.key)
    assert S.CompareItem((12, 47, 83, 55), "smallest").key != a.key


def test_compare_gold_and_format():
    it = S.CompareItem((47, 83, 12, 55), "largest")
    assert it.prompt == "Question: Which is the largest: 47, 83, 12, 55? Answer:"
    assert it.choices == ("47", "83", "12", "55") and it.gold == 1 and it.answer == " 83"
    assert S.CompareItem((47, 83, 12, 55), "smallest").gold == 2
    for it in S.compare_items(300, seed=1):
        assert len(it.numbers) == 4 and all(10 <= x <= 99 for x in it.numbers)
        pick = max if it.kind == "largest" else min
        assert int(it.choices[it.gold]) == pick(it.numbers)


def test_task_pairs_train_split_only():
    for task in S.TASKS:
        pairs = S.task_pairs(task, 50, seed=0)
        assert len(pairs) == 50 and all(p and a.startswith(" ") for p, a in pairs)
    spec = arithmetic.ArithmeticSpec(digits=(3,), ops=("+",))
    held = {p.prompt for p in arithmetic.generate_problems(200, seed=0, split="heldout",
                                                           spec=spec)}
    assert not held & {p for p, _ in S.task_pairs("add3", 5000, seed=0)}
    subs = S.task_pairs("sub2", 500, seed=1)
    for prompt, answer in subs:  # `a-b` with a, b 2-digit, a >= b, answer a - b
        a, b = map(int, prompt.split(": ")[1].split("=")[0].split("-"))
        assert 10 <= b <= a <= 99 and int(answer) == a - b
    with pytest.raises(ValueError, match="task"):
        S.task_pairs("mul2", 1, seed=0)


def test_sft_rows_layout():
    from qdlm_jax.data.tokenizer import TokenizerSpec, special_token_ids, train_tokenizer
    lines = [p + a for t in S.TASKS for p, a in S.task_pairs(t, 50, seed=0)]
    tok = train_tokenizer(lines, TokenizerSpec(vocab_size=300))
    sp = special_token_ids(tok)
    pairs = S.task_pairs("add2", 4, seed=0) + S.task_pairs("code2", 4, seed=0)
    rows = S.sft_rows(pairs, tok, seq_len=48, answer_len=16, bos_id=sp.bos, eos_id=sp.eos,
                      pad_id=sp.pad)
    assert rows.tokens.shape == rows.answer.shape == rows.valid.shape == (8, 48)
    for (p, a), ids, ans, val in zip(pairs, rows.tokens, rows.answer, rows.valid):
        n_p = len(tok.encode(p).ids)
        assert ids[0] == sp.bos and not ans[:1 + n_p].any()
        assert ans.sum() == 16 and val.sum() == 1 + n_p + 16
        field = ids[ans]
        n_a = len(tok.encode(a).ids)
        assert tok.decode(field[:n_a].tolist()) == a and (field[n_a:] == sp.eos).all()
        assert (ids[~val] == sp.pad).all()
    with pytest.raises(ValueError, match="fit"):
        S.sft_rows(pairs, tok, seq_len=20, answer_len=16, bos_id=1, eos_id=2, pad_id=0)


class _CharTokenizer:
    """One id per character (ord), for layout tests."""

    class _Enc:
        def __init__(self, text):
            self.ids = [ord(ch) for ch in text]

    def encode_batch(self, texts, add_special_tokens=False):
        return [self._Enc(t) for t in texts]


def test_canvas_rows_layout():
    pairs = [("ab", "xyz"), ("abcd", "q")]
    r = S.canvas_rows(pairs, _CharTokenizer(), prompt_len=6, canvas_length=5, bos_id=2,
                      eos_id=1, pad_id=0)
    assert r.prompt.tolist() == [[0, 0, 0, 2, 97, 98], [0, 2, 97, 98, 99, 100]]
    assert r.prompt_valid.tolist() == [[False] * 3 + [True] * 3, [False] + [True] * 5]
    assert r.canvas.tolist() == [[120, 121, 122, 1, 0], [113, 1, 0, 0, 0]]
    assert r.answer.all()  # every canvas position is scored (the sampler pads after EOS)
    with pytest.raises(ValueError, match="canvas_length=3"):
        S.canvas_rows([("a", "xyz")], _CharTokenizer(), prompt_len=6, canvas_length=3,
                      bos_id=2, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match="prompt_len=2"):
        S.canvas_rows([("abc", "x")], _CharTokenizer(), prompt_len=2, canvas_length=3,
                      bos_id=2, eos_id=1, pad_id=0)
