"""DiffusionGemma checkpoints through `load_model`: a transformers `save_pretrained` directory
(vision tower dropped), tied encoder copies checked, shape errors before anything is written,
the hub layout written back bit for bit and read by transformers, orbax, hub ids."""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DiffusionGemmaConfig as HFConfig
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from qdlm_jax import load_model
from qdlm_jax.checkpoints.diffusion_gemma import ENCODER_TEXT, key_map
from qdlm_jax.checkpoints.load import load_params, read_model_config
from qdlm_jax.checkpoints.random_init import gemma_hub_shapes, write_hf_checkpoint
from qdlm_jax.checkpoints.safetensors_io import (
    SafetensorsFile,
    write_safetensors,
    write_safetensors_chunked,
)
from qdlm_jax.cli import main
from qdlm_jax.commands.info import moe_summary
from qdlm_jax.errors import CheckpointError
from qdlm_jax.models.diffusion_gemma import DiffusionGemma, init_cache, param_shapes
from qdlm_jax.models.gemma_config import diffusion_gemma_26b_a4b
from tests.models.test_diffusion_gemma import CASES, TINY_VISION, _hf_decode, _hf_encode, _randomize

CONFIG = CASES["ssf"].config  # [S, S, F], 4 experts top-2
GATE_UP = "model.decoder.layers.1.experts.gate_up_proj"
ATOL = 1e-4


def hf_logits(hf, ids, canvas, sc):
    """transformers' decoder logits of `canvas` after encoding the prompt `ids` (no padding)."""
    b, p = ids.shape
    n = canvas.shape[1]
    cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    _hf_encode(hf, cache, torch.tensor(ids), torch.arange(p)[None], torch.ones(b, p, dtype=bool))
    return _hf_decode(hf, cache, torch.tensor(canvas), torch.tensor(sc),
                      torch.arange(p, p + n)[None], torch.ones(b, p + n, dtype=bool))


@nnx.jit
def our_logits(model, ids, canvas, sc):
    b, p = ids.shape
    cache = model.encode(ids, None, init_cache(model.config, b, p + canvas.shape[1]))
    return model.decode(canvas, sc, cache)


def inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (2, 7))
    canvas = rng.integers(0, config.vocab_size, (2, config.canvas_length))
    sc = (3 * rng.standard_normal((2, config.canvas_length, config.vocab_size))).astype(np.float32)
    return ids, canvas, sc


def logits_of(model, config, seed=0):
    ids, canvas, sc = inputs(config, seed)
    return np.asarray(our_logits(model, jnp.asarray(ids), jnp.asarray(canvas), jnp.asarray(sc)))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(transformers model, its `save_pretrained` directory), fp32, with a tiny vision tower."""
    torch.manual_seed(0)
    hf = DiffusionGemmaForBlockDiffusion(
        HFConfig(**{**CONFIG.to_hf(), "vision_config": TINY_VISION})).eval()
    _randomize(hf, seed=1)
    out = tmp_path_factory.mktemp("dg") / "hub"
    hf.save_pretrained(out)
    return hf, out


def tensors_of_file(path):
    f = SafetensorsFile(path)
    return {k: np.array(f.get(k)) for k in f.keys()}


def tensors_of(path):
    return tensors_of_file(path / "model.safetensors")


def copy_with(src, dst, tensors):
    """`src`'s files with model.safetensors replaced by `tensors`."""
    shutil.copytree(src, dst)
    write_safetensors(dst / "model.safetensors", tensors, {"format": "pt"})
    return dst


def test_save_pretrained_dir_loads_text_only_and_matches_transformers(hub, capfd):
    hf, path = hub
    model = load_model(path)
    err = capfd.readouterr().err
    vision = [k for k in tensors_of(path) if k.startswith(("model.encoder.vision_tower.",
                                                             "model.encoder.embed_vision."))]
    assert f"dropped {len(vision)} vision tower tensors" in err and "text only" in err
    assert len([line for line in err.splitlines() if "vision" in line]) == 1
    assert isinstance(model, DiffusionGemma) and model.config == CONFIG
    # both layer-scalar sets, as transformers holds them
    for i, layer in enumerate(model.layers):
        assert float(layer.layer_scalar_encoder[...][0]) == float(
            hf.model.encoder.language_model.layers[i].layer_scalar)
        assert float(layer.layer_scalar_decoder[...][0]) == float(
            hf.model.decoder.layers[i].layer_scalar)
    # experts in our [E, in, out] layout
    np.testing.assert_array_equal(
        np.asarray(model.layers[1].experts.gate_up[...]),
        hf.model.decoder.layers[1].experts.gate_up_proj.detach().numpy().transpose(0, 2, 1))
    ours = logits_of(model, CONFIG)
    ref = hf_logits(hf, *inputs(CONFIG))
    assert np.max(np.abs(ours - ref)) <= ATOL


def test_read_model_config_and_info(hub, capsys, tmp_path):
    _, path = hub
    assert read_model_config(path) == CONFIG
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["family"] == "diffusion_gemma"
    moe = info["moe"]
    assert (moe["layers"], moe["sliding_layers"], moe["full_layers"]) == (3, 2, [2])
    assert (moe["experts"], moe["top_k"]) == (4, 2)
    experts = 3 * 4 * (32 * 48 + 24 * 32)  # layers x E x (gate_up + down)
    assert moe["expert_params"] == experts and info["params"] == 61_202
    assert moe["expert_share"] == pytest.approx(experts / 61_202)
    assert moe["active_params"] == 61_202 - experts // 2
    assert info["dropped_vision_tensors"] > 0
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "family: diffusion_gemma" in text
    assert "layers: 3 (2 sliding, window 4; 1 full: 2)" in text
    assert f"experts: 4 per layer, top-2; expert params {experts:,} = 45.2% of all" in text
    assert main(["convert", str(path), str(tmp_path / "q")]) == 0
    assert main(["info", str(tmp_path / "q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["moe"] == moe


def test_26b_a4b_parameter_summary():
    """The published shapes: 25.25 B text parameters, 90% of them in the experts, 3.84 B used
    per token (the "A4B")."""
    c = diffusion_gemma_26b_a4b()
    moe = moe_summary(c, param_shapes(c))
    assert (moe["sliding_layers"], moe["full_layers"]) == (25, [5, 11, 17, 23, 29])
    assert moe["expert_params"] == 30 * 128 * (2816 * 1408 + 704 * 2816)
    assert round(moe["expert_share"], 3) == 0.904
    assert round(moe["active_params"] / 1e9, 2) == 3.84


def test_encoder_twins_equal_load_and_differing_twin_is_named(hub, tmp_path):
    _, path = hub
    t = tensors_of(path)
    for k in list(t):
        if k.startswith("model.decoder.") and "self_conditioning" not in k \
                and not k.endswith("layer_scalar"):
            t[ENCODER_TEXT + k[len("model.decoder."):]] = t[k].copy()
    t["lm_head.weight"] = t["model.decoder.embed_tokens.weight"].copy()
    twins = copy_with(path, tmp_path / "twins", t)
    _, params = load_params(twins)
    _, plain = load_params(path)
    assert all(np.asarray(params[p]).tobytes() == np.asarray(v).tobytes()
               for p, v in plain.items())

    key = f"{ENCODER_TEXT}layers.2.experts.down_proj"
    t[key] = t[key].copy()
    t[key][1, 0, 0] += 1
    bad = copy_with(path, tmp_path / "bad", t)
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    text = str(e.value)
    assert "\n" not in text
    assert f"tensor {key!r} differs from 'model.decoder.layers.2.experts.down_proj'" in text


def test_wrong_expert_shape_is_one_error_and_nothing_is_written(hub, tmp_path):
    _, path = hub
    t = tensors_of(path)
    t[GATE_UP] = np.ascontiguousarray(t[GATE_UP].transpose(0, 2, 1))  # [E, H, 2I] by mistake
    bad = copy_with(path, tmp_path / "bad", t)
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    text = str(e.value)
    assert "\n" not in text
    assert f"tensor {GATE_UP!r} has shape [4, 32, 48], expected [4, 48, 32]" in text
    out = tmp_path / "out"
    assert main(["convert", str(bad), str(out)]) != 0
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_bfloat16_checkpoint_keeps_its_dtype_or_casts(hub, tmp_path):
    _, path = hub
    t = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors_of(path).items()}
    bf16 = copy_with(path, tmp_path / "bf16", t)
    config, params = load_params(bf16)
    assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
    gate_up = params[("layers", 1, "experts", "gate_up")]
    assert gate_up.dtype == jnp.bfloat16
    assert np.asarray(gate_up).tobytes() == np.ascontiguousarray(
        t[GATE_UP].transpose(0, 2, 1)).tobytes()
    config, params = load_params(bf16, dtype="float32")
    assert config.param_dtype == "float32"
    assert all(v.dtype == jnp.float32 for v in params.values())


def test_hub_id_loads_from_the_cache_offline(hub, tmp_path, monkeypatch):
    _, path = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / "models--google--diffusiongemma-tiny-test"
    shutil.copytree(path, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.chdir(tmp_path)
    model = load_model("google/diffusiongemma-tiny-test")
    assert isinstance(model, DiffusionGemma) and model.config == CONFIG


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hub_to_qdlm_to_hub_is_bit_exact_and_transformers_loads_it(hub, tmp_path, dtype):
    hf, path = hub
    src = path
    if dtype == "bfloat16":
        src = copy_with(path, tmp_path / "src", {k: v.astype(ml_dtypes.bfloat16)
                                                 for k, v in tensors_of(path).items()})
    q, back = tmp_path / "q", tmp_path / "back"
    assert main(["convert", str(src), str(q)]) == 0
    assert main(["convert", str(q), str(back), "--to", "hf"]) == 0
    assert (q / "generation_config.json").is_file()  # carried along for the sampler
    assert (back / "generation_config.json").read_bytes() == \
        (path / "generation_config.json").read_bytes()
    hub_config = json.loads((back / "config.json").read_text())
    assert hub_config == load_params(src)[0].to_hf()  # the stored dtype recorded
    assert hub_config["dtype"] == dtype
    # the text tensors save_pretrained wrote (decoder + encoder layer scalars), same bytes
    written, source = tensors_of(back), tensors_of(src)
    text = {k: v for k, v in source.items() if not k.startswith(
        ("model.encoder.vision_tower.", "model.encoder.embed_vision."))}
    assert sorted(written) == sorted(text)
    for k, v in text.items():
        assert written[k].dtype == v.dtype and written[k].tobytes() == v.tobytes(), k
    assert isinstance(load_model(q), DiffusionGemma)
    config, from_orbax = load_params(q)
    assert config == load_params(src)[0]
    for p, v in load_params(src)[1].items():
        assert from_orbax[p].dtype == v.dtype
        assert np.asarray(from_orbax[p]).tobytes() == np.asarray(v).tobytes(), p
    if dtype != "float32":
        return
    # the vision tower is not written: transformers initialises its default one
    theirs, info = DiffusionGemmaForBlockDiffusion.from_pretrained(back, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))
               for k in info["missing_keys"])
    args = inputs(CONFIG)
    np.testing.assert_array_equal(hf_logits(theirs.eval(), *args), hf_logits(hf, *args))


# ---- random checkpoints ---------------------------------------------------------------------

def _recipe(name):
    """A module of converters/ (runnable recipes, not a package)."""
    import importlib
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "converters"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _random_checkpoint_module():
    return _recipe("random_checkpoint")


def _convert_module():
    return _recipe("convert")


def test_tiny_random_checkpoint_equals_transformers(tmp_path):
    config = CONFIG  # the shapes of the tests above: their compiled forward is reused
    path = write_hf_checkpoint(tmp_path / "tiny", config, seed=5)
    model = load_model(path)
    assert model.config == config
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    ours = logits_of(model, config, seed=1)
    ref = hf_logits(hf, *inputs(config, seed=1))
    assert np.abs(ref).max() > 1  # random weights of scale 1/sqrt(fan_in): real logits
    assert np.max(np.abs(ours - ref)) <= ATOL


def test_random_checkpoint_recipe_streams_the_hub_layout(tmp_path, monkeypatch):
    """diffusion-gemma-tiny: sharded, written in pieces, the names and shapes transformers
    loads (nothing missing but the vision tower, nothing unexpected), converted to qdlm on an
    expert mesh and back bit for bit."""
    rc = _random_checkpoint_module()
    monkeypatch.setattr(rc, "_PIECE_VALUES", 100)  # several pieces per tensor
    src = rc.write("diffusion-gemma-tiny", tmp_path / "src", max_shard_gb=0.00002)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((src / "generation_config.json").read_text())["max_denoising_steps"] == 48
    original = {}
    for f in sorted(src.glob("*.safetensors")):
        original.update(tensors_of_file(f))
    assert all(a.dtype == ml_dtypes.bfloat16 for a in original.values())
    _, info = DiffusionGemmaForBlockDiffusion.from_pretrained(src, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))
               for k in info["missing_keys"])
    convert = _convert_module()
    assert convert.main([str(src), str(tmp_path / "q"), "--mesh", "8", "--expert", "4"]) == 0
    assert convert.main([str(tmp_path / "q"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = tensors_of(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert back[k].tobytes() == v.tobytes(), k


def test_real_shapes_of_the_random_checkpoint():
    """diffusion-gemma-26b-a4b: 2 layers by default (one sliding, one full), the published
    shapes (reference table), 4.8 GB in bf16; all 30 layers 25 sliding + 5 full."""
    rc = _random_checkpoint_module()
    config = rc.model_config("diffusion-gemma-26b-a4b", None, "bfloat16")
    assert config.layer_types == ("sliding_attention", "full_attention")
    shapes = gemma_hub_shapes(config)
    d = "model.decoder."
    assert shapes[d + "embed_tokens.weight"] == (262144, 2816)
    assert [shapes[f"{d}layers.0.self_attn.{p}_proj.weight"] for p in "qkvo"] == \
        [(4096, 2816), (2048, 2816), (2048, 2816), (2816, 4096)]
    assert [shapes.get(f"{d}layers.1.self_attn.{p}_proj.weight") for p in "qkvo"] == \
        [(8192, 2816), (1024, 2816), None, (2816, 8192)]
    assert shapes[d + "layers.1.self_attn.k_norm.weight"] == (512,)
    assert shapes[d + "layers.0.experts.gate_up_proj"] == (128, 1408, 2816)
    assert shapes[d + "layers.0.experts.down_proj"] == (128, 2816, 704)
    assert shapes[d + "layers.0.router.proj.weight"] == (128, 2816)
    assert shapes[d + "self_conditioning.gate_proj.weight"] == (2112, 2816)
    assert shapes["model.encoder.language_model.layers.1.layer_scalar"] == (1,)
    assert sorted(shapes) == sorted(m.hf_name for m in key_map(config))
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert round(2 * n / 1e9, 1) == 4.8
    full = rc.model_config("diffusion-gemma-26b-a4b", 30, "bfloat16")
    assert full.full_layers == (5, 11, 17, 23, 29) and len(full.sliding_layers) == 25
    assert sum(int(np.prod(s)) for s in gemma_hub_shapes(full).values()) == 25_250_986_812


def test_chunked_writer_equals_the_plain_writer(tmp_path):
    rng = np.random.default_rng(0)
    t = {"a": rng.standard_normal((5, 3, 2)).astype(ml_dtypes.bfloat16),
         "b": np.arange(7, dtype=np.int32)}
    write_safetensors(tmp_path / "plain.safetensors", t, {"format": "pt"})
    write_safetensors_chunked(tmp_path / "chunked.safetensors",
                              [(k, v.shape, v.dtype) for k, v in t.items()],
                              lambda k: np.array_split(t[k], 3), {"format": "pt"})
    assert (tmp_path / "plain.safetensors").read_bytes() == \
        (tmp_path / "chunked.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="'a' got 24 bytes"):
        write_safetensors_chunked(tmp_path / "short.safetensors", [("a", (5, 3, 2), t["a"].dtype)],
                                  lambda k: [t[k][:2]])
