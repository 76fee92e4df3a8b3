"""The decoder's interpolation weights: the recomputing autograd Function against the plain
autograd form (``interpolation_weights_reference``)."""

import torch

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
    assert torch.autograd.gradcheck(
        lambda p, t: interpolation_weights(p, sel, key_pos, t), (points, temperature))


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
