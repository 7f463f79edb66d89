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
    """Callables for the three RPCs, built from the messages alone.

    Not the generated `inference_pb2_grpc`: that module refuses to import under a grpcio older than
    the grpcio-tools that made it, and a client must run wherever grpcio and protobuf do.
    """

    def __init__(self, channel):
        gen = dict(request_serializer=pb.GenerateRequest.SerializeToString,
                   response_deserializer=pb.GenerateResponse.FromString)
        self.Generate = channel.unary_unary(f"/{SERVICE}/Generate", **gen)
        self.GenerateStream = channel.unary_stream(f"/{SERVICE}/GenerateStream", **gen)
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
