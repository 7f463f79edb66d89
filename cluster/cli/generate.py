"""`moeserve generate "text" [--stream] [--chat]`: ask a running server for a completion (or, with --chat, a chat
reply) and print it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import grpc

from moeserve.router.auth import TOKEN_ENV
from moeserve.router.client import AsyncClient
from moeserve.router.tls import ClientTLS

DEFAULT_ADDRESS = "127.0.0.1:50051"


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """--address, auth and TLS flags shared by the client commands (generate, bench)."""
    g = p.add_argument_group("connection")
    g.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default {DEFAULT_ADDRESS})")
    g.add_argument("--auth-token-file", metavar="PATH",
                   help=f"file whose first line is the bearer token (default: ${TOKEN_ENV}, if set)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA that signed the server certificate (turns TLS on)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate, for servers that require mTLS")
    g.add_argument("--tls-key", metavar="PEM", help="key of --tls-cert")
    g.add_argument("--tls-server-name", metavar="NAME", help="name to check the server certificate against")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")


def _token(args: argparse.Namespace) -> str | None:
    if args.auth_token_file:
        with open(args.auth_token_file) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise SystemExit(f"error: {args.auth_token_file} holds no token")
        return lines[0]
    env = os.environ.get(TOKEN_ENV, "")
    return env.split(",")[0].strip() or None


def connect(args: argparse.Namespace) -> AsyncClient:
    """An AsyncClient for the connection flags in `args`."""
    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = ClientTLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    return AsyncClient(args.address, token=_token(args), tls=tls)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"error: --token-ids takes integers separated by commas, got {text!r}") from None


def _logit_bias(text: str) -> tuple[int, float]:
    try:
        token, bias = text.split("=")
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes ID=BIAS (a token id and a number in [-100, 100]), got {text!r}") \
            from None


def _text_or_file(value: str) -> str:
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text()
        except OSError as exc:
            raise SystemExit(f"error: cannot read {value[1:]}: {exc.strerror}") from None
    return value


def _structured_output(args: argparse.Namespace) -> dict | None:
    if args.json_schema is not None:
        return {"json_schema": _text_or_file(args.json_schema)}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": args.choice}
    if args.grammar is not None:
        return {"grammar": _text_or_file(args.grammar)}
    if args.structural_tag is not None:
        return {"structural_tag": _text_or_file(args.structural_tag)}
    return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion from a running server",
                       description="Send a prompt to a moeserve server and print the completion.")
    p.add_argument("prompt", nargs="?", help="the prompt text ('-' reads standard input)")
    p.add_argument("--token-ids", metavar="IDS", help="send these token ids (comma separated) instead of text")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-tokens", type=int, default=0, help="new tokens at most (default: the server's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="[0, 1]: sample only tokens at least P times as likely as the likeliest (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--include-stop", action="store_true", help="end the text with the stop string that matched")
    p.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="X",
                   help="> 0, 1 off: the logits of tokens already in the prompt or output divided by X (if positive)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="X",
                   help="[-2, 2]: subtracted from the logit of each token already generated (default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                   help="[-2, 2]: subtracted once per time each token was generated (default 0)")
    p.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="no end-of-sequence or stop token id before N new tokens (default 0)")
    p.add_argument("--priority", type=int, default=0, metavar="N",
                   help="scheduling priority: lower is admitted first and preempted last (default 0)")
    p.add_argument("--logit-bias", action="append", type=_logit_bias, default=[], metavar="ID=BIAS",
                   help="add BIAS ([-100, 100]) to token ID's logit before sampling (repeatable; -100 bans it)")
    so = p.add_mutually_exclusive_group()
    so.add_argument("--json-schema", metavar="SCHEMA", help="structured output: a JSON value this JSON Schema accepts "
                                                            "(its JSON text, or @FILE)")
    so.add_argument("--json-object", action="store_true", help="structured output: one JSON object")
    so.add_argument("--regex", metavar="RE", help="structured output: text that matches this regular expression")
    so.add_argument("--choice", action="append", metavar="TEXT", help="structured output: one of these (repeatable)")
    so.add_argument("--grammar", metavar="EBNF", help="structured output: text of this EBNF grammar, start rule root "
                                                      "(its text, or @FILE)")
    so.add_argument("--structural-tag", metavar="JSON", help="structured output: xgrammar's structural tag (free text "
                                                             "with tagged parts held to their formats; its JSON, or "
                                                             "@FILE)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="after the completion, print each token's log-probability and the N likeliest tokens' "
                        "(0..20) on standard error")
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                   help="before those, print each prompt token's log-probability (from the second on) and the N "
                        "likeliest tokens' at its position (0..20) on standard error: scores the prompt")
    chat = p.add_argument_group("chat (the Chat RPC: the prompt as a user message, rendered by the model's chat "
                                "template; reasoning on standard error, tool calls as lines 'tool call NAME ARGS')")
    chat.add_argument("--chat", action="store_true", help="send the prompt as a chat's user message")
    chat.add_argument("--system", metavar="TEXT", help="with --chat: a system message before it")
    chat.add_argument("--tools", metavar="JSON", help="with --chat: the functions the reply may call, a JSON list of "
                                                      "OpenAI tools ({\"type\": \"function\", \"function\": {\"name\", "
                                                      "\"parameters\"}}; its text, or @FILE)")
    chat.add_argument("--tool-choice", default="", metavar="CHOICE",
                      help="with --tools: auto (default), none, required, or the name of the function to call")
    p.add_argument("--request-id", default="", help="your id for this request (echoed back)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the completion (no stats line)")
    add_connection_args(p)
    p.set_defaults(func=main)


def _chat_args(args: argparse.Namespace) -> dict:
    """The chat of --chat, --system, --tools and --tool-choice as AsyncClient.chat's arguments."""
    if args.token_ids is not None or args.prompt_logprobs is not None:
        raise SystemExit("error: --chat sends text: leave out --token-ids and --prompt-logprobs")
    if args.prompt is None:
        raise SystemExit("error: give the message to send")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": sys.stdin.read() if args.prompt == "-" else args.prompt})
    tools = []
    if args.tools is not None:
        try:
            tools = json.loads(_text_or_file(args.tools))
        except ValueError as exc:
            raise SystemExit(f"error: --tools is not JSON: {exc}") from None
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise SystemExit("error: --tools takes a JSON list of tools")
    return dict(messages=messages, tools=tools, tool_choice=args.tool_choice)


async def _receive(args: argparse.Namespace, stream: Callable[[], Any], whole: Callable[[], Any],
                   show: Callable[[Any], None]) -> list:
    """A reply streamed (each message shown as it comes) or whole (shown once): every message received."""
    if not args.stream:
        msgs = [await whole()]
        show(msgs[0])
        return msgs
    msgs = []
    async for msg in stream():
        show(msg)
        sys.stdout.flush()
        msgs.append(msg)
    return msgs


async def _chat(args: argparse.Namespace, params: dict) -> tuple:
    """Run --chat; print the reply (reasoning on standard error); the last message, token ids and logprobs."""
    chat = _chat_args(args)

    def show(msg) -> None:
        sys.stderr.write(msg.reasoning_content)
        sys.stdout.write(msg.content)

    async with connect(args) as client:
        msgs = await _receive(args, lambda: client.chat_stream(**chat, timeout=args.timeout, **params),
                              lambda: client.chat(**chat, timeout=args.timeout, **params), show)
    calls: dict[int, tuple[str, str]] = {}
    for piece in (p for m in msgs for p in m.tool_calls):  # streamed: a call's name, then its arguments in pieces
        name, arguments = calls.get(piece.index, ("", ""))
        calls[piece.index] = (name + piece.name, arguments + piece.arguments)
    for i in sorted(calls):
        sys.stdout.write(f"\ntool call {calls[i][0]} {calls[i][1]}")
    return msgs[-1], [t for m in msgs for t in m.token_ids], [lp for m in msgs for lp in m.logprobs]


async def _generate(args: argparse.Namespace) -> int:
    if args.chat:
        source = None
    elif args.system is not None or args.tools is not None or args.tool_choice:
        raise SystemExit("error: --system, --tools and --tool-choice go with --chat")
    elif args.token_ids is not None:
        source = {"token_ids": _token_ids(args.token_ids)}
    elif args.prompt is not None:
        source = {"prompt": sys.stdin.read() if args.prompt == "-" else args.prompt}
    else:
        raise SystemExit("error: give a prompt (or --token-ids)")
    params = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, include_stop_str_in_output=args.include_stop,
        seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
        request_id=args.request_id, logprobs=args.logprobs, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens,
        priority=args.priority, logit_bias=dict(args.logit_bias), structured_output=_structured_output(args),
        prompt_logprobs=args.prompt_logprobs,
    )
    if source is None:
        params.pop("prompt_logprobs")
        (last, tokens, logprobs), prompt_logprobs = await _chat(args, params), []
    else:
        last, tokens, logprobs, prompt_logprobs = await _complete(args, source, params)
    sys.stdout.write("\n")
    sys.stdout.flush()
    _report(args, last, tokens, logprobs, prompt_logprobs)
    return 0


async def _complete(args: argparse.Namespace, source: dict, params: dict) -> tuple:
    """Run a completion; print it as it comes; the last message, token ids and (prompt) logprobs."""
    async with connect(args) as client:
        msgs = await _receive(args, lambda: client.generate_stream(**source, timeout=args.timeout, **params),
                              lambda: client.generate(**source, timeout=args.timeout, **params),
                              lambda msg: sys.stdout.write(msg.text))
    return (msgs[-1], [t for m in msgs for t in m.token_ids], [lp for m in msgs for lp in m.logprobs],
            [lp for m in msgs for lp in m.prompt_logprobs])


def _report(args: argparse.Namespace, last, tokens: list, logprobs: list, prompt_logprobs: list) -> None:
    """The log-probabilities asked for and the stats line, on standard error."""
    for kind, rows in (("prompt token", prompt_logprobs), ("token", list(zip(tokens, logprobs)))):
        for i, row in enumerate(rows):
            token, lp = (i + 2, row) if kind == "prompt token" else row  # a prompt token by its position (from 1)
            top = "  ".join(f"{t}:{v:.4f}" for t, v in zip(lp.top_token_ids, lp.top_logprobs))
            print(f"{kind} {token} logprob {lp.logprob:.4f}" + (f"  top {top}" if top else ""), file=sys.stderr)
    if prompt_logprobs:
        print(f"prompt: sum of log-probabilities {sum(lp.logprob for lp in prompt_logprobs):.4f} over "
              f"{len(prompt_logprobs)} tokens", file=sys.stderr)
    if not args.quiet and last is not None:
        from moeserve.v1 import inference_pb2 as pb

        cached = last.usage.cached_prompt_tokens
        print(f"[{pb.FinishReason.Name(last.finish_reason)}: {last.usage.prompt_tokens} prompt"
              f"{f' ({cached} cached)' if cached else ''} + "
              f"{last.usage.completion_tokens} completion tokens, first token after "
              f"{last.time_to_first_token * 1000:.0f} ms]", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_generate(args))
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
