"""Pallas GPU kernels for `qmatmul` on the Triton backend: W4A16 / W8A16 with group-wise
scales, W8A8 / W4A4 with per-token or per-group activations and per-channel weights.

Why Triton and not Mosaic GPU (jax 0.10.2, see docs/kernels.md): both lower for "cuda" on a
CPU-only machine, but only the Triton form runs in Pallas interpret mode here, so only it
can be checked against the XLA path in CI. Mosaic GPU's `wgmma` cannot be interpreted on
CPU in this version (register operands and transposed shared-memory operands fail in both
interpreters), and int8 `wgmma` needs a transposed (K-major) operand.

Grid ``(S, M / bm, N / bn)``; each program loops over its 1/S share of K in steps of bk
codes (a power of two that lies inside one quantization group), so the scale and zero of a
step are one [bn, 1] column:

  weight-only   p = packed[bn, bk/2 or bk] widened to int32, codes = p & 15, p >> 4 (or p)
                w = ((codes - zero) * scale).astype(x.dtype)
                acc += x_even @ w_lo.T + x_odd @ w_hi.T           (fp32 accumulation)
  act_bits      acc_i32 += x_q_even @ (codes_lo - 2**(bits-1)).T + ...   (int8 dot, int32)
                y = ((acc * s_w[1, bn]) * s_x[bm, 1]).astype(x.dtype)
  act groups    (act_group_size ga; bk divides ga) the K loop runs group by group: an int32
                acc_a over the ga / bk steps of group a, then
                f32 acc += (acc_a * s_w[1, bn]) * s_x[bm, a] (s_x's column a of the row block)

S > 1 (split-K, chosen for decode so that at least ~one program per H100 SM is busy)
writes raw fp32 / int32 partial accumulators [S, M, N]; XLA sums them (int32 sums stay
exact) and applies the same epilogue. With act groups each program takes whole groups and
its partial is already scaled (fp32), so XLA only sums: the result equals the fused one up
to the order of the float additions. Block sizes (`choose_blocks`) are untuned starting
points, not measured on a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from qdlm_jax.kernels import common
from qdlm_jax.kernels.common import Support, round_up

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MIN_BK = 32  # codes; int8 tensor-core dots want k >= 32, 4-bit halves k >= 16
MAX_BK = 128
TARGET_PROGRAMS = 132  # H100 SXM streaming multiprocessors
MAX_SPLIT = 8
DIMS = (((1,), (1,)), ((), ()))  # a[m, k] . b[n, k] -> [m, n]


class Blocks(NamedTuple):
    bm: int
    bn: int
    bk: int  # codes (K columns) per loop step; a power of two
    split: int  # S: programs sharing the K loop of one output tile


def _step_codes(group_size: int, n_groups: int) -> int | None:
    """Largest power of two <= MAX_BK dividing the group size (K steps stay in a group; the
    weight's group, or the activations' with act groups)."""
    if n_groups == 1:
        return MAX_BK
    bk = MAX_BK
    while bk >= MIN_BK:
        if group_size % bk == 0:
            return bk
        bk //= 2
    return None


def choose_blocks(m: int, n: int, k: int, *, group_size: int, n_groups: int,
                  act_group_size: int | None = None) -> Blocks | None:
    """GPU block sizes for x[m, k] @ w[k, n]; None if no K step fits the group size.
    With `act_group_size` (per-channel weights) the K step lies in one activation group and
    split-K shares out whole groups."""
    if act_group_size is not None:
        group_size, n_groups = act_group_size, k // act_group_size
    bk = _step_codes(group_size, n_groups)
    if bk is None:
        return None
    bm = next((c for c in (16, 32, 64) if m <= c), 128)
    bn = 64 if bm <= 32 else 128
    tiles = -(-m // bm) * -(-n // bn)
    n_k = -(-k // bk) if act_group_size is None else n_groups  # units split-K shares out
    split = 1
    while (bm <= 64 and split < MAX_SPLIT and tiles * split < TARGET_PROGRAMS
           and n_k % (2 * split) == 0):
        split *= 2
    return Blocks(bm=bm, bn=bn, bk=bk, split=split)


def supports(x, w, act_bits=None, act_group_size=None) -> Support:
    """Whether these kernels take the call (else `qmatmul` falls back to XLA).

    Rules: QuantizedArray "in_out" without g_idx; 4- or 8-bit codes; x bf16, f16 or f32;
    group_size == K or a multiple of 32; with act_bits, per-channel symmetric weights; with
    act_group_size, a multiple of 32 dividing K. Shapes need not divide the blocks (M, N, K
    are padded).
    """
    basic = common.basic_support(x, w, act_bits, dtypes=DTYPES, act_group_size=act_group_size)
    if not basic:
        return basic
    if _step_codes(w.group_size, w.n_groups) is None:
        return Support(False, f"group_size={w.group_size} (needs a multiple of {MIN_BK}, or K)")
    if act_group_size is not None and act_group_size % MIN_BK:
        return Support(False, f"act_group_size={act_group_size} (needs a multiple of "
                              f"{MIN_BK})")
    return Support(True)


# ----- kernels ---------------------------------------------------------------------------


def _kernel(*refs, bits, n_x, act, sym, bk, group_size, per_channel, steps, fused,
            act_group_steps=None):
    """One (split, row block, column block) program; see the module docstring.
    `act_group_steps`: K steps per activation group (None: per-token activations)."""
    x_refs, p_ref = refs[:n_x], refs[n_x]
    rest = refs[n_x + 1:]
    if act:
        sw_ref, sx_ref, o_ref = rest
    else:
        s_ref, z_ref, o_ref = (rest[0], None, rest[1]) if sym else rest
    lanes = bk * bits // 8  # packed bytes per step = x columns per half
    first = pl.program_id(0) * steps

    def dots(kk, acc):  # acc += the products of K step kk (an absolute step index)
        k0 = kk * lanes
        codes = common.split_codes(p_ref[:, pl.ds(k0, lanes)], bits)
        if act:
            ws = [(c - 2 ** (bits - 1)).astype(jnp.int8) for c in codes]
        else:
            g = 0 if per_channel else (kk * bk) // group_size
            scale = s_ref[:, pl.ds(g, 1)]
            zero = z_ref[:, pl.ds(g, 1)] if not sym else float(2 ** (bits - 1))
            ws = [((c.astype(jnp.float32) - zero) * scale).astype(x_refs[0].dtype)
                  for c in codes]
        for w, x_ref in zip(ws, x_refs):
            acc += jax.lax.dot_general(x_ref[:, pl.ds(k0, lanes)], w, DIMS,
                                       preferred_element_type=acc.dtype)
        return acc

    if act_group_steps is not None:
        def group(a, acc):
            g = first // act_group_steps + a
            part = jax.lax.fori_loop(0, act_group_steps,
                                     lambda t, p: dots(g * act_group_steps + t, p),
                                     jnp.zeros(o_ref.shape, jnp.int32))
            return acc + (part.astype(jnp.float32) * sw_ref[...]) * sx_ref[:, pl.ds(g, 1)]

        acc = jax.lax.fori_loop(0, steps // act_group_steps, group,
                                jnp.zeros(o_ref.shape, jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)  # fp32 partials when split (not fused)
        return

    acc_dtype = jnp.int32 if act else jnp.float32
    acc = jax.lax.fori_loop(0, steps, lambda t, a: dots(first + t, a),
                            jnp.zeros(o_ref.shape, acc_dtype))
    if not fused:
        o_ref[...] = acc
    elif act:
        y = (acc.astype(jnp.float32) * sw_ref[...]) * sx_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)
    else:
        o_ref[...] = acc.astype(o_ref.dtype)


# ----- wrapper ---------------------------------------------------------------------------


def _check_blocks(blocks: Blocks, bits: int, group_size: int, n_groups: int) -> None:
    bm, bn, bk, split = blocks
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (bm, bn, bk, split))
    if not pow2 or bm < 16 or bn < 16 or bk < MIN_BK:
        raise ValueError(f"pallas_gpu: blocks {tuple(blocks)} must be powers of two with "
                         f"bm, bn >= 16 and bk >= {MIN_BK}")
    if n_groups > 1 and group_size % bk:
        raise ValueError(f"pallas_gpu: bk={bk} must divide group_size={group_size}")


def qmatmul(x, w, *, act_bits: int | None = None, act_group_size: int | None = None,
            interpret: bool = False, blocks: Blocks | None = None):
    """y = x @ w on the Triton kernels (module docstring); `supports(x, w, act_bits,
    act_group_size)` must hold.

    `interpret=True` runs the kernel through the Pallas interpreter (any backend, e.g. CPU).
    `blocks` overrides `choose_blocks` (with act_group_size, bk must divide it).
    """
    m, n, k = common.checked_dims("pallas_gpu", supports, x, w, act_bits, act_group_size)
    if blocks is None:
        blocks = choose_blocks(m, n, k, group_size=w.group_size, n_groups=w.n_groups,
                               act_group_size=act_group_size)
    _check_blocks(blocks, w.bits, w.group_size, w.n_groups)
    bm, bn, bk, split = blocks
    k_unit = bk * split if w.n_groups == 1 else math.lcm(bk * split, w.group_size)
    if act_group_size is not None:
        if act_group_size % bk:
            raise ValueError(f"pallas_gpu: bk={bk} must divide act_group_size={act_group_size}")
        k_unit = act_group_size * split  # whole groups per split
    ops = common.prepare(x, w, act_bits, m_pad=round_up(m, bm), n_pad=round_up(n, bn),
                         k_pad=round_up(k, k_unit), act_group_size=act_group_size)
    m_pad, k_half = ops.xs[0].shape
    n_pad = ops.packed.shape[0]
    steps = k_half * len(ops.xs) // bk // split
    fused = split == 1
    n_x = len(ops.xs)
    x_spec = pl.BlockSpec((bm, k_half), lambda s, i, j: (i, 0))
    p_spec = pl.BlockSpec((bn, ops.packed.shape[1]), lambda s, i, j: (j, 0))
    if act_bits is None:
        mats = [ops.scale] + ([ops.zero] if ops.zero is not None else [])
        extra = mats
        extra_specs = [pl.BlockSpec((bn, a.shape[1]), lambda s, i, j: (j, 0)) for a in mats]
        acc_dtype = jnp.float32
    else:
        extra = [ops.scale.T, ops.s_x]
        extra_specs = [pl.BlockSpec((1, bn), lambda s, i, j: (0, j)),
                       pl.BlockSpec((bm, ops.s_x.shape[1]), lambda s, i, j: (i, 0))]
        acc_dtype = jnp.int32 if act_group_size is None else jnp.float32
    if fused:
        out_shape = jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda s, i, j: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, m_pad, n_pad), acc_dtype)
        out_spec = pl.BlockSpec((None, bm, bn), lambda s, i, j: (s, i, j))
    kernel = functools.partial(
        _kernel, bits=w.bits, n_x=n_x, act=act_bits is not None, sym=ops.zero is None, bk=bk,
        group_size=w.group_size, per_channel=w.n_groups == 1, steps=steps, fused=fused,
        act_group_steps=None if act_group_size is None else act_group_size // bk)
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(split, m_pad // bm, n_pad // bn),
        in_specs=[x_spec] * n_x + [p_spec] + extra_specs,
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=4 if bm <= 32 else 8,
                                                num_stages=4 if bm <= 32 else 3),
        interpret=interpret,
    )(*ops.xs, ops.packed, *extra)
    if not fused:
        y = y.sum(axis=0)
        if act_bits is not None and act_group_size is None:
            y = (y.astype(jnp.float32) * ops.scale.T) * ops.s_x
        y = y.astype(x.dtype)
    return common.finish(y, ops)
