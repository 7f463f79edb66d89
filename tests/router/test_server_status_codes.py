"""router/status_codes.py: the one table from errors to gRPC status codes, and a failed step over a real server."""

import grpc
import pytest

from edge_harness import running_server, wait_until
from engine_fixtures import ExpertGate
from moeserve.router.client import AsyncClient
from moeserve.router.errors import (
    EngineStoppedError,
    ExpertsUnavailableError,
    InvalidRequestError,
    QueueFullError,
    StepFailedError,
)
from moeserve.router.status_codes import to_status


def test_status_mapping_is_one_table():
    assert to_status(InvalidRequestError("top_k", "must be >= 0"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert to_status(QueueFullError("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert to_status(EngineStoppedError("stopping"))[0] == grpc.StatusCode.UNAVAILABLE
    assert to_status(ExpertsUnavailableError([3, 1]))[0] == grpc.StatusCode.UNAVAILABLE
    assert to_status(TimeoutError())[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    code, message = to_status(RuntimeError("/secret/path tensor([1, 2])"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "ref " in message


def test_a_failed_step_is_unavailable_and_says_what_failed():
    code, message = to_status(StepFailedError(["r1"], ExpertsUnavailableError([5, 4])))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "engine step" in message and "experts unavailable: [4, 5]" in message and "retry" in message
    code, message = to_status(StepFailedError(["r1"], RuntimeError("/secret/path tensor([1, 2])")))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "engine step" in message and "retry" in message and "ref " in message and "secret" not in message


@pytest.mark.asyncio
async def test_a_failed_step_reaches_the_client_as_unavailable_and_the_server_goes_on():
    gate = ExpertGate()
    async with running_server(engine=dict(expert_backend=gate.install)) as server, \
            AsyncClient(server.address) as client:
        ask = dict(token_ids=[5, 6, 7, 8], max_tokens=6, ignore_eos=True)
        before = list((await client.generate(**ask)).token_ids)

        gate.fail_next(ExpertsUnavailableError([6, 7]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.generate(**ask)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "experts unavailable: [6, 7]" in err.value.details() and "retry" in err.value.details()

        gate.fail_next()  # an unexpected cause: its text stays in the server's log
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in client.generate_stream(**ask)]
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        details = err.value.details()
        assert "engine step" in details and "retry" in details and "injected" not in details

        assert list((await client.generate(**ask)).token_ids) == before
        await wait_until(server, lambda: server.servicer.num_active == 0)
        stats = server.engine.stats()
        assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0), stats


def test_a_failed_step_in_the_trunk_worker_is_unavailable_at_the_edge():
    from moeserve.router.trunk_worker import error_from, error_record

    record = error_record(StepFailedError(["r1"], RuntimeError("/secret/path device lost")))
    code, message = to_status(error_from(record))
    assert code == grpc.StatusCode.UNAVAILABLE and "retry" in message and "secret" not in message
    experts = error_from(error_record(StepFailedError(["r1"], ExpertsUnavailableError([2]))))
    code, message = to_status(experts)
    assert code == grpc.StatusCode.UNAVAILABLE and message.startswith("experts unavailable: [2]; retry")
