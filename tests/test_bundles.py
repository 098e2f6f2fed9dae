"""Model bundles and locations (pipeline.model.bundles) and the head training core (pipeline.model.heads,
pipeline.commands.train).

Local directories here; the gs:// paths run against fake-gcs-server in tests/test_train.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pipeline.commands import train as commands_train
from pipeline.config import Settings
from pipeline.model import bundles, heads
from pipeline.model.classfolders import DatasetError, check_classes

S = Settings()
LABELS = ("cat", "dog", "fish")
PRE = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
BASE = {"model": "efficientnet_lite0", "weights": ""}


def make_bundle(location: Path | str, *, bias: float = 0.0, labels=LABELS, dim: int = 4,
                name: str = "pets") -> tuple[str, dict]:
    weight = torch.arange(len(labels) * dim, dtype=torch.float32).reshape(len(labels), dim)
    head = bundles.head_bytes(weight, torch.full((len(labels),), bias))
    manifest = bundles.build_manifest(name=name, base=BASE, preprocess=PRE, labels=labels,
                                      head=head, extra={})
    return bundles.save(str(location), manifest, head, S), manifest


def test_save_then_load_round_trips_and_the_version_is_the_content(tmp_path) -> None:
    uri, manifest = make_bundle(tmp_path / "m")
    bundle = bundles.load(uri, S)
    assert uri == str(tmp_path / "m" / manifest["version"])
    assert (bundle.name, bundle.labels, bundle.base_model) == ("pets", LABELS, "efficientnet_lite0")
    assert bundle.preprocess.crop == 224 and bundle.preprocess.mean == (0.5, 0.5, 0.5)
    assert bundle.weight.shape == (3, 4) and bundle.bias.tolist() == [0.0, 0.0, 0.0]
    # the same content is the same version, whenever written; another head is another
    assert make_bundle(tmp_path / "again")[1]["version"] == manifest["version"]
    assert make_bundle(tmp_path / "other", bias=0.5)[1]["version"] != manifest["version"]
    assert len(manifest["version"]) == 12 and int(manifest["version"], 16) >= 0
    # nothing needs pickle: the manifest is JSON and the head a safetensors file
    assert json.loads((Path(uri) / "bundle.json").read_text())["head"]["file"] == "head.safetensors"
    assert (Path(uri) / "head.safetensors").read_bytes()[8:9] == b"{"  # safetensors' JSON header


def test_the_first_version_becomes_current_and_later_ones_go_beside_it(tmp_path) -> None:
    location = tmp_path / "m"
    first, m1 = make_bundle(location)
    second, m2 = make_bundle(location, bias=1.0)
    assert bundles.list_versions(str(location), S) == sorted([m1["version"], m2["version"]])
    assert bundles.current_version(str(location), S) == m1["version"]
    assert bundles.resolve(str(location), S) == bundles.Reference(first, str(location))
    assert bundles.resolve(second, S) == bundles.Reference(second, None)  # a version: fixed
    bundles.promote(str(location), m2["version"], S)
    assert bundles.resolve(str(location) + "/", S).uri == second


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "bundle.json").unlink(), "is not a model bundle: it has no bundle.json"),
    (lambda d: (d / "head.safetensors").unlink(), "is missing its head weights"),
    (lambda d: (d / "head.safetensors").write_bytes(b"\0" * 64), "does not match the checksum"),
    (lambda d: (d / "bundle.json").write_text("{not json"), "is not a valid bundle manifest"),
])
def test_a_broken_bundle_is_one_sentence(tmp_path, damage, message) -> None:
    uri, _ = make_bundle(tmp_path / "m")
    damage(Path(uri))
    with pytest.raises(bundles.BundleError, match=message) as caught:
        bundles.load(uri, S)
    assert "\n" not in str(caught.value)


def _rewrite(uri: str, head: bytes | None = None, **changes) -> None:
    """Edit a bundle in place, keeping its checksum right (so the deeper check must fire)."""
    path = Path(uri)
    manifest = json.loads((path / "bundle.json").read_text())
    if head is not None:
        (path / "head.safetensors").write_bytes(head)
        manifest["head"]["sha256"] = __import__("hashlib").sha256(head).hexdigest()
    manifest.update(changes)
    (path / "bundle.json").write_text(json.dumps(manifest))


def test_label_count_unlike_the_head_and_corrupt_weights_are_refused(tmp_path) -> None:
    uri, _ = make_bundle(tmp_path / "a")
    _rewrite(uri, labels=["cat", "dog"])
    with pytest.raises(bundles.BundleError, match="head has 3 outputs but the bundle lists 2 labels"):
        bundles.load(uri, S)
    uri, _ = make_bundle(tmp_path / "b")
    _rewrite(uri, head=b"garbage that is not safetensors")
    with pytest.raises(bundles.BundleError, match="is not a weight/bias safetensors file"):
        bundles.load(uri, S)


def test_resolve_and_promote_say_what_is_wrong(tmp_path) -> None:
    with pytest.raises(bundles.BundleError, match="neither a model bundle"):
        bundles.resolve(str(tmp_path), S)
    _, manifest = make_bundle(tmp_path / "m")
    with pytest.raises(bundles.BundleError, match="no bundle.json"):
        bundles.promote(str(tmp_path / "m"), "0123456789ab", S)
    assert bundles.current_version(str(tmp_path / "m"), S) == manifest["version"]  # unchanged


def test_is_reference_tells_paths_from_model_names(tmp_path) -> None:
    assert bundles.is_reference("gs://b/models/flowers") and bundles.is_reference(str(tmp_path))
    assert bundles.is_reference("./models") and bundles.is_reference("models/flowers")
    assert not bundles.is_reference("mobilenet_v2") and not bundles.is_reference("efficientnet_lite0")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_watcher_checks_at_most_every_interval_and_keeps_the_model_on_a_broken_version(
        tmp_path, caplog) -> None:
    location = tmp_path / "m"
    v1, _ = make_bundle(location)
    v2, m2 = make_bundle(location, bias=1.0)
    broken, m3 = make_bundle(location, bias=2.0)
    (Path(broken) / "head.safetensors").unlink()
    checked: list[str] = []
    clock = Clock()
    watcher = bundles.Watcher(str(location), S, 30.0,
                              check=lambda uri: checked.append(bundles.load(uri, S).version),
                              clock=clock)
    assert watcher.current() == v1
    bundles.promote(str(location), m2["version"], S)
    clock.now = 29.0
    assert watcher.current() == v1  # not looked at again within the interval
    clock.now = 30.0
    assert watcher.current() == v2
    (location / "CURRENT").write_text(m3["version"] + "\n")  # pointed at a broken version
    with caplog.at_level(logging.ERROR, logger="bucketlens.bundles"):
        for step in range(3):
            clock.now = 60.0 + 30 * step
            assert watcher.current() == v2
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 1 and "refused model version" in refusals[0] and "missing" in refusals[0]
    assert checked == [Path(v1).name, m2["version"]]  # each accepted version checked once


def test_watcher_refuses_a_current_that_leaves_the_location(tmp_path, caplog) -> None:
    """CURRENT rewritten to reach a good bundle of another location: refused with one log line
    however often it is read, and the model in use kept."""
    location = tmp_path / "m"
    v1, _ = make_bundle(location)
    make_bundle(tmp_path / "elsewhere", bias=1.0)
    other = bundles.current_version(str(tmp_path / "elsewhere"), S)
    clock = Clock()
    watcher = bundles.Watcher(str(location), S, 1.0, check=lambda uri: bundles.load(uri, S),
                              clock=clock)
    assert watcher.current() == v1
    (location / "CURRENT").write_text(f"../elsewhere/{other}\n")
    with caplog.at_level(logging.ERROR, logger="bucketlens.bundles"):
        for step in range(1, 4):
            clock.now = float(step)
            assert watcher.current() == v1
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 1 and "which is not a model version" in refusals[0], refusals


def test_promote_takes_a_version_id_only(tmp_path) -> None:
    location = tmp_path / "m"
    _, m1 = make_bundle(location)
    make_bundle(tmp_path / "elsewhere", bias=1.0)
    other = bundles.current_version(str(tmp_path / "elsewhere"), S)
    with pytest.raises(bundles.BundleError, match="'../elsewhere/[0-9a-f]{12}', which is not a "
                                                  "model version"):
        bundles.promote(str(location), f"../elsewhere/{other}", S)
    assert bundles.current_version(str(location), S) == m1["version"]  # unchanged


def test_preprocessing_bounds_admit_every_torchvision_model() -> None:
    """The bounds refuse what no model needs, and nothing a torchvision model uses."""
    import torchvision.models as tvm

    from pipeline.model.images import Preprocess

    seen = 0
    for name in tvm.list_models():
        try:
            enum = tvm.get_model_weights(name)
        except (ValueError, KeyError):
            continue
        for weights in enum:
            transforms = weights.transforms()
            if hasattr(transforms, "crop_size"):
                spec = Preprocess.from_transforms(transforms)
                assert bundles.preprocess_from_json(bundles.preprocess_to_json(spec)) == spec
                seen += 1
    assert seen > 100
    with pytest.raises(bundles.ManifestError, match="resize must be an integer from 1 to 1024"):
        bundles.preprocess_from_json({**PRE, "resize": 4096})


def test_models_list_shows_an_odd_manifest_rather_than_crashing(tmp_path, capsys) -> None:
    """Fields only `models list` shows (validation, created) are not part of the version: a
    hand edit of them still loads, and the list takes them only when of the right type."""
    from pipeline.commands import cli

    uri, _ = make_bundle(tmp_path / "m", name="pets\x1b[2J")
    _rewrite(uri, validation=["not", "an", "object"], created={"deep": [[[]]]})
    assert cli.main(["models", "list", "--json", str(tmp_path / "m")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["name"], row["created"], row["val_top1"], row["error"]) == (
        "pets\x1b[2J", None, None, None)
    assert cli.main(["models", "list", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "pets\\x1b[2J  3 labels  created None  val top-1 None" in out and "\x1b" not in out


def test_watcher_without_a_good_version_fails_at_start(tmp_path) -> None:
    location = tmp_path / "m"
    broken, _ = make_bundle(location)
    (Path(broken) / "head.safetensors").unlink()
    watcher = bundles.Watcher(str(location), S, 0.0, check=lambda uri: bundles.load(uri, S))
    with pytest.raises(bundles.BundleError, match="missing its head"):
        watcher.current()


# --------------------------------------------------------------------------- training core


def test_check_classes_says_what_is_wrong() -> None:
    labels = [c for c in "ab" for _ in range(3)]
    assert check_classes(labels) == ["a", "b"]
    with pytest.raises(DatasetError, match="at least two classes; the dataset has only class 'a'"):
        check_classes([label for label in labels if label == "a"])
    with pytest.raises(DatasetError, match="no images"):
        check_classes([])
    with pytest.raises(DatasetError, match="'c' have fewer than 2 images"):
        check_classes([*labels, "c"])


def test_stratified_split_is_seeded_and_keeps_every_class_on_both_sides() -> None:
    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 2
    tr, val = commands_train.stratified_split(labels, 0.2, seed=1)
    assert sorted(tr + val) == list(range(len(labels))) and not set(tr) & set(val)
    val_labels = [labels[i] for i in val]
    assert val_labels.count("a") == 2 and val_labels.count("b") == 1 and val_labels.count("c") == 1
    assert {labels[i] for i in tr} == {"a", "b", "c"}
    assert commands_train.stratified_split(labels, 0.2, seed=1) == (tr, val)
    assert commands_train.stratified_split(labels, 0.2, seed=2) != (tr, val)
    with pytest.raises(Exception, match="between 0 and 1"):
        commands_train.stratified_split(labels, 1.0, seed=1)


def test_fit_head_learns_and_takes_raw_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 4 + 50  # far from zero and unscaled: raw features
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    head = heads.fit_head(x, y, 3, seed=0)
    with torch.no_grad():
        assert (head(x).argmax(1) == y).float().mean() == 1.0
        again = heads.fit_head(x, y, 3, seed=0)
        torch.testing.assert_close(again.weight, head.weight)  # deterministic
    result = heads.evaluate(head(x).detach(), y, ["a", "b", "c"])
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and result["top1_correct"] == 120
    assert result["confusion"]["counts"] == [[40, 0, 0], [0, 40, 0], [0, 0, 40]]
    assert result["per_class"]["b"] == {"images": 40, "top1": 1.0, "top5": 1.0}


def test_evaluate_counts_misses() -> None:
    logits = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    result = heads.evaluate(logits, torch.tensor([0, 1, 1]), ["x", "y"])
    assert result["top1_correct"] == 2 and result["top1"] == pytest.approx(2 / 3)
    assert result["confusion"]["counts"] == [[1, 0], [1, 1]]
    assert result["per_class"]["y"]["top1"] == 0.5 and result["top5"] == 1.0
