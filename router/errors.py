"""Errors raised below the edge; the gRPC server maps each to one status code in one place."""

from __future__ import annotations


class MoeserveError(Exception):
    """Base class of the errors moeserve raises on purpose."""


class InvalidRequestError(MoeserveError):
    """The request is malformed; `field` names what the client must fix (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(MoeserveError):
    """Admission refused: the waiting queue is at its limit (RESOURCE_EXHAUSTED)."""


class EngineStoppedError(MoeserveError):
    """The engine is shutting down and takes no new work (UNAVAILABLE)."""


class ExpertsUnavailableError(MoeserveError):
    """Some experts have no live replica and could not be restored; names them (UNAVAILABLE)."""

    def __init__(self, experts: list[int], message: str = ""):
        super().__init__(message or f"experts unavailable: {sorted(experts)}")
        self.experts = sorted(experts)


class StepFailedError(MoeserveError):
    """The model step failed; the requests it carried are ended, others go on (UNAVAILABLE: retryable).

    `cause` is what the step raised (an expert group lost, a device error ...).
    """

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.cause = cause
