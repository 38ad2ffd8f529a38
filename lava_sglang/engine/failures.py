"""One request's failure stays that request's: an exception inside compression, re-selection or
layout building aborts the request it happened for, with an error naming the stage, and the
scheduler keeps serving everyone else.

An exception that escaped a scheduler hook would end the scheduler process, and every request
with it. The guarded stages are the ones that run per request and change nothing before they
finish: choosing and planning a request's part of an extend forward, scoring and selecting its
cells, building a decode plan. Packing (moving the kept vectors and freeing the rest) runs only
after selection succeeded and is not guarded: it cannot be undone half-way.

An exception inside a layer's attention over a compressed layout (a kernel error) fails the
requests read over a layout, and the forward finishes with SGLang's own backend
(``engine.forward``).

Fault injection, for tests: ``LAVA_SGLANG_FAULT=compress,reselect,layout,decode,attention`` (any subset) makes
those stages raise for requests whose rid starts with ``lava-fault-`` (only the stages the rid
names, when it names any: ``lava-fault-reselect-1``). No SGLang import at
module level.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus

from lava_sglang.engine.state import REGISTRY

logger = logging.getLogger("lava_sglang")

FAULT_ENV = "LAVA_SGLANG_FAULT"
FAULT_RID_PREFIX = "lava-fault-"
STAGES = ("compress", "reselect", "layout", "decode", "attention")

TOTALS = {"failed_requests": 0}


def armed() -> bool:
    """Whether fault injection is on (tests only): callers skip their per-request loop otherwise."""
    return bool(os.environ.get(FAULT_ENV))


def inject(stage: str, req) -> None:
    """Raise when fault injection asks for ``stage`` and ``req`` is a fault request: a rid
    ``lava-fault-...`` that names stages (``lava-fault-reselect-1``) fails in those only, one
    that names none in every armed stage."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted:
        return
    rid = str(getattr(req, "rid", "") or "")
    if not rid.startswith(FAULT_RID_PREFIX) or stage not in {s.strip() for s in wanted.split(",")}:
        return
    named = set(rid[len(FAULT_RID_PREFIX):].split("-")) & set(STAGES)
    if not named or stage in named:
        raise RuntimeError(f"injected fault in {stage} ({FAULT_ENV}={wanted})")


def aborting(req) -> bool:
    """Whether ``req`` is being aborted already (by us or by SGLang)."""
    return getattr(req, "to_finish", None) is not None or getattr(req, "discard_output_reason", None) is not None


def abort(req, message: str, status=HTTPStatus.INTERNAL_SERVER_ERROR, err_type: str = "InternalServerError") -> bool:
    """Abort ``req`` at once, with ``message`` for its client; False when it is being aborted
    already. SGLang reads ``to_finish`` only after a request's last prefill chunk, so a request
    between chunks (the scheduler's ``chunked_req``) goes through SGLang's own chunked-request
    abort path instead: the next chunk never launches and its row is released at the next step
    (``Scheduler.process_pending_chunked_abort``)."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    if aborting(req):
        return False
    reason = FINISH_ABORT(message, status, err_type)
    scheduler = REGISTRY.scheduler
    if scheduler is not None and getattr(scheduler, "chunked_req", None) is req:
        req.discard_output_reason = reason
        scheduler._pending_chunked_abort_req = req
    else:
        req.to_finish = reason
    return True


def fail_request(req, stage: str, exc: BaseException) -> None:
    """Abort ``req`` (once) with an error naming the stage; SGLang finishes and releases it."""
    if aborting(req):
        return
    logger.error("lava-sglang: request %s failed in %s: %s: %s", getattr(req, "rid", "?"), stage,
                 type(exc).__name__, exc, exc_info=exc)
    abort(req, f"lava-sglang: KV compression failed for this request ({stage}): {type(exc).__name__}: {exc}")
    TOTALS["failed_requests"] += 1
