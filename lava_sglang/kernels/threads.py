"""How many intra-op threads the torch twins use on CPU: one for small work.

A CPU decode step over a compressed layout is ~20 small torch ops per layer (index
arithmetic, two gathers, two ``bmm``, a softmax: a few hundred KB each). Torch runs each op
above its grain size as an OpenMP parallel region over every intra-op thread, and a region
ends only when all its threads have: on a machine whose cores are busy (a loaded CPU server:
tokenizer, detokenizer, clients, other jobs) every region waits for a descheduled worker, a
few ms to tens of ms per op whatever its size. Measured on 2 loaded cores, one request of
1000 tokens compressed to 128, 30 layers: 150-520 ms per decode step (worst 5.5 s) with 2
threads, 16-18 ms (worst 27 ms) with one; the 10-minute stall of issue 25 (case 5) was such
steps, ~11 s each. Below :data:`SMALL_WORK_ELEMS` a second thread saves little even on an
idle machine, so the twins run that work on one thread and restore the count afterwards.

Engine-free: never imports SGLang.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["SMALL_WORK_ELEMS", "cpu_threads_for"]

# Elements gathered or computed by one call (e.g. cells x head dim) up to which one thread runs it.
# 8M fp32 = 32 MB: a 30-layer decode step of 16 requests x 2k tokens x 3 KV heads per layer.
SMALL_WORK_ELEMS = 1 << 23


@contextmanager
def cpu_threads_for(work_elems: int, device):
    """Run the block with one intra-op thread when ``device`` is a CPU and ``work_elems`` is at
    most :data:`SMALL_WORK_ELEMS`; otherwise (or already single-threaded) change nothing."""
    n = torch.get_num_threads()
    if n == 1 or torch.device(device).type != "cpu" or work_elems > SMALL_WORK_ELEMS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
