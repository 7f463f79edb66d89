"""Chat: messages rendered by the model's chat template, and a reply read back (its reasoning block and tool calls).

Shared by the HTTP front's /v1/chat/completions (router/openai_http.py) and the gRPC edge's Chat and ChatStream
(router/servicer.py): a chat arrives as an OpenAI-style body (the gRPC ChatRequest is turned into one,
`body_of`), `ChatTemplate.prepare` renders and tokenizes it and says how the reply is read (ChatRead);
`constrain` holds the engine request to the tools' call format (or a structured answer after the reasoning
block); a ChatReader per choice splits the output, piece by piece as it streams, into reasoning, content and
calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moeserve.router.client import fill_structured_output
from moeserve.router.errors import InvalidRequestError
from moeserve.router.reasoning import ReasoningSplitter, opens_thinking, think_first
from moeserve.router.tool_calls import CallDelta, ToolCallParser, ToolFormat, calls_of, structural_tag
from moeserve.v1 import inference_pb2 as pb

TOOL_CHOICES = ("auto", "none", "required")  # tool_choice's words; anything else names a function


class ChatTemplate:
    """A model's chat template and how its replies read (tool-call format, reasoning apart)."""

    def __init__(self, tokenizer: Any, tool_format: ToolFormat | None = None, reasoning: bool = False,
                 instead: str = "/v1/completions"):
        self.tokenizer = tokenizer
        self.instead = instead  # what a client of this front uses where the model has no chat template
        self.tool_format = tool_format  # the model's tool-call markup (tool_choice "auto"); None: not known
        self.reasoning = reasoning  # chat replies' leading reasoning block apart, as reasoning_content

    def render(self, body: Any) -> tuple[str, list | None, dict, Any]:
        """A chat body's messages rendered by the chat template (with its tools and chat_template_kwargs, and vLLM's
        add_generation_prompt and continue_final_message: the reply goes on from a last assistant message); the
        tools, their {name: parameters} and tool_choice (tools_of)."""
        if not isinstance(body, dict):
            raise InvalidRequestError("body", "must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "must be a non-empty list of {role, content} objects")
        plain = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise InvalidRequestError(f"messages[{i}].content", "only text parts are supported")
                content = "".join(c["text"] for c in content)
            if isinstance(m, dict) and content is None and isinstance(m.get("tool_calls"), list):
                content = ""  # an assistant turn that called tools
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise InvalidRequestError(f"messages[{i}]", "must be an object with a string role and content")
            extra = {k: m[k] for k in ("tool_calls", "tool_call_id", "name") if k in m}
            plain.append({"role": m["role"], "content": content, **extra})
        tools, functions, choice = tools_of(body)
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise InvalidRequestError("messages", f"this model has no chat template; use {self.instead}")
        extra = body.get("chat_template_kwargs") or {}
        if not isinstance(extra, dict) or any(k in ("messages", "tools", "add_generation_prompt") for k in extra):
            raise InvalidRequestError("chat_template_kwargs", "must be an object of the template's own variables "
                                                              "(messages, tools and add_generation_prompt are set)")
        go_on = body.get("continue_final_message", False)
        add_generation_prompt = body.get("add_generation_prompt", not go_on)
        for name, value in (("continue_final_message", go_on), ("add_generation_prompt", add_generation_prompt)):
            if not isinstance(value, bool):
                raise InvalidRequestError(name, f"must be true or false, got {value!r}")
        if go_on and (add_generation_prompt or plain[-1]["role"] != "assistant"):
            raise InvalidRequestError("continue_final_message", "continues a last assistant message: give one, and "
                                                                "add_generation_prompt false")
        try:
            text = self.tokenizer.apply_chat_template(plain, add_generation_prompt, tools=tools,
                                                      continue_final_message=go_on, **extra)
        except Exception as exc:  # noqa: BLE001 - the template's own checks (raise_exception) and its errors
            raise InvalidRequestError("messages", f"the chat template refused them: {exc}") from exc
        return text, tools, functions, choice

    def prepare(self, body: dict, structured: str | None = None) -> tuple[list[int], "ChatRead"]:
        """A chat body's prompt (rendered, as token ids) and how its reply is read: its reasoning, and with tools
        that may be called, how the output is held and its calls read. `structured`: the parameter that asks for a
        structured output of its own (tool calls refuse one)."""
        text, tools, functions, choice = self.render(body)
        opened = opens_thinking(text)
        plan = tool_plan(body, tools, functions, choice, self.tool_format, opened, structured) if tools else None
        return self.tokenizer.encode(text, add_special_tokens=False), ChatRead(plan, self.reasoning, opened)


def constrain(req: pb.GenerateRequest, read: "ChatRead", structured: str | None) -> str | None:
    """Hold a chat's engine request to what its reply must be: the tools' calls (tool_plan refuses another structured
    output beside them), or the structured output it asks for after the reasoning block, which stays free. The
    parameter the engine's errors about the constraint are reported under: "tools", or `structured`."""
    if read.tools is not None:
        fill_structured_output(req.structured_output, *read.tools.structured)
        return "tools"
    if structured and (read.reasoning or read.opened):  # think, then answer so
        constraint = as_format(req.structured_output, structured)
        req.structured_output.Clear()
        fill_structured_output(req.structured_output, "structural_tag", think_first(constraint, read.opened))
    return structured


def body_of(request: pb.ChatRequest) -> dict:
    """A gRPC ChatRequest's messages, tools and template options as the OpenAI-style body ChatTemplate.prepare
    reads (field names as the ChatRequest spells them in errors)."""
    messages = []
    for i, m in enumerate(request.messages):
        if not m.role:
            raise InvalidRequestError(f"messages[{i}].role", "must be set (system, user, assistant or tool)")
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        messages.append(message)
    body: dict[str, Any] = {"messages": messages, "continue_final_message": request.continue_final_message}
    tools = []
    for i, t in enumerate(request.tools):
        if not t.name:
            raise InvalidRequestError(f"tools[{i}].name", "must be set: the function's name")
        try:
            params = json.loads(t.parameters) if t.parameters else {"type": "object"}
        except ValueError as exc:
            raise InvalidRequestError(f"tools[{i}].parameters", f"is not JSON: {exc}") from None
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].parameters", "must be a JSON Schema object, as JSON text")
        function = {"name": t.name, "parameters": params, **({"description": t.description} if t.description else {})}
        tools.append({"type": "function", "function": function})
    if tools:
        body["tools"] = tools
    choice = request.tool_choice
    if choice:
        body["tool_choice"] = choice if choice in TOOL_CHOICES else {"type": "function", "function": {"name": choice}}
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.chat_template_kwargs:
        try:
            body["chat_template_kwargs"] = json.loads(request.chat_template_kwargs)
        except ValueError as exc:
            raise InvalidRequestError("chat_template_kwargs", f"is not JSON: {exc}") from None
    return body


def as_format(so: pb.StructuredOutput, param: str) -> dict:
    """A StructuredOutput's constraint as an xgrammar structural tag format (to follow a reasoning block)."""
    kind = so.WhichOneof("constraint")
    if kind in ("json_schema", "json_object"):  # (a run of blank space: one character, the least xgrammar allows)
        try:
            schema = json.loads(so.json_schema) if kind == "json_schema" else {"type": "object"}
        except ValueError as exc:
            raise InvalidRequestError(param, f"is not JSON: {exc}") from None
        return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
    if kind == "regex":
        return {"type": "regex", "pattern": so.regex}
    if kind == "grammar":
        return {"type": "grammar", "grammar": so.grammar}
    return {"type": "or", "elements": [{"type": "const_string", "value": v} for v in so.choice.values]}


def tools_of(body: dict) -> tuple[list | None, dict[str, dict], Any]:
    """The chat body's tools (rendered by the chat template), their {name: parameters schema}, and tool_choice:
    "none", "auto" (the default with tools), "required" or the name of the function to call."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice", "needs tools")
        return None, {}, "none"
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tools", "must be a non-empty list of {type: function, function: {...}}")
    functions = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise InvalidRequestError(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ...}}')
        params = f.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters", "must be a JSON Schema (an object)")
        functions[f["name"]] = params
    if choice in (None, "auto", "none", "required"):
        return tools, functions, choice or "auto"
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        else None
    if name not in functions:
        raise InvalidRequestError("tool_choice", f"must be \"none\", \"auto\", \"required\" or a function of tools "
                                                 f"({', '.join(functions)}), got {choice!r}")
    return tools, functions, name


def tool_plan(body: dict, tools: list, functions: dict[str, dict], choice: str, fmt: ToolFormat | None,
              thinking: bool, structured: str | None = None) -> "ToolPlan | None":
    """How a chat whose tools may be called is generated and read back. With the model's tool-call format known,
    the output is held to its structural tag (free text and calls for "auto") and parsed in that format; without
    it, "required" or a named function make the whole output the call(s) as JSON (a list of {"name", "arguments"}
    for "required", the arguments for a named function), and "auto" is refused: telling a call from text takes
    the format. `structured`: the parameter that asks for a structured output of its own (refused beside calls)."""
    if choice == "none":
        return None
    if structured is not None:
        raise InvalidRequestError("tool_choice", f"a call's arguments are a structured output already: leave out "
                                                 f"{structured}, or give tool_choice \"none\"")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequestError("parallel_tool_calls", f"must be true or false, got {parallel!r}")
    names = tuple(functions) if choice in ("auto", "required") else (choice,)
    if fmt is not None:
        forced = choice if choice in ("auto", "required") else {"type": "function", "function": {"name": choice}}
        try:
            spec = structural_tag(fmt, tools, forced, parallel, thinking)
        except ValueError as exc:  # a schema xgrammar does not take
            raise InvalidRequestError("tools", f"cannot be held to this model's call format: {exc}") from None
        return ToolPlan("native", names, ("structural_tag", spec), fmt)
    if choice == "auto":
        raise InvalidRequestError("tool_choice", '"auto" needs this model\'s tool-call format, which its chat template '
                                                 'does not show (serve --tool-call-format names it); give '
                                                 '"required", a function {"type": "function", "function": '
                                                 '{"name": ...}}, or "none"')
    if choice == "required":
        one = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                          "required": ["name", "arguments"], "additionalProperties": False}
                         for name, params in functions.items()]}
        calls = {"type": "array", "minItems": 1, "items": one, **({} if parallel else {"maxItems": 1})}
        return ToolPlan("required", names, ("json_schema", calls))
    return ToolPlan("named", names, ("json_schema", functions[choice]))


@dataclass(frozen=True)
class ToolPlan:
    """A chat whose tools may be called: `mode` "native" (the output is free text and calls in the model's `format`,
    held to its structural tag), "named" (the output is the arguments of names[0], as JSON) or "required" (a JSON
    list of {"name", "arguments"}); `structured` the (kind, value) of the constraint."""

    mode: str
    names: tuple[str, ...]
    structured: tuple[str, Any]
    format: ToolFormat | None = None


@dataclass(frozen=True)
class ChatRead:
    """How a chat reply is read: its calls (None: no tools to call), whether its reasoning block goes apart as
    reasoning_content, and whether the prompt opened that block."""

    tools: ToolPlan | None
    reasoning: bool
    opened: bool


class ChatReader:
    """Reads one chat choice's output piece by piece, as it streams (a whole reply too): its reasoning, its content
    and its calls."""

    def __init__(self, read: ChatRead, call_id: str):
        self.plan, self.call_id = read.tools, call_id
        self._thinking = ReasoningSplitter(read.opened) if read.reasoning else None
        native = self.plan is not None and self.plan.mode == "native"
        # (with the reasoning apart, the parser sees the answer alone)
        self._parser = ToolCallParser(self.plan.format, read.opened and not read.reasoning) if native else None
        self._text: list[str] = []
        self._deltas: list[CallDelta] = []  # every call piece read so far
        self.reasoning_tokens = 0  # of the pieces read: those in the reasoning block (its end marker's too)

    def read(self, text: str, finish: str | None, tokens: int = 0) -> tuple[str, str, list[dict], str | None]:
        """(reasoning, content, OpenAI tool_calls, finish_reason) for the next piece of output (of `tokens` tokens)
        and the finish reason so far (None while running). A call cut short by max_tokens stays content; an output
        ended with calls finishes "tool_calls"."""
        reasoning = ""
        if self._thinking is not None:
            before = self._thinking.thinking
            reasoning, text = self._thinking.feed(text)
            if before or self._thinking.thinking:
                self.reasoning_tokens += tokens
            if finish is not None:
                more, rest = self._thinking.finish()
                reasoning, text = reasoning + more, text + rest
        if self.plan is None:
            return reasoning, text, [], finish
        if self._parser is not None:
            content, deltas = self._parser.feed(text)
            if finish is not None:
                rest, more = self._parser.finish()
                content, deltas = content + rest, deltas + more
            called = self._parser.called
        else:  # the whole output is the call(s): read at the end
            self._text.append(text)
            content, deltas, called = "", [], False
            if finish == "stop":
                whole = "".join(self._text)
                calls = ([(self.plan.names[0], whole)] if self.plan.mode == "named" else
                         [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(whole)])
                deltas = [CallDelta(i, name, arguments) for i, (name, arguments) in enumerate(calls)]
                called = True
            elif finish is not None:
                content = "".join(self._text)
        self._deltas += deltas
        out: list[dict] = []
        for d in deltas:  # OpenAI's: a call's first delta has its id, type and name; pieces of one call merged
            if out and out[-1]["index"] == d.index:
                out[-1]["function"]["arguments"] += d.arguments
            elif d.name is not None:
                out.append({"index": d.index, "id": f"call-{self.call_id}-{d.index}", "type": "function",
                            "function": {"name": d.name, "arguments": d.arguments}})
            else:
                out.append({"index": d.index, "function": {"arguments": d.arguments}})
        return reasoning, content, out, "tool_calls" if finish == "stop" and called else finish

    def calls(self) -> list[dict]:
        """The calls read so far, whole, as a reply's message lists them."""
        return [{"id": f"call-{self.call_id}-{i}", "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls_of(self._deltas))]


