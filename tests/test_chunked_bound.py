"""Admission trusts only what is enforced: every request that a chunked-prefill LAVa server is
sent gets an answer in bounded time (served, or a 4xx/5xx naming the cause), the server keeps
serving, and nothing leaks (``engine.long_prompts``, ``engine.guard``, ``failures.abort``).

One test per case, as a client sends it, on the suite's small-pool servers (debug invariants on):
``lava-tiny-pool`` (pool 1024, chunks of 512, budget 256: the bound is 801 slots),
``lava-tiny-noradix`` (the same without a radix cache) and ``lava-small-pool`` (pool 1100, chunks of
256, budget 128). Before the fix, the first three cases and the retraction killed the scheduler
("Try to allocate 512 tokens"), the radix hit and the ``ignore_eos`` request without a radix
cache were never answered.
"""

from __future__ import annotations

import threading
import time

import pytest
from lava_sglang.sglang_log import PREFILL_LINE
from test_safety import assert_survives, config_server, corpus, ids_of, ok, post, report  # noqa: F401 (fixture)

pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava-tiny-pool")]

TINY_BOUND = 256 + 512 + 32 + 1
CHUNKED = {"kv_prefill_compression": "chunked"}


def send(server, ids, max_new_tokens=8, rid=None, timeout=300, ignore_eos=True, **custom):
    sp = {"temperature": 0.0, "ignore_eos": ignore_eos, "custom_params": {**CHUNKED, **{f"kv_{k}": v for k, v in custom.items()}}}
    if max_new_tokens is not None:
        sp["max_new_tokens"] = max_new_tokens
    payload = {"input_ids": ids, "sampling_params": sp}
    if rid is not None:
        payload["rid"] = rid
    return post(server, payload, timeout=timeout)


def refused(result, *words):
    status, body = result
    assert status == 400, (status, str(body)[:500])
    for word in words:
        assert word in str(body), (word, str(body)[:500])


def test_prefix_primer_longer_than_the_pool_is_refused(servers, tokenizer, corpus):
    """A 2000-token prompt with ``max_new_tokens: 0`` (a prefix primer, never compressed) on the
    1024-slot pool: a 400 naming why, not the pool allocation that killed the scheduler."""
    server = config_server(servers, "lava-tiny-pool")
    refused(send(server, ids_of(tokenizer, corpus, 2000, 32101), max_new_tokens=0), "max_new_tokens 0", "primer")
    assert_survives(server, idle=2.0)


def test_min_prompt_len_beyond_the_first_chunk_is_refused(servers, tokenizer, corpus):
    """``kv_min_prompt_len: 1900`` with 512-token chunks: the chunks before 1900 tokens would never
    be selected, so the 2000-token prompt cannot be held to the bound: a 400 naming the field."""
    server = config_server(servers, "lava-tiny-pool")
    refused(send(server, ids_of(tokenizer, corpus, 2000, 32102), min_prompt_len=1900), "kv_min_prompt_len 1900")
    assert_survives(server, idle=2.0)


@pytest.mark.server_configs("lava-small-pool")
def test_window_longer_than_the_chunk_is_refused(servers, tokenizer, corpus):
    """``kv_window: 300`` (budget 301) with 256-token chunks on the 1100-slot pool: no chunk is
    selected before the last, so the 2000-token prompt is refused by name; a prompt that fits the
    pool with the same settings is served (compressed once, after its prefill)."""
    server = config_server(servers, "lava-small-pool")
    server.flush_cache()
    refused(send(server, ids_of(tokenizer, corpus, 2000, 32103), window=300, budget=301),
            "kv_window 300 is longer than the chunk 256")
    out = ok(send(server, ids_of(tokenizer, corpus, 700, 32104), window=300, budget=301))
    assert len(out["output_ids"]) == 8 and report(out) is not None, out["meta_info"]
    server.flush_cache()
    assert_survives(server, idle=2.0)


def test_radix_hit_longer_than_the_pool_is_served(servers, tokenizer, corpus):
    """A 200-token prompt X is answered uncompressed (it fits the budget) and published to the
    tree; then X + 1800 tokens with SGLang's default ``max_new_tokens``. Its locked 200-token
    match, its bound and its output reserve do not fit the pool together: the match is capped
    and the request is served within its bound, where it used to wait forever."""
    server = config_server(servers, "lava-tiny-pool")
    server.flush_cache()
    ids = ids_of(tokenizer, corpus, 2000, 32105)
    first = ok(send(server, ids[:200]))
    assert report(first) is None, first["meta_info"]
    mark = len(server.log_text())
    out = ok(send(server, ids, max_new_tokens=None, ignore_eos=False, timeout=180))
    rep = report(out)
    assert rep is not None and rep["peak_slots"] <= TINY_BOUND, out["meta_info"]
    assert "the match is capped" in server.log_text()[mark:], server.log_tail(40)
    server.flush_cache()
    assert_survives(server, idle=2.0)


@pytest.mark.server_configs("lava-tiny-noradix")
def test_ignore_eos_without_radix_cache_is_served(servers, tokenizer, corpus):
    """``--disable-radix-cache``: SGLang admits ``ignore_eos`` requests through its own path,
    which counted the whole 2000-token prompt against the 1024-slot pool (never answered). Now
    admitted on its bound and served within it."""
    server = config_server(servers, "lava-tiny-noradix")
    out = ok(send(server, ids_of(tokenizer, corpus, 2000, 32106), max_new_tokens=16, timeout=180))
    assert len(out["output_ids"]) == 16 and report(out)["peak_slots"] <= TINY_BOUND, out["meta_info"]
    assert_survives(server, idle=2.0)


def test_retracted_resend_turn_longer_than_the_pool_is_compressed_chunk_wise(servers, tokenizer, corpus):
    """A 2000-token prompt is compressed chunk by chunk and parked; its resend turn (+100 tokens,
    100 out) borrows it; while that turn decodes, ``/pause_generation`` retracts it and
    ``/continue_generation`` resumes. The re-prefill (the whole history, twice the pool) used to
    be replayed whole and kill the scheduler; it is now compressed afresh chunk by chunk, within
    the bound, and logged."""
    server = config_server(servers, "lava-tiny-pool")
    server.flush_cache()
    ids = ids_of(tokenizer, corpus, 2100, 32107)
    t1 = ok(send(server, ids[:2000]))
    turn = ids[:2000] + t1["output_ids"] + ids[2000:2100]
    mark = len(server.log_text())
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("turn", send(server, turn, max_new_tokens=100)))
    thread.start()
    deadline = time.monotonic() + 120
    while not PREFILL_LINE.search(server.log_text()[mark:]):  # the turn's new tokens prefilled
        assert time.monotonic() < deadline, server.log_tail(30)
        time.sleep(0.1)
    time.sleep(1.5)  # a few of its 100 decode steps
    status, body = post(server, {"mode": "retract"}, path="/pause_generation", timeout=60)
    assert status == 200, body
    status, body = post(server, {"torch_empty_cache": False}, path="/continue_generation", timeout=60)
    assert status == 200, body
    thread.join(300)
    out = ok(results["turn"])
    assert len(out["output_ids"]) == 100, out["meta_info"]
    log = server.log_text()[mark:]
    assert "retracted; its re-prefill is compressed again chunk by chunk" in log, server.log_tail(40)
    assert report(out)["peak_slots"] <= TINY_BOUND, out["meta_info"]
    server.flush_cache()
    assert_survives(server, idle=2.0)


@pytest.mark.parametrize("stage", ["compress", "reselect"])
def test_fault_mid_prefill_fails_its_request_alone(servers, tokenizer, corpus, stage):
    """``LAVA_SGLANG_FAULT``: the selection after a chunk raises for a 2500-token chunked request
    (``compress``: its first selection; ``reselect``: a later one). It used to go on prefilling
    uncompressed (``to_finish`` is read after the last chunk only) and overrun the pool. It is
    now aborted at once through SGLang's chunked-request abort path: an HTTP 5xx naming the
    stage; a request sent beside it is served, and nothing leaks."""
    server = config_server(servers, "lava-tiny-pool")
    server.flush_cache()
    results = {}

    def run(name, ids, rid):
        results[name] = send(server, ids, rid=rid)

    threads = [threading.Thread(target=run, args=("fault", ids_of(tokenizer, corpus, 2500, 32108), f"lava-fault-{stage}-1")),
               threading.Thread(target=run, args=("normal", ids_of(tokenizer, corpus, 300, 32109), None))]
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join(300)
    status, body = results["fault"]
    assert status >= 500 and f"({stage})" in str(body), (status, str(body)[:500])
    assert len(ok(results["normal"])["output_ids"]) == 8
    server.flush_cache()
    assert_survives(server, idle=2.0)


@pytest.mark.server_configs("lava")
@pytest.mark.parametrize("value", ["kv_budget=64", ["kv_budget", 64], 64])
def test_custom_params_that_is_not_an_object_is_refused(servers, tokenizer, corpus, value):
    """``custom_params`` as a string (a common client mistake), a list or a number: a 400 naming
    the field, instead of the server's settings applied silently."""
    server = config_server(servers, "lava")
    status, body = post(server, {"input_ids": ids_of(tokenizer, corpus, 50, 32110),
                                 "sampling_params": {"max_new_tokens": 2, "custom_params": value}})
    assert status == 400 and "custom_params" in str(body), (status, str(body)[:500])
