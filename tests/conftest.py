"""Shared fixtures: the default model and real SGLang servers (CPU engine), started on demand.

Servers are keyed by their flags *and* the extra environment they are started with, and reused
within the session; at most ``MAX_LIVE`` run at once (the least recently used is stopped first).
Every server is killed at session end, and a test that fails while using one gets the server
log's tail in its report.

The integration tests share a few named configurations (``CONFIGS``, ``servers.config(name)``)
instead of each module starting its own variant: a start costs 30-60 s on two CPU cores. Each
test names the configurations it uses with ``@pytest.mark.server_configs(...)`` (or a module's
``pytestmark``), and ``pytest_collection_modifyitems`` runs the tests grouped in ``CONFIG_ORDER``
(after every test that needs no pooled server), so with ``MAX_LIVE`` live servers each
configuration starts once per session.
"""

from __future__ import annotations

import collections
import os
import signal

import pytest

from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

MAX_LIVE = 2
# Small KV pool: fast start-up on CPU, still room for several 4k-token requests.
BASE_FLAGS = ("--max-total-tokens", "24576", "--log-level", "info", "--sleep-on-idle")

# The plugin's debug invariants, and a client that went away noticed within a second.
DEBUG_ENV = {"LAVA_SGLANG_DEBUG": "1", "SGLANG_REQUEST_STATE_WAIT_TIMEOUT": "1"}
# Fault injection (engine/failures.py) for the safety tests' "lava-fault-*" requests; inert otherwise.
FAULT_ENV = {"LAVA_SGLANG_FAULT": "compress,reselect,layout,attention"}
# Streaming sessions on, prefill in 256-token chunks, a 16k-token pool.
SESSION_FLAGS = ("--enable-streaming-session", "--chunked-prefill-size", "256", "--max-total-tokens", "16384")

# name -> (flags after BASE_FLAGS, extra environment)
CONFIGS = {
    # LAVa at budget 128, whole-prompt prefill: tests/test_engine_server.py (and its golden
    # outputs, recorded on exactly these flags), tests/test_server_basic.py, tests/test_safety.py.
    # Debug invariants on, and fault injection armed (it acts only on rids "lava-fault-*").
    "lava": (("--kv-policy", "lava", "--kv-budget", "128"), {**DEBUG_ENV, **FAULT_ENV}),
    # The same on two CPU ranks (tests/test_examples.py fills in the env var that binds each rank to a
    # core), prefill in 256-token chunks (compression during chunked prefill on each rank).
    "lava-dp2": (("--kv-policy", "lava", "--kv-budget", "128", "--dp-size", "2", "--chunked-prefill-size", "256"), {}),
    # tests/test_reliability.py: a 640-slot pool, 64-token chunks, admission that reserves almost
    # nothing for decode tokens (so long decodes outgrow the pool and the scheduler retracts).
    "reliability": (("--kv-policy", "lava", "--kv-budget", "64", "--max-total-tokens", "640", "--chunked-prefill-size",
                     "64"), {**DEBUG_ENV, "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "8",
                             "SGLANG_INIT_NEW_TOKEN_RATIO": "0.05"}),
    # SGLang's own retraction switch: retract a decoding request every 4th forward (the forced
    # retraction tests of tests/test_reliability.py and tests/test_sessions.py).
    "retract": (("--kv-policy", "lava", "--kv-budget", "128", *SESSION_FLAGS),
                {**DEBUG_ENV, "SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "4"}),
    # LAVa, chunked prefill, sessions, metrics, debug invariants: tests/test_sessions*.py,
    # tests/test_examples.py, the chunked cases of tests/test_engine_server.py.
    "lava-chunked": (("--kv-policy", "lava", "--kv-budget", "128", *SESSION_FLAGS, "--enable-metrics"), DEBUG_ENV),
    # Its uncompressed twin (same chunking: greedy outputs compare token for token); also the
    # server without compression of tests/test_reliability.py and tests/test_safety.py.
    "none": (("--kv-policy", "none", *SESSION_FLAGS), {}),
    # tests/test_sessions_resend.py: a pool that holds four parked conversations (streaming
    # sessions on: tests/test_safety_memory.py's session turn behind a blocked head, which SGLang's
    # longest-output-first and priority sorts put behind the head at every round), and a parking
    # cap (also tests/test_safety_rows.py's case 11); tests/test_chunked_bound.py's window case.
    "lava-small-pool": (("--kv-policy", "lava", "--kv-budget", "128", "--chunked-prefill-size", "256",
                         "--max-total-tokens", "1100", "--enable-metrics", "--enable-streaming-session",
                         "--schedule-policy", "lof", "--enable-priority-scheduling"), DEBUG_ENV),
    # tests/test_chunked_prefill.py, tests/test_chunked_bound.py: a pool four times smaller than its
    # prompts, compressed chunk by chunk (streaming sessions on: a session turn longer than the
    # pool; fault injection armed for "lava-fault-*" rids).
    "lava-tiny-pool": (("--kv-policy", "lava", "--kv-budget", "256", "--max-total-tokens", "1024",
                        "--chunked-prefill-size", "512", "--enable-streaming-session"), {**DEBUG_ENV, **FAULT_ENV}),
    # tests/test_chunked_bound.py: the same without a radix cache (SGLang admits ignore_eos
    # requests through its own path there).
    "lava-tiny-noradix": (("--kv-policy", "lava", "--kv-budget", "256", "--max-total-tokens", "1024",
                           "--chunked-prefill-size", "512", "--disable-radix-cache"), DEBUG_ENV),
    "lava-park-cap": (("--kv-policy", "lava", "--kv-budget", "128", "--chunked-prefill-size", "256",
                       "--max-total-tokens", "8192", "--kv-park-max-slots", "300"), DEBUG_ENV),
}
# The order the pooled tests run in, by the configurations each names (the first, where the
# combination is not listed). Every configuration starts once with two live servers:
# reliability and retract evict lava and lava-dp2; lava-chunked and
# none arrive together for the tests comparing them; the lava-chunked-only tests then make it the
# most recently used, so the small pool's test (which also uses lava-chunked) evicts none.
CONFIG_ORDER = ("lava", "lava-dp2", "reliability", "retract",
                "lava-chunked+none", "none", "lava-chunked", "lava-small-pool", "lava-tiny-pool", "lava-tiny-noradix",
                "lava-park-cap")
# Pooled tests in modules that do not name their configurations (server_configs markers) themselves.
UNMARKED = {
    "test_server_basic.py": ("lava",),
}


@pytest.fixture(scope="session")
def model_path() -> str:
    from lava_sglang.models import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def ids_of(tokenizer):
    """``ids_of(n, seed)``: ``n`` token ids of a haystack of the corpus (real text), seeded."""
    corpus = load_corpus(default_corpus_dir())

    def make(n, seed):
        return tokenizer.encode(haystack(n + 50, corpus, seed=seed, tokenizer=tokenizer))[:n]
    return make


class ServerPool:
    def __init__(self, model_path: str):
        self.model_path = model_path
        self.live: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
        self.last = None
        self.started: list[tuple] = []  # every key started, in order (a restart shows up twice)

    def get(self, *flags: str, fresh: bool = False):
        return self.get_with_env(flags, {}, fresh=fresh)

    def get_with_env(self, flags, env: dict, fresh: bool = False):
        """A live server with ``flags`` (after ``BASE_FLAGS``) started with ``env`` added to the
        environment; the pool key is both."""
        from lava_sglang.launch import Server

        env = {str(k): str(v) for k, v in (env or {}).items()}
        flags = tuple(BASE_FLAGS) + tuple(str(f) for f in flags)
        key = flags + tuple(sorted(env.items()))
        if key in self.live and not fresh:
            self.live.move_to_end(key)
            self.last = self.live[key]
            return self.last
        if key in self.live:
            self.live.pop(key).stop()
        for other in [k for k in self.live if "--dp-size" in k]:
            # SGLang's data-parallel controller spins a core while idle: never left beside another
            self.live.pop(other).stop()
        while len(self.live) >= MAX_LIVE:
            _, old = self.live.popitem(last=False)
            old.stop()
        server = Server(self.model_path, flags, startup_timeout=float(os.environ.get("LAVA_TEST_STARTUP_TIMEOUT", "600")))
        server.env.update(env)
        self.started.append(key)
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        self.live[key] = server
        self.last = server
        return server

    def config(self, name: str, env: dict | None = None, fresh: bool = False):
        """The server of the named configuration (``CONFIGS``); ``env`` for those whose
        environment the test fills in; ``fresh``: started again (after a test that killed it)."""
        flags, base_env = CONFIGS[name]
        return self.get_with_env(flags, {**(base_env or {}), **(env or {})}, fresh=fresh)

    def stop_all(self):
        while self.live:
            _, server = self.live.popitem()
            server.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def servers(model_path):
    pool = ServerPool(model_path)
    # `timeout` sends SIGTERM: turned into KeyboardInterrupt, pytest still tears the session down
    # and the servers (own process groups) are stopped instead of left running.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield pool
    finally:
        pool.stop_all()
        if os.environ.get("LAVA_TEST_SERVER_STARTS"):  # where to write the keys started, one a line
            with open(os.environ["LAVA_TEST_SERVER_STARTS"], "a") as f:
                f.writelines(" ".join(k if isinstance(k, str) else "=".join(k) for k in key) + "\n" for key in pool.started)


def pytest_configure(config):
    config.addinivalue_line("markers", "server_configs(*names): the pooled server configurations (conftest.CONFIGS) "
                                       "a test uses; the suite runs them grouped")


def _configs(item) -> tuple:
    marker = item.get_closest_marker("server_configs")
    if marker is not None:
        return tuple(marker.args)
    module = item.path.name
    return UNMARKED.get(f"{module}::{item.originalname}", UNMARKED.get(module, ()))


def _order_key(item) -> int:
    names = _configs(item)
    if not names:
        return len(CONFIG_ORDER)  # uses the pool without saying how: after the named ones
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: unknown server configuration(s) {unknown}; see tests/conftest.py")
    joined = "+".join(names)
    return CONFIG_ORDER.index(joined if joined in CONFIG_ORDER else names[0])


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Tests that need no pooled server first (in their usual order), then the pooled ones grouped
    by configuration (``CONFIG_ORDER``), each group in its usual order."""
    def key(pair):
        i, item = pair
        pooled = "servers" in getattr(item, "fixturenames", ())
        return (1, _order_key(item), i) if pooled else (0, 0, i)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        pool = item.funcargs.get("servers") if hasattr(item, "funcargs") else None
        if pool is not None and pool.last is not None:
            report.sections.append(("SGLang server log (tail)", pool.last.log_tail(80)))
