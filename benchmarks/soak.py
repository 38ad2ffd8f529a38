"""Soak: a bounded, randomized load on a real LAVa server with the debug invariants on.

Starts its own server (``LAVA_SGLANG_DEBUG=1``: after every compression and every release the
scheduler asserts that no slot is both free and referenced and nothing is freed twice; small
``--chunked-prefill-size`` so long prompts are chunked; a small KV pool so the scheduler has to
retract), then runs ``--concurrency`` client threads for ``--seconds``. Each request draws
(``benchmarks.soak_client``):

* a prompt length class: short, around the budget, long, over the chunk size; sometimes on top
  of a shared prefix primed once with ``max_new_tokens=0`` (the frontend's ``cache_prefix``);
* a policy (every policy, ``none`` included) and a budget through ``custom_params``, and for
  ``--chunked-share`` of the compressed ones ``kv_prefill_compression: chunked``, a quarter of
  those with a prompt longer than the pool (``kind_beyond_pool``: served only chunk by chunk);
* streaming or not, ``ignore_eos`` or not, whether the client disconnects mid-way, and now and
  then prompt logprobs (``return_logprob`` from ``logprob_start_len`` 0 or half the prompt);
* now and then a malformed request that must be an HTTP 400 naming what is wrong
  (``benchmarks.soak_safety``): a bad or over-large ``kv_*`` setting, an empty prompt, an id
  outside the vocabulary; or an exactness check: a budget that covers the prompt must give the
  same greedy tokens as ``kv_policy=none``;
* now and then a conversation: a streaming session (the server runs with
  ``--enable-streaming-session``) of 2-4 turns, each with its own policy and budget, sometimes a
  context turn with no output, sometimes a turn its client drops, always closed at the end;
* now and then a conversation whose client resends the whole history (no session) for 2-4
  turns: with parking on (the default) its turns continue the parked compressed conversation
  unless memory pressure evicted it, sometimes with parking off for a turn, sometimes a turn its
  client drops; half of them send the same ``rid`` on every turn. A history grown past the
  pool's input limit may be refused with a 400: counted (``rejected_too_long``), not an error.

Server configurations: ``--max-running N`` (few request rows and a large ``--pool``: rows run
out before tokens, parked conversations must give their rows back), ``--schedule-policy P``
(any of SGLang's queue orders), ``--priority-scheduling`` (requests draw priorities),
``--disable-radix-cache``.

Chunked requests at the edge of the admission rule (``engine.long_prompts``): for a share of
the chunked requests, a prefix primer (``max_new_tokens: 0``), a ``kv_min_prompt_len`` or a
``kv_window`` near the chunk size. Beyond the pool, those that would not be selected chunk by
chunk must get a 400 (``rejected_expected``), the others must be served.

Stall check: no client may wait longer than ``--max-wait`` seconds for its request; the first
times one does, the scheduler's stacks (``py-spy dump``) go into the result and the run fails.

After the load, up to 20 completed compressed requests that were retracted are served again
alone and must give the same greedy tokens as under pressure.

At the end (after the load drains): zero server errors (HTTP 5xx, client-side exceptions, scheduler
tracebacks or debug assertions in the log), every request the client did not abandon complete,
every exactness check equal, no stall, the pool settled and whole (``launch.settled``: nothing
pending, no live compressed request, every parked conversation idle; ``launch.leaked_slots ==
0``: free + tree (idle parked conversations are evictable) + locked prefixes = pool). Results go
to ``benchmarks/results/soak/soak-<time>.json``; the exit status is 0 only when every check holds.

    python -m benchmarks.soak --seconds 300                                 # CI default: 5 minutes
    python -m benchmarks.soak --seconds 1800                                # the long run
    python -m benchmarks.soak --seconds 600 --max-running 4 --pool 60000    # rows run out first
    python -m benchmarks.soak --seconds 600 --schedule-policy lpm
    python -m benchmarks.soak --seconds 600 --schedule-policy lof --priority-scheduling
    python -m benchmarks.soak --seconds 600 --disable-radix-cache
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

from lava_sglang.launch import LOG_ERRORS, Server, leaked_slots, settled
from lava_sglang.models import default_model_path
from lava_sglang.workloads import default_corpus_dir, load_corpus, synthetic_text

from benchmarks.soak_client import Soak
from benchmarks.soak_safety import StallWatch

RESULTS = Path(__file__).resolve().parent / "results" / "soak"
SERVER_ENV = {"LAVA_SGLANG_DEBUG": "1", "SGLANG_REQUEST_STATE_WAIT_TIMEOUT": "1"}
# dfs-weight is refused at start-up with compression on (engine/startup_checks.py)
SCHEDULE_POLICIES = ("fcfs", "lpm", "lof", "random", "hrrn", "shortest-prefill-first")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="how long new requests are sent (then the load drains)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=4096, help="--max-total-tokens of the server (small: retractions)")
    p.add_argument("--chunk", type=int, default=128, help="--chunked-prefill-size of the server")
    p.add_argument("--budget", type=int, default=128, help="server --kv-budget (requests choose their own too)")
    p.add_argument("--long", type=int, default=700, help="longest prompt, tokens")
    p.add_argument("--max-new", type=int, default=48, help="largest max_new_tokens of a request")
    p.add_argument("--chunked-share", type=float, default=0.25,
                   help="share of compressed requests with kv_prefill_compression chunked; a quarter of those get a "
                        "prompt longer than the pool")
    p.add_argument("--decode-share", type=float, default=0.25,
                   help="share of compressed requests with kv_decode_budget (compressed during decode; outputs up to "
                        "8x --max-new)")
    p.add_argument("--beyond-pool-output", type=float, default=0.02,
                   help="share of those whose output (ignore_eos) is longer than the pool")
    p.add_argument("--context", type=int, default=8192, help="the model's context length (caps those prompts)")
    p.add_argument("--policy", default="lava", help="server --kv-policy")
    p.add_argument("--max-running", type=int, default=0,
                   help="server --max-running-requests (0: SGLang's default); small with a large --pool: rows run "
                        "out before tokens")
    p.add_argument("--schedule-policy", default="fcfs", choices=SCHEDULE_POLICIES,
                   help="server --schedule-policy (SGLang sorts its waiting queue by it at every round)")
    p.add_argument("--priority-scheduling", action="store_true",
                   help="server --enable-priority-scheduling (with fcfs or lof); requests draw a priority 0-3")
    p.add_argument("--disable-radix-cache", action="store_true",
                   help="server --disable-radix-cache (SGLang admits ignore_eos requests through its own path)")
    p.add_argument("--logprob-share", type=float, default=0.1,
                   help="share of single requests and resend turns asking for prompt logprobs")
    p.add_argument("--max-wait", type=float, default=240.0,
                   help="stall bound: no client may wait longer for one request (the 30-minute soak's p99 was 96 s)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--model", default=None)
    p.add_argument("--drain-seconds", type=float, default=600.0)
    p.add_argument("--retract-pressure", action="store_true",
                   help="admission reserves almost nothing for decode tokens (SGLANG_INIT_NEW_TOKEN_RATIO=0.05, "
                        "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION=8), making retractions likely with long outputs (a 10-minute run "
                        "with the default --max-new 48 still saw none)")
    return p.parse_args(argv)


def corpus_tokens(tokenizer, n_tokens=60000):
    text = load_corpus(default_corpus_dir()) or synthetic_text(n_tokens * 5, seed=1)
    return tokenizer.encode(text[: n_tokens * 6], add_special_tokens=False)[:n_tokens]


def server_flags(args) -> list[str]:
    flags = ["--kv-policy", args.policy, "--kv-budget", str(args.budget), "--max-total-tokens", str(args.pool),
             "--chunked-prefill-size", str(args.chunk), "--log-level", "info", "--enable-streaming-session"]
    if args.max_running:
        flags += ["--max-running-requests", str(args.max_running)]
    flags += ["--schedule-policy", args.schedule_policy]
    if args.priority_scheduling:
        flags += ["--enable-priority-scheduling"]
    if args.disable_radix_cache:
        flags += ["--disable-radix-cache"]
    return flags


SUMMARY = ("ok", "elapsed_seconds", "requests_sent", "requests_completed", "requests_aborted_by_client",
           "requests_retracted", "retractions", "requests_compressed", "requests_chunked", "requests_beyond_pool",
           "requests_decode", "requests_decode_compressed", "requests_output_beyond_pool", "sessions", "session_turns",
           "session_turns_continued", "resend_conversations", "resend_turns", "resend_turns_continued",
           "resend_turns_continued_same_rid", "rejected_400", "rejected_too_long", "requests_edge", "rejected_expected", "exact_checks", "exact_mismatches",
           "retraction_checks", "retraction_mismatches", "errors", "incomplete", "stalled_requests", "max_waited_s",
           "leaked_slots", "tree_protected_tokens", "log_errors")


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    model = args.model or str(default_model_path())
    tokens = corpus_tokens(AutoTokenizer.from_pretrained(model))
    env = dict(SERVER_ENV)
    if args.retract_pressure:
        env.update({"SGLANG_INIT_NEW_TOKEN_RATIO": "0.05", "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "8"})
    os.environ.update(env)  # the server copies os.environ when constructed
    flags = server_flags(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = str(out_dir / f"soak-{stamp}.server.log")
    result: dict = {"args": vars(args), "server_flags": flags, "server_env": env}
    with Server(model, flags, log_path=log_path) as server:
        watch = StallWatch(args.max_wait, server.process.pid).start()
        soak = Soak(args, server, tokens, watch)
        soak.prime_prefixes(random.Random(args.seed))
        start = time.time()
        deadline = start + args.seconds
        threads = [threading.Thread(target=soak.worker, args=(k, deadline), daemon=True) for k in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.time()) + args.drain_seconds)
        hung = sum(t.is_alive() for t in threads)
        elapsed = time.time() - start
        server.wait_settled(120)
        soak.retraction_checks()
        final = server.wait_settled(120)
        watch.stop()
        log = server.log_text()
        log_errors = {k: log.count(k) for k in LOG_ERRORS}
        aborts_seen = log.count("Abort") + log.count("abort")

    s = soak.stats
    c = dict(s.counts)
    leak = leaked_slots(final)
    lat = sorted(s.latencies)
    stall = watch.summary()
    result.update({
        "elapsed_seconds": round(elapsed, 1),
        "requests_sent": c.get("sent", 0),
        "requests_completed": c.get("completed", 0),
        "requests_aborted_by_client": c.get("aborted", 0),
        "requests_retracted": c.get("retracted", 0),
        "retractions": c.get("retractions", 0),
        "requests_compressed": c.get("compressed", 0),
        "sessions": c.get("sessions", 0),
        "session_turns": c.get("session_turns", 0),
        "session_turns_continued": c.get("session_turns_continued", 0),
        "resend_conversations": c.get("resend_conversations", 0),
        "resend_turns": c.get("resend_turns", 0),
        "resend_turns_continued": c.get("resend_turns_continued", 0),
        "resend_turns_continued_same_rid": c.get("resend_turns_continued_same_rid", 0),
        "requests_chunked": c.get("chunked", 0),
        "requests_decode": c.get("decode", 0),
        "requests_decode_compressed": c.get("decode_compressed", 0),
        "requests_output_beyond_pool": c.get("output_beyond_pool", 0),
        "requests_beyond_pool": c.get("kind_beyond_pool", 0),
        "rejected_400": c.get("rejected_400", 0),
        "rejected_too_long": c.get("rejected_too_long", 0),
        "requests_edge": c.get("edge", 0),
        "rejected_expected": c.get("rejected_expected", 0),
        "exact_checks": c.get("exact_checks", 0),
        "exact_mismatches": len(s.mismatches) - c.get("retraction_mismatches", 0),
        "retraction_checks": c.get("retraction_checks", 0),
        "retraction_mismatches": c.get("retraction_mismatches", 0),
        "errors": c.get("errors", 0),
        "incomplete": c.get("incomplete", 0),
        "hung_client_threads": hung,
        **{k: stall[k] for k in ("stalled_requests", "max_waited_s", "max_wait_bound_s")},
        "log_errors": log_errors,
        "leaked_slots": leak,
        "tree_protected_tokens": final["tree_protected_tokens"],
        "live_compressed_requests": final["live_compressed_requests"],
        "pending_requests": final["pending_requests"],
        "final_memory": final,
        "counts": c,
        "latency_p50_s": round(lat[len(lat) // 2], 2) if lat else None,
        "latency_p99_s": round(lat[int(len(lat) * 0.99)], 2) if lat else None,
        "latency_max_s": stall["latency_max_s"],
        "abort_mentions_in_log": aborts_seen,
        "error_samples": s.errors[:20],
        "incomplete_samples": s.incomplete[:20],
        "mismatch_samples": s.mismatches[:5],
        "stall_samples": stall["stall_samples"],
        "scheduler_dumps": stall["scheduler_dumps"],
        "server_log": log_path,
    })
    ok = (result["errors"] == 0 and result["incomplete"] == 0 and len(s.mismatches) == 0 and hung == 0
          and stall["stalled_requests"] == 0 and not any(log_errors.values()) and leak == 0 and settled(final)
          and result["requests_completed"] > 0)
    result["ok"] = ok
    path = out_dir / f"soak-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in SUMMARY}, indent=2))
    print(f"results: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
