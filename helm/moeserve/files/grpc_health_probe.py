"""grpc.health.v1 check of the local edge over TLS, for Kubernetes exec probes.

Exit 0 when the service is SERVING, 1 otherwise (not serving, unreachable, timed out). The kubelet's
own gRPC probe cannot speak TLS, so the chart mounts this file when tls.enabled is set.
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--service", default="")
    p.add_argument("--ca", required=True, help="PEM the server certificate must chain to")
    p.add_argument("--server-name", default="localhost", help="name checked against the server certificate")
    p.add_argument("--cert", help="client certificate (mTLS)")
    p.add_argument("--key", help="client key (mTLS)")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args()

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key) if args.key else None,
        certificate_chain=read(args.cert) if args.cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)]
    with grpc.secure_channel(f"127.0.0.1:{args.port}", creds, options=options) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"service {args.service!r} is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
