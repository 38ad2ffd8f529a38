"""Safety (issue 26 / 25), cases 6 and 8: parked memory on a small pool, where a new request
fits only once parked conversations (and the prefixes they lock) give their memory back.
Helpers: ``test_safety.py``."""

from __future__ import annotations

import threading
import time

import pytest
from test_safety import assert_survives, config_server, corpus, generate, ids_of, ok, post, report, server_for, whole  # noqa: F401 (fixture)

pytestmark = pytest.mark.server

POOL = 6000
SMALL = ("--kv-policy", "lava", "--kv-budget", "128", "--max-total-tokens", str(POOL), "--chunked-prefill-size", "8192")


# --------------------------------------------------------------------------------------------
# case 8: prefixes locked by parked conversations
# --------------------------------------------------------------------------------------------

def test_case8_prefixes_locked_by_parked_conversations_are_given_back(servers, tokenizer, corpus):
    """Two shared prefixes of ~2000 tokens are primed (``max_new_tokens`` 0), each followed by a
    compressed question that is parked (it locks its prefix in the tree). A fresh ~3400-token
    prompt fits the 6000-slot pool only once the parked conversations are evicted and their
    prefixes unlocked and evicted too: it is served within 180 s."""
    server = server_for(servers, SMALL)
    server.flush_cache()
    for k in range(2):
        prefix = ids_of(tokenizer, corpus, 2000, 27001 + 10 * k)
        primer = ok(generate(server, prefix, max_new_tokens=0))
        assert report(primer) is None
        out = ok(generate(server, prefix + ids_of(tokenizer, corpus, 300, 27002 + 10 * k)))
        kv = report(out)
        assert kv is not None and kv["shared_prefix_tokens"] >= len(prefix) - 1, out["meta_info"]
    m = whole(server)
    assert m["parked_conversations"] == 2 and m["tree_protected_tokens"] >= 3000, m
    fresh = ids_of(tokenizer, corpus, 3400, 27100)
    assert len(fresh) > m["available_slots"] + m["parked_slots"], m  # needs the locked prefixes' memory
    started = time.time()
    out = ok(generate(server, fresh, timeout=180, policy="none"))
    assert len(out["output_ids"]) == 8 and time.time() - started < 180
    m = assert_survives(server)
    assert m["parked_conversations"] < 2, m


# --------------------------------------------------------------------------------------------
# case 6: a fresh request and a continued turn admitted in the same round
# --------------------------------------------------------------------------------------------

def test_case6_fresh_prompt_and_continued_turn_admitted_together(servers, tokenizer, corpus):
    """Conversation X (3000 ids at ``kv_budget`` 2800) is parked on the 6000-slot pool. With the
    scheduler paused (``/pause_generation`` in place), a fresh ~3400-id prompt and X's next turn
    (its history, answer and new ids) arrive; generation continues. Both complete (the one that
    does not fit waits or re-prefills), and the server survives with nothing leaked."""
    server = server_for(servers, SMALL)
    server.flush_cache()
    x = ids_of(tokenizer, corpus, 3000, 27201)
    rx = ok(generate(server, x, budget=2800))
    assert report(rx) is not None, rx["meta_info"]
    m = whole(server)
    assert m["parked_conversations"] == 1, m
    fresh = ids_of(tokenizer, corpus, 3400, 27202)
    turn = x + rx["output_ids"] + ids_of(tokenizer, corpus, 200, 27203)
    status, body = post(server, {"mode": "in_place"}, path="/pause_generation", timeout=60)
    assert status == 200, body
    results = {}

    def run(name, ids, **custom):
        results[name] = generate(server, ids, timeout=400, **custom)

    threads = [threading.Thread(target=run, args=("fresh", fresh)),
               threading.Thread(target=run, args=("turn", turn), kwargs={"budget": 2800})]
    try:
        threads[0].start()
        time.sleep(1.0)
        threads[1].start()
        time.sleep(3.0)  # both reach the paused scheduler
    finally:
        status, body = post(server, {"torch_empty_cache": False}, path="/continue_generation", timeout=60)
    assert status == 200, body
    for t in threads:
        t.join(450)
    for name in ("fresh", "turn"):
        assert name in results, f"{name} never returned\n" + server.log_tail(40)
        out = ok(results[name])
        assert len(out["output_ids"]) == 8, (name, out["meta_info"])
    assert_survives(server)


# --------------------------------------------------------------------------------------------
# streaming sessions holding the memory that the head of the queue waits for
# --------------------------------------------------------------------------------------------

@pytest.mark.server_configs("lava-small-pool")
def test_session_turn_behind_a_blocked_head_is_served(servers, tokenizer, corpus):
    """Found by the seed-7 soak (the server silent for minutes, 11 requests waiting): on the
    1100-slot pool a streaming session's turn 1 (~400 tokens, compressed) holds its KV, as SGLang
    sessions do between turns. A fresh ~1000-token request arrives and cannot be admitted while the
    session holds its slots; the session's turn 2 arrives behind it (the scheduler is paused so the
    order is certain). First-come-first-served waited forever: turn 2 behind the head, the head
    behind the memory that only turn 2 and the session's close would give back. The server runs
    ``--schedule-policy lof --enable-priority-scheduling``, and the head has the higher priority
    and the longer output, so SGLang's sort puts it first again at every round. Turn 2 is served
    within 120 s, the client closes the session, the fresh request is then served, nothing leaks."""
    server = config_server(servers, "lava-small-pool")
    server.flush_cache()
    sid = server.open_session()
    closed = False
    try:
        first = ok(post(server, {"input_ids": ids_of(tokenizer, corpus, 400, 27301), "session_params": {"id": sid},
                                 "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}}))
        assert report(first) is not None, first["meta_info"]
        m = server.kv_memory()  # not settled: the open session holds its turn's compressed state
        head = ids_of(tokenizer, corpus, 1000, 27302)
        assert len(head) + 8 > m["available_slots"], ("the fresh request would fit beside the session", m)
        results = {}

        def run(name, payload, timeout):
            results[name] = post(server, payload, timeout=timeout)

        sp = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        # The server sorts its queue longest-output-first and by priority at every round: both put
        # the head first (a higher priority, a longer output), round after round.
        head_payload = {"input_ids": head, "priority": 10, "sampling_params": {**sp, "max_new_tokens": 16}}
        threads = {"head": threading.Thread(target=run, args=("head", head_payload, 400)),
                   "turn": threading.Thread(target=run, args=("turn", {
                       "input_ids": ids_of(tokenizer, corpus, 100, 27303), "session_params": {"id": sid},
                       "sampling_params": sp}, 120))}
        status, body = post(server, {"mode": "in_place"}, path="/pause_generation", timeout=60)
        assert status == 200, body
        try:
            threads["head"].start()
            time.sleep(1.0)
            threads["turn"].start()
            time.sleep(2.0)  # both wait at the paused scheduler, the fresh request first
        finally:
            status, body = post(server, {"torch_empty_cache": False}, path="/continue_generation", timeout=60)
        assert status == 200, body
        threads["turn"].join(150)
        assert "turn" in results, "the session's turn never returned\n" + server.log_tail(40)
        turn = ok(results["turn"])
        assert len(turn["output_ids"]) == 8 and turn["meta_info"]["cached_tokens"] > 0, turn["meta_info"]
        assert "session turn(s) go first" in server.log_text(), server.log_tail(40)
        server.close_session(sid)
        closed = True
        threads["head"].join(450)
        assert "head" in results, "the fresh request never returned\n" + server.log_tail(40)
        assert len(ok(results["head"])["output_ids"]) == 16
    finally:
        if not closed:
            server.close_session(sid)
    assert_survives(server)
