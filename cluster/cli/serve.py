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

from moeserve.router.auth import TOKEN_ENV, load_tokens
from moeserve.router.server import InferenceServer, ServerConfig, format_address
from moeserve.router.tls import ServerTLS

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
    g.add_argument("--enforce-eager", action="store_true",
                   help="decode without CUDA graphs (by default, on a GPU with the experts in the trunk's process, "
                        "decode steps replay captured graphs)")
    g.add_argument("--expert-groups", type=int, default=0, metavar="N",
                   help="run the routed experts in N expert groups (default 0: inside the trunk's process)")
    g.add_argument("--trunk-worker", action="store_true",
                   help="run the trunk (model, KV cache, scheduler) in its own process, a Ray actor that the edge "
                        "restarts if it dies, resubmitting the requests in flight")
    g.add_argument("--autoscaling-policy", metavar="FILE", default=None,
                   help="scale the expert groups with this policy YAML (docs/autoscaling.md; needs --transport ray)")
    g.add_argument("--transport", choices=("local", "ray"), default=None,
                   help="how the trunk reaches the expert groups: local (in-process) or ray (actors; "
                        "the default when --expert-groups is given)")
    g.add_argument("--expert-resource", metavar="NAME", default=None,
                   help="each expert-group replica asks Ray for one unit of this custom resource, {group} "
                        "replaced by its group id, so it starts only on nodes that offer it (e.g. "
                        "moeserve_expert_{group}, which the Helm chart's expert worker groups offer; needs Ray groups)")


def engine_config(args: argparse.Namespace):
    """The EngineConfig for `args`: the one place that builds it."""
    from moeserve.router.config import EngineConfig

    model = args.model or _demo_model_dir()
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
    )


def _expert_backend(args: argparse.Namespace, model: str | None):
    """The expert-group backend `--expert-groups` / `--transport` ask for (None: experts in the trunk)."""
    groups, transport = getattr(args, "expert_groups", 0), getattr(args, "transport", None)
    if groups < 0:
        raise ValueError(f"--expert-groups: must be >= 0, got {groups}")
    policy = getattr(args, "autoscaling_policy", None)
    resource = getattr(args, "expert_resource", None)
    if not groups and transport is None and policy is None and resource is None:
        return None
    from moeserve.experts.backend import embedded_expert_backend
    from moeserve.experts.group import check_resource_template

    if resource is not None:
        if transport == "local":
            raise ValueError("--expert-resource: needs --transport ray (local groups are not Ray actors)")
        check_resource_template(resource, field="--expert-resource")

    autoscaling = None
    if policy is not None:
        from moeserve.cluster.autoscaling import load_config

        if transport == "local":
            raise ValueError("--autoscaling-policy: needs --transport ray (local groups cannot be scaled)")
        autoscaling = load_config(policy)  # a ConfigError names the field and its allowed range
    return embedded_expert_backend(model, transport=transport or "ray", num_groups=groups or 2,
                                   custom_resource=resource, autoscaling=autoscaling)


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
        auth_tokens=tuple(load_tokens(args.auth_token_file)), tls=tls,
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


def _trunk_engine(engine_cfg):
    """The engine behind the edge when the trunk runs in its own process (router/trunk.py)."""
    import ray

    from moeserve.router.trunk import TrunkEngine

    if not ray.is_initialized():
        ray.init(include_dashboard=False, namespace="moeserve")
    return TrunkEngine(engine_cfg)


def _experts_backend(engine):
    """The expert backend of the model in this process (None: the experts in the trunk, or --trunk-worker)."""
    return getattr(getattr(getattr(engine, "core", None), "model", None), "experts_backend", None)


def _report_serving(engine, tel) -> None:
    """Hand the control plane beside the embedded expert groups the edge's live figures: the admin API
    (for `moeserve status`) and the autoscaler (the trunk's signals: queue, slots, arrivals, TTFT/TPOT).

    Only where they run in this process: not with the experts in the trunk (there are none), nor
    with --trunk-worker (they run in the worker's process, and its autoscaler sees no trunk).
    """
    backend = _experts_backend(engine)
    admin = getattr(backend, "admin", None)
    if admin is not None:
        from moeserve.cluster.serving_status import ServingFigures

        admin.report_serving(ServingFigures(engine, tel))
    autoscaler = getattr(backend, "autoscaler", None)
    if autoscaler is not None:
        from moeserve.cluster.autoscaling.runner import EngineTrunk

        autoscaler.attach_trunk(EngineTrunk(engine, tel, window_s=autoscaler.config.window_s))
        if tel is None:
            print("moeserve: the autoscaling policy sees the queue and batch slots but no TTFT/TPOT: those need "
                  "telemetry (--prometheus-port or --otlp-endpoint)", flush=True)


def _watch_group_utilisation(engine, tel) -> None:
    """Keep the telemetry's `expert_group_utilisation` current from the controller of the Ray expert groups
    (as `backend.utilisation`, stopped by _serve or at exit). Nothing to watch with telemetry off, the
    experts in the trunk, local groups (no controller) or --trunk-worker (the backend is in the worker).
    """
    backend = _experts_backend(engine)
    controller = getattr(getattr(backend, "source", None), "controller", None)
    if tel is None or controller is None:
        return
    import atexit

    from moeserve.cluster.group_utilisation import GroupUtilisationPoller

    backend.utilisation = GroupUtilisationPoller(controller, tel).start()
    atexit.register(backend.utilisation.stop)


async def start_server(args: argparse.Namespace) -> tuple[InferenceServer, object]:
    """Build the engine and the edge the flags ask for and start serving; returns (server, Telemetry or None)."""
    from moeserve.router.engine import AsyncEngine

    server_cfg = server_config(args)
    tel = telemetry(args)  # before the model is written or loaded: a metrics port in use fails fast
    try:
        engine_cfg = engine_config(args)
        engine = _trunk_engine(engine_cfg) if args.trunk_worker else AsyncEngine.from_config(engine_cfg)
        server = InferenceServer(engine, server_cfg, model_name=os.path.basename(str(engine_cfg.model or "demo")),
                                 telemetry=tel)
        await server.start()
        _report_serving(engine, tel)
        _watch_group_utilisation(engine, tel)
    except BaseException:
        if tel is not None:
            tel.shutdown()
        raise
    return server, tel


async def _serve(args: argparse.Namespace) -> int:
    server, tel = await start_server(args)
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
    if tel is not None and tel.prometheus_port is not None:
        print(f"moeserve: metrics on http://{format_address(args.prometheus_host, tel.prometheus_port)}/metrics",
              flush=True)
    await stop.wait()
    await server.stop()
    utilisation = getattr(_experts_backend(server.engine), "utilisation", None)
    if utilisation is not None:
        utilisation.stop()
    if tel is not None:
        tel.shutdown()  # flushes what the OTLP exporters still hold
    print("moeserve: stopped", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_serve(args))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
