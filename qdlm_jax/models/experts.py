"""Routed experts (mixture of experts) with static shapes, and the expert matmul swap point.

Given each token's top-k experts e_{t,1..k} and weights w_{t,1..k}, the layer computes

    y_t = sum_j w_{t,j} * (act(x_t G_e) * (x_t U_e)) D_e,     e = e_{t,j}

with the experts stored [in, out] like every kernel of the project: `gate_up` [E, H, 2I] holds
[G_e | U_e] (gate columns first, as transformers' fused `gate_up_proj` rows), `down` [E, I, H].
The fused layout keeps one kernel per expert input (gate and up see the same x).

Computation (`moe`): the N*k (token, expert) pairs are sorted by expert (a stable argsort of
the flattened choices), the group sizes are `bincount(choices, length=E)`, the tokens are
gathered in that order, both matmuls run as `jax.lax.ragged_dot` over the groups (each row
meets only its own expert's weights: k/E of the dense work), and the weighted rows are
scatter-added back to their tokens in fp32. Every shape depends on N, k and E only.

`expert_project(x, kernel, group_sizes)` is the one function both matmuls go through; a
quantized per-expert kernel type registers its grouped matmul with
`register_expert_kernel_type`, as `project.register_kernel_type` does for dense linears.
`moe_dense_reference` computes every expert for every token; it exists for tests.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

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


def expert_project(x: Float[Array, "N In"], kernel: Any,
                   group_sizes: Int[Array, " E"]) -> Float[Array, "N Out"]:
    """Row r of x (rows sorted by expert, group_sizes[e] rows for expert e) times its expert's
    kernel[e] [in, out], in x's dtype; float kernels are cast to x's dtype and the dots
    accumulate in fp32 (as `project`)."""
    matmul = _EXPERT_MATMULS.get(type(kernel))
    if matmul is not None:
        return matmul(x, kernel, group_sizes)
    y = jax.lax.ragged_dot(x, kernel.astype(x.dtype), group_sizes,
                           preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def moe(x: Float[Array, "N H"], gate_up: Any, down: Any, top_ids: Int[Array, "N K"],
        top_weights: Float[Array, "N K"],
        activation: Callable[[jax.Array], jax.Array] = gelu_tanh) -> Float[Array, "N H"]:
    """sum_j w_{t,j} * down_e(act(gate_e x_t) * up_e x_t) over each token's chosen experts,
    computed on the expert-sorted (token, expert) pairs (module docstring)."""
    n, k = top_ids.shape
    num_experts = gate_up.shape[0]
    flat = top_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    h = expert_project(x[token], gate_up, group_sizes)
    inter = h.shape[-1] // 2
    h = activation(h[:, :inter]) * h[:, inter:]
    y = expert_project(h, down, group_sizes).astype(jnp.float32)
    y = y * top_weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    out = jnp.zeros((n, y.shape[-1]), jnp.float32).at[token].add(y)
    return out.astype(x.dtype)


def moe_dense_reference(x: Float[Array, "N H"], gate_up: jax.Array, down: jax.Array,
                        top_ids: Int[Array, "N K"], top_weights: Float[Array, "N K"],
                        activation: Callable[[jax.Array], jax.Array] = gelu_tanh
                        ) -> Float[Array, "N H"]:
    """`moe` computed densely: every expert on every token, combined with the weights of the
    chosen ones (zero elsewhere). E/k times the work; for tests."""
    num_experts = gate_up.shape[0]
    inter = gate_up.shape[-1] // 2
    h = jnp.einsum("nh,ehi->eni", x, gate_up, preferred_element_type=jnp.float32)
    h = activation(h[..., :inter]) * h[..., inter:]
    y = jnp.einsum("eni,eih->enh", h, down, preferred_element_type=jnp.float32)
    combine = jnp.zeros((x.shape[0], num_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], top_ids].add(
        top_weights.astype(jnp.float32))
    return jnp.einsum("ne,enh->nh", combine, y).astype(x.dtype)
