"""The decode peak that admission reserves (``engine.decode_admission``), engine-free: the growth
of a running request under its bound, against a simulation of the selection rule of
``engine.decode_compression.after_decode`` (select to N once N + D are held and a window was
generated since the last selection)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lava_sglang.config import CompressionConfig
from lava_sglang.engine import decode_admission
from lava_sglang.engine.decode_admission import growth, peak


def simulate(start: int, N: int, D: int, w: int, steps: int) -> list[tuple[int, int]]:
    """(held before the step's token, since the last selection) for every decode step, and the
    rule's selections, as after_decode applies them."""
    held, since, seen = start, 0, []
    for _ in range(steps):
        seen.append((held, since))
        held, since = held + 1, since + 1
        if held >= N + D and since >= w:
            held, since = N, 0
    return seen


@pytest.mark.parametrize("start,N,D,w", [(256, 256, 128, 32), (129, 96, 64, 32), (60, 96, 64, 32), (400, 128, 128, 32)])
def test_growth_covers_every_future_step_and_peak_bounds_it(monkeypatch, start, N, D, w):
    config = CompressionConfig(budget=max(start - 1, w + 1), decode_budget=N, decode_interval=D, window=w)
    top = peak(config, start)
    if start <= config.budget + 1:
        assert top <= max(config.budget, N) + D + 1  # the bound the docs state
    trace = simulate(start, N, D, w, 2000)
    for i, (held, since) in enumerate(trace):
        req = SimpleNamespace(kv=SimpleNamespace(req_pool_idx=0), sampling_params=SimpleNamespace(max_new_tokens=10**6),
                              output_ids=[0] * i, origin_input_ids=[])
        monkeypatch.setattr(decode_admission, "decode_config", lambda r: config)
        monkeypatch.setattr(decode_admission, "held_now", lambda r, h=held: h)
        reserve = growth(req, since)
        future = max(h for h, _ in trace[i:]) + 1  # the most it holds later (its next token allocated)
        assert held + reserve >= future, (i, held, since, reserve, future)
        assert held + reserve <= top, (i, held, reserve, top)  # never more than its peak
