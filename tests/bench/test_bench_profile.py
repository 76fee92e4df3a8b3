"""Profile attribution: forward and backward time land on the record_function label of the
forward op, and the rows add up to the profiled total."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from affmae.bench.profile import UNLABELLED, attribute, format_profile


class Labelled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with record_function("toy/a"):
            x = torch.tanh(self.a(x))
        with record_function("toy/b"):
            x = self.b(x).square()
        return x.mean()


def test_forward_and_backward_attributed_to_labels():
    model = Labelled()
    x = torch.randn(256, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("step/forward"):
            loss = model(x)
        with record_function("step/backward"):
            loss.backward()
    events = prof.events()
    rows = {r.label: r for r in attribute(events, on_device=False)}
    for lab in ("toy/a", "toy/b"):
        assert lab in rows, f"label {lab} missing: {sorted(rows)}"
        assert rows[lab].fwd_ms > 0 and rows[lab].bwd_ms > 0, rows[lab]
        assert rows[lab].calls == 1
    total = sum(r.total_ms for r in rows.values())
    self_sum = sum(e.self_cpu_time_total for e in events) / 1000.0
    assert abs(total - self_sum) < 1e-6 * max(1.0, self_sum), (total, self_sum)
    assert rows.get(UNLABELLED) is None or rows[UNLABELLED].total_ms < 0.5 * total
    text = format_profile(list(rows.values()), wall_ms=total, on_device=False)
    assert "toy/a" in text and "bwd ms" in text


def test_device_time_counted_once_and_the_rest_reported():
    """On a GPU the profiler lists a kernel under its launching CPU op (self device time) and
    again as a device-side event; only device time no CPU op claims gets its own row (an
    earlier version added every kernel twice)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from affmae.bench.profile import UNCORRELATED

    def ev(name, dev, t, parent=None, annotation=False):
        return SimpleNamespace(name=name, device_type=dev, self_device_time_total=t,
                               self_cpu_time_total=0.0, sequence_nr=-1, cpu_parent=parent,
                               is_user_annotation=annotation)

    label = ev("toy/a", DeviceType.CPU, 0.0, annotation=True)
    op = ev("aten::mm", DeviceType.CPU, 5000.0, parent=label)  # launches a 5 ms kernel
    events = [label, op,
              ev("gemm_kernel", DeviceType.CUDA, 5000.0),  # the same kernel, device side
              ev("triton_raw_kernel", DeviceType.CUDA, 3000.0)]  # launched without an aten op
    rows = {r.label: r for r in attribute(events, on_device=True)}
    assert rows["toy/a"].total_ms == 5.0 and rows["toy/a"].ops == {"aten::mm": 5.0}
    assert rows[UNCORRELATED].total_ms == 3.0
    assert sum(r.total_ms for r in rows.values()) == 8.0
    text = format_profile(list(rows.values()), wall_ms=8.0, on_device=True, top_ops=2)
    assert "aten::mm" in text and "GPU kernel time" in text
