"""SGLang's router (PyPI ``sglang-router``) in front of two CPU servers with ``--kv-policy lava``:
resend-style conversations land, turn after turn, on the server that holds their parked state.

Two real servers, each pinned to its own core, and the real router with its ``cache_aware``
policy, all on loopback; torn down at the end. The router matches each request's text against
what it sent to each worker: a conversation's next turn extends its previous prompt, so it goes
back to the same worker, where the parked compressed conversation continues.
"""

from __future__ import annotations

import os
import threading

import pytest

from lava_sglang.launch import Router, Server, check_whole, http_json, start_all
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

pytestmark = pytest.mark.server

FLAGS = ("--kv-policy", "lava", "--kv-budget", "128", "--chunked-prefill-size", "256", "--max-total-tokens", "8192",
         "--log-level", "info", "--sleep-on-idle")
CONVERSATIONS, TURNS, NEW_CHARS, OUT = 4, 3, 1200, 8


@pytest.fixture(scope="module")
def cluster(model_path):
    saved = os.environ.get("LAVA_SGLANG_DEBUG")
    os.environ["LAVA_SGLANG_DEBUG"] = "1"
    workers = [Server(model_path, FLAGS, core=c % (os.cpu_count() or 1)) for c in range(2)]
    router = None
    try:
        start_all(workers)
        router = Router([w.url for w in workers], "cache_aware").start()
        yield router, workers
    finally:
        if saved is None:
            os.environ.pop("LAVA_SGLANG_DEBUG", None)
        else:
            os.environ["LAVA_SGLANG_DEBUG"] = saved
        if router is not None:
            router.stop()
        for w in workers:
            w.stop()


def test_cache_aware_router_keeps_conversations_on_their_parked_state(cluster):
    """Four conversations of three turns, run concurrently through the router, the client
    resending the whole text each turn: every later turn lands where its conversation is parked
    and continues it (a hit), prefilling only its new message, so each server's hits are two per
    first turn it took. Both servers end settled with no leaked slot."""
    router, workers = cluster
    corpus = load_corpus(default_corpus_dir())
    before = [w.kv_memory() for w in workers]
    results = {}

    def conversation(c):
        text, rows = "", []
        for t in range(TURNS):
            text += f"\n[conversation {c}, message {t + 1}] " + haystack(NEW_CHARS // 4, corpus, seed=9100 + 10 * c + t)
            r = http_json(router.url + "/generate",
                          {"text": text, "sampling_params": {"max_new_tokens": OUT, "temperature": 0.0, "ignore_eos": True}})
            rows.append(r["meta_info"])
            text += r["text"]
        results[c] = rows

    threads = [threading.Thread(target=conversation, args=(c,)) for c in range(CONVERSATIONS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=900)
    assert sorted(results) == list(range(CONVERSATIONS))
    later = [m for rows in results.values() for m in rows[1:]]
    continued = [bool((m.get("kv_compression") or [{}])[0].get("continued")) for m in later]
    hit_rate = sum(continued) / len(continued)
    print(f"router: {sum(continued)} of {len(continued)} later turns continued a parked conversation ({hit_rate:.0%})")
    assert hit_rate == 1.0, [(m["prompt_tokens"], m["cached_tokens"]) for m in later]
    after = [w.wait_settled() for w in workers]
    hits = [a["park_hits"] - b["park_hits"] for a, b in zip(after, before)]
    first = [a["compressed_requests"] - b["compressed_requests"] for a, b in zip(after, before)]
    assert sum(hits) == CONVERSATIONS * (TURNS - 1), hits
    # Which server takes a first turn is the router's choice (in one run all four went to one):
    # only that each conversation stays where it started is the plugin's concern.
    assert sum(first) == CONVERSATIONS and all(h == (TURNS - 1) * n for h, n in zip(hits, first)), (first, hits)
    print(f"router: first turns per server {first}, parked hits per server {hits}")
    for w in workers:
        check_whole(w)
    for w in workers:
        assert not w.log_errors(), w.log_tail(40)
