"""The parking lot: every parked conversation of one scheduler process, as a cache.

Engine-free (no SGLang, no compression state): the records, their LRU order, the index that
finds the record a request's tokens continue, and the counters SGLang's admission reads. The
SGLang side (``engine.parking``) parks, lends and releases records; this module only keeps
the books, so every question the scheduler asks per step is answered in O(1) or by the index,
never by a scan of all records:

* ``idle_slots`` / ``idle_count``: what idle (not borrowed) records hold; admission counts it as
  evictable.
* ``lookup(tokens, namespace)``: the idle record whose compressed range the tokens repeat whole,
  covering most of them; the most recently used on a tie. A record is indexed under the hash of
  its first ``prompt_len`` ids (the range a borrower must repeat); a request's prefix hashes
  are computed once (a polynomial hash modulo a prime, vectorized), then one dict probe per
  distinct indexed length.
* ``lru_idle()``: idle records, least recently used first, for eviction.
* ``by_kv``: the record a request borrowed, found from its KV record object.

A record is a cache entry, never a reservation: whatever SGLang needs (slots, request rows, the
tree memory its prefix lock holds) it takes back from idle records, LRU.
"""

from __future__ import annotations

import collections
import itertools
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

_MOD = (1 << 31) - 1  # prime: products of two residues fit in int64
_BASE = 1_000_003 % _MOD


class _Powers:
    """``BASE^i`` and ``BASE^-i`` modulo ``_MOD``, grown on demand."""

    def __init__(self):
        self.pos = torch.ones(1, dtype=torch.long)
        self.inv = torch.ones(1, dtype=torch.long)

    def upto(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos.numel() < n:
            size = max(n, 2 * self.pos.numel())
            base_inv = pow(_BASE, _MOD - 2, _MOD)
            pos, inv = [1] * size, [1] * size
            for i in range(1, size):
                pos[i] = pos[i - 1] * _BASE % _MOD
                inv[i] = inv[i - 1] * base_inv % _MOD
            self.pos, self.inv = torch.tensor(pos, dtype=torch.long), torch.tensor(inv, dtype=torch.long)
        return self.pos[:n], self.inv[:n]


_POWERS = _Powers()


def prefix_hashes(tokens: torch.Tensor) -> torch.Tensor:
    """``h[i]`` = hash of ``tokens[:i]`` for ``i`` in ``0..n`` (``h[0] = 0``), vectorized.

    ``hash(t[:i]) = sum_j t_j * BASE^(i-1-j) mod p``, computed as ``BASE^(i-1) * sum_j t_j *
    BASE^-j``; every partial product stays below 2^62."""
    n = int(tokens.numel())
    out = torch.zeros(n + 1, dtype=torch.long)
    if n == 0:
        return out
    pos, inv = _POWERS.upto(n)
    t = tokens.to(torch.long).remainder(_MOD)
    sums = torch.cumsum(t * inv % _MOD, 0) % _MOD
    out[1:] = sums * pos % _MOD
    return out


@dataclass
class Parked:
    id: str
    kv: object  # the KV record (SGLang's ReqKvInfo of the row)
    lock: object  # the tree lock on the shared prefix (None without a tree)
    node: object  # a virtual node for the borrower's match: locking it is a no-op
    tokens: torch.Tensor  # int64: the ids the record's KV was computed for
    prompt_len: int  # the compressed range ends here: a borrower repeats tokens[:prompt_len]
    held: int  # private slots the record holds while idle
    settings: object = None  # the compression settings of the conversation (a borrower must match them)
    namespace: tuple = (None, None)  # (extra_key, cache_salt): isolated as in SGLang's tree
    borrower: Optional[weakref.ref] = None
    lent_len: int = 0
    turns: int = 1
    parked_at: float = field(default_factory=time.monotonic)
    key: tuple = ()  # index key (namespace, prompt_len, hash)

    @property
    def idle(self) -> bool:
        return self.borrower is None

    def borrowed_by(self, req) -> bool:
        return self.borrower is not None and self.borrower() is req


class ParkingLot:
    def __init__(self):
        self.records: "collections.OrderedDict[str, Parked]" = collections.OrderedDict()  # LRU first
        self.by_kv: dict[int, Parked] = {}
        self._index: dict[tuple, dict[int, list]] = {}  # namespace -> {prompt_len: {hash: [ids]}}
        self._ids = itertools.count()
        self.idle_slots = 0
        self.idle_count = 0
        self.max_conversations = 0  # the cap in force (engine.parking), for /server_info
        self._seen: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self.totals = {"parked": 0, "hits": 0, "misses": 0, "evictions": 0, "evicted_slots": 0,
                       "evicted_for_rows": 0, "evicted_over_count": 0, "hit_tokens": 0, "dropped": 0,
                       "not_parked_over_cap": 0, "not_borrowed_settings": 0, "reclaimed_from_waiting": 0}

    def new_id(self) -> str:
        return f"lava-park-{next(self._ids)}"

    def __len__(self) -> int:
        return len(self.records)

    # ---------------------------------------------------------------- membership
    def add(self, rec: Parked) -> None:
        """A new idle record (most recently used)."""
        self.records[rec.id] = rec
        self.by_kv[id(rec.kv)] = rec
        self._make_idle(rec)

    def remove(self, rec: Parked) -> None:
        if self.records.pop(rec.id, None) is None:
            return
        self.by_kv.pop(id(rec.kv), None)
        if rec.idle:
            self._unindex(rec)
            self.idle_slots -= rec.held
            self.idle_count -= 1

    def lend(self, rec: Parked, req, lent_len: int) -> None:
        if rec.idle:
            self._unindex(rec)
            self.idle_slots -= rec.held
            self.idle_count -= 1
        rec.borrower = weakref.ref(req)
        rec.lent_len = lent_len
        self.records.move_to_end(rec.id)

    def give_back(self, rec: Parked) -> None:
        """A borrower leaves without using the record: it is idle again as it was."""
        if not rec.idle:
            rec.borrower = None
            self._make_idle(rec)

    def repark(self, rec: Parked, tokens: torch.Tensor, prompt_len: int, held: int, settings) -> None:
        """The borrower finished: the record now holds its conversation, idle, most recent."""
        if rec.idle:
            self._unindex(rec)
            self.idle_slots -= rec.held
            self.idle_count -= 1
        rec.tokens, rec.prompt_len, rec.held, rec.settings = tokens, prompt_len, held, settings
        rec.turns += 1
        rec.borrower = None
        rec.parked_at = time.monotonic()
        self.records.move_to_end(rec.id)
        self._make_idle(rec)

    def _make_idle(self, rec: Parked) -> None:
        rec.key = (rec.namespace, rec.prompt_len, int(prefix_hashes(rec.tokens[:rec.prompt_len])[-1]))
        self._index.setdefault(rec.namespace, {}).setdefault(rec.prompt_len, {}).setdefault(rec.key[2], []).append(rec.id)
        self.idle_slots += rec.held
        self.idle_count += 1

    def _unindex(self, rec: Parked) -> None:
        namespace, length, h = rec.key
        by_len = self._index.get(namespace, {})
        bucket = by_len.get(length, {})
        ids = bucket.get(h, [])
        if rec.id in ids:
            ids.remove(rec.id)
        if not ids:
            bucket.pop(h, None)
        if not bucket:
            by_len.pop(length, None)
        if not by_len:
            self._index.pop(namespace, None)

    # ---------------------------------------------------------------- queries
    def borrowed(self, req) -> Optional[Parked]:
        rec = self.by_kv.get(id(getattr(req, "kv", None)))
        return rec if rec is not None and rec.kv is req.kv else None

    def lru_idle(self):
        """Idle records, least recently used first (a generator: eviction stops early)."""
        return (rec for rec in list(self.records.values()) if rec.idle)

    def lookup(self, tokens: torch.Tensor, namespace: tuple, limit: int) -> tuple[Optional[Parked], int]:
        """The idle record whose ``tokens[:prompt_len]`` the request repeats, covering most of
        ``tokens`` (at most ``limit`` of them); ties go to the most recently used."""
        by_len = self._index.get(namespace)
        if not by_len:
            return None, -1
        n = min(int(tokens.numel()), limit)
        lengths = [length for length in by_len if length <= n]
        if not lengths:
            return None, -1
        hashes = prefix_hashes(tokens[:max(lengths)])
        best, best_len = None, -1
        for length in lengths:
            for rid in by_len[length].get(int(hashes[length]), ()):
                rec = self.records[rid]
                m = min(common_prefix(tokens, rec.tokens), int(getattr(rec.kv, "kv_committed_len", 0)), n)
                if m < rec.prompt_len:
                    continue  # a hash collision, or the record's KV is shorter than its ids
                if m > best_len or (m == best_len and rec.parked_at >= best.parked_at):
                    best, best_len = rec, m
        return best, best_len

    def count_once(self, rid: str, hit: bool, matched: int = 0) -> bool:
        """Hits and misses count requests, not scheduling rounds; True when counted now."""
        if rid in self._seen:
            return False
        self._seen[rid] = None
        while len(self._seen) > 4096:
            self._seen.popitem(last=False)
        self.totals["hits" if hit else "misses"] += 1
        self.totals["hit_tokens"] += matched
        return True


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = torch.nonzero(a[:n] != b[:n])
    return int(diff[0, 0]) if diff.numel() else n


# Every parked conversation of this scheduler process.
LOT = ParkingLot()
