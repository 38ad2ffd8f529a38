"""Which implementation a kernel call uses. The one place for this logic.

Order of precedence:

1. an explicit ``impl`` argument other than ``"auto"``;
2. the environment variable ``LAVA_KERNEL_IMPL=torch|triton|flashinfer`` (for testing);
3. automatic: ``"torch"`` for CPU tensors; on CUDA the first of :func:`gpu_candidates` that
   is not disabled (``"flashinfer"`` for decode and extend attention when ``flashinfer``
   imports and the cache is not fp32, then ``"triton"``), else ``"torch"``.

Only decode and extend attention have a FlashInfer implementation; for the other operations
(repack) a request for ``"flashinfer"`` means "the GPU path" and resolves
to ``"triton"``. ``"triton"`` on CPU tensors runs the Triton interpreter (slow, for tests).
``"flashinfer"`` on CPU tensors is an error.

Disabling. :func:`disable` marks one implementation of one operation unusable (the start-up
self-check, :mod:`.selfcheck`, does so when a back-end fails against its torch twin); only
the automatic choice (3) consults it, so it falls back to the next candidate, finally torch.
An explicit ``impl`` argument or ``LAVA_KERNEL_IMPL`` is still honoured: the self-check
refuses to start a server whose forced implementation fails instead of overriding it.

Engine-free: never imports SGLang; never imports flashinfer on CPU.
"""

from __future__ import annotations

import functools
import os

import torch

ENV_VAR = "LAVA_KERNEL_IMPL"
IMPLS = ("torch", "triton", "flashinfer")
#: operations and the implementations each one has
OPS = {
    "decode": ("torch", "triton", "flashinfer"),
    "extend": ("torch", "triton", "flashinfer"),
    "repack": ("torch", "triton"),
}


@functools.lru_cache(maxsize=None)
def flashinfer_available() -> bool:
    """True when ``flashinfer`` imports and CUDA is usable. Never imports it without CUDA."""
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def forced_impl() -> str | None:
    """The implementation forced by ``LAVA_KERNEL_IMPL``, or None. Raises on a bad value."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in IMPLS:
        raise ValueError(f"{ENV_VAR}={value!r}: choose one of {', '.join(IMPLS)} (or auto)")
    return value


_DISABLED: dict[tuple[str, str], str] = {}


def disable(op: str, impl: str, reason: str) -> None:
    """Mark implementation ``impl`` of ``op`` unusable for the automatic choice (this process)."""
    if op not in OPS or impl not in OPS[op] or impl == "torch":
        raise ValueError(f"cannot disable {impl!r} for {op!r}: choose one of {', '.join(i for i in OPS.get(op, ()) if i != 'torch')}")
    _DISABLED[(op, impl)] = str(reason)


def disabled() -> dict[tuple[str, str], str]:
    """The disabled (op, impl) pairs and why."""
    return dict(_DISABLED)


def enable_all() -> None:
    """Forget every :func:`disable` (for tests)."""
    _DISABLED.clear()


def gpu_candidates(op: str, dtype: torch.dtype | None = None) -> list[str]:
    """The GPU implementations the automatic choice tries for ``op`` on CUDA, in order,
    whether disabled or not (torch, the last resort, not included)."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; choose one of {', '.join(OPS)}")
    first = ["flashinfer"] if "flashinfer" in OPS[op] and dtype != torch.float32 and flashinfer_available() else []
    return first + ["triton"]


def resolve_impl(op: str, device: torch.device | str, impl: str = "auto", dtype: torch.dtype | None = None) -> str:
    """The implementation (``"torch"``, ``"triton"`` or ``"flashinfer"``) for ``op`` on ``device``.

    ``dtype``: the data type of the KV cache, when known; automatic selection skips
    FlashInfer for fp32 (FlashInfer's decode kernels take fp16/bf16/fp8 caches only)."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; choose one of {', '.join(OPS)}")
    device = torch.device(device)
    impl = (impl or "auto").lower()
    if impl == "auto":
        impl = forced_impl() or "auto"
    elif impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of auto, {', '.join(IMPLS)}")
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in gpu_candidates(op, dtype):
            if (op, candidate) not in _DISABLED:
                return candidate
        return "torch"
    if impl == "flashinfer":
        if device.type != "cuda":
            raise ValueError(f"{op}: the flashinfer implementation needs CUDA tensors, got {device}")
        if "flashinfer" not in OPS[op]:
            return "triton"
    return impl
