"""LayerNorm whose output comes out in the autocast dtype: one kernel, no float32 copy.

Under autocast PyTorch runs ``layer_norm`` in float32 and returns float32; the Linear after it
then casts that output to bf16 / fp16, in a separate kernel, forward and backward. In an
aff_small step at 512 px (H200) LayerNorm forward, backward and those casts took about 10 of the
37 ms of GPU time (docs/BENCHMARKS.md, "Fewer, larger kernels"). ``FusedLayerNorm`` computes the
same statistics in float32 and writes its output directly in the autocast dtype (the dtype the
next Linear would cast to, so the Linear sees the same numbers); its backward writes dx in the
input's dtype and reduces the weight and bias gradients per 64-row block.

Use it only where the output feeds a Linear (or anything that casts to the autocast dtype
anyway). A norm whose output starts a float32 residual stream (or is a stage's output) takes
``autocast_out=False``: the output then has ``nn.LayerNorm``'s dtype (float32 under autocast,
the input's otherwise), still one kernel each way (``nn.LayerNorm``'s weight-gradient kernel
took 100 us per call at 96 features, 32k rows).

Backends: "torch" (``nn.LayerNorm``, the reference and the CPU path), "triton" (CUDA, or CPU under
TRITON_INTERPRET=1), "auto" (the default: Triton on CUDA tensors, else torch; torch also while
``torch.compile`` traces, since Inductor fuses the norm with its neighbours and the cast itself).
The models' ``norm_backend`` config field picks one, for AFF and ViT alike. Measured on an H200
(docs/BENCHMARKS.md, "Fused LayerNorm"): aff_small 39.6 -> 35.9 ms and vit_small 56.4 -> 47.8 ms
per CUDA-graph training step at 512 px, batch 16.
"""

from __future__ import annotations

import torch
from torch import nn

from affmae.ops.dispatch import package_kernels, triton_device

BACKENDS = ("auto", "triton", "torch")


def _triton_ok(x: torch.Tensor, n: int) -> bool:
    if not triton_device(x):
        return False
    try:
        from affmae.ops.layer_norm import kernel
    except ImportError:
        return False
    return n <= kernel.MAX_N and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict) with an output in the autocast dtype
    on the Triton backend; see the module docstring."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, backend: str = "auto",
                 autocast_out: bool = True) -> None:
        super().__init__(normalized_shape, eps=eps)
        if backend not in BACKENDS:
            raise ValueError(f"norm backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.autocast_out = autocast_out  # False: nn.LayerNorm's output dtype (see module)

    def _triton(self, x: torch.Tensor) -> bool:
        """Whether this call takes the Triton kernels (raises if backend "triton" cannot)."""
        n = self.normalized_shape[0]
        if self.backend == "torch" or (
                self.backend == "auto" and (not x.is_cuda or torch.compiler.is_compiling()
                                            or not package_kernels())):
            return False
        if not _triton_ok(x, n):
            if self.backend == "triton":
                raise RuntimeError(f"norm backend 'triton' cannot run on {x.device} {x.dtype} "
                                   f"rows of {n} features")
            return False
        return True

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        if not torch.is_autocast_enabled(dev):
            return x.dtype
        return torch.get_autocast_dtype(dev) if self.autocast_out else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._triton(x):
            return super().forward(x)
        from affmae.ops.layer_norm.function import layer_norm_triton

        out_dtype = self._out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return layer_norm_triton(x, self.weight, self.bias, self.eps, out_dtype)

    def residual(self, x: torch.Tensor, branch: torch.Tensor, drop_path: nn.Module | None = None,
                 factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A residual step and this norm: ``s = x + drop_path(branch)``, returns ``(s, norm(s))``.
        ``factors``: the drop path's per-sample factors when the caller drew them
        (``DropPath.factors``' ``given``).

        On the Triton backend one kernel each way: the add, the drop-path factor and the norm
        forward; the norm backward plus the gradient s gets from the residual stream, written
        as x's and (times the factor) the branch's gradients. That removes an add, a cast, a
        gradient sum and, with drop path, two multiplies per residual step. The PyTorch path is
        the plain code (``DropPath.residual_add``: the factor applied in the residual stream's
        precision, as the kernel applies it in float32); the two differ only in rounding.
        """
        if (not self._triton(x) or branch.shape != x.shape or x.dim() < 2
                or not _triton_ok(branch, self.normalized_shape[0])
                or (drop_path is not None and not hasattr(drop_path, "factors"))):
            if drop_path is None:
                s = x + branch
            elif hasattr(drop_path, "residual_add"):
                s = drop_path.residual_add(x, branch, factors)
            else:
                s = x + drop_path(branch)
            return s, self(s)
        from affmae.ops.layer_norm.function import add_layer_norm_triton

        scale = drop_path.factors(branch, factors) if drop_path is not None else None
        out_dtype = self._out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return add_layer_norm_triton(x, branch, scale, self.weight, self.bias, self.eps,
                                         out_dtype)

    def extra_repr(self) -> str:
        out = "" if self.autocast_out else ", autocast_out=False"
        return f"{super().extra_repr()}, backend={self.backend}{out}"
