"""`moeserve scale`: run N replicas of an expert group, give a hot expert one more home, or run N trunk workers."""

from __future__ import annotations

import argparse

from .status import add_admin_args, run_admin


def request_for(args: argparse.Namespace):
    """The ScaleRequest for the flags; ValueError names the flag at fault."""
    from moeserve.v1 import admin_pb2 as pb

    if args.trunk_workers is not None:
        if args.group is not None or args.expert is not None or args.replicas is not None:
            raise ValueError("--trunk-workers goes alone, not with --group, --replicas or --expert")
        if args.trunk_workers < 1:
            raise ValueError(f"--trunk-workers: must be >= 1, got {args.trunk_workers}")
        return pb.ScaleRequest(trunk_workers=args.trunk_workers)
    if args.group is None and args.expert is None:
        raise ValueError("give --group G --replicas N, --expert E [--group G], or --trunk-workers N")
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
        if request.WhichOneof("target") == "trunk_workers":
            print(r.message)
        elif request.WhichOneof("target") == "group":
            print(f"group {args.group}: replicas {' '.join(r.replica_ids)}  (epoch {r.epoch})")
        else:
            print(f"expert {args.expert}: extra replica in group {r.group_id}  (epoch {r.epoch})")

    return run_admin(args, "Scale", request, show)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="scale an expert group or the trunk workers, or replicate a hot expert",
                       description="Run exactly N replicas of an expert group (--group G --replicas N), give a "
                                   "hot expert one more home (--expert E [--group G]), or run N trunk workers "
                                   "(--trunk-workers N, a server started with serve --trunk-workers). Changes take "
                                   "effect at a step boundary, and a trunk worker leaving finishes what it holds; "
                                   "no request fails.")
    add_admin_args(p)
    p.add_argument("--group", type=int, help="expert group id")
    p.add_argument("--replicas", type=int, help="replicas the group should run (>= 1)")
    p.add_argument("--expert", type=int, help="logical expert id to give one more replica")
    p.add_argument("--trunk-workers", type=int, metavar="N", help="trunk workers the server should run (>= 1)")
    p.set_defaults(func=main)
