"""Pallas TPU kernels: interpret mode on CPU vs the XLA path and NumPy (per-token and
per-group activation scales), capability rules on ShapeDtypeStructs, and lowering
(jax.export for "tpu") at the real layer shapes."""

import jax
import jax.numpy as jnp
import pytest

from qdlm_jax.kernels import pallas_tpu
from tests.kernels import kernel_cases as kc

# Explicit blocks exercise several K steps, several groups per K block and K padding.
BLOCKS = {"w4a16_asym_g128_edges": pallas_tpu.Blocks(32, 128, 256),
          "w4a4_channel_kpad": pallas_tpu.Blocks(32, 128, 512)}


@pytest.mark.parametrize("case", kc.FAST_CASES, ids=lambda c: c.name)
def test_interpret_matches_xla_and_numpy(case):
    kc.check_against_xla_and_numpy([kc.interpreted(pallas_tpu, BLOCKS.get(case.name))], case)


@pytest.mark.parametrize("case", kc.ACT_GROUP_CASES, ids=lambda c: c.name)
def test_interpret_with_act_groups_equals_xla_and_numpy(case):
    """Default blocks: 8 groups a K step for ag32 (two steps), 2 for ag64 / ag128; a 512-code
    block holds 4 groups of 128 and pads K = 768 with a whole padded block."""
    fns = [kc.interpreted(pallas_tpu, act_group_size=case.act_group_size)]
    if case.name == "w4a4_ag128_kpad_lead":
        fns.append(kc.interpreted(pallas_tpu, pallas_tpu.Blocks(32, 128, 512), 128))
    kc.check_against_xla_and_numpy(fns, case)


def test_act_group_rules():
    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    w4 = kc.abstract_weight(4096, 512, bits=4, group_size=-1, sym=True)
    w8 = kc.abstract_weight(4096, 512, bits=8, group_size=-1, sym=True)
    for w, ags, block in ((w4, 32, 256), (w4, 128, 256), (w4, 512, 512), (w8, 64, 128),
                          (w8, 256, 256)):
        assert pallas_tpu.supports(x, w, 4, ags), (w.bits, ags)
        assert pallas_tpu.act_group_block(w.bits, ags) == block
    x3 = jax.ShapeDtypeStruct((16, 3072), jnp.bfloat16)  # 3072 = 32 groups of 96
    w3 = kc.abstract_weight(3072, 512, bits=4, group_size=-1, sym=True)
    refused = {"fits no K block": (x, w4, 4, 16), "fits no K block of (1024": (x3, w3, 4, 96),
               "must divide K": (x, w4, 4, 3000), "needs act_bits": (x, w4, None, 128),
               "per-channel": (x, kc.abstract_weight(4096, 512, sym=True), 4, 128)}
    for needle, (xs, w, bits, ags) in refused.items():
        ok, reason = pallas_tpu.supports(xs, w, bits, ags)
        assert not ok and needle in reason, (needle, reason)
    x2, w2 = kc.make_operands(kc.ACT_GROUP_CASES[0])
    with pytest.raises(ValueError, match="whole number of activation groups of 128"):
        pallas_tpu.qmatmul(x2, w2, act_bits=4, act_group_size=128, interpret=True,
                           blocks=pallas_tpu.Blocks(32, 128, 1024 + 256))


def test_supports_on_shape_dtype_structs():
    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    w = kc.abstract_weight(4096, 12288)
    assert pallas_tpu.supports(x, w)
    assert pallas_tpu.supports(jax.ShapeDtypeStruct((2, 8, 4096), jnp.float32), w)
    assert pallas_tpu.supports(x, kc.abstract_weight(4096, 12288, bits=8, sym=True))
    assert pallas_tpu.supports(x, kc.abstract_weight(4096, 100, group_size=-1), act_bits=None)
    w8_channel = kc.abstract_weight(4096, 12288, bits=8, group_size=-1, sym=True)
    assert pallas_tpu.supports(x, w8_channel, act_bits=8)
    assert pallas_tpu.supports(x, kc.abstract_weight(4096, 512, bits=4, group_size=-1,
                                                     sym=True), act_bits=4)
    refused = {
        "orientation": (x, kc.abstract_weight(4096, 12288, orientation="out_in"), None),
        "g_idx": (x, kc.abstract_weight(4096, 12288, g_idx=True), None),
        "3-bit": (x, kc.abstract_weight(4096, 12288, bits=3), None),
        "group_size=64": (x, kc.abstract_weight(4096, 12288, group_size=64), None),
        "float16": (jax.ShapeDtypeStruct((16, 4096), jnp.float16), w, None),
        "per-channel": (x, w, 8),  # act_bits with grouped weights
        "sym=False": (x, kc.abstract_weight(4096, 12288, bits=8, group_size=-1), 8),
        "no rows": (jax.ShapeDtypeStruct((0, 4096), jnp.bfloat16), w, None),
        "contract": (jax.ShapeDtypeStruct((16, 1024), jnp.bfloat16), w, None),
    }
    for needle, (xs, ws, act_bits) in refused.items():
        ok, reason = pallas_tpu.supports(xs, ws, act_bits)
        assert not ok and needle in reason, (needle, reason)


def test_blocks_fit_the_real_layers_without_padding():
    for k, n in kc.LLADA_8B + kc.DREAM_7B:
        for m in (1, 16, 256, 2048):
            b = pallas_tpu.choose_blocks(m, n, k, bits=4, group_size=128, n_groups=k // 128)
            assert k % b.bk == 0 and n % b.bn == 0 and b.bm % 32 == 0, (m, k, n, b)
            assert b.bm >= min(m, 512) and (b.bk // 128 <= pallas_tpu.MAX_GROUPS_PER_BLOCK)


def test_bad_blocks_raise():
    x, w = kc.make_operands(kc.FAST_CASES[0])
    with pytest.raises(ValueError, match="bk=2304"):
        pallas_tpu.qmatmul(x, w, interpret=True, blocks=pallas_tpu.Blocks(32, 128, 2304))
    with pytest.raises(ValueError, match="bm % 32"):
        pallas_tpu.qmatmul(x, w, interpret=True, blocks=pallas_tpu.Blocks(8, 128, 256))
    with pytest.raises(ValueError, match="unsupported call: 3-bit"):
        pallas_tpu.qmatmul(jnp.ones((2, 128)), kc.abstract_weight(128, 128, bits=3))


def test_exports_for_tpu_at_llada_and_dream_layer_shapes():
    for case in kc.export_cases() + kc.export_act_group_cases():
        text = kc.export_kernel(pallas_tpu.qmatmul, "tpu", case)
        assert text.count("tpu_custom_call") == 1, case[0]
