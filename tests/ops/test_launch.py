"""``affmae.ops.launch``: the cached kernel launch.

CPU: the key separates every case Triton's own argument specialisation separates (checked
against Triton's specialiser itself); the cache's logic with stand-in kernels (a key seen
before launches the kept compiled kernel with the constexprs in signature order; a new
alignment, a value of 1 or a new dtype misses; a launcher that refuses the arguments falls back
to Triton's path for good, warning once; nothing is launched twice).
GPU: an aff_small float32 training step gives the same loss and gradients with the fast path on
and off (to the last bits that float32 atomics leave free), and a repeated step takes it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from affmae.ops import launch as L

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _triton_specialiser():
    """Triton's own per-argument specialisation (type, alignment / divisibility, == 1), or None
    when this Triton keeps it elsewhere."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        try:
            from triton.backends.compiler import BaseBackend
            from triton.runtime.jit import specialize_impl as native_specialize_impl
        except ImportError:
            return None

    def spec(arg, specialize=True):
        return tuple(native_specialize_impl(BaseBackend, arg, False, specialize, True))

    return spec


def _sample_args():
    x = torch.zeros(64, dtype=torch.bfloat16)
    return [
        x, x[1:], x[8:], x.float(), x.float()[4:], x.half(), torch.zeros(4, dtype=torch.int32),
        torch.zeros(4, dtype=torch.int64), 0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31,
        2**32, 2**63, 2**64 - 16, -(2**31), -(2**31) - 16, 0.5, 1.0, True, False, None,
    ]


def test_key_separates_what_triton_specialises():
    spec = _triton_specialiser()
    if spec is None:
        pytest.skip("this Triton has no specialiser this test knows how to call")
    args = _sample_args()
    for specialize in (True, False):  # False: a do_not_specialize argument
        for a, b in itertools.combinations(args, 2):
            if spec(a, specialize) != spec(b, specialize):
                assert L.arg_key(a) != L.arg_key(b), (
                    f"Triton specialises {a!r:.40} as {spec(a, specialize)} and {b!r:.40} as "
                    f"{spec(b, specialize)}, the launch key does not separate them")


def test_key_refuses_unknown_types():
    with pytest.raises(TypeError, match="no fast-launch key"):
        L.arg_key(torch.tensor(3).numpy())
    with pytest.raises(TypeError):
        L.arg_key("a string")


class _Compiled:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*args)``."""

    def __init__(self, log, refuse=False):
        self.log, self.refuse = log, refuse

    def __getitem__(self, grid):
        def runner(*args):
            if self.refuse:
                raise TypeError("function takes exactly 9 arguments (12 given)")
            self.log.append(("fast", grid, args))
        return runner


class _Kernel:
    """Stands in for a JITFunction with signature (X, n, A: constexpr, B: constexpr)."""

    __name__ = "_stand_in_kernel"
    arg_names = ["X", "n", "A", "B"]

    def __init__(self, refuse=False):
        self.log, self.refuse = [], refuse

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return _Compiled(self.log, self.refuse)
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv(L.FAST_LAUNCH_ENV, "1")
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(L, "_fast_candidate", lambda args: True)
    monkeypatch.setattr(L, "_device", lambda: 0)
    L.clear()
    yield
    L.clear()


def test_cached_launch_passes_constexprs_in_signature_order(fast):
    k = _Kernel()
    x = torch.zeros(64)
    L.launch(k, (3,), x, 40, B=7, A=5, num_warps=2)
    L.launch(k, (3,), x, 40, B=7, A=5, num_warps=2)
    L.launch(k, (2, 4), x, 56, B=7, A=5, num_warps=2)  # another grid and size, same key
    assert k.log[0] == ("triton", (3,), (x, 40), dict(B=7, A=5, num_warps=2))
    assert k.log[1][0] == "fast" and k.log[1][1] == (3, 1, 1) and k.log[1][2] == (x, 40, 5, 7)
    assert k.log[2][0] == "fast" and k.log[2][1] == (2, 4, 1) and k.log[2][2] == (x, 56, 5, 7)
    assert len(k.log) == 3, "one launch per call"


@pytest.mark.parametrize("other", [
    lambda x: (x[1:], 40),  # misaligned address
    lambda x: (x.double(), 40),  # dtype
    lambda x: (x, 1),  # == 1: Triton makes it a constant
    lambda x: (x, 41),  # not a multiple of 16
    lambda x: (x, 2**31),  # int64
])
def test_a_new_specialisation_misses(fast, other):
    k = _Kernel()
    x = torch.zeros(64)
    L.launch(k, (1,), x, 48, A=1, B=2)
    L.launch(k, (1,), *other(x), A=1, B=2)
    assert [e[0] for e in k.log] == ["triton", "triton"]


def test_other_constexprs_or_options_miss(fast):
    k = _Kernel()
    x = torch.zeros(64)
    L.launch(k, (1,), x, 48, A=1, B=2)
    L.launch(k, (1,), x, 48, A=1, B=3)
    L.launch(k, (1,), x, 48, A=1, B=2, num_warps=8)
    assert [e[0] for e in k.log] == ["triton"] * 3


def test_defaulted_constexprs_are_not_cached(fast):
    k = _Kernel()
    x = torch.zeros(64)
    for _ in range(2):
        L.launch(k, (1,), x, 48, A=1)  # B left to its default: only Triton knows it
    assert [e[0] for e in k.log] == ["triton", "triton"]


def test_refused_fast_launch_falls_back_for_good(fast):
    k = _Kernel(refuse=True)
    x = torch.zeros(64)
    L.launch(k, (1,), x, 48, A=1, B=2)
    with pytest.warns(RuntimeWarning, match="fast launch of _stand_in_kernel refused"):
        L.launch(k, (1,), x, 48, A=1, B=2)
    L.launch(k, (1,), x, 48, A=1, B=2)  # no second warning, no second try
    assert [e[0] for e in k.log] == ["triton"] * 3


def test_switched_off_or_interpreted_uses_triton(fast, monkeypatch):
    k = _Kernel()
    x = torch.zeros(64)
    monkeypatch.setenv(L.FAST_LAUNCH_ENV, "0")
    for _ in range(2):
        L.launch(k, (1,), x, 48, A=1, B=2)
    monkeypatch.setenv(L.FAST_LAUNCH_ENV, "1")
    monkeypatch.setattr(L, "interpreting", lambda: True)
    L.launch(k, (1,), x, 48, A=1, B=2)
    assert [e[0] for e in k.log] == ["triton"] * 3


@pytest.mark.gpu
@gpu
def test_gpu_fast_launch_computes_the_same_step(monkeypatch):
    from affmae import create_model

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    model = create_model("aff_small", drop_path=0.0).cuda().train()  # float32: no bf16 ties
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(4, 1, 256, 256, generator=g).cuda()
    n = (256 // 8) ** 2
    mask = torch.zeros(4, n, dtype=torch.bool)
    mask.scatter_(1, torch.rand(4, n, generator=g).argsort(1)[:, : n // 2], True)
    mask = mask.cuda()

    def step(flag):
        monkeypatch.setenv(L.FAST_LAUNCH_ENV, flag)
        before = dict(L.stats)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        loss = model(imgs, mask)["loss"]
        loss.backward()
        torch.cuda.synchronize()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        return loss.detach(), grads, {k: L.stats[k] - before[k] for k in before}

    L.clear()
    l_off, g_off, c_off = step("0")  # Triton's path (compiles)
    step("1")  # misses: Triton's path, and the kernels are kept
    l_on, g_on, c_on = step("1")  # the kept kernels
    assert c_off["fast"] == 0 and c_off["triton"] > 0
    total = c_on["fast"] + c_on["triton"]
    assert total == c_off["triton"], "the two steps launched different numbers of kernels"
    assert c_on["fast"] >= 0.9 * total, f"a repeated step took the fast path for {c_on} launches"
    # The float32 atomics of some backward kernels make reruns differ in the last bits; a launch
    # with a wrong argument would differ at O(1).
    assert torch.allclose(l_on, l_off, rtol=1e-6, atol=0), f"loss {l_on.item()} vs {l_off.item()}"
    rel = ((g_on - g_off).norm() / g_off.norm()).item()
    assert rel <= 1e-5, f"gradients differ by {rel:.2e} (relative norm)"
