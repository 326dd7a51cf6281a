"""HTTPS upstreams on host loopback for the inspection tests: each records what arrived (method,
path, headers, body) and answers with a JSON echo of it, so a test can assert both what reached
the far side and what the agent was shown."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme


class TlsUpstream:
    """An HTTPS server on 127.0.0.1 with a certificate from `ca` for `names` (or a given
    context), answering every method with a JSON echo of the request."""

    def __init__(self, ca: trustme.CA | None = None, names: tuple[str, ...] = ("api.example.test",), *,
                 context: ssl.SSLContext | None = None) -> None:
        self.hits: list[dict] = []
        self.lock = threading.Lock()
        outer = self
        if context is None:
            assert ca is not None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert(*names).configure_cert(context)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    body = self._chunked()
                hit = {"method": self.command, "path": self.path, "headers": [[k, v] for k, v in self.headers.items()],
                       "body": body.decode("latin-1")}
                with outer.lock:
                    outer.hits.append(hit)
                out = json.dumps(hit).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            def _chunked(self) -> bytes:
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def ca_bundle(tmp: Path, ca: trustme.CA) -> Path:
    """A CA bundle for firma's own SSL_CERT_FILE: the test CA (it replaces the default bundle)."""
    path = tmp / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
