"""``bucketlens dashboard``: a local web page over the same BigQuery tables the stream writes.

    eval "$(bucketlens local env)"; bucketlens dashboard      # http://127.0.0.1:8000

Newest uploads with thumbnails, top-1 label and confidence, throughput and latency per minute,
class mix, dead letters with reasons, and a low-confidence review list; the page polls
``/api/summary`` every few seconds, so it updates without a reload.

* Thumbnails go through the app (``/thumb``): the object is read with the viewer's own
  credentials, generation-pinned and size-capped (``pipeline.stream.fetch``), decoded within the
  stream's pixel budget (``pipeline.model.images``) and re-encoded small. Only objects of the
  configured bucket are served; nothing is ever made public.
* Every query is bounded by constant partition filters (``pipeline.bigquery.sql``) and a LIMIT, so
  the page never scans the whole table.
* Object names, labels and reasons are uploader-controlled: the page sets them with
  ``textContent`` only, and a Content-Security-Policy allows no inline script.

Starlette (routing, static files) and uvicorn (HTTP) do the web part; Chart.js 4 is vendored
under ``static/`` from its npm package (MIT, ``chart.js-LICENSE.md``), so nothing loads from a CDN.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any

from pipeline.bigquery.sql import since_filter, ts_literal
from pipeline.config import Settings
from pipeline.status import CLASSIFIED, Status, sql_list

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

NEWEST = 24  # uploads on the page
LISTS = 20  # rows in the dead-letter and review lists
CLASSES = 10  # labels in the class mix
THUMB_PX = 160
CSP = ("default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class Window:
    """What the page shows: rows of objects created since ``since`` (the partition bound),
    charts over the last ``minutes``."""

    now: datetime
    since: datetime
    minutes: int = 15
    review_below: float = 0.5


# --- SQL (pure) -------------------------------------------------------------------------------

def _bound(w: Window) -> str:
    return since_filter("object_created", w.since)


def newest_sql(s: Settings, w: Window) -> str:
    return (f"SELECT T.bucket, T.name, T.generation, T.status, T.reason, T.top1_label, T.top1_prob,"
            f" T.true_label, T.processed_at FROM `{s.table_id}` T WHERE {_bound(w)}"
            f" ORDER BY T.processed_at DESC LIMIT {NEWEST}")


def per_minute_sql(s: Settings, w: Window) -> str:
    """Rows and mean event → row latency per minute of processed_at, the last ``minutes``."""
    return (f"SELECT TIMESTAMP_TRUNC(T.processed_at, MINUTE) AS minute, COUNT(*) AS images,"
            f" AVG(TIMESTAMP_DIFF(T.processed_at, T.event_time, MILLISECOND)) / 1000 AS latency_s"
            f" FROM `{s.table_id}` T WHERE {_bound(w)}"
            f" AND T.processed_at >= {ts_literal(w.now - timedelta(minutes=w.minutes))}"
            f" GROUP BY minute ORDER BY minute")


def class_mix_sql(s: Settings, w: Window) -> str:
    return (f"SELECT T.top1_label AS label, COUNT(*) AS n FROM `{s.table_id}` T"
            f" WHERE {_bound(w)} AND T.status IN ({sql_list(CLASSIFIED)})"
            f" GROUP BY label ORDER BY n DESC, label LIMIT {CLASSES}")


def review_sql(s: Settings, w: Window) -> str:
    return (f"SELECT T.bucket, T.name, T.generation, T.top1_label, T.top1_prob, T.processed_at"
            f" FROM `{s.table_id}` T WHERE {_bound(w)} AND T.status IN ({sql_list(CLASSIFIED)})"
            f" AND (T.status = '{Status.LOW_CONFIDENCE.value}' OR T.top1_prob < {w.review_below!r})"
            f" ORDER BY T.top1_prob, T.processed_at DESC LIMIT {LISTS}")


def dead_letters_sql(s: Settings, w: Window) -> str:
    return (f"SELECT T.recorded_at, T.reason, T.message_id FROM `{s.dead_letter_table_id}` T"
            f" WHERE {since_filter('recorded_at', w.since)}"
            f" ORDER BY T.recorded_at DESC LIMIT {LISTS}")


QUERIES = {"newest": newest_sql, "per_minute": per_minute_sql, "class_mix": class_mix_sql,
           "review": review_sql, "dead_letters": dead_letters_sql}


def thumb_url(row: dict[str, Any]) -> str:
    from urllib.parse import urlencode

    return "/thumb?" + urlencode({"name": row["name"], "generation": row["generation"]})


def _json(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


# --- I/O --------------------------------------------------------------------------------------

def summary(settings: Settings, bq, w: Window) -> dict[str, Any]:
    """Every panel's rows, as JSON-ready dicts (one bounded query per panel)."""
    from pipeline.bigquery.sql import run_query

    out: dict[str, Any] = {"now": w.now.isoformat(), "bucket": settings.bucket,
                           "table": settings.table_id, "minutes": w.minutes,
                           "review_below": w.review_below}
    for panel, sql in QUERIES.items():
        rows = [{k: _json(v) for k, v in r.items()} for r in run_query(bq, sql(settings, w))[1]]
        out[panel] = rows
    for r in out["newest"] + out["review"]:
        r["thumb"] = thumb_url(r)
    return out


def thumbnail(settings: Settings, client, name: str, generation: int, px: int = THUMB_PX) -> bytes:
    """A small JPEG of one object generation of the configured bucket, within the stream's own
    byte and pixel budgets; ValueError when it cannot be one."""
    from pipeline.model import images
    from pipeline.notifications import ObjectKey
    from pipeline.stream.fetch import fetch_one

    got = fetch_one(client, ObjectKey(settings.bucket, name, generation), settings.max_bytes)
    if got.data is None:
        raise ValueError(got.reason)
    try:
        img = images.open_image(got.data, settings.max_bytes, settings.max_pixels)
        img.draft("RGB", (px * 2, px * 2))  # JPEG: decode at a fraction of the size
        img = images.to_rgb(img)
        img.thumbnail((px, px))
    except Exception as exc:  # noqa: BLE001 — any undecodable upload: no thumbnail
        raise ValueError(str(exc)) from None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def create_app(settings: Settings, since: timedelta = timedelta(days=1), minutes: int = 15,
               review_below: float = 0.5) -> Starlette:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from pipeline import clients

    bq = clients.bigquery_client(settings)
    gcs = clients.storage_client(settings)
    static = resources.files("pipeline.commands.dashboard") / "static"

    async def index(request: Request) -> Response:
        from starlette.responses import HTMLResponse

        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    async def api(request: Request) -> Response:
        now = datetime.now(UTC)
        w = Window(now, now - since, minutes, review_below)
        return JSONResponse(await run_in_threadpool(summary, settings, bq, w),
                            headers={"Cache-Control": "no-store"})

    async def thumb(request: Request) -> Response:
        from starlette.responses import PlainTextResponse
        from starlette.responses import Response as Raw

        name = request.query_params.get("name", "")
        try:
            generation = int(request.query_params.get("generation", ""))
        except ValueError:
            return PlainTextResponse("generation must be a number", status_code=400)
        if not name:
            return PlainTextResponse("name is required", status_code=400)
        try:
            data = await run_in_threadpool(thumbnail, settings, gcs, name, generation)
        except ValueError as exc:
            return PlainTextResponse(f"no thumbnail: {exc}", status_code=404)
        # a generation never changes: the browser may keep it
        return Raw(data, media_type="image/jpeg",
                   headers={"Cache-Control": "private, max-age=86400, immutable"})

    async def secure(request: Request, call_next):  # noqa: ANN001 — Starlette's middleware API
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    return Starlette(routes=[Route("/", index), Route("/api/summary", api),
                             Route("/thumb", thumb),
                             Mount("/static", StaticFiles(directory=str(static)), name="static")],
                     middleware=[Middleware(BaseHTTPMiddleware, dispatch=secure)])


def run_dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.times import parse_since

    settings = Settings.from_env()
    now = datetime.now(UTC)
    app = create_app(settings, since=now - parse_since(args.since, now), minutes=args.minutes,
                     review_below=args.review_below)
    print(f"dashboard of {settings.table_id} on http://{args.host}:{args.port} (Ctrl-C stops)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
