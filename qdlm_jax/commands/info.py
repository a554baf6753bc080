"""qdlm info PATH: the model config, parameter count and tokenizer of a checkpoint (a
directory or a hub id). For DiffusionGemma also its layers (sliding / full), experts and top-k,
and the experts' share of the parameters (and the parameters one token uses)."""

from __future__ import annotations

import json

NAME = "info"
HELP = "print the model config and parameter count of a checkpoint (HF dir or qdlm)"


def add_arguments(p):
    p.add_argument("path", help="HF checkpoint directory, hub id, or `qdlm convert` / "
                                "`qdlm quantize` output")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def moe_summary(config, shapes: dict) -> dict | None:
    """Layers, experts and parameter shares of a DiffusionGemma config, from {path: shape} of
    its params (None for the dense families). `active_params` counts what one token runs
    through: everything but the experts, plus top_k / num_experts of them."""
    import numpy as np

    if config.family != "diffusion_gemma":
        return None
    total = sum(int(np.prod(s)) for s in shapes.values())
    experts = sum(int(np.prod(s)) for p, s in shapes.items() if "experts" in p)
    return {"layers": config.num_layers, "sliding_layers": len(config.sliding_layers),
            "full_layers": list(config.full_layers), "sliding_window": config.sliding_window,
            "experts": config.num_experts, "top_k": config.top_k, "expert_params": experts,
            "expert_share": experts / total if total else 0.0,
            "active_params": total - experts + experts * config.top_k // config.num_experts}


def moe_lines(moe: dict) -> list[str]:
    full = ", ".join(map(str, moe["full_layers"]))
    return [f"  layers: {moe['layers']} ({moe['sliding_layers']} sliding, window "
            f"{moe['sliding_window']}; {len(moe['full_layers'])} full: {full})",
            f"  experts: {moe['experts']} per layer, top-{moe['top_k']}; expert params "
            f"{moe['expert_params']:,} = {100 * moe['expert_share']:.1f}% of all; active per "
            f"token {moe['active_params']:,} ({moe['active_params'] / 1e9:.3f} B)"]


def run(args, overrides):
    import numpy as np

    from qdlm_jax.checkpoints import orbax_format as checkpoint
    from qdlm_jax.checkpoints.hf import (
        CheckpointDir,
        check_tensors,
        expected_shape,
        extra_tensors,
        key_map,
    )
    from qdlm_jax.checkpoints.load import (
        load_tokenizer,
        param_summary,
        quantization_banner,
        resolve_checkpoint,
    )
    from qdlm_jax.errors import CheckpointError
    from qdlm_jax.quant.act_kernel import inner_weight

    dropped = 0
    path = resolve_checkpoint(args.path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    from qdlm_jax.checkpoints import gptq_format

    if gptq_format.is_gptq_checkpoint(path):
        config, params = gptq_format.load_gptq(path)
        shapes = {p: inner_weight(v).shape for p, v in params.items()}
        q = gptq_format.quantization_config(params)
        kind = "GPTQ export"
        summary = param_summary(params)
        n_params, n_bytes = summary["params"], summary["bytes"]
        quantized = (f"quantized: GPTQ layout, {q['bits']}-bit, group {q['group_size']}, "
                     f"sym={q['sym']}, desc_act={q['desc_act']}")
    elif checkpoint.is_qdlm_checkpoint(path):
        config = checkpoint.read_config(path)
        _, params = checkpoint.load_checkpoint(path)
        shapes = {p: inner_weight(v).shape for p, v in params.items()}
        kind = "qdlm (orbax)"
        summary = param_summary(params)
        n_params, n_bytes = summary["params"], summary["bytes"]
        quantized = quantization_banner(path, params)
    else:
        ckpt = CheckpointDir(path)  # raises a clear error on a missing or bad directory
        config = ckpt.config
        check_tensors(ckpt, key_map(config))
        kind = f"Hugging Face ({len(ckpt.files)} weight file(s))"
        quantized = None
        shapes = {m.path: expected_shape(config, m.path) for m in key_map(config)}
        n_params = sum(int(np.prod(s)) for s in shapes.values())
        dropped = len(extra_tensors(ckpt, key_map(config))[1])
        n_bytes = sum(int(np.prod(ckpt.shape(k))) * ckpt.files[ckpt.where[k]].dtype(k).itemsize
                      for k in ckpt.keys())
    try:
        tok = load_tokenizer(path)
        tokenizer = {"class": type(tok.hf).__name__, "tokens": len(tok.hf),
                     "chat_template": tok.chat_template is not None,
                     "special_ids": {f: getattr(tok.special, f) for f in
                                     ("pad", "bos", "eos", "mask", "eot")},
                     "stop_ids": list(tok.special.stops),
                     "sources": dict(tok.special.sources)}
    except CheckpointError as e:
        tokenizer = {"error": str(e)}
    moe = moe_summary(config, shapes)
    info = {"path": str(path), "format": kind, "params": n_params, "bytes": n_bytes,
            "quantized": quantized, "config": config.to_dict(), "tokenizer": tokenizer}
    if moe is not None:
        info["moe"] = moe
    if dropped:
        info["dropped_vision_tensors"] = dropped
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{path}  [{kind}]")
    print(f"  family: {config.family}   params: {n_params:,} ({n_params / 1e9:.3f} B)   "
          f"size: {n_bytes / 2**20:.1f} MiB")
    print(f"  {quantized or 'not quantized (float weights)'}")
    if moe is not None:
        print("\n".join(moe_lines(moe)))
    if dropped:
        print(f"  vision tower: {dropped} tensors in the checkpoint, not loaded (text only)")
    if "error" in tokenizer:
        print(f"  tokenizer: none ({tokenizer['error']})")
    else:
        where = tokenizer["sources"]
        print(f"  tokenizer: {tokenizer['class']}, {tokenizer['tokens']:,} tokens, chat "
              f"template: {'yes' if tokenizer['chat_template'] else 'no'}")
        print("  special ids: " + ", ".join(
            f"{f}={v} ({where.get(f, 'not set')})" for f, v in tokenizer["special_ids"].items())
            + f"; generation stops at {tokenizer['stop_ids']}")
    for k, v in config.to_dict().items():
        print(f"  {k:>24}: {v}")
    return 0
