"""The built wheel is one `moeserve` namespace: nothing generic lands at the top of site-packages.

Builds the real wheel with the venv's setuptools and grpcio-tools (as `pip install .` does),
unpacks it, and imports from outside the repo with `python -S`, so that the editable install's
import hook (a .pth processed by `site`) cannot answer instead of the wheel.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERIC = {"kernels", "cluster", "router", "experts", "models", "chaos", "v1", "protos"}


def test_wheel_is_one_namespace_and_imports_from_outside_the_repo(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("moeserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"moeserve", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    assert not top & GENERIC
    # The packages, the generated stubs and the data tables all travel.
    for path in ("moeserve/models/__init__.py", "moeserve/kernels/reference.py", "moeserve/router/server.py",
                 "moeserve/v1/inference_pb2.py", "moeserve/v1/inference_pb2_grpc.py", "moeserve/v1/inference.proto"):
        assert path in names, path
    assert not any(n.startswith("moeserve/tests") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    deps = sysconfig.get_paths()["purelib"]
    code = "import moeserve.models, moeserve.kernels, moeserve.router.server, moeserve.v1.inference_pb2 as pb; print(moeserve.models.__file__)"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": f"{site}:{deps}", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert out.strip().startswith(str(site)), out
