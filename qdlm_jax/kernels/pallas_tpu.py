"""Pallas TPU (Mosaic) kernels for `qmatmul`: W4A16 / W8A16 with group-wise scales, and
W8A8 / W4A4 with per-token or per-group activations and per-channel weights.

Grid ``(M / bm, N / bn, K / bk)``, K innermost ("arbitrary"), a float32 (or int32) VMEM
accumulator; the output block is written at the last K step. Per grid step:

  weight-only   p = packed[bn, bk/2] (4 bits) or [bn, bk] (8 bits), widened to int32;
                codes = p & 15 and (p >> 4) & 15 (low nibble = even column), or p;
                w = ((codes - zero) * scale).astype(x.dtype)        [bn, bk/2] per nibble
                acc += x_even @ w_lo.T + x_odd @ w_hi.T              (fp32 accumulation)
                The scale/zero of each group in the block arrive as [bn, 1] columns (one
                input per group position, from a [G, N, 1] view), spread over the lanes of
                their group with a select chain, so no lane slicing is needed.
  act_bits      x_q (int8, quantized per token ahead of the kernel, common.py), codes - 2**(bits-1)
                as int8; acc_i32 += x_q_even @ w_lo.T + ... (int8 MXU, int32 accumulation);
                last step: y = ((acc * s_w[1, bn]) * s_x[bm, 1]).astype(x.dtype)
  act groups    (act_group_size ga: bk is a multiple of ga, at most 8 groups a block) per
                group a of the block, the codes outside a's lanes are set to 0 (a lane iota
                select, as for weight groups) and acc_a = x_q @ w_a.T (int32) is exact for
                that group alone; f32 acc += (acc_a * s_w[1, bn]) * s_x_a[bm, 1], group after
                group; s_x_a arrives as a [bm, 1] column (one input per group position, from
                a [Ga, M, 1] view of s_x). Each group costs one dot over the whole block, so
                the MXU work is bk / ga times that of per-token activations (2x for 4-bit
                weights with ga = 128, 1x for 8-bit; bk is the smallest block that fits)

The x columns are split into even/odd halves outside the kernel (one XLA pass over x),
so the packed bytes never need interleaving inside it.

Block sizes (`choose_blocks`): bm = M rounded up to 32 (int8 sublane tile) up to 512;
bn from (512, 256, 128); bk from (1024, 512, 256) codes (128 too for 8 bits), at most 512
for prefill; groups per block <= 8. Untuned starting points, not measured on a TPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qdlm_jax.kernels import common
from qdlm_jax.kernels.common import Support, round_up

DTYPES = (jnp.bfloat16, jnp.float32)
MAX_GROUPS_PER_BLOCK = 8
VMEM_LIMIT_BYTES = 48 * 1024 * 1024
_BK = {4: (1024, 512, 256), 8: (1024, 512, 256, 128)}  # lanes: bk * bits / 8 % 128 == 0
_BN = (512, 256, 128)
_DIMS = (((1,), (1,)), ((), ()))  # a[m, k] . b[n, k] -> [m, n]


class Blocks(NamedTuple):
    bm: int
    bn: int
    bk: int  # codes (K columns) per grid step


def _group_ok(bk: int, group_size: int, n_groups: int) -> bool:
    if n_groups == 1:
        return True
    if bk % group_size == 0:
        return bk // group_size <= MAX_GROUPS_PER_BLOCK
    return group_size % bk == 0


def _fewest_padded(size: int, candidates) -> int:
    """The candidate needing the least padding of `size` (the largest on ties)."""
    return min(candidates, key=lambda c: (round_up(size, c), -c))


def choose_blocks(m: int, n: int, k: int, *, bits: int, group_size: int,
                  n_groups: int) -> Blocks | None:
    """TPU block sizes for x[m, k] @ w[k, n]; None if no K block fits the group size."""
    if m <= 512:
        bm = round_up(m, 32)
    else:
        bm = 512 if m % 512 == 0 else 256
    bks = [c for c in _BK[bits] if _group_ok(c, group_size, n_groups)]
    if bm >= 256:
        bks = [c for c in bks if c <= 512] or bks
    if not bks:
        return None
    return Blocks(bm=bm, bn=_fewest_padded(n, _BN), bk=_fewest_padded(k, bks))


def act_group_block(bits: int, act_group_size: int) -> int | None:
    """The K block (codes) for per-group activations: the smallest of `_BK[bits]` that holds
    a whole number of groups, at most MAX_GROUPS_PER_BLOCK of them; None if none does."""
    fits = [c for c in _BK[bits] if c % act_group_size == 0
            and c // act_group_size <= MAX_GROUPS_PER_BLOCK]
    return min(fits) if fits else None


def supports(x, w, act_bits=None, act_group_size=None) -> Support:
    """Whether these kernels take the call (else `qmatmul` falls back to XLA).

    Rules: QuantizedArray "in_out" without g_idx; 4- or 8-bit codes; x bf16 or f32;
    group_size == K, or a multiple of 128 that a K block (1024/512/256 codes, also 128 for
    8 bits) either holds at most 8 times or divides (e.g. 128, 256, 512, 1024, 2048; not
    384 for 4 bits); with act_bits, per-channel symmetric weights; with act_group_size, a
    divisor of K and of a K block holding at most 8 groups (32, 64, 128, 256 for 4-bit
    weights; 16 to 128 dividing 128, and 256 for 8-bit). Shapes need not divide the blocks
    (M, N, K are padded).
    """
    basic = common.basic_support(x, w, act_bits, dtypes=DTYPES, act_group_size=act_group_size)
    if not basic:
        return basic
    if act_group_size is not None and act_group_block(w.bits, act_group_size) is None:
        return Support(False, f"act_group_size={act_group_size} fits no K block of "
                              f"{_BK[w.bits]} (a multiple of it, at most "
                              f"{MAX_GROUPS_PER_BLOCK} groups)")
    if w.n_groups > 1 and w.group_size % 128:
        return Support(False, f"group_size={w.group_size} (needs a multiple of 128, or K)")
    k, n = w.shape
    if choose_blocks(1, n, k, bits=w.bits, group_size=w.group_size,
                     n_groups=w.n_groups) is None:
        return Support(False, f"group_size={w.group_size} fits no K block of {_BK[w.bits]}")
    return Support(True)


# ----- kernels ---------------------------------------------------------------------------


def _spread(col_refs, shape, group_lanes):
    """[bn, lanes] array whose lanes of group g hold col_refs[g] (each [bn, 1])."""
    out = jnp.broadcast_to(col_refs[0][...], shape)
    if len(col_refs) > 1:
        lane = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        for g in range(1, len(col_refs)):
            out = jnp.where(lane >= g * group_lanes, jnp.broadcast_to(col_refs[g][...], shape),
                            out)
    return out


def weight_only_kernel(*refs, bits, n_x, n_cols, sym, group_lanes, n_k):
    x_refs, p_ref = refs[:n_x], refs[n_x]
    s_refs = refs[n_x + 1:n_x + 1 + n_cols]
    z_refs = refs[n_x + 1 + n_cols:n_x + 1 + 2 * n_cols] if not sym else ()
    o_ref, acc_ref = refs[-2:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    codes = common.split_codes(p_ref[...], bits)
    shape = codes[0].shape
    scale = _spread(s_refs, shape, group_lanes)
    zero = _spread(z_refs, shape, group_lanes) if not sym else float(2 ** (bits - 1))
    acc = acc_ref[...]
    for c, x_ref in zip(codes, x_refs):
        w = ((c.astype(jnp.float32) - zero) * scale).astype(x_ref.dtype)
        acc += jax.lax.dot_general(x_ref[...], w, _DIMS, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(k == n_k - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _act_quant_kernel(*refs, bits, n_x, n_k):
    x_refs = refs[:n_x]
    p_ref, sw_ref, sx_ref, o_ref, acc_ref = refs[n_x:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc = acc_ref[...]
    for c, x_ref in zip(common.split_codes(p_ref[...], bits), x_refs):
        w = (c - 2 ** (bits - 1)).astype(jnp.int8)
        acc += jax.lax.dot_general(x_ref[...], w, _DIMS, preferred_element_type=jnp.int32)
    acc_ref[...] = acc

    @pl.when(k == n_k - 1)
    def _store():
        y = (acc_ref[...].astype(jnp.float32) * sw_ref[...]) * sx_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


def _act_group_kernel(*refs, bits, n_x, n_cols, group_lanes, n_k):
    x_refs, p_ref, sw_ref = refs[:n_x], refs[n_x], refs[n_x + 1]
    sx_refs = refs[n_x + 2:n_x + 2 + n_cols]
    o_ref, acc_ref = refs[-2:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    ws = [c - 2 ** (bits - 1) for c in common.split_codes(p_ref[...], bits)]
    lane = jax.lax.broadcasted_iota(jnp.int32, ws[0].shape, 1)
    acc = acc_ref[...]
    for g in range(n_cols):
        inside = (lane >= g * group_lanes) & (lane < (g + 1) * group_lanes)
        part = None
        for w, x_ref in zip(ws, x_refs):
            w_g = jnp.where(inside, w, 0).astype(jnp.int8)
            d = jax.lax.dot_general(x_ref[...], w_g, _DIMS, preferred_element_type=jnp.int32)
            part = d if part is None else part + d
        acc = acc + (part.astype(jnp.float32) * sw_ref[...]) * sx_refs[g][...]
    acc_ref[...] = acc

    @pl.when(k == n_k - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


# ----- wrapper ---------------------------------------------------------------------------


def _check_blocks(blocks: Blocks, bits: int, group_size: int, n_groups: int) -> None:
    bm, bn, bk = blocks
    if bm % 32 or bn % 128 or (bk * bits // 8) % 128:
        raise ValueError(f"pallas_tpu: blocks {tuple(blocks)} need bm % 32 == 0, "
                         f"bn % 128 == 0 and bk * bits / 8 % 128 == 0 (bits={bits})")
    if not _group_ok(bk, group_size, n_groups):
        raise ValueError(f"pallas_tpu: bk={bk} does not fit group_size={group_size} "
                         f"(needs bk % group_size == 0 with at most {MAX_GROUPS_PER_BLOCK} "
                         "groups, or group_size % bk == 0)")


def group_positions(bk: int, group_size: int, n_groups: int) -> list:
    """One function per group position in a K block: K step k -> the group index (row of a
    [G, ...] scale view) that the position's lanes use."""
    if n_groups == 1:
        return [lambda k: 0]
    if group_size >= bk:
        return [lambda k: (k * bk) // group_size]
    per = bk // group_size
    return [functools.partial(lambda g, k: k * per + g, g) for g in range(per)]


def _group_index_maps(bk: int, group_size: int, n_groups: int, *, rows: bool = False):
    """Index maps of a [G, N, 1] scale view (weights; or [G, M, 1] for activations with
    `rows`), one per group position in a K block."""
    return [functools.partial(lambda f, i, j, k: (f(k), i if rows else j, 0), f)
            for f in group_positions(bk, group_size, n_groups)]


def qmatmul(x, w, *, act_bits: int | None = None, act_group_size: int | None = None,
            interpret: bool = False, blocks: Blocks | None = None):
    """y = x @ w on the TPU kernels (module docstring); `supports(x, w, act_bits,
    act_group_size)` must hold.

    `interpret=True` runs the kernel through the Pallas interpreter (any backend, e.g. CPU).
    `blocks` overrides `choose_blocks` (bm % 32 == 0, bn % 128 == 0, bk*bits/8 % 128 == 0;
    with act_group_size, bk a multiple of it holding at most 8 groups).
    """
    m, n, k = common.checked_dims("pallas_tpu", supports, x, w, act_bits, act_group_size)
    if blocks is None:
        blocks = choose_blocks(m, n, k, bits=w.bits, group_size=w.group_size,
                               n_groups=w.n_groups)
        if act_group_size is not None:
            blocks = blocks._replace(bk=act_group_block(w.bits, act_group_size))
    _check_blocks(blocks, w.bits, w.group_size, w.n_groups)
    bm, bn, bk = blocks
    if act_group_size is not None and (bk % act_group_size
                                       or bk // act_group_size > MAX_GROUPS_PER_BLOCK):
        raise ValueError(f"pallas_tpu: bk={bk} must hold a whole number of activation groups "
                         f"of {act_group_size}, at most {MAX_GROUPS_PER_BLOCK}")
    ops = common.prepare(x, w, act_bits, m_pad=round_up(m, bm), n_pad=round_up(n, bn),
                         k_pad=round_up(k, bk), act_group_size=act_group_size)
    m_pad, n_pad = ops.xs[0].shape[0], ops.packed.shape[0]
    k_pad = ops.xs[0].shape[1] * len(ops.xs)
    grid = (m_pad // bm, n_pad // bn, k_pad // bk)
    lanes = bk * w.bits // 8  # packed bytes per K block = x columns per half
    x_spec = pl.BlockSpec((bm, lanes), lambda i, j, k: (i, k))
    p_spec = pl.BlockSpec((bn, lanes), lambda i, j, k: (j, k))
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, k: (i, j))
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                  vmem_limit_bytes=VMEM_LIMIT_BYTES)
    n_x = len(ops.xs)
    if act_bits is None:
        maps = _group_index_maps(bk, w.group_size, w.n_groups)
        col_specs = [pl.BlockSpec((None, bn, 1), f) for f in maps]
        cols = [ops.scale.T[:, :, None]] * len(maps)
        if ops.zero is not None:
            cols += [ops.zero.T[:, :, None]] * len(maps)
            col_specs = col_specs * 2
        kernel = functools.partial(
            weight_only_kernel, bits=w.bits, n_x=n_x, n_cols=len(maps), sym=ops.zero is None,
            group_lanes=w.group_size * w.bits // 8, n_k=grid[2])
        inputs = [*ops.xs, ops.packed, *cols]
        in_specs = [x_spec] * n_x + [p_spec] + col_specs
        acc_dtype = jnp.float32
    elif act_group_size is None:
        kernel = functools.partial(_act_quant_kernel, bits=w.bits, n_x=n_x, n_k=grid[2])
        inputs = [*ops.xs, ops.packed, ops.scale.T, ops.s_x]
        in_specs = [x_spec] * n_x + [p_spec, pl.BlockSpec((1, bn), lambda i, j, k: (0, j)),
                                     pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0))]
        acc_dtype = jnp.int32
    else:
        maps = _group_index_maps(bk, act_group_size, ops.s_x.shape[1], rows=True)
        kernel = functools.partial(_act_group_kernel, bits=w.bits, n_x=n_x, n_cols=len(maps),
                                   group_lanes=act_group_size * w.bits // 8, n_k=grid[2])
        inputs = [*ops.xs, ops.packed, ops.scale.T] + [ops.s_x.T[:, :, None]] * len(maps)
        in_specs = [x_spec] * n_x + [p_spec, pl.BlockSpec((1, bn), lambda i, j, k: (0, j))] + [
            pl.BlockSpec((None, bm, 1), f) for f in maps]
        acc_dtype = jnp.float32
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        scratch_shapes=[pltpu.VMEM((bm, bn), acc_dtype)],
        compiler_params=params,
        interpret=interpret,
    )(*inputs)
    return common.finish(y, ops)
