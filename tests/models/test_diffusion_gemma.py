"""The Flax DiffusionGemma against transformers' DiffusionGemmaForBlockDiffusion in fp32.

Each tiny config builds one transformers model with random weights (norm weights, router
scales and both layer-scalar sets randomised too), loads its full state dict (vision tower and
tied encoder twins included) through the checkpoint key map, and runs the generation's own
call pattern on both: encode a left-padded prompt longer than the sliding window, decode a
canvas with and without self-conditioning logits, encode that canvas, decode the next one.
Encoder K/V per layer, router top-k choices (encoder and decoder passes) and logits must agree.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DiffusionGemmaConfig as HFConfig
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from qdlm_jax.checkpoints.diffusion_gemma import params_from_state_dict
from qdlm_jax.errors import ConfigError
from qdlm_jax.models import Capture
from qdlm_jax.models.diffusion_gemma import (
    abstract_model,
    init_cache,
    layer_kv,
    linear_names,
    model_from_params,
)
from qdlm_jax.models.experts import moe, moe_dense
from qdlm_jax.models.gemma_config import FULL, SLIDING, DiffusionGemmaConfig

ATOL = 1e-4
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32,
                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=8, patch_size=4, position_embedding_size=16)


@dataclasses.dataclass(frozen=True)
class Case:
    config: DiffusionGemmaConfig
    prompt: int  # P > sliding_window
    pad: int  # left padding of row 1


CASES = {
    # [S, S, F]: 4 -> 1 query groups, global head 16 vs 8, 4 experts top-2.
    "ssf": Case(DiffusionGemmaConfig(
        vocab_size=96, hidden_size=32, num_layers=3, layer_types=(SLIDING, SLIDING, FULL),
        num_heads=4, num_kv_heads=2, head_dim=8, num_global_kv_heads=1, global_head_dim=16,
        intermediate_size=48, num_experts=4, top_k=2, moe_intermediate_size=24,
        sliding_window=4, canvas_length=6, rope_theta=100.0, global_rope_theta=1000.0),
        prompt=9, pad=3),
    # [F, S, S, F]: global head 32 with p = 1/4 (dims 0-3 and 16-19 rotate), 5 experts top-3.
    "fssf": Case(DiffusionGemmaConfig(
        vocab_size=80, hidden_size=24, num_layers=4, layer_types=(FULL, SLIDING, SLIDING, FULL),
        num_heads=4, num_kv_heads=4, head_dim=16, num_global_kv_heads=2, global_head_dim=32,
        intermediate_size=40, num_experts=5, top_k=3, moe_intermediate_size=16,
        sliding_window=6, canvas_length=5, rope_theta=50.0, global_rope_theta=500.0),
        prompt=11, pad=4),
}


def _randomize(hf: DiffusionGemmaForBlockDiffusion, seed: int) -> None:
    """Weights of scale 1/sqrt(fan_in), norms and scales 1 +- 0.3, distinct layer scalars for
    the two passes (the encoder's text weights are tied to these, so they follow).

    The q/k norm weights are halved: with attention scale 1 the scores grow like the head
    width, and at weights ~1 the softmax is so sharp that fp32 rounding alone (transformers'
    own fp32 against fp64) moves the logits by ~1e-4."""
    g = torch.Generator().manual_seed(seed)
    dec = hf.model.decoder
    enc = hf.model.encoder.language_model
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.5 * (1.0 + 0.3 * torch.randn(p.shape, generator=g)))
            elif name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for layer in (*dec.layers, *enc.layers):
            layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=g))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    """(case, transformers model, our model, dropped vision names), shared by a module."""
    case = CASES[request.param]
    torch.manual_seed(0)
    hf_cfg = HFConfig(**{**case.config.to_hf(), "vision_config": TINY_VISION})
    hf = DiffusionGemmaForBlockDiffusion(hf_cfg).eval()
    _randomize(hf, seed=1)
    tensors = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    params, dropped = params_from_state_dict(case.config, tensors)
    model = model_from_params(case.config, {p: jnp.asarray(v) for p, v in params.items()})
    return case, hf, model, dropped


@nnx.jit
def _encode(model, ids, positions, cache, valid):
    routes = {}
    cache = model.encode(ids, positions, cache, valid, routes=routes)
    return cache, routes


@nnx.jit
def _decode(model, canvas, sc_logits, cache, positions):
    routes = {}
    logits = model.decode(canvas, sc_logits, cache, positions, routes=routes)
    return logits, routes


class _RouterLog:
    """Top-k expert ids of every router call of the transformers model, per module."""

    def __init__(self, hf):
        self.ids = {}
        self.handles = []
        for mode, layers in (("enc", hf.model.encoder.language_model.layers),
                             ("dec", hf.model.decoder.layers)):
            for i, layer in enumerate(layers):
                self.handles.append(layer.router.register_forward_hook(self._hook((mode, i))))

    def _hook(self, key):
        def hook(module, args, output):
            self.ids[key] = output[2].detach().numpy()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _hf_encode(hf, cache, ids, positions, full_mask):
    dummy = torch.empty((ids.shape[0], ids.shape[1], 0))
    mapping = hf.model.encoder.create_masks_for_generate(
        config=hf.config, inputs_embeds=dummy, attention_mask=full_mask, past_key_values=cache,
        position_ids=positions)
    with torch.no_grad():
        hf.model.encoder(input_ids=ids, attention_mask=mapping, past_key_values=cache,
                         position_ids=positions)


def _hf_decode(hf, cache, canvas, sc_logits, positions, full_mask):
    mapping = hf.model.decoder.create_diffusion_decoder_attention_mask(
        config=hf.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
        decoder_attention_mask=full_mask)
    with torch.no_grad():
        out = hf(decoder_input_ids=canvas, self_conditioning_logits=sc_logits,
                 decoder_attention_mask=mapping, past_key_values=cache,
                 decoder_position_ids=positions)
    return out.logits.numpy()


def _compare_cache(config, hf_cache, cache, valid_tokens, errors):
    """Every layer's cached K/V at the real tokens it holds (sliding: the last W-1)."""
    for i in range(config.num_layers):
        k, v, index = (np.asarray(a) for a in layer_kv(config, cache, i))
        hk = hf_cache.layers[i].keys.numpy().transpose(0, 2, 1, 3)
        hv = hf_cache.layers[i].values.numpy().transpose(0, 2, 1, 3)
        assert hk.shape == k.shape, (i, hk.shape, k.shape)
        real = valid_tokens[:, index]  # [B, S]
        errors.append(np.max(np.abs(hk - k)[real]))
        errors.append(np.max(np.abs(hv - v)[real]))


def _compare_routes(hf_log, ours, mode, tokens_ok):
    for (m, i), hf_ids in hf_log.ids.items():
        if m != mode:
            continue
        mine = np.asarray(ours[i][0]).reshape(hf_ids.shape)
        ok = tokens_ok.reshape(-1)
        np.testing.assert_array_equal(mine[ok], hf_ids[ok], err_msg=f"{mode} layer {i}")


def test_encoder_cache_routes_and_logits_match_transformers(pair):
    case, hf, model, _ = pair
    c = case.config
    rng = np.random.default_rng(2)
    b, p, n = 2, case.prompt, c.canvas_length
    assert p > c.sliding_window
    ids = rng.integers(0, c.vocab_size, (b, p))
    mask = np.ones((b, p), bool)
    mask[1, :case.pad] = False
    ids[~mask] = c.pad_token_id
    log = _RouterLog(hf)
    errors = {"kv": [], "logits": []}
    try:
        hf_cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
        enc_pos = np.arange(p)[None].repeat(b, 0)
        _hf_encode(hf, hf_cache, torch.tensor(ids), torch.tensor(enc_pos[:1]), torch.tensor(mask))
        cache = init_cache(c, b, p + 2 * n)
        cache, routes = _encode(model, jnp.asarray(ids), jnp.asarray(enc_pos), cache,
                                jnp.asarray(mask))
        assert int(cache.length) == p
        valid_tokens = np.concatenate([mask, np.ones((b, 2 * n), bool)], axis=1)
        _compare_cache(c, hf_cache, cache, valid_tokens, errors["kv"])
        _compare_routes(log, routes, "enc", mask)

        sc = None
        for step in range(2):  # canvas 1 (after the prompt), canvas 2 (after canvas 1)
            start = p + step * n
            dec_pos = np.arange(start, start + n)[None].repeat(b, 0)
            full_mask = torch.tensor(valid_tokens[:, :start + n])
            canvas = rng.integers(0, c.vocab_size, (b, n))
            for with_sc in (False, True):
                sc = (rng.standard_normal((b, n, c.vocab_size)) * 3).astype(np.float32) \
                    if with_sc else None
                log.ids.clear()
                ref = _hf_decode(hf, hf_cache, torch.tensor(canvas),
                                 None if sc is None else torch.tensor(sc),
                                 torch.tensor(dec_pos[:1]), full_mask)
                ours, routes = _decode(model, jnp.asarray(canvas),
                                       None if sc is None else jnp.asarray(sc), cache,
                                       jnp.asarray(dec_pos))
                ours = np.asarray(ours)
                assert ours.dtype == np.float32 and ours.shape == (b, n, c.vocab_size)
                assert np.abs(ours).max() <= c.final_logit_softcapping
                errors["logits"].append(np.max(np.abs(ours - ref)))
                _compare_routes(log, routes, "dec", np.ones((b, n), bool))
            # the sampler's output canvas is encoded next, appended to the cache
            log.ids.clear()
            _hf_encode(hf, hf_cache, torch.tensor(canvas), torch.tensor(dec_pos[:1]), full_mask)
            cache, routes = _encode(model, jnp.asarray(canvas), jnp.asarray(dec_pos), cache,
                                    jnp.ones((b, n), bool))
            assert int(cache.length) == start + n
            _compare_cache(c, hf_cache, cache, valid_tokens, errors["kv"])
            _compare_routes(log, routes, "enc", np.ones((b, n), bool))
    finally:
        log.close()
    print({k: float(max(v)) for k, v in errors.items()})
    assert max(errors["kv"]) <= ATOL, errors["kv"]
    assert max(errors["logits"]) <= ATOL, errors["logits"]


def test_padding_is_masked(pair):
    """Row 1's real tokens give the same logits whatever its padding tokens are, and a
    different (wrong) result when the padding is left unmasked."""
    case, _, model, _ = pair
    c = case.config
    rng = np.random.default_rng(3)
    ids = rng.integers(0, c.vocab_size, (2, case.prompt))
    mask = np.ones_like(ids, bool)
    mask[:, :case.pad] = False
    other = ids.copy()
    other[:, :case.pad] = rng.integers(0, c.vocab_size, (2, case.pad))
    p, n = case.prompt, c.canvas_length
    canvas = jnp.asarray(rng.integers(0, c.vocab_size, (2, n)))
    enc_pos = jnp.broadcast_to(jnp.arange(p), (2, p))
    dec_pos = jnp.broadcast_to(jnp.arange(p, p + n), (2, n))
    out = []
    for x, m in ((ids, mask), (other, mask), (other, np.ones_like(mask))):
        # the shapes of the test above: its compiled functions are reused
        cache = init_cache(c, 2, p + 2 * n)
        cache, _ = _encode(model, jnp.asarray(x), enc_pos, cache, jnp.asarray(m))
        out.append(np.asarray(_decode(model, canvas, None, cache, dec_pos)[0]))
    assert np.max(np.abs(out[0] - out[1])) <= 1e-5
    assert np.max(np.abs(out[0] - out[2])) > 1e-3


def test_ragged_experts_equal_dense_reference():
    rng = np.random.default_rng(4)
    n, h, i, e, k = 13, 8, 6, 5, 2
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    gate_up = jnp.asarray(rng.standard_normal((e, h, 2 * i)), jnp.float32)
    down = jnp.asarray(rng.standard_normal((e, i, h)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(e - 1, k, replace=False) for _ in range(n)]))
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)  # expert e-1 gets no token
    ragged = jax.jit(moe)(x, gate_up, down, ids, weights)
    dense = moe_dense(x, gate_up, down, ids, weights)
    np.testing.assert_allclose(np.asarray(ragged), np.asarray(dense), rtol=1e-5, atol=1e-5)


def test_linear_names_cover_every_dense_kernel(pair):
    case, _, model, _ = pair
    c = case.config
    assert len(linear_names(c)) == len(set(linear_names(c)))

    def names(model):
        cap = Capture()
        model.decode(jnp.zeros((1, 3), jnp.int32), None, init_cache(c, 1, 16), capture=cap)
        return cap.values

    recorded = nnx.eval_shape(names, model)  # traced only
    assert sorted(recorded) == sorted(linear_names(c))
    assert recorded["layers.0.router.proj"].shape == (1, 3, c.hidden_size)


def test_dropped_names_are_the_vision_tower(pair):
    _, hf, _, dropped = pair
    vision = [k for k in hf.state_dict() if k.startswith(("model.encoder.vision_tower.",
                                                          "model.encoder.embed_vision."))]
    assert vision and dropped == sorted(vision)


def test_config_round_trips_through_transformers():
    for case in CASES.values():
        c = case.config
        hf_cfg = HFConfig(**{**c.to_hf(), "vision_config": TINY_VISION})
        assert DiffusionGemmaConfig.from_hf(hf_cfg.to_dict()) == c
        assert DiffusionGemmaConfig.from_hf(c.to_hf()) == c


def test_config_from_constructor_arguments():
    """A config.json holding global_head_dim / num_global_key_value_heads instead of
    per_layer_config, and no layer_types (transformers' 5:1 default)."""
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=7,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
                moe_intermediate_size=8, sliding_window=8)
    ours = DiffusionGemmaConfig.from_hf({"model_type": "diffusion_gemma", "text_config": text})
    theirs = HFConfig(text_config=text, vision_config=TINY_VISION).to_dict()
    assert DiffusionGemmaConfig.from_hf(theirs) == ours
    assert ours.layer_types == (SLIDING,) * 5 + (FULL, FULL)
    assert (ours.global_head_dim, ours.num_global_kv_heads, ours.global_rotated_pairs) == (16, 1, 2)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("num_experts"), "missing key 'text_config.num_experts'"),
    (lambda t: t.update(layer_types=["sliding_attention"] * 2 + ["full_attention"]),
     "layer_types has 3 entries, expected num_layers=4"),
    (lambda t: t.update(top_k_experts=9), "top_k=9 exceeds num_experts=5"),
    (lambda t: t.update(num_key_value_heads=3), "num_heads=4 is not divisible by num_kv_heads=3"),
    (lambda t: t.update(hidden_activation="silu"), "hidden_activation='silu' is not supported"),
    (lambda t: t.update(per_layer_config={"0": {"head_dim": 32}}),
     "per_layer_config covers layers [0], expected exactly the full-attention layers [0, 3]"),
])
def test_bad_config_raises_one_line(change, message):
    d = CASES["fssf"].config.to_hf()
    change(d["text_config"])
    with pytest.raises(ConfigError) as e:
        DiffusionGemmaConfig.from_hf(d, source="x/config.json")
    text = str(e.value)
    assert message in text and text.startswith("x/config.json: ") and "\n" not in text


def test_missing_text_config_raises():
    with pytest.raises(ConfigError, match="missing key 'text_config'"):
        DiffusionGemmaConfig.from_hf({"model_type": "diffusion_gemma"})


def test_real_config_shapes():
    """The 26B-A4B values (reference/diffusion_gemma.md): 25 sliding + 5 full layers, dims
    0-63 and 256-319 rotated on a 512 head; abstract shapes only."""
    c = DiffusionGemmaConfig.from_hf({"model_type": "diffusion_gemma", "text_config": dict(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
        num_global_key_value_heads=2, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704, sliding_window=1024)})
    assert c.full_layers == (5, 11, 17, 23, 29) and c.global_rotated_pairs == 64
    model = abstract_model(c)
    assert model.layers[5].self_attn.v_proj is None
    assert model.layers[5].self_attn.k_proj.kernel.shape == (2816, 1024)
    assert model.layers[0].experts.gate_up.shape == (128, 2816, 1408)
    assert model.layers[0].experts.down.shape == (128, 704, 2816)


def test_prompt_shorter_than_the_window(pair):
    """A sliding layer's ring is partly empty: the decoder must read only the written slots."""
    case, hf, model, _ = pair
    c = case.config
    if case.prompt != CASES["ssf"].prompt:
        pytest.skip("one config is enough")
    rng = np.random.default_rng(6)
    b, p, n = 2, c.ring_size - 1, c.canvas_length
    ids = rng.integers(0, c.vocab_size, (b, p))
    canvas = rng.integers(0, c.vocab_size, (b, n))
    dec_pos = np.arange(p, p + n)[None].repeat(b, 0)
    hf_cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    _hf_encode(hf, hf_cache, torch.tensor(ids), torch.arange(p)[None], torch.ones(b, p, dtype=bool))
    ref = _hf_decode(hf, hf_cache, torch.tensor(canvas), None, torch.tensor(dec_pos[:1]),
                     torch.ones(b, p + n, dtype=bool))
    # the cache size of the test above: its compiled decode is reused
    cache = init_cache(c, b, case.prompt + 2 * n)
    cache, _ = _encode(model, jnp.asarray(ids), jnp.asarray(np.arange(p)[None].repeat(b, 0)),
                       cache, jnp.ones((b, p), bool))
    errors = []
    _compare_cache(c, hf_cache, cache, np.ones((b, cache.max_len), bool), errors)
    ours, _ = _decode(model, jnp.asarray(canvas), None, cache, jnp.asarray(dec_pos))
    assert max(errors) <= ATOL
    assert np.max(np.abs(np.asarray(ours) - ref)) <= ATOL


# slow: the experts' capture is exercised in `make test` by the calibration statistics
# (tests/quant/test_gemma_calibration.py)
@pytest.mark.slow
def test_capture_records_each_layers_expert_inputs_and_choices():
    """Capture(experts_fn=) sees each layer's experts' input and the router's choices (those
    `routes` reports) in a decoder pass (the encoder runs the same layer code)."""
    from qdlm_jax.checkpoints.random_init import tiny_config
    from qdlm_jax.models.capture import Capture
    from qdlm_jax.models.diffusion_gemma import init_model
    config = tiny_config("diffusion_gemma")
    model = init_model(config, seed=1)
    cache = model.encode(jnp.asarray(np.arange(5, 11, dtype=np.int32)[None]), None,
                         init_cache(config, 1, 6))
    @nnx.jit
    def record(model, cache, canvas):
        cap = Capture(names=(), experts_fn=lambda x, t, w: (x, t, w))
        routes = {}
        model.decode(canvas, None, cache, capture=cap, routes=routes)
        assert not cap.values  # names=(): no linear recorded
        return cap.experts, routes

    experts, routes = record(model, cache, jnp.asarray(np.arange(20, 28, dtype=np.int32)[None]))
    assert sorted(experts) == list(range(config.num_layers))
    for i, (x, top, w) in experts.items():
        np.testing.assert_array_equal(np.asarray(top), np.asarray(routes[i][0]))
        np.testing.assert_array_equal(np.asarray(w), np.asarray(routes[i][1]))
        assert x.shape == (1, 8, config.hidden_size)
