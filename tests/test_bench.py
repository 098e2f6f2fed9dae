"""Smoke test of the benchmark harness: every stage runs at tiny sizes and reports its figures.

No timing thresholds: the figures depend on the machine and on what else runs on it
(bench/README.md has the real ones). This only proves that `bench/run.py` starts its own stack,
measures (a)-(e) and ends with one well-formed JSON line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.spark]

ROOT = Path(__file__).resolve().parent.parent
POSITIVE = ("ceiling_img_s", "pipeline_img_s", "baseline_img_s", "ratio_to_baseline",
            "latency_p50_s", "latency_p95_s", "drain_img_s", "drain_ratio_to_ceiling",
            "seed_style_drain_img_s")


def test_bench_run_prints_every_figure_as_json() -> None:
    cmd = [sys.executable, "bench/run.py", "--images", "20", "--json",
           "--ceiling-seconds", "2", "--latency-seconds", "6", "--rss-images", "64",
           "--baseline-rounds", "1", "--pipeline-rounds", "1", "--camera-images", "2",
           "--timeout", "240", "--sustain-seconds", "5", "--sustain-probes", "1",
           "--drain-images", "30", "--seed-drain-images", "10"]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    for name in list(env):  # the bench starts its own stack; a caller's must not leak in
        if name.startswith("BUCKETLENS_") or name.endswith("_EMULATOR_HOST"):
            env.pop(name)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, "--json: the JSON line is the only stdout line"
    out = json.loads(lines[-1])

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
    assert out["drain_images"] == 30 and out["seed_style_drain_images"] == 10
    assert out["ratio_to_ceiling"] == pytest.approx(
        out["max_sustained_img_s"] / out["ceiling_img_s"], rel=0.01, abs=0.002)
    assert out["burst_ratio_to_ceiling"] == pytest.approx(
        out["pipeline_img_s"] / out["ceiling_img_s"], rel=0.01, abs=0.002)
    if out["max_sustained_img_s"] and out["seed_style_max_sustained_img_s"]:
        assert out["ratio_to_seed_style"] == pytest.approx(
            out["max_sustained_img_s"] / out["seed_style_max_sustained_img_s"], rel=0.01)
        assert out["cpu_s_per_image"] > 0
    assert out["images"] == 20 and out["model"] == "efficientnet_lite0"
    assert out["latency_images"] >= 6  # ~12 uploads at 2/s for 6 s
    assert out["rss_images"] == 64 and out["model_loads"] and all(
        v == 1 for v in out["model_loads"].values()), "one model load per Python worker"
    assert out["executor_torch_threads"] == [1]
    assert out["baseline_camera_img_s"] > 0 and out["spark_classify_camera_img_s"] > 0
    for key in ("loadavg_start", "loadavg_end"):
        assert len(out[key]) == 3
    assert out["machine"]["cores"] >= 1
