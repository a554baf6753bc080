"""transformers' DiffusionGemma `generate` made deterministic, to compare our sampler with it
token for token (tests and benchmarks): `EntropyBoundSampler.initialize_canvas` returns
injected uniform ids (noise[c, 0] for canvas c's start, noise[c, j + 1] for step j's
renoising), `torch.multinomial` takes the argmax of the probabilities (our `greedy` draw) and
`torch.sort` is stable (as our argsort). While it runs, the smallest decision margins of the
rows still denoising are recorded (near ties: tests/inference/test_diffusion_gemma_sampler.py).
"""

import numpy as np
import torch
from transformers.models.diffusion_gemma import generation_diffusion_gemma as G

from qdlm_jax.inference.diffusion_gemma import GemmaSampleSettings

TIE_TOL = dict(gap=1e-3, bound=1e-4, confidence=1e-5)


class PatchedTransformers:
    """transformers' sampler made deterministic (module docstring), recording the smallest
    decision margins of the rows still denoising."""

    def __init__(self, noise, s: GemmaSampleSettings):
        self.noise, self.s = noise, s
        self.canvas, self.draw, self.active = -1, 0, None
        self.margins = dict(gap=np.inf, bound=np.inf, confidence=np.inf)

    def __enter__(self):
        mixin, sampler = G.DiffusionGemmaGenerationMixin, G.EntropyBoundSampler
        self.saved = [(mixin, "_prepare_denoiser_inputs"), (mixin, "_denoising_step"),
                      (sampler, "initialize_canvas"), (sampler, "accept_canvas"),
                      (torch, "multinomial"), (torch, "sort")]
        self.saved = [(obj, name, getattr(obj, name)) for obj, name in self.saved]
        prepare, step, accept, sort = (self.saved[i][2] for i in (0, 1, 3, 5))
        rec = self

        def prepare_inputs(self, *args, **kwargs):
            rec.canvas, rec.draw = rec.canvas + 1, 0
            return prepare(self, *args, **kwargs)

        def denoising_step(self, **kwargs):
            rec.active = ~(kwargs["finished_denoising"].numpy())
            return step(self, **kwargs)

        def initialize_canvas(self, batch_size, device):
            ids = torch.tensor(rec.noise[rec.canvas, rec.draw], dtype=torch.long)
            rec.draw += 1
            return ids

        def accept_canvas(self, current, denoised, logits, cur_step):
            rec.record(logits)
            return accept(self, current, denoised, logits, cur_step)

        mixin._prepare_denoiser_inputs = prepare_inputs
        mixin._denoising_step = denoising_step
        sampler.initialize_canvas = initialize_canvas
        sampler.accept_canvas = accept_canvas
        torch.multinomial = lambda probs, num_samples: probs.argmax(-1, keepdim=True)
        torch.sort = lambda x, dim=-1, descending=False: sort(
            x, dim=dim, descending=descending, stable=True)
        return self

    def __exit__(self, *exc):
        for obj, name, value in self.saved:
            setattr(obj, name, value)

    def record(self, logits):
        if not self.active.any():
            return
        z = logits.numpy()[self.active].astype(np.float64)
        top2 = np.sort(z, axis=-1)[..., -2:]
        h = torch.distributions.Categorical(logits=logits).entropy().numpy()[self.active]
        hs = np.sort(h, axis=-1)
        lower = np.cumsum(hs, axis=-1) - hs
        m = self.margins
        m["gap"] = min(m["gap"], float(np.min(top2[..., 1] - top2[..., 0])))
        m["bound"] = min(m["bound"], float(np.min(np.abs(lower - self.s.entropy_bound))))
        if self.s.confidence_threshold is not None:
            m["confidence"] = min(m["confidence"], float(np.min(np.abs(
                h.mean(-1) - self.s.confidence_threshold))))

    @property
    def near_tie(self) -> bool:
        return any(self.margins[k] < TIE_TOL[k] for k in TIE_TOL)


def hf_generate(hf, ids, mask, noise, s: GemmaSampleSettings):
    """(sequences [B, P + C L] with pad after transformers' last canvas, tokens_per_forward,
    near_tie)."""
    with PatchedTransformers(noise, s) as rec, torch.no_grad():
        out = hf.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask),
            max_new_tokens=s.max_new_tokens, max_denoising_steps=s.steps,
            sampler_config=G.EntropyBoundSamplerConfig(entropy_bound=s.entropy_bound),
            t_min=s.t_min, t_max=s.t_max, stability_threshold=s.stability_threshold,
            confidence_threshold=s.confidence_threshold, pad_token_id=s.pad_id,
            eos_token_id=list(s.eos_ids) or None)
    seq = out.sequences.numpy()
    full = np.full((seq.shape[0], ids.shape[1] + s.num_canvases * s.canvas_length), s.pad_id)
    full[:, :seq.shape[1]] = seq
    return full, out.tokens_per_forward.numpy(), rec.near_tie
