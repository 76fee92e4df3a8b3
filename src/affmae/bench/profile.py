"""Where the time of one training step goes, grouped by the package's ``record_function`` labels.

The models label their parts ("aff/attention", "aff/cluster", "aff/merge", "decoder",
"vit/attention", ...) and the bench labels "step/forward", "step/backward", "step/optimizer".
``torch.profiler`` records one step; every event's *self* time (device time on a GPU, CPU time
on a CPU) is attributed to exactly one label, so the rows add up to the profiled total:

1. Forward: an op's time goes to its innermost enclosing label.
2. Backward: autograd runs ``evaluate_function: XBackward`` nodes outside any model label; each
   node carries the ``sequence_nr`` of the forward op that created it, so its time goes to that
   forward op's label (reported in the "bwd" column). Nodes without a forward op (gradient
   accumulation) stay with "step/backward".
3. What no label encloses is reported as "(unlabelled)".

On a GPU a kernel's time belongs to the CPU op that launched it (``self_device_time_total``).
The profiler also lists every kernel as a device-side event; those are not added again (an
earlier version did, and its totals were twice the kernel time). Only device time that no CPU
op accounts for (total of the device events minus what the CPU ops claim, when above 1%) is
reported, as its own row.

Labels inside ``torch.compile``d regions may be fused away, so profile the eager model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from affmae.bench.step import Trainer

_BACKWARD_NODE = "autograd::engine::evaluate_function: "
UNLABELLED = "(unlabelled)"
UNCORRELATED = "(device work without a CPU op)"


@dataclass
class ProfileRow:
    """Time attributed to one label."""

    label: str
    fwd_ms: float  # self time of ops run under this label (forward, optimiser, ...)
    bwd_ms: float  # backward of ops whose forward ran under this label
    calls: int  # how many times the label's range was entered
    ops: dict[str, float] | None = None  # op name -> ms (forward and backward), largest first

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms


def _self_us(evt, on_device: bool) -> float:
    if on_device:
        return float(getattr(evt, "self_device_time_total", 0.0) or 0.0)
    return float(evt.self_cpu_time_total)


def attribute(events, on_device: bool) -> list[ProfileRow]:
    """Attribute the self time of profiler ``events`` (``prof.events()``) to labels."""
    # 1. Forward ops: sequence_nr -> innermost label (the last op recorded with that number
    #    creates the autograd node carrying it).
    seq_label: dict[int, str] = {}
    for evt in events:
        on_cpu = evt.device_type == DeviceType.CPU
        if evt.sequence_nr >= 0 and on_cpu and not evt.is_user_annotation:
            lab = _forward_label(evt)
            if lab is not None:
                seq_label[evt.sequence_nr] = lab

    fwd: dict[str, float] = {}
    bwd: dict[str, float] = {}
    calls: dict[str, int] = {}
    ops: dict[str, dict[str, float]] = {}
    device_total = 0.0  # every device-side event (kernels, copies), launched by a CPU op or not
    for evt in events:
        if evt.device_type != DeviceType.CPU:
            # Device-side events: kernels are already in their launching CPU op's device time;
            # a GPU copy of a label's range would count it twice. What is left has no CPU op.
            if not evt.is_user_annotation:
                device_total += _self_us(evt, on_device)
            continue
        if evt.is_user_annotation:
            calls[evt.name] = calls.get(evt.name, 0) + 1
        t = _self_us(evt, on_device)
        if t == 0.0:
            continue
        # 2. Walk up to the nearest backward node or label.
        node = evt
        target, is_bwd = UNLABELLED, False
        while node is not None:
            if node.name.startswith(_BACKWARD_NODE) and node.sequence_nr in seq_label:
                target, is_bwd = seq_label[node.sequence_nr], True
                break
            if node.is_user_annotation:
                target = node.name
                break
            node = node.cpu_parent
        acc = bwd if is_bwd else fwd
        acc[target] = acc.get(target, 0.0) + t
        by = ops.setdefault(target, {})
        by[evt.name] = by.get(evt.name, 0.0) + t
    if on_device:
        # Device time no CPU op accounts for (the profiler lists kernels both under their
        # launching op and as device events; only the difference is work without a CPU op).
        rest = device_total - sum(fwd.values()) - sum(bwd.values())
        if rest > 0.01 * device_total:
            fwd[UNCORRELATED] = rest
    labels = sorted(set(fwd) | set(bwd), key=lambda k: -(fwd.get(k, 0.0) + bwd.get(k, 0.0)))
    return [ProfileRow(k, fwd.get(k, 0.0) / 1000.0, bwd.get(k, 0.0) / 1000.0, calls.get(k, 0),
                       {n: t / 1000.0 for n, t in sorted(ops.get(k, {}).items(),
                                                          key=lambda kv: -kv[1])})
            for k in labels]


def _forward_label(evt) -> str | None:
    """Innermost label enclosing a forward op; None for ops run by autograd's backward."""
    node = evt
    while node is not None:
        if node.name.startswith(_BACKWARD_NODE):
            return None
        if node is not evt and node.is_user_annotation:
            return node.name
        node = node.cpu_parent
    return None


def profile_step(trainer: Trainer, warmup: int = 3) -> tuple[list[ProfileRow], float]:
    """Profile one training step after ``warmup`` steps.

    Returns the rows and the step's wall time in ms (host clock around the synchronised step).
    """
    import time

    cuda = trainer.imgs.is_cuda
    for _ in range(warmup):
        trainer.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        trainer.step()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1000.0
    return attribute(prof.events(), on_device=cuda), wall_ms


def format_profile(rows: list[ProfileRow], wall_ms: float, on_device: bool,
                   top_ops: int = 0) -> str:
    """A text table: label, calls, forward / backward / total ms, share of the profiled total;
    with ``top_ops`` > 0, each label's largest ops (by self time) under it."""
    total = sum(r.total_ms for r in rows) or 1.0
    clock = "GPU kernel time" if on_device else "CPU time"
    lines = [f"{clock} by label (sum {total:.2f} ms; step wall time {wall_ms:.2f} ms)",
             f"{'label':<32} {'calls':>6} {'fwd ms':>10} {'bwd ms':>10} {'total ms':>10} {'%':>6}"]
    for r in rows:
        lines.append(f"{r.label:<32} {r.calls:>6} {r.fwd_ms:>10.2f} {r.bwd_ms:>10.2f} "
                     f"{r.total_ms:>10.2f} {100.0 * r.total_ms / total:>6.1f}")
        for name, ms in list((r.ops or {}).items())[:top_ops]:
            lines.append(f"    {name[:60]:<60} {ms:>10.2f}")
    return "\n".join(lines)
