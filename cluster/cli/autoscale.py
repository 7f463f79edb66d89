"""`moeserve autoscale`: check a policy file, or replay a traffic trace through it.

    moeserve autoscale check --policy FILE
    moeserve autoscale simulate --trace FILE --policy FILE [--cluster-model FILE] [--plot PNG]

`simulate` prints the decisions over time, then GPU-hours and the share of requests inside the SLO
side by side with static provisioning at the policy's peak, and writes a PNG of replicas and load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_MODEL = CONFIGS / "cluster-model.yaml"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "autoscale",
        help="check an autoscaling policy file or replay a traffic trace through it",
        description="Autoscaling policies offline: validate a policy YAML, or replay a recorded trace "
        "through a model of the cluster (docs/autoscaling.md).",
    )
    sub = p.add_subparsers(dest="autoscale_command", metavar="ACTION")

    check = sub.add_parser("check", help="validate a policy file and print it with every default filled in")
    check.add_argument("--policy", required=True, metavar="FILE", help="autoscaling policy YAML")
    check.set_defaults(func=run_check)

    sim = sub.add_parser("simulate", help="replay a trace: decisions, GPU-hours, SLO attainment vs static at peak")
    sim.add_argument("--trace", required=True, metavar="FILE", help="CSV or JSONL trace, optionally .gz (docs/autoscaling.md)")
    sim.add_argument("--policy", required=True, metavar="FILE", help="autoscaling policy YAML")
    sim.add_argument("--cluster-model", default=str(DEFAULT_MODEL), metavar="FILE",
                     help=f"costs and start-up times of the simulated cluster (default {DEFAULT_MODEL.name})")
    sim.add_argument("--plot", metavar="PNG", help="write the figure here (default: <trace name>-<policy>.png)")
    sim.add_argument("--no-plot", action="store_true", help="do not write a figure (no matplotlib needed)")
    sim.add_argument("--decisions", type=_count, default=60, metavar="N",
                     help="print at most N decisions (0: all; default 60)")
    sim.set_defaults(func=run_simulate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--decisions: expected an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"--decisions: must be >= 0, got {n}")
    return n


def run_check(args: argparse.Namespace) -> int:
    import yaml

    from moeserve.cluster.autoscaling import ConfigError, load_config
    from moeserve.cluster.autoscaling.schema import to_plain

    try:
        config = load_config(args.policy)
    except ConfigError as exc:
        print(f"moeserve autoscale: {exc}")
        return 2
    print(yaml.safe_dump(to_plain(config), sort_keys=False), end="")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from moeserve.cluster.autoscaling import ConfigError, load_config
    from moeserve.cluster.autoscaling.sim.model import load_cluster_model
    from moeserve.cluster.autoscaling.sim.report import comparison_table, decision_log, replay
    from moeserve.cluster.autoscaling.sim.trace import TraceError, load_trace

    try:
        config = load_config(args.policy)
        model = load_cluster_model(args.cluster_model)
        trace = load_trace(args.trace)
    except (ConfigError, TraceError) as exc:
        print(f"moeserve autoscale: {exc}")
        return 2
    if not args.no_plot:
        from moeserve.cluster.autoscaling.sim.plot import PlotUnavailable, _pyplot

        try:
            _pyplot()  # fail before a long replay, not after
        except PlotUnavailable as exc:
            print(f"moeserve autoscale: {exc}")
            return 2

    print(f"trace {args.trace}: {len(trace)} requests over {trace.duration_s / 60:.1f} min; "
          f"policy {config.policy} every {config.interval_s:g}s ({args.policy})")
    policy, static = replay(trace, model, config)
    print(f"\ndecisions ({len(policy.decisions)}):")
    for line in decision_log(policy, args.decisions or None):
        print(f"  {line}")
    print()
    for line in comparison_table([policy, static], config.slo.ttft_s, config.slo.tpot_s):
        print(line)
    saved = 1 - policy.gpu_hours / static.gpu_hours if static.gpu_hours else 0.0
    print(f"\n{policy.label}: {100 * saved:.0f}% fewer GPU-hours than static at peak "
          f"({', '.join(f'{u} {n}' for u, n in policy.peak.items())})")
    if not args.no_plot:
        from moeserve.cluster.autoscaling.sim.plot import plot_replay

        out = args.plot or f"{trace.name}-{Path(args.policy).stem}.png"
        plot_replay(policy, static, trace.arrival_s, out, f"{trace.name} trace, {config.policy} policy")
        print(f"plot: {out}")
    return 0
