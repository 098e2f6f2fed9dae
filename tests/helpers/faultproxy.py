"""A fault-injecting HTTP proxy on 127.0.0.1 for tests: forwards to an emulator, or answers
with the status that ``fault(method, path)`` returns instead (e.g. 503)."""

from __future__ import annotations

import http.client
import random
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Fault = Callable[[str, str], int | None]  # (method, path) -> status to answer instead, or None


class FaultyProxy:
    """Forwards to fake-gcs-server, answering ``fault(method, path)`` instead when it says so."""

    def __init__(self, upstream: str, fault: Fault | None = None) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.fault = fault or (lambda method, path: None)
        self.seen: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = proxy.fault(self.command, self.path)
                if status is None:
                    status, headers, payload = proxy.forward(self.command, self.path,
                                                             dict(self.headers), body)
                else:
                    headers, payload = [], b'{"error": {"code": %d}}' % status
                with proxy.lock:
                    proxy.seen.append((self.command, self.path, status))
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in {"content-length", "transfer-encoding", "connection"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def forward(self, method: str, path: str, headers: dict, body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=10)
        try:
            headers.pop("Host", None)
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def hits(self, needle: str) -> list[tuple[str, str, int]]:
        with self.lock:
            return [s for s in self.seen if needle in s[1]]


def every_other(max_failures: int) -> Fault:
    """503 on each path's 1st, 3rd, … request, at most ``max_failures`` times in all."""
    counts: Counter[tuple[str, str]] = Counter()
    failed = 0
    lock = threading.Lock()

    def fault(method: str, path: str) -> int | None:
        nonlocal failed
        with lock:
            counts[(method, path)] += 1
            if counts[(method, path)] % 2 == 1 and failed < max_failures:
                failed += 1
                return 503
        return None

    return fault


def sometimes(rate: float, seed: int = 0, only: Callable[[str, str], bool] | None = None) -> Fault:
    """503 on about ``rate`` of the requests that ``only(method, path)`` selects (seeded)."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def fault(method: str, path: str) -> int | None:
        if only is not None and not only(method, path):
            return None
        with lock:
            return 503 if rng.random() < rate else None

    return fault


def start_proxy(upstream: str, fault: Fault | None = None) -> FaultyProxy:
    p = FaultyProxy(upstream, fault)
    p.thread.start()
    return p


def stop_proxy(p: FaultyProxy) -> None:
    p.server.shutdown()
    p.server.server_close()
