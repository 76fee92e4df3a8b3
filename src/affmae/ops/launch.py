"""Launch a Triton kernel with less host time: ``launch(kernel, grid, *args, **constexprs)``.

``kernel[grid](*args, **kw)`` spends most of its host time (about 90 us per launch on an H200
host with Triton 3.6, measured in session 4) finding the compiled kernel: it binds the
arguments, specialises every one of them (type, divisibility by 16, equality to 1) and hashes
the result with the compile options. The package's ops launch small kernels, several per layer,
so in eager mode that Python, not the GPU, set their time.

``launch`` computes a cheaper key that separates at least every case Triton's specialisation
separates, and keeps the ``CompiledKernel`` that Triton's own path returned for it:

- a tensor: its dtype and whether its address is a multiple of 16;
- an int: whether it equals 1, whether it is a multiple of 16, and its range (int32, uint64 or
  int64), the three things Triton's specialisation looks at (for ``do_not_specialize``
  arguments Triton looks at the range alone; the finer key only adds a cache entry);
- a bool, a float or None: its type;
- the constexprs and options (``num_warps``...) by value.

A key seen before launches the kept kernel through ``CompiledKernel[grid](*args)``, with every
argument in the kernel's signature order (declared constexprs included, which the launcher
ignores, as Triton's own ``run`` passes them since Triton 3.3). A new key, an argument of
another type, Triton's interpreter, or ``AFFMAE_FAST_LAUNCH=0`` take Triton's own path, which
compiles, caches and launches as always. If the kept kernel's launcher refuses the arguments
(a ``TypeError``: an other Triton's launcher convention), that kernel falls back to Triton's
path for good, with a warning; nothing is launched twice.

Not done on the fast path (Triton's path does them): Triton's check that global values a kernel
read at compile time are unchanged (the package's kernels read none), and pre-run hooks
(autotuners; the package has none). Launch enter / exit hooks (profilers) are still called.
"""

from __future__ import annotations

import os
import warnings

import torch

from affmae.ops.dispatch import interpreting

FAST_LAUNCH_ENV = "AFFMAE_FAST_LAUNCH"
_INT32 = (-(2**31), 2**31)

_cache: dict = {}  # key -> (compiled kernel, constexpr names in signature order) or None (refused)
stats = {"fast": 0, "triton": 0}  # launches by each path (tests check the fast one is taken)


def enabled() -> bool:
    """Whether the fast path may be taken (``AFFMAE_FAST_LAUNCH`` unset or not '0')."""
    return os.environ.get(FAST_LAUNCH_ENV, "1") != "0" and not interpreting()


def arg_key(a):
    """The part of the cache key for one runtime argument, or raise TypeError for a type Triton
    specialises in ways this key does not follow."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    t = type(a)
    if t is int:
        rng = 0 if _INT32[0] <= a < _INT32[1] else (1 if 2**63 <= a < 2**64 else 2)
        return a == 1, a % 16 == 0, rng
    if t is float or t is bool or a is None:
        return t
    raise TypeError(f"no fast-launch key for an argument of type {t.__name__}")


def _fast_candidate(args) -> bool:
    # Triton's own path for CPU tensors (the interpreter) and argument-less kernels.
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_cuda


def _device() -> int:
    return torch.cuda.current_device()  # as Triton: its caches are per current device


def clear() -> None:
    """Forget every kept kernel (tests; Triton's own cache is untouched)."""
    _cache.clear()


def launch(kernel, grid: tuple, *args, **kw) -> None:
    """``kernel[grid](*args, **kw)``, with the host-side lookup cached (module docstring).

    ``grid``: a tuple of one to three ints. ``args``: the kernel's runtime arguments,
    positional, in signature order; ``kw``: its constexprs by name and launch options
    (``num_warps``, ``num_stages``).
    """
    if not enabled() or not _fast_candidate(args):
        stats["triton"] += 1
        kernel[grid](*args, **kw)
        return
    try:
        key = (kernel, _device(), tuple(map(arg_key, args)), tuple(kw.items()))
    except TypeError:
        key = None
    entry = _cache.get(key) if key is not None else None
    if entry is not None:
        compiled, names = entry
        try:
            compiled[(*grid, 1, 1)[:3]](*args, *(kw[n] for n in names))
        except TypeError as e:  # this Triton's launcher takes other arguments: use Triton's path
            warnings.warn(f"affmae: fast launch of {kernel.__name__} refused ({e}); using Triton's "
                          "launch path for it", RuntimeWarning, stacklevel=2)
            _cache[key] = None
            stats["triton"] += 1
            kernel[grid](*args, **kw)
            return
        stats["fast"] += 1
        return
    stats["triton"] += 1
    compiled = kernel[grid](*args, **kw)
    if key is not None and key not in _cache and compiled is not None:
        names = kernel.arg_names[len(args):]
        if all(n in kw for n in names):  # constexprs left to their defaults: not cached
            _cache[key] = (compiled, names)
