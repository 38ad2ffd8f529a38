"""Exact packing across layers (``engine.cells``, ``engine.compress.pack_and_free``), engine-free.

The pool is laid out as the plugin makes SGLang lay it out (``contiguous_kv_buffers``); a
request's kept cells of every layer fill ``ceil(kept / (n_layers * Hkv))`` of its slots,
whatever its per-layer and per-head budgets, and every vector lands where the layout reads it.
"""

from __future__ import annotations

import math

import pytest
import torch

from lava_sglang.engine.cells import INT32_MAX, CellSpace, contiguous_kv_buffers, index_overflow, pool_cells
from lava_sglang.engine.compress import pack_and_free

N_LAYERS, HKV, D = 4, 2, 8


class Pool:
    layer_num = N_LAYERS

    def __init__(self, rows: int, equal_shapes: bool = True, seed: int = 0):
        self.k_buffer, self.v_buffer = contiguous_kv_buffers(N_LAYERS, rows, (HKV, D), (HKV, D if equal_shapes else D + 4),
                                                             torch.float32, "cpu", padded_rows=rows + 3)
        gen = torch.Generator().manual_seed(seed)
        for b in self.k_buffer + self.v_buffer:
            b.copy_(torch.randn(b.shape, generator=gen))

    def get_key_buffer(self, layer):
        return self.k_buffer[layer]

    def get_value_buffer(self, layer):
        return self.v_buffer[layer]


class Allocator:
    def __init__(self):
        self.freed = []

    def free(self, slots):
        self.freed.extend(int(x) for x in slots)


def test_the_flat_views_read_every_layer_where_sglang_wrote_it():
    pool = Pool(50)
    space = pool_cells(pool)
    assert space.n_layers == N_LAYERS and space.n_kv_heads == HKV
    # SGLang's own layout per layer: K and V halves of one block, each [rows, Hkv, D] contiguous
    for l in range(N_LAYERS):
        assert pool.k_buffer[l].is_contiguous() and pool.k_buffer[l].shape == (50, HKV, D)
        assert pool.v_buffer[l].data_ptr() - pool.k_buffer[l].data_ptr() == 53 * HKV * D * 4
    slots = torch.tensor([0, 7, 49])
    for l in range(N_LAYERS):
        for h in range(HKV):
            cells = space.cells(l, slots, h)
            assert torch.equal(space.k_flat[cells], pool.k_buffer[l][slots, h])
            assert torch.equal(space.v_flat[cells], pool.v_buffer[l][slots, h])
    assert pool_cells(pool) is space  # cached on the pool


def test_separate_k_and_v_shapes_still_give_one_space():
    pool = Pool(20, equal_shapes=False)
    space = pool_cells(pool)
    cells = space.cells(3, torch.tensor([5]), 1)
    assert torch.equal(space.v_flat[cells], pool.v_buffer[3][[5], 1])


def test_buffers_of_separate_allocations_are_refused_with_the_reason():
    k = [torch.zeros(10, HKV, D) for _ in range(2)]
    with pytest.raises(ValueError, match=r"k_buffer\[1\] is not in the same allocation"):
        CellSpace(k, [t.clone() for t in k])


@pytest.mark.parametrize("seed", range(6))
def test_packing_is_exact_on_random_layer_and_head_budgets(seed):
    gen = torch.Generator().manual_seed(seed)
    rows = 300
    pool = Pool(rows, seed=seed)
    space = pool_cells(pool)
    original_k, original_v = space.k_flat.clone(), space.v_flat.clone()
    P, L = 4, 120
    row = 1
    req_to_token = torch.zeros(3, 256, dtype=torch.int32)
    req_to_token[row, :L] = (torch.randperm(rows - 1, generator=gen)[:L] + 1).to(torch.int32)
    owned = req_to_token[row, P:L].long()
    # per (layer, head) budgets anywhere from 0 to everything; layer 0 takes far more than its share
    counts = torch.randint(0, L - P + 1, (N_LAYERS, HKV), generator=gen)
    counts[0] = L - P
    sources = []
    for l in range(N_LAYERS):
        per_head = [space.cells(l, owned[torch.randperm(L - P, generator=gen)[:int(counts[l, h])]], h) for h in range(HKV)]
        sources.append(torch.cat(per_head))
    total = int(counts.sum())
    alloc = Allocator()
    K, mid, freed = pack_and_free(sources, owned, req_to_token, row, P, space, alloc, L)
    assert K == math.ceil(total / (N_LAYERS * HKV)) < max(math.ceil(int(c.sum()) / HKV) for c in counts)
    assert K * N_LAYERS * HKV - total < N_LAYERS * HKV  # at most one slot of rounding
    # every kept vector is where the layout now reads it, whichever layer's part holds it
    for l in range(N_LAYERS):
        assert mid[l].numel() == sources[l].numel()
        assert torch.equal(space.k_flat[mid[l]], original_k[sources[l]])
        assert torch.equal(space.v_flat[mid[l]], original_v[sources[l]])
    targets = torch.cat(mid)
    assert targets.unique().numel() == total  # no two kept cells share a cell
    held = owned[:K]
    allowed = torch.cat([space.cells(l, held, h) for l in range(N_LAYERS) for h in range(HKV)])
    assert bool(torch.isin(targets, allowed).all())  # only cells of the slots still held
    assert freed == L - P - K and sorted(alloc.freed) == sorted(owned[K:].tolist())
    assert torch.equal(req_to_token[row, P:P + K].long(), held) and (req_to_token[row, P + K:L] == 0).all()


def test_index_overflow_is_computed_for_the_pool_size():
    assert index_overflow(INT32_MAX + 1, "cuda") is None
    why = index_overflow(30 * (4_000_000 + 1) * 32, "cuda")  # 30 layers x 4M slots x 32 KV heads
    assert why is not None and "int32" in why and "--max-total-tokens" in why
    assert index_overflow(10 ** 12, "cpu") is None  # the torch kernels index with int64
