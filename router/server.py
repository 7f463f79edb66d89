"""The gRPC edge: the grpc.aio server around one engine (Inference, health, reflection on one port).

Auth is an interceptor in front of every call but health; `servicer.InferenceServicer` does the
rest. Shutdown stops accepting, gives in-flight requests a grace period, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc

try:  # optional packages: a minimal box (the GPU bench machine) serves without health and reflection
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
except ImportError:
    health = health_pb2 = health_pb2_grpc = None
try:
    from grpc_reflection.v1alpha import reflection
except ImportError:
    reflection = None

from moeserve.router.auth import BearerTokenInterceptor, TokenSet
from moeserve.router.chat import ChatTemplate
from moeserve.router.servicer import SERVICE, InferenceServicer, TooManyStreamsError, model_info

__all__ = ["SERVICE", "InferenceServer", "InferenceServicer", "ServerConfig", "TooManyStreamsError", "format_address"]
from moeserve.router.tls import ServerTLS
from moeserve.router import reasoning
from moeserve.router.tool_calls import FORMATS, resolve_format
from moeserve.router.validation import Limits

log = logging.getLogger(__name__)

_FLUSH_S = 5.0  # after the engine stops, how long calls get to send their last message


@dataclass(slots=True)
class ServerConfig:
    """The edge's settings (the engine has its own EngineConfig); 0 in a limit means the model's default."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: an ephemeral port (tests)
    grace_s: float = 10.0  # on shutdown, in-flight requests get this long to finish, then are cancelled
    max_message_bytes: int = 4 * 1024 * 1024  # largest request accepted (RESOURCE_EXHAUSTED beyond)
    max_streams_per_caller: int = 256  # Generate/GenerateStream calls in flight per caller
    max_concurrent_rpcs: int | None = None  # all RPCs in flight, server-wide (None: no cap beyond the queue)
    max_prompt_tokens: int = 0
    max_tokens: int = 0
    default_max_tokens: int = 256
    max_stop_strings: int = 0  # 0: the engine's limit
    max_request_id_chars: int = 128
    auth_tokens: tuple[str, ...] = ()  # empty: auth off
    tls: ServerTLS | None = None
    http_port: int | None = None  # the OpenAI-compatible HTTP front (router/openai_http.py) on this port; None: off
    # chats' tool calls, gRPC's and HTTP's (router/tool_calls.py): auto (the chat template's), none, a format
    tool_call_format: str = "auto"
    reasoning_content: str = "auto"  # chat replies' reasoning apart (router/reasoning.py): auto, split, keep

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.tool_call_format not in ("auto", "none", *FORMATS):
            raise ValueError(f"tool_call_format must be auto, none or one of {', '.join(FORMATS)}; "
                             f"got {self.tool_call_format!r}")
        if self.reasoning_content not in ("auto", "split", "keep"):
            raise ValueError(f"reasoning_content must be auto, split or keep; got {self.reasoning_content!r}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        for name in ("max_message_bytes", "max_streams_per_caller"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def limits(self, vocab_size: int, context_length: int) -> Limits:
        extra = {"max_stop_strings": self.max_stop_strings} if self.max_stop_strings else {}
        return Limits(
            vocab_size=vocab_size, context_length=context_length, max_prompt_tokens=self.max_prompt_tokens,
            max_tokens=self.max_tokens, default_max_tokens=self.default_max_tokens,
            max_request_id_chars=self.max_request_id_chars, **extra,
        )


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass
class InferenceServer:
    """The grpc.aio server around one engine: Inference, health and reflection on one port."""

    engine: Any
    config: ServerConfig = field(default_factory=ServerConfig)
    model_name: str = ""
    telemetry: Any = None  # cluster.telemetry.Telemetry; None: no metrics or traces
    port: int = 0  # the bound port, once started
    servicer: InferenceServicer | None = None
    _server: grpc.aio.Server | None = None
    _health: Any = None  # grpc_health's HealthServicer, when installed
    _stopped: asyncio.Event | None = None
    http: Any = None  # the OpenAI-compatible HTTP front (config.http_port), once started

    @property
    def address(self) -> str:
        return format_address(self.config.host, self.port)

    @property
    def tls(self) -> bool:
        return self.config.tls is not None

    async def start(self) -> None:
        """Start the engine, bind the port, and answer SERVING."""
        cfg = self.config
        await self.engine.start()
        mc = self.engine.model_config
        limits = cfg.limits(mc.vocab_size, self.engine.max_model_len)
        dtype = str(self.engine.dtype).removeprefix("torch.")
        tokens = TokenSet(list(cfg.auth_tokens)) if cfg.auth_tokens else None
        info = model_info(self.engine, limits, dtype, self.model_name)
        tokenizer = getattr(self.engine, "tokenizer", None)
        template = tokenizer.chat_template if tokenizer is not None else None
        tool_format = resolve_format(cfg.tool_call_format, template)
        thinking = reasoning.resolve(cfg.reasoning_content, template)
        chat = ChatTemplate(tokenizer, tool_format, thinking, instead="Generate") if tokenizer is not None else None
        self.servicer = InferenceServicer(self.engine, limits, info, cfg, tokens, self.telemetry, chat)
        on_deny = self.telemetry.record_error if self.telemetry is not None else None
        if self.telemetry is not None:
            self.telemetry.watch_engine(self.engine)
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(tokens, on_deny=on_deny)] if tokens else None,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        self._add_health_and_reflection(server)
        target = format_address(cfg.host, cfg.port)
        try:
            port = server.add_secure_port(target, cfg.tls.credentials()) if cfg.tls else server.add_insecure_port(target)
        except RuntimeError as exc:
            port = 0
            cause = exc
        else:
            cause = None
        if not port:
            await self.engine.shutdown(0)
            raise OSError(f"cannot listen on {target} (in use, or not an address of this machine)") from cause
        self.port = port
        self._server = server
        self._stopped = asyncio.Event()
        await server.start()
        if cfg.http_port is not None:
            from moeserve.router.openai_http import OpenAIHTTP

            self.http = OpenAIHTTP(self.servicer, self.model_name or mc.model_type, tokenizer,
                                   limits.context_length, tokens, cfg.max_message_bytes, tool_format, thinking)
            try:
                await self.http.start(cfg.host, cfg.http_port, cfg.tls)
            except OSError as exc:
                await self.stop(0)
                raise OSError(f"cannot listen for HTTP on {format_address(cfg.host, cfg.http_port)}: {exc}") from exc
            log.info("OpenAI-compatible HTTP on %s://%s", "https" if cfg.tls else "http",
                     format_address(cfg.host, self.http.port))
        if self._health is not None:
            for name in ("", SERVICE):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s (tls %s, auth %s)", SERVICE, self.address,
                 "on" if cfg.tls else "off", "on" if tokens else "off")

    def _add_health_and_reflection(self, server: grpc.aio.Server) -> None:
        names = [SERVICE]
        if health is not None:
            self._health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            names.append(health.SERVICE_NAME)
        else:
            log.warning("grpcio-health-checking is not installed: no grpc.health.v1 service")
        if reflection is not None:
            reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
        else:
            log.warning("grpcio-reflection is not installed: no server reflection")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, give in-flight ones `grace_s` to finish, cancel the rest, stop the engine."""
        if self._server is None or self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        self.servicer.draining = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        # grpc stops accepting calls at once; the long grace is only a safety net that cancels every
        # call should the steps below hang (a client that never reads its stream, say).
        closing = asyncio.create_task(self._server.stop(grace + _FLUSH_S))
        # The engine finishes what it can within the grace period and ends the rest as "cancelled";
        # each call then writes its last message, so clients see why their stream ended.
        await self.engine.shutdown(grace)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.servicer.wait_for(lambda: self.servicer.num_active == 0), _FLUSH_S)
        await self._server.stop(None)  # what is left: health watchers, calls stuck writing
        await closing
        if self.http is not None:
            await self.http.stop()
        self._stopped.set()
        log.info("server on %s stopped", self.address)

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()
