"""`moeserve drain`: take a replica or a whole expert group out of service without failing a request."""

from __future__ import annotations

import argparse

from .status import add_admin_args, run_admin


def main(args: argparse.Namespace) -> int:
    from moeserve.v1 import admin_pb2 as pb

    if (args.group is None) == (args.replica is None):
        print("error: give exactly one of --group G or --replica R")
        return 2
    if args.group is not None and args.group < 0:
        print(f"error: --group: must be >= 0, got {args.group}")
        return 2
    request = pb.DrainRequest(group_id=args.group) if args.group is not None else pb.DrainRequest(replica_id=args.replica)
    return run_admin(args, "Drain", request,
                     lambda r: print(f"drained {' '.join(r.drained) or 'nothing'}  (epoch {r.epoch})"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drain", help="drain an expert-group replica or a whole group",
                       description="Stop sending rows to a replica (--replica R) or a whole group (--group G; its "
                                   "experts move to the other groups first), let it finish what it holds, then stop it.")
    add_admin_args(p)
    p.add_argument("--group", type=int, help="expert group id")
    p.add_argument("--replica", help="replica id, e.g. g0r1 (see moeserve status)")
    p.set_defaults(func=main)
