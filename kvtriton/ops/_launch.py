"""Launching one Triton kernel many times with most of its arguments fixed (``KernelLauncher``).

``kernel[grid](*args)`` goes through Triton's ``JITFunction.run`` on every call: it binds the arguments,
computes their specialisation (types, 16-byte alignment of pointers, integers equal to 1 or divisible by
16), looks the compiled kernel up, and launches it. For a kernel of ~35 arguments that is 10-20 us of
host time, more than the kernel itself at decode sizes. A launcher keeps the positional argument list
(every kernel parameter, constexprs included, in order) and changes only the per-call ``slots``; the
first call for each specialisation key goes through ``kernel[grid]`` and keeps the compiled kernel it
returns, later calls with the same key launch that compiled kernel directly, as ``JITFunction.run``
itself does after its lookup (Triton >= 3.3: ``CompiledKernel.run(grid, stream, function,
packed_metadata, launch_metadata, enter_hook, exit_hook, *all_args)``).

The key is the current device plus, for each slot value, its exact value for an int and its address
modulo 16 for a tensor: at least as fine as Triton's own specialisation of those arguments (the other
arguments never change for a launcher), so a reused compiled kernel is the one ``kernel[grid]`` would
have picked. The direct path is used only on CUDA, with Triton >= 3.3, no launch hooks installed
(profilers such as proton set them; those calls take the JIT path), and not when
``KVTRITON_FAST_LAUNCH=0``.
"""

from __future__ import annotations

import os

import torch

from ._backend import HAS_TRITON, INTERPRET

__all__ = ["KernelLauncher", "fast_launch_enabled"]

_FAST = False
_knobs = None
_driver = None
if HAS_TRITON and not INTERPRET:
    try:
        import triton
        from triton.runtime import driver as _driver

        _ver = tuple(int(p) for p in triton.__version__.split(".")[:2])
        _knobs = getattr(triton, "knobs", None)
        _FAST = _ver >= (3, 3) and _knobs is not None and hasattr(_knobs, "runtime")
    except Exception:  # pragma: no cover - an unexpected triton layout: always the JIT path
        _FAST = False


def fast_launch_enabled() -> bool:
    """Whether launchers may launch compiled kernels directly (see the module docstring)."""
    return _FAST and os.environ.get("KVTRITON_FAST_LAUNCH", "1") != "0"


def _spec(v):
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() & 15
    return v


_LAYOUTS: dict = {}     # (kernel, parameter names given, slots) -> (parameter names, slot positions)


class KernelLauncher:
    """One Triton kernel, its grid, its compile options and its full positional argument list; a call
    sets the arguments named in ``slots`` and launches.

    Args:
        kernel: the ``@triton.jit`` function.
        grid: up to three ints.
        args: ``{parameter name: value}`` for every parameter of ``kernel`` (slot values may be None).
        slots: names of the parameters each call passes, in call order.
        options: launch options (``num_warps``, ``num_stages``).
    """

    __slots__ = ("kernel", "grid", "_args", "_idx", "_options", "_compiled")

    def __init__(self, kernel, grid, args: dict, slots: tuple[str, ...], options: dict):
        key = (kernel, tuple(args), slots)
        layout = _LAYOUTS.get(key)
        if layout is None:                      # checked once per call site (the functional ops build one a call)
            names = list(kernel.arg_names)
            missing = set(names) - set(args)
            extra = set(args) - set(names)
            if missing or extra:
                raise TypeError(f"{names} vs {sorted(args)}: missing {sorted(missing)}, unknown {sorted(extra)}")
            layout = _LAYOUTS[key] = (names, tuple(names.index(s) for s in slots))
        names, self._idx = layout
        self.kernel = kernel
        g = tuple(int(x) for x in grid)
        self.grid = g + (1,) * (3 - len(g))
        self._args = [args[n] for n in names]
        self._options = dict(options)
        self._compiled = {}

    def __call__(self, *values):
        a = self._args
        for i, v in zip(self._idx, values):
            a[i] = v
        if fast_launch_enabled():
            dev = _driver.active.get_current_device()
            key = (dev, *map(_spec, values))
            ck = self._compiled.get(key)
            rt = _knobs.runtime
            if ck is not None and rt.launch_enter_hook is None and rt.launch_exit_hook is None:
                stream = _driver.active.get_current_stream(dev)
                g = self.grid
                ck.run(g[0], g[1], g[2], stream, ck.function, ck.packed_metadata, None, None, None, *a)
                return
            ck = self.kernel[self.grid](*a, **self._options)
            if ck is not None and getattr(ck, "function", None) is not None and not hasattr(ck, "result"):
                self._compiled[key] = ck
            return
        self.kernel[self.grid](*a, **self._options)
