"""A reasoning model's thinking apart from its answer: the leading `<think>...</think>` block of a chat reply (also
one the prompt opened, as DeepSeek-R1's and Qwen3's templates do) as `reasoning_content`, the rest as `content`, as
DeepSeek's API answers. The OpenAI-compatible front (router/openai_http.py) splits chat replies so when the chat
template knows the block (it spells `</think>`), or `moeserve serve --reasoning-content split`.
"""

from __future__ import annotations

import json

THINK_BEGIN, THINK_END = "<think>", "</think>"


def template_thinks(chat_template: str | None) -> bool:
    """Whether a chat template knows reasoning blocks (it spells their end)."""
    return bool(chat_template) and THINK_END in chat_template


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves a reasoning block open for the reply (as DeepSeek-R1's template does)."""
    return prompt.rstrip().endswith(THINK_BEGIN)


def think_first(constraint: dict, opened: bool) -> str:
    """An xgrammar structural tag (JSON) of a reasoning block, then a little blank space, then `constraint` (a structural tag
    format: the answer's structured output): the block is the rest of one the prompt opened, else optional. So a
    reasoning model thinks freely before a structured answer, instead of the answer's grammar holding its thinking."""
    block = {"type": "tag", "begin": "" if opened else THINK_BEGIN, "end": THINK_END,
             "content": {"type": "any_text", "excludes": [THINK_BEGIN, THINK_END]}}
    lead = block if opened else {"type": "optional", "content": block}
    return json.dumps({"type": "structural_tag", "format": {"type": "sequence", "elements": [
        lead, {"type": "regex", "pattern": r"[ \n]{0,4}"}, constraint]}})  # (the usual blank lines after it)


def resolve(setting: str, chat_template: str | None) -> bool:
    """`serve --reasoning-content`: auto (as the chat template tells), split or keep (in the content)."""
    if setting not in ("auto", "split", "keep"):
        raise ValueError(f"reasoning content must be auto, split or keep; got {setting!r}")
    return template_thinks(chat_template) if setting == "auto" else setting == "split"


class ReasoningSplitter:
    """Splits a reply into (reasoning, answer) as it arrives: `feed` each new piece, then `finish` once; each returns
    the (reasoning, answer) text it settled. A reply that does not begin with a reasoning block (blank aside) is all
    answer; one whose block never ends (max_tokens) is all reasoning. The tags are dropped, and so is blank space
    between the block and the answer; `raw`: kept (the block's text as written, then the answer's)."""

    def __init__(self, opened: bool = False, raw: bool = False):
        self._buf, self._raw = "", raw
        self._state = "think" if opened else "start"  # start, think, gap (after the block), answer

    @property
    def thinking(self) -> bool:
        """Inside the reasoning block."""
        return self._state == "think"

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, answer = [], []
        while self._step(reasoning, answer):
            pass
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        reasoning, answer = self.feed("")
        rest, self._buf = self._buf, ""
        if self._state == "think":
            return reasoning + rest, answer
        return reasoning, answer + ("" if self._state == "gap" else rest)

    def _step(self, reasoning: list[str], answer: list[str]) -> bool:
        buf = self._buf
        if self._state == "start":
            lead = buf.lstrip()
            if lead.startswith(THINK_BEGIN):
                cut = len(buf) - len(lead) + len(THINK_BEGIN)
                if self._raw:
                    reasoning.append(buf[:cut])
                self._buf, self._state = buf[cut:], "think"
                return True
            if THINK_BEGIN.startswith(lead):  # blank, or the opening tag's beginning: wait
                return False
            self._state = "answer"
            return True
        if self._state == "think":
            end = buf.find(THINK_END)
            if end < 0:
                keep = partial_tail(buf, (THINK_END,))
                reasoning.append(buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return False
            reasoning.append(buf[:end + (len(THINK_END) if self._raw else 0)])
            self._buf, self._state = buf[end + len(THINK_END):], "answer" if self._raw else "gap"
            return True
        if self._state == "gap":
            lead = buf.lstrip()
            if not lead:
                self._buf = ""
                return False
            self._buf, self._state = lead, "answer"
            return True
        answer.append(buf)
        self._buf = ""
        return False


def partial_tail(text: str, markers: tuple[str, ...], end: int | None = None) -> int:
    """The length of the longest end of `text` (of text[:end]) that is a proper beginning of one of the markers."""
    end = len(text) if end is None else end
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, end), best, -1):
            if text.endswith(m[:n], 0, end):
                best = n
                break
    return best
