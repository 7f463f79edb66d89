"""The moeserve.v1.Inference servicer: Generate, GenerateStream and ModelInfo over one engine.

One request's path: parse -> per-caller stream limit -> validation -> engine (with the call's
deadline) -> responses. Whatever goes wrong becomes one status code through `status_codes`; a client
that goes away closes the engine's iterator, which aborts the request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import grpc

from moeserve.router import status_codes
from moeserve.router.auth import TokenSet, caller_identity
from moeserve.router.chat import ChatRead, ChatReader, ChatTemplate, body_of, constrain
from moeserve.router.errors import EngineStoppedError, InvalidRequestError, QueueFullError
from moeserve.router.sequence import MAX_LOGIT_BIAS, MAX_LOGPROBS
from moeserve.router.validation import Limits, ValidRequest, validate
from moeserve.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from moeserve.router.server import ServerConfig

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "moeserve.v1.Inference"


class TooManyStreamsError(QueueFullError):
    """A caller already has its share of calls in flight (RESOURCE_EXHAUSTED, like a full queue)."""


class _Malformed:
    """Stands for request bytes that do not parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, error: str):
        self.error = error


def _safe_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field ...
            return _Malformed(type(exc).__name__)

    return parse


_FINISH = {name: pb.FinishReason.Value(name) for name in ("length", "stop", "eos", "cancelled", "tool_calls")}
# ChatRequest's own fields: errors about them keep their names; a GenerateRequest field's are under params.
_CHAT_FIELDS = ("request", "messages", "tools", "tool_choice", "parallel_tool_calls", "params", "chat_template_kwargs",
                "continue_final_message")


def model_info(engine: Any, limits: Limits, dtype: str, model_name: str) -> pb.ModelInfoResponse:
    """Describe the served model from the engine's ModelConfig (models/config.py) and the edge's limits."""
    cfg = engine.model_config
    moe = cfg.moe
    return pb.ModelInfoResponse(
        architecture=cfg.architectures[0] if cfg.architectures else "",
        model_type=cfg.model_type,
        vocab_size=limits.vocab_size,
        context_length=limits.context_length,
        num_experts=moe.n_routed_experts,
        num_experts_per_tok=moe.num_experts_per_tok,
        num_shared_experts=moe.n_shared_experts,
        num_layers=cfg.num_hidden_layers,
        num_moe_layers=len(moe.moe_layer_ids),
        dtype=dtype,
        model_name=model_name,
        eos_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else 0,
        max_prompt_tokens=limits.max_prompt_tokens,
        max_tokens_limit=limits.max_tokens,
        default_max_tokens=min(limits.default_max_tokens, limits.max_tokens),
        max_stop_strings=limits.max_stop_strings,
        max_logprobs=MAX_LOGPROBS,
        max_logit_bias=MAX_LOGIT_BIAS,
    )


class InferenceServicer:
    """Generate, GenerateStream, Chat, ChatStream and ModelInfo over one AsyncEngine. `chat`: the model's chat
    template and how its replies read (router/chat.py); None: a model without a tokenizer, whose chats are refused."""

    def __init__(self, engine: Any, limits: Limits, info: pb.ModelInfoResponse, config: ServerConfig,
                 tokens: TokenSet | None = None, telemetry: Any = None, chat: ChatTemplate | None = None):
        self._engine = engine
        self.chat = chat
        self._telemetry = telemetry  # cluster.telemetry.Telemetry, or None: nothing recorded
        self._limits = limits
        self._info = info
        self._config = config
        self._tokens = tokens
        self._streams: Counter[str] = Counter()  # calls in flight per caller
        self._active: set[str] = set()  # engine request ids in flight
        self._changed = asyncio.Condition()  # notified whenever a request enters the engine or leaves
        self.draining = False

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def num_active(self) -> int:
        """Requests in the engine now (admitted, iterator not yet closed)."""
        return len(self._active)

    async def wait_for(self, predicate) -> None:
        """Return once `predicate()` holds; re-checked each time a request enters or leaves the engine."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _release(self, caller: str, request_id: str | None) -> None:
        self._streams[caller] -= 1
        if self._streams[caller] <= 0:
            del self._streams[caller]
        if request_id is not None:
            self._active.discard(request_id)
            await self._notify()

    def _encode(self, text: str) -> list[int]:
        if self._engine.tokenizer is None:
            raise InvalidRequestError("prompt", "this model has no tokenizer; send token_ids instead")
        return list(self._engine.tokenizer.encode(text))

    def _track(self, method: str, context: grpc.aio.ServicerContext) -> Any:
        return self.track(method, context.invocation_metadata())

    def track(self, method: str, metadata=None, span_name: str | None = None) -> Any:
        """The telemetry tracker of one request (a span, its metrics), or a no-op one when telemetry is off;
        `metadata`: (key, value) pairs, where a W3C traceparent names the caller's trace."""
        if self._telemetry is None:
            return _NO_TRACKER
        return self._telemetry.track_request(method, metadata, span_name)

    def record_error(self, code: str) -> None:
        """A call refused before it became a request (the HTTP front's: credentials, a body that is no request;
        the gRPC interceptor reports its own), by the name of its gRPC status code."""
        if self._telemetry is not None:
            self._telemetry.record_error(code)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException, tracker: Any) -> None:
        code, message = status_codes.to_status(exc)
        tracker.end(code.name)
        await context.abort(code, message)

    # -- one request ------------------------------------------------------------------------------
    async def _outputs(self, request: Any, context: grpc.aio.ServicerContext,
                       tracker: Any) -> AsyncIterator[tuple[str, Any]]:
        """Admit, validate and run one gRPC request; yields (request_id, RequestOutput) until it finishes."""
        if isinstance(request, _Malformed):
            raise InvalidRequestError("request", f"is not a valid moeserve.v1.GenerateRequest ({request.error})")
        if self.draining:
            raise EngineStoppedError("server is shutting down")
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        async with contextlib.aclosing(self.run_request(request, caller_identity(context, self._tokens), deadline,
                                                        tracker)) as outputs:
            async for item in outputs:
                yield item

    async def run_request(self, request: Any, caller: str, deadline: float | None,
                          tracker: Any = None) -> AsyncIterator[tuple[str, Any]]:
        """Admit, validate and run one GenerateRequest from `caller` (its limit of calls in flight applies);
        yields (request_id, RequestOutput) until it finishes. The gRPC methods and the HTTP front
        (router/openai_http.py) share it, and with it every limit and the shutdown's bookkeeping."""
        tracker = tracker or _NO_TRACKER
        if self.draining:
            raise EngineStoppedError("server is shutting down")
        if self._streams[caller] >= self._config.max_streams_per_caller:
            raise TooManyStreamsError(
                f"{self._streams[caller]} calls in flight from this caller, the limit per caller"
            )
        self._streams[caller] += 1
        request_id = None
        try:
            req: ValidRequest = validate(request, self._limits, self._encode)
            if req.request_id in self._active:
                raise InvalidRequestError("request_id", f"{req.request_id!r} is already in flight; use a unique id")
            request_id = req.request_id
            self._active.add(request_id)
            tracker.admitted(request_id, len(req.prompt_token_ids))
            prepare = getattr(self._engine, "prepare", None)  # (a trunk worker prepares in its own process)
            if prepare is not None:
                await prepare(req.params)
            stream = self._engine.generate(req.request_id, req.prompt_token_ids, req.params, deadline=deadline)
            await self._notify()
            finished = False
            try:
                async with contextlib.aclosing(stream):
                    async for out in stream:
                        finished = out.finished
                        if finished and out.finish_reason == "cancelled" and deadline is not None \
                                and time.monotonic() >= deadline:
                            raise TimeoutError(f"request {request_id} passed its deadline")
                        tracker.output(out)
                        yield request_id, out
            finally:
                if not finished:  # cancelled, deadline, error: make sure the engine lets go of it
                    with contextlib.suppress(Exception):
                        self._engine.abort(request_id)
        finally:
            await self._release(caller, request_id)

    @staticmethod
    def _response(request_id: str, out: Any, token_ids: list[int], text: str,
                  logprobs: list | None = None, prompt_logprobs: list | None = None) -> pb.GenerateResponse:
        msg = pb.GenerateResponse(request_id=request_id, token_ids=token_ids, text=text)
        for field, rows in ((msg.logprobs, logprobs), (msg.prompt_logprobs, prompt_logprobs)):
            for logprob, top_ids, top_logprobs in rows or ():
                field.add(logprob=logprob, top_token_ids=top_ids, top_logprobs=top_logprobs)
        if out.time_to_first_token is not None:
            msg.time_to_first_token = out.time_to_first_token
        if out.finished:
            msg.finish_reason = _FINISH.get(out.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED)
            msg.usage.prompt_tokens = out.prompt_tokens
            msg.usage.completion_tokens = out.completion_tokens
            msg.usage.cached_prompt_tokens = out.cached_prompt_tokens
        return msg

    # -- RPCs -------------------------------------------------------------------------------------
    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        outs = await self._read_all("Generate", context, lambda tracker: self._outputs(request, context, tracker))
        rid, last = outs[-1]
        return self._response(rid, last, [t for _, o in outs for t in o.new_token_ids],
                              "".join(o.new_text for _, o in outs), [lp for _, o in outs for lp in o.logprobs or ()],
                              next((o.prompt_logprobs for _, o in reversed(outs) if o.prompt_logprobs), None))

    async def _read_all(self, method: str, context: grpc.aio.ServicerContext,
                        outputs: Callable[[Any], AsyncIterator[tuple]]) -> list[tuple]:
        """A unary RPC's run: every item of outputs(tracker), once the request has finished; a failure aborts the
        call with its status."""
        tracker = self._track(method, context)
        items = []
        try:
            async with contextlib.aclosing(outputs(tracker)) as run:
                async for item in run:
                    items.append(item)
        except Exception as exc:
            await self._fail(context, exc, tracker)
        except BaseException:  # the client went away (the call's task is cancelled)
            tracker.end("CANCELLED")
            raise
        tracker.end()
        return items

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._write_all("GenerateStream", context, lambda tracker: self._outputs(request, context, tracker),
                              lambda rid, out: self._response(rid, out, out.new_token_ids, out.new_text, out.logprobs,
                                                              out.prompt_logprobs))

    async def _write_all(self, method: str, context: grpc.aio.ServicerContext,
                         outputs: Callable[[Any], AsyncIterator[tuple]], respond: Callable[..., Any]) -> None:
        """A server-streaming RPC: each item of outputs(tracker) written as the message respond(*item); a failure
        as its status. context.write rather than an async generator: a client that cancels interrupts this very
        coroutine, so the engine's iterator is closed (KV freed) right here, not when a GC runs."""
        tracker = self._track(method, context)
        try:
            async with contextlib.aclosing(outputs(tracker)) as items:
                async for item in items:
                    await context.write(respond(*item))
        except Exception as exc:
            if context.cancelled():  # the client went away while a write was in flight: not our error
                tracker.end("CANCELLED")
                return
            await self._fail(context, exc, tracker)
        except BaseException:  # the client went away (the call's task is cancelled)
            tracker.end("CANCELLED")
            raise
        tracker.end()

    # -- chat -------------------------------------------------------------------------------------
    def _chat_request(self, request: Any) -> tuple[pb.GenerateRequest, ChatRead, str | None]:
        """A ChatRequest as the engine request of its rendered messages (params' sampling, limits and stops; held to
        the tools' call format when they may be called), how its reply is read, and the field that asked for the
        constraint, if any (the engine's errors about it name that field)."""
        if isinstance(request, _Malformed):
            raise InvalidRequestError("request", f"is not a valid moeserve.v1.ChatRequest ({request.error})")
        if self.chat is None:
            raise InvalidRequestError("messages", "this model has no tokenizer, so no chat template; use Generate "
                                                  "with token_ids")
        params = request.params
        given = params.WhichOneof("input")
        if given is not None:
            raise InvalidRequestError(f"params.{given}", "must stay unset: the rendered messages are the prompt")
        structured = "params.structured_output" if params.HasField("structured_output") else None
        ids, read = self.chat.prepare(body_of(request), structured)
        req = pb.GenerateRequest()
        req.CopyFrom(params)
        req.token_ids.ids.extend(ids)
        return req, read, constrain(req, read, structured)

    @staticmethod
    def _chat_error(exc: BaseException, structured: str | None) -> BaseException:
        """An error about the engine request as the ChatRequest's fields name it: the prompt's (too long, with
        max_tokens past the context) under messages, which it was rendered from; the constraint under the field that
        asked for it; another GenerateRequest field under params."""
        if not isinstance(exc, InvalidRequestError) or exc.field.split("[")[0].split(".")[0] in _CHAT_FIELDS:
            return exc
        message = str(exc)[len(exc.field) + 2:]
        if exc.field in ("token_ids", "prompt"):
            return InvalidRequestError("messages", f"as rendered by the chat template, {message}")
        if exc.field.startswith("structured_output") and structured == "tools":
            return InvalidRequestError("tools", message)
        return InvalidRequestError(f"params.{exc.field}", message)

    async def _chat(self, request: Any, context: grpc.aio.ServicerContext, tracker: Any
                    ) -> AsyncIterator[tuple[str, Any, tuple[str, str, list[dict], str | None], ChatReader]]:
        """Run one ChatRequest; yields (request_id, RequestOutput, what its ChatReader read of it: reasoning,
        content, call pieces, finish reason; the reader) until it finishes."""
        structured = None
        try:
            req, read, structured = self._chat_request(request)
            reader = None
            async with contextlib.aclosing(self._outputs(req, context, tracker)) as outputs:
                async for rid, out in outputs:
                    reader = reader or ChatReader(read, rid)
                    # (the reader's "stop" is OpenAI's, end-of-sequence included)
                    finish = None if not out.finished else "stop" if out.finish_reason == "eos" else out.finish_reason
                    yield rid, out, reader.read(out.new_text, finish, len(out.new_token_ids)), reader
        except Exception as exc:
            named = self._chat_error(exc, structured)
            if named is exc:
                raise
            raise named from exc

    @staticmethod
    def _chat_response(rid: str, out: Any, token_ids: list[int], read: tuple, reader: ChatReader,
                       logprobs: list | None, calls: list[dict]) -> pb.ChatResponse:
        reasoning, content, _, finish = read
        msg = pb.ChatResponse(request_id=rid, content=content, reasoning_content=reasoning, token_ids=token_ids)
        for call in calls:
            function = call["function"]
            msg.tool_calls.add(index=call.get("index", 0), id=call.get("id", ""), name=function.get("name", ""),
                               arguments=function["arguments"])
        for logprob, top_ids, top_logprobs in logprobs or ():
            msg.logprobs.add(logprob=logprob, top_token_ids=top_ids, top_logprobs=top_logprobs)
        if out.time_to_first_token is not None:
            msg.time_to_first_token = out.time_to_first_token
        if out.finished:
            msg.finish_reason = _FINISH["tool_calls" if finish == "tool_calls" else out.finish_reason or "length"]
            msg.usage.prompt_tokens = out.prompt_tokens
            msg.usage.completion_tokens = out.completion_tokens
            msg.usage.cached_prompt_tokens = out.cached_prompt_tokens
            msg.reasoning_tokens = reader.reasoning_tokens
        return msg

    async def Chat(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        outs = await self._read_all("Chat", context, lambda tracker: self._chat(request, context, tracker))
        rid, last, (_, _, _, finish), reader = outs[-1]
        calls = [dict(c, index=i) for i, c in enumerate(reader.calls())]
        whole = ("".join(r[0] for _, _, r, _ in outs), "".join(r[1] for _, _, r, _ in outs), [], finish)
        return self._chat_response(rid, last, [t for _, o, _, _ in outs for t in o.new_token_ids], whole, reader,
                                   [lp for _, o, _, _ in outs for lp in o.logprobs or ()], calls)

    async def ChatStream(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._write_all("ChatStream", context, lambda tracker: self._chat(request, context, tracker),
                              lambda rid, out, read, reader: self._chat_response(rid, out, out.new_token_ids, read,
                                                                                 reader, out.logprobs, read[2]))

    async def ModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        return self._info

    def handler(self) -> grpc.GenericRpcHandler:
        parse = _safe_parser(pb.GenerateRequest)
        out = pb.GenerateResponse.SerializeToString
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_unary_rpc_method_handler(self.Generate, parse, out),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(self.GenerateStream, parse, out),
            "Chat": grpc.unary_unary_rpc_method_handler(self.Chat, _safe_parser(pb.ChatRequest),
                                                        pb.ChatResponse.SerializeToString),
            "ChatStream": grpc.unary_stream_rpc_method_handler(self.ChatStream, _safe_parser(pb.ChatRequest),
                                                               pb.ChatResponse.SerializeToString),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.ModelInfo, pb.ModelInfoRequest.FromString, pb.ModelInfoResponse.SerializeToString),
        })


class _NoTracker:
    """Stands in for cluster.telemetry.RequestTracker when telemetry is off."""

    def admitted(self, request_id: str, prompt_tokens: int) -> None:
        pass

    def output(self, out: Any) -> None:
        pass

    def end(self, code: str | None = None) -> None:
        pass


_NO_TRACKER = _NoTracker()
