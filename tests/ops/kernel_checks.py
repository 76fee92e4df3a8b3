"""Shared checks for Triton kernels against their PyTorch references (STYLE.md "three ways").

A kernel's error against a float64 reference must stay within FACTOR x the error of the
same-precision PyTorch reference, plus a small floor relative to the largest exact value.
Interpreter cases (TRITON_INTERPRET=1 must be set before triton is first imported) run in one
subprocess per test file: the file's ``--worker PATH`` entry point writes a JSON of results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

FACTOR = 3.0  # kernel error <= FACTOR * same-precision reference error + floor
FLOOR = 1e-5  # relative to max |float64 value|
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def error_rows(names, exact, same, kern) -> dict[str, tuple[float, float, float, bool]]:
    """Per output/gradient: (kernel error, same-precision reference error, max |float64|, finite)."""
    rows = {}
    for name, e, s, k in zip(names, exact, same, kern):
        assert k.dtype == s.dtype, f"{name}: kernel dtype {k.dtype} != reference dtype {s.dtype}"
        assert k.shape == s.shape, f"{name}: kernel shape {tuple(k.shape)} != {tuple(s.shape)}"
        rows[name] = (
            (k.double() - e).abs().max().item(),
            (s.double() - e).abs().max().item(),
            e.abs().max().item(),
            bool(torch.isfinite(k).all()),
        )
    return rows


def three_way_failures(rows, label: str) -> list[str]:
    """One message per output/gradient of ``error_rows`` that breaks the three-way rule."""
    bad = []
    for name, (err_k, err_ref, scale, finite) in rows.items():
        bound = FACTOR * err_ref + FLOOR * scale
        if not finite:
            bad.append(f"{label} {name}: kernel produced NaN/Inf")
        elif err_k > bound:
            bad.append(f"{label} {name}: kernel error {err_k:.3e} > {FACTOR} x reference error "
                       f"{err_ref:.3e} + floor {FLOOR * scale:.3e} (max |value| {scale:.3e})")
    return bad


def assert_three_way(rows, label: str) -> None:
    bad = three_way_failures(rows, label)
    assert not bad, "\n".join(bad)


def interpret(code: str, timeout: int = 300) -> str:
    """Run a Python snippet under TRITON_INTERPRET=1 in a fresh process (Triton reads the
    variable when first imported) and return its stdout; the snippet can import this module."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def write_results(path: str, jobs: dict[str, Callable[[], Any]]) -> None:
    """Worker side: run every job, record its value or its traceback, write JSON."""
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = {"value": job()}
        except Exception:  # recorded so the matching test fails with the traceback
            results[name] = {"error": traceback.format_exc()}
    Path(path).write_text(json.dumps(results))


def run_interpreter(test_file: str, out_dir: Path, timeout: int) -> dict[str, Any]:
    """Test side: run ``python test_file --worker`` under TRITON_INTERPRET=1, read its JSON."""
    path = out_dir / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, "--worker", str(path)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text())


def result(results: dict[str, Any], name: str) -> Any:
    """The value of one job, failing the test with the worker's traceback if it raised."""
    res = results[name]
    assert "error" not in res, f"{name} raised:\n{res.get('error')}"
    return res["value"]
