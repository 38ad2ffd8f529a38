"""Safety (issue 26 / 25): what a client can send must never take the server down or leak.

One HTTP test per case of the issue, as a client would send it, on the real server (CPU engine),
debug invariants on (``LAVA_SGLANG_DEBUG=1``). After every case the server still serves a plain
request after idling (SGLang's idle pool checker kills a server that leaked: "memory leak
detected"), and once settled no slot leaked (``launch.check_whole``).

This module: the cases that share one LAVa server (1 rid reuse, 2 empty / out-of-vocabulary
prompts, 4 over-large settings and fault injection, 9 borrowing needs equal settings, 10 beam
search); the ``--kv-policy none`` half of case 2. ``test_safety_rows.py``: cases 3, 7, 11;
``test_safety_memory.py``: cases 6 and 8. The helpers here are shared by those modules.

A server found dead (a case that killed it) is started again for the next case, so every case
reports its own outcome.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest

from lava_sglang.launch import check_whole
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

# The LAVa cases run on the suite's shared "lava" server (debug invariants on, fault injection
# armed for rids starting with "lava-fault-"); the `none` half of case 2 on "none".
pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava")]

ENV = {"LAVA_SGLANG_DEBUG": "1", "SGLANG_REQUEST_STATE_WAIT_TIMEOUT": "1"}
# What a server that survived never logs (tracebacks are expected: a failed request logs its own).
FATAL = ("memory leak detected", "Scheduler hit an exception", "lava-sglang debug", "Mem Leak", "pool memory leak",
         "Out of memory", "SIGQUIT")


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def corpus():
    return load_corpus(default_corpus_dir())


def ids_of(tokenizer, corpus, n_tokens: int, seed: int) -> list[int]:
    """About ``n_tokens`` ids of real text no other test sends (``seed``)."""
    return tokenizer.encode(haystack(n_tokens, corpus, seed=seed, tokenizer=tokenizer))[:n_tokens]


def healthy(server, timeout: float = 30.0) -> bool:
    """The server process lives (SGLang takes the whole process tree down when its scheduler dies)
    and answers HTTP. Not ``/health``: it runs a generation and waits up to 20 s for it."""
    if server.process is None or server.process.poll() is not None:
        return False
    try:
        with urllib.request.urlopen(server.url + "/model_info", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def config_server(servers, name: str):
    """The pool's server of the named configuration (``conftest.CONFIGS``); started afresh when an
    earlier case left it dead or unresponsive."""
    server = servers.config(name)
    return server if healthy(server) else servers.config(name, fresh=True)


def server_for(servers, flags, env=None):
    """The pool's server for ``flags`` started with ``env`` (default :data:`ENV`); started afresh
    when an earlier case left it dead or unresponsive."""
    env = dict(ENV if env is None else env)
    server = servers.get_with_env(tuple(flags), env)
    if healthy(server):
        return server
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return servers.get(*flags, fresh=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def post(server, payload: dict, path: str = "/generate", timeout: float = 600.0):
    """(HTTP status, body): the parsed JSON on success, the text otherwise."""
    req = urllib.request.Request(server.url + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode(errors="replace")
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def generate(server, ids, max_new_tokens: int = 8, rid=None, timeout: float = 600.0, top=None, **custom):
    """``/generate`` with ``input_ids``; ``custom``: ``kv_*`` settings without the prefix."""
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    if custom:
        sp["custom_params"] = {f"kv_{k}": v for k, v in custom.items()}
    payload = {"input_ids": ids, "sampling_params": sp, **(top or {})}
    if rid is not None:
        payload["rid"] = rid
    return post(server, payload, timeout=timeout)


def ok(result):
    """The body of a 200 (fails with the status and body otherwise)."""
    status, body = result
    assert status == 200, (status, str(body)[:500])
    assert isinstance(body, dict), body
    return body


def report(out):
    rep = out["meta_info"].get("kv_compression")
    return rep[0] if rep else None


def fatal_in_log(server) -> list[str]:
    log = server.log_text()
    return [m for m in FATAL if m in log]


def assert_survives(server, idle: float = 8.0) -> dict:
    """Settled with 0 leaked slots, then idle (SGLang's pool checker runs), then alive and serving
    a plain request, settled and whole again, and nothing fatal in the log."""
    m = whole(server)
    time.sleep(idle)
    assert healthy(server), "the server died while idle\n" + server.log_tail(60)
    status, out = post(server, {"text": "The capital of France is",
                                "sampling_params": {"max_new_tokens": 4, "temperature": 0.0}}, timeout=300)
    assert status == 200 and "Paris" in out["text"], (status, out, server.log_tail(40))
    m = whole(server)
    assert not fatal_in_log(server), (fatal_in_log(server), server.log_tail(60))
    return m


def whole(server, timeout: float = 120.0):
    """``check_whole`` where the plugin reports its accounting (not under ``--kv-policy none``)."""
    states = server.server_info().get("internal_states") or [{}]
    if "kv_compression" not in states[0]:
        return {}
    return check_whole(server, timeout)


def error_of(result) -> str:
    """The error text of a failed request: an HTTP error's body, or an aborted 200's finish reason;
    '' when the request succeeded."""
    status, body = result
    if status != 200:
        return str(body)
    finish = (body.get("meta_info", {}).get("finish_reason") or {}) if isinstance(body, dict) else {}
    return json.dumps(finish) if finish.get("type") == "abort" else ""


def main_server(servers):
    return config_server(servers, "lava")


# --------------------------------------------------------------------------------------------
# case 1: a client reusing its rid on every turn
# --------------------------------------------------------------------------------------------

def test_case1_rid_reused_across_turns_continues_the_parked_conversation(servers, tokenizer, corpus):
    """Turn 1 (~2500 characters, compressed and parked) and turn 2 (its history and a new
    question) carry the same ``rid``: both are served, turn 2 continues the parked conversation,
    and the server survives idling with nothing leaked."""
    server = main_server(servers)
    ids = ids_of(tokenizer, corpus, 600, seed=26001)
    r1 = ok(generate(server, ids, max_new_tokens=16, rid="conv-1"))
    assert report(r1) is not None, r1["meta_info"]
    whole(server)
    question = ids_of(tokenizer, corpus, 120, seed=26002)
    r2 = ok(generate(server, ids + r1["output_ids"] + question, max_new_tokens=16, rid="conv-1"))
    kv = report(r2)
    assert kv is not None and kv.get("continued"), r2["meta_info"]
    assert r2["meta_info"]["prompt_tokens"] - r2["meta_info"]["cached_tokens"] <= len(question) + 1, r2["meta_info"]
    assert_survives(server)


# --------------------------------------------------------------------------------------------
# case 2: empty prompts and ids outside the vocabulary
# --------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "empty_text": ({"text": ""}, ()),
    "empty_ids": ({"input_ids": []}, ()),
    "id_over_vocab": ({"input_ids": [1, 2, 1000000000]}, ("1000000000", "vocab")),
    "negative_id": ({"input_ids": [1, -5, 2]}, ("-5", "vocab")),
}


@pytest.mark.parametrize("policy", ["lava", pytest.param("none", marks=pytest.mark.server_configs("none"))])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_case2_empty_or_out_of_vocabulary_prompt_is_a_400(servers, policy, case):
    """An empty prompt or an id outside the vocabulary is an HTTP 400 (naming the id where one is
    bad), under LAVa and with compression off; the server keeps serving. (Refused on the tokenizer
    side: a short idle suffices for the idle checker.)"""
    server = main_server(servers) if policy == "lava" else config_server(servers, "none")
    payload, named = BAD_INPUTS[case]
    status, body = post(server, {**payload, "sampling_params": {"max_new_tokens": 4}}, timeout=120)
    assert status == 400, (status, str(body)[:500])
    if named:
        assert any(n in str(body) for n in named), body
    assert_survives(server, idle=2.0)


# --------------------------------------------------------------------------------------------
# case 4: over-large settings; a failure inside compression stays its request's
# --------------------------------------------------------------------------------------------

OVER_LARGE = {
    "kernel_size_2pow31": ({"kv_kernel_size": 2147483649}, "kv_kernel_size"),
    "kernel_size_129": ({"kv_kernel_size": 129}, "kv_kernel_size"),
    "window_100000": ({"kv_window": 100000, "kv_budget": 200000}, "kv_window"),
    "budget_10e12": ({"kv_budget": 10 ** 12}, "kv_budget"),
    "min_prompt_len_10e7": ({"kv_min_prompt_len": 10 ** 7}, "kv_min_prompt_len"),
    "pyramid_beta_1e6": ({"kv_pyramid_beta": 1e6}, "kv_pyramid_beta"),
}


@pytest.mark.parametrize("case", list(OVER_LARGE))
def test_case4_over_large_setting_is_a_400(servers, tokenizer, corpus, case):
    """A setting past its upper bound is an HTTP 400 naming it, on a prompt long enough to be
    compressed (so a setting let through really reaches the scheduler)."""
    server = main_server(servers)
    custom, field = OVER_LARGE[case]
    ids = ids_of(tokenizer, corpus, 600, seed=26100 + list(OVER_LARGE).index(case))
    status, body = post(server, {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "custom_params": custom}},
                        timeout=300)
    assert status == 400, (status, str(body)[:500])
    assert field in str(body), body
    assert_survives(server, idle=2.0)


def test_case4_fault_in_compression_fails_only_its_request(servers, tokenizer, corpus):
    """``LAVA_SGLANG_FAULT``: compression raises for a ``lava-fault-`` request. That request gets
    an error naming lava-sglang; a normal compressed request sent with it is served; after both
    a following request is served, and nothing leaks."""
    server = main_server(servers)
    faulty, normal = ids_of(tokenizer, corpus, 700, 26201), ids_of(tokenizer, corpus, 700, 26202)
    results = {}

    def run(name, ids, rid):
        results[name] = generate(server, ids, rid=rid, timeout=300)

    threads = [threading.Thread(target=run, args=("fault", faulty, "lava-fault-compress-1")),
               threading.Thread(target=run, args=("normal", normal, None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    err = error_of(results["fault"])
    assert err, ("the faulty request succeeded", str(results["fault"])[:300])
    assert "lava-sglang" in err or "lava_sglang" in err, err
    out = ok(results["normal"])
    assert report(out) is not None and len(out["output_ids"]) == 8, out["meta_info"]
    after = ok(generate(server, ids_of(tokenizer, corpus, 700, 26203)))
    assert report(after) is not None
    assert_survives(server)


def test_case4_kernel_error_in_decode_fails_only_its_request(servers, tokenizer, corpus):
    """The attention over a compressed layout raises inside a layer while a ``lava-fault-attention``
    request decodes (a kernel error at a user's GPU) beside an uncompressed one (its prompt fits
    the budget). A kernel error belongs to the batch, not to one request: the compressed requests
    of that decode batch fail with an error naming the stage; the forward finishes with SGLang's
    own backend, which serves the uncompressed request in full; the server survives, nothing leaks."""
    server = main_server(servers)
    results = {}

    def run(name, ids, rid, n):
        results[name] = generate(server, ids, max_new_tokens=n, rid=rid, timeout=300)

    threads = [threading.Thread(target=run, args=("normal", ids_of(tokenizer, corpus, 100, 26481), None, 24)),
               threading.Thread(target=run, args=("fault", ids_of(tokenizer, corpus, 600, 26482),
                                                  "lava-fault-attention-1", 8))]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(400)
    err = error_of(results["fault"])
    assert err and "(attention)" in err, ("the faulty request succeeded", str(results["fault"])[:300])
    out = ok(results["normal"])
    assert len(out["output_ids"]) == 24 and report(out) is None, out["meta_info"]
    assert_survives(server)


def test_case4_fault_in_continued_turn_fails_only_its_request(servers, tokenizer, corpus):
    """A parked conversation's next turn sent as a ``lava-fault-`` request fails in re-selection
    (or layout building) with an error naming lava-sglang; the same turn sent again normally is
    served; nothing leaks."""
    server = main_server(servers)
    ids = ids_of(tokenizer, corpus, 600, 26301)
    r1 = ok(generate(server, ids))
    turn = ids + r1["output_ids"] + ids_of(tokenizer, corpus, 200, 26302)
    err = error_of(generate(server, turn, rid="lava-fault-reselect-1", timeout=300))
    assert err, "the faulty continued turn succeeded"
    assert "lava-sglang" in err or "lava_sglang" in err, err
    whole(server)
    again = ok(generate(server, turn))
    assert len(again["output_ids"]) == 8 and report(again) is not None, again["meta_info"]
    assert_survives(server)


# --------------------------------------------------------------------------------------------
# case 9: a parked conversation is borrowed only by a turn with its settings
# --------------------------------------------------------------------------------------------

def test_case9_turn_with_other_settings_does_not_borrow_the_parked_conversation(servers, tokenizer, corpus):
    """A conversation compressed at ``kv_budget`` 64 is parked. Its next turn asking for 4096 is
    not served over the 64-budget history (report: ``parked`` "not borrowed: settings differ",
    not continued); a next turn with the same settings (64) continues it. (The note is in the
    report of a turn that is not compressed either: 4096 covers this history.)"""
    server = main_server(servers)
    ids = ids_of(tokenizer, corpus, 800, 26401)
    r1 = ok(generate(server, ids, budget=64))
    assert report(r1) is not None, r1["meta_info"]
    base = ids + r1["output_ids"]
    other = ok(generate(server, base + ids_of(tokenizer, corpus, 150, 26402), budget=4096))
    kv = report(other)
    assert kv is not None, other["meta_info"]
    assert str(kv.get("parked", "")).startswith("not borrowed"), kv
    assert not kv.get("continued"), kv
    assert other["meta_info"]["cached_tokens"] < 64, other["meta_info"]
    same = ok(generate(server, base + ids_of(tokenizer, corpus, 150, 26403), budget=64))
    kv = report(same)
    assert kv is not None and kv.get("continued"), same["meta_info"]
    assert_survives(server)


# --------------------------------------------------------------------------------------------
# case 10: beam search under compression
# --------------------------------------------------------------------------------------------

def test_case10_beam_search_under_compression_is_a_400(servers, tokenizer, corpus):
    """``beam_width`` 4, ``n`` 4 on a ~1500-token prompt that LAVa would compress: an HTTP 400
    mentioning beam search (beam members copy a row a compressed request cannot share)."""
    server = main_server(servers)
    ids = ids_of(tokenizer, corpus, 1500, 26501)
    sp = {"max_new_tokens": 8, "temperature": 0.0, "beam_width": 4, "n": 4}
    status, body = post(server, {"input_ids": ids, "sampling_params": sp}, timeout=600)
    assert status == 400, (status, str(body)[:500])
    assert "beam" in str(body).lower(), body
    assert_survives(server)
