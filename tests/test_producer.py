"""The producer: pure pacing/scheduling logic, datasets, and replay into a real fake-gcs-server.

Fault injection (503s, 403s) goes through a tiny HTTP proxy on 127.0.0.1 in front of
fake-gcs-server; the download path is served by a local http.server. Nothing leaves loopback.
"""

from __future__ import annotations

import http.client
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from pipeline import clients
from pipeline.config import Settings
from pipeline.model.classfolders import DatasetError, Item, discover
from pipeline.retry import is_transient
from producer import cli, datasets
from producer.replay import (
    Result,
    TokenBucket,
    expected_uploads,
    manifest_names,
    object_name,
    replay,
    schedule,
)
from tests.helpers.faultproxy import Fault, start_proxy, stop_proxy

REPO = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------------


def _image_bytes(fmt: str = "JPEG", color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """3 classes x 3 images (one PNG), plus files discovery must ignore."""
    root = tmp_path / "data"
    for c, cls in enumerate(("cat", "dog", "fish")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            fmt, ext = ("PNG", "png") if (cls, i) == ("fish", 2) else ("JPEG", "jpg")
            (root / cls / f"{cls}{i}.{ext}").write_bytes(_image_bytes(fmt, (40 * c, 10 * i, 99)))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.jpg").write_bytes(_image_bytes())
    (root / ".git").mkdir()
    (root / ".git" / "x.jpg").write_bytes(_image_bytes())
    (root / "LICENSE.txt").write_text("CC-BY")
    return root


def _blobs(settings: Settings) -> dict[str, object]:
    client = clients.storage_client(settings)
    return {b.name: b for b in client.list_blobs(settings.bucket)}


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables; loopback tests must not go through one."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(datasets.CACHE_ENV, str(path))
    return path


def _serve(handler: type[http.server.BaseHTTPRequestHandler] | partial) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- pure logic ------------------------------------------------------------------------------


def test_token_bucket_long_run_rate_is_exact_with_a_fake_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(20.0, capacity=5, clock=clock)
    start = clock.now
    for _ in range(1000):  # an always-ready consumer: sleeps exactly what it is told
        clock.now += bucket.reserve()
    assert clock.now - start == pytest.approx(999 / 20.0)


def test_token_bucket_bursts_are_bounded_by_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, capacity=3, initial=0, clock=clock)
    assert bucket.reserve() == pytest.approx(0.1)  # starts empty: no initial burst
    clock.now += 60.0  # a long stall earns at most `capacity` tokens
    immediate = 0
    while bucket.reserve() == 0.0:
        immediate += 1
    assert immediate == 3
    # reservations queue up: the n-th future token is n/rate away
    assert bucket.reserve() == pytest.approx(0.2)
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_schedule_is_seeded_cycles_get_new_names_and_limit_skips_done() -> None:
    items = [Item(c, Path(f"/d/{c}/{i}.jpg")) for c in "ab" for i in range(4)]
    names = lambda plan: [p.name for p in plan]  # noqa: E731
    first = names(schedule(items, prefix="p/", seed=7))
    assert first == names(schedule(list(reversed(items)), prefix="p", seed=7))  # input order
    assert first != names(schedule(items, prefix="p", seed=8))
    assert sorted(first) == sorted(f"p/{c}/{i}.jpg" for c in "ab" for i in range(4))

    looped = names(schedule(items, seed=7, loop=True, limit=20))
    assert len(set(looped)) == 20 and looped[:8] == names(schedule(items, seed=7))
    assert all(n.endswith("-1.jpg") for n in looped[8:16])
    assert all(n.endswith("-2.jpg") for n in looped[16:])
    assert [n.replace("-1", "") for n in looped[8:16]] != looped[:8]  # each cycle reshuffled

    done = {"a/0.jpg", "b/1.jpg"}
    assert expected_uploads(items, done=done) == 6
    assert expected_uploads(items, prefix="p", done={"p/a/0.jpg"}, limit=9) == 7
    assert expected_uploads(items, loop=True, limit=50, duration=2, rate=10) == 20
    assert expected_uploads(items, loop=True) is None
    plan = list(schedule(items, seed=7, done=done))
    assert [p.name for p in plan] == names(schedule(items, seed=7))
    assert {p.name for p in plan if p.done} == done
    limited = list(schedule(items, seed=7, limit=5, done=done))
    assert sum(not p.done for p in limited) == 5  # done names do not count to the limit
    assert len(limited) == 5 + sum(p.done for p in plan[:len(limited)])


def test_object_names_and_transient_errors() -> None:
    item = Item("roses", Path("/x/roses/sub/a.b.jpg"), "sub/a.b.jpg")
    assert object_name("", item) == "roses/sub/a.b.jpg"
    assert object_name("flowers/", item, cycle=2) == "flowers/roses/sub/a.b-2.jpg"
    from google.api_core import exceptions as e

    assert is_transient(e.ServiceUnavailable("x")) and is_transient(e.TooManyRequests("x"))
    assert is_transient(e.InternalServerError("x")) and is_transient(ConnectionResetError())
    assert not is_transient(e.Forbidden("x")) and not is_transient(e.NotFound("x"))
    assert not is_transient(e.PreconditionFailed("x")) and not is_transient(ValueError())


def test_manifest_reader_ignores_a_torn_last_line() -> None:
    lines = ['{"name": "a/1.jpg", "generation": 3}\n', '{"name": "b/2.jpg"}\n', '{"name": "c/']
    assert manifest_names(lines) == {"a/1.jpg", "b/2.jpg"}


def test_discover_keeps_class_folders_and_ignores_non_images(dataset: Path) -> None:
    items = discover(dataset)
    assert [(i.class_name, i.relative) for i in items] == [
        (c, f"{c}{i}.{'png' if (c, i) == ('fish', 2) else 'jpg'}")
        for c in ("cat", "dog", "fish") for i in range(3)]
    with pytest.raises(DatasetError):
        discover(dataset / "missing")


def test_sample_dataset_is_real_photos_and_idempotent(tmp_path: Path) -> None:
    root = datasets.sample_dataset(tmp_path / "sample")
    items = discover(root)
    classes = {i.class_name for i in items}
    assert {"cat", "coffee", "daisy", "person", "astronaut"} <= classes
    stamps = {i.path: i.path.stat().st_mtime_ns for i in items}
    for i in items:
        with Image.open(i.path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) >= 128
    assert datasets.sample_dataset(tmp_path / "sample") == root
    assert {i.path: i.path.stat().st_mtime_ns for i in discover(root)} == stamps


# --- the flowers download (local http.server) ------------------------------------------------


def _flowers_tgz(path: Path, classes: tuple[str, ...] = datasets.FLOWERS_CLASSES) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("flower_photos/LICENSE.txt", b"CC-BY")] + [
                (f"flower_photos/{c}/{c}_{i}.jpg", _image_bytes()) for c in classes
                for i in range(2)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def file_server(tmp_path: Path, no_proxy_env: None) -> Iterator[tuple[str, list[str]]]:
    """Serves tmp_path/www over HTTP on 127.0.0.1; yields (base URL, request paths)."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    for host in _serve(partial(Handler, directory=str(www))):
        yield f"http://{host}", requests


def test_download_flowers_from_a_local_server_then_reuses_the_cache(
        file_server, cache: Path, monkeypatch, capsys) -> None:
    base, requests = file_server
    _flowers_tgz(cache.parent / "www" / "flower_photos.tgz")
    monkeypatch.setenv(datasets.FLOWERS_URL_ENV, f"{base}/flower_photos.tgz")
    assert cli.main(["--download", "flowers", "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:-1]) == sorted(f"{c}/{c}_{i}.jpg" for c in datasets.FLOWERS_CLASSES
                                      for i in range(2))
    assert _last_json(out[-1])["planned"] == 10
    root = datasets.download_flowers()
    assert root == cache / "flower_photos" and len(discover(root)) == 10
    assert requests == ["/flower_photos.tgz"]  # the second call used the cache
    assert [p.name for p in cache.iterdir()] == ["flower_photos"]  # no temporary leftovers


def test_download_rejects_an_archive_without_the_flower_classes(file_server, cache: Path) -> None:
    base, _ = file_server
    www = cache.parent / "www"
    _flowers_tgz(www / "partial.tgz", classes=("daisy", "roses"))
    (www / "junk.tgz").write_bytes(b"<html>captive portal</html>")
    with pytest.raises(DatasetError, match="dandelion, sunflowers, tulips"):
        datasets.download_flowers(url=f"{base}/partial.tgz")
    with pytest.raises(DatasetError, match="not a valid .tgz"):
        datasets.download_flowers(url=f"{base}/junk.tgz")
    assert not (cache / "flower_photos").exists()


def test_offline_download_is_one_sentence_naming_the_alternatives(
        cache: Path, monkeypatch, capsys, no_proxy_env) -> None:
    with socket.socket() as s:  # a port nothing listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(datasets.FLOWERS_URL_ENV, f"http://127.0.0.1:{port}/flower_photos.tgz")
    assert cli.main(["--download", "flowers", "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and err.endswith(".")
    assert "--dataset" in err and "--sample" in err and err.count(". ") == 0


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read in pieces: a member as large as we like, held nowhere."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def, override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _bomb_tgz(path: Path, member_size: int = 300 * 1024 * 1024, files: int = 0) -> Path:
    """A valid flowers archive plus one huge all-zero photo (or ``files`` tiny ones)."""
    _flowers_tgz(path)
    with tarfile.open(path, "r:gz") as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w:gz") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
        if member_size:
            info = tarfile.TarInfo("flower_photos/daisy/bomb.jpg")
            info.size = member_size
            tar.addfile(info, _Zeros(member_size))
        for i in range(files):
            tar.addfile(tarfile.TarInfo(f"flower_photos/roses/{i}.jpg"), io.BytesIO(b""))
    return path


@pytest.mark.parametrize(("case", "member_size", "files", "says"), [
    ("306 KB that expands to 300 MB", 300 * 1024 * 1024, 0, "expands to more than"),
    ("more files than any dataset", 0, datasets.MAX_MEMBERS + 1, "more than 20000 files"),
])
def test_archive_bombs_are_refused_before_anything_is_written(
        file_server, cache: Path, case, member_size, files, says) -> None:
    base, _ = file_server
    archive = _bomb_tgz(cache.parent / "www" / "bomb.tgz", member_size, files)
    assert archive.stat().st_size < 1024 * 1024
    with pytest.raises(DatasetError, match=says):
        datasets.download_flowers(url=f"{base}/bomb.tgz")
    assert not (cache / "flower_photos").exists()
    written = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert written == 0  # the temporary directory and its partial extraction are gone too


def test_extraction_limit_scales_with_the_archive_up_to_a_ceiling() -> None:
    assert datasets.extraction_limit(229_000_000) == datasets.MAX_EXPANSION * 229_000_000
    assert datasets.extraction_limit(10**12) == datasets.MAX_EXTRACTED_BYTES
    assert datasets.extraction_limit(306_000) == datasets.MIN_EXTRACTED_BYTES < 300 * 2**20


def test_download_stops_at_its_size_cap(file_server, cache: Path, monkeypatch) -> None:
    base, _ = file_server
    archive = _flowers_tgz(cache.parent / "www" / "flower_photos.tgz")
    monkeypatch.setattr(datasets, "MAX_DOWNLOAD_BYTES", archive.stat().st_size - 1)
    with pytest.raises(DatasetError, match="over the .*-byte limit"):
        datasets.download_flowers(url=f"{base}/flower_photos.tgz")
    assert not (cache / "flower_photos").exists()


def test_discover_skips_names_that_would_forge_log_lines(dataset: Path) -> None:
    for evil in ("forged\nINFO uploaded everything.jpg", "bell\a.jpg", "rtl\u202egpj.exe.jpg"):
        (dataset / "cat" / evil).write_bytes(_image_bytes())
    (dataset / "cat" / "ünïcödé ok.jpg").write_bytes(_image_bytes())
    names = [i.relative for i in discover(dataset) if i.class_name == "cat"]
    assert names == ["cat0.jpg", "cat1.jpg", "cat2.jpg", "ünïcödé ok.jpg"]


# --- replay into fake-gcs-server -------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(60)
def test_steady_rate_within_2_percent_with_bounded_bursts(isolated: Settings, dataset) -> None:
    started: list[float] = []
    summary = replay(discover(dataset), isolated, rate=20, concurrency=4, loop=True, limit=200,
                     on_result=lambda r: started.append(r.started))
    assert (summary.uploaded, summary.failed) == (200, 0)
    blobs = _blobs(isolated)
    assert len(blobs) == 200  # every cycle wrote new objects
    stamps = sorted(b.time_created.timestamp() for b in blobs.values())
    for times in (stamps, sorted(started)):  # server-side creation times and our start times
        steady = times[10:-10]  # drop the edges (warm-up, last in-flight uploads)
        rate = (len(steady) - 1) / (steady[-1] - steady[0])
        assert abs(rate - 20) / 20 < 0.02, rate
        # bursts: no 1-second window holds more than rate + burst (5) + 1
        assert max(sum(1 for t in times if t0 <= t < t0 + 1) for t0 in times) <= 26
    assert abs(summary.rate - 20) / 20 < 0.02


@pytest.mark.integration
def test_class_folders_in_names_metadata_and_content_types(isolated: Settings, dataset) -> None:
    settings = isolated.replace(prefix="replay/")
    summary = replay(discover(dataset), settings, rate=500, progress=True)
    blobs = _blobs(settings)
    assert summary.uploaded == len(blobs) == 9 and summary.failed == 0
    for name, blob in blobs.items():
        prefix, cls, file = name.split("/")
        assert prefix == "replay" and file.startswith(cls)
        assert blob.metadata == {"true_label": cls}
        assert blob.content_type == ("image/png" if file.endswith(".png") else "image/jpeg")
        assert (dataset / cls / file).read_bytes() == blob.download_as_bytes()
    assert sorted(summary.objects) == sorted((n, b.generation) for n, b in blobs.items())


@pytest.mark.integration
def test_upload_order_is_reproducible_by_seed(isolated: Settings, dataset) -> None:
    items = discover(dataset)

    def order(prefix: str, seed: int) -> list[str]:
        s = replay(items, isolated.replace(prefix=prefix), rate=500, concurrency=1, seed=seed)
        return [name.split("/", 1)[1] for name, _ in s.objects]

    assert order("a", 1) == order("b", 1)
    assert order("c", 2) != order("a", 1)
    assert order("c", 2) != sorted(order("c", 2))


@pytest.mark.integration
def test_duration_bounds_an_endless_loop(isolated: Settings, dataset) -> None:
    summary = replay(discover(dataset), isolated, rate=20, loop=True, duration=0.5)
    assert 9 <= summary.uploaded <= 12 and summary.seconds < 1.5 and not summary.interrupted
    assert len(_blobs(isolated)) == summary.uploaded


def first_uploads(status: int, count: int) -> tuple[Fault, Counter]:
    """Answer the first ``count`` uploads with ``status``; the counter sees every upload."""
    uploads: Counter = Counter()
    lock = threading.Lock()

    def fault(method: str, path: str) -> int | None:
        if method != "POST" or not path.startswith("/upload/"):
            return None
        with lock:
            uploads["n"] += 1
            return status if uploads["n"] <= count else None

    return fault, uploads


@pytest.fixture
def fault_proxy(request, isolated: Settings) -> Iterator[tuple[Counter, Settings]]:
    """The upload counter, and the test's settings pointed through the fault proxy."""
    status, count = request.param
    fault, uploads = first_uploads(status, count)
    proxy = start_proxy(isolated.storage_emulator_host, fault)
    try:
        yield uploads, isolated.replace(storage_emulator_host=proxy.url)
    finally:
        stop_proxy(proxy)


@pytest.mark.parametrize("fault_proxy", [(503, 3)], indirect=True)
def test_transient_503_is_retried(isolated: Settings, dataset, fault_proxy) -> None:
    uploads, via = fault_proxy
    results: list[Result] = []
    summary = replay(discover(dataset)[:4], via, rate=100, concurrency=1, backoff=0.05,
                     on_result=results.append)
    assert (summary.uploaded, summary.failed, summary.skipped) == (4, 0, 0)
    assert [r.attempts for r in results] == [4, 1, 1, 1]
    assert uploads["n"] == 4 + 3
    assert len(_blobs(isolated)) == 4


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault_proxy", [(403, 1)], indirect=True)
def test_permanent_error_is_counted_not_retried_not_fatal(dataset, fault_proxy) -> None:
    uploads, via = fault_proxy
    results: list[Result] = []
    summary = replay(discover(dataset)[:4], via, rate=100, concurrency=1, backoff=0.05,
                     on_result=results.append)
    assert (summary.uploaded, summary.failed) == (3, 1)
    assert results[0].attempts == 1 and "Forbidden" in summary.errors[0][1]
    assert uploads["n"] == 4


def _produce(settings: Settings, dataset: Path, *flags: str) -> list[str]:
    return ["--dataset", str(dataset), "--bucket", settings.bucket, "--rate", "500",
            "--quiet", *flags]


@pytest.mark.integration
def test_manifest_resume_skips_what_was_uploaded(isolated: Settings, dataset, tmp_path,
                                                 capsys) -> None:
    manifest = tmp_path / "manifest.jsonl"
    args = _produce(isolated, dataset, "--manifest", str(manifest), "--seed", "5")
    assert cli.main([*args, "--limit", "4"]) == 0
    first = _last_json(capsys.readouterr().out)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    blobs = _blobs(isolated)
    assert first["uploaded"] == len(records) == len(blobs) == 4
    for r in records:
        assert blobs[r["name"]].generation == r["generation"]
        assert r["class"] == r["name"].split("/")[0] and Path(r["source"]).is_file()

    assert cli.main(args) == 0
    second = _last_json(capsys.readouterr().out)
    assert (second["uploaded"], second["skipped"]) == (5, 4)
    assert {n: b.generation for n, b in _blobs(isolated).items() if n in blobs} == \
        {n: b.generation for n, b in blobs.items()}  # the first four were not rewritten
    assert cli.main(args) == 0
    assert _last_json(capsys.readouterr().out)["uploaded"] == 0
    assert len(manifest.read_text().splitlines()) == 9


@pytest.mark.integration
def test_dry_run_lists_names_and_uploads_nothing(isolated: Settings, dataset, capsys) -> None:
    assert cli.main([*_produce(isolated, dataset, "--dry-run", "--prefix", "x"),
                     "--loop", "--limit", "12"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 13 and all(n.startswith("x/") for n in out[:-1])
    assert sum("-1." in n for n in out[:-1]) == 3  # the second cycle's names differ
    assert _last_json(out[-1])["uploaded"] == 0
    assert _blobs(isolated) == {}


@pytest.mark.integration
def test_if_not_exists_skips_existing_objects_and_default_overwrites(
        isolated: Settings, dataset, capsys) -> None:
    bucket = clients.storage_client(isolated).bucket(isolated.bucket)
    bucket.blob("cat/cat0.jpg").upload_from_string(b"old")
    assert cli.main(_produce(isolated, dataset, "--if-not-exists")) == 0
    result = _last_json(capsys.readouterr().out)
    assert (result["uploaded"], result["skipped"], result["failed"]) == (8, 1, 0)
    assert bucket.blob("cat/cat0.jpg").download_as_bytes() == b"old"
    assert cli.main(_produce(isolated, dataset, "--limit", "9")) == 0
    assert _last_json(capsys.readouterr().out)["uploaded"] == 9
    assert bucket.blob("cat/cat0.jpg").download_as_bytes() != b"old"


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.process
def test_python_m_producer_stops_cleanly_on_ctrl_c_with_json_last_line(
        isolated: Settings, dataset) -> None:
    env = {**os.environ, **isolated.as_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer", "--dataset", str(dataset), "--rate", "20", "--loop",
         "--prefix", "sub"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(_blobs(isolated)) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    result = _last_json(out)
    assert set(result) >= {"uploaded", "failed", "seconds", "rate"}
    assert isinstance(result["seconds"], float) and result["rate"] > 0 and result["failed"] == 0
    blobs = _blobs(isolated)
    assert result["uploaded"] == len(blobs) >= 5  # every upload finished and was counted
    assert all(n.startswith("sub/") for n in blobs)
