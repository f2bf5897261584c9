#!/usr/bin/env python3
"""A workload outside the mesh, and a raw client for it.

  external.py serve --tcp-port 9000 --tls-port 9443 --cert C --key K
      a TCP echo server and a TLS echo server (each echoes every byte it
      reads); prints `LISTENING <tcp> <tls>` on stderr once both are bound.
  external.py call --host H --port P [--ca F] --message M
      connects (over TLS verifying the server against the CA file F when
      given), sends M, reads until as many bytes came back, prints them.
"""
import argparse
import socket
import socketserver
import ssl
import sys
import threading


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        if self.server.tls is not None:
            conn = self.server.tls.wrap_socket(conn, server_side=True)
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, port, tls):
        self.tls = tls
        super().__init__(("0.0.0.0", port), Echo)


def serve(args):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    servers = [Server(args.tcp_port, None), Server(args.tls_port, tls)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    ports = " ".join(str(s.server_address[1]) for s in servers)
    print(f"LISTENING {ports}", file=sys.stderr, flush=True)
    threading.Event().wait()


def call(args):
    message = args.message.encode()
    conn = socket.create_connection((args.host, args.port), timeout=args.timeout)
    if args.ca:
        context = ssl.create_default_context(cafile=args.ca)
        conn = context.wrap_socket(conn, server_hostname=args.host)
    conn.sendall(message)
    got = b""
    while len(got) < len(message):
        data = conn.recv(65536)
        if not data:
            break
        got += data
    conn.close()
    sys.stdout.write(got.decode(errors="replace"))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp-port", type=int, default=9000)
    s.add_argument("--tls-port", type=int, default=9443)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    c = sub.add_parser("call")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--ca")
    c.add_argument("--message", required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    serve(args) if args.command == "serve" else call(args)


if __name__ == "__main__":
    main()
