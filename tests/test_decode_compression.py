"""Compression during decode (``kv_decode_budget``, ``engine.decode_compression``) on the real
server (CPU engine, debug invariants on): the suite's ``lava-chunked`` server and its ``none``
twin, the settings chosen per request; forced retractions on ``retract``.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import pytest

from lava_sglang.launch import http_json, leaked_slots

pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava-chunked")]


def generate(server, ids, max_new_tokens, **custom):
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    if custom:
        sp["custom_params"] = {f"kv_{k}": v for k, v in custom.items()}
    return http_json(server.url + "/generate", {"input_ids": ids, "sampling_params": sp}, timeout=600)


def report(out):
    rep = out["meta_info"].get("kv_compression")
    return rep[0] if rep else None


@pytest.mark.server_configs("lava-chunked", "none")
def test_a_decode_budget_covering_prompt_and_output_equals_none(servers, ids_of):
    """Nothing is ever selected: the greedy output is the full cache's, token for token."""
    ids = ids_of(500, 7001)
    lava = generate(servers.config("lava-chunked"), ids, 48, budget=4096, decode_budget=4096, decode_interval=64)
    none = generate(servers.config("none"), ids, 48)
    assert lava["output_ids"] == none["output_ids"]
    assert report(lava) is None


def test_an_interval_longer_than_the_output_changes_nothing(servers, ids_of):
    """With D beyond what the request generates, decode compression never selects: the same output
    and the same kept cells as compressing after prefill alone."""
    server = servers.config("lava-chunked")
    ids = ids_of(600, 7002)
    after = generate(server, ids, 40, budget=128)
    both = generate(server, ids, 40, budget=128, decode_budget=128, decode_interval=64)
    assert both["output_ids"] == after["output_ids"]
    a, b = report(after), report(both)
    assert a["kept_cells"] == b["kept_cells"] and a["private_slots"] == b["private_slots"] == 128
    assert "decode_selections" not in b


def test_a_resend_turn_continues_over_a_decode_compressed_conversation(servers, ids_of):
    """The parked conversation of a request selected during decode is continued by a client that
    resends its whole history: only the new tokens are prefilled."""
    server = servers.config("lava-chunked")
    ids = ids_of(400, 7010)
    first = generate(server, ids, 120, budget=128, decode_budget=128, decode_interval=32)
    assert report(first)["decode_selections"] >= 2
    turn = ids + first["output_ids"] + ids_of(60, 7011)
    second = generate(server, turn, 8, budget=128)
    assert second["meta_info"]["cached_tokens"] >= len(ids) + len(first["output_ids"]) - 1, second["meta_info"]
    assert report(second)["continued"], report(second)
    assert leaked_slots(server.wait_settled()) == 0


def test_bad_decode_settings_get_a_400(servers):
    server = servers.config("lava-chunked")
    for custom, field in (({"kv_decode_budget": -1}, "kv_decode_budget"), ({"kv_decode_budget": 16}, "kv_decode_budget"),
                          ({"kv_decode_budget": 128, "kv_decode_interval": 8}, "kv_decode_interval"),
                          ({"kv_decode_interval": "often"}, "kv_decode_interval")):
        payload = {"text": "hello", "sampling_params": {"max_new_tokens": 2, "custom_params": custom}}
        req = urllib.request.Request(server.url + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=120)
        body = exc.value.read().decode()
        assert exc.value.code == 400 and field in body, (custom, body)


@pytest.mark.server_configs("retract")
def test_a_retracted_decode_compressed_request_is_compressed_afresh(servers, ids_of):
    """SGLang's forced retraction (a decoding request every 4th forward, never the last one):
    requests selected during decode are not replayed; they end with all their tokens, the log
    says so, and nothing leaks."""
    server = servers.config("retract")
    prompts = [ids_of(300, 7020 + i) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda ids: generate(server, ids, 64, budget=128, decode_budget=128, decode_interval=32),
                             prompts))
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [64, 64]
    for rep in map(report, outs):  # re-prefilled chunk by chunk (prompt and output), then selected again as it generates
        assert rep.get("decode_peak_slots", 0) <= 128 + 32 + 1 and not rep.get("replayed_after_retraction"), rep
    assert sum(o["meta_info"].get("num_retractions", 0) for o in outs) >= 1, [o["meta_info"] for o in outs]
    assert "(compressed during decode) retracted; its re-prefill is compressed again chunk by chunk, not replayed" \
        in server.log_text()
    assert leaked_slots(server.wait_settled()) == 0
