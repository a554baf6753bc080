"""DuQuant's dual transformation: block rotation, zigzag permutation, block rotation.

Input: m [n], the per-channel max |x| of a linear layer's (smoothed) input over calibration
tokens, and a block size b dividing n. Output: T = R1 P R2, orthogonal, applied online as
x -> x T while the weight becomes T^T W (see `act_kernel.OnlineTransform`, kind "duquant").

1. R1, block by block (greedy, at most `steps` rotations per block): with v the block's
   current max vector (v <- v R after each accepted rotation) and j = argmax |v|,

       G = E_j (H_b / sqrt(b)) D

   where E_j swaps rows 0 and j, H_b is the Sylvester Hadamard matrix and D a fresh random
   +-1 diagonal. Row j of G has every entry +-1/sqrt(b), so the outlier v_j is spread evenly
   over the block. The first step is always taken; each later step is kept only if
   max |v G| < max |v|, and the search stops at the first one that does not lower the
   block's max. (After smoothing, the max vector is nearly flat and no rotation lowers its
   max, yet a block Hadamard still spreads the per-token outliers that the per-channel max
   hides: without the first step DuQuant degenerates to SmoothQuant plus a permutation.)
2. P, the zigzag permutation: channels sorted by |m R1| in decreasing order are dealt to the
   blocks 0, 1, ..., B-1, B-1, ..., 1, 0, 0, 1, ... so every block gets a share of the large
   channels. (x P)[..., k] = x[..., perm[k]].
3. R2: step 1 again on m R1 P.

The greedy runs on the max vector alone (n numbers), so choosing T costs O(steps * n * b).
"""

from __future__ import annotations

import numpy as np

from qdlm_jax.quant import hadamard_core


def _greedy_block(v: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    b = v.shape[0]
    h = hadamard_core.hadamard_matrix(b).astype(np.float64) / np.sqrt(b)
    r = np.eye(b)
    cur = v.astype(np.float64)
    for step in range(steps):
        j = int(np.argmax(np.abs(cur)))
        g = h * rng.choice([-1.0, 1.0], size=b)[None, :]
        g[[0, j]] = g[[j, 0]]
        new = cur @ g
        if step > 0 and np.max(np.abs(new)) >= np.max(np.abs(cur)):
            break
        r, cur = r @ g, new
    return r


def block_rotation(v: np.ndarray, block: int, *, steps: int, seed: int) -> np.ndarray:
    """R [n / block, block, block]: the greedy rotation of each block of v (step 1)."""
    n = v.shape[0]
    rng = np.random.default_rng(seed)
    return np.stack([_greedy_block(v[i:i + block], steps, rng) for i in range(0, n, block)])


def zigzag_permutation(v: np.ndarray, block: int) -> np.ndarray:
    """perm [n]: the zigzag deal of channels by decreasing |v| (step 2)."""
    n = v.shape[0]
    nb = n // block
    order = np.argsort(-np.abs(v), kind="stable")
    slots: list[list[int]] = [[] for _ in range(nb)]
    for rank, ch in enumerate(order):
        lap, pos = divmod(rank, nb)
        slots[pos if lap % 2 == 0 else nb - 1 - pos].append(int(ch))
    return np.concatenate([np.asarray(s, np.int64) for s in slots]).astype(np.int32)


def _apply_blocks(v, r):
    nb, b, _ = r.shape
    return np.einsum("bi,bij->bj", v.reshape(nb, b), r).reshape(-1)


def resolve_block(n: int, block: int) -> int:
    """The block size used for width n: the largest power of two dividing both n and block."""
    b = int(np.gcd(n, block))
    return b & -b


def dual_transform(act_max: np.ndarray, *, block: int = 128, steps: int = 256,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R1 [n/b, b, b], perm [n], R2 [n/b, b, b]) as float32 / int32 (steps 1-3)."""
    v = np.asarray(act_max, np.float64)
    b = resolve_block(v.shape[0], block)
    r1 = block_rotation(v, b, steps=steps, seed=seed)
    v1 = _apply_blocks(v, r1)
    perm = zigzag_permutation(v1, b)
    r2 = block_rotation(v1[perm], b, steps=steps, seed=seed + 1)
    return r1.astype(np.float32), perm, r2.astype(np.float32)


def dense_transform(r1: np.ndarray, perm: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """T = R1 P R2 as a dense [n, n] matrix (for tests and inspection)."""
    n = perm.shape[0]
    from scipy.linalg import block_diag  # noqa: PLC0415 (test-time helper)

    p = np.zeros((n, n))
    p[perm, np.arange(n)] = 1.0
    return block_diag(*r1) @ p @ block_diag(*r2)
