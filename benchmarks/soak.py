"""Soak: a bounded, randomized load on a real LAVa server with the debug invariants on.

Starts its own server (``LAVA_SGLANG_DEBUG=1``: after every compression and every release the
scheduler asserts that no slot is both free and referenced and nothing is freed twice; small
``--chunked-prefill-size`` so long prompts are chunked; a small KV pool so the scheduler has to
retract), then runs ``--concurrency`` client threads for ``--seconds``. Each request draws:

* a prompt length class: short, around the budget, long, over the chunk size; sometimes on top
  of a shared prefix primed once with ``max_new_tokens=0`` (the frontend's ``cache_prefix``);
* a policy (every policy, ``none`` included) and a budget through ``custom_params``;
* streaming or not, ``ignore_eos`` or not, and whether the client disconnects mid-way;
* now and then a malformed setting (must be an HTTP 400) or an exactness check: a budget that
  covers the prompt must give the same greedy tokens as ``kv_policy=none``;
* now and then a conversation: a streaming session (the server runs with
  ``--enable-streaming-session``) of 2-4 turns, each with its own policy and budget, sometimes a
  context turn with no output, sometimes a turn its client drops, always closed at the end;
* now and then a conversation whose client resends the whole history (no session) for 2-4
  turns: with parking on (the default) its turns continue the parked compressed conversation
  unless memory pressure evicted it, sometimes with parking off for a turn, sometimes a turn its
  client drops.

After the load, up to 20 completed compressed requests that were retracted are served again
alone and must give the same greedy tokens as under pressure.

At the end (after the load drains): zero server errors (HTTP 5xx, client-side exceptions, scheduler
tracebacks or debug assertions in the log), every request the client did not abandon complete,
every exactness check equal, the pool settled and whole (``launch.settled``: nothing pending,
no live compressed request, every parked conversation idle; ``launch.leaked_slots == 0``: free +
tree (idle parked conversations are evictable) + locked prefixes = pool). Results go to ``benchmarks/results/soak/soak-<time>.json``; the
exit status is 0 only when every check holds.

    python -m benchmarks.soak --seconds 300           # CI default: 5 minutes
    python -m benchmarks.soak --seconds 1800          # the long run
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.request
from pathlib import Path

from lava_sglang.config import POLICIES
from lava_sglang.launch import LOG_ERRORS, Server, http_json, leaked_slots, settled
from lava_sglang.models import default_model_path
from lava_sglang.workloads import default_corpus_dir, load_corpus, synthetic_text

RESULTS = Path(__file__).resolve().parent / "results" / "soak"
SERVER_ENV = {"LAVA_SGLANG_DEBUG": "1", "SGLANG_REQUEST_STATE_WAIT_TIMEOUT": "1"}
BAD_SETTINGS = ({"kv_budget": 8}, {"kv_policy": "h2o"}, {"kv_kernel_size": 4}, {"kv_floor_alpha": 2.0},
                {"kv_budgett": 64}, {"kv_window": -1}, {"kv_budget": "many"})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="how long new requests are sent (then the load drains)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=4096, help="--max-total-tokens of the server (small: retractions)")
    p.add_argument("--chunk", type=int, default=128, help="--chunked-prefill-size of the server")
    p.add_argument("--budget", type=int, default=128, help="server --kv-budget (requests choose their own too)")
    p.add_argument("--long", type=int, default=700, help="longest prompt, tokens")
    p.add_argument("--max-new", type=int, default=48, help="largest max_new_tokens of a request")
    p.add_argument("--policy", default="lava", help="server --kv-policy")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--model", default=None)
    p.add_argument("--drain-seconds", type=float, default=600.0)
    p.add_argument("--retract-pressure", action="store_true",
                   help="admission reserves almost nothing for decode tokens (SGLANG_INIT_NEW_TOKEN_RATIO=0.05, "
                        "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION=8), making retractions likely with long outputs (a 10-minute run "
                        "with the default --max-new 48 still saw none)")
    return p.parse_args(argv)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.errors: list[str] = []
        self.incomplete: list[str] = []
        self.mismatches: list[dict] = []
        # completed non-streamed compressed requests that were retracted: (ids, sampling, output ids)
        self.retracted: list[tuple] = []
        self.latencies: list[float] = []

    def add(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def error(self, msg):
        with self.lock:
            self.counts["errors"] += 1
            if len(self.errors) < 50:
                self.errors.append(msg)


def post(url_port: int, payload: dict, timeout: float = 900.0):
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=timeout)
    conn.request("POST", "/generate", body=json.dumps(payload), headers={"Content-Type": "application/json"})
    return conn


def drop(conn):
    sock = conn.sock
    conn.close()
    if sock is not None:
        sock.close()


def events(resp):
    for raw in resp:
        line = raw.decode(errors="replace").strip()
        if line.startswith("data:") and line != "data: [DONE]":
            yield json.loads(line[5:])


class Soak:
    def __init__(self, args, server: Server, tokens: list[int]):
        self.args, self.server, self.tokens = args, server, tokens
        self.stats = Stats()
        self.prefixes: list[list[int]] = []

    # --- prompts -------------------------------------------------------------------------
    def slice(self, rng, n):
        start = rng.randrange(0, len(self.tokens) - n - 1)
        return self.tokens[start:start + n]

    def prompt(self, rng):
        a = self.args
        kind = rng.choice(["short", "budget", "long", "chunks"])
        n = {"short": rng.randint(8, 60), "budget": rng.randint(a.budget - 24, a.budget + 40),
             "long": rng.randint(a.long // 2, a.long), "chunks": rng.randint(2 * a.chunk + 1, 4 * a.chunk)}[kind]
        n = max(4, min(n, a.pool // 3))
        if self.prefixes and rng.random() < 0.3:
            prefix = rng.choice(self.prefixes)
            return "prefix", prefix + self.slice(rng, max(4, n - len(prefix)))
        return kind, self.slice(rng, n)

    def prime_prefixes(self, rng, n=3, length=256):
        for _ in range(n):
            ids = self.slice(rng, length)
            out = http_json(self.server.url + "/generate",
                            {"input_ids": ids, "sampling_params": {"max_new_tokens": 0, "temperature": 0.0}})
            assert not out["meta_info"].get("kv_compression"), "a primer was compressed"
            self.prefixes.append(ids)

    # --- one request ---------------------------------------------------------------------
    def sampling(self, rng, custom=None):
        sp = {"max_new_tokens": rng.randint(1, self.args.max_new), "temperature": 0.0,
              "ignore_eos": rng.random() < 0.5}
        if custom:
            sp["custom_params"] = custom
        return sp

    def random_custom(self, rng):
        r = rng.random()
        if r < 0.15:
            return None  # the server's policy and budget
        custom = {"kv_policy": rng.choice(POLICIES)}
        if custom["kv_policy"] != "none" and rng.random() < 0.8:
            custom["kv_budget"] = rng.choice([48, 64, 96, 128, 256])
        return custom

    def run_one(self, rng):
        s = self.stats
        r = rng.random()
        if r < 0.03:
            return self.bad_request(rng)
        if r < 0.13:
            return self.exact_check(rng)
        if r < 0.23:
            return self.conversation(rng)
        if r < 0.33:
            return self.resend_conversation(rng)
        kind, ids = self.prompt(rng)
        custom = self.random_custom(rng)
        sp = self.sampling(rng, custom)
        stream = rng.random() < 0.5
        abort = rng.random() < 0.12
        payload = {"input_ids": ids, "sampling_params": sp, "stream": stream}
        s.add(f"kind_{kind}")
        s.add("streaming" if stream else "non_streaming")
        started = time.time()
        conn = post(self.server.port, payload)
        try:
            if abort:
                s.add("aborted")
                if stream:
                    resp = conn.getresponse()
                    stop_after = rng.randint(0, 8)
                    for i, _ in enumerate(events(resp)):
                        if i >= stop_after:
                            break
                else:
                    time.sleep(rng.uniform(0.0, 2.0))
                drop(conn)
                return
            resp = conn.getresponse()
            if resp.status >= 500:
                s.error(f"HTTP {resp.status}: {resp.read()[:300]!r}")
                return
            if resp.status != 200:
                s.error(f"unexpected HTTP {resp.status} for a valid request: {resp.read()[:300]!r}")
                return
            if stream:
                last = None
                for event in events(resp):
                    if "error" in event:
                        s.error(f"stream error: {event['error']}")
                        return
                    last = event
                out = last
            else:
                out = json.loads(resp.read())
            if self.check_complete(out, sp, f"{kind} {custom} stream={stream}") and not stream:
                meta = out["meta_info"]
                if meta.get("num_retractions") and meta.get("kv_compression"):
                    with s.lock:
                        if len(s.retracted) < 40:
                            s.retracted.append((ids, sp, out["output_ids"]))
            s.latencies.append(time.time() - started)
        finally:
            conn.close()

    def check_complete(self, out, sp, what):
        s = self.stats
        if out is None:
            s.incomplete.append(f"{what}: no output")
            s.add("incomplete")
            return
        meta = out["meta_info"]
        finish = (meta.get("finish_reason") or {}).get("type")
        n = meta.get("completion_tokens")
        ok = finish in ("length", "stop") and n is not None and 1 <= n <= sp["max_new_tokens"]
        if sp.get("ignore_eos"):
            ok = ok and finish == "length" and n == sp["max_new_tokens"]
        if not ok:
            s.add("incomplete")
            if len(s.incomplete) < 50:
                s.incomplete.append(f"{what}: finish={meta.get('finish_reason')} tokens={n} of {sp['max_new_tokens']}")
            return False
        s.add("completed")
        if meta.get("kv_compression"):
            s.add("compressed")
        if meta.get("num_retractions"):
            s.add("retracted")
            s.add("retractions", int(meta["num_retractions"]))
        if meta.get("cached_tokens"):
            s.add("with_cached_prefix")
        return True

    def retraction_checks(self, limit: int = 20) -> None:
        """After the load: retracted compressed requests served again alone (no memory pressure)
        must give the same greedy tokens (the re-prefill replays their selection)."""
        s = self.stats
        for ids, sp, output_ids in s.retracted[:limit]:
            out = http_json(self.server.url + "/generate", {"input_ids": ids, "sampling_params": sp})
            s.add("retraction_checks")
            if out["meta_info"].get("num_retractions"):
                s.add("retraction_checks_retracted_again")
            if out["output_ids"] != output_ids:
                s.mismatches.append({"retracted": True, "custom": sp.get("custom_params"), "prompt_tokens": len(ids),
                                     "a": output_ids, "b": out["output_ids"]})
                s.add("retraction_mismatches")

    def bad_request(self, rng):
        custom = dict(rng.choice(BAD_SETTINGS))
        conn = post(self.server.port, {"text": "hello", "sampling_params": {"max_new_tokens": 2, "custom_params": custom}})
        try:
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            field = next(iter(custom))
            if resp.status == 400 and field in body:
                self.stats.add("rejected_400")
            else:
                self.stats.error(f"bad setting {custom}: HTTP {resp.status} {body[:200]}")
        finally:
            conn.close()

    def exact_check(self, rng):
        """A budget covering the prompt keeps everything: same greedy tokens as kv_policy=none."""
        _, ids = self.prompt(rng)
        policy = rng.choice([p for p in POLICIES if p != "none"])
        sp = {"max_new_tokens": rng.randint(4, self.args.max_new), "temperature": 0.0, "ignore_eos": True}
        outs = []
        for custom in ({"kv_policy": policy, "kv_budget": self.args.pool * 4}, {"kv_policy": "none"}):
            out = http_json(self.server.url + "/generate", {"input_ids": ids, "sampling_params": {**sp, "custom_params": custom}})
            self.check_complete(out, sp, f"exact {custom}")
            outs.append(out)
        self.stats.add("exact_checks")
        if outs[0]["output_ids"] != outs[1]["output_ids"]:
            with self.stats.lock:
                self.stats.mismatches.append({"policy": policy, "prompt_tokens": len(ids),
                                              "a": outs[0]["output_ids"], "b": outs[1]["output_ids"]})

    def conversation(self, rng):
        """A streaming session of 2-4 turns continuing over its (compressed) cache."""
        s = self.stats
        sid = http_json(self.server.url + "/open_session", {"capacity_of_str_len": 1 << 22, "streaming": True})
        s.add("sessions")
        try:
            for t in range(rng.randint(2, 4)):
                _, ids = self.prompt(rng)
                custom = self.random_custom(rng)
                sp = self.sampling(rng, custom)
                if t == 0 and rng.random() < 0.2:
                    sp["max_new_tokens"] = 0  # a context turn, questioned by the next one
                payload = {"input_ids": ids, "sampling_params": sp, "session_params": {"id": sid}}
                if rng.random() < 0.08:
                    s.add("session_turns_aborted")
                    conn = post(self.server.port, payload)
                    time.sleep(rng.uniform(0.0, 1.5))
                    drop(conn)
                    break  # the session's next turns would start from its last finished turn
                out = http_json(self.server.url + "/generate", payload)
                s.add("session_turns")
                if t and out["meta_info"].get("cached_tokens", 0) == 0:
                    s.error(f"session turn {t + 1} reused nothing: {out['meta_info']}")
                if sp["max_new_tokens"] == 0:
                    continue
                self.check_complete(out, sp, f"session turn {t + 1} {custom}")
                if (out["meta_info"].get("kv_compression") or [{}])[0].get("continued"):
                    s.add("session_turns_continued")
        finally:
            req = urllib.request.Request(self.server.url + "/close_session", data=json.dumps({"session_id": sid}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.read()

    def resend_conversation(self, rng):
        """2-4 turns of a client that resends the whole history (no session): parked conversations."""
        s = self.stats
        s.add("resend_conversations")
        custom = self.random_custom(rng)
        history = []
        for t in range(rng.randint(2, 4)):
            _, ids = self.prompt(rng)
            history = history + ids
            sp = self.sampling(rng, custom)
            sp["ignore_eos"] = True
            if t and rng.random() < 0.1:
                sp["custom_params"] = {**(custom or {}), "kv_park": False}
            payload = {"input_ids": history, "sampling_params": sp}
            if rng.random() < 0.08:
                s.add("resend_turns_aborted")
                conn = post(self.server.port, payload)
                time.sleep(rng.uniform(0.0, 1.5))
                drop(conn)
                return
            out = http_json(self.server.url + "/generate", payload)
            s.add("resend_turns")
            if not self.check_complete(out, sp, f"resend turn {t + 1} {sp.get('custom_params')}"):
                return
            if (out["meta_info"].get("kv_compression") or [{}])[0].get("continued"):
                s.add("resend_turns_continued")
            history = history + out["output_ids"]

    # --- driver --------------------------------------------------------------------------
    def worker(self, k, deadline):
        rng = random.Random(self.args.seed * 1000 + k)
        while time.time() < deadline:
            try:
                self.run_one(rng)
                self.stats.add("sent")
            except Exception as exc:  # noqa: BLE001 - every unexpected failure is a counted error
                self.stats.error(f"{type(exc).__name__}: {exc}")


def corpus_tokens(tokenizer, n_tokens=60000):
    text = load_corpus(default_corpus_dir()) or synthetic_text(n_tokens * 5, seed=1)
    return tokenizer.encode(text[: n_tokens * 6], add_special_tokens=False)[:n_tokens]


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    model = args.model or str(default_model_path())
    tokens = corpus_tokens(AutoTokenizer.from_pretrained(model))
    env = dict(SERVER_ENV)
    if args.retract_pressure:
        env.update({"SGLANG_INIT_NEW_TOKEN_RATIO": "0.05", "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "8"})
    os.environ.update(env)  # the server copies os.environ when constructed
    flags = ["--kv-policy", args.policy, "--kv-budget", str(args.budget), "--max-total-tokens", str(args.pool),
             "--chunked-prefill-size", str(args.chunk), "--log-level", "info", "--enable-streaming-session"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = str(out_dir / f"soak-{stamp}.server.log")
    result: dict = {"args": vars(args), "server_flags": flags, "server_env": env}
    with Server(model, flags, log_path=log_path) as server:
        soak = Soak(args, server, tokens)
        soak.prime_prefixes(random.Random(args.seed))
        start = time.time()
        deadline = start + args.seconds
        threads = [threading.Thread(target=soak.worker, args=(k, deadline), daemon=True) for k in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.time()) + args.drain_seconds)
        hung = sum(t.is_alive() for t in threads)
        elapsed = time.time() - start
        server.wait_settled(120)
        soak.retraction_checks()
        final = server.wait_settled(120)
        log = server.log_text()
        log_errors = {k: log.count(k) for k in LOG_ERRORS}
        aborts_seen = log.count("Abort") + log.count("abort")

    s = soak.stats
    c = dict(s.counts)
    leak = leaked_slots(final)
    lat = sorted(s.latencies)
    result.update({
        "elapsed_seconds": round(elapsed, 1),
        "requests_sent": c.get("sent", 0),
        "requests_completed": c.get("completed", 0),
        "requests_aborted_by_client": c.get("aborted", 0),
        "requests_retracted": c.get("retracted", 0),
        "retractions": c.get("retractions", 0),
        "requests_compressed": c.get("compressed", 0),
        "sessions": c.get("sessions", 0),
        "session_turns": c.get("session_turns", 0),
        "session_turns_continued": c.get("session_turns_continued", 0),
        "resend_conversations": c.get("resend_conversations", 0),
        "resend_turns": c.get("resend_turns", 0),
        "resend_turns_continued": c.get("resend_turns_continued", 0),
        "rejected_400": c.get("rejected_400", 0),
        "exact_checks": c.get("exact_checks", 0),
        "exact_mismatches": len(s.mismatches) - c.get("retraction_mismatches", 0),
        "retraction_checks": c.get("retraction_checks", 0),
        "retraction_mismatches": c.get("retraction_mismatches", 0),
        "errors": c.get("errors", 0),
        "incomplete": c.get("incomplete", 0),
        "hung_client_threads": hung,
        "log_errors": log_errors,
        "leaked_slots": leak,
        "tree_protected_tokens": final["tree_protected_tokens"],
        "live_compressed_requests": final["live_compressed_requests"],
        "pending_requests": final["pending_requests"],
        "final_memory": final,
        "counts": c,
        "latency_p50_s": round(lat[len(lat) // 2], 2) if lat else None,
        "latency_p99_s": round(lat[int(len(lat) * 0.99)], 2) if lat else None,
        "abort_mentions_in_log": aborts_seen,
        "error_samples": s.errors[:20],
        "incomplete_samples": s.incomplete[:20],
        "mismatch_samples": s.mismatches[:5],
        "server_log": log_path,
    })
    ok = (result["errors"] == 0 and result["incomplete"] == 0 and len(s.mismatches) == 0 and hung == 0
          and not any(log_errors.values()) and leak == 0 and settled(final)
          and result["requests_completed"] > 0)
    result["ok"] = ok
    path = out_dir / f"soak-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("ok", "elapsed_seconds", "requests_sent", "requests_completed",
                                      "requests_aborted_by_client", "requests_retracted", "retractions",
                                      "requests_compressed", "sessions", "session_turns", "session_turns_continued",
                                      "resend_conversations", "resend_turns", "resend_turns_continued",
                                      "rejected_400", "exact_checks", "exact_mismatches",
                                      "retraction_checks", "retraction_mismatches",
                                      "errors", "incomplete", "leaked_slots", "tree_protected_tokens", "log_errors")}
    print(json.dumps(summary, indent=2))
    print(f"results: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
