"""The DiffusionGemma key map: hub state dict <-> our params, bit-exact, with one-line errors."""

import ml_dtypes
import numpy as np
import pytest

from qdlm_jax.checkpoints.diffusion_gemma import (
    ENCODER_TEXT,
    key_map,
    params_from_state_dict,
    state_dict_from_params,
)
from qdlm_jax.errors import ConfigError
from qdlm_jax.models.diffusion_gemma import param_shapes
from qdlm_jax.models.gemma_config import FULL, SLIDING, DiffusionGemmaConfig

CONFIG = DiffusionGemmaConfig(
    vocab_size=64, hidden_size=16, num_layers=3, layer_types=(SLIDING, FULL, FULL),
    num_heads=4, num_kv_heads=2, head_dim=4, num_global_kv_heads=1, global_head_dim=8,
    intermediate_size=24, num_experts=3, top_k=2, moe_intermediate_size=10, sliding_window=5)
GATE_UP = "model.decoder.layers.1.experts.gate_up_proj"


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(s).astype(dtype) for p, s in param_shapes(CONFIG).items()}


def _hub(dtype=np.float32):
    """A state dict as transformers holds it: decoder weights, encoder twins, the tied head
    and a vision tower."""
    sd = state_dict_from_params(CONFIG, _params(dtype))
    for k, v in list(sd.items()):
        if k.startswith("model.decoder.") and "self_conditioning" not in k \
                and not k.endswith("layer_scalar"):
            sd[ENCODER_TEXT + k[len("model.decoder."):]] = v.copy()
    sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"].copy()
    sd["model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = \
        np.zeros((8, 4), dtype)
    sd["model.encoder.embed_vision.embedding_projection.weight"] = np.zeros((16, 4), dtype)
    return sd


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_round_trip_is_bit_exact(dtype):
    params = _params(dtype)
    sd = state_dict_from_params(CONFIG, params)
    back, dropped = params_from_state_dict(CONFIG, sd)
    assert dropped == [] and set(back) == set(params)
    for p, v in params.items():
        assert back[p].dtype == v.dtype and back[p].tobytes() == v.tobytes(), p
    again = state_dict_from_params(CONFIG, back)
    assert set(again) == set(sd)
    for k, v in sd.items():
        assert again[k].shape == v.shape and again[k].tobytes() == v.tobytes(), k


def test_hub_layout_shapes_and_vision_dropped():
    sd = _hub()
    assert sd[GATE_UP].shape == (3, 20, 16)  # [E, 2I, H]
    assert sd["model.decoder.layers.1.experts.down_proj"].shape == (3, 16, 10)  # [E, H, I]
    assert "model.decoder.layers.1.self_attn.v_proj.weight" not in sd  # full layer: K = V
    assert sd["model.decoder.layers.0.self_attn.v_proj.weight"].shape == (8, 16)
    params, dropped = params_from_state_dict(CONFIG, sd)
    assert dropped == ["model.encoder.embed_vision.embedding_projection.weight",
                       "model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"]
    np.testing.assert_array_equal(params[("layers", 1, "experts", "gate_up")],
                                  sd[GATE_UP].transpose(0, 2, 1))
    assert params[("layers", 2, "layer_scalar_encoder")].tobytes() == \
        sd[f"{ENCODER_TEXT}layers.2.layer_scalar"].tobytes()
    assert len(key_map(CONFIG)) == len(params)


def test_transformers_loads_what_we_write():
    """Every text tensor we write is one transformers' model holds; the ones it has and we do
    not write are the tied twins, the tied head and the vision tower."""
    torch = pytest.importorskip("torch")
    from transformers import DiffusionGemmaConfig as HFConfig
    from transformers import DiffusionGemmaForBlockDiffusion

    vision = dict(model_type="gemma4_vision", hidden_size=8, intermediate_size=8,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                  patch_size=2, position_embedding_size=4)
    hf = DiffusionGemmaForBlockDiffusion(HFConfig(**{**CONFIG.to_hf(), "vision_config": vision}))
    sd = state_dict_from_params(CONFIG, _params(np.float32))
    result = hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert result.unexpected_keys == []
    for k in result.missing_keys:
        assert k == "lm_head.weight" or k.startswith(("model.encoder.vision_tower.",
                                                      "model.encoder.embed_vision.",
                                                      ENCODER_TEXT)), k
        assert not k.endswith("layer_scalar"), k
    np.testing.assert_array_equal(
        hf.model.encoder.language_model.layers[1].experts.down_proj.detach().numpy(),
        sd["model.decoder.layers.1.experts.down_proj"])


def _error(sd) -> str:
    with pytest.raises(ConfigError) as e:
        params_from_state_dict(CONFIG, sd)
    text = str(e.value)
    assert "\n" not in text
    return text


def test_wrong_expert_shape_names_key_and_shapes():
    sd = _hub()
    sd[GATE_UP] = np.zeros((3, 16, 20), np.float32)  # stored [in, out] by mistake
    assert _error(sd) == (f"state dict: tensor {GATE_UP!r} has shape [3, 16, 20], expected "
                          "[3, 20, 16] from the config")


def test_encoder_twin_must_equal_decoder():
    sd = _hub()
    key = f"{ENCODER_TEXT}layers.0.router.scale"
    sd[key] = sd[key] + 1
    assert f"tensor {key!r} differs from 'model.decoder.layers.0.router.scale'" in _error(sd)
    sd = _hub()
    sd["lm_head.weight"] = sd["lm_head.weight"] * 2
    assert "'lm_head.weight' differs from 'model.decoder.embed_tokens.weight'" in _error(sd)


def test_vision_only_missing_and_unexpected_keys():
    vision = {k: v for k, v in _hub().items() if k.startswith("model.encoder.v")
              or k.startswith("model.encoder.embed_vision")}
    assert "no DiffusionGemma text weights, only 2 vision tensors" in _error(vision)
    sd = _hub()
    del sd[f"{ENCODER_TEXT}layers.1.layer_scalar"]
    assert f"missing tensor '{ENCODER_TEXT}layers.1.layer_scalar'" in _error(sd)
    sd = _hub()
    sd["model.decoder.layers.1.self_attn.v_proj.weight"] = np.zeros((8, 16), np.float32)
    assert "unexpected tensor 'model.decoder.layers.1.self_attn.v_proj.weight'" in _error(sd)
