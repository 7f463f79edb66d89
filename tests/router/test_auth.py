"""Bearer-token auth: tokens from a file or the environment; calls without a valid one are refused."""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge_harness import code_of, running_server
from moeserve.router.auth import TOKEN_ENV, TokenSet, bearer_token, load_tokens, token_name
from moeserve.router.client import AsyncClient

module_loop = pytest.mark.asyncio(loop_scope="module")  # shares the module-scoped server
ALICE = "alice-0123456789abcdef"
BOB = "bob-fedcba9876543210xyz"


def test_tokens_from_file_and_env(tmp_path, monkeypatch):
    f = tmp_path / "tokens"
    f.write_text(f"# serving tokens\n\n  {ALICE}  \n{BOB}\n")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_tokens(f) == [ALICE, BOB]
    assert load_tokens(None) == []  # auth off
    monkeypatch.setenv(TOKEN_ENV, f" {BOB}, carol-aaaaaaaaaaaaaaaa ,")
    assert load_tokens(None) == [BOB, "carol-aaaaaaaaaaaaaaaa"]
    assert load_tokens(f) == [ALICE, BOB, "carol-aaaaaaaaaaaaaaaa"]  # both sources, no duplicates


@pytest.mark.parametrize("content, words", [("# nothing\n", "holds no token"), ("short\n", "at least 16")])
def test_bad_token_files_are_refused(tmp_path, monkeypatch, content, words):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    f = tmp_path / "tokens"
    f.write_text(content)
    with pytest.raises(ValueError, match=words):
        load_tokens(f)
    with pytest.raises(ValueError, match="No such file"):
        load_tokens(tmp_path / "absent")


def test_token_matching_and_parsing():
    tokens = TokenSet([ALICE, BOB])
    assert tokens.match(ALICE) == token_name(ALICE) and tokens.match(BOB) == token_name(BOB)
    assert tokens.match(ALICE[:-1]) is None and tokens.match("") is None and tokens.match(None) is None
    assert ALICE not in token_name(ALICE)  # names are safe to log
    assert bearer_token([("authorization", f"Bearer {ALICE}")]) == ALICE
    assert bearer_token([("authorization", f"bearer   {ALICE} ")]) == ALICE
    assert bearer_token([("authorization", f"Basic {ALICE}")]) is None
    assert bearer_token([("x-other", "Bearer x")]) is None and bearer_token(None) is None


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    async with running_server(auth_tokens=(ALICE, BOB)) as srv:
        yield srv


@module_loop
@pytest.mark.parametrize("token, words", [(None, "missing credentials"), ("wrong-token-123456789", "invalid bearer token"),
                                          (ALICE + "x", "invalid bearer token")])
async def test_calls_without_a_valid_token_are_refused(server, token, words):
    async with AsyncClient(server.address, token=token) as c:
        for call in (lambda: c.generate(prompt="hi", max_tokens=2), lambda: c.model_info(),
                     lambda: _first(c.generate_stream(prompt="hi", max_tokens=2))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert code_of(err) == grpc.StatusCode.UNAUTHENTICATED and words in err.value.details()
        # reflection is behind auth too; health stays open for load balancers and probes
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _first(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert code_of(err) == grpc.StatusCode.UNAUTHENTICATED
        assert await c.health("") == health_pb2.HealthCheckResponse.SERVING
    assert server.engine.stats()["requests_finished"] == 0  # nothing reached the engine


@module_loop
async def test_valid_tokens_are_served(server):
    for token in (ALICE, BOB):
        async with AsyncClient(server.address, token=token) as c:
            resp = await c.generate(prompt="hi", max_tokens=3, ignore_eos=True)
            assert len(resp.token_ids) == 3
            assert (await c.model_info()).vocab_size > 0


async def _first(call):
    async for msg in call:
        return msg
