"""The Admin gRPC service (moeserve.v1.Admin): status, scale and drain, answered by the controller.

It listens on its own port, never the public inference port, and takes its own credential: with
admin tokens configured (MOESERVE_ADMIN_TOKEN, comma separated, or a token file) every call needs
`authorization: Bearer <admin token>`; an inference token is not an admin token. Controller calls
are Ray calls, so the server is a plain threaded gRPC server. When it runs in the edge's process, the
edge hands it its live serving figures (`report_serving`), which Status adds to the controller's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
import ray

from moeserve.router.auth import TokenSet, bearer_token, load_tokens
from moeserve.v1 import admin_pb2 as pb
from moeserve.v1 import admin_pb2_grpc as pb_grpc

from .placement import PlacementError

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "MOESERVE_ADMIN_TOKEN"  # server: accepted admin tokens; client: the token to send
ADMIN_PORT_ENV = "MOESERVE_ADMIN_PORT"
ADMIN_HOST_ENV = "MOESERVE_ADMIN_HOST"
DEFAULT_ADMIN_PORT = 50052
MAX_REPLICAS = 64


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Where the admin API listens and which tokens it accepts (none: open, loopback only is advised)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_ADMIN_PORT  # 0: any free port
    tokens: tuple[str, ...] = ()
    call_timeout_s: float = 600.0  # scale and drain wait for actors to start or finish their rows

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"admin port: must be in 0..65535, got {self.port}")
        if self.call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s: must be > 0, got {self.call_timeout_s}")

    @classmethod
    def from_env(cls, token_file: str | None = None) -> "AdminConfig":
        """MOESERVE_ADMIN_HOST / _PORT / _TOKEN (and an optional token file)."""
        raw = os.environ.get(ADMIN_PORT_ENV, str(DEFAULT_ADMIN_PORT))
        try:
            port = int(raw)
        except ValueError:
            raise ValueError(f"{ADMIN_PORT_ENV}: must be a port number in 0..65535, got {raw!r}") from None
        return cls(host=os.environ.get(ADMIN_HOST_ENV, "127.0.0.1"), port=port,
                   tokens=tuple(load_tokens(token_file, env_var=ADMIN_TOKEN_ENV)))


def status_response(s: dict) -> pb.StatusResponse:
    """The controller's status dict as the wire message."""
    groups = [
        pb.GroupStatus(group_id=g["group_id"], experts=g["experts"], replicas=[
            pb.ReplicaStatus(replica_id=r["replica_id"], state=r["state"], incarnation=r["incarnation"],
                             serving=r["serving"], node_id=r["node_id"], device=r["device"], pid=r["pid"],
                             busy_share=r["busy_share"], rows=r["rows"], restarts=r["restarts"],
                             channels=r.get("channels", 0))
            for r in g["replicas"]])
        for g in s["groups"]
    ]
    return pb.StatusResponse(
        cluster=s["cluster"], epoch=s["epoch"], num_experts=s["num_experts"], window_s=s["window_s"], groups=groups,
        expert_load=[pb.ExpertLoad(expert=e, tokens=n) for e, n in sorted(s["expert_load"].items())],
        expert_load_by_layer=[
            pb.LayerLoad(layer=layer, experts=[pb.ExpertLoad(expert=e, tokens=n) for e, n in sorted(per.items())])
            for layer, per in sorted(s["expert_load_by_layer"].items())
        ],
        unavailable_experts=s["unavailable_experts"], dispatchers=s["dispatchers"],
    )


def serving_status(f: dict) -> pb.ServingStatus:
    """Live serving figures (cluster.serving_status.ServingFigures) as the wire message."""
    msg = pb.ServingStatus(running=f["running"], waiting=f["waiting"], kv_blocks_used=f["kv_blocks_used"],
                           kv_blocks_total=f["kv_blocks_total"], window_s=f["window_s"],
                           input_tokens_per_s=f["input_tokens_per_s"], output_tokens_per_s=f["output_tokens_per_s"],
                           requests_per_s=f["requests_per_s"], trunk_workers=f.get("trunk_workers", 0),
                           trunk_workers_starting=f.get("trunk_workers_starting", 0),
                           trunk_workers_draining=f.get("trunk_workers_draining", 0),
                           prefix_cache_hit_rate=f.get("prefix_cache_hit_rate", 0.0),
                           draft_tokens_per_s=f.get("draft_tokens_per_s", 0.0),
                           draft_acceptance_rate=f.get("draft_acceptance_rate", 0.0))
    for name in ("ttft", "tpot"):
        if f.get(name) is not None:
            getattr(msg, name).CopyFrom(pb.LatencySummary(**f[name]))
    return msg


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class AdminServicer(pb_grpc.AdminServicer):
    """Admin calls turned into controller calls; errors mapped to status codes in `_call`."""

    def __init__(self, controller, config: AdminConfig):
        self.controller, self.config = controller, config
        self._tokens = TokenSet(list(config.tokens)) if config.tokens else None
        self.serving: Callable[[], dict] | None = None  # the edge's live figures, once it reports them
        self.scale_trunk: Callable[[int], str] | None = None  # the edge's trunk workers, when it runs some

    def _call(self, context, ref_fn):
        if self._tokens is not None and self._tokens.match(bearer_token(context.invocation_metadata())) is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin calls need `authorization: Bearer <admin token>`")
        try:
            return ray.get(ref_fn(), timeout=self.config.call_timeout_s)
        except _Refused as exc:
            context.abort(exc.code, str(exc))
        except ray.exceptions.GetTimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the controller took over {self.config.call_timeout_s:.0f}s")
        except ray.exceptions.RayActorError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the controller is unavailable: {type(exc).__name__}")
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (PlacementError, ValueError)):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(cause))
            context.abort(grpc.StatusCode.INTERNAL, f"controller error: {cause!r}")

    def Status(self, request, context):
        response = status_response(self._call(context, self.controller.status.remote))
        if self.serving is not None:
            try:
                response.serving.CopyFrom(serving_status(self.serving()))
            except Exception:  # the figures are extra: the cluster's status still answers
                log.exception("reading the serving figures failed")
        return response

    def Scale(self, request, context):
        which = request.WhichOneof("target")
        if which == "group":
            g = request.group
            if not 1 <= g.replicas <= MAX_REPLICAS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"group.replicas: must be in 1..{MAX_REPLICAS}, got {g.replicas}; drain a group to remove it")
            ids = self._call(context, lambda: self.controller.scale.remote(g.group_id, g.replicas))
            return pb.ScaleResponse(epoch=self._epoch(context), replica_ids=ids)
        if which == "expert":
            e = request.expert
            group = e.group_id if e.HasField("group_id") else None
            gid = self._call(context, lambda: self.controller.replicate_expert.remote(e.expert, group))
            return pb.ScaleResponse(epoch=self._epoch(context), group_id=gid)
        if which == "trunk_workers":
            return pb.ScaleResponse(epoch=self._epoch(context), message=self._scale_trunk(request.trunk_workers, context))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target: set one of group, expert or trunk_workers")

    def _scale_trunk(self, replicas: int, context) -> str:
        if self.scale_trunk is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "trunk_workers: the server beside this admin API runs no trunk workers; start it with "
                          "serve --trunk-workers N")
        if replicas < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"trunk_workers: must be >= 1, got {replicas}")
        try:
            return self.scale_trunk(replicas)
        except ValueError as exc:  # beyond the pool's most workers (the policy's limits.trunk.max_replicas)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - the pool is stopping, or its event loop is gone
            context.abort(grpc.StatusCode.UNAVAILABLE, f"trunk_workers: {exc}")

    def Drain(self, request, context):
        which = request.WhichOneof("target")
        if which is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target: set one of group_id or replica_id")
        kwargs = {which: getattr(request, which)}
        drained = self._call(context, lambda: self.controller.drain.remote(**kwargs))
        return pb.DrainResponse(epoch=self._epoch(context), drained=drained)

    def _epoch(self, context) -> int:
        return self._call(context, self.controller.epoch.remote)


class AdminServer:
    """The Admin service on its own port; `start()` binds, `stop()` ends it."""

    def __init__(self, controller, config: AdminConfig | None = None):
        self.config = config or AdminConfig()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="moeserve-admin"))
        self._servicer = AdminServicer(controller, self.config)
        pb_grpc.add_AdminServicer_to_server(self._servicer, self._server)
        self.port: int | None = None

    def attach_trunk_scaler(self, scale: Callable[[int], str]) -> None:
        """Carry out Scale(trunk_workers=N) with `scale` (router.trunk_pool.TrunkPool.scaler()) from now on."""
        self._servicer.scale_trunk = scale

    def report_serving(self, figures: Callable[[], dict]) -> None:
        """Add `figures()` (e.g. cluster.serving_status.ServingFigures) to every Status reply from now on."""
        self._servicer.serving = figures

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> "AdminServer":
        self.port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"admin API: cannot listen on {self.config.host}:{self.config.port} (port in use?)")
        self._server.start()
        log.info("admin API (moeserve.v1.Admin) on %s (auth %s)", self.address, "on" if self.config.tokens else "off")
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s).wait()
