"""DiffusionGemma checkpoint key map (`DiffusionGemmaForBlockDiffusion`, text part).

    model.decoder.embed_tokens.weight                        -> embed                 [V, H]
    model.decoder.norm.weight                                -> final_norm.scale
    model.decoder.self_conditioning.pre_norm.weight          -> self_conditioning.pre_norm.scale
    model.decoder.self_conditioning.{gate,up,down}_proj.weight
                                             -> self_conditioning.mlp.{gate,up,down}_proj.kernel (T)
    model.decoder.layers.{i}.self_attn.{q,k,v,o}_proj.weight -> layers.i.self_attn.*.kernel (T)
        (full-attention layers have no v_proj)
    model.decoder.layers.{i}.self_attn.{q,k}_norm.weight     -> layers.i.self_attn.{q,k}_norm.scale
    model.decoder.layers.{i}.mlp.{gate,up,down}_proj.weight  -> layers.i.mlp.*.kernel (T)
    model.decoder.layers.{i}.router.proj.weight              -> layers.i.router.proj.kernel (T)
    model.decoder.layers.{i}.router.{scale,per_expert_scale} -> layers.i.router.{same}
    model.decoder.layers.{i}.experts.gate_up_proj [E, 2I, H] -> layers.i.experts.gate_up (T)
    model.decoder.layers.{i}.experts.down_proj    [E, H, I]  -> layers.i.experts.down (T)
    model.decoder.layers.{i}.{7 layer norms}.weight          -> layers.i.{same}.scale
    model.decoder.layers.{i}.layer_scalar                    -> layers.i.layer_scalar_decoder
    model.encoder.language_model.layers.{i}.layer_scalar     -> layers.i.layer_scalar_encoder

(T): the last two axes swap (PyTorch Linear weights and expert tensors are [.., out, in]; ours
are [.., in, out]: `gate_up` [E, H, 2I] with the gate columns first, `down` [E, I, H]). A
reader that transposes with `.T` (all axes) must not be used for the 3-D expert tensors.

The encoder's other text weights (`model.encoder.language_model.*`) and `lm_head.weight` are
tied to the decoder's in transformers: when a state dict holds them they must equal their
decoder twin (`model.decoder.*`, `model.decoder.embed_tokens.weight`) bit for bit. The vision
tower (`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`) is not part of the text
model: those tensors are dropped and their names returned. `state_dict_from_params` writes what
transformers' `save_pretrained` writes for the text model: the decoder's tensors and the
encoder's layer scalars.

`config_from_hf` / `config_to_hf` map the hub `config.json` (`model_type: diffusion_gemma`,
the text model's keys under `text_config`; `models.gemma_config`), as `llada.py` / `dream.py`
do for theirs; `checkpoints.hf` reads and writes the directories, tensor by tensor.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from qdlm_jax.checkpoints.keymap import TensorMapping, hub_shape, linear, plain
from qdlm_jax.data.hf_tokenizer import SpecialIds
from qdlm_jax.errors import ConfigError
from qdlm_jax.models.diffusion_gemma import param_shapes
from qdlm_jax.models.gemma_config import (
    ARCHITECTURE,
    MODEL_TYPE,
    TEXT_MODEL_TYPE,
    DiffusionGemmaConfig,
)
from qdlm_jax.models.params import ParamPath, path_str

DECODER = "model.decoder."
ENCODER_TEXT = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
TIED_HEAD = "lm_head.weight"
# Non-persistent buffers some exporters still write; they carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")

LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "post_feedforward_layernorm_1",
               "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2")


def key_map(config: DiffusionGemmaConfig) -> list[TensorMapping]:
    """One entry per hub tensor of the text model (decoder weights, both layer-scalar sets)."""
    d = DECODER
    out = [plain(f"{d}embed_tokens.weight", "embed"),
           plain(f"{d}norm.weight", "final_norm", "scale"),
           plain(f"{d}self_conditioning.pre_norm.weight", "self_conditioning", "pre_norm",
                 "scale")]
    for p in ("gate_proj", "up_proj", "down_proj"):
        out.append(linear(f"{d}self_conditioning.{p}.weight", "self_conditioning", "mlp", p,
                          "kernel"))
    for i in range(config.num_layers):
        b = f"{d}layers.{i}."
        attn = ("q_proj", "k_proj") + (("v_proj",) if config.is_sliding(i) else ()) + ("o_proj",)
        for p in attn:
            out.append(linear(f"{b}self_attn.{p}.weight", "layers", i, "self_attn", p, "kernel"))
        for p in ("q_norm", "k_norm"):
            out.append(plain(f"{b}self_attn.{p}.weight", "layers", i, "self_attn", p, "scale"))
        for p in ("gate_proj", "up_proj", "down_proj"):
            out.append(linear(f"{b}mlp.{p}.weight", "layers", i, "mlp", p, "kernel"))
        out.append(linear(f"{b}router.proj.weight", "layers", i, "router", "proj", "kernel"))
        out.append(plain(f"{b}router.scale", "layers", i, "router", "scale"))
        out.append(plain(f"{b}router.per_expert_scale", "layers", i, "router",
                         "per_expert_scale"))
        out.append(linear(f"{b}experts.gate_up_proj", "layers", i, "experts", "gate_up"))
        out.append(linear(f"{b}experts.down_proj", "layers", i, "experts", "down"))
        for p in LAYER_NORMS:
            out.append(plain(f"{b}{p}.weight", "layers", i, p, "scale"))
        out.append(plain(f"{b}layer_scalar", "layers", i, "layer_scalar_decoder"))
        out.append(plain(f"{ENCODER_TEXT}layers.{i}.layer_scalar", "layers", i,
                         "layer_scalar_encoder"))
    return out


def _to_ours(a: np.ndarray, transpose: bool) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2)) if transpose else a


@functools.lru_cache(maxsize=8)
def _shapes(config: DiffusionGemmaConfig) -> dict[ParamPath, tuple[int, ...]]:
    return param_shapes(config)


def expected_shape(config: DiffusionGemmaConfig, path: ParamPath) -> tuple[int, ...]:
    """Shape of a param in our layout (kernels [in, out], experts [E, in, out])."""
    return _shapes(config)[tuple(path)]


def is_vision_key(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def is_ignored_key(name: str) -> bool:
    """A buffer some exporters write that holds no weights (RoPE inverse frequencies)."""
    return name.endswith(IGNORED_SUFFIXES)


def tied_twin(name: str, mapped: set[str] | dict) -> str | None:
    """The decoder tensor that hub tensor `name` is tied to (an encoder text weight, or the
    LM head), when `mapped` (the key map's names) holds it; None otherwise."""
    if name == TIED_HEAD:
        return f"{DECODER}embed_tokens.weight"
    if name.startswith(ENCODER_TEXT):
        twin = f"{DECODER}{name[len(ENCODER_TEXT):]}"
        if twin in mapped:
            return twin
    return None


def twin_mismatch(name: str, twin: str) -> str:
    """The error text for a tied tensor that differs from its decoder twin."""
    return (f"tensor {name!r} differs from {twin!r}; the encoder and the LM head share the "
            "decoder's weights")


# ---- config.json --------------------------------------------------------------------------

def is_hub_config(hf: dict[str, Any]) -> bool:
    """Whether a hub `config.json` is DiffusionGemma's (model_type or architectures)."""
    archs = hf.get("architectures") or ()
    return hf.get("model_type") in (MODEL_TYPE, TEXT_MODEL_TYPE) or ARCHITECTURE in archs


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text model's settings: `text_config`, or the dict itself for a bare text config."""
    text = hf.get("text_config")
    return text if isinstance(text, dict) else hf


def special_id_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The `<name>_token_id` keys as `resolve_special_ids` reads a config.json: transformers
    keeps them in `text_config`; a top-level key of the same name wins."""
    keys = ("pad_token_id", "bos_token_id", "eos_token_id")
    text = text_config(hf)
    out = {k: text[k] for k in keys if k in text}
    out.update({k: hf[k] for k in keys if k in hf and hf is not text})
    return out


def config_from_hf(hf: dict[str, Any], special: SpecialIds, *,
                   source: str = "config.json") -> DiffusionGemmaConfig:
    """Our config from a hub `config.json` of this layout; pad and BOS as resolved in
    `special` (the same as config.json's when it sets them), the EOS ids as config.json
    lists them."""
    config = DiffusionGemmaConfig.from_hf(hf, source)
    changes = {f"{f}_token_id": getattr(special, f) for f in ("pad", "bos")
               if getattr(special, f) is not None}
    return config.replace(**changes)


def config_to_hf(config: DiffusionGemmaConfig) -> dict[str, Any]:
    """The hub `config.json` (`DiffusionGemmaConfig.to_hf`: no vision tower)."""
    return config.to_hf()


def params_from_state_dict(config: DiffusionGemmaConfig, tensors: dict[str, np.ndarray]
                           ) -> tuple[dict[ParamPath, np.ndarray], list[str]]:
    """(params in our layout, names of the dropped vision tensors) from a hub state dict.

    Raises one-line `ConfigError`s for a missing tensor, a tensor of the wrong shape (naming
    the key, the expected and the found shape), an encoder twin or tied head that differs
    from its decoder tensor, a state dict holding only vision tensors, and any other key.
    """
    dropped = sorted(k for k in tensors if is_vision_key(k))
    text = {k: v for k, v in tensors.items() if not is_vision_key(k) and not is_ignored_key(k)}
    if not text:
        raise ConfigError(f"state dict: no DiffusionGemma text weights, only {len(dropped)} "
                          f"vision tensors (expected e.g. '{DECODER}embed_tokens.weight')")
    shapes = param_shapes(config)
    mappings = key_map(config)
    params: dict[ParamPath, np.ndarray] = {}
    for m in mappings:
        if m.hf_name not in text:
            raise ConfigError(f"state dict: missing tensor {m.hf_name!r} (layer_types="
                              f"{list(config.layer_types)})")
        a = np.asarray(text[m.hf_name])
        want = hub_shape(shapes[m.path], m.transpose)
        if tuple(a.shape) != want:
            raise ConfigError(f"state dict: tensor {m.hf_name!r} has shape {list(a.shape)}, "
                              f"expected {list(want)} from the config")
        params[m.path] = _to_ours(a, m.transpose)
    by_name = {m.hf_name: m for m in mappings}
    for name in sorted(set(text) - set(by_name)):
        twin = tied_twin(name, by_name)
        if twin is None:
            raise ConfigError(f"state dict: unexpected tensor {name!r} (not part of the "
                              f"DiffusionGemma text model with {config.num_layers} layers)")
        a, b = np.asarray(text[name]), np.asarray(text[twin])
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            raise ConfigError(f"state dict: {twin_mismatch(name, twin)}")
    return params, dropped


def state_dict_from_params(config: DiffusionGemmaConfig,
                           params: dict[ParamPath, object]) -> dict[str, np.ndarray]:
    """The hub state dict of `params` (decoder tensors and the encoder's layer scalars); the
    exact inverse of `params_from_state_dict` on those tensors."""
    out = {}
    for m in key_map(config):
        if m.path not in params:
            raise ConfigError(f"state_dict_from_params: params lack {path_str(m.path)} needed "
                              f"for tensor {m.hf_name!r}")
        out[m.hf_name] = _to_ours(np.asarray(params[m.path]), m.transpose)
    return out
