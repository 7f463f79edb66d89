"""Bearer-token auth at the edge, and who a caller is (for per-caller limits and logs).

Tokens come from a file (one per line, `#` comments) and/or an environment variable (comma
separated). A call carries `authorization: Bearer <token>`; a missing or wrong token ends the call
with UNAUTHENTICATED before any handler runs. Comparison is constant-time over fixed-length digests,
so neither a token's content nor its length leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Callable

import grpc

TOKEN_ENV = "MOESERVE_AUTH_TOKEN"  # server: accepted tokens (comma separated); client: the token to send
# Load balancers and Kubernetes probes ask for health without credentials; it reveals only up/down.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def _digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def token_name(token: str) -> str:
    """A short stable name for a token that is safe to log (a digest prefix, never the token)."""
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:10]


def load_tokens(file: str | os.PathLike | None = None, env_var: str | None = TOKEN_ENV) -> list[str]:
    """Accepted tokens from `file` and the env var `env_var`; an empty list means auth is off."""
    tokens: list[str] = []
    if file is not None:
        path = Path(file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"auth token file {path}: {exc.strerror or exc}") from exc
        tokens += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not tokens:
            raise ValueError(f"auth token file {path} holds no token")
    if env_var and os.environ.get(env_var):
        tokens += [t.strip() for t in os.environ[env_var].split(",") if t.strip()]
    for t in tokens:
        if len(t) < 16 or any(c.isspace() for c in t):
            raise ValueError(f"auth token {token_name(t)} must be at least 16 characters without spaces")
    return list(dict.fromkeys(tokens))


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` entry in call metadata, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TokenSet:
    """Accepted tokens, held as digests; `match` answers in time independent of which token matched."""

    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ValueError("TokenSet needs at least one token")
        self._entries = [(_digest(t), token_name(t)) for t in tokens]

    def match(self, presented: str | None) -> str | None:
        """The matching token's name, or None."""
        probe = _digest(presented or "")
        found = None
        for digest, name in self._entries:  # no early exit: every entry is compared every time
            if hmac.compare_digest(probe, digest) and presented is not None:
                found = name
        return found


def _deny_handler(handler: grpc.RpcMethodHandler, message: str,
                  on_deny: Callable[[str], None] | None) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        if on_deny is not None:
            on_deny("UNAUTHENTICATED")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call (but health) without a valid bearer token, with UNAUTHENTICATED."""

    def __init__(self, tokens: TokenSet, open_methods: frozenset[str] = OPEN_METHODS,
                 on_deny: Callable[[str], None] | None = None):
        self._tokens = tokens
        self._open = open_methods
        self._on_deny = on_deny  # told the status code of each refused call (errors metric)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._open:
            return handler
        presented = bearer_token(handler_call_details.invocation_metadata)
        if presented is None:
            return _deny_handler(handler, "missing credentials: send 'authorization: Bearer <token>' metadata",
                                 self._on_deny)
        if self._tokens.match(presented) is None:
            return _deny_handler(handler, "invalid bearer token", self._on_deny)
        return handler


def caller_identity(context: grpc.aio.ServicerContext, tokens: TokenSet | None) -> str:
    """Who is calling: the token's name when auth is on, else the mTLS certificate's name, else the peer host."""
    if tokens is not None:
        name = tokens.match(bearer_token(context.invocation_metadata()))
        if name is not None:
            return name
    auth = context.auth_context() or {}
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth.get(key)
        if values:
            return "cert-" + values[0].decode("utf-8", "replace")
    peer = context.peer() or "unknown"
    host, sep, _port = peer.rpartition(":")  # ipv4:1.2.3.4:5678, ipv6:[::1]:5678, unix:/path
    return "peer-" + (host if sep and host.count(":") >= 1 else peer)
