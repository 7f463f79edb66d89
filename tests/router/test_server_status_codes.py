"""router/status_codes.py: the one table from errors to gRPC status codes."""

import grpc

from moeserve.router.errors import EngineStoppedError, ExpertsUnavailableError, InvalidRequestError, QueueFullError
from moeserve.router.status_codes import to_status


def test_status_mapping_is_one_table():
    assert to_status(InvalidRequestError("top_k", "must be >= 0"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert to_status(QueueFullError("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert to_status(EngineStoppedError("stopping"))[0] == grpc.StatusCode.UNAVAILABLE
    assert to_status(ExpertsUnavailableError([3, 1]))[0] == grpc.StatusCode.UNAVAILABLE
    assert to_status(TimeoutError())[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    code, message = to_status(RuntimeError("/secret/path tensor([1, 2])"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "ref " in message
