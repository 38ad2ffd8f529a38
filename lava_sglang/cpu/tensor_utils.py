"""Shared checks and index helpers of the pure-torch ``sgl_kernel`` stand-ins
(:mod:`lava_sglang.cpu.kv_ops`, :mod:`lava_sglang.cpu.spec_locs`, :mod:`lava_sglang.cpu.spec_tree`)."""

from __future__ import annotations

import torch

I64 = torch.int64


def flat_view(t: torch.Tensor, name: str) -> torch.Tensor:
    """A 1-D view of ``t`` sharing its memory (writes through it land in ``t``)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is written in place through a flat view)")
    return t.view(-1)


def concat_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated ``arange(starts[i], starts[i] + lengths[i])`` for all i.

    Returns ``(owner, position, rank)``: for every element, the index i of its range, its
    value, and its index inside the concatenation (0..total-1). Lengths must be >= 0.
    """
    total = int(lengths.sum()) if lengths.numel() else 0
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), dtype=I64), lengths)
    rank = torch.arange(total, dtype=I64)
    first = torch.cumsum(lengths, 0) - lengths  # exclusive prefix sum: rank of each range's first element
    position = rank - first[owner] + starts[owner]
    return owner, position, rank


def range_lengths(start_offset: torch.Tensor, end_offset: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = start_offset.reshape(-1)[:n].to(I64)
    lengths = end_offset.reshape(-1)[:n].to(I64) - start
    if bool((lengths < 0).any()):
        raise ValueError("end_offset must not be smaller than start_offset")
    return start, lengths


def check_pool_len(req_to_token: torch.Tensor, pool_len: int) -> None:
    if req_to_token.dim() != 2 or req_to_token.shape[1] != int(pool_len):
        raise ValueError(
            f"pool_len {pool_len} does not match req_to_token of shape {tuple(req_to_token.shape)}"
        )


def check_in(values: torch.Tensor, low: int, high: int, what: str) -> None:
    """Raise unless every value lies in ``[low, high)``."""
    if values.numel() and (int(values.min()) < low or int(values.max()) >= high):
        raise ValueError(f"{what} out of range [{low}, {high}): min {int(values.min())}, max {int(values.max())}")


def row_cells(req_to_token: torch.Tensor, pool_len: int, req_pool_indices: torch.Tensor, start_offset: torch.Tensor,
              end_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``req_to_token`` cells of the ranges ``[start[i], end[i])`` of rows
    ``req_pool_indices[i]``, concatenated in request order: ``(rows, cols)``, or None when there
    are none. Checks ``pool_len`` against the table and every column against ``pool_len``."""
    n = req_pool_indices.numel()
    if n == 0:
        return None
    check_pool_len(req_to_token, pool_len)
    start, lengths = range_lengths(start_offset, end_offset, n)
    owner, cols, rank = concat_ranges(start, lengths)
    if rank.numel() == 0:
        return None
    check_in(cols, 0, int(pool_len), "req_to_token column")
    return req_pool_indices.reshape(-1).to(I64)[owner], cols
