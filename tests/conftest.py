"""Shared fixtures: the default model and real SGLang servers (CPU engine), started on demand.

Servers are keyed by their flags and reused within the session; at most ``MAX_LIVE`` run at
once (the oldest is stopped first). Every server is killed at session end, and a test that
fails while using one gets the server log's tail in its report.
"""

from __future__ import annotations

import collections
import os

import pytest

MAX_LIVE = 2
# Small KV pool: fast start-up on CPU, still room for several 4k-token requests.
BASE_FLAGS = ("--max-total-tokens", "24576", "--log-level", "info", "--sleep-on-idle")


@pytest.fixture(scope="session")
def model_path() -> str:
    from lava_sglang.models import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class ServerPool:
    def __init__(self, model_path: str):
        self.model_path = model_path
        self.live: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
        self.last = None

    def get(self, *flags: str, fresh: bool = False):
        from lava_sglang.launch import Server

        key = tuple(BASE_FLAGS) + tuple(str(f) for f in flags)
        if key in self.live and not fresh:
            self.live.move_to_end(key)
            self.last = self.live[key]
            return self.last
        if key in self.live:
            self.live.pop(key).stop()
        while len(self.live) >= MAX_LIVE:
            _, old = self.live.popitem(last=False)
            old.stop()
        server = Server(self.model_path, key, startup_timeout=float(os.environ.get("LAVA_TEST_STARTUP_TIMEOUT", "600")))
        server.start()
        self.live[key] = server
        self.last = server
        return server

    def get_with_env(self, flags, env: dict):
        """``get(*flags)`` with ``env`` in the environment the server is started with (the pool key
        is the flags alone: give a server with other env vars other flags)."""
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # Server copies os.environ when it is constructed
        try:
            return self.get(*flags)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def stop_all(self):
        while self.live:
            _, server = self.live.popitem()
            server.stop()


@pytest.fixture(scope="session")
def servers(model_path):
    pool = ServerPool(model_path)
    yield pool
    pool.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        pool = item.funcargs.get("servers") if hasattr(item, "funcargs") else None
        if pool is not None and pool.last is not None:
            report.sections.append(("SGLang server log (tail)", pool.last.log_tail(80)))
