"""The parking lot's books (engine-free): index lookups equal a brute-force scan, the idle
counters equal the sum over idle records after any sequence of park / lend / give back /
re-park / remove, and a lookup costs one probe per distinct indexed length (no scan)."""

from __future__ import annotations

import random

import pytest
import torch

from lava_sglang.engine.parking_lot import Parked, ParkingLot, common_prefix, prefix_hashes


class _KV:
    def __init__(self, committed):
        self.kv_committed_len = committed


class _Req:
    pass


def _record(lot, tokens, prompt_len, held, namespace=(None, None), settings=("s",)):
    t = torch.tensor(tokens, dtype=torch.long)
    rec = Parked(id=lot.new_id(), kv=_KV(len(tokens)), lock=None, node=None, tokens=t, prompt_len=prompt_len,
                 held=held, settings=settings, namespace=namespace)
    lot.add(rec)
    return rec


def _brute(lot, tokens, namespace):
    best, best_len = None, -1
    for rec in lot.records.values():
        if not rec.idle or rec.namespace != namespace:
            continue
        m = min(common_prefix(tokens, rec.tokens), rec.kv.kv_committed_len, tokens.numel())
        if m >= rec.prompt_len and (m > best_len or (m == best_len and rec.parked_at >= best.parked_at)):
            best, best_len = rec, m
    return best, best_len


def test_prefix_hashes_equal_direct_hashes():
    t = torch.randint(0, 50000, (300,))
    h = prefix_hashes(t)
    for i in (0, 1, 2, 17, 299, 300):
        assert int(h[i]) == int(prefix_hashes(t[:i])[-1])
    assert int(h[5]) != int(prefix_hashes(torch.tensor([1, 2, 3, 4, 6]))[-1]) or t[:5].tolist() == [1, 2, 3, 4, 6]


@pytest.mark.parametrize("seed", range(4))
def test_lookup_equals_brute_force_and_counters_stay_exact(seed):
    rng = random.Random(seed)
    lot = ParkingLot()
    system = [rng.randrange(1000) for _ in range(20)]
    recs = []
    for i in range(40):
        body = system[:rng.choice((0, 20))] + [rng.randrange(1000) for _ in range(rng.randrange(5, 30))]
        out = [rng.randrange(1000) for _ in range(rng.randrange(0, 6))]
        ns = (rng.choice((None, "a")), None)
        recs.append(_record(lot, body + out, len(body), rng.randrange(1, 50), namespace=ns))
    for step in range(200):
        rec = rng.choice(recs)
        op = rng.randrange(4)
        if rec.id not in lot.records:
            continue
        if op == 0 and rec.idle:
            req = _Req()
            lot.lend(rec, req, rec.prompt_len)
            rec._req = req  # keep the borrower alive
        elif op == 1 and not rec.idle:
            lot.give_back(rec)
        elif op == 2 and not rec.idle:
            extra = [rng.randrange(1000) for _ in range(4)]
            tokens = torch.cat([rec.tokens, torch.tensor(extra)])
            rec.kv.kv_committed_len = tokens.numel()
            lot.repark(rec, tokens, rec.prompt_len + 2, rng.randrange(1, 50), rec.settings)
        elif op == 3 and rng.random() < 0.1:
            lot.remove(rec)
        idle = [r for r in lot.records.values() if r.idle]
        assert lot.idle_count == len(idle)
        assert lot.idle_slots == sum(r.held for r in idle)
        probe_rec = rng.choice(recs)
        probe = torch.cat([probe_rec.tokens[:rng.randrange(0, probe_rec.tokens.numel() + 1)],
                           torch.tensor([rng.randrange(1000) for _ in range(rng.randrange(0, 5))], dtype=torch.long)])
        for ns in ((None, None), ("a", None)):
            got, n = lot.lookup(probe, ns, int(probe.numel()))
            want, m = _brute(lot, probe, ns)
            assert n == m
            assert (got is None) == (want is None)
            if got is not None:
                assert got.parked_at == want.parked_at or got is want


def test_borrowed_is_found_by_kv_identity_and_lru_order():
    lot = ParkingLot()
    a = _record(lot, [1, 2, 3, 4], 3, 10)
    b = _record(lot, [5, 6, 7, 8], 3, 20)
    req = _Req()
    req.kv = b.kv
    assert lot.borrowed(req) is b
    assert [r.id for r in lot.lru_idle()] == [a.id, b.id]
    lot.lend(a, _Req(), 3)
    assert [r.id for r in lot.lru_idle()] == [b.id]
    assert lot.idle_slots == 20


def test_lookup_does_not_scan_the_records(monkeypatch):
    """2000 parked conversations of 16 distinct lengths: a lookup compares the request with the
    records whose indexed hash it matches, not with every record."""
    from lava_sglang.engine import parking_lot

    lot = ParkingLot()
    rng = random.Random(0)
    recs = []
    for i in range(2000):
        n = 100 + 10 * (i % 16)
        recs.append(_record(lot, [rng.randrange(50000) for _ in range(n + 8)], n, 64))
    calls = []
    real = parking_lot.common_prefix
    monkeypatch.setattr(parking_lot, "common_prefix", lambda a, b: calls.append(1) or real(a, b))
    target = recs[1234]
    probe = torch.cat([target.tokens, torch.tensor([7, 7, 7])])
    got, n = lot.lookup(probe, (None, None), int(probe.numel()))
    assert got is target and n == target.tokens.numel()
    assert len(calls) == 1
    calls.clear()
    miss = torch.tensor([rng.randrange(50000) for _ in range(400)], dtype=torch.long)
    assert lot.lookup(miss, (None, None), 400) == (None, -1)
    assert len(calls) == 0
