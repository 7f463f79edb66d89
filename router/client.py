"""A small client of the moeserve.v1.Inference API, async and sync, used by the CLI and the bench."""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import grpc

try:  # optional: without it, readiness is asked of ModelInfo instead of the health service
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError:
    health_pb2 = health_pb2_grpc = None

from moeserve.router.tls import ClientTLS
from moeserve.v1 import inference_pb2 as pb

SERVICE = "moeserve.v1.Inference"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # what the client accepts; unary answers carry every token


def build_request(
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    *,
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    include_stop_str_in_output: bool = False,
    stop_token_ids: Iterable[int] = (),
    ignore_eos: bool = False,
    request_id: str = "",
    logprobs: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    min_tokens: int = 0,
    priority: int = 0,
    logit_bias: dict[int, float] | None = None,
    structured_output: dict | None = None,
    prompt_logprobs: int | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; exactly one of `prompt` and `token_ids`. `structured_output`: one of
    {"json_schema": schema (a dict, or its JSON text)}, {"json_object": True}, {"regex": r"..."}, {"grammar": "..."},
    {"choice": ["a", "b"]}."""
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt and token_ids")
    req = pb.GenerateRequest(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, stop=list(stop),
        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, request_id=request_id,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, min_tokens=min_tokens,
        priority=priority, min_p=min_p, include_stop_str_in_output=include_stop_str_in_output,
    )
    if prompt is not None:
        req.prompt = prompt
    else:
        req.token_ids.ids.extend(token_ids)
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    if logprobs is not None:
        req.logprobs = logprobs
    if prompt_logprobs is not None:
        req.prompt_logprobs = prompt_logprobs
    if repetition_penalty is not None:
        req.repetition_penalty = repetition_penalty
    for token, bias in (logit_bias or {}).items():
        req.logit_bias[token] = bias
    if structured_output is not None:
        _structured_output(req.structured_output, structured_output)
    return req


def build_chat_request(
    messages: Sequence[dict],
    *,
    tools: Sequence[dict] = (),
    tool_choice: str = "",
    parallel_tool_calls: bool | None = None,
    chat_template_kwargs: dict | None = None,
    continue_final_message: bool = False,
    **params,
) -> pb.ChatRequest:
    """A ChatRequest from OpenAI-style messages ({"role", "content"}, and "name", "tool_call_id", "tool_calls": [{"id",
    "function": {"name", "arguments"}}] where they apply) and tools ({"type": "function", "function": {"name",
    "description", "parameters"}}, or the function alone); `params`: build_request's keyword arguments but the
    prompt (max_tokens, temperature, seed, stop, logprobs, structured_output, ...)."""
    req = pb.ChatRequest(tool_choice=tool_choice, continue_final_message=continue_final_message)
    for m in messages:
        msg = req.messages.add(role=m["role"], content=m.get("content") or "", name=m.get("name") or "",
                               tool_call_id=m.get("tool_call_id") or "")
        for i, call in enumerate(m.get("tool_calls") or ()):
            function = call.get("function", call)
            arguments = function.get("arguments", "{}")
            msg.tool_calls.add(index=i, id=call.get("id", ""), name=function["name"],
                               arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))
    for tool in tools:
        function = tool.get("function", tool)
        parameters = function.get("parameters")
        req.tools.add(name=function["name"], description=function.get("description", ""),
                      parameters="" if parameters is None else parameters if isinstance(parameters, str)
                      else json.dumps(parameters))
    if parallel_tool_calls is not None:
        req.parallel_tool_calls = parallel_tool_calls
    if chat_template_kwargs:
        req.chat_template_kwargs = json.dumps(chat_template_kwargs)
    req.params.CopyFrom(build_request(token_ids=(), **params))
    req.params.ClearField("input")
    return req


def _structured_output(msg: pb.StructuredOutput, spec: dict) -> None:
    if len(spec) != 1:
        raise ValueError(f"structured_output: give one of json_schema, json_object, regex, grammar, choice; got {spec!r}")
    ((kind, value),) = spec.items()
    fill_structured_output(msg, kind, value)


def fill_structured_output(msg: pb.StructuredOutput, kind: str, value) -> None:
    """Set one constraint of a StructuredOutput message: json_schema (a dict, or its JSON text), json_object,
    regex, grammar, choice (a list of strings), or structural_tag (its JSON text)."""
    if kind == "json_schema":
        msg.json_schema = value if isinstance(value, str) else json.dumps(value)
    elif kind == "choice":
        msg.choice.SetInParent()  # set even when empty, so that the server names what is wrong
        msg.choice.values.extend(value)
    elif kind in ("json_object", "regex", "grammar", "structural_tag"):
        setattr(msg, kind, value)
    else:
        raise ValueError(f"structured_output: unknown kind {kind!r}")


class _InferenceStub:
    """Callables for the RPCs, built from the messages alone.

    Not the generated `inference_pb2_grpc`: that module refuses to import under a grpcio older than
    the grpcio-tools that made it, and a client must run wherever grpcio and protobuf do.
    """

    def __init__(self, channel):
        gen = dict(request_serializer=pb.GenerateRequest.SerializeToString,
                   response_deserializer=pb.GenerateResponse.FromString)
        self.Generate = channel.unary_unary(f"/{SERVICE}/Generate", **gen)
        self.GenerateStream = channel.unary_stream(f"/{SERVICE}/GenerateStream", **gen)
        chat = dict(request_serializer=pb.ChatRequest.SerializeToString,
                    response_deserializer=pb.ChatResponse.FromString)
        self.Chat = channel.unary_unary(f"/{SERVICE}/Chat", **chat)
        self.ChatStream = channel.unary_stream(f"/{SERVICE}/ChatStream", **chat)
        self.ModelInfo = channel.unary_unary(f"/{SERVICE}/ModelInfo",
                                             request_serializer=pb.ModelInfoRequest.SerializeToString,
                                             response_deserializer=pb.ModelInfoResponse.FromString)


def _options(tls: ClientTLS | None) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return opts + (tls.channel_options() if tls else [])


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class AsyncClient:
    """grpc.aio client: `async with AsyncClient("127.0.0.1:50051") as c: await c.generate(prompt="hi")`."""

    def __init__(self, address: str, *, token: str | None = None, tls: ClientTLS | None = None):
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=_options(None))
        else:
            self.channel = grpc.aio.secure_channel(address, tls.credentials(), options=_options(tls))
        self._stub = _InferenceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel) if health_pb2_grpc else None
        self._metadata = _metadata(token)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def health(self, service: str = SERVICE, timeout: float | None = None, wait_for_ready: bool = False) -> int:
        """The health status (health_pb2.HealthCheckResponse.SERVING, NOT_SERVING ...) of `service`."""
        if self._health is None:
            raise RuntimeError("the health client needs grpcio-health-checking (pip install grpcio-health-checking)")
        resp = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=wait_for_ready
        )
        return resp.status

    def health_watch(self, service: str = SERVICE) -> grpc.aio.UnaryStreamCall:
        """A stream of health status changes of `service` (grpc.health.v1 Watch)."""
        return self._health.Watch(health_pb2.HealthCheckRequest(service=service))

    async def wait_ready(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until the server answers SERVING; raises otherwise."""
        if self._health is None:
            await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout, wait_for_ready=True,
                                       metadata=self._metadata)
            return
        status = await self.health(timeout=timeout, wait_for_ready=True)
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"server is up but not serving (health status {status})")

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfoResponse:
        return await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                       timeout: float | None = None, **params) -> pb.GenerateResponse:
        """The whole completion in one answer."""
        req = build_request(prompt, token_ids, **params)
        return await self._stub.Generate(req, timeout=timeout, metadata=self._metadata)

    def generate_stream(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                        timeout: float | None = None, **params) -> grpc.aio.UnaryStreamCall:
        """The completion as it is produced: `async for msg in call`; `call.cancel()` aborts it on the server."""
        req = build_request(prompt, token_ids, **params)
        return self._stub.GenerateStream(req, timeout=timeout, metadata=self._metadata)

    async def chat(self, messages: Sequence[dict], *, timeout: float | None = None, **params) -> pb.ChatResponse:
        """The chat's reply, whole: its content, reasoning_content and tool_calls (build_chat_request's arguments)."""
        return await self._stub.Chat(build_chat_request(messages, **params), timeout=timeout, metadata=self._metadata)

    def chat_stream(self, messages: Sequence[dict], *, timeout: float | None = None,
                    **params) -> grpc.aio.UnaryStreamCall:
        """The chat's reply as it is produced: `async for msg in call` (deltas of content, reasoning_content and the
        calls' pieces); `call.cancel()` aborts it on the server."""
        return self._stub.ChatStream(build_chat_request(messages, **params), timeout=timeout, metadata=self._metadata)

    async def send(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                   metadata: Sequence[tuple[str, str]] = ()) -> pb.GenerateResponse:
        """Unary Generate with a prebuilt request and extra metadata (e.g. a W3C `traceparent`)."""
        return await self._stub.Generate(request, timeout=timeout, metadata=(*(self._metadata or ()), *metadata))

    def send_stream(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> grpc.aio.UnaryStreamCall:
        return self._stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)


class Client:
    """Blocking client with the same methods, for scripts: `Client(addr).generate(prompt="hi")`."""

    def __init__(self, address: str, *, token: str | None = None, tls: ClientTLS | None = None):
        if tls is None:
            self.channel = grpc.insecure_channel(address, options=_options(None))
        else:
            self.channel = grpc.secure_channel(address, tls.credentials(), options=_options(tls))
        self._stub = _InferenceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel) if health_pb2_grpc else None
        self._metadata = _metadata(token)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float) -> None:
        if self._health is None:
            self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout, wait_for_ready=True, metadata=self._metadata)
            return
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout, wait_for_ready=True)
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"server is up but not serving (health status {resp.status})")

    def model_info(self, timeout: float | None = None) -> pb.ModelInfoResponse:
        return self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                 timeout: float | None = None, **params) -> pb.GenerateResponse:
        return self._stub.Generate(build_request(prompt, token_ids, **params), timeout=timeout, metadata=self._metadata)

    def generate_stream(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                        timeout: float | None = None, **params):
        """An iterator of GenerateResponse messages; `.cancel()` on it aborts the request."""
        req = build_request(prompt, token_ids, **params)
        return self._stub.GenerateStream(req, timeout=timeout, metadata=self._metadata)

    def chat(self, messages: Sequence[dict], *, timeout: float | None = None, **params) -> pb.ChatResponse:
        return self._stub.Chat(build_chat_request(messages, **params), timeout=timeout, metadata=self._metadata)

    def chat_stream(self, messages: Sequence[dict], *, timeout: float | None = None, **params):
        """An iterator of ChatResponse messages; `.cancel()` on it aborts the request."""
        return self._stub.ChatStream(build_chat_request(messages, **params), timeout=timeout, metadata=self._metadata)
