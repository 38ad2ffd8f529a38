"""The demo's last row (``lava_sglang.demo``): a prompt several times longer than the KV pool.

The same passkey question over ``--long-tokens`` tokens, sent three ways to the demo's server: with
the full cache (``kv_policy: none``) and with LAVa compressing after prefill (``after``), both of
which need the whole prompt in the pool at once and are refused; and with LAVa compressing during
chunked prefill (``kv_prefill_compression: chunked``), which holds at most budget + chunk +
window slots of it at any time and answers.
"""

from __future__ import annotations

import json
import re

from rich.table import Table

from lava_sglang.config import CompressionConfig
from lava_sglang.engine.chunked import peak_bound
from lava_sglang.launch import Server, flush_cache, post_generate

WINDOW = CompressionConfig().window  # the demo server's (default) window


def ask_long(server: Server, task, budget: int, chunk: int, max_new_tokens: int = 8) -> list[dict]:
    """One row per mode: HTTP status, answer or refusal, peak private slots (chunked)."""
    rows = []
    for name, custom in (("full cache", {"kv_policy": "none"}),
                         (f"LAVa, budget {budget}, after prefill", {"kv_budget": budget, "kv_prefill_compression": "after"}),
                         (f"LAVa, budget {budget}, chunked", {"kv_budget": budget, "kv_prefill_compression": "chunked"})):
        payload = {"text": task.prompt, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                                            "custom_params": custom}}
        status, body = post_generate(server.port, payload, timeout=1800)
        flush_cache(server.url)
        row = {"name": name, "mode": custom.get("kv_prefill_compression", "none"), "status": status}
        if status == 200:
            out = json.loads(body)
            rep = (out["meta_info"].get("kv_compression") or [None])[0] or {}
            text = out["text"].strip()
            row.update(answer=text.splitlines()[0] if text else "", right=task.answer in text,
                       prompt_tokens=out["meta_info"]["prompt_tokens"], peak_slots=rep.get("peak_slots"),
                       slots_held=rep.get("slots_held"), selections=rep.get("chunk_selections"),
                       bound=peak_bound(budget, WINDOW, chunk))
        else:
            row["refusal"] = _message(body)
        rows.append(row)
    return rows


def _message(body: str) -> str:
    """SGLang's error message out of its JSON error body."""
    try:
        err = json.loads(body)
        err = err.get("error", err) if isinstance(err, dict) else err
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except ValueError:
        return body


def long_table(rows: list[dict], n_tokens: int, pool: int, passkey: str) -> Table:
    table = Table(title=f"A prompt longer than the pool: passkey {passkey} in a {n_tokens}-token prompt, "
                        f"KV pool {pool} tokens", title_justify="left")
    table.add_column("KV cache", no_wrap=True)
    for column in ("outcome", "peak slots", "held after"):
        table.add_column(column, justify="left" if column == "outcome" else "right")
    for r in rows:
        if r["status"] == 200:
            verdict = "[green]right[/green]" if r["right"] else "[red]wrong[/red]"
            outcome = f"answered {r['answer'][:16]!r} ({verdict})"
            peak = "-" if r["peak_slots"] is None else f"{r['peak_slots']} (bound {r['bound']})"
            held = "-" if r["slots_held"] is None else str(r["slots_held"])
        else:
            m = re.search(r"Input length \((\d+) tokens\) exceeds the maximum allowed length \((\d+) tokens\)", r["refusal"])
            first = f"{m[1]} tokens > {m[2]} allowed" if m else r["refusal"].split(". ")[0]
            hint = ", names kv_prefill_compression" if "kv_prefill_compression" in r["refusal"] else ""
            outcome, peak, held = f"refused (HTTP {r['status']}): {first}{hint}", "-", "-"
        table.add_row(r["name"], outcome, peak, held)
    return table
