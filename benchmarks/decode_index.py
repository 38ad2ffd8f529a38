"""Engine-free: the cost of the decode index (layout plan + per-layer CSR lists) against the
attention it feeds, for consecutive decode steps of one batch of compressed requests.

    python benchmarks/decode_index.py [--requests 4] [--kept 128] [--decoded 200 1000] [--steps 20]

The default model's shapes (30 layers, 3 KV heads, 9 query heads, head dim 64), one thread,
torch on CPU. Each step builds the plan the decode hook builds (``engine.decode.decode_plan``'s
entries) one token further than the last, then runs every layer's attention over it. With
``--full`` every step builds the lists from scratch (what the plugin did before the next step
appended to the previous lists). Prints the plan's share of plan + attention time.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from lava_sglang.engine.cells import CellSpace
from lava_sglang.engine.layout import LayoutEntry, LayoutPlan, attend, forget_decode_steps, state_mid

L, H, G, D = 30, 3, 3, 64


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--kept", type=int, default=128)
    ap.add_argument("--decoded", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--full", action="store_true", help="build every step's lists from scratch")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    R, K = args.requests, args.kept
    width = K + max(args.decoded) + args.steps + 1
    buf = torch.randn(L, 2, R * width + 1, H, D)
    pool = SimpleNamespace(k_buffer=[buf[l, 0] for l in range(L)], v_buffer=[buf[l, 1] for l in range(L)])
    space = CellSpace(pool.k_buffer, pool.v_buffer)
    req_to_token = torch.zeros(R, width, dtype=torch.int32)
    for r in range(R):
        req_to_token[r] = torch.arange(1 + r * width, 1 + (r + 1) * width, dtype=torch.int32)
    states = []
    for r in range(R):  # K kept cells per (layer, head), packed into the row's first slots
        slots = req_to_token[r, :K].long()
        states.append(SimpleNamespace(mid_cells=[torch.cat([space.cells(l, slots, h) for h in range(H)]) for l in range(L)],
                                      mid_lens=torch.full((L, H), K, dtype=torch.long)))
    layers = [SimpleNamespace(layer_id=i, tp_q_head_num=H * G, tp_k_head_num=H, qk_head_dim=D, v_head_dim=D,
                              scaling=D ** -0.5) for i in range(L)]
    q = torch.randn(R, H * G * D)
    for decoded in args.decoded:
        forget_decode_steps()
        plan_s = attn_s = 0.0
        for step in range(args.steps):
            if args.full:
                forget_decode_steps()
            S = K + decoded + step
            entries = [LayoutEntry(r, 0, K, S, 1, r, state_mid(states[r])) for r in range(R)]
            t0 = time.perf_counter()
            plan = LayoutPlan(entries, req_to_token, space)
            plan.indices(0)
            t1 = time.perf_counter()
            for layer in layers:
                attend(layer, q, plan, pool)
            t2 = time.perf_counter()
            if step:  # the first step builds in both modes
                plan_s += t1 - t0
                attn_s += t2 - t1
        n = args.steps - 1
        print(f"{R} requests x ({K} kept + {decoded} decoded) tokens, {'full build' if args.full else 'appended'}: "
              f"index {plan_s / n * 1000:.2f} ms/step, attention {attn_s / n * 1000:.2f} ms/step, "
              f"index share {plan_s / (plan_s + attn_s):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
