"""Model configuration shared by the LLaDA and Dream families.

One frozen dataclass describes every dLLM the project runs; the two families differ only
in field values (see `llada_8b()` and `dream_7b()`). The HF `config.json` of either family
is read by `ModelConfig.from_hf_dict` and written back by `to_hf_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import jax.numpy as jnp

Family = Literal["llada", "dream"]
FAMILIES = ("llada", "dream")
# HF `model_type` string of each family, as found in the hub checkpoints' config.json.
HF_MODEL_TYPE = {"llada": "llada", "dream": "Dream"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A model config value is missing or invalid."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture and special tokens of a masked-diffusion transformer."""

    family: Family  # "llada" (MHA, no biases) or "dream" (GQA, q/k/v biases, shifted logits)
    vocab_size: int  # rows of the embedding and of the LM head
    hidden_size: int  # residual stream width (d_model)
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; == num_heads for MHA
    intermediate_size: int  # SwiGLU hidden width
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool  # Dream has biases on q/k/v; LLaDA has none
    # LLaDA applies RoPE to q/k upcast to fp32; Dream computes cos/sin in fp32 but rotates in
    # the activation dtype. Identical in fp32, differs by bf16 rounding otherwise.
    rope_full_precision: bool
    mask_token_id: int
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    eot_token_id: int | None = None  # LLaDA-Instruct's end-of-turn token; None if absent
    max_position_embeddings: int = 4096
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of float params

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r}: expected one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by "
                              f"num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not divisible by "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id={self.mask_token_id} is outside the vocabulary "
                              f"[0, {self.vocab_size})")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of "
                                  f"{sorted(_DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def shift_logits(self) -> bool:
        """Dream predicts token i from position i-1 (it starts from an AR model)."""
        return self.family == "dream"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- JSON (our own checkpoints) -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config keys {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    # ---- HF config.json --------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Reads a hub `config.json` of LLaDA (`model_type: llada`) or Dream (`Dream`)."""
        model_type = hf.get("model_type")

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: missing key {key!r} required for "
                                  f"model_type={model_type!r}")
            return hf[key]

        if model_type == "llada":
            if hf.get("block_type", "llama") != "llama":
                raise ConfigError(f"{source}: block_type={hf['block_type']!r} is not supported; "
                                  "expected 'llama' (the LLaDA-8B layout)")
            if hf.get("weight_tying", False):
                raise ConfigError(f"{source}: weight_tying=true is not supported (LLaDA has an "
                                  "untied LM head)")
            if hf.get("include_bias", False) or hf.get("include_qkv_bias", False):
                raise ConfigError(f"{source}: biases are not supported in the LLaDA layout")
            vocab = hf.get("embedding_size") or need("vocab_size")
            n_heads = need("n_heads")
            return cls(
                family="llada",
                vocab_size=int(vocab),
                hidden_size=int(need("d_model")),
                num_layers=int(need("n_layers")),
                num_heads=int(n_heads),
                num_kv_heads=int(hf.get("n_kv_heads") or n_heads),
                intermediate_size=int(need("mlp_hidden_size")),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                qkv_bias=False,
                rope_full_precision=bool(hf.get("rope_full_precision", True)),
                mask_token_id=int(hf.get("mask_token_id", 126336)),
                pad_token_id=hf.get("pad_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                bos_token_id=hf.get("bos_token_id"),
                eot_token_id=hf.get("eot_token_id"),
                max_position_embeddings=int(hf.get("max_sequence_length", 4096)),
                param_dtype=_hf_dtype(hf),
                dtype=_hf_dtype(hf),
            )
        if model_type == "Dream":
            if hf.get("tie_word_embeddings", False):
                raise ConfigError(f"{source}: tie_word_embeddings=true is not supported "
                                  "(Dream has an untied LM head)")
            n_heads = need("num_attention_heads")
            return cls(
                family="dream",
                vocab_size=int(need("vocab_size")),
                hidden_size=int(need("hidden_size")),
                num_layers=int(need("num_hidden_layers")),
                num_heads=int(n_heads),
                num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                intermediate_size=int(need("intermediate_size")),
                rope_theta=float(hf.get("rope_theta", 1e6)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                qkv_bias=True,
                rope_full_precision=False,
                mask_token_id=int(hf.get("mask_token_id", 151666)),
                pad_token_id=hf.get("pad_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                bos_token_id=hf.get("bos_token_id"),
                max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
                param_dtype=_hf_dtype(hf),
                dtype=_hf_dtype(hf),
            )
        raise ConfigError(f"{source}: unknown model_type={model_type!r}; expected 'llada' "
                          "(LLaDA) or 'Dream' (Dream)")

    def to_hf_dict(self) -> dict[str, Any]:
        """The hub `config.json` of this model, in its family's own key names."""
        torch_dtype = self.param_dtype
        if self.family == "llada":
            return {
                "model_type": "llada",
                "architectures": ["LLaDAModelLM"],
                "d_model": self.hidden_size,
                "n_layers": self.num_layers,
                "n_heads": self.num_heads,
                "n_kv_heads": self.num_kv_heads,
                "mlp_hidden_size": self.intermediate_size,
                "vocab_size": self.vocab_size,
                "embedding_size": self.vocab_size,
                "max_sequence_length": self.max_position_embeddings,
                "rope": True,
                "rope_theta": self.rope_theta,
                "rope_full_precision": self.rope_full_precision,
                "layer_norm_type": "rms",
                "rms_norm_eps": self.rms_norm_eps,
                "layer_norm_with_affine": True,
                "bias_for_layer_norm": False,
                "include_bias": False,
                "include_qkv_bias": False,
                "activation_type": "silu",
                "block_type": "llama",
                "weight_tying": False,
                "mask_token_id": self.mask_token_id,
                "pad_token_id": self.pad_token_id,
                "eos_token_id": self.eos_token_id,
                "bos_token_id": self.bos_token_id,
                "eot_token_id": self.eot_token_id,
                "torch_dtype": torch_dtype,
            }
        return {
            "model_type": "Dream",
            "architectures": ["DreamModel"],
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "max_position_embeddings": self.max_position_embeddings,
            "mask_token_id": self.mask_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "torch_dtype": torch_dtype,
        }


def _hf_dtype(hf: dict[str, Any]) -> str:
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return dtype if dtype in _DTYPES else "float32"


def load_hf_config(path) -> ModelConfig:
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf_dict(hf, source=str(path))


def llada_8b(**overrides) -> ModelConfig:
    """GSAI-ML/LLaDA-8B-Base / -Instruct (published config.json values)."""
    cfg = dict(family="llada", vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32,
               num_kv_heads=32, intermediate_size=12288, rope_theta=500000.0, rms_norm_eps=1e-5,
               qkv_bias=False, rope_full_precision=True, mask_token_id=126336,
               pad_token_id=126081, eos_token_id=126081, bos_token_id=126080,
               eot_token_id=126348, max_position_embeddings=4096, param_dtype="bfloat16",
               dtype="bfloat16")
    cfg.update(overrides)
    return ModelConfig(**cfg)


def dream_7b(**overrides) -> ModelConfig:
    """Dream-org/Dream-v0-Base-7B / -Instruct-7B (Qwen2.5-7B layout)."""
    cfg = dict(family="dream", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
               num_kv_heads=4, intermediate_size=18944, rope_theta=1e6, rms_norm_eps=1e-6,
               qkv_bias=True, rope_full_precision=False, mask_token_id=151666,
               pad_token_id=151643, eos_token_id=151643, bos_token_id=151665,
               max_position_embeddings=131072, param_dtype="bfloat16", dtype="bfloat16")
    cfg.update(overrides)
    return ModelConfig(**cfg)
