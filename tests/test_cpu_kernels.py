"""The pure-torch ``sgl_kernel`` CPU stand-ins (``lava_sglang/cpu/sgl_kernel_ops.py``: ``kv_ops``, ``spec_tree``, ``spec_locs``).

Each function is checked two ways:

* against the SGLang Triton kernel it stands in for, run in the Triton interpreter on CPU
  tensors (``TRITON_INTERPRET=1`` is set below, before Triton is imported, on machines
  without CUDA): both get copies of the same inputs, and every output buffer is compared
  whole, so cells that must stay untouched are checked too. Exceptions: the bit-packed
  tree-mask mode of ``build_tree_kernel_efficient_cpu`` (the Triton wrapper refuses it; it
  is checked against a per-element Python loop written from the CUDA kernel
  ``build_tree_efficient_partial_packed``);
* on small hand-computed cases of the documented semantics, with their edge cases
  (zero-length ranges, empty batches, out-of-row ranges that must raise).

The SGLang call sites themselves (``*_func`` wrappers, which pass positional or keyword
arguments exactly as the CPU engine does) are also exercised, through the stand-in.

SGLang's kernel modules are imported once with ``SGLANG_USE_CPU_ENGINE=1`` and the
stand-in first on ``sys.path`` (what ``lava_sglang.cpu.install_if_needed`` arranges in a
server); the environment variable, ``sys.path``, ``sys.modules["sgl_kernel"]``, SGLang's
cached platform and ``is_cpu()`` cache are restored afterwards so later tests in the same
process (which may start servers) see no trace of it.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton  # noqa: E402

from lava_sglang.cpu import STUBS_DIR  # noqa: E402
from lava_sglang.cpu import sgl_kernel_ops as K  # noqa: E402


def _import_sglang_kernels():
    saved_env = os.environ.get("SGLANG_USE_CPU_ENGINE")
    saved_path = list(sys.path)
    saved_mods = {k: v for k, v in sys.modules.items() if k == "sgl_kernel" or k.startswith("sgl_kernel.")}
    for name in saved_mods:
        sys.modules.pop(name)
    platforms = sys.modules.get("sglang.srt.platforms")
    saved_platform = getattr(platforms, "_current_platform", None)  # None: resolved on next use
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    sys.path.insert(0, STUBS_DIR)
    try:
        import sglang.kernels.ops.kvcache.cache_move as cache_move
        import sglang.kernels.ops.speculative.cache_locs as cache_locs
        import sglang.kernels.ops.speculative.eagle as eagle
        import sglang.kernels.ops.speculative.multi_layer_eagle as multi_layer_eagle
        import sglang.kernels.ops.speculative.spec_tree as spec_tree
        import sglang.srt.mem_cache.allocation as allocation
    finally:
        if saved_env is None:
            os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
        else:
            os.environ["SGLANG_USE_CPU_ENGINE"] = saved_env
        sys.path[:] = saved_path
        for name in [k for k in sys.modules if k == "sgl_kernel" or k.startswith("sgl_kernel.")]:
            sys.modules.pop(name)
        sys.modules.update(saved_mods)
        if "sglang.srt.platforms" in sys.modules:  # it resolved the platform as CPU above
            sys.modules["sglang.srt.platforms"]._current_platform = saved_platform
        try:
            from sglang.srt.utils import is_cpu

            is_cpu.cache_clear()
        except Exception:  # pragma: no cover
            pass
    return cache_move, cache_locs, eagle, multi_layer_eagle, spec_tree, allocation


cache_move, cache_locs, eagle, multi_layer_eagle, spec_tree, allocation = _import_sglang_kernels()

npow2 = triton.next_power_of_2


def interpreted(kernel):
    """The SGLang Triton kernel, provided it runs in the interpreter (else skip)."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        pytest.skip(
            "SGLang's Triton kernels were built in compiled mode (CUDA present, or triton imported "
            "before TRITON_INTERPRET=1): the interpreter comparison runs on CPU-only machines"
        )
    return kernel


def call_site(module):
    """Skip unless ``module`` was imported with the CPU engine (so its ``*_func`` calls the stand-in)."""
    if not getattr(module, "_is_cpu", False):
        pytest.skip(f"{module.__name__} was imported before the CPU engine was selected")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def clones(*tensors):
    return [t.clone() for t in tensors]


# ======================================================================================
# assign_req_to_token_pool_cpu


def test_assign_req_to_token_pool_hand():
    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    req_pool_indices = torch.tensor([2, 0, 3, 1])
    start = torch.tensor([1, 0, 5, 9])
    end = torch.tensor([4, 2, 5, 10])  # request 2 is zero-length
    out_cache_loc = torch.tensor([11, 12, 13, 21, 22, 41, 999, 999])
    K.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 10)
    expected = torch.zeros(4, 10, dtype=torch.int32)
    expected[2, 1:4] = torch.tensor([11, 12, 13], dtype=torch.int32)
    expected[0, 0:2] = torch.tensor([21, 22], dtype=torch.int32)
    expected[1, 9] = 41
    assert torch.equal(req_to_token, expected)


def test_assign_req_to_token_pool_edges():
    table = torch.full((2, 6), -5, dtype=torch.int64)
    before = table.clone()
    K.assign_req_to_token_pool_cpu(torch.tensor([], dtype=torch.int64), table, torch.tensor([]), torch.tensor([]),
                                   torch.tensor([], dtype=torch.int64), 6)
    K.assign_req_to_token_pool_cpu(torch.tensor([0, 1]), table, torch.tensor([3, 0]), torch.tensor([3, 0]),
                                   torch.tensor([], dtype=torch.int64), 6)
    assert torch.equal(table, before)
    with pytest.raises(ValueError):  # runs past the end of the row
        K.assign_req_to_token_pool_cpu(torch.tensor([0]), table, torch.tensor([4]), torch.tensor([7]),
                                       torch.arange(3), 6)
    with pytest.raises(ValueError):  # end before start
        K.assign_req_to_token_pool_cpu(torch.tensor([0]), table, torch.tensor([4]), torch.tensor([3]),
                                       torch.arange(3), 6)
    with pytest.raises(ValueError):  # pool_len is not the row width
        K.assign_req_to_token_pool_cpu(torch.tensor([0]), table, torch.tensor([0]), torch.tensor([1]),
                                       torch.arange(3), 5)


@pytest.mark.parametrize("seed", [0, 1])
def test_assign_req_to_token_pool_vs_triton(seed):
    kernel = interpreted(allocation.assign_req_to_token_pool)
    g = gen(seed)
    bs, pool_len, rows = 5, 80, 7
    req_pool_indices = torch.randperm(rows, generator=g)[:bs]
    lengths = torch.randint(0, 70, (bs,), generator=g)
    lengths[1] = 0
    start = torch.stack([torch.randint(0, pool_len - int(n) + 1, (1,), generator=g)[0] for n in lengths])
    end = start + lengths
    out_cache_loc = torch.randint(1, 10_000, (int(lengths.sum()) + 3,), generator=g)
    table = torch.randint(-100, 0, (rows, pool_len), generator=g, dtype=torch.int32)
    mine, ref = clones(table, table)
    K.assign_req_to_token_pool_cpu(req_pool_indices, mine, start, end, out_cache_loc, pool_len)
    kernel[(bs,)](req_pool_indices, ref, start, end, out_cache_loc, pool_len, npow2(bs))
    assert torch.equal(mine, ref)
    assert not torch.equal(mine, table)


def test_assign_req_to_token_pool_call_site():
    call_site(allocation)
    table = torch.zeros(3, 8, dtype=torch.int32)
    allocation.assign_req_to_token_pool_func(torch.tensor([1, 2]), table, torch.tensor([2, 0]), torch.tensor([4, 1]),
                                             torch.tensor([7, 8, 9]), 2)
    assert table[1].tolist() == [0, 0, 7, 8, 0, 0, 0, 0] and table[2].tolist() == [9] + [0] * 7


# ======================================================================================
# copy_all_layer_kv_cache_cpu


def _two_buffers(seed=0, slots=16):
    """A k-like float32 [slots, 2, 4] and a v-like float16 [slots, 3, 2] buffer (different row strides)."""
    g = gen(seed)
    k = torch.randn(slots, 2, 4, generator=g)
    v = torch.randn(slots, 3, 2, generator=g).half()
    return k, v


def _ptrs(*buffers):
    data_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in buffers])
    return data_ptrs, strides


def test_copy_all_layer_kv_cache_hand_overlapping():
    k, v = _two_buffers()
    k0, v0 = k.clone(), v.clone()
    src = torch.tensor([1, 2, 3])
    tgt = torch.tensor([2, 3, 4])  # overlaps src: every source row must be read before any write
    K.copy_all_layer_kv_cache_cpu(*_ptrs(k, v), tgt, src)
    for buf, old in ((k, k0), (v, v0)):
        expected = old.clone()
        expected[2], expected[3], expected[4] = old[1], old[2], old[3]
        assert torch.equal(buf, expected)


def test_copy_all_layer_kv_cache_hand_swap_and_edges():
    k, v = _two_buffers(1)
    k0, v0 = k.clone(), v.clone()
    K.copy_all_layer_kv_cache_cpu(*_ptrs(k, v), torch.tensor([5, 9]), torch.tensor([9, 5]))  # swap rows 5 and 9
    for buf, old in ((k, k0), (v, v0)):
        expected = old.clone()
        expected[5], expected[9] = old[9], old[5]
        assert torch.equal(buf, expected)
    k0, v0 = k.clone(), v.clone()
    empty = torch.tensor([], dtype=torch.int64)
    K.copy_all_layer_kv_cache_cpu(*_ptrs(k, v), empty, empty)  # zero locations: nothing
    assert torch.equal(k, k0) and torch.equal(v, v0)
    with pytest.raises(ValueError):
        K.copy_all_layer_kv_cache_cpu(*_ptrs(k, v), torch.tensor([1, 2]), torch.tensor([3]))
    with pytest.raises(ValueError):
        K.copy_all_layer_kv_cache_cpu(*_ptrs(k, v), torch.tensor([-1]), torch.tensor([3]))


@pytest.mark.parametrize("seed", [0, 1])
def test_copy_all_layer_kv_cache_vs_triton(seed):
    kernel = interpreted(cache_move.copy_all_layer_kv_cache_tiled)
    g = gen(seed)
    k, v = _two_buffers(seed, slots=40)
    k_ref, v_ref = k.clone(), v.clone()
    perm = torch.randperm(40, generator=g)
    src, tgt = perm[:12], perm[6:18]  # half of the targets are also sources
    K.copy_all_layer_kv_cache_cpu(*_ptrs(k, v), tgt, src)
    data_ptrs, strides = _ptrs(k_ref, v_ref)
    tile = 16
    grid = (2, triton.cdiv(int(strides.max()), tile))
    kernel[grid](data_ptrs, strides, tgt, src, src.numel(), npow2(src.numel()), BYTES_PER_TILE=tile)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_copy_all_layer_kv_cache_call_site():
    call_site(cache_move)
    k, v = _two_buffers(2)
    k0 = k.clone()
    locs = torch.tensor([3, 4, 0, 0])  # padded: only the first num_locs are used
    cache_move.copy_all_layer_kv_cache_func(*_ptrs(k, v), locs, torch.tensor([7, 8, 1, 1]), 2, 4, {})
    expected = k0.clone()
    expected[3], expected[4] = k0[7], k0[8]
    assert torch.equal(k, expected)


# ======================================================================================
# EAGLE trees: realistic inputs


def make_draft(bs, topk, steps, n, seed, vocab=50):
    """parent_list, top_scores_index, draft_tokens as SGLang's EAGLE draft loop produces them.

    Mirrors ``select_top_k_tokens`` (``srt/speculative/spec_utils.py``) and
    ``organize_draft_results`` (``srt/speculative/eagle_utils.py``) with random draft
    distributions.
    """
    g = gen(seed)
    probs = torch.softmax(torch.randn(bs, vocab, generator=g), -1)
    topk_p, topk_index = probs.topk(topk, dim=-1)
    scores_list = [topk_p.unsqueeze(1)]
    tokens_list = [topk_index]
    parents_list = [torch.arange(-1, topk).expand(bs, -1)]
    scores = topk_p
    for i in range(1, steps):
        probs = torch.softmax(torch.randn(bs * topk, vocab, generator=g), -1)
        p, idx = probs.topk(topk, dim=-1)
        expand = scores.unsqueeze(2) * p.view(-1, topk, topk)
        cs_p, cs_index = expand.flatten(1).topk(topk, dim=-1)
        scores_list.append(expand)
        tokens_list.append(idx.view(-1, topk * topk))
        parents_list.append(cs_index + (topk * topk * (i - 1) + topk))
        scores = cs_p
    score = torch.cat(scores_list, dim=1).flatten(1)
    tokens = torch.cat(tokens_list, dim=1)
    top_scores_index = torch.sort(torch.topk(score, n - 1, dim=-1).indices).values
    draft_tokens = torch.gather(tokens, 1, top_scores_index)
    if len(parents_list) > 1:
        parent_list = torch.cat(parents_list[:-1], dim=1)
    else:
        parent_list = torch.empty(bs, 0, dtype=torch.long)
    return parent_list.contiguous(), top_scores_index.contiguous(), draft_tokens


def tree_buffers(bs, n, seq_lens, mode, mask_dtype=torch.bool):
    if mode == 0:
        mask = torch.full((int(seq_lens.sum()) * n + n * n * bs,), True, dtype=mask_dtype)
    else:
        mask = torch.full((n * n * bs,), True, dtype=mask_dtype)
    retrieve = torch.full((3, bs, n), -1, dtype=torch.long)
    positions = torch.empty(bs * n, dtype=torch.long)
    return mask, positions, retrieve


def run_build(fn, parent_list, sel, seq_lens, topk, steps, n, mode, mask_dtype=torch.bool):
    mask, positions, retrieve = tree_buffers(sel.shape[0], n, seq_lens, mode, mask_dtype)
    fn(parent_list, sel, seq_lens, mask, positions, retrieve[0], retrieve[1], retrieve[2], topk, steps, n, mode)
    return mask, positions, retrieve


# The hand tree: topk=2, 3 steps, 5 draft tokens. Score indices 0-1 are step 0, 2-5 step 1,
# 6-9 step 2; step 1 kept score indices 3 and 4 (parent_list[3:5]). Selected: 0, 1 (children
# of the root), 3 (child of score index 0, i.e. draft token 1), 6 (child of score index 3,
# i.e. draft token 3). Tree: 0 -> {1, 2}, 1 -> {3}, 3 -> {4}.
HAND_PARENTS = torch.tensor([[-1, 0, 1, 3, 4]])
HAND_SELECTED = torch.tensor([[0, 1, 3, 6]])
HAND_MASK = torch.tensor(
    [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ],
    dtype=torch.bool,
)


@pytest.mark.parametrize("mode", [0, 1])
def test_build_tree_hand(mode):
    parents = HAND_PARENTS.repeat(2, 1)
    sel = HAND_SELECTED.repeat(2, 1)
    seq_lens = torch.tensor([7, 3])
    mask, positions, retrieve = tree_buffers(2, 5, seq_lens, mode, torch.uint8)
    mask.fill_(7)  # prefix cells must stay untouched
    K.build_tree_kernel_efficient_cpu(parents, sel, seq_lens, mask, positions, *retrieve, 2, 3, 5, mode)
    assert retrieve[0].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert retrieve[1].tolist() == [[1, 3, -1, 4, -1]] * 2
    assert retrieve[2].tolist() == [[-1, 2, -1, -1, -1]] * 2
    assert positions.tolist() == [7, 8, 8, 9, 10, 3, 4, 4, 5, 6]
    tree = HAND_MASK.to(torch.uint8)
    if mode == 1:
        assert torch.equal(mask.view(2, 5, 5), torch.stack([tree, tree]))
    else:
        rows0 = mask[: 5 * 12].view(5, 12)
        rows1 = mask[5 * 12:].view(5, 8)
        assert mask.numel() == 5 * 12 + 5 * 8
        assert (rows0[:, :7] == 7).all() and torch.equal(rows0[:, 7:], tree)
        assert (rows1[:, :3] == 7).all() and torch.equal(rows1[:, 3:], tree)


def test_build_tree_hand_chain_and_single_token():
    # topk=1 chain of 3 drafts: 0 -> 1 -> 2 -> 3.
    parents = torch.tensor([[-1, 0, 1]])
    sel = torch.tensor([[0, 1, 2]])
    mask, positions, retrieve = run_build(K.build_tree_kernel_efficient_cpu, parents, sel, torch.tensor([4]), 1, 3, 4, 1)
    assert torch.equal(mask.view(4, 4), torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert positions.tolist() == [4, 5, 6, 7]
    assert retrieve[1].tolist() == [[1, 2, 3, -1]] and retrieve[2].tolist() == [[-1] * 4]
    # One draft token (root only), depth 1, empty parent_list.
    mask, positions, retrieve = run_build(
        K.build_tree_kernel_efficient_cpu, torch.empty(2, 0, dtype=torch.long), torch.empty(2, 0, dtype=torch.long),
        torch.tensor([5, 2]), 1, 1, 1, 0,
    )
    assert positions.tolist() == [5, 2] and retrieve[0].tolist() == [[0], [1]]
    assert retrieve[1].tolist() == [[-1], [-1]] and mask.all()
    # Empty batch: nothing happens.
    K.build_tree_kernel_efficient_cpu(*(torch.empty(0, 0, dtype=torch.long),) * 2, torch.empty(0, dtype=torch.long),
                                      torch.empty(0, dtype=torch.bool), torch.empty(0, dtype=torch.long),
                                      *torch.empty(3, 0, 4, dtype=torch.long), 2, 2, 4, 0)


def test_build_tree_keeps_existing_list_head():
    """A list head already present on entry is pushed down as the last child's sibling (as on GPU)."""
    mask, positions, retrieve = tree_buffers(1, 5, torch.tensor([7]), 1)
    retrieve[1, 0, 0] = 42
    K.build_tree_kernel_efficient_cpu(HAND_PARENTS, HAND_SELECTED, torch.tensor([7]), mask, positions, *retrieve, 2, 3, 5, 1)
    assert retrieve[1].tolist() == [[1, 3, -1, 4, -1]]
    assert retrieve[2].tolist() == [[-1, 2, 42, -1, -1]]


BUILD_CASES = [
    # (bs, topk, steps, n)
    (3, 1, 1, 2),
    (3, 1, 3, 4),
    (2, 2, 3, 5),
    (3, 4, 3, 8),
    (2, 4, 4, 16),
    (2, 8, 2, 12),
]


@pytest.mark.parametrize("bs,topk,steps,n", BUILD_CASES)
@pytest.mark.parametrize("mode", [0, 1])
def test_build_tree_vs_triton(bs, topk, steps, n, mode):
    interpreted(spec_tree.sgl_build_tree_kernel_efficient_triton)
    parent_list, sel, _ = make_draft(bs, topk, steps, n, seed=1000 * n + topk)
    seq_lens = torch.randint(1, 9, (bs,), generator=gen(n))
    mine = run_build(K.build_tree_kernel_efficient_cpu, parent_list, sel, seq_lens, topk, steps, n, mode)
    ref = run_build(spec_tree.sgl_build_tree_kernel_triton, parent_list, sel, seq_lens, topk, steps, n, mode)
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)


def test_build_tree_invalid_parent_vs_triton():
    """A token whose parent was not selected gets no parent link, on both sides."""
    interpreted(spec_tree.sgl_build_tree_kernel_efficient_triton)
    sel = torch.tensor([[0, 1, 6, 3]])  # score index 6 hangs under parent_list[3] = 3, chosen after it
    sel_missing = torch.tensor([[0, 1, 2, 8]])  # parent_list[4] = 4 is not among the selected
    for s in (sel, sel_missing):
        for mode in (0, 1):
            mine = run_build(K.build_tree_kernel_efficient_cpu, HAND_PARENTS, s, torch.tensor([5]), 2, 3, 5, mode)
            ref = run_build(spec_tree.sgl_build_tree_kernel_triton, HAND_PARENTS, s, torch.tensor([5]), 2, 3, 5, mode)
            for a, b in zip(mine, ref):
                assert torch.equal(a, b)


def packed_reference(parent_list, sel, seq_lens, topk, depth, n):
    """Per-element loop of the CUDA ``build_tree_efficient_partial_packed`` mask (bytes per row)."""
    nbytes = 4 if n > 16 else (2 if n > 8 else 1)
    out = torch.zeros(sel.shape[0] * n * nbytes, dtype=torch.uint8)
    for b in range(sel.shape[0]):
        S, P = sel[b].tolist(), parent_list[b].tolist()
        for tid in range(n):
            base = (b * n + tid) * nbytes
            out[base] = 1
            if tid == 0:
                continue
            cur = tid - 1
            for _ in range(depth):
                out[base + (cur + 1) // 8] |= 1 << ((cur + 1) % 8)
                tb = S[cur] // topk
                if tb == 0:
                    break
                cur = S.index(P[tb])
    return out


@pytest.mark.parametrize("bs,topk,steps,n", [(2, 2, 3, 5), (2, 4, 3, 12), (2, 4, 4, 20)])
def test_build_tree_bitpacked_vs_loop(bs, topk, steps, n):
    parent_list, sel, _ = make_draft(bs, topk, steps, n, seed=n)
    seq_lens = torch.tensor([3] * bs)
    dtype = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32}[4 if n > 16 else (2 if n > 8 else 1)]
    mask = torch.zeros(bs * n, dtype=dtype)
    positions = torch.empty(bs * n, dtype=torch.long)
    retrieve = torch.full((3, bs, n), -1, dtype=torch.long)
    K.build_tree_kernel_efficient_cpu(parent_list, sel, seq_lens, mask, positions, *retrieve, topk, steps, n, 2)
    assert torch.equal(mask.view(torch.uint8), packed_reference(parent_list, sel, seq_lens, topk, steps, n))
    # Links and positions are the same as in the unpacked modes.
    _, positions1, retrieve1 = run_build(K.build_tree_kernel_efficient_cpu, parent_list, sel, seq_lens, topk, steps, n, 1)
    assert torch.equal(positions, positions1) and torch.equal(retrieve, retrieve1)


def test_build_tree_call_site():
    call_site(spec_tree)
    parents, sel = HAND_PARENTS, HAND_SELECTED
    mask, positions, retrieve = tree_buffers(1, 5, torch.tensor([7]), 1)
    spec_tree.build_tree_kernel_efficient_func(parents, sel, torch.tensor([7]), mask, positions, *retrieve, 2, 3, 5,
                                               spec_tree.TreeMaskMode.QLEN_ONLY)
    assert torch.equal(mask.view(5, 5), HAND_MASK) and positions.tolist() == [7, 8, 8, 9, 10]


# ======================================================================================
# verify_tree_greedy_cpu


def verify_buffers(bs, n, num_spec):
    predicts = torch.zeros(bs * n, dtype=torch.int32)
    accept_index = torch.full((bs, num_spec), -1, dtype=torch.int32)
    accept_token_num = torch.full((bs,), -7, dtype=torch.int32)
    return predicts, accept_index, accept_token_num


def run_verify(fn, candidates, retrieve, target_predict, num_spec, keywords_as="retrive"):
    bs, n = candidates.shape
    predicts, accept_index, accept_token_num = verify_buffers(bs, n, num_spec)
    names = [f"{keywords_as}_index", f"{keywords_as}_next_token", f"{keywords_as}_next_sibling"]
    fn(predicts=predicts, accept_index=accept_index, accept_token_num=accept_token_num, candidates=candidates,
       **dict(zip(names, retrieve)), target_predict=target_predict)
    return predicts, accept_index, accept_token_num


def hand_tree_retrieve():
    _, _, retrieve = run_build(K.build_tree_kernel_efficient_cpu, HAND_PARENTS, HAND_SELECTED, torch.tensor([7]), 2, 3, 5, 1)
    return retrieve


def test_verify_tree_greedy_hand():
    retrieve = hand_tree_retrieve()  # 0 -> {1, 2}, 1 -> {3}, 3 -> {4}
    candidates = torch.tensor([[100, 11, 12, 13, 14]])

    def target(**at):
        t = torch.full((1, 5), 77, dtype=torch.long)
        for i, tok in at.items():
            t[0, int(i[1:])] = tok
        return t

    # Match on the root's second child (a sibling walk), which has no children: stop there.
    p, a, c = run_verify(K.verify_tree_greedy_cpu, candidates, retrieve, target(t0=12, t2=99), 4)
    assert a.tolist() == [[0, 2, -1, -1]] and c.tolist() == [1]
    assert p.tolist() == [12, 0, 99, 0, 0]
    # Full chain 0 -> 1 -> 3 -> 4, then the bonus token after 4.
    p, a, c = run_verify(K.verify_tree_greedy_cpu, candidates, retrieve, target(t0=11, t1=13, t3=14, t4=55), 4)
    assert a.tolist() == [[0, 1, 3, 4]] and c.tolist() == [3]
    assert p.tolist() == [11, 13, 0, 14, 55]
    # Same, but only 3 accept slots: stops after two drafts, the bonus is the target after 3.
    p, a, c = run_verify(K.verify_tree_greedy_cpu, candidates, retrieve, target(t0=11, t1=13, t3=14, t4=55), 3)
    assert a.tolist() == [[0, 1, 3]] and c.tolist() == [2]
    assert p.tolist() == [11, 13, 0, 14, 0]
    # Nothing matches: only the bonus token.
    p, a, c = run_verify(K.verify_tree_greedy_cpu, candidates, retrieve, target(t0=50), 4)
    assert a.tolist() == [[0, -1, -1, -1]] and c.tolist() == [0] and p.tolist() == [50, 0, 0, 0, 0]
    # One accept slot: no traversal at all.
    p, a, c = run_verify(K.verify_tree_greedy_cpu, candidates, retrieve, target(t0=11), 1)
    assert a.tolist() == [[0]] and c.tolist() == [0] and p.tolist() == [11, 0, 0, 0, 0]


@pytest.mark.parametrize("bs,topk,steps,n", BUILD_CASES)
def test_verify_tree_greedy_vs_triton(bs, topk, steps, n):
    interpreted(spec_tree.verify_tree_greedy_kernel_triton)
    parent_list, sel, draft_tokens = make_draft(bs, topk, steps, n, seed=7 * n + topk)
    draft_tokens = draft_tokens % 4
    _, _, retrieve = run_build(K.build_tree_kernel_efficient_cpu, parent_list, sel, torch.tensor([5] * bs), topk, steps, n, 1)
    g = gen(n + topk)
    for trial in range(3):
        candidates = torch.cat([torch.randint(0, 4, (bs, 1), generator=g), draft_tokens], dim=1)
        # A tiny vocabulary so that drafts often match: long accepted paths, sibling walks, early stops.
        target_predict = torch.randint(0, 4 if trial < 2 else 2, (bs, n), generator=g)
        mine = run_verify(K.verify_tree_greedy_cpu, candidates, retrieve, target_predict, steps + 1)
        ref = run_verify(spec_tree.verify_tree_greedy_triton, candidates, retrieve, target_predict, steps + 1, "retrieve")
        for a, b in zip(mine, ref):
            assert torch.equal(a, b)


def test_verify_tree_greedy_call_site():
    call_site(spec_tree)
    retrieve = hand_tree_retrieve()
    candidates = torch.tensor([[100, 11, 12, 13, 14]])
    target = torch.tensor([[11, 13, 77, 14, 55]])
    predicts, accept_index, accept_token_num = verify_buffers(1, 5, 4)
    out = spec_tree.verify_tree_greedy_func(
        predicts=predicts, accept_index=accept_index, accept_token_num=accept_token_num, candidates=candidates,
        retrieve_index=retrieve[0], retrieve_next_token=retrieve[1], retrieve_next_sibling=retrieve[2],
        target_predict=target, topk=2,
    )
    assert out[0] is predicts and accept_index.tolist() == [[0, 1, 3, 4]] and accept_token_num.tolist() == [3]


# ======================================================================================
# fill_accept_out_cache_loc_cpu, fill_bonus_tokens_cpu


def test_fill_accept_out_cache_loc_hand():
    accept_index = torch.tensor([[0, 2, -1], [3, -1, -1], [6, 7, 8]], dtype=torch.int32)
    out_cache_loc = torch.arange(100, 109)
    out = torch.zeros(9, dtype=torch.int64)
    K.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, out)
    assert out.tolist() == [100, 102, 103, 106, 107, 108, 0, 0, 0]
    out2 = torch.zeros(9, dtype=torch.int64)
    K.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, out2, 3)  # explicit size: first row only
    assert out2.tolist() == [100, 102, 0, 0, 0, 0, 0, 0, 0]
    K.fill_accept_out_cache_loc_cpu(torch.full((2, 3), -1, dtype=torch.int32), out_cache_loc, out2)
    K.fill_accept_out_cache_loc_cpu(torch.empty(0, 3, dtype=torch.int32), out_cache_loc, out2)
    assert out2.tolist() == [100, 102, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fill_accept_out_cache_loc_vs_triton(seed):
    kernel = interpreted(eagle.fill_accept_out_cache_loc)
    g = gen(seed)
    bs, width, n = 5, 4, 6
    lens = torch.randint(1, width + 1, (bs,), generator=g)
    accept_index = torch.full((bs, width), -1, dtype=torch.int32)
    for b in range(bs):
        accept_index[b, : lens[b]] = (b * n + torch.randperm(n, generator=g)[: lens[b]]).to(torch.int32)
    out_cache_loc = torch.randint(1, 1000, (bs * n,), generator=g)
    mine = torch.full((bs * width,), -3, dtype=torch.int64)
    ref = mine.clone()
    K.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, mine)
    size = accept_index.numel()
    kernel[(size,)](accept_index, out_cache_loc, ref, npow2(size))
    assert torch.equal(mine, ref)


def test_fill_accept_out_cache_loc_call_site():
    call_site(eagle)
    out = torch.zeros(6, dtype=torch.int64)
    eagle.fill_accept_out_cache_loc_func(torch.tensor([[1, -1, -1], [4, 5, -1]], dtype=torch.int32),
                                         torch.arange(10, 16), out, 6)
    assert out.tolist() == [11, 14, 15, 0, 0, 0]


def test_fill_bonus_tokens_hand():
    accept_tokens = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]], dtype=torch.int32)
    accept_lens = torch.tensor([1, 3, 2], dtype=torch.int32)
    bonus = torch.zeros(3, dtype=torch.int32)
    K.fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus, 3)
    assert bonus.tolist() == [5, 10, 12]
    K.fill_bonus_tokens_cpu(accept_tokens, torch.empty(0, dtype=torch.int32), bonus, 3)  # empty batch
    assert bonus.tolist() == [5, 10, 12]
    with pytest.raises(ValueError):  # accept length 0 would read before the tensor
        K.fill_bonus_tokens_cpu(accept_tokens, torch.tensor([0, 1, 1]), bonus, 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_fill_bonus_tokens_vs_triton(seed):
    kernel = interpreted(eagle.fill_bonus_tokens)
    g = gen(seed)
    bs, width = 6, 5
    accept_tokens = torch.randint(0, 30_000, (bs, width), generator=g, dtype=torch.int32)
    accept_lens = torch.randint(1, width + 1, (bs,), generator=g, dtype=torch.int32)
    mine = torch.full((bs,), -1, dtype=torch.int32)
    ref = mine.clone()
    K.fill_bonus_tokens_cpu(accept_tokens, accept_lens, mine, width)
    kernel[(bs,)](accept_tokens, accept_lens, ref, width)
    assert torch.equal(mine, ref)


def test_fill_bonus_tokens_call_site():
    call_site(eagle)
    bonus = torch.zeros(2, dtype=torch.int32)
    eagle.fill_bonus_tokens_func(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), torch.tensor([2, 1], dtype=torch.int32),
                                 bonus, 2, 2)
    assert bonus.tolist() == [2, 3]


# ======================================================================================
# assign_draft_cache_locs_contiguous_cpu, assign_extend_cache_locs_cpu


def test_assign_draft_cache_locs_contiguous_hand():
    table = torch.arange(40, dtype=torch.int32).view(4, 10)
    out = torch.full((2 * 2 * 2 + 1,), -1, dtype=torch.int64)
    K.assign_draft_cache_locs_contiguous_cpu(torch.tensor([3, 1]), table, torch.tensor([2, 6]), out, 10, 2, 2)
    assert out.tolist() == [32, 33, 34, 35, 16, 17, 18, 19, -1]
    with pytest.raises(ValueError):  # 7 + 4 > 10: past the end of the row
        K.assign_draft_cache_locs_contiguous_cpu(torch.tensor([0]), table, torch.tensor([7]), out, 10, 2, 2)
    K.assign_draft_cache_locs_contiguous_cpu(torch.tensor([], dtype=torch.int64), table, torch.tensor([], dtype=torch.int64),
                                             out, 10, 2, 2)
    assert out.tolist() == [32, 33, 34, 35, 16, 17, 18, 19, -1]


@pytest.mark.parametrize("topk,steps", [(1, 3), (4, 3), (8, 20)])
def test_assign_draft_cache_locs_contiguous_vs_triton(topk, steps):
    kernel = interpreted(cache_locs.assign_draft_cache_locs_contiguous)
    g = gen(topk * steps)
    bs, pool_len, rows = 4, 300, 6
    table = torch.randint(1, 50_000, (rows, pool_len), generator=g, dtype=torch.int32)
    req_pool_indices = torch.randperm(rows, generator=g)[:bs]
    seq_lens = torch.randint(0, pool_len - topk * steps + 1, (bs,), generator=g)
    mine = torch.full((bs * topk * steps,), -1, dtype=torch.int64)
    ref = mine.clone()
    K.assign_draft_cache_locs_contiguous_cpu(req_pool_indices, table, seq_lens, mine, pool_len, topk, steps)
    kernel[(bs,)](req_pool_indices, table, seq_lens, ref, pool_len, topk, steps, BS=bs)
    assert torch.equal(mine, ref)


def test_assign_draft_cache_locs_contiguous_call_site():
    call_site(cache_locs)
    table = torch.arange(20, dtype=torch.int32).view(2, 10)
    out = torch.zeros(4, dtype=torch.int64)
    cache_locs.assign_draft_cache_locs_contiguous_func(torch.tensor([1, 0]), table, torch.tensor([3, 8]), out, 1, 2)
    assert out.tolist() == [13, 14, 8, 9]


def test_assign_extend_cache_locs_hand():
    table = torch.arange(40, dtype=torch.int32).view(4, 10)
    out = torch.full((8,), -1, dtype=torch.int64)
    K.assign_extend_cache_locs_cpu(torch.tensor([2, 0, 3]), table, torch.tensor([1, 4, 9]), torch.tensor([4, 4, 10]),
                                   out, 10)  # request 1 is zero-length
    assert out.tolist() == [21, 22, 23, 39, -1, -1, -1, -1]
    with pytest.raises(ValueError):
        K.assign_extend_cache_locs_cpu(torch.tensor([0]), table, torch.tensor([8]), torch.tensor([11]), out, 10)
    K.assign_extend_cache_locs_cpu(torch.tensor([0, 1]), table, torch.tensor([2, 5]), torch.tensor([2, 5]), out, 10)
    assert out.tolist() == [21, 22, 23, 39, -1, -1, -1, -1]


@pytest.mark.parametrize("seed", [0, 1])
def test_assign_extend_cache_locs_vs_triton(seed):
    kernel = interpreted(cache_locs.assign_extend_cache_locs)
    g = gen(seed)
    bs, pool_len, rows = 5, 90, 8
    table = torch.randint(1, 50_000, (rows, pool_len), generator=g, dtype=torch.int32)
    req_pool_indices = torch.randperm(rows, generator=g)[:bs]
    lengths = torch.randint(0, 75, (bs,), generator=g)
    lengths[2] = 0
    start = torch.stack([torch.randint(0, pool_len - int(n) + 1, (1,), generator=g)[0] for n in lengths])
    end = start + lengths
    mine = torch.full((int(lengths.sum()) + 4,), -1, dtype=torch.int64)
    ref = mine.clone()
    K.assign_extend_cache_locs_cpu(req_pool_indices, table, start, end, mine, pool_len)
    kernel[(bs,)](req_pool_indices, table, start, end, ref, pool_len, npow2(bs))
    assert torch.equal(mine, ref)


def test_assign_extend_cache_locs_call_sites():
    call_site(cache_locs)
    table = torch.arange(30, dtype=torch.int32).view(3, 10)
    out = cache_locs.assign_extend_cache_locs_func(torch.tensor([2, 0]), table, torch.tensor([4, 0]), torch.tensor([6, 2]),
                                                   2, 2, "cpu")
    assert out.dtype == torch.int64 and out.tolist() == [24, 25, 0, 1]
    # fill_front_out_cache_loc_func: the first num_front[i] slots of each request's window.
    front = torch.full((6,), -1, dtype=torch.int64)
    cache_locs.fill_front_out_cache_loc_func(torch.tensor([2, 1]), torch.tensor([10, 11, 12, 20, 21, 22]), front)
    assert front.tolist() == [10, 11, 20, -1, -1, -1]


# ======================================================================================
# rotate_input_ids_cpu


def test_rotate_input_ids_hand():
    ids = torch.arange(10, 18)  # requests: [10 11 12 13] [14] [15 16 17]
    K.rotate_input_ids_cpu(ids, torch.tensor([0, 4, 5]), torch.tensor([4, 1, 3]), torch.tensor([[100], [200], [300]]))
    assert ids.tolist() == [11, 12, 13, 100, 200, 16, 17, 300]
    ids = torch.arange(10, 18)
    K.rotate_input_ids_cpu(ids, torch.tensor([0, 4, 5]), torch.tensor([4, 0, 3], dtype=torch.int32),
                           torch.tensor([100, 200, 300]), torch.tensor([1, 4, 6]))
    # shifts as above (the empty request does nothing), new tokens at the absolute select indices
    assert ids.tolist() == [11, 100, 13, 13, 14, 16, 300, 17]
    ids = torch.arange(5)
    K.rotate_input_ids_cpu(ids, torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64),
                           torch.tensor([], dtype=torch.int64))
    assert ids.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("with_select", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_rotate_input_ids_vs_triton(with_select, seed):
    kernel = interpreted(multi_layer_eagle.rotate_input_ids_kernel)
    g = gen(seed)
    bs = 5
    lens = torch.randint(0, 20, (bs,), generator=g)
    lens[1] = 0
    lens[3] = 1
    starts = torch.cumsum(lens, 0) - lens + torch.arange(bs)  # gaps of one token between segments
    ids = torch.randint(0, 30_000, (int(lens.sum()) + bs + 2,), generator=g)
    topk_index = torch.randint(0, 30_000, (bs, 1), generator=g)
    select = None
    if with_select:
        select = starts + (torch.rand(bs, generator=g) * lens.clamp(min=1)).long()
    mine, ref = ids.clone(), ids.clone()
    K.rotate_input_ids_cpu(mine, starts, lens, topk_index, select)
    kernel[(bs,)](ref, starts, lens, topk_index, select, BLOCK_SIZE=4096 if with_select else 8)
    assert torch.equal(mine, ref)


def test_rotate_input_ids_call_site():
    call_site(multi_layer_eagle)
    ids = torch.tensor([1, 2, 3, 4])
    out = multi_layer_eagle.rotate_input_ids(ids, torch.tensor([0, 2]), torch.tensor([2, 2]), torch.tensor([[9], [8]]))
    assert out is ids and ids.tolist() == [2, 9, 4, 8]


# ======================================================================================
# the stand-in package exports them all


def test_stand_in_exports_every_function():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_lava_sgl_kernel_probe", os.path.join(STUBS_DIR, "sgl_kernel", "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in (
        "assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu", "build_tree_kernel_efficient_cpu",
        "verify_tree_greedy_cpu", "fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu",
        "assign_draft_cache_locs_contiguous_cpu", "assign_extend_cache_locs_cpu", "rotate_input_ids_cpu",
    ):
        assert getattr(module, name) is getattr(K, name)
