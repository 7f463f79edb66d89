"""The OpenAI-compatible HTTP front (router/openai_http.py) on a real server, through a real HTTP client: the same
tokens as gRPC, server-sent events, errors named by parameter with their HTTP status, auth, and serving going on."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from chat_fixtures import TIME, WEATHER, args_fit, hermes_checkpoint, thinking_checkpoint  # noqa: F401 (fixtures)
from edge_harness import running_server
from moeserve.router.client import AsyncClient

TOKEN = "s3cret-http"


def _url(srv, path: str) -> str:
    return f"http://127.0.0.1:{srv.http.port}{path}"


async def _events(response: aiohttp.ClientResponse) -> list:
    """The data of each server-sent event, JSON-decoded, and "[DONE]" as is."""
    out = []
    async for line in response.content:
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_completions_match_grpc_whole_and_streamed():
    async with running_server(http_port=0) as srv, aiohttp.ClientSession() as http, AsyncClient(srv.address) as grpc_:
        want = await grpc_.generate(token_ids=[5, 6, 7], max_tokens=8, ignore_eos=True, logprobs=2)
        body = {"model": "demo", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "logprobs": 2}
        async with http.post(_url(srv, "/v1/completions"), json=body) as r:
            assert r.status == 200
            whole = await r.json()
        choice = whole["choices"][0]
        assert whole["object"] == "text_completion" and whole["model"] == "demo"
        assert choice["token_ids"] == list(want.token_ids) and choice["text"] == want.text
        assert choice["finish_reason"] == "length"
        assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp.logprob for lp in want.logprobs])
        assert len(choice["logprobs"]["tokens"]) == 8 and all(len(t) == 2 for t in choice["logprobs"]["top_logprobs"])
        assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11,
                                  "prompt_tokens_details": {"cached_tokens": 0}}

        body.update(stream=True, stream_options={"include_usage": True})
        async with http.post(_url(srv, "/v1/completions"), json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events = await _events(r)
        assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 8
        chunks = events[:-2]
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == list(want.token_ids)
        assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        body["stream_options"]["continuous_usage_stats"] = True  # (vLLM's) every chunk with the usage so far
        async with http.post(_url(srv, "/v1/completions"), json=body) as r:
            chunks = (await _events(r))[:-2]
        done = [len(c["choices"][0]["token_ids"]) for c in chunks]
        assert [c["usage"]["completion_tokens"] for c in chunks] == [sum(done[:k + 1]) for k in range(len(done))]
        assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks)

        text = {"prompt": "Hello, my name is", "max_tokens": 5, "temperature": 0.8, "top_k": 20, "seed": 3,
                "presence_penalty": 0.5, "stop": ["\n\n"], "priority": -1}
        async with http.post(_url(srv, "/v1/completions"), json=text) as r:
            sampled = await r.json()
        again = await grpc_.generate(prompt="Hello, my name is", max_tokens=5, temperature=0.8, top_k=20, seed=3,
                                     presence_penalty=0.5, stop=["\n\n"])
        assert sampled["choices"][0]["token_ids"] == list(again.token_ids)  # seeded: the same over both fronts

        async with http.get(_url(srv, "/v1/models")) as r:
            models = await r.json()
        assert models["data"][0]["id"] == "demo" and models["data"][0]["max_model_len"] == srv.servicer.limits.context_length
        async with http.get(_url(srv, "/v1/models/demo")) as r:
            assert await r.json() == models["data"][0]
        async with http.get(_url(srv, "/v1/models/gpt-4")) as r:
            assert r.status == 404 and (await r.json())["error"]["param"] == "model"


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": ["a", 5]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], "x"] * 33}, 400, "prompt"),
    ({"prompt": ["a", ""]}, 400, "prompt"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ({"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "n": 17}, 400, "n"),
    ({"prompt": "hi", "n": 2, "best_of": 1}, 400, "best_of"),
    ({"prompt": "hi", "best_of": 2, "stream": True}, 400, "best_of"),
    ({"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ({"prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ({"prompt": "hi", "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias[5]"),
    ({"prompt": "hi", "logit_bias": {"1000000": 1}}, 400, "logit_bias[1000000]"),
    ({"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format.json_schema"),
    ({"prompt": "hi", "guided_json": {"type": "object"}, "guided_regex": "a+"}, 400, "guided_regex"),
    ({"prompt": "hi", "guided_choice": "yes"}, 400, "guided_choice"),
    ({"prompt": "hi", "guided_regex": "(a"}, 400, "guided_regex"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, 400,
     "response_format"),
    ({"prompt": "hi", "stop": [1]}, 400, "stop"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": [1, 10**9]}, 400, "token_ids[1]"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ([1, 2], 400, "body"),
])
async def test_bad_requests_are_refused_by_parameter_and_serving_goes_on(body, status, param):
    async with running_server(http_port=0) as srv, aiohttp.ClientSession() as http:
        async with http.post(_url(srv, "/v1/completions"), json=body) as r:
            assert r.status == status, await r.text()
            error = (await r.json())["error"]
        assert error["param"] == param and error["message"]
        async with http.post(_url(srv, "/v1/completions"), data=b"{not json") as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "body"
        async with http.post(_url(srv, "/v1/completions"), json={"prompt": [5, 6], "max_tokens": 2}) as r:
            assert r.status == 200 and len((await r.json())["choices"][0]["token_ids"]) <= 2


async def test_n_best_of_echo_and_logit_bias():
    """n choices are n seeded requests (seed + i) and the later ones read the prompt from the prefix cache; best_of
    returns the choice with the highest mean log-probability; echo puts the prompt first; logit_bias is gRPC's."""
    prompt = list(range(5, 45))  # 40 tokens: two whole blocks of 16 to share
    async with running_server(http_port=0) as srv, aiohttp.ClientSession() as http, AsyncClient(srv.address) as grpc_:
        sampling = {"max_tokens": 6, "temperature": 1.0, "ignore_eos": True}
        alone = [await grpc_.generate(token_ids=prompt, seed=11 + i, logprobs=0, **sampling) for i in range(3)]
        body = {"prompt": prompt, "n": 3, "seed": 11, **sampling}
        async with http.post(_url(srv, "/v1/completions"), json=body) as r:
            assert r.status == 200, await r.text()
            whole = await r.json()
        assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
        assert [c["token_ids"] for c in whole["choices"]] == [list(a.token_ids) for a in alone]
        assert len({tuple(c["token_ids"]) for c in whole["choices"]}) > 1, "seeds 11..13 should not all agree"
        usage = whole["usage"]
        assert usage["prompt_tokens"] == 40 and usage["completion_tokens"] == 18
        assert usage["prompt_tokens_details"]["cached_tokens"] == 32  # choices 1 and 2 found choice 0's blocks

        async with http.post(_url(srv, "/v1/completions"), json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}}) as r:
            events = await _events(r)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 18
        streamed = {i: [] for i in range(3)}
        for event in events[:-2]:
            (choice,) = event["choices"]
            streamed[choice["index"]] += choice["token_ids"]
        assert [streamed[i] for i in range(3)] == [list(a.token_ids) for a in alone]
        assert len({e["id"] for e in events[:-1]}) == 1

        mean = [sum(lp.logprob for lp in a.logprobs) / len(a.logprobs) for a in alone]
        async with http.post(_url(srv, "/v1/completions"), json={**body, "n": 1, "best_of": 3}) as r:
            best = await r.json()
        (choice,) = best["choices"]
        assert choice["token_ids"] == list(alone[mean.index(max(mean))].token_ids) and choice["logprobs"] is None
        assert best["usage"]["completion_tokens"] == 18  # all three were generated

        async with http.post(_url(srv, "/v1/completions"), json={"prompt": "Hello", "max_tokens": 3, "echo": True,
                                                                 "temperature": 0}) as r:
            echoed = (await r.json())["choices"][0]
        plain = await grpc_.generate(prompt="Hello", max_tokens=3)
        assert echoed["text"] == "Hello" + plain.text and echoed["token_ids"] == list(plain.token_ids)

        # echo with logprobs (how lm-evaluation-harness scores a text): the prompt's log-probabilities first
        async with http.post(_url(srv, "/v1/completions"), json={"prompt": "Hello world", "max_tokens": 2, "echo": True,
                                                                 "logprobs": 2, "temperature": 0}) as r:
            scored = (await r.json())["choices"][0]
        want = await grpc_.generate(prompt="Hello world", max_tokens=2, logprobs=2, prompt_logprobs=2)
        prompt_ids = srv.engine.tokenizer.encode("Hello world")
        lp = scored["logprobs"]
        assert len(want.prompt_logprobs) == len(prompt_ids) - 1 and len(prompt_ids) > 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx([e.logprob for e in list(want.prompt_logprobs) +
                                                          list(want.logprobs)], abs=1e-5)
        assert "".join(lp["tokens"]) == scored["text"] == "Hello world" + want.text
        assert lp["text_offset"][len(prompt_ids)] == len("Hello world")

        banned = {str(plain.token_ids[0]): -100, "7": 3.5}
        async with http.post(_url(srv, "/v1/completions"), json={"prompt": "Hello", "max_tokens": 3, "temperature": 0,
                                                                 "logit_bias": banned}) as r:
            biased = (await r.json())["choices"][0]["token_ids"]
        want = await grpc_.generate(prompt="Hello", max_tokens=3, logit_bias={int(k): v for k, v in banned.items()})
        assert biased == list(want.token_ids) and biased[0] != plain.token_ids[0]

        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        async with http.post(_url(srv, "/v1/completions"), json={"prompt": "Answer:", "max_tokens": 30,
                                                                 "response_format": fmt}) as r:
            choice = (await r.json())["choices"][0]
        assert set(json.loads(choice["text"])) == {"ok"} and choice["finish_reason"] == "stop"
        async with http.post(_url(srv, "/v1/completions"), json={"prompt": "Answer:", "max_tokens": 30, "n": 2,
                                                                 "guided_choice": ["left", "right"]}) as r:
            assert {c["text"] for c in (await r.json())["choices"]} <= {"left", "right"}

        # A client that goes away from n streams: the engine lets all of them go.
        long = {"prompt": [5, 6, 7], "max_tokens": srv.servicer.limits.context_length - 8, "ignore_eos": True,
                "stream": True, "n": 3}
        async with http.post(_url(srv, "/v1/completions"), json=long) as r:
            seen: set[int] = set()
            while len(seen) < 3:
                seen |= {e["choices"][0]["index"] for e in await _first_events(r, 1)}
            assert srv.servicer.num_active == 3
        await asyncio.wait_for(srv.servicer.wait_for(lambda: srv.servicer.num_active == 0), 30)
        assert srv.engine.stats()["kv_blocks_used"] == 0


async def _first_events(response: aiohttp.ClientResponse, count: int) -> list:
    """The next `count` data events of a stream still running."""
    out = []
    while len(out) < count:
        line = (await response.content.readline()).decode().strip()
        if line.startswith("data: "):
            out.append(json.loads(line[len("data: "):]))
    return out


async def test_bearer_tokens_and_a_client_that_goes_away():
    async with running_server(http_port=0, auth_tokens=(TOKEN,)) as srv, aiohttp.ClientSession() as http:
        body = {"prompt": [5, 6, 7], "max_tokens": 4}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.post(_url(srv, "/v1/completions"), json=body, headers=headers) as r:
                assert r.status == 401 and "bearer token" in (await r.json())["error"]["message"]
        async with http.get(_url(srv, "/v1/models")) as r:
            assert r.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(_url(srv, "/v1/completions"), json=body, headers=auth) as r:
            assert r.status == 200
        # A stream whose client disconnects after its first event: the engine lets the request go.
        long = {"prompt": [5, 6, 7], "max_tokens": srv.servicer.limits.context_length - 8, "ignore_eos": True,
                "stream": True}
        async with http.post(_url(srv, "/v1/completions"), json=long, headers=auth) as r:
            await r.content.readline()
            assert srv.servicer.num_active == 1
        await asyncio.wait_for(srv.servicer.wait_for(lambda: srv.servicer.num_active == 0), 30)
        assert srv.engine.stats()["kv_blocks_used"] == 0
        # The same for a whole (unstreamed) reply: the client gives up, the request ends long before its max_tokens.
        before = srv.engine.stats()["tokens_generated"]
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(_url(srv, "/v1/completions"), json={**long, "stream": False}, headers=auth,
                                 timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                await r.read()
        await asyncio.wait_for(srv.servicer.wait_for(lambda: srv.servicer.num_active == 0), 60)
        assert srv.engine.stats()["tokens_generated"] - before < long["max_tokens"]
        async with http.get(_url(srv, "/health")) as r:
            assert r.status == 200


async def test_shutdown_ends_http_streams_with_a_last_event():
    async with running_server(http_port=0, grace_s=0.0) as srv, aiohttp.ClientSession() as http:
        long = {"prompt": [5, 6, 7], "max_tokens": srv.servicer.limits.context_length - 8, "ignore_eos": True,
                "stream": True}
        async with http.post(_url(srv, "/v1/completions"), json=long) as r:
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            stopping = asyncio.create_task(srv.stop(0))
            events = await _events(r)
            await stopping
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "cancelled"
        with pytest.raises(aiohttp.ClientConnectionError):  # the listener is closed with the gRPC edge
            await http.get(_url(srv, "/health"))


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"},
                {"role": "assistant", "content": "A demo."}, {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
# A template in the style of real checkpoints': whitespace control, a loop, conditions, raise_exception.
QWEN_LIKE = ("{%- for m in messages %}\n"
             "    {%- if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n"
             "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
             "{% endfor %}\n"
             "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [None, QWEN_LIKE])
def test_chat_template_renders_as_hf_transformers(template, tmp_path):
    """models/tokenizer.py's apply_chat_template against transformers' on the same tokenizer files: the same text
    and the same token ids."""
    import shutil

    from transformers import AutoTokenizer

    from moeserve.models.tokenizer import load_tokenizer
    from edge_harness import demo_model_dir

    path = tmp_path / "ckpt"
    shutil.copytree(demo_model_dir(), path)
    if template is not None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    messages = [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
                for m in CONVERSATION]
    ours = load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(path))
    want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == want
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode(want, add_special_tokens=False) == list(ids)
    # a reply that goes on from a last assistant message (HF's continue_final_message)
    started = messages + [{"role": "assistant", "content": "It is "}]
    assert ours.apply_chat_template(started, add_generation_prompt=False, continue_final_message=True) == \
        theirs.apply_chat_template(started, tokenize=False, continue_final_message=True)
    if template is not None:
        with pytest.raises(ValueError, match="bad role tool"):
            ours.apply_chat_template(messages + [{"role": "tool", "content": "x"}])


async def test_chat_completions_are_the_completion_of_the_rendered_conversation():
    async with running_server(http_port=0) as srv, aiohttp.ClientSession() as http:
        tok = srv.engine.tokenizer
        text = tok.apply_chat_template([{**m, "content": m["content"] if isinstance(m["content"], str)
                                         else m["content"][0]["text"]} for m in CONVERSATION])
        plain = {"prompt": tok.encode(text, add_special_tokens=False), "max_tokens": 6, "temperature": 0,
                 "ignore_eos": True, "logprobs": 2}
        async with http.post(_url(srv, "/v1/completions"), json=plain) as r:
            want = (await r.json())["choices"][0]
        chat = {"messages": CONVERSATION, "max_completion_tokens": 6, "temperature": 0, "ignore_eos": True,
                "logprobs": True, "top_logprobs": 2}
        async with http.post(_url(srv, "/v1/chat/completions"), json=chat) as r:
            assert r.status == 200, await r.text()
            reply = await r.json()
        choice = reply["choices"][0]
        assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
        assert choice["message"] == {"role": "assistant", "content": want["text"]}
        assert choice["token_ids"] == want["token_ids"] and choice["finish_reason"] == "length"
        content = choice["logprobs"]["content"]
        # (the prompt now comes from the prefix cache: the same tokens, logits equal to float noise)
        assert [c["logprob"] for c in content] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)
        assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in content)

        async with http.post(_url(srv, "/v1/chat/completions"), json={**chat, "stream": True}) as r:
            events = await _events(r)
        chunks = events[:-1]
        assert events[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == want["text"]

        async with http.post(_url(srv, "/v1/chat/completions"), json={**chat, "n": 2, "stream": True}) as r:
            events = await _events(r)
        for i in (0, 1):  # each choice: its role first, then the same greedy text
            deltas = [c["choices"][0]["delta"] for c in events[:-1] if c["choices"][0]["index"] == i]
            assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
            assert "".join(d["content"] for d in deltas) == want["text"]

        # the reply goes on from a last assistant message: the completion of the conversation rendered up to it
        started = CONVERSATION + [{"role": "assistant", "content": "Because"}]
        text = tok.apply_chat_template([{**m, "content": m["content"] if isinstance(m["content"], str)
                                         else m["content"][0]["text"]} for m in started],
                                       add_generation_prompt=False, continue_final_message=True)
        assert text.endswith("assistant: Because")
        async with http.post(_url(srv, "/v1/completions"), json={**plain, "prompt": tok.encode(text)}) as r:
            want = (await r.json())["choices"][0]
        async with http.post(_url(srv, "/v1/chat/completions"), json={**chat, "messages": started,
                                                                       "continue_final_message": True}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["token_ids"] == want["token_ids"]

        for body, param in (({"messages": []}, "messages"), ({"messages": CONVERSATION, "echo": True}, "echo"),
                            ({"messages": CONVERSATION, "continue_final_message": True}, "continue_final_message"),
                            ({"messages": started, "continue_final_message": True, "add_generation_prompt": True},
                             "continue_final_message"),
                            ({"messages": CONVERSATION, "add_generation_prompt": "no"}, "add_generation_prompt"), ({"messages": [{"role": "user"}]}, "messages[0]"),
                            ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                             "messages[0].content"),
                            ({"messages": CONVERSATION, "logprobs": 3}, "logprobs"),
                            # a conversation that renders past the prompt limit: its messages, not the prompt it became
                            ({"messages": [{"role": "user", "content": "many words " * 4000}]}, "messages")):
            async with http.post(_url(srv, "/v1/chat/completions"), json=body) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == param


def _streamed_choice(events: list) -> dict:
    """A streamed chat choice put together as a client does: content joined, each call from its delta(s)."""
    content, calls, ids, finish = [], {}, [], None
    for e in events[:-1]:
        for c in e["choices"]:
            delta = c["delta"]
            content.append(delta.get("content") or "")
            for call in delta.get("tool_calls", []):
                got = calls.setdefault(call["index"], {"id": call.get("id"), "type": "function",
                                                       "function": {"name": "", "arguments": ""}})
                got["function"]["name"] += call["function"].get("name", "")
                got["function"]["arguments"] += call["function"].get("arguments", "")
            ids += c["token_ids"]
            finish = c["finish_reason"] or finish
    message = {"role": "assistant", "content": "".join(content) or None}
    if calls:
        message["tool_calls"] = [calls[k] for k in sorted(calls)]
    return {"message": message, "token_ids": ids, "finish_reason": finish}


def _without_ids(choice: dict) -> dict:
    """A chat choice's message, token ids and finish reason, its calls without their ids (each request has its own)."""
    message = dict(choice["message"])
    if "tool_calls" in message:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in message["tool_calls"]]
    return {"message": message, "token_ids": choice["token_ids"], "finish_reason": choice["finish_reason"]}


async def test_tool_calls_are_constrained_to_the_functions_schemas():
    """Without a tool-call format (the demo's template renders none), tool_choice naming a function or "required"
    holds the whole output to the arguments' schema (or a list of calls), streamed or not, and it comes back as
    OpenAI's tool_calls; "auto" is refused by name; a tool turn renders."""
    async with running_server(http_port=0) as srv, aiohttp.ClientSession() as http:
        url = _url(srv, "/v1/chat/completions")
        ask = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER, TIME], "max_tokens": 60,
               "temperature": 0}
        async with http.post(url, json={**ask, "tool_choice": {"type": "function",
                                                               "function": {"name": "weather"}}}) as r:
            assert r.status == 200, await r.text()
            choice = (await r.json())["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "weather"
        assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")

        # (one call: the random model would list calls until max_tokens)
        async with http.post(url, json={**ask, "tool_choice": "required", "parallel_tool_calls": False}) as r:
            choice = (await r.json())["choices"][0]
        calls = choice["message"]["tool_calls"]
        assert choice["finish_reason"] == "tool_calls" and len(calls) == 1
        for c in calls:
            args = json.loads(c["function"]["arguments"])
            assert (c["function"]["name"], set(args)) in (("weather", {"city"}), ("time", {"utc"}))

        for body in ({**ask, "tool_choice": "required", "parallel_tool_calls": False},
                     {**ask, "tool_choice": {"type": "function", "function": {"name": "time"}}}):
            async with http.post(url, json=body) as r:
                whole = (await r.json())["choices"][0]
            async with http.post(url, json={**body, "stream": True}) as r:
                streamed = _streamed_choice(await _events(r))
            assert _without_ids(streamed) == _without_ids(whole)
            assert whole["finish_reason"] == "tool_calls" and all(args_fit(c) for c in whole["message"]["tool_calls"])

        turn = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
        async with http.post(url, json={"messages": turn, "tools": [WEATHER], "tool_choice": "none",
                                        "max_tokens": 4}) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] is not None

        async with http.post(url, json={**ask, "tool_choice": "auto"}) as r:
            assert r.status == 400 and "--tool-call-format" in (await r.json())["error"]["message"]
        for body, param in (({**ask}, "tool_choice"), ({**ask, "tool_choice": "auto"}, "tool_choice"),
                            ({**ask, "tool_choice": "required", "parallel_tool_calls": 1}, "parallel_tool_calls"),
                            ({**ask, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                            ({**ask, "tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0]"),
                            ({**ask, "tools": [{"type": "function", "function": {"name": "x", "parameters": {
                                "type": "nope"}}}], "tool_choice": "required"}, "tools"),
                            ({**ask, "tool_choice": "required", "response_format": {"type": "json_object"}},
                             "tool_choice")):
            async with http.post(url, json=body) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == param, await r.text()


def test_tools_render_with_hf_transformers_tojson(tmp_path):
    """A template that lists the tools with tojson renders as HF transformers renders it."""
    from transformers import PreTrainedTokenizerFast

    from moeserve.models.demo_tokenizer import train_demo_tokenizer
    from moeserve.models.tokenizer import Tokenizer

    template = ("{% for t in tools %}<tool>{{ t | tojson }}</tool>{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    raw = train_demo_tokenizer()
    ours = Tokenizer(raw, [0], chat_template=template)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw)
    hf.chat_template = template
    messages = [{"role": "user", "content": "Wetter in München?"}]
    tools = [WEATHER, TIME]
    assert ours.apply_chat_template(messages, tools=tools) == hf.apply_chat_template(messages, tools=tools,
                                                                                       tokenize=False)


def test_a_model_without_a_chat_template_refuses_chat_by_name():
    from moeserve.models.tokenizer import Tokenizer
    from moeserve.router.errors import InvalidRequestError
    from moeserve.router.openai_http import OpenAIHTTP
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    bare = Tokenizer(HFTokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")), [0])
    front = OpenAIHTTP(None, "m", bare, 64)
    with pytest.raises(InvalidRequestError, match="no chat template; use /v1/completions") as err:
        front._chat_body({"messages": [{"role": "user", "content": "a"}]})
    assert err.value.field == "messages"
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "a"}])


async def test_tool_choice_auto_in_the_models_own_format(hermes_checkpoint):
    """tool_choice "auto" (the default with tools), the format told by the chat template: free text is the
    completion of the rendered prompt as it would be without tools' constraint; a model that writes <tool_call>
    (here pushed to by logit_bias) writes a call to one of the functions with arguments its schema accepts, which
    comes back as tool_calls, whole or streamed (the same call: its name, then its arguments in pieces); "required" and a named function too; the call fed
    back as an assistant turn renders."""
    async with running_server(engine={"model": hermes_checkpoint}, http_port=0) as srv, \
            aiohttp.ClientSession() as http:
        assert srv.http.tool_format.name == "hermes"
        url = _url(srv, "/v1/chat/completions")
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        ask = {"messages": messages, "tools": [WEATHER, TIME], "max_tokens": 60, "temperature": 0}
        prompt = srv.engine.tokenizer.apply_chat_template(messages, tools=[WEATHER, TIME])
        ban = {"512": -100}  # <tool_call>, which this random model is fond of
        async with http.post(_url(srv, "/v1/completions"), json={"prompt": srv.engine.tokenizer.encode(prompt),
                                                                  "max_tokens": 12, "temperature": 0,
                                                                  "logit_bias": ban}) as r:
            plain = (await r.json())["choices"][0]
        async with http.post(url, json={**ask, "max_tokens": 12, "logit_bias": ban}) as r:
            assert r.status == 200, await r.text()
            free = (await r.json())["choices"][0]
        assert free["message"] == {"role": "assistant", "content": plain["text"]} and "tool_calls" not in free
        assert free["token_ids"] == plain["token_ids"] and free["finish_reason"] == plain["finish_reason"]

        push = {**ask, "logit_bias": {"512": 100}}  # <tool_call>
        for body in ({**push, "parallel_tool_calls": False}, {**push, "tool_choice": "auto", "parallel_tool_calls": False},
                     {**ask, "tool_choice": "required", "parallel_tool_calls": False},
                     {**ask, "tool_choice": {"type": "function", "function": {"name": "weather"}}}):
            async with http.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                whole = (await r.json())["choices"][0]
            assert whole["finish_reason"] == "tool_calls", whole
            assert whole["message"]["content"] is None and len(whole["message"]["tool_calls"]) == 1
            assert all(args_fit(c) for c in whole["message"]["tool_calls"])
            if "function" in str(body.get("tool_choice")):
                assert whole["message"]["tool_calls"][0]["function"]["name"] == "weather"
            async with http.post(url, json={**body, "stream": True}) as r:
                assert r.status == 200
                events = await _events(r)
            assert _without_ids(_streamed_choice(events)) == _without_ids(whole)
            pieces = [c for e in events[:-1] for c in e["choices"][0]["delta"].get("tool_calls", [])]
            assert "name" in pieces[0]["function"] and len(pieces) > 3  # the name, then the arguments as written

        # parallel calls: as many as max_tokens allows; the last may be cut short (its arguments as far as they
        # came, or before its name its text as content); streamed, the same pieces
        body = {**push, "max_tokens": 100}
        async with http.post(url, json=body) as r:
            many = (await r.json())["choices"][0]
        calls = many["message"].get("tool_calls", [])
        assert many["finish_reason"] == "length" and len(calls) >= 2 and all(args_fit(c) for c in calls[:-1])
        async with http.post(url, json={**body, "stream": True}) as r:
            assert _without_ids(_streamed_choice(await _events(r))) == _without_ids(many)
        assert len({c["id"] for c in calls}) == len(calls)
        assert many["message"]["content"] is None or many["message"]["content"].lstrip().startswith("<tool_call>")

        turn = messages + [{"role": "assistant", "content": None, "tool_calls": whole["message"]["tool_calls"]},
                           {"role": "tool", "content": "sunny"}]
        async with http.post(url, json={"messages": turn, "tools": [WEATHER], "tool_choice": "none",
                                        "max_tokens": 4}) as r:
            assert r.status == 200, await r.text()
        text = srv.engine.tokenizer.apply_chat_template(turn, tools=[WEATHER])
        call = whole["message"]["tool_calls"][0]["function"]
        assert f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {call["arguments"]}}}\n</tool_call>' in text

    async with running_server(engine={"model": hermes_checkpoint}, http_port=0, tool_call_format="none") as srv, \
            aiohttp.ClientSession() as http:
        async with http.post(_url(srv, "/v1/chat/completions"), json=ask) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "tool_choice"


async def test_reasoning_comes_apart_from_the_answer(thinking_checkpoint):
    """A template that spells </think>: a chat reply's reasoning block (opened by the prompt) is reasoning_content and
    the rest content, whole and streamed; put back together they are the completion of the rendered prompt.
    chat_template_kwargs reach the template (enable_thinking false: no reasoning). A structured output holds the
    answer after the reasoning block, not the reasoning."""
    async with running_server(engine={"model": thinking_checkpoint}, http_port=0) as srv, \
            aiohttp.ClientSession() as http:
        assert srv.http.reasoning
        tok, url = srv.engine.tokenizer, _url(srv, "/v1/chat/completions")
        messages = [{"role": "user", "content": "Why is the sky blue?"}]
        # as the model writes: thinking cut short; thinking ended by </think> (pushed to a little), the answer then
        # holding more of them; no thinking (the prompt closed the block)
        for kwargs, bias in (({}, {}), ({}, {"515": 3}), ({"enable_thinking": False}, {})):
            prompt = tok.apply_chat_template(messages, **kwargs)
            assert prompt.endswith("<think>\n") != bool(kwargs)
            params = {"max_tokens": 24, "temperature": 0, "logit_bias": bias}
            async with http.post(_url(srv, "/v1/completions"), json={"prompt": tok.encode(prompt), **params}) as r:
                raw = (await r.json())["choices"][0]["text"]
            body = {"messages": messages, "chat_template_kwargs": kwargs, **params}
            async with http.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                reply = await r.json()
            whole, whole_usage = reply["choices"][0], reply["usage"]
            if kwargs:  # no block: all answer
                want = {"role": "assistant", "content": raw, "reasoning_content": None}
            elif "</think>" in raw:
                thought, answer = raw.split("</think>", 1)
                want = {"role": "assistant", "content": answer.lstrip(), "reasoning_content": thought or None}
            else:  # cut short while thinking
                want = {"role": "assistant", "content": "", "reasoning_content": raw}
            assert whole["message"] == want, raw
            # the tokens of the reasoning block, its end marker's too (</think> is token 515 here)
            thought = (whole["token_ids"].index(515) + 1 if 515 in whole["token_ids"] else
                       0 if kwargs else len(whole["token_ids"]))
            assert whole_usage["completion_tokens_details"] == {"reasoning_tokens": thought}
            async with http.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                events = await _events(r)
            deltas = [e["choices"][0]["delta"] for e in events[:-2]]
            assert "".join(d.get("reasoning_content", "") for d in deltas) == (want["reasoning_content"] or "")
            assert "".join(d["content"] for d in deltas) == want["content"]
            assert events[-2]["usage"] == whole_usage
        async with http.post(url, json={"messages": messages, "chat_template_kwargs": {"messages": []}}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "chat_template_kwargs"

        # a structured answer: the model thinks first (the constraint holds what follows the block), whole or streamed
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        body = {"messages": messages, "max_tokens": 60, "temperature": 0, "logit_bias": {"515": 3},
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        async with http.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            whole = (await r.json())["choices"][0]
        assert whole["finish_reason"] == "stop" and whole["message"]["reasoning_content"], whole
        assert set(json.loads(whole["message"]["content"])) == {"ok"}
        async with http.post(url, json={**body, "stream": True}) as r:
            deltas = [e["choices"][0]["delta"] for e in (await _events(r))[:-1]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["message"]["reasoning_content"]
        assert "".join(d["content"] for d in deltas) == whole["message"]["content"]
        bad = {k: v for k, v in body.items() if k != "response_format"}
        async with http.post(url, json={**bad, "guided_json": "{not json"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "guided_json"


async def test_tokenize_and_detokenize():
    """vLLM's /tokenize (a prompt, or chat messages as the template renders them) and /detokenize, behind the same
    bearer tokens; bad bodies are 400 naming the parameter."""
    async with running_server(http_port=0, auth_tokens=(TOKEN,)) as srv, aiohttp.ClientSession() as http:
        tok, auth = srv.engine.tokenizer, {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(_url(srv, "/tokenize"), json={"prompt": "Hello there"}) as r:
            assert r.status == 401
        async with http.post(_url(srv, "/tokenize"), json={"prompt": "Hello there"}, headers=auth) as r:
            got = await r.json()
        assert got == {"tokens": tok.encode("Hello there"), "count": len(tok.encode("Hello there")),
                       "max_model_len": srv.servicer.limits.context_length}
        messages = [{"role": "user", "content": "Hi"}]
        for add in (True, False):
            async with http.post(_url(srv, "/tokenize"), json={"messages": messages, "add_generation_prompt": add},
                                 headers=auth) as r:
                assert (await r.json())["tokens"] == tok.encode(tok.apply_chat_template(messages, add))
        async with http.post(_url(srv, "/detokenize"), json={"tokens": got["tokens"]}, headers=auth) as r:
            assert await r.json() == {"prompt": "Hello there"}
        vocab = srv.servicer.limits.vocab_size
        for path, body, param in (("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"messages": []}, "messages"),
                                  ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
                                  ("/detokenize", {"tokens": [1, vocab]}, "tokens"),
                                  ("/detokenize", {"tokens": "1 2"}, "tokens")):
            async with http.post(_url(srv, path), json=body, headers=auth) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == param, await r.text()


async def test_a_batch_of_prompts_is_their_choices_in_order():
    """A list of prompts (text or token ids, as lm-evaluation-harness batches them), each with n choices: choice
    p * n + k is prompt p's k-th, as that prompt alone gives it (echo and logprobs too), whole or streamed; usage
    counts every prompt."""
    async with running_server(http_port=0) as srv, aiohttp.ClientSession() as http:
        url = _url(srv, "/v1/completions")
        prompts = ["The river", [5, 6, 7, 8, 9], "A model reads a prompt"]
        common = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "n": 2, "logprobs": 1, "echo": True}
        alone = []
        for prompt in prompts:
            async with http.post(url, json={**common, "prompt": prompt}) as r:
                alone.append(await r.json())
        async with http.post(url, json={**common, "prompt": prompts}) as r:
            assert r.status == 200, await r.text()
            batch = await r.json()
        assert [c["index"] for c in batch["choices"]] == list(range(6))
        for p, reply in enumerate(alone):
            for k in range(2):
                got, want = batch["choices"][2 * p + k], reply["choices"][k]
                assert got["text"] == want["text"] and got["token_ids"] == want["token_ids"]
                assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
                assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"],
                                                                          abs=1e-4, nan_ok=True)
        assert batch["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
        assert batch["usage"]["completion_tokens"] == 6 * 5
        async with http.post(url, json={**common, "prompt": prompts, "stream": True, "echo": False}) as r:
            events = await _events(r)
        texts = {}
        for e in events[:-1]:
            for c in e["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        assert [texts[i] for i in range(6)] == [c["text"][len(prompts[i // 2]) if isinstance(prompts[i // 2], str)
                                                           else len(srv.engine.tokenizer.decode(prompts[i // 2])):]
                                                 for i, c in enumerate(batch["choices"])]


async def test_stop_strings_end_the_text_before_or_with_them():
    """A stop string met mid-output ends the text before it, or with it (vLLM's include_stop_str_in_output), whole
    and streamed; a generate client asks the same over gRPC."""
    async with running_server(http_port=0) as srv, aiohttp.ClientSession() as http:
        url = _url(srv, "/v1/completions")
        base = {"prompt": "The river", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        async with http.post(url, json=base) as r:
            text = (await r.json())["choices"][0]["text"]
        stop = text[4:6]
        at = text.find(stop)
        for include, want in ((False, text[:at]), (True, text[:at + len(stop)])):
            body = {**base, "stop": [stop], "include_stop_str_in_output": include}
            async with http.post(url, json=body) as r:
                choice = (await r.json())["choices"][0]
            assert choice["text"] == want and choice["finish_reason"] == "stop"
            async with http.post(url, json={**body, "stream": True}) as r:
                assert "".join(e["choices"][0]["text"] for e in (await _events(r))[:-1]) == want
            async with AsyncClient(f"127.0.0.1:{srv.port}") as client:
                reply = await client.generate(prompt="The river", max_tokens=16, ignore_eos=True, stop=[stop],
                                              include_stop_str_in_output=include)
            assert reply.text == want
        async with http.post(url, json={**base, "include_stop_str_in_output": "yes"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "include_stop_str_in_output"
