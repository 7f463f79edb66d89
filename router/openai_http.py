"""An OpenAI-compatible HTTP front beside the gRPC edge (`moeserve serve --http-port N`).

`POST /v1/completions` (a prompt, text or token ids, or a batch of them) and `POST /v1/chat/completions`
(messages, rendered with the checkpoint's chat template), each the whole reply or server-sent events with
`"stream": true`; `GET /v1/models` (and `/v1/models/{model}`), `GET /health`, and vLLM's `POST /tokenize` and
`POST /detokenize`. A request becomes a moeserve.v1.GenerateRequest and runs through
`InferenceServicer.run_request`, as a gRPC call does: the same validation (errors name the field, which is the
OpenAI parameter's name), limits, bearer tokens, priorities and graceful shutdown.

As in OpenAI's API, `temperature` defaults to 1 (gRPC's to 0, greedy), and EOS ends a completion with
finish_reason "stop". Parameters beyond OpenAI's, as vLLM takes them: top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output, priority, stream_options'
continuous_usage_stats; each choice carries its `token_ids` too (the completion's).

Structured output: OpenAI's `response_format` (`json_object`, `json_schema`) or vLLM's `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar`.

Chat `tools` are rendered by the chat template. With the model's tool-call format known (router/tool_calls.py: told by
the template, or `serve --tool-call-format`), `tool_choice` "auto" (the default), "required" or a named function
hold the output to that format's structural tag, and calls come back as `tool_calls` (streamed: a call's name, then
its arguments as they are written). Without it, "required" and a named function make the whole output the call(s)
as JSON, and "auto" is refused. A reply's reasoning block comes apart as `reasoning_content` (router/reasoning.py).

`n` choices (and `best_of`, of which the n with the highest mean log-probability per token are returned) are n
engine requests with the same prompt; the first runs alone until its first token, so that the others find the
prompt in the prefix cache. With a `seed`, choice i samples with seed + i (as vLLM does). `echo` puts the prompt
before the completion's text. Not supported (refused by name): `suffix`, and `echo` with `logprobs` (the prompt's
log-probabilities are not computed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from moeserve.router import status_codes
from moeserve.router.auth import TokenSet, bearer_token
from moeserve.router.chat import ChatRead, ChatReader, ChatTemplate, constrain
from moeserve.router.client import fill_structured_output
from moeserve.router.errors import InvalidRequestError
from moeserve.router.sequence import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS
from moeserve.router.tool_calls import ToolFormat
from moeserve.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

_HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
         "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
_FINISH = {"eos": "stop"}  # OpenAI ends on EOS with "stop"; length, stop, cancelled as they are
# JSON parameter -> (GenerateRequest field, Python types accepted). Absent or null: the field's default.
_NUMBERS = {"max_tokens": int, "top_p": float, "top_k": int, "min_p": float, "seed": int, "logprobs": int,
            "presence_penalty": float,
            "frequency_penalty": float, "repetition_penalty": float, "min_tokens": int, "priority": int}
MAX_CHOICES = 16  # n and best_of at most
MAX_PROMPTS = 64  # prompts in one /v1/completions request (a batch, as lm-evaluation-harness sends them)


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": None}}
    return web.json_response(body, status=status)


def _number(body: dict, name: str, kind: type) -> Any:
    value = body.get(name)
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        raise InvalidRequestError(name, f"must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    return value


def generate_request(body: Any, model_name: str) -> tuple[pb.GenerateRequest, bool, bool, str | None, list]:
    """A /v1/completions body as (GenerateRequest of its first prompt, stream, include_usage, the parameter that asked
    for a structured output, every prompt: a string or a list of token ids); InvalidRequestError naming the
    parameter, _Refused(404) for another model."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise _Refused(404, f"model {model!r} is not served here; GET /v1/models lists {model_name!r}", "model")
    if body.get("suffix") is not None:
        raise InvalidRequestError("suffix", "is not supported")
    req = pb.GenerateRequest()
    prompts = _prompts(body.get("prompt"))
    _set_prompt(req, prompts[0])
    temperature = body.get("temperature")
    req.temperature = 1.0 if temperature is None else _number(body, "temperature", float)
    for name, kind in _NUMBERS.items():
        if body.get(name) is not None:
            value = _number(body, name, kind)
            if kind is int and name not in ("seed", "priority") and value < 0:
                raise InvalidRequestError(name, f"must be >= 0, got {value}")
            if name == "seed" and not 0 <= value < 2**64:
                raise InvalidRequestError(name, f"must be in [0, 2**64), got {value}")
            if name == "priority" and not -2**31 <= value < 2**31:
                raise InvalidRequestError(name, f"must be a 32-bit integer, got {value}")
            setattr(req, name, value)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("stop", "must be a string or a list of strings")
    req.stop.extend(stops)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
                                                 for t in stop_ids):
        raise InvalidRequestError("stop_token_ids", "must be a list of token ids")
    req.stop_token_ids.extend(stop_ids)
    for name in ("ignore_eos", "stream", "include_stop_str_in_output"):
        if not isinstance(body.get(name, False), bool):
            raise InvalidRequestError(name, f"must be true or false, got {body[name]!r}")
    req.ignore_eos = body.get("ignore_eos", False)
    req.include_stop_str_in_output = body.get("include_stop_str_in_output", False)
    _logit_bias(body, req)
    structured = _structured_output(body, req)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options", "must be an object")
    return req, body.get("stream", False), bool(options.get("include_usage", False)), structured, prompts


def _prompts(prompt: Any) -> list:
    """The completions' `prompt`: a string, a list of token ids, or a batch of those (at most MAX_PROMPTS)."""
    def one(p: Any) -> bool:
        return isinstance(p, str) or (isinstance(p, list) and bool(p) and
                                      all(isinstance(t, int) and not isinstance(t, bool) for t in p))

    batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
        else [prompt]
    if not all(one(p) for p in batch):
        raise InvalidRequestError("prompt", "must be a string, a list of token ids, or a list of those")
    if len(batch) > MAX_PROMPTS:
        raise InvalidRequestError("prompt", f"{len(batch)} prompts is over the limit of {MAX_PROMPTS}")
    if any(not 0 <= t < 2**32 for p in batch if isinstance(p, list) for t in p):
        raise InvalidRequestError("prompt", "token ids must be in [0, 2**32)")
    return batch


def _set_prompt(req: pb.GenerateRequest, prompt: str | list) -> None:
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.token_ids.ids[:] = prompt


def _logit_bias(body: dict, req: pb.GenerateRequest) -> None:
    """OpenAI's logit_bias, {"token id": bias}, into the request's map (the engine checks the ids against the
    vocabulary)."""
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise InvalidRequestError("logit_bias", "must be an object mapping token ids to biases")
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError("logit_bias", f"{len(bias)} tokens is over the limit of {MAX_LOGIT_BIAS}")
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError("logit_bias", f"keys must be token ids, got {key!r}") from None
        if not 0 <= token < 2**32:
            raise InvalidRequestError("logit_bias", f"keys must be token ids, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise InvalidRequestError(f"logit_bias[{key}]", f"must be a number in [-{LOGIT_BIAS_RANGE:g}, "
                                                            f"{LOGIT_BIAS_RANGE:g}], got {value!r}")
        req.logit_bias[token] = value


_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}  # vLLM's parameters -> StructuredOutput's kinds


def _structured_output(body: dict, req: pb.GenerateRequest) -> str | None:
    """OpenAI's response_format (json_object, json_schema) or one of vLLM's guided_json / guided_regex /
    guided_choice / guided_grammar, into the request's structured_output (the engine compiles it); the parameter
    that asked for it (the engine's errors are reported under its name), else None."""
    given: list[tuple[str, str, Any]] = []  # (parameter, kind, value)
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise InvalidRequestError("response_format", 'must be {"type": "text"}, {"type": "json_object"} or '
                                                         '{"type": "json_schema", "json_schema": {"schema": ...}}')
        if kind == "json_object":
            given.append(("response_format", "json_object", True))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
                raise InvalidRequestError("response_format.json_schema", "must be an object whose schema is a JSON "
                                                                         "Schema")
            given.append(("response_format", "json_schema", spec["schema"]))
    for name, kind in _GUIDED.items():
        value = body.get(name)
        if value is None:
            continue
        ok = (isinstance(value, (dict, bool, str)) if kind == "json_schema" else
              isinstance(value, list) and all(isinstance(v, str) for v in value) if kind == "choice" else
              isinstance(value, str))
        if not ok:
            raise InvalidRequestError(name, {"json_schema": "must be a JSON Schema (an object or its JSON text)",
                                             "choice": "must be a list of strings"}.get(kind, "must be a string"))
        given.append((name, kind, value))
    if len(given) > 1:
        raise InvalidRequestError(given[1][0], f"only one structured output may be given; {given[0][0]} is too")
    if not given:
        return None
    name, kind, value = given[0]
    fill_structured_output(req.structured_output, kind, value)
    return name


def choices(body: dict, req: pb.GenerateRequest, prompts: list, stream: bool, chat: bool
            ) -> tuple[list[pb.GenerateRequest], int, int, bool]:
    """(the engine requests, `best_of` of them per prompt, prompt after prompt; best_of; the number of choices to
    return per prompt, n; echo) for a parsed body: one request per choice, choice i with seed + i when a seed is
    given, and each with its chosen tokens' log-probabilities when the best n of best_of are to be picked by them."""
    n = body.get("n")
    n = 1 if n is None else _number(body, "n", int)
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError("n", f"must be in [1, {MAX_CHOICES}], got {n}")
    best_of = body.get("best_of")
    best_of = n if best_of is None else _number(body, "best_of", int)
    if not n <= best_of <= MAX_CHOICES:
        raise InvalidRequestError("best_of", f"must be in [n = {n}, {MAX_CHOICES}], got {best_of}")
    if best_of > n and stream:
        raise InvalidRequestError("best_of", "cannot be streamed when above n (the best are known at the end)")
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise InvalidRequestError("echo", f"must be true or false, got {echo!r}")
    if echo and chat:
        raise InvalidRequestError("echo", "is a /v1/completions parameter")
    out = []
    for prompt in prompts:
        for i in range(best_of):
            child = pb.GenerateRequest()
            child.CopyFrom(req)
            _set_prompt(child, prompt)
            if req.HasField("seed"):
                child.seed = (req.seed + i) % 2**64
            if best_of > n and not req.HasField("logprobs"):
                child.logprobs = 0  # the chosen tokens' log-probabilities rank the choices
            if echo and req.HasField("logprobs") and i == 0:
                child.prompt_logprobs = req.logprobs  # the prompt's, echoed (computed once: the choices share them)
            out.append(child)
    return out, best_of, n, echo


class OpenAIHTTP:
    """The HTTP front over one InferenceServicer (router/server.py starts and stops it with the gRPC edge)."""

    def __init__(self, servicer: Any, model_name: str, tokenizer: Any, context_length: int,
                 tokens: TokenSet | None = None, max_body_bytes: int = 4 * 1024 * 1024,
                 tool_format: ToolFormat | None = None, reasoning: bool = False):
        self.servicer, self.model_name, self.tokenizer = servicer, model_name, tokenizer
        self.chat = ChatTemplate(tokenizer, tool_format, reasoning)
        self.tool_format = tool_format  # the model's tool-call markup (tool_choice "auto"); None: not known
        self.reasoning = reasoning  # chat replies' leading reasoning block apart, as reasoning_content
        self.context_length, self.tokens = context_length, tokens
        self.app = web.Application(client_max_size=max_body_bytes)
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions),
                             web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize),
                             web.get("/v1/models", self.models), web.get("/v1/models/{model}", self.model),
                             web.get("/health", self.health)])
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, tls: Any = None) -> None:
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert, tls.key)
            if tls.client_ca:
                context.load_verify_locations(tls.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        # handler_cancellation: a client that goes away cancels its handler, and with it the engine request (a
        # whole reply would otherwise be generated to its end for nobody)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=context, reuse_port=False)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and the connections; call after the engine has finished or cancelled its work."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers ---------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.servicer.draining:
            return _error(503, "server is shutting down")
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        if self._caller(request) is None:
            return _error(401, "missing or unknown bearer token (Authorization: Bearer <token>)")
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        """OpenAI's GET /v1/models/{model}: the served model's card, 404 for another."""
        if self._caller(request) is None:
            return _error(401, "missing or unknown bearer token (Authorization: Bearer <token>)")
        if request.match_info["model"] != self.model_name:
            return _error(404, f"model {request.match_info['model']!r} is not served here; GET /v1/models lists "
                               f"{self.model_name!r}", "model")
        return web.json_response(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "owned_by": "moeserve", "max_model_len": self.context_length}

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's POST /tokenize: a `prompt`'s token ids, or those of chat `messages` as the chat template renders
        them (`add_generation_prompt`, default true; `tools`, `chat_template_kwargs`), with their count and the
        context length."""
        def answer(body: Any) -> dict:
            if not isinstance(body, dict):
                raise InvalidRequestError("body", "must be a JSON object")
            if "messages" in body:
                text, special = self.chat.render(body)[0], False
            elif isinstance(body.get("prompt"), str):
                text, special = body["prompt"], body.get("add_special_tokens", False)
                if not isinstance(special, bool):
                    raise InvalidRequestError("add_special_tokens", f"must be true or false, got {special!r}")
            else:
                raise InvalidRequestError("prompt", "give a prompt (a string) or chat messages")
            tokens = list(self.tokenizer.encode(text, add_special_tokens=special))
            return {"tokens": tokens, "count": len(tokens), "max_model_len": self.context_length}
        return await self._utility(request, answer)

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's POST /detokenize: `tokens` (ids of this model's vocabulary) as text."""
        def answer(body: Any) -> dict:
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise InvalidRequestError("tokens", "must be a list of token ids")
            vocab = self.servicer.limits.vocab_size
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError("tokens", f"token id {bad} is outside the vocabulary [0, {vocab})")
            return {"prompt": self.tokenizer.decode(tokens)}
        return await self._utility(request, answer)

    async def _utility(self, request: web.Request, answer: Callable[[Any], dict]) -> web.Response:
        """A call beside generation (tokenize, detokenize): auth, a JSON body, `answer`'s reply to it; errors as the
        completions' are."""
        if self._caller(request) is None:
            self.servicer.record_error("UNAUTHENTICATED")
            return _error(401, "missing or unknown bearer token (Authorization: Bearer <token>)")
        if self.tokenizer is None:
            return _error(404, "this model has no tokenizer")
        try:
            return web.json_response(answer(await request.json()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.servicer.record_error("INVALID_ARGUMENT")
            return _error(400, "the body is not JSON", "body")
        except InvalidRequestError as exc:
            self.servicer.record_error("INVALID_ARGUMENT")
            return _error(400, str(exc), exc.field)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _chat_body(self, body: Any) -> tuple[dict, ChatRead]:
        """A chat body as a completions one: the messages rendered by the chat template (with the body's
        chat_template_kwargs) and tokenized; the chat API's logprobs (true/false) and top_logprobs, and
        max_completion_tokens, in the completions' terms. And how the reply is read back (ChatTemplate.prepare)."""
        asked = next((k for k in ("response_format", *_GUIDED) if body.get(k) is not None), None) \
            if isinstance(body, dict) else None
        ids, read = self.chat.prepare(body, asked)
        out = {k: v for k, v in body.items() if k not in ("messages", "logprobs", "top_logprobs", "chat_template_kwargs",
                                                            "max_completion_tokens", "tools", "tool_choice",
                                                            "add_generation_prompt", "continue_final_message")}
        out["prompt"] = ids
        if body.get("max_completion_tokens") is not None:
            out["max_tokens"] = body["max_completion_tokens"]
        if body.get("logprobs") not in (None, False, True):
            raise InvalidRequestError("logprobs", f"must be true or false, got {body['logprobs']!r}")
        if body.get("logprobs"):
            out["logprobs"] = body.get("top_logprobs") or 0
        return out, read

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        caller = self._caller(request)
        if caller is None:
            self.servicer.record_error("UNAUTHENTICATED")
            return _error(401, "missing or unknown bearer token (Authorization: Bearer <token>)")
        try:
            body = await request.json()
            read = None
            if chat:
                body, read = self._chat_body(body)
            req, stream, include_usage, structured, prompts = generate_request(body, self.model_name)
            continuous = bool((body.get("stream_options") or {}).get("continuous_usage_stats", False))
            if read is not None:  # the tools' calls, or a structured answer after the reasoning block
                structured = constrain(req, read, structured)
            children, best_of, n, echo = choices(body, req, prompts, stream, chat)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.servicer.record_error("INVALID_ARGUMENT")
            return _error(400, "the body is not JSON", "body")
        except web.HTTPRequestEntityTooLarge as exc:
            self.servicer.record_error("RESOURCE_EXHAUSTED")
            return _error(413, str(exc), "body")
        except InvalidRequestError as exc:
            self.servicer.record_error("INVALID_ARGUMENT")
            return _error(400, str(exc), exc.field)
        except _Refused as exc:
            self.servicer.record_error("NOT_FOUND")
            return _error(exc.status, str(exc), exc.param)
        scored = echo and req.HasField("logprobs")  # the prompt's ids are needed beside its logprobs only
        firsts = children[::best_of]  # each prompt's first request
        reply = _Reply(chat, int(time.time()), best_of, n, req.HasField("logprobs"),
                       [self._echo(c) if echo else "" for c in firsts],
                       [self._echo_ids(c) if scored else [] for c in firsts], structured, read)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        headers = [(k.lower(), v) for k, v in request.headers.items()]
        trackers = _Trackers([self.servicer.track("ChatCompletions" if chat else "Completions", headers,
                                                  span_name=f"POST {path}") for _ in children])
        outputs = self._run(children, best_of, caller, trackers.items)
        try:
            if stream:
                response = await self._stream(request, outputs, reply, include_usage, trackers, continuous)
            else:
                response = await self._whole(outputs, reply, trackers)
        except BaseException:  # the client went away
            trackers.end("CANCELLED")
            raise
        return response

    def _echo_ids(self, req: pb.GenerateRequest) -> list[int]:
        """The prompt's token ids, as the server tokenizes it (for echo with logprobs)."""
        if req.WhichOneof("input") == "token_ids":
            return list(req.token_ids.ids)
        return list(self.tokenizer.encode(req.prompt)) if self.tokenizer is not None else []

    def _echo(self, req: pb.GenerateRequest) -> str:
        """The prompt as text, for echo."""
        if req.WhichOneof("input") == "prompt":
            return req.prompt
        return self.tokenizer.decode(list(req.token_ids.ids)) if self.tokenizer is not None else ""

    async def _run(self, children: list, group: int, caller: str, trackers: list):
        """Run the choices' engine requests, `group` of them per prompt; yields (request index, request id,
        RequestOutput) as they come. Each prompt's first runs alone until its first output, so that the others find
        its prompt in the prefix cache. The first failure is raised; closing this generator lets the engine go of
        every request still running."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async with contextlib.aclosing(self.servicer.run_request(children[i], caller, None,
                                                                         trackers[i])) as outs:
                    async for rid, out in outs:
                        queue.put_nowait((i, rid, out))
            except Exception as exc:  # noqa: BLE001 - raised to the reader below
                queue.put_nowait((i, None, exc))
            else:
                queue.put_nowait((i, None, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(0, len(children), group)]
        waiting = set(range(0, len(children), group))  # prompts whose other requests wait for its first output
        running = len(children)
        try:
            while running:
                i, rid, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if i in waiting:
                    waiting.discard(i)
                    tasks += [asyncio.create_task(pump(j)) for j in range(i + 1, i + group)]
                if item is None:
                    running -= 1
                else:
                    yield i, rid, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _caller(self, request: web.Request) -> str | None:
        """Who is calling (the token's name, else the peer address); None when auth is on and the token is not known."""
        if self.tokens is None:
            return f"peer-{request.remote}"
        return self.tokens.match(bearer_token([("authorization", request.headers.get("Authorization", ""))]))

    # -- responses ----------------------------------------------------------------------------------
    def _choice(self, out: Any, ids: list[int], text: str, logprobs: list, chat: bool = False, index: int = 0,
                first: bool = False, delta: bool = False, echo: tuple = ()) -> dict:
        """One choice of a reply (a chunk of one with `delta`): completions' text, or chat's message or delta.
        `echo`: (prompt ids, their logprobs) to put before the completion's logprobs."""
        finish = _FINISH.get(out.finish_reason, out.finish_reason) if out.finished else None
        if not chat:
            if echo:
                prompt_ids, prompt_logprobs = echo
                lp = self._logprobs(prompt_ids + ids, [None] + prompt_logprobs + logprobs)
            else:
                lp = self._logprobs(ids, logprobs)
            return {"index": index, "text": text, "token_ids": ids, "logprobs": lp, "finish_reason": finish}
        message = {"role": "assistant", "content": text} if first or not delta else {"content": text}
        return {"index": index, "delta" if delta else "message": message, "token_ids": ids,
                "logprobs": self._chat_logprobs(ids, logprobs), "finish_reason": finish}

    def _chat_logprobs(self, ids: list[int], logprobs: list | None) -> dict | None:
        """The chat API's logprobs: per token its text, log-probability, bytes and most likely alternatives."""
        if not logprobs:
            return None

        def entry(token: int, value: float) -> dict:
            word = self._word(token)
            return {"token": word, "logprob": value, "bytes": list(word.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in zip(top_ids, top_lps)]}
                            for t, (lp, top_ids, top_lps) in zip(ids, logprobs)]}

    def _logprobs(self, ids: list[int], logprobs: list | None, at: int = 0) -> dict | None:
        """OpenAI's completions logprobs: each token's text, log-probability and most likely alternatives (an entry
        None: the echoed prompt's first token, which has none). `at`: the text offset of the first token."""
        if not logprobs:
            return None
        words = [self._word(t) for t in ids]
        offsets = []
        for w in words:
            offsets.append(at)
            at += len(w)
        return {"tokens": words, "token_logprobs": [None if e is None else e[0] for e in logprobs],
                "top_logprobs": [None if e is None else {self._word(i): v for i, v in zip(e[1], e[2])}
                                 for e in logprobs],
                "text_offset": offsets}

    def _word(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)

    def _envelope(self, request_id: str, created: int, kind: str = "text_completion", **extra) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{request_id}", "object": kind, "created": created, "model": self.model_name, **extra}

    @staticmethod
    def _usage(lasts: list, group: int, reasoning: int | None = None) -> dict:
        """Usage over a reply's engine requests (each one's last output; None: none yet), `group` per prompt: each
        prompt counted once, every completion's tokens (best_of's unreturned ones too), and for each prompt the most
        prompt tokens one of its requests read from the cache; `reasoning`: the returned choices' tokens in their
        reasoning blocks (with reasoning apart)."""
        groups = [g for at in range(0, len(lasts), group) if (g := [o for o in lasts[at:at + group] if o is not None])]
        lasts = [o for g in groups for o in g]
        prompt, completion = sum(g[0].prompt_tokens for g in groups), sum(out.completion_tokens for out in lasts)
        cached = sum(max(out.cached_prompt_tokens for out in g) for g in groups)
        out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
               "prompt_tokens_details": {"cached_tokens": cached}}
        if reasoning is not None:
            out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return out

    async def _whole(self, outputs, reply: "_Reply", trackers: "_Trackers") -> web.Response:
        count, group = reply.group * len(reply.echo), reply.group
        ids: list[list[int]] = [[] for _ in range(count)]
        text: list[list[str]] = [[] for _ in range(count)]
        sizes: list[list[int]] = [[] for _ in range(count)]  # tokens of each piece of text
        logprobs: list[list] = [[] for _ in range(count)]
        last: list[Any] = [None] * count
        rid, prompt_logprobs = "", [None] * len(reply.echo)  # each prompt's
        try:
            async with contextlib.aclosing(outputs):
                async for i, r, out in outputs:
                    rid = rid or r
                    if out.prompt_logprobs is not None:
                        prompt_logprobs[i // group] = out.prompt_logprobs
                    ids[i] += out.new_token_ids
                    text[i].append(out.new_text)
                    sizes[i].append(len(out.new_token_ids))
                    logprobs[i] += out.logprobs or ()
                    last[i] = out
        except Exception as exc:  # noqa: BLE001 - every failure becomes its HTTP status
            return self._failure(exc, trackers, reply)
        trackers.end()
        picked, chosen = [], []  # the choices and their engine requests
        for p in range(len(reply.echo)):
            order = list(range(p * group, (p + 1) * group))
            if group > reply.n:  # best_of: the n with the highest mean log-probability per token, in that order
                order.sort(key=lambda i: -sum(lp for lp, _, _ in logprobs[i]) / len(logprobs[i]) if logprobs[i]
                           else math.inf)
                order = order[:reply.n]
            echo = (reply.echo_ids[p], prompt_logprobs[p]) if reply.logprobs and prompt_logprobs[p] is not None else ()
            picked += [self._choice(last[i], ids[i], reply.echo[p] + "".join(text[i]),
                                    logprobs[i] if reply.logprobs else [], reply.chat, index=p * reply.n + k,
                                    echo=echo) for k, i in enumerate(order)]
            chosen += order
        thought = None
        if reply.read is not None:  # each choice read piece by piece, as a stream is
            thought = 0
            for k, (choice, i) in enumerate(zip(picked, chosen)):
                reader, reasoning, content = ChatReader(reply.read, f"{rid}-{k}"), [], []
                finish = choice["finish_reason"]
                for j, (piece, size) in enumerate(zip(text[i], sizes[i])):
                    r, c, _, finish = reader.read(piece, choice["finish_reason"] if j == len(sizes[i]) - 1 else None,
                                                  size)
                    reasoning.append(r)
                    content.append(c)
                choice["finish_reason"] = finish
                message, content, calls = choice["message"], "".join(content), reader.calls()
                message["content"] = content if content.strip() or not calls else None
                if reply.read.reasoning:
                    message["reasoning_content"] = "".join(reasoning) or None
                if calls:
                    message["tool_calls"] = calls
                thought += reader.reasoning_tokens
        usage = self._usage(last, group, thought if reply.read is not None and reply.read.reasoning else None)
        return web.json_response(self._envelope(rid, reply.created, reply.kind, usage=usage, choices=picked))

    async def _stream(self, request: web.Request, outputs, reply: "_Reply", include_usage: bool,
                      trackers: "_Trackers", continuous: bool = False) -> web.StreamResponse:
        """Server-sent events: a chunk per engine output, then with include_usage one of usage; `continuous`
        (vLLM's continuous_usage_stats): every chunk also carries the usage so far."""
        response: web.StreamResponse | None = None
        kind = reply.kind + (".chunk" if reply.chat else "")
        last: list[Any] = [None] * (reply.group * len(reply.echo))
        rid, prompt_logprobs = "", {}  # each prompt's, from its first request
        readers: dict[int, ChatReader] = {}
        try:
            async with contextlib.aclosing(outputs):
                async for i, r, out in outputs:  # (streamed: best_of is n, so request i is choice i)
                    p = i // reply.group
                    if out.prompt_logprobs is not None:
                        prompt_logprobs[p] = out.prompt_logprobs
                    if response is None:  # admitted: from here on errors travel as events
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                        await response.prepare(request)
                        rid = r
                    first = last[i] is None
                    last[i] = out
                    text = (reply.echo[p] if first else "") + out.new_text
                    echo = (reply.echo_ids[p], prompt_logprobs[p]) if first and reply.echo[p] and p in prompt_logprobs \
                        else ()
                    choice = self._choice(out, out.new_token_ids, text, out.logprobs or [], reply.chat, i, first,
                                          delta=True, echo=echo)
                    if reply.read is not None:  # reasoning apart; the calls' pieces
                        reader = readers.setdefault(i, ChatReader(reply.read, f"{rid}-{i}"))
                        delta = choice["delta"]
                        reasoning, delta["content"], calls, choice["finish_reason"] = reader.read(
                            text, choice["finish_reason"], len(out.new_token_ids))
                        if reasoning:
                            delta["reasoning_content"] = reasoning
                        if calls:
                            delta["tool_calls"] = calls
                    chunk = self._envelope(rid, reply.created, kind, choices=[choice])
                    if continuous:
                        chunk["usage"] = self._usage(last, reply.group, self._thought(reply, readers))
                    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if include_usage:
                usage = self._envelope(rid, reply.created, kind, choices=[],
                                       usage=self._usage(last, reply.group, self._thought(reply, readers)))
                await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away: closing `outputs` above has let the engine go of the requests
        except Exception as exc:  # noqa: BLE001 - before the first event, the status; after it, an event
            failure = self._failure(exc, trackers, reply)
            if response is None:
                return failure
            await response.write(f"data: {failure.text}\n\n".encode())
        else:
            trackers.end()
        if response is None:  # nothing was yielded: a failure the loop above did not raise cannot happen
            return _error(500, "the request produced no output")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    def _thought(reply: "_Reply", readers: dict) -> int | None:
        """The streamed choices' reasoning tokens so far (None without reasoning apart)."""
        if reply.read is None or not reply.read.reasoning:
            return None
        return sum(r.reasoning_tokens for r in readers.values())

    @staticmethod
    def _failure(exc: BaseException, trackers: "_Trackers", reply: "_Reply | None" = None) -> web.Response:
        code, message = status_codes.to_status(exc)
        trackers.end(code.name)
        param = getattr(exc, "field", None)
        if param and param.startswith("structured_output") and reply is not None and reply.structured:
            param = reply.structured  # the engine names its field; the client sent this parameter
        elif param in ("token_ids", "prompt") and reply is not None and reply.chat:
            param = "messages"  # the prompt the chat template rendered from them
        return _error(_HTTP.get(code.name, 500), message, param)


@dataclass(frozen=True)
class _Reply:
    """What shapes one reply: chat or completions, its creation time, engine requests per prompt (best_of) and
    choices returned per prompt (n), whether the client asked for logprobs, and each prompt's text echoed before
    its choices' (one per prompt: "" without echo)."""

    chat: bool
    created: int
    group: int
    n: int
    logprobs: bool
    echo: list  # per prompt
    echo_ids: list  # per prompt, the echoed prompt's token ids (their logprobs come first with logprobs)
    structured: str | None = None  # the parameter that asked for a structured output (the engine's errors name it)
    read: "ChatRead | None" = None  # a chat's: how its output is read back (reasoning, tool calls)

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


class _Trackers:
    """The telemetry trackers of one HTTP call's engine requests (one per choice), ended together, once."""

    def __init__(self, items: list):
        self.items, self._ended = items, False

    def end(self, code: str | None = None) -> None:
        if not self._ended:
            self._ended = True
            for tracker in self.items:
                tracker.end(code)
