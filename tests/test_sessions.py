"""Conversations that continue over their compressed cache: SGLang streaming sessions on the
real server (CPU engine, loopback), with the plugin's debug invariants on and SGLang's own pool
invariant checker running at every idle moment (it raises on a leak and kills the scheduler,
which the next request would notice).

Each turn sends only its new tokens (``session_params``); the session owns the KV row. The
servers are the ``lava-chunked``, ``none`` and ``retract`` configurations of ``tests/conftest.py``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from lava_sglang.launch import check_whole, http_json
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava-chunked")]

NEW = 300  # new tokens per turn
OUT = 8  # output tokens per turn


@pytest.fixture(scope="module")
def turns(tokenizer):
    corpus = load_corpus(default_corpus_dir())
    ids = tokenizer.encode(haystack(NEW * 12 + 200, corpus, seed=4242, tokenizer=tokenizer))
    return [ids[i * NEW:(i + 1) * NEW] for i in range(12)]


def lava(servers):
    return servers.config("lava-chunked")


def memory(server):
    return server.kv_memory()


def turn(server, sid, ids, max_new_tokens=OUT, **custom):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    if custom:
        sp["custom_params"] = {f"kv_{k}": v for k, v in custom.items()}
    return http_json(server.url + "/generate", {"input_ids": ids, "sampling_params": sp, "session_params": {"id": sid}})


def conversation(server, turns, n, **custom):
    sid = server.open_session()
    try:
        return [turn(server, sid, turns[t], **custom) for t in range(n)]
    finally:
        server.close_session(sid)


def assert_no_leak(server, timeout=60.0):
    return check_whole(server, timeout)


def assert_log_clean(server):
    assert not server.log_errors(), server.log_tail(60)


def test_continued_turns_prefill_only_new_tokens_and_memory_stays_bounded(servers, turns):
    """Ten turns of 300 new tokens: each turn after the first prefills only its new tokens (and
    the previous answer's last token, whose KV no forward computed yet, as SGLang does without
    compression), the history is re-selected every turn, the slots held stay flat while the
    conversation grows to 3k tokens, and closing the session frees everything."""
    server = lava(servers)
    # The shared server's tree may hold turn 1 already (published uncompressed by the test whose
    # budget covers everything): turn 1 must be private here to be compressed.
    server.flush_cache()
    sid = server.open_session()
    held, reports = [], []
    try:
        for t in range(10):
            r = turn(server, sid, turns[t])
            m = r["meta_info"]
            kv = m["kv_compression"][0]
            reports.append(kv)
            held.append(kv["slots_held"])
            assert kv["turn"] == t + 1
            if t:
                assert m["prompt_tokens"] == (t + 1) * NEW + t * OUT
                assert m["prompt_tokens"] - m["cached_tokens"] == NEW + 1, m
                assert kv["continued"] and kv["reselected"], kv
                assert kv["earlier_kept_cells"] > 0 and 0 <= kv["earlier_kept_cells_dropped"] <= kv["earlier_kept_cells"]
            live = memory(server)
            assert live["live_compressed_requests"] == 1, live
    finally:
        server.close_session(sid)
    assert max(held[4:]) <= max(held[:4]) + 32, held  # bounded: budget per (layer, head) plus the window
    assert reports[-1]["prompt_tokens"] > 10 * max(held) / 2
    m = assert_no_leak(server)
    assert m["continued_turns"] >= 9 and m["reselections"] >= 9, m
    assert_log_clean(server)


@pytest.mark.server_configs("lava-chunked", "none")
def test_session_outputs_equal_none_when_the_budget_covers_everything(servers, turns):
    """Four turns with a budget above the conversation's length: nothing is dropped, so the
    greedy outputs equal those of the same session on a ``--kv-policy none`` server."""
    got = conversation(lava(servers), turns, 4, budget=8192)
    want = conversation(servers.config("none"), turns, 4)
    assert [r["output_ids"] for r in got] == [r["output_ids"] for r in want]
    assert [r["meta_info"]["cached_tokens"] for r in got] == [r["meta_info"]["cached_tokens"] for r in want]


def test_context_turn_with_no_output_is_compressed_and_questioned_after(servers, turns):
    """The query-agnostic protocol: a context turn with ``max_new_tokens: 0`` is compressed (in a
    session only; a plain request with 0 new tokens primes a shared prefix and is not), and the
    next turn asks over the compressed cache, prefilling only the question."""
    server = lava(servers)
    sid = server.open_session()
    try:
        ctx = turn(server, sid, turns[10] + turns[11], max_new_tokens=0)  # text no other test sent
        assert ctx["meta_info"]["kv_compression"][0]["slots_held"] < 200, ctx["meta_info"]
        q = turn(server, sid, turns[9][:40], max_new_tokens=4)
        assert q["meta_info"]["cached_tokens"] == 2 * NEW, q["meta_info"]
        assert len(q["output_ids"]) == 4
    finally:
        server.close_session(sid)
    assert_no_leak(server)


def test_abort_in_the_middle_of_a_continued_turn_leaks_nothing(servers, turns):
    """Turn 2 (a 1.5k-token message, prefilled in 256-token chunks) is dropped by its client
    during prefill. SGLang hands the aborted turn's row back and releases it; a later turn of the
    session either runs (re-prefilled) or is refused with an error; the pool is whole after
    close, and the server keeps serving."""
    server = lava(servers)
    sid = server.open_session()
    try:
        turn(server, sid, turns[0])
        payload = {"input_ids": sum(turns[1:6], []), "stream": True,
                   "sampling_params": {"max_new_tokens": OUT, "temperature": 0.0}, "session_params": {"id": sid}}
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        conn.request("POST", "/generate", body=json.dumps(payload), headers={"Content-Type": "application/json"})
        time.sleep(1.5)
        sock = conn.sock
        conn.close()
        if sock is not None:
            sock.close()
        time.sleep(3)
        try:
            after = turn(server, sid, turns[6])
            assert len(after["output_ids"]) == OUT
        except Exception as exc:  # the session may refuse after an aborted turn: stated, not hung
            assert "session" in str(exc).lower() or "400" in str(exc) or "abort" in str(exc).lower(), exc
    finally:
        server.close_session(sid)
    assert_no_leak(server)
    assert "Paris" in server.generate("The capital of France is", max_new_tokens=4)["text"]
    assert_log_clean(server)


def test_several_sessions_at_once_leak_nothing(servers, turns):
    """Four sessions of three turns each, run concurrently (their turns batch together, mixed
    with an uncompressed plain request): every session's outputs equal those it gives alone."""
    server = lava(servers)
    alone = [conversation(server, turns[i:], 3) for i in range(2)]
    results = [None] * 4

    def run(i):
        results[i] = conversation(server, turns[i % 2:], 3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    plain = server.generate("The capital of France is", max_new_tokens=4)
    for th in threads:
        th.join(timeout=600)
    assert "Paris" in plain["text"]
    for i, r in enumerate(results):
        assert r is not None, i
        assert [x["output_ids"] for x in r] == [x["output_ids"] for x in alone[i % 2]], i
    assert_no_leak(server)
    assert_log_clean(server)


# On a server where SGLang retracts a decoding request every 4th forward (shared with
# tests/test_reliability.py's forced retractions).
@pytest.mark.server_configs("retract")
def test_retracted_session_turns_finish_and_leak_nothing(servers, tokenizer):
    """Two conversations of three turns run together on a server that retracts a decoding request
    every 4th forward (SGLang retracts only while two or more decode), again and again. SGLang
    frees a retracted session turn's row and prefills the turn's whole history again. A first
    (compressed) turn replays its selection and gives the tokens it gives without retraction; a
    continued turn is recomputed over the full history, which the compressed conversation never
    saw, so its output may differ, and the server log says so. Every turn completes, the
    sessions' memory is whole after close, and SGLang's invariant checker stays quiet."""
    corpus = load_corpus(default_corpus_dir())
    convs = []
    for c in range(2):  # text no other test sent (so no tree hit differs between the two servers)
        ids = tokenizer.encode(haystack(3 * NEW + 100, corpus, seed=5150 + c, tokenizer=tokenizer))
        convs.append([ids[i * NEW:(i + 1) * NEW] for i in range(3)])
    retracting = servers.config("retract")
    got = [None, None]

    def run(c):
        sid = retracting.open_session()
        try:
            got[c] = [turn(retracting, sid, convs[c][t], max_new_tokens=16) for t in range(3)]
        finally:
            retracting.close_session(sid)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=900)
    assert got[0] is not None and got[1] is not None
    retractions = [r["meta_info"].get("num_retractions", 0) for g in got for r in g]
    assert sum(retractions) >= 2, retractions
    for c in range(2):
        # (no token equality: the two servers' trees differ, so a first turn's shared prefix, and
        # with it its selection, may differ; replay exactness is tests/test_reliability.py's)
        assert all(len(r["output_ids"]) == 16 for r in got[c]), c
    assert_no_leak(retracting)
    log = retracting.log_text()
    assert "Testing retraction" in log
    continued = [r["meta_info"].get("num_retractions", 0) for g in got for r in g[1:]]
    if sum(continued):
        assert "its output may differ from a run without retraction" in log
    assert_log_clean(retracting)
