"""Reading a chat reply: tool calls in a model's own format (router/tool_calls.py): each format's output, as its chat
template renders an assistant's calls, is in the language of xgrammar's structural tag for it (what the HTTP front
holds "auto" outputs to) and parses back to the same calls and content, however the text is split as it streams;
and a reasoning block apart from the answer (router/reasoning.py), however it streams."""

from __future__ import annotations

import json
import random

import pytest

from moeserve.router.tool_calls import (FORMATS, Call, ToolCallParser, calls_of, detect_format, parse, resolve_format,
                                        structural_tag)

xgr = pytest.importorskip("xgrammar")

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
             "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "time", "parameters": {
             "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}}}]
CALLS = [Call("weather", '{"city": "Paris"}'), Call("time", '{"utc": true}')]

# Assistant turns with tool_calls as each family's chat template renders them (written for these tests).
TEMPLATES = {
    "hermes": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
               "{% for c in m.tool_calls or [] %}{% if m.content or not loop.first %}\n{% endif %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
               "{{ c.function.arguments }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"),
    "deepseek_v3": ("{% for m in messages %}<｜{{ m.role }}｜>{{ m.content }}{% if m.tool_calls %}<｜tool▁calls▁begin｜>"
                    "{% for c in m.tool_calls %}{% if not loop.first %}\n{% endif %}<｜tool▁call▁begin｜>function"
                    "<｜tool▁sep｜>{{ c.function.name }}\n```json\n{{ c.function.arguments }}\n```<｜tool▁call▁end｜>"
                    "{% endfor %}<｜tool▁calls▁end｜>{% endif %}{% endfor %}"),
    "deepseek_v3_1": ("{% for m in messages %}<｜{{ m.role }}｜>{{ m.content }}{% if m.tool_calls %}"
                      "<｜tool▁calls▁begin｜>{% for c in m.tool_calls %}"
                      "<｜tool▁call▁begin｜>{{ c.function.name }}<｜tool▁sep｜>{{ c.function.arguments }}"
                      "<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}{% endfor %}"),
    "mistral": ("{% for m in messages %}{{ m.content }}{% if m.tool_calls %}[TOOL_CALLS] [{% for c in m.tool_calls %}"
                "{% if not loop.first %}, {% endif %}{\"name\": \"{{ c.function.name }}\", \"arguments\": "
                "{{ c.function.arguments }}}{% endfor %}]{% endif %}{% endfor %}"),
}


def _reply(name: str, content: str, calls: list[Call]) -> str:
    """The assistant's reply text as the template renders it (the reply alone, without the role's markup)."""
    from jinja2 import Environment

    message = {"role": "assistant", "content": content,
               "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                              for c in calls]}
    text = Environment().from_string(TEMPLATES[name]).render(messages=[message])
    start = {"hermes": len("<|im_start|>assistant\n"), "mistral": 0}.get(name, len("<｜assistant｜>"))
    return text[start:len(text) - (len("<|im_end|>\n") if name == "hermes" else 0)]


def _accepts(spec: str, text: str) -> bool:
    return bool(xgr.testing._is_grammar_accept_string(xgr.Grammar.from_structural_tag(spec), text))


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_parses_what_its_template_renders_and_its_grammar_accepts(name):
    fmt = FORMATS[name]
    assert detect_format(TEMPLATES[name]) is fmt
    text = _reply(name, "Let me look that up.", CALLS)
    assert _accepts(structural_tag(fmt, TOOLS, "auto", True, False), text)
    content, calls = parse(fmt, text)
    assert calls == CALLS and content.strip() == "Let me look that up."
    # one call: what tool_choice "required" with parallel_tool_calls false accepts
    one = _reply(name, "", CALLS[:1])
    assert _accepts(structural_tag(fmt, TOOLS, "required", False, False), one)
    assert not _accepts(structural_tag(fmt, TOOLS, "required", False, False), text)
    assert parse(fmt, one) == ("", CALLS[:1])
    # no call: the text as it is
    assert parse(fmt, "Just text, no <tools>.") == ("Just text, no <tools>.", [])
    assert _accepts(structural_tag(fmt, TOOLS, "auto", True, False), "Just text, no <tools>.")


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_stream_split_anywhere_gives_the_whole_parse(name):
    fmt = FORMATS[name]
    rng = random.Random(0)
    for text in (_reply(name, "Checking.", CALLS), _reply(name, "", CALLS[:1]),
                 "<think>Should I call <tool_call>? No.</think>\n\n" + _reply(name, "", CALLS), "plain < text <"):
        whole = parse(fmt, text)
        for _ in range(60):
            parser, content, calls, i = ToolCallParser(fmt), [], [], 0
            while i < len(text):
                j = i + rng.randint(1, 6)
                piece, new = parser.feed(text[i:j])
                content.append(piece)
                calls += new
                i = j
            piece, new = parser.finish()
            assert ("".join(content) + piece, calls_of(calls + new)) == whole
            deltas = calls + new
            if whole[1]:  # each call's name first, then its arguments in pieces
                assert [d.name for d in deltas if d.name] == [c.name for c in whole[1]]
                assert len(deltas) > 2 * len(whole[1])


def test_reasoning_is_content_and_a_call_inside_it_is_not_a_call():
    fmt = FORMATS["hermes"]
    inside = '<think>\nmaybe <tool_call>\n{"name": "time", "arguments": {"utc": true}}\n</tool_call>\n</think>\n\n'
    content, calls = parse(fmt, inside + _reply("hermes", "", CALLS[:1]))
    assert calls == CALLS[:1] and content.startswith(inside)
    # a prompt that opened the block (as DeepSeek-R1's does): the reply continues it
    content, calls = parse(fmt, inside[len("<think>"):], thinking=True)
    assert calls == [] and content == inside[len("<think>"):]
    assert _accepts(structural_tag(fmt, TOOLS, "auto", True, True), "I think.</think>\n\n" + _reply("hermes", "", CALLS))


def test_a_call_cut_short_or_not_a_call_stays_content():
    fmt = FORMATS["hermes"]
    full = _reply("hermes", "", CALLS)
    cut = full[:full.rindex("true")]  # max_tokens ended the second call in its arguments: as far as they came
    assert parse(fmt, cut) == ("", [CALLS[0], Call("time", '{"utc": ')])
    cut = full[:full.rindex('"time"')]  # or before its name: its text is content
    assert parse(fmt, cut) == (cut[cut.rindex("<tool_call>"):], CALLS[:1])
    bad = "<tool_call>\n{not json}\n</tool_call>"
    assert parse(fmt, bad) == (bad, [])
    mistral = FORMATS["mistral"]  # calls to the end of the output
    full = _reply("mistral", "", CALLS)
    assert parse(mistral, full) == ("", CALLS)
    assert parse(mistral, full[:-3]) == ("", [CALLS[0], Call("time", '{"utc": true')])  # cut short: as far as it came
    cut = full[:full.rindex('"time"')]  # before the second call's name: the first call
    assert parse(mistral, cut) == ("", CALLS[:1])
    assert parse(mistral, full[:len("[TOOL_CALLS] [{\"na")]) == ("[TOOL_CALLS] [{\"na", [])  # before any name: content
    # another layout (keys the other way round) is read whole at the end; a list that is not calls is content
    other = '[TOOL_CALLS] [{"arguments": {"city": "Paris"}, "name": "weather"}]'
    assert parse(mistral, other) == ("", CALLS[:1])
    assert parse(mistral, "[TOOL_CALLS] [1, 2]") == ("[TOOL_CALLS] [1, 2]", [])
    # strings holding braces, quotes and escapes inside the arguments
    tricky = Call("note", '{"text": "a } b \\" { c", "n": [1, {"k": "]"}]}')
    assert parse(mistral, _reply("mistral", "ok", [tricky, CALLS[1]])) == ("ok", [tricky, CALLS[1]])
    assert parse(fmt, "<tool_call>\n" + json.dumps({"arguments": {}}) + "\n</tool_call>")[1] == []


def test_formats_are_told_by_the_template_or_named():
    assert detect_format(None) is None and detect_format("{{ messages }}") is None
    assert resolve_format("auto", TEMPLATES["hermes"]) is FORMATS["hermes"]
    assert resolve_format("none", TEMPLATES["hermes"]) is None
    assert resolve_format("deepseek_v3", None) is FORMATS["deepseek_v3"]
    with pytest.raises(ValueError, match="auto, none or one of hermes"):
        resolve_format("llama", None)


@pytest.mark.parametrize("text, opened, want", [
    ("<think>\nWhy? Because.\n</think>\n\nIt is blue.", False, ("\nWhy? Because.\n", "It is blue.")),
    ("  <think>x</think>y", False, ("x", "y")),
    ("Because.</think>\n\nBlue.</think>", True, ("Because.", "Blue.</think>")),
    ("Still thinking </thi", True, ("Still thinking </thi", "")),
    ("No block <think>here</think>", False, ("", "No block <think>here</think>")),
    ("<thinking is not a tag", False, ("", "<thinking is not a tag")),
    ("<think>a</think>\n\n", False, ("a", "")),
])
def test_reasoning_splits_off_a_leading_block_however_it_streams(text, opened, want):
    from moeserve.router.reasoning import ReasoningSplitter

    rng = random.Random(1)
    for size in (len(text) + 1, 1, 2, 3, None):
        splitter, parts, i = ReasoningSplitter(opened), [], 0
        while i < len(text):
            j = i + (size or rng.randint(1, 5))
            parts.append(splitter.feed(text[i:j]))
            i = j
        parts.append(splitter.finish())
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == want
