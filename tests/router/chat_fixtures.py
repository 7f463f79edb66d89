"""Chat fixtures shared by the HTTP front's tests and the gRPC edge's: two tools, and the demo model with a tokenizer
and chat template in Qwen3's style (tool calls as <tool_call> JSON </tool_call>; with or without a reasoning block
that the generation prompt opens)."""

from __future__ import annotations

import json

import pytest

WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}


def args_fit(call: dict) -> bool:
    """Whether a call's arguments satisfy its function's schema (WEATHER's or TIME's)."""
    args = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "weather":
        return set(args) == {"city"} and args["city"] in ("Paris", "Rome")
    return call["function"]["name"] == "time" and set(args) == {"utc"} and isinstance(args["utc"], bool)


# A chat template in Qwen3's style (written for these tests): the tools listed, calls as <tool_call> JSON </tool_call>.
HERMES = ("{%- if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
          "Call one as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n{% endif %}"
          "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
          "{%- for c in m.tool_calls or [] %}{% if m.content or not loop.first %}\n{% endif %}<tool_call>\n"
          "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments }}}\n</tool_call>"
          "{%- endfor %}<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hermes_checkpoint(tmp_path_factory):
    """The demo architecture with a vocabulary of 520 whose tokenizer has <tool_call>, </tool_call>, <think> and
    </think> as tokens of their own (ids 512-515, as Qwen3's tokenizer has them) and a chat template in Qwen3's
    style (without reasoning)."""
    from tokenizers import AddedToken, Tokenizer

    from moeserve.models.demo import write_demo_model

    path = write_demo_model(tmp_path_factory.mktemp("hermes") / "ckpt", seed=0, config_override={"vocab_size": 520})
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ("<tool_call>", "</tool_call>", "<think>", "</think>")])
    assert tok.token_to_id("<tool_call>") == 512
    tok.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HERMES}))
    return str(path)


@pytest.fixture(scope="module")
def thinking_checkpoint(hermes_checkpoint, tmp_path_factory):
    """hermes_checkpoint with a template whose generation prompt opens a reasoning block (as DeepSeek-R1's and
    Qwen3's do), or with enable_thinking false closes it at once (as Qwen3's does)."""
    import shutil

    path = tmp_path_factory.mktemp("thinking") / "ckpt"
    shutil.copytree(hermes_checkpoint, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    opened = ("{%- if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
              "enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")
    template = HERMES[:HERMES.index("{%- if add_generation_prompt")] + opened
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return str(path)


