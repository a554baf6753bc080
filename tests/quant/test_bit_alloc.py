"""The sensitivity pass: one pass over the blocks gives, for every (block, width), the KL of
the model with that block alone RTN-quantized, as quantizing it and running the whole model
gives; per-block widths reach the packed weights of every weight-only method."""

import numpy as np
import pytest

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.models.params import get_params, model_from_params
from qdlm_jax.quant import PTQSpec, QuantizedArray, QuantSpec, rtn_quantize_params
from qdlm_jax.quant.bit_alloc import BudgetSpec, make_plan, model_sensitivity, sensitivity_batch
from qdlm_jax.quant.bit_alloc_core import kl_bits_per_window
from qdlm_jax.quant.layerwise import quantize_model

WEIGHT = QuantSpec(bits=4, group_size=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = tiny_config("dream", num_layers=3, hidden_size=128, intermediate_size=256)
    src = write_hf_checkpoint(tmp_path_factory.mktemp("src"), config, seed=3)
    windows = np.random.default_rng(0).integers(0, 240, (6, 24)).astype(np.int32)
    return src, load_model(src, dtype="float32"), windows


def test_the_table_is_the_kl_of_each_block_quantized_alone(tiny):
    _, model, windows = tiny
    spec = BudgetSpec(budget=3.0, widths=(2, 4), samples=4)
    before = {p: np.asarray(v) for p, v in get_params(model).items()}
    table, params = model_sensitivity(model, windows, spec, WEIGHT, progress=False)
    after = get_params(model)
    assert all(np.array_equal(before[p], np.asarray(after[p])) for p in before)  # put back

    ids = sensitivity_batch(windows, model.config.mask_token_id, spec).ids
    assert ids.shape == (4, 24) and 0.3 < (ids == model.config.mask_token_id).mean() < 0.7
    fp = model(ids)
    for i in range(3):
        for k, bits in enumerate(spec.widths):
            q = rtn_quantize_params(get_params(model), QuantSpec(bits=bits, group_size=64),
                                    select=lambda p, _, i=i: p[:2] == ("layers", i))
            kl = float(kl_bits_per_window(fp, model_from_params(model.config, q)(ids)).mean())
            np.testing.assert_allclose(table[i, k], kl, rtol=2e-3, atol=1e-7)
    assert np.all(table[:, 0] > table[:, 1]) and np.all(table > 0)  # 2 bits hurt more than 4
    c = model.config
    per_block = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size
                 * c.intermediate_size)
    assert params == [per_block] * 3


# slow: GPTQ and AWQ take the block's spec where the streaming RTN test's blocks do
# (`layerwise.quantize_block`, tests/jobs/test_bit_budget.py)
@pytest.mark.parametrize("method", ["rtn", pytest.param("gptq", marks=pytest.mark.slow),
                                    pytest.param("awq", marks=pytest.mark.slow)])
def test_each_block_is_packed_at_its_planned_width(tiny, method):
    _, model, windows = tiny
    from qdlm_jax.quant import CalibSpec, build_calibration
    calib = build_calibration(model, windows, CalibSpec(mode="clean", n_samples=6, seq_len=24))
    spec = PTQSpec(method=method, weight=WEIGHT, block_bits=(3, 4, 3), awq_grid=2)
    qmodel, stats = quantize_model(model, calib, spec, progress=False)
    assert stats["block_bits"] == [3, 4, 3]
    for path, v in get_params(qmodel).items():
        if path[0] == "layers" and path[-1] == "kernel":
            assert isinstance(v, QuantizedArray) and v.bits == (3, 4, 3)[path[1]], path
    assert not isinstance(get_params(qmodel)[("lm_head", "kernel")], QuantizedArray)


def test_a_plan_for_another_model_or_for_daq_is_refused(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match="3 blocks"):
        quantize_model(model, None, PTQSpec(method="rtn", weight=WEIGHT, block_bits=(4, 4)),
                       progress=False)
    with pytest.raises(ValueError, match="daq takes no per-block widths"):
        PTQSpec(method="daq", weight=QuantSpec(bits=2, group_size=64), block_bits=(2, 2, 2))
    with pytest.raises(ValueError, match="below the narrowest"):
        BudgetSpec(budget=1.5)


def test_make_plan_round_trips_through_json():
    from qdlm_jax.quant.bit_alloc import BitPlan
    spec = BudgetSpec(budget=3.5, widths=(4, 2, 3))
    assert spec.widths == (2, 3, 4)
    table = np.array([[3.0, 1.0, 0.1], [9.0, 2.0, 0.2]])
    plan = make_plan(spec, table, [10, 30], settings={"k": 1})
    assert plan.bits == (2, 4) and plan.mean_bits == 3.5  # 10 x 2 + 30 x 4 = 3.5 x 40
    assert BitPlan.from_json(plan.to_json()) == plan
