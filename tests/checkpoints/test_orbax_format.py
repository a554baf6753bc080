"""Our orbax checkpoints: a tree written in parts loads back as the one dict it came from."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from qdlm_jax.checkpoints.orbax_format import CONFIG_FILE, load_checkpoint, save_checkpoint
from qdlm_jax.checkpoints.random_init import tiny_config
from qdlm_jax.errors import CheckpointError
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec


def _params(seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    return {("embed",): jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
            ("layers", 0, "q_proj", "kernel"): QuantizedArray.quantize(
                w, QuantSpec(bits=4, group_size=32)),
            ("layers", 1, "norm", "weight"): jnp.asarray(rng.normal(size=(8,)), jnp.float32)}


def _leaves(params):
    out = {}
    for p, v in params.items():
        if isinstance(v, QuantizedArray):
            out.update({p + (f,): np.asarray(getattr(v, f)) for f in ("packed", "scale", "zero")
                        if getattr(v, f) is not None})
        else:
            out[p] = np.asarray(v)
    return out


def test_parts_load_back_as_one_dict(tmp_path):
    full = _params(0)
    keys = list(full)
    consumed = []

    def parts():  # a generator: each part exists only while it is written
        for k in keys[1:]:
            consumed.append(k)
            yield {k: full[k]}

    config = tiny_config("llada", num_layers=2)
    save_checkpoint(tmp_path / "ck", config, {keys[0]: full[keys[0]]}, parts=parts())
    assert consumed == keys[1:]
    meta = json.loads((tmp_path / "ck" / CONFIG_FILE).read_text())
    assert meta["parts"] == ["params", "params_0001", "params_0002"]
    assert all((tmp_path / "ck" / name).is_dir() for name in meta["parts"])
    _, loaded = load_checkpoint(tmp_path / "ck")
    a, b = _leaves(full), _leaves(loaded)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert loaded[keys[1]].bits == 4 and loaded[keys[1]].group_size == 32


def test_a_key_in_two_parts_is_refused_and_nothing_is_left(tmp_path):
    full = _params(1)
    with pytest.raises(CheckpointError, match="repeats"):
        save_checkpoint(tmp_path / "ck", tiny_config("llada", num_layers=2), full,
                        parts=[{("embed",): full[("embed",)]}])
    assert not (tmp_path / "ck").exists()
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # no temp dir either
