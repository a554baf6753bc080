"""Hook points: capture (a function of) each linear layer's input during a forward pass.

Every linear layer has a dotted name (`layers.3.q_proj`, `lm_head`). Passing a `Capture` to
the model records `fn(x)` for each named layer whose name matches, where `x` is the layer's
input `[batch, seq, in]`. Recording happens while tracing, so under `jax.jit` the captured
values are ordinary outputs of the jitted function:

    def f(model, ids):
        cap = Capture(names=r"layers\\.0\\..*")
        logits = model(ids, capture=cap)
        return logits, cap.values

`fn` lets calibration reduce inputs on the fly (e.g. to a Gram matrix `x^T x`) instead of
keeping every activation.

With `residual_fn`, the dense model also records `residual_fn(h_i)` of each block's output
(the residual stream after block i, `[batch, seq, hidden]`) in `residual[i]`; without it
nothing is recorded there, so a plain `Capture()` holds the linear inputs alone.

With `experts_fn`, a mixture-of-experts model records `experts_fn(x, top_ids, top_weights)`
of each layer's routed experts in `experts[i]`: `x` the experts' input `[batch, seq, hidden]`
(after its norm), `top_ids` / `top_weights` `[batch, seq, k]` the router's choices.
"""

from __future__ import annotations

import re
from typing import Callable

import jax


class Capture:
    """Collects `fn(input)` of the linear layers whose name matches `names`."""

    def __init__(self, names: str | tuple[str, ...] | None = None,
                 fn: Callable[[jax.Array], object] | None = None, *,
                 residual_fn: Callable[[jax.Array], object] | None = None,
                 experts_fn: Callable[[jax.Array, jax.Array, jax.Array], object] | None = None):
        if isinstance(names, str):
            pattern = re.compile(names)
            self._wants = lambda n: pattern.fullmatch(n) is not None
        elif names is None:
            self._wants = lambda n: True
        else:
            wanted = frozenset(names)
            self._wants = lambda n: n in wanted
        self._fn = fn if fn is not None else (lambda x: x)
        self._residual_fn = residual_fn
        self.values: dict[str, object] = {}
        self.residual: dict[int, object] = {}
        self._experts_fn = experts_fn
        self.experts: dict[int, object] = {}

    def wants(self, name: str) -> bool:
        return self._wants(name)

    def record(self, name: str, x: jax.Array) -> None:
        if self._wants(name):
            if name in self.values:
                raise ValueError(f"Capture: layer {name!r} was recorded twice in one pass")
            self.values[name] = self._fn(x)

    def record_residual(self, layer: int, h: jax.Array) -> None:
        if self._residual_fn is not None:
            if layer in self.residual:
                raise ValueError(f"Capture: block {layer}'s output was recorded twice in one pass")
            self.residual[layer] = self._residual_fn(h)

    def record_experts(self, layer: int, x: jax.Array, top_ids: jax.Array,
                       top_weights: jax.Array) -> None:
        if self._experts_fn is not None:
            if layer in self.experts:
                raise ValueError(f"Capture: layer {layer}'s experts were recorded twice in one "
                                 "pass")
            self.experts[layer] = self._experts_fn(x, top_ids, top_weights)
