"""`moeserve scale`: run N replicas of an expert group, or give a hot expert one more home."""

from __future__ import annotations

import argparse

from .status import add_admin_args, run_admin


def request_for(args: argparse.Namespace):
    """The ScaleRequest for the flags; ValueError names the flag at fault."""
    from moeserve.v1 import admin_pb2 as pb

    if args.group is None and args.expert is None:
        raise ValueError("give --group G --replicas N, or --expert E [--group G]")
    if args.expert is not None:
        if args.replicas is not None:
            raise ValueError("--replicas goes with --group alone, not with --expert")
        if args.expert < 0:
            raise ValueError(f"--expert: must be >= 0, got {args.expert}")
        target = pb.ExpertReplica(expert=args.expert)
        if args.group is not None:
            target.group_id = args.group
        return pb.ScaleRequest(expert=target)
    if args.replicas is None or args.replicas < 1:
        raise ValueError(f"--replicas: must be >= 1 with --group, got {args.replicas}")
    if args.group < 0:
        raise ValueError(f"--group: must be >= 0, got {args.group}")
    return pb.ScaleRequest(group=pb.GroupReplicas(group_id=args.group, replicas=args.replicas))


def main(args: argparse.Namespace) -> int:
    try:
        request = request_for(args)
    except ValueError as err:
        print(f"error: {err}")
        return 2

    def show(r) -> None:
        if request.WhichOneof("target") == "group":
            print(f"group {args.group}: replicas {' '.join(r.replica_ids)}  (epoch {r.epoch})")
        else:
            print(f"expert {args.expert}: extra replica in group {r.group_id}  (epoch {r.epoch})")

    return run_admin(args, "Scale", request, show)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="scale an expert group or replicate a hot expert",
                       description="Run exactly N replicas of an expert group (--group G --replicas N), or give a "
                                   "hot expert one more home (--expert E [--group G]). Changes take effect at a step "
                                   "boundary; no request fails.")
    add_admin_args(p)
    p.add_argument("--group", type=int, help="expert group id")
    p.add_argument("--replicas", type=int, help="replicas the group should run (>= 1)")
    p.add_argument("--expert", type=int, help="logical expert id to give one more replica")
    p.set_defaults(func=main)
