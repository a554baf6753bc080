"""Pallas GPU (Triton) kernels: interpret mode on CPU vs the XLA path and NumPy (per-token
and per-group activation scales), capability rules on ShapeDtypeStructs, and lowering
(jax.export for "cuda") at the real layer shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from qdlm_jax.kernels import pallas_gpu
from tests.kernels import kernel_cases as kc

# Explicit blocks exercise several K steps per group, split-K (fp32 and int32 partials)
# and K padding.
BLOCKS = {"w4a16_asym_g128_edges": pallas_gpu.Blocks(16, 64, 64, 2),
          "w4a4_channel_kpad": pallas_gpu.Blocks(16, 32, 128, 4)}
# Triton's custom call has no export compatibility guarantee: the check must be waived.
TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("case", kc.FAST_CASES, ids=lambda c: c.name)
def test_interpret_matches_xla_and_numpy(case):
    kc.check_against_xla_and_numpy([kc.interpreted(pallas_gpu, BLOCKS.get(case.name))], case)


@pytest.mark.parametrize("case", kc.ACT_GROUP_CASES, ids=lambda c: c.name)
def test_interpret_with_act_groups_equals_xla_and_numpy(case):
    """Without split-K bit for bit (K steps of 32 inside groups of 64 and 128 too); with
    split-K (the default blocks of these small shapes split K in 2 to 8 where the group
    count allows) the scaled fp32 partials are added in another order."""
    ags = case.act_group_size
    exact = kc.interpreted(pallas_gpu, pallas_gpu.Blocks(16, 64, 32, 1), ags)
    kc.check_against_xla_and_numpy([exact], case)
    m = int(np.prod(case.lead))
    blocks = pallas_gpu.choose_blocks(m, case.n, case.k, group_size=case.k, n_groups=1,
                                      act_group_size=ags)
    assert blocks.bk == ags and (blocks.split > 1) == (case.k // ags % 2 == 0), blocks
    kc.check_against_xla_and_numpy([kc.interpreted(pallas_gpu, act_group_size=ags)], case,
                                   float_sums=blocks.split > 1)


def test_act_group_rules():
    x = jax.ShapeDtypeStruct((16, 3584), jnp.bfloat16)
    w = kc.abstract_weight(3584, 512, bits=4, group_size=-1, sym=True)
    for ags in (32, 64, 128, 256, 512):
        assert pallas_gpu.supports(x, w, 4, ags), ags
    assert pallas_gpu.choose_blocks(16, 512, 3584, group_size=3584, n_groups=1,
                                    act_group_size=256).bk == 128  # 2 K steps a group
    refused = {"multiple of 32": (w, 4, 16), "must divide K": (w, 4, 96),
               "needs act_bits": (w, None, 128),
               "per-channel": (kc.abstract_weight(3584, 512, sym=True), 4, 128)}
    for needle, (ws, bits, ags) in refused.items():
        ok, reason = pallas_gpu.supports(x, ws, bits, ags)
        assert not ok and needle in reason, (needle, reason)
    x2, w2 = kc.make_operands(kc.ACT_GROUP_CASES[0])
    with pytest.raises(ValueError, match="bk=64 must divide act_group_size=32"):
        pallas_gpu.qmatmul(x2, w2, act_bits=4, act_group_size=32, interpret=True,
                           blocks=pallas_gpu.Blocks(16, 64, 64, 1))


def test_supports_on_shape_dtype_structs():
    x = jax.ShapeDtypeStruct((16, 3584), jnp.bfloat16)
    w = kc.abstract_weight(3584, 18944)
    assert pallas_gpu.supports(x, w)
    assert pallas_gpu.supports(jax.ShapeDtypeStruct((16, 3584), jnp.float16), w)
    assert pallas_gpu.supports(x, kc.abstract_weight(3584, 18944, group_size=64, sym=True))
    assert pallas_gpu.supports(x, kc.abstract_weight(3584, 512, bits=8, group_size=-1,
                                                     sym=True), act_bits=8)
    refused = {
        "orientation": (x, kc.abstract_weight(3584, 512, orientation="out_in"), None),
        "g_idx": (x, kc.abstract_weight(3584, 512, g_idx=True), None),
        "2-bit": (x, kc.abstract_weight(3584, 512, bits=2), None),
        "group_size=16": (jax.ShapeDtypeStruct((16, 256), jnp.bfloat16),
                          kc.abstract_weight(256, 512, group_size=16), None),
        "int8": (jax.ShapeDtypeStruct((16, 3584), jnp.int8), w, None),
        "per-channel": (x, w, 4),
        "sym=False": (x, kc.abstract_weight(3584, 512, bits=4, group_size=-1), 4),
    }
    for needle, (xs, ws, act_bits) in refused.items():
        ok, reason = pallas_gpu.supports(xs, ws, act_bits)
        assert not ok and needle in reason, (needle, reason)


def test_blocks_for_decode_split_k_and_prefill():
    b = pallas_gpu.choose_blocks(1, 4096, 4096, group_size=128, n_groups=32)
    assert b == pallas_gpu.Blocks(bm=16, bn=64, bk=128, split=4)  # 64 tiles -> 256 programs
    b = pallas_gpu.choose_blocks(16, 512, 3584, group_size=128, n_groups=28)
    assert b.split == 4 and (3584 // 128) % b.split == 0  # 8 tiles, 28 K steps
    b = pallas_gpu.choose_blocks(2048, 12288, 4096, group_size=128, n_groups=32)
    assert b == pallas_gpu.Blocks(bm=128, bn=128, bk=128, split=1)
    assert pallas_gpu.choose_blocks(16, 64, 64, group_size=48, n_groups=2) is None


def test_bad_blocks_raise():
    x, w = kc.make_operands(kc.FAST_CASES[0])
    with pytest.raises(ValueError, match="powers of two"):
        pallas_gpu.qmatmul(x, w, interpret=True, blocks=pallas_gpu.Blocks(16, 48, 64, 1))
    with pytest.raises(ValueError, match="bk=256 must divide group_size=128"):
        pallas_gpu.qmatmul(x, w, interpret=True, blocks=pallas_gpu.Blocks(16, 64, 256, 1))


def test_exports_for_cuda_at_llada_and_dream_layer_shapes():
    waive = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    for case in kc.export_cases() + kc.export_act_group_cases():
        text = kc.export_kernel(pallas_gpu.qmatmul, "cuda", case, disabled_checks=waive)
        assert text.count(TRITON_CALL) == 1, case[0]
