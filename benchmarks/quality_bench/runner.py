"""Quality benchmark: one invocation's runs, from the ``none`` reference to the reference check.

:class:`QualityRun` starts the servers (one per policy and budget, or one shared compressing
server with ``--per-request``), sends the samples through them (:mod:`.client`), keeps the runs
of earlier ``--merge`` / ``--resume`` sources, and writes the result, the markdown and the
plots after every run (:meth:`QualityRun.save`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from pathlib import Path

from benchmarks.quality_bench.client import RemoteServer, run_hf_reference, run_server_samples
from benchmarks.quality_bench.metrics import (AGNOSTIC, CHUNKED, ORDER, TOP_LOGPROBS, WINDOW, add_fidelity, reference_samples,
                                              run_key, same_outputs, small_window, summarize)
from benchmarks.quality_bench.plots import write_plots
from benchmarks.quality_bench.report import FULL_RESULT, read_full_result, write_markdown, write_result
from lava_sglang.launch import Server, http_json


class QualityRun:
    """The runs of one command line (``runs``: run key -> run, ``timings``: run key -> seconds) and
    how to add the missing ones. ``args`` are the parsed (and ``--quick``-adjusted) flags."""

    def __init__(self, args, protocols: list[str], model_path: str, tok, samples: list, corpus_dir, fid_dir,
                 command: str, started: float, out_dir: Path, decode=None):
        self.args, self.protocols, self.model_path, self.tok, self.samples = args, protocols, model_path, tok, samples
        self.corpus_dir, self.fid_dir, self.command, self.started, self.out_dir = (corpus_dir, fid_dir, command,
                                                                                   started, out_dir)
        self.base_flags = ["--max-total-tokens", str(args.max_total_tokens)] + shlex.split(args.server_args)
        if AGNOSTIC in protocols and "--enable-streaming-session" not in self.base_flags:
            self.base_flags.append("--enable-streaming-session")
        if CHUNKED in protocols and "--chunked-prefill-size" not in self.base_flags:
            self.base_flags += ["--chunked-prefill-size", str(args.chunk)]
        self.kv_budgets = (args.kvpress_budgets or args.budgets) if args.kvpress else []
        self.runs, self.timings, self.rows = {}, {}, []
        self.complete = False
        self.shared: dict = {}  # the --per-request server ("server") and its flags ("flags")
        self.merged_from: list = []
        self.decode = decode  # the compression-during-decode study (--decode-compression), a DecodeStudy

    # --- earlier runs -------------------------------------------------------------------------
    def merge(self, sources: list[Path], error) -> None:
        """Keep the runs of earlier ``--out`` directories (``--merge``, ``--resume``: the last source
        is ``out_dir``, which may hold nothing yet); ``error(message)`` refuses a source."""
        stored = json.loads(json.dumps([s.to_dict() for s in self.samples]))  # as stored (tuples -> lists)
        for src in sources:
            if not (src / FULL_RESULT).is_file():
                if src != self.out_dir:
                    error(f"--merge {src}: no {FULL_RESULT} there (written next to quality.json by every run)")
                continue
            previous = read_full_result(src)
            if previous["samples"] != stored:
                if src != self.out_dir:
                    error(f"--merge {src}: its samples differ from this command's (tasks, lengths, samples, seed, corpus)")
                print("[quality] --resume: the previous run used other samples; starting afresh", flush=True)
                continue
            for key, run in previous["runs"].items():
                if key in self.runs and ([r["output_ids"] for r in self.runs[key]["records"]]
                                         != [r["output_ids"] for r in run["records"]]):
                    raise SystemExit(f"[quality] {src}: run {key} differs from the same run in an earlier source")
                self.runs.setdefault(key, run)
            for key, seconds in previous["timings"]["runs"].items():
                self.timings[key if key not in self.timings else f"{key} ({src.name})"] = seconds
            self.merged_from.append({"dir": str(src), "command": previous["command"],
                                     "shared_server_flags": previous["config"].get("shared_server_flags")})
            print(f"[quality] from {src}: {', '.join(previous['runs'])}", flush=True)
        if self.merged_from:
            self.command = " ; ".join([m["command"] for m in self.merged_from] + ["merged and completed with: " + self.command])
            self.shared["flags"] = next((m["shared_server_flags"] for m in self.merged_from if m["shared_server_flags"]), None)

    # --- the result ---------------------------------------------------------------------------
    def _reference_rows(self, reference) -> list[dict]:
        """The reference check's table: HF none vs server none, and each press against our server."""
        rows = []
        for L in self.args.lengths:
            sel = lambda key: [r for r in self.runs[key]["records"] if r["n_tokens"] == L]  # noqa: E731
            if "hf-none" in self.runs:
                if reference is not None:  # on the reference check's samples
                    ref_keys = {(r["task"], r["seed"]) for r in sel("hf-none")}
                    rows.append({"length": L, "budget": None, "label": "server none",
                                 "summary": summarize([r for r in sel("none") if (r["task"], r["seed"]) in ref_keys])})
                same = same_outputs(sel("hf-none"), sel("none")) if reference is not None else None
                rows.append({"length": L, "budget": None, "label": "HF none", "summary": self.runs["hf-none"]["summary"][str(L)],
                             "same_ids": f"{same['identical']}/{same['of']} vs server none" if same else ""})
            for press in self.args.kvpress or []:
                for budget in self.kv_budgets:
                    a, b = f"{press}-avg@{budget}", f"kvpress-{press}@{budget}"
                    if a not in self.runs or b not in self.runs:
                        continue
                    same = same_outputs(sel(a), sel(b))
                    for key, label in ((a, f"server {press} --kv-pooling avg"), (b, f"kvpress {press}")):
                        rows.append({"length": L, "budget": budget, "label": label,
                                     "summary": self.runs[key]["summary"][str(L)], "same_ids": f"{same['identical']}/{same['of']}"})
        return rows

    def save(self) -> dict:
        """Write JSON, markdown and plots from what has run so far (after every run)."""
        args, runs = self.args, self.runs
        reference = runs.get("none") or runs.get(run_key("none", None, AGNOSTIC))
        for key, run in runs.items():
            base = runs.get("hf-none") if key.startswith("kvpress-") else reference
            if base is not None and key not in ("none", "hf-none"):
                add_fidelity(run["records"], base["records"])
            if key == "hf-none" and reference is not None:
                add_fidelity(run["records"], reference["records"])
            run["summary"] = {str(L): summarize([r for r in run["records"] if r["n_tokens"] == L]) for L in args.lengths}
        self.rows[:] = self._reference_rows(reference)
        ref_section = None
        if args.kvpress:
            import kvpress  # its version, for the report (loads torch: only when the reference check runs)

            ref_section = {"kvpress_version": getattr(kvpress, "__version__", "0.5.5"), "protocol": args.kvpress_protocol,
                           "presses": args.kvpress, "budgets": self.kv_budgets, "rows": list(self.rows),
                           "note": "fidelity of kvpress runs is measured against HF none, of server runs against server none"}
        done_budgets = sorted({r["budget"] for r in runs.values() if r.get("budget") and r.get("pooling") is None
                               and not str(r["policy"]).startswith(("kvpress", "hf"))}) or sorted(args.budgets)
        result = {
            "command": self.command.strip(),
            "complete": self.complete,
            "config": {"model": os.path.basename(str(self.model_path).rstrip("/")), "policies": args.policies,
                       "budgets": sorted(args.budgets), "budgets_run": done_budgets,
                       "lengths": args.lengths, "samples": args.samples, "tasks": args.tasks, "seed": args.seed,
                       "protocol": args.protocol, "protocols": self.protocols,
                       "agnostic_question": args.agnostic_question if AGNOSTIC in self.protocols else None,
                       "window": WINDOW,
                       "small_budget_windows": {str(b): small_window(b) for b in sorted(args.budgets) if b <= WINDOW},
                       "server_flags": self.base_flags,
                       "per_request": bool(args.per_request), "shared_server_flags": self.shared.get("flags"),
                       "merged_from": self.merged_from, "kvpress_samples": args.kvpress_samples or args.samples,
                       "corpus": str(self.corpus_dir) if self.corpus_dir else "synthetic",
                       "fidelity_corpus": str(self.fid_dir) if self.fid_dir else "synthetic", "top_logprobs": TOP_LOGPROBS},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average_at_end": os.getloadavg()},
            "samples": [s.to_dict() for s in self.samples],
            "runs": runs,
            "reference": ref_section,
            "timings": {"total_s": time.time() - self.started, "runs": dict(self.timings)},
        }
        write_result(result, self.out_dir)
        write_markdown(result, self.out_dir / "quality.md")
        write_plots(result, self.out_dir)
        return result

    # --- one server's runs --------------------------------------------------------------------
    def question_params(self, policy, custom):
        """custom_params of the query-agnostic question turn (see --agnostic-question)."""
        if policy == "none":
            return None  # a --kv-policy none server refuses kv_* keys
        return custom if self.args.agnostic_question == "reselect" else {"kv_policy": "none"}

    def serve(self, server, keys, policy, custom, run_samples):
        """Every protocol of ``keys`` (protocol -> run key) on one server: key -> (protocol, question
        custom params, records, seconds)."""
        out = {}
        for protocol, key in keys.items():
            t0 = time.time()
            qc = self.question_params(policy, custom) if protocol == AGNOSTIC else None
            sent = {**(custom or {}), "kv_prefill_compression": "chunked"} if protocol == CHUNKED else custom
            records = run_server_samples(server, run_samples, key, custom=sent, concurrency=self.args.concurrency,
                                         protocol=AGNOSTIC if protocol == AGNOSTIC else "query-aware", tok=self.tok,
                                         question_custom=qc)
            out[key] = (protocol, qc, records, time.time() - t0)
        return out

    def as_runs(self, done, policy, budget, flags, custom=None) -> dict:
        """Runs (run key -> run) from :meth:`serve`'s output; their seconds go to ``timings``."""
        runs_out = {}
        for key, (protocol, qc, records, seconds) in done.items():
            run = {"policy": policy, "budget": budget, "flags": flags}
            if custom is not None:
                run["custom_params"] = custom
            if protocol != "query-aware":
                run.update(protocol=protocol, question_custom_params=qc, agnostic_question=self.args.agnostic_question)
            run["records"] = records
            runs_out[key] = run
            self.timings[key] = self.timings.pop(key, 0.0) + seconds
        return runs_out

    def shared_server(self) -> Server:
        """The ``--per-request`` server (a compressing server at the largest budget), started once."""
        if "server" not in self.shared:
            t0 = time.time()
            base = self.base_flags + ["--kv-policy", "lava", "--kv-budget", str(max(self.args.budgets))]
            print(f"[quality] shared server (per-request settings): {' '.join(base)}", flush=True)
            self.shared["server"] = Server(self.model_path, base, core=self.args.core)
            self.shared["server"].start()
            self.shared["flags"] = base
            print(f"[quality]   up in {time.time() - t0:.0f} s", flush=True)
            self.timings["shared-server-start"] = time.time() - t0
        return self.shared["server"]

    def server_run(self, keys, policy, budget, extra=(), run_samples=None) -> dict:
        """``keys``: protocol -> run key; returns run key -> run."""
        run_samples = self.samples if run_samples is None else run_samples
        if budget is not None and budget <= WINDOW:
            # the budget includes the window and must exceed it: small budgets use half of it
            extra = list(extra) + ["--kv-window", str(small_window(budget))]
        flags = self.base_flags + ["--kv-policy", policy] + ([] if budget is None else ["--kv-budget", str(budget)]) + list(extra)
        if self.args.per_request and policy != "none":
            server = self.shared_server()
            custom = {"kv_policy": policy, "kv_budget": budget}
            it = iter(extra)
            for flag, value in zip(it, it):  # --kv-pooling avg -> kv_pooling
                custom[flag[2:].replace("-", "_")] = int(value) if str(value).isdigit() else value
            return self.as_runs(self.serve(server, keys, policy, custom, run_samples), policy, budget,
                                self.shared["flags"], custom)
        t0 = time.time()
        print(f"[quality] server {', '.join(keys.values())}: {' '.join(flags)}", flush=True)
        server = Server(self.model_path, flags, core=self.args.core)
        try:  # not ``with``: an interrupt during start-up must stop the server too
            server.start()
            started_in = time.time() - t0
            print(f"[quality]   up in {started_in:.0f} s", flush=True)
            done = self.serve(server, keys, policy, None, run_samples)
        finally:
            server.stop()
        first = next(iter(done))  # the server's start-up is counted in the first run's time
        done[first] = done[first][:3] + (done[first][3] + started_in,)
        return self.as_runs(done, policy, budget, flags)

    # --- the whole plan -----------------------------------------------------------------------
    def run_url(self, url: str) -> None:
        """``--url``: the samples through one running server (its policy and budget from /server_info)."""
        args = self.args
        info = http_json(url.rstrip("/") + "/server_info")
        kv = info.get("kv_compression") or {}
        policy, budget = kv.get("kv_policy", "none"), kv.get("kv_budget")
        keys = {protocol: run_key(policy, budget, protocol) for protocol in self.protocols}
        if args.decode_compression != "only":
            self.runs.update(self.as_runs(self.serve(RemoteServer(url), keys, policy, None, self.samples), policy, budget, []))
        if self.decode is not None:  # every setting per request: the server must have a policy
            self.decode.run(lambda: (RemoteServer(url), []))
        args.policies, args.budgets = [policy], ([budget] if budget and policy != "none" else args.budgets)

    def run_all(self) -> None:
        """None first (the reference), then budget by budget in the order given, every policy; then
        the reference check. Results are saved after every run; runs already done (--resume,
        --merge) are skipped. The query-aware none always runs: it is the fidelity reference of
        both protocols. Then the decode study (``--decode-compression``; alone with ``only``)."""
        args = self.args
        try:
            if args.decode_compression != "only":
                self.prompt_runs()
            if self.decode is not None:  # on the per-request server (started here when nothing else ran)
                self.decode.run(lambda: (self.shared_server(), self.shared["flags"]))
        finally:
            if "server" in self.shared:
                self.shared["server"].stop()

    def prompt_runs(self) -> None:
        """Every policy and budget of the prompt-compression benchmark, then the reference check."""
        args = self.args
        for policy, budget in [("none", None)] + [(p, b) for b in args.budgets for p in args.policies if p != "none"]:
            if policy not in args.policies:
                continue
            wanted = set(self.protocols) - ({CHUNKED} if policy == "none" else set())  # none: nothing to chunk
            wanted = sorted(wanted | ({"query-aware"} if policy == "none" else set()), key=ORDER.index)
            keys = {pr: run_key(policy, budget, pr) for pr in wanted if run_key(policy, budget, pr) not in self.runs}
            if keys:
                self.runs.update(self.server_run(keys, policy, budget))
                self.save()
        self.reference_check()

    def reference_check(self) -> None:
        """HF + kvpress on the reference samples, then our server with ``--kv-pooling avg`` on them."""
        args = self.args
        ref_samples = reference_samples(self.samples, args.kvpress_samples, args.seed)
        # the server's window at each budget (budgets <= the window use half of it)
        hf_modes = {key: (mode, budget, small_window(budget) if 0 < budget <= WINDOW else WINDOW)
                    for key, mode, budget in
                    [("hf-none", "none", 0)] + [(f"kvpress-{p}@{b}", f"kvpress-{p}", b) for b in self.kv_budgets
                                                for p in args.kvpress or []]
                    if key not in self.runs}
        if self.kv_budgets and any(key != "hf-none" for key in hf_modes):
            from benchmarks.kvpress_reference import load_hf  # torch + kvpress: only for the reference check

            t0 = time.time()
            model, _ = load_hf(self.model_path, args.threads)
            print(f"[quality] HF + kvpress reference on {len(ref_samples)} samples: {', '.join(hf_modes)}", flush=True)
            hf_records = run_hf_reference(model, self.tok, ref_samples, hf_modes, args.kvpress_protocol)
            for key, (mode, budget, window) in hf_modes.items():
                self.runs[key] = {"policy": key.partition("@")[0], "budget": budget or None, "window": window,
                                  "protocol": args.kvpress_protocol, "records": hf_records[key]}
            self.timings["hf-reference (" + ", ".join(hf_modes) + ")"] = time.time() - t0
            self.save()
        for budget in self.kv_budgets:
            for press in args.kvpress:
                key = f"{press}-avg@{budget}"
                if key not in self.runs:
                    self.runs.update(self.server_run({"query-aware": key}, press, budget, ["--kv-pooling", "avg"],
                                                     run_samples=ref_samples))
                    self.runs[key]["pooling"] = "avg"
                    self.save()
