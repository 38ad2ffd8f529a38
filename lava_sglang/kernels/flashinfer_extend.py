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
no tile in FlashInfer's planner. ``plan`` copies the indptrs to the host (one sync per
plan): plan once per layer per forward and run right after.

``flashinfer`` is imported inside functions only, never at module import and never on CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .flashinfer_decode import _workspace
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

    qo_indptr: Tensor  # [n_pairs + 1]
    paged_kv_indptr: Tensor  # [n_pairs + 1]
    paged_kv_indices: Tensor  # [nnz]
    paged_kv_last_page_len: Tensor  # [n_pairs]


def flashinfer_extend_plan_args(qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                                device: torch.device | str | None = None, *, check: bool = True) -> ExtendPlanArgs:
    """Pure host-side preparation of the ``plan`` index arguments for the pair layout
    (page_size 1, one KV head per pair). No flashinfer import; runs on CPU tensors.

    ``check``: validate the lengths (:func:`.pair_indices.extend_lengths`; one host read)."""
    if device is None:
        device = kv_indices.device
    if check:
        extend_lengths(qo_indptr, kv_indptr)
    qo = qo_indptr.to(device=device, dtype=torch.int32)
    kv = kv_indptr.to(device=device, dtype=torch.int32)
    idx = kv_indices.to(device=device, dtype=torch.int32)
    last_page_len = ((kv[1:] - kv[:-1]) > 0).to(torch.int32)
    return ExtendPlanArgs(qo, kv, idx, last_page_len)


class FlashInferPairExtender:
    """A ``BatchPrefillWithPagedKVCacheWrapper`` for the pair layout: :meth:`plan` per layer
    with that layer's lists, then :meth:`run` (before the next plan)."""

    def __init__(self, device: torch.device, group_size: int, head_dim: int, q_dtype: torch.dtype,
                 kv_dtype: torch.dtype | None = None, head_dim_vo: int | None = None,
                 workspace: Tensor | None = None):
        if torch.device(device).type != "cuda":
            raise ValueError("FlashInfer extend needs CUDA tensors")
        import flashinfer  # lazy: never at module import, never on CPU

        self.device = torch.device(device)
        self.group_size = int(group_size)
        self.head_dim = int(head_dim)
        self.head_dim_vo = int(head_dim_vo or head_dim)
        self.q_dtype = q_dtype
        self.kv_dtype = kv_dtype or q_dtype
        # the float workspace is shared with the decode wrappers (used one after the other)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace if workspace is not None else _workspace(self.device), "NHD"
        )

    def plan(self, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor, sm_scale: float, *,
             check: bool = True) -> None:
        args = flashinfer_extend_plan_args(qo_indptr, kv_indptr, kv_indices, self.device, check=check)
        self.wrapper.plan(
            args.qo_indptr, args.paged_kv_indptr, args.paged_kv_indices, args.paged_kv_last_page_len,
            self.group_size, 1, self.head_dim, 1,
            head_dim_vo=self.head_dim_vo, causal=True, sm_scale=float(sm_scale),
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype,
        )

    def run(self, q: Tensor, k_flat: Tensor, v_flat: Tensor) -> Tensor:
        """``q [nq_total, g, D]`` -> ``[nq_total, g, Dv]`` over the planned lists."""
        k_cache = k_flat.view(-1, 1, 1, self.head_dim)  # [num_pages, page_size=1, num_kv_heads=1, D]
        v_cache = v_flat.view(-1, 1, 1, self.head_dim_vo)
        return self.wrapper.run(q.contiguous(), (k_cache, v_cache))


def paged_extend_attention_flashinfer(q: Tensor, k_flat: Tensor, v_flat: Tensor, qo_indptr: Tensor,
                                      kv_indptr: Tensor, kv_indices: Tensor, sm_scale: float) -> Tensor:
    """One-shot plan + run with a cached extender per (device, g, D, Dv, dtypes)."""
    nq_total, g, D = q.shape
    Dv = v_flat.shape[-1]
    extend_lengths(qo_indptr, kv_indptr, nq_total)  # raises on bad lengths (one host read)
    if nq_total == 0:
        return torch.empty((0, g, Dv), dtype=q.dtype, device=q.device)
    key = (q.device, g, D, Dv, q.dtype, k_flat.dtype)
    ext = _EXTENDERS.get(key)
    if ext is None:
        ext = _EXTENDERS[key] = FlashInferPairExtender(q.device, g, D, q.dtype, k_flat.dtype, head_dim_vo=Dv)
    ext.plan(qo_indptr, kv_indptr, kv_indices, sm_scale, check=False)
    return ext.run(q, k_flat, v_flat)
