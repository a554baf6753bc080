"""Fast-dLLM decoding (block-wise KV cache "prefix" / "dual", confidence-threshold and
factor-based parallel decoding) in the jitted LLaDA and Dream loops, token for token against
a plain PyTorch statement of Fast-dLLM's published algorithms
(tests/references/fast_dllm_reference.py) on the same tiny weights, at temperature 0, over
several block lengths, thresholds, factors and a left-padded batch.

The tiny random models are unsure (softmax over 256 tokens: confidences ~0.004-0.05), so the
thresholds here are small enough that some steps commit several tokens and others one; the
factors put the rule's threshold 1 - f / (j + 2) inside that range at some rank j.

`make test` runs each case under one cache setting, the settings taken in turn so that each
is covered; the full case x cache grid runs under `make test-slow`.
"""
import dataclasses

import jax
import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.inference import generate as G
from qdlm_jax.inference.common import factor_select
from qdlm_jax.inference.dream import dream_call, dream_settings
from qdlm_jax.inference.llada import llada_call, llada_settings, threshold_select
from tests.references.fast_dllm_reference import (
    CachedLlama,
    factor_count,
    fast_dllm_dream_ref,
    fast_dllm_generate_ref,
)
from tests.references.hf_reference import reference_model

P = 6


def _tiny_pair(tmp_path_factory, family, seed):
    """(config, our model, the eager reference model) of a 2-layer tiny checkpoint."""
    config = tiny_config(family, num_layers=2)
    path = write_hf_checkpoint(tmp_path_factory.mktemp(f"{family}2"), config, seed=seed)
    return config, load_model(path, dtype="float32"), CachedLlama(reference_model(path, config),
                                                                  config)


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return _tiny_pair(tmp_path_factory, "llada", 5)


def _prompts(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, size=(batch, P)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded by 3
    ids[mask == 0] = config.pad_token_id
    return ids, mask


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return _tiny_pair(tmp_path_factory, "dream", 6)


def _ours(model, ids, mask, **kw):
    s = llada_settings(model, **kw)
    s = dataclasses.replace(s, return_nfe=True)
    fn, args, static = llada_call(model, ids, mask, None, s)
    x, nfe = fn(*args, **static)
    return np.asarray(x), int(nfe)


def _ours_dream(model, ids, mask, *, gen_length, **kw):
    s = dataclasses.replace(dream_settings(model, max_new_tokens=gen_length, **kw),
                            return_nfe=True)
    fn, args, static = dream_call(model, ids, mask, None, s)
    x, nfe = fn(*args, **static)
    return np.asarray(x), int(nfe)


CASES = [
    # (gen_length, steps, block_length, threshold)
    (8, 8, 4, None),
    (12, 6, 4, None),  # 2 steps per block of 4: 2 tokens a step
    (16, 8, 8, 0.01),
    (12, 12, 4, 0.006),
    (8, 4, 8, 0.02),
    (8, 8, 2, 0.008),
]


FACTOR_CASES = [
    # (gen_length, steps, block_length, factor)
    (16, 8, 8, 2.95),  # rank 1's threshold 1 - 2.95/3 ~ 0.017: 1 or more tokens a step
    (12, 12, 4, 3.9),  # rank 2's threshold 0.025
    (8, 8, 4, 1.0),  # one token a step (two when two are left)
]


def _case_id(c):
    return "gen{}_steps{}_block{}_{}".format(*c)


CACHES = ("none", "prefix", "dual")


def cache_grid(cases, case_id, runs=lambda case, cache: True):
    """(case, cache) params over every pair: case i runs in `make test` under the i-th cache
    setting it runs with (in turn), every other pair is marked slow."""
    params = []
    for i, case in enumerate(cases):
        modes = [m for m in CACHES if runs(case, m)]
        for cache in modes:
            marks = () if cache == modes[i % len(modes)] else (pytest.mark.slow,)
            params.append(pytest.param(case, cache, marks=marks,
                                       id=f"{case_id(case)}-{cache}"))
    return params


def _check_llada(llada, cache, gen_length, steps, block_length, **rule):
    config, model, ref = llada
    ids, mask = _prompts(config)
    kw = dict(gen_length=gen_length, steps=steps, block_length=block_length, cache=cache,
              **rule)
    ours, nfe = _ours(model, ids, mask, **kw)
    want, want_nfe = fast_dllm_generate_ref(ref, ids, mask, mask_id=config.mask_token_id,
                                            **kw)
    np.testing.assert_array_equal(ours[:, :P], ids)
    assert not (ours == config.mask_token_id).any()
    np.testing.assert_array_equal(ours, want.numpy())
    assert nfe == want_nfe
    # one row alone (no padding anywhere) decodes as in the batch
    solo, _ = _ours(model, ids[1:], None, **kw)
    want_solo, _ = fast_dllm_generate_ref(ref, ids[1:], None, mask_id=config.mask_token_id,
                                          **kw)
    np.testing.assert_array_equal(solo, want_solo.numpy())
    return nfe


# the plain loop (no cache, no rule) is tests/inference/test_generate.py's
@pytest.mark.parametrize(("case", "cache"), cache_grid(
    CASES, _case_id, runs=lambda case, cache: cache != "none" or case[3] is not None))
def test_llada_fast_decoding_matches_fast_dllm(llada, case, cache):
    gen_length, steps, block_length, threshold = case
    nfe = _check_llada(llada, cache, gen_length, steps, block_length, threshold=threshold)
    if threshold is None:
        assert nfe == steps


@pytest.mark.parametrize(("case", "cache"), cache_grid(FACTOR_CASES, _case_id))
def test_llada_factor_decoding_matches_fast_dllm(llada, case, cache):
    gen_length, steps, block_length, factor = case
    _check_llada(llada, cache, gen_length, steps, block_length, factor=factor)


DREAM_CASES = [
    # (gen_length, steps, block_length, threshold, factor, alg)
    (8, 4, 4, None, None, "entropy"),  # 2 steps per block: first token, then the rest
    (12, 9, 4, None, None, "entropy"),
    (16, 8, 8, None, None, "maskgit_plus"),
    (16, 8, 8, 0.01, None, "entropy"),
    (12, 12, 4, 0.006, None, "entropy"),
    (8, 8, 2, None, 2.95, "entropy"),
    (16, 4, 8, None, 3.9, "entropy"),
]


# Dream's plain loop is tests/inference/test_generate.py's
@pytest.mark.parametrize(("case", "cache"), cache_grid(
    DREAM_CASES, lambda c: "gen{}_steps{}_block{}_tau{}_f{}_{}".format(*c),
    runs=lambda case, cache: cache != "none" or case[3] is not None or case[4] is not None))
def test_dream_fast_decoding_matches_fast_dllm(dream, case, cache):
    config, model, ref = dream
    gen_length, steps, block_length, threshold, factor, alg = case
    ids, mask = _prompts(config)
    kw = dict(gen_length=gen_length, steps=steps, block_length=block_length, cache=cache,
              threshold=threshold, factor=factor, alg=alg)
    ours, nfe = _ours_dream(model, ids, mask, **kw)
    want, want_nfe = fast_dllm_dream_ref(ref, ids, mask, mask_id=config.mask_token_id, **kw)
    np.testing.assert_array_equal(ours[:, :P], ids)
    assert not (ours == config.mask_token_id).any()
    np.testing.assert_array_equal(ours, want.numpy())
    assert nfe == want_nfe
    if threshold is None and factor is None:
        assert nfe == steps
    solo, _ = _ours_dream(model, ids[1:], None, **kw)
    want_solo, _ = fast_dllm_dream_ref(ref, ids[1:], None, mask_id=config.mask_token_id, **kw)
    np.testing.assert_array_equal(solo, want_solo.numpy())


def test_factor_select_rule_matches_the_reference_loop():
    """The vectorized factor rule against Fast-dLLM's loop (factor_count) on random rows
    with random masks, including rows with 0, 1 and 2 masked positions."""
    rng = np.random.default_rng(0)
    for factor in (0.5, 1.0, 2.0, 3.9):
        conf = rng.uniform(0.3, 1.0, size=(64, 8))
        masked = rng.uniform(size=conf.shape) < 0.6
        masked[0], masked[1], masked[2] = False, np.arange(8) == 3, np.arange(8) < 2
        conf = np.where(masked, conf, -np.inf).astype(np.float32)
        sel = np.asarray(factor_select(jax.numpy.asarray(conf), factor))
        for r in range(conf.shape[0]):
            vals = np.sort(conf[r][masked[r]])[::-1]
            n = factor_count(vals.tolist(), factor) if len(vals) else 0
            assert sel[r].sum() == n
            assert not (sel[r] & ~masked[r]).any()
            if n:  # the n most confident
                assert conf[r][sel[r]].min() >= vals[n - 1]


def test_thresholds_decode_in_parallel(llada):
    """A low threshold takes fewer forward passes than steps; tau=1 commits one per step."""
    config, model, _ = llada
    ids, mask = _prompts(config)
    kw = dict(gen_length=16, steps=16, block_length=8, cache="dual")
    _, nfe_low = _ours(model, ids, mask, threshold=0.006, **kw)
    _, nfe_one = _ours(model, ids, mask, threshold=1.0, **kw)
    assert nfe_low < 16
    assert nfe_one == 16


def test_threshold_select_rule():
    inf = -np.inf
    conf = jax.numpy.asarray([[0.2, 0.95, inf, 0.91], [0.3, 0.1, inf, inf],
                              [inf, inf, inf, inf], [0.5, 0.5, inf, 0.1]])
    sel = np.asarray(threshold_select(conf, 0.9))
    np.testing.assert_array_equal(sel, [[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0],
                                        [1, 0, 0, 0]])


def test_generate_with_order_under_a_threshold(llada):
    config, model, _ = llada
    ids, mask = _prompts(config)
    kw = dict(gen_length=8, steps=8, block_length=4, cache="prefix", threshold=0.008)
    tokens, order = map(np.asarray, G.generate_with_order(model, ids, mask, **kw))
    np.testing.assert_array_equal(tokens, G.generate(model, ids, mask, **kw))
    assert (order[:, :P] == -1).all() and (order[:, P:] >= 0).all()
    # blocks in order: every position of block 1 was decided after every one of block 0
    assert (order[:, P:P + 4].max(1) < order[:, P + 4:].min(1)).all()


def test_generation_config_and_errors(llada):
    config, model, _ = llada
    ids, mask = _prompts(config)
    gen = G.GenerationConfig(steps=8, gen_length=8, block_length=4, cache="dual",
                             threshold=0.01)
    a = np.asarray(G.generate(model, ids, mask, config=gen))
    b = np.asarray(G.llada_generate(model, ids, mask, gen_length=8, steps=8, block_length=4,
                                    cache="dual", threshold=0.01))
    np.testing.assert_array_equal(a, b)
    for kw, match in ((dict(cache="full"), "cache='full'"),
                      (dict(threshold=1.5), "threshold=1.5"),
                      (dict(threshold=0.0), "threshold=0.0"),
                      (dict(cache="prefix", cfg_scale=1.0), "classifier-free guidance")):
        with pytest.raises(ValueError, match=match):
            G.generate(model, ids, mask, gen_length=8, steps=8, block_length=4, **kw)


# slow: a quantized model under every cache setting (the float model's settings run in `make test`)
@pytest.mark.slow
def test_quantized_model_runs_with_every_cache_setting(llada):
    """RTN W4 packed weights: keys and values come from the quantized projections."""
    from qdlm_jax.models.params import get_params, model_from_params
    from qdlm_jax.quant import QuantizedArray, QuantSpec, rtn_quantize_params
    config, model, _ = llada
    qparams = rtn_quantize_params(get_params(model), QuantSpec(bits=4, group_size=32))
    assert any(isinstance(v, QuantizedArray) for v in qparams.values())
    qmodel = model_from_params(config, qparams)
    ids, mask = _prompts(config)
    for cache, threshold in (("none", 0.01), ("prefix", None), ("dual", 0.01)):
        out, nfe = _ours(qmodel, ids, mask, gen_length=8, steps=8, block_length=4,
                         cache=cache, threshold=threshold)
        np.testing.assert_array_equal(out[:, :P], ids)
        assert not (out == config.mask_token_id).any()
        assert 1 <= nfe <= 8


# slow: the same loop settings run quantized on LLaDA above; Dream's cached loops are
# checked token for token against Fast-dLLM
@pytest.mark.slow
def test_quantized_dream_runs_with_every_cache_setting(dream):
    """RTN W4 packed Dream: every cache with a threshold, a factor and the step schedule."""
    from qdlm_jax.models.params import get_params, model_from_params
    from qdlm_jax.quant import QuantizedArray, QuantSpec, rtn_quantize_params
    config, model, _ = dream
    qparams = rtn_quantize_params(get_params(model), QuantSpec(bits=4, group_size=32))
    assert any(isinstance(v, QuantizedArray) for v in qparams.values())
    qmodel = model_from_params(config, qparams)
    ids, mask = _prompts(config)
    for cache in ("none", "prefix", "dual"):
        for rule in (dict(threshold=0.01), dict(factor=2.95), {}):
            if cache == "none" and not rule:
                continue
            out, nfe = _ours_dream(qmodel, ids, mask, gen_length=8, steps=4, block_length=4,
                                   cache=cache, alg="entropy", **rule)
            np.testing.assert_array_equal(out[:, :P], ids)
            assert not (out == config.mask_token_id).any() and 1 <= nfe <= 8
            assert nfe == 4 or rule


@pytest.mark.slow
def test_activation_quantized_dream_runs_with_every_cache_setting(dream):
    """QuaRot W4A4 with 8-bit K/V (keys/values from the quantized projections, quantized
    again inside attention): Dream's block decoding runs with every cache setting."""
    from qdlm_jax.quant.act_core import ActSpec
    from qdlm_jax.quant.kv_core import KVSpec
    from qdlm_jax.quant.quantizer_core import QuantSpec
    from qdlm_jax.quant.wa import WASpec, quantize_model_wa
    config, model, _ = dream
    ids, mask = _prompts(config)
    qmodel, _ = quantize_model_wa(model, None, WASpec(
        method="quarot", weight=QuantSpec(bits=4, group_size=32), act=ActSpec(bits=4),
        kv=KVSpec(bits=8)), progress=False)
    for cache in ("none", "prefix", "dual"):
        out, nfe = _ours_dream(qmodel, ids, mask, gen_length=8, steps=8, block_length=4,
                               cache=cache, threshold=0.01, alg="entropy")
        np.testing.assert_array_equal(out[:, :P], ids)
        assert not (out == config.mask_token_id).any() and 1 <= nfe <= 8


def test_dream_settings_errors(dream):
    config, model, _ = dream
    ids, mask = _prompts(config)
    kw = dict(gen_length=8, steps=8)
    for extra, match in ((dict(cache="dual", block_length=3), "not divisible by block_length"),
                         (dict(cache="dual", block_length=4, steps=2),
                          "at least 2 steps per block"),
                         (dict(cache="prefix", block_length=4, alg="origin"), "alg='origin'"),
                         (dict(threshold=0.5, factor=1.0), "set one of them"),
                         (dict(block_length=4), "does not apply to a dream model"),
                         (dict(cfg_scale=1.0, cache="dual"), "cfg_scale")):
        with pytest.raises(ValueError, match=match):
            G.generate(model, ids, mask, **(kw | extra))
    # block_length=None: one block of gen_length
    a = G.generate(model, ids, mask, cache="dual", threshold=0.01, block_length=None, **kw)
    b = G.dream_generate(model, ids, mask, max_new_tokens=8, steps=8, cache="dual",
                         threshold=0.01, block_length=8)
    np.testing.assert_array_equal(a, b)


def test_cli_generate_with_cache_and_threshold(tmp_path, capsys):
    from qdlm_jax.cli import main
    from tests.inference.test_generate import _word_tokenizer
    config = tiny_config("llada", num_layers=1)
    path = write_hf_checkpoint(tmp_path / "ckpt", config, seed=3)
    _word_tokenizer(path / "tokenizer.json", config.vocab_size)
    rc = main(["generate", "--model", str(path), "--prompt", "w5 w6 w7",
               "--config.gen.steps=8", "--config.gen.gen_length=8",
               "--config.gen.block_length=4", "--config.gen.cache=dual",
               "--config.gen.threshold=0.9", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("w5 w6 w7") and len(out.split()) == 3 + 8
    rc = main(["generate", "--model", str(path), "--prompt", "w1", "--config.gen.steps=8",
               "--config.gen.gen_length=8", "--config.gen.cache=both"])
    assert rc == 2
    assert "cache='both'" in capsys.readouterr().err


def test_eval_task_files_take_cache_and_threshold():
    """`qdlm eval --task-file` reads a task's `gen` through GenerationConfig."""
    from qdlm_jax.evals.tasks import task_from_mapping
    spec = task_from_mapping({"base": "arithmetic", "name": "arithmetic_dual",
                              "gen": {"cache": "dual", "threshold": 0.9}})
    assert (spec.gen.cache, spec.gen.threshold) == ("dual", 0.9)
    with pytest.raises(ValueError, match="threshold=2"):
        task_from_mapping({"base": "arithmetic", "gen": {"threshold": 2}})


@pytest.mark.slow
def test_activation_quantized_model_runs_with_every_cache_setting(llada):
    """QuaRot W4A4 (online Hadamards, per-token activation quantization): a window over a
    cache filled from the same tokens gives the full pass's hidden states (the cached keys
    and values come from the quantized projections), and every cache setting decodes; with
    8-bit K/V quantization inside attention too."""
    import jax.numpy as jnp

    from qdlm_jax.quant.act_core import ActSpec
    from qdlm_jax.quant.kv_core import KVSpec
    from qdlm_jax.quant.quantizer_core import QuantSpec
    from qdlm_jax.quant.wa import WASpec, quantize_model_wa
    config, model, _ = llada
    ids, mask = _prompts(config)
    for kv in (None, KVSpec(bits=8)):
        qmodel, _ = quantize_model_wa(model, None, WASpec(
            method="quarot", weight=QuantSpec(bits=4, group_size=32), act=ActSpec(bits=4),
            kv=kv), progress=False)
        if kv is None:
            x = jnp.asarray(np.concatenate([ids, np.full((2, 8), config.mask_token_id,
                                                         np.int32)], 1))
            m = jnp.asarray(np.concatenate([mask, np.ones((2, 8), np.int32)], 1))
            full = qmodel.hidden_states(x, m)
            _, cache = qmodel.hidden_states_with_kv(x, m)
            win = qmodel.hidden_states_cached(x[:, P:P + 4], P, cache, m)
            np.testing.assert_allclose(win, full[:, P:P + 4], atol=1e-4)
        for cache in ("none", "prefix", "dual"):
            out, nfe = _ours(qmodel, ids, mask, gen_length=8, steps=8, block_length=4,
                             cache=cache, threshold=0.01)
            np.testing.assert_array_equal(out[:, :P], ids)
            assert not (out == config.mask_token_id).any() and 1 <= nfe <= 8


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_model_that_only_proposes_the_mask_token_stops(tmp_path, family, cache):
    """With a zero head every logit is 0, so the argmax is token 0; with the mask token at id
    0 every deterministic commit writes the mask back and no step makes progress. Fast-dLLM's
    loop repeats such a step forever; ours stops each block there: the call returns, the
    generated positions stay masked, and each block spent only the passes up to the first
    step without progress: LLaDA's first step (1 a block), Dream's first step, which fills
    only the block's first position, and its next (2 a block)."""
    config = dataclasses.replace(tiny_config(family, num_layers=1), mask_token_id=0)
    model = load_model(write_hf_checkpoint(tmp_path, config, seed=0), dtype="float32")
    model.lm_head.kernel.value = jax.numpy.zeros_like(model.lm_head.kernel.value)
    ids = np.full((1, P), 7, np.int32)
    kw = dict(gen_length=8, steps=8, block_length=4, threshold=0.5, cache=cache)
    x, nfe = (_ours if family == "llada" else _ours_dream)(model, ids, None, **kw)
    assert (x[:, P:] == 0).all()
    assert nfe == (1 if family == "llada" else 2) * (8 // 4)
