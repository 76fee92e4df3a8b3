"""``affmae.ops._last_reduces_kernel``: a kernel's last program sums the programs' partial rows.

A test kernel stores given rows as its programs' partials and calls ``last_program_reduces``:
the sum must meet the three-way rule (tests/ops/kernel_checks.py) against float64, with
torch's float32 ``sum(0)`` as the same-precision reference, repeat bitwise and leave the ticket
counters at zero; for one group, several, a short last group, and more than ``most``^2 programs.
CPU: Triton's interpreter in one subprocess. It runs the programs one after another, so the
last ticket always goes to the last program of a group and the memory ordering goes untested:
the GPU tests of the kernels that use the helper (test_linear, test_layer_norm,
test_merge_weights, test_tickets) check those.
"""

from __future__ import annotations

import sys

import pytest
import torch
import triton
import triton.language as tl
from kernel_checks import assert_three_way, error_rows, result, run_interpreter, write_results

from affmae.ops._last_reduces_kernel import last_program_reduces, plan


@triton.jit
def _rows_kernel(SRC, PART, OUT, COUNT, R, GROUP, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # program p's partial is row p of SRC (progs, R); the group sums go after the partials
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    for c0 in range(0, R, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(SRC + pid * R + cols, mask=cols < R)
        tl.store(PART + pid * R + cols, v, mask=cols < R)
    last_program_reduces(PART, PART + progs * R, OUT, COUNT, pid, progs, GROUP, R, BLOCK_R,
                         BLOCK_C)


def reduce_rows(rows: torch.Tensor, group: int, block_r: int = 8, block_c: int = 16):
    """rows (progs, R) float32 -> (R,) float32 sum by the test kernel, in groups of ``group``."""
    from affmae.ops import _tickets

    progs, R = rows.shape
    groups = -(-progs // group)
    part = torch.empty(progs + groups * (groups > 1), R, device=rows.device)
    out = torch.empty(R, device=rows.device)
    count = _tickets.counters(rows.device, groups + (groups > 1))
    _rows_kernel[(progs,)](rows, part, out, count, R, group, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


# name -> (programs, programs per group or None for ``plan``'s, R): R not a multiple of the
# 16-column tile, groups not multiples of the 8-row load block
CASES = {
    "one_program": (1, 32, 5),
    "one_group": (3, 32, 70),
    "8_groups_last_short": (37, 5, 70),
    "4_groups_exact": (64, 16, 64),
    "plan_100": (100, None, 3),
    "plan_1100": (1100, None, 7),  # more than 32^2 programs: 32 groups of 35
}


def _case(progs, group, R) -> dict:
    from affmae.ops import _tickets

    gen = torch.Generator().manual_seed(progs + R)
    rows = torch.randn(progs, R, generator=gen) * 3 + 1
    group = group or plan(progs)[0]
    got = reduce_rows(rows, group)
    count = _tickets.cached("cpu")
    return {"rows": error_rows(("sum",), [rows.double().sum(0)], [rows.sum(0)], [got]),
            "repeats": torch.equal(got, reduce_rows(rows, group)),
            "counters_zero": not bool(count.any())}


def _worker(path: str) -> None:
    write_results(path, {name: (lambda spec=spec: _case(*spec)) for name, spec in CASES.items()})


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_interpreter(__file__, tmp_path_factory.mktemp("interp"), timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_last_program_sums_the_rows(interpreter_results, case):
    r = result(interpreter_results, case)
    assert_three_way(r["rows"], case)
    assert r["repeats"], f"{case}: two launches differ"
    assert r["counters_zero"], f"{case}: ticket counters not back to zero"


@pytest.mark.parametrize("progs,want", [(1, (32, 1, 1)), (32, (32, 1, 1)), (33, (32, 2, 3)),
                                        (1024, (32, 32, 33)), (1025, (33, 32, 33)),
                                        (6552, (205, 32, 33)), (2000, (63, 32, 33))])
def test_plan_groups_about_sqrt_programs(progs, want):
    group, groups, slots = plan(progs)
    assert (group, groups, slots) == want, (progs, group, groups, slots)
    assert (groups - 1) * group < progs <= groups * group  # no empty group


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
