"""What one forward does besides the attention backend: an extend step (window queries to
capture, queries that attend over a compressed layout) or a decode step (the batch's decode
plan). Set around the model forward by ``engine.forward``, read by its attention hook.
"""

from __future__ import annotations

import torch

from lava_sglang.engine.cells import pool_cells
from lava_sglang.engine.decode import decode_plan
from lava_sglang.engine.failures import armed, fail_request, inject
from lava_sglang.engine.state import REGISTRY, Registry


class ExtendStep:
    """What this extend forward does besides the backend's attention: the window rows to
    capture, (pending, q_lo, q_hi, win_lo); and the queries that attend over a compressed
    layout (``engine.layout``). With ``whole_batch`` the plan covers every token of the batch
    (a turn continuing over its compressed cache is in it) and the backend is not run;
    otherwise it holds only replayed generated tokens (``engine.replay``), whose rows of the
    backend's output it overwrites."""

    def __init__(self, captures, plan=None, whole_batch=False, kv_pool=None):
        self.captures = captures
        self.plan = plan
        self.whole_batch = whole_batch
        self.kv_pool = kv_pool
        self.restores = []  # per re-entered row, per layer: (original cells, new cells) (continuation.rewind)

    def capture(self, layer, q):
        Hq, D = layer.tp_q_head_num, layer.qk_head_dim
        rows = q.reshape(-1, Hq, D)
        lid = layer.layer_id
        for pending, q_lo, q_hi, win_lo in self.captures:
            buf = pending.queries
            while len(buf) <= lid:
                buf.append(None)
            if buf[lid] is None:
                buf[lid] = torch.zeros((pending.window, Hq, D), dtype=q.dtype, device=q.device)
            buf[lid][win_lo:win_lo + (q_hi - q_lo)] = rows[q_lo:q_hi]


class DecodeStep:
    """A decode forward: ``layout`` when a request of the batch reads over a compressed layout;
    ``windows``: the requests compressed during decode (``engine.decode_compression``)."""

    def __init__(self, req_to_token, kv_pool, reqs=(), layout: bool = True, windows=()):
        self.req_to_token = req_to_token
        self.kv_pool = kv_pool
        self.reqs = list(reqs)
        self.layout = layout
        self.windows = list(windows)
        self.plan = None
        self.plan_batch = None

    def plan_for(self, forward_batch, layer):
        if self.plan is None or self.plan_batch is not forward_batch:
            rows, seq_lens = host_rows_and_lens(forward_batch, self.reqs)
            space = pool_cells(self.kv_pool)
            try:
                for req in self.reqs if armed() else ():  # the decode step's hot path skips this
                    if REGISTRY.compressed_for(req.kv.req_pool_idx) is not None:
                        inject("decode", req)
                self.plan = decode_plan(REGISTRY, self.req_to_token, rows, seq_lens, space)
            except Exception as exc:  # fail the compressed requests of the batch; the rest decode as usual
                for req in self.reqs:
                    if REGISTRY.compressed_for(req.kv.req_pool_idx) is not None:
                        fail_request(req, "decode", exc)
                self.plan = decode_plan(Registry(), self.req_to_token, rows, seq_lens, space)
            self.plan_batch = forward_batch
        return self.plan


def host_rows_and_lens(forward_batch, reqs) -> tuple[list, list]:
    """The decode batch's ``req_to_token`` rows and sequence lengths, from host data: SGLang's
    ``ForwardBatch`` carries ``seq_lens_cpu`` (and, for some modes, ``req_pool_indices_cpu``),
    and its requests, in batch order, know their rows (``ScheduleBatch`` keeps ``reqs`` and
    ``req_pool_indices`` aligned through filter and merge). The device tensors are read back (a
    host sync each on a GPU) only when those are missing or do not cover the batch (e.g. rows
    SGLang appended for beam members)."""
    n = int(forward_batch.seq_lens.shape[0])
    lens_cpu = getattr(forward_batch, "seq_lens_cpu", None)
    if isinstance(lens_cpu, torch.Tensor) and lens_cpu.device.type == "cpu" and lens_cpu.shape[0] == n:
        seq_lens = [int(x) for x in lens_cpu.tolist()]
    else:
        seq_lens = [int(x) for x in forward_batch.seq_lens.tolist()]
    rows_cpu = getattr(forward_batch, "req_pool_indices_cpu", None)
    req_rows = [getattr(getattr(r, "kv", None), "req_pool_idx", None) for r in reqs]
    if isinstance(rows_cpu, torch.Tensor) and rows_cpu.device.type == "cpu" and rows_cpu.shape[0] == n:
        rows = [int(x) for x in rows_cpu.tolist()]
    elif len(req_rows) == n and all(r is not None for r in req_rows):
        rows = [int(r) for r in req_rows]
    else:
        rows = [int(r) for r in forward_batch.req_pool_indices.tolist()]
    return rows, seq_lens
