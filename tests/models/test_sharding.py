"""Loading onto a mesh of 8 fake CPU devices: params land sharded, logits unchanged (LLaDA,
Dream, and DiffusionGemma on meshes with and without an expert axis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qdlm_jax import load_model
from qdlm_jax.checkpoints.random_init import tiny_config, write_hf_checkpoint
from qdlm_jax.commands.convert import run  # noqa: F401  (import check of the command module)
from qdlm_jax.models.diffusion_gemma import init_cache
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


@nnx.jit
def _gemma_logits(model, ids, canvas):
    cache = model.encode(ids, None, init_cache(model.config, ids.shape[0],
                                               ids.shape[1] + canvas.shape[1]))
    return model.decode(canvas, None, cache)


@pytest.mark.parametrize("expert", [4, 1])
def test_diffusion_gemma_sharded_load_matches_single_device(tmp_path, expert):
    """On an ("expert", "model") mesh whole experts sit on the expert axis and their
    intermediate dim on "model"; without an expert axis the experts split like the dense MLP.
    Decoder logits equal one device's either way."""
    config = tiny_config("diffusion_gemma", hidden_size=64, num_heads=8, num_kv_heads=4,
                         head_dim=8, num_global_kv_heads=2, global_head_dim=16,
                         intermediate_size=64, num_experts=8, moe_intermediate_size=16)
    path = write_hf_checkpoint(tmp_path / "ckpt", config, seed=3)
    model_axis = 8 // expert
    mesh = make_mesh(model=model_axis, expert=expert)
    sharded, single = load_model(path, mesh=mesh), load_model(path)
    layer = sharded.layers[0]
    e = "expert" if expert > 1 else None
    assert layer.experts.gate_up[...].sharding.spec == P(e, None, "model")
    assert layer.experts.down[...].sharding.spec == P(e, "model", None)
    assert layer.self_attn.q_proj.kernel[...].sharding.spec == P(None, "model")
    assert layer.self_attn.o_proj.kernel[...].sharding.spec == P("model", None)
    assert layer.router.proj.kernel[...].sharding.spec == P()
    assert layer.post_feedforward_layernorm_2.scale[...].sharding.spec == P()
    assert sharded.embed[...].sharding.spec == P(None, "model")
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 6)), jnp.int32)
    canvas = jnp.asarray(rng.integers(0, config.vocab_size, (2, config.canvas_length)),
                         jnp.int32)
    np.testing.assert_allclose(np.asarray(_gemma_logits(sharded, ids, canvas)),
                               np.asarray(_gemma_logits(single, ids, canvas)),
                               rtol=1e-5, atol=1e-4)  # logits up to 30: summation order


def test_diffusion_gemma_qdlm_checkpoint_restores_onto_expert_mesh(tmp_path):
    from qdlm_jax.cli import main
    config = tiny_config("diffusion_gemma", num_experts=8)
    src = write_hf_checkpoint(tmp_path / "src", config, seed=4)
    assert main(["convert", str(src), str(tmp_path / "q")]) == 0
    model = load_model(tmp_path / "q", mesh=make_mesh(model=2, expert=4))
    assert model.layers[1].experts.down[...].sharding.spec == P("expert", "model", None)
    np.testing.assert_array_equal(np.asarray(model.layers[1].experts.down[...]),
                                  np.asarray(load_model(src).layers[1].experts.down[...]))
