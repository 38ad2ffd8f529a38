"""Plan once per forward, run per layer: ``DecodePlan`` / ``ExtendPlan`` against the one-call
functions (themselves checked against the naive references in test_kernels_decode.py and
test_kernels_extend.py), for the torch twins and the Triton kernels (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from lava_sglang.kernels.decode_attention import DecodePlan, paged_decode_attention_torch
from lava_sglang.kernels.extend_attention import ExtendPlan, paged_extend_attention_torch
from lava_sglang.kernels.pair_indices import PairIndices

G, D, C = 3, 32, 500


def _layers(lens_per_layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, lens in enumerate(lens_per_layer):
        indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(torch.tensor(lens), 0)
        out[layer] = PairIndices(indptr, torch.randint(0, C, (int(indptr[-1]),), generator=gen))
    return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_decode_plan_of_all_layers_equals_one_call_per_layer(impl):
    layers = _layers([[7, 0, 300, 12], [1, 90, 90, 2], [40, 41, 0, 0]])
    k, v = torch.randn(C, D), torch.randn(C, D)
    plan = DecodePlan("cpu", D, torch.float32, impl).plan(layers)
    for layer, pairs in layers.items():
        q = torch.randn(4, G, D)
        want = paged_decode_attention_torch(q, k, v, pairs.kv_indptr, pairs.kv_indices, 0.2)
        torch.testing.assert_close(plan.run(layer, q, k, v, 0.2), want, rtol=1e-4, atol=1e-5)


def test_decode_plan_plans_layers_added_later():
    layers = _layers([[5, 6], [300, 1]])
    k, v = torch.randn(C, D), torch.randn(C, D)
    plan = DecodePlan("cpu", D, torch.float32).plan({0: layers[0]})
    assert list(plan.layers) == [0]
    plan.plan(layers)
    q = torch.randn(2, G, D)
    want = paged_decode_attention_torch(q, k, v, layers[1].kv_indptr, layers[1].kv_indices, 0.2)
    torch.testing.assert_close(plan.run(1, q, k, v, 0.2), want)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_extend_plan_of_all_layers_equals_one_call_per_layer(impl):
    qo = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)
    layers = _layers([[7, 0, 300, 12], [3, 90, 90, 5], [40, 41, 1, 9]])
    k, v = torch.randn(C, D), torch.randn(C, D)
    plan = ExtendPlan(qo, 9, "cpu", (G, D, D), torch.float32, impl).plan(layers)
    for layer, pairs in layers.items():
        q = torch.randn(9, G, D)
        want = paged_extend_attention_torch(q, k, v, qo, pairs.kv_indptr, pairs.kv_indices, 0.2)
        torch.testing.assert_close(plan.run(layer, q, k, v, 0.2), want, rtol=1e-4, atol=1e-5)


def test_extend_plan_checks_lengths_when_planning():
    qo = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="queries but only"):
        ExtendPlan(qo, 5, "cpu", (G, D, D)).plan(_layers([[3]]))
