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
the page indices are the cell ids (built int32 by the layout when FlashInfer runs: no
conversion per layer). ``last_page_len`` is 1 for a non-empty list and 0 for an empty one
(FlashInfer's ``get_seq_lens`` gives length 0 then); outputs of empty lists are zeroed afterwards
regardless of what the kernel wrote.

Host syncs. ``plan`` needs ``indptr`` and ``last_page_len`` on the host: given device tensors it
copies them back (``flashinfer/decode.py`` 2144-2145, two host syncs per plan). They are known
on the host (``engine.layout`` computes every list length there), so
:func:`flashinfer_decode_plan_args` passes host tensors and the device indices: no host sync.
Each layer has its own lists, so each layer is planned right before it runs, by its own
wrapper: ``plan`` fills the wrapper's pinned host buffer and queues its copy to the device
without waiting, so one wrapper re-planned for the next layer could overwrite that buffer
before the previous copy ran. The wrappers share the float and the device int workspace
(planned and run in stream order); before a wrapper is planned again (the next step) the host
waits for the CUDA event recorded after its previous plan, a point the GPU passed a step ago
unless the host runs a whole step ahead. Cost: 8 MB of pinned host memory per wrapper
(FlashInfer's page-locked copy of the int workspace), i.e. per layer, for decode and for extend.

Back-end: ``backend="fa2"``, as SGLang pins its own paged wrappers
(``layers/attention/flashinfer_backend.py`` ``prefill_backend = decode_backend = "fa2"``):
``"auto"`` picks FlashInfer's sm90 FA3 kernel on an H100 and may pick cuDNN on SM100, neither
of which SGLang runs with these wrappers; one back-end, the one SGLang itself exercises.

``flashinfer`` is imported inside functions only, never at module import and never on CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .pair_indices import PairIndices

__all__ = ["DecodePlanArgs", "FlashInferPairDecoder", "flashinfer_decode_plan_args", "paged_decode_attention_flashinfer"]

WORKSPACE_BYTES = 128 * 1024 * 1024
INT_WORKSPACE_BYTES = 8 * 1024 * 1024  # FlashInfer's own default for a wrapper
#: the FlashInfer back-end of every wrapper (module docstring)
BACKEND = "fa2"
_WORKSPACES: dict[tuple, Tensor] = {}
_DECODERS: dict[tuple, "FlashInferPairDecoder"] = {}

# Group sizes FlashInfer's CUDA-core decode kernels are instantiated for
# (DISPATCH_GQA_GROUP_SIZE in include/flashinfer/utils.cuh); others need the tensor-core path.
_CUDA_CORE_GROUP_SIZES = (1, 2, 3, 4, 6, 8, 16)


def _require_cuda(device, what: str) -> None:
    if torch.device(device).type != "cuda":
        raise ValueError(f"FlashInfer {what} needs CUDA tensors")


def _workspace(device: torch.device, kind: str = "float") -> Tensor:
    """The float workspace (``kind="float"``) or the device int workspace (``"int"``) all
    wrappers of ``device`` share: they are planned and run one after the other, in stream order."""
    key = (torch.device(device), kind)
    ws = _WORKSPACES.get(key)
    if ws is None:
        size = WORKSPACE_BYTES if kind == "float" else INT_WORKSPACE_BYTES
        ws = _WORKSPACES[key] = torch.zeros(size, dtype=torch.uint8, device=device)
    return ws


def share_int_workspace(wrapper, device: torch.device, workspace: Tensor | None) -> None:
    """Point a new wrapper at the shared device int workspace (its pinned host buffer stays its
    own, allocated by ``reset_workspace_buffer``) instead of the 8 MB one it allocated."""
    float_ws = workspace if workspace is not None else _workspace(device)
    wrapper.reset_workspace_buffer(float_ws, _workspace(device, "int"))


class PlanFence:
    """The CUDA event recorded after a wrapper's ``plan`` queued the copy of its pinned buffer;
    :meth:`wait` before the next ``plan`` overwrites that buffer (nothing to wait for on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.event = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def record(self) -> None:
        if self.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()


class DecodePlanArgs(NamedTuple):
    """What :meth:`FlashInferPairDecoder.plan` passes to FlashInfer's ``plan``."""

    indptr: Tensor  # [n_pairs + 1] int32, on the host
    indices: Tensor  # [nnz] int32, on the device
    last_page_len: Tensor  # [n_pairs] int32, on the host
    empty: Tensor  # [n_pairs] bool, on the device: pairs whose output is zeroed


def flashinfer_decode_plan_args(kv_indptr: Tensor, kv_indices: Tensor, device: torch.device | str | None = None,
                                kv_indptr_host: Tensor | None = None) -> DecodePlanArgs:
    """Host-side preparation of ``plan``'s index arguments for the pair layout (page_size 1,
    one KV head per pair); no flashinfer import, runs on CPU tensors. ``kv_indptr_host``: the
    host copy of ``kv_indptr`` when known (no host sync); without it ``kv_indptr`` is read
    back once."""
    if device is None:
        device = kv_indices.device
    host = kv_indptr_host if kv_indptr_host is not None else kv_indptr.to("cpu")
    host = host.to(torch.int32)
    last_page_len = ((host[1:] - host[:-1]) > 0).to(torch.int32)
    indices = kv_indices.to(device=device, dtype=torch.int32)  # a no-op when built int32 on the device
    empty = (kv_indptr[1:] == kv_indptr[:-1]).to(device)  # on the device, from the device indptr
    return DecodePlanArgs(pinned(host, device), indices, pinned(last_page_len, device), empty)


def pinned(host: Tensor, device) -> Tensor:
    """A host tensor FlashInfer's ``plan`` copies to ``device`` (``non_blocking=True``): in
    pinned memory on CUDA, so that copy is a true asynchronous one."""
    return host.pin_memory() if torch.device(device).type == "cuda" else host


class FlashInferPairDecoder:
    """A ``BatchDecodeWithPagedKVCacheWrapper`` for the pair layout: :meth:`plan` with one
    layer's :class:`PairIndices`, then :meth:`run` (before the next plan). One per layer in
    the engine (module docstring)."""

    def __init__(self, device: torch.device, group_size: int, head_dim: int,
                 q_dtype: torch.dtype, kv_dtype: torch.dtype | None = None,
                 workspace: Tensor | None = None):
        _require_cuda(device, "decode")
        import flashinfer  # lazy: never at module import, never on CPU

        self.device = torch.device(device)
        self.group_size = int(group_size)
        self.head_dim = int(head_dim)
        self.q_dtype = q_dtype
        self.kv_dtype = kv_dtype or q_dtype
        # SGLang's heuristic (should_use_tensor_core): tensor cores from group size 4 on.
        use_tc = self.group_size >= 4 or self.group_size not in _CUDA_CORE_GROUP_SIZES
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace if workspace is not None else _workspace(self.device), "NHD", use_tensor_cores=use_tc,
            backend=BACKEND,
        )
        share_int_workspace(self.wrapper, self.device, workspace)
        self._fence = PlanFence(self.device)
        self._empty: Tensor | None = None

    def plan(self, pairs: PairIndices, sm_scale: float, kv_indptr_host: Tensor | None = None) -> None:
        args = flashinfer_decode_plan_args(pairs.kv_indptr, pairs.kv_indices, self.device, kv_indptr_host)
        self._fence.wait()
        self.wrapper.plan(
            args.indptr, args.indices, args.last_page_len,
            self.group_size, 1, self.head_dim, 1,
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype, sm_scale=float(sm_scale),
        )
        self._fence.record()
        self._empty = args.empty

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
                                      kv_indices: Tensor, sm_scale: float, *, layer: int = 0,
                                      kv_indptr_host: Tensor | None = None) -> Tensor:
    """Plan + run with a cached decoder per (layer, device, g, D, dtypes)."""
    n_pairs, g, D = q.shape
    key = (layer, q.device, g, D, q.dtype, k_flat.dtype)
    dec = _DECODERS.get(key)
    if dec is None:
        dec = _DECODERS[key] = FlashInferPairDecoder(q.device, g, D, q.dtype, k_flat.dtype)
    dec.plan(PairIndices(kv_indptr, kv_indices), sm_scale, kv_indptr_host)
    return dec.run(q, k_flat, v_flat)
