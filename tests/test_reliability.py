"""Reliability on the real server (CPU engine, loopback): bad input, client disconnects, retraction.

One small-pool LAVa server (the ``reliability`` configuration of ``tests/conftest.py``) runs most
tests here, with the plugin's debug invariants on
(``LAVA_SGLANG_DEBUG=1``: after every compression and every release the scheduler asserts that
no slot is both free and referenced and that nothing is on the free list twice). Two SGLang
environment knobs make the faults reachable in a few seconds:

* ``SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION=8`` and ``SGLANG_INIT_NEW_TOKEN_RATIO=0.05``: admission
  reserves almost nothing for the decode tokens of new and running requests, so long
  ``ignore_eos`` decodes outgrow the 640-slot pool and the scheduler retracts.
* ``SGLANG_REQUEST_STATE_WAIT_TIMEOUT=1``: the server notices a client that went away while
  nothing was streamed (prefill) within a second instead of four.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from lava_sglang.launch import drop, http_json, leaked_slots, open_generate, settled, sse_events
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

pytestmark = [pytest.mark.server, pytest.mark.server_configs("reliability")]

POOL = 640  # the reliability configuration's --max-total-tokens


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(default_corpus_dir())


@pytest.fixture
def server(servers):
    server = servers.config("reliability")
    assert f"--max-total-tokens {POOL}" in " ".join(server.command)
    return server


def prompt_ids(tokenizer, corpus, n_tokens, seed):
    return tokenizer.encode(f"Document {seed}. " + haystack(n_tokens, corpus, seed=seed, tokenizer=tokenizer))


def memory(server):
    return server.kv_memory()


def wait_idle(server, timeout=120.0):
    return server.wait_settled(timeout)


def assert_no_leak(server, timeout=120.0):
    m = wait_idle(server, timeout)
    assert settled(m) and leaked_slots(m) == 0, m
    return m


def generate(server, ids, max_new_tokens=16, ignore_eos=False, **custom):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": ignore_eos}
    if custom:
        sp["custom_params"] = {f"kv_{k}": v for k, v in custom.items()}
    return http_json(server.url + "/generate", {"input_ids": ids, "sampling_params": sp})


def still_serves(server):
    assert "Paris" in server.generate("The capital of France is", max_new_tokens=4)["text"]


# --------------------------------------------------------------------------------------------
# bad per-request input
# --------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"kv_budget": 100.5}, "kv_budget", "integer"),
    ({"kv_budget": True}, "kv_budget", "integer"),
    ({"kv_budget": None}, "kv_budget", "integer"),
    ({"kv_budget": [128]}, "kv_budget", "integer"),
    ({"kv_budget": -5}, "kv_budget", "negative"),
    ({"kv_window": -1}, "kv_window", "negative"),
    ({"kv_window": 0}, "kv_window", "at least 1"),
    ({"kv_min_prompt_len": -1}, "kv_min_prompt_len", "negative"),
    ({"kv_min_prompt_len": "10"}, "kv_min_prompt_len", "integer"),
    ({"kv_kernel_size": 4}, "kv_kernel_size", "odd"),
    ({"kv_kernel_size": 0}, "kv_kernel_size", "odd"),
    ({"kv_floor_alpha": -0.1}, "kv_floor_alpha", "[0, 1]"),
    ({"kv_floor_alpha": "0.5"}, "kv_floor_alpha", "number"),
    ({"kv_pyramid_beta": 0.5}, "kv_pyramid_beta", "[1, 1000]"),
    ({"kv_pooling": "min"}, "kv_pooling", "unknown pooling"),
    ({"kv_pooling": 3}, "kv_pooling", "unknown pooling"),
    ({"kv_policy": 5}, "kv_policy", "unknown policy"),
    ({"kv_budget": 48, "kv_window": 48}, "kv_budget", "larger than the window"),
    ({"kv_window": 100}, "kv_budget", "larger than the window"),  # server budget 64 does not cover it
    ({"kv_budgett": 128}, "kv_budgett", "unknown compression setting"),
]


def post_status(server, custom):
    payload = {"text": "hello", "sampling_params": {"max_new_tokens": 2, "custom_params": custom}}
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_bad_request_settings_get_400_naming_the_field(server):
    failures = []
    for custom, field, words in BAD_SETTINGS:
        status, body = post_status(server, custom)
        if status != 400 or field not in body or words not in body:
            failures.append((custom, status, body[:300]))
    assert not failures, failures
    still_serves(server)


@pytest.mark.server_configs("none")
def test_compression_settings_on_a_server_without_compression_get_400(servers):
    server = servers.config("none")
    for custom, field in (({"kv_policy": "lava"}, "kv_policy"), ({"kv_budget": 256}, "kv_budget")):
        status, body = post_status(server, custom)
        assert status == 400 and field in body and "--kv-policy none" in body, (custom, status, body)
    # a request that says kv_policy none is served as without the plugin; a bad value still gets a 400
    assert post_status(server, {"kv_policy": "none"})[0] == 200
    assert post_status(server, {"kv_policy": "none", "kv_budget": 64})[0] == 200
    status, body = post_status(server, {"kv_policy": "none", "kv_window": -1})
    assert status == 400 and "kv_window" in body, body
    still_serves(server)


# --------------------------------------------------------------------------------------------
# clients that go away
# --------------------------------------------------------------------------------------------

def test_disconnect_during_prefill(server, tokenizer, corpus):
    """Non-streaming client closes its socket while the prompt is being prefilled (chunks of 64)."""
    before = assert_no_leak(server)
    ids = prompt_ids(tokenizer, corpus, 560, seed=7001)
    conn = open_generate(server.port, {"input_ids": ids, "sampling_params": {"max_new_tokens": 32, "temperature": 0.0}})
    deadline = time.time() + 120
    seen_pending = False
    while time.time() < deadline and not seen_pending:
        seen_pending = memory(server)["pending_requests"] > 0
    drop(conn)
    assert seen_pending, "the request never showed up as being prefilled"
    after = assert_no_leak(server)
    # Aborted inside prefill: never compressed, released. (If the machine finished the prompt
    # before the abort landed, it was compressed first; the release is checked all the same.)
    assert after["released_requests"] >= before["released_requests"]
    still_serves(server)
    assert_no_leak(server)


def test_disconnect_right_after_compression(server, tokenizer, corpus):
    """Streaming client reads the first token (prefill and compression done) and disconnects."""
    before = assert_no_leak(server)
    ids = prompt_ids(tokenizer, corpus, 400, seed=7002)
    conn = open_generate(server.port, {"input_ids": ids, "stream": True,
                                 "sampling_params": {"max_new_tokens": 200, "temperature": 0.0, "ignore_eos": True}})
    resp = conn.getresponse()
    assert resp.status == 200
    first = next(sse_events(resp))
    drop(conn)
    assert first["meta_info"]["completion_tokens"] <= 2
    after = assert_no_leak(server, timeout=60)
    assert after["compressed_requests"] == before["compressed_requests"] + 1
    assert after["released_requests"] == before["released_requests"] + 1
    still_serves(server)


def test_disconnect_during_decode(server, tokenizer, corpus):
    """Streaming client disconnects mid-decode: the request stops (no 400-token run) and all returns."""
    before = assert_no_leak(server)
    ids = prompt_ids(tokenizer, corpus, 200, seed=7003)
    conn = open_generate(server.port, {"input_ids": ids, "stream": True,
                                 "sampling_params": {"max_new_tokens": 400, "temperature": 0.0, "ignore_eos": True}})
    resp = conn.getresponse()
    n = 0
    for event in sse_events(resp):
        n = event["meta_info"]["completion_tokens"]
        if n >= 10:
            break
    mid = memory(server)
    drop(conn)
    assert n >= 10 and mid["live_compressed_requests"] == 1, mid
    after = assert_no_leak(server, timeout=60)
    assert after["released_requests"] == before["released_requests"] + 1
    still_serves(server)


# --------------------------------------------------------------------------------------------
# retraction
# --------------------------------------------------------------------------------------------

def run_concurrently(server, prompts, new, **custom):
    results, errors = [None] * len(prompts), []

    def run(i):
        try:
            results[i] = generate(server, prompts[i], max_new_tokens=new, ignore_eos=True, **custom)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, errors
    for r in results:
        assert r["meta_info"]["finish_reason"]["type"] == "length" and len(r["output_ids"]) == new
        assert r["meta_info"].get("kv_compression"), r["meta_info"]
    return results


def assert_same_as_alone(server, prompts, results, new, **custom):
    """Each request served alone (no memory pressure: nothing to retract) gives the same tokens."""
    for i, prompt in enumerate(prompts):
        alone = generate(server, prompt, max_new_tokens=new, ignore_eos=True, **custom)
        assert alone["meta_info"].get("num_retractions", 0) == 0
        assert results[i]["output_ids"] == alone["output_ids"], (i, results[i]["meta_info"].get("num_retractions"))


def test_retracted_compressed_requests_finish_with_the_same_output(server, tokenizer, corpus):
    """Six compressed requests (200-token prompts kept at 64 slots) with 100-token ignore_eos decodes
    in a 640-slot pool (6 x 164 slots at the end): the scheduler
    admits them as compression frees memory, runs out mid-decode and retracts some; they re-run
    (re-prefill replaying their selection) and everything finishes with the same greedy tokens as
    the same request served alone, and nothing leaks."""
    before = memory(server)
    new = 100
    prompts = [prompt_ids(tokenizer, corpus, 200, seed=7100 + i) for i in range(6)]
    results = run_concurrently(server, prompts, new)
    retractions = [r["meta_info"].get("num_retractions", 0) for r in results]
    after = assert_no_leak(server)
    assert_same_as_alone(server, prompts, results, new)
    assert_no_leak(server)
    assert sum(retractions) > 0, f"no retraction was triggered (num_retractions {retractions})"
    assert after["replayed_requests"] - before["replayed_requests"] == after["retracted_requests"] - before["retracted_requests"] > 0, (before, after)


def test_debug_checks_ran_and_log_is_clean(server):
    m = memory(server)
    assert m["debug_checks"]["after_compression"] > 0 and m["debug_checks"]["after_release"] > 0, m
    log = server.log_text()
    for bad in ("Traceback", "AssertionError", "lava-sglang debug"):
        assert bad not in log, bad


@pytest.mark.server_configs("retract")
def test_forced_retractions_replay_exactly(servers, tokenizer, corpus):
    """SGLang's own retraction test switch (``SGLANG_TEST_RETRACT``: retract a decoding request every
    4th forward; the ``retract`` configuration, shared with tests/test_sessions.py) on a roomy pool:
    compressed requests (budget 64) are retracted again and again, and each re-prefill replays
    the selection, so the tokens equal those of the request served alone."""
    server = servers.config("retract")
    before = memory(server)
    new = 24
    prompts = [prompt_ids(tokenizer, corpus, 200, seed=7200 + i) for i in range(3)]
    results = run_concurrently(server, prompts, new, budget=64)
    retractions = [r["meta_info"].get("num_retractions", 0) for r in results]
    assert sum(retractions) >= 2, retractions
    after = assert_no_leak(server)
    assert after["replayed_requests"] - before["replayed_requests"] == sum(retractions), (retractions, after)
    assert all(r["meta_info"]["kv_compression"][0].get("replayed_after_retraction") for r, n in zip(results, retractions) if n)
    assert_same_as_alone(server, prompts, results, new, budget=64)
    assert_no_leak(server)
    log = server.log_text()
    assert "Testing retraction" in log and "Traceback" not in log and "lava-sglang debug" not in log


@pytest.mark.server_configs("retract")
def test_forced_retraction_of_a_chunked_request(servers, tokenizer, corpus):
    """Requests compressed chunk by chunk (``kv_prefill_compression: chunked``, ~1000-token prompts in
    256-token chunks, budget 64) retracted by SGLang's test switch: each chunk's keys were computed
    over the compressed history of the chunks before it, so no selection is replayed; the
    re-prefill is compressed chunk by chunk again, the log says so, every request ends with the
    output it asked for, and nothing leaks."""
    server = servers.config("retract")
    mark = len(server.log_text())
    new = 24
    prompts = [prompt_ids(tokenizer, corpus, 1000, seed=7300 + i) for i in range(2)]
    results = run_concurrently(server, prompts, new, budget=64, prefill_compression="chunked")
    retractions = [r["meta_info"].get("num_retractions", 0) for r in results]
    assert sum(retractions) >= 1, retractions
    for r in results:
        rep = r["meta_info"]["kv_compression"][0]
        assert len(r["output_ids"]) == new and rep["prefill_compression"] == "chunked", r["meta_info"]
        assert not rep.get("replayed_after_retraction"), rep
    log = server.log_text()[mark:]
    assert "(compressed during chunked prefill) retracted; its re-prefill is compressed again chunk by chunk" in log
    assert "Traceback" not in log and "lava-sglang debug" not in log
    assert_no_leak(server)
