"""Smoke test of the benchmark harness: every stage runs at tiny sizes and reports its figures.

No timing thresholds: the figures depend on the machine and on what else runs on it
(bench/README.md has the real ones). This only proves that `bench/run.py` measures (a)-(e) —
and, with `--field`, the rehearsal behind the latency proxy — and ends with one well-formed JSON
line. Both runs use the test worker's running stack (`--stack`, a bucket, subscription and
dataset of their own), which saves each a stack start; the default, a stack of its own, is
`deploy.localstack.up`/`down` (tests/test_localstack.py). The proxy's parsing and the cost model
are unit-tested here too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import fieldproxy  # noqa: E402 — bench/ is not a package
import rehearsal  # noqa: E402

heavy = [pytest.mark.integration, pytest.mark.spark]
POSITIVE = ("ceiling_img_s", "pipeline_img_s", "baseline_img_s", "ratio_to_baseline",
            "latency_p50_s", "latency_p95_s", "drain_img_s", "drain_ratio_to_ceiling",
            "seed_style_drain_img_s")


def run_bench(stack, *args: str) -> dict:
    """``bench/run.py --json --stack DIR ARGS``: the JSON line, the only stdout line."""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    for name in list(env):  # the bench reads the stack from --stack alone, not from the caller
        if name.startswith("BUCKETLENS_") or name.endswith("_EMULATOR_HOST"):
            env.pop(name)
    done = subprocess.run([sys.executable, "bench/run.py", "--json", "--stack", stack.run_dir,
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, "--json: the JSON line is the only stdout line"
    return json.loads(lines[-1])


@pytest.mark.integration
@pytest.mark.spark
def test_bench_run_prints_every_figure_as_json(stack) -> None:
    out = run_bench(stack, "--images", "12",
                    "--ceiling-seconds", "2", "--latency-seconds", "6", "--rss-images", "64",
                    "--baseline-rounds", "1", "--pipeline-rounds", "1", "--camera-images", "2",
                    "--timeout", "240", "--sustain-seconds", "5", "--sustain-probes", "1",
                    "--drain-images", "16", "--seed-drain-images", "4")

    for key in POSITIVE:
        assert isinstance(out[key], int | float) and out[key] > 0, (key, out[key])
    assert isinstance(out["rss_growth_mb"], int | float) and math.isfinite(out["rss_growth_mb"])
    assert out["latency_p95_s"] >= out["latency_p50_s"]
    # (f): one probe each at this size, from 0.85 x the drain rate; a failed probe reports 0
    probes, seed_probes = out["sustained_probes"], out["seed_style_probes"]
    assert len(probes) == 1 and len(seed_probes) == 1
    assert probes[0]["rate"] == pytest.approx(0.85 * out["drain_img_s"], rel=0.01, abs=0.01)
    assert out["max_sustained_img_s"] == pytest.approx(
        probes[0]["rate"] if probes[0]["kept_up"] else 0, abs=0.01)
    assert out["drain_images"] == 16 and out["seed_style_drain_images"] == 4
    assert out["ratio_to_ceiling"] == pytest.approx(
        out["max_sustained_img_s"] / out["ceiling_img_s"], rel=0.01, abs=0.002)
    assert out["burst_ratio_to_ceiling"] == pytest.approx(
        out["pipeline_img_s"] / out["ceiling_img_s"], rel=0.01, abs=0.002)
    if out["max_sustained_img_s"] and out["seed_style_max_sustained_img_s"]:
        assert out["ratio_to_seed_style"] == pytest.approx(
            out["max_sustained_img_s"] / out["seed_style_max_sustained_img_s"], rel=0.01)
        assert out["cpu_s_per_image"] > 0
    assert out["images"] == 12 and out["model"] == "efficientnet_lite0"
    assert out["latency_images"] >= 6  # ~12 uploads at 2/s for 6 s
    assert out["rss_images"] == 64 and out["model_loads"] and all(
        v == 1 for v in out["model_loads"].values()), "one model load per Python worker"
    assert out["executor_torch_threads"] == [1]
    assert out["baseline_camera_img_s"] > 0 and out["spark_classify_camera_img_s"] > 0
    for key in ("loadavg_start", "loadavg_end"):
        assert len(out[key]) == 3
    assert out["machine"]["cores"] >= 1


FIELD_KEYS = ("field_max_sustained_img_s", "field_seed_style_max_sustained_img_s",
              "field_ratio_to_seed_style", "field_latency_p50_s", "field_latency_p95_s",
              "queries_per_batch", "product_cpu_s_per_image", "model_cpu_s_per_image",
              "cost_per_million_usd_27", "cost_per_million_usd_1")


@pytest.mark.integration
@pytest.mark.spark
def test_bench_field_rehearsal_reports_field_figures_counted_at_the_proxy(stack) -> None:
    out = run_bench(stack, "--field", "--ceiling-seconds", "2", "--latency-seconds", "6",
                    "--timeout", "240", "--sustain-seconds", "6", "--sustain-probes", "1",
                    "--drain-images", "12", "--seed-drain-images", "4")
    assert out["field"] is True and out["model"] == "efficientnet_lite0"
    for key in FIELD_KEYS:
        assert key in out, key
    for key in ("field_latency_p50_s", "field_latency_p95_s", "model_cpu_s_per_image",
                "field_drain_img_s", "field_seed_style_drain_img_s"):
        assert isinstance(out[key], int | float) and out[key] > 0, (key, out[key])
    assert out["field_latency_p95_s"] >= out["field_latency_p50_s"]
    # the mix: every sample photo and a camera-sized JPEG made from each
    mix = out["field_mix"]
    assert mix["camera_sized"] * 2 == mix["uploads"] and mix["camera_kb"][0] > 200
    # the stream's calls went through the proxy: downloads, appends, and it counted them
    probe = out["field_sustained_probes"][0]
    assert probe["batches"] >= 1
    assert probe["calls"]["gcs_get"] >= probe["uploaded"] > 0
    assert probe["calls"]["append_rows"] >= 1
    assert out["queries_per_batch"] == pytest.approx(
        probe["calls"]["bq_query"] / probe["batches"], abs=0.002)
    seed = out["field_seed_style_probes"][0]
    assert seed["calls"]["gcs_get"] >= seed["uploaded"] > 0
    assert seed["calls"]["bq_query"] == 0, "the seed-style stream appends with no key lookup"
    # the product's CPU excludes the producer's and the proxy's processes
    assert probe["cpu_s"]["bench_helpers"] > 0
    assert probe["cpu_s"]["product"] == pytest.approx(
        probe["cpu_s"]["driver_and_producer"] + probe["cpu_s"]["spark_jvm_and_workers"],
        abs=0.02)
    if out["product_cpu_s_per_image"] is not None:  # a probe kept up
        assert out["cost_per_million_usd_27"] > 0 and out["cost_per_million_usd_1"] > 0
        assert out["field_ratio_to_seed_style"] is None or out["field_ratio_to_seed_style"] > 0


# --- the field proxy and the cost model (pure) -------------------------------------------------

@pytest.mark.parametrize(("service", "method", "target", "body", "kind"), [
    ("gcs", "GET", "/download/storage/v1/b/bk/o/a.jpg?generation=1&alt=media", b"", "gcs_get"),
    ("gcs", "GET", "/storage/v1/b/bk/o/a.jpg?alt=media", b"", "gcs_get"),
    ("gcs", "GET", "/storage/v1/b/bk/o/a.jpg", b"", "gcs_other"),
    ("bq", "POST", "/bigquery/v2/projects/p/jobs?prettyPrint=false",
     b'{"configuration": {"query": {"query": "SELECT 1"}}}', "bq_query"),
    ("bq", "POST", "/bigquery/v2/projects/p/queries", b'{"query": "SELECT 1"}', "bq_query"),
    ("bq", "POST", "/bigquery/v2/projects/p/jobs", b'{"configuration": {"load": {}}}',
     "bq_other"),
    ("bq", "GET", "/bigquery/v2/projects/p/queries/job_1?location=US", b"",
     "bq_get_query_results"),
    ("bq", "GET", "/bigquery/v2/projects/p/datasets/d/tables/t", b"", "bq_other"),
])
def test_field_proxy_classifies_calls(service: str, method: str, target: str, body: bytes,
                                      kind: str) -> None:
    assert fieldproxy.http_kind(service, method, target, body) == kind


def test_field_proxy_splits_http_requests_by_length_and_chunks() -> None:
    one = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    chunked = (b"POST /y HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    buf = one + chunked + b"GET /z HTTP/1.1\r\n"
    raw, method, target, body = fieldproxy.split_http_request(buf)
    assert (raw, method, target, body) == (one, "POST", "/x", b"hello")
    raw, _, target, body = fieldproxy.split_http_request(buf[len(one):])
    assert (raw, target, body) == (chunked, "/y", b"abcde")
    assert fieldproxy.split_http_request(b"GET /z HTTP/1.1\r\n") is None  # incomplete
    assert fieldproxy.split_http_request(one[:-1]) is None


def test_field_proxy_counts_grpc_messages_across_frames() -> None:
    def message(n: int) -> bytes:
        return b"\x00" + n.to_bytes(4, "big") + b"m" * n

    counter = fieldproxy.GrpcMessages()
    wire = message(10) + message(3)
    assert counter.feed(1, wire[:3]) == 1  # the prefix split across frames: counted once
    assert counter.feed(1, wire[3:12]) == 0
    assert counter.feed(1, wire[12:]) == 1
    assert counter.feed(3, message(0) + message(2)) == 2  # another stream, its own state
    frame = (4).to_bytes(3, "big") + bytes([0, 0x8]) + (1).to_bytes(4, "big") + b"\x02a\x00\x00"
    raw, ftype, flags, stream, payload = fieldproxy.split_h2_frame(frame + b"rest")
    assert (raw, ftype, stream) == (frame, 0, 1)
    assert fieldproxy.data_payload(flags, payload) == b"a"  # pad length 2 of 4 bytes: 1 left


def test_field_proxy_delays_and_counts_real_http_calls() -> None:
    """A real proxy process in front of a real HTTP server: each call pays its kind's latency."""
    import http.server
    import threading
    import time
    import urllib.request

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 — http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    latency = {**fieldproxy.LATENCY, "gcs_get": 0.3, "connect": 0.0}
    proxy = fieldproxy.FieldProxy({"gcs": ("127.0.0.1", server.server_address[1])},
                                  latency).start()
    try:
        url = f"http://127.0.0.1:{proxy.ports['gcs']}"
        started = time.monotonic()
        assert urllib.request.urlopen(f"{url}/download/storage/v1/b/b/o/a?alt=media").read() == b"ok"
        assert time.monotonic() - started >= 0.3
        assert urllib.request.urlopen(f"{url}/storage/v1/b/b/o/a").read() == b"ok"
        counts = proxy.counts()
        assert (counts["gcs_get"], counts["gcs_other"], counts["connections"]) == (1, 1, 2)
    finally:
        proxy.close()
        server.shutdown()


def test_cost_model_prices_queries_per_batch_and_cpu() -> None:
    none = rehearsal.cost_per_million(0.05, 27, 0.5, queries_per_batch=0)
    assert none.bq_queries == 0
    # 0.05 CPU-s per image: 13.9 vCPU-hours at $0.048559 + $0.010
    assert none.compute == pytest.approx(0.05 * 1e6 / 3600 * 0.058559, rel=1e-3)
    assert none.gcs == pytest.approx(0.40) and none.total < 2
    # two 10 MB-minimum queries per batch at 1 upload/s, 0.5 s trigger: 786,900 batches
    two = rehearsal.cost_per_million(0.05, 1, 0.5, queries_per_batch=2)
    assert rehearsal.batches_per_image(1, 0.5) == pytest.approx(0.7869, rel=1e-3)
    assert two.bq_queries == pytest.approx(2 * 786_939 * 10 * 2**20 / 2**40 * 6.25, rel=1e-3)
    assert two.total > 90
