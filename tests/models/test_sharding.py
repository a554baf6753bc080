"""Loading onto a mesh of 8 fake CPU devices: params land sharded, logits unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.commands.convert import run  # noqa: F401  (import check of the command module)
from qdlm_jax.models.sharding import make_mesh


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sharded_load_matches_single_device(tmp_path, family):
    assert len(jax.devices()) == 8, "tests/conftest.py should provide 8 CPU devices"
    # Widths divisible by 8 so every rule actually shards.
    config = tiny_config(family, num_heads=8, num_kv_heads=8 if family == "llada" else 4,
                         hidden_size=128, intermediate_size=256)
    path = write_hf_checkpoint(tmp_path / "ckpt", config, seed=7)
    mesh = make_mesh(model=8)
    sharded = load_model(path, mesh=mesh)
    single = load_model(path)
    layer = sharded.layers[0]
    assert layer.q_proj.kernel[...].sharding.spec == P(None, "model")
    assert layer.o_proj.kernel[...].sharding.spec == P("model", None)
    assert sharded.lm_head.kernel[...].sharding.spec == P(None, "model")
    assert layer.attn_norm.scale[...].sharding.spec == P()
    ids = jnp.asarray(np.arange(32, dtype=np.int32).reshape(2, 16) % config.vocab_size)
    # Each forward as one jitted program: op-by-op dispatch over 8 fake devices aborted the
    # process now and then on a loaded 2-core machine.
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: sharded(x))(ids)),
                               np.asarray(jax.jit(lambda x: single(x))(ids)),
                               rtol=1e-5, atol=1e-5)


def test_qdlm_checkpoint_restores_onto_mesh(tmp_path):
    from qdlm_jax.cli import main
    config = tiny_config("llada", num_heads=8, num_kv_heads=8, hidden_size=128,
                         intermediate_size=256)
    src = write_hf_checkpoint(tmp_path / "src", config, seed=8)
    assert main(["convert", str(src), str(tmp_path / "q")]) == 0
    model = load_model(tmp_path / "q", mesh=make_mesh(model=8))
    assert model.layers[1].down_proj.kernel[...].sharding.spec == P("model", None)
    ids = jnp.asarray(np.arange(16, dtype=np.int32).reshape(2, 8))
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(load_model(src)(ids)),
                               rtol=1e-5, atol=1e-5)
