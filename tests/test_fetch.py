"""Fetch against fake-gcs-server, with a fault-injecting 127.0.0.1 proxy in front of it."""

from __future__ import annotations

import gzip
import random
from collections.abc import Callable, Iterator

import pytest
import requests
from google.api_core import exceptions as api_exceptions
from tenacity import stop_after_attempt, wait_none

from pipeline import clients, retry
from pipeline.config import Settings
from pipeline.notifications import ObjectKey
from pipeline.stream import fetch
from pipeline.stream.fetch import Fetched, fetch_all
from tests.helpers.faultproxy import Fault, FaultyProxy, every_other, start_proxy, stop_proxy
from tests.helpers.hostile_images import gzip_expanding


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "RETRY_WAIT", wait_none())
    monkeypatch.setattr(retry, "RETRY_STOP", stop_after_attempt(3))


@pytest.fixture
def proxy_factory(isolated: Settings) -> Iterator[Callable[..., tuple[FaultyProxy, Settings]]]:
    """Starts a fault-injecting proxy in front of fake-gcs-server; returns it and the test's
    settings pointed through it (the settings carry the endpoint: nothing global changes)."""
    started: list[FaultyProxy] = []

    def start(fault: Fault | None = None) -> tuple[FaultyProxy, Settings]:
        p = start_proxy(isolated.storage_emulator_host, fault)
        started.append(p)
        return p, isolated.replace(storage_emulator_host=p.url)

    yield start
    for p in started:
        stop_proxy(p)


def upload(settings: Settings, name: str, data: bytes) -> ObjectKey:
    blob = clients.storage_client(settings).bucket(settings.bucket).blob(name)
    blob.upload_from_string(data)
    return ObjectKey(settings.bucket, name, blob.generation)


# --- pure -------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc, transient", [
    (api_exceptions.ServiceUnavailable("x"), True),
    (api_exceptions.TooManyRequests("x"), True),
    (api_exceptions.InternalServerError("x"), True),
    (requests.ConnectionError("reset"), True),
    (requests.ReadTimeout("slow"), True),
    (ConnectionResetError(), True),
    (api_exceptions.NotFound("x"), False),
    (api_exceptions.Forbidden("x"), False),
    (api_exceptions.BadRequest("x"), False),
    (ValueError("bug"), False),
])
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert retry.is_transient(exc) is transient


def test_empty_batch_needs_no_client() -> None:
    assert fetch_all([], Settings(), client=object()) == []  # type: ignore[arg-type]


MiB = 1024 * 1024


@pytest.mark.parametrize(("sizes", "max_count", "budget", "groups"), [
    ([1, 1, 1, 1, 1], 2, 100, [2, 2, 1]),  # the count bound, as before
    ([30 * MiB] * 7, 64, 128 * MiB, [4, 3]),  # the byte bound
    ([None] * 9, 64, 128 * MiB, [4, 4, 1]),  # unknown: up to max_bytes (32 MiB) each
    ([0, -5, 10], 64, 64 * MiB, [2, 1]),  # non-positive sizes cost max_bytes too
    ([500 * MiB] * 5 + [None], 64, 128 * MiB, [6]),  # over max_bytes: refused unread, free
    ([30 * MiB] * 4 + [10 * MiB], 64, 128 * MiB, [4, 1]),
    ([30 * MiB], 64, 1, [1]),  # one object over the whole budget still goes, alone
])
def test_budget_chunks_bound_count_and_bytes(sizes, max_count, budget, groups) -> None:
    items = list(enumerate(sizes))
    chunks = list(fetch.budget_chunks(items, max_count, 32 * MiB, budget))
    assert [len(c) for c in chunks] == groups
    assert [pair for c in chunks for pair in c] == items  # order kept, nothing lost
    for c in chunks:
        held = sum(fetch.download_cost(size, 32 * MiB) for _, size in c)
        assert len(c) == 1 or held <= budget


def test_stream_chunks_hold_at_most_the_byte_budget() -> None:
    import pandas as pd

    from pipeline.stream import executor

    frame = pd.DataFrame({"bucket": ["b"] * 10, "name": [f"n{i}" for i in range(10)],
                          "generation": range(1, 11), "size": [30 * MiB] * 9 + [None]})
    chunks = list(executor._work_chunks([frame], 32 * MiB))
    assert [len(keys) for keys, _ in chunks] == [4, 4, 2]  # 64 objects a chunk by count alone
    assert len(chunks[-1][1]) == 1  # the unknown size is looked up by fetch, not invented


class EndlessBlob:
    """Serves an object that never ends, in 1 MiB writes; counts what it handed over."""

    def __init__(self, size: int | None = None) -> None:
        self.size, self.sent, self.reloads = size, 0, 0

    def reload(self, **kwargs) -> None:
        self.reloads += 1

    def download_to_file(self, target, **kwargs) -> None:
        while self.sent < 64 * MiB:
            target.write(b"\0" * MiB)
            self.sent += MiB

    def download_as_bytes(self, **kwargs) -> bytes:  # what the library does underneath
        import io

        buf = io.BytesIO()
        self.download_to_file(buf)
        return buf.getvalue()


class OneBlobClient:
    def __init__(self, blob: EndlessBlob) -> None:
        self.blob_ = blob

    def bucket(self, name: str) -> OneBlobClient:
        return self

    def blob(self, name: str, generation: int | None = None) -> EndlessBlob:
        return self.blob_


@pytest.mark.parametrize("claimed", [5, None, 0, -1])
def test_download_stops_at_max_bytes_whatever_the_size_said(claimed) -> None:
    blob = EndlessBlob()
    key = ObjectKey("b", "x.jpg", 1)
    got = fetch.fetch_one(OneBlobClient(blob), key, max_bytes=2 * MiB,  # type: ignore[arg-type]
                          size=claimed)
    assert got.status == "too_large" and got.data is None
    assert blob.sent <= 3 * MiB  # stopped at the cap, not at the end of the object
    assert blob.reloads == (0 if claimed == 5 else 1)  # unknown / non-positive: looked up


def test_download_stops_at_the_size_it_was_budgeted() -> None:
    blob = EndlessBlob()  # a notification said 5 bytes, as a gzip object's stored size does
    got = fetch.fetch_one(OneBlobClient(blob), ObjectKey("b", "x", 1),  # type: ignore[arg-type]
                          max_bytes=2 * MiB, size=5)
    assert got.status == "too_large" and "past the 5 bytes its notification declared" in got.reason
    assert blob.sent == 0  # its first 1 MiB write already ran past the 5 budgeted bytes


def test_non_positive_size_is_looked_up_not_trusted() -> None:
    blob = EndlessBlob(size=10 * MiB)
    [got] = [fetch.fetch_one(OneBlobClient(blob), ObjectKey("b", "x", 1),  # type: ignore[arg-type]
                             max_bytes=MiB, size=0)]
    assert got.status == "too_large" and "10485760 bytes" in got.reason
    assert blob.sent == 0  # the metadata said too large: nothing downloaded


def test_deadline_bounds_a_block_even_when_a_handler_swallows_it() -> None:
    import time

    started = time.monotonic()
    with pytest.raises(fetch.CommandTimeout, match="plan did not finish within 0.3 s"):
        with fetch.deadline(0.3, "plan"):
            try:
                time.sleep(10)
            except Exception:  # noqa: BLE001 — a retry loop that catches everything
                time.sleep(10)
    assert time.monotonic() - started < 3
    with fetch.deadline(5, "quick"):
        pass
    time.sleep(0.2)  # disarmed: nothing fires after the block


# --- integration ------------------------------------------------------------------------------

@pytest.mark.integration
def test_pinned_read_never_returns_the_newer_generation(isolated: Settings) -> None:
    old = upload(isolated, "flowers/rose/a.jpg", b"old bytes")
    new = upload(isolated, "flowers/rose/a.jpg", b"new bytes")
    assert new.generation != old.generation
    got_old, got_new = fetch_all([old, new], isolated)
    assert got_new == Fetched(new, b"new bytes", "ok", "")
    # fake-gcs-server's filesystem backend keeps only the live generation (no versioning), so
    # the overwritten one is gone; a versioned bucket would still serve the old bytes.
    assert (got_old.status, got_old.data) in {("gone", None), ("ok", b"old bytes")}
    assert got_old.status == "gone" and "no longer exists" in got_old.reason


@pytest.mark.integration
def test_deleted_object_is_gone_without_retries(isolated: Settings, proxy_factory,
                                                fast_retries) -> None:
    key = upload(isolated, "x/deleted.jpg", b"soon gone")
    clients.storage_client(isolated).bucket(isolated.bucket).blob(key.name).delete()
    proxy, via = proxy_factory()
    [got] = fetch_all([key], via)
    assert got.status == "gone" and got.data is None
    assert len(proxy.hits("deleted.jpg")) == 1, proxy.seen  # a 404 is final: one request


@pytest.mark.integration
def test_forbidden_is_not_retried(isolated: Settings, proxy_factory, fast_retries) -> None:
    key = upload(isolated, "x/secret.jpg", b"private")
    proxy, via = proxy_factory(lambda method, path: 403 if "secret" in path else None)
    [got] = fetch_all([key], via)
    assert got.status == "forbidden" and got.data is None
    assert len(proxy.hits("secret.jpg")) == 1


@pytest.mark.integration
def test_transient_503s_are_retried_until_ok(isolated: Settings, proxy_factory,
                                             fast_retries) -> None:
    keys = [upload(isolated, f"x/{i}.jpg", f"payload {i}".encode()) for i in range(6)]
    proxy, via = proxy_factory(every_other(max_failures=50))
    got = fetch_all(keys, via.replace(fetch_threads=3))
    assert [(f.status, f.data) for f in got] == [("ok", f"payload {i}".encode())
                                                 for i in range(6)]
    # The client also reads the bucket's metadata once in the background; count object requests.
    failures = [s for s in proxy.hits("/o/x%2F") if s[2] == 503]
    assert len(failures) == 12  # metadata + download of each object failed once, then passed


@pytest.mark.integration
def test_retries_exhausted_is_fetch_error(isolated: Settings, proxy_factory,
                                          fast_retries) -> None:
    key = upload(isolated, "x/flaky.jpg", b"never served")
    proxy, via = proxy_factory(lambda method, path: 503 if "flaky" in path else None)
    [got] = fetch_all([key], via)
    assert got.status == "fetch_error" and "ServiceUnavailable" in got.reason
    assert len(proxy.hits("flaky.jpg")) == 3  # RETRY_STOP = 3 attempts


@pytest.mark.integration
def test_unreachable_storage_is_fetch_error(isolated: Settings, fast_retries) -> None:
    key = upload(isolated, "x/a.jpg", b"data")
    refused = isolated.replace(storage_emulator_host="http://127.0.0.1:9")  # discard port
    [got] = fetch_all([key], refused)
    assert got.status == "fetch_error" and "ConnectionError" in got.reason


@pytest.mark.integration
def test_many_keys_in_parallel_keep_their_order(isolated: Settings) -> None:
    rng = random.Random(7)
    payloads = {f"many/{i:03d}.jpg": rng.randbytes(rng.randrange(1, 20_000)) for i in range(40)}
    keys = [upload(isolated, name, data) for name, data in payloads.items()]
    rng.shuffle(keys)
    got = fetch_all(keys, isolated.replace(fetch_threads=8))
    assert [f.key for f in got] == keys
    assert [f.data for f in got] == [payloads[k.name] for k in keys]


@pytest.mark.integration
def test_over_max_bytes_is_too_large_without_download(isolated: Settings,
                                                      proxy_factory) -> None:
    big = upload(isolated, "x/big.jpg", b"x" * 2000)
    small = upload(isolated, "x/small.jpg", b"y" * 10)
    proxy, via = proxy_factory()
    settings = via.replace(max_bytes=1000)
    got = fetch_all([big, small], settings)
    assert [f.status for f in got] == ["too_large", "ok"]
    assert got[0].data is None and "2000 bytes" in got[0].reason
    assert not [h for h in proxy.hits("big.jpg") if "/download/" in h[1]]
    assert [h for h in proxy.hits("small.jpg") if "/download/" in h[1]]
    # a size known from the notification saves even the object's metadata request (counted for
    # the object: once, under load in CI, a bucket-level GET of unknown origin landed in between)
    before = proxy.hits("big.jpg")
    [again] = fetch_all([big], settings, sizes={big: 2000})
    assert again.status == "too_large" and proxy.hits("big.jpg") == before, proxy.seen


@pytest.mark.integration
def test_zero_or_negative_size_from_a_notification_never_skips_the_guard(
        isolated: Settings, proxy_factory) -> None:
    big = upload(isolated, "x/big0.jpg", b"x" * 2000)
    liar = upload(isolated, "x/liar.jpg", b"y" * 3000)
    proxy, via = proxy_factory()
    settings = via.replace(max_bytes=1000)
    got = fetch_all([big, liar], settings, sizes={big: 0, liar: 5})
    assert [f.status for f in got] == ["too_large", "too_large"]
    assert "2000 bytes" in got[0].reason and "past the 5 bytes" in got[1].reason
    assert not [h for h in proxy.hits("big0.jpg") if "/download/" in h[1]]  # looked up instead
    [small] = fetch_all([upload(isolated, "x/ok.jpg", b"z" * 10)], settings, sizes={})
    assert (small.status, small.data) == ("ok", b"z" * 10)  # the capped download, intact


@pytest.mark.integration
def test_gzip_encoded_object_never_holds_more_than_its_budget(isolated: Settings,
                                                              monkeypatch) -> None:
    """fake-gcs-server, like GCS, serves a ``Content-Encoding: gzip`` object decompressed to a
    client that does not ask for raw bytes: its notification's size (the stored size) is what
    the chunk budget charged, so the download must stop there."""
    stored = gzip_expanding(4 * MiB)  # about 4 KB stored, 4 MiB served
    blob = clients.storage_client(isolated).bucket(isolated.bucket).blob("gz/bomb.jpg")
    blob.content_encoding = "gzip"
    blob.upload_from_string(stored, content_type="image/jpeg")
    key = ObjectKey(isolated.bucket, "gz/bomb.jpg", blob.generation)
    held: list[int] = []

    class Recording(fetch._CappedBuffer):
        def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
            written = super().write(data)
            held.append(self.tell())
            return written

    monkeypatch.setattr(fetch, "_CappedBuffer", Recording)
    [got] = fetch_all([key], isolated, sizes={key: len(stored)})
    assert got.status == "too_large" and got.data is None
    assert f"past the {len(stored)} bytes" in got.reason and "gzip" in got.reason
    assert max(held, default=0) <= len(stored)  # never more than the budget in memory
    # unknown size: charged max_bytes by budget_chunks, so the decompressed bytes may come
    held.clear()
    [whole] = fetch_all([key], isolated, sizes={})
    assert whole.status == "ok" and whole.data == gzip.decompress(stored)
    assert max(held) <= isolated.max_bytes
