"""TLS and mTLS at the edge, with certificates generated here."""

from __future__ import annotations

import grpc
import pytest

from edge_harness import code_of, make_certs, running_server
from moeserve.router.client import AsyncClient
from moeserve.router.tls import ClientTLS, ServerTLS


async def _served(address: str, tls: ClientTLS | None) -> int:
    async with AsyncClient(address, tls=tls) as c:
        return len((await c.generate(prompt="hi", max_tokens=2, ignore_eos=True, timeout=60)).token_ids)


async def _refused(address: str, tls: ClientTLS | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _served(address, tls)
    return code_of(err)


@pytest.mark.asyncio
async def test_tls_and_mtls(tmp_path):
    certs = make_certs(tmp_path)
    trusted = ClientTLS(ca=str(certs.ca))
    with_cert = ClientTLS(ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key))
    stranger = ClientTLS(ca=str(certs.ca), cert=str(certs.other_client_cert), key=str(certs.other_client_key))

    tls = ServerTLS(str(certs.server_cert), str(certs.server_key))
    async with running_server(tls=tls) as srv:
        assert await _served(srv.address, trusted) == 2
        assert await _served(srv.address, with_cert) == 2  # a client certificate is not asked for, nor refused
        assert await _refused(srv.address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        assert await _refused(srv.address, ClientTLS(ca=str(certs.other_ca))) == grpc.StatusCode.UNAVAILABLE

    mtls = ServerTLS(str(certs.server_cert), str(certs.server_key), client_ca=str(certs.ca))
    async with running_server(tls=mtls) as srv:
        assert await _served(srv.address, with_cert) == 2
        assert await _refused(srv.address, trusted) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        assert await _refused(srv.address, stranger) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
        assert await _served(srv.address, with_cert) == 2  # and it goes on serving


def test_credentials_are_checked_where_they_enter(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not PEM"):
        ServerTLS(str(tmp_path / "junk.pem"), str(tmp_path / "junk.pem")).credentials()
    with pytest.raises(ValueError, match="No such file"):
        ServerTLS(str(tmp_path / "absent.pem"), str(tmp_path / "absent.key")).credentials()
    with pytest.raises(ValueError, match="give both"):
        ClientTLS(ca=None, cert=str(tmp_path / "junk.pem"))
