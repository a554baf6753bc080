"""Slow: both Pallas kernels in interpret mode vs the XLA path at the real LLaDA-8B and
Dream-7B layer shapes, at 1, 16 and 256 tokens (M pads to the row block every time)."""

import pytest

from qdlm_jax.kernels import pallas_gpu, pallas_tpu
from tests.kernels import kernel_cases as kc

pytestmark = pytest.mark.slow

# W4A16 (asym, group 128) everywhere, plus one other configuration per token count.
OTHER = {1: dict(bits=8, group_size=128, sym=True),
         16: dict(bits=4, group_size=-1, sym=True, act_bits=4),
         256: dict(bits=8, group_size=-1, sym=True, act_bits=8)}


def _cases():
    for model, shapes in (("llada8b", kc.LLADA_8B), ("dream7b", kc.DREAM_7B)):
        for k, n in shapes:
            for m in (1, 16, 256):
                yield kc.Case(f"{model}_{k}x{n}_m{m}_w4a16", (m,), k, n, 4, 128, False,
                              dtype="bfloat16", scale_dtype="bfloat16")
                other = OTHER[m]
                tag = f"w{other['bits']}a{other.get('act_bits') or 16}"
                yield kc.Case(f"{model}_{k}x{n}_m{m}_{tag}", (m,), k, n, dtype="bfloat16",
                              scale_dtype="bfloat16", **other)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c.name)
def test_interpret_matches_xla_at_real_shapes(case):
    kernels = [kc.interpreted(pallas_tpu), kc.interpreted(pallas_gpu)]
    kc.check_against_xla_and_numpy(kernels, case, numpy_rows=2, numpy_cols=64)
