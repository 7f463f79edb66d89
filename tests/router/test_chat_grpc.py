"""Chat over gRPC (Chat, ChatStream): the messages rendered by the model's chat template, the reply's reasoning and tool
calls apart. The oracle is the HTTP front's /v1/chat/completions on the same server (tested against HF transformers'
template rendering and the tool-call formats in test_openai_http.py and test_tool_calls.py): the same body gives the
same tokens, content, reasoning and calls over both, whole and streamed; bad chats get INVALID_ARGUMENT naming the
ChatRequest field, and the server goes on serving."""

from __future__ import annotations

import json

import aiohttp
import grpc
import pytest

from chat_fixtures import TIME, WEATHER, args_fit, hermes_checkpoint, thinking_checkpoint  # noqa: F401 (fixtures)
from edge_harness import code_of, running_server
from moeserve.router.client import AsyncClient, build_chat_request
from moeserve.v1 import inference_pb2 as pb

_FINISH = {pb.length: "length", pb.stop: "stop", pb.eos: "stop", pb.tool_calls: "tool_calls"}


async def _http_chat(srv, http: aiohttp.ClientSession, body: dict) -> dict:
    async with http.post(f"http://127.0.0.1:{srv.http.port}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["choices"][0]


def _grpc_args(body: dict) -> dict:
    """An HTTP chat body as AsyncClient.chat's arguments (greedy, as the bodies here are)."""
    choice = body.get("tool_choice", "")
    if isinstance(choice, dict):
        choice = choice["function"]["name"]
    out = dict(messages=body["messages"], tools=body.get("tools", ()), tool_choice=choice,
               max_tokens=body["max_tokens"], temperature=0.0,
               logit_bias={int(k): v for k, v in body.get("logit_bias", {}).items()})
    for name in ("parallel_tool_calls", "chat_template_kwargs"):
        if name in body:
            out[name] = body[name]
    return out


def _as_openai(reply: pb.ChatResponse) -> dict:
    """A whole gRPC reply as the HTTP front's choice reads (calls without their ids: each request has its own)."""
    calls = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]
    return {"content": reply.content or None, "reasoning_content": reply.reasoning_content or None,
            "tool_calls": calls, "token_ids": list(reply.token_ids), "finish_reason": _FINISH[reply.finish_reason]}


def _http_as_openai(choice: dict) -> dict:
    message = choice["message"]
    calls = [{"type": "function", "function": c["function"]} for c in message.get("tool_calls", [])]
    return {"content": message["content"] or None, "reasoning_content": message.get("reasoning_content"),
            "tool_calls": calls, "token_ids": choice["token_ids"], "finish_reason": choice["finish_reason"]}


def _joined(messages: list[pb.ChatResponse]) -> pb.ChatResponse:
    """A streamed reply put together as a client does: deltas joined, each call from its pieces."""
    whole = pb.ChatResponse(request_id=messages[0].request_id)
    calls: dict[int, pb.ToolCall] = {}
    for m in messages:
        whole.content += m.content
        whole.reasoning_content += m.reasoning_content
        whole.token_ids.extend(m.token_ids)
        for piece in m.tool_calls:
            call = calls.setdefault(piece.index, pb.ToolCall(index=piece.index))
            call.id = call.id or piece.id
            call.name += piece.name
            call.arguments += piece.arguments
    whole.tool_calls.extend(calls[i] for i in sorted(calls))
    last = messages[-1]
    whole.finish_reason, whole.reasoning_tokens = last.finish_reason, last.reasoning_tokens
    whole.usage.CopyFrom(last.usage)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    return whole


async def _both(client: AsyncClient, body: dict) -> tuple[pb.ChatResponse, pb.ChatResponse, list[pb.ChatResponse]]:
    """The reply whole (Chat) and streamed (ChatStream, joined), and the stream's messages."""
    whole = await client.chat(**_grpc_args(body))
    streamed = [m async for m in client.chat_stream(**_grpc_args(body))]
    return whole, _joined(streamed), streamed


async def test_chat_and_its_tool_calls_are_the_http_fronts(hermes_checkpoint):
    """Free text (the model kept off <tool_call>), calls in the model's own format ("auto", pushed to <tool_call>),
    "required", a named function, and parallel calls cut short by max_tokens: the same tokens, content, calls and
    finish reason as the HTTP front's chat, whole and streamed (a call's name first, then its arguments in
    pieces). A call fed back as an assistant turn, and the tool's answer, render as HTTP renders them."""
    async with running_server(engine={"model": hermes_checkpoint}, http_port=0) as srv, \
            aiohttp.ClientSession() as http, AsyncClient(srv.address) as client:
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        ask = {"messages": messages, "tools": [WEATHER, TIME], "max_tokens": 60, "temperature": 0}
        push = {**ask, "logit_bias": {"512": 100}}  # <tool_call>
        bodies = [{**ask, "max_tokens": 12, "logit_bias": {"512": -100}},
                  {**push, "parallel_tool_calls": False},
                  {**ask, "tool_choice": "required", "parallel_tool_calls": False},
                  {**ask, "tool_choice": {"type": "function", "function": {"name": "weather"}}},
                  {**push, "max_tokens": 100}]
        for k, body in enumerate(bodies):
            want = _http_as_openai(await _http_chat(srv, http, body))
            whole, joined, streamed = await _both(client, body)
            assert _as_openai(whole) == want, (k, whole)
            assert _as_openai(joined) == want, k
            assert [c.name for c in joined.tool_calls] == [c.name for c in whole.tool_calls]
            assert whole.usage.completion_tokens == len(whole.token_ids) and whole.usage.prompt_tokens > 0
            if k == 0:
                assert not whole.tool_calls and whole.content and whole.finish_reason == pb.length
            elif k < 4:
                assert whole.finish_reason == pb.tool_calls and len(whole.tool_calls) == 1 and not whole.content
                call = whole.tool_calls[0]
                assert args_fit({"function": {"name": call.name, "arguments": call.arguments}})
                assert call.id and call.index == 0
                pieces = [p for m in streamed for p in m.tool_calls]
                assert pieces[0].name == call.name and pieces[0].id and len(pieces) > 3  # the name, then arguments
                if k == 3:
                    assert call.name == "weather"
            else:
                assert whole.finish_reason == pb.length and len(whole.tool_calls) >= 2
                assert len({c.id for c in whole.tool_calls}) == len(whole.tool_calls)

        call = whole.tool_calls[0]
        turn = messages + [{"role": "assistant", "content": "",
                            "tool_calls": [{"id": call.id, "function": {"name": call.name,
                                                                        "arguments": call.arguments}}]},
                           {"role": "tool", "content": "sunny", "tool_call_id": call.id}]
        body = {"messages": turn, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 6, "temperature": 0}
        want = _http_as_openai(await _http_chat(srv, http, body))
        whole, joined, _ = await _both(client, body)
        assert _as_openai(whole) == want and _as_openai(joined) == want
        text = srv.engine.tokenizer.apply_chat_template(turn, tools=[WEATHER])
        assert f'<tool_call>\n{{"name": "{call.name}", "arguments": {call.arguments}}}\n</tool_call>' in text


async def test_reasoning_comes_apart_over_grpc(thinking_checkpoint):
    """A template that spells </think>: reasoning_content and content as the HTTP front splits them, whole and
    streamed, with the reasoning block's tokens counted (reasoning_tokens, as HTTP's usage counts them);
    chat_template_kwargs reach the template; a structured answer after the reasoning block."""
    async with running_server(engine={"model": thinking_checkpoint}, http_port=0) as srv, \
            aiohttp.ClientSession() as http, AsyncClient(srv.address) as client:
        messages = [{"role": "user", "content": "Why is the sky blue?"}]
        for kwargs, bias in (({}, {}), ({}, {"515": 3}), ({"enable_thinking": False}, {})):
            body = {"messages": messages, "max_tokens": 24, "temperature": 0, "logit_bias": bias,
                    **({"chat_template_kwargs": kwargs} if kwargs else {})}
            async with http.post(f"http://127.0.0.1:{srv.http.port}/v1/chat/completions", json=body) as r:
                reply = await r.json()
            want = _http_as_openai(reply["choices"][0])
            whole, joined, _ = await _both(client, body)
            assert _as_openai(whole) == want and _as_openai(joined) == want, (kwargs, bias)
            thought = reply["usage"]["completion_tokens_details"]["reasoning_tokens"]
            assert whole.reasoning_tokens == joined.reasoning_tokens == thought
        assert whole.reasoning_content == "" and whole.content  # enable_thinking false: no block

        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        answer = await client.chat(messages, max_tokens=60, logit_bias={515: 3},
                                   structured_output={"json_schema": schema})
        assert answer.reasoning_content and set(json.loads(answer.content)) == {"ok"}
        assert answer.finish_reason == pb.eos


async def test_bad_chats_name_their_field_and_serving_goes_on(hermes_checkpoint):
    async with running_server(engine={"model": hermes_checkpoint}) as srv, AsyncClient(srv.address) as client:
        user = [{"role": "user", "content": "Hi"}]
        cases = [
            (build_chat_request([]), "messages"),
            (build_chat_request([{"role": "", "content": "Hi"}]), "messages[0].role"),
            (build_chat_request(user, tools=[{"name": "f", "parameters": "{not json"}]), "tools[0].parameters"),
            (build_chat_request(user, tools=[WEATHER, {"name": "f", "parameters": "[1, 2]"}]), "tools[1].parameters"),
            (build_chat_request(user, tools=[{"name": ""}]), "tools[0].name"),
            (build_chat_request(user, tools=[WEATHER], tool_choice="fly"), "tool_choice"),
            (build_chat_request(user, tool_choice="required"), "tool_choice"),
            (build_chat_request(user, chat_template_kwargs={"messages": []}), "chat_template_kwargs"),
            (build_chat_request(user, max_tokens=10**6), "params.max_tokens"),
            (build_chat_request(user, temperature=-1.0), "params.temperature"),
            (build_chat_request(user, tools=[WEATHER], tool_choice="weather", structured_output={"json_object": True}),
             "tool_choice"),
            (build_chat_request(user, continue_final_message=True), "continue_final_message"),
            (build_chat_request([{"role": "user", "content": "many words " * 4000}]), "messages"),
        ]
        given = build_chat_request(user)
        given.params.prompt = "also a prompt"
        cases.append((given, "params.prompt"))
        raw = build_chat_request(user)
        raw.chat_template_kwargs = "[1, 2"
        cases.append((raw, "chat_template_kwargs"))
        for request, field in cases:
            for call in (client._stub.Chat, client._stub.ChatStream):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    got = call(request)
                    if call is client._stub.ChatStream:
                        async for _ in got:
                            pass
                    else:
                        await got
                assert code_of(err) == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
                assert err.value.details().startswith(f"{field}:"), (field, err.value.details())
        reply = await client.chat(user, max_tokens=4, ignore_eos=True)
        assert len(reply.token_ids) == 4 and reply.finish_reason == pb.length
        out = await client.generate(token_ids=[5, 6, 7], max_tokens=3, ignore_eos=True)
        assert len(out.token_ids) == 3


def test_build_chat_request_carries_messages_tools_and_params():
    req = build_chat_request(
        [{"role": "system", "content": "Be brief."},
         {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                 "function": {"name": "weather",
                                                                              "arguments": {"city": "Rome"}}}]},
         {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "weather"}],
        tools=[WEATHER, {"name": "noop"}], tool_choice="required", parallel_tool_calls=False,
        chat_template_kwargs={"enable_thinking": False}, max_tokens=7, seed=3, stop=["\n"])
    assert [m.role for m in req.messages] == ["system", "assistant", "tool"]
    call = req.messages[1].tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == ("c1", "weather", {"city": "Rome"})
    assert req.messages[2].tool_call_id == "c1" and req.messages[2].name == "weather"
    assert json.loads(req.tools[0].parameters) == WEATHER["function"]["parameters"]
    assert req.tools[0].description == WEATHER["function"]["description"] and req.tools[1].parameters == ""
    assert req.tool_choice == "required" and req.HasField("parallel_tool_calls") and not req.parallel_tool_calls
    assert json.loads(req.chat_template_kwargs) == {"enable_thinking": False}
    assert req.params.WhichOneof("input") is None and req.params.max_tokens == 7 and req.params.seed == 3
    assert list(req.params.stop) == ["\n"]


async def test_a_cancelled_chat_stream_frees_its_kv_blocks_and_serving_goes_on(hermes_checkpoint):
    async with running_server(engine={"model": hermes_checkpoint}) as srv, AsyncClient(srv.address) as client:
        limit = srv.servicer.limits.context_length - 64
        call = client.chat_stream([{"role": "user", "content": "Tell me a long story."}], max_tokens=limit,
                                  ignore_eos=True)
        first = await call.read()
        assert first.token_ids and srv.engine.stats()["kv_blocks_used"] > 0
        assert call.cancel()
        await srv.servicer.wait_for(lambda: srv.servicer.num_active == 0)
        stats = srv.engine.stats()
        assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0), stats
        reply = await client.chat([{"role": "user", "content": "Hi"}], max_tokens=3, ignore_eos=True)
        assert len(reply.token_ids) == 3 and reply.finish_reason == pb.length
