"""The demo's long-output row (``lava_sglang.demo``): one long output with and without compression
during decode.

The passkey prompt, compressed after prefill at the demo's budget, then ``--decode-tokens`` tokens
generated (``ignore_eos``) twice: its cache growing by one slot per token (a ramp), and with
``kv_decode_budget N`` / ``kv_decode_interval D``, selected back to ``N`` every ``D`` tokens (a
sawtooth under the bound ``max(budget, N) + D + 1``). The private slots come from the request's
report and the server's selection log lines (``sglang_log.decode_selections``).
"""

from __future__ import annotations

import time

from rich.table import Table

from lava_sglang.launch import Server, flush_cache, http_json
from lava_sglang.sglang_log import decode_selections, slots_at, slots_trace


def generate_long(server: Server, task, budget: int, tokens: int, decode_budget: int, interval: int) -> list[dict]:
    """One row per mode: private slots over generated tokens, peak, selections, speed, the answer."""
    rows = []
    for name, extra in (("after prefill", {}),
                        ("during decode too", {"kv_decode_budget": decode_budget, "kv_decode_interval": interval})):
        rid = f"demo-decode-{len(rows)}-{time.time_ns()}"
        mark = len(server.log_text())
        started = time.perf_counter()
        out = http_json(server.url + "/generate", {"rid": rid, "text": task.prompt, "sampling_params": {
            "max_new_tokens": tokens, "temperature": 0.0, "ignore_eos": True,
            "custom_params": {"kv_budget": budget, **extra}}}, timeout=1800)
        wall = time.perf_counter() - started
        flush_cache(server.url)
        meta = out["meta_info"]
        rep = (meta.get("kv_compression") or [None])[0] or {}
        n, prompt = meta["completion_tokens"], meta["prompt_tokens"]
        selections = decode_selections(server.log_text()[mark:], rid, prompt)
        trace = slots_trace(int(rep.get("private_slots") or prompt), n, selections)
        text = out["text"].strip()
        rows.append({"name": name, "tokens": n, "trace": trace, "peak": max(s for _, s in trace),
                     "selections": len(selections), "tokens_per_s": n / wall, "right": task.answer in text,
                     "answer": text.splitlines()[0] if text else "",
                     "bound": max(budget, decode_budget) + interval + 1 if extra else None})
    return rows


def decode_table(rows: list[dict], budget: int, decode_budget: int, interval: int) -> Table:
    n = rows[0]["tokens"]
    marks = sorted({max(1, n * k // 4) for k in (1, 2, 3, 4)})
    table = Table(title=f"A long output: {n} tokens generated after the passkey prompt (budget {budget}); during "
                        f"decode N = {decode_budget}, D = {interval}", title_justify="left")
    table.add_column("compressed", no_wrap=True)
    for t in marks:
        table.add_column(f"slots at {t}", justify="right")
    for column in ("peak (bound)", "selections", "tokens/s", "answer"):
        table.add_column(column, justify="left" if column == "answer" else "right")
    for r in rows:
        peak = f"{r['peak']}" + ("" if r["bound"] is None else f" ({r['bound']})")
        verdict = "[green]passkey[/green]" if r["right"] else "[red]no passkey[/red]"
        table.add_row(r["name"], *(str(slots_at(r["trace"], t)) for t in marks), peak, str(r["selections"]),
                      f"{r['tokens_per_s']:.1f}", f"{r['answer'][:24]!r} ({verdict})")
    return table
