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


def grad_three_way(names, exact, same, test, label: str, same_again=None) -> None:
    """names: parameter names; exact / same / test: their gradients from the float32 run, the
    established low-precision path and the path under test. ``same_again``: optionally a second
    run of the established path on the same inputs. Where that path is not deterministic
    (float32 atomics), its error against float32 is one draw of a noise; the two runs'
    difference measures that noise, and the bound uses the larger of the two."""
    assert len(names) == len(exact) == len(same) == len(test), (len(names), len(exact), len(same), len(test))
    again = same_again if same_again is not None else [None] * len(names)
    for name, e, s, t, s2 in zip(names, exact, same, test, again):
        assert torch.isfinite(t).all(), f"{label} {name}: NaN/Inf in the gradient"
        e, s, t = e.double(), s.double(), t.double()
        err_t, err_s = (t - e).norm().item(), (s - e).norm().item()
        spread = 0.0 if s2 is None else (s2.double() - s).norm().item()
        bound = FACTOR * max(err_s, spread) + FLOOR * e.norm().item()
        assert err_t <= bound, (
            f"{label} {name}: error {err_t:.3e} against float32 > {FACTOR} x max(the reference "
            f"path's {err_s:.3e}, its run-to-run spread {spread:.3e}) + floor "
            f"{FLOOR * e.norm().item():.3e} (|grad| {e.norm().item():.3e})"
        )
