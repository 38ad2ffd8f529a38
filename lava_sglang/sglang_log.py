"""Reading an SGLang server's scheduler log: its prefill and decode batch lines.

At ``--log-level info`` the scheduler logs a line per prefill batch and, with
``--decode-log-interval 1``, one per decode batch::

    Prefill batch, #new-seq: 2, #new-token: 1200, #cached-token: 0, ...
    Decode batch, #running-req: 4, #token: 2400, token usage: 0.19, ..., gen throughput (token/s): 41.3, ...

These functions turn a log's text (or the part of it after a mark) into numbers: running requests
and pool use per decode batch, decode step times, the prefill batches. One place for the
patterns, used by the demo (:mod:`lava_sglang.demo`) and the serving and multi-turn benchmarks.

Engine-free: text in, numbers out; never imports SGLang.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

BATCH_LINE = re.compile(r"(Prefill|Decode) batch")
DECODE_LINE = re.compile(r"Decode batch, #running-req: (\d+), #token: (\d+)")
TOKEN_USAGE = re.compile(r"token usage: ([\d.]+)")
GEN_THROUGHPUT = re.compile(r"gen throughput \(token/s\): ([\d.]+)")
PREFILL_LINE = re.compile(r"Prefill batch, #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+)")


@dataclass(frozen=True)
class DecodeBatch:
    """One ``Decode batch`` line: running requests, tokens in the pool, pool use (0..1) and the
    generation throughput (tokens/s) since the previous decode log line (None when the line
    has no such field)."""

    running: int
    tokens: int
    usage: Optional[float]
    throughput: Optional[float]

    @property
    def step_s(self) -> Optional[float]:
        """Seconds per decode step (``running / throughput``; None without a positive throughput).
        It is one step's time when this line follows another decode line at interval 1."""
        return self.running / self.throughput if self.throughput else None


def parse_decode_line(line: str) -> Optional[DecodeBatch]:
    m = DECODE_LINE.search(line)
    if not m:
        return None
    usage, throughput = TOKEN_USAGE.search(line), GEN_THROUGHPUT.search(line)
    return DecodeBatch(int(m.group(1)), int(m.group(2)), float(usage.group(1)) if usage else None,
                       float(throughput.group(1)) if throughput else None)


def decode_batches(log: str) -> list[DecodeBatch]:
    """Every decode batch line of ``log``, in order."""
    return [d for d in map(parse_decode_line, log.splitlines()) if d is not None]


def decode_steps(log: str) -> list[DecodeBatch]:
    """Pure decode steps: decode batches logged right after another decode batch, with a positive
    throughput (at ``--decode-log-interval 1`` such a line's throughput covers exactly one decode
    step, no prefill in between)."""
    steps, previous = [], None
    for line in log.splitlines():
        kind = BATCH_LINE.search(line)
        if not kind:
            continue
        d = parse_decode_line(line)
        if kind.group(1) == "Decode" and previous == "Decode" and d is not None and d.throughput:
            steps.append(d)
        previous = kind.group(1)
    return steps


def step_times(log: str, running: int) -> list[float]:
    """Decode step times (s) of the decode batches with exactly ``running`` requests."""
    return [d.step_s for d in decode_batches(log) if d.running == running and d.step_s is not None]


def peak_running(batches: list[DecodeBatch], default=0):
    """The most requests any decode batch ran (``default`` when there was none)."""
    return max((d.running for d in batches), default=default)


def peak_usage(batches: list[DecodeBatch], default=None):
    """The highest pool use (0..1) of the decode batches (``default`` when none reported it)."""
    return max((d.usage for d in batches if d.usage is not None), default=default)


def prefill_batches(log: str) -> list[tuple[int, int, int]]:
    """``(new sequences, new tokens, cached tokens)`` of every prefill batch line."""
    return [tuple(int(x) for x in m.groups()) for m in PREFILL_LINE.finditer(log)]


# lava-sglang's own line for each selection made while a request generates (engine.decode_compression)
DECODE_SELECTED = re.compile(r"decode-selected (\S+) at (\d+) tokens: .*? private slots (\d+) -> (\d+)")


def decode_selections(log: str, rid: str, prompt_tokens: int) -> list[tuple[int, int, int]]:
    """(tokens generated, private slots before, after) of each decode selection of request ``rid``."""
    return [(int(end) - prompt_tokens, int(a), int(b)) for r, end, a, b in DECODE_SELECTED.findall(log) if r == rid]


def slots_trace(start_slots: int, generated: int, selections: list) -> list[list[int]]:
    """Private slots over generated tokens: ``start_slots`` held when the request began to generate,
    one more per token, and each selection's drop (``decode_selections``)."""
    if selections:  # the slots before the first selection fix the start exactly
        start_slots = selections[0][1] - selections[0][0]
    points, t, held = [[0, start_slots]], 0, start_slots
    for at, before, after in selections:
        points += [[at, before], [at, after]]
        t, held = at, after
    return points + [[generated, held + generated - t]]


def slots_at(trace: list, tokens: int) -> int:
    """The private slots of ``slots_trace`` after ``tokens`` generated tokens."""
    held = trace[0][1]
    for (t0, s0), (t1, s1) in zip(trace, trace[1:]):
        if t0 <= tokens <= t1 and t1 > t0:
            held = s0 + (tokens - t0)
        elif t1 <= tokens:
            held = s1
    return held
