"""The serving path runs where only torch, grpcio and protobuf are installed (the GPU bench machine).

A child interpreter refuses to import ray, opentelemetry, grpc health/reflection and grpc_tools,
then serves the demo model and answers a client: nothing on that path may need them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from edge_harness import demo_model_dir

ABSENT = ("ray", "opentelemetry", "grpc_health", "grpc_reflection", "grpc_tools")

BLOCKER = f"""
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""

SERVE_AND_ASK = """
import asyncio, sys
from moeserve.router.client import AsyncClient
from moeserve.router.config import EngineConfig
from moeserve.router.engine import AsyncEngine
from moeserve.router.server import InferenceServer, ServerConfig

async def main():
    cfg = EngineConfig(model=sys.argv[1], num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=64)
    server = InferenceServer(AsyncEngine.from_config(cfg), ServerConfig(port=0))
    await server.start()
    try:
        async with AsyncClient(server.address) as client:
            await client.wait_ready(60)
            out = await client.generate(token_ids=[5, 6, 7], max_tokens=3, ignore_eos=True)
            print("TOKENS", len(out.token_ids))
    finally:
        await server.stop(0)
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
    print("LOADED", loaded)

asyncio.run(main())
""" % (ABSENT,)


def test_serving_needs_no_ray_opentelemetry_health_or_reflection(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    run = subprocess.run([sys.executable, "-c", SERVE_AND_ASK, demo_model_dir()], capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TOKENS 3" in run.stdout and "LOADED []" in run.stdout, run.stdout


def test_metrics_flags_without_opentelemetry_fail_fast_with_a_clear_error(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    cli = "import sys; from moeserve.cluster.cli import main; sys.exit(main())"
    run = subprocess.run([sys.executable, "-c", cli, "serve", "--port", "0", "--prometheus-port", "0"],
                         capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "--prometheus-port/--otlp-endpoint need opentelemetry-sdk" in run.stderr
    assert not (tmp_path / ".cache" / "moeserve").exists()  # refused before any model was written or loaded
