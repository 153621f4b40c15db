"""A fault-injecting HTTP proxy on loopback, for S3 clients in front of the moto server.

Each request, drawn from a seeded generator, is either forwarded, answered 503 SlowDown or 500 InternalError,
cut off (connection closed, no answer), or delayed then forwarded. Faults are injected *before* forwarding,
so the store never half-applies a request: what a client must do is retry, as against a throttled S3.
"""
from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}


class FaultProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, seed: int = 0, slowdown: float = 0.03, error: float = 0.02,
                 reset: float = 0.02, slow: float = 0.03, delay_s: float = 0.3):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlparse(upstream).netloc
        self.rates = [("slowdown", slowdown), ("error", error), ("reset", reset), ("slow", slow)]
        self.delay_s = delay_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {k: 0 for k, _ in self.rates} | {"forwarded": 0}
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def draw(self) -> str:
        with self.lock:
            x, edge = self.rng.random(), 0.0
            for kind, rate in self.rates:
                edge += rate
                if x < edge:
                    self.counts[kind] += 1
                    return kind
            self.counts["forwarded"] += 1
            return "forward"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def _handle(self):
        body = self._body()
        kind = self.server.draw()
        if kind == "reset":
            self.close_connection = True
            self.connection.close()
            return
        if kind in ("slowdown", "error"):
            code, name = (503, "SlowDown") if kind == "slowdown" else (500, "InternalError")
            err = f"<?xml version='1.0'?><Error><Code>{name}</Code><Message>injected</Message></Error>".encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(err)
            return
        if kind == "slow":
            time.sleep(self.server.delay_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.server.upstream, timeout=60)
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(k, v)  # a HEAD answer's length is the object's, not its (empty) body's
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
