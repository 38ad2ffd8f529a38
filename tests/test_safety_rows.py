"""Safety (issue 26 / 25), cases 3, 7 and 11: parked conversations and the scheduler's rows,
its ``lpm`` policy and the ``--kv-park-max-slots`` cap. Helpers: ``test_safety.py``."""

from __future__ import annotations

import threading
import time

import pytest
from test_safety import assert_survives, config_server, corpus, generate, ids_of, ok, report, server_for, whole  # noqa: F401 (fixture)

pytestmark = pytest.mark.server

LAVA = ("--kv-policy", "lava", "--kv-budget", "128")
ROWS = (*LAVA, "--max-running-requests", "2")


# --------------------------------------------------------------------------------------------
# case 3: parked conversations must not hold the rows a new request needs
# --------------------------------------------------------------------------------------------

def test_case3_parked_conversations_give_their_rows_to_a_new_request(servers, tokenizer, corpus):
    """``--max-running-requests 2``: two distinct ~1500-token compressed requests finish (and are
    parked); a third distinct one is served within 90 s (before the fix it waited forever: no row
    was free, and nothing gave one back). ``/server_info`` reports ``parked_conversations`` and the
    cap ``park_max_conversations``, which they never exceed."""
    server = server_for(servers, ROWS)
    for k in range(2):
        out = ok(generate(server, ids_of(tokenizer, corpus, 1500, 26600 + k), timeout=300))
        assert report(out) is not None, out["meta_info"]
    m = whole(server)
    assert m["parked_conversations"] >= 1, m
    started = time.time()
    third = ok(generate(server, ids_of(tokenizer, corpus, 1500, 26602), timeout=90))
    assert time.time() - started < 90 and len(third["output_ids"]) == 8
    m = assert_survives(server)
    assert "park_max_conversations" in m, m
    assert m["parked_conversations"] <= m["park_max_conversations"], m


def test_case3_parked_conversations_give_their_rows_to_concurrent_requests(servers, tokenizer, corpus):
    """The same with two new requests at once (both rows are wanted while conversations are
    parked): both are served within 120 s."""
    server = server_for(servers, ROWS)
    for k in range(2):
        ok(generate(server, ids_of(tokenizer, corpus, 1500, 26700 + k), timeout=300))
    whole(server)
    results = {}

    def run(k):
        results[k] = generate(server, ids_of(tokenizer, corpus, 1500, 26710 + k), timeout=120)

    started = time.time()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert time.time() - started < 150
    for k in range(2):
        assert len(ok(results[k])["output_ids"]) == 8
    assert_survives(server)


# --------------------------------------------------------------------------------------------
# case 7: --schedule-policy lpm and a continued turn asking for prompt logprobs
# --------------------------------------------------------------------------------------------

# Its own server: whole-prompt prefill on the base pool, as the case was reproduced (on the shared
# "lava-park-cap" server, with 256-token chunks, the code before the fix passed this test).
LPM = (*LAVA, "--schedule-policy", "lpm", "--kv-park-max-slots", "300")


def test_case7_lpm_continued_turn_with_prompt_logprobs(servers, tokenizer, corpus):
    """``--schedule-policy lpm``: a ~2500-character prompt is parked; its next turn (history, answer,
    new question) asks for ``return_logprob`` from ``logprob_start_len`` 0. Served (200, all its
    tokens) and the server survives with nothing leaked."""
    server = server_for(servers, LPM)
    ids = ids_of(tokenizer, corpus, 600, 26801)
    r1 = ok(generate(server, ids, max_new_tokens=16))
    assert report(r1) is not None, r1["meta_info"]
    whole(server)
    turn = ids + r1["output_ids"] + ids_of(tokenizer, corpus, 120, 26802)
    r2 = ok(generate(server, turn, max_new_tokens=16, top={"return_logprob": True, "logprob_start_len": 0}))
    assert len(r2["output_ids"]) == 16, r2["meta_info"]
    assert r2["meta_info"].get("output_token_logprobs"), list(r2["meta_info"])
    assert_survives(server)


# --------------------------------------------------------------------------------------------
# case 11: a conversation that grows past --kv-park-max-slots
# --------------------------------------------------------------------------------------------

CAP = 300


# The suite's "lava-park-cap" server: --kv-park-max-slots 300, prefill in 256-token chunks, an
# 8192-slot pool, debug invariants on.
@pytest.mark.server_configs("lava-park-cap")
def test_case11_growing_conversation_is_not_kept_parked_past_the_cap(servers, tokenizer, corpus):
    """``--kv-park-max-slots 300``: one conversation continued turn after turn with messages
    shorter than the window (no re-selection: what it holds grows by each turn's tokens), so each
    re-park holds more. Once it would hold more than 300 slots it is not kept parked (counted in
    ``park_not_parked_over_cap``): ``parked_slots`` never exceeds 300, and the server survives
    with nothing leaked."""
    server = config_server(servers, "lava-park-cap")
    server.flush_cache()
    m = whole(server)
    assert m["parked_slots"] == 0, m
    history = ids_of(tokenizer, corpus, 600, 26901)
    news = ids_of(tokenizer, corpus, 400, 26902)
    parked, counters = [], []
    for turn in range(12):
        out = ok(generate(server, history, max_new_tokens=8, budget=200))
        assert report(out) is not None, (turn, out["meta_info"])
        m = whole(server)
        parked.append(m["parked_slots"])
        counters.append(m["park_not_parked_over_cap"])
        assert m["parked_slots"] <= CAP, (turn, parked, m)
        if counters[-1] > counters[0]:
            break  # it grew past the cap at its last re-park and was released instead
        history = history + out["output_ids"] + news[turn * 12:(turn + 1) * 12]
    # It was parked and growing (a re-park counts against the cap) until it no longer fit.
    assert parked[0] > 0 and max(parked) > parked[0], ("the conversation never grew while parked", parked)
    assert counters[-1] > counters[0] and parked[-1] == 0, ("never refused over the cap", parked, counters)
    assert_survives(server)
