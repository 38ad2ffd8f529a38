"""The soak's safety parts (``benchmarks.soak``): requests that must be refused with an HTTP 400,
what a legitimate refusal of a too-long resent history looks like, and the stall watch: no
client may wait longer than ``--max-wait`` seconds; the first time one does, the scheduler's
Python stacks are dumped with ``py-spy`` into the result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from lava_sglang.launch import post_generate

# Malformed compression settings: (custom_params, the field the 400 must name).
BAD_SETTINGS = (
    ({"kv_budget": 8}, "kv_budget"), ({"kv_policy": "h2o"}, "kv_policy"), ({"kv_kernel_size": 4}, "kv_kernel_size"),
    ({"kv_floor_alpha": 2.0}, "kv_floor_alpha"), ({"kv_budgett": 64}, "kv_budgett"), ({"kv_window": -1}, "kv_window"),
    ({"kv_budget": "many"}, "kv_budget"),
    # over-large values (upper bounds)
    ({"kv_kernel_size": 2147483649}, "kv_kernel_size"), ({"kv_kernel_size": 129}, "kv_kernel_size"),
    ({"kv_window": 100000, "kv_budget": 200000}, "kv_window"), ({"kv_budget": 10 ** 12}, "kv_budget"),
    ({"kv_min_prompt_len": 10 ** 7}, "kv_min_prompt_len"), ({"kv_pyramid_beta": 1e6}, "kv_pyramid_beta"),
)
VOCAB_OVER = 1_000_000_000
# Malformed prompts: (payload without sampling_params, text the 400 must contain or None).
BAD_INPUTS = (
    ({"text": ""}, None), ({"input_ids": []}, None),
    ({"input_ids": [1, 2, VOCAB_OVER]}, str(VOCAB_OVER)), ({"input_ids": [1, -5, 2]}, "-5"),
)
TOO_LONG = ("exceeds the maximum allowed length", "is longer than the model", "longer than the")


def too_long(status: int, body: str) -> bool:
    """SGLang's refusal of an input past the pool's input limit (a resent history can grow there)."""
    return status == 400 and any(t in body for t in TOO_LONG)


def aborted_too_long(out: dict) -> bool:
    finish = (out.get("meta_info", {}).get("finish_reason") or {})
    return finish.get("type") == "abort" and any(t in json.dumps(finish) for t in TOO_LONG)


def bad_request(soak, rng) -> None:
    """A malformed setting (on a prompt long enough to be compressed, half the time) or a malformed
    prompt: an HTTP 400 naming what is wrong, never anything else."""
    stats = soak.stats
    if rng.random() < 0.6:
        custom, field = rng.choice(BAD_SETTINGS)
        ids = soak.slice(rng, rng.choice([16, soak.args.budget * 3]))
        payload, named = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "custom_params": dict(custom)}}, field
        what = f"bad setting {custom}"
    else:
        extra, named = rng.choice(BAD_INPUTS)
        payload, what = {**extra, "sampling_params": {"max_new_tokens": 2}}, f"bad input {extra}"
    with soak.watch.track(what):
        status, body = post_generate(soak.server.port, payload, timeout=300)
    if status == 400 and (named is None or named in body or "vocab" in body.lower()):
        stats.add("rejected_400")
        stats.add("rejected_400_input" if what.startswith("bad input") else "rejected_400_setting")
    else:
        stats.error(f"{what}: HTTP {status} {body[:200]}")


# --------------------------------------------------------------------------------------------
# stall watch
# --------------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def scheduler_pids(server_pid: int) -> list[int]:
    """The scheduler process(es) of the server (SGLang names them ``sglang::scheduler...``); every
    descendant when none is named so."""
    below = descendants(server_pid)
    named = [p for p in below if "scheduler" in cmdline(p).lower()]
    return named or below


def py_spy_dump(pid: int, timeout: float = 60.0) -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(exe):
        return "py-spy not installed (pip install py-spy into the venv)"
    try:
        proc = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout)
        return (proc.stdout + proc.stderr)[-20000:]
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"py-spy failed: {type(exc).__name__}: {exc}"


class StallWatch:
    """Tracks every request in flight; a background thread flags any waiting over ``max_wait``
    seconds and dumps the scheduler's stacks (once per ``dump_every`` seconds, at most 3 times)."""

    def __init__(self, max_wait: float, server_pid: int | None, dump_every: float = 60.0):
        self.max_wait, self.server_pid, self.dump_every = max_wait, server_pid, dump_every
        self.lock = threading.Lock()
        self.inflight: dict[int, tuple[float, str]] = {}
        self.ids = iter(range(1 << 62))
        self.stalls: list[dict] = []
        self.dumps: list[dict] = []
        self.max_waited = 0.0
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._flagged: set[int] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "StallWatch":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(120)

    def track(self, what: str):
        watch = self

        class _Track:
            def __enter__(self_):
                with watch.lock:
                    self_.key = next(watch.ids)
                    watch.inflight[self_.key] = (time.time(), what)
                return self_

            def __exit__(self_, *exc):
                with watch.lock:
                    started, _ = watch.inflight.pop(self_.key)
                    waited = time.time() - started
                    watch.latencies.append(waited)
                    watch.max_waited = max(watch.max_waited, waited)
                return False

        return _Track()

    def _run(self) -> None:
        last_dump = 0.0
        while not self._stop.wait(2.0):
            now = time.time()
            with self.lock:
                late = [(k, now - t, what, len(self.inflight)) for k, (t, what) in self.inflight.items()
                        if now - t > self.max_wait and k not in self._flagged]
            for key, waited, what, n in late:
                self._flagged.add(key)
                if len(self.stalls) < 50:
                    self.stalls.append({"request": what, "waited_s": round(waited, 1), "in_flight": n,
                                        "at": time.strftime("%H:%M:%S")})
            if late and len(self.dumps) < 3 and now - last_dump > self.dump_every and self.server_pid:
                last_dump = now
                self.dumps.append({"at": time.strftime("%H:%M:%S"), "stacks": {
                    str(pid): {"cmdline": cmdline(pid)[:200], "dump": py_spy_dump(pid)}
                    for pid in scheduler_pids(self.server_pid)[:4]}})

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        return {"max_wait_bound_s": self.max_wait, "stalled_requests": len(self._flagged),
                "max_waited_s": round(self.max_waited, 1), "latency_max_s": round(lat[-1], 2) if lat else None,
                "stall_samples": self.stalls[:20], "scheduler_dumps": self.dumps}
