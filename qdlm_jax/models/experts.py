"""Routed experts (mixture of experts) with static shapes, and the expert matmul swap point.

Given each token's top-k experts e_{t,1..k} and weights w_{t,1..k}, the layer computes

    y_t = sum_j w_{t,j} * (act(x_t G_e) * (x_t U_e)) D_e,     e = e_{t,j}

with the experts stored [in, out] like every kernel of the project: `gate_up` [E, H, 2I] holds
[G_e | U_e] (gate columns first, as transformers' fused `gate_up_proj` rows), `down` [E, I, H].
The fused layout keeps one kernel per expert input (gate and up see the same x).

Computation (`moe`): the N*k (token, expert) pairs are sorted by expert (a stable argsort of
the flattened choices), the group sizes are `bincount(choices, length=E)`, the tokens are
gathered in that order, both matmuls run as a grouped matmul over the groups (each row meets
only its own expert's weights: k/E of the dense work), and the weighted rows are
scatter-added back to their tokens in fp32. Every shape depends on N, k and E only.

The grouped matmul has two backends behind `grouped_matmul`, chosen per platform with
`jax.lax.platform_dependent`: `jax.lax.ragged_dot` on TPU and GPU, and on CPU (where XLA's
ragged_dot is slower than computing every expert densely) a loop over (expert, chunk of
`CPU_CHUNK` rows) pairs: pair p belongs to the expert whose cumulative chunk count first
exceeds p, its rows are that expert's rows [start + c CPU_CHUNK, ...) of the sorted input, and
one [CPU_CHUNK, in] x [in, out] dot per pair writes them (rows past the expert's end are
masked). The pair count is at most ceil(M / CPU_CHUNK) + E for M sorted rows, so the loop
has a static bound and the work is at most (M + E CPU_CHUNK) rows' worth.

`expert_project(x, kernel, group_sizes)` is the one function both matmuls go through; a
quantized per-expert kernel type registers its grouped matmul with
`register_expert_kernel_type`, as `project.register_kernel_type` does for dense linears.
`moe_dense` computes every expert for every token (E/k times the work, in large dense
matmuls): the test reference of `moe`, and the faster choice for training a small float
model on CPU (`DiffusionGemmaConfig.expert_compute = "dense"`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# {kernel type: fn(x [N, in], kernel, group_sizes [E]) -> [N, out]} for non-array kernels.
_EXPERT_MATMULS: dict[type, Callable[[jax.Array, Any, jax.Array], jax.Array]] = {}


def register_expert_kernel_type(kernel_type: type,
                                matmul: Callable[[jax.Array, Any, jax.Array], jax.Array]):
    """Teaches `expert_project` a kernel type (e.g. packed quantized experts)."""
    _EXPERT_MATMULS[kernel_type] = matmul


def gelu_tanh(x: jax.Array) -> jax.Array:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (PyTorch's gelu 'tanh'), evaluated in
    fp32 and rounded once to x's dtype, as PyTorch does for bf16 inputs."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


CPU_CHUNK = 16  # rows per dot of the CPU grouped matmul


class ChunkPairs(NamedTuple):
    """The (group, chunk) pairs of rows sorted by group (module docstring): group g's rows
    are [starts[g], starts[g] + sizes[g]), cut into chunks[g] chunks; pair p belongs to the
    first group whose cumulative chunk count `cum` exceeds p."""

    starts: Int[Array, " E"]
    sizes: Int[Array, " E"]
    chunks: Int[Array, " E"]
    cum: Int[Array, " E"]
    chunk: int

    @classmethod
    def of(cls, group_sizes: Int[Array, " E"], chunk: int) -> "ChunkPairs":
        sizes = group_sizes.astype(jnp.int32)
        chunks = (sizes + chunk - 1) // chunk
        return cls(starts=jnp.cumsum(sizes) - sizes, sizes=sizes, chunks=chunks,
                   cum=jnp.cumsum(chunks), chunk=chunk)

    def bound(self, rows: int) -> int:
        """A static upper bound of the pair count for `rows` sorted rows."""
        return -(-rows // self.chunk) + self.sizes.shape[0]

    def at(self, p) -> tuple[jax.Array, jax.Array, Bool[Array, " chunk"]]:
        """(group, first row, which of the chunk's rows are the group's) of pair p; past the
        last pair every row is masked."""
        g = jnp.minimum(jnp.searchsorted(self.cum, p, side="right"), self.cum.shape[0] - 1)
        row = self.starts[g] + (p - (self.cum[g] - self.chunks[g])) * self.chunk
        keep = ((jnp.arange(self.chunk) < self.starts[g] + self.sizes[g] - row)
                & (p < self.cum[-1]))
        return g, row, keep


def grouped_matmul_chunked(x: Float[Array, "M In"],
                           w: Float[Array, "E In Out"] | Callable[[jax.Array], jax.Array],
                           group_sizes: Int[Array, " E"],
                           chunk: int = CPU_CHUNK) -> Float[Array, "M Out"]:
    """Row r of x (rows sorted by group, group_sizes[e] rows for group e) times w[group(r)],
    one (group, chunk of `chunk` rows) pair per loop step (module docstring), accumulated in
    fp32 and returned in fp32. `w` may also be a function of a traced group index g giving
    that group's weight [in, out] (a cast slice, a dequantized packed expert): it is called
    once per group, when the sorted rows reach it, and kept for the group's chunks, so no
    array of every group's weights is formed."""
    m, d_in = x.shape
    pairs = ChunkPairs.of(group_sizes, chunk)
    xp = jnp.pad(x, ((0, chunk), (0, 0)))
    cached = callable(w)  # a function's result is kept for the group's chunks; a slice not

    def fetch(g):
        return w(g) if cached else jax.lax.dynamic_index_in_dim(w, g, 0, keepdims=False)

    first = jax.eval_shape(fetch, jnp.int32(0))
    n_out = first.shape[-1]

    def body(p, carry):
        out, weight, last = carry
        g, row, keep = pairs.at(p)
        if cached:  # a new group: its weight, formed once
            weight = jax.lax.cond(g != last, fetch, lambda _: weight, g)
        rows = jax.lax.dynamic_slice(xp, (row, 0), (chunk, d_in))
        y = jnp.dot(rows, weight if cached else fetch(g), preferred_element_type=jnp.float32)
        cur = jax.lax.dynamic_slice(out, (row, 0), (chunk, n_out))
        out = jax.lax.dynamic_update_slice(out, jnp.where(keep[:, None], y, cur), (row, 0))
        return out, weight, g

    weight0 = jnp.zeros(first.shape, first.dtype) if cached else None
    out, _, _ = jax.lax.fori_loop(
        0, pairs.bound(m), body,
        (jnp.zeros((m + chunk, n_out), jnp.float32), weight0, jnp.int32(-1)))
    return out[:m]


def grouped_matmul(x: Float[Array, "M In"], w: Float[Array, "E In Out"],
                   group_sizes: Int[Array, " E"]) -> Float[Array, "M Out"]:
    """Row r of x (sorted by group) times w[group(r)], accumulated in fp32, returned in fp32:
    `jax.lax.ragged_dot` on TPU / GPU, `grouped_matmul_chunked` on CPU."""
    def ragged(x, w, group_sizes):
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)

    return jax.lax.platform_dependent(x, w, group_sizes, cpu=grouped_matmul_chunked,
                                      default=ragged)


def grouped_matmul_fetched(x: Float[Array, "M In"], fetch: Callable[[jax.Array], jax.Array],
                           fetch_all: Callable[[], jax.Array],
                           group_sizes: Int[Array, " E"]) -> Float[Array, "M Out"]:
    """`grouped_matmul` where group g's weight [in, out] is `fetch(g)` (g traced) and all of
    them [E, in, out] `fetch_all()`: on CPU each group's weight is formed once, when the
    sorted rows reach it (never every group's at once: a packed layer's experts dequantized,
    or a bf16 layer's experts cast, one expert at a time); on TPU / GPU ragged_dot over
    `fetch_all()`. The same values as `grouped_matmul(x, fetch_all(), group_sizes)`."""
    def chunked(x, group_sizes):
        return grouped_matmul_chunked(x, fetch, group_sizes)

    def ragged(x, group_sizes):
        return jax.lax.ragged_dot(x, fetch_all(), group_sizes,
                                  preferred_element_type=jnp.float32)

    return jax.lax.platform_dependent(x, group_sizes, cpu=chunked, default=ragged)


def expert_project(x: Float[Array, "N In"], kernel: Any,
                   group_sizes: Int[Array, " E"]) -> Float[Array, "N Out"]:
    """Row r of x (rows sorted by expert, group_sizes[e] rows for expert e) times its expert's
    kernel[e] [in, out], in x's dtype; float kernels are cast to x's dtype (one expert at a
    time on CPU) and the dots accumulate in fp32 (as `project`)."""
    matmul = _EXPERT_MATMULS.get(type(kernel))
    if matmul is not None:
        return matmul(x, kernel, group_sizes)
    if kernel.dtype == x.dtype:
        return grouped_matmul(x, kernel, group_sizes).astype(x.dtype)
    return grouped_matmul_fetched(
        x, lambda g: jax.lax.dynamic_index_in_dim(kernel, g, 0, keepdims=False).astype(x.dtype),
        lambda: kernel.astype(x.dtype), group_sizes).astype(x.dtype)


def sort_by_expert(top_ids: Int[Array, "N K"], num_experts: int
                   ) -> tuple[Int[Array, " NK"], Int[Array, " NK"], Int[Array, " E"]]:
    """(order, token, group_sizes) of the N*K (token, choice) pairs sorted by expert (stable):
    sorted pair r is flat choice order[r] of token token[r]; expert e has group_sizes[e]
    consecutive pairs."""
    k = top_ids.shape[1]
    flat = top_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, order // k, group_sizes


def moe(x: Float[Array, "N H"], gate_up: Any, down: Any, top_ids: Int[Array, "N K"],
        top_weights: Float[Array, "N K"],
        activation: Callable[[jax.Array], jax.Array] = gelu_tanh) -> Float[Array, "N H"]:
    """sum_j w_{t,j} * down_e(act(gate_e x_t) * up_e x_t) over each token's chosen experts,
    computed on the expert-sorted (token, expert) pairs (module docstring)."""
    n, k = top_ids.shape
    order, token, group_sizes = sort_by_expert(top_ids, gate_up.shape[0])
    h = expert_project(x[token], gate_up, group_sizes)
    inter = h.shape[-1] // 2
    h = activation(h[:, :inter]) * h[:, inter:]
    y = expert_project(h, down, group_sizes).astype(jnp.float32)
    y = y * top_weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    out = jnp.zeros((n, y.shape[-1]), jnp.float32).at[token].add(y)
    return out.astype(x.dtype)


def moe_dense(x: Float[Array, "N H"], gate_up: jax.Array, down: jax.Array,
                        top_ids: Int[Array, "N K"], top_weights: Float[Array, "N K"],
                        activation: Callable[[jax.Array], jax.Array] = gelu_tanh
                        ) -> Float[Array, "N H"]:
    """`moe` computed densely: every expert on every token, combined with the weights of the
    chosen ones (zero elsewhere). E/k times the work; float experts only."""
    if not (isinstance(gate_up, jax.Array) and isinstance(down, jax.Array)):
        raise TypeError(f"moe_dense: float expert arrays only, got {type(gate_up).__name__} / "
                        f"{type(down).__name__} (packed experts run through `moe`)")
    num_experts = gate_up.shape[0]
    inter = gate_up.shape[-1] // 2
    h = jnp.einsum("nh,ehi->eni", x, gate_up, preferred_element_type=jnp.float32)
    h = activation(h[..., :inter]) * h[..., inter:]
    y = jnp.einsum("eni,eih->enh", h, down, preferred_element_type=jnp.float32)
    combine = jnp.zeros((x.shape[0], num_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], top_ids].add(
        top_weights.astype(jnp.float32))
    return jnp.einsum("ne,enh->nh", combine, y).astype(x.dtype)
