"""Tool calls in a model's own format: telling calls from text in its output, whole or as it streams.

A chat model trained for tools writes a call in markup of its own (Qwen3 and Hermes: `<tool_call>` around a JSON
object; DeepSeek-V3 and R1: `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` and a ```json block; Mistral's
(Mixtral-8x22B-Instruct): `[TOOL_CALLS]` and a JSON list of calls to the end of the output). With
`tool_choice` "auto" the model decides whether to call; the OpenAI-compatible front (router/openai_http.py) holds
its output to xgrammar's structural tag of that format (free text, and once a call begins, the call's markup around
arguments that satisfy the function's JSON Schema), then `ToolCallParser` splits the text into content and calls
(as it streams: a call's name, then its arguments as they are written).

The format is told by the chat template (the markup it renders an assistant's tool_calls with), or named with
`moeserve serve --tool-call-format`. A leading reasoning block (`<think>...</think>`, also one the prompt opened)
stays content: a call written inside it is not a call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from .reasoning import ReasoningSplitter, partial_tail


def _named(call: object) -> tuple[str, object]:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        raise ValueError('a call must be {"name": ..., "arguments": ...}')
    return call["name"], call["arguments"]


def _hermes_body(body: str) -> list[tuple[str, object]]:
    return [_named(json.loads(body))]


def _mistral_body(body: str) -> list[tuple[str, object]]:
    calls = json.loads(body)
    if not isinstance(calls, list) or not calls:
        raise ValueError("calls must be a non-empty JSON list")
    return [_named(c) for c in calls]


@dataclass(frozen=True)
class ToolFormat:
    """One model family's markup for calls: each call between `call_begin` and `call_end` (empty: the end of the
    output), the calls of a turn optionally inside `wrappers` (dropped: neither content nor a call); `body` reads the
    (name, arguments) of the call(s) between them where `head` does not (None: such text is not a call)."""

    name: str
    grammar: str | None  # xgrammar's built-in structural tag of this format (get_model_structural_tag's model)
    call_begin: str
    call_end: str
    wrappers: tuple[str, ...]
    body: Callable[[str], list[tuple[str, object]]] | None
    models: str  # for help texts
    # Streaming a call's arguments as they come: `head` matches a call's text up to its arguments (group "name"),
    # `tail` what follows them before call_end. None: each call is read whole (`body`).
    head: re.Pattern | None = None
    tail: str = ""
    # Calls as one JSON list to the end of the output (Mistral): streamed element by element, each element's head
    # (`head`, from its "{") then its "arguments" object as written, read to its closing brace.
    json_list: bool = False

    def markers(self) -> tuple[str, ...]:
        return (self.call_begin, *self.wrappers)


FORMATS = {f.name: f for f in (
    ToolFormat("hermes", "qwen_3", "<tool_call>", "</tool_call>", (), _hermes_body, "Qwen3, Qwen2.5, Hermes",
               re.compile(r'\s*\{"name": "(?P<name>[^"\\]+)", "arguments": '), "}\n"),
    ToolFormat("deepseek_v3", "deepseek_r1", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"), None, "DeepSeek-V3, R1",
               re.compile(r"function<｜tool▁sep｜>(?P<name>[^\n]+)\n```json\n"), "\n```"),
    ToolFormat("deepseek_v3_1", "deepseek_v3_1", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"), None, "DeepSeek-V3.1",
               re.compile(r"(?P<name>[^<\n]+)<｜tool▁sep｜>"), ""),
    ToolFormat("mistral", None, "[TOOL_CALLS]", "", (), _mistral_body, "Mixtral-8x22B-Instruct, Mistral",
               re.compile(r'\s?\{\s?"name"\s?:\s?"(?P<name>[^"\\]+)"\s?,\s?"arguments"\s?:\s?'), json_list=True),
)}


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template renders assistant calls in, or None when it renders none it knows."""
    if not chat_template:
        return None
    if "<｜tool▁calls▁begin｜>" in chat_template:
        return FORMATS["deepseek_v3" if "```json" in chat_template else "deepseek_v3_1"]
    if "<tool_call>" in chat_template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in chat_template:
        return FORMATS["mistral"]
    return None


def resolve_format(name: str, chat_template: str | None) -> ToolFormat | None:
    """`serve --tool-call-format`: "auto" (told by the chat template), "none", or a format of FORMATS."""
    if name == "auto":
        return detect_format(chat_template)
    if name == "none":
        return None
    if name not in FORMATS:
        raise ValueError(f"tool-call format must be auto, none or one of {', '.join(FORMATS)}; got {name!r}")
    return FORMATS[name]


def structural_tag(fmt: ToolFormat, tools: list[dict], tool_choice: object, parallel: bool, thinking: bool) -> str:
    """The JSON of xgrammar's structural tag holding an output to `fmt` with these tools: free text and calls
    ("auto"), at least one call ("required"), or a call of the function named. `thinking`: the prompt ends in an
    opened reasoning block, which the output continues; otherwise a leading reasoning block is optional."""
    if fmt.grammar is None:
        return json.dumps(_mistral_tag(tools, tool_choice, parallel))
    from xgrammar import get_model_structural_tag

    tag = get_model_structural_tag(fmt.grammar, tools=tools, tool_choice=tool_choice,
                                   reasoning="enabled" if thinking else "auto", parallel_tool_calls=parallel,
                                   max_whitespace_cnt=1)  # (a run of blank space in arguments: one character)
    return tag.model_dump_json()


def _mistral_tag(tools: list[dict], tool_choice: object, parallel: bool) -> dict:
    """Mistral's calls as a structural tag (xgrammar has none built in): `[TOOL_CALLS] ` and a JSON list of
    {"name", "arguments"} calls to the end of the output."""
    functions = [t["function"] for t in tools]
    if isinstance(tool_choice, dict):
        functions = [f for f in functions if f["name"] == tool_choice["function"]["name"]]
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                       "arguments": f.get("parameters", {"type": "object"})},
                      "required": ["name", "arguments"], "additionalProperties": False} for f in functions]}
    single = not parallel or isinstance(tool_choice, dict)
    calls = {"type": "tag", "begin": "[TOOL_CALLS] ", "end": "", "content": {
        "type": "json_schema", "max_whitespace_cnt": 1,
        "json_schema": {"type": "array", "items": one, "minItems": 1, **({"maxItems": 1} if single else {})}}}
    if tool_choice == "auto":  # free text, or the calls to the end
        return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["[TOOL_CALLS]"],
                                                     "tags": [calls], "stop_after_first": True}}
    return {"type": "structural_tag", "format": calls}


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # the arguments' JSON text


@dataclass(frozen=True)
class CallDelta:
    """A piece of the index-th call: its first one has the name; the arguments' text pieces joined are its
    arguments."""

    index: int
    name: str | None
    arguments: str


class ToolCallParser:
    """Splits a model's output into content and calls as it arrives: `feed` each new piece of text, then `finish`
    once; each returns (content text, CallDeltas) for what it settled. Text that may be the start of a marker is held
    until it is told apart. A call's name goes out once its text up to the arguments has come (ToolFormat.head),
    then its arguments as they come, short of what may be the format's text after them (a call cut short there ends
    so); in a format without a head (or a call whose text does not match it) the call goes out whole once complete.
    Whatever is left at the end (a call cut short before its name, a marker's prefix) is content. Blank text between calls is dropped. The pieces
    joined are the same however the output was split."""

    def __init__(self, fmt: ToolFormat, thinking: bool = False):
        self.fmt = fmt
        self._lead = ReasoningSplitter(thinking, raw=True)  # a leading reasoning block: content, as written
        self._buf = ""
        self._state = "text"  # text, call
        self._calls = 0  # calls begun (named)
        self._sent = -1  # in a call: how much of its text has gone out (-1: its name not yet)
        self._scanned = 0  # in a call: how much of its text was searched for the end marker
        # in a JSON list of calls (ToolFormat.json_list): where the reading is (open, head, args, close, sep, done,
        # stop), how far into the list, and inside an arguments object its depth and whether in a string, escaped
        self._list, self._at = "open", 0
        self._depth, self._quoted, self._escaped = 0, False, False

    @property
    def called(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        block, text = self._lead.feed(text)
        return self._settle(block, text)

    def _settle(self, block: str, text: str) -> tuple[str, list[CallDelta]]:
        self._buf += text
        content: list[str] = [block]
        deltas: list[CallDelta] = []
        while self._step(content, deltas):
            pass
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[CallDelta]]:
        content, deltas = self._settle(*self._lead.finish())
        rest = self._buf
        self._buf = ""
        if self._state == "call" and self.fmt.json_list and self._sent >= 0:
            after = rest[self._at:]
            if self._list == "done" and not after.isspace():  # text after the list's end
                content += after
        elif self._state == "call" and self._sent >= 0:
            pass  # cut short after its name: its arguments as far as they went out (the rest may be its tail)
        elif self._state == "call" and not self.fmt.call_end:  # calls to the end of the output
            try:
                deltas += self._whole(rest)
            except ValueError:
                content += self.fmt.call_begin + rest
        elif self._state == "call":
            content += self.fmt.call_begin + rest  # cut short before its name: the call's text as it came
        elif not (self.called and rest.isspace()):
            content += rest
        return content, deltas

    def _step(self, content: list[str], deltas: list[CallDelta]) -> bool:
        """Settle what the buffer allows; True when there may be more to settle."""
        buf = self._buf
        if self._state == "call":
            return self._in_call(content, deltas)
        # text: up to the first marker
        found = [(i, m) for m in self.fmt.markers() if (i := buf.find(m)) >= 0]
        if not found:
            keep = partial_tail(buf, self.fmt.markers())
            settled = buf[:len(buf) - keep]
            if self.called and settled.isspace():
                return False  # blank after a call: dropped if only more calls (or the end) follow
            content.append(settled)
            self._buf = buf[len(buf) - keep:]
            return False
        i, marker = min(found)
        if not (self.called and buf[:i].isspace()):
            content.append(buf[:i])
        self._buf = buf[i + len(marker):]
        if marker == self.fmt.call_begin:
            self._state, self._sent, self._scanned = "call", -1, 0
            self._list, self._at = "open", 0
        return True

    def _in_list(self, deltas: list[CallDelta]) -> bool:
        """A JSON list of calls (ToolFormat.json_list), read as far as the buffer goes: "[", then per element its
        head (the name goes out), its arguments object as it comes (read to its closing brace, strings and
        escapes minded), "}", and "," or "]". Text that fits none of this stops the reading: the calls so far
        stand; with none, the list is read whole at the end (another key order, say)."""
        buf, at = self._buf, self._at
        while True:
            while at < len(buf) and buf[at].isspace() and self._list != "args":
                at += 1
            if at >= len(buf) or self._list in ("done", "stop"):
                break
            if self._list == "open":
                self._list, at = ("head", at + 1) if buf[at] == "[" else ("stop", at)
            elif self._list == "head":
                m = self.fmt.head.match(buf, at)
                if m is None or m.end() == len(buf):  # not yet (or another layout: read whole at the end)
                    break
                deltas.append(CallDelta(self._calls, m["name"], ""))
                self._calls += 1
                self._list, at, self._sent = "args", m.end(), m.end()
                self._depth, self._quoted, self._escaped = 0, False, False
            elif self._list == "args":
                end = self._scan_arguments(buf, at)
                done = end is not None
                at = end if done else len(buf)
                deltas += self._piece(buf[self._sent:at])
                self._sent = at
                if not done:
                    break
                self._list = "close"
            elif self._list == "close":
                self._list, at = ("sep", at + 1) if buf[at] == "}" else ("stop", at)
            elif self._list == "sep":
                self._list, at = {",": ("head", at + 1), "]": ("done", at + 1)}.get(buf[at], ("stop", at))
        self._at = at
        return False

    def _scan_arguments(self, buf: str, at: int) -> int | None:
        """From `at` in an arguments object: the index just past its closing brace, or None if it has not come."""
        for i in range(at, len(buf)):
            ch = buf[i]
            if self._quoted:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._quoted = False
            elif ch == '"':
                self._quoted = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None

    def _in_call(self, content: list[str], deltas: list[CallDelta]) -> bool:
        # (a long call's text grows piece by piece: each piece is searched and sliced, not the whole call again)
        fmt, buf = self.fmt, self._buf
        if fmt.json_list:
            return self._in_list(deltas)
        end = buf.find(fmt.call_end, max(0, self._scanned - len(fmt.call_end) + 1)) if fmt.call_end else -1
        self._scanned = len(buf)
        body = buf if end < 0 else buf[:end]
        if self._sent < 0 and fmt.head is not None:
            m = fmt.head.match(body)
            if m is not None and (m.end() < len(body) or end >= 0):  # the head is complete: the name goes out
                deltas.append(CallDelta(self._calls, m["name"], ""))
                self._calls += 1
                self._sent = m.end()
        if end < 0:
            if self._sent >= 0:  # the arguments so far, short of what may be the tail or the end marker
                safe = len(body) - partial_tail(body, (fmt.call_end,))
                hold = len(fmt.tail) if fmt.tail and body.endswith(fmt.tail, 0, safe) else \
                    partial_tail(body, (fmt.tail,), safe)
                deltas += self._piece(body[self._sent:safe - hold])
                self._sent = max(self._sent, safe - hold)
            return False
        self._buf, self._state = buf[end + len(fmt.call_end):], "text"
        if self._sent >= 0:
            rest = body[self._sent:]
            deltas += self._piece(rest[:len(rest) - len(fmt.tail)] if fmt.tail and rest.endswith(fmt.tail) else rest)
            return True
        try:
            deltas += self._whole(body)
        except ValueError:  # not a call after all: its text is content
            content.append(fmt.call_begin + body + fmt.call_end)
        return True

    def _piece(self, arguments: str) -> list[CallDelta]:
        return [CallDelta(self._calls - 1, None, arguments)] if arguments else []

    def _whole(self, body: str) -> list[CallDelta]:
        """Whole calls from a call's text (ToolFormat.body), each with its arguments as compact JSON."""
        if self.fmt.body is None:
            raise ValueError("not a call in this format")
        out = []
        for name, arguments in self.fmt.body(body):
            out.append(CallDelta(self._calls, name, json.dumps(arguments, ensure_ascii=False)))
            self._calls += 1
        return out


def calls_of(deltas: list[CallDelta]) -> list[Call]:
    """The calls CallDeltas make up."""
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for d in deltas:
        if d.name is not None:
            names[d.index] = d.name
        arguments.setdefault(d.index, []).append(d.arguments)
    return [Call(names[i], "".join(arguments[i])) for i in sorted(names)]


def parse(fmt: ToolFormat, text: str, thinking: bool = False) -> tuple[str, list[Call]]:
    """A whole output's (content, calls)."""
    parser = ToolCallParser(fmt, thinking)
    content, deltas = parser.feed(text)
    rest, more = parser.finish()
    return content + rest, calls_of(deltas + more)
