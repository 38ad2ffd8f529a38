"""Admission that knows the decode bound (``engine.decode_admission``) on the real server (CPU
engine, debug invariants on): ``lava-tiny-pool`` (a 1024-slot pool, 512-token chunks, streaming
sessions), settings chosen per request.
"""

from __future__ import annotations

import concurrent.futures
import re

import pytest

from lava_sglang.launch import drop, http_json, leaked_slots, open_generate, sse_events

pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava-tiny-pool")]

POOL = 1024
RUNNING = re.compile(r"Decode batch, #running-req: (\d+)")


def generate(server, ids, max_new_tokens, session=None, logprobs=False, **custom):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True,
          "custom_params": {f"kv_{k}": v for k, v in custom.items()}}
    body = {"input_ids": ids, "sampling_params": sp, **({"return_logprob": True} if logprobs else {})}
    if session is not None:
        body["session_params"] = session
    return http_json(server.url + "/generate", body, timeout=600)


def report(out):
    rep = out["meta_info"].get("kv_compression")
    return rep[0] if rep else None


def test_an_output_longer_than_the_pool_is_served_within_its_bound(servers, ids_of):
    """1100 generated tokens on a 1024-slot pool (SGLang would clip the output to what the pool
    holds beside the prompt): every selection keeps the private slots within
    max(kv_budget, N) + D + 1 (debug invariants after each), and nothing leaks. Its 60-token prompt
    is not compressed at prefill (budget 64): its first selection comes while it generates. The
    logprobs of its generated tokens (computed over the compressed history) are all there. While
    it generates (same decode steps), a streaming session continues over a decode-compressed
    state and a client goes away mid-decode."""
    server = servers.config("lava-tiny-pool")
    before = server.wait_settled()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(generate, server, ids_of(60, 7101), 1100, logprobs=True, budget=64, decode_budget=96,
                           decode_interval=64)
        _a_session_turn_continues_over_a_decode_compressed_state(server, ids_of)
        _an_abort_mid_decode_is_released(server, ids_of)
        out = long.result()
    assert out["meta_info"]["completion_tokens"] == 1100, out["meta_info"]
    logprobs = [lp for lp, _token, _text in out["meta_info"]["output_token_logprobs"]]
    assert len(logprobs) == 1100 and all(-100 < lp <= 0 for lp in logprobs), logprobs[:5]
    rep = report(out)
    assert 0 < rep["decode_peak_slots"] <= max(64, 96) + 64 + 1, rep
    assert rep["decode_selections"] >= (60 + 1100 - 96 - 64) // 64, rep
    assert rep["decode_private_slots"] <= 96 + 1 and rep["decode_slots_freed_total"] >= 900, rep
    after = server.wait_settled()
    assert leaked_slots(after) == 0, after
    assert after["debug_checks"]["after_compression"] > before["debug_checks"]["after_compression"]


def _max_running(server, prompts, max_new, **custom) -> int:
    mark = len(server.log_text())
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda ids: generate(server, ids, max_new, **custom), prompts))
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [max_new] * len(prompts)
    running = [int(n) for n in RUNNING.findall(server.log_text()[mark:])]
    assert running, server.log_tail(40)
    return max(running)


def test_decode_compression_admits_more_long_outputs_at_once(servers, ids_of):
    """Four requests (450-token prompt, 160 generated tokens each) on the 1024-slot pool. Compressed
    after prefill alone, SGLang reserves each one's whole remaining output: at most two decode at
    once (2 x (64 + 160) + 450 + 160 > 1024). Compressed during decode, each reserves its decode
    peak (161): all four do (the server's own decode-batch log says how many ran)."""
    server = servers.config("lava-tiny-pool")
    after = _max_running(server, [ids_of(450, 7110 + i) for i in range(4)], 160, budget=64)
    decode = _max_running(server, [ids_of(450, 7120 + i) for i in range(4)], 160, budget=64, decode_budget=96,
                          decode_interval=64)
    assert after <= 2 and decode == 4, (after, decode)
    assert leaked_slots(server.wait_settled()) == 0


def _a_session_turn_continues_over_a_decode_compressed_state(server, ids_of):
    """A streaming session's first turn is selected during decode; the next turn continues over
    the compressed history (only its new tokens prefilled) and is itself selected as it
    generates; closing the session frees everything."""
    sid = server.open_session()
    try:
        first = generate(server, ids_of(300, 7130), 170, session={"id": sid}, budget=64, decode_budget=96,
                         decode_interval=64)
        assert report(first)["decode_selections"] >= 2, report(first)
        kept = report(first)["decode_private_slots"]
        second = generate(server, ids_of(40, 7131), 130, session={"id": sid}, budget=64, decode_budget=96,
                          decode_interval=64)
        rep = report(second)
        assert rep["continued"] and rep["decode_selections"] >= 2, rep
        assert rep["decode_peak_slots"] <= max(kept + 40 + 32, 96 + 64) + 1, rep
    finally:
        server.close_session(sid)


def _an_abort_mid_decode_is_released(server, ids_of):
    """A streaming client goes away after its request was selected during decode: the request is
    aborted and its compressed row released (the caller checks that nothing leaked)."""
    rid = "decode-abort-7140"
    mark = len(server.log_text())
    conn = open_generate(server.port, {"rid": rid, "input_ids": ids_of(60, 7140), "stream": True, "sampling_params": {
        "max_new_tokens": 600, "temperature": 0.0, "ignore_eos": True,
        "custom_params": {"kv_budget": 64, "kv_decode_budget": 96, "kv_decode_interval": 64}}}, timeout=600)
    try:
        for i, _event in enumerate(sse_events(conn.getresponse())):
            if i >= 200:  # past its first selection (96 + 64 generated tokens held)
                break
    finally:
        drop(conn)
    assert f"decode-selected {rid}" in server.log_text()[mark:], server.log_tail(30)
