"""Round-to-nearest (RTN) weight quantization over a flat param dict (thin driver).

Every linear kernel (a 2-D leaf named ``kernel``, stored ``[in, out]``) whose path is not
skipped becomes a packed `QuantizedArray` (orientation ``"in_out"``) on the AutoGPTQ grid of
the spec (see `quantizer_core`). Other params are returned unchanged. The model then runs
from the packed params: `project` dequantizes them inside XLA.

    params = get_params(model)
    qparams = rtn_quantize_params(params, QuantSpec(bits=4, group_size=128))
    qmodel = model_from_params(config, qparams)
"""

from __future__ import annotations

from typing import Callable, Iterable

from qdlm_jax.models.params import ParamPath
from qdlm_jax.quant.qarray import QuantizedArray
from qdlm_jax.quant.quantizer_core import QuantSpec


def is_linear_kernel(path: ParamPath, value) -> bool:
    return bool(path) and path[-1] == "kernel" and getattr(value, "ndim", 0) == 2


def _skipped(path: ParamPath, skip: Iterable[str]) -> bool:
    names = {str(p) for p in path}
    return any(s in names for s in skip)


def rtn_quantize_params(params: dict[ParamPath, object], spec: QuantSpec, *,
                        skip: Iterable[str] = ("lm_head",),
                        select: Callable[[ParamPath, object], bool] | None = None,
                        scale_dtype=None) -> dict[ParamPath, object]:
    """RTN-quantize the linear kernels of a flat `{path: array}` dict.

    `skip`: path components whose kernels stay in float (default: the LM head, as in QDLM).
    `select(path, value)`: optional extra predicate. A group size that does not divide a
    kernel's input width raises ValueError naming the kernel.
    """
    out = {}
    for path, value in params.items():
        if (is_linear_kernel(path, value) and not _skipped(path, skip)
                and (select is None or select(path, value))):
            try:
                out[path] = _quantize_kernel(value, spec, scale_dtype)
            except ValueError as e:
                raise ValueError(f"{'.'.join(map(str, path))}: {e}") from None
        else:
            out[path] = value
    return out


def _quantize_kernel(kernel, spec: QuantSpec, scale_dtype) -> QuantizedArray:
    return QuantizedArray.quantize(kernel, spec, orientation="in_out", scale_dtype=scale_dtype)
