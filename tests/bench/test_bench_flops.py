"""FLOP counting: exact analytic counts for linear + attention, custom ops counted or flagged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from affmae.bench.flops import count_flops


class ToyAttention(nn.Module):
    """qkv Linear -> scaled_dot_product_attention -> proj Linear -> MLP Linear."""

    def __init__(self, C: int, H: int) -> None:
        super().__init__()
        self.H = H
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.fc = nn.Linear(C, 2 * C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, D)
        y = self.proj(y.transpose(1, 2).reshape(B, N, C))
        return self.fc(y)


def _analytic(B: int, N: int, C: int) -> int:
    linear = 2 * B * N * C * (3 * C) + 2 * B * N * C * C + 2 * B * N * C * (2 * C)
    attention = 2 * (2 * B * N * N * C)  # q @ k^T and p @ v, each 2 * B * H * N * N * D
    return linear + attention


def test_linear_attention_flops_exact():
    B, N, C, H = 2, 37, 48, 4  # N not a power of two
    model = ToyAttention(C, H)
    x = torch.randn(B, N, C)
    with torch.no_grad():
        fc = count_flops(lambda: model(x))
    assert fc.flops == _analytic(B, N, C), (
        f"counted {fc.flops} FLOPs, analytic {_analytic(B, N, C)}; by op {fc.by_op}")
    assert fc.macs == fc.flops / 2
    assert fc.uncounted == [], f"unexpected uncounted ops {fc.uncounted}"
    # with autograd on, the forward count is the same
    fc_grad = count_flops(lambda: model(x))
    assert fc_grad.flops == fc.flops


def test_attention_backward_counted_on_cpu():
    B, N, C, H = 1, 16, 32, 2
    model = ToyAttention(C, H)
    x = torch.randn(B, N, C, requires_grad=True)
    fwd = count_flops(lambda: model(x)).flops
    both = count_flops(lambda: model(x).sum().backward()).flops
    attn_bwd = [k for k in count_flops(lambda: model(x).sum().backward()).by_op
                if "attention" in k and "backward" in k]
    assert attn_bwd, "CPU SDPA backward has no FLOP formula"
    assert both > 2 * fwd, f"forward+backward {both} should exceed twice the forward {fwd}"


# A custom op with a registered formula, and one without.
@torch.library.custom_op("affmae_test::scaled_mm", mutates_args=())
def _scaled_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 2.0 * (a @ b)


@torch.library.custom_op("affmae_test::opaque_mm", mutates_args=())
def _opaque_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


@torch.utils.flop_counter.register_flop_formula(torch.ops.affmae_test.scaled_mm)
def _scaled_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def test_custom_ops_counted_or_reported():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    fc = count_flops(lambda: torch.ops.affmae_test.scaled_mm(a, b))
    assert fc.flops == 2 * 5 * 7 * 3, f"custom op counted {fc.flops}, by op {fc.by_op}"
    assert fc.uncounted == []
    fc = count_flops(lambda: torch.ops.affmae_test.opaque_mm(a, b))
    assert any("opaque_mm" in op for op in fc.uncounted), (
        f"a custom op without a formula must be reported, got {fc.uncounted}")


def test_selection_and_norm_ops_count_zero_by_convention():
    """The package's selection (smallest_k, cell_table), LayerNorm and interpolation-weight
    ops count zero, as aten's sort, topk, native_layer_norm and softmax do, and are not reported
    as uncounted; only they are exempt."""
    from affmae.bench.flops import _ZERO_BY_CONVENTION, _looks_heavy
    from affmae.ops import (_cell_table_kernel, _interp_weights_kernel,  # noqa: F401 (register ops)
                            _smallest_k_kernel)
    from affmae.ops.layer_norm import function  # noqa: F401

    ops = torch.ops.affmae
    for op in (ops.smallest_k.default, ops.cell_table.default, ops.layer_norm_fwd.default,
               ops.layer_norm_bwd.default, ops.add_layer_norm_fwd.default,
               ops.add_layer_norm_bwd.default, ops.interp_weights_fwd.default,
               ops.interp_weights_bwd.default):
        assert not _looks_heavy(op), op
    assert _looks_heavy(torch.ops.affmae_test.opaque_mm.default)
    assert {ns for ns, _ in _ZERO_BY_CONVENTION} == {"affmae"}


def test_package_ops_counted_in_a_fresh_process():
    """The package's own custom ops register their formulas on import, which is lazy; the first
    count of a process (what ``affmae bench`` does first) once missed them all."""
    import subprocess
    import sys

    code = """
import torch
from affmae.bench.flops import count_flops
def run():
    import affmae.ops.point_gather.function  # first import happens inside the count
    t = torch.randn(2, 5, 3, 16)
    sel = torch.randint(0, 5, (2, 4, 3, 1, 6))
    w = torch.rand(2, 4, 3, 1, 6)
    torch.ops.affmae.point_gather_fwd(t.to("meta"), sel.to("meta"), w.to("meta"))
fc = count_flops(run)
print(fc.flops, fc.uncounted)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flops, _, uncounted = out.stdout.strip().partition(" ")
    assert int(flops) == 2 * (2 * 4 * 3 * 1 * 6) * 16, out.stdout  # 2 * rows * K * F
    assert uncounted == "[]", out.stdout


def test_interpreter_aff_model_has_no_uncounted_custom_ops(monkeypatch):
    """On the kernel path (Triton's interpreter runs what CUDA runs), every custom op of an AFF
    model either has a FLOP formula or counts zero by convention (lookups, softmax weights,
    normalisation): the bench prints no "ops without a FLOP formula" warning."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "ops"))
    from kernel_checks import interpret

    out = interpret("\n".join([
        "import os",
        "os.environ['AFFMAE_POINT_GATHER_BACKEND'] = 'triton'  # 'auto' is the reference on CPU",
        "import torch",
        "from affmae import create_model",
        "from affmae.bench.flops import count_model_flops",
        "from affmae.ops.masking import make_mask",
        "torch.manual_seed(0)",
        "m = create_model('aff_tiny', attention_backend='triton').eval()",
        "mask = make_mask(1, (8, 8), 0.5, 'perlin', generator=torch.Generator().manual_seed(0))",
        "fc = count_model_flops(m, torch.randn(1, 1, 64, 64), mask)",
        "ops = ' '.join(fc.by_op)",
        "print(fc.uncounted, 'cluster_attention' in ops and 'point_gather' in ops)",
    ]), timeout=600)
    assert out == "[] True", out
