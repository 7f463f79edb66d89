"""The `moeserve` command line.

Each subcommand lives in its own module of this package and exposes
`register(subparsers) -> None`, which adds its parser and sets `func=callable(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order is the order of `moeserve --help`.
COMMANDS = (
    "serve",
    "generate",
    "bench",
    "demo_model",
    "status",
    "scale",
    "drain",
    "autoscale",
    "chaos",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeserve",
        description="Elastic serving cluster for Mixture-of-Experts language models on Ray.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            module.register(sub)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not present in this build
            if exc.name and not exc.name.startswith("moeserve"):
                # an optional dependency (ray, ...) is not installed: that command is unavailable, while
                # `serve` with the local transport still runs on a box with only torch and grpcio
                logging.getLogger(__name__).debug("moeserve %s unavailable: no module %s", name, exc.name)
                continue
            raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
