"""Queries over a compressed layout (engine/layout.py) and the re-selection of a continued
conversation (engine/continuation.py), on real tensors in a pool laid out as SGLang's.

* decode over a layout and the extend path give the same attention for a one-token chunk;
* a multi-token chunk over prefix + kept cells + appended tokens matches a per-query reference;
* re-selecting a conversation's history moves exactly the selected keys and values, frees the
  rest and keeps memory bounded over many turns.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lava_sglang.config import CompressionConfig
from lava_sglang.engine.compress import compress_request
from lava_sglang.engine.cells import pool_cells
from lava_sglang.engine.continuation import reselect
from lava_sglang.engine.layout import LayoutEntry, LayoutPlan, attend, state_mid, uncompressed_entry
from lava_sglang.engine.state import PendingRequest
from lava_sglang.kernels.pair_indices import build_pair_indices

N_LAYERS, HKV, G, D = 3, 2, 3, 16
HQ = HKV * G


class Pool:
    layer_num = N_LAYERS

    def __init__(self, n_slots: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.k = torch.randn(N_LAYERS, n_slots, HKV, D, generator=gen)
        self.v = torch.randn(N_LAYERS, n_slots, HKV, D, generator=gen)

    def get_key_buffer(self, layer_id):
        return self.k[layer_id]

    def get_value_buffer(self, layer_id):
        return self.v[layer_id]


class Allocator:
    def __init__(self):
        self.freed = []

    def free(self, slots):
        self.freed.extend(int(x) for x in slots)


def layer(layer_id):
    return SimpleNamespace(layer_id=layer_id, tp_q_head_num=HQ, tp_k_head_num=HKV, qk_head_dim=D, v_head_dim=D,
                           scaling=D ** -0.5)


def reference(q, pool, layer_id, visible):
    """``visible[h]``: list of slots head ``h`` reads, in order; the last ``n`` are the queries' own."""
    n = q.shape[0]
    out = torch.zeros(n, HQ, D, dtype=torch.float64)
    for hq in range(HQ):
        h = hq // G
        slots = torch.tensor(visible[h])
        keys = pool.k[layer_id, slots, h].double()
        values = pool.v[layer_id, slots, h].double()
        for i in range(n):
            upto = len(slots) - n + i + 1
            p = torch.softmax(keys[:upto] @ q[i, hq].double() * D ** -0.5, dim=0)
            out[i, hq] = p @ values[:upto]
    return out


def compressed_row(seed=0, P=6, L=60, budget=16, window=4, extra=0):
    """A request of ``L`` prompt tokens (shared prefix ``P``) compressed by LAVa in a real pool."""
    torch.manual_seed(seed)
    n_slots = 400
    pool = Pool(n_slots, seed)
    req_to_token = torch.zeros(4, 512, dtype=torch.int32)
    row = 2
    perm = torch.randperm(n_slots - 1)[:L + extra] + 1
    req_to_token[row, :L + extra] = perm.to(torch.int32)
    cfg = CompressionConfig(policy="lava", budget=budget, window=window)
    pending = PendingRequest(rid="a", row=row, config=cfg, prefix_len=P, prompt_len=L)
    pending.queries = [torch.randn(window, HQ, D) for _ in range(N_LAYERS)]
    alloc = Allocator()
    state = compress_request(pending, req_to_token, pool, alloc)
    assert state is not None
    return pool, req_to_token, state, alloc, perm


def test_one_token_extend_equals_decode():
    pool, req_to_token, state, _, _ = compressed_row(extra=5)
    S = state.prompt_len + 5
    other_row = 1
    req_to_token[other_row, :30] = torch.arange(300, 330, dtype=torch.int32)
    entries = [LayoutEntry(state.row, state.prefix_len, state.prompt_len, S, 1, 0, state_mid(state)),
               uncompressed_entry(other_row, 30, 1, 1)]
    q = torch.randn(2, HQ * D)
    for lid in range(N_LAYERS):
        decode = LayoutPlan(entries, req_to_token, pool_cells(pool))
        assert decode.decode_only
        extend = LayoutPlan([LayoutEntry(e.row, e.prefix_end, e.suffix_start, e.seq_end, e.n_q, e.q_offset, e.mid)
                             for e in reversed(entries)], req_to_token, pool_cells(pool))
        assert not extend.decode_only  # out of batch order: the extend kernel on the same one-token entries
        a = attend(layer(lid), q, decode, pool)
        b = attend(layer(lid), q, extend, pool)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_q", [1, 7])
def test_extend_chunk_over_layout_matches_reference(n_q):
    pool, req_to_token, state, _, perm = compressed_row(extra=12)
    P, L = state.prefix_len, state.prompt_len
    S = L + 12
    other = 3  # an uncompressed request first in the batch
    other_slots = [x for x in range(1, 400) if x not in set(perm.tolist())][:20]  # not touched by the repack
    req_to_token[0, :20] = torch.tensor(other_slots, dtype=torch.int32)
    entries = [uncompressed_entry(0, 20, other, 0),
               LayoutEntry(state.row, P, L, S, n_q, other, state_mid(state))]
    q = torch.randn(other + n_q, HQ * D)
    slots = req_to_token[state.row].long()
    for lid in range(N_LAYERS):
        out = attend(layer(lid), q, LayoutPlan(entries, req_to_token, pool_cells(pool)), pool)
        kept = [perm[state.keep[lid][h]].tolist() for h in range(HKV)]  # kept positions' original slots
        # the repacked cells hold those positions' vectors: read them from the pool before compression
        visible = [slots[:P].tolist() + kept[h] + slots[L:S].tolist() for h in range(HKV)]
        ref = reference(q[other:].view(-1, HQ, D), ORIGINAL[0], lid, visible)
        torch.testing.assert_close(out[other:].view(-1, HQ, D).double(), ref, rtol=1e-5, atol=1e-5)
        ref0 = reference(q[:other].view(-1, HQ, D), ORIGINAL[0], lid, [other_slots] * HKV)
        torch.testing.assert_close(out[:other].view(-1, HQ, D).double(), ref0, rtol=1e-5, atol=1e-5)


ORIGINAL = []  # the pool as it was before the last pack (filled by the fixture below)


@pytest.fixture(autouse=True)
def _original_pool(monkeypatch):
    """Keep a copy of the pool as it was before compression (the reference reads from it)."""
    import lava_sglang.engine.compress as C

    real = C.pack_and_free

    def spy(sources, owned, req_to_token, row, P, space, allocator, end):
        ORIGINAL.clear()
        ORIGINAL.append(SimpleNamespace(k=space.k_flat.clone().view(N_LAYERS, -1, HKV, D),
                                        v=space.v_flat.clone().view(N_LAYERS, -1, HKV, D)))
        return real(sources, owned, req_to_token, row, P, space, allocator, end)

    monkeypatch.setattr(C, "pack_and_free", spy)
    yield
    ORIGINAL.clear()


def test_reselect_moves_exactly_the_selected_vectors_and_frees_the_rest():
    pool, req_to_token, state, alloc, perm = compressed_row(extra=40)
    P, L, K = state.prefix_len, state.prompt_len, state.kept_slots
    original = SimpleNamespace(k=pool.k.clone(), v=pool.v.clone())
    slots_before = req_to_token[state.row].long().clone()
    end = L + 40
    # what each (layer, head) cell currently holds, by original row position
    def vectors(st, lid, h):
        cells = torch.split(st.mid_cells[lid], st.mid_lens[lid].tolist())[h]
        return pool.k.view(-1, D)[cells], pool.v.view(-1, D)[cells]  # cells of any layer (exact packing)
    before = {(l, h): (state.keep[l][h].clone(), *[t.clone() for t in vectors(state, l, h)])
              for l in range(N_LAYERS) for h in range(HKV)}
    state.turns = 2
    state.reselect = PendingRequest(rid="b", row=state.row, config=state.config, prefix_len=P, prompt_len=end)
    state.reselect.queries = [torch.randn(state.config.window, HQ, D) for _ in range(N_LAYERS)]
    freed_before = len(alloc.freed)
    report = reselect(state, req_to_token, pool, alloc)
    assert report is not None and report["turn"] == 2
    assert state.prompt_len == end
    assert report["earlier_kept_cells"] == sum(int(before[(l, h)][0].numel()) for l in range(N_LAYERS) for h in range(HKV))
    owned = torch.cat([slots_before[P:P + K], slots_before[L:end]])
    newly_freed = alloc.freed[freed_before:]
    # owned slots = held now + freed now, no slot lost or freed twice
    held = req_to_token[state.row, P:P + state.kept_slots].long()
    assert sorted(held.tolist() + newly_freed) == sorted(owned.tolist())
    assert (req_to_token[state.row, P + state.kept_slots:end] == 0).all()
    dropped = 0
    for l in range(N_LAYERS):
        for h in range(HKV):
            keep = state.keep[l][h]
            k_now, v_now = vectors(state, l, h)
            old_pos, old_k, old_v = before[(l, h)]
            for i, pos in enumerate(keep.tolist()):
                if pos < L:  # an earlier kept cell: its vector is the one it had
                    j = old_pos.tolist().index(pos)
                    assert torch.equal(k_now[i], old_k[j]) and torch.equal(v_now[i], old_v[j])
                else:  # an appended token: its vector from its own slot
                    assert torch.equal(k_now[i], original.k[l, slots_before[pos], h])
                    assert torch.equal(v_now[i], original.v[l, slots_before[pos], h])
            assert keep.tolist() == sorted(keep.tolist())
            assert keep[-state.config.window:].tolist() == list(range(end - state.config.window, end))
            dropped += sum(1 for p in old_pos.tolist() if p not in keep.tolist())
    assert report["earlier_kept_cells_dropped"] == dropped
    assert state.kept_slots == math.ceil(int(state.mid_lens.sum()) / (N_LAYERS * HKV))  # exact packing


def test_memory_stays_bounded_over_ten_turns():
    pool, req_to_token, state, alloc, _ = compressed_row(extra=0, L=60)
    cfg = state.config
    n_slots = pool.k.shape[1]
    free = sorted(set(range(1, n_slots)) - set(req_to_token[state.row, :state.prompt_len].tolist()) - set(alloc.freed))
    free = free + alloc.freed
    held = []
    end = state.prompt_len
    for turn in range(2, 12):
        new = 30
        take, free = free[:new], free[new:]
        req_to_token[state.row, end:end + new] = torch.tensor(take, dtype=torch.int32)
        end += new
        state.turns = turn
        state.reselect = PendingRequest(rid=f"t{turn}", row=state.row, config=cfg, prefix_len=state.prefix_len, prompt_len=end)
        state.reselect.queries = [torch.randn(cfg.window, HQ, D) for _ in range(N_LAYERS)]
        n_freed = len(alloc.freed)
        assert reselect(state, req_to_token, pool, alloc) is not None
        free += alloc.freed[n_freed:]
        held.append(state.prefix_len + state.kept_slots)
        assert int(state.mid_lens.sum()) <= N_LAYERS * HKV * cfg.budget
    # LAVa's layer budgets vary (a layer may hold more than the budget); what is held stops growing
    assert max(held[5:]) <= max(held[:5]) + cfg.window, held
    assert end - state.prefix_len > 5 * max(held)  # the conversation is far longer than what it holds


def test_rewind_reads_the_recomputed_last_token_instead_of_its_kept_cell():
    """A retracted turn re-enters one token early: the last prompt position's kept cells leave
    the layout, the row's new slot for it is read as an appended token, nothing else changes."""
    from lava_sglang.engine.continuation import rewind

    pool, req_to_token, state, _, _ = compressed_row()
    P, L = state.prefix_len, state.prompt_len
    before = [[t.clone() for t in heads] for heads in state.keep]
    cells_before = [c.clone() for c in state.mid_cells]
    req_to_token[state.row, L - 1] = 399  # the slot SGLang allocated for the re-extended token
    space = pool_cells(pool)
    rewind(state, L - 1, req_to_token, space)
    assert state.prompt_len == L - 1
    for l in range(N_LAYERS):
        for h in range(HKV):
            assert before[l][h][-1] == L - 1  # the window's last position was kept in every head
            assert torch.equal(state.keep[l][h], before[l][h][:-1])
        lens = state.mid_lens[l].tolist()
        old = torch.split(cells_before[l], [n + 1 for n in lens])
        assert torch.equal(state.mid_cells[l], torch.cat([o[:-1] for o in old]))
        src, dst = state.restore[l]  # the original vectors go to the new slot's cells
        assert torch.equal(src, torch.stack([o[-1] for o in old])) and dst.tolist() == [space.base[l] + 399 * HKV + h for h in range(HKV)]
    with pytest.raises(RuntimeError, match="append-only"):
        rewind(state, P, req_to_token, space)


def test_all_layers_in_one_build_equal_one_build_per_layer(monkeypatch):
    import lava_sglang.engine.layout as LY

    pool, req_to_token, state, _, _ = compressed_row(extra=5)
    space = pool_cells(pool)
    req_to_token[1, :30] = torch.arange(300, 330, dtype=torch.int32)
    entries = [uncompressed_entry(1, 30, 1, 0),
               LayoutEntry(state.row, state.prefix_len, state.prompt_len, state.prompt_len + 5, 1, 1, state_mid(state))]
    together = LayoutPlan(entries, req_to_token, space)
    monkeypatch.setattr(LY, "ALL_LAYERS_MAX", 0)
    apart = LayoutPlan(entries, req_to_token, space)
    for lid in range(N_LAYERS):
        a, b = together.indices(lid), apart.indices(lid)
        assert torch.equal(a.kv_indptr, b.kv_indptr) and torch.equal(a.kv_indices, b.kv_indices)
        lens = torch.stack([torch.zeros(HKV, dtype=torch.long), state.mid_lens[lid]])
        pre, pre_lens, suf, suf_lens = together.ranges()
        direct = build_pair_indices(HKV, pre, pre_lens, suf, suf_lens, state.mid_cells[lid], lens,
                                    cell_base=space.base[lid])
        assert torch.equal(a.kv_indices, direct.kv_indices) and torch.equal(a.kv_indptr, direct.kv_indptr)


def test_kept_cells_are_reused_across_decode_steps_until_the_state_changes():
    from lava_sglang.engine.layout import kept_pieces

    pool, req_to_token, state, alloc, _ = compressed_row(extra=40)
    entries = lambda S: [LayoutEntry(state.row, state.prefix_len, state.prompt_len, S, 1, 0, state_mid(state))]
    mid1, lens1 = kept_pieces(entries(state.prompt_len + 1), N_LAYERS, HKV, "cpu")
    mid2, lens2 = kept_pieces(entries(state.prompt_len + 2), N_LAYERS, HKV, "cpu")  # the next step
    assert mid2 is mid1 and lens2 is lens1
    assert torch.equal(mid1, torch.cat(state.mid_cells)) and torch.equal(lens1[:, 0], state.mid_lens)
    end = state.prompt_len + 40  # a re-selection replaces the state's cells: rebuilt
    state.reselect = PendingRequest(rid="b", row=state.row, config=state.config, prefix_len=state.prefix_len, prompt_len=end)
    state.reselect.queries = [torch.randn(state.config.window, HQ, D) for _ in range(N_LAYERS)]
    assert reselect(state, req_to_token, pool, alloc) is not None
    mid3, lens3 = kept_pieces(entries(end + 1), N_LAYERS, HKV, "cpu")
    assert mid3 is not mid1 and torch.equal(mid3, torch.cat(state.mid_cells)) and torch.equal(lens3[:, 0], state.mid_lens)


@pytest.mark.parametrize("per_layer", [False, True], ids=["all-layer lists", "per-layer lists"])
def test_next_decode_step_appends_to_the_previous_lists_and_equals_a_full_build(monkeypatch, per_layer):
    """A decode plan of the batch the previous plan served, every request one token further,
    appends the new tokens' cells to the previous lists (all layers at once, or, above
    ``ALL_LAYERS_MAX``, layer by layer); they equal a full build, and so do their host indptrs.
    A changed batch, a skipped step, an extend forward in between or a changed state builds afresh."""
    import lava_sglang.engine.layout as LY

    if per_layer:
        monkeypatch.setattr(LY, "ALL_LAYERS_MAX", 0)

    pool, req_to_token, state, _, _ = compressed_row(extra=6)
    space = pool_cells(pool)
    req_to_token[1, :40] = torch.arange(300, 340, dtype=torch.int32)
    L = state.prompt_len

    def plan(s_unc, s_comp, mid=None):
        return LayoutPlan([uncompressed_entry(1, s_unc, 1, 0),
                           LayoutEntry(state.row, state.prefix_len, L, s_comp, 1, 1, mid or state_mid(state))],
                          req_to_token, space)

    def full(p):
        saved = list(LY._DECODE_CSR)
        LY._DECODE_CSR.clear()
        out = [p.indices(lid) for lid in range(N_LAYERS)]
        LY._DECODE_CSR[:] = saved
        return out, p._host

    built = []
    monkeypatch.setattr(LY, "build_pair_indices", lambda *a, **k: built.append(1) or build_pair_indices(*a, **k))
    LY.forget_decode_steps()
    first = plan(30, L + 3)
    for lid in range(N_LAYERS):
        first.indices(lid)
    assert len(built) == (N_LAYERS if per_layer else 1)
    for step in range(1, 4):  # three appended steps, no build
        p = plan(30 + step, L + 3 + step)
        n = len(built)
        got = [p.indices(lid) for lid in range(N_LAYERS)]
        assert len(built) == n, step
        want, want_host = full(plan(30 + step, L + 3 + step))
        for lid, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a.kv_indptr, b.kv_indptr) and torch.equal(a.kv_indices, b.kv_indices)
            assert torch.equal(p._host[lid], want_host[lid]) and torch.equal(p._host[lid], b.kv_indptr)
    n = len(built)
    plan(30 + 5, L + 3 + 5).indices(0)  # a skipped step
    assert len(built) == n + 1
    LY.forget_decode_steps()  # an extend forward
    plan(30 + 6, L + 3 + 6).indices(0)
    assert len(built) == n + 2
    other = state_mid(state)  # same cells, but a new state key (re-selection, rewind)
    other.key = (list(state.mid_cells), state.mid_lens.clone())
    plan(30 + 7, L + 3 + 7, mid=other).indices(0)
    assert len(built) == n + 3
