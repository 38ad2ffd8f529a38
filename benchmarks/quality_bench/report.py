"""Quality benchmark: the result files (``quality.json``, ``quality_full.json.gz``) and ``quality.md``.

Tables per prompt length and protocol (summary, per task, protocols side by side, quality per
KV memory), the kvpress reference check, and the timings.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Optional

from benchmarks.quality_bench.metrics import (AGNOSTIC, TOP_LOGPROBS, add_fidelity, memory_rows, paired, protocol_of,
                                              run_key, same_outputs, summarize, summary_row)

FULL_RESULT = "quality_full.json.gz"


def hf_reference_section(path: Path, runs: dict) -> dict:
    """Side-by-side from a separate ``benchmarks/kvpress_reference.py --out`` run on the same samples.

    Pairs: ``HF none`` vs ``server none`` (the two engines, no compression); ``ours-<p>:max``
    (our selection on the HF cache) vs ``server <p>@B`` (same algorithm, our SGLang engine);
    ``kvpress-snapkv`` vs ``ours-snapkv:avg`` (same algorithm, kvpress's code vs ours, both in HF)."""
    data = json.loads(Path(path).read_text())
    by_mode: dict[str, list] = {}
    for r in data["records"]:
        by_mode.setdefault(r["mode"], []).append(r)
    hf_none = by_mode.get("none", [])
    rows = []
    for mode, recs in by_mode.items():
        if mode != "none":
            add_fidelity(recs, hf_none)
        budget = recs[0]["budget"] if mode != "none" else None
        name, _, pooling = mode.partition(":")
        pair_label, pair = "", None
        if mode == "none":
            pair_label, pair = "server none", (runs.get("none") or {}).get("records")
        elif name.startswith("ours-") and pooling == "max":
            key = f"{name[5:]}@{budget}"
            pair_label, pair = f"server {key}", (runs.get(key) or {}).get("records")
        elif mode == "kvpress-snapkv":
            pair_label, pair = "HF ours-snapkv:avg", by_mode.get("ours-snapkv:avg")
        elif mode == "kvpress-adakv":
            pair_label, pair = "HF ours-adakv:avg", by_mode.get("ours-adakv:avg")
        same = ""
        if pair:
            done = {(r["task"], r["seed"]) for r in pair}
            mine = [r for r in recs if (r["task"], r["seed"]) in done]
            x = same_outputs(mine, pair)
            same = f"{x['identical']}/{x['of']} vs {pair_label}"
        rows.append({"length": recs[0]["n_tokens"], "budget": budget, "label": f"HF {mode}", "summary": summarize(recs),
                     "same_ids": same})
    return {"source": str(path), "command": data.get("command"), "rows": rows}


def _cell(summary: Optional[dict], task: str) -> str:
    if summary is None or task not in summary:
        return "-"
    v = summary[task]
    if "accuracy" in v:
        return f"{v['accuracy']:.0f}" if not math.isnan(v["accuracy"]) else "-"
    return f"{v['token_match']:.0f} / {v['kl']:.3f}"


def result_protocols(result: dict) -> list[str]:
    """The server protocols of a result (files written before the field: query-aware)."""
    return result["config"].get("protocols") or [result["config"].get("protocol") or "query-aware"]


def _summary_lines(result: dict, length: int, protocol: str = "query-aware") -> list[str]:
    """One compact table (tasks mean / fidelity % / KL per policy and budget, best per budget in
    bold) and LAVa against every baseline, sample by sample, for one protocol."""
    runs, budgets = result["runs"], result["config"]["budgets"]
    policies = result["config"]["policies"]
    key = lambda p, b: run_key(p, b, protocol)  # noqa: E731
    vals = {(p, b): summary_row((runs.get(key(p, b)) or {}).get("summary", {}).get(str(length)))
            for p in policies for b in budgets}
    best = {}
    for b in budgets:
        comp = [vals[(p, b)] for p in policies if p != "none"]
        for i, pick in ((0, max), (1, max), (2, min)):
            col = [v[i] for v in comp if not math.isnan(v[i])]
            best[(b, i)] = pick(col) if col else None

    def fmt(v, b, i):
        if math.isnan(v):
            return "-"
        text = f"{v:.3f}" if i == 2 else f"{v:.0f}"
        return f"**{text}**" if best[(b, i)] is not None and text == (f"{best[(b, i)]:.3f}" if i == 2 else f"{best[(b, i)]:.0f}") else text

    lines = ["| policy | " + " | ".join(f"b={b}: tasks mean / fidelity % / KL" for b in budgets) + " |",
             "|" + "---|" * (len(budgets) + 1)]
    for p in policies:
        cells = [" / ".join(fmt(v, b, i) if p != "none" else ("-" if math.isnan(v) else (f"{v:.3f}" if i == 2 else f"{v:.0f}"))
                            for i, v in enumerate(vals[(p, b)])) for b in budgets]
        lines.append(f"| {'none (full cache)' if p == 'none' else p} | " + " | ".join(cells) + " |")
    lines.append("")
    if "lava" in policies:
        lines += ["LAVa against each baseline on the same prompts, sample by sample: scored tasks "
                  "`lava higher / same / lower`, then fidelity KL `lava lower / same / higher`.", "",
                  "| baseline | " + " | ".join(f"b={b}" for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
        for p in policies:
            if p in ("none", "lava"):
                continue
            cells = []
            for b in budgets:
                a, o = runs.get(key("lava", b)), runs.get(key(p, b))
                if not a or not o:
                    cells.append("-")
                    continue
                a_recs = [r for r in a["records"] if r["n_tokens"] == length]
                x = paired(a_recs, [r for r in o["records"] if r["n_tokens"] == length])
                cells.append(f"tasks {'/'.join(map(str, x['score']))}; KL {'/'.join(map(str, x['kl']))}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _protocol_lines(result: dict, length: int) -> list[str]:
    """Policy x protocol side by side: tasks mean / fidelity % / KL / mean slots held per budget,
    and the query-agnostic runs' session checks."""
    runs, budgets, policies = result["runs"], result["config"]["budgets"], result["config"]["policies"]
    protocols = result_protocols(result)
    lines = ["| policy | protocol | " + " | ".join(f"b={b}: tasks mean / fidelity % / KL / slots held" for b in budgets)
             + " |", "|" + "---|" * (len(budgets) + 2)]
    for p in policies:
        for protocol in (["query-aware"] + [x for x in protocols if x != "query-aware"] if p == "none" else protocols):
            cells = []
            for b in budgets:
                run = runs.get(run_key(p, b, protocol))
                summary = run["summary"].get(str(length)) if run else None
                acc, tm, kl = summary_row(summary)
                slots = (summary or {}).get("mean", {}).get("slots_held", float("nan"))
                cells.append(" / ".join("-" if math.isnan(v) else f.format(v)
                                        for v, f in ((acc, "{:.0f}"), (tm, "{:.0f}"), (kl, "{:.3f}"), (slots, "{:.0f}"))))
            if p == "none" and all(c.startswith("-") for c in cells):
                continue
            lines.append(f"| {'none (full cache)' if p == 'none' else p} | {protocol} | " + " | ".join(cells) + " |")
    lines.append("")
    agn = [r for key, run in runs.items() if protocol_of(run) == AGNOSTIC and not key.startswith(("hf", "kvpress"))
           for r in run["records"] if r["n_tokens"] == length]
    if agn:
        cached = sum(1 for r in agn if r.get("cached_tokens") == r.get("context_tokens"))
        exact = sum(1 for r in agn if r.get("context_split_exact"))
        continued = [r for r in agn if r.get("kv_compression")]
        cont_ok = sum(1 for r in continued if (r.get("kv_compression_question") or {}).get("continued"))
        resel = sum(1 for r in continued if (r.get("kv_compression_question") or {}).get("reselected"))
        lines += [f"Query-agnostic sessions ({len(agn)} question turns): `cached_tokens` = the context's length in "
                  f"{cached}; the context turn ends exactly at the end of the context text in {exact} (else a token "
                  f"straddles the boundary and goes with the context, or the sample has no question -- fidelity -- and "
                  f"its last token is the question turn); of the {len(continued)} whose context turn "
                  f"was compressed, the question turn reported `continued` in {cont_ok} and re-selected the history in "
                  f"{resel}.", ""]
    return lines


def _memory_lines(result: dict, length: int, protocol: str = "query-aware") -> list[str]:
    """Quality against the mean KV slots a request held (:func:`memory_rows`), one row per policy and budget."""
    rows = memory_rows(result, length, protocol)
    if not rows:
        return []
    fmt = lambda v, f: "-" if v is None or math.isnan(v) else f.format(v)  # noqa: E731
    lines = [f"## Quality per KV memory, {length}-token prompts" + (f", {protocol}" if protocol != "query-aware" else ""),
             "", "`slots held, recorded`: mean KV slots of a request's row once compressed, as the engine packed them "
             "when the run was recorded (before exact packing across layers a request held `max_l ceil(cells_l / "
             "Hkv)` private slots, so the dynamic-layer-budget policies, pyramidkv and lava, held more than uniform "
             "ones at the same budget); `exact packing`: `shared_prefix_tokens + ceil(kept_cells / (n_layers x "
             "n_kv_heads))` from each record's compression report, what the engine holds now. A prompt that was not "
             "compressed counts its length in both. `tasks mean` / fidelity % / KL as in the summary; plot: "
             "`quality_memory.png`.", ""]
    if any(r["exact_slots_held"] is None for r in rows):
        lines += ["Some records keep no `kept_cells` in their compression report: their exact-packing cell is `-` "
                  "(recorded slots only).", ""]
    lines += ["| policy | budget | tasks mean | fidelity % | KL | slots held, recorded | slots held, exact packing |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'none (full cache)' if r['policy'] == 'none' else r['policy']} | {r['budget'] or '-'} | "
                     f"{fmt(r['accuracy'], '{:.0f}')} | {fmt(r['token_match'], '{:.0f}')} | {fmt(r['kl'], '{:.3f}')} | "
                     f"{fmt(r['slots_held'], '{:.1f}')} | {fmt(r['exact_slots_held'], '{:.1f}')} |")
    return lines + [""]


def write_result(result: dict, out_dir: Path) -> None:
    """``quality.json`` without the per-step top-k logprobs (a few MB, the readable result) and
    the whole result gzipped in :data:`FULL_RESULT` (what ``--resume`` / ``--merge`` read)."""
    (out_dir / FULL_RESULT).write_bytes(gzip.compress(json.dumps(result, separators=(",", ":")).encode(), mtime=0))
    slim = dict(result, runs={key: dict(run, records=[{k: v for k, v in r.items() if k != "top_logprobs"}
                                                     for r in run["records"]])
                              for key, run in result["runs"].items()})
    (out_dir / "quality.json").write_text(json.dumps(slim, indent=1))


def read_full_result(out_dir: Path) -> dict:
    return json.loads(gzip.decompress((out_dir / FULL_RESULT).read_bytes()))


def write_markdown(result: dict, path: Path) -> None:
    runs, budgets, tasks = result["runs"], result["config"]["budgets"], result["config"]["tasks"]
    protocols = result_protocols(result)
    windows = (f"{result['config']['window']} tokens"
               + "".join(f"; {w} at budget {b}" for b, w in result["config"].get("small_budget_windows", {}).items()))
    described = {
        "query-aware": "**query-aware**: the whole prompt, question included, is compressed after prefill; the window "
                       f"is the prompt's last {windows}",
        AGNOSTIC: "**query-agnostic**: one streaming session per sample; the context alone is compressed (turn 1, "
                  f"`max_new_tokens` 0; the window is the context's last {windows}), then the question is sent as turn 2 "
                  "over the compressed cache and answers ("
                  + ("the question turn has the same `kv_*` settings: a question of at least a window's tokens "
                     "re-selects the history with itself as the window"
                     if result["config"].get("agnostic_question") == "reselect" else
                     "the question turn has `kv_policy` none: the question is appended and never compressed, as in "
                     "kvpress") + "; `fidelity` has no question: its last token is turn 2, so even the first "
                  "continuation step reads the compressed cache)",
        "chunked": ("`chunked`: the whole prompt in one request, compressed during chunked prefill "
                    "(`kv_prefill_compression: chunked`): after every prefill chunk the range so far is re-selected "
                    "with that chunk's last tokens as the window, so only the last selection sees the question"),
    }
    lines = [f"# Quality benchmark ({' and '.join(protocols)})", "",
             f"Command: `{result['command']}`", "",
             f"Model: {result['config']['model']}; prompt lengths (tokens): {result['config']['lengths']}; "
             f"samples per task and length: {result['config']['samples']}; greedy decoding; "
             f"server flags: `{' '.join(result['config']['server_flags'])}`. "
             + ("Protocol: " if len(protocols) == 1 else "Protocols: ") + "; ".join(described[x] for x in protocols)
            + (f". Wall time: {result['timings']['total_s'] / 60:.1f} min" if not result["config"].get("merged_from") else
               f". Merged from {len(result['config']['merged_from'])} runs (`--merge`; their commands above); "
               f"sum of the run times: {sum(result['timings']['runs'].values()) / 60:.0f} min")
            + f" (load average at the end {', '.join(f'{x:.1f}' for x in result['machine']['load_average_at_end'])}"
             f" on {result['machine']['cpus']} CPUs).", "",
             *([f"Runs: `--per-request`: one server started with `{' '.join(result['config']['shared_server_flags'] or ['(not started yet)'])}`, each "
                "policy/budget chosen per request with `sampling_params.custom_params` (`kv_policy`, `kv_budget`, "
                "`kv_pooling`); `none` on its own `--kv-policy none` server.", ""]
               if result["config"].get("per_request") else
               ["Runs: one server per policy and budget (`--kv-policy P --kv-budget B`).", ""]),
             *([] if result.get("complete") else [
                 "**Partial run**: the command was stopped before every run finished; missing cells are `-`.", ""]),
             "Accuracy in % (mean score x 100: exact answer for passkey/niah_single/niah_multikey, recall for "
             "niah_multivalue/vt/cwe). `fidelity`: % of the uncompressed server's greedy tokens reproduced / mean KL "
             f"(nats, from top-{TOP_LOGPROBS} logprobs) over the steps whose prefix still matches"
             + (", always against the query-aware `none` run (the full cache on the whole prompt)" if AGNOSTIC in protocols
                else "") + ". `none` has no budget (the same run repeated in every column).", ""]
    for length in result["config"]["lengths"]:
        if len(protocols) > 1:
            lines += [f"## Protocols side by side, {length}-token prompts", "",
                      "`tasks mean` / fidelity % / KL as below; `slots held`: mean KV slots of a request's row once "
                      "compressed (query-agnostic: after the context turn; a prompt that was not compressed counts its "
                      "length).", ""]
            lines += _protocol_lines(result, length)
        for protocol in protocols:
            lines += [f"## Summary, {length}-token prompts" + (f", {protocol}" if protocol != "query-aware" else ""), "",
                      "`tasks mean`: mean accuracy (%) of the scored tasks; fidelity % and KL from the fidelity task; "
                      "best compressed policy per budget in bold.", ""]
            lines += _summary_lines(result, length, protocol)
    for length in result["config"]["lengths"]:
        for protocol in protocols:
            lines += [f"## {length}-token prompts" + (f", {protocol}" if protocol != "query-aware" else ""), ""]
            header = "| task | policy | " + " | ".join(f"b={b}" for b in budgets) + " |"
            lines += [header, "|" + "---|" * (len(budgets) + 2)]
            for task in list(tasks) + ["mean"]:
                if task == "fidelity" and task not in tasks:
                    continue
                for policy in result["config"]["policies"]:
                    cells = []
                    for b in budgets:
                        run = runs.get(run_key(policy, b, protocol))
                        cells.append(_cell(run["summary"].get(str(length)) if run else None, task))
                    lines.append(f"| {task} | {policy} | " + " | ".join(cells) + " |")
            lines.append("")
    ref = result.get("reference")
    if ref:
        n_ref = result["config"].get("kvpress_samples") or result["config"]["samples"]
        lines += ["## Reference check: the same prompts through HF transformers + kvpress", "",
                  f"On the first {n_ref} samples of every task (of {result['config']['samples']}); every row of this "
                  "table, `server none` included, is scored on those samples only. "
                  f"kvpress {ref['kvpress_version']}, protocol {ref['protocol']}, one HF prefill per prompt shared by "
                  "every press and budget (each press compresses its own copy of the cache with kvpress's own hook); "
                  "our server with "
                  f"`--kv-pooling avg` (kvpress's SnapKV avg-pools; window {result['config']['window']}"
                  + "".join(f" ({w} at budget {b}, on both sides)" for b, w in result["config"].get("small_budget_windows", {}).items())
                  + ", kernel 7, "
                  "AdaKV alpha 0.2 -- kvpress's AdaKV floor is a different formula from the AdaKV/LAVa reference "
                  "code's, so adakv is only expected to be close). `HF none` vs `server none` checks the two engines "
                  "without compression. `same ids`: samples whose greedy output token ids are identical.", ""]
        lines += ["| length | budget | method | " + " | ".join(tasks) + " | mean | same ids vs pair |",
                  "|" + "---|" * (len(tasks) + 5)]
        for row in ref["rows"]:
            cells = [_cell(row["summary"], t) for t in tasks]
            lines.append(f"| {row['length']} | {row['budget'] if row['budget'] else '-'} | {row['label']} | "
                         + " | ".join(cells) + f" | {_cell(row['summary'], 'mean')} | {row.get('same_ids', '')} |")
        lines.append("")
    hf = result.get("hf_reference")
    if hf:
        lines += ["## Reference check: HF transformers + kvpress (separate run on the same prompts)", "",
                  f"Command: `{hf['command']}`", "",
                  "`HF ours-<policy>:max` is our engine-free selection applied to the HF cache (kvpress's head-wise key "
                  "masking): the same algorithm as the server's, in another engine. `HF kvpress-*` are kvpress's presses "
                  "(SnapKV avg-pools, so it pairs with `ours-snapkv:avg`; kvpress's AdaKV floor is its own formula). "
                  "Fidelity here is measured against HF none. `same ids`: greedy output token ids identical on the "
                  "same prompt.", "",
                  "| length | budget | method | " + " | ".join(tasks) + " | mean | same ids |",
                  "|" + "---|" * (len(tasks) + 5)]
        for row in hf["rows"]:
            cells = [_cell(row["summary"], t) for t in tasks]
            lines.append(f"| {row['length']} | {row['budget'] or '-'} | {row['label']} | " + " | ".join(cells)
                         + f" | {_cell(row['summary'], 'mean')} | {row['same_ids']} |")
        lines.append("")
    for length in result["config"]["lengths"]:
        for protocol in protocols:
            lines += _memory_lines(result, length, protocol)
    t = result["timings"]
    total = sum(t["runs"].values()) if result["config"].get("merged_from") else t["total_s"]
    lines += ["## Timings", "", f"Total {total:.0f} s" + (" (sum of the merged runs)" if result["config"].get("merged_from") else "")
              + "; per run (server start + requests; `hf-reference`: one HF prefill per sample for all its runs):", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in t["runs"].items()]
    lines.append("")
    path.write_text("\n".join(lines))
