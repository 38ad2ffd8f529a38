"""Extend (prefill) attention through FlashInfer on the flat single-head view.

NEVER RUN ON A GPU: there is no GPU where this was written. Only the host-side argument
preparation (:func:`flashinfer_extend_plan_args`) is tested, on CPU; the FlashInfer calls
follow the signatures of the installed flashinfer 0.7.2 (``flashinfer/prefill.py``:
``BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout="NHD")``,
``plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
num_kv_heads, head_dim_qk, page_size, head_dim_vo=, causal=, sm_scale=, q_data_type=,
kv_data_type=)``, ``run(q, (k_cache, v_cache))`` with NHD caches of shape
``[num_pages, page_size, num_kv_heads, head_dim]``). Check with ``pytest -m gpu
tests/test_kernels_extend.py`` on a CUDA machine.

Mapping (as :mod:`.flashinfer_decode`): one *pair* (request, KV head) is one FlashInfer
"request" with ``num_kv_heads = 1`` and ``num_qo_heads = g``; one *cell* is one page of
``page_size = 1``, so the paged caches are ``k_flat.view(-1, 1, 1, D)`` and
``v_flat.view(-1, 1, 1, Dv)`` and the page indices are the cell ids (int32). The queries of
the pair are its ``qo_len`` rows of ``q [nq_total, g, D]`` (``qo_indptr``). ``causal=True``:
FlashInfer aligns the causal mask to the end of the list when ``kv_len >= qo_len`` (query
``i`` sees keys ``0 .. kv_len - qo_len + i``), which is this package's semantics.
``paged_kv_last_page_len`` is 1 for every non-empty list (0 for an empty one, which has no
query either; FlashInfer's ``get_seq_lens`` then gives length 0). A pair with 0 queries gets
no tile in FlashInfer's planner.

Host syncs and wrappers as in :mod:`.flashinfer_decode`: ``plan`` reads ``qo_indptr``,
``paged_kv_indptr`` and ``paged_kv_last_page_len`` on the host (given device tensors it copies
each back, ``flashinfer/prefill.py`` 2743-2757: three host syncs per plan), so they are passed
as host tensors (the layout knows every length there) and only the indices live on the
device; one wrapper per layer, planned right before its run, ``backend="fa2"`` as SGLang's.

``flashinfer`` is imported inside functions only, never at module import and never on CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .flashinfer_decode import BACKEND, PlanFence, _require_cuda, _workspace, pinned, share_int_workspace
from .pair_indices import extend_lengths

__all__ = [
    "ExtendPlanArgs",
    "flashinfer_extend_plan_args",
    "FlashInferPairExtender",
    "paged_extend_attention_flashinfer",
]

_EXTENDERS: dict[tuple, "FlashInferPairExtender"] = {}


class ExtendPlanArgs(NamedTuple):
    """The index arguments of ``BatchPrefillWithPagedKVCacheWrapper.plan`` (all int32)."""

    qo_indptr: Tensor  # [n_pairs + 1], on the host
    paged_kv_indptr: Tensor  # [n_pairs + 1], on the host
    paged_kv_indices: Tensor  # [nnz], on the device
    paged_kv_last_page_len: Tensor  # [n_pairs], on the host


def flashinfer_extend_plan_args(qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                                device: torch.device | str | None = None, *, check: bool = True,
                                qo_indptr_host: Tensor | None = None,
                                kv_indptr_host: Tensor | None = None) -> ExtendPlanArgs:
    """Host-side preparation of the ``plan`` index arguments for the pair layout (page_size 1,
    one KV head per pair): the indptrs and last page lengths on the host, the indices int32 on
    ``device`` (default: where they are). No flashinfer import; runs on CPU tensors.

    ``qo_indptr_host`` / ``kv_indptr_host``: host copies when known (no host sync); otherwise
    each indptr is read back once. ``check``: validate the lengths
    (:func:`.pair_indices.extend_lengths`, on the host copies)."""
    if device is None:
        device = kv_indices.device
    qo = (qo_indptr_host if qo_indptr_host is not None else qo_indptr.to("cpu")).to(torch.int32)
    kv = (kv_indptr_host if kv_indptr_host is not None else kv_indptr.to("cpu")).to(torch.int32)
    if check:
        extend_lengths(qo, kv)
    idx = kv_indices.to(device=device, dtype=torch.int32)  # a no-op when built int32 on the device
    last_page_len = ((kv[1:] - kv[:-1]) > 0).to(torch.int32)
    return ExtendPlanArgs(pinned(qo, device), pinned(kv, device), idx, pinned(last_page_len, device))


class FlashInferPairExtender:
    """A ``BatchPrefillWithPagedKVCacheWrapper`` for the pair layout: :meth:`plan` with one
    layer's lists, then :meth:`run` (before the next plan). One per layer in the engine."""

    def __init__(self, device: torch.device, group_size: int, head_dim: int, q_dtype: torch.dtype,
                 kv_dtype: torch.dtype | None = None, head_dim_vo: int | None = None,
                 workspace: Tensor | None = None):
        _require_cuda(device, "extend")
        import flashinfer  # lazy: never at module import, never on CPU

        self.device = torch.device(device)
        self.group_size = int(group_size)
        self.head_dim = int(head_dim)
        self.head_dim_vo = int(head_dim_vo or head_dim)
        self.q_dtype = q_dtype
        self.kv_dtype = kv_dtype or q_dtype
        # the workspaces are shared with the decode wrappers (used one after the other)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace if workspace is not None else _workspace(self.device), "NHD", backend=BACKEND
        )
        share_int_workspace(self.wrapper, self.device, workspace)
        self._fence = PlanFence(self.device)

    def plan(self, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor, sm_scale: float, *,
             check: bool = True, qo_indptr_host: Tensor | None = None, kv_indptr_host: Tensor | None = None) -> None:
        args = flashinfer_extend_plan_args(qo_indptr, kv_indptr, kv_indices, self.device, check=check,
                                           qo_indptr_host=qo_indptr_host, kv_indptr_host=kv_indptr_host)
        self._fence.wait()
        self.wrapper.plan(
            args.qo_indptr, args.paged_kv_indptr, args.paged_kv_indices, args.paged_kv_last_page_len,
            self.group_size, 1, self.head_dim, 1,
            head_dim_vo=self.head_dim_vo, causal=True, sm_scale=float(sm_scale),
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype,
        )
        self._fence.record()

    def run(self, q: Tensor, k_flat: Tensor, v_flat: Tensor) -> Tensor:
        """``q [nq_total, g, D]`` -> ``[nq_total, g, Dv]`` over the planned lists."""
        k_cache = k_flat.view(-1, 1, 1, self.head_dim)  # [num_pages, page_size=1, num_kv_heads=1, D]
        v_cache = v_flat.view(-1, 1, 1, self.head_dim_vo)
        return self.wrapper.run(q.contiguous(), (k_cache, v_cache))


def paged_extend_attention_flashinfer(q: Tensor, k_flat: Tensor, v_flat: Tensor, qo_indptr: Tensor,
                                      kv_indptr: Tensor, kv_indices: Tensor, sm_scale: float, *, layer: int = 0,
                                      qo_indptr_host: Tensor | None = None, kv_indptr_host: Tensor | None = None,
                                      checked: bool = False) -> Tensor:
    """Plan + run with a cached extender per (layer, device, g, D, Dv, dtypes). ``checked``: the
    caller validated the lengths (``ExtendPlan.plan``); otherwise they are checked here, on the
    host copies (read back once each when not given)."""
    nq_total, g, D = q.shape
    Dv = v_flat.shape[-1]
    if not checked:
        qo_indptr_host = qo_indptr_host if qo_indptr_host is not None else qo_indptr.to("cpu")
        kv_indptr_host = kv_indptr_host if kv_indptr_host is not None else kv_indptr.to("cpu")
        extend_lengths(qo_indptr_host, kv_indptr_host, nq_total)  # raises on bad lengths
    if nq_total == 0:
        return torch.empty((0, g, Dv), dtype=q.dtype, device=q.device)
    key = (layer, q.device, g, D, Dv, q.dtype, k_flat.dtype)
    ext = _EXTENDERS.get(key)
    if ext is None:
        ext = _EXTENDERS[key] = FlashInferPairExtender(q.device, g, D, q.dtype, k_flat.dtype, head_dim_vo=Dv)
    ext.plan(qo_indptr, kv_indptr, kv_indices, sm_scale, check=False, qo_indptr_host=qo_indptr_host,
             kv_indptr_host=kv_indptr_host)
    return ext.run(q, k_flat, v_flat)
