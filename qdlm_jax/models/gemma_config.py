"""DiffusionGemma (block diffusion, MoE) model configuration and its hub `config.json` mapping.

One frozen dataclass holds what the text model needs. `from_hf` reads a transformers
`DiffusionGemmaConfig.to_dict()` / `config.json` (the text model's keys sit under
`text_config`; a bare text config, `model_type: diffusion_gemma_text`, is read too) and
`to_hf` writes a dict that `transformers.DiffusionGemmaConfig(**d)` accepts.

Two kinds of attention layers share one residual stream:
  - sliding ("sliding_attention"): `num_kv_heads` x `head_dim`, RoPE theta `rope_theta` over
    the whole head, and a causal window of `sliding_window` keys in the encoder;
  - full ("full_attention"): `num_global_kv_heads` x `global_head_dim`, K = V (no v_proj),
    proportional RoPE with theta `global_rope_theta`: inv_freq_j = theta^(-2j/D) for
    j < floor(global_partial_rotary_factor * D / 2), 0 for the other pairs.
In transformers the full layers' sizes live in `per_layer_config` (keys are layer indices)
or, before serialisation, in the `global_head_dim` / `num_global_key_value_heads` arguments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from qdlm_jax.errors import ConfigError
from qdlm_jax.models.config import DTYPES

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
FAMILY = "diffusion_gemma"  # `config.family`, as "llada" / "dream" for the dense configs
MODEL_TYPE = "diffusion_gemma"  # `model_type` of the top-level hub config
TEXT_MODEL_TYPE = "diffusion_gemma_text"
ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
HIDDEN_ACTIVATION = "gelu_pytorch_tanh"
EXPERT_COMPUTE = ("grouped", "dense")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionGemmaConfig:
    """Architecture and special tokens of a DiffusionGemma text model (encoder = decoder
    weights, two modes)."""

    vocab_size: int  # rows of the (tied) embedding / LM head
    hidden_size: int  # residual stream width H
    num_layers: int
    layer_types: tuple[str, ...]  # per layer: "sliding_attention" or "full_attention"
    num_heads: int  # query heads (both layer kinds)
    num_kv_heads: int  # sliding layers' key/value heads
    head_dim: int  # sliding layers' head width
    num_global_kv_heads: int  # full layers' key heads (values are the keys: K = V)
    global_head_dim: int  # full layers' head width
    intermediate_size: int  # dense GeGLU MLP width (also the self-conditioning MLP)
    num_experts: int  # routed experts per layer
    top_k: int  # experts per token
    moe_intermediate_size: int  # each expert's GeGLU width
    sliding_window: int  # W: an encoder query sees keys with index > its index - W
    rope_theta: float = 10_000.0  # sliding layers (default RoPE, whole head)
    global_rope_theta: float = 1_000_000.0  # full layers (proportional RoPE)
    global_partial_rotary_factor: float = 0.25  # fraction of a full layer's head rotated
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0  # logits = c * tanh(logits / c)
    canvas_length: int = 256  # L: tokens denoised together (one block)
    pad_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)  # any of them ends a generated answer
    bos_token_id: int | None = 2
    max_position_embeddings: int = 131_072
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of float params
    # How the routed experts compute (not a hub field): "grouped" runs each token through its
    # k experts only (`experts.moe`); "dense" runs every expert on every token and weights the
    # chosen ones (`experts.moe_dense`: E/k the work, faster for small float models on CPU).
    expert_compute: str = "grouped"

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_global_kv_heads", "global_head_dim", "intermediate_size",
                     "num_experts", "top_k", "moe_intermediate_size", "sliding_window",
                     "canvas_length", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, expected "
                              f"num_layers={self.num_layers}")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"layer_types: unknown type {bad[0]!r}; expected one of "
                              f"{LAYER_TYPES}")
        if self.layer_types[-1] != FULL:
            raise ConfigError(f"layer_types[-1]={self.layer_types[-1]!r}: the last layer must be "
                              f"{FULL!r} (transformers forces it)")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for kv_name in ("num_kv_heads", "num_global_kv_heads"):
            if self.num_heads % getattr(self, kv_name):
                raise ConfigError(f"num_heads={self.num_heads} is not divisible by "
                                  f"{kv_name}={getattr(self, kv_name)}")
        for hd_name in ("head_dim", "global_head_dim"):
            if getattr(self, hd_name) % 2:
                raise ConfigError(f"{hd_name}={getattr(self, hd_name)} must be even for RoPE")
        if self.sliding_window < 2:
            raise ConfigError(f"sliding_window={self.sliding_window}: expected >= 2 (the "
                              "decoder reads the last sliding_window - 1 encoded tokens)")
        if not 0.0 <= self.global_partial_rotary_factor <= 1.0:
            raise ConfigError(f"global_partial_rotary_factor={self.global_partial_rotary_factor}"
                              ": expected a fraction in [0, 1]")
        for name in ("rope_theta", "global_rope_theta", "rms_norm_eps",
                     "final_logit_softcapping"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name}={value!r}: expected a positive number")
        for name in ("pad_token_id", "bos_token_id"):
            self._check_id(name, getattr(self, name))
        for t in self.eos_token_ids:
            self._check_id("eos_token_ids", t)
        if self.expert_compute not in EXPERT_COMPUTE:
            raise ConfigError(f"expert_compute={self.expert_compute!r}: expected one of "
                              f"{EXPERT_COMPUTE}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of "
                                  f"{sorted(DTYPES)}")

    def _check_id(self, name: str, value) -> None:
        if value is not None and not 0 <= value < self.vocab_size:
            raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # ---- derived -----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return FAMILY

    # The special-id surface of the dense `ModelConfig` (`data.hf_tokenizer.SpecialIds` reads
    # it): uniform-state diffusion has no mask token, and every EOS id ends an answer.
    @property
    def mask_token_id(self) -> None:
        return None

    @property
    def eot_token_id(self) -> None:
        return None

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.eos_token_ids

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def ring_size(self) -> int:
        """Encoded tokens a sliding layer keeps for the decoder: the last W - 1."""
        return self.sliding_window - 1

    @property
    def global_rotated_pairs(self) -> int:
        """Frequency pairs a full layer rotates (transformers' int(p * D // 2))."""
        return int(self.global_partial_rotary_factor * self.global_head_dim // 2)

    def layer_heads(self, layer: int) -> tuple[int, int]:
        """(key/value heads, head width) of a layer."""
        if self.is_sliding(layer):
            return self.num_kv_heads, self.head_dim
        return self.num_global_kv_heads, self.global_head_dim

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def embed_scale(self):
        """sqrt(H) rounded to fp32, as transformers' buffer holds it (cast to the weight dtype
        where it is used)."""
        return jnp.float32(self.hidden_size ** 0.5)

    def replace(self, **changes) -> "DiffusionGemmaConfig":
        return dataclasses.replace(self, **changes)

    # ---- JSON (our own checkpoints) -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON, with `"family": "diffusion_gemma"` so that a reader of a
        checkpoint's config knows which config class to build."""
        d = {"family": FAMILY, **dataclasses.asdict(self)}
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "DiffusionGemmaConfig":
        d = dict(d)
        family = d.pop("family", FAMILY)
        if family != FAMILY:
            raise ConfigError(f"{source}: family={family!r}, expected {FAMILY!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config keys {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    # ---- the hub config.json ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "DiffusionGemmaConfig":
        """Reads a transformers DiffusionGemmaConfig dict (`to_dict()` or `config.json`)."""
        return _from_hf(hf, source)

    def to_hf(self) -> dict[str, Any]:
        """A dict `transformers.DiffusionGemmaConfig(**d)` accepts (no vision tower keys: the
        caller adds `vision_config` if it builds the full multimodal model)."""
        width = len(str(max(self.full_layers)))
        text = {
            "model_type": TEXT_MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": HIDDEN_ACTIVATION,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                             else list(self.eos_token_ids) or None),
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": True,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta},
                FULL: {"rope_type": "proportional",
                       "partial_rotary_factor": self.global_partial_rotary_factor,
                       "rope_theta": self.global_rope_theta},
            },
            "attention_bias": False,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "use_bidirectional_attention": None,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k,
            "moe_intermediate_size": self.moe_intermediate_size,
            "final_logit_softcapping": self.final_logit_softcapping,
            "per_layer_config": {
                str(i).zfill(width): {"head_dim": self.global_head_dim,
                                      "num_key_value_heads": self.num_global_kv_heads}
                for i in self.full_layers},
            "dtype": self.param_dtype,
        }
        return {
            "model_type": MODEL_TYPE,
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "text_config": text,
            "canvas_length": self.canvas_length,
            "tie_word_embeddings": True,
            "dtype": self.param_dtype,
        }


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """transformers' default pattern: every 6th layer full, and the last one full."""
    types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    types[-1] = FULL
    return tuple(types)


def diffusion_gemma_26b_a4b(**overrides) -> DiffusionGemmaConfig:
    """google/diffusiongemma-26B-A4B(-it): 30 layers (25 sliding, 5 full), 128 experts top-8.

    The published config.json values, which llama.cpp's Gemma 4 vocabulary file (the 26B-A4B
    header, no weights) repeats: V 262144, H 2816, 16 query heads, sliding 8 KV x 256, full
    2 KV x 512, dense I 2112, expert I 704, window 1024, context 262144. `num_layers` in
    `overrides` keeps the layer pattern's rule (every 6th layer full, the last one full)."""
    num_layers = overrides.pop("num_layers", 30)
    cfg = dict(vocab_size=262_144, hidden_size=2816, num_layers=num_layers,
               layer_types=default_layer_types(num_layers), num_heads=16, num_kv_heads=8,
               head_dim=256, num_global_kv_heads=2, global_head_dim=512,
               intermediate_size=2112, num_experts=128, top_k=8, moe_intermediate_size=704,
               sliding_window=1024, rope_theta=10_000.0, global_rope_theta=1_000_000.0,
               global_partial_rotary_factor=0.25, rms_norm_eps=1e-6,
               final_logit_softcapping=30.0, canvas_length=256, pad_token_id=0,
               eos_token_ids=(1,), bos_token_id=2, max_position_embeddings=262_144,
               dtype="bfloat16", param_dtype="bfloat16")
    cfg.update(overrides)
    return DiffusionGemmaConfig(**cfg)


def _from_hf(hf: dict[str, Any], source: str) -> DiffusionGemmaConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    if hf.get("model_type") == TEXT_MODEL_TYPE:
        text, top, where = hf, {}, ""
    else:
        if hf.get("model_type") not in (None, MODEL_TYPE):
            raise ConfigError(f"{source}: model_type={hf['model_type']!r}; expected "
                              f"{MODEL_TYPE!r} or {TEXT_MODEL_TYPE!r}")
        text, top, where = hf.get("text_config"), hf, "text_config."
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing key 'text_config' (the DiffusionGemma text "
                              "model's settings)")

    def need(key):
        if text.get(key) is None:
            raise ConfigError(f"{source}: missing key {where + key!r} required for "
                              f"model_type={MODEL_TYPE!r}")
        return text[key]

    def expect(key, allowed, default):
        value = text.get(key, default)
        if value not in allowed:
            raise ConfigError(f"{source}: {where + key}={value!r} is not supported; expected "
                              f"one of {allowed}")

    expect("hidden_activation", (HIDDEN_ACTIVATION,), HIDDEN_ACTIVATION)
    expect("attention_bias", (False,), False)
    expect("use_bidirectional_attention", (None, "vision"), None)
    if top.get("tie_word_embeddings", True) is not True:
        raise ConfigError(f"{source}: tie_word_embeddings={top['tie_word_embeddings']!r} is not "
                          "supported (the encoder, decoder and LM head share one embedding)")
    num_layers = int(need("num_hidden_layers"))
    layer_types = text.get("layer_types")
    if layer_types is None:  # transformers' default: every 6th layer full, the last one too
        layer_types = default_layer_types(num_layers)
    if not isinstance(layer_types, (list, tuple)):
        raise ConfigError(f"{source}: {where}layer_types={layer_types!r}: expected a list")
    if len(layer_types) != num_layers:
        raise ConfigError(f"{source}: {where}layer_types has {len(layer_types)} entries, "
                          f"expected num_layers={num_layers}")
    num_kv_heads = int(need("num_key_value_heads"))
    global_kv, global_hd = _full_layer_sizes(text, layer_types, num_kv_heads, source, where)
    sliding_rope, full_rope = _rope(text, source, where)
    eos = text.get("eos_token_id", 1)
    eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
    dtype = _dtype(top, text)
    fields = dict(
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        num_layers=num_layers,
        layer_types=tuple(layer_types),
        num_heads=int(need("num_attention_heads")),
        num_kv_heads=num_kv_heads,
        head_dim=int(need("head_dim")),
        num_global_kv_heads=global_kv,
        global_head_dim=global_hd,
        intermediate_size=int(need("intermediate_size")),
        num_experts=int(need("num_experts")),
        top_k=int(need("top_k_experts")),
        moe_intermediate_size=int(need("moe_intermediate_size")),
        sliding_window=int(need("sliding_window")),
        rope_theta=float(sliding_rope["rope_theta"]),
        global_rope_theta=float(full_rope["rope_theta"]),
        global_partial_rotary_factor=float(full_rope.get("partial_rotary_factor", 1.0)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=float(text.get("final_logit_softcapping", 30.0)),
        canvas_length=int(top.get("canvas_length") or 256),
        pad_token_id=text.get("pad_token_id", 0),
        eos_token_ids=eos,
        bos_token_id=text.get("bos_token_id", 2),
        max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
        dtype=dtype,
        param_dtype=dtype,
    )
    try:
        return DiffusionGemmaConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _full_layer_sizes(text, layer_types, num_kv_heads, source, where) -> tuple[int, int]:
    """(key heads, head width) of the full layers, from `per_layer_config` or the
    `global_head_dim` / `num_global_key_value_heads` constructor arguments."""
    full = [i for i, t in enumerate(layer_types) if t == FULL]
    per_layer = text.get("per_layer_config")
    if not per_layer:
        heads = text.get("num_global_key_value_heads") or num_kv_heads
        return int(heads), int(text.get("global_head_dim", 512))
    if not isinstance(per_layer, dict):
        raise ConfigError(f"{source}: {where}per_layer_config: expected an object keyed by "
                          "layer index")
    sizes = {}
    for key, override in per_layer.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {where}per_layer_config[{key!r}]: expected a layer "
                              "index") from None
        extra = sorted(set(override) - {"head_dim", "num_key_value_heads"})
        if extra:
            raise ConfigError(f"{source}: {where}per_layer_config[{key!r}] overrides {extra}; "
                              "only head_dim and num_key_value_heads may differ per layer")
        sizes[index] = (int(override.get("num_key_value_heads", num_kv_heads)),
                        int(override.get("head_dim", text.get("head_dim"))))
    if sorted(sizes) != full:
        raise ConfigError(f"{source}: {where}per_layer_config covers layers {sorted(sizes)}, "
                          f"expected exactly the full-attention layers {full}")
    distinct = sorted(set(sizes.values()))
    if len(distinct) > 1:
        raise ConfigError(f"{source}: {where}per_layer_config gives the full layers different "
                          f"(num_key_value_heads, head_dim) {distinct}; expected one")
    return distinct[0]


def _rope(text, source, where) -> tuple[dict, dict]:
    rope = text.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
               "rope_theta": 1_000_000.0}}
    out = []
    for kind, rope_type in ((SLIDING, "default"), (FULL, "proportional")):
        params = rope.get(kind)
        key = f"{where}rope_parameters.{kind}"
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError(f"{source}: missing key {key + '.rope_theta'!r}")
        if params.get("rope_type", rope_type) != rope_type:
            raise ConfigError(f"{source}: {key}.rope_type={params['rope_type']!r} is not "
                              f"supported; expected {rope_type!r}")
        if params.get("factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: {key}.factor={params['factor']!r} is not supported; "
                              "expected 1.0")
        if kind == SLIDING and params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: {key}.partial_rotary_factor="
                              f"{params['partial_rotary_factor']!r} is not supported; expected 1.0")
        out.append(params)
    return out[0], out[1]


def _dtype(top: dict, text: dict) -> str:
    """Our dtype name for the config's `dtype` / `torch_dtype` (float32 when absent/unknown)."""
    for d in (top, text):
        value = d.get("dtype") or d.get("torch_dtype")
        if value in DTYPES:
            return value
    return "float32"
