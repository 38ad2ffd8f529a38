"""Compression during chunked prefill (``kv_prefill_compression: chunked``, ``engine.chunked``) on
the real server (CPU engine), debug invariants on: the suite's ``lava-chunked`` server (prefill in
256-token chunks) and its ``none`` twin, the mode chosen per request; and ``lava-tiny-pool`` (a
1024-slot pool, 512-token chunks, budget 256), where prompts four times the pool are served.
The retraction of a chunked request is tested with the other forced retractions
(tests/test_reliability.py).
"""

from __future__ import annotations

import json
import time

import pytest

from lava_sglang.launch import check_whole, drop, http_json, leaked_slots, open_generate, post_generate, settled
from lava_sglang.sglang_log import PREFILL_LINE

pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava-chunked")]

CHUNK, WINDOW = 256, 32


def generate(server, ids, max_new_tokens=8, **custom):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    if custom:
        sp["custom_params"] = {f"kv_{k}": v for k, v in custom.items()}
    return http_json(server.url + "/generate", {"input_ids": ids, "sampling_params": sp})


def report(out):
    rep = out["meta_info"].get("kv_compression")
    return rep[0] if rep else None


@pytest.mark.server_configs("lava-chunked", "none")
def test_chunked_with_a_budget_covering_the_prompt_equals_none(servers, ids_of):
    """A ~1200-token prompt (5 chunks) at budget 4096 under ``chunked``: never compressed, greedy
    output identical to ``--kv-policy none`` with the same chunking."""
    ids = ids_of(1200, 27401)
    lava = servers.config("lava-chunked")
    a = generate(lava, ids, 16, budget=4096, prefill_compression="chunked")
    none = servers.config("none")
    b = generate(none, ids, 16)
    assert report(a) is None, a["meta_info"]
    assert a["output_ids"] == b["output_ids"]


def test_one_chunk_chunked_equals_after(servers, ids_of):
    """A prompt shorter than one chunk: ``chunked`` and ``after`` make the same selection (the
    same kept cells, slots and greedy output)."""
    server = servers.config("lava-chunked")
    ids = ids_of(CHUNK - 20, 27402)
    server.flush_cache()
    a = generate(server, ids, 16, budget=64, prefill_compression="after")
    server.flush_cache()  # the first request is parked: the second must not borrow it
    b = generate(server, ids, 16, budget=64, prefill_compression="chunked")
    ra, rb = report(a), report(b)
    assert ra is not None and rb is not None, (a["meta_info"], b["meta_info"])
    for key in ("kept_cells", "slots_held", "slots_freed", "prompt_tokens"):
        assert ra[key] == rb[key], (key, ra, rb)
    assert rb["chunk_selections"] == 1 and rb["peak_slots"] == len(ids)
    assert a["output_ids"] == b["output_ids"]


@pytest.mark.parametrize("policy", ["lava", "snapkv", "streamingllm"])
def test_chunked_prefill_peak_stays_within_budget_plus_chunk(servers, ids_of, policy):
    """A ~1500-token prompt (6 chunks of 256) at budget 128 under ``chunked``: re-selected after
    several chunks, its private slots never exceed budget + chunk + window (+1 of packing
    rounding) while prefilled, where ``after`` peaks at the whole prompt; it ends holding its
    budget, answers in full, and nothing leaks."""
    server = servers.config("lava-chunked")
    ids = ids_of(1500, 27403 + ["lava", "snapkv", "streamingllm"].index(policy))
    out = generate(server, ids, 8, budget=128, policy=policy, prefill_compression="chunked")
    rep = report(out)
    assert rep is not None, out["meta_info"]
    assert rep["prefill_compression"] == "chunked" and rep["chunk_selections"] >= 3, rep
    assert rep["peak_slots"] <= 128 + CHUNK + WINDOW + 1, rep
    assert rep["slots_held"] <= 128 + 1, rep
    assert len(out["output_ids"]) == 8
    server.flush_cache()
    check_whole(server)


TINY_POOL, TINY_CHUNK, TINY_BUDGET = 1024, 512, 256
TINY_BOUND = TINY_BUDGET + TINY_CHUNK + WINDOW + 1
CHUNKED = {"kv_prefill_compression": "chunked"}


def post(server, payload):
    """(HTTP status, body text)."""
    return post_generate(server.port, payload, timeout=900)


@pytest.mark.server_configs("lava-tiny-pool")
def test_prompt_four_times_the_pool_is_served_chunked_and_refused_otherwise(servers, ids_of):
    """``--max-total-tokens 1024 --chunked-prefill-size 512 --kv-budget 256``: a ~4400-token prompt
    (over 4x the pool) is answered under ``chunked`` with its private slots within
    256 + 512 + 32 + 1; the same prompt under ``after`` is refused with a message naming
    ``kv_prefill_compression``, and under ``kv_policy: none`` as by stock SGLang; nothing leaks."""
    server = servers.config("lava-tiny-pool")
    ids = ids_of(4400, 27501)
    sp = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    status, body = post(server, {"input_ids": ids, "sampling_params": {**sp, "custom_params": {
        "kv_prefill_compression": "chunked"}}})
    assert status == 200, body[:500]
    out = json.loads(body)
    rep = report(out)
    assert rep is not None and rep["prefill_compression"] == "chunked", out["meta_info"]
    assert rep["peak_slots"] <= TINY_BOUND, rep
    assert rep["chunk_selections"] >= 8, rep  # after every full chunk
    # every selection's freed slots are summed: all private tokens but the kept ones
    assert rep["slots_freed_total"] == rep["private_tokens"] - (rep["slots_held"] - rep["shared_prefix_tokens"]), rep
    assert rep["compression_ms_total"] >= rep["compression_ms"] and rep["prefill_ms_total"] > rep["prefill_ms"], rep
    # the trace: one step per chunk, [tokens prefilled, slots after its forward, after its selection]
    trace = rep["prefill_trace"]
    ends = [0] + [step[0] for step in trace]
    assert all(0 < b - a <= TINY_CHUNK for a, b in zip(ends, ends[1:])) and len(trace) >= len(ids) / TINY_CHUNK, trace
    assert trace[-1][0] == len(ids) and max(step[1] for step in trace) == rep["peak_slots"], trace
    assert all(kept <= held for _, held, kept in trace) and trace[-1][2] == rep["slots_held"], trace
    assert len(out["output_ids"]) == 8
    status, body = post(server, {"input_ids": ids, "sampling_params": sp})
    assert status == 400 and "kv_prefill_compression" in body, (status, body[:500])
    status, body = post(server, {"input_ids": ids, "sampling_params": {**sp, "custom_params": {"kv_policy": "none"}}})
    assert status == 400 and "kv_prefill_compression" not in body, (status, body[:500])
    server.flush_cache()
    check_whole(server)


def prefills_since(server, mark: int) -> list[str]:
    return PREFILL_LINE.findall(server.log_text()[mark:])


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_whole(server):
    m = server.wait_settled(120)
    assert settled(m) and leaked_slots(m) == 0, m
    check_whole(server)


@pytest.mark.server_configs("lava-tiny-pool")
def test_aborts_between_chunks_and_while_waiting_leak_nothing(servers, ids_of):
    """Two ~2200-token chunked requests on the 1024-slot pool, where one fits at a time. The
    second, still waiting, is dropped by its client; the first is dropped after its second chunk
    (selected twice, three chunks to go). Nothing leaks, and a chunked prompt is answered after."""
    server = servers.config("lava-tiny-pool")
    assert_whole(server)
    mark = len(server.log_text())

    def payload(ids):
        return {"input_ids": ids, "stream": True, "sampling_params": {
            "max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True, "custom_params": CHUNKED}}
    first = open_generate(server.port, payload(ids_of(2200, 27601)), timeout=300)
    wait_until(lambda: len(prefills_since(server, mark)) >= 1, 120, "the first chunk")
    second = open_generate(server.port, payload(ids_of(2200, 27602)), timeout=300)
    wait_until(lambda: "#queue-req: 1" in server.log_text()[mark:], 120, "the second request waiting")
    drop(second)
    wait_until(lambda: len(prefills_since(server, mark)) >= 2, 120, "the second chunk")
    drop(first)
    prefills = prefills_since(server, mark)
    assert all(int(new_seq) == 1 for new_seq, _, _ in prefills), prefills  # the waiting one never ran
    assert len(prefills) < 5, prefills  # dropped before its last chunk
    assert_whole(server)
    out = json.loads(post(server, {"input_ids": ids_of(1500, 27603), "sampling_params": {
        "max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True, "custom_params": CHUNKED}})[1])
    assert len(out["output_ids"]) == 4 and report(out)["peak_slots"] <= TINY_BOUND, out["meta_info"]
    assert_whole(server)


def tiny_send(server, ids, session=None, max_new_tokens=8):
    payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                                     "ignore_eos": True, "custom_params": CHUNKED}}
    if session is not None:
        payload["session_params"] = {"id": session}
    status, body = post(server, payload)
    assert status == 200, body[:500]
    return json.loads(body)


def assert_continued_chunk_wise(out, longer_than_pool=True):
    rep = report(out)
    assert rep is not None and rep["continued"] and rep["prefill_compression"] == "chunked", out["meta_info"]
    assert rep["chunk_selections"] >= 3 and rep["peak_slots"] <= TINY_BOUND, rep
    if longer_than_pool:
        assert out["meta_info"]["prompt_tokens"] > TINY_POOL, out["meta_info"]
    assert len(out["output_ids"]) == 8


@pytest.mark.server_configs("lava-tiny-pool")
def test_session_turn_longer_than_the_pool_continues_chunk_wise(servers, ids_of):
    """A streaming session on the 1024-slot pool: turn 1 (600 tokens) is compressed to the
    budget; turn 2 brings 1500 new tokens (a history twice the pool) and continues over the
    compressed history chunk by chunk, within the bound; turn 3 continues after it."""
    server = servers.config("lava-tiny-pool")
    ids = ids_of(2400, 27604)
    sid = server.open_session()
    try:
        t1 = tiny_send(server, ids[:600], session=sid)
        assert report(t1)["slots_held"] <= TINY_BUDGET + 1, t1["meta_info"]
        t2 = tiny_send(server, ids[600:2100], session=sid)
        assert_continued_chunk_wise(t2)
        assert t2["meta_info"]["cached_tokens"] >= 600, t2["meta_info"]
        t3 = tiny_send(server, ids[2100:2400], session=sid)
        assert report(t3)["continued"] and len(t3["output_ids"]) == 8, t3["meta_info"]
    finally:
        server.close_session(sid)
    assert_whole(server)


@pytest.mark.server_configs("lava-tiny-pool")
def test_parked_conversation_continues_chunk_wise(servers, ids_of):
    """A client resending its whole history: turn 1 (600 tokens) is compressed and parked; turn 2
    (the history and 1500 new tokens, twice the pool) borrows the parked conversation and
    continues over it chunk by chunk, within the bound."""
    server = servers.config("lava-tiny-pool")
    server.flush_cache()
    ids = ids_of(2100, 27605)
    t1 = tiny_send(server, ids[:600])
    before = server.kv_memory()
    t2 = tiny_send(server, ids[:600] + t1["output_ids"] + ids[600:2100])
    after = server.kv_memory()
    assert after["park_hits"] == before["park_hits"] + 1, (before, after)
    assert t2["meta_info"]["cached_tokens"] >= 600, t2["meta_info"]
    assert_continued_chunk_wise(t2)
    server.flush_cache()
    assert_whole(server)


def test_a_working_budget_keeps_more_before_the_last_selection(servers, ids_of):
    """``kv_prefill_working_budget``: the selections before the prompt is complete keep 512 per
    head, the last one (the prompt's own window) the budget, 128; the peak stays within working
    budget + chunk + window + 1, and a bad value gets a 400 naming it."""
    server = servers.config("lava-chunked")
    ids = ids_of(1200, 27409)
    out = generate(server, ids, 8, budget=128, prefill_compression="chunked", prefill_working_budget=512)
    rep = report(out)
    assert rep["chunk_selections"] >= 2 and rep["private_slots"] <= 128 + 1, rep
    assert 512 < rep["peak_slots"] <= 512 + CHUNK + 32 + 1, rep
    status, body = post_generate(server.port, {"input_ids": ids[:100], "sampling_params": {
        "max_new_tokens": 1, "custom_params": {"kv_budget": 128, "kv_prefill_working_budget": 64}}})
    assert status == 400 and "kv_prefill_working_budget" in body, body
