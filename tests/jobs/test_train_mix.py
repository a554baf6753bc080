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
          dict(until=5, text_rows=0, task_rows=4, mix=dict(compare=1.0), text_shift=True),
          dict(until=6, text_rows=1, task_rows=3, task_seq_len=20, mix=dict(sub2=1.0),
               shift=True)]


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
    assert b5.shift is True and b.shift is None and b4.shift is None  # the phase's objective
    assert b4.text_shift is True and b5.text_shift is None
    again = batches(0)
    np.testing.assert_array_equal(again.task_tokens, b.task_tokens)
    np.testing.assert_array_equal(again.text, b.text)
    assert J.phase_at(PHASES, 2)[0] == 0 and J.phase_at(PHASES, 3)[0] == 1
    with pytest.raises(ValueError, match="past the last phase"):
        J.phase_at(PHASES, 6)


def test_check_phases():
    J.check_phases(PHASES, 6)
    J.check_phases(PHASES, 5)  # the last phase is not run
    with pytest.raises(ValueError, match="reach train.steps"):
        J.check_phases(PHASES, 7)
    with pytest.raises(ValueError, match="tasks must be among"):
        J.check_phases([dict(until=5, text_rows=1, task_rows=1, mix=dict(mul=1))], 5)
    with pytest.raises(ValueError, match="shift='yes'"):
        J.check_phases([dict(until=5, text_rows=1, task_rows=0, mix={}, shift="yes")], 5)
    with pytest.raises(ValueError, match="text_shift=1"):
        J.check_phases([dict(until=5, text_rows=1, task_rows=0, mix={}, text_shift=1)], 5)


def _config(name):
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(name, root / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(), root


def test_initial_model_starts_from_a_saved_model_at_its_step():
    """`init.from_dir` + `init.step`: the shipped tiny-dream's weights (read here with
    safetensors, not our loader), started at step 5700 of an 8300-step schedule; a
    mismatched model or step is refused."""
    from safetensors.torch import load_file

    from qdlm_jax.data.tokenizer import load_bpe_tokenizer as load_tokenizer
    from qdlm_jax.models.params import get_params
    from qdlm_jax.training.trainer import TrainSpec

    cfg, root = _config("train_tiny_dream")
    cfg.train.steps = 8300
    asset = root / "assets" / "tiny-dream"
    tokenizer = load_tokenizer(asset / "tokenizer.json")
    config = J.model_config(cfg, special_token_ids(tokenizer), tokenizer.get_vocab_size())
    spec = TrainSpec(seq_len=cfg.data.seq_len, **cfg.train.to_dict())
    _, step = J.initial_model(cfg, config, spec)
    assert step == 0  # the config's default: random weights at step 0
    cfg.init.from_dir, cfg.init.step = str(asset), 5700
    model, step = J.initial_model(cfg, config, spec)
    assert step == 5700
    stored = load_file(asset / "model.safetensors")
    ours = {".".join(map(str, k)): np.asarray(v) for k, v in get_params(model).items()}
    embed = next(v for k, v in ours.items() if "embed" in k)
    np.testing.assert_array_equal(embed, stored["model.embed_tokens.weight"].float().numpy())
    cfg.init.step = cfg.train.steps
    with pytest.raises(ValueError, match="init.step"):
        J.initial_model(cfg, config, spec)
    cfg.init.step = 5700
    with pytest.raises(ValueError, match="num_kv_heads"):
        J.initial_model(cfg, config.replace(num_kv_heads=4), spec)


def test_canvas_batches_follow_the_phases(tok):
    """DiffusionGemma rows: text windows split into prompt and canvas, task rows with the
    phase's prompt length, `[BOS] prompt` at the right end and `answer EOS PAD..` on the
    canvas."""
    sp = special_token_ids(tok)
    text = np.arange(40 * 20, dtype=np.int32).reshape(40, 20)
    phases = [dict(until=2, text_rows=0, task_rows=5, task_prompt_len=14, mix=dict(add2=1.0)),
              dict(until=4, text_rows=3, task_rows=4, mix=dict(compare=1.0, code1=1.0))]
    batches = J.canvas_batches(phases, text, tok, sp, canvas_length=12, text_prompt_len=8,
                               task_prompt_len=40, seed=0)
    b0 = batches(0)
    assert b0.text is None and b0.task.prompt.shape == (5, 14) and b0.task.canvas.shape == (5, 12)
    assert (b0.task.prompt[:, -1] != sp.pad).all()  # left-padded: the prompt ends the row
    for p, v, c in zip(b0.task.prompt, b0.task.prompt_valid, b0.task.canvas):
        assert p[v][0] == sp.bos and "Answer:" in tok.decode(p[v].tolist())
        eos = list(c).index(sp.eos)
        assert (c[eos + 1:] == sp.pad).all() and tok.decode(c[:eos].tolist()).strip().isdigit()
    b3 = batches(3)
    assert b3.task.prompt.shape == (4, 40) and b3.text.prompt.shape == (3, 8)
    np.testing.assert_array_equal(np.concatenate([b3.text.prompt, b3.text.canvas], 1) % 20,
                                  np.tile(np.arange(20), (3, 1)))  # whole windows, in order
    assert b3.text.prompt_valid.all() and b3.text.answer.all()
    np.testing.assert_array_equal(batches(3).task.canvas, b3.task.canvas)  # deterministic


@pytest.mark.slow  # about 60 s of compilation; test_canvas_batches_follow_the_phases covers
def test_gemma_training_runs_resumes_and_exports(tmp_path):  # the rows
    """`qdlm train` on a 2-layer DiffusionGemma: the loss falls on a fixed task, a second run
    of the same command resumes at the checkpoint, and the export loads as the family."""
    import json

    from qdlm_jax.checkpoints.load import load_model

    cfg, root = _config("train_tiny_diffusiongemma")
    cfg.out_dir = str(tmp_path / "run")
    cfg.data.tokenizer = str(root / "assets" / "tiny-llada" / "tokenizer.json")
    cfg.model.update(dict(hidden_size=32, num_layers=2,
                          layer_types=("sliding_attention", "full_attention"),
                          head_dim=8, global_head_dim=16, intermediate_size=32,
                          moe_intermediate_size=16))
    cfg.data.phases = [dict(until=40, text_rows=0, task_rows=16, task_prompt_len=12,
                            mix=dict(add1=1.0))]
    cfg.train.update(dict(steps=20, ckpt_every=20, log_every=10, warmup_steps=2, lr=1e-2))
    J.run(cfg)
    cfg.train.steps = 40
    J.run(cfg)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40]  # resumed at 20, not restarted
    assert log[-1]["task_loss"] < 0.7 * log[0]["task_loss"]
    model = load_model(tmp_path / "run" / "hf")
    assert model.config.family == "diffusion_gemma" and model.config.num_experts == 8
