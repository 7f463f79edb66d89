"""The checkpoint's tokenizer.json (tokenizers library) with the eos ids generation stops on, and its chat template."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError


class Tokenizer:
    """encode/decode plus `eos_token_ids` (generation_config.json, else config.json, else tokenizer_config.json)."""

    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: list[int], bos_token_id: int | None = None,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template  # Jinja, as tokenizer_config.json or chat_template.jinja has it
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ...: the template's variables
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            **variables) -> str:
        """The prompt text of a conversation, as HF transformers' apply_chat_template renders it (a sandboxed
        Jinja environment with trim_blocks and lstrip_blocks; raise_exception for the template's own checks, and
        its tojson filter); `tools`: the function definitions a template may render; `variables`: the template's
        own (as HF's chat_template_kwargs: enable_thinking, ...). `continue_final_message`: the text ends where the
        last message's content does (no end of turn), for the reply to go on from it (as HF's: no generation prompt
        then)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json chat_template)")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = tojson
            self._template = env.from_string(self.chat_template)
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ValueError("continue_final_message needs a last message with text content")
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE}]
        text = self._template.render(**{**self.special_tokens, **variables}, messages=messages,
                                     add_generation_prompt=add_generation_prompt, tools=tools)
        if continue_final_message:
            if _CONTINUE not in text:
                raise ValueError("continue_final_message: the chat template does not render the last message's "
                                 "content as it is")
            text = text[:text.rindex(_CONTINUE)]
        return text


_CONTINUE = "\u2063moeserve-continue\u2063"  # marks where the last message's content ends (continue_final_message)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _special(tok: HFTokenizer, value) -> int | None:
    # tokenizer_config.json spells special tokens as strings or {"content": ...} objects.
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json from a checkpoint directory."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError("tokenizer.json", f"no tokenizer.json in {path}")
    tok = HFTokenizer.from_file(str(file))
    gen, cfg, tok_cfg = _json(path / "generation_config.json"), _json(path / "config.json"), _json(path / "tokenizer_config.json")
    eos = _ids(gen.get("eos_token_id")) or _ids(cfg.get("eos_token_id"))
    if not eos and (special := _special(tok, tok_cfg.get("eos_token"))) is not None:
        eos = [special]
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is None:
        bos = _special(tok, tok_cfg.get("bos_token"))
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    specials = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tok_cfg.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            specials[name] = value
    return Tokenizer(tok, eos, bos, template if isinstance(template, str) else None, specials)
