"""Parked conversations at scale: the scheduler's per-step overhead with 0 vs N parked.

One LAVa server (debug invariants off: this measures the serving path) with a pool large
enough that nothing parked is ever evicted and ``--kv-park-max-conversations`` above ``--n``.

1. **Probe, 0 parked**: ``--probe-rounds`` rounds of ``--probe-batch`` concurrent short
   uncompressed requests (``kv_policy none``: never parked) decoding ``--probe-new`` tokens each;
   per round the wall time, and the server log's ``Decode batch ... gen throughput (token/s)``
   lines of the steps that ran the whole batch.
2. **Park N**: ``--n`` distinct compressed prompts (``--prompt-tokens`` each, ``kv_budget``
   ``--budget``, ``max_new_tokens`` 1), ``--concurrency`` at a time; the time of every block of
   ``--block`` requests (matching a request against the parked conversations walks them) and the
   parked count from ``/server_info`` after each block.
3. **Probe, N parked**: as 1.

Results: ``benchmarks/results/parked_scale/parked_scale-<time>.json`` and ``.md`` (a table).

KV memory on the CPU engine (float32, default model): 46 KB per slot. A parked 200-token prompt
at budget 64 holds about 80 slots: ``--n 2000`` needs about 8 GB of pool (the default
``--pool`` is ``n * (budget + 32) + 16384`` slots).

    python -m benchmarks.parked_scale --n 50        # smoke (a few minutes)
    python -m benchmarks.parked_scale               # --n 2000
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lava_sglang.launch import Server, http_json
from lava_sglang.models import default_model_path

RESULTS = Path(__file__).resolve().parent / "results" / "parked_scale"
DECODE = re.compile(r"Decode batch, #running-req: (\d+).*?gen throughput \(token/s\): ([0-9.]+)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="parked conversations")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--pool", type=int, default=0, help="--max-total-tokens (0: n * (budget + 32) + 16384)")
    p.add_argument("--max-conversations", type=int, default=0, help="--kv-park-max-conversations (0: 2 n)")
    p.add_argument("--concurrency", type=int, default=4, help="parking requests in flight")
    p.add_argument("--block", type=int, default=0, help="parking requests per timed block (0: n / 10, at least 10)")
    p.add_argument("--probe-batch", type=int, default=8)
    p.add_argument("--probe-new", type=int, default=64)
    p.add_argument("--probe-prompt", type=int, default=32)
    p.add_argument("--probe-rounds", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--model", default=None)
    p.add_argument("--startup-timeout", type=float, default=1200.0)
    return p.parse_args(argv)


def corpus_ids(tokenizer, n_tokens: int = 60000) -> list[int]:
    from lava_sglang.workloads import default_corpus_dir, load_corpus, synthetic_text

    text = load_corpus(default_corpus_dir()) or synthetic_text(n_tokens * 5, seed=3)
    return tokenizer.encode(text[: n_tokens * 6], add_special_tokens=False)[:n_tokens]


def prompt(tokenizer, corpus: list[int], tag: str, i: int, n: int) -> list[int]:
    """``n`` ids starting with a header no other prompt has (distinct from their first tokens)."""
    head = tokenizer.encode(f"{tag} {i}: ", add_special_tokens=False)
    start = (i * 7919) % (len(corpus) - n - 1)
    return (head + corpus[start:start + n])[:n]


def generate(url: str, ids: list[int], max_new: int, custom: dict) -> dict:
    sp = {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True, "custom_params": custom}
    return http_json(url + "/generate", {"input_ids": ids, "sampling_params": sp}, timeout=1800)


def kv_state(server) -> dict:
    return server.kv_memory()


def probe(server, tokenizer, corpus, args, tag: str) -> dict:
    """Rounds of a fixed decode batch; wall times and the log's decode throughput of full-batch steps."""
    rounds = []
    for r in range(args.probe_rounds):
        prompts = [prompt(tokenizer, corpus, f"probe {tag} {r}", i, args.probe_prompt) for i in range(args.probe_batch)]
        offset = len(server.log_text())
        started = time.time()
        with ThreadPoolExecutor(args.probe_batch) as pool:
            outs = list(pool.map(lambda ids: generate(server.url, ids, args.probe_new, {"kv_policy": "none"}), prompts))
        wall = time.time() - started
        time.sleep(1.0)  # the last log lines
        lines = DECODE.findall(server.log_text()[offset:])
        full = [float(t) for n, t in lines if int(n) == args.probe_batch]
        assert all(len(o["output_ids"]) == args.probe_new for o in outs)
        rounds.append({"wall_s": round(wall, 3), "tokens": args.probe_batch * args.probe_new,
                       "tokens_per_s": round(args.probe_batch * args.probe_new / wall, 2),
                       "log_gen_throughput_full_batch": full})
    walls = [r["wall_s"] for r in rounds]
    logged = [t for r in rounds for t in r["log_gen_throughput_full_batch"]]
    return {"rounds": rounds, "wall_s_median": round(statistics.median(walls), 3),
            "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in rounds), 2),
            "log_gen_throughput_median": round(statistics.median(logged), 2) if logged else None,
            "ms_per_step_median": round(1000 * args.probe_batch / statistics.median(logged), 2) if logged else None,
            "kv": {k: v for k, v in kv_state(server).items() if k.startswith("park") or k in (
                "available_slots", "pool_size", "live_compressed_requests")}}


def park(server, tokenizer, corpus, args) -> list[dict]:
    """``--n`` compressed prompts, parked; the time of each block and the parked count after it."""
    block = args.block or max(10, args.n // 10)
    blocks, lock, done = [], threading.Lock(), [0]
    custom = {"kv_budget": args.budget}

    def one(i):
        out = generate(server.url, prompt(tokenizer, corpus, "Conversation", i, args.prompt_tokens), 1, custom)
        if not out["meta_info"].get("kv_compression"):
            raise RuntimeError(f"prompt {i} was not compressed: {out['meta_info']}")
        with lock:
            done[0] += 1

    for lo in range(0, args.n, block):
        hi = min(args.n, lo + block)
        started = time.time()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(lo, hi)))
        wall = time.time() - started
        m = kv_state(server)
        blocks.append({"requests": f"{lo}-{hi}", "wall_s": round(wall, 2), "ms_per_request": round(1000 * wall / (hi - lo), 1),
                       "parked_conversations": m.get("parked_conversations"), "parked_slots": m.get("parked_slots"),
                       "park_evictions": m.get("park_evictions"), "available_slots": m.get("available_slots")})
        print(json.dumps(blocks[-1]), flush=True)
    return blocks


def markdown(result: dict) -> str:
    a, p0, pn = result["args"], result["probe_0"], result["probe_n"]
    rows = [("decode batch wall (median of rounds), s", p0["wall_s_median"], pn["wall_s_median"]),
            ("decode tokens/s, client side", p0["tokens_per_s_median"], pn["tokens_per_s_median"]),
            ("gen throughput (log, full batch), token/s", p0["log_gen_throughput_median"], pn["log_gen_throughput_median"]),
            ("ms per decode step (log)", p0["ms_per_step_median"], pn["ms_per_step_median"]),
            ("parked conversations", p0["kv"].get("parked_conversations"), pn["kv"].get("parked_conversations"))]
    out = [f"# Parked conversations at scale ({result['stamp']})", "",
           f"Server: `{' '.join(result['server_flags'])}`; parked: {a['n']} prompts of {a['prompt_tokens']} tokens at "
           f"kv_budget {a['budget']}; probe: {a['probe_batch']} x {a['probe_new']} decode tokens, "
           f"{a['probe_rounds']} rounds.", "",
           "| | 0 parked | N parked |", "|---|---|---|"]
    out += [f"| {name} | {x} | {y} |" for name, x, y in rows]
    out += ["", "Parking, per block:", "", "| requests | ms per request | parked | parked slots | evictions |",
            "|---|---|---|---|---|"]
    out += [f"| {b['requests']} | {b['ms_per_request']} | {b['parked_conversations']} | {b['parked_slots']} | "
            f"{b['park_evictions']} |" for b in result["park_blocks"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    model = args.model or str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    corpus = corpus_ids(tokenizer)
    pool = args.pool or args.n * (args.budget + 32) + 16384
    max_conv = args.max_conversations or 2 * args.n
    rows = max_conv + 2 * args.probe_batch + args.concurrency + 8  # every parked conversation holds a request row
    flags = ["--kv-policy", "lava", "--kv-budget", str(args.budget), "--max-total-tokens", str(pool),
             "--kv-park-max-conversations", str(max_conv), "--max-running-requests", str(rows),
             "--log-level", "info"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"stamp": stamp, "args": vars(args), "server_flags": flags}
    with Server(model, flags, log_path=str(out_dir / f"parked_scale-{stamp}.server.log"),
                startup_timeout=args.startup_timeout) as server:
        generate(server.url, prompt(tokenizer, corpus, "warm-up", 0, 64), 8, {"kv_policy": "none"})
        result["probe_0"] = probe(server, tokenizer, corpus, args, "zero")
        print("0 parked:", json.dumps({k: v for k, v in result["probe_0"].items() if k != "rounds"}), flush=True)
        result["park_blocks"] = park(server, tokenizer, corpus, args)
        result["probe_n"] = probe(server, tokenizer, corpus, args, "n")
        print(f"{args.n} parked:", json.dumps({k: v for k, v in result["probe_n"].items() if k != "rounds"}), flush=True)
        result["final_kv"] = kv_state(server)
    p0, pn = result["probe_0"], result["probe_n"]
    result["slowdown_wall"] = round(pn["wall_s_median"] / p0["wall_s_median"], 3)
    if p0["ms_per_step_median"] and pn["ms_per_step_median"]:
        result["slowdown_step"] = round(pn["ms_per_step_median"] / p0["ms_per_step_median"], 3)
    result["all_parked"] = pn["kv"].get("parked_conversations") == args.n and not pn["kv"].get("park_evictions")
    (out_dir / f"parked_scale-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"parked_scale-{stamp}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"results: {out_dir / f'parked_scale-{stamp}.json'}")
    return 0 if result["all_parked"] else 1


if __name__ == "__main__":
    sys.exit(main())
