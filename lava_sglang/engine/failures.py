"""One request's failure stays that request's: an exception inside compression, re-selection or
layout building aborts the request it happened for, with an error naming the stage, and the
scheduler keeps serving everyone else.

An exception that escaped a scheduler hook would end the scheduler process, and every request
with it. The guarded stages are the ones that run per request and change nothing before they
finish: choosing and planning a request's part of an extend forward, scoring and selecting its
cells, building a decode plan. Packing (moving the kept vectors and freeing the rest) runs only
after selection succeeded and is not guarded: it cannot be undone half-way.

Fault injection, for tests: ``LAVA_SGLANG_FAULT=compress,reselect,layout`` (any subset) makes
those stages raise for requests whose rid starts with ``lava-fault-``. No SGLang import at
module level.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus

logger = logging.getLogger("lava_sglang")

FAULT_ENV = "LAVA_SGLANG_FAULT"
FAULT_RID_PREFIX = "lava-fault-"
STAGES = ("compress", "reselect", "layout", "decode")

TOTALS = {"failed_requests": 0}


def armed() -> bool:
    """Whether fault injection is on (tests only): callers skip their per-request loop otherwise."""
    return bool(os.environ.get(FAULT_ENV))


def inject(stage: str, req) -> None:
    """Raise when fault injection asks for ``stage`` and ``req`` is a fault request."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted:
        return
    rid = str(getattr(req, "rid", "") or "")
    if rid.startswith(FAULT_RID_PREFIX) and stage in {s.strip() for s in wanted.split(",")}:
        raise RuntimeError(f"injected fault ({FAULT_ENV}={wanted})")


def fail_request(req, stage: str, exc: BaseException) -> None:
    """Abort ``req`` (once) with an error naming the stage; SGLang finishes and releases it."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    if getattr(req, "to_finish", None) is not None:
        return
    logger.error("lava-sglang: request %s failed in %s: %s: %s", getattr(req, "rid", "?"), stage,
                 type(exc).__name__, exc, exc_info=exc)
    message = f"lava-sglang: KV compression failed for this request ({stage}): {type(exc).__name__}: {exc}"
    req.to_finish = FINISH_ABORT(message, HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")
    TOTALS["failed_requests"] += 1
