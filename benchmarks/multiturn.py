"""Multi-turn conversations on a fixed KV pool: S concurrent conversations of T turns.

    python benchmarks/multiturn.py [--conversations 8] [--turns 8] [--turn-tokens 400]
        [--output-tokens 32] [--system-tokens 1000] [--max-total-tokens N]
        [--configs none lava:128] [--client session] [--quick] [--out DIR]
    python benchmarks/multiturn.py --micro [--micro-batch 4] [--micro-history 2000] [--configs none lava:128]

Every configuration gets a fresh server (same model, flags and pool) and the same workload:
one system prompt shared by all conversations, primed once (a plain request with no output,
so it sits in the radix tree), then S conversations at once, each T turns of ``--turn-tokens``
new tokens of real text (a tool result; synthetic text without ``../shared/data``) and
``--output-tokens`` greedy ``ignore_eos`` answers. A conversation sends its next turn when the
previous answer is complete.

Client styles (``--client``):

* ``session``: an SGLang streaming session per conversation (``POST /open_session``,
  ``session_params``); each turn sends only its new tokens and the session keeps the KV row,
  compressed or not, from turn to turn. The server runs with ``--enable-streaming-session``.
* ``resend``: no session; each turn sends the whole history (system prompt, earlier turns and
  answers, the new turn), as OpenAI-style chat clients do. With ``none`` the radix tree serves
  the history (while it is not evicted); a compressed request's history is never published to
  the tree, but it is parked when the request finishes (``--kv-park``, the default) and the next
  turn continues it, unless memory pressure evicted it (then the turn is prefilled whole).

Per configuration: wall time of the whole workload; TTFT per turn (p50, p99 over the
conversations); prefilled tokens per turn (``prompt_tokens - cached_tokens``); the private KV
slots a conversation holds at the end of each turn (``none``: its tokens beyond the system
prompt; compressed: the slots its report says it holds beyond the shared prefix, plus the
answer's tokens); the peak of running requests from the scheduler's decode log; parked
conversations' hits, misses and evictions (the server's counters); conversations resident per
turn: those whose turn found their whole history in memory (prefilled only the new tokens and
the previous answer's last token), per turn. Ratios to
``none`` are within the run. Writes JSON, a markdown table and a PNG to
``benchmarks/results/multiturn/``.

``--micro``: prefill and decode over a compressed layout against the full cache at equal batch.
``--micro-batch`` streaming sessions each hold a ``--micro-history``-token first turn (system
prompt included; compressed under a policy), then all send a ``--turn-tokens`` second turn at
once: the extend forward over the history (the slowest TTFT of the batch, and the scheduler's
prefill-batch line that says how many turns it batched) and the decode step time (median over
decode batches with exactly ``--micro-batch`` running requests). Writes ``micro.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from benchmarks.serving import parse_config, pct
from lava_sglang.launch import Server, http_json, stream_generate
from lava_sglang.models import default_model_path
from lava_sglang.sglang_log import decode_batches, peak_running, prefill_batches, step_times
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

OUT = Path(__file__).resolve().parent / "results" / "multiturn"


def build_workload(tokenizer, corpus, args) -> dict:
    system = tokenizer.encode("You are a careful research assistant. Read every tool result and answer briefly. "
                              + haystack(args.system_tokens, corpus, seed=900, tokenizer=tokenizer))[:args.system_tokens]
    convs = []
    for c in range(args.conversations):
        turns = []
        for t in range(args.turns):
            text = f"\nTool result {t + 1}:\n" + haystack(args.turn_tokens + 40, corpus, seed=1000 + 97 * c + t, tokenizer=tokenizer)
            turns.append(tokenizer.encode(text, add_special_tokens=False)[:args.turn_tokens])
        convs.append(turns)
    return {"system": system, "conversations": convs}


def one_turn(url: str, ids: list[int], output_tokens: int, session: str | None, timeout: float = 1800) -> dict:
    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"max_new_tokens": output_tokens, "temperature": 0.0, "ignore_eos": True}}
    if session is not None:
        payload["session_params"] = {"id": session}
    start = time.perf_counter()
    first, last, pieces = None, None, []
    for event in stream_generate(url, payload, timeout=timeout):
        if first is None and event["meta_info"].get("completion_tokens", 0) > 0:
            first = time.perf_counter() - start
        pieces.append(list(event.get("output_ids") or []))
        last = event
    meta = last["meta_info"]
    n = meta.get("completion_tokens", 0)
    output_ids = pieces[-1] if len(pieces[-1]) == n else [x for p in pieces for x in p]  # cumulative or incremental
    return {"ttft_s": first, "latency_s": time.perf_counter() - start, "output_ids": output_ids,
            "prompt_tokens": meta["prompt_tokens"], "cached_tokens": meta.get("cached_tokens", 0),
            "completion_tokens": meta.get("completion_tokens"), "kv": (meta.get("kv_compression") or [None])[0]}


def run_all(target, n: int) -> float:
    """``target(0) .. target(n - 1)`` at once, one thread each; the wall time until all are done."""
    started = time.perf_counter()
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - started


def run_conversation(server, work, c: int, args, out: list, errors: list, client: str) -> None:
    system, turns = work["system"], work["conversations"][c]
    session = server.open_session() if client == "session" else None
    history = list(system)
    records = []
    try:
        for t, new in enumerate(turns):
            if session is not None:
                ids = (system + new) if t == 0 else new
            else:
                ids = history + new
            r = one_turn(server.url, ids, args.output_tokens, session, args.turn_timeout)
            history = history + new + list(r["output_ids"] or [])
            kv = r.pop("kv")
            tokens_now = r["prompt_tokens"] + args.output_tokens - 1  # KV written by the end of the turn
            if kv is not None:
                private = kv["slots_held"] - kv["shared_prefix_tokens"] + args.output_tokens - 1
            else:
                private = tokens_now - len(system)
            records.append({**{k: v for k, v in r.items() if k != "output_ids"}, "turn": t + 1,
                            "prefilled_tokens": r["prompt_tokens"] - r["cached_tokens"],
                            "private_slots": private, "compressed": kv is not None,
                            "resident": t > 0 and r["prompt_tokens"] - r["cached_tokens"] <= len(new) + 1,
                            "earlier_kept_cells_dropped": (kv or {}).get("earlier_kept_cells_dropped")})
    except Exception as exc:  # recorded, never hidden: the table says which turns did not finish
        errors.append(f"conversation {c}, turn {len(records) + 1}: {type(exc).__name__}: {exc}")
    finally:
        if session is not None:
            try:
                server.close_session(session)
            except Exception as exc:
                errors.append(f"conversation {c}: close_session: {exc}")
    out[c] = records


def client_config(text: str, default_client: str) -> tuple[str, list[str], str]:
    """``none``, ``lava:128``, or either with ``@session`` / ``@resend`` (that configuration's
    client style instead of ``--client``): (name, server flags, client)."""
    text, _, client = text.partition("@")
    name, flags = parse_config(text)
    if client and client not in ("session", "resend"):
        raise SystemExit(f"multiturn: unknown client style {client!r} in --configs (session or resend)")
    return (f"{name}@{client}" if client else name), flags, client or default_client


def run_config(name: str, flags: list[str], work: dict, args, model_path: str, client: str) -> dict:
    server_flags = ["--max-total-tokens", str(args.max_total_tokens), "--log-level", "info",
                    "--decode-log-interval", "1", "--watchdog-timeout", str(args.watchdog_timeout), *flags]
    if client == "session":
        server_flags.append("--enable-streaming-session")
    with Server(model_path, server_flags, startup_timeout=900) as server:
        prime = {"input_ids": work["system"], "sampling_params": {"max_new_tokens": 0}}
        http_json(server.url + "/generate", prime, timeout=900)
        log_start = len(server.log_text())
        results = [None] * args.conversations
        errors: list = []
        wall = run_all(lambda c: run_conversation(server, work, c, args, results, errors, client), args.conversations)
        log = server.log_text()[log_start:]
        info = server.server_info()["internal_states"][0].get("kv_compression", {})
    per_turn = []
    for t in range(args.turns):
        rows = [conv[t] for conv in results if conv is not None and len(conv) > t]
        if not rows:
            break
        per_turn.append({
            "turn": t + 1, "conversations": len(rows),
            "prefilled_tokens_mean": statistics.mean(r["prefilled_tokens"] for r in rows),
            "private_slots_mean": statistics.mean(r["private_slots"] for r in rows),
            "ttft_p50_s": pct([r["ttft_s"] for r in rows], 50), "ttft_p99_s": pct([r["ttft_s"] for r in rows], 99),
            "resident": sum(1 for r in rows if r.get("resident")),
        })
    return {"config": name, "client": client, "server_flags": server_flags, "wall_s": round(wall, 2), "errors": errors,
            "peak_running": peak_running(decode_batches(log), default=None), "turns": per_turn, "conversations": results,
            "peak_resident": max((t["resident"] for t in per_turn[1:]), default=0),
            "server_totals": {k: info.get(k) for k in ("continued_turns", "reselections", "earlier_kept_cells_dropped",
                                                        "compressed_requests", "park_hits", "park_misses",
                                                        "park_evictions", "parked_conversations", "parked_slots")}}


def run_micro(name: str, flags: list[str], tokenizer, corpus, args, model_path: str) -> dict:
    """One server: B sessions with a long first turn, then B second turns at once (see --micro)."""
    B = args.micro_batch
    history = [tokenizer.encode(haystack(args.micro_history + 40, corpus, seed=7000 + i, tokenizer=tokenizer))[:args.micro_history]
               for i in range(B)]
    new = [tokenizer.encode("\nTool result:\n" + haystack(args.turn_tokens + 40, corpus, seed=7500 + i, tokenizer=tokenizer),
                            add_special_tokens=False)[:args.turn_tokens] for i in range(B)]
    pool = B * (args.micro_history + args.turn_tokens + args.micro_output + 64) + 512
    server_flags = ["--max-total-tokens", str(pool), "--log-level", "info", "--decode-log-interval", "1",
                    "--enable-streaming-session", *flags]
    with Server(model_path, server_flags, startup_timeout=900) as server:
        sessions = [server.open_session() for _ in range(B)]
        first = [one_turn(server.url, history[i], 1, sessions[i], args.turn_timeout) for i in range(B)]
        time.sleep(2.0)  # the scheduler's log lines of the first turns arrive before the mark
        mark = len(server.log_text())
        rows: list = [None] * B

        def second(i):
            rows[i] = one_turn(server.url, new[i], args.micro_output, sessions[i], args.turn_timeout)

        wall = run_all(second, B)
        log = server.log_text()[mark:]
        for s in sessions:
            server.close_session(s)
    prefills = prefill_batches(log)
    steps = step_times(log, B)
    kv = [(r.get("kv") or {}) for r in first]
    return {
        "config": name, "server_flags": server_flags, "batch": B,
        "history_slots": [k.get("slots_held", r["prompt_tokens"]) for k, r in zip(kv, first)],
        "turn2_prompt_tokens": [r["prompt_tokens"] for r in rows], "turn2_cached_tokens": [r["cached_tokens"] for r in rows],
        "turn2_prefill_batches": prefills,
        "extend_s": max(r["ttft_s"] for r in rows), "decode_step_s": statistics.median(steps) if steps else None,
        "decode_steps_measured": len(steps), "wall_s": round(wall, 2),
    }


def summarize_micro(result: dict) -> str:
    runs = result["runs"]
    base = next((r for r in runs if r["config"] == "none"), None)
    a = result["args"]
    lines = ["# Prefill and decode over a compressed layout at equal batch", "",
             f"{a['micro_batch']} streaming sessions, each with a {a['micro_history']}-token first turn, then "
             f"{a['micro_batch']} second turns of {a['turn_tokens']} new tokens sent at once, {a['micro_output']} output "
             f"tokens. Command: `{result['command']}`", "",
             "| config | history slots / session | turn-2 prefill batches (seqs x new tokens, cached) | "
             "extend time s (slowest TTFT) | decode step ms (batch of "
             f"{a['micro_batch']}) |", "|---|---|---|---|---|"]
    for r in runs:
        ext = f"{r['extend_s']:.2f}"
        dec = f"{r['decode_step_s'] * 1000:.1f}" if r["decode_step_s"] else "-"
        if base is not None and r is not base:
            ext += f" (x{r['extend_s'] / base['extend_s']:.2f})"
            if r["decode_step_s"] and base["decode_step_s"]:
                dec += f" (x{r['decode_step_s'] / base['decode_step_s']:.2f})"
        batches = ", ".join(f"{n} x {t} ({c})" for n, t, c in r["turn2_prefill_batches"])
        lines.append(f"| {r['config']} | {statistics.mean(r['history_slots']):.0f} | {batches} | {ext} | {dec} |")
    return "\n".join(lines) + "\n"


def summarize(result: dict) -> str:
    runs = result["runs"]
    base = next((r for r in runs if r["config"] == result["args"].get("baseline", "none")), None)
    a = result["args"]
    clients = " and ".join(sorted({r.get("client", a["client"]) for r in runs}))
    lines = [f"# Multi-turn conversations ({clients} clients)", "",
             f"{a['conversations']} conversations x {a['turns']} turns, {a['turn_tokens']} new tokens per turn, "
             f"{a['output_tokens']} output tokens, a {a['system_tokens']}-token system prompt primed once; "
             f"KV pool {a['max_total_tokens']} tokens. Command: `{result['command']}`", "",
             f"Ratios: to `{base['config'] if base else '-'}`.", "",
             "| config | wall s | prefilled tokens / turn (turns 2+) | private slots / conversation at the last turn | "
             "TTFT p50 / p99 s (turns 2+) | peak running | conversations resident, turns 2.. | parked hits / misses / evictions | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        later = r["turns"][1:] or r["turns"]
        pre = statistics.mean(t["prefilled_tokens_mean"] for t in later) if later else float("nan")
        slots = r["turns"][-1]["private_slots_mean"] if r["turns"] else float("nan")
        ttft = [x["ttft_s"] for conv in r["conversations"] if conv for x in conv[1:]]
        ratio = ""
        if base is not None and r is not base and base["turns"]:
            bl = base["turns"][1:] or base["turns"]
            bpre = statistics.mean(t["prefilled_tokens_mean"] for t in bl)
            ratio = (f" (x{r['wall_s'] / base['wall_s']:.2f})", f" (x{pre / bpre:.2f})",
                     f" (x{slots / base['turns'][-1]['private_slots_mean']:.2f})")
        w, p, s = ratio if ratio else ("", "", "")
        res = " ".join(str(t.get("resident", "-")) for t in r["turns"][1:])
        st = r.get("server_totals") or {}
        park = (f"{st.get('park_hits')} / {st.get('park_misses')} / {st.get('park_evictions')}"
                if st.get("park_hits") is not None else "-")
        lines.append(f"| {r['config']} | {r['wall_s']:.0f}{w} | {pre:.0f}{p} | {slots:.0f}{s} | "
                     f"{pct(ttft, 50) or 0:.2f} / {pct(ttft, 99) or 0:.2f} | {r['peak_running']} | {res} | {park} | "
                     f"{len(r['errors'])} |")
    lines += ["", "Per turn (prefilled tokens, private slots, TTFT p50):", "",
              "| turn | " + " | ".join(r["config"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for t in range(max(len(r["turns"]) for r in runs)):
        cells = []
        for r in runs:
            if t < len(r["turns"]):
                x = r["turns"][t]
                cells.append(f"{x['prefilled_tokens_mean']:.0f} / {x['private_slots_mean']:.0f} / {x['ttft_p50_s']:.2f} s")
            else:
                cells.append("-")
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    for r in runs:
        for e in r["errors"]:
            lines.append(f"\n{r['config']}: {e}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in result["runs"]:
        turns = [t["turn"] for t in r["turns"]]
        axes[0].plot(turns, [t["private_slots_mean"] for t in r["turns"]], marker="o", label=r["config"])
        axes[1].plot(turns, [t["prefilled_tokens_mean"] for t in r["turns"]], marker="o", label=r["config"])
        axes[2].plot(turns, [t["ttft_p50_s"] for t in r["turns"]], marker="o", label=r["config"])
    for ax, title in zip(axes, ("private KV slots per conversation", "prefilled tokens per turn", "TTFT p50 (s)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("turn")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    a = result["args"]
    clients = " and ".join(sorted({r.get("client", a["client"]) for r in result["runs"]}))
    fig.suptitle(f"{a['conversations']} conversations x {a['turns']} turns ({clients} clients), pool "
                 f"{a['max_total_tokens']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--turn-tokens", type=int, default=400)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="KV pool; default: the system prompt plus 3 full-cache conversations at the last turn")
    ap.add_argument("--configs", nargs="+", default=["none", "lava:128"])
    ap.add_argument("--client", choices=["session", "resend"], default="session",
                    help="client style of every configuration without its own @session / @resend")
    ap.add_argument("--baseline", default="none", help="the configuration the table's ratios are to")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--turn-timeout", type=float, default=300.0,
                    help="seconds a turn may take (a conversation that cannot be admitted is recorded as an error)")
    ap.add_argument("--watchdog-timeout", type=float, default=1800.0,
                    help="SGLang's scheduler watchdog (s): one CPU forward of a long re-prefill on a busy core can pass its 300 s default")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 2 conversations x 3 turns of 150 tokens, 4 output tokens, a 100-token system prompt")
    ap.add_argument("--micro", action="store_true", help="prefill and decode over a compressed layout vs none at equal batch")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-history", type=int, default=2000)
    ap.add_argument("--micro-output", type=int, default=48)
    ap.add_argument("--out", default=str(OUT))
    return ap


def main(argv=None) -> int:
    import sys

    from transformers import AutoTokenizer

    args = build_parser().parse_args(argv)
    if args.quick:
        args.conversations, args.turns, args.turn_tokens, args.output_tokens, args.system_tokens = 2, 3, 150, 4, 100
    if args.max_total_tokens is None:
        args.max_total_tokens = args.system_tokens + 3 * args.turns * (args.turn_tokens + args.output_tokens) + 256
    model_path = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    corpus = load_corpus(args.corpus or default_corpus_dir())
    command = "python benchmarks/multiturn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.micro:
        runs = []
        for text in args.configs:
            name, flags = parse_config(text)
            print(f"[multiturn] micro {name}", flush=True)
            runs.append(run_micro(name, flags, tokenizer, corpus, args, model_path))
        result = {"args": vars(args), "command": command, "runs": runs}
        (out / "micro.json").write_text(json.dumps(result, indent=1))
        md = summarize_micro(result)
        (out / "micro.md").write_text(md)
        print(md)
        return 0
    work = build_workload(tokenizer, corpus, args)
    runs = []
    for text in args.configs:
        name, flags, client = client_config(text, args.client)
        print(f"[multiturn] {name}: {args.conversations} x {args.turns} turns ({client})", flush=True)
        run = run_config(name, flags, work, args, model_path, client)
        print(f"[multiturn] {name}: wall {run['wall_s']} s, peak running {run['peak_running']}, errors {len(run['errors'])}",
              flush=True)
        runs.append(run)
    result = {"args": vars(args), "command": command, "runs": runs}
    clients = sorted({r["client"] for r in runs})
    stem = "multiturn_" + ("_".join(clients) if len(clients) > 1 else clients[0]) + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = summarize(result)
    (out / f"{stem}.md").write_text(md)
    plot(result, out / f"{stem}.png")
    print(md)
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
