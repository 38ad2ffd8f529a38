"""Repack: move the kept cells of a request into their target cells, in place.

``repack_cells(k_flat, v_flat, src_cells, dst_cells)`` copies cell ``src_cells[i]`` to cell
``dst_cells[i]`` in both flat single-head views of one layer (``k_buffer[l].view(-1, D)``,
``docs/design.md``, "Exact packing"). All sources are read before any target is written (gather into a
temporary, then scatter), so ``src_cells`` and ``dst_cells`` may overlap, which they do
when a request's kept cells are packed into the first ``K`` slots of its own range.
``dst_cells`` must not contain duplicates (the result would be unspecified).

Implementations (``impl``, see :mod:`.dispatch`):

* ``"torch"``: ``index_select`` into a temporary, then ``index_copy_``.
* ``"triton"``: two launches per layer, each moving K and V together: a gather kernel
  into a temporary ``[2, n, D]``, then a scatter kernel. A single launch cannot be both
  correct and parallel here: Triton has no grid-wide barrier, so a program could
  overwrite a cell that another program has not read yet whenever sources and targets
  overlap. All layers in one launch would need a device array of buffer pointers; not
  worth it for a once-per-request operation, so :func:`repack_layers` loops over layers.

Engine-free: never imports SGLang.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .dispatch import resolve_impl

__all__ = ["repack_cells", "repack_cells_torch", "repack_layers"]


def repack_cells_torch(k_flat: Tensor, v_flat: Tensor, src_cells: Tensor, dst_cells: Tensor) -> None:
    src = src_cells.to(device=k_flat.device, dtype=torch.long)
    dst = dst_cells.to(device=k_flat.device, dtype=torch.long)
    tmp_k = k_flat.index_select(0, src)
    tmp_v = v_flat.index_select(0, src)
    k_flat.index_copy_(0, dst, tmp_k)
    v_flat.index_copy_(0, dst, tmp_v)


def repack_cells(k_flat: Tensor, v_flat: Tensor, src_cells: Tensor, dst_cells: Tensor, impl: str = "auto") -> None:
    """In place on ``k_flat`` and ``v_flat`` (``[C, D]`` each): cell ``dst_cells[i]`` takes the
    old content of cell ``src_cells[i]``. ``src_cells`` / ``dst_cells``: int64/int32 ``[n]``."""
    if k_flat.dim() != 2 or v_flat.dim() != 2:
        raise ValueError(f"k_flat / v_flat must be [C, D]; got {tuple(k_flat.shape)}, {tuple(v_flat.shape)}")
    if src_cells.numel() != dst_cells.numel():
        raise ValueError(f"{src_cells.numel()} source cells for {dst_cells.numel()} target cells")
    if src_cells.numel() == 0:
        return
    which = resolve_impl("repack", k_flat.device, impl)
    if which == "torch":
        repack_cells_torch(k_flat, v_flat, src_cells, dst_cells)
    else:
        from ._triton_repack import repack_cells_triton

        repack_cells_triton(k_flat, v_flat, src_cells, dst_cells)


def repack_layers(
    k_flats: Sequence[Tensor],
    v_flats: Sequence[Tensor],
    src_cells: Sequence[Tensor],
    dst_cells: Sequence[Tensor],
    impl: str = "auto",
) -> None:
    """:func:`repack_cells` for every layer ``l`` (its own ``src_cells[l]`` / ``dst_cells[l]``)."""
    if not (len(k_flats) == len(v_flats) == len(src_cells) == len(dst_cells)):
        raise ValueError("one K buffer, V buffer, source list and target list per layer")
    for k, v, s, d in zip(k_flats, v_flats, src_cells, dst_cells):
        repack_cells(k, v, s, d, impl=impl)
