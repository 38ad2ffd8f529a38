"""Compression during chunked prefill (``kv_prefill_compression: chunked``, ``engine.chunked``) on
the real server (CPU engine), debug invariants on: the suite's ``lava-chunked`` server (prefill in
256-token chunks) and its ``none`` twin, the mode chosen per request.

Work in progress (issue 27).
"""

from __future__ import annotations

import json

import pytest

from lava_sglang.launch import check_whole, http_json, post_generate
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava-chunked")]

CHUNK, WINDOW = 256, 32


@pytest.fixture(scope="module")
def ids_of(tokenizer):
    corpus = load_corpus(default_corpus_dir())

    def make(n, seed):
        return tokenizer.encode(haystack(n + 50, corpus, seed=seed, tokenizer=tokenizer))[:n]
    return make


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
    assert rep["peak_slots"] <= TINY_BUDGET + TINY_CHUNK + WINDOW + 1, rep
    assert len(out["output_ids"]) == 8
    status, body = post(server, {"input_ids": ids, "sampling_params": sp})
    assert status == 400 and "kv_prefill_compression" in body, (status, body[:500])
    status, body = post(server, {"input_ids": ids, "sampling_params": {**sp, "custom_params": {"kv_policy": "none"}}})
    assert status == 400 and "kv_prefill_compression" not in body, (status, body[:500])
    server.flush_cache()
    check_whole(server)
