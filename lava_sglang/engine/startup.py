"""Scheduler start and what it shows: refuse, with one line, settings compression cannot run
with (``engine.startup_checks``); once the rank's device and KV pool exist, the kernel self-check
and warm-up (``kernels.selfcheck``); the settings and the kernel back-ends in ``/server_info``
(``kv_compression``, ``kv_kernels``); the live compression state in ``/server_info`` ->
``internal_states[i]["kv_compression"]``. No SGLang import at module level.
"""

from __future__ import annotations

import logging

from lava_sglang.engine import metrics
from lava_sglang.engine.accounting import snapshot
from lava_sglang.engine.settings import refuse_to_start, set_server_config
from lava_sglang.engine.startup_checks import attention_layers, unsupported_model, unsupported_settings
from lava_sglang.engine.state import REGISTRY
from lava_sglang.kernels.selfcheck import SelfCheckError, startup_report
from lava_sglang.server_args_patch import config_of

logger = logging.getLogger("lava_sglang")

META_KEY = "kv_compression"
KERNELS_KEY = "kv_kernels"
KERNELS_ATTR = "_lava_kv_kernels"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
INTERNAL_STATE = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"


def before_scheduler_init(self, server_args, *args, **kwargs):
    """Refuse to start with settings compression cannot run with (one error line, exit 1)."""
    config = config_of(server_args)
    set_server_config(config)
    REGISTRY.scheduler = self
    metrics.enable(getattr(server_args, "enable_metrics", False))
    if not config.enabled:
        return None
    from sglang.srt.arg_groups.model_override_base import resolving_view

    view = resolving_view(server_args)
    problems = unsupported_settings(view)
    chunk = getattr(view, "chunked_prefill_size", None)
    if config.prefill_compression == "chunked" and (chunk is None or int(chunk) <= 0):
        problems.append("--kv-prefill-compression chunked without chunked prefill (set --chunked-prefill-size)")
    if problems:
        refuse_to_start(f"lava-sglang: --kv-policy {config.policy} cannot run with: " + "; ".join(problems))
    logger.info("lava-sglang: KV compression %s", config.to_dict())
    return None


def after_scheduler_init(result, self, server_args, *args, **kwargs):
    """With compression on: refuse a model whose attention the compressed path cannot reproduce
    (``startup_checks.unsupported_model``: soft-capping, sliding windows, a hybrid SWA pool); then
    check the GPU kernel back-ends, falling back from the ones that fail
    (and compiling them: the warm-up), now that the model runner has selected this rank's device
    and the KV pool's dtype is known; the outcome goes to ``/server_info`` -> ``kv_kernels``."""
    config = config_of(server_args)
    if not config.enabled:
        return None
    model = getattr(getattr(getattr(self, "tp_worker", None), "model_runner", None), "model", None)
    problems = unsupported_model(attention_layers(model) if model is not None else [],
                                 bool(getattr(getattr(self, "model_config", None), "is_hybrid_swa", False)))
    if problems:
        refuse_to_start(f"lava-sglang: --kv-policy {config.policy} cannot run with: " + "; ".join(problems))
    try:  # the pool is SGLang's MHA pool in one allocation (engine.pool_alloc refuses any other)
        k = self.token_to_kv_pool_allocator.get_kvcache().k_buffer[0]  # [slots, Hkv, D]
        group = max(1, self.model_config.get_num_attention_heads(getattr(self, "tp_size", 1) or 1) // int(k.shape[1]))
    except Exception as exc:  # a report is not worth a failed start: say that nothing was checked
        logger.warning("lava-sglang: kernel self-check skipped (KV pool shape unknown: %r)", exc)
        setattr(self, KERNELS_ATTR, {"selfcheck": f"skipped (KV pool shape unknown: {exc!r})"})
        return None
    try:
        setattr(self, KERNELS_ATTR, startup_report(k.device, k.dtype, head_dim=int(k.shape[-1]), group_size=group))
    except SelfCheckError as exc:
        refuse_to_start(str(exc))
    return None


def after_get_init_info(result, self, *args, **kwargs):
    """Expose the compression settings and, with compression on, the kernel back-ends in use in
    the scheduler's info (merged into ``/server_info``)."""
    result[META_KEY] = config_of(self.server_args).to_dict()
    kernels = getattr(self, KERNELS_ATTR, None)
    if kernels is not None:
        result[KERNELS_KEY] = kernels
    return result


def after_get_internal_state(result, self, *args, **kwargs):
    """Live compression state in ``/server_info`` -> ``internal_states[i]["kv_compression"]``."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state[META_KEY] = snapshot(self.scheduler)
    return result


HOOKS = [
    (f"{SCHEDULER}.__init__", before_scheduler_init, "BEFORE", False),
    (f"{SCHEDULER}.__init__", after_scheduler_init, "AFTER", False),
    (f"{SCHEDULER}.get_init_info", after_get_init_info, "AFTER", False),
    (f"{INTERNAL_STATE}.get_internal_state", after_get_internal_state, "AFTER", False),
]
