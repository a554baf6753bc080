"""The eval backend on a DiffusionGemma model: generation runs its entropy-bound sampler with
the checkpoint's generation config (batched and bucketed = one prompt at a time), the
likelihood-style score is minus the answer's token count times `answer_score`, and a
multiple-choice task runs through it."""

import jax
import numpy as np
import pytest

from qdlm_jax.evals import tasks
from qdlm_jax.evals.backends import context_key
from qdlm_jax.inference.diffusion_gemma import GemmaSampleSettings, gemma_sample
from qdlm_jax.inference.gemma_likelihood import answer_score
from qdlm_jax.inference.generate import GenerationConfig


def test_sampler_settings_come_from_the_generation_config(tiny_gemma):
    assert tiny_gemma.gemma.steps == 4 and tiny_gemma.gemma.eos_ids == (2,)


def test_bucketed_generation_equals_the_sampler_on_the_bare_prompt(tiny_gemma):
    """TextModel.generate left-pads each prompt to a bucketed width (padding masked; RoPE is
    relative) and maps a task's settings onto the sampler: the completions equal
    `gemma_sample` on the unpadded prompt with the batch's key. (The noise of a batch is
    drawn for the batch, so rows are compared one per batch.)"""
    tm = tiny_gemma
    gen = GenerationConfig(gen_length=16, block_length=8, alg="maskgit_plus")  # a task's
    prompts = ["In 1990 the band released its"]
    batched = tm.generate(prompts, gen, batch_size=1, progress=False)
    settings = GemmaSampleSettings(max_new_tokens=16, steps=4, canvas_length=8,
                                   eos_ids=(2,), pad_id=0, greedy=True)
    alone = []
    for j, p in enumerate(prompts):
        ids = np.asarray([tm.prompt_ids(p)], np.int32)
        assert ids.shape[1] not in (8, 16, 24, 32)  # the bucketed width pads every prompt
        out = gemma_sample(tm.model, ids, settings=settings,
                           key=jax.random.fold_in(jax.random.key(0), j))
        alone.append(tm.decode_completion(np.asarray(out.tokens)[0, ids.shape[1]:]))
    assert batched == alone
    stats = tm.take_decode_stats()
    assert stats["forward_passes"] >= len(prompts)  # at least one pass per canvas and row
    assert 0 < stats["tokens_per_step"] <= 16


def test_loglik_is_the_negative_answer_score_times_its_length(tiny_gemma):
    tm = tiny_gemma
    key = context_key(0, "Two plus two is")
    ll = tm.loglik("Two plus two is", " four", key, mc_num=8)
    answer = tm.answer_ids(" four")
    score = answer_score(tm.model, np.asarray(tm.prompt_ids("Two plus two is")),
                         np.asarray(answer), key=key, samples=2)
    assert answer and ll == pytest.approx(-len(answer) * float(score), rel=1e-6)
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        tm.loglik("Two plus two is", " four", key, mc_num=8, cfg_scale=1.0)


def test_multiple_choice_task_runs(tiny_gemma, tmp_path):
    import json
    items = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)],
              "answer": 0} for a, b in [(1, 2), (3, 4), (2, 2)]]
    src = tmp_path / "mc.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in items))
    spec = tasks.MCTask(name="mc", path=str(src), mc_num=4, batch_size=4)
    r = tasks.run_task(tiny_gemma, spec, progress=False)
    assert r["n"] == 3 and 0 <= r["value"] <= 1
