"""``bucketlens dashboard``: bounded queries, escaped text, thumbnails through the app, and a page
that a real headless Chromium sees filling up without a reload."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from datetime import UTC, datetime
from importlib import resources

import pytest

from pipeline.commands import dashboard
from pipeline.config import Settings

# the isolated dataset gets the analytics views (conftest)
pytestmark = pytest.mark.views

W = dashboard.Window(datetime(2024, 5, 6, 12, 0, tzinfo=UTC), datetime(2024, 5, 5, 12, 0, tzinfo=UTC))


def test_every_panel_reads_only_the_window_partitions_and_a_bounded_number_of_rows() -> None:
    s = Settings()
    for panel, sql in dashboard.QUERIES.items():
        text = sql(s, W)
        column = "recorded_at" if panel == "dead_letters" else "object_created"
        assert f"T.{column} >= TIMESTAMP '2024-05-05 12:00:00.000000+00'" in text, panel
        assert " LIMIT " in text or "GROUP BY minute" in text, panel
    assert "T.processed_at >= TIMESTAMP '2024-05-06 11:45:00.000000+00'" in dashboard.per_minute_sql(s, W)


def test_thumbnails_are_app_urls_with_the_name_encoded() -> None:
    url = dashboard.thumb_url({"name": 'a/<b>"x" & y?.jpg', "generation": 7})
    assert url == "/thumb?name=a%2F%3Cb%3E%22x%22+%26+y%3F.jpg&generation=7"


def test_the_page_never_parses_row_text_as_html() -> None:
    static = resources.files("pipeline.commands.dashboard") / "static"
    js = (static / "app.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js
    html = (static / "index.html").read_text()
    assert "http" not in html  # no CDN: every script and style is served by the app
    assert (static / "chart.umd.min.js").read_text().startswith("/*!\n * Chart.js v4")


def test_the_app_serves_only_the_configured_buckets_objects(monkeypatch) -> None:
    from starlette.testclient import TestClient

    asked = []

    def fake_thumbnail(settings, client, name, generation, px=dashboard.THUMB_PX):
        asked.append((settings.bucket, name, generation))
        return b"\xff\xd8jpeg"

    monkeypatch.setattr(dashboard, "thumbnail", fake_thumbnail)
    app = dashboard.create_app(Settings(bq_endpoint="http://127.0.0.1:9",
                                        storage_emulator_host="http://127.0.0.1:9"))
    with TestClient(app) as client:
        r = client.get("/thumb", params={"name": "../other-bucket/x.jpg", "generation": "3",
                                         "bucket": "other-bucket"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert client.get("/thumb", params={"name": "x.jpg", "generation": "x"}).status_code == 400
        page = client.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text
    assert asked == [("bucketlens-images", "../other-bucket/x.jpg", 3)]  # the bucket is ours


# --- in a real browser on the local stack ------------------------------------------------------

def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (`make chromium`)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(isolated):
    """The dashboard of the isolated resources, served by uvicorn on a free port."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(dashboard.create_app(isolated), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _cards(browser) -> dict[str, dict]:
    """name → label and whether its thumbnail decoded, as the rendered page shows them."""
    return {c["name"]: c for c in browser.execute_script("""
        return [...document.querySelectorAll('#newest .card')].map(c => ({
            name: c.dataset.name, label: c.querySelector('.label').textContent,
            shown: c.querySelector('.name').textContent,
            thumb: c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0,
            tags: c.querySelectorAll('b, script').length}));""")}


@pytest.mark.integration
@pytest.mark.spark
def test_uploads_appear_with_names_labels_and_thumbnails_and_a_new_one_without_reload(
        spark, isolated, served) -> None:
    from pipeline import clients
    from pipeline.model.classfolders import discover
    from pipeline.stream import job as stream
    from producer.datasets import sample_dataset
    from tests.helpers.stream import rows_of, upload_samples, wait_rows
    from tests.helpers.wait import wait_until

    settings = isolated.replace(trigger_seconds=1.0)
    browser = _browser()
    query, _ = stream.start(settings, spark=spark)
    try:
        upload_samples(settings, 10)
        rows = wait_rows(settings, 10, query)
        labels = {r["name"]: r["top1_label"] for r in rows}
        browser.get(served)

        def all_shown() -> dict | None:
            cards = _cards(browser)
            return cards if set(labels) <= set(cards) and all(
                cards[n]["thumb"] for n in labels) else None

        cards = wait_until(all_shown, 60, "10 cards with thumbnails")
        assert {n: cards[n]["label"] for n in labels} == labels
        assert all(cards[n]["shown"] == n for n in labels)
        browser.execute_script("window.notReloaded = true;")

        hostile = 'extra/<b>bold</b> & "quoted" <script>alert(1)</script>.jpg'
        photo = discover(sample_dataset())[0].path.read_bytes()
        clients.storage_client(settings).bucket(settings.bucket).blob(hostile).upload_from_string(
            photo, content_type="image/jpeg")
        wait_rows(settings, 11, query)
        (label,) = [r["top1_label"] for r in rows_of(settings) if r["name"] == hostile]
        card = wait_until(lambda: _cards(browser).get(hostile), 60, "the 11th upload's card")
        assert browser.execute_script("return window.notReloaded === true;")
        assert card["label"] == label and card["shown"] == hostile and card["tags"] == 0
        wait_until(lambda: _cards(browser)[hostile]["thumb"], 30, "its thumbnail")
    finally:
        query.stop()
        browser.quit()
