"""lm-evaluation-harness model `qdlm-jax`: any lm-eval task against an fp or quantized JAX
dLLM (needs the `eval` extra: `pip install -e '.[eval]'`).

From the command line, `qdlm-lm-eval` is lm-eval's own command line with this model
registered, so every lm-eval flag works as typed:

    qdlm-lm-eval --model qdlm-jax --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,mc_num=32 \
        --tasks gsm8k --num_fewshot 5 --apply_chat_template --fewshot_as_multiturn \
        --output_path runs/lm_eval --log_samples

(`python -m qdlm_jax.evals.lm_eval_cli` is the same.) `--apply_chat_template` formats every
request with the checkpoint's chat template (`apply_chat_template` below): the model then
encodes the prompts as lm-eval wrote them, without adding BOS.

In Python, importing this module registers the class under the name `qdlm-jax`:

    import lm_eval, qdlm_jax.evals.lm_eval_adapter
    lm_eval.simple_evaluate(model="qdlm-jax",
                            model_args="pretrained=assets/tiny-llada,mc_num=32",
                            tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(
                                include_path="my_task_dir"))

(or pass `QDLMJaxLM(model=..., tokenizer=...)` or `QDLMJaxLM(text_model=...)` as `model=`;
`qdlm eval --lm-eval-tasks` does this). `pretrained` is anything `qdlm_jax.load_model`
reads: a Hugging Face checkpoint dir or hub id, a `qdlm convert` output, or a packed
quantized model written by `qdlm quantize`; its tokenizer is the checkpoint's own.

- `loglikelihood((context, continuation))`: the Monte Carlo bound of
  `likelihood.log_likelihood` (`backends.TextModel.loglik`: LLaDA's or Dream's estimator,
  `mc_num` samples in batches of `mc_batch_size`), with the key
  `backends.context_key(seed, context)`, so the options of one question share noise draws.
  `is_greedy` is always False (the greedy check of LLaDA's harness is not run).
- `loglikelihood_rolling((text,))`: the bound on the whole text with every token maskable
  (an empty context; Dream conditions on BOS).
- `generate_until((context, gen_kwargs))`: the family's denoising loop, greedy unless
  gen_kwargs has `do_sample=True` / `temperature > 0`. `max_gen_toks` (default: the
  adapter's `gen_length`) sets the generated length, rounded up to a multiple of
  `block_length` (LLaDA); steps = ceil(length * steps / gen_length) rounded up to a
  multiple of the block count, i.e. the adapter's tokens-per-step ratio is kept. Output is
  cut at EOS and at the `until` strings. Requests with equal gen_kwargs are batched
  (`batch_size`, left padding).
- Fast-dLLM decoding, with Fast-dLLM's eval argument names: `use_cache=true` (prefix KV
  cache), `use_cache=true,dual_cache=true` (dual cache), `threshold=0.9` (confidence-
  threshold parallel decoding), `factor=1.0` (factor-based; not with a threshold), e.g.
  `model_args="pretrained=assets/tiny-llada,use_cache=true,dual_cache=true,threshold=0.9"`.
  For Dream they select Fast-dLLM's block decoding with `block_length`.
"""

from __future__ import annotations

import dataclasses
import json
import math

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from qdlm_jax.evals.backends import TextModel, context_key, load_text_model
from qdlm_jax.inference.generate import GenerationConfig


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def _as_float_or_none(name: str, v) -> float | None:
    if v is None or str(v).lower() in ("", "none", "null"):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"qdlm-jax: {name}={v!r}: expected a number or None") from None


def cache_mode(use_cache, dual_cache) -> str:
    """Fast-dLLM's eval flags -> `cache`: dual with both, prefix with use_cache only."""
    use_cache, dual_cache = _as_bool(use_cache), _as_bool(dual_cache)
    if dual_cache and not use_cache:
        raise ValueError("qdlm-jax: dual_cache=true needs use_cache=true (as in Fast-dLLM's "
                         "eval scripts)")
    return "dual" if dual_cache else ("prefix" if use_cache else "none")


@register_model("qdlm-jax")
class QDLMJaxLM(LM):
    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None,
                 text_model=None,
                 dtype: str = "float32", mc_num: int = 128, mc_batch_size: int = 32,
                 cfg_scale: float = 0.0, gen_length: int = 256, steps: int = 256,
                 block_length: int = 32, remasking: str = "low_confidence",
                 alg: str = "entropy", temperature: float = 0.0, batch_size: int = 8,
                 seed: int = 0, progress=True, use_cache=False, dual_cache=False,
                 threshold=None, factor=None, **unused):
        super().__init__()
        if text_model is not None:  # anything with TextModel's loglik / generate
            self.tm = text_model
        elif model is not None:
            if tokenizer is None:
                raise ValueError("qdlm-jax: model= needs tokenizer= as well")
            self.tm = TextModel(model, tokenizer)
        elif pretrained is not None:
            self.tm = load_text_model(pretrained, dtype=dtype)
        else:
            raise ValueError("qdlm-jax: pass pretrained=PATH (model_args) or model= and "
                             "tokenizer=")
        self.mc_num, self.mc_batch_size = int(mc_num), int(mc_batch_size)
        self.cfg_scale, self.seed = float(cfg_scale), int(seed)
        self.batch_size = int(batch_size)
        self.progress = _as_bool(progress)
        self.gen = GenerationConfig(steps=int(steps), gen_length=int(gen_length),
                                    block_length=int(block_length), remasking=remasking,
                                    alg=alg, temperature=float(temperature), seed=int(seed),
                                    cache=cache_mode(use_cache, dual_cache),
                                    threshold=_as_float_or_none("threshold", threshold),
                                    factor=_as_float_or_none("factor", factor))

    # ---- chat templates ------------------------------------------------------------
    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        """lm-eval's `--apply_chat_template`: the checkpoint's template applied to the
        messages; the requests that follow are encoded as written (no BOS added)."""
        self.tm = dataclasses.replace(self.tm, templated=True, chat=False)
        return self.tm.tokenizer.chat_prompt(chat_history,
                                             add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False) -> str | None:
        return self.tm.tokenizer.chat_template if chat_template is not False else None

    # ---- likelihood ----------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="qdlm-jax loglikelihood", disable=not self.progress):
            context, continuation = req.args
            ll = self.tm.loglik(context, continuation, context_key(self.seed, context),
                                mc_num=self.mc_num, batch_size=self.mc_batch_size,
                                cfg_scale=self.cfg_scale)
            out.append((ll, False))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in tqdm(requests, desc="qdlm-jax rolling", disable=not self.progress):
            (text,) = req.args
            out.append(self.tm.loglik("", text, context_key(self.seed, text),
                                      mc_num=self.mc_num, batch_size=self.mc_batch_size))
        return out

    # ---- generation ----------------------------------------------------------------
    def gen_config(self, gen_kwargs: dict) -> GenerationConfig:
        """The generation settings of one request (module docstring)."""
        g = self.gen
        length = int(gen_kwargs.get("max_gen_toks", g.gen_length))
        block = min(g.block_length, length)
        length = math.ceil(length / block) * block
        blocks = length // block
        steps = math.ceil(length * g.steps / g.gen_length)
        steps = max(blocks, math.ceil(steps / blocks) * blocks)
        sample = _as_bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", g.temperature if sample else 0.0))
        return dataclasses.replace(g, gen_length=length, block_length=block, steps=steps,
                                   temperature=temperature)

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str),
                              []).append(i)
        out: list[str | None] = [None] * len(requests)
        for key, idx in groups.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            texts = self.tm.generate([requests[i].args[0] for i in idx], self.gen_config(kwargs),
                                     stops=until, batch_size=self.batch_size,
                                     progress=self.progress, desc="qdlm-jax generate")
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's directory, as lm-eval's caches key it."""
        source = getattr(self.tm.tokenizer, "source", "qdlm-jax")
        return str(source).replace("/", "__")
