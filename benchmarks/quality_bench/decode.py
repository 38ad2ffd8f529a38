"""Quality of compression during decode (``--decode-compression``): long generations on one server.

Every configuration sends the long-generation samples of :mod:`.decode_tasks` (``copy``,
``fidelity``, ``loops``) to one compressing server (``--kv-policy lava``; every setting chosen per
request with ``sampling_params.custom_params``), a configuration's samples concurrently, greedy:

* ``none``: ``kv_policy none``, the full cache, the reference of ``fidelity`` and ``loops``;
* ``<policy>@<B>`` (*after*): the prompt compressed to ``kv_budget`` B after prefill, the output not;
* ``<policy>@<B> N=<n>``: the same prompt budget B, and every D generated tokens past N the
  request's private history is selected back to N (``kv_decode_budget`` n, ``kv_decode_interval`` D).

All compressed configurations share one prompt budget B (``--decode-prompt-budget``), so a
decode configuration differs from *after* only by compression during decode. The radix cache is
flushed before every configuration: a ``none`` request publishes its prompt, and a compressed
request that matched it would keep that prefix whole (a shared prefix is never compressed).

Before the grid means anything the full cache must do each task (:data:`SANITY`): ``copy`` and
``loops`` pass when the full cache's mean reaches the threshold; ``fidelity`` is the full cache's
own output. ``none`` runs first; the compressed configurations run only the tasks that pass, and
the markdown reports only those (and says which did not, with the full cache's score).

Writes ``decode.json`` (every output's token ids, scores and compression report; ``--resume``
reads it and runs only the missing configuration/task pairs) and ``decode.md`` under ``--out``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.quality_bench.decode_tasks import DECODE_TASKS, copy_score, distinct_ngrams, make_long_samples
from benchmarks.quality_bench.metrics import fidelity

RESULT, MARKDOWN = "decode.json", "decode.md"
# task -> (metric of the full cache, the least mean that counts as doing the task)
SANITY = {"copy": ("copy", 0.8), "loops": ("distinct4", 0.8)}
PRIMARY = {"copy": "copy", "fidelity": "token_match", "loops": "distinct4"}  # per task, higher is better
REPORT_FIELDS = ("slots_held", "private_slots", "shared_prefix_tokens", "decode_selections", "decode_peak_slots",
                 "decode_private_slots", "decode_compression_ms_total")
# two-sided 95% quantiles of Student's t, by degrees of freedom (beyond 30: the normal's)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def spread(values: list) -> dict:
    """n, mean, sample std and the 95% confidence half-width of the mean (Student's t)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    t = T975[len(xs) - 2] if 1 < len(xs) <= len(T975) + 1 else 1.96
    return {"n": len(xs), "mean": statistics.fmean(xs), "std": std, "ci95": t * std / len(xs) ** 0.5}


def plan(policies, prompt_budget: int, decode_budgets, interval: int) -> list[tuple[str, dict]]:
    """(run key, custom_params): ``none``, then per policy *after* and every decode budget."""
    out = [("none", {"kv_policy": "none"})]
    for p in (p for p in policies if p != "none"):
        after = {"kv_policy": p, "kv_budget": prompt_budget}
        out.append((f"{p}@{prompt_budget}", after))
        out += [(f"{p}@{prompt_budget} N={n}", {**after, "kv_decode_budget": n, "kv_decode_interval": interval})
                for n in decode_budgets]
    return out


def peak_slots(rec: dict):
    """The most KV slots a request held for itself: its decode peak when it was compressed during
    decode, else its kept prompt (or its whole prompt, uncompressed) plus everything it generated."""
    rep = rec.get("kv_compression") or {}
    if rep.get("decode_peak_slots") is not None:
        return rep["decode_peak_slots"]
    held = rep.get("private_slots") if rep else rec.get("prompt_tokens")
    return None if held is None else held + rec["output_tokens"]


def _git(*argv) -> str:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, timeout=30,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class DecodeStudy:
    """The study of one command line: ``runs`` (run key -> run with its records), run on a server
    by :meth:`run`, written by :meth:`save`."""

    def __init__(self, args, tok, corpus, fid_corpus, out_dir: Path, command: str, started: float):
        self.args, self.tok, self.out_dir, self.command, self.started = args, tok, Path(out_dir), command, started
        self.samples = make_long_samples(args.decode_tasks, args.decode_samples, tok, corpus, fid_corpus, args.seed,
                                         args.decode_prompt_tokens, args.decode_output_tokens, args.copy_tokens)
        self.plan = plan(args.policies, args.decode_prompt_budget, args.decode_budgets, args.decode_interval)
        self.runs: dict = {}
        self.server_flags: list = []  # of the server the runs were sent to (kept by --resume)
        self.complete = False
        self.seconds_before = 0.0  # the wall time of the runs an earlier command did (--resume)
        if args.resume and (self.out_dir / RESULT).is_file():
            self._resume(json.loads((self.out_dir / RESULT).read_text()))

    def _resume(self, previous: dict) -> None:
        """Keep the records of an earlier run whose sample is the same prompt as this one's."""
        mine = {(s.task, s.seed): s.to_dict()["prompt_sha1"] for s in self.samples}
        theirs = {(s["task"], s["seed"]): s["prompt_sha1"] for s in previous["samples"]}
        kept = 0
        for key, run in previous["runs"].items():
            recs = [r for r in run["records"] if mine.get((r["task"], r["seed"])) == theirs.get((r["task"], r["seed"]))]
            if recs:
                self.runs[key] = dict(run, records=recs)
                kept += len(recs)
        self.server_flags = previous["config"].get("server_flags") or []
        self.command = f"{previous['command']} ; resumed with: {self.command}"
        self.seconds_before = previous.get("total_s", 0.0)
        print(f"[decode] --resume: {kept} records from {self.out_dir / RESULT}", flush=True)

    # --- running ------------------------------------------------------------------------------
    def _one(self, server, s, custom: dict, key: str) -> dict:
        t0 = time.perf_counter()
        out = server.generate(s.prompt, max_new_tokens=s.max_new_tokens,
                              sampling_params={"ignore_eos": s.ignore_eos, "custom_params": dict(custom)})
        seconds = time.perf_counter() - t0
        meta = out.get("meta_info", {})
        report = (meta.get("kv_compression") or [None])[0] or {}
        ids = out.get("output_ids") or []
        rec = {"task": s.task, "seed": s.seed, "output_ids": ids, "output_tokens": len(ids),
               "text_head": out.get("text", "")[:160], "finish_reason": (meta.get("finish_reason") or {}).get("type"),
               "prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens"),
               "seconds": round(seconds, 2), "kv_compression": {k: report.get(k) for k in REPORT_FIELDS} if report else None,
               "distinct4": distinct_ngrams(ids, 4)}
        if s.task == "copy":
            rec["copy"] = copy_score(s.reference_ids, ids)
        print(f"  [{key}] {s.task} seed={s.seed} {seconds:.0f}s {len(ids)} tokens"
              + (f" copy={rec['copy']:.2f}" if "copy" in rec else f" d4={rec['distinct4']:.2f}")
              + (f" selections={report.get('decode_selections')} peak={report.get('decode_peak_slots')}"
                 if report.get("decode_selections") is not None else ""), flush=True)
        return rec

    def run(self, connect) -> dict:
        """Every configuration of the plan whose samples are not all done yet, one after another,
        each one's samples ``--decode-concurrency`` at a time; the result is saved after each.
        ``connect()`` returns ``(server, its flags)``, called once there is something to run."""
        server = None
        for key, custom in self.plan:
            done = {(r["task"], r["seed"]) for r in self.runs.get(key, {}).get("records", [])}
            todo = [s for s in self.samples if (s.task, s.seed) not in done]
            if key != "none":  # only the tasks the full cache does (decided once none has run)
                passed = {t for t, v in self.sanity(self.summary()).items() if v["passed"]}
                todo = [s for s in todo if s.task in passed]
            if not todo:
                continue
            if server is None:
                server, flags = connect()
                self.server_flags = list(flags or [])
            server.flush_cache()  # nothing published by a `none` request may be reused as a prefix
            print(f"[decode] {key}: {len(todo)} samples {custom}", flush=True)
            t0 = time.time()
            with ThreadPoolExecutor(max(1, min(self.args.decode_concurrency, len(todo)))) as pool:
                records = list(pool.map(lambda s: self._one(server, s, custom, key), todo))
            run = self.runs.setdefault(key, {"custom_params": custom, "records": [], "seconds": 0.0})
            run["records"] += records
            run["seconds"] = round(run["seconds"] + time.time() - t0, 1)
            self.save()
        return self.save()

    # --- the result -----------------------------------------------------------------------------
    def _score(self) -> None:
        """Fidelity of every run's fidelity records against ``none`` and against its own policy's
        *after* run (the same prompt compression, output not compressed)."""
        by = lambda key: {(r["task"], r["seed"]): r for r in self.runs.get(key, {}).get("records", [])}  # noqa: E731
        none = by("none")
        for key, run in self.runs.items():
            after = by(key.split(" ")[0]) if " N=" in key else {}
            for r in run["records"]:
                if r["task"] != "fidelity":
                    continue
                for suffix, ref in (("", none.get((r["task"], r["seed"]))), ("_vs_after", after.get((r["task"], r["seed"])))):
                    if ref is not None:
                        f = fidelity(ref["output_ids"], [], r["output_ids"], [])
                        r["token_match" + suffix] = f["token_match"]
                        r["first_divergence" + suffix] = (f["first_divergence"] if f["first_divergence"] is not None
                                                          else len(ref["output_ids"]))
            for r in run["records"]:
                ref = none.get((r["task"], r["seed"]))
                r["distinct4_vs_none"] = r["distinct4"] - ref["distinct4"] if ref else None

    def summary(self) -> dict:
        """Per run and task: the spread of every metric, the decode selections and peak slots."""
        out = {}
        for key, run in self.runs.items():
            out[key] = {}
            for task in self.args.decode_tasks:
                rs = [r for r in run["records"] if r["task"] == task]
                if not rs:
                    continue
                cell = {m: spread([r.get(m) for r in rs]) for m in
                        ("copy", "token_match", "first_divergence", "token_match_vs_after", "first_divergence_vs_after",
                         "distinct4", "distinct4_vs_none") if any(r.get(m) is not None for r in rs)}
                divs = [r["first_divergence"] for r in rs if r.get("first_divergence") is not None]
                if divs:
                    cell["first_divergence"]["median"] = statistics.median(divs)
                reps = [r["kv_compression"] or {} for r in rs]
                cell["decode_selections"] = spread([x.get("decode_selections") for x in reps])
                cell["peak_private_slots_max"] = max((p for p in map(peak_slots, rs) if p is not None), default=None)
                cell["shared_prefix_records"] = sum(1 for x in reps if x.get("shared_prefix_tokens"))
                out[key][task] = cell
        return out

    def sanity(self, summary: dict) -> dict:
        """The full-cache check of every task (``fidelity`` passes: it is the full cache's output)."""
        out = {}
        for task in self.args.decode_tasks:
            if task not in summary.get("none", {}):
                continue
            if task not in SANITY:
                out[task] = {"metric": "token_match", "full_cache": 1.0, "threshold": None, "passed": True}
                continue
            metric, threshold = SANITY[task]
            mean = summary["none"][task][metric]["mean"]
            out[task] = {"metric": metric, "full_cache": mean, "std": summary["none"][task][metric]["std"],
                         "threshold": threshold, "passed": mean is not None and mean >= threshold}
        return out

    def paired(self) -> dict:
        """Sample by sample on each task's primary metric: every decode run against its policy's
        *after*, and every other policy against lava in the same configuration: [higher, same, lower]."""
        by = lambda key: {(r["task"], r["seed"]): r for r in self.runs.get(key, {}).get("records", [])}  # noqa: E731

        def count(a_key, b_key):
            a, b = by(a_key), by(b_key)
            res = {}
            for task in self.args.decode_tasks:
                m, c = PRIMARY[task], [0, 0, 0]
                for k, r in a.items():
                    o = b.get(k)
                    if k[0] == task and o is not None and r.get(m) is not None and o.get(m) is not None:
                        c[0 if r[m] > o[m] + 1e-12 else 1 if abs(r[m] - o[m]) <= 1e-12 else 2] += 1
                if sum(c):
                    res[task] = c
            return res

        out = {}
        for key in self.runs:
            if " N=" in key and key.split(" ")[0] in self.runs:
                out[f"{key} vs {key.split(' ')[0]}"] = count(key, key.split(" ")[0])
            policy, _, rest = key.partition("@")
            other = f"lava@{rest}"
            if key != "none" and policy != "lava" and other in self.runs:
                out[f"{other} vs {key}"] = count(other, key)
        return out

    def save(self) -> dict:
        self._score()
        summary = self.summary()
        a = self.args
        result = {
            "command": self.command, "complete": self.complete,
            "config": {"tasks": list(a.decode_tasks), "samples": a.decode_samples, "seed": a.seed,
                       "policies": [p for p in a.policies if p != "none"], "prompt_budget": a.decode_prompt_budget,
                       "decode_budgets": list(a.decode_budgets), "interval": a.decode_interval,
                       "decode_budgets_run": sorted({int(k.rpartition("N=")[2]) for k in self.runs if " N=" in k}),
                       "fidelity_prompt_tokens": a.decode_prompt_tokens, "output_tokens": a.decode_output_tokens,
                       "copy_tokens": a.copy_tokens, "concurrency": a.decode_concurrency,
                       "server_flags": self.server_flags, "core": getattr(a, "core", None),
                       "plan": [key for key, _ in self.plan], "sanity_thresholds": SANITY},
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "affinity": sorted(os.sched_getaffinity(0)), "load_average_at_save": os.getloadavg(),
                        "commit": _git("rev-parse", "HEAD"), "engine_uncommitted": _git("status", "--porcelain",
                                                                                      "lava_sglang").splitlines()},
            "samples": [s.to_dict() for s in self.samples],
            "sanity": self.sanity(summary), "summary": summary, "paired": self.paired(),
            "runs": self.runs, "total_s": round(self.seconds_before + time.time() - self.started, 1),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / RESULT).write_text(json.dumps(result, separators=(",", ":")) + "\n")
        (self.out_dir / MARKDOWN).write_text(markdown(result))
        return result


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------

def _fmt(cell: dict, metric: str, scale: float = 100.0, digits: int = 1) -> str:
    s = (cell or {}).get(metric)
    if not s or s["mean"] is None:
        return "-"
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} (±{s['ci95'] * scale:.{digits}f})"


def markdown(result: dict) -> str:
    c, summary, sanity = result["config"], result["summary"], result["sanity"]
    tasks = [t for t in c["tasks"] if sanity.get(t, {}).get("passed")]
    lines = ["# Quality of compression during decode", "", f"Command: `{result['command']}`", "",
             f"One server (`{' '.join(c['server_flags'])}`), every setting per request; {c['samples']} samples per "
             f"task, greedy. Prompt budget B = {c['prompt_budget']} for every compressed configuration (`after`: the "
             f"prompt compressed to B after prefill, the output not; `N=n`: the same, and every D = {c['interval']} "
             f"generated tokens past n the private history is selected back to n). Machine: {result['machine']['processor'] or result['machine']['platform']}, "
             f"{result['machine']['cpus']} CPUs, this process on cores {result['machine']['affinity']}"
             + (f", server pinned to core {c['core']}" if c.get("core") is not None else "")
             + f"; commit {result['machine']['commit'][:10]}"
             + (" (engine files with uncommitted changes)" if result["machine"]["engine_uncommitted"] else "")
             + f"; {result['total_s'] / 60:.0f} min.", ""]
    if not result["complete"]:
        lines += ["**Partial run**: stopped before every configuration ran; missing rows are absent.", ""]
    lines += ["## The full cache on each task", "", "| task | metric | full cache (mean ± std) | threshold | reported |",
              "|---|---|---|---|---|"]
    for task, s in sanity.items():
        full = "-" if s["full_cache"] is None else f"{s['full_cache']:.3f}" + (f" ± {s['std']:.3f}" if s.get("std") is not None else "")
        lines.append(f"| {task} | {s['metric']} | {full} | {s['threshold'] if s['threshold'] is not None else '(reference)'} | "
                     f"{'yes' if s['passed'] else 'no: the full cache fails it'} |")
    lines += ["", "## Results", "",
              "Cells: mean ± std (± 95% CI half-width, Student's t) over the samples, in %. `copy`: share of the "
              "passage's tokens reproduced in order. `fidelity`: share of the full cache's 512 greedy tokens reproduced "
              "position by position, the first divergence (median token index; mean ± std), and the same against "
              "`after` of the same policy (decode compression alone). `loops`: distinct-4-gram ratio. `peak`: the most "
              "KV slots a request held for itself, max over the samples (compressed during decode: its reported "
              "`decode_peak_slots`; otherwise its kept prompt, or whole prompt, plus its output); `sel.`: decode "
              "selections per request (mean).", ""]
    head = ["configuration"]
    for t in tasks:
        head += {"copy": ["copy %"], "fidelity": ["fidelity: token match %", "first divergence: median / mean",
                                                  "vs after: token match %"],
                 "loops": ["loops: distinct-4 %", "distinct-4 − full cache"]}[t]
    head += ["n", "peak", "sel."]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in summary.items():
        cells = [key if key != "none" else "none (full cache)"]
        for t in tasks:
            cell = row.get(t)
            if t == "copy":
                cells.append(_fmt(cell, "copy"))
            elif t == "fidelity":
                fd = (cell or {}).get("first_divergence")
                cells += [_fmt(cell, "token_match"),
                          "-" if not fd or fd["mean"] is None else f"{fd.get('median', 0):.0f} / {fd['mean']:.0f} ± {fd['std']:.0f}",
                          _fmt(cell, "token_match_vs_after")]
            else:
                cells += [_fmt(cell, "distinct4"), _fmt(cell, "distinct4_vs_none")]
        ns = sorted({v.get(PRIMARY[t], {}).get("n") for t, v in row.items() if t in tasks} - {None})
        peaks = [v.get("peak_private_slots_max") for v in row.values() if v.get("peak_private_slots_max") is not None]
        sel = [v["decode_selections"]["mean"] for v in row.values() if v["decode_selections"]["mean"] is not None]
        cells += ["/".join(map(str, ns)) or "-", str(max(peaks)) if peaks else "-",
                  f"{statistics.fmean(sel):.1f}" if sel else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    shared = sum(v.get("shared_prefix_records", 0) for key, row in summary.items() if key != "none" for v in row.values())
    if shared:
        lines += ["", f"**Warning**: {shared} compressed records reused a cached prefix (left uncompressed)."]
    pairs = {k: v for k, v in result["paired"].items() if any(t in v for t in tasks)}
    if pairs:
        lines += ["", "## Sample by sample", "", "On each task's metric (copy share, fidelity token match, distinct-4): "
                  "how often the first configuration is higher / the same / lower than the second.", "",
                  "| comparison | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for k, v in pairs.items():
            lines.append(f"| {k} | " + " | ".join("/".join(map(str, v[t])) if t in v else "-" for t in tasks) + " |")
    lines += ["", "## Timings", ""] + [f"- {k}: {run['seconds']:.0f} s ({len(run['records'])} requests, "
                                       f"{sum(r['output_tokens'] for r in run['records'])} output tokens)"
                                       for k, run in result["runs"].items()]
    return "\n".join(lines) + "\n"


__all__ = ["DECODE_TASKS", "DecodeStudy", "markdown", "plan", "spread"]
