"""Generation: our jitted loops against plain PyTorch statements of the published algorithms
(tests/references/reference_algorithms.py) run on transformers models with the same tiny weights.

Deterministic paths (temperature 0, low_confidence / maskgit_plus / topk_margin / entropy) are
compared token for token. Stochastic paths that consume uniforms (LLaDA Gumbel noise and
random remasking, Dream `origin`) are compared token for token by feeding the reference the
uniforms our loop draws (the key derivation documented in qdlm_jax/inference/generate.py). Paths
whose
published code draws from torch's samplers (Dream categorical sampling at T > 0, multinomial
without replacement for alg_temp > 0) are tested for reproducibility, key dependence and
invariants, and the Gumbel-top-k position sampler statistically.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.inference import generate as G
from qdlm_jax.inference.common import top_k_select
from tests.references.hf_reference import reference_model
from tests.references.reference_algorithms import dream_generate_ref, hf_forward, llada_generate_ref

P = 5  # prompt length


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    config = tiny_config("llada", num_layers=1)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("llada"), config, seed=3)
    return config, load_model(path, dtype="float32"), hf_forward(reference_model(path, config))


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    config = tiny_config("dream", num_layers=1)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("dream"), config, seed=4)
    return config, load_model(path, dtype="float32"), hf_forward(reference_model(path, config))


def _prompts(config, padded: bool, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, size=(batch, P)).astype(np.int32)
    if not padded:
        return ids, None
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # row 0 left-padded by 2, row 1 full
    ids[mask == 0] = config.pad_token_id
    return ids, mask


def _llada_uniforms(key, batch, block_length, vocab):
    def uniforms(g, kind):
        k_gumbel, k_remask = jax.random.split(jax.random.fold_in(key, g))
        if kind == "gumbel":
            return np.asarray(jax.random.uniform(k_gumbel, (batch, block_length, vocab)))
        return np.asarray(jax.random.uniform(k_remask, (batch, block_length)))
    return uniforms


def _dream_uniforms(key, batch, n):
    def uniforms(i, kind):
        assert kind == "transfer"
        k_transfer, _, _ = jax.random.split(jax.random.fold_in(key, i), 3)
        return np.asarray(jax.random.uniform(k_transfer, (batch, n)))
    return uniforms


# ---- LLaDA -----------------------------------------------------------------------------------

LLADA_CASES = {
    # name: (settings, padded)
    "one_block": (dict(gen_length=8, steps=4, block_length=8), False),
    "blocks_padded": (dict(gen_length=12, steps=6, block_length=4), True),
    # 6 steps per block of 4 tokens: the schedule is 1, 1, 1, 1, 0, 0.
    "random_remask_more_steps_than_tokens": (dict(gen_length=8, steps=12, block_length=4,
                                                  remasking="random"), True),
    "cfg_eos_suppression_padded": (dict(gen_length=8, steps=4, block_length=4, cfg_scale=1.5,
                                        logits_eos_inf=True, confidence_eos_eot_inf=True),
                                   True),
    "gumbel_cfg_padded": (dict(gen_length=8, steps=8, block_length=4, temperature=0.7,
                               cfg_scale=0.5), True),
}


@pytest.mark.parametrize("name", list(LLADA_CASES))
def test_llada_matches_reference(llada, name):
    config, model, ref_forward = llada
    settings, padded = LLADA_CASES[name]
    ids, mask = _prompts(config, padded)
    key = jax.random.key(7)
    ours = np.asarray(G.llada_generate(model, ids, mask, key=key, **settings))
    uniforms = _llada_uniforms(key, ids.shape[0], settings["block_length"], config.vocab_size)
    ref = llada_generate_ref(ref_forward, ids, mask, mask_id=config.mask_token_id,
                             eos_id=config.eos_token_id, eot_id=config.eot_token_id,
                             uniforms=uniforms, **settings).numpy()
    assert ours.shape == (2, P + settings["gen_length"])
    np.testing.assert_array_equal(ours[:, :P], ids)
    assert not (ours == config.mask_token_id).any()
    np.testing.assert_array_equal(ours, ref)
    if settings.get("logits_eos_inf"):
        assert not (ours[:, P:] == config.eos_token_id).any()


def test_llada_sampling_reproducible_and_key_dependent(llada):
    config, model, _ = llada
    ids, mask = _prompts(config, True)
    settings = LLADA_CASES["gumbel_cfg_padded"][0]
    a = np.asarray(G.llada_generate(model, ids, mask, key=jax.random.key(1), **settings))
    b = np.asarray(G.llada_generate(model, ids, mask, key=jax.random.key(1), **settings))
    c = np.asarray(G.llada_generate(model, ids, mask, key=jax.random.key(2), **settings))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_llada_commits_the_scheduled_count_per_step():
    # A block of 10 over 4 steps: 3, 3, 2, 2 (the remainder goes to the first steps).
    np.testing.assert_array_equal(G.llada_transfer_schedule(10, 4), [3, 3, 2, 2])
    np.testing.assert_array_equal(G.llada_transfer_schedule(4, 6), [1, 1, 1, 1, 0, 0])


# ---- Dream -----------------------------------------------------------------------------------

DREAM_CASES = {
    "origin_padded": (dict(max_new_tokens=8, steps=4, alg="origin"), True),
    "maskgit_plus_padded": (dict(max_new_tokens=8, steps=4, alg="maskgit_plus"), True),
    "topk_margin": (dict(max_new_tokens=10, steps=5, alg="topk_margin"), False),
    "entropy_top_p_top_k_padded": (dict(max_new_tokens=8, steps=8, alg="entropy", top_p=0.9,
                                        top_k=20), True),
}


@pytest.mark.parametrize("name", list(DREAM_CASES))
def test_dream_matches_reference(dream, name):
    config, model, ref_forward = dream
    settings, padded = DREAM_CASES[name]
    ids, mask = _prompts(config, padded, seed=1)
    key = jax.random.key(11)
    ours = np.asarray(G.dream_generate(model, ids, mask, key=key, **settings))
    uniforms = _dream_uniforms(key, ids.shape[0], settings["max_new_tokens"])
    ref = dream_generate_ref(ref_forward, ids, mask, mask_id=config.mask_token_id,
                             uniforms=uniforms, **settings).numpy()
    np.testing.assert_array_equal(ours[:, :P], ids)
    assert not (ours == config.mask_token_id).any()
    np.testing.assert_array_equal(ours, ref)


def test_dream_sampling_reproducible_key_dependent_complete(dream):
    config, model, _ = dream
    ids, mask = _prompts(config, True, seed=2)
    settings = dict(max_new_tokens=8, steps=4, alg="entropy", alg_temp=0.5, temperature=0.8,
                    top_p=0.95)
    a = np.asarray(G.dream_generate(model, ids, mask, key=jax.random.key(1), **settings))
    b = np.asarray(G.dream_generate(model, ids, mask, key=jax.random.key(1), **settings))
    c = np.asarray(G.dream_generate(model, ids, mask, key=jax.random.key(2), **settings))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(a[:, :P], ids)
    assert not (a == config.mask_token_id).any()


def test_dream_schedule_matches_torch_float32():
    """k_i = int(m_i (1 - s/t)) with torch's float32 linspace, for many (N, steps, eps)."""
    for steps in (1, 2, 3, 5, 7, 16, 33, 64, 128, 256):
        for n in (steps, 2 * steps, 10, 128):
            for eps in (1e-3, 1e-2):
                ts = torch.linspace(1, eps, steps + 1)
                m, ref = n, []
                for i in range(steps):
                    num = torch.tensor(float(m))
                    k = int(num * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else int(num)
                    ref.append(k)
                    m -= k
                ours = G.dream_transfer_schedule(n, steps, eps)
                np.testing.assert_array_equal(ours, ref, err_msg=f"{n=} {steps=} {eps=}")
                assert ours.sum() == n


def test_gumbel_top_k_samples_without_replacement_from_softmax():
    """alg_temp > 0: top-k of conf/alg_temp + Gumbel ~ sequential sampling without
    replacement from softmax(conf / alg_temp) (what torch.multinomial does)."""
    conf = jnp.array([0.0, -0.5, -1.0, -3.0, -jnp.inf])
    temp, n_draws = 0.7, 8000
    keys = jax.random.split(jax.random.key(0), n_draws)

    def draw(k):
        scores = conf / temp + jax.random.gumbel(k, conf.shape)
        return top_k_select(scores[None], jnp.int32(2), 2)[0]

    sel = np.asarray(jax.jit(jax.vmap(draw))(keys))
    assert (sel.sum(1) == 2).all() and not sel[:, 4].any()
    p = np.exp(np.asarray(conf[:4]) / temp)
    p /= p.sum()
    # P(i in the pair) = p_i + sum_{j != i} p_j p_i / (1 - p_j)
    expected = [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i)
                for i in range(4)]
    np.testing.assert_allclose(sel[:, :4].mean(0), expected, atol=0.025)


def test_generate_with_order_records_the_decoding_step(llada, dream):
    """Same tokens as `generate`; order = the step each position was committed at (-1 on
    the prompt), with the scheduled number of positions per step."""
    for (config, model, _), kw in ((llada, dict(gen_length=12, steps=6, block_length=4)),
                                   (dream, dict(gen_length=8, steps=4, alg="maskgit_plus"))):
        ids, mask = _prompts(config, True, seed=0 if config.family == "llada" else 1)
        tokens, order = map(np.asarray, G.generate_with_order(model, ids, mask, **kw))
        np.testing.assert_array_equal(tokens, G.generate(model, ids, mask, **kw))
        assert (order[:, :P] == -1).all()
        gen_order = order[:, P:]
        assert gen_order.min() >= 0 and gen_order.max() < kw["steps"]
        counts = np.stack([(gen_order == k).sum(1) for k in range(kw["steps"])], 1)
        if config.family == "llada":
            expected = np.tile(G.llada_transfer_schedule(4, 2), 3)
        else:
            expected = G.dream_transfer_schedule(8, 4, 1e-3)
        np.testing.assert_array_equal(counts, np.broadcast_to(expected, counts.shape))


# ---- dispatch, errors ------------------------------------------------------------------------

def test_generate_dispatches_by_family(llada, dream):
    _, lmodel, _ = llada
    _, dmodel, _ = dream
    ids, _ = _prompts(lmodel.config, False)
    a = G.generate(lmodel, ids, gen_length=8, steps=4, block_length=8)
    b = G.llada_generate(lmodel, ids, gen_length=8, steps=4, block_length=8)
    np.testing.assert_array_equal(a, b)
    c = G.generate(dmodel, ids, gen_length=10, steps=5, alg="topk_margin", block_length=None)
    d = G.dream_generate(dmodel, ids, max_new_tokens=10, steps=5, alg="topk_margin")
    np.testing.assert_array_equal(c, d)
    run = G.compile_generate(lmodel, ids, gen_length=8, steps=4, block_length=8)
    np.testing.assert_array_equal(run(), a)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=10, steps=4, block_length=4), "gen_length=10 is not divisible by "
                                                    "block_length=4"),
    (dict(gen_length=8, steps=3, block_length=4), "steps=3 is not divisible"),
    (dict(gen_length=8, steps=4, block_length=4, remasking="lowest"), "remasking='lowest'"),
    (dict(gen_length=8, steps=4, block_length=4, temperature=-1.0), "temperature=-1.0"),
    (dict(gen_length=0, steps=4, block_length=4), "gen_length=0"),
    (dict(gen_length=8, steps=4, block_length=4, temperature=0.5), "key=None"),
])
def test_llada_bad_arguments(llada, kwargs, match):
    config, model, _ = llada
    ids, _ = _prompts(config, False)
    with pytest.raises(ValueError, match=match):
        G.llada_generate(model, ids, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=8, steps=4, alg="greedy"), "alg='greedy'"),
    (dict(max_new_tokens=8, steps=4, alg="entropy", top_p=1.5), "top_p=1.5"),
    (dict(max_new_tokens=8, steps=4, alg="entropy", top_k=0), "top_k=0"),
    (dict(max_new_tokens=8, steps=0, alg="entropy"), "steps=0"),
    (dict(max_new_tokens=8, steps=4, alg="origin"), "key=None"),
])
def test_dream_bad_arguments(dream, kwargs, match):
    config, model, _ = dream
    ids, _ = _prompts(config, False)
    with pytest.raises(ValueError, match=match):
        G.dream_generate(model, ids, **kwargs)


def test_generate_rejects_other_family_options_and_masked_prompts(llada, dream):
    _, lmodel, _ = llada
    _, dmodel, _ = dream
    ids, _ = _prompts(lmodel.config, False)
    with pytest.raises(ValueError, match="cfg_scale=1.0 does not apply to a dream model"):
        G.generate(dmodel, ids, gen_length=8, steps=4, cfg_scale=1.0)
    with pytest.raises(ValueError, match="alg='maskgit_plus' does not apply to a llada"):
        G.generate(lmodel, ids, gen_length=8, steps=4, alg="maskgit_plus")
    bad = ids.copy()
    bad[0, 1] = lmodel.config.mask_token_id
    with pytest.raises(ValueError, match="contains the mask token"):
        G.llada_generate(lmodel, bad, gen_length=8, steps=4, block_length=8)


def test_loop_runs_any_params_tree_the_model_takes(llada):
    """A params tree with a registered quantized kernel type (int8 weights + per-channel
    scales in every linear layer) runs through the same loop code; its greedy tokens equal
    those of the float model with the dequantized weights."""
    import dataclasses

    from flax import nnx

    from qdlm_jax.models import register_kernel_type

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Int8Kernel:
        q: jax.Array
        scale: jax.Array

        def __getitem__(self, idx):  # `kernel[...]` in Linear returns the kernel itself
            return self

        def dequant(self):
            return self.q.astype(jnp.float32) * self.scale

    register_kernel_type(Int8Kernel, lambda x, k: jnp.einsum(
        "...i,io->...o", x, k.dequant().astype(x.dtype)))
    config, model, _ = llada
    graphdef, state = nnx.split(nnx.clone(model))  # (split state shares the Variables)
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    n_quant = 0
    for path, var in leaves:
        if "kernel" in str(path[-1]):
            w = var.get_value()
            scale = jnp.max(jnp.abs(w), axis=0) / 127.0
            kernel = Int8Kernel(jnp.round(w / scale).astype(jnp.int8), scale)
            var.set_value(kernel)
            n_quant += 1
    assert n_quant == 8  # 7 per layer + the LM head
    quantized = nnx.merge(graphdef, state)
    float_twin = nnx.merge(graphdef, jax.tree.map(
        lambda v: v.dequant() if isinstance(v, Int8Kernel) else v, state,
        is_leaf=lambda v: isinstance(v, Int8Kernel)))
    ids, mask = _prompts(config, True)
    settings = LLADA_CASES["blocks_padded"][0]  # the float twin reuses that compiled loop
    q_out = np.asarray(G.llada_generate(quantized, ids, mask, **settings))
    f_out = np.asarray(G.llada_generate(float_twin, ids, mask, **settings))
    np.testing.assert_array_equal(q_out, f_out)
    assert not (q_out == config.mask_token_id).any()


# ---- CLI ---------------------------------------------------------------------------------------

def _word_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_cli_generate_with_tokenizer_and_overrides(tmp_path, capsys):
    from qdlm_jax.cli import main
    config = tiny_config("llada", num_layers=1)
    path = write_hf_checkpoint(tmp_path / "ckpt", config, seed=3)
    _word_tokenizer(path / "tokenizer.json", config.vocab_size)
    rc = main(["generate", "--model", str(path), "--prompt", "w5 w6 w7", "--prompt", "w9",
               "--config.gen.steps=4", "--config.gen.gen_length=8",
               "--config.gen.block_length=4", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    for stage in ("loading", "compiled in", "running", "tokens/s"):
        assert stage in err
    assert "--- sample 0 ---" in out and "--- sample 1 ---" in out
    first = out.split("--- sample 1 ---")[0].split("--- sample 0 ---")[1].strip()
    assert first.startswith("w5 w6 w7") and len(first.split()) > 3

    rc = main(["generate", "--model", str(path), "--prompt", "w1", "--config.gen.steps=3",
               "--config.gen.gen_length=8", "--config.gen.block_length=4"])
    assert rc == 2
    assert "steps=3 is not divisible" in capsys.readouterr().err


def test_cli_config_file_matches_builtin_defaults():
    from pathlib import Path

    from qdlm_jax.commands.generate import default_config
    from qdlm_jax.jobs.config_flags import load_config_file
    root = Path(__file__).resolve().parents[2]
    assert load_config_file(root / "configs" / "generate.py").to_dict() == \
        default_config().to_dict()
