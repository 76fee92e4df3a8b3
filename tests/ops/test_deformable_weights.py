"""The decoder's fused sampling weights (``deformable_weights``: points, cell lookup, point softmax
and interpolation weights in one Triton kernel each way) against its specification
``deformable_weights_reference`` (the separate ops, the CPU path)."""

import textwrap

import pytest
import torch
from kernel_checks import interpret

from affmae.ops.interpolate import deformable_weights, deformable_weights_reference

# Kernel vs float64 by the three-way rule (tests/ops/kernel_checks.py). The slots are integers and
# must equal the float32 reference's exactly; the float64 and float32 references then use those
# slots (a float64 point could round to another cell at a cell boundary).
_CASES = textwrap.dedent("""
    import torch
    from kernel_checks import error_rows, three_way_failures
    from affmae.ops.interpolate import (deformable_weights, deformable_weights_reference,
                                        interpolation_weights_reference)

    def cases(device, full=False):
        g = torch.Generator().manual_seed(0)
        shapes = [(16, 2048, 6, 4, 4, 1040, 64, 64, 384, torch.bfloat16)] if full else [
            (2, 37, 3, 4, 4, 50, 8, 8, 5, torch.bfloat16),    # groups not a multiple of the tile
            (1, 5, 2, 3, 3, 9, 4, 5, 0, torch.float32),       # Pt and K not powers of two
            (3, 4, 1, 1, 16, 40, 6, 6, 7, torch.float16),     # one point of 16 slots
            (2, 9, 6, 4, 4, 30, 6, 6, 0, torch.float32)]      # spacing below 1
        for B, Nq, H, Pt, K, Nk, gh, gw, lead, dt in shapes:
            table = torch.randint(0, Nk, (B, gh * gw, K), generator=g, dtype=torch.int32)
            qpos = torch.rand(B, Nq, 2, generator=g) * torch.tensor([gw, gh]) - 0.5
            key_pos = torch.rand(B, Nk, 2, generator=g) * torch.tensor([gw, gh])
            key_pos[:, -1] = 1e4  # a padding slot, FAR away
            # offlog as the decoder passes it: a column slice of a wider projection
            proj = torch.randn(B, Nq, lead + H * Pt * 3, generator=g) * 1.5
            offlog = proj.to(dt)[..., lead:]
            log_temp = torch.randn(H, generator=g) * 0.5
            spacing = 1.7 if H != 6 else 0.6
            gw_ = torch.randn(B, Nq, H, Pt, K, generator=g)
            yield [t.to(device) for t in (offlog, qpos, log_temp, key_pos, table, gw_)] + [
                (gh, gw), spacing, H, Pt]

    def spec(offlog, qpos, log_temp, key_pos, sel, spacing, H, Pt, dtype):
        # the reference's arithmetic at one precision, with given slots
        B, Nq, _ = offlog.shape
        off, logits = offlog.split([H * Pt * 2, H * Pt], dim=-1)
        pts = qpos.to(dtype)[:, :, None, None, :] + off.reshape(B, Nq, H, Pt, 2).to(dtype) * spacing
        attn = torch.softmax(logits.reshape(B, Nq, H, Pt).to(dtype), dim=-1)
        return interpolation_weights_reference(pts / spacing, sel, key_pos.to(dtype) / spacing,
                                               log_temp.exp(), attn)

    def run(offlog, qpos, log_temp, key_pos, table, gw, grid_hw, spacing, H, Pt, how, sel=None):
        ol = offlog.detach().clone().requires_grad_()
        lt = log_temp.detach().clone().requires_grad_()
        if how == "kernel":
            sel, w = deformable_weights(ol, qpos, lt, key_pos, table, grid_hw, spacing, H, Pt,
                                        backend="triton")
        elif how == "reference":
            sel, w = deformable_weights_reference(ol, qpos, lt, key_pos, table, grid_hw, spacing,
                                                  H, Pt)
        else:  # float64 with the given slots
            ol64 = ol.double()
            lt64 = lt.double()
            w = spec(ol64, qpos, lt64, key_pos, sel, spacing, H, Pt, torch.float64)
            grads = torch.autograd.grad(w, (ol64, lt64), gw.double())
            return sel, [w.detach(), *grads]
        grads = torch.autograd.grad(w, (ol, lt), gw.to(w.dtype))
        return sel, [w.detach(), *grads]

    def errors(device, full=False):
        bad = []
        for case in cases(device, full):
            label = str(tuple(case[0].shape) + (case[0].dtype,))
            sel_k, kern = run(*case, "kernel")
            sel_r, same = run(*case, "reference")
            if not torch.equal(sel_k, sel_r):
                bad.append(f"{label}: slots differ from the reference's")
            _, exact = run(*case, "exact", sel=sel_r)
            rows = error_rows(("w", "d_offlog", "d_log_temp"), exact, same, kern)
            bad += three_way_failures(rows, label)
        return bad
""")


def test_interpreter_kernels_match_the_reference():
    out = interpret(_CASES + "\nprint(errors('cpu') or 'ok')\n")
    assert out == "ok", out[-3000:]


def test_interpreter_offsets_rounding_to_cell_edges_and_nan_points():
    """Points exactly half a cell off (rounded half to even, as torch.round) take the reference's
    slots; a NaN coordinate (a diverged step) counts as 0, as in the lookup kernel, rather than
    reading outside the table (the PyTorch reference would raise)."""
    out = interpret(textwrap.dedent("""
        import torch
        from affmae.ops.interpolate import deformable_weights, deformable_weights_reference
        B, Nq, H, Pt, K, gh, gw = 1, 3, 1, 4, 2, 4, 4
        table = torch.arange(gh * gw * K, dtype=torch.int64).view(1, gh * gw, K) % 7
        qpos = torch.tensor([[[0.5, 0.5], [1.5, 2.5], [3.0, 3.0]]])
        off = torch.tensor([0.0, 0.0, 1.0, 1.0, -1.0, 0.0, 2.0, -2.0] * Nq).view(1, Nq, 8)
        offlog = torch.cat([off, torch.zeros(1, Nq, 4)], -1)
        key_pos = torch.rand(1, 7, 2) * 4
        args = (offlog, qpos, torch.zeros(1), key_pos, table, (gh, gw), 1.0, H, Pt)
        s1, _ = deformable_weights(*args, backend="triton")
        s2, _ = deformable_weights_reference(*args)
        offlog[0, 2, 0] = float("nan")  # query 2, point 0: x is NaN
        s3, _ = deformable_weights(*args, backend="triton")
        nan_ok = (torch.equal(s3[0, 2, 0, 0], table[0, 3 * gw + 0])  # x -> 0, y = 3
                  and torch.equal(s3[0, :2], s1[0, :2]))
        print("ok" if torch.equal(s1, s2) and nan_ok else f"{s1.flatten().tolist()} != "
              f"{s2.flatten().tolist()} or NaN point {s3[0, 2, 0, 0].tolist()}")
    """))
    assert out == "ok", out


def test_cpu_auto_is_the_reference_bitwise():
    """On CPU (no interpreter) "auto" runs the separate ops: the same values and gradients."""
    scope: dict = {}
    exec(_CASES, scope)
    offlog, qpos, lt, key_pos, table, gw, grid_hw, spacing, H, Pt = next(scope["cases"]("cpu"))
    outs = []
    for fn in (deformable_weights, deformable_weights_reference):
        ol = offlog.detach().clone().requires_grad_()
        ltg = lt.detach().clone().requires_grad_()
        sel, w = fn(ol, qpos, ltg, key_pos, table, grid_hw, spacing, H, Pt)
        outs.append([sel, w, *torch.autograd.grad(w, (ol, ltg), gw)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_backend_choice():
    scope: dict = {}
    exec(_CASES, scope)
    args = next(scope["cases"]("cpu"))
    call = args[:5] + args[6:]
    with pytest.raises(ValueError, match="backend must be"):
        deformable_weights(*call, backend="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not CUDA"):
            deformable_weights(*call, backend="triton")


def test_gradcheck_of_the_reference_in_float64():
    """The specification's gradients (which the kernel tests compare against) are exact."""
    scope: dict = {}
    exec(_CASES, scope)
    offlog, qpos, lt, key_pos, table, gw, grid_hw, spacing, H, Pt = next(scope["cases"]("cpu"))
    sel, _ = deformable_weights_reference(offlog.float(), qpos, lt, key_pos, table, grid_hw,
                                          spacing, H, Pt)
    ol = offlog.double().detach().requires_grad_()
    ltg = lt.double().detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda o, t: scope["spec"](o, qpos, t, key_pos, sel, spacing, H, Pt, torch.float64),
        (ol, ltg))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_match_the_reference():
    scope: dict = {}
    exec(_CASES, scope)
    assert scope["errors"]("cuda") == []
    assert scope["errors"]("cuda", full=True) == []  # a decoder attention at 512 px, batch 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiles_without_graph_breaks():
    """Custom ops with fake implementations: torch.compile(fullgraph=True) traces through them
    and gives the eager values and gradients."""
    scope: dict = {}
    exec(_CASES, scope)
    offlog, qpos, lt, key_pos, table, gw, grid_hw, spacing, H, Pt = next(scope["cases"]("cuda"))

    def fn(ol, t):
        return deformable_weights(ol, qpos, t, key_pos, table, grid_hw, spacing, H, Pt)[1]

    res = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        ol = offlog.detach().clone().requires_grad_()
        t = lt.detach().clone().requires_grad_()
        w = f(ol, t)
        res.append([w, *torch.autograd.grad(w, (ol, t), gw)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_aff_small_step_same_with_separate_ops(monkeypatch):
    """A whole aff_small training step (float32) with the fused kernels and with the separate
    PyTorch ops in the decoder: the same loss and gradients up to float32 rounding."""
    import functools

    import affmae.layers.decoder as decoder
    from affmae import create_model
    from affmae.ops.masking import make_mask

    B, res = 2, 256
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(B, 1, res, res, generator=g).cuda()
    is_masked = make_mask(B, (res // 8, res // 8), 0.5, "uniform", generator=g)
    model = create_model("aff_small", drop_path=0.0).cuda().train()
    results = []
    for backend in ("auto", "torch"):
        monkeypatch.setattr(decoder, "deformable_weights",
                            functools.partial(deformable_weights, backend=backend))
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(imgs, is_masked.cuda())["loss"]
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                  if p.grad is not None])))
    (l1, g1), (l2, g2) = results
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    assert ((l1 - l2).abs() / l2.abs()).item() <= 1e-5, (l1.item(), l2.item())
    assert ((g1 - g2).norm() / g2.norm()).item() <= 1e-3
