"""Parked conversations (``engine.parking``): clients that resend the whole history on every
turn, with no session, on the real server (CPU engine, loopback), debug invariants on and
SGLang's own pool invariant checker running at every idle moment.

Turn N+1's input ids are turn N's prompt, its output ids and the new message, as a chat client
that keeps the history would send them. Every conversation uses text no other test sends, so no
radix-tree hit differs between the servers compared.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.request

import pytest

from lava_sglang.launch import check_whole, http_json
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

# The session tests' server (``lava-chunked`` in tests/conftest.py, debug invariants on), and
# its ``none`` twin.
pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava-chunked")]

# ``lava-small-pool``: a pool that holds four parked conversations of this module's size next to
# a running first turn, not five: parked memory must give way (LRU) before anything is refused or
# retracted.
SMALL_POOL = 1100
NEW = 300  # new tokens per turn
OUT = 8  # output tokens per turn


@pytest.fixture(scope="module")
def texts(tokenizer):
    corpus = load_corpus(default_corpus_dir())

    def make(seed, n_turns, first=NEW):
        ids = tokenizer.encode(haystack(first + NEW * n_turns + 100, corpus, seed=seed, tokenizer=tokenizer))
        return [ids[:first]] + [ids[first + i * NEW:first + (i + 1) * NEW] for i in range(n_turns - 1)]
    return make


def lava(servers):
    return servers.config("lava-chunked")


def small(servers):
    server = servers.config("lava-small-pool")
    assert f"--max-total-tokens {SMALL_POOL}" in " ".join(server.command)
    return server


def send(server, ids, max_new_tokens=OUT, session=None, **custom):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    if custom:
        sp["custom_params"] = {f"kv_{k}": v for k, v in custom.items()}
    payload = {"input_ids": ids, "sampling_params": sp}
    if session is not None:
        payload["session_params"] = {"id": session}
    return http_json(server.url + "/generate", payload)


def resend_conversation(server, turns, **custom):
    """The whole history each turn; returns the responses."""
    history, out = [], []
    for new in turns:
        history = history + new
        r = send(server, history, **custom)
        out.append(r)
        history = history + r["output_ids"]
    return out


def new_tokens(r):
    m = r["meta_info"]
    return m["prompt_tokens"] - m["cached_tokens"]


def assert_no_leak(server, timeout=60.0):
    return check_whole(server, timeout)


def assert_log_clean(server):
    assert not server.log_errors(), server.log_tail(60)


def test_resend_turns_prefill_only_new_tokens_and_equal_session_turns(servers, texts):
    """Four turns, the client resending everything: turn 1 is compressed and parked, every later
    turn continues the parked conversation and prefills only its new message (and the previous
    answer's last token, whose KV no forward computed yet), the slots held stay flat, and the
    outputs are token for token those of the same conversation run as a streaming session (the
    same continuation over the same compressed cache)."""
    server = lava(servers)
    turns = texts(7001, 4)
    before = server.kv_memory()
    got = resend_conversation(server, turns)
    for t, r in enumerate(got):
        kv = r["meta_info"]["kv_compression"][0]
        assert kv["turn"] == t + 1, kv
        if t:
            assert new_tokens(r) == NEW + 1, r["meta_info"]
            assert kv["continued"] and kv["reselected"], kv
    held = [r["meta_info"]["kv_compression"][0]["slots_held"] for r in got]
    assert max(held) <= held[0] + 32 and got[-1]["meta_info"]["prompt_tokens"] > 5 * max(held), held
    after = assert_no_leak(server)
    assert after["park_hits"] - before["park_hits"] == 3, after
    assert after["parked_conversations"] == before["parked_conversations"] + 1, after
    sid = server.open_session()
    try:
        want = [send(server, new, session=sid) for new in turns]
    finally:
        server.close_session(sid)
    assert [r["output_ids"] for r in got] == [r["output_ids"] for r in want]
    assert [r["meta_info"]["cached_tokens"] for r in got] == [r["meta_info"]["cached_tokens"] for r in want]
    assert_no_leak(server)
    assert_log_clean(server)


@pytest.mark.server_configs("lava-chunked", "none")
def test_resend_outputs_equal_none_when_the_budget_covers_everything(servers, texts):
    """Four resend turns with a budget above the conversation's length: nothing is compressed or
    parked, the tree serves the history as without the plugin, and the greedy outputs and cached
    tokens equal those of a ``--kv-policy none`` server."""
    turns = texts(7002, 4)
    server = lava(servers)
    before = server.kv_memory()
    got = resend_conversation(server, turns, budget=8192)
    want = resend_conversation(servers.config("none"), turns)
    assert [r["output_ids"] for r in got] == [r["output_ids"] for r in want]
    assert [r["meta_info"]["cached_tokens"] for r in got] == [r["meta_info"]["cached_tokens"] for r in want]
    assert server.kv_memory()["park_parked"] == before["park_parked"]


def test_parking_switched_off_per_request(servers, texts):
    """``kv_park: false``: the finished request is released (nothing parked), and a later turn
    with it off does not continue a parked conversation either: it prefills its whole history."""
    server = lava(servers)
    t1, t2 = texts(7003, 2)
    before = server.kv_memory()
    r1 = send(server, t1, park=False)
    assert "kv_compression" in r1["meta_info"]
    mid = assert_no_leak(server)
    assert mid["parked_conversations"] == before["parked_conversations"], mid
    r2 = send(server, t1 + r1["output_ids"] + t2, park=False)
    assert r2["meta_info"]["cached_tokens"] < 64, r2["meta_info"]
    r3 = send(server, t1 + r1["output_ids"] + t2)  # parking on again; nothing to continue
    assert r3["meta_info"]["cached_tokens"] < 64
    after = assert_no_leak(server)
    assert after["parked_conversations"] == before["parked_conversations"] + 1  # r3 is parked


def test_two_requests_extending_one_parked_conversation(servers, texts):
    """Two turns sent together that extend the same parked conversation: the first one matched
    borrows it and prefills only its message; the other finds it borrowed and prefills its whole
    history, compressed afresh. Each output equals what it gives alone in that role, and both
    end up parked."""
    server = lava(servers)
    t1, t2a, t2b = texts(7004, 3)
    r1 = send(server, t1)
    base = t1 + r1["output_ids"]
    before = server.kv_memory()
    results = [None, None]

    def run(i, new):
        results[i] = send(server, base + new)

    threads = [threading.Thread(target=run, args=(i, new)) for i, new in enumerate((t2a, t2b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert all(r is not None for r in results)
    hit = [new_tokens(r) == NEW + 1 for r in results]
    assert sorted(hit) == [False, True], [r["meta_info"] for r in results]
    miss = results[hit.index(False)]
    assert miss["meta_info"]["cached_tokens"] < 64, miss["meta_info"]
    after = assert_no_leak(server)
    assert after["park_hits"] - before["park_hits"] == 1 and after["park_misses"] - before["park_misses"] >= 1
    assert after["parked_conversations"] == before["parked_conversations"] + 1  # one re-parked, one new
    # alone: the missed one's prompt sent fresh gives the same tokens
    fresh = send(server, miss_prompt := base + (t2a if hit.index(False) == 0 else t2b), park=False)
    assert len(miss_prompt) == miss["meta_info"]["prompt_tokens"]
    assert fresh["output_ids"] == miss["output_ids"]
    assert_log_clean(server)


def test_abort_of_a_continuing_request_leaks_nothing(servers, texts):
    """A resend turn carrying a 1.5k-token message is dropped by its client during prefill. The
    parked conversation it borrowed goes with it (its row is freed like any aborted request's); the
    retried turn prefills its whole history and completes; the pool is whole."""
    server = lava(servers)
    turns = texts(7005, 7)
    r1 = send(server, turns[0])
    long_turn = turns[0] + r1["output_ids"] + sum(turns[1:6], [])
    payload = {"input_ids": long_turn, "stream": True, "sampling_params": {"max_new_tokens": OUT, "temperature": 0.0}}
    before = server.kv_memory()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/generate", body=json.dumps(payload), headers={"Content-Type": "application/json"})
    time.sleep(1.5)
    sock = conn.sock
    conn.close()
    if sock is not None:
        sock.close()
    mid = assert_no_leak(server)
    assert mid["park_hits"] == before["park_hits"] + 1, mid  # it had borrowed the conversation
    assert mid["parked_conversations"] == before["parked_conversations"] - 1, mid  # and took it away
    retry = send(server, long_turn)
    assert retry["meta_info"]["cached_tokens"] < 64 and len(retry["output_ids"]) == OUT
    assert_no_leak(server)
    assert "Paris" in server.generate("The capital of France is", max_new_tokens=4)["text"]
    assert_log_clean(server)


def metrics_text(server) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([-0-9.e+]+)$", text, re.M)]
    assert values, name
    return sum(values)


@pytest.mark.server_configs("lava-small-pool", "lava-chunked")
def test_parked_memory_is_evicted_before_anything_is_refused_or_retracted(servers, texts):
    """Six conversations of two turns on a pool that holds four parked conversations next to a
    running first turn. First turns 1-6, then second turns 6..1: the two least recently used
    conversations were evicted (LRU) to admit first turns 5 and 6; turns 2 of 6..3 continue their
    parked conversations, turns 2 of 2 and 1 are re-prefilled (evicting more). Nothing is retracted
    or refused, every output equals what the same request gives on the large pool in the same role
    (continued, or fresh), 0 slots leak, and ``/server_info`` and ``/metrics`` count it all."""
    convs = [texts(7100 + c, 2, first=2 * NEW) for c in range(6)]
    server = small(servers)
    before = server.kv_memory()
    first = [send(server, c[0]) for c in convs]
    mid = server.wait_settled()
    assert mid["park_evictions"] - before["park_evictions"] >= 2, mid
    assert mid["parked_slots"] <= SMALL_POOL, mid
    prompts = [c[0] + f["output_ids"] + c[1] for c, f in zip(convs, first)]
    second = {c: send(server, prompts[c]) for c in reversed(range(6))}
    after = assert_no_leak(server)
    hits = {c for c, r in second.items() if new_tokens(r) == NEW + 1}
    assert {3, 4, 5} <= hits and 0 not in hits, {c: r["meta_info"]["cached_tokens"] for c, r in second.items()}
    for r in [*first, *second.values()]:
        assert len(r["output_ids"]) == OUT and r["meta_info"].get("num_retractions", 0) == 0, r["meta_info"]
    assert after["retracted_requests"] == before["retracted_requests"], after
    assert after["park_hits"] - before["park_hits"] == len(hits), after
    # the same requests in the same roles on the large pool
    big = lava(servers)
    ref_first = [send(big, c[0]) for c in convs]
    assert [r["output_ids"] for r in ref_first] == [r["output_ids"] for r in first]
    for c in range(6):
        ref = send(big, prompts[c], park=c in hits)
        if c not in hits:
            assert ref["meta_info"]["cached_tokens"] < 64
        assert ref["output_ids"] == second[c]["output_ids"], c
    assert_no_leak(big)
    # metrics: /server_info and Prometheus agree
    text = metrics_text(server)
    assert metric(text, "sglang:lava_park_hits_total") == after["park_hits"]
    assert metric(text, "sglang:lava_park_evictions_total") == after["park_evictions"]
    assert metric(text, "sglang:lava_park_misses_total") == after["park_misses"]
    assert metric(text, "sglang:lava_parked_conversations") == after["parked_conversations"]
    assert metric(text, "sglang:lava_parked_slots") == after["parked_slots"]
    assert_log_clean(server)


@pytest.mark.server_configs("lava-park-cap")
def test_park_cap_keeps_parked_slots_under_the_flag(servers, texts):
    """``--kv-park-max-slots 300``: three compressed conversations of about 135 slots each finish;
    parking the third evicts the least recently used one (cap, not memory), so parked slots never
    exceed the cap, and the evicted conversation's next turn is prefilled whole and correct."""
    server = servers.config("lava-park-cap")
    assert "--kv-park-max-slots 300" in " ".join(server.command)
    server.flush_cache()  # the server is shared (tests/test_safety_rows.py): nothing parked before
    evictions = assert_no_leak(server)["park_evictions"]
    convs = [texts(7300 + c, 2) for c in range(3)]
    first = [send(server, c[0]) for c in convs]
    m = assert_no_leak(server)
    assert m["parked_conversations"] == 2 and 0 < m["parked_slots"] <= 300, m
    assert m["park_evictions"] == evictions + 1, m
    again = send(server, convs[0][0] + first[0]["output_ids"] + convs[0][1])  # the evicted one
    assert again["meta_info"]["cached_tokens"] < 64 and len(again["output_ids"]) == OUT
    assert assert_no_leak(server)["parked_slots"] <= 300
    assert_log_clean(server)
