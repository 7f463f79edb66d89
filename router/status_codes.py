"""The one place where errors raised below the edge become gRPC status codes.

Messages of the errors moeserve raises on purpose are written for the client and passed on; anything
unexpected becomes INTERNAL with a reference the operator finds in the log, never the exception text
(which may hold paths, tensors or other callers' data). A failed engine step is UNAVAILABLE (the
request may be retried): its cause is passed on when moeserve raised it on purpose, else logged
under a reference like any unexpected error.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from moeserve.router.errors import (
    EngineStoppedError,
    ExpertsUnavailableError,
    InvalidRequestError,
    MoeserveError,
    QueueFullError,
    StepFailedError,
)

log = logging.getLogger(__name__)

# Checked in order; the first matching class wins (subclasses before their bases).
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (ExpertsUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (StepFailedError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),  # asyncio.TimeoutError is TimeoutError
)

_HINTS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "; retry later with backoff",
    grpc.StatusCode.UNAVAILABLE: "; retry, possibly on another replica",
}


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message for an exception raised while serving a request."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return code, "deadline exceeded before the request finished"
            if isinstance(exc, StepFailedError):
                return code, _step_failed(exc) + _HINTS[code]
            return code, (str(exc) or cls.__name__) + _HINTS.get(code, "")
    ref = _log_unexpected("internal error", exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server logged the details"


def _step_failed(exc: StepFailedError) -> str:
    """What failed, for the client: moeserve's own message for the cause, else a log reference."""
    cause = exc.cause
    if isinstance(cause, MoeserveError) and str(cause):
        return f"the engine step running this request failed: {cause}"
    ref = _log_unexpected("engine step failed", cause)
    return f"the engine step running this request failed (ref {ref}; the server logged the cause)"


def _log_unexpected(what: str, exc: BaseException) -> str:
    ref = uuid.uuid4().hex[:12]
    log.error("%s (ref %s) while serving a request", what, ref, exc_info=exc)
    return ref


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the RPC with the status `exc` maps to (raises grpc.aio.AbortError, as context.abort does)."""
    code, message = to_status(exc)
    await context.abort(code, message)

