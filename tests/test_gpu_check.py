"""The first-device script (``benchmarks/gpu_check.py``, ``make gpu-check``) on CPU: without a CUDA
device it says so and exits 2; its self-check part runs the real self-check (Triton in the
interpreter here) for every shape and dtype it reports. The rest needs a GPU."""

from __future__ import annotations

import torch

from benchmarks import gpu_check
from lava_sglang.kernels import selfcheck


def test_without_cuda_it_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_selfcheck_part_reports_each_shape_and_dtype(monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_VAR, "1")  # on CPU the self-check runs only when asked
    rows = gpu_check.run_selfchecks(torch.device("cpu"))
    assert len(rows) == 2 * len(gpu_check.SHAPES)
    for row in rows:
        assert row["error"] is None, row
        assert row["impl"] == {"decode": "torch", "extend": "torch", "repack": "torch"}, row  # CPU: torch serves
        assert all(checks == {"triton": "ok"} for checks in row["checks"].values()), row
