"""The gRPC edge over the real engine and the demo model, on loopback."""

from __future__ import annotations

import json
import math

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge_harness import code_of, long_stream, running_server, wait_until
from moeserve.router.client import AsyncClient, build_request
from moeserve.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")
MAX_MESSAGE = 32 * 1024


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    async with running_server(max_message_bytes=MAX_MESSAGE) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def client(server):
    async with AsyncClient(server.address) as c:
        yield c


async def assert_idle(server) -> None:
    """Every request has left the engine and its KV blocks are free again."""
    await wait_until(server, lambda: server.servicer.num_active == 0)
    stats = server.engine.stats()
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0), stats


async def test_health_and_reflection_answer(server, client):
    assert await client.health("") == health_pb2.HealthCheckResponse.SERVING
    assert await client.health("moeserve.v1.Inference") == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="moeserve.v1.GenerateRequest")]
    answers = [a async for a in stub.ServerReflectionInfo(iter(asks))]
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"moeserve.v1.Inference", "grpc.health.v1.Health"} <= names
    files = answers[1].file_descriptor_response.file_descriptor_proto
    assert any(b"GenerateRequest" in f for f in files)


async def test_model_info_describes_the_served_model(server, client):
    info = await client.model_info()
    mc = server.engine.model_config
    assert info.vocab_size == mc.vocab_size and info.context_length == server.engine.max_model_len
    assert info.architecture == mc.architectures[0] and info.model_type == mc.model_type
    assert info.num_experts == mc.moe.n_routed_experts and info.num_experts_per_tok == mc.moe.num_experts_per_tok
    assert info.num_layers == mc.num_hidden_layers and info.dtype == "float32" and info.model_name == "demo"
    assert info.max_prompt_tokens == info.context_length - 1 and info.max_stop_strings > 0 and info.max_logprobs == 20
    assert info.max_logit_bias == 300


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_p=0.95, top_k=20, seed=1234)])
async def test_stream_and_unary_give_the_same_tokens(server, client, sampling):
    unary = await client.generate(prompt="The quick brown fox", max_tokens=12, **sampling)
    msgs = [m async for m in client.generate_stream(prompt="The quick brown fox", max_tokens=12, **sampling)]
    streamed = [t for m in msgs for t in m.token_ids]
    assert streamed == list(unary.token_ids) and len(streamed) >= 1
    assert "".join(m.text for m in msgs) == unary.text
    last = msgs[-1]
    assert last.finish_reason == unary.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert last.usage.completion_tokens == len(streamed) == unary.usage.completion_tokens
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens > 0
    first = next(m for m in msgs if m.token_ids)
    assert first.time_to_first_token > 0 and unary.time_to_first_token > 0  # sent as soon as known
    assert len({m.request_id for m in msgs}) == 1 and msgs[0].request_id
    if unary.finish_reason == pb.length:
        assert len(streamed) == 12
    await assert_idle(server)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_p=0.95, top_k=20, seed=1234)])
async def test_logprobs_come_with_each_token_streamed_or_not(server, client, sampling):
    unary = await client.generate(prompt="The quick brown fox", max_tokens=8, ignore_eos=True, logprobs=3, **sampling)
    msgs = [m async for m in client.generate_stream(prompt="The quick brown fox", max_tokens=8, ignore_eos=True,
                                                    logprobs=3, **sampling)]
    streamed = [lp for m in msgs for lp in m.logprobs]
    assert [len(m.logprobs) for m in msgs] == [len(m.token_ids) for m in msgs]
    assert len(unary.logprobs) == len(unary.token_ids) == 8 and streamed == list(unary.logprobs)
    for token, lp in zip(unary.token_ids, unary.logprobs):
        assert len(lp.top_token_ids) == len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        if not sampling:  # greedy: the token is the most likely one
            assert token == lp.top_token_ids[0] and lp.logprob == lp.top_logprobs[0]
        elif token in lp.top_token_ids:
            assert lp.logprob == lp.top_logprobs[list(lp.top_token_ids).index(token)]
    plain = await client.generate(prompt="The quick brown fox", max_tokens=8, ignore_eos=True, **sampling)
    assert list(plain.token_ids) == list(unary.token_ids) and not plain.logprobs  # asking changes no token
    scored = [m async for m in client.generate_stream(prompt="The quick brown fox", max_tokens=8, ignore_eos=True,
                                                      prompt_logprobs=2, **sampling)]
    first = next(i for i, m in enumerate(scored) if m.token_ids)
    assert len(scored[first].prompt_logprobs) == plain.usage.prompt_tokens - 1 > 0
    assert all(not m.prompt_logprobs for i, m in enumerate(scored) if i != first)
    whole = await client.generate(prompt="The quick brown fox", max_tokens=8, ignore_eos=True, prompt_logprobs=2,
                                  **sampling)
    assert list(whole.prompt_logprobs) == list(scored[first].prompt_logprobs)
    assert [t for m in scored for t in m.token_ids] == list(whole.token_ids) == list(plain.token_ids)
    await assert_idle(server)


async def test_structured_output_over_grpc(server, client, monkeypatch):
    """Held to a JSON Schema or a list of choices; the spec compiles on a thread, not on the edge's event loop
    (which streams every other request meanwhile)."""
    import threading

    from moeserve.router.llm_engine import LLMEngine

    compiled_on, prepare = [], LLMEngine.prepare

    def recording(engine, params):
        compiled_on.append(threading.current_thread())
        return prepare(engine, params)

    monkeypatch.setattr(LLMEngine, "prepare", recording)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    resp = await client.generate(prompt="Answer:", max_tokens=40, structured_output={"json_schema": schema})
    assert resp.finish_reason == pb.eos and set(json.loads(resp.text)) == {"ok", "n"}
    streamed = [m async for m in client.generate_stream(prompt="Answer:", max_tokens=40,
                                                        structured_output={"choice": ["alpha", "beta"]})]
    assert "".join(m.text for m in streamed) in ("alpha", "beta") and streamed[-1].finish_reason == pb.eos
    assert len(compiled_on) == 2 and threading.main_thread() not in compiled_on
    await assert_idle(server)


async def test_request_id_is_echoed_and_ignore_eos_gives_exact_lengths(client):
    resp = await client.generate(token_ids=[3, 4, 5], max_tokens=9, ignore_eos=True, request_id="client-42")
    assert resp.request_id == "client-42"
    assert len(resp.token_ids) == 9 and resp.finish_reason == pb.length
    urgent = await client.generate(token_ids=[3, 4, 5], max_tokens=9, ignore_eos=True, priority=-7)
    assert list(urgent.token_ids) == list(resp.token_ids)  # a priority changes when, not what


def _invalid_requests(vocab: int, context: int):
    yield pb.GenerateRequest(max_tokens=4), "prompt"
    yield build_request(""), "prompt"
    yield build_request(token_ids=[]), "token_ids"
    yield build_request(token_ids=[1, vocab]), "token_ids[1]"
    yield build_request(token_ids=[1] * context), "token_ids"
    yield build_request(token_ids=[1] * 10, max_tokens=context - 5), "max_tokens"
    yield build_request("hi", max_tokens=context + 10), "max_tokens"
    yield build_request("hi", temperature=-1.0), "temperature"
    yield build_request("hi", temperature=math.nan), "temperature"
    yield build_request("hi", temperature=math.inf), "temperature"
    yield build_request("hi", top_p=0.0), "top_p"
    yield build_request("hi", top_p=1.5), "top_p"
    yield build_request("hi", top_k=-3), "top_k"
    yield build_request("hi", stop=[f"s{i}" for i in range(17)]), "stop"
    yield build_request("hi", stop=["x" * 300]), "stop[0]"
    yield build_request("hi", stop_token_ids=[vocab + 7]), "stop_token_ids[0]"
    yield build_request("hi", request_id="r" * 200), "request_id"
    yield build_request("hi", logprobs=50), "logprobs"
    yield build_request("hi", prompt_logprobs=21), "prompt_logprobs"
    yield build_request("hi", repetition_penalty=-1.0), "repetition_penalty"
    yield build_request("hi", frequency_penalty=9.0), "frequency_penalty"
    yield build_request("hi", max_tokens=2, min_tokens=3), "min_tokens"
    yield build_request("hi", logit_bias={vocab: 1.0}), f"logit_bias[{vocab}]"
    yield build_request("hi", structured_output={"json_schema": "{not json"}), "structured_output.json_schema"
    yield build_request("hi", structured_output={"regex": "(unclosed"}), "structured_output.regex"
    yield build_request("hi", structured_output={"json_object": False}), "structured_output.json_object"
    yield build_request("hi", structured_output={"choice": []}), "structured_output.choice"
    yield build_request("hi", structured_output={"json_object": True}, ignore_eos=True), "ignore_eos"
    empty = build_request("hi")
    empty.structured_output.SetInParent()
    yield empty, "structured_output"


async def test_every_invalid_request_is_refused_by_name_and_serving_goes_on(server, client):
    info = await client.model_info()
    cases = list(_invalid_requests(info.vocab_size, info.context_length))
    for req, field in cases:
        for send in (client.send, lambda r: _drain(client.send_stream(r))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await send(req)
            assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
            assert err.value.details().startswith(f"{field}: "), err.value.details()
    ok = await client.generate(prompt="still serving", max_tokens=4, ignore_eos=True)
    assert len(ok.token_ids) == 4
    await assert_idle(server)


async def _drain(call):
    """Every message left on a stream (read() style: long_stream() already read its first one)."""
    msgs = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        msgs.append(msg)
    return msgs


async def test_malformed_bytes_are_invalid_argument(server, client):
    for method in ("Generate", "Chat"):
        raw = client.channel.unary_unary(f"/moeserve.v1.Inference/{method}")  # bytes in, bytes out
        for garbage in (b"\xff\xff\xff\xff\xff", b"\x0a\x02\xff\xfe"):  # not protobuf; invalid UTF-8 in a string
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(garbage)
            assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("request: ") and method + "Request" in err.value.details()
    assert (await client.generate(prompt="ok", max_tokens=2, ignore_eos=True)).usage.completion_tokens == 2


async def test_message_size_limit(client):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.generate(prompt="a" * (MAX_MESSAGE + 1), max_tokens=1)
    assert code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await client.generate(prompt="ok", max_tokens=2, ignore_eos=True)).usage.completion_tokens == 2


async def test_duplicate_request_id_in_flight_is_refused(server, client):
    call = await long_stream(client, server, request_id="same-id")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.generate(prompt="hi", max_tokens=2, request_id="same-id")
    assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT and "already in flight" in err.value.details()
    call.cancel()
    await assert_idle(server)


async def test_cancelling_mid_stream_frees_the_kv_cache(server, client):
    call = await long_stream(client, server)
    stats = server.engine.stats()
    assert stats["running"] == 1 and stats["kv_blocks_used"] > 0
    assert call.cancel()
    await assert_idle(server)
    assert server.engine.stats()["kv_blocks_used"] == 0
    assert len((await client.generate(prompt="after", max_tokens=3, ignore_eos=True)).token_ids) == 3


async def test_deadline_is_passed_to_the_engine(server, client):
    limit = server.servicer.limits.context_length - 4
    for timeout in (0.001, 0.3):  # expires in flight (or before it starts): DEADLINE_EXCEEDED either way
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.generate(token_ids=[1, 2], max_tokens=limit, ignore_eos=True, timeout=timeout)
        assert code_of(err) == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_idle(server)
    assert len((await client.generate(prompt="after", max_tokens=3, ignore_eos=True)).token_ids) == 3


async def test_full_queue_answers_resource_exhausted_at_once():
    async with running_server(engine=dict(max_num_seqs=1, max_queued_requests=1)) as srv:
        async with AsyncClient(srv.address) as c:
            running = await long_stream(c, srv)  # holds the only running slot
            queued = c.generate_stream(token_ids=[9, 9], max_tokens=4, ignore_eos=True)
            await wait_until(srv, lambda: srv.servicer.num_active == 2)
            assert srv.engine.stats()["waiting"] == 1
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.generate(prompt="one too many", max_tokens=2)
            assert code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in err.value.details()
            running.cancel()
            assert len([t for m in await _drain(queued) for t in m.token_ids]) == 4
            await assert_idle(srv)


async def test_streams_per_caller_are_limited():
    async with running_server(max_streams_per_caller=2) as srv:
        async with AsyncClient(srv.address) as c:
            calls = [await long_stream(c, srv) for _ in range(2)]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.generate(prompt="third", max_tokens=2)
            assert code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and "per caller" in err.value.details()
            calls[0].cancel()
            await wait_until(srv, lambda: srv.servicer.num_active == 1)
            assert len((await c.generate(prompt="now fits", max_tokens=2, ignore_eos=True)).token_ids) == 2
            calls[1].cancel()
            await assert_idle(srv)


async def test_shutdown_lets_in_flight_work_finish_within_the_grace_period():
    async with running_server() as srv:
        async with AsyncClient(srv.address) as c:
            short = c.generate_stream(token_ids=[4, 4], max_tokens=3, ignore_eos=True)
            await wait_until(srv, lambda: srv.servicer.num_active == 1)
            await srv.stop(grace_s=120.0)  # returns as soon as the request is done, long before the grace ends
            msgs = await _drain(short)
            assert msgs[-1].finish_reason == pb.length and sum(len(m.token_ids) for m in msgs) == 3
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.generate(prompt="too late", max_tokens=2, timeout=10)
            assert code_of(err) == grpc.StatusCode.UNAVAILABLE


async def test_shutdown_cancels_what_outlives_the_grace_period():
    async with running_server() as srv:
        async with AsyncClient(srv.address) as c:
            health_watch = c.health_watch("")
            assert (await health_watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            long = await long_stream(c, srv)
            await srv.stop(grace_s=0)
            assert (await health_watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            msgs = await _drain(long)
            assert msgs[-1].finish_reason == pb.cancelled  # ended by the server, with a proper last message
            assert msgs[-1].usage.completion_tokens >= 1
            assert srv.engine.stats()["kv_blocks_used"] == 0
