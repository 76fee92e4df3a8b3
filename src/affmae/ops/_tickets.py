"""Ticket counters for kernels whose last program reduces the others' partials.

A "last program reduces" kernel (``_last_reduces_kernel``) gives each reduction group an int32
counter slot: every program of the group takes a ticket (an atomic add), the one that draws the
last ticket sums the group's partials and puts the slot back to 0. So a slot is zero at every
kernel start and at every kernel end, and one buffer serves every such kernel launched on one
stream, call after call and CUDA-graph replay after replay, with no memset per call.

``counters(device, slots)`` hands out that buffer:
- CUDA: one buffer per (device, CUDA stream), keyed on the raw stream handle
  (``current_stream(device).cuda_stream``). Kernels on one stream run one after another, so
  they may share; kernels on two streams may overlap, so the streams never share a buffer.
- A call that needs more slots than the cached buffer has gets a new zeroed buffer (rounded up
  to a power of two >= ``MIN_SLOTS``). The outgrown buffer is kept alive, never freed: a graph
  captured earlier may still use it.
- During CUDA-graph capture nothing is cached or grown: an allocation inside capture comes from
  the graph's private pool. With no big-enough buffer for the capturing stream, each call gets a
  fresh ``torch.zeros`` (recorded in the graph as a memset, so correct on every replay, at one
  small memset node per kernel). ``warm(device, stream)`` creates the buffer beforehand.
  ``torch.cuda.make_graphed_callables``, ``triton.testing.do_bench_cudagraph`` and the usual
  recipe warm up on a side stream and capture on ``torch.cuda.graph``'s default capture stream,
  a different one; so the package's captures (``GraphedLoss``, the bench's graphed step and
  ``time_op``) call ``warm_capture_stream()`` first.
- CPU (Triton's interpreter): one buffer per device.

A captured kernel keeps the buffer of the stream it was captured on, whatever stream the graph
is replayed on. That is safe as long as no two users of one buffer run at the same time: not
two graphs captured on one stream replayed concurrently on two streams, nor a replay
concurrent with eager kernels on the capture stream. (The package replays its graphs one after
another on the training stream, and runs nothing eager on the capture stream.)
"""

from __future__ import annotations

import torch

MIN_SLOTS = 256  # 1 KiB: a column sum of N columns takes N / 64 slots, the others at most 33

_BUFFERS: dict[tuple[torch.device, int | None], torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # never freed: a captured graph may still write them
_MOST: dict[torch.device, int] = {}  # the most slots a call has asked for, per device
fresh_in_capture = 0  # calls that got a per-call zeroed buffer during capture (tests, diagnosis)


def _device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _key(device: torch.device, stream=None) -> tuple[torch.device, int | None]:
    if device.type != "cuda":
        return device, None
    stream = torch.cuda.current_stream(device) if stream is None else stream
    return device, stream.cuda_stream


def _new(device: torch.device, slots: int) -> torch.Tensor:
    size = max(MIN_SLOTS, 1 << (slots - 1).bit_length())
    return torch.zeros(size, dtype=torch.int32, device=device)


def counters(device: torch.device, slots: int) -> torch.Tensor:
    """An int32 buffer of at least ``slots`` zeros for a kernel about to be launched on
    ``device``'s current stream, which must leave them zero (see the module docstring)."""
    if slots > _MOST.get(device, 0):
        _MOST[device] = slots
    key = _key(device)
    buf = _BUFFERS.get(key)
    if buf is not None and buf.numel() >= slots:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        global fresh_in_capture
        fresh_in_capture += 1
        return torch.zeros(slots, dtype=torch.int32, device=device)  # a memset in the graph
    if buf is not None:
        _OUTGROWN.append(buf)
    buf = _BUFFERS[key] = _new(device, slots)  # allocated and zeroed on the key's stream
    return buf


def warm(device: torch.device | str | None = None, stream: torch.cuda.Stream | None = None,
         slots: int = 0) -> torch.Tensor:
    """Create (or grow) the buffer of ``stream`` (default: the current one) on ``device``
    (default: the current CUDA device) outside capture, so that kernels captured on that stream
    use it; at least ``slots``, ``MIN_SLOTS`` and as many as any call so far has asked for."""
    device = _device(device)
    if device.type == "cuda" and stream is not None and stream.device != device:
        raise ValueError(f"stream {stream} is not on {device}")
    slots = max(slots, _MOST.get(device, 0), 1)
    if device.type != "cuda":
        return counters(device, slots)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("warm the ticket counters before CUDA-graph capture, not during it")
    stream = torch.cuda.current_stream(device) if stream is None else stream
    with torch.cuda.stream(stream):  # the buffer's allocation stream is the one it serves
        return counters(device, slots)


def graph_capture_stream() -> torch.cuda.Stream | None:
    """The stream ``torch.cuda.graph`` captures on when given none (as in
    ``make_graphed_callables``); None where this torch has no such class attribute."""
    graph = torch.cuda.graph
    if getattr(graph, "default_capture_stream", None) is None:
        graph(torch.cuda.CUDAGraph())  # its constructor creates the class's capture stream
    return getattr(graph, "default_capture_stream", None)


def warm_capture_stream(device: torch.device | str | None = None) -> None:
    """``warm`` the buffer of ``graph_capture_stream()``, if that stream is on ``device``."""
    device = _device(device)
    stream = graph_capture_stream()
    if stream is not None and stream.device == device:
        warm(device, stream)


def cached(device: torch.device | str, stream: torch.cuda.Stream | None = None
           ) -> torch.Tensor | None:
    """The cached buffer of ``stream`` (default: the current one) on ``device``, if any (tests)."""
    return _BUFFERS.get(_key(_device(device), stream))
