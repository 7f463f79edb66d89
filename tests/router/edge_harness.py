"""Shared pieces of the edge tests: a real server on loopback around a real engine, and test certificates.

The engine loads the demo model (a tiny real checkpoint with its tokenizer) on CPU; the server binds
an ephemeral port. Nothing here stands in for a real part.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc

from moeserve.router.client import AsyncClient
from moeserve.router.config import EngineConfig
from moeserve.router.engine import AsyncEngine
from moeserve.router.server import InferenceServer, ServerConfig

# A small KV cache keeps the CPU tests light; 64 blocks of 16 tokens still hold several long requests.
ENGINE_DEFAULTS = dict(device="cpu", max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=96, block_size=16)


def demo_model_dir() -> str:
    from moeserve.models.demo import ensure_demo_model

    return str(ensure_demo_model())


@contextlib.asynccontextmanager
async def running_server(engine: dict | None = None, **server) -> AsyncIterator[InferenceServer]:
    """A started InferenceServer on 127.0.0.1:<ephemeral>; stopped (grace 0) on exit."""
    cfg = EngineConfig(**{"model": demo_model_dir(), **ENGINE_DEFAULTS, **(engine or {})})
    srv = InferenceServer(AsyncEngine.from_config(cfg), ServerConfig(**{"port": 0, **server}), model_name="demo")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


async def wait_until(server: InferenceServer, predicate, timeout: float = 60.0) -> None:
    """Wait for the servicer's bookkeeping to satisfy `predicate` (notified on every admit and release)."""
    await asyncio.wait_for(server.servicer.wait_for(predicate), timeout)


def code_of(info) -> grpc.StatusCode:
    return info.value.code()


async def long_stream(client: AsyncClient, server: InferenceServer, **params):
    """A stream that runs as long as the context allows, returned once its first token has arrived."""
    limit = server.servicer.limits.context_length - 4
    call = client.generate_stream(token_ids=[5, 6, 7, 8], max_tokens=limit, ignore_eos=True, **params)
    first = await call.read()
    assert first.token_ids, "the long request produced no first token"
    return call


# -- certificates -------------------------------------------------------------------------------------

@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody here trusts
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a stranger's pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, issuer_name: x509.Name, issuer_key, is_ca: bool, san: list | None = None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    def write(stem: str, cert, key) -> tuple[Path, Path]:
        c, k = directory / f"{stem}.pem", directory / f"{stem}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return c, k

    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = issue("moeserve test CA", name("moeserve test CA"), None, True)
    other_cert, other_key = issue("stranger CA", name("stranger CA"), None, True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    srv_cert, srv_key = issue("localhost", ca_cert.subject, ca_key, False, san)
    cli_cert, cli_key = issue("test-client", ca_cert.subject, ca_key, False, [x509.DNSName("test-client")])
    oc_cert, oc_key = issue("intruder", other_cert.subject, other_key, False, [x509.DNSName("intruder")])
    ca, _ = write("ca", ca_cert, ca_key)
    other_ca, _ = write("other-ca", other_cert, other_key)
    server_cert, server_key = write("server", srv_cert, srv_key)
    client_cert, client_key = write("client", cli_cert, cli_key)
    other_client_cert, other_client_key = write("intruder", oc_cert, oc_key)
    return Certs(ca, server_cert, server_key, client_cert, client_key, other_ca, other_client_cert, other_client_key)
