"""The `gloo` transport: standing torch.distributed channels between a dispatcher and expert-group actors.

The message layout round-trips every dtype a batch carries; over real Ray actors a channel answers bit for
bit what the single-process experts compute, is opened once and reused, reports draining, stale routing, a
failed batch and a dead actor as the dispatcher expects, and closes on both ends. Greedy outputs over gloo
equal the single-process run in test_ray_groups.py.
"""

from __future__ import annotations

import os
import time

import pytest
import ray
import torch
from group_cases import RESOURCES

from moeserve.cluster.placement import Placement, ServingSet, contiguous_groups
from moeserve.experts import channel
from moeserve.experts.backend import ray_expert_backend
from moeserve.experts.batch import ExpertBatch
from moeserve.experts.group import ExpertGroupActor
from moeserve.experts.weights import CheckpointWeights
from moeserve.kernels import ops
from moeserve.models.loader import load_expert_weights
from moeserve.router.dispatch import ExpertDispatcher, StaticSource
from moeserve.router.transport import make_transport
from moeserve.router.transport.base import ReplicaFailure
from moeserve.router.transport.gloo import GlooTransport
from moeserve.router.transport.ray import RayTransport


CPU = torch.device("cpu")


@pytest.mark.parametrize("rows_dtype", [torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("capacity", [64, channel.FIRST_CAPACITY])  # the payload apart, or inline
def test_request_and_reply_round_trip(rows_dtype, n, capacity):
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(n, 24, generator=g).to(rows_dtype)
    ids = torch.randint(-1, 4, (n, 3), generator=g)
    weights = torch.rand(n, 3, generator=g)
    message, apart, following = channel.pack_request(ExpertBatch(5, rows, ids, weights), capacity)
    assert message.numel() == channel.HEADER_BYTES + capacity
    header = channel.read_header(message)
    assert header[:5] == [channel.OP_RUN, 5, n, 3, 24] and header[9] == following == channel.FIRST_CAPACITY
    nbytes = channel.request_nbytes(header)
    assert (apart is None) == (nbytes <= capacity) == bool(header[8])
    payload = message[channel.HEADER_BYTES:channel.HEADER_BYTES + nbytes] if apart is None else apart
    back = channel.unpack_request(header, payload.clone())
    assert back.layer_id == 5
    for got, want in ((back.rows, rows), (back.local_ids, ids), (back.weights, weights)):
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))

    nbytes = channel.reply_nbytes(n, 24, rows_dtype)
    status, out = channel.unpack_reply(channel.pack_reply(nbytes, channel.OK, rows), n, 24, rows_dtype)
    assert status == channel.OK and torch.equal(out.view(torch.uint8), rows.view(torch.uint8))
    status, message = channel.unpack_reply(channel.pack_reply(nbytes, channel.STALE, message="no layer 5"), n, 24, rows_dtype)
    assert (status, message) == (channel.STALE, "no layer 5")
    long = "x" * 5000  # an error message longer than the reply is cut, not an error of its own
    status, message = channel.unpack_reply(channel.pack_reply(nbytes, channel.ERROR, message=long), n, 24, rows_dtype)
    assert status == channel.ERROR and message == long[: nbytes - 16]


def test_next_capacity_follows_the_payload_within_bounds():
    assert channel.next_capacity(0) == channel.next_capacity(100) == channel.FIRST_CAPACITY
    assert channel.next_capacity(channel.FIRST_CAPACITY + 1) == 2 * channel.FIRST_CAPACITY
    assert channel.next_capacity(100_000) == 131072
    assert channel.next_capacity(50 << 20) == channel.MAX_CAPACITY


def test_a_dtype_the_channel_cannot_carry_is_named():
    with pytest.raises(ValueError, match="complex64"):
        channel.dtype_code(torch.complex64)


def test_make_transport_knows_gloo():
    assert isinstance(make_transport("gloo"), GlooTransport)
    with pytest.raises(ValueError, match="connect_timeout_s"):
        GlooTransport(connect_timeout_s=0)


def _wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _send(transport, actor, batch) -> torch.Tensor:
    pending = transport.send("g1", actor, batch, CPU)
    assert transport.wait([pending], 60.0) == [pending]
    return pending.result()


def test_channel_to_a_group_actor(ray_cluster, hf_checkpoint):
    path = str(hf_checkpoint("qwen3_moe"))
    actor = ExpertGroupActor.options(num_cpus=0.1).remote(1, (4, 5, 6, 7), CheckpointWeights(path), RESOURCES)
    transport = GlooTransport(connect_timeout_s=30.0)
    try:
        ray.get(actor.ready.remote())
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(6, 64, generator=g)
        ids = torch.randint(4, 8, (6, 2), generator=g)
        weights = torch.rand(6, 2, generator=g)
        w13, w2 = load_expert_weights(path, list(range(8)))[2]

        # Through the dispatcher: bit for bit the single-process experts, as over the ray transport.
        placement = Placement(8, contiguous_groups(8, 2)[1:], ((1, ("g1",)),), epoch=1)
        serving = ServingSet(placement, {"g1": actor}, {"g1": 0})
        want = ops.fused_experts(hidden, w13, w2, ids, weights)
        assert torch.equal(ExpertDispatcher(StaticSource(serving), transport, [0, 2])(2, hidden, ids, weights), want)
        assert torch.equal(ExpertDispatcher(StaticSource(serving), RayTransport(), [0, 2])(2, hidden, ids, weights), want)

        # One channel, opened by the first send and reused by every later one.
        batch = ExpertBatch(2, hidden, ids - 4, weights)
        first = _send(transport, actor, batch)
        assert torch.equal(_send(transport, actor, batch), first)
        assert transport.channels == {"g1": None}
        assert ray.get(actor.health.remote())["channels"] == 1
        # A payload beyond the posted capacity goes as a message of its own; the capacities that follow it
        # (larger, then smaller again) stay in step on both ends.
        big = torch.randn(300, 64, generator=g)
        big_ids = torch.randint(4, 8, (300, 2), generator=g)
        big_weights = torch.rand(300, 2, generator=g)
        want_big = ops.fused_experts(big, w13, w2, big_ids, big_weights)
        for _ in range(2):
            d = ExpertDispatcher(StaticSource(serving), transport, [0, 2])
            assert torch.equal(d(2, big, big_ids, big_weights), want_big)
            assert torch.equal(_send(transport, actor, batch), first)

        # What the group refuses comes back as the kinds the dispatcher acts on; the channel stays open.
        with pytest.raises(ReplicaFailure) as failure:
            _send(transport, actor, ExpertBatch(1, hidden, ids - 4, weights))  # layer 1 is dense
        assert failure.value.kind == "stale" and "no MoE layer 1" in failure.value.detail
        with pytest.raises(RuntimeError, match="expert group replica g1: ") as error:
            _send(transport, actor, ExpertBatch(2, hidden[:, :32], ids - 4, weights))  # a bug: the wrong width
        assert not isinstance(error.value, ReplicaFailure)
        assert torch.equal(_send(transport, actor, batch), first) and transport.channels == {"g1": None}

        # The dispatcher closing its transport closes the actor's end too.
        transport.close()
        assert _wait_for(lambda: ray.get(actor.health.remote())["channels"] == 0)
        transport = GlooTransport(connect_timeout_s=30.0)
        assert torch.equal(_send(transport, actor, batch), first)
        # So does a serving set without the replica (the dispatcher's `retain` when it adopts one).
        transport.retain(["g1", "g2"])
        assert transport.channels == {"g1": None}
        transport.retain(["g2"])
        assert transport.channels == {}
        assert _wait_for(lambda: ray.get(actor.health.remote())["channels"] == 0)
        assert torch.equal(_send(transport, actor, batch), first)

        assert ray.get(actor.drain.remote(5.0)) is True
        with pytest.raises(ReplicaFailure) as failure:
            _send(transport, actor, batch)
        assert failure.value.kind == "draining" and failure.value.replica_id == "g1"

        # A dead actor ends its channel's sends at once, and sends to it stay failed without blocking.
        pid = ray.get(actor.ready.remote())["pid"]
        ray.kill(actor, no_restart=True)
        assert _wait_for(lambda: not _pid_alive(pid))  # Ray may call it dead while its process still answers
        start = time.monotonic()
        for _ in range(2):
            with pytest.raises(ReplicaFailure) as failure:
                _send(transport, actor, batch)
            assert failure.value.kind == "dead"
        assert time.monotonic() - start < 30.0
        with pytest.raises(ReplicaFailure) as failure:
            _send(transport, None, batch)
        assert failure.value.kind == "dead"
    finally:
        transport.close()
        ray.kill(actor)


def test_backend_names_the_transports_it_knows():
    with pytest.raises(ValueError, match=r"transport: 'local' is not one of \['ray', 'gloo'\]"):
        ray_expert_backend(None, transport="local")
