"""`moeserve serve`: load a model into the engine and serve it over gRPC until SIGTERM/SIGINT.

Flags come in two groups: the engine's (`add_engine_args`, turned into one EngineConfig by
`engine_config`, the only place that builds it) and the edge's (`add_server_args` -> ServerConfig).
Another part that needs serve flags (expert groups, transports) adds them to the engine group and
reads them in `engine_config`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from typing import Any

from moeserve.router.auth import TOKEN_ENV, load_tokens
from moeserve.router.server import InferenceServer, ServerConfig, format_address
from moeserve.router.tls import ServerTLS
from moeserve.router.tool_calls import FORMATS as TOOL_FORMATS

log = logging.getLogger("moeserve.serve")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", metavar="DIR", help="HF-format checkpoint directory (default: the built-in demo model)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), bfloat16, float16, float32")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences batched in one step (default 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one step (default 2048)")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size in GiB (default: sized from memory)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="exact number of KV blocks (overrides the size)")
    g.add_argument("--gpu-memory-fraction", type=float, default=0.9, help="share of free GPU memory to use (default 0.9)")
    g.add_argument("--max-queued-requests", type=int, default=1024,
                   help="waiting requests beyond this are refused with RESOURCE_EXHAUSTED (default 1024)")
    g.add_argument("--seed", type=int, default=0, help="seed of requests that give none (default 0)")
    g.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="a step about to prefill requests that are still arriving waits for the rest of the burst, "
                        "at most this long (default 20; 0: never waits)")
    g.add_argument("--prefill-hold-ms", type=float, default=0.0,
                   help="prompts arriving while decodes run wait for a prefill step of their own, at most this long, "
                        "so that more of the decode steps in between are decodes alone: a lower TPOT for a higher "
                        "TTFT under steady arrivals (default 0: a prompt joins the next step)")
    g.add_argument("--prompt-graph-tokens", type=int, default=4096,
                   help="prompt steps up to this many padded tokens replay CUDA graphs, larger ones run eagerly "
                        "(default 4096; 0: always eager)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="decode without CUDA graphs (by default, on a GPU with the experts in the trunk's process, "
                        "decode steps replay captured graphs)")
    g.add_argument("--no-overlap-decode", dest="overlap_decode", action="store_false",
                   help="wait for each decode step's tokens before queuing the next (by default, where decode steps "
                        "replay graphs, the next one is queued on the GPU first)")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full (by default a prompt's whole KV blocks that an earlier request "
                        "already computed are reused; off where tenants must not learn from the time to first token "
                        "whether another sent the same prefix)")
    g.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="speculative decoding by prompt lookup: a request (greedy, or sampled without a seed) drafts "
                        "up to K tokens a step from what followed its newest tokens where they occurred before, and "
                        "one step verifies them (greedy: the same tokens; sampled: the same distribution; default 0: "
                        "off)")
    g.add_argument("--ngram-min", type=int, default=2, metavar="N",
                   help="with --speculative-tokens: the fewest newest tokens looked up (default 2)")
    g.add_argument("--ngram-max", type=int, default=4, metavar="N",
                   help="with --speculative-tokens: the most newest tokens looked up, tried first (default 4)")
    g.add_argument("--expert-groups", type=int, default=0, metavar="N",
                   help="run the routed experts in N expert groups (default 0: inside the trunk's process)")
    g.add_argument("--trunk-worker", action="store_true",
                   help="run the trunk (model, KV cache, scheduler) in its own process, a Ray actor that the edge "
                        "restarts if it dies, resubmitting the requests in flight")
    g.add_argument("--trunk-workers", type=int, default=0, metavar="N",
                   help="run N trunk workers (each as --trunk-worker), the edge sending each new request to the "
                        "least busy; the autoscaling policy's trunk decisions add or drain them live "
                        "(default 0: the trunk in the edge's process; --trunk-worker is --trunk-workers 1)")
    g.add_argument("--trunk-routing", choices=("prefix", "least-busy"), default="prefix",
                   help="how the edge picks a trunk worker for a new request: prefix (default; the worker that took "
                        "the prompt's prefix before, while it is not much busier than the least busy, so its prefix "
                        "cache serves it) or least-busy (needs --trunk-workers)")
    g.add_argument("--trunk-stall-timeout", type=float, default=300.0, metavar="S",
                   help="a trunk worker holding requests that has not finished a step for S seconds is killed and "
                        "restarted, its requests resubmitted (default 300: above the time a step may wait for an "
                        "expert group to recover)")
    g.add_argument("--trunk-resource", metavar="NAME", default=None,
                   help="each trunk worker asks Ray for one unit of this custom resource, so it starts only on "
                        "nodes that offer it and a worker that waits for one is demand for such a node "
                        "(e.g. moeserve_trunk, which the Helm chart's trunk pods offer; needs --trunk-workers)")
    g.add_argument("--autoscaling-policy", metavar="FILE", default=None,
                   help="scale the expert groups (and, with --trunk-workers, the trunk workers) with this policy "
                        "YAML (docs/autoscaling.md; needs Ray expert groups: --transport ray or gloo)")
    g.add_argument("--transport", choices=("local", "ray", "gloo"), default=None,
                   help="how the trunk reaches the expert groups: local (in-process), ray (Ray actors, one actor "
                        "call per group per MoE layer; the default when --expert-groups is given) or gloo (the same "
                        "actors over standing torch.distributed gloo channels, no Ray call per layer)")
    g.add_argument("--expert-resource", metavar="NAME", default=None,
                   help="each expert-group replica asks Ray for one unit of this custom resource, {group} "
                        "replaced by its group id, so it starts only on nodes that offer it (e.g. "
                        "moeserve_expert_{group}, which the Helm chart's expert worker groups offer; needs Ray groups)")


def check_resource_name(name: str, field: str) -> None:
    """Raise ValueError naming `field` unless `name` is a custom Ray resource name (no {group} here)."""
    from moeserve.experts.group import check_resource_template

    if "{" in name or "}" in name:
        raise ValueError(f"{field}: {name!r} is not a resource name: use letters, digits and _ . - only "
                         "(e.g. moeserve_trunk)")
    check_resource_template(name, field=field)


def trunk_workers(args: argparse.Namespace) -> int:
    """How many trunk workers the flags ask for (0: the trunk runs in the edge's process)."""
    n = getattr(args, "trunk_workers", 0)
    if n < 0:
        raise ValueError(f"--trunk-workers: must be >= 0, got {n}")
    n = n or int(bool(getattr(args, "trunk_worker", False)))
    stall = getattr(args, "trunk_stall_timeout", 300.0)
    if not stall > 0:
        raise ValueError(f"--trunk-stall-timeout: must be > 0 seconds, got {stall}")
    resource = getattr(args, "trunk_resource", None)
    if resource is not None:
        if not n:
            raise ValueError("--trunk-resource: needs --trunk-workers (the trunk in the edge's process asks Ray for nothing)")
        check_resource_name(resource, field="--trunk-resource")
    if getattr(args, "trunk_routing", "prefix") != "prefix" and not n:
        raise ValueError("--trunk-routing: needs --trunk-workers (one trunk in the edge's process has nothing to pick)")
    return n


def engine_config(args: argparse.Namespace, control_plane=None):
    """The EngineConfig for `args`: the one place that builds it. With `control_plane` (Ray expert groups
    started in the edge for trunk workers: `edge_control_plane`), the experts are reached through it."""
    from moeserve.router.config import EngineConfig

    model = args.model or _demo_model_dir()
    if control_plane is not None:
        from moeserve.experts.backend import ray_expert_backend

        backend = ray_expert_backend(control_plane.controller, transport=args.transport or "ray")
    else:
        backend = _expert_backend(args, model)
    return EngineConfig(
        model=model,
        expert_backend=backend,
        load_experts=backend is None,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30),
        gpu_memory_fraction=args.gpu_memory_fraction,
        num_kv_blocks=args.num_kv_blocks,
        max_queued_requests=args.max_queued_requests,
        seed=args.seed,
        decode_graphs="off" if getattr(args, "enforce_eager", False) else "auto",
        batch_wait_ms=getattr(args, "batch_wait_ms", 20.0),
        prefill_hold_ms=getattr(args, "prefill_hold_ms", 0.0),
        prompt_graph_tokens=getattr(args, "prompt_graph_tokens", 4096),
        overlap_decode=getattr(args, "overlap_decode", True),
        prefix_caching=getattr(args, "prefix_caching", True),
        speculative_tokens=getattr(args, "speculative_tokens", 0),
        ngram_min=getattr(args, "ngram_min", 2),
        ngram_max=getattr(args, "ngram_max", 4),
    )


def _wants_expert_groups(args: argparse.Namespace) -> bool:
    """Whether the flags ask for expert groups (Ray ones unless --transport local)."""
    if getattr(args, "expert_groups", 0) < 0:
        raise ValueError(f"--expert-groups: must be >= 0, got {args.expert_groups}")
    return bool(getattr(args, "expert_groups", 0) or getattr(args, "transport", None) is not None
                or getattr(args, "autoscaling_policy", None) is not None
                or getattr(args, "expert_resource", None) is not None)


def _expert_backend(args: argparse.Namespace, model: str | None):
    """The expert-group backend `--expert-groups` / `--transport` ask for (None: experts in the trunk)."""
    groups, transport = getattr(args, "expert_groups", 0), getattr(args, "transport", None)
    if not _wants_expert_groups(args):
        return None
    resource = getattr(args, "expert_resource", None)
    from moeserve.experts.backend import embedded_expert_backend
    from moeserve.experts.group import check_resource_template

    if resource is not None:
        if transport == "local":
            raise ValueError("--expert-resource: needs --transport ray or gloo (local groups are not Ray actors)")
        check_resource_template(resource, field="--expert-resource")

    return embedded_expert_backend(model, transport=transport or "ray", num_groups=groups or 2,
                                   custom_resource=resource, autoscaling=_autoscaling_config(args))


def _autoscaling_config(args: argparse.Namespace):
    policy = getattr(args, "autoscaling_policy", None)
    if policy is None:
        return None
    from moeserve.cluster.autoscaling import load_config

    if getattr(args, "transport", None) == "local":
        raise ValueError("--autoscaling-policy: needs --transport ray or gloo (local groups cannot be scaled)")
    return load_config(policy)  # a ConfigError names the field and its allowed range


def edge_control_plane(args: argparse.Namespace):
    """With trunk workers and Ray expert groups: the control plane (controller, admin API, autoscaler)
    started here in the edge, shared by every trunk worker; else None (no groups, local groups in the
    workers, or the trunk in this process, whose model starts the control plane itself)."""
    if not trunk_workers(args) or not _wants_expert_groups(args) or args.transport == "local":
        return None
    from moeserve.cluster.control_plane import start_control_plane
    from moeserve.experts.group import check_resource_template
    from moeserve.models.config import ModelConfig
    from moeserve.router.config import EngineConfig

    model = args.model or _demo_model_dir()
    if args.expert_resource is not None:
        check_resource_template(args.expert_resource, field="--expert-resource")
    dtype = str(EngineConfig(model=model, device=args.device, dtype=args.dtype).torch_dtype).removeprefix("torch.")
    return start_control_plane(model, num_experts=ModelConfig.from_dir(model).moe.n_routed_experts, dtype=dtype,
                               num_groups=args.expert_groups or 2, custom_resource=args.expert_resource,
                               autoscaling=_autoscaling_config(args))


def _demo_model_dir() -> str | None:
    try:
        from moeserve.models.demo import ensure_demo_model
    except ImportError:
        return None  # the engine falls back to its built-in demo model
    return str(ensure_demo_model())


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    g.add_argument("--port", type=int, default=50051, help="port (default 50051; 0: any free port)")
    g.add_argument("--grace", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests get to finish (default 10)")
    g.add_argument("--max-message-bytes", type=int, default=4 * 2**20, help="largest request (default 4 MiB)")
    g.add_argument("--max-streams-per-caller", type=int, default=256,
                   help="calls in flight per caller (token, certificate or peer host; default 256)")
    g.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt (default: context length - 1)")
    g.add_argument("--max-tokens-limit", type=int, default=0, help="largest max_tokens (default: context length - 1)")
    g.add_argument("--default-max-tokens", type=int, default=256, help="what max_tokens = 0 means (default 256)")
    g.add_argument("--auth-token-file", metavar="PATH",
                   help=f"turn bearer-token auth on with the tokens in PATH (one a line); ${TOKEN_ENV} "
                        "(comma separated) adds tokens too")
    g.add_argument("--http-port", type=int, default=None, metavar="N",
                   help="also serve an OpenAI-compatible HTTP API (/v1/completions, /v1/models) on port N of --host, "
                        "with the same auth, TLS and limits (default: off; 0: any free port)")
    g.add_argument("--tool-call-format", choices=("auto", "none", *TOOL_FORMATS), default="auto",
                   help="the model's tool-call markup, for chats' tool_choice \"auto\" and calls in it (gRPC Chat "
                        "and the HTTP API): "
                        + "; ".join(f"{f.name} ({f.models})" for f in TOOL_FORMATS.values())
                        + " (default auto: the one the chat template renders calls in; none: tool_choice \"auto\" "
                          "refused, \"required\" and named calls as plain JSON)")
    g.add_argument("--reasoning-content", choices=("auto", "split", "keep"), default="auto",
                   help="chat replies (gRPC Chat and the HTTP API): split a leading <think>...</think> block off as "
                        "reasoning_content, or keep it in the content (default auto: split when the chat template "
                        "spells </think>, as DeepSeek-R1's and Qwen3's do)")
    g.add_argument("--tls-cert", metavar="PEM", help="server certificate (turns TLS on; needs --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="key of --tls-cert")
    g.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    t = p.add_argument_group("observability (off by default)")
    t.add_argument("--prometheus-port", type=int, default=None, metavar="N",
                   help="serve Prometheus metrics on http://HOST:N/metrics (0: any free port)")
    t.add_argument("--prometheus-host", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    t.add_argument("--otlp-endpoint", metavar="URL",
                   help="export traces and metrics over OTLP/gRPC to this collector, e.g. http://otel-collector:4317")
    t.add_argument("--trace-sample-ratio", type=float, default=1.0, help="share of requests traced (default 1)")


def telemetry(args: argparse.Namespace):
    """The Telemetry the flags ask for, or None when metrics and traces are both off."""
    if args.prometheus_port is None and not args.otlp_endpoint:
        return None
    try:
        from moeserve.cluster.telemetry import Telemetry, TelemetryConfig
    except ImportError as exc:
        raise ValueError(f"--prometheus-port/--otlp-endpoint need opentelemetry-sdk and its exporters ({exc})") from exc
    return Telemetry(TelemetryConfig(prometheus_port=args.prometheus_port, prometheus_host=args.prometheus_host,
                                     otlp_endpoint=args.otlp_endpoint, trace_sample_ratio=args.trace_sample_ratio))


def server_config(args: argparse.Namespace) -> ServerConfig:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    return ServerConfig(
        host=args.host, port=args.port, grace_s=args.grace, max_message_bytes=args.max_message_bytes,
        max_streams_per_caller=args.max_streams_per_caller, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
        auth_tokens=tuple(load_tokens(args.auth_token_file)), tls=tls, http_port=getattr(args, "http_port", None),
        tool_call_format=getattr(args, "tool_call_format", "auto"),
        reasoning_content=getattr(args, "reasoning_content", "auto"),
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC",
                       description="Serve a model over gRPC (moeserve.v1.Inference, health, reflection).")
    add_engine_args(p)
    add_server_args(p)
    p.set_defaults(func=main)


def client_command(server: InferenceServer, args: argparse.Namespace) -> str:
    """A ready-to-paste `moeserve generate` command for this server."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(args.host, args.host)
    argv0 = sys.argv[0] if os.path.basename(sys.argv[0]) == "moeserve" else "moeserve"
    cmd = [argv0, "generate", "Hello, my name is", "--stream", "--address", format_address(host, server.port)]
    if server.tls:
        cmd += ["--tls-ca", "CA.pem"] + (["--tls-cert", "CLIENT.pem", "--tls-key", "CLIENT.key"] if args.tls_client_ca else [])
    if args.auth_token_file:
        cmd += ["--auth-token-file", args.auth_token_file]
    prefix = f"{TOKEN_ENV}=<token> " if server.config.auth_tokens and not args.auth_token_file else ""
    return prefix + shlex.join(cmd)


def _trunk_pool(engine_cfg, args: argparse.Namespace, plane):
    """The engine behind the edge when the trunk runs in trunk workers (router/trunk_pool.py)."""
    import dataclasses

    import ray

    from moeserve.router.trunk_pool import TrunkPool

    if not ray.is_initialized():
        ray.init(include_dashboard=False, namespace="moeserve")
    options: dict = {}
    if engine_cfg.device.startswith("cuda"):  # each worker its own GPU, which it sees as cuda
        options["num_gpus"] = 1
        engine_cfg = dataclasses.replace(engine_cfg, device="cuda")
    if args.trunk_resource is not None:
        options["resources"] = {args.trunk_resource: 1}
    # With a policy, its limits.trunk.max_replicas bounds the pool (`moeserve scale` too); else the pool's own.
    autoscaler = getattr(plane, "autoscaler", None)
    bound = {"max_replicas": max(autoscaler.config.limits.trunk.max_replicas, trunk_workers(args))} if autoscaler else {}
    return TrunkPool(engine_cfg, replicas=trunk_workers(args), actor_options=options,
                     stall_timeout_s=args.trunk_stall_timeout, prefix_routing=args.trunk_routing == "prefix", **bound)


def _control_plane_of(engine):
    """The control plane the model in this process started beside its Ray expert groups (None: the experts
    in the trunk, or local groups)."""
    return getattr(engine.experts_backend, "control_plane", None)


def _report_serving(engine, plane, tel) -> None:
    """Hand the control plane the edge's live figures: the admin API (for `moeserve status`) and the
    autoscaler (the trunk's signals: queue, slots, arrivals, TTFT/TPOT; with trunk workers, its scaler).
    """
    if plane.admin is not None:
        from moeserve.cluster.serving_status import ServingFigures

        plane.admin.report_serving(ServingFigures(engine, tel))
    # Trunk workers (a TrunkPool): `moeserve scale --trunk-workers N` and the policy's trunk decisions.
    scaler = engine.scaler() if hasattr(engine, "scaler") else None
    if plane.admin is not None and scaler is not None:
        plane.admin.attach_trunk_scaler(scaler)
    autoscaler = plane.autoscaler
    if autoscaler is not None:
        from moeserve.cluster.autoscaling.runner import EngineTrunk

        autoscaler.attach_trunk(EngineTrunk(engine, tel, window_s=autoscaler.config.window_s))
        if scaler is not None:
            autoscaler.scale_trunk = scaler
        if tel is None:
            print("moeserve: the autoscaling policy sees the queue and batch slots but no TTFT/TPOT: those need "
                  "telemetry (--prometheus-port or --otlp-endpoint)", flush=True)


def _watch_group_utilisation(plane, tel) -> None:
    """Keep the telemetry's `expert_group_utilisation` current from the controller of the Ray expert groups
    (as `plane.utilisation`, stopped with the plane or at exit). Nothing to watch with telemetry off."""
    if tel is None:
        return
    import atexit

    from moeserve.cluster.group_utilisation import GroupUtilisationPoller

    plane.utilisation = GroupUtilisationPoller(plane.controller, tel).start()
    atexit.register(plane.utilisation.stop)


@dataclass
class Serving:
    """What `start_server` started: the edge, its Telemetry (None when off) and the Ray expert groups'
    control plane in this process (controller, admin API, autoscaler, utilisation poller; None without)."""

    server: InferenceServer
    telemetry: Any = None
    control_plane: Any = None

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop the edge (in-flight requests get `grace_s`, by default the server's), then the control
        plane's pollers and admin API, then the telemetry (flushing what the OTLP exporters hold)."""
        await self.server.stop(grace_s)
        if self.control_plane is not None:
            self.control_plane.stop()
        if self.telemetry is not None:
            self.telemetry.shutdown()


async def start_server(args: argparse.Namespace) -> Serving:
    """Build the engine and the edge the flags ask for and start serving."""
    from moeserve.router.engine import AsyncEngine

    server_cfg = server_config(args)
    tel = telemetry(args)  # before the model is written or loaded: a metrics port in use fails fast
    plane = None
    try:
        if trunk_workers(args):
            plane = await asyncio.to_thread(edge_control_plane, args)
            engine_cfg = engine_config(args, plane)
            engine = _trunk_pool(engine_cfg, args, plane)
        else:
            engine_cfg = engine_config(args)
            engine = AsyncEngine.from_config(engine_cfg)
            plane = _control_plane_of(engine)
        server = InferenceServer(engine, server_cfg, model_name=os.path.basename(str(engine_cfg.model or "demo")),
                                 telemetry=tel)
        await server.start()
        if plane is not None:
            _report_serving(engine, plane, tel)
            _watch_group_utilisation(plane, tel)
    except BaseException:
        if plane is not None:
            plane.stop()
        if tel is not None:
            tel.shutdown()
        raise
    return Serving(server, tel, plane)


async def _serve(args: argparse.Namespace) -> int:
    serving = await start_server(args)
    server, tel = serving.server, serving.telemetry
    server_cfg = server.config
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # a second signal: do not wait for the grace period
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: stopping (grace %.0f s)", signal.Signals(signum).name, server_cfg.grace_s)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if server_cfg.auth_tokens and not server_cfg.tls and args.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("auth is on without TLS on %s: tokens cross the network in clear text", args.host)
    print(f"moeserve: serving {server.model_name} on {server.address} "
          f"(tls {'on' if server.tls else 'off'}, auth {'on' if server_cfg.auth_tokens else 'off'})", flush=True)
    print(f"moeserve: try  {client_command(server, args)}", flush=True)
    if server.http is not None:
        scheme = "https" if server.tls else "http"
        print(f"moeserve: OpenAI-compatible HTTP on {scheme}://{format_address(args.host, server.http.port)}/v1 "
              f"(completions, chat/completions, models)", flush=True)
    if tel is not None and tel.prometheus_port is not None:
        print(f"moeserve: metrics on http://{format_address(args.prometheus_host, tel.prometheus_port)}/metrics",
              flush=True)
    await stop.wait()
    await serving.stop()
    print("moeserve: stopped", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_serve(args))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
