"""The first-device check: what a CUDA machine can tell about the plugin's GPU paths without an
SGLang server, in one command and one summary (``make gpu-check``).

    python -m benchmarks.gpu_check [--iters 50] [--out DIR]

1. the engine-free GPU tests: ``pytest -m gpu`` over the kernel tests (Triton and FlashInfer
   against the torch twins) and the kernel self-check tests, and the host-sync count
   (``tests/test_host_syncs.py``);
2. the start-up self-check (``kernels/selfcheck.py``) on this device for fp16 and bf16 caches
   at two model shapes: which back-end each operation ends on, and how long the check (the
   warm-up, compiles included) took;
3. a decode-step timing: one layer's paged decode attention over per-(request, KV head) lists
   of 512-1024 cells, for 16 and 64 requests, Triton against FlashInfer where it imports.

It needs torch with CUDA, triton and pytest (FlashInfer optional); not SGLang. What only a full
GPU server run can check (``docs/usage.md``, "On a GPU"): that compression happens with the
default flags, and that greedy output with a covering budget equals ``--kv-policy none``.
Exit status 0 when every check passed, 1 otherwise, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from lava_sglang.kernels import dispatch, selfcheck
from lava_sglang.kernels.decode_attention import paged_decode_attention

ROOT = Path(__file__).resolve().parent.parent
# (test files, marker expression): the kernel tests' GPU cases, and the host-sync count whole
TESTS = [(["tests/test_kernels_decode.py", "tests/test_kernels_extend.py", "tests/test_kernels_plan.py",
           "tests/test_kernels_repack.py", "tests/test_kernel_selfcheck.py"], "gpu"),
         (["tests/test_host_syncs.py"], None)]
SHAPES = {"smollm2-135m (Hkv 3, g 3, D 64)": (3, 3, 64), "llama-8b (Hkv 8, g 4, D 128)": (8, 4, 128)}


def run_tests() -> dict:
    runs = []
    for files, marker in TESTS:
        files = [f for f in files if (ROOT / f).exists()]
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files] + (["-m", marker] if marker else [])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
        runs.append({"command": " ".join(cmd[2:]), "returncode": proc.returncode, "summary": tail,
                     **{k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)},
                     "failures": [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))][:20]})
    return {"returncode": max(r["returncode"] for r in runs), "summary": " | ".join(r["summary"] for r in runs),
            "runs": runs}


def run_selfchecks(device) -> list:
    out = []
    for name, (hkv, g, d) in SHAPES.items():
        for dtype in (torch.float16, torch.bfloat16):
            dispatch.enable_all()
            started = time.perf_counter()
            try:
                report = selfcheck.startup_report(device, dtype, head_dim=d, group_size=g)
                error = None
            except Exception as exc:  # a forced back-end failing, or the check itself
                report, error = {}, f"{type(exc).__name__}: {exc}"
            out.append({"shape": name, "dtype": str(dtype).replace("torch.", ""), "error": error,
                        "wall_ms": round((time.perf_counter() - started) * 1000, 1),
                        "impl": {op: (report.get(op) or {}).get("impl") for op in ("decode", "extend", "repack")},
                        "checks": {op: (report.get(op) or {}).get("checks") for op in ("decode", "extend", "repack")}})
    dispatch.enable_all()
    return out


def time_decode(device, requests: int, impl: str, iters: int, hkv=8, g=4, d=128, dtype=torch.bfloat16) -> float:
    """Milliseconds of one layer's decode attention: ``requests`` x ``hkv`` lists of 512-1024 cells."""
    gen = torch.Generator().manual_seed(requests)
    lens = torch.randint(512, 1025, (requests * hkv,), generator=gen)
    cells = int(lens.sum()) * 2
    q = torch.randn(requests * hkv, g, d, dtype=dtype, device=device)
    k = torch.randn(cells, d, dtype=dtype, device=device)
    v = torch.randn(cells, d, dtype=dtype, device=device)
    indptr = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    indptr[1:] = lens.cumsum(0)
    indptr = indptr.to(device)
    indices = torch.randperm(cells, device=device)[: int(lens.sum())].to(torch.int32)
    for _ in range(3):  # compile and warm
        paged_decode_attention(q, k, v, indptr, indices, d ** -0.5, impl=impl)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        paged_decode_attention(q, k, v, indptr, indices, d ** -0.5, impl=impl)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / iters


def run_timings(device, iters: int) -> list:
    impls = ["triton"] + (["flashinfer"] if dispatch.flashinfer_available() else [])
    rows = []
    for requests in (16, 64):
        row = {"requests": requests}
        for impl in impls:
            try:
                row[impl] = round(time_decode(device, requests, impl, iters), 3)
            except Exception as exc:
                row[impl] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None, help="also write the summary as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing to check (run it on a machine with an NVIDIA GPU)")
        return 2
    device = torch.device("cuda")
    summary = {"device": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
               "torch": torch.__version__, "flashinfer": dispatch.flashinfer_available()}
    summary["tests"] = run_tests()
    summary["selfcheck"] = run_selfchecks(device)
    summary["decode_ms_per_layer"] = run_timings(device, args.iters)
    ok = (summary["tests"]["returncode"] == 0 and not any(s["error"] for s in summary["selfcheck"])
          and all(not isinstance(v, str) for row in summary["decode_ms_per_layer"] for v in row.values()))
    summary["ok"] = ok
    print(json.dumps(summary, indent=1))
    print(f"gpu-check on {summary['device']}: tests {summary['tests']['summary']}; self-check back-ends "
          + ", ".join(f"{s['shape'].split()[0]}/{s['dtype']}: {s['impl']['decode']}" for s in summary["selfcheck"])
          + "; decode ms/layer " + ", ".join(f"{r}" for r in summary["decode_ms_per_layer"])
          + ("; OK" if ok else "; FAILED"))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
