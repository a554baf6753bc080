"""SmoothQuant: migrate activation outliers into the weights with a per-channel scale.

For a linear input X [tokens, in] feeding weights W_1..W_k ([out_i, in], one per consumer of
the same input) and migration strength alpha:

    s_j = max(|X_j|)^alpha / max(|W_{:, j}|)^(1 - alpha)        (max over tokens / all rows)
    X' = X / s,   W'_i = W_i * s     (so X' W'^T = X W^T)

s is clamped to at least 1e-5 (as is each max) so silent channels stay finite. The division
is folded into the producer of X: an RMSNorm weight (gamma / s) or the output channels of the
preceding linear (`awq_core.fold_scales` does both).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float

_MIN = 1e-5


def smooth_scales(act_absmax: Float[Array, "in"], weights: Sequence[Float[Array, "out in"]], *,
                  alpha: float = 0.5) -> jnp.ndarray:
    """s [in] from the per-channel activation max and the consumers' weights (formula above)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha={alpha!r}: expected a value in [0, 1]")
    w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0)
                               for w in weights]), axis=0)
    a = jnp.maximum(act_absmax.astype(jnp.float32), _MIN)
    s = a ** alpha / jnp.maximum(w_max, _MIN) ** (1.0 - alpha)
    return jnp.maximum(s, _MIN)
