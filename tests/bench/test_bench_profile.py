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
