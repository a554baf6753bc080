"""Pallas grouped low-bit matmul for routed experts: rows of x sorted by expert times each
row's own expert's packed weight, on TPU (Mosaic) and GPU (Triton).

    y[r] = x[r] @ w_hat[e(r)],     e(r) = the expert whose rows [start_e, start_e + n_e) hold r

with `q` a `QuantizedExperts` (E experts, kernels [E, K, N], 4- or 8-bit codes packed along
K, a scale and zero per (expert, output channel, group of K)) and `group_sizes` [E] = n_e
(sum = the rows of x; an expert may have 0 rows). The XLA path (`qexperts.experts_matmul`:
every expert dequantized, then `models.experts.grouped_matmul`) defines the result.

Tile layout (XLA, around the kernel): each expert's rows are padded to a whole number of row
tiles of bm, so a tile holds one expert's rows only:

    tiles_e = ceil(n_e / bm),  first_e = sum_{e' < e} tiles_e'
    tile t belongs to expert te[t] = #{e : first_e + tiles_e <= t}   (clipped to E - 1)
    padded row t*bm + i holds row start_e + (t - first_e) bm + i of x when that is < start_e + n_e,
    else zeros; T = ceil(rows / bm) + E tiles bound every split statically

and the result rows are gathered back from the padded positions. Rows of the unused tail
tiles (and of an expert's last partial tile) are computed and dropped.

TPU: grid (T, N / bn, K / bk) with `te` prefetched into SMEM (`PrefetchScalarGridSpec`); the
weight, scale and zero blocks of step (t, j, k) are those of expert te[t]; the body is the
dense weight-only kernel (`pallas_tpu.weight_only_kernel`). GPU: grid (T, N / bn); each
program reads te[t] and loops over K in steps of bk, loading expert te[t]'s codes, scales
and zeros with dynamic indices (`pallas_gpu` states the step). Weight-only: experts whose
inputs are quantized (`ActKernel` around the experts) run the XLA path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from qdlm_jax.kernels import common, pallas_gpu, pallas_tpu
from qdlm_jax.kernels.common import Support, round_up
from qdlm_jax.quant.qexperts import QuantizedExperts

BACKENDS = ("pallas_tpu", "pallas_gpu")


def supports(x, q: QuantizedExperts, backend: str) -> Support:
    """Whether `backend`'s grouped kernel takes the call: the rules of its dense kernel for
    one expert (bits 4 or 8, dtypes, groups), weight-only."""
    if not isinstance(q, QuantizedExperts):
        return Support(False, f"w is a {type(q).__name__}, not QuantizedExperts")
    kernels = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
    one = jax.eval_shape(lambda q: q.expert(0), q)
    return kernels[backend].supports(x, one)


def tile_layout(group_sizes: Int[Array, " E"], rows: int, bm: int
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(te [T], src [T*bm], valid [T*bm], dst [rows]) of the module docstring: the expert of
    each tile, the x row each padded row copies (and whether it holds one), and the padded
    position of each x row."""
    n_experts = group_sizes.shape[0]
    n_tiles = -(-rows // bm) + n_experts
    sizes = group_sizes.astype(jnp.int32)
    start = jnp.cumsum(sizes) - sizes
    tiles = -(-sizes // bm)
    first = jnp.cumsum(tiles) - tiles
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    te = jnp.minimum(jnp.sum((first + tiles)[None, :] <= t[:, None], axis=1), n_experts - 1)
    offset = (t - first[te])[:, None] * bm + jnp.arange(bm, dtype=jnp.int32)[None, :]
    valid = (offset < sizes[te][:, None]) & (t[:, None] < jnp.sum(tiles))
    src = jnp.where(valid, start[te][:, None] + offset, 0).reshape(-1)
    r = jnp.arange(rows, dtype=jnp.int32)
    e = jnp.minimum(jnp.sum(jnp.cumsum(sizes)[None, :] <= r[:, None], axis=1), n_experts - 1)
    dst = (first[e] + (r - start[e]) // bm) * bm + (r - start[e]) % bm
    return te.astype(jnp.int32), src, valid.reshape(-1), dst


def _weights(q: QuantizedExperts, n_pad: int, k_pad: int):
    """(packed [E, Np, Kp*bits/8], scale f32 [E, Np, Gp], zero f32 or None) per expert, as
    `common.prepare_weight` pads one expert."""
    return jax.vmap(lambda w: common.prepare_weight(w, n_pad=n_pad, k_pad=k_pad))(
        q.per_expert())


def _tpu(xs, q: QuantizedExperts, te, *, bm: int, interpret: bool):
    n_x = len(xs)
    _, k, n = q.shape
    one = jax.eval_shape(lambda q: q.expert(0), q)
    blocks = pallas_tpu.choose_blocks(bm, n, k, bits=q.bits, group_size=one.group_size,
                                      n_groups=one.n_groups)
    _, bn, bk = blocks
    n_pad, k_pad = round_up(n, bn), round_up(k, bk)
    packed, scale, zero = _weights(q, n_pad, k_pad)
    xs = [common.pad_to(x, 1, k_pad // n_x) for x in xs]
    rows = xs[0].shape[0]
    grid = (rows // bm, n_pad // bn, k_pad // bk)
    lanes = bk * q.bits // 8
    group_maps = pallas_tpu.group_positions(bk, one.group_size, one.n_groups)

    def col_spec(position):
        return pl.BlockSpec((None, None, bn, 1),
                            lambda i, j, kk, te: (te[i], position(kk), j, 0))

    cols = [jnp.swapaxes(scale, 1, 2)[..., None]] * len(group_maps)
    col_specs = [col_spec(f) for f in group_maps]
    if zero is not None:
        cols += [jnp.swapaxes(zero, 1, 2)[..., None]] * len(group_maps)
        col_specs *= 2
    body = functools.partial(pallas_tpu.weight_only_kernel, bits=q.bits, n_x=n_x,
                             n_cols=len(group_maps), sym=zero is None,
                             group_lanes=one.group_size * q.bits // 8, n_k=grid[2])
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=grid,
        in_specs=[pl.BlockSpec((bm, lanes), lambda i, j, kk, te: (i, kk))] * n_x
        + [pl.BlockSpec((None, bn, lanes), lambda i, j, kk, te: (te[i], j, kk))] + col_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk, te: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)])
    y = pl.pallas_call(
        lambda te_ref, *refs: body(*refs), grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct((rows, n_pad), xs[0].dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=pallas_tpu.VMEM_LIMIT_BYTES),
        interpret=interpret,
    )(te, *xs, packed, *cols)
    return y[:, :n]


def _gpu_kernel(te_ref, *refs, bits, n_x, sym, bk, bn, group_size, per_channel, steps):
    x_refs, p_ref = refs[:n_x], refs[n_x]
    s_ref, z_ref, o_ref = (refs[n_x + 1], None, refs[n_x + 2]) if sym else refs[n_x + 1:]
    e = te_ref[pl.program_id(0)]
    cols = pl.ds(pl.program_id(1) * bn, bn)
    lanes = bk * bits // 8

    def step(kk, acc):
        k0 = kk * lanes
        codes = common.split_codes(p_ref[e, cols, pl.ds(k0, lanes)], bits)
        g = 0 if per_channel else (kk * bk) // group_size
        scale = s_ref[e, cols, pl.ds(g, 1)]
        zero = z_ref[e, cols, pl.ds(g, 1)] if not sym else float(2 ** (bits - 1))
        for c, x_ref in zip(codes, x_refs):
            w = ((c.astype(jnp.float32) - zero) * scale).astype(x_ref.dtype)
            acc += jax.lax.dot_general(x_ref[:, pl.ds(k0, lanes)], w, pallas_gpu.DIMS,
                                       preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _gpu(xs, q: QuantizedExperts, te, *, bm: int, interpret: bool):
    n_x = len(xs)
    n_experts, k, n = q.shape
    one = jax.eval_shape(lambda q: q.expert(0), q)
    blocks = pallas_gpu.choose_blocks(bm, n, k, group_size=one.group_size,
                                      n_groups=one.n_groups)
    bn, bk = blocks.bn, blocks.bk
    k_unit = bk if one.n_groups == 1 else math.lcm(bk, one.group_size)
    n_pad, k_pad = round_up(n, bn), round_up(k, k_unit)
    packed, scale, zero = _weights(q, n_pad, k_pad)
    xs = [common.pad_to(x, 1, k_pad // n_x) for x in xs]
    rows, k_half = xs[0].shape
    full = [pl.BlockSpec(a.shape, lambda i, j, nd=a.ndim: (0,) * nd)
            for a in [te, packed, scale] + ([zero] if zero is not None else [])]
    kernel = functools.partial(_gpu_kernel, bits=q.bits, n_x=n_x, sym=zero is None, bk=bk,
                               bn=bn, group_size=one.group_size,
                               per_channel=one.n_groups == 1, steps=k_pad // bk)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, n_pad), xs[0].dtype),
        grid=(rows // bm, n_pad // bn),
        in_specs=[full[0]] + [pl.BlockSpec((bm, k_half), lambda i, j: (i, 0))] * n_x
        + full[1:],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
    )(te, *xs, packed, scale, *([zero] if zero is not None else []))
    return y[:, :n]


def grouped_qmatmul(x: Float[Array, "M K"], q: QuantizedExperts,
                    group_sizes: Int[Array, " E"], *, backend: str,
                    interpret: bool = False, bm: int | None = None) -> Float[Array, "M N"]:
    """Row r of x (sorted by expert) times its expert's w_hat on `backend`'s kernel (module
    docstring); `supports(x, q, backend)` must hold. `bm`: rows per tile (default: 128 on
    TPU, 32 on GPU, or fewer for a small x)."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_qmatmul: backend={backend!r}; expected one of {BACKENDS}")
    ok, reason = supports(x, q, backend)
    if not ok:
        raise ValueError(f"grouped_qmatmul ({backend}): unsupported call: {reason}")
    if group_sizes.shape != (q.shape[0],):
        raise ValueError(f"grouped_qmatmul: group_sizes has shape {group_sizes.shape}, "
                         f"expected ({q.shape[0]},) (one count per expert)")
    rows, k = x.shape
    if bm is None:
        bm = 128 if backend == "pallas_tpu" else 32
        bm = min(bm, round_up(max(rows, 1), 32 if backend == "pallas_tpu" else 16))
    te, src, valid, dst = tile_layout(group_sizes, rows, bm)
    x_pad = jnp.where(valid[:, None], x[src], 0).astype(x.dtype)
    xs = (x_pad[:, 0::2], x_pad[:, 1::2]) if q.bits == 4 else (x_pad,)
    run = _tpu if backend == "pallas_tpu" else _gpu
    return run(xs, q, te, bm=bm, interpret=interpret)[dst]


__all__ = ["BACKENDS", "grouped_qmatmul", "supports", "tile_layout"]
