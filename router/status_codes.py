"""The one place where errors raised below the edge become gRPC status codes.

Messages of the errors moeserve raises on purpose are written for the client and passed on; anything
unexpected becomes INTERNAL with a reference the operator finds in the log, never the exception text
(which may hold paths, tensors or other callers' data).
"""

from __future__ import annotations

import logging
import uuid

import grpc

from moeserve.router.errors import (
    EngineStoppedError,
    ExpertsUnavailableError,
    InvalidRequestError,
    QueueFullError,
)

log = logging.getLogger(__name__)

# Checked in order; the first matching class wins (subclasses before their bases).
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (ExpertsUnavailableError, grpc.StatusCode.UNAVAILABLE),
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
            return code, (str(exc) or cls.__name__) + _HINTS.get(code, "")
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s) while serving a request", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server logged the details"


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the RPC with the status `exc` maps to (raises grpc.aio.AbortError, as context.abort does)."""
    code, message = to_status(exc)
    await context.abort(code, message)

