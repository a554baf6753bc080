"""Model configuration shared by the LLaDA and Dream families.

One frozen dataclass describes every dLLM the project runs; the two families differ only
in field values (see `llada_8b()` and `dream_7b()`). Each hub layout's `config.json` mapping
lives with its key map in `qdlm_jax/checkpoints/{llada,dream}.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from qdlm_jax.errors import ConfigError

Family = Literal["llada", "dream"]
FAMILIES = ("llada", "dream")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def family_shifts_logits(family: str | None) -> bool:
    """Whether a family's training objective predicts token i from output i-1 (Dream)."""
    return family == "dream"


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
    eot_token_id: int | None = None  # an instruct turn's end (<|eot_id|>, <|im_end|>) or None
    stop_token_ids: tuple[int, ...] = ()  # further ids that end a generated answer
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
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of "
                                  f"{sorted(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated answer: EOS, the end of turn, and the checkpoint's others."""
        ids = (self.eos_token_id, self.eot_token_id, *self.stop_token_ids)
        return tuple(dict.fromkeys(t for t in ids if t is not None))

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def shift_logits(self) -> bool:
        """Dream predicts token i from position i-1 (it starts from an AR model)."""
        return family_shifts_logits(self.family)

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
               eot_token_id=151645, max_position_embeddings=131072, param_dtype="bfloat16",
               dtype="bfloat16")
    cfg.update(overrides)
    return ModelConfig(**cfg)
