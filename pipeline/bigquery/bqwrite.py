"""BigQuery Storage Write API: a batch's rows as Arrow, appended to a table's default stream.

Why the default stream: it is committed on append (no CreateWriteStream, which real BigQuery
limits to 10,000 per hour per project, no Finalize/BatchCommit round trips) and it costs no
load job (100,000 per project and 1,500 per table per day) and no DML slot (2 concurrent
mutating statements per table). It is at-least-once: a retried append whose first try was
committed adds the rows again, so ``pipeline.bigquery.sinks`` re-checks keys before every attempt.
https://cloud.google.com/bigquery/docs/write-api#default_stream
https://cloud.google.com/bigquery/quotas#write-api-limits

Why Arrow rather than protobuf rows: the table's JSON schema maps onto an Arrow schema one to
one (REPEATED RECORD → list<struct>, TIMESTAMP → timestamp[us, UTC]) with no descriptor to
build; bqemulator decodes both. Real BigQuery accepts Arrow on the v1 API (documented as
``AppendRowsRequest.arrow_rows``); a deployment that must use protobuf rows can swap
``append_requests`` without touching the sink.

Encoding is pure (``arrow_schema``, ``record_batch``, ``append_requests``); ``StorageWriter``
only does I/O.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

from pipeline.times import iso_time

if TYPE_CHECKING:
    import pyarrow as pa
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient, types

# AppendRows requests are limited to 10 MB (https://cloud.google.com/bigquery/quotas#write-api-limits).
# Requests are cut on their real serialized size, at most REQUEST_BYTES: a tenth below the
# limit, for the call's headers and a server that counts 10 MB as 10 * 2**20 or 10**7.
REQUEST_BYTES = 9_000_000
ROWS_PER_REQUEST = 2000  # and at most this many rows, however small they are
# How long one AppendRows response may take before the connection is dropped and the sink's
# retry (which re-checks keys first) takes over.
APPEND_TIMEOUT = 60.0


def default_stream(table_id: str) -> str:
    """``project.dataset.table`` → the resource name of its ``_default`` write stream."""
    project, dataset, table = table_id.split(".")
    return f"projects/{project}/datasets/{dataset}/tables/{table}/streams/_default"


def _arrow_type(field: Mapping[str, Any]) -> pa.DataType:
    import pyarrow as pa

    kind = field["type"].upper()
    if kind in ("RECORD", "STRUCT"):
        base: pa.DataType = pa.struct([_arrow_field(f) for f in field.get("fields", [])])
    else:
        scalar = {"STRING": pa.string(), "INTEGER": pa.int64(), "INT64": pa.int64(),
                  "FLOAT": pa.float64(), "FLOAT64": pa.float64(), "BOOLEAN": pa.bool_(),
                  "BOOL": pa.bool_(), "TIMESTAMP": pa.timestamp("us", tz="UTC"),
                  "DATE": pa.date32(), "BYTES": pa.binary()}
        if kind not in scalar:
            raise ValueError(f"no Arrow mapping for BigQuery type {kind} ({field['name']})")
        base = scalar[kind]
    return pa.list_(base) if field.get("mode", "NULLABLE").upper() == "REPEATED" else base


def _arrow_field(field: Mapping[str, Any]) -> pa.Field:
    import pyarrow as pa

    return pa.field(field["name"], _arrow_type(field),
                    nullable=field.get("mode", "NULLABLE").upper() != "REQUIRED")


def arrow_schema(fields: Sequence[Mapping[str, Any]]) -> pa.Schema:
    """The Arrow schema of a ``schemas/<name>.json`` field list (pure)."""
    import pyarrow as pa

    return pa.schema([_arrow_field(f) for f in fields])


def _value(field: Mapping[str, Any], value: Any) -> Any:
    """A JSON-ready row value (ISO strings for times) as what pyarrow takes for ``field``."""
    if value is None:
        return [] if field.get("mode", "").upper() == "REPEATED" else None
    if field.get("mode", "").upper() == "REPEATED":
        if field["type"].upper() not in ("RECORD", "STRUCT", "TIMESTAMP"):
            return list(value)  # pyarrow takes these as they are: one call, not one per element
        return [_value({**field, "mode": "NULLABLE"}, v) for v in value]
    kind = field["type"].upper()
    if kind in ("RECORD", "STRUCT"):
        return {f["name"]: _value(f, value.get(f["name"])) for f in field.get("fields", [])}
    if kind == "TIMESTAMP" and isinstance(value, str):
        return iso_time(value)
    return value


def record_batch(rows: Sequence[Mapping[str, Any]], fields: Sequence[Mapping[str, Any]]
                 ) -> pa.RecordBatch:
    """Rows (``pipeline.bigquery.rows`` dicts) as one Arrow record batch in the table's schema (pure).

    A column the rows lack is NULL; a REQUIRED column left NULL fails here, not on the server.
    """
    import pyarrow as pa

    schema = arrow_schema(fields)
    columns = [pa.array([_value(f, r.get(f["name"])) for r in rows], type=schema.field(i).type)
               for i, f in enumerate(fields)]
    for field, column in zip(schema, columns, strict=True):
        if not field.nullable and column.null_count:  # pyarrow does not check this itself
            raise ValueError(f"{field.name} is REQUIRED but {column.null_count} rows lack it")
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def append_requests(stream: str, batch: pa.RecordBatch, rows_per_request: int = ROWS_PER_REQUEST,
                    max_bytes: int = REQUEST_BYTES) -> list[types.AppendRowsRequest]:
    """AppendRows requests for ``batch``: the first carries the writer schema (pure).

    Each holds at most ``rows_per_request`` rows and ``max_bytes`` serialized bytes, measured
    on the request itself, schema included (a connection may send it with any request): a
    guess per row misses long names and metadata. A single row over ``max_bytes`` is a
    ValueError: no request could carry it.
    No offsets: the default stream ignores them (offsets are for committed/pending streams).
    """
    from google.cloud.bigquery_storage_v1 import types

    schema = types.ArrowSchema(serialized_schema=batch.schema.serialize().to_pybytes())
    requests: list[types.AppendRowsRequest] = []
    start, take = 0, max(1, rows_per_request)
    while start < batch.num_rows or not requests:
        part = batch.slice(start, take)
        arrow = types.AppendRowsRequest.ArrowData(
            writer_schema=schema,
            rows=types.ArrowRecordBatch(serialized_record_batch=part.serialize().to_pybytes(),
                                        row_count=part.num_rows))
        request = types.AppendRowsRequest(write_stream=stream, arrow_rows=arrow)
        size = types.AppendRowsRequest.pb(request).ByteSize()
        if size > max_bytes:
            if part.num_rows <= 1:
                raise ValueError(f"row {start} alone is {size} bytes as an AppendRows request, "
                                 f"over the {max_bytes}-byte limit")
            take = max(1, min(part.num_rows - 1, int(part.num_rows * max_bytes / size * 0.95)))
            continue  # the same start, fewer rows; later parts keep the smaller size
        if requests:
            types.AppendRowsRequest.pb(request).arrow_rows.ClearField("writer_schema")
        requests.append(request)
        start += part.num_rows
    return requests


def raise_for_response(response: types.AppendRowsResponse) -> None:
    """An AppendRows response's in-band error as the google.api_core exception of its code,
    so RESOURCE_EXHAUSTED (429) and UNAVAILABLE (503) are retried like any other call."""
    import grpc
    from google.api_core import exceptions

    status = response.error
    if status and status.code:
        code = next((c for c in grpc.StatusCode if c.value[0] == status.code),
                    grpc.StatusCode.UNKNOWN)
        raise exceptions.from_grpc_status(code, status.message or "AppendRows failed")
    if response.row_errors:
        first = response.row_errors[0]
        raise exceptions.BadRequest(
            f"{len(response.row_errors)} rows refused; row {first.index}: {first.message}")


class Connection:
    """One kept-open AppendRows call to one table's default stream.

    Requests go in through a queue the gRPC call reads from; each gets exactly one response, in
    order, read here by the caller (with a timeout, so a lost response cannot hang a batch).
    The writer schema rides on the first request only, as the API asks
    (https://cloud.google.com/bigquery/docs/write-api#arrow_format). Written here rather than
    with the library's ``AppendRowsStream``, whose opening loop spins until its own 600 s
    timeout when a call ends while opening (seen against the emulator).
    """

    def __init__(self, client: BigQueryWriteClient, table_id: str) -> None:
        self.client = client
        self.stream = default_stream(table_id)
        self._requests: queue.Queue[types.AppendRowsRequest | None] = queue.Queue()
        self._call: Any = None  # opened by the first send (the client waits for a response)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="bucketlens-append")

    def _open(self) -> types.AppendRowsResponse:
        # retry=None: a retried call would find the request queue drained; the sink retries
        self._call = self.client.append_rows(
            iter(self._requests.get, None), retry=None,
            metadata=(("x-goog-request-params", f"write_stream={self.stream}"),))
        return next(self._call)

    def send(self, request: types.AppendRowsRequest, timeout: float) -> types.AppendRowsResponse:
        """Send one request and wait for its response."""
        if self._call is not None:  # the connection's first request carried the schema
            type(request).pb(request).arrow_rows.ClearField("writer_schema")
        self._requests.put(request)
        read = self._open if self._call is None else partial(next, self._call)
        return self._reader.submit(read).result(timeout=timeout)

    def close(self) -> None:
        self._requests.put(None)  # ends the request stream: the server closes the call
        if self._call is not None:
            self._call.cancel()
        self._reader.shutdown(wait=False, cancel_futures=True)


class StorageWriter:
    """Appends rows to tables' default streams over one kept-open connection per table.

    Google recommends one long-lived connection for many appends rather than one per batch
    (a connection costs a round trip and counts against the concurrent-connection quota:
    https://cloud.google.com/bigquery/docs/write-api-best-practices). An append that fails or
    times out closes its table's connection, so the next append (the sink's retry, which first
    looks up what the failed one sent) starts on a fresh one.
    """

    def __init__(self, client: BigQueryWriteClient, timeout: float = APPEND_TIMEOUT) -> None:
        self.client = client
        self.timeout = timeout
        self.calls = 0  # AppendRows requests sent (the benchmark reports it)
        self.connections = 0  # connections opened: one per table while nothing fails
        self._open: dict[str, Connection] = {}
        self._lock = threading.Lock()  # one batch's requests at a time, in order
        # a writer dropped without close() still ends its calls (the server holds them open)
        weakref.finalize(self, _close_all, self._open)

    def append(self, table_id: str, rows: Sequence[Mapping[str, Any]],
               fields: Sequence[Mapping[str, Any]]) -> int:
        """Append ``rows`` (committed when this returns); returns the rows appended.

        Raises the first error; rows of earlier requests of the same call may be committed,
        which callers absorb by re-checking keys before retrying.
        """
        if not rows:
            return 0
        requests = append_requests(default_stream(table_id), record_batch(rows, fields))
        with self._lock:
            connection = self._open.get(table_id)
            if connection is None:
                connection = self._open[table_id] = Connection(self.client, table_id)
                self.connections += 1
            try:
                for request in requests:
                    self.calls += 1
                    raise_for_response(connection.send(request, self.timeout))
            except BaseException:
                self._drop(table_id)
                raise
        return len(rows)

    def _drop(self, table_id: str) -> None:
        connection = self._open.pop(table_id, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Close every connection."""
        with self._lock:
            _close_all(self._open)


def _close_all(connections: dict[str, Connection]) -> None:
    while connections:
        connections.popitem()[1].close()
