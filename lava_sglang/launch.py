"""Start and stop a real SGLang server with the plugin: one place for the command line and CPU flags.

Used by the README's main job (``lava_sglang.demo``), the integration tests and the benchmarks.
On a machine without CUDA it selects SGLang's CPU engine with the flags that serve correct
generations there (``docs/design.md``, "Hooks and the CPU engine"): ``--device cpu --attention-backend torch_native
--dtype float32`` and ``SGLANG_USE_CPU_ENGINE=1``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32")


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_path: str, port: int, extra_args: Iterable[str] = (), cpu: bool | None = None) -> list[str]:
    cpu = (not cuda_available()) if cpu is None else cpu
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", "127.0.0.1", "--port", str(port)]
    if cpu:
        cmd += list(CPU_FLAGS)
    cmd += [str(a) for a in extra_args]
    return cmd


def server_env(cpu: bool | None = None) -> dict[str, str]:
    cpu = (not cuda_available()) if cpu is None else cpu
    env = dict(os.environ)
    if cpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A config left in the environment by an earlier in-process launch must not leak in.
    env.pop("LAVA_SGLANG_KV_CONFIG", None)
    return env


def http_json(url: str, payload: dict | None = None, timeout: float = 600.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def stream_generate(url: str, payload: dict, timeout: float = 3600.0):
    """Yield the JSON chunks of a streaming ``/generate`` request (server-sent events)."""
    payload = {**payload, "stream": True}
    request = urllib.request.Request(url + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        yield from sse_events(response)


def sse_events(lines):
    """The JSON payloads of the ``data:`` lines of a server-sent event stream (bytes lines)."""
    for raw in lines:
        line = raw.decode(errors="replace").strip()
        if line.startswith("data:") and line != "data: [DONE]":
            yield json.loads(line[5:])


def open_generate(port: int, payload: dict, timeout: float = 600.0) -> http.client.HTTPConnection:
    """``POST /generate`` to a loopback server on a raw connection the caller can drop at any
    moment (:func:`drop`: a client going away); ``.getresponse()`` reads the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/generate", body=json.dumps(payload), headers={"Content-Type": "application/json"})
    return conn


def post_generate(port: int, payload: dict, timeout: float = 600.0) -> tuple[int, str]:
    """``POST /generate`` to a loopback server: (HTTP status, body text), whatever the status."""
    conn = open_generate(port, payload, timeout)
    try:
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def drop(conn: http.client.HTTPConnection) -> None:
    """Close the connection and its socket at once, as a client that went away."""
    sock = conn.sock
    conn.close()
    if sock is not None:
        sock.close()


class ServerError(RuntimeError):
    pass


# What a healthy server never logs.
LOG_ERRORS = ("Traceback", "AssertionError", "lava-sglang debug", "Scheduler hit an exception", "pool memory leak",
              "Mem Leak", "memory leak detected")


class Server:
    """A running SGLang server (a process group we own). Use as a context manager."""

    def __init__(self, model_path: str, extra_args: Iterable[str] = (), *, port: int | None = None,
                 startup_timeout: float = 600.0, cpu: bool | None = None, log_path: str | None = None,
                 core: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = server_command(model_path, self.port, extra_args, cpu)
        self.env = server_env(cpu)
        if core is not None:  # pinned to one CPU core (two CPU servers on one machine must not share cores)
            if "--max-total-tokens" not in self.command:  # SGLang cannot size the pool of a bound CPU rank
                raise ValueError("a server pinned to a core needs --max-total-tokens")
            self.command = ["taskset", "-c", str(core), *self.command]
            self.env.update(OMP_NUM_THREADS="1", SGLANG_CPU_OMP_THREADS_BIND=str(core))
        self.startup_timeout = startup_timeout
        self.log_path = log_path or tempfile.mkstemp(prefix="lava-sglang-server-", suffix=".log")[1]
        self.process: subprocess.Popen | None = None
        self.health_path = "/health_generate"

    def start(self) -> "Server":
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"server exited with status {self.process.returncode} during start-up\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=60) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"server did not become healthy within {self.startup_timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "".join(Path(self.log_path).read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return "(no log)"

    def log_errors(self) -> list[str]:
        """The markers of :data:`LOG_ERRORS` found in the server's log (tracebacks, SGLang's leak
        checks, the plugin's debug invariants)."""
        log = self.log_text()
        return [marker for marker in LOG_ERRORS if marker in log]

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- small HTTP helpers -------------------------------------------------------------
    def generate(self, text: str | None = None, *, input_ids=None, max_new_tokens: int = 16, timeout: float = 600.0, **kwargs) -> dict:
        sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        sampling.update(kwargs.pop("sampling_params", {}))
        payload = {"sampling_params": sampling, **kwargs}
        if input_ids is not None:
            payload["input_ids"] = input_ids
        else:
            payload["text"] = text
        return http_json(self.url + "/generate", payload, timeout=timeout)

    def open_session(self, capacity: int = 1 << 22) -> str:
        """A streaming session (the server needs ``--enable-streaming-session``); its id."""
        return http_json(self.url + "/open_session", {"capacity_of_str_len": capacity, "streaming": True}, timeout=60)

    def close_session(self, session_id: str, timeout: float = 60.0) -> None:
        data = json.dumps({"session_id": session_id}).encode()
        req = urllib.request.Request(self.url + "/close_session", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            response.read()

    def server_info(self) -> dict:
        return http_json(self.url + "/server_info", timeout=60)

    def flush_cache(self) -> None:
        flush_cache(self.url)

    def kv_memory(self) -> dict:
        """The plugin's live accounting (``/server_info`` -> ``internal_states[0]["kv_compression"]``)."""
        return self.server_info()["internal_states"][0]["kv_compression"]

    def wait_settled(self, timeout: float = 120.0) -> dict:
        """The accounting once no request holds memory (see :func:`settled`), or the last one seen."""
        deadline = time.time() + timeout
        m = self.kv_memory()
        while not settled(m) and time.time() < deadline:
            time.sleep(0.25)
            m = self.kv_memory()
        return m


class Router(Server):
    """SGLang's router (PyPI ``sglang-router``) in front of ``worker_urls``, on loopback."""

    def __init__(self, worker_urls: Iterable[str], policy: str = "cache_aware", extra_args: Iterable[str] = (), *,
                 startup_timeout: float = 120.0, log_path: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
                        str(self.port), "--worker-urls", *worker_urls, "--policy", policy, "--prometheus-host",
                        "127.0.0.1", "--prometheus-port", str(free_port()), *[str(a) for a in extra_args]]
        self.env = dict(os.environ)
        self.startup_timeout = startup_timeout
        self.log_path = log_path or tempfile.mkstemp(prefix="lava-sglang-router-", suffix=".log")[1]
        self.process = None
        self.health_path = "/health"

    def start(self) -> "Router":
        """Up, and routing: the router answers ``/health`` before its workers are registered (it
        then answers requests with 503), so a one-token request must get through first."""
        super().start()
        deadline = time.time() + self.startup_timeout
        while True:
            try:
                http_json(self.url + "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 1}}, timeout=60)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.time() > deadline:
                    self.stop()
                    raise ServerError(f"the router did not route a request within {self.startup_timeout:.0f} s\n"
                                      f"{self.log_tail()}")
                time.sleep(1.0)


def start_all(servers: list) -> list:
    """Start ``servers`` at once (each start waits for its server's health); raises the first
    start-up error, with its server's log, after all have been tried."""
    import threading

    errors: list = []

    def start(server):
        try:
            server.start()
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return servers


def check_whole(server: "Server", timeout: float = 60.0) -> dict:
    """Wait until ``server`` is :func:`settled`; raise AssertionError with its accounting unless it
    is and no slot leaked (for tests and the soak). Returns the accounting."""
    m = server.wait_settled(timeout)
    if not (settled(m) and leaked_slots(m) == 0):
        raise AssertionError(f"server not settled or slots leaked: {m}")
    return m


def flush_cache(url: str) -> None:
    """``POST /flush_cache``: the radix tree and every parked conversation go (waits up to 60 s for
    the server to be idle); raises unless it says it flushed."""
    request = urllib.request.Request(url + "/flush_cache?timeout=60", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            body = response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"/flush_cache refused: HTTP {e.code} {e.read().decode(errors='replace').strip()}") from e
    if response.status != 200 or "flushed" not in body.lower():
        raise RuntimeError(f"/flush_cache did not flush: {body.strip()}")


def settled(m: dict) -> bool:
    """No request holds memory: nothing pending, every compressed state left is an idle parked
    conversation, and without parked conversations the tree holds no lock."""
    parked = m.get("parked_conversations", 0)
    return (m["pending_requests"] == 0 and m["live_compressed_requests"] == 0 and parked == m.get("parked_idle", 0)
            and (parked or m["tree_protected_tokens"] == 0))


def leaked_slots(m: dict) -> int:
    """Slots neither free, nor in the tree (idle parked conversations count as its evictable part,
    the prefixes they lock as its protected part): 0 once :func:`settled`."""
    return m["pool_size"] - m["available_slots"] - m["tree_evictable_tokens"] - m["tree_protected_tokens"]


def run_cli_and_capture(args: list[str], timeout: float = 300.0, cpu: bool | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m sglang.launch_server ARGS`` to completion (for flag errors and refusals).

    Output goes to a file, not a pipe: SGLang's helper processes can outlive the launcher and
    would hold a pipe open. The whole process group is killed once the launcher has exited.
    """
    cmd = [sys.executable, "-m", "sglang.launch_server", *args]
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, env=server_env(cpu), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        text = out.read()
    return subprocess.CompletedProcess(cmd, returncode, text, "")
