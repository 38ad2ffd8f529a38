"""The SGLang hooks of the engine integration: one table, the concatenation of each subsystem's
``HOOKS`` list, checked at start-up (``lava_sglang.plugin``). Each entry is (target, function,
hook type, needed only when compression is on). A hook needed only when compression is on is
gated (``plugin.gated``): under ``--kv-policy none`` it leaves SGLang's behaviour alone.

The subsystems (``docs/design.md``):

* ``startup``: refuse unsupported settings, ``/server_info``;
* ``settings``: server and per-request settings, the tokenizer-side 400s;
* ``pool_alloc``: the KV pool as one allocation (exact packing);
* ``forward`` (with ``steps``, ``prefill``, ``continuation``, ``compress``, ``layout``,
  ``decode``, ``replay``): the forward and attention interception;
* ``report``: ``meta_info``, metrics, log lines;
* ``release``: what a released row frees; ``accounting``: slots and invariants;
* ``parking`` (with ``parking_lot``) and ``admission``: parked conversations as a cache;
* ``long_prompts`` (with ``chunked``): compression during chunked prefill lifts the pool part of
  the length limit and admits on what one chunk needs;
* ``decode_admission`` (with ``decode_compression``): a request compressed during decode
  reserves its decode peak, not its whole output, and its output is not clipped by the pool.

Flow of one compressed request (scheduler process):

1. ``TpModelWorker.forward_batch_generation`` (AROUND), extend batch: the first time a request
   is prefilled we decide whether it will be compressed (policy on, it will decode, prompt long
   enough beyond its shared prefix ``P = req.kv.cache_protected_len``). If so it becomes a
   ``PendingRequest`` and ``req.skip_radix_cache_insert`` is set: its private range is never
   published to the radix tree (the radix rule).
2. ``RadixAttention.forward`` (AROUND) copies the post-RoPE queries of the prompt's last ``w``
   positions, in whichever chunk they occur, layer by layer.
3. After the forward of the chunk that completes the prompt, the request is compressed
   (``engine.compress``): kept cells of all layers packed into as few slots as they fill (the
   pool is one allocation, ``engine.pool_alloc`` / ``engine.cells``), the rest freed at once.
4. Decode batches holding a compressed request run attention through ``engine.decode``.
5. ``BasePrefixCache.free_kv_row`` (AROUND) skips the slots already freed, and
   ``release_kv_cache`` (AROUND) drops the state: release frees exactly what the request holds.
6. A compressed request retracted under memory pressure keeps its selection; its re-prefill
   applies it again and recomputes the generated tokens' attention as decode saw it
   (``engine.replay``), so its output is the same as without pressure.
"""

from __future__ import annotations

from lava_sglang.engine import (accounting, admission, decode_admission, forward, long_prompts, parking, pool_alloc,
                                release, report, settings, startup)

SUBSYSTEMS = (startup, settings, pool_alloc, forward, report, release, accounting, parking, admission, long_prompts,
              decode_admission)


def hook_specs():
    """(target, function, hook type, needed only with compression) for each engine hook."""
    return [spec for module in SUBSYSTEMS for spec in module.HOOKS]
