"""Build glue: maps each code folder to `moeserve.<folder>` and generates the gRPC stubs.

Every code folder becomes a subpackage of the `moeserve` namespace (an implicit namespace
package), so nothing generic like `kernels` lands at the top of site-packages. The protobuf and
gRPC stubs are generated from `protos/` by grpcio-tools at build time into `protos/moeserve/v1/`
(git-ignored) and packaged as `moeserve.v1`; they are never edited by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
CODE_FOLDERS = ("cluster", "experts", "router", "kernels", "models", "chaos")
PROTO_ROOT = "protos"


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for folder in CODE_FOLDERS:
        package_dir[f"moeserve.{folder}"] = folder
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            parts = [p for p in rel.parts if p]
            if any(p.startswith((".", "_")) for p in parts):
                continue
            packages.append(".".join(["moeserve", folder, *parts]))
    package_dir["moeserve.v1"] = f"{PROTO_ROOT}/moeserve/v1"
    packages.append("moeserve.v1")
    return packages, package_dir


def generate_stubs() -> None:
    """Run grpcio-tools' protoc over every .proto under protos/ (idempotent)."""
    from grpc_tools import protoc  # build requirement
    import grpc_tools

    protos = sorted(str(p.relative_to(ROOT / PROTO_ROOT)) for p in (ROOT / PROTO_ROOT).rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={ROOT / PROTO_ROOT}",
        f"--pyi_out={ROOT / PROTO_ROOT}",
        f"--grpc_python_out={ROOT / PROTO_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}")
    init = ROOT / PROTO_ROOT / "moeserve" / "v1" / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf and gRPC stubs for the moeserve.v1 API."""\n')


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


packages, package_dir = _packages()
os.chdir(ROOT)
setup(packages=packages, package_dir=package_dir, cmdclass={"build_py": BuildPyWithProtos})
