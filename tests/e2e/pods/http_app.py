#!/usr/bin/env python3
"""The HTTP app of a test pod: answers every GET or POST with the request
headers it saw, as JSON: {"pod": ..., "method": ..., "path": ...,
"headers": {lowercase name: value}}. `x-pylon-peer-identity` among them says
the call came through the sidecar's inbound mTLS path.

Prints `LISTENING <port>` on stderr once bound.
"""
import argparse
import json
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pod", required=True)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--bind", default="0.0.0.0")
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self):
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            body = json.dumps(
                {
                    "pod": args.pod,
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = answer
        do_POST = answer

        def log_message(self, *_):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def server_bind(self):
            # HTTPServer's own would look up the host's FQDN: a DNS query
            # no pod can answer, and seconds lost to its timeout.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]

    server = Server((args.bind, args.port), Handler)
    print(f"LISTENING {server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
