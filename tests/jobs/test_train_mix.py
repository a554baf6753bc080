"""The phased data mix of the tiny-model training job: rows per phase, tasks by weight,
answer fields, determinism, and the phase checks."""

import numpy as np
import pytest

from qdlm_jax.data import synthetic
from qdlm_jax.data.tokenizer import TokenizerSpec, special_token_ids, train_tokenizer
from qdlm_jax.jobs import train as J


@pytest.fixture(scope="module")
def tok():
    lines = [p + a for t in synthetic.TASKS for p, a in synthetic.task_pairs(t, 100, seed=0)]
    return train_tokenizer(lines, TokenizerSpec(vocab_size=400))


PHASES = [dict(until=3, text_rows=2, task_rows=6, mix=dict(add1=1.0, code2=1.0)),
          dict(until=5, text_rows=0, task_rows=4, mix=dict(compare=1.0)),
          dict(until=6, text_rows=1, task_rows=3, task_seq_len=20, mix=dict(sub2=1.0))]


def test_mixed_batches_follow_the_phases(tok):
    sp = special_token_ids(tok)
    wiki = np.arange(40 * 16, dtype=np.int32).reshape(40, 16)
    batches = J.mixed_batches(PHASES, wiki, tok, sp, task_seq_len=34, seed=0)
    b = batches(0)
    assert b.text.shape == (2, 16) and b.task_tokens.shape == (6, 34)
    assert set(b.task_answer.sum(axis=1)) <= {J.answer_len("add1"), J.answer_len("code2")}
    assert (b.task_tokens[:, 0] == sp.bos).all() and not (b.task_answer & ~b.task_valid).any()
    b4 = batches(4)
    assert b4.text is None and (b4.task_answer.sum(axis=1) == J.answer_len("compare")).all()
    texts = [tok.decode(r[v].tolist()) for r, v in zip(b4.task_tokens, b4.task_valid)]
    assert all("Which is the" in t for t in texts)
    b5 = batches(5)  # the phase's own task_seq_len
    assert b5.task_tokens.shape == (3, 20) and b5.text.shape == (1, 16)
    again = batches(0)
    np.testing.assert_array_equal(again.task_tokens, b.task_tokens)
    np.testing.assert_array_equal(again.text, b.text)
    assert J.phase_at(PHASES, 2)[0] == 0 and J.phase_at(PHASES, 3)[0] == 1
    with pytest.raises(ValueError, match="past the last phase"):
        J.phase_at(PHASES, 6)


def test_check_phases():
    J.check_phases(PHASES, 6)
    with pytest.raises(ValueError, match="end at train.steps"):
        J.check_phases(PHASES, 7)
    with pytest.raises(ValueError, match="tasks must be among"):
        J.check_phases([dict(until=5, text_rows=1, task_rows=1, mix=dict(mul=1))], 5)
