"""Whole-model gradient checks, the three-way rule of STYLE.md applied per parameter.

A low-precision run of a new code path (a kernel, a captured graph) is compared with a float32
run of the same model and inputs; its error must stay within FACTOR x the error of the
established low-precision path, plus a floor relative to the float32 gradient. Parameters whose
gradient is a near-cancellation (e.g. a scalar score bias with |grad| ~ 1e-5 while its terms are
~1e-2) get the tolerance their own rounding deserves instead of a fixed relative bound that
bf16 and float32 atomics cannot meet.
"""

from __future__ import annotations

import torch

FACTOR = 3.0
FLOOR = 1e-3  # relative to the parameter's float32 gradient norm


def grad_three_way(names, exact, same, test, label: str, same_again=None, floors=None) -> None:
    """names: parameter names; exact / same / test: their gradients from the float32 run, the
    established low-precision path and the path under test. ``same_again``: optionally more
    runs of the established path on the same inputs (one gradient list, or a list of them).
    Where that path is not deterministic (float32 atomics), its error against float32 is one
    draw of a noise; the runs' differences measure that noise, and the bound uses the largest.
    For a scalar (a merge's score bias), a single draw is a poor measure: the ratio of two
    half-normal draws exceeds 3 one time in five, so a test of such gradients takes several.
    ``floors``: optional absolute error floors per parameter name, for gradients that are
    near-cancelling sums: ``bf16_sum_floor`` of their terms (a rounding bound that the
    result's own size does not give)."""
    assert len(names) == len(exact) == len(same) == len(test), (len(names), len(exact), len(same), len(test))
    if same_again is None:
        again = [[] for _ in names]
    else:
        runs = same_again if isinstance(same_again[0], (list, tuple)) else [same_again]
        again = [list(per) for per in zip(*runs)]  # per parameter, its gradient in each rerun
    for name, e, s, t, s2 in zip(names, exact, same, test, again):
        assert torch.isfinite(t).all(), f"{label} {name}: NaN/Inf in the gradient"
        e, s, t = e.double(), s.double(), t.double()
        err_t, err_s = (t - e).norm().item(), (s - e).norm().item()
        spread = max([(r.double() - s).norm().item() for r in s2], default=0.0)
        bound = FACTOR * max(err_s, spread) + FLOOR * e.norm().item() + (floors or {}).get(name, 0.0)
        assert err_t <= bound, (
            f"{label} {name}: error {err_t:.3e} against float32 > {FACTOR} x max(the reference "
            f"path's {err_s:.3e}, its run-to-run spread {spread:.3e}) + floor "
            f"{FLOOR * e.norm().item():.3e} (|grad| {e.norm().item():.3e})"
        )


BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def bf16_sum_floor(terms: torch.Tensor) -> float:
    """Rounding bound of a sum of bf16-computed terms: u * sum |term|. A gradient such as a
    merge's score bias (the sum over tokens of d loss / d score) can nearly cancel (|grad| 2e-5
    from terms summing to 1e-3 in absolute value): its error is set by the terms, not by the
    result, and two correct bf16 paths can differ by this much on it."""
    return BF16_UNIT * terms.double().abs().sum().item()
