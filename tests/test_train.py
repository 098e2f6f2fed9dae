"""Own classes end to end, offline, on real data: scikit-learn's 1,797 handwritten digit scans.

`bucketlens train` (a subprocess, as a user runs it) fits a head on EfficientNet-Lite0 features;
its validation images then stream through the real pipeline, and BigQuery's accuracy view must
agree with the train command's own figure. A second test swaps versions under a running stream.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import clients
from pipeline.bigquery.views import create_views
from pipeline.model import bundles
from pipeline.model.classfolders import Item, list_images
from pipeline.stream import job as stream
from producer.datasets import digits_dataset
from producer.replay import replay
from tests.helpers.stream import keys, rows_of, wait_rows
from tests.helpers.tables import query

pytestmark = [pytest.mark.integration, pytest.mark.spark]

BASE = "efficientnet_lite0"  # the base model that loads offline
BUCKETLENS = Path(sys.executable).with_name("bucketlens")


def bucketlens(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "BUCKETLENS_MODEL": BASE}
    return subprocess.run([str(BUCKETLENS), *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return digits_dataset(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="module")
def trained(stack, digits, tmp_path_factory) -> tuple[dict, bundles.Bundle]:
    """The train command's summary line and the bundle it wrote."""
    out = tmp_path_factory.mktemp("models") / "digits"
    proc = bucketlens("train", "--dataset", str(digits), "--out", str(out), "--seed", "0",
                      "--base", BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "features: 1797 of 1797 images" in proc.stderr  # progress went to stderr
    return summary, bundles.load(summary["bundle"], env_settings())


def env_settings():
    from pipeline.config import Settings

    return Settings.from_env()


def validation_items(bundle: bundles.Bundle, digits: Path) -> list[Item]:
    files = bundle.manifest["dataset"]["validation_files"]
    return [Item(rel.split("/")[0], digits / rel, rel.split("/", 1)[1]) for rel in files]


def test_train_writes_a_versioned_bundle_with_its_validation_figures(trained, digits) -> None:
    summary, bundle = trained
    assert set(summary) == {"classes", "train_images", "val_images", "val_top1", "val_top5",
                            "bundle", "version", "seconds"}
    assert summary["classes"] == 10 and summary["train_images"] + summary["val_images"] == 1797
    assert summary["val_top1"] >= 0.90, summary
    assert summary["val_top5"] >= summary["val_top1"]
    location = Path(summary["bundle"]).parent
    assert bundles.current_version(str(location), env_settings()) == summary["version"]
    m = bundle.manifest
    assert bundle.version == summary["version"] and m["labels"] == [str(d) for d in range(10)]
    assert m["base"]["model"] == BASE and m["embedding_dim"] == 1280
    assert m["validation"]["top1"] == pytest.approx(summary["val_top1"], abs=1e-6)
    counts = m["validation"]["confusion"]["counts"]
    assert sum(map(sum, counts)) == summary["val_images"]
    assert sum(counts[i][i] for i in range(10)) == m["validation"]["top1_correct"]
    assert len(m["dataset"]["validation_files"]) == summary["val_images"]
    assert m["dataset"]["skipped"] == [] and sum(m["dataset"]["classes"].values()) == 1797
    assert set(m["validation"]["per_class"]) == set(m["labels"])


def test_classify_with_the_bundle_agrees_with_training(trained, digits) -> None:
    summary, bundle = trained
    items = validation_items(bundle, digits)
    proc = bucketlens("classify", "--model", summary["bundle"], "--json",
                      *[str(i.path) for i in items])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == len(items)
    correct = sum(r["top1_label"] == Path(r["path"]).parent.name for r in rows)
    assert abs(correct - bundle.manifest["validation"]["top1_correct"]) <= 1


def test_streamed_validation_images_score_as_in_training(trained, digits, spark, isolated) -> None:
    """The BigQuery accuracy view over the streamed validation images equals the train command's
    validation figure (± one image: the stream decodes the same bytes the same way)."""
    summary, bundle = trained
    items = validation_items(bundle, digits)
    location = str(Path(summary["bundle"]).parent)
    settings = isolated.replace(model=location, trigger_seconds=1.0, prefix="digits")
    query_, _ = stream.start(settings, spark=spark)
    try:
        uploaded = replay(items, settings, rate=200, seed=3, progress=False)
        assert uploaded.uploaded == len(items)
        rows = wait_rows(settings, len(items), query_, timeout=300)
    finally:
        query_.stop()
    assert keys(rows) == {(settings.bucket, n, g) for n, g in uploaded.objects}
    assert {(r["model"], r["model_version"], r["label_set"]) for r in rows} == \
        {("digits", summary["version"], "own")}
    assert all(r["true_model_label"] == r["true_label"] for r in rows)
    create_views(settings)
    by_label = query(settings, f"SELECT * FROM `{settings.project}.{settings.dataset}.accuracy_by_label`")
    assert {r["mapping"] for r in by_label} == {"own_label"}
    correct = sum(r["top1_correct"] for r in by_label)
    assert sum(r["classified"] for r in by_label) == len(items)
    assert abs(correct - bundle.manifest["validation"]["top1_correct"]) <= 1
    assert correct / len(items) >= 0.90


def _copy(bundle: bundles.Bundle, location: str, settings, bias_shift: float = 0.0) -> str:
    """Save ``bundle`` (its head shifted by a constant: another version) under ``location``."""
    head = bundles.head_bytes(bundle.weight, bundle.bias + bias_shift)
    m = bundle.manifest
    manifest = bundles.build_manifest(name=m["name"], base=m["base"], preprocess=m["preprocess"],
                                      labels=m["labels"], head=head, extra={})
    bundles.save(location, manifest, head, settings)
    return manifest["version"]


def test_promote_mid_stream_switches_versions_between_batches(trained, digits, spark, isolated,
                                                              caplog) -> None:
    """Rows before the promotion carry the old version, rows after it the new one; a broken
    version pointed at later is refused and the stream keeps the good one; nothing is lost or
    doubled. The location lives in GCS, as on a cluster."""
    _, bundle = trained
    models_bucket = f"{isolated.bucket}-models"
    clients.storage_client(isolated).create_bucket(models_bucket)
    location = f"gs://{models_bucket}/models/digits"
    v1 = _copy(bundle, location, isolated)
    v2 = _copy(bundle, location, isolated, bias_shift=1e-3)
    broken = _copy(bundle, location, isolated, bias_shift=2e-3)
    clients.storage_client(isolated).bucket(models_bucket).blob(
        f"models/digits/{broken}/head.safetensors").delete()
    assert bundles.current_version(location, isolated) == v1

    settings = isolated.replace(model=location, model_refresh_seconds=0.0, trigger_seconds=1.0)
    items = [Item(str(d), p, p.name) for d in range(10) for p in sorted((digits / str(d)).glob("*.png"))[:3]]
    waves = [items[0:10], items[10:20], items[20:30]]
    query_, processor = stream.start(settings, spark=spark)
    objects: list[list[tuple[str, int]]] = []
    try:
        with caplog.at_level(logging.ERROR, logger="bucketlens.bundles"):
            for wave, step in zip(waves, ("promote", "break", None), strict=True):
                done = replay(wave, settings.replace(prefix=f"wave{len(objects)}"), rate=100,
                              progress=False)
                objects.append(done.objects)
                wait_rows(settings, 10 * len(objects), query_, timeout=240)
                if step == "promote":
                    proc = bucketlens("models", "promote", location, v2)
                    assert proc.returncode == 0, proc.stderr
                    assert f"current version is now {v2}" in proc.stderr
                elif step == "break":  # what a hand-edited pointer can do: promote would refuse
                    clients.storage_client(isolated).bucket(models_bucket).blob(
                        "models/digits/CURRENT").upload_from_string(f"{broken}\n")
    finally:
        query_.stop()
    rows = rows_of(settings)
    assert len(rows) == 30 and len(keys(rows)) == 30  # none lost, none doubled
    version = {r["name"]: r["model_version"] for r in rows}
    assert [sorted({version[n] for n, _ in wave}) for wave in objects] == [[v1], [v2], [v2]]
    refusals = [r.getMessage() for r in caplog.records if "refused model version" in r.getMessage()]
    assert len(refusals) == 1 and broken in refusals[0] and "missing its head" in refusals[0]
    assert {r.model_version for r in processor.reports if r.classified} == {v1, v2}


def test_models_list_and_a_refused_promotion(trained, tmp_path) -> None:
    summary, bundle = trained
    location = str(tmp_path / "loc")
    settings = env_settings()
    v1 = _copy(bundle, location, settings)
    v2 = _copy(bundle, location, settings, bias_shift=1e-3)
    listed = bucketlens("models", "list", location, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["version"]: r["current"] for r in rows} == {v1: True, v2: False}
    (Path(location) / v2 / "head.safetensors").write_bytes(b"not the head")
    refused = bucketlens("models", "promote", location, v2)
    assert refused.returncode == 2 and "does not match the checksum" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert bundles.current_version(location, settings) == v1


def test_train_refuses_unusable_datasets_in_one_sentence(tmp_path) -> None:
    one_class = tmp_path / "one"
    (one_class / "cat").mkdir(parents=True)
    for i in range(3):
        (one_class / "cat" / f"{i}.png").write_bytes(b"x")
    proc = bucketlens("train", "--dataset", str(one_class), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and "at least two classes" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (one_class / "dog").mkdir()
    (one_class / "dog" / "0.png").write_bytes(b"x")
    proc = bucketlens("train", "--dataset", str(one_class), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and "'dog' have fewer than 2 images" in proc.stderr


def test_train_skips_unreadable_images_and_lists_them(stack, digits, spark, tmp_path) -> None:
    """A corrupt file is counted and skipped (listed in the bundle's dataset summary); a second
    version goes beside the first and CURRENT stays."""
    from pipeline.commands import train as commands_train

    data = tmp_path / "few"
    for d in ("3", "8"):
        (data / d).mkdir(parents=True)
        for p in sorted((digits / d).glob("*.png"))[:6]:
            (data / d / p.name).write_bytes(p.read_bytes())
    (data / "8" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    settings = env_settings().replace(model=BASE)
    said: list[str] = []
    first = commands_train.train(str(data), str(tmp_path / "m"), settings, seed=0, spark=spark,
                               say=said.append)
    skipped = bundles.load(first["bundle"], settings).manifest["dataset"]["skipped"]
    assert [(Path(s["path"]).name, s["status"]) for s in skipped] == [("broken.png", "corrupt")]
    assert first["train_images"] + first["val_images"] == 12
    second = commands_train.train(str(data), str(tmp_path / "m"), settings, seed=1, spark=spark,
                                say=said.append)
    assert second["version"] != first["version"]
    assert bundles.current_version(str(tmp_path / "m"), settings) == first["version"]
    assert any("wrote " + second["version"] + " beside them" in line for line in said)


def test_datasets_under_a_gcs_prefix_are_listed_like_folders(isolated) -> None:
    bucket = clients.storage_client(isolated).bucket(isolated.bucket)
    for name in ("set/a/1.png", "set/a/.hidden.png", "set/b/x/2.jpg", "set/loose.png",
                 "set/b/notes.txt", "other/a/3.png"):
        bucket.blob(name).upload_from_string(b"x")
    found = list_images(f"gs://{isolated.bucket}/set", isolated)
    assert [(uri.split("/", 3)[3], label) for uri, label, _ in found] == \
        [("set/a/1.png", "a"), ("set/b/x/2.jpg", "b")]
    assert all(isinstance(gen, int) for _, _, gen in found)


def test_head_split_matches_the_whole_network() -> None:
    """The embedding the head is trained on is exactly what the original classifier layer saw."""
    from pipeline.model import cache

    net = __import__("torchvision").models.get_model("mobilenet_v2", weights=None).eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = net(x)
        base = cache.split_head(net)
        assert isinstance(base.head, torch.nn.Linear) and base.head.in_features == 1280
        torch.testing.assert_close(base.head(base.backbone(x)), expected)
