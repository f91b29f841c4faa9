"""The lab's HTTP echo server: answers every request with its method, path, headers and peer as JSON.

Run in a pod: `python -m nodemesh.lab.echo --port 8000 --name httpbin-v2`. HTTP/1.1 with
keep-alive, one thread per connection (it is a test peer, not part of the data path).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nodemesh-echo/1"
    pod_name = ""
    # the status line and headers go out in one write, the body in another: with Nagle the body
    # waited for the peer's delayed ACK, 40 ms per keep-alive request
    disable_nagle_algorithm = True

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            self.send_error(413, "body too large")
            return
        body = self.rfile.read(length) if length else b""
        local = self.connection.getsockname()
        payload = {
            "pod": self.pod_name,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "peer": f"{self.client_address[0]}:{self.client_address[1]}",
            "local": f"{local[0]}:{local[1]}",
            "body_bytes": len(body),
        }
        out = (json.dumps(payload, sort_keys=True) + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"echo peer={self.client_address[0]}:{self.client_address[1]} {format % args}\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)
    EchoHandler.pod_name = args.name
    import threading

    servers = [_Server(("0.0.0.0", port), EchoHandler) for port in args.port]
    for srv in servers[1:]:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(f"echo listening ports={args.port}", file=sys.stderr, flush=True)
    servers[0].serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
