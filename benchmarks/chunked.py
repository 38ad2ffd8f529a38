"""Compression during chunked prefill (``--kv-prefill-compression chunked``): prompts longer than
the KV pool, the peak-slot bound, what the selections cost, and the private slots a request holds
while it is prefilled.

    python -m benchmarks.chunked [--tokens 8000] [--pool 1024] [--chunk 512] [--budget 256]
        [--cost-lengths 2000 4000 8000] [--repeats 3] [--trace-pool 9000] [--corpus DIR] [--quick]

1. **Target.** One ``--tokens`` prompt on a ``--pool``-slot pool (``--max-total-tokens``,
   ``--chunked-prefill-size --chunk``): answered by ``--kv-policy lava --kv-budget --budget`` with
   ``kv_prefill_compression: chunked``; refused by the same server under ``after`` and by a
   ``--kv-policy none`` server with the same pool. Its ``peak_slots`` against
   ``budget + chunk + window + 1``.
2. **Cost.** On the same server, ``compression_ms_total / prefill_ms_total`` (every selection
   summed, every chunk's forward summed; the plugin's own report) at each ``--cost-lengths``,
   median of ``--repeats`` prompts.
3. **Private slots over prefill progress.** One ``--tokens`` prompt on a pool that holds it whole
   (``--trace-pool``), same chunking, under ``none`` (per request), ``after`` and ``chunked``:
   the plugin's per-chunk trace (``prefill_trace``: tokens prefilled, private slots after the
   chunk's forward, after its selection) for ``after`` and ``chunked``; for ``none``, which has
   no plugin state, the pool's used slots polled (``/server_info``) while it is prefilled.

4. **Passkey beyond the pool.** A passkey at each of ``--passkey-depths`` of a
   ``--passkey-tokens`` prompt (``--passkey-seeds`` prompts per depth): ``chunked`` on the small
   pool, against the full cache (``kv_policy: none``) and ``after`` on the trace server's large
   pool, same budget and chunking.

Writes ``chunked.json``, ``chunked.md`` and ``chunked.png`` to ``benchmarks/results/chunked/``.
The radix cache is flushed before every request: no prompt is served from another's cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from lava_sglang.config import CompressionConfig
from lava_sglang.engine.chunked import peak_bound
from lava_sglang.launch import Server, post_generate
from lava_sglang.models import default_model_path
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus, passkey_task

OUT = Path(__file__).resolve().parent / "results" / "chunked"
WINDOW = CompressionConfig().window  # the servers' (default) window


def request(server: Server, ids: list[int], mode: str | None, max_new_tokens: int = 8, policy: str | None = None):
    """(HTTP status, body: dict when 200, else the error text)."""
    custom = {}
    if mode:
        custom["kv_prefill_compression"] = mode
    if policy:
        custom["kv_policy"] = policy
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0, **({"custom_params": custom} if custom else {})}
    started = time.perf_counter()
    status, body = post_generate(server.port, {"input_ids": ids, "sampling_params": sp}, timeout=3600)
    out = json.loads(body) if status == 200 else body
    if isinstance(out, dict):
        out["client_s"] = time.perf_counter() - started
    return status, out


def ask(server: Server, tok, task, mode: str | None, policy: str | None = None) -> dict:
    """A passkey question (the tree flushed first): right or wrong, and the slots it held."""
    server.flush_cache()
    status, out = request(server, tok.encode(task.prompt), mode, max_new_tokens=8, policy=policy)
    assert status == 200, out
    rep = report(out) or {}
    return {"right": task.answer in out["text"], "answer": (out["text"].strip().splitlines() or [""])[0][:24],
            "prompt_tokens": out["meta_info"]["prompt_tokens"], "peak_slots": rep.get("peak_slots"),
            "slots_held": rep.get("slots_held", out["meta_info"]["prompt_tokens"])}


def report(out: dict) -> dict | None:
    return (out["meta_info"].get("kv_compression") or [None])[0]


def used_slots(server: Server) -> int:
    m = server.kv_memory()
    return int(m["pool_size"]) - int(m["available_slots"])


def polled(server: Server, ids: list[int], mode: str | None, policy: str | None = None) -> tuple[dict, list[int]]:
    """Send one request while polling the pool's used slots; (response, distinct polled values)."""
    samples: list[int] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                samples.append(used_slots(server))
            except Exception:  # noqa: BLE001 -- a missed sample
                pass
            stop.wait(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        status, out = request(server, ids, mode, max_new_tokens=1, policy=policy)
    finally:
        stop.set()
        th.join(30)
    assert status == 200, out
    plateaus = [v for i, v in enumerate(samples) if v and (i == 0 or v != samples[i - 1])]
    return out, plateaus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--pool", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--cost-lengths", type=int, nargs="+", default=[2000, 4000, 8000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trace-pool", type=int, default=9000)
    p.add_argument("--passkey-tokens", type=int, default=7000)
    p.add_argument("--passkey-depths", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--passkey-seeds", type=int, default=1)
    p.add_argument("--corpus", default=None)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2500 tokens, cost at 1500 once, no trace server")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--replot", action="store_true", help="only rewrite chunked.md and chunked.png from --out/chunked.json")
    args = p.parse_args(argv)
    if args.replot:
        out_dir = Path(args.out)
        data = json.loads((out_dir / "chunked.json").read_text())
        saved = argparse.Namespace(**{**data["args"], "out": args.out})
        (out_dir / "chunked.md").write_text(write_md(data, saved))
        if "trace" in data:
            plot(data, saved, out_dir / "chunked.png")
        print((out_dir / "chunked.md").read_text())
        return 0
    if args.quick:
        args.tokens, args.cost_lengths, args.repeats, args.trace_pool, args.passkey_depths = 2500, [1500], 1, 0, []
    command = "python -m benchmarks.chunked " + " ".join(argv if argv is not None else sys.argv[1:])

    model = str(default_model_path())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    corpus_dir = args.corpus or default_corpus_dir()
    corpus = load_corpus(corpus_dir)
    task = passkey_task(args.tokens, seed=27, depth=0.5, corpus=corpus, tokenizer=tok)
    target_ids = tok.encode(task.prompt)
    bound = peak_bound(args.budget, WINDOW, args.chunk)
    base = ["--max-total-tokens", str(args.pool), "--chunked-prefill-size", str(args.chunk), "--log-level", "info",
            "--sleep-on-idle"]
    data: dict = {"command": command, "corpus": str(corpus_dir), "args": vars(args), "bound": bound,
                  "target": {"prompt_tokens": len(target_ids), "passkey": task.answer}}

    # 1. the target, and 2. the cost, on the small pool
    print(f"[chunked] lava:{args.budget} server, pool {args.pool}, chunk {args.chunk}", flush=True)
    with Server(model, ["--kv-policy", "lava", "--kv-budget", str(args.budget), *base]) as server:
        server.flush_cache()
        status, out = request(server, target_ids, "chunked")
        assert status == 200, out
        rep = report(out)
        data["target"]["chunked"] = {"status": status, "answer": (out["text"].strip().splitlines() or [""])[0][:40],
                                     "right": task.answer in out["text"], "wall_s": out["client_s"], "report": rep}
        status, body = request(server, target_ids, "after")
        data["target"]["after"] = {"status": status, "message": body if status != 200 else None}
        cost = {}
        for n in args.cost_lengths:
            shares = []
            for j in range(args.repeats):
                ids = tok.encode(haystack(n, corpus, seed=9100 + 10 * n + j, tokenizer=tok))[:n]
                server.flush_cache()
                status, out = request(server, ids, "chunked", max_new_tokens=1)
                assert status == 200, out
                r = report(out)
                shares.append({"compression_ms_total": r["compression_ms_total"], "prefill_ms_total": r["prefill_ms_total"],
                               "share": r["compression_ms_total"] / r["prefill_ms_total"],
                               "selections": r["chunk_selections"], "peak_slots": r["peak_slots"]})
            cost[n] = {"share_median": statistics.median(s["share"] for s in shares), "runs": shares}
            print(f"[chunked] cost at {n} tokens: {100 * cost[n]['share_median']:.2f}% of prefill", flush=True)
        data["cost"] = cost
        passkeys = [passkey_task(args.passkey_tokens, seed=2700 + 10 * i + j, depth=d, corpus=corpus, tokenizer=tok)
                    for i, d in enumerate(args.passkey_depths) for j in range(args.passkey_seeds)]
        data["passkey"] = [{"depth": t.depth, "answer": t.answer, "chunked_small_pool": ask(server, tok, t, "chunked")}
                           for t in passkeys]
    print("[chunked] none server, same pool", flush=True)
    with Server(model, ["--kv-policy", "none", *base]) as server:
        status, body = request(server, target_ids, None)
        data["target"]["none"] = {"status": status, "message": body if status != 200 else None}

    # 3. private slots over prefill progress, on a pool that holds the prompt whole
    if args.trace_pool:
        print(f"[chunked] trace server, pool {args.trace_pool}", flush=True)
        trace = {}
        flags = ["--kv-policy", "lava", "--kv-budget", str(args.budget), "--max-total-tokens", str(args.trace_pool),
                 "--chunked-prefill-size", str(args.chunk), "--log-level", "info", "--sleep-on-idle"]
        with Server(model, flags) as server:
            for row, t in zip(data["passkey"], passkeys):
                for name, mode, policy in (("none_large_pool", None, "none"), ("after_large_pool", "after", None)):
                    row[name] = ask(server, tok, t, mode, policy)
            for name, mode, policy in (("none", None, "none"), ("after", "after", None), ("chunked", "chunked", None)):
                server.flush_cache()
                out, plateaus = polled(server, target_ids, mode, policy)
                r = report(out)
                trace[name] = {"polled_used_slots": plateaus, "report": r,
                               "prefill_trace": r.get("prefill_trace") if r else None}
        data["trace"] = trace

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "chunked.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = write_md(data, args)
    (out_dir / "chunked.md").write_text(md)
    if args.trace_pool:
        plot(data, args, out_dir / "chunked.png")
    print(md)
    return 0


def write_md(data: dict, args) -> str:
    t = data["target"]
    c = t["chunked"]
    rep = c["report"]
    lines = [f"Command: `{data['command']}`", "",
             f"**Target**: a {t['prompt_tokens']}-token passkey prompt on a {args.pool}-slot pool "
             f"(`--chunked-prefill-size {args.chunk}`, lava:{args.budget}).", "",
             "| mode | outcome |", "|---|---|",
             f"| chunked | answered in {c['wall_s']:.1f} s: {c['answer']!r} (passkey {t['passkey']}: "
             f"{'right' if c['right'] else 'wrong'}); peak_slots {rep['peak_slots']} (bound {data['bound']}), "
             f"{rep['chunk_selections']} selections, slots held after prefill {rep['slots_held']}, "
             f"compression {rep['compression_ms_total']:.0f} ms of prefill {rep['prefill_ms_total']:.0f} ms |"]
    for mode in ("after", "none"):
        r = t[mode]
        lines.append(f"| {mode} | HTTP {r['status']}: {(r['message'] or '')[:300]!s} |")
    lines += ["", "**Cost** (compression summed over all selections / prefill summed over all chunks, median):", "",
              "| prompt tokens | selections | peak slots | compression / prefill |", "|---|---|---|---|"]
    for n, c in data["cost"].items():
        run = c["runs"][0]
        lines.append(f"| {n} | {run['selections']} | {max(r['peak_slots'] for r in c['runs'])} | "
                     f"{100 * c['share_median']:.2f}% ({run['compression_ms_total']:.0f} / {run['prefill_ms_total']:.0f} ms) |")
    if data.get("passkey") and "none_large_pool" in data["passkey"][0]:
        rows = data["passkey"]
        n = rows[0]["chunked_small_pool"]["prompt_tokens"]
        lines += ["", f"**Passkey beyond the pool** (~{n}-token prompts, {len(rows)} prompts; right / asked):", "",
                  "| depth | full cache, pool " + str(args.trace_pool) + f" | lava:{args.budget} after, pool "
                  + str(args.trace_pool) + f" | lava:{args.budget} chunked, pool {args.pool} |", "|---|---|---|---|"]
        for depth in sorted({r["depth"] for r in rows}):
            sel = [r for r in rows if r["depth"] == depth]
            cell = lambda k: f"{sum(r[k]['right'] for r in sel)} / {len(sel)}"  # noqa: E731
            lines.append(f"| {100 * depth:.0f}% | {cell('none_large_pool')} | {cell('after_large_pool')} | "
                         f"{cell('chunked_small_pool')} |")
        total = lambda k: sum(r[k]["right"] for r in rows)  # noqa: E731
        lines.append(f"| all | {total('none_large_pool')} / {len(rows)} | {total('after_large_pool')} / {len(rows)} | "
                     f"{total('chunked_small_pool')} / {len(rows)} |")
    if "trace" in data:
        lines += ["", f"**Private slots while prefilled** ({t['prompt_tokens']} tokens, pool {args.trace_pool}):", "",
                  "| mode | most private slots held | after prefill |", "|---|---|---|"]
        for name, tr in data["trace"].items():
            r = tr["report"]
            peak = r["peak_slots"] if r else max(tr["polled_used_slots"], default=0)
            end = r["slots_held"] if r else (tr["polled_used_slots"] or [0])[-1]
            lines.append(f"| {name} | {peak} | {end} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    tr = data["trace"]
    for name, color in (("after", "tab:orange"), ("chunked", "tab:blue")):
        steps = tr[name]["prefill_trace"] or []
        xs, ys = [], []
        for prefilled, held, kept in steps:
            xs += [prefilled, prefilled]
            ys += [held, kept]
        ax.plot(xs, ys, marker=".", color=color, label=f"lava:{args.budget} {name} (plugin trace)")
    none = tr["none"]["polled_used_slots"]  # no plugin state: each polled value is the tokens prefilled so far
    ax.plot(none, none, marker="x", color="black", linestyle="--", label="none (pool used slots, polled)")
    ax.axhline(data["bound"], color="tab:blue", linestyle=":", label=f"budget + chunk + window + 1 = {data['bound']}")
    ax.set(xlabel="prompt tokens prefilled", ylabel="private KV slots held",
           title=f"One {data['target']['prompt_tokens']}-token prompt, chunks of {args.chunk}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
