"""`ActKernel`: a linear kernel whose input is transformed online and quantized.

    y = Q_a(T(x)) @ W        T: online transform (or identity), Q_a: activation fake
                             quantization (`act_core`, or identity), W: float [in, out] or a
                             packed `QuantizedArray`

Online transforms (`OnlineTransform.kind`), all orthogonal so that pairing T with W' = T^T W
leaves the float layer unchanged:

    hadamard        x @ H_n / sqrt(n) on the whole input (QuaRot's down-projection input)
    hadamard_heads  x @ (H_h / sqrt(h) (x) I_d) for an input of h heads of width d: mixes the
                    heads (QuaRot's attention output, whose per-head part is folded offline)
    duquant         x @ R1 @ P @ R2: block-diagonal rotations R1, R2 (blocks of size b, stored
                    [n / b, b, b]) around a channel permutation P (stored as indices `perm`,
                    (x @ P)[..., j] = x[..., perm[j]])

The model's `Linear` calls `prepare_input`, which runs T and Q_a, records the result at the
hook point and multiplies it by W through `project`. Around a MoE layer's experts (W a float
[E, in, out] array or `QuantizedExperts`), `act_expert_matmul` quantizes the expert-sorted
input rows and runs the grouped matmul (`experts.expert_project`).

K/V quantization (`kv_core`) rides on the k_proj / v_proj kernels: `kv` (a `KVSpec`) and
`kv_clip` (one clip ratio per kv head, IA-AQ's search result) on k_proj's kernel quantize the
keys after RoPE, on v_proj's the values; `kv_rotate` on k_proj's kernel multiplies q and k by
H_hd / sqrt(hd) first (QuaRot's online rotation of the keys; q k^T is unchanged). Attention
calls `attention_stage` (registered with `project` by `qdlm_jax.kernels`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from qdlm_jax.models.experts import expert_project
from qdlm_jax.models.project import project
from qdlm_jax.quant import act_core, hadamard_core, kv_core
from qdlm_jax.quant.array_like import PackedMatrix

KINDS = ("hadamard", "hadamard_heads", "duquant")


@flax.struct.dataclass
class OnlineTransform:
    r1: jax.Array | None = None  # duquant [n/b, b, b]
    perm: jax.Array | None = None  # duquant [n] int32
    r2: jax.Array | None = None  # duquant [n/b, b, b]
    kind: str = flax.struct.field(pytree_node=False, default="hadamard")
    n_heads: int = flax.struct.field(pytree_node=False, default=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return apply_transform(self, x)

    def pair_weight(self, w: jax.Array) -> jax.Array:
        """T^T W = (W^T T)^T for a kernel W [in, out]: the weight that, fed T(x), gives x @ W."""
        return apply_transform(self, w.T).T


def _block_rotate(x, r):
    nb, b, _ = r.shape
    y = x.astype(jnp.float32).reshape(*x.shape[:-1], nb, b)
    return jnp.einsum("...bi,bij->...bj", y, r.astype(jnp.float32)).reshape(x.shape).astype(
        x.dtype)


def apply_transform(t: OnlineTransform, x: jax.Array) -> jax.Array:
    """x @ T on the last axis, in fp32, cast back to x.dtype (weights pair with it through
    `OnlineTransform.pair_weight`, so T^T is never applied to activations)."""
    if t.kind == "hadamard":
        return hadamard_core.hadamard_transform(x)
    if t.kind == "hadamard_heads":
        h = t.n_heads
        y = x.reshape(*x.shape[:-1], h, x.shape[-1] // h)
        y = hadamard_core.hadamard_transform(jnp.swapaxes(y, -1, -2))
        return jnp.swapaxes(y, -1, -2).reshape(x.shape)
    if t.kind == "duquant":
        y = _block_rotate(x, t.r1)
        y = jnp.take(y, t.perm, axis=-1)
        return _block_rotate(y, t.r2)
    raise ValueError(f"OnlineTransform.kind={t.kind!r}: expected one of {KINDS}")


@flax.struct.dataclass
class ActKernel(PackedMatrix):
    """A kernel [in, out] (float or `QuantizedArray`) with an input stage T then Q_a."""

    weight: Any
    transform: OnlineTransform | None = None
    act_range: jax.Array | None = None  # [2] = (lo, hi) for per-tensor static quantization
    kv_clip: jax.Array | None = None  # [kv heads] clip ratios of this projection's K or V
    act: act_core.ActSpec | None = flax.struct.field(pytree_node=False, default=None)
    kv: kv_core.KVSpec | None = flax.struct.field(pytree_node=False, default=None)
    kv_rotate: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def shape(self):
        return self.weight.shape

    @property
    def dtype(self):
        return self.weight.dtype

    def replace_weight(self, weight) -> "ActKernel":
        return self.replace(weight=weight)


def input_stage(x: jax.Array, k: ActKernel) -> tuple[jax.Array, Any]:
    if k.transform is not None:
        x = k.transform(x)
    static = None if k.act_range is None else (k.act_range[0], k.act_range[1])
    return act_core.fake_quant(x, k.act, static_range=static), k.weight


def act_matmul(x: jax.Array, k: ActKernel) -> jax.Array:
    x, w = input_stage(x, k)
    return project(x, w)


def act_expert_matmul(x: jax.Array, k: ActKernel, group_sizes: jax.Array) -> jax.Array:
    """The experts' grouped matmul (`experts.expert_project`) on transformed and / or
    quantized input rows: the online transform T (every expert's weight paired with it),
    then each row (a token, or a (token, expert) pair) quantized on its own."""
    if k.act_range is not None or (k.act is not None and k.act.granularity == "per_tensor"):
        raise ValueError("ActKernel around experts: dynamic input quantization only, not a "
                         "static range")
    if k.transform is not None:
        x = k.transform(x)
    if k.act is not None:
        x = act_core.fake_quant(x, k.act)
    return expert_project(x, k.weight, group_sizes)


def attention_stage(q, k, v, k_kernel, v_kernel):
    """(q, k, v) after QuaRot's key rotation and K/V fake quantization (module docstring);
    q [B, Tq, H, hd], k and v [B, T, KV, hd], k after RoPE."""
    if isinstance(k_kernel, ActKernel):
        if k_kernel.kv_rotate:
            q = hadamard_core.hadamard_transform(q)
            k = hadamard_core.hadamard_transform(k)
        k = kv_core.kv_fake_quant(k, k_kernel.kv, k_kernel.kv_clip)
    if isinstance(v_kernel, ActKernel):
        v = kv_core.kv_fake_quant(v, v_kernel.kv, v_kernel.kv_clip)
    return q, k, v


nnx.register_data_type(ActKernel)


def inner_weight(kernel):
    """The weight a kernel multiplies (the kernel itself unless it is an `ActKernel`)."""
    return kernel.weight if isinstance(kernel, ActKernel) else kernel


def with_weight(kernel, weight):
    """`kernel` with its weight replaced (keeps an `ActKernel`'s input stage)."""
    return kernel.replace_weight(weight) if isinstance(kernel, ActKernel) else weight
