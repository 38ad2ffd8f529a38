"""Resend-style conversations through SGLang's router in front of two CPU servers: how often a
later turn lands on the server that holds its parked conversation, per routing policy.

    python benchmarks/router.py [--policies cache_aware round_robin] [--conversations 4] [--turns 4]
        [--turn-tokens 300] [--output-tokens 16] [--configs lava:128]

Two servers (each pinned to its own core, ``--kv-policy`` from ``--configs``) and the router
(PyPI ``sglang-router``, on loopback) per policy; the same conversations, run concurrently, each
turn resending the whole text. Per policy: later turns that continued a parked conversation
(hits), prefilled tokens per later turn, wall time. A turn routed to the other server finds
nothing there and prefills its whole history (correct, only slower). Writes
``benchmarks/results/router/router.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks.serving import parse_config
from lava_sglang.launch import Router, Server, http_json, start_all
from lava_sglang.models import default_model_path
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

OUT = Path(__file__).resolve().parent / "results" / "router"


def run_policy(policy: str, flags: list[str], args, model_path: str, corpus) -> dict:
    server_flags = ["--chunked-prefill-size", "256", "--max-total-tokens", str(args.max_total_tokens), *flags]
    workers = [Server(model_path, server_flags, core=c) for c in range(2)]
    try:
        start_all(workers)
        with Router([w.url for w in workers], policy) as router:
            rows: dict = {}

            def conversation(c):
                text, out = "", []
                for t in range(args.turns):
                    text += f"\n[conversation {c}, message {t + 1}] " + haystack(args.turn_tokens, corpus, seed=9500 + 10 * c + t)
                    r = http_json(router.url + "/generate", {"text": text, "sampling_params": {
                        "max_new_tokens": args.output_tokens, "temperature": 0.0, "ignore_eos": True}}, timeout=1800)
                    m = r["meta_info"]
                    kv = (m.get("kv_compression") or [{}])[0]
                    out.append({"prompt_tokens": m["prompt_tokens"], "cached_tokens": m["cached_tokens"],
                                "continued": bool(kv.get("continued"))})
                    text += r["text"]
                rows[c] = out

            started = time.perf_counter()
            threads = [threading.Thread(target=conversation, args=(c,)) for c in range(args.conversations)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
        totals = [w.kv_memory() for w in workers]
    finally:
        for w in workers:
            w.stop()
    later = [x for c in sorted(rows) for x in rows[c][1:]]
    return {"policy": policy, "wall_s": round(wall, 1), "later_turns": len(later),
            "hits": sum(x["continued"] for x in later),
            "prefilled_per_later_turn": statistics.mean(x["prompt_tokens"] - x["cached_tokens"] for x in later),
            "first_turns_per_server": [t["compressed_requests"] for t in totals],
            "park_hits_per_server": [t["park_hits"] for t in totals], "conversations": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    ap.add_argument("--configs", nargs="+", default=["lava:128"])
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=300)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--max-total-tokens", type=int, default=8192)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    model_path = str(default_model_path())
    corpus = load_corpus(default_corpus_dir())
    runs = []
    for config in args.configs:
        name, flags = parse_config(config)
        for policy in args.policies:
            print(f"[router] {name}, {policy}", flush=True)
            run = run_policy(policy, flags, args, model_path, corpus)
            run["config"] = name
            print(f"[router] {name}, {policy}: {run['hits']} of {run['later_turns']} later turns hit, wall {run['wall_s']} s",
                  flush=True)
            runs.append(run)
    command = "python benchmarks/router.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router.json").write_text(json.dumps({"args": vars(args), "command": command, "runs": runs}, indent=1))
    lines = ["# Conversations through sglang-router (two CPU servers)", "",
             f"{args.conversations} concurrent conversations x {args.turns} turns, ~{args.turn_tokens} new tokens per "
             f"turn, {args.output_tokens} output tokens, the client resending the whole text. Command: `{command}`", "",
             "| config | router policy | later turns continuing their parked conversation | prefilled tokens / later turn "
             "| wall s | first turns per server |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['config']} | {r['policy']} | {r['hits']} of {r['later_turns']} | "
                     f"{r['prefilled_per_later_turn']:.0f} | {r['wall_s']} | {r['first_turns_per_server']} |")
    md = "\n".join(lines) + "\n"
    (out / "router.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
