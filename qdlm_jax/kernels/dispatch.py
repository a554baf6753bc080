"""`qmatmul`: the one public low-bit matmul, dispatching to an implementation.

    y = qmatmul(x, w)                    # x[..., K] @ w (QuantizedArray, logical [K, N];
                                         # or BinaryPlanesArray: XLA path only)
    y = qmatmul(x, w, act_bits=8)        # W8A8: per-token int8 activations
    y = qmatmul(x, w, act_bits=4, act_group_size=128)   # W4A4, a scale per 128 columns
    with use_implementation("pallas_tpu", interpret=True):
        y = model(ids)                   # every quantized linear runs the TPU kernel

Implementations (`IMPLEMENTATIONS`): "xla" (everywhere, every QuantizedArray; defines the
semantics), "pallas_tpu" (Mosaic), "pallas_gpu" (Triton). "auto" picks by the default
backend: tpu -> pallas_tpu, gpu -> pallas_gpu, anything else -> xla. A Pallas
implementation whose `supports(x, w, act_bits, act_group_size)` says no falls back to "xla"
silently;
`select_implementation` tells which one runs and why.

Which implementation runs, in order of precedence: the `implementation=` argument, the
innermost `use_implementation(...)` context, `set_implementation(...)`, the environment
variable QDLM_QMATMUL_IMPLEMENTATION (read at import; e.g. "pallas_gpu" or
"pallas_tpu:interpret"), then "auto". The setting is a JAX config state that is part of
the jit cache key, so a jitted function (e.g. the denoising loop) traced under one setting
is traced again under another instead of silently reusing the first.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import jax
from jax._src import config as jax_config  # config states that take part in jit keys
from jaxtyping import Array, Float

from qdlm_jax.kernels import common, grouped, pallas_gpu, pallas_tpu, xla
from qdlm_jax.quant.bqarray import BinaryPlanesArray
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.qexperts import QuantizedExperts, experts_matmul

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")
_CHOICES = ("auto",) + IMPLEMENTATIONS
_KERNELS = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
_INTERPRET = ":interpret"


class Setting(NamedTuple):
    name: str  # one of "auto", "xla", "pallas_tpu", "pallas_gpu"
    interpret: bool  # run Pallas kernels through the interpreter (e.g. on CPU)


def _parse(value: str) -> Setting:
    if not isinstance(value, str):
        raise ValueError(f"qmatmul implementation setting {value!r}: expected a string such "
                         f"as 'pallas_tpu' or 'pallas_tpu{_INTERPRET}'")
    name = value[:-len(_INTERPRET)] if value.endswith(_INTERPRET) else value
    if name not in _CHOICES:
        raise ValueError(f"qmatmul implementation {name!r} is unknown; use one of {_CHOICES} "
                         f"(optionally with the suffix {_INTERPRET!r})")
    return Setting(name, value.endswith(_INTERPRET))


_STATE = jax_config.string_or_object_state(
    "qdlm_qmatmul_implementation", "auto",
    "Which qdlm_jax.kernels.qmatmul implementation runs (see qdlm_jax/kernels/dispatch.py).",
    validator=_parse, include_in_jit_key=True, include_in_trace_context=True)


def _encode(name: str, interpret: bool) -> str:
    value = name + (_INTERPRET if interpret else "")
    _parse(value)
    return value


def current_setting() -> Setting:
    """The implementation setting in effect here (context, global, env var or "auto")."""
    return _parse(_STATE.value)


@contextlib.contextmanager
def use_implementation(name: str, *, interpret: bool = False) -> Iterator[None]:
    """Within the block, `qmatmul` (and so every quantized linear of a model) uses `name`.

    `interpret=True` runs Pallas kernels in interpret mode (needed on CPU).
    """
    with _STATE(_encode(name, bool(interpret))):
        yield


def set_implementation(name: str, *, interpret: bool = False) -> None:
    """Sets the process-wide default implementation (a `use_implementation` block wins)."""
    jax.config.update("qdlm_qmatmul_implementation", _encode(name, bool(interpret)))


def platform_default() -> str:
    """The implementation "auto" stands for on the default backend."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas_tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    return "xla"


def _requested(implementation: str | None) -> tuple[str, str]:
    """(the setting asked for: the argument or the current one, the implementation it stands
    for on this backend)."""
    requested = _parse(implementation).name if implementation is not None \
        else current_setting().name
    return requested, platform_default() if requested == "auto" else requested


def select_implementation(x, w, *, act_bits: int | None = None,
                          act_group_size: int | None = None,
                          implementation: str | None = None) -> tuple[str, str]:
    """(name, reason): the implementation `qmatmul` runs for these operands and why.

    `x` may be a `jax.ShapeDtypeStruct`; only shapes, dtypes and w's static fields are read.
    """
    requested, name = _requested(implementation)
    if isinstance(w, BinaryPlanesArray):
        return "xla", "binary planes (DAQ) have an XLA implementation only"
    if name == "xla":
        return "xla", f"requested {requested!r}"
    ok, reason = _KERNELS[name].supports(x, w, act_bits, act_group_size)
    if not ok:
        return "xla", f"{name} does not support this call: {reason}"
    return name, f"requested {requested!r}"


def qmatmul(x: Float[Array, "... k"], w: QuantizedArray, *, act_bits: int | None = None,
            act_group_size: int | None = None, implementation: str | None = None,
            interpret: bool | None = None) -> Float[Array, "... n"]:
    """y[..., n] = x[..., k] @ w_logical[k, n] with a packed low-bit weight.

    act_bits=None: weight-only, y = x @ w_hat (w_hat = scale * (code - zero), cast to
    x.dtype; fp32 accumulation). act_bits=8 or 4: x is quantized per token,
    x_q = clip(round(x / s_x), -qmax, qmax) with s_x = max|x| / qmax, qmax = 2**(act_bits-1)-1,
    and y = (sum_k x_q * (code - zero)) * s_w * s_x with integer accumulation
    (qdlm_jax/kernels/xla.py states the grouped case). `act_group_size` (needs act_bits, a
    divisor of k): one s_x per group of that many consecutive columns of a token instead of
    per token; the integer sums run per group and each is scaled by its s_x. Output dtype:
    x.dtype.

    `implementation`: "auto", "xla", "pallas_tpu" or "pallas_gpu" (default: the current
    setting, module docstring); `interpret` overrides the setting's interpret flag.
    """
    common.check_operands(x, w, act_bits, act_group_size)
    name, _ = select_implementation(x, w, act_bits=act_bits, act_group_size=act_group_size,
                                    implementation=implementation)
    if name == "xla":
        return xla.qmatmul(x, w, act_bits=act_bits, act_group_size=act_group_size)
    if interpret is None:
        interpret = current_setting().interpret
    return _KERNELS[name].qmatmul(x, w, act_bits=act_bits, act_group_size=act_group_size,
                                  interpret=bool(interpret))


def select_expert_implementation(x, q: QuantizedExperts, *, implementation: str | None = None
                                 ) -> tuple[str, str]:
    """(name, reason): the implementation `expert_qmatmul` runs for these operands and why
    (the same setting as `qmatmul`; a Pallas kernel that does not take the call falls back
    to "xla")."""
    requested, name = _requested(implementation)
    if name == "xla":
        return "xla", f"requested {requested!r}"
    ok, reason = grouped.supports(x, q, name)
    if not ok:
        return "xla", f"{name} does not support this call: {reason}"
    return name, f"requested {requested!r}"


def expert_qmatmul(x: Float[Array, "m k"], q: QuantizedExperts, group_sizes,
                   *, implementation: str | None = None,
                   interpret: bool | None = None) -> Float[Array, "m n"]:
    """Rows of x sorted by expert (group_sizes[e] rows for expert e) times their expert's
    packed weight: the grouped Pallas kernel of the selected implementation
    (`kernels.grouped`), or the XLA path (`qexperts.experts_matmul`). Output dtype: x.dtype."""
    name, _ = select_expert_implementation(x, q, implementation=implementation)
    if name == "xla":
        return experts_matmul(x, q, group_sizes)
    if interpret is None:
        interpret = current_setting().interpret
    return grouped.grouped_qmatmul(x, q, group_sizes, backend=name, interpret=bool(interpret))
