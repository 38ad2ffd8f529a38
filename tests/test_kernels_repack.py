"""Repack (gather then scatter, in place): Triton kernel (interpreter on CPU) vs the torch twin
vs a naive copy. Exact equality (pure data movement).

GPU: ``pytest -m gpu tests/test_kernels*.py`` runs the compiled kernel on CUDA (see
tests/test_kernels_decode.py).
"""

import os

import torch

# Triton kernels on CPU tensors run in Triton's interpreter (lava_sglang/kernels/_triton_utils.py
# picks it per device), whether or not TRITON_INTERPRET=1 is set; the environment is not
# modified here (see the note in tests/test_kernels_decode.py).

import pytest  # noqa: E402

from lava_sglang.kernels.repack import repack_cells, repack_cells_torch, repack_layers  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def naive(k, v, src, dst):
    k2, v2 = k.clone(), v.clone()
    snap_k, snap_v = k.clone(), v.clone()
    for s, d in zip(src.tolist(), dst.tolist()):
        k2[d] = snap_k[s]
        v2[d] = snap_v[s]
    return k2, v2


def pack_case(slots, hkv, D, dtype, P, L, keep_per_head, seed=0, device="cpu"):
    """A request's row occupying ``row[P:L]``; each head keeps ``keep_per_head`` private
    positions; targets are the cells of the first ``K`` private slots (``docs/design.md``, "Exact packing")."""
    gen = torch.Generator().manual_seed(seed)
    kbuf = torch.randn(slots, hkv, D, generator=gen).to(dtype)
    vbuf = torch.randn(slots, hkv, D, generator=gen).to(dtype)
    row = torch.randperm(slots - 1, generator=gen)[:L] + 1
    src = []
    for h in range(hkv):
        pos = torch.sort(torch.randperm(L - P, generator=gen)[:keep_per_head]).values + P
        src.append(row[pos] * hkv + h)
    src = torch.cat(src)
    n = src.numel()
    K = -(-n // hkv)
    dst_slots = row[P: P + K]
    dst = (dst_slots[:, None] * hkv + torch.arange(hkv)).reshape(-1)[:n]
    return [t.to(device) for t in (kbuf, vbuf, src, dst)]


CASES = [
    # slots, hkv, D, P, L, keep
    (64, 1, 64, 0, 40, 0),
    (64, 1, 64, 0, 40, 1),
    (64, 3, 64, 5, 50, 20),
    (128, 8, 128, 0, 100, 33),
    (300, 4, 128, 10, 250, 200),
    (64, 2, 64, 0, 40, 40),  # keep everything: identity-like moves
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_repack_matches_naive(dtype, case):
    slots, hkv, D, P, L, keep = case
    kbuf, vbuf, src, dst = pack_case(slots, hkv, D, dtype, P, L, keep, seed=hash(case) % 1000)
    k_flat, v_flat = kbuf.view(-1, D), vbuf.view(-1, D)
    ref_k, ref_v = naive(k_flat, v_flat, src, dst)
    for impl in ("torch", "triton"):
        k2, v2 = k_flat.clone(), v_flat.clone()
        repack_cells(k2, v2, src, dst, impl=impl)
        assert torch.equal(k2, ref_k) and torch.equal(v2, ref_v), impl
        # int32 indices
        k3, v3 = k_flat.clone(), v_flat.clone()
        repack_cells(k3, v3, src.int(), dst.int(), impl=impl)
        assert torch.equal(k3, ref_k) and torch.equal(v3, ref_v), impl


def test_overlap_chain():
    """Targets are sources of other moves (a rotation): only gather-then-scatter is right."""
    D = 64
    k = torch.randn(40, D)
    v = torch.randn(40, D)
    src = torch.arange(0, 30)
    dst = (src + 1) % 30  # cell i -> i+1 (rotation)
    ref_k, ref_v = naive(k, v, src, dst)
    for impl in ("torch", "triton"):
        k2, v2 = k.clone(), v.clone()
        repack_cells(k2, v2, src, dst, impl=impl)
        assert torch.equal(k2, ref_k) and torch.equal(v2, ref_v)


def test_repack_layers_and_views():
    """Flat views of [slots, Hkv, D] pools are modified in place (the pool sees the change)."""
    pools_k = [torch.randn(50, 2, 64) for _ in range(3)]
    pools_v = [torch.randn(50, 2, 64) for _ in range(3)]
    srcs = [torch.tensor([10, 11, 40]), torch.tensor([7]), torch.tensor([], dtype=torch.long)]
    dsts = [torch.tensor([2, 3, 4]), torch.tensor([2]), torch.tensor([], dtype=torch.long)]
    refs = [naive(k.view(-1, 64), v.view(-1, 64), s, d) for k, v, s, d in zip(pools_k, pools_v, srcs, dsts)]
    repack_layers([k.view(-1, 64) for k in pools_k], [v.view(-1, 64) for v in pools_v], srcs, dsts, impl="triton")
    for (rk, rv), k, v in zip(refs, pools_k, pools_v):
        assert torch.equal(k.view(-1, 64), rk) and torch.equal(v.view(-1, 64), rv)


def test_bad_args():
    k = torch.zeros(4, 64)
    with pytest.raises(ValueError):
        repack_cells(k, k, torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError):
        repack_cells(k.view(2, 2, 64), k.view(2, 2, 64), torch.tensor([1]), torch.tensor([1]))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_repack(dtype):
    kbuf, vbuf, src, dst = pack_case(4096, 8, 128, dtype, 100, 3000, 700, device="cuda")
    k1, v1 = kbuf.view(-1, 128).clone(), vbuf.view(-1, 128).clone()
    k2, v2 = k1.clone(), v1.clone()
    repack_cells_torch(k1, v1, src, dst)
    repack_cells(k2, v2, src, dst, impl="triton")
    torch.cuda.synchronize()
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
