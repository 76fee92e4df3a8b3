"""The decoder's interpolation weights: the recomputing autograd Function (PyTorch ops on CPU,
Triton kernels on CUDA and in the interpreter) against the plain autograd form
(``interpolation_weights_reference``)."""

import textwrap

import pytest
import torch
from kernel_checks import interpret

from affmae.ops.interpolate import interpolation_weights, interpolation_weights_reference


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Nq, H, Pt, K, Nk = 2, 5, 3, 4, 4, 9
    points = (torch.rand(B, Nq, H, Pt, 2, generator=g, dtype=dtype) * 6).requires_grad_()
    sel = torch.randint(0, Nk, (B, Nq, H, Pt, K), generator=g)
    key_pos = torch.rand(B, Nk, 2, generator=g, dtype=dtype) * 6
    temperature = (torch.rand(H, generator=g, dtype=dtype) + 0.5).requires_grad_()
    return points, sel, key_pos, temperature


def test_gradients_are_exact_in_float64():
    points, sel, key_pos, temperature = _inputs(torch.float64)
    attn = torch.softmax(torch.randn(points.shape[:-1], dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, t: interpolation_weights(p, sel, key_pos, t), (points, temperature))
    assert torch.autograd.gradcheck(
        lambda p, t, a: interpolation_weights(p, sel, key_pos, t, a), (points, temperature, attn))


def test_same_values_and_gradients_as_the_plain_form_in_float32():
    points, sel, key_pos, temperature = _inputs(torch.float32, seed=1)
    w = interpolation_weights(points, sel, key_pos, temperature)
    ref = interpolation_weights_reference(points, sel, key_pos, temperature)
    assert torch.equal(w, ref), (w - ref).abs().max()
    g = torch.randn_like(w)
    got = torch.autograd.grad(w, (points, temperature), g)
    want = torch.autograd.grad(ref, (points, temperature), g)
    for a, b, name in zip(got, want, ("points", "temperature")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"d/d{name} differs")


def test_keeps_no_distance_tensors_for_the_backward():
    """Only its inputs and its output are saved: no (.., K) distances or (.., K, 2) offsets."""
    points, sel, key_pos, temperature = _inputs(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        w = interpolation_weights(points, sel, key_pos, temperature)
    kept = {t.untyped_storage().data_ptr() for t in saved}
    allowed = {t.untyped_storage().data_ptr() for t in (points, sel, key_pos, temperature, w)}
    assert kept <= allowed, [tuple(t.shape) for t in saved]


# The Triton kernels against float64 (the three-way rule of tests/ops/kernel_checks.py): the
# kernel's error may be at most 3x the float32 PyTorch form's error plus a small floor.
_CASES = textwrap.dedent("""
    import torch
    from kernel_checks import error_rows, three_way_failures
    from affmae.ops.interpolate import interpolation_weights, interpolation_weights_reference

    def cases(device, full=False):
        g = torch.Generator().manual_seed(0)
        shapes = [(16, 3072, 6, 4, 4, 2048)] if full else [
            (2, 37, 3, 4, 4, 217),   # rows not a multiple of the tile
            (1, 5, 2, 3, 3, 9),      # K and Pt not powers of two
            (3, 4, 1, 1, 16, 40)]    # one point of 16 slots
        for B, Nq, H, Pt, K, Nk in shapes:
            key_pos = torch.rand(B, Nk, 2, generator=g, dtype=torch.float64) * 20
            sel = torch.randint(0, Nk, (B, Nq, H, Pt, K), generator=g)
            near = torch.gather(key_pos, 1, sel[..., 0].reshape(B, -1, 1).expand(-1, -1, 2))
            points = near.view(B, Nq, H, Pt, 2) + torch.randn(B, Nq, H, Pt, 2, generator=g,
                                                             dtype=torch.float64)
            points[0, 0, 0, 0] = key_pos[0, sel[0, 0, 0, 0, 0]]  # a point on a key: d = 1e-3
            temp = torch.rand(H, generator=g, dtype=torch.float64) * 3 + 0.2
            attn = torch.softmax(torch.randn(B, Nq, H, Pt, generator=g, dtype=torch.float64), -1)
            gw = torch.randn(B, Nq, H, Pt, K, generator=g, dtype=torch.float64)
            yield [t.to(device) for t in (points, sel, key_pos, temp, attn, gw)]

    def run(fn, points, sel, key_pos, temp, attn, gw, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (points, temp, attn)]
        w = fn(leaves[0], sel, key_pos.to(dtype), leaves[1], leaves[2])
        return [w.detach()] + list(torch.autograd.grad(w, leaves, gw.to(dtype)))

    def errors(device, full=False):
        bad = []
        for case in cases(device, full):
            exact = run(interpolation_weights_reference, *case, torch.float64)
            same = run(interpolation_weights_reference, *case, torch.float32)
            kern = run(lambda *a: interpolation_weights(*a, backend="triton"), *case,
                       torch.float32)
            rows = error_rows(("w", "d_points", "d_temperature", "d_attn"), exact, same, kern)
            bad += three_way_failures(rows, str(tuple(case[1].shape)))
        return bad
""")


def test_interpreter_kernels_match_the_reference():
    out = interpret(_CASES + "\nprint(errors('cpu') or 'ok')\n")
    assert out == "ok", out[-3000:]


def test_backend_choice():
    points, sel, key_pos, temperature = _inputs(torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        interpolation_weights(points, sel, key_pos, temperature, backend="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not CUDA"):
            interpolation_weights(points, sel, key_pos, temperature, backend="triton")
    w = interpolation_weights(points, sel, key_pos, temperature, backend="torch")
    torch.testing.assert_close(w, interpolation_weights_reference(points, sel, key_pos, temperature))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_match_the_reference():
    scope: dict = {}
    exec(_CASES, scope)
    assert scope["errors"]("cuda") == []
    assert scope["errors"]("cuda", full=True) == []  # the decoder at 512 px, batch 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiles_without_graph_breaks():
    """The kernels are custom ops with fake implementations: torch.compile(fullgraph=True)
    traces through them and computes the eager values and gradients."""
    scope: dict = {}
    exec(_CASES, scope)
    points, sel, key_pos, temp, attn, gw = next(scope["cases"]("cuda"))

    def fn(p, s, k, t, a):
        return interpolation_weights(p, s, k, t, a)

    eager = scope["run"](fn, points, sel, key_pos, temp, attn, gw, torch.float32)
    compiled = scope["run"](torch.compile(fn, fullgraph=True), points, sel, key_pos, temp, attn,
                            gw, torch.float32)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
