"""Generation settings for `qdlm generate --config configs/generate.py`.

Override any field on the command line, e.g. `--config.gen.steps=64`. LLaDA reads steps,
gen_length, block_length, temperature, cfg_scale, remasking, cache, threshold, factor; Dream
reads steps, gen_length (as max_new_tokens), temperature, alg, alg_temp, top_p, top_k, eps,
and cache, threshold, factor (Fast-dLLM's Dream block decoding, which also reads
block_length). A field that does not apply must keep its default. DiffusionGemma reads
the `gemma` section (None: the checkpoint's generation_config.json, then transformers'
defaults) and gen.seed. See docs/generation.md.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.gen = ml_collections.ConfigDict(dict(
        steps=128,  # denoising steps in total (LLaDA: split evenly over the blocks)
        gen_length=128,  # tokens to generate (Dream: max_new_tokens)
        block_length=32,  # LLaDA semi-autoregressive block; gen_length % block_length == 0
        temperature=0.0,  # 0 = argmax; LLaDA: Gumbel-max, Dream: categorical sampling
        cfg_scale=0.0,  # LLaDA classifier-free guidance (prompt masked in the other branch)
        remasking="low_confidence",  # LLaDA: low_confidence | random
        alg="entropy",  # Dream: origin | maskgit_plus | topk_margin | entropy
        alg_temp=None,  # Dream: None/0 = top-k by confidence, > 0 = sample positions
        top_p=None,  # Dream nucleus filtering
        top_k=None,  # Dream top-k filtering
        eps=1e-3,  # Dream: timesteps run from 1 to eps
        cache="none",  # none | prefix | dual (Fast-dLLM block-wise KV cache)
        threshold=None,  # None or tau in (0, 1]: commit every position with conf >= tau
        factor=None,  # None or f > 0: Fast-dLLM's factor rule (not with a threshold)
        seed=0,  # PRNG seed of the sampling key
        chat=False,  # apply the checkpoint's chat template (each prompt one user message)
    ))
    c.gemma = ml_collections.ConfigDict(dict(
        max_new_tokens=None,  # tokens to generate, in canvases of the model's canvas_length
        steps=None,  # most denoising steps per canvas (transformers: max_denoising_steps)
        entropy_bound=None,  # accept the lowest-entropy positions while their sum stays under
        t_min=None,  # temperature at the last step (linear schedule from t_max)
        t_max=None,  # temperature at the first step
        stability_threshold=None,  # early stop: argmax canvas unchanged this many steps ...
        confidence_threshold=None,  # ... and mean entropy below this
        greedy=False,  # keep the argmax of each step's distribution instead of sampling
    ))
    return c
