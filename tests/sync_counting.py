"""Counting host syncs on CPU tensors, for ``tests/test_host_syncs.py``: ``SyncCounter``, the
stand-ins for the GPU back-ends (``use_backend``) and the printed table.

On a GPU every read of device data by the host (``.tolist()``, ``.item()``, ``int(t)``,
``bool(t)``, ``.cpu()``, ``.to("cpu")``, ``torch.nonzero``, boolean-mask indexing, a copy into a
host tensor, ``repeat_interleave`` without ``output_size``...) waits for the stream, and so does
every blocking copy from the host (``x.to(device)``, ``torch.tensor(data, device=device)``,
indexing a device tensor with a host tensor: PyTorch's ``memcpy_and_sync``). On CPU every tensor
is a host tensor, so ``SyncCounter`` (a ``TorchFunctionMode``) keeps its own mark of which
tensors stand for device tensors: those made with a ``torch.device`` argument
(``torch.arange(n, device=device)``, ``x.to(device)``; a test makes its device tensors with
``device=torch.device("cpu")``) and every tensor computed from a marked one; a host tensor is
one made without a device (or with the string ``"cpu"``) or moved with ``.cpu()`` /
``.to("cpu")``. It counts the operations above on marked tensors, by kind and by the line of
``lava_sglang`` (or of a ``stub_`` function here) that made them. Not a sync:
``.to(device, non_blocking=True)``, ``masked_scatter_`` (PyTorch's CUDA version checks its sizes
with a device-side assert), ``repeat_interleave`` with ``output_size``, indexing with device
integer tensors, factories on the device.

Stand-ins: ``_NoLaunch`` replaces a Triton kernel launch (the Python launch wrapper around it
runs); ``stub_flashinfer()`` is a ``flashinfer`` module whose wrappers' ``plan`` does the host
reads and copies flashinfer 0.7.2's ``plan`` does with its index arguments
(``flashinfer/decode.py`` 2131-2145, ``flashinfer/prefill.py`` 2743-2770) and whose ``run``
returns zeros; it records every wrapper (with its ``backend``) and every plan.
"""

from __future__ import annotations

import collections
import os
import sys
import types
import weakref

import torch
from torch.overrides import TorchFunctionMode

import lava_sglang
from lava_sglang.kernels import decode_attention as DA
from lava_sglang.kernels import extend_attention as EA

PKG = os.path.dirname(os.path.dirname(os.path.abspath(lava_sglang.__file__)))

_HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy",
               "__array__", "cpu", "__format__", "__repr__", "__contains__"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal",
                   "allclose", "histc"}
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put", "_index_put_impl_"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _is_host(device) -> bool:
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class SyncCounter(TorchFunctionMode):
    """Counts the host reads of device tensors (module docstring), by kind and by the line of
    ``lava_sglang`` (or of the FlashInfer stand-in) that made them."""

    def __init__(self):
        super().__init__()
        self._dev: dict = {}
        self.counting = False
        self.seen = collections.Counter()

    def is_dev(self, t) -> bool:
        ref = self._dev.get(id(t))
        return ref is not None and ref() is t

    def mark(self, out) -> None:
        for t in _tensors(out):
            self._dev[id(t)] = weakref.ref(t)

    def _where(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if path.startswith(os.path.join(PKG, "lava_sglang")) or frame.f_code.co_name.startswith("stub_"):
                return f"{os.path.relpath(path, PKG)}:{frame.f_lineno}"
            frame = frame.f_back
        return "?"

    def _sync(self, what: str) -> None:
        if self.counting:
            self.seen[(what, self._where())] += 1

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        dev_in = any(self.is_dev(t) for t in _tensors((args, kwargs)))
        first_dev = bool(args) and isinstance(args[0], torch.Tensor) and self.is_dev(args[0])
        to_host = False
        non_blocking = kwargs.get("non_blocking") is True or any(a is True for a in args[1:])
        target = kwargs.get("device")
        if name == "to" and target is None:
            target = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
        if name in _HOST_READS:
            to_host = True
            if first_dev:
                self._sync(name)
        elif name == "to" and _is_host(target):
            to_host = True
            if first_dev:
                self._sync('to("cpu")')
        elif name in _DATA_DEPENDENT or (name == "where" and len(args) == 1 and not kwargs):
            if dev_in:
                self._sync(name)
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            if any(self.is_dev(t) for t in _tensors(args[1:] if len(args) > 1 else args)):
                self._sync("repeat_interleave without output_size")
        elif name in _INDEXING and args:
            index = args[1] if len(args) > 1 else kwargs.get("indices")
            masks = [t for t in _tensors(index) if t.dtype in (torch.bool, torch.uint8)]
            values = [t for t in _tensors(args[2:]) if t.dim() > 0]
            if masks and (first_dev or any(self.is_dev(m) for m in masks)):
                self._sync(f"boolean-mask {name}")
            elif name == "__setitem__" and not first_dev and any(self.is_dev(t) for t in values):
                self._sync("device -> host __setitem__")
            elif first_dev and any(not self.is_dev(t) for t in list(_tensors(index)) + values):
                self._sync(f"blocking host -> device copy ({name} with a host tensor)")
        elif name == "copy_" and args:
            src_dev = any(self.is_dev(t) for t in _tensors(args[1:]))
            if not first_dev and src_dev:
                self._sync("device -> host copy_")
            elif first_dev and not src_dev and not non_blocking:
                self._sync("blocking host -> device copy_")
        elif name in ("tensor", "as_tensor") and not isinstance(target, torch.device) and dev_in:
            self._sync(f"torch.{name} of a device tensor")
            dev_in = False
        to_dev = isinstance(target, torch.device)  # made on, or moved to, the device
        # a blocking copy from the host synchronizes the stream (PyTorch's memcpy_and_sync)
        if name == "to" and to_dev and not first_dev and not non_blocking:
            self._sync("blocking host -> device copy (.to)")
        elif name in ("tensor", "as_tensor") and to_dev and not dev_in:
            self._sync(f"blocking host -> device copy (torch.{name})")
        elif name == "new_tensor" and first_dev and not any(self.is_dev(t) for t in _tensors(args[1:])):
            self._sync("blocking host -> device copy (new_tensor)")
        out = func(*args, **kwargs)
        if args and out is args[0] and ((to_host and first_dev) or (to_dev and not first_dev)):
            out = out.clone()  # on CPU a move returns the tensor itself: the other side's copy is another tensor
        if (dev_in or to_dev) and not to_host:
            self.mark(out)
        return out

    def take(self) -> collections.Counter:
        seen, self.seen = self.seen, collections.Counter()
        return seen



# ------------------------------------------------------------------ GPU back-ends without a GPU
class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_flashinfer() -> types.ModuleType:
    """A ``flashinfer`` module whose wrappers do, on the host, what flashinfer 0.7.2's ``plan``
    does with its index arguments (copies to the device, reads to the host) and whose ``run``
    returns zeros."""
    mod = types.ModuleType("flashinfer")

    class Wrapper:
        def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                     backend="auto", **kwargs):
            self.device = float_workspace_buffer.device
            self.backend = backend
            mod.wrappers.append(self)

        def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer):
            pass

    class Decode(Wrapper):
        def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kwargs):
            mod.plans.append(self)
            return stub_decode_plan(self, indptr, indices, last_page_len)

        def run(self, q, paged_kv_cache, **kwargs):
            return torch.zeros_like(q)

    class Prefill(Wrapper):
        def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                 num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, **kwargs):
            self.dv = head_dim_vo or head_dim_qk
            mod.plans.append(self)
            return stub_prefill_plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len)

        def run(self, q, paged_kv_cache, **kwargs):
            return q.new_zeros((q.shape[0], q.shape[1], self.dv))

    mod.wrappers, mod.plans = [], []
    mod.BatchDecodeWithPagedKVCacheWrapper = Decode
    mod.BatchPrefillWithPagedKVCacheWrapper = Prefill
    return mod


def stub_decode_plan(w, indptr, indices, last_page_len):
    """flashinfer/decode.py 2131-2145 (no CUDA graph)."""
    w.bufs = [x.to(w.device, non_blocking=True) for x in (indptr, indices, last_page_len)]
    indptr_host = indptr.to("cpu")
    last_page_len_host = last_page_len.to("cpu")
    return indptr_host, last_page_len_host


def stub_prefill_plan(w, qo_indptr, kv_indptr, kv_indices, last_page_len):
    """flashinfer/prefill.py 2743-2770 and 2800-2815 (no CUDA graph)."""
    qo_host = qo_indptr.to("cpu")
    int(qo_host[-1])
    (qo_host[1:] - qo_host[:-1]).max().item()
    kv_host = kv_indptr.to("cpu")
    last_host = last_page_len.to("cpu")
    kv_lens = (kv_host[1:] - kv_host[:-1] - 1).clamp_min(0) + last_host  # get_seq_lens
    w.kv_lens = torch.empty(kv_lens.numel(), dtype=torch.int32, device=w.device)
    w.kv_lens.copy_(kv_lens, non_blocking=True)
    kv_lens.max().item()
    w.bufs = [x.to(w.device, non_blocking=True) for x in (qo_indptr, kv_indptr, kv_indices, last_page_len)]


def use_backend(impl: str, monkeypatch) -> str:
    """Make the layout's kernel plans use ``impl`` on the CPU tensors (GPU kernels stubbed)."""
    monkeypatch.setattr(DA, "resolve_impl", lambda op, device, impl_="auto", dtype=None: impl)
    monkeypatch.setattr(EA, "resolve_impl", lambda op, device, impl_="auto", dtype=None: impl)
    if impl == "triton":
        from lava_sglang.kernels import _triton_decode, _triton_extend

        monkeypatch.setattr(_triton_decode, "kernel", lambda fn, device: _NoLaunch())
        monkeypatch.setattr(_triton_extend, "kernel", lambda fn, device: _NoLaunch())
    if impl == "flashinfer":
        from lava_sglang.kernels import flashinfer_decode, flashinfer_extend

        monkeypatch.setitem(sys.modules, "flashinfer", stub_flashinfer())
        for mod in (flashinfer_decode, flashinfer_extend):
            monkeypatch.setattr(mod, "_require_cuda", lambda device, what: None, raising=False)
            for name in ("_DECODERS", "_EXTENDERS", "_WORKSPACES"):
                if hasattr(mod, name):
                    monkeypatch.setattr(mod, name, {})
    return impl


def table(results: dict) -> str:
    steps = list(next(iter(results.values())))
    lines = ["layers x requests | " + " | ".join(steps)]
    for (n_layers, R), counts in results.items():
        lines.append(f"{n_layers} x {R} | " + " | ".join(str(sum(counts[s].values())) for s in steps))
    return "\n".join(lines)


def detail(counts: dict) -> str:
    return "\n".join(f"  {step}: " + ", ".join(f"{what} @ {where} x{n}" for (what, where), n in sorted(c.items()))
                     for step, c in counts.items())
