"""Per-expert GPTQ for routed experts: one Hessian per expert from the rows routed to it.

A MoE layer's expert e applies W_e [out, in] to the rows routed to it: for `gate_up` the
token's normed input x_t, for `down` the expert's own intermediate a_{t,e} =
act(x_t G_e) * (x_t U_e). With R_e the (token, choice) rows routed to e (a token that picks
e once contributes one row; weighted by c_t when calibration weights are given):

    gram_e = sum_{r in R_e} c_r z_r z_r^T        [in, in]      (z = x or a_e)
    n_e    = sum_{r in R_e} c_r                  (|R_e| unweighted)
    H_e    = gptq_core.hessian(gram_e, n_e) = 2 gram_e / n_e

and W_e is quantized by `gptq_core.gptq(W_e, H_e, damp=d_e)`, expert by expert. An expert
sees about k / E of the tokens (1/16 for DiffusionGemma 26B-A4B), so some see few or none.
`ThinExperts` states what happens to an expert with fewer than `min_rows` routed rows:

    fallback "damp"        H_e as above with the larger dampening `thin_damp`; an expert with
                           no rows gets H = I, for which GPTQ is round-to-nearest (no error
                           to spread), never the all-dead-inputs case that would zero W_e;
    fallback "all_tokens"  H_e from the rows of every token through expert e, `all_grams[e]`
                           / `all_counts[e]` (GPTQModel's "calibrate all experts": every
                           expert run on every token for its Hessian only, the layer's
                           output still routed); its dampening is the normal `damp`.

`expert_grams` accumulates gram_e and n_e from rows sorted by expert (`models.experts`
sorting), one (expert, chunk of rows) pair at a time, so the work is the routed rows' and
the memory one [E, in, in] array.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from qdlm_jax.models.experts import CPU_CHUNK, ChunkPairs
from qdlm_jax.quant.gptq_core import GPTQResult, gptq, hessian

FALLBACKS = ("damp", "all_tokens")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThinExperts:
    """What GPTQ does for an expert with fewer than `min_rows` routed rows (module doc)."""

    min_rows: int = 16  # an expert with fewer routed rows is thin
    fallback: str = "damp"  # damp | all_tokens
    thin_damp: float = 0.1  # the "damp" fallback's dampening (fraction of mean diag H)

    def __post_init__(self):
        if not isinstance(self.min_rows, int) or isinstance(self.min_rows, bool) \
                or self.min_rows < 0:
            raise ValueError(f"min_rows={self.min_rows!r}: expected an integer >= 0")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback={self.fallback!r}: expected one of {FALLBACKS}")
        if not self.thin_damp >= 0:
            raise ValueError(f"thin_damp={self.thin_damp!r}: expected a fraction >= 0")


@jax.jit
def _grams(rows, group_sizes, weights):
    m, d = rows.shape
    pairs = ChunkPairs.of(group_sizes, CPU_CHUNK)
    chunk = pairs.chunk
    zp = jnp.pad(rows.astype(jnp.float32), ((0, chunk), (0, 0)))
    cp = jnp.pad(weights.astype(jnp.float32), (0, chunk))

    def body(p, carry):
        grams, counts = carry
        g, row, keep = pairs.at(p)
        c = jnp.where(keep, jax.lax.dynamic_slice(cp, (row,), (chunk,)), 0.0)
        z = jax.lax.dynamic_slice(zp, (row, 0), (chunk, d))
        gram = jnp.einsum("r,ri,rj->ij", c, z, z, precision=jax.lax.Precision.HIGHEST)
        return grams.at[g].add(gram), counts.at[g].add(jnp.sum(c))

    e = group_sizes.shape[0]
    init = (jnp.zeros((e, d, d), jnp.float32), jnp.zeros((e,), jnp.float32))
    return jax.lax.fori_loop(0, pairs.bound(m), body, init)


def expert_grams(rows: Float[Array, "M in"], group_sizes: Int[Array, " E"],
                 weights: Float[Array, " M"] | None = None
                 ) -> tuple[Float[Array, "E in in"], Float[Array, " E"]]:
    """(gram_e, n_e) of rows sorted by expert (group_sizes[e] consecutive rows for expert e),
    each row weighted by `weights` (default 1), in fp32."""
    rows = jnp.asarray(rows)
    w = jnp.ones(rows.shape[:1], jnp.float32) if weights is None else jnp.asarray(weights)
    return _grams(rows, jnp.asarray(group_sizes, jnp.int32), w)


def expert_hessian(gram: Float[Array, "in in"], count, rule: ThinExperts, damp: float, *,
                   all_gram: Float[Array, "in in"] | None = None, all_count=None
                   ) -> tuple[Float[Array, "in in"], float, str]:
    """(H_e, dampening, how) for one expert (module docstring); `how` is "routed",
    "thin-damped", "thin-identity" or "thin-all-tokens"."""
    n = float(count)
    if n >= rule.min_rows:
        return hessian(gram, n), damp, "routed"
    if rule.fallback == "all_tokens":
        if all_gram is None:
            raise ValueError("ThinExperts(fallback='all_tokens'): the expert's all-token gram "
                             "(calibrate every expert on every token) was not given")
        return hessian(all_gram, float(all_count)), damp, "thin-all-tokens"
    if n == 0:
        return jnp.eye(gram.shape[0], dtype=jnp.float32), rule.thin_damp, "thin-identity"
    return hessian(gram, n), rule.thin_damp, "thin-damped"


def gptq_experts(w: Float[Array, "E out in"], grams: Float[Array, "E in in"],
                 counts: Float[Array, " E"], *, bits: int, group_size: int, sym: bool,
                 damp: float = 0.01, rule: ThinExperts = ThinExperts(),
                 all_grams: Float[Array, "E in in"] | None = None,
                 all_counts: Float[Array, " E"] | None = None, block_size: int = 128,
                 act_order: bool = False, static_groups: bool = False
                 ) -> tuple[list[GPTQResult], list[str]]:
    """GPTQ of each expert's W_e [out, in] with its own Hessian (module docstring). Returns
    the per-expert results and how each Hessian was formed."""
    w = jnp.asarray(w)
    if w.ndim != 3 or grams.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"gptq_experts: w {tuple(w.shape)} [E, out, in] and grams "
                         f"{tuple(grams.shape)} [E, in, in] do not match")
    counts = np.asarray(counts, np.float64)
    results, how = [], []
    for e in range(w.shape[0]):
        h, d, kind = expert_hessian(
            grams[e], counts[e], rule, damp,
            all_gram=None if all_grams is None else all_grams[e],
            all_count=None if all_counts is None else all_counts[e])
        results.append(gptq(w[e], h, bits=bits, group_size=group_size, sym=sym, damp=d,
                            block_size=block_size, act_order=act_order,
                            static_groups=static_groups))
        how.append(kind)
    return results, how
