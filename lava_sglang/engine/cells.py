"""One address space for every KV cell of the pool: exact packing across layers.

SGLang's MHA pool keeps, per layer ``l``, ``k_buffer[l]`` and ``v_buffer[l]`` of shape
``[slots, Hkv, D]``. A *cell* is one (layer, slot, KV head) vector. When every layer's buffer is
a view into one contiguous allocation with a constant layer stride (what
:func:`contiguous_kv_buffers` allocates, and what the plugin makes SGLang allocate when a policy
is active), one flat single-head view ``k_flat [n_cells, D]`` reaches every cell of every layer:

    cell(l, slot, h) = base[l] + slot * Hkv + h

and the same index reads the value in ``v_flat``. A compressed request can then put layer
``l``'s kept cells in *any* layer's part of the slots it owns: it holds
``ceil(kept_cells / (n_layers * Hkv))`` private slots whatever its per-layer budgets (exact
packing), instead of ``max_l ceil(kept_cells_l / Hkv)``. Prefix and appended tokens stay where
SGLang writes them (``cell(l, slot, h)``); only the kept cells move.

No SGLang import: the pool is anything with ``get_key_buffer`` / ``get_value_buffer`` and a
``layer_num``.
"""

from __future__ import annotations

from typing import Optional

import torch

INT32_MAX = 2 ** 31 - 1


def contiguous_kv_buffers(n_layers: int, rows: int, k_row_shape: tuple, v_row_shape: tuple, dtype, device,
                          padded_rows: Optional[int] = None) -> tuple[list, list]:
    """Per-layer K and V buffers of ``rows`` rows that are views into one allocation.

    With equal K and V row shapes the layout is SGLang's (each layer's K and V are the halves of
    one ``[2, padded_rows, ...]`` block, ``sglang/srt/mem_cache/memory_pool.py``
    ``_create_buffers_normal``) and the blocks of all layers follow each other: the same bytes
    as SGLang's per-layer allocations, in one piece. Otherwise one K and one V allocation of
    ``[n_layers, rows, ...]`` each.
    """
    padded = rows if padded_rows is None else padded_rows
    if tuple(k_row_shape) == tuple(v_row_shape):
        fused = torch.zeros((n_layers, 2, padded, *k_row_shape), dtype=dtype, device=device)
        return [fused[l, 0, :rows] for l in range(n_layers)], [fused[l, 1, :rows] for l in range(n_layers)]
    k = torch.zeros((n_layers, rows, *k_row_shape), dtype=dtype, device=device)
    v = torch.zeros((n_layers, rows, *v_row_shape), dtype=dtype, device=device)
    return list(k.unbind(0)), list(v.unbind(0))


def _flat(buffers: list, what: str) -> tuple[torch.Tensor, list]:
    """A ``[n, D]`` view from the first buffer's start over all of them, and each one's offset
    in cells; ValueError when they are not one allocation with whole-cell offsets."""
    first = buffers[0]
    D = first.shape[-1]
    storage = first.untyped_storage().data_ptr()
    base = []
    for l, b in enumerate(buffers):
        if b.dim() != 3 or not b.is_contiguous() or b.shape[1:] != first.shape[1:] or b.dtype != first.dtype:
            raise ValueError(f"{what}[{l}] is not a contiguous [slots, heads, dim] buffer like {what}[0]")
        if b.untyped_storage().data_ptr() != storage:
            raise ValueError(f"{what}[{l}] is not in the same allocation as {what}[0]")
        delta = b.storage_offset() - first.storage_offset()
        if delta % D:
            raise ValueError(f"{what}[{l}] does not start on a whole cell of {what}[0]")
        base.append(delta // D)
    n = max(base) + buffers[base.index(max(base))].shape[0] * first.shape[1]
    if min(base) < 0:
        raise ValueError(f"{what}[0] is not the first layer of the allocation")
    flat = torch.as_strided(first, (n, D), (D, 1), first.storage_offset())
    return flat, base


class CellSpace:
    """The flat views and each layer's base (module docstring)."""

    def __init__(self, k_buffers: list, v_buffers: list):
        if not k_buffers or len(k_buffers) != len(v_buffers):
            raise ValueError("need one K and one V buffer per layer")
        self.n_layers = len(k_buffers)
        self.n_kv_heads = int(k_buffers[0].shape[1])
        self.k_flat, base_k = _flat(k_buffers, "k_buffer")
        self.v_flat, base_v = _flat(v_buffers, "v_buffer")
        if base_k != base_v:
            raise ValueError("K and V buffers of the layers are not laid out alike")
        self.base = base_k
        self.base_t = torch.tensor(base_k, dtype=torch.long, device=k_buffers[0].device)
        self.n_cells = int(self.k_flat.shape[0])
        self.key = (k_buffers[0].data_ptr(), v_buffers[0].data_ptr(), self.n_layers)

    def cells(self, layer: int, slots: torch.Tensor, head: int) -> torch.Tensor:
        """Cells of ``slots`` in (``layer``, ``head``): where SGLang wrote those tokens."""
        return slots.to(torch.long) * self.n_kv_heads + (self.base[layer] + head)

    def slots_for(self, n_cells: int) -> int:
        """Slots that hold ``n_cells`` packed cells: every layer's part of each slot is used."""
        per_slot = self.n_layers * self.n_kv_heads
        return -(-int(n_cells) // per_slot)

    def packed(self, target_slots: torch.Tensor, n_cells: int) -> torch.Tensor:
        """The first ``n_cells`` cells of ``target_slots``, slot by slot, each slot's layers and
        heads in order: ``j -> cell(layer (j // Hkv) % L, target_slots[j // (L * Hkv)], j % Hkv)``."""
        H, L = self.n_kv_heads, self.n_layers
        j = torch.arange(int(n_cells), device=target_slots.device)
        slot = target_slots.to(torch.long)[j // (L * H)]
        r = j % (L * H)
        return slot * H + self.base_t.to(j.device)[r // H] + r % H


def index_overflow(n_cells: int, device_type: str) -> Optional[str]:
    """Why cell ids of a pool of ``n_cells`` cells cannot index the GPU kernels, or None.

    Triton's and FlashInfer's index arrays are int32 (FlashInfer's page ids are): a cell id must
    stay below 2**31. The torch kernels (CPU) index with int64."""
    if device_type != "cuda" or n_cells <= INT32_MAX + 1:
        return None
    return (f"the KV pool has {n_cells} cells (layers x slots x KV heads), more than int32 cell ids reach "
            f"({INT32_MAX + 1}); lower --max-total-tokens or --mem-fraction-static")


def pool_cells(pool) -> CellSpace:
    """The :class:`CellSpace` of an SGLang pool (cached on it, rebuilt if its buffers moved)."""
    k0, v0 = pool.get_key_buffer(0), pool.get_value_buffer(0)
    n_layers = int(pool.layer_num)
    space = getattr(pool, "_lava_cells", None)
    if space is None or space.key != (k0.data_ptr(), v0.data_ptr(), n_layers):
        space = CellSpace([pool.get_key_buffer(l) for l in range(n_layers)],
                          [pool.get_value_buffer(l) for l in range(n_layers)])
        pool._lava_cells = space
    return space
