"""The masked-diffusion objective against a NumPy statement, and a short run whose loss falls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.models import init_model
from qdlm_jax.training.objective import diffusion_loss, mask_tokens
from qdlm_jax.training.trainer import TrainSpec, train


def _numpy_loss(logits, tokens, masked, p_mask, shift):
    logits = np.asarray(logits, np.float64)
    if shift:
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    b, t = tokens.shape
    total = 0.0
    for i in range(b):
        for j in range(t):
            if masked[i, j]:
                total += (logz[i, j] - logits[i, j, tokens[i, j]]) / p_mask[i]
    return total / (b * t)


def test_loss_matches_numpy_statement():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (3, 7))
    masked = rng.random((3, 7)) < 0.5
    p_mask = np.array([0.3, 0.6, 0.9], np.float32)
    for shift in (False, True):
        ours, _ = diffusion_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(masked),
                                 jnp.asarray(p_mask), shift=shift)
        np.testing.assert_allclose(float(ours), _numpy_loss(logits, tokens, masked, p_mask, shift),
                                   rtol=1e-5)


def test_mask_tokens_rate_follows_p_mask():
    tokens = jnp.zeros((4000, 64), jnp.int32) + 5
    noisy, masked, p_mask = mask_tokens(jax.random.key(0), tokens, 9, keep_first=True)
    assert not bool(masked[:, 0].any())
    assert bool(jnp.all(jnp.where(masked, noisy == 9, noisy == 5)))
    rate = np.asarray(masked[:, 1:].mean(axis=1))
    # E[rate | p] = p; rows have 63 Bernoulli draws, so the residual has std <= 0.063.
    assert np.abs(rate - np.asarray(p_mask)).mean() < 0.06
    assert 0.45 < float(p_mask.mean()) < 0.55  # t ~ U(0, 1)


def test_short_training_run_loss_falls(tmp_path):
    config = tiny_config("dream", vocab_size=48, mask_token_id=47, num_layers=1)
    spec = TrainSpec(steps=60, batch_size=8, seq_len=24, lr=3e-3, warmup_steps=5,
                     ckpt_every=30, log_every=10)

    def batches(step):  # periodic sequences: learnable from context
        start = np.random.default_rng(step).integers(0, 10, size=(8, 1))
        return ((start + np.arange(24)[None]) % 16).astype(np.int32)

    _, records = train(init_model(config), spec, batches, tmp_path)
    first = np.mean([r["loss"] for r in records[:2]])
    last = np.mean([r["loss"] for r in records[-2:]])
    assert last < first, (first, last)
    # 16 equiprobable symbols: a model blind to context has masked NLL ln 16 = 2.77 nats.
    # Falling well below it shows the model learned to read its (bidirectional) context.
    assert np.mean([r["masked_nll"] for r in records[-2:]]) < np.log(16) - 0.5
    # Resuming a finished run does no more steps and keeps the log.
    _, again = train(init_model(config), spec, batches, tmp_path)
    assert [r["step"] for r in again] == [r["step"] for r in records]


def test_maskable_keeps_positions_visible(tmp_path):
    """With batches returning (tokens, maskable), positions with maskable=0 are never noised,
    so a run whose maskable is all 0 except one column trains on that column alone: its masked
    fraction is at most 1/T."""
    config = tiny_config("llada", vocab_size=48, mask_token_id=47, num_layers=1)
    spec = TrainSpec(steps=10, batch_size=8, seq_len=24, lr=3e-3, warmup_steps=2,
                     ckpt_every=10, log_every=5)
    maskable = np.zeros((8, 24), bool)
    maskable[:, 5] = True

    def batches(step):
        return np.full((8, 24), 7, np.int32), maskable

    _, records = train(init_model(config), spec, batches, tmp_path)
    assert all(r["mask_frac"] <= 1 / 24 + 1e-6 for r in records)
    assert any(r["mask_frac"] > 0 for r in records)


def test_training_time_leaves_out_long_pauses():
    from qdlm_jax.jobs.train import training_time

    records = [{"time": t} for t in (0.0, 10.0, 20.0, 5000.0, 5010.0, 5030.0)]
    assert training_time(records) == 10 + 10 + 10 + 20
    assert training_time(records, max_gap_s=1e9) == 5030
    assert training_time([]) == 0.0


def _numpy_sft_loss(logits, tokens, masked, p_mask, answer, shift):
    """LLaDA's SFT loss, stated row by row: sum over masked answer tokens of CE / p_mask,
    divided by the row's answer length, averaged over rows."""
    logits = np.asarray(logits, np.float64)
    if shift:
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    rows = []
    for i in range(tokens.shape[0]):
        total = sum((logz[i, j] - logits[i, j, tokens[i, j]]) / p_mask[i]
                    for j in range(tokens.shape[1]) if masked[i, j] and answer[i, j])
        rows.append(total / max(answer[i].sum(), 1))
    return np.mean(rows)


def test_sft_loss_matches_numpy_statement():
    from qdlm_jax.training.objective import sft_loss
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 9, 13)).astype(np.float32)
    tokens = rng.integers(0, 13, (4, 9))
    answer = np.zeros((4, 9), bool)
    for i, start in enumerate((3, 5, 2, 6)):  # prompts of different lengths
        answer[i, start:start + 3] = True
    masked = (rng.random((4, 9)) < 0.6) & answer
    p_mask = np.array([0.2, 0.5, 0.7, 0.95], np.float32)
    for shift in (False, True):
        ours, _ = sft_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(masked),
                           jnp.asarray(p_mask), jnp.asarray(answer), shift=shift)
        np.testing.assert_allclose(
            float(ours), _numpy_sft_loss(logits, tokens, masked, p_mask, answer, shift),
            rtol=1e-5)


def test_sft_noise_never_touches_prompt():
    tokens = jnp.full((500, 12), 5, jnp.int32)
    answer = jnp.zeros((500, 12), bool).at[:, 7:].set(True)
    noisy, masked, p_mask = mask_tokens(jax.random.key(1), tokens, 9, loss_mask=answer)
    assert not bool(masked[:, :7].any()) and bool((noisy[:, :7] == 5).all())
    rate = np.asarray(masked[:, 7:].mean(axis=1))
    assert np.abs(rate - np.asarray(p_mask)).mean() < 0.2 and bool(masked.any())


def test_mixed_batches_learn_the_task(tmp_path):
    """Text rows + SFT task rows (answer = the prompt's first token, copied): the SFT loss
    falls well below the blind guess of ln 16."""
    from qdlm_jax.training.trainer import MixedBatch
    config = tiny_config("llada", vocab_size=48, mask_token_id=47, num_layers=1)
    spec = TrainSpec(steps=80, batch_size=8, seq_len=16, lr=3e-3, warmup_steps=5,
                     ckpt_every=80, log_every=10)

    def batches(step):
        rng = np.random.default_rng(step)
        text = rng.integers(4, 20, (4, 16)).astype(np.int32)
        task = np.zeros((8, 10), np.int32)
        task[:, 0] = 1
        task[:, 1:4] = rng.integers(20, 36, (8, 3))
        task[:, 4] = task[:, 1]  # the answer
        task[:, 5] = 2
        answer = np.zeros((8, 10), bool)
        answer[:, 4:6] = True
        valid = np.zeros((8, 10), bool)
        valid[:, :6] = True
        return MixedBatch(text, task, answer, valid)

    _, records = train(init_model(config), spec, batches, tmp_path)
    assert {"text_loss", "sft_loss", "masked_nll"} <= set(records[-1])
    assert np.mean([r["sft_loss"] for r in records[-2:]]) < 0.5 * np.log(16)


def test_shift_switch_and_its_head_start(tmp_path):
    """`TrainSpec.shift` trains the LLaDA structure with Dream's one-position shift. On
    periodic sequences (token i = token i-1 + 1), the shifted run leaves the no-context
    plateau (ln 16) far sooner: the output at a visible position i-1 holds token i-1 itself,
    while without the shift a masked position must first learn to attend to its neighbour
    (the LLaDA-Dream gap of experiments/gap_experiment.py in miniature)."""
    config = tiny_config("llada", vocab_size=48, mask_token_id=47, num_layers=1)

    def batches(step):
        start = np.random.default_rng(step).integers(0, 10, size=(8, 1))
        return ((start + np.arange(24)[None]) % 16).astype(np.int32)

    early = {}
    for shift in (False, True):
        spec = TrainSpec(steps=80, batch_size=8, seq_len=24, lr=3e-3, warmup_steps=5,
                         ckpt_every=80, log_every=10, shift=shift)
        _, records = train(init_model(config), spec, batches, tmp_path / str(shift))
        early[shift] = np.mean([r["masked_nll"] for r in records[2:8]])
    assert early[True] < early[False] - 0.3, early


def test_start_step_continues_a_trained_model(tmp_path):
    """`start_step` continues weights trained elsewhere from that step of the schedule and the
    data stream: only the later steps' batches are drawn, the first logged loss is the trained
    model's (not a random model's), and a checkpoint in out_dir still wins on a rerun."""
    config = tiny_config("dream", vocab_size=48, mask_token_id=47, num_layers=1)
    spec = TrainSpec(steps=60, batch_size=8, seq_len=24, lr=3e-3, warmup_steps=5,
                     ckpt_every=30, log_every=10)
    drawn = []

    def batches(step):  # periodic sequences, as in the run above
        drawn.append(step)
        start = np.random.default_rng(step).integers(0, 10, size=(8, 1))
        return ((start + np.arange(24)[None]) % 16).astype(np.int32)

    trained, _ = train(init_model(config), spec, batches, tmp_path / "first")
    drawn.clear()
    _, records = train(trained, spec, batches, tmp_path / "second", start_step=30)
    assert drawn == list(range(30, 60))
    assert [r["step"] for r in records] == [40, 50, 60]
    # The trained model reads its context (masked NLL far below ln 16 = 2.77 nats) from the
    # first logged step; a random model starts near ln 16.
    assert records[0]["masked_nll"] < np.log(16) - 0.5
    _, fresh = train(init_model(config), TrainSpec(**{**spec.__dict__, "steps": 10}), batches,
                     tmp_path / "fresh")
    assert fresh[0]["masked_nll"] > records[0]["masked_nll"] + 0.5
    drawn.clear()
    _, again = train(init_model(config), spec, batches, tmp_path / "second", start_step=30)
    assert drawn == [] and [r["step"] for r in again] == [40, 50, 60]
    with pytest.raises(ValueError, match="start_step 60"):
        train(trained, spec, batches, tmp_path / "third", start_step=60)


def test_learning_rate_follows_warmup_and_cosine_over_the_schedule_length():
    from qdlm_jax.training.trainer import learning_rate

    def numpy_lr(k, lr, w, s, frac):
        if k < w:
            return lr * k / w
        e = lr * frac
        return e + (lr - e) * (1 + np.cos(np.pi * min(k - w, s - w) / (s - w))) / 2

    full = TrainSpec(steps=100, batch_size=1, seq_len=4, lr=2e-3, warmup_steps=10,
                     final_lr_frac=0.05)
    early = TrainSpec(**{**full.__dict__, "steps": 40, "schedule_steps": 100})
    short = TrainSpec(**{**full.__dict__, "steps": 40})
    for k in (0, 5, 10, 25, 39, 70, 99):
        want = numpy_lr(k, 2e-3, 10, 100, 0.05)
        np.testing.assert_allclose(float(learning_rate(full)(k)), want, rtol=1e-5, atol=1e-9)
        if k < 40:  # a run stopping early on the longer schedule sees the same rates
            np.testing.assert_allclose(float(learning_rate(early)(k)), want, rtol=1e-5,
                                       atol=1e-9)
    assert float(learning_rate(short)(39)) < float(learning_rate(early)(39)) / 5
    with pytest.raises(ValueError, match="schedule_steps"):
        TrainSpec(**{**full.__dict__, "schedule_steps": 50})


def test_a_batch_can_set_the_steps_objective(tmp_path):
    """MixedBatch.shift picks the objective of its step: a LLaDA model trained on batches that
    ask for the shift ends exactly where TrainSpec(shift=True) takes it, and elsewhere than
    the unshifted run."""
    from qdlm_jax.models.params import get_params
    from qdlm_jax.training.trainer import MixedBatch

    config = tiny_config("llada", vocab_size=48, mask_token_id=47, num_layers=1)
    spec = TrainSpec(steps=4, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1,
                     ckpt_every=4, log_every=2)

    def rows(step):
        return np.random.default_rng(step).integers(0, 40, (4, 16)).astype(np.int32)

    def final(spec, batches, name):
        model, _ = train(init_model(config), spec, batches, tmp_path / name)
        return {k: np.asarray(v) for k, v in get_params(model).items()}

    asked = final(spec, lambda s: MixedBatch(rows(s), shift=True), "asked")
    spec_shift = final(TrainSpec(**{**spec.__dict__, "shift": True}),
                       lambda s: MixedBatch(rows(s)), "spec")
    plain = final(spec, lambda s: MixedBatch(rows(s)), "plain")
    for k in asked:
        np.testing.assert_array_equal(asked[k], spec_shift[k])
    assert any(not np.array_equal(asked[k], plain[k]) for k in asked)


# slow: two short training runs
@pytest.mark.slow
def test_text_shift_sets_the_text_rows_objective_alone():
    """`text_shift` shifts the text rows only: on text-only batches a step ends exactly where
    the shifted step does; on task-only batches it changes nothing (the task rows keep the
    unshifted objective); on batches of both it ends elsewhere than the unshifted step.
    (`train` picks the step from MixedBatch.text_shift: test_train_mix checks the phases.)"""
    from flax import nnx

    from qdlm_jax.training.trainer import make_mixed_step, make_optimizer

    config = tiny_config("llada", vocab_size=48, mask_token_id=47, num_layers=1)
    spec = TrainSpec(steps=3, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=0)
    graphdef, params = nnx.split(init_model(config), nnx.Param)
    tx = make_optimizer(spec)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(1),
             "key": jax.random.key(0)}
    text = jnp.asarray(np.random.default_rng(0).integers(0, 40, (4, 16)), jnp.int32)
    answer = np.zeros((3, 10), bool)
    answer[:, 6:] = True
    task = (jnp.asarray(np.random.default_rng(1).integers(0, 40, (3, 10)), jnp.int32),
            jnp.asarray(answer), jnp.ones((3, 10), bool))

    def after(shift, text_shift, text, task):
        step = make_mixed_step(graphdef, config, TrainSpec(**{**spec.__dict__, "shift": shift}),
                               tx, text_shift=text_shift)
        new, _ = step(state, text, task)
        return leaves(new["params"])

    def leaves(params):
        return [np.asarray(x) for x in jax.tree.leaves(params)]

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b))

    assert same(after(None, True, text, None), after(True, None, text, None))
    assert same(after(None, True, None, task), after(None, None, None, task))
    both = after(None, True, text, task)
    assert not same(both, leaves(params))  # a step was taken
    assert not same(both, after(None, None, text, task))
