"""Decode attention through FlashInfer on the flat single-head view.

UNTESTED ON HARDWARE: there is no GPU where this was written. The index construction is
shared with the tested torch/Triton paths (:func:`.decode_attention.build_pair_indices`);
the FlashInfer calls follow the signatures of the installed flashinfer 0.7.2
(``flashinfer/decode.py``: ``BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer,
kv_layout="NHD", use_tensor_cores=...)``, ``plan(indptr, indices, last_page_len,
num_qo_heads, num_kv_heads, head_dim, page_size, *, q_data_type=, kv_data_type=,
sm_scale=)``, ``run(q, (k_cache, v_cache))`` with NHD caches of shape
``[num_pages, page_size, num_kv_heads, head_dim]``). Check with ``pytest -m gpu
tests/test_kernels_decode.py`` on a CUDA machine.

Mapping: one *pair* (request, KV head) is one FlashInfer "request" with
``num_kv_heads = 1`` and ``num_qo_heads = g``; one *cell* of ``k_flat = k_buffer[l].view(-1, D)``
is one page of ``page_size = 1``, so the paged cache is ``k_flat.view(-1, 1, 1, D)`` and
the page indices are the cell ids. ``last_page_len`` is 1 for a non-empty list and 0 for an
empty one (FlashInfer's ``get_seq_lens`` gives length 0 then); outputs of empty lists are
zeroed afterwards regardless of what the kernel wrote. ``plan`` copies ``indptr`` to the
host (one sync per plan), so plan once per layer per step and run right after.

``flashinfer`` is imported inside functions only, never at module import and never on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pair_indices import PairIndices

__all__ = ["FlashInferPairDecoder", "paged_decode_attention_flashinfer"]

WORKSPACE_BYTES = 128 * 1024 * 1024
_WORKSPACES: dict[torch.device, Tensor] = {}
_DECODERS: dict[tuple, "FlashInferPairDecoder"] = {}

# Group sizes FlashInfer's CUDA-core decode kernels are instantiated for
# (DISPATCH_GQA_GROUP_SIZE in include/flashinfer/utils.cuh); others need the tensor-core path.
_CUDA_CORE_GROUP_SIZES = (1, 2, 3, 4, 6, 8, 16)


def _workspace(device: torch.device) -> Tensor:
    ws = _WORKSPACES.get(device)
    if ws is None:
        ws = _WORKSPACES[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws


class FlashInferPairDecoder:
    """A ``BatchDecodeWithPagedKVCacheWrapper`` for the pair layout: :meth:`plan` per layer
    with that layer's :class:`PairIndices`, then :meth:`run` (before the next plan)."""

    def __init__(self, device: torch.device, group_size: int, head_dim: int,
                 q_dtype: torch.dtype, kv_dtype: torch.dtype | None = None,
                 workspace: Tensor | None = None):
        if torch.device(device).type != "cuda":
            raise ValueError("FlashInfer decode needs CUDA tensors")
        import flashinfer  # lazy: never at module import, never on CPU

        self.device = torch.device(device)
        self.group_size = int(group_size)
        self.head_dim = int(head_dim)
        self.q_dtype = q_dtype
        self.kv_dtype = kv_dtype or q_dtype
        # SGLang's heuristic (should_use_tensor_core): tensor cores from group size 4 on.
        use_tc = self.group_size >= 4 or self.group_size not in _CUDA_CORE_GROUP_SIZES
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace if workspace is not None else _workspace(self.device), "NHD", use_tensor_cores=use_tc
        )
        self._empty: Tensor | None = None

    def plan(self, pairs: PairIndices, sm_scale: float) -> None:
        indptr = pairs.kv_indptr.to(device=self.device, dtype=torch.int32)
        indices = pairs.kv_indices.to(device=self.device, dtype=torch.int32)
        lens = indptr[1:] - indptr[:-1]
        last_page_len = (lens > 0).to(torch.int32)
        self.wrapper.plan(
            indptr, indices, last_page_len,
            self.group_size, 1, self.head_dim, 1,
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype, sm_scale=float(sm_scale),
        )
        self._empty = lens == 0

    def run(self, q: Tensor, k_flat: Tensor, v_flat: Tensor) -> Tensor:
        """``q [n_pairs, g, D]`` -> ``[n_pairs, g, D]`` over the planned lists."""
        D = self.head_dim
        k_cache = k_flat.view(-1, 1, 1, D)  # [num_pages, page_size=1, num_kv_heads=1, D]
        v_cache = v_flat.view(-1, 1, 1, D)
        out = self.wrapper.run(q.contiguous(), (k_cache, v_cache))
        if self._empty is not None:
            out.masked_fill_(self._empty[:, None, None], 0)
        return out


def paged_decode_attention_flashinfer(q: Tensor, k_flat: Tensor, v_flat: Tensor, kv_indptr: Tensor,
                                      kv_indices: Tensor, sm_scale: float) -> Tensor:
    """One-shot plan + run with a cached decoder per (device, g, D, dtypes)."""
    n_pairs, g, D = q.shape
    key = (q.device, g, D, q.dtype, k_flat.dtype)
    dec = _DECODERS.get(key)
    if dec is None:
        dec = _DECODERS[key] = FlashInferPairDecoder(q.device, g, D, q.dtype, k_flat.dtype)
    dec.plan(PairIndices(kv_indptr, kv_indices), sm_scale)
    return dec.run(q, k_flat, v_flat)
