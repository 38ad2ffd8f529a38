"""Small helpers shared by the Triton kernels of this package.

Kernels are written as plain Python functions and wrapped on first use by
:func:`kernel`, which picks the compiled ``triton.jit`` path for CUDA tensors and the
Triton interpreter (``triton.runtime.interpreter.InterpretedFunction``) for CPU tensors or
when ``TRITON_INTERPRET=1``. Doing this per device instead of at import time makes the
result independent of import order: a test that imports this package before it sets
``TRITON_INTERPRET=1`` still runs the kernels in the interpreter on CPU tensors.

Triton is imported lazily: importing :mod:`lava_sglang.kernels` never imports it.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

_CACHE: dict[tuple[Callable, bool], object] = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton ships with torch's CUDA wheels
        return False
    return True


def interpret_for(device: torch.device) -> bool:
    """True when a kernel on ``device`` must run in the Triton interpreter."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel(fn: Callable, device: torch.device):
    """The launchable Triton kernel for the plain Python kernel body ``fn`` on ``device``."""
    interpret = interpret_for(device)
    key = (fn, interpret)
    k = _CACHE.get(key)
    if k is None:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            k = InterpretedFunction(fn)
        else:
            import triton

            k = triton.jit(fn)
        _CACHE[key] = k
    return k


def next_pow2(x: int) -> int:
    x = int(x)
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
