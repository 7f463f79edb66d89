"""Fuzzing the gRPC API (hypothesis) against a real server on loopback, with hostile and malformed input.

Structured requests with any field values, raw bytes (random and mutated encodings: wrong wire types,
invalid UTF-8), 1 ms deadlines, cancellation mid-stream, thousands of streams opened and dropped, and
garbage on the TCP port. Every answer is checked against an oracle of the documented rules (which
fields are wrong -> INVALID_ARGUMENT naming one of them; too big -> RESOURCE_EXHAUSTED; else OK and a
well-formed completion). Afterwards the server is idle with no KV block in use and its greedy
outputs equal the reference run made before the fuzzing. Each test prints what it tried.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_harness import ENGINE_DEFAULTS, demo_model_dir
from moeserve.router.config import EngineConfig
from moeserve.router.engine import AsyncEngine
from moeserve.router.server import InferenceServer, ServerConfig
from moeserve.v1 import inference_pb2 as pb

MAX_MESSAGE = 8 * 1024
MAX_PROMPT_TOKENS = 40
MAX_TOKENS = 3  # the largest max_tokens accepted: keeps every valid request cheap
DEFAULT_MAX_TOKENS = 2
MAX_STOP_STRINGS = 4
GENERATE = "/moeserve.v1.Inference/Generate"
STREAM = "/moeserve.v1.Inference/GenerateStream"
FINISH = {pb.length, pb.stop, pb.eos}
REFERENCE_PROMPTS = [[5, 6, 7, 8], [100, 200, 3], list(range(30, 60)), [1]]
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class ServerThread:
    """A real InferenceServer on its own event loop thread, so hypothesis drives it with blocking calls."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.thread.start()
        cfg = EngineConfig(model=demo_model_dir(), **ENGINE_DEFAULTS)
        server_cfg = ServerConfig(port=0, max_message_bytes=MAX_MESSAGE, max_prompt_tokens=MAX_PROMPT_TOKENS,
                                  max_tokens=MAX_TOKENS, default_max_tokens=DEFAULT_MAX_TOKENS,
                                  max_stop_strings=MAX_STOP_STRINGS)
        self.server = InferenceServer(AsyncEngine.from_config(cfg), server_cfg)
        self.call(self.server.start())
        self.limits = self.server.servicer.limits
        self.tokenizer = self.server.engine.tokenizer

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_idle(self) -> dict:
        """Once every call has left the engine: its stats (asserted idle by the caller)."""
        srv = self.server.servicer
        self.call(asyncio.wait_for(srv.wait_for(lambda: srv.num_active == 0), 60))
        return self.server.engine.stats()

    def stop(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz():
    server = ServerThread()
    channel = grpc.insecure_channel(server.server.address)
    tally = Counter()
    try:
        server.reference = greedy(channel, REFERENCE_PROMPTS)
        yield server, channel, tally
    finally:
        print(f"\nfuzz inputs tried: {sum(v for k, v in tally.items() if not k.startswith(('code', 'fail')))} "
              f"{dict(sorted(tally.items()))}; failures: {tally['failures']}")
        channel.close()
        server.stop()


def greedy(channel: grpc.Channel, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy completions of `prompts`, sent concurrently."""
    unary = channel.unary_unary(GENERATE, pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString)
    calls = [unary.future(pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), max_tokens=MAX_TOKENS, ignore_eos=True),
                          timeout=120) for p in prompts]
    return [list(c.result().token_ids) for c in calls]


def assert_idle(server: ServerThread) -> None:
    stats = server.wait_idle()
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0), stats


# -- the oracle: which fields of a request break the documented rules -----------------------------------

def invalid_fields(req: pb.GenerateRequest, limits, encode) -> set[str]:
    """Fields the server must name (any one of them) when refusing `req`; empty when it must serve it."""
    bad = set()
    rid = req.request_id
    if len(rid) > limits.max_request_id_chars or not all("!" <= c <= "~" for c in rid):
        bad.add("request_id")
    if not math.isfinite(req.temperature) or req.temperature < 0:
        bad.add("temperature")
    if req.HasField("top_p") and not 0 < req.top_p <= 1:
        bad.add("top_p")
    if req.top_k < 0:
        bad.add("top_k")
    if len(req.stop) > limits.max_stop_strings or any(not s or len(s) > limits.max_stop_string_chars for s in req.stop):
        bad.add("stop")
    if len(req.stop_token_ids) > limits.max_stop_token_ids or any(t >= limits.vocab_size for t in req.stop_token_ids):
        bad.add("stop_token_ids")
    which = req.WhichOneof("input")
    prompt_len = None
    if which == "token_ids":
        ids = req.token_ids.ids
        if not ids or len(ids) > limits.max_prompt_tokens or any(t >= limits.vocab_size for t in ids):
            bad.add("token_ids")
        else:
            prompt_len = len(ids)
    elif which == "prompt" and req.prompt and len(req.prompt) <= limits.max_prompt_chars:
        n = len(encode(req.prompt))
        if 0 < n <= limits.max_prompt_tokens:
            prompt_len = n
        else:
            bad.add("prompt")
    else:
        bad.add("prompt")
    if req.max_tokens > limits.max_tokens or (prompt_len is not None and req.max_tokens > limits.context_length - prompt_len):
        bad.add("max_tokens")
    return bad


def check_answer(req: pb.GenerateRequest, data_size: int, outcome, limits, encode, tally: Counter,
                 duplicate_id: bool = False) -> str:
    """Assert `outcome` (a GenerateResponse or a grpc.RpcError) is what the rules ask for; its code's name."""
    try:
        return _check_answer(req, data_size, outcome, limits, encode, duplicate_id)
    except AssertionError:
        tally["failures"] += 1
        print(f"FAILED on {req!r} ({data_size} bytes): {outcome!r}")
        raise


def _check_answer(req, data_size, outcome, limits, encode, duplicate_id) -> str:
    if data_size > MAX_MESSAGE:
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        return "RESOURCE_EXHAUSTED"
    bad = invalid_fields(req, limits, encode)
    if isinstance(outcome, grpc.RpcError):
        code, details = outcome.code(), outcome.details() or ""
        field = details.split(":", 1)[0].split("[", 1)[0]
        named = field in bad or (duplicate_id and field == "request_id" and "already in flight" in details)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and named, (code, details, sorted(bad))
        return code.name
    assert not bad, f"served a request the rules refuse (fields {sorted(bad)})"
    want = req.max_tokens or DEFAULT_MAX_TOKENS
    assert outcome.finish_reason in FINISH and 1 <= len(outcome.token_ids) <= want, outcome
    assert outcome.usage.completion_tokens == len(outcome.token_ids)
    assert all(t < limits.vocab_size for t in outcome.token_ids)
    return "OK"


# -- strategies ---------------------------------------------------------------------------------------

UINT32 = st.integers(0, 2**32 - 1)
wild_float = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]),
                       st.sampled_from([-0.0, -1e-45, 1e-45, 3e38, -1.0, 1.0000001]), st.floats(width=32))
token_id = st.one_of(st.integers(0, 600), UINT32)  # mostly in the demo vocabulary, sometimes far outside
hostile_text = st.one_of(st.text(max_size=60), st.text(alphabet=st.characters(codec="utf-8"), max_size=400),
                         st.sampled_from(["", " ", "\x00", "\u202e\u2066", "\ud7ff\U0010ffff", "A" * 3000]))


FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "request_id", "input")
sane_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40)
id_chars = st.characters(min_codepoint=33, max_codepoint=126)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """A request whose fields are sane but for a few drawn hostile (none in a third, one alone in another)."""
    hostile = draw(st.one_of(st.just(frozenset()), st.sampled_from(FIELDS).map(lambda f: {f}),
                             st.sets(st.sampled_from(FIELDS), max_size=3)))

    def pick(field, sane, wild):
        return draw(wild if field in hostile else sane)

    req = pb.GenerateRequest(
        max_tokens=pick("max_tokens", st.integers(0, MAX_TOKENS), st.one_of(st.integers(0, MAX_TOKENS + 1), UINT32)),
        temperature=pick("temperature", st.one_of(st.just(0.0), st.floats(0, 2, width=32)), wild_float),
        top_k=pick("top_k", st.integers(0, 50), st.integers(-(2**31), 2**31 - 1)),
        stop=pick("stop", st.lists(sane_text, max_size=2), st.lists(hostile_text, max_size=MAX_STOP_STRINGS + 1)),
        stop_token_ids=pick("stop_token_ids", st.lists(st.integers(0, 255), max_size=2), st.lists(token_id, max_size=70)),
        ignore_eos=draw(st.booleans()),
        request_id=pick("request_id", st.one_of(st.just(""), st.text(id_chars, max_size=16)),
                        st.one_of(st.text(max_size=8), st.text(min_size=120, max_size=140))),
    )
    if draw(st.booleans()):
        req.top_p = pick("top_p", st.floats(0.0625, 1, width=32), wild_float)
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    if "input" in hostile:
        kind = draw(st.sampled_from(["text", "ids", "none", "huge"]))
        if kind == "huge":  # over the message size limit
            req.prompt = draw(st.sampled_from(["x", "\u00e9", "\U0001f600"])) * MAX_MESSAGE
        elif kind == "text":
            req.prompt = draw(hostile_text)
        elif kind == "ids":
            req.token_ids.ids.extend(draw(st.lists(token_id, max_size=MAX_PROMPT_TOKENS + 2)))
    elif draw(st.booleans()):
        req.prompt = draw(sane_text)
    else:
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, 255), min_size=1, max_size=30)))
    return req


def mutate(data: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    """Flip, drop or insert bytes of an encoding: wrong wire types, bad lengths, invalid UTF-8."""
    buf = bytearray(data)
    for pos, value, op in edits:
        i = pos % (len(buf) + 1)
        if op == "insert" or not buf:
            buf.insert(i, value)
        elif op == "set":
            buf[i % len(buf)] = value
        else:
            del buf[i % len(buf)]
    return bytes(buf)


raw_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(mutate, requests().map(pb.GenerateRequest.SerializeToString),
              st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "insert", "drop"])),
                       min_size=1, max_size=4)),
)


# -- the tests ----------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=250)
@given(batch=st.lists(requests(), min_size=1, max_size=6))
def _structured(fuzz, batch):
    server, channel, tally = fuzz
    unary = channel.unary_unary(GENERATE, pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString)
    ids = Counter(r.request_id for r in batch if r.request_id)
    calls = [unary.future(r, timeout=120) for r in batch]
    for req, call in zip(batch, calls):
        try:
            outcome = call.result()
        except grpc.RpcError as err:
            outcome = err
        code = check_answer(req, req.ByteSize(), outcome, server.limits, server.tokenizer.encode, tally,
                            duplicate_id=ids[req.request_id] > 1)
        tally["structured"] += 1
        tally[f"code {code}"] += 1


def test_structured_requests_get_the_right_answers(fuzz):
    _structured(fuzz)
    assert_idle(fuzz[0])


@settings(FUZZ, max_examples=600)
@given(data=raw_bytes)
def _raw(fuzz, data):
    server, channel, tally = fuzz
    raw = channel.unary_unary(GENERATE)  # bytes in, bytes out
    try:
        outcome = pb.GenerateResponse.FromString(raw(data, timeout=120))
    except grpc.RpcError as err:
        outcome = err
    tally["raw bytes"] += 1
    if len(data) > MAX_MESSAGE:  # refused before anything parses it
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        tally["code RESOURCE_EXHAUSTED"] += 1
        return
    try:
        req = pb.GenerateRequest.FromString(data)
    except Exception:  # does not parse (here either): the server must say which part is wrong
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert outcome.details().startswith("request: "), outcome.details()
        tally["code INVALID_ARGUMENT"] += 1
        return
    tally[f"code {check_answer(req, len(data), outcome, server.limits, server.tokenizer.encode, tally)}"] += 1


def test_raw_and_mutated_bytes_are_refused_or_served_correctly(fuzz):
    _raw(fuzz)
    assert_idle(fuzz[0])


@settings(FUZZ, max_examples=150)
@given(prompt=st.lists(st.integers(0, 500), min_size=1, max_size=MAX_PROMPT_TOKENS), read_first=st.booleans(),
       stream=st.booleans())
def _deadlines_and_cancels(fuzz, prompt, read_first, stream):
    _, channel, tally = fuzz
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=MAX_TOKENS, ignore_eos=True)
    if stream:  # cancelled mid-stream (after its first token) or before anything came back
        call = channel.unary_stream(STREAM, pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString)(
            req, timeout=120)
        if read_first:
            first = next(call)
            assert first.token_ids or first.finish_reason in FINISH
        call.cancel()
        assert call.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK)
        tally["cancelled streams"] += 1
        return
    unary = channel.unary_unary(GENERATE, pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString)
    try:
        unary(req, timeout=0.001)
        tally["code OK"] += 1
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        tally["code DEADLINE_EXCEEDED"] += 1
    tally["1 ms deadlines"] += 1


def test_tiny_deadlines_and_cancellation_mid_stream(fuzz):
    _deadlines_and_cancels(fuzz)
    assert_idle(fuzz[0])


def test_thousands_of_streams_opened_and_dropped(fuzz):
    server, channel, tally = fuzz
    address = server.server.address
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7, 8, 9]), max_tokens=MAX_TOKENS, ignore_eos=True)
    for wave in range(10):
        # half the waves cancel every call; the other half drop the whole connection under them
        ch = grpc.insecure_channel(address) if wave % 2 else channel
        open_stream = ch.unary_stream(STREAM, pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString)
        calls = [open_stream(req, timeout=120) for _ in range(200)]
        if wave % 2:
            ch.close()
        else:
            for call in calls:
                call.cancel()
        for call in calls:
            code = call.code()  # blocks until the call is over
            assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), code
            tally[f"code {code.name}"] += 1
        tally["streams dropped"] += len(calls)
    assert_idle(server)


@settings(FUZZ, max_examples=80)
@given(data=st.one_of(st.binary(min_size=1, max_size=512),
                      st.binary(max_size=256).map(lambda b: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b)))
def _garbage(fuzz, data):
    server, _, tally = fuzz
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(4096)  # whatever the server answers (a GOAWAY, or nothing), then it closes
        except OSError:
            pass  # the server hung up on us: fine
    tally["garbage on the port"] += 1


def test_garbage_on_the_port_does_not_hurt(fuzz):
    _garbage(fuzz)
    assert greedy(fuzz[1], REFERENCE_PROMPTS) == fuzz[0].reference


CHAT = "/moeserve.v1.Inference/Chat"
CHAT_STREAM = "/moeserve.v1.Inference/ChatStream"
# ChatRequest's fields (and params' under "params."): what an INVALID_ARGUMENT about a chat may name
CHAT_FIELDS = ("request", "messages", "tools", "tool_choice", "parallel_tool_calls", "params.",
               "chat_template_kwargs", "continue_final_message")
SCHEMAS = ['{"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}', "", "{}",
           '{"type": "string"}', "[1, 2]", "{not json", '{"type": "nonsense"}', "null"]


CHAT_HOSTILE = ("messages", "tools", "tool_choice", "template", "continue", "params")


@st.composite
def chats(draw) -> pb.ChatRequest:
    """A chat that is sane but for a few drawn hostile parts (none in a third, one alone in another): messages of
    any roles and texts, or none; tools of any names and schemas (JSON or not); any tool_choice; template options
    that are no object or set what the server sets; continue_final_message without an assistant turn to continue;
    params drawn as a Generate request's are, its prompt sometimes left set."""
    hostile = draw(st.one_of(st.just(frozenset()), st.sampled_from(CHAT_HOSTILE).map(lambda f: {f}),
                             st.sets(st.sampled_from(CHAT_HOSTILE), max_size=3)))
    req = pb.ChatRequest()
    if "messages" in hostile:
        for _ in range(draw(st.integers(0, 4))):
            req.messages.add(role=draw(st.sampled_from(["user", "system", "assistant", "tool", "", "wizard"])),
                             content=draw(hostile_text), tool_call_id=draw(st.sampled_from(["", "c1"])))
    else:
        if draw(st.booleans()):
            req.messages.add(role="system", content=draw(sane_text))
        req.messages.add(role="user", content=draw(sane_text))
    names = (draw(st.lists(st.sampled_from(["f", "g", "", "f"]), max_size=3)) if "tools" in hostile else
             draw(st.sampled_from([[], ["f"], ["f", "g"]])))
    for name in names:
        req.tools.add(name=name, description=draw(sane_text),
                      parameters=draw(st.sampled_from(SCHEMAS) if "tools" in hostile else st.sampled_from(SCHEMAS[:3])))
    if "tool_choice" in hostile:
        req.tool_choice = draw(st.sampled_from(["", "auto", "none", "required", "f", "g", "fly"]))
    else:
        req.tool_choice = "none" if not names else draw(st.sampled_from(["required", "f"]))
    if draw(st.booleans()):
        req.parallel_tool_calls = draw(st.booleans())
    req.chat_template_kwargs = (draw(st.sampled_from(["[1]", "{nope", '{"messages": 1}', '"x"'])) if "template" in
                                hostile else draw(st.sampled_from(["", "{}", '{"enable_thinking": false}'])))
    req.continue_final_message = "continue" in hostile
    if "params" in hostile:
        params = draw(requests())
        if draw(st.booleans()):  # a prompt beside the messages
            params.prompt = "also this"
        req.params.CopyFrom(params)
    else:
        req.params.max_tokens = draw(st.integers(0, MAX_TOKENS))
        req.params.temperature = draw(st.sampled_from([0.0, 0.7]))
    return req


@settings(FUZZ, max_examples=120)
@given(req=chats(), stream=st.booleans())
def _chats(fuzz, req, stream):
    server, channel, tally = fuzz
    tally["chats"] += 1
    try:
        if stream:
            call = channel.unary_stream(CHAT_STREAM, pb.ChatRequest.SerializeToString, pb.ChatResponse.FromString)
            msgs = list(call(req, timeout=120))
        else:
            call = channel.unary_unary(CHAT, pb.ChatRequest.SerializeToString, pb.ChatResponse.FromString)
            msgs = [call(req, timeout=120)]
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a huge prompt in params, over the message size
            assert req.params.WhichOneof("input") is not None, err.details()
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, err.details(), req)
            assert err.details().startswith(CHAT_FIELDS), err.details()
        tally[f"code {code.name}"] += 1
        return
    last = msgs[-1]
    assert last.finish_reason in FINISH | {pb.tool_calls}, last
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    tokens = sum(len(m.token_ids) for m in msgs)
    assert tokens == last.usage.completion_tokens <= (req.params.max_tokens or DEFAULT_MAX_TOKENS)
    assert not req.params.WhichOneof("input") and req.messages
    if last.finish_reason == pb.tool_calls:  # the calls are to the tools given
        assert {c.name for c in last.tool_calls if c.name} <= {t.name for t in req.tools}
    tally["code OK"] += 1


def test_chats_get_the_right_answers(fuzz):
    _chats(fuzz)
    assert_idle(fuzz[0])
    raw = fuzz[1].unary_unary(CHAT)  # bytes in, bytes out: what does not parse is the request's fault
    for garbage in (b"\xff\xff\xff", b"\x0a\x03\x0a\x01\xff", b"\x2a\x02\xff\xff"):
        with pytest.raises(grpc.RpcError) as err:
            raw(garbage, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("request: ")


def test_idle_without_leaks_and_still_correct_afterwards(fuzz):
    server, channel, tally = fuzz
    assert_idle(server)
    assert greedy(channel, REFERENCE_PROMPTS) == server.reference  # same greedy tokens as before the fuzzing
    fresh = grpc.insecure_channel(server.server.address)
    try:
        assert greedy(fresh, REFERENCE_PROMPTS[:2]) == server.reference[:2]
    finally:
        fresh.close()
    assert_idle(server)
    assert sum(v for k, v in tally.items() if not k.startswith("code")) >= 2000, tally
