"""``affmae.ops._tickets``: the cached zeroed counter buffers of "last program reduces" kernels.

CPU (no kernel launch): one buffer per device, reused, grown to a power of two with the outgrown
one kept alive. GPU (``@pytest.mark.gpu``): per-stream buffers, CUDA-graph capture with and
without a warmed buffer (replays with new inputs against eager), two streams at once. Each test
starts from an empty cache (``fresh``), so streams that earlier tests used do not count.
"""

from __future__ import annotations

import pytest
import torch

from affmae.ops import _tickets


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(_tickets, "_BUFFERS", {})
    monkeypatch.setattr(_tickets, "_OUTGROWN", [])
    monkeypatch.setattr(_tickets, "_MOST", {})
    monkeypatch.setattr(_tickets, "fresh_in_capture", 0)


def test_cpu_buffer_is_reused_and_grown(fresh):
    cpu = torch.device("cpu")
    a = _tickets.counters(cpu, 5)
    assert a.dtype == torch.int32 and a.numel() == _tickets.MIN_SLOTS and not a.any()
    assert _tickets.counters(cpu, _tickets.MIN_SLOTS) is a
    assert _tickets.cached("cpu") is a
    b = _tickets.counters(cpu, _tickets.MIN_SLOTS + 1)
    assert b.numel() == 2 * _tickets.MIN_SLOTS and not b.any()
    assert _tickets.cached("cpu") is b and _tickets.counters(cpu, 3) is b
    assert any(t is a for t in _tickets._OUTGROWN), "the outgrown buffer was dropped"
    assert _tickets.warm("cpu") is b  # big enough for the most any call asked


def test_cpu_warm_takes_the_most_asked_for(fresh):
    _tickets.counters(torch.device("cpu"), 3000)
    _tickets._BUFFERS.clear()
    assert _tickets.warm("cpu").numel() == 4096


# ------------------------------------------------------------------------------------------------
# GPU tests
# ------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _three_ops(inputs):
    """The three kernels that end with a last-program reduction: colsum (6 column blocks of 86
    splits), a layer-norm backward (1024 programs: 32 groups, two levels) and a merge-weights
    backward (about 6.5k programs: 32 groups of 205)."""
    from affmae.ops._merge_weights_kernel import merge_weights_bwd
    from affmae.ops.layer_norm import kernel as ln
    from affmae.ops.linear.kernel import colsum

    g, (dy, x, w, mean, rstd), merge_args = inputs
    return [colsum(g), *ln.backward(dy, x, w, mean, rstd), *merge_weights_bwd(*merge_args)]


def _inputs(seed: int):
    from affmae.ops.layer_norm import kernel as ln

    torch.manual_seed(seed)
    dev = "cuda"
    g = torch.randn(32768, 384, device=dev).bfloat16()
    x, dy, w = torch.randn(32768, 384, device=dev), torch.randn(32768, 384, device=dev), \
        torch.randn(384, device=dev)
    _, mean, rstd = ln.forward(x, w, torch.zeros_like(w), 1e-5, torch.float32)
    B, Np, k, K = 16, 2048, 819, 64
    pos = torch.rand(B, Np, 2, device=dev) * 30
    slots = torch.randint(0, Np, (B, k, K), device=dev)
    pos_k = torch.gather(pos, 1, slots[:, :, :1].expand(-1, -1, 2))
    merge = (torch.randn(B, k, K, 4, device=dev), pos, pos_k, slots,
             torch.rand(B, k, K, device=dev), torch.randn(4, 5, device=dev),
             torch.randn(4, device=dev), torch.randn(4, device=dev), torch.randn(4, device=dev),
             1e-5)
    return g, (dy, x, w, mean, rstd), merge


def _copy_into(static, new) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, (tuple, list)):
        for s, n in zip(static, new):
            _copy_into(s, n)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("warmed", [True, False], ids=["warmed", "memset_per_call"])
def test_gpu_graph_replays_match_eager(fresh, warmed):
    """Capture the three kernels, replay 3 times with new inputs: bitwise eager's results (same
    kernels, same configurations), counters back to zero. Warmed: the capture uses the capture
    stream's cached buffer; not warmed: a zeroed buffer per call, recorded in the graph, and
    nothing cached for the capture stream."""
    static = _inputs(0)
    stream, side = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (stream, side):
        s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile off the capture stream
        _three_ops(static)
    if warmed:
        _tickets.warm("cuda", stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outs = _three_ops(static)
    assert _tickets.fresh_in_capture == (0 if warmed else 3), _tickets.fresh_in_capture
    assert (_tickets.cached("cuda", stream) is not None) == warmed
    for seed in (1, 2, 3):
        _copy_into(static, _inputs(seed))
        graph.replay()
        torch.cuda.synchronize()
        want = _three_ops(static)
        for i, (got, w) in enumerate(zip(outs, want)):
            assert torch.equal(got, w), f"replay {seed}: output {i} differs from eager"
    for key, buf in _tickets._BUFFERS.items():
        assert not buf.any(), f"counters of {key} not back to zero"


@pytest.mark.gpu
@gpu
def test_gpu_two_streams_at_once(fresh):
    """Column sums launched alternately on two streams (overlapping on the GPU) use two buffers
    and give eager's results, 20 times each."""
    from affmae.ops.linear.kernel import colsum

    ga = torch.randn(32768, 384, device="cuda").bfloat16()
    gb = torch.randn(13184, 1536, device="cuda").bfloat16()
    want = [colsum(ga), colsum(gb)]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    assert s1.cuda_stream != s2.cuda_stream
    for s in (s1, s2):
        s.wait_stream(torch.cuda.current_stream())
    outs = [[], []]
    for _ in range(20):
        with torch.cuda.stream(s1):
            outs[0].append(colsum(ga))
        with torch.cuda.stream(s2):
            outs[1].append(colsum(gb))
    torch.cuda.synchronize()
    b1, b2 = _tickets.cached("cuda", s1), _tickets.cached("cuda", s2)
    assert b1 is not None and b2 is not None and b1.data_ptr() != b2.data_ptr()
    for j in range(2):
        differ = sum(not torch.equal(o, want[j]) for o in outs[j])
        assert differ == 0, f"stream {j + 1}: {differ} of 20 column sums differ from eager"
    assert not b1.any() and not b2.any(), "counters not back to zero"


@pytest.mark.gpu
@gpu
def test_gpu_warm_refuses_during_capture_and_capture_never_caches(fresh):
    """A capture gets a buffer of its own and caches nothing; ``warm`` refuses inside capture;
    ``warm_capture_stream`` warms torch.cuda.graph's default capture stream."""
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        buf = _tickets.counters(torch.device("cuda", torch.cuda.current_device()), 4)
        with pytest.raises(RuntimeError, match="before CUDA-graph capture"):
            _tickets.warm("cuda", stream)
    assert buf.numel() == 4 and _tickets.cached("cuda", stream) is None
    _tickets.warm_capture_stream()  # what the package's captures call first
    assert _tickets.graph_capture_stream() is torch.cuda.graph.default_capture_stream
    assert _tickets.cached("cuda", torch.cuda.graph.default_capture_stream) is not None
