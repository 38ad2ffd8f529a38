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


class _Interpreted:
    """An interpreted kernel that also runs when ``triton.language`` was imported without
    ``TRITON_INTERPRET=1``.

    In that case the standard-library helpers (``tl.max``, ``tl.sum``, ``tl.cdiv``...) are
    compiled-mode ``JITFunction`` objects that refuse to be called from Python. While one of
    our kernels runs in the interpreter, ``JITFunction.__call__`` is pointed at the
    interpreter's device-function call (what those helpers are when the variable is set
    before the import), and restored afterwards, as are the language patches each such call
    makes. Nothing changes when the variable was set (then Triton's own interpreter objects
    are used, and compiled kernels cannot run in that process anyway).
    """

    def __init__(self, fn: Callable):
        from triton.runtime.interpreter import InterpretedFunction

        self._fn = InterpretedFunction(fn)

    def __getitem__(self, grid):
        launch = self._fn[grid]

        def run(*args, **kwargs):
            from triton.runtime.interpreter import InterpretedFunction, _patch_lang
            from triton.runtime.jit import JITFunction

            if "__call__" in JITFunction.__dict__ and getattr(JITFunction.__call__, "_lava_patch", False):
                return launch(*args, **kwargs)  # already patched (nested)
            original = JITFunction.__dict__.get("__call__")
            cache: dict = {}

            def call(self, *a, **k):
                # what InterpretedFunction.__call__ does for a device function, except that
                # the language patches are undone afterwards (triton leaves them in place,
                # which would break later compiled kernels in the same process)
                f = cache.get(self.fn)
                if f is None:
                    f = cache[self.fn] = InterpretedFunction(self.fn).rewrite()
                scope = _patch_lang(self.fn)
                try:
                    return f(*a, **k)
                finally:
                    scope.restore()

            call._lava_patch = True
            JITFunction.__call__ = call
            try:
                return launch(*args, **kwargs)
            finally:
                JITFunction.__call__ = original

        return run


def kernel(fn: Callable, device: torch.device):
    """The launchable Triton kernel for the plain Python kernel body ``fn`` on ``device``:
    ``kernel(fn, device)[grid](*args, **constexprs)``."""
    interpret = interpret_for(device)
    key = (fn, interpret)
    k = _CACHE.get(key)
    if k is None:
        if interpret:
            k = _Interpreted(fn)
        else:
            import triton

            k = triton.jit(fn)
        _CACHE[key] = k
    return k


def dot_in_fp32(*dtypes: torch.dtype, device: torch.device) -> bool:
    """Whether a kernel should upcast its ``tl.dot`` operands to fp32 (exact ``ieee`` dot):
    for fp32 inputs, and for bf16 inputs in the interpreter, whose ``tl.dot`` mishandles
    bf16 (numpy has no bf16 type; checked with triton 3.8)."""
    if any(d == torch.float32 for d in dtypes):
        return True
    return interpret_for(device) and any(d == torch.bfloat16 for d in dtypes)


def next_pow2(x: int) -> int:
    x = int(x)
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
