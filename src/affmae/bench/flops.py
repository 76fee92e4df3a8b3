"""Forward FLOPs with ``torch.utils.flop_counter.FlopCounterMode``, custom ops included (DESIGN 6).

Units: FLOPs count a multiply and an add separately (a matmul of (m, k) by (k, n) is 2*m*k*n
FLOPs), as ``FlopCounterMode`` does. MACs = FLOPs / 2. The AFFMAE paper's Table 1 "FLOPs (G)"
matches MACs (fvcore convention): ViT-S/8 MAE at 512 px is about 135 GMACs; both are reported.

What is counted: every op with a registered FLOP formula (matmuls, convolutions, attention, and
the package's ``torch.library`` custom ops, which register their own formulas). Elementwise ops,
softmax, normalisation and gathers count zero, as in every FLOP counter.

Two blind spots of the stock counter are closed here:
* CPU ``scaled_dot_product_attention`` (``aten._scaled_dot_product_flash_attention_for_cpu`` and
  its backward) has no formula in torch and would count zero; it gets the standard SDPA formula.
* Ops that look compute-heavy (any non-aten op, or an aten op named like a matmul, convolution or
  attention) but have no formula are reported in ``FlopCount.uncounted`` instead of silently
  counting zero.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

# Namespaces of bookkeeping ops that never compute (profiler ranges, shape queries).
_NO_COMPUTE_NAMESPACES = {"aten", "prim", "prims", "profiler"}
_HEAVY_ATEN = re.compile(r"(mm|matmul|conv|attention|einsum|linear)")


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


@dataclass
class FlopCount:
    """Result of ``count_flops``."""

    flops: int  # total FLOPs (multiply and add counted separately)
    by_op: dict[str, int] = field(default_factory=dict)  # FLOPs per op name, largest first
    uncounted: list[str] = field(default_factory=list)  # compute-heavy ops without a formula

    @property
    def macs(self) -> float:
        return self.flops / 2


class _OpRecorder(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher (innermost mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[Any] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


# The package's own custom ops that count zero by the convention above (normalisation,
# selection by comparison, table lookups, element-wise softmax weights), like their aten
# counterparts (native_layer_norm, sort, topk, gather, softmax): not reported as uncounted.
_ZERO_BY_CONVENTION = {("affmae", "layer_norm_fwd"), ("affmae", "layer_norm_bwd"),
                       ("affmae", "add_layer_norm_fwd"), ("affmae", "add_layer_norm_bwd"),
                       ("affmae", "smallest_k"), ("affmae", "nearest_k"),
                       ("affmae", "cell_table"),
                       ("affmae", "cell_lookup"),
                       ("affmae", "interp_weights_fwd"), ("affmae", "interp_weights_bwd"),
                       ("affmae", "deform_weights_fwd"), ("affmae", "deform_weights_bwd")}


def _looks_heavy(op: Any) -> bool:
    ns = getattr(op, "namespace", "aten")
    name = getattr(op, "__name__", str(op))
    packet = getattr(getattr(op, "_overloadpacket", None), "__name__", name)
    if (ns, packet) in _ZERO_BY_CONVENTION:
        return False
    if ns not in _NO_COMPUTE_NAMESPACES:
        return True
    return ns == "aten" and bool(_HEAVY_ATEN.search(name))


# Modules that register FLOP formulas for the package's custom ops. ``FlopCounterMode`` copies
# the registry when it is created, and the ops' modules are imported lazily (on the first Triton
# call), so they are imported here first; otherwise the first count of a process missed them.
_FORMULA_MODULES = ("affmae.ops.cluster_attention.function", "affmae.ops.point_gather.function",
                    "affmae.ops._merge_weights_kernel")


def register_custom_formulas() -> None:
    """Import the modules that register the custom ops' FLOP formulas (no-op without Triton)."""
    import importlib

    for name in _FORMULA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # no Triton: the ops cannot run either
            pass


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """Run ``fn()`` under a FLOP counter and return the count (fn's own grad mode applies)."""
    register_custom_formulas()
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    recorder = _OpRecorder()
    with counter, recorder:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    uncounted = sorted(
        str(op) for op in recorder.ops
        if _looks_heavy(op) and op._overloadpacket not in counter.flop_registry
    )
    return FlopCount(flops=int(counter.get_total_flops()), by_op=by_op, uncounted=uncounted)


def count_model_flops(model: torch.nn.Module, imgs: torch.Tensor,
                      is_masked: torch.Tensor) -> FlopCount:
    """Forward FLOPs of ``model(imgs, is_masked)`` (loss included), without autograd.

    The model's mode is kept: in training mode a CrossMAE-style decoder counts the subset of
    masked patches a training step reconstructs.
    """
    with torch.no_grad():
        return count_flops(lambda: model(imgs, is_masked))
