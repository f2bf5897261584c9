#!/usr/bin/env python3
"""The gRPC app of a test pod, and a client for it, with grpcio and no
generated code: one unary method, `/pylon.test.Peer/Who`, whose request and
response are raw bytes.

  grpc_app.py serve --pod NAME --port 50051
      answers with JSON {"pod": ..., "metadata": {key: value}}: the
      metadata it saw (`x-pylon-peer-identity` among it); also serves
      `grpc.health.v1.Health/Check`: SERVING for the service "" and
      "pylon.test.Peer", NOT_FOUND for any other; prints `LISTENING <port>`
      on stderr once bound.
  grpc_app.py call --target HOST:PORT
      calls it once (plaintext, as an unmodified app does) and prints the
      answer on stdout; exits 1 with the status on stderr if the call fails.
"""
import argparse
import json
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "pylon.test.Peer"
METHOD = "Who"


def serve(args):
    def who(_request, context):
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return json.dumps({"pod": args.pod, "metadata": metadata}).encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                who, request_deserializer=None, response_serializer=None
            )
        },
    )
    def check(request, context):
        # HealthCheckRequest {string service = 1}: an empty message, or
        # tag 0x0a, a one-byte length and the name.
        service = request[2:].decode() if request[:1] == b"\x0a" else ""
        if service not in ("", SERVICE):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return b"\x08\x01"  # HealthCheckResponse {status: SERVING}

    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check, request_deserializer=None, response_serializer=None
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler, health))
    port = server.add_insecure_port(f"0.0.0.0:{args.port}")
    server.start()
    print(f"LISTENING {port}", file=sys.stderr, flush=True)
    threading.Event().wait()


def call(args):
    with grpc.insecure_channel(args.target) as channel:
        stub = channel.unary_unary(
            f"/{SERVICE}/{METHOD}", request_serializer=None, response_deserializer=None
        )
        try:
            reply = stub(b"who am I talking to", timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{e.code()}: {e.details()}", file=sys.stderr)
            sys.exit(1)
    print(reply.decode())


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--pod", required=True)
    s.add_argument("--port", type=int, default=50051)
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    serve(args) if args.command == "serve" else call(args)


if __name__ == "__main__":
    main()
