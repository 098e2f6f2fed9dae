"""A latency-injecting TCP proxy that stands the local emulators in for the cloud services.

    proxy = FieldProxy({"gcs": ("127.0.0.1", 4443), ...}, LATENCY).start()
    proxy.ports["gcs"]; proxy.counts(); proxy.close()

fake-gcs-server answers a GET in a few ms and bqemulator runs a query in tens of ms; Google's
services take longer per call (bench/README.md "Field rehearsal" cites each figure). This proxy
sits between the stream and the emulators and, per call, holds the request back by the
service's latency before the emulator sees it, and counts the calls by kind:

* HTTP/1.1 (fake-gcs-server, bqemulator's REST API): each request is read whole, classified
  (``http_kind``: a GCS media GET, a BigQuery query job insert, ``getQueryResults``, …),
  delayed, then forwarded. Google's HTTP clients send one request at a time per connection
  (no pipelining), so the delay adds to that call's round trip and to nothing else.
* HTTP/2 (bqemulator's Storage Write API, gRPC): frames are parsed at the TCP level; every
  client→server gRPC message (``GrpcMessages``: the 5-byte length prefix of each message,
  across DATA frames) is an AppendRows request — the product calls nothing else on that port
  (the default stream needs no CreateWriteStream) — and the frame that starts one is held
  back by the append latency. Frames leave in order through a delay line, so appends on one
  connection overlap their waits as they would on the wire: latency is added, throughput is
  not serialized. A new HTTP/2 stream (HEADERS frame) is one AppendRows call.
* Every new TCP connection pays ``connect`` once (TCP + TLS handshake to a Google front end),
  so a client that opens a connection per batch pays for it; one that keeps it open does not.

Nothing is delayed server→client. The proxy runs in its own process (spawned), so its CPU is
apart from the stream's and the producer's; counts live in shared memory.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# What each kind of call costs in the field, seconds added per call (bench/README.md cites them).
LATENCY: dict[str, float] = {
    "gcs_get": 0.050,  # GCS media GET, to the first byte (tens of ms)
    "gcs_other": 0.030,  # GCS JSON API metadata calls
    "bq_query": 1.0,  # a query job, start to result (~0.5–2 s): charged on jobs.insert/jobs.query
    "bq_get_query_results": 0.030,  # the result fetch after the job (charged above)
    "bq_other": 0.030,  # tables.get, jobs.get, …
    "append_rows": 0.030,  # one AppendRows request on an open connection (tens of ms)
    "connect": 0.020,  # a new connection: TCP + TLS handshake (estimate: ~2 round trips + TLS)
}
KINDS = ("gcs_get", "gcs_other", "bq_query", "bq_get_query_results", "bq_other", "append_rows",
         "append_calls", "connections")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_JOBS = re.compile(r"^/bigquery/v2/projects/[^/]+/jobs/?(\?|$)")
_QUERIES = re.compile(r"^/bigquery/v2/projects/[^/]+/queries/?(\?|$)")
_RESULTS = re.compile(r"^/bigquery/v2/projects/[^/]+/queries/[^/?]+")


def http_kind(service: str, method: str, target: str, body: bytes) -> str:
    """Which kind of call one HTTP request is (pure; ``target`` is the request line's path)."""
    path = target.split("#", 1)[0]
    if service == "gcs":
        media = path.startswith("/download/") or "alt=media" in path
        return "gcs_get" if method == "GET" and media else "gcs_other"
    if method == "POST" and _QUERIES.match(path):
        return "bq_query"  # jobs.query: the query runs inside the call
    if method == "POST" and _JOBS.match(path) and b'"query"' in body:
        return "bq_query"  # jobs.insert of a query job (load and copy jobs have no "query")
    if method == "GET" and _RESULTS.match(path):
        return "bq_get_query_results"
    return "bq_other"


def split_http_request(buf: bytes) -> tuple[bytes, str, str, bytes] | None:
    """The first whole HTTP/1.1 request in ``buf``: (raw bytes, method, target, body), or None
    while it is incomplete. Bodies by Content-Length or chunked transfer coding."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    method, target = (head[0].split(" ") + ["", ""])[:2]
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    start = end + 4
    if "chunked" in headers.get("transfer-encoding", "").lower():
        pos, body = start, b""
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";")[0] or b"0", 16)
            if size == 0:
                trailer = buf.find(b"\r\n\r\n", line_end)
                if trailer < 0:
                    return None
                return buf[:trailer + 4], method, target, body
            if len(buf) < line_end + 2 + size + 2:
                return None
            body += buf[line_end + 2:line_end + 2 + size]
            pos = line_end + 2 + size + 2
    length = int(headers.get("content-length", "0") or 0)
    if len(buf) < start + length:
        return None
    return buf[:start + length], method, target, buf[start:start + length]


class GrpcMessages:
    """Counts gRPC messages starting in client→server DATA frames, per HTTP/2 stream (each
    message is a 5-byte prefix — compressed flag, big-endian length — then the message)."""

    def __init__(self) -> None:
        self._left: dict[int, int] = {}  # stream → message bytes still to come
        self._prefix: dict[int, bytes] = {}  # stream → prefix bytes seen so far

    def feed(self, stream: int, payload: bytes) -> int:
        """Messages that start in this DATA payload (padding already removed)."""
        started, pos = 0, 0
        while pos < len(payload):
            left = self._left.get(stream, 0)
            if left:
                take = min(left, len(payload) - pos)
                self._left[stream] = left - take
                pos += take
                continue
            prefix = self._prefix.get(stream, b"")
            if not prefix:
                started += 1  # its first byte: the frame that carries it starts a message
            take = min(5 - len(prefix), len(payload) - pos)
            prefix += payload[pos:pos + take]
            pos += take
            if len(prefix) < 5:
                self._prefix[stream] = prefix
                continue
            self._prefix.pop(stream, None)
            self._left[stream] = int.from_bytes(prefix[1:5], "big")
        return started


def split_h2_frame(buf: bytes) -> tuple[bytes, int, int, int, bytes] | None:
    """The first whole HTTP/2 frame in ``buf``: (raw bytes, type, flags, stream, payload)."""
    if len(buf) < 9:
        return None
    length = int.from_bytes(buf[:3], "big")
    if len(buf) < 9 + length:
        return None
    ftype, flags = buf[3], buf[4]
    stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
    return buf[:9 + length], ftype, flags, stream, buf[9:9 + length]


def data_payload(flags: int, payload: bytes) -> bytes:
    """A DATA frame's payload without its padding (PADDED flag 0x8)."""
    if flags & 0x8 and payload:
        pad = payload[0]
        return payload[1:len(payload) - pad]
    return payload


# --- the asyncio proxy (runs in its own process) ---------------------------------------------

@dataclass
class _Service:
    name: str  # "gcs" | "bq" (HTTP/1.1) | "grpc" (HTTP/2)
    host: str
    port: int


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class _Proxy:
    def __init__(self, latency: Mapping[str, float], counts: Any) -> None:
        self.latency, self.counts = latency, counts

    def count(self, kind: str, n: int = 1) -> None:
        with self.counts.get_lock():
            self.counts[KINDS.index(kind)] += n

    async def handle(self, svc: _Service, creader: asyncio.StreamReader,
                     cwriter: asyncio.StreamWriter) -> None:
        self.count("connections")
        try:
            ureader, uwriter = await asyncio.open_connection(svc.host, svc.port)
        except OSError:
            cwriter.close()
            return
        back = asyncio.ensure_future(_pipe(ureader, cwriter))
        try:
            if svc.name == "grpc":
                await self._h2(creader, uwriter)
            else:
                await self._http(svc.name, creader, uwriter)
        except (ConnectionError, ValueError, asyncio.CancelledError):
            pass
        finally:
            uwriter.close()
            await asyncio.gather(back, return_exceptions=True)

    async def _http(self, service: str, creader: asyncio.StreamReader,
                    uwriter: asyncio.StreamWriter) -> None:
        buf, connect = b"", self.latency.get("connect", 0.0)
        while data := await creader.read(65536):
            buf += data
            while (req := split_http_request(buf)) is not None:
                raw, method, target, body = req
                buf = buf[len(raw):]
                kind = http_kind(service, method, target, body)
                self.count(kind)
                await asyncio.sleep(self.latency.get(kind, 0.0) + connect)
                connect = 0.0
                uwriter.write(raw)
                await uwriter.drain()
        if buf:
            uwriter.write(buf)
            await uwriter.drain()

    async def _h2(self, creader: asyncio.StreamReader, uwriter: asyncio.StreamWriter) -> None:
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def release() -> None:  # the delay line: in order, each at its own time
            while (item := await line.get()) is not None:
                wait = item[0] - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                uwriter.write(item[1])
                await uwriter.drain()

        sender = asyncio.ensure_future(release())
        messages, buf, preface = GrpcMessages(), b"", True
        last = time.monotonic() + self.latency.get("connect", 0.0)
        try:
            while data := await creader.read(65536):
                buf += data
                if preface:
                    if len(buf) < len(PREFACE):
                        continue
                    line.put_nowait((last, buf[:len(PREFACE)]))
                    buf, preface = buf[len(PREFACE):], False
                while (frame := split_h2_frame(buf)) is not None:
                    raw, ftype, flags, stream, payload = frame
                    buf = buf[len(raw):]
                    delay = 0.0
                    if ftype == 1:  # HEADERS from the client: a new call
                        self.count("append_calls")
                    elif ftype == 0:
                        started = messages.feed(stream, data_payload(flags, payload))
                        if started:
                            self.count("append_rows", started)
                            delay = self.latency.get("append_rows", 0.0)
                    last = max(last, time.monotonic() + delay)
                    line.put_nowait((last, raw))
        finally:
            line.put_nowait(None)
            await asyncio.gather(sender, return_exceptions=True)
            if buf:
                uwriter.write(buf)


def _serve(services: list[_Service], latency: dict[str, float], counts: Any, ports: Any,
           stop: Any) -> None:
    parent = os.getppid()

    async def main() -> None:
        proxy = _Proxy(latency, counts)
        servers = []
        for i, svc in enumerate(services):
            server = await asyncio.start_server(
                lambda r, w, svc=svc: proxy.handle(svc, r, w), "127.0.0.1", 0)
            ports[i] = server.sockets[0].getsockname()[1]
            servers.append(server)
        while not stop.is_set() and os.getppid() == parent:  # the bench gone: so are we
            await asyncio.sleep(0.2)
        for server in servers:
            server.close()

    asyncio.run(main())


class FieldProxy:
    """The proxy process: one listening port per upstream service, counts in shared memory."""

    def __init__(self, upstreams: Mapping[str, tuple[str, int]],
                 latency: Mapping[str, float] | None = None) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
        self.latency = dict(LATENCY if latency is None else latency)
        self.services = [_Service(name, host, port) for name, (host, port) in upstreams.items()]
        self._counts = ctx.Array("q", len(KINDS))
        self._ports = ctx.Array("i", len(self.services))
        self._stop = ctx.Event()
        self.process = ctx.Process(target=_serve, daemon=True, name="bench-field-proxy",
                                   args=(self.services, self.latency, self._counts, self._ports,
                                         self._stop))
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 60.0) -> FieldProxy:
        self.process.start()
        deadline = time.monotonic() + timeout
        while not all(self._ports[:]):
            if not self.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the field proxy did not start")
            time.sleep(0.05)
        self.ports = {s.name: self._ports[i] for i, s in enumerate(self.services)}
        return self

    def counts(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(KINDS, self._counts[:], strict=True))

    def close(self) -> None:
        if self.process.pid is None:
            return
        self._stop.set()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()


def diff(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}
