"""Host syncs per decode step and per extend step: a fixed few, none that grow with the number
of layers or requests (issue 35, item 2).

The engine's real code path runs on CPU tensors: the worker hook (``engine.forward``) around a
fake model forward whose layers call the ``RadixAttention`` hook, over a realistic state
(compressed requests with a shared prefix, uneven per-layer and per-head kept cells packed by
``CellSpace.packed``, appended decode tokens; uncompressed requests in the same batch), for
30 layers and 8 or 64 requests (and 2 layers). ``tests/sync_counting.py`` counts every host read
of a tensor that would be on the GPU and every blocking copy to it (how it tells them apart, and
what the stand-ins for the GPU back-ends do).

Steps: the first decode step of a batch (lists built), the next one (lists appended), an extend
step (continued turns over compressed layouts, their window captured, and uncompressed chunks;
its plan built as ``prefill.prepare_extend`` builds it). Lists of all layers built at once, and
layer by layer (above ``ALL_LAYERS_MAX``). Back-ends: ``torch`` as on CPU; ``triton`` with the
kernel launches stubbed; ``flashinfer`` against a stand-in module doing what flashinfer 0.7.2's
``plan`` does on the host. Not counted: the CUDA event waits of the FlashInfer glue
(``kernels/flashinfer_decode.py``: a wait for a point one step back), compression and
re-selection after a prefill (``prepare_extend`` / ``finish_extend``), anything inside SGLang or
a compiled kernel. On a GPU (``-m gpu``) the same steps run with the real kernels under
PyTorch's own detector, ``torch.cuda.set_sync_debug_mode("error")``.

``python tests/test_host_syncs.py`` prints the table (layers x requests, per step).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from sync_counting import SyncCounter, detail, table, use_backend

import lava_sglang.engine.forward as FW
import lava_sglang.engine.layout as LY
from lava_sglang.config import CompressionConfig
from lava_sglang.engine.cells import contiguous_kv_buffers, pool_cells
from lava_sglang.engine.layout import LayoutEntry, LayoutPlan, state_mid, uncompressed_entry
from lava_sglang.engine.state import REGISTRY, CompressedRequest, PendingRequest
from lava_sglang.engine.steps import ExtendStep
from lava_sglang.kernels import decode_attention as DA
from lava_sglang.kernels import extend_attention as EA

DEV = torch.device("cpu")  # stands for the GPU (tests/sync_counting.py)
HKV, G, D = 2, 2, 8
HQ = HKV * G
NEW_TOKENS = 3  # per request in the extend step


# ---------------------------------------------------------------------------- fake SGLang side
class Pool:
    """SGLang's MHA pool as the plugin allocates it with a policy: one allocation."""

    def __init__(self, n_layers: int, n_slots: int, device=DEV, dtype=torch.float32, head_dim: int = D):
        self.layer_num = n_layers
        shape = (HKV, head_dim)
        self.k_buffer, self.v_buffer = contiguous_kv_buffers(n_layers, n_slots, shape, shape, dtype, device)
        gen = torch.Generator().manual_seed(n_layers * 1000 + n_slots)
        for buf in self.k_buffer + self.v_buffer:
            buf.copy_(torch.randn(buf.shape, generator=gen))

    def get_key_buffer(self, layer_id):
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id):
        return self.v_buffer[layer_id]

    def set_kv_buffer(self, layer, loc, cache_k, cache_v):  # SGLang's MHATokenToKVPool.set_kv_buffer
        self.k_buffer[layer.layer_id][loc] = cache_k
        self.v_buffer[layer.layer_id][loc] = cache_v


class Mode:
    def __init__(self, decode: bool):
        self.decode = decode

    def is_decode(self):
        return self.decode

    def is_extend(self):
        return not self.decode


class World:
    """``R`` requests of which every other one is compressed, in a pool of ``n_layers`` layers
    (on ``device``: the CPU standing for the GPU, or a real GPU)."""

    def __init__(self, n_layers: int, R: int, seed: int = 0, device=DEV, dtype=torch.float32, head_dim: int = D):
        gen = torch.Generator().manual_seed(seed)
        self.n_layers, self.R, self.device, self.dtype, self.D = n_layers, R, torch.device(device), dtype, head_dim
        self.pool = Pool(n_layers, R * 100 + 64, self.device, dtype, head_dim)
        self.space = pool_cells(self.pool)
        self.req_to_token = torch.zeros(R + 1, 256, dtype=torch.int32, device=self.device)
        self.next_slot = 4  # slots 1..3: a shared prefix
        self.rows = list(range(1, R + 1))
        self.lens = {}
        self.reqs = [SimpleNamespace(rid=f"r{row}", kv=SimpleNamespace(req_pool_idx=row)) for row in self.rows]
        self.layers = [SimpleNamespace(layer_id=l, tp_q_head_num=HQ, tp_k_head_num=HKV, qk_head_dim=head_dim,
                                       v_head_dim=head_dim, scaling=head_dim ** -0.5) for l in range(n_layers)]
        for i, row in enumerate(self.rows):
            if i % 2:  # uncompressed
                S = 20 + int(torch.randint(0, 40, (1,), generator=gen))
                self.req_to_token[row, :S] = self.alloc(S)
                self.lens[row] = S
                continue
            P = 3 if i % 4 == 0 else 0
            L = 40 + int(torch.randint(0, 30, (1,), generator=gen))
            S = L + 2
            if P:
                self.req_to_token[row, :P] = torch.arange(1, P + 1, dtype=torch.int32, device=self.device)
            self.req_to_token[row, P:L] = self.alloc(L - P)
            lens = torch.randint(1, 9, (n_layers, HKV), generator=gen)  # LAVa-like uneven budgets
            total = int(lens.sum())
            K = self.space.slots_for(total)
            assert K < L - P
            cells = self.space.packed(self.req_to_token[row, P:P + K].to(torch.long), total)
            self.req_to_token[row, P + K:L] = 0  # freed at compression
            self.req_to_token[row, L:S] = self.alloc(S - L)
            mid_cells = list(torch.split(cells, lens.sum(1).tolist()))
            REGISTRY.compressed[row] = CompressedRequest(
                rid=f"r{row}", row=row, config=CompressionConfig(policy="lava", budget=8, window=4), prefix_len=P,
                prompt_len=L, kept_slots=K, mid_cells=mid_cells, mid_lens=lens, report={})
            self.lens[row] = S

    def alloc(self, n: int) -> torch.Tensor:
        slots = torch.arange(self.next_slot, self.next_slot + n, dtype=torch.int32, device=self.device)
        self.next_slot += n
        return slots

    def worker(self):
        runner = SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token),
                                 token_to_kv_pool=self.pool)
        return SimpleNamespace(model_runner=runner)

    def model(self, forward_batch, n_tokens: int):
        """The model forward: every layer's attention through the plugin's RadixAttention hook."""
        gen = torch.Generator().manual_seed(n_tokens)
        qkv = [tuple(torch.randn(n_tokens, n * self.D, generator=gen).to(self.device, self.dtype) for n in (HQ, HKV, HKV))
               for _ in self.layers]

        def forward(worker, batch):
            out = []
            for layer, (q, k, v) in zip(self.layers, qkv):
                out.append(FW.around_radix_attention_forward(stub_backend, layer, q, k, v, forward_batch))
            return out
        return forward

    def decode_step(self):
        """SGLang's prepare_for_decode (one new slot per request), then one forward."""
        loc = self.alloc(self.R)
        for i, row in enumerate(self.rows):
            self.req_to_token[row, self.lens[row]] = loc[i]
            self.lens[row] += 1
        seq = [self.lens[row] for row in self.rows]
        fb = SimpleNamespace(forward_mode=Mode(True), batch_size=self.R, out_cache_loc=loc,
                             req_pool_indices=torch.tensor(self.rows, device=self.device),
                             seq_lens=torch.tensor(seq, device=self.device), seq_lens_cpu=torch.tensor(seq),
                             req_pool_indices_cpu=None)
        batch = SimpleNamespace(reqs=self.reqs, forward_mode=fb.forward_mode)
        model = self.model(fb, self.R)
        return lambda: FW.around_forward_batch_generation(model, self.worker(), batch)

    def extend_step(self):
        """Every request brings NEW_TOKENS tokens: a continued turn over its compressed layout
        (window captured for its re-selection) or an uncompressed chunk; one plan as
        ``prefill.prepare_extend`` builds it (inside the counted step)."""
        entries, captures, offset = [], [], 0
        loc = self.alloc(self.R * NEW_TOKENS)
        for i, row in enumerate(self.rows):
            lo = self.lens[row]
            self.req_to_token[row, lo:lo + NEW_TOKENS] = loc[i * NEW_TOKENS:(i + 1) * NEW_TOKENS]
            self.lens[row] = hi = lo + NEW_TOKENS
            state = REGISTRY.compressed.get(row)
            if state is None:
                entries.append(uncompressed_entry(row, hi, NEW_TOKENS, offset))
            else:
                entries.append(LayoutEntry(row, state.prefix_len, state.prompt_len, hi, NEW_TOKENS, offset,
                                           state_mid(state)))
                pending = PendingRequest(rid=state.rid, row=row, config=state.config, prefix_len=state.prefix_len,
                                         prompt_len=hi)
                captures.append((pending, offset, offset + NEW_TOKENS, pending.window - NEW_TOKENS))
            offset += NEW_TOKENS
        mode = Mode(False)
        fb = SimpleNamespace(forward_mode=mode, batch_size=self.R, out_cache_loc=loc)
        batch = SimpleNamespace(reqs=self.reqs, forward_mode=mode)

        def prepare(batch_, req_to_token, space):
            return ExtendStep(captures, LayoutPlan(entries, req_to_token, space), whole_batch=True)
        model = self.model(fb, offset)
        return prepare, lambda: FW.around_forward_batch_generation(model, self.worker(), batch)


def stub_backend(*args, **kwargs):
    raise AssertionError("SGLang's attention backend ran: the plugin's attention did not") from sys.exc_info()[1]


@pytest.fixture
def backend(request, monkeypatch):
    return use_backend(request.param, monkeypatch)


# -------------------------------------------------------------------------------- measurement
def measure(n_layers: int, R: int, monkeypatch, per_layer: bool = False) -> tuple[dict, dict]:
    """Host syncs of: the first decode step (lists built), the next one (appended), an extend
    step (continued turns and uncompressed chunks); and the path each step took (index builds,
    FlashInfer wrappers planned, their back-ends)."""
    monkeypatch.setattr(FW, "server_config", lambda: CompressionConfig(policy="lava"))
    monkeypatch.setattr(FW, "finish_extend", lambda worker, batch, elapsed: None)
    monkeypatch.setattr(FW, "after_chunk", lambda batch: None)
    if per_layer:
        monkeypatch.setattr(LY, "ALL_LAYERS_MAX", 0)
    counter = SyncCounter()
    counts, paths = {}, {}
    builds = []
    real_build = LY.build_pair_indices
    monkeypatch.setattr(LY, "build_pair_indices", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    stub = sys.modules.get("flashinfer")
    stub = stub if hasattr(stub, "plans") else None  # the stand-in (flashinfer back-end) only
    REGISTRY.compressed.clear()
    LY.forget_decode_steps()
    LY._KEPT_CACHE.clear()
    try:
        with counter:
            world = World(n_layers, R)
            for name in ("decode (lists built)", "decode (appended)", "extend"):
                if name == "extend":
                    prepare, run = world.extend_step()
                    monkeypatch.setattr(FW, "prepare_extend", prepare)
                else:
                    run = world.decode_step()
                builds.clear()
                plans = len(stub.plans) if stub else 0
                counter.counting = True
                out = run()
                counter.counting = False
                assert len(out) == n_layers and all(o.shape[-1] == HQ * world.D for o in out)
                counts[name] = counter.take()
                step_plans = stub.plans[plans:] if stub else []
                paths[name] = dict(builds=len(builds), plans=len(step_plans), wrappers=len({id(w) for w in step_plans}),
                                   backends={w.backend for w in stub.wrappers} if stub else set())
    finally:
        REGISTRY.compressed.clear()
        LY.forget_decode_steps()
        LY._KEPT_CACHE.clear()
    return counts, paths


CONFIGS = [(2, 8), (30, 8), (30, 64)]


@pytest.mark.parametrize("per_layer", [False, True], ids=["all-layer lists", "per-layer lists"])
@pytest.mark.parametrize("backend", ["torch", "triton", "flashinfer"], indirect=True)
def test_host_syncs_per_step_do_not_grow_with_layers_or_requests(backend, per_layer, monkeypatch):
    """The same count for 2 layers x 8 requests, 30 x 8 and 30 x 64, per step, and at most a
    fixed few (0 now; issue 35 before: 15 per decode step and 284 per extend step at 30 layers
    with the torch kernels, growing with the layers)."""
    results = {}
    for n_layers, R in CONFIGS:
        results[n_layers, R], paths = measure(n_layers, R, monkeypatch, per_layer=per_layer)
        # the path each step took: appended lists are not rebuilt; FlashInfer plans each layer
        # once, on its own wrapper, with SGLang's back-end
        assert paths["decode (appended)"]["builds"] == 0 and paths["decode (lists built)"]["builds"] >= 1, paths
        if backend == "flashinfer":
            assert all(p["plans"] == p["wrappers"] == n_layers for p in paths.values()), paths
            assert paths["extend"]["backends"] == {"fa2"}, paths
    print(f"\n{backend}, {'per-layer' if per_layer else 'all-layer'} lists: host syncs per step\n{table(results)}")
    print(detail(results[CONFIGS[-1]]))
    for step in results[CONFIGS[0]]:
        totals = {cfg: sum(results[cfg][step].values()) for cfg in CONFIGS}
        assert len(set(totals.values())) == 1, f"{step}: {totals}\n{detail(results[CONFIGS[-1]])}"
        assert totals[CONFIGS[0]] <= 2, f"{step}: {totals}\n{detail(results[CONFIGS[-1]])}"


def test_counter_sees_what_syncs():
    """The counter itself: host reads of device tensors count, host tensors and device-side
    work do not."""
    counter = SyncCounter()
    with counter:
        dev = torch.arange(6, device=DEV)
        host = torch.arange(6)
        counter.counting = True
        dev.sum(), dev[torch.arange(2, device=DEV)], dev.to(torch.int32), host.tolist(), int(host[0]), host[host > 2]
        torch.repeat_interleave(dev, dev, output_size=15)
        dev.clone().masked_scatter_(dev > 2, dev)  # its CUDA version checks the sizes on the device
        assert not counter.take()
        host.to(DEV, non_blocking=True), torch.zeros(3, device=DEV)
        assert not counter.take()
        dev.tolist(), int(dev[0]), bool(dev[1]), dev.cpu(), dev.to("cpu"), torch.nonzero(dev), dev[dev > 2]
        host[dev[:1]] = dev[:1]  # a host tensor indexed by and assigned from device data
        torch.repeat_interleave(dev, dev)
        assert sum(counter.take().values()) == 9
        host.to(DEV), torch.tensor([1, 2], device=DEV), dev[host[:2]]  # blocking copies from the host
        assert sum(counter.take().values()) == 3


def test_decode_rows_and_lengths_come_from_host_data():
    """``DecodeStep`` takes the batch's rows from its requests (or ``req_pool_indices_cpu``) and
    its lengths from ``seq_lens_cpu``; the device tensors are read only when those are missing or
    do not cover the batch (rows SGLang appended for beam members)."""
    from lava_sglang.engine.steps import host_rows_and_lens

    reqs = [SimpleNamespace(kv=SimpleNamespace(req_pool_idx=r)) for r in (5, 2, 7)]
    counter = SyncCounter()
    with counter:
        fb = SimpleNamespace(req_pool_indices=torch.tensor([5, 2, 7], device=DEV), seq_lens=torch.tensor([9, 4, 30], device=DEV),
                             seq_lens_cpu=torch.tensor([9, 4, 30]), req_pool_indices_cpu=None)
        counter.counting = True
        assert host_rows_and_lens(fb, reqs) == ([5, 2, 7], [9, 4, 30])
        assert not counter.take()
        fb.req_pool_indices_cpu = torch.tensor([5, 2, 7])
        assert host_rows_and_lens(fb, []) == ([5, 2, 7], [9, 4, 30])
        assert not counter.take()
        fb.req_pool_indices_cpu, fb.seq_lens_cpu = None, None
        assert host_rows_and_lens(fb, reqs[:2]) == ([5, 2, 7], [9, 4, 30])  # both read back
        assert sum(counter.take().values()) == 2


def test_flashinfer_plan_args_come_from_the_host_copies():
    """What the glue hands FlashInfer's ``plan``: indptrs and last page lengths on the host (so
    ``plan`` reads nothing back), indices int32 on the device, the empty-list mask on the device;
    the device indptrs are read back only when no host copy is given."""
    from lava_sglang.kernels.flashinfer_decode import flashinfer_decode_plan_args
    from lava_sglang.kernels.flashinfer_extend import flashinfer_extend_plan_args

    counter = SyncCounter()
    with counter:
        kv_host, qo_host = torch.tensor([0, 3, 3, 7], dtype=torch.int32), torch.tensor([0, 1, 1, 3], dtype=torch.int32)
        kv_dev, qo_dev, cells = kv_host.to(DEV), qo_host.to(DEV), torch.arange(7, device=DEV)
        counter.counting = True
        dec = flashinfer_decode_plan_args(kv_dev, cells, DEV, kv_indptr_host=kv_host)
        ext = flashinfer_extend_plan_args(qo_dev, kv_dev, cells, DEV, qo_indptr_host=qo_host, kv_indptr_host=kv_host)
        assert not counter.take()
        flashinfer_decode_plan_args(kv_dev, cells, DEV)
        flashinfer_extend_plan_args(qo_dev, kv_dev, cells, DEV)
        assert sum(counter.take().values()) == 3  # one read per indptr without a host copy
        counter.counting = False
        for host in (dec.indptr, dec.last_page_len, ext.qo_indptr, ext.paged_kv_indptr, ext.paged_kv_last_page_len):
            assert not counter.is_dev(host) and host.dtype == torch.int32
        assert counter.is_dev(dec.indices) and counter.is_dev(ext.paged_kv_indices) and counter.is_dev(dec.empty)
    assert dec.indices.dtype == ext.paged_kv_indices.dtype == torch.int32 and dec.indices.tolist() == list(range(7))
    assert dec.indptr.tolist() == ext.paged_kv_indptr.tolist() == [0, 3, 3, 7]
    assert dec.last_page_len.tolist() == ext.paged_kv_last_page_len.tolist() == [1, 0, 1]
    assert dec.empty.tolist() == [False, True, False] and ext.qo_indptr.tolist() == [0, 1, 1, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["triton", "flashinfer"])
def test_no_stream_sync_on_a_gpu(impl, monkeypatch):
    """On a GPU, with the real kernels: PyTorch's own detector (``torch.cuda.set_sync_debug_mode``
    "error": a synchronizing call raises) stays quiet through an extend step and the decode steps
    after it (lists built, appended), 30 layers and 64 requests, after a warm-up round. Not seen
    by it: FlashInfer's event wait, its C++ planner and the compiled kernels."""
    from lava_sglang.kernels.dispatch import flashinfer_available

    if impl == "flashinfer" and not flashinfer_available():
        pytest.skip("flashinfer not importable")
    for mod in (DA, EA):
        monkeypatch.setattr(mod, "resolve_impl", lambda *args, **kwargs: impl)
    for name, value in (("server_config", lambda: CompressionConfig(policy="lava")),
                        ("finish_extend", lambda worker, batch, elapsed: None), ("after_chunk", lambda batch: None)):
        monkeypatch.setattr(FW, name, value)
    REGISTRY.compressed.clear()
    LY.forget_decode_steps()
    try:
        world = World(30, 64, device="cuda", dtype=torch.float16, head_dim=64)
        for mode in (0, "error"):  # a warm-up round (compiles, wrappers), then the checked one
            for name in ("extend", "decode (lists built)", "decode (appended)"):
                if name == "extend":
                    prepare, run = world.extend_step()
                    monkeypatch.setattr(FW, "prepare_extend", prepare)
                else:
                    run = world.decode_step()
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(mode)
                try:
                    out = run()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                assert all(bool(torch.isfinite(o).all()) for o in out), name
    finally:
        REGISTRY.compressed.clear()
        LY.forget_decode_steps()
        LY._KEPT_CACHE.clear()


if __name__ == "__main__":
    for impl in ("torch", "triton", "flashinfer"):
        for per_layer in (False, True):
            with pytest.MonkeyPatch.context() as mp:
                use_backend(impl, mp)
                results = {cfg: measure(*cfg, mp, per_layer=per_layer)[0] for cfg in CONFIGS}
            print(f"\n{impl}, {'per-layer' if per_layer else 'all-layer'} lists\n{table(results)}")
            print(detail(results[CONFIGS[-1]]))
