"""Serving under memory pressure: the same workload against one server per configuration.

    python benchmarks/serving.py [--requests 32] [--prompt-tokens 3000] [--output-tokens 128]
        [--max-total-tokens 12800] [--concurrency 32] [--rate inf]
        [--configs none lava:128 lava:256:chunked lava:256:decode=256]
        [--chunked-prefill-size N] [--no-micro] [--corpus DIR] [--quick]

A configuration is ``none``, ``policy:budget``, ``policy:budget:chunked`` (compressed during
chunked prefill; every server then gets the same ``--chunked-prefill-size``), or with
``:decode=N`` (and ``:interval=D``) compressed during decode too.

Every configuration gets a fresh server with the same model, flags and KV pool
(``--max-total-tokens``) and replays the same requests (same prompts, ``ignore_eos`` outputs of
``--output-tokens``), with at most ``--concurrency`` in flight and Poisson arrivals at ``--rate``
requests/s (``inf``: all at once). A streaming HTTP client records TTFT and inter-token
latencies; the server log gives the engine's view (running requests and KV usage per decode
batch, decode throughput). Ratios to ``none`` are computed within the run.

Micro-measurements in the same run: decode step time at a fixed batch of long requests
(compressed vs full: ``--micro-batch`` requests decoding together, median over decode batches
with exactly that many running requests), and compression time vs prefill time for 1k/2k/4k
prompts. Writes JSON, a markdown table and PNGs to ``benchmarks/results/serving/``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from lava_sglang.launch import Server, stream_generate
from lava_sglang.models import default_model_path
from lava_sglang.sglang_log import decode_batches, decode_steps, peak_running, peak_usage, step_times
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

OUT = Path(__file__).resolve().parent / "results" / "serving"


def parse_config(text: str) -> tuple[str, list[str]]:
    """``none``, ``policy:budget``, then any of ``:chunked`` (compression during chunked prefill,
    ``--kv-prefill-compression chunked``), ``:decode=N`` (compression during decode,
    ``--kv-decode-budget N``) and ``:interval=D`` (``--kv-decode-interval D``)."""
    if text == "none":
        return "none", ["--kv-policy", "none"]
    policy, budget, *rest = text.split(":") + [""]
    flags = ["--kv-policy", policy, "--kv-budget", budget or "128"]
    for part in filter(None, rest):
        key, _, value = part.partition("=")
        if key in ("chunked", "after") and not value:
            flags += ["--kv-prefill-compression", key]
        elif key in ("decode", "interval") and value.isdigit():
            flags += ["--kv-decode-budget" if key == "decode" else "--kv-decode-interval", value]
        else:
            raise SystemExit(f"configuration {text!r}: unknown part {part!r} (chunked, after, decode=N, interval=D)")
    return text, flags


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def stream_request(url: str, ids: list[int], output_tokens: int, custom: dict | None = None) -> dict:
    sp = {"max_new_tokens": output_tokens, "temperature": 0.0, "ignore_eos": True}
    if custom:
        sp["custom_params"] = custom
    start = time.perf_counter()
    stamps, meta = [], {}
    last_n = 0
    for chunk in stream_generate(url, {"input_ids": ids, "sampling_params": sp}):
        meta = chunk["meta_info"]
        n = meta["completion_tokens"]
        now = time.perf_counter()
        stamps.extend([now] * (n - last_n))
        last_n = n
    ttft = stamps[0] - start if stamps else None
    itl = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
    return {"start": start, "end": stamps[-1] if stamps else time.perf_counter(), "ttft": ttft, "itl": itl,
            "output_tokens": last_n, "num_retractions": meta.get("num_retractions", 0),
            "kv_compression": (meta.get("kv_compression") or [None])[0]}


def run_workload(server: Server, prompts: list[list[int]], args) -> dict:
    rng = random.Random(args.seed)
    results: list = [None] * len(prompts)
    sem = threading.Semaphore(args.concurrency)
    threads = []
    t0 = time.perf_counter()

    def worker(i):
        with sem:
            results[i] = stream_request(server.url, prompts[i], args.output_tokens)

    for i in range(len(prompts)):
        if args.rate != float("inf") and i:
            time.sleep(rng.expovariate(args.rate))
        th = threading.Thread(target=worker, args=(i,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    log = server.log_text()
    decode = decode_batches(log)
    steps = decode_steps(log)  # pure decode steps (--decode-log-interval 1), prefill excluded
    decode_seconds = sum(d.step_s for d in steps)
    out_tokens = sum(r["output_tokens"] for r in results)
    reports = [r["kv_compression"] for r in results if r["kv_compression"]]
    first_token = min(r["start"] + r["ttft"] for r in results)
    last_token = max(r["end"] for r in results)
    return {
        "wall_s": wall,
        "request_throughput": len(prompts) / wall,
        "output_throughput": out_tokens / wall,
        # decode phase alone (on a CPU prefill dominates the wall time): tokens per second of the
        # engine's decode steps, time-weighted, prefill forwards excluded
        "decode_phase_throughput": (sum(d.running for d in steps) / decode_seconds) if decode_seconds else None,
        "decode_seconds": decode_seconds,
        "mean_decode_batch": (statistics.mean(d.running for d in steps) if steps else None),
        # client view: tokens after each request's first, from the first first token to the last token
        "first_to_last_token_throughput": (out_tokens - len(prompts)) / max(1e-9, last_token - first_token),
        "ttft_p50": pct([r["ttft"] for r in results], 50), "ttft_p99": pct([r["ttft"] for r in results], 99),
        "itl_p50": pct([x for r in results for x in r["itl"]], 50), "itl_p99": pct([x for r in results for x in r["itl"]], 99),
        "peak_running_requests": peak_running(decode),
        "peak_kv_usage": peak_usage(decode, default=0.0),
        "retractions": sum(r["num_retractions"] for r in results),
        # every selection over every chunk's forward (chunked), or the one selection over the prefill
        "compression_share_of_prefill": (statistics.median(r.get("compression_ms_total", r["compression_ms"])
                                                           / r.get("prefill_ms_total", r["prefill_ms"]) for r in reports)
                                         if reports else None),
        "peak_slots_max": max((r.get("peak_slots") or 0 for r in reports), default=None),
        "ttfts": [r["ttft"] for r in results],
        "itls": [x for r in results for x in r["itl"]],
    }


def decode_step_time(server: Server, prompts: list[list[int]], batch: int) -> float | None:
    """Median decode step time (s) over decode batches with exactly ``batch`` running requests."""
    mark = len(server.log_text())
    threads = [threading.Thread(target=stream_request, args=(server.url, prompts[i], 48)) for i in range(batch)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    steps = step_times(server.log_text()[mark:], batch)
    return statistics.median(steps) if steps else None


def plot(results: dict, pool_tokens: int, plt, path: Path) -> None:
    """Output throughput and peak running requests vs budget (one line per policy, ``none`` as a
    horizontal line), and the TTFT and inter-token latency CDFs of every configuration."""
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    by_policy: dict = {}
    for name, r in results.items():
        if name != "none":
            policy, _, budget = name.partition(":")
            budget, _, mode = budget.partition(":")
            by_policy.setdefault(policy + (f" ({mode})" if mode else ""), []).append((int(budget or 128), r))
    for i, (key, title) in enumerate([("output_throughput", "output tokens/s"),
                                      ("peak_running_requests", f"peak running requests (pool {pool_tokens} tokens)")]):
        for policy, points in sorted(by_policy.items()):
            points.sort(key=lambda t: t[0])
            ax[i].plot([b for b, _ in points], [r[key] for _, r in points], marker="o", label=policy)
        if "none" in results:
            ax[i].axhline(results["none"][key], color="black", linestyle="--", label="none (full cache)")
        ax[i].set(title=title, xlabel="budget (tokens per head)", xscale="log", ylim=(0, None))
        budgets = sorted({b for points in by_policy.values() for b, _ in points})
        ax[i].set_xticks(budgets, [str(b) for b in budgets])
        ax[i].minorticks_off()
        ax[i].legend()
    for i, (key, title) in [(2, ("ttfts", "TTFT CDF")), (3, ("itls", "inter-token latency CDF"))]:
        for name, r in results.items():
            xs = sorted(x for x in r[key] if x is not None)
            if xs:
                ax[i].plot(xs, [(j + 1) / len(xs) for j in range(len(xs))], label=name)
        ax[i].set(title=title, xlabel="s" + (" (log)" if i == 3 else ""),
                  ylabel="fraction of requests" if i == 2 else "fraction of tokens", xscale="log" if i == 3 else "linear")
        ax[i].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict, args, command: str, corpus_dir) -> None:
    """JSON, markdown table and PNGs of the configurations measured so far (rewritten after each)."""
    ratios = {}
    if "none" in results:
        base = results["none"]
        for name, r in results.items():
            if name == "none":
                continue
            ratios[name] = {
                "peak_running_requests": r["peak_running_requests"] / max(1, base["peak_running_requests"]),
                "output_throughput": r["output_throughput"] / base["output_throughput"],
                "decode_phase_throughput": ((r["decode_phase_throughput"] / base["decode_phase_throughput"])
                                            if r["decode_phase_throughput"] and base["decode_phase_throughput"] else None),
                "request_throughput": r["request_throughput"] / base["request_throughput"],
                "decode_step_time": (r["decode_step_s"] / base["decode_step_s"]) if r["decode_step_s"] and base["decode_step_s"] else None,
            }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps({"command": command, "args": {k: (str(v) if isinstance(v, float) else v) for k, v in vars(args).items()},
                                                       "corpus": str(corpus_dir), "results": results, "ratios_to_none": ratios}, indent=1))
    keys = ["wall_s", "request_throughput", "output_throughput", "decode_phase_throughput", "mean_decode_batch", "decode_seconds",
            "first_to_last_token_throughput", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
            "peak_running_requests", "peak_kv_usage", "retractions", "compression_share_of_prefill", "peak_slots_max",
            "decode_step_s"]
    lines = [f"Command: `{command}`", "", "| metric | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for k in keys:
        cells = []
        for r in results.values():
            v = r.get(k)
            cells.append("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if ratios:
        lines += ["", "Ratios to `none` (same run):", "", "| config | peak running | output tok/s | decode-phase tok/s | req/s | decode step time |",
                  "|---|---|---|---|---|---|"]
        for name, q in ratios.items():
            f = lambda x: "-" if x is None else f"{x:.2f}"
            lines.append(f"| {name} | {f(q['peak_running_requests'])} | {f(q['output_throughput'])} | {f(q['decode_phase_throughput'])} | "
                         f"{f(q['request_throughput'])} | {f(q['decode_step_time'])} |")
    for name, r in results.items():
        if r.get("compression_vs_prefill"):
            lines += ["", f"Compression vs prefill ({name}): " + ", ".join(
                f"{n} tokens: {c['compression_ms']:.0f} / {c['prefill_ms']:.0f} ms = {100 * c['ratio']:.2f}%" for n, c in r["compression_vs_prefill"].items())]
    (out_dir / "serving.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot(results, args.max_total_tokens, plt, out_dir / "serving.png")
    except ImportError:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--max-total-tokens", type=int, default=12800)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=float("inf"))
    p.add_argument("--configs", nargs="+", default=["none", "lava:128"])
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--micro-prompt-tokens", type=int, default=2000)
    p.add_argument("--compression-lengths", type=int, nargs="+", default=[1000, 2000, 3000, 4000])
    p.add_argument("--compression-repeats", type=int, default=3, help="prompts per length (median reported)")
    p.add_argument("--chunked-prefill-size", type=int, default=None, help="every server's (default: SGLang's)")
    p.add_argument("--no-micro", action="store_true", help="skip the decode-step and compression-time measurements")
    p.add_argument("--core", type=int, default=None, help="pin each server to this core (OMP_NUM_THREADS=1)")
    p.add_argument("--corpus", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run for tests: 4 requests of 300 tokens, 8 outputs, a 1500-token pool; micro batch 2 of "
                        "300 tokens; compression timed at 300 tokens once")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--replot", action="store_true", help="only rewrite serving.md and serving.png from --out/serving.json")
    args = p.parse_args(argv)
    if args.replot:
        data = json.loads((Path(args.out) / "serving.json").read_text())
        saved = argparse.Namespace(**{**data["args"], "out": args.out})
        write_report(data["results"], saved, data["command"], data["corpus"])
        print((Path(args.out) / "serving.md").read_text())
        return 0
    if args.quick:
        args.requests, args.prompt_tokens, args.output_tokens = 4, 300, 8
        args.max_total_tokens, args.micro_batch, args.micro_prompt_tokens = 1500, 2, 300
        args.compression_lengths, args.compression_repeats = [300], 1

    model = str(default_model_path())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    corpus_dir = args.corpus or default_corpus_dir()
    corpus = load_corpus(corpus_dir)
    prompts = [tok.encode(haystack(args.prompt_tokens, corpus, seed=1000 + i, tokenizer=tok) + "\n\nSummarize the text.")
               for i in range(args.requests)]
    micro = [tok.encode(haystack(args.micro_prompt_tokens, corpus, seed=5000 + i, tokenizer=tok)) for i in range(args.micro_batch)]
    lengths = {n: [tok.encode(haystack(n, corpus, seed=9000 + 10 * n + j, tokenizer=tok)) for j in range(args.compression_repeats)]
               for n in args.compression_lengths}

    command = "python benchmarks/serving.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {}
    for config in args.configs:
        name, flags = parse_config(config)
        # --decode-log-interval 1: every decode batch is logged, so peak running requests and
        # KV usage are exact; --sleep-on-idle: an idle CPU scheduler would busy-poll a core.
        flags = flags + ["--max-total-tokens", str(args.max_total_tokens), "--decode-log-interval", "1",
                         "--log-level", "info", "--sleep-on-idle"]
        if getattr(args, "chunked_prefill_size", None):
            flags += ["--chunked-prefill-size", str(args.chunked_prefill_size)]
        print(f"[serving] {name}: starting server {' '.join(flags)}", flush=True)
        with Server(model, flags, core=args.core) as server:
            r = run_workload(server, prompts, args)
            r["decode_step_s"] = None if args.no_micro else decode_step_time(server, micro, args.micro_batch)
            if name != "none" and not args.no_micro:
                comp = {}
                for n, prompts_n in lengths.items():
                    reps = []
                    for ids in prompts_n:
                        rep = server.generate(input_ids=ids, max_new_tokens=1)["meta_info"].get("kv_compression")
                        if rep:
                            reps.append((rep[0]["compression_ms"], rep[0]["prefill_ms"]))
                    if reps:
                        c, f = statistics.median(c for c, _ in reps), statistics.median(f for _, f in reps)
                        comp[n] = {"compression_ms": c, "prefill_ms": f, "ratio": statistics.median(c / f for c, f in reps),
                                   "repeats": len(reps)}
                r["compression_vs_prefill"] = comp
        results[name] = r
        write_report(results, args, command, corpus_dir)
        print(f"[serving] {name}: " + json.dumps({k: v for k, v in r.items() if k not in ("ttfts", "itls")}), flush=True)

    print((Path(args.out) / "serving.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
