"""The driver learns a model's name, version and labels without loading it (issue 26, item 6).

``handler.model_info`` must report exactly what a loaded handler reports (rows record it, and a
batch whose executors report another version is failed), for every kind of model; the driver
paths (``ModelChoice``, the location watcher, ``run``'s fail-fast) must never build a network.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlparse

import pytest
import torch
import torchvision

from pipeline.commands import cli
from pipeline.config import Settings
from pipeline.errors import UserError
from pipeline.labels import IMAGENET, OWN_LABELS
from pipeline.model import bundles, cache, specs
from pipeline.model import handler as model_handler
from pipeline.model import weights as model_weights
from pipeline.stream import job
from tests.helpers.checkpoints import serve_checkpoint
from tests.test_classify import (
    free_port,
    gcs_server,  # noqa: F401 - a fixture
)

LITE0_FEATURES = 1280  # what efficientnet_lite0's backbone gives a bundle's head


class Loaded(AssertionError):
    """Raised by every way a network is built or base weights are read, while forbidden."""


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make building a network or reading weights raise :class:`Loaded`; undone
    by ``monkeypatch.undo`` (or at the test's end)."""

    def forbid() -> None:
        for owner, name in [(cache, "shared_base"), (cache, "build_model"),
                            (model_weights, "build_model"), (model_weights, "read_state_dict"),
                            (torch, "load"), (torchvision.models, "get_model"),
                            (torch.hub, "load_state_dict_from_url")]:
            monkeypatch.setattr(owner, name, refusing(getattr(owner, name), name == "get_model"))

    def refusing(real: Callable, architecture: bool) -> Callable:
        def refuse(*args, **kwargs):
            if architecture and torch.get_default_device().type == "meta" and \
                    kwargs.get("weights") is None:
                return real(*args, **kwargs)  # an architecture without parameters: no load
            raise Loaded(f"loaded a model: {args!r:.120}")

        return refuse

    return forbid


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init MobileNetV2 state dict (never downloaded)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2-random.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    return path


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mobilenet_file: Path) -> Path:
    """A TORCH_HOME whose cache already holds mobilenet_v2's torchvision weights (the random
    state dict under the names torchvision looks for), so nothing is downloaded."""
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for entry in torchvision.models.MobileNet_V2_Weights:
        (checkpoints / os.path.basename(urlparse(entry.url).path)).write_bytes(
            mobilenet_file.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model_handler.forget_handlers()  # a base loaded from another cache would be reused
    return checkpoints


def make_bundle(location: Path, *, bias: float = 0.0, labels=("cat", "dog", "fish"),
                base: str = specs.EFFICIENTNET_LITE0, base_weights: str = "",
                features: int = LITE0_FEATURES) -> str:
    """A bundle (its head sized for efficientnet_lite0, as for mobilenet_v2, by default);
    returns its version URI."""
    weight = torch.zeros(len(labels), features)
    head = bundles.head_bytes(weight, torch.full((len(labels),), bias))
    manifest = bundles.build_manifest(
        name="pets", base={"model": base, "weights": base_weights},
        preprocess={"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3,
                    "interpolation": "bilinear"},
        labels=labels, head=head, extra={})
    return bundles.save(str(location), manifest, head, Settings())


@pytest.fixture
def lite0_file() -> str:
    return model_weights._lite0_file()


def kinds(tmp_path: Path, mobilenet_file: Path, lite0_file: str) -> dict[str, Settings]:
    location = tmp_path / "pets"
    version = make_bundle(location)
    return {
        "lite0 bundled": Settings(model=specs.EFFICIENTNET_LITE0),
        "lite0 weights file": Settings(model=specs.EFFICIENTNET_LITE0, weights=lite0_file),
        "torchvision default (cached)": Settings(model="mobilenet_v2"),
        "torchvision named (cached)": Settings(model="mobilenet_v2", weights="IMAGENET1K_V1"),
        "torchvision weights file": Settings(model="mobilenet_v2", weights=str(mobilenet_file)),
        "bundle version": Settings(model=version),
        "model location": Settings(model=str(location)),
    }


KINDS = ["lite0 bundled", "lite0 weights file", "torchvision default (cached)",
         "torchvision named (cached)", "torchvision weights file", "bundle version",
         "model location"]


@pytest.mark.parametrize("kind", KINDS)
def test_model_info_is_what_the_loaded_handler_reports_without_loading(
        kind, tmp_path, mobilenet_file, lite0_file, torch_home, no_loading, monkeypatch) -> None:
    settings = kinds(tmp_path, mobilenet_file, lite0_file)[kind]
    no_loading()
    info = model_handler.model_info(settings)
    assert model_handler.check_model(settings) == info
    monkeypatch.undo()  # now let the handler load, as an executor does
    monkeypatch.setenv("TORCH_HOME", str(torch_home.parent.parent))
    loaded = model_handler.get_handler(settings)
    assert info == loaded.info
    assert (info.name, info.version, info.label_set, tuple(info.labels)) == (
        loaded.info.name, loaded.info.version, loaded.info.label_set, tuple(loaded.info.labels))
    assert info.label_set == (OWN_LABELS if kind.startswith(("bundle", "model")) else IMAGENET)


def test_each_kind_has_its_own_version(tmp_path, mobilenet_file, lite0_file) -> None:
    """The versions the comparison above covers are the ones rows record, one per kind."""
    infos = {k: model_handler.model_info(s)
             for k, s in kinds(tmp_path, mobilenet_file, lite0_file).items()}
    assert infos["lite0 bundled"].version == "bundled"
    assert infos["lite0 weights file"].version == lite0_file
    assert infos["torchvision default (cached)"].version == \
        torchvision.models.MobileNet_V2_Weights.DEFAULT.name
    assert infos["torchvision named (cached)"].version == "IMAGENET1K_V1"
    assert infos["torchvision weights file"].version == str(mobilenet_file)
    assert infos["bundle version"] == infos["model location"]
    assert infos["bundle version"].version == Path(kinds(tmp_path, mobilenet_file,
                                                          lite0_file)["bundle version"].model).name
    assert infos["bundle version"].labels == ("cat", "dog", "fish")


# --------------------------------------------------------------------------- refusals


def test_the_check_refuses_what_loading_would_in_the_same_sentence(
        tmp_path, no_loading, monkeypatch) -> None:
    missing = Settings(model="mobilenet_v2", weights=str(tmp_path / "missing.pth"))
    unknown = Settings(model="no_such_net")
    lite0_named = Settings(model=specs.EFFICIENTNET_LITE0, weights="IMAGENET1K_V1")
    no_bundle = Settings(model=str(tmp_path / "nothing-here"))
    (tmp_path / "nothing-here").mkdir()
    misfit = Settings(model=make_bundle(tmp_path / "misfit", features=4))
    refused = [("missing", missing), ("unknown", unknown), ("named", lite0_named),
               ("bundle", no_bundle), ("misfit", misfit)]
    said = {}
    no_loading()
    for name, settings in refused:
        with pytest.raises((specs.ModelUnavailableError, bundles.BundleError)) as caught:
            model_handler.check_model(settings)
        said[name] = str(caught.value)
    assert model_handler.model_info(missing).version == str(tmp_path / "missing.pth")  # no check
    monkeypatch.undo()
    model_handler.forget_handlers()
    for name, settings in refused:
        with pytest.raises((specs.ModelUnavailableError, bundles.BundleError)) as caught:
            model_handler.get_handler(settings)
        assert said[name] == str(caught.value)  # word for word what loading says
        assert "\n" not in said[name]
    assert "missing.pth" in said["missing"] and "--model efficientnet_lite0" in said["missing"]
    assert said["misfit"].endswith("its head takes 4 features but base model "
                                   "efficientnet_lite0 gives 1280.")


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "vit_b_16", "efficientnet_lite0"])
def test_feature_size_is_what_the_loaded_base_gives_its_head(name, no_loading) -> None:
    base = cache.split_head(model_weights._lite0_class().from_name("efficientnet-lite0")
                            if name == specs.EFFICIENTNET_LITE0
                            else torchvision.models.get_model(name, weights=None))
    no_loading()
    assert model_weights.feature_size(name) == base.head.in_features


@pytest.mark.usefixtures("gcs_server")
def test_a_missing_gs_object_is_refused_without_downloading(no_loading) -> None:
    from pipeline.clients import storage_client

    client = storage_client(Settings())
    client.create_bucket("models").blob("mnv2/there.pth").upload_from_string(b"not read")
    no_loading()
    there = Settings(model="mobilenet_v2", weights="gs://models/mnv2/there.pth")
    assert model_handler.check_model(there).version == "gs://models/mnv2/there.pth"
    for gone in ("gs://models/mnv2/gone.pth", "gs://no-such-bucket/w.pth"):
        with pytest.raises(specs.ModelUnavailableError) as caught:
            model_handler.check_model(there.replace(weights=gone))
        message = str(caught.value)
        assert message.startswith(f"Cannot load weights {gone} (") and \
            "--model efficientnet_lite0" in message and "\n" not in message


# --------------------------------------------------------------------------- torchvision's weights


def point_weights_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Every torchvision weights entry's URL becomes ``url``, for the check and loading alike
    (both read ``WeightsEnum.url``)."""
    monkeypatch.setattr(torchvision.models.WeightsEnum, "url", property(lambda _: url))


@pytest.fixture
def served(tmp_path: Path, mobilenet_file: Path) -> Iterator[str]:
    """The URL of the random MobileNetV2 state dict on a loopback server, under the name whose
    hash prefix torch.hub checks."""
    with serve_checkpoint(mobilenet_file, tmp_path / "served") as url:
        yield url


@pytest.mark.parametrize("weights", ["", "IMAGENET1K_V1"])
def test_cached_torchvision_weights_are_neither_downloaded_nor_read(
        weights, torch_home, no_loading, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in torch_home.iterdir()}
    no_loading()
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *args, **kwargs: pytest.fail(f"downloaded {args!r:.120}"))
    settings = Settings(model="mobilenet_v2", weights=weights)
    assert model_handler.check_model(settings) == model_handler.model_info(settings)
    assert {p.name: p.read_bytes() for p in torch_home.iterdir()} == before


def test_uncached_torchvision_weights_are_downloaded_where_loading_finds_them(
        tmp_path, served, mobilenet_file, no_loading, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    point_weights_at(monkeypatch, served)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / os.path.basename(served)
    no_loading()
    settings = Settings(model="mobilenet_v2")
    assert model_handler.check_model(settings) == model_handler.model_info(settings)
    assert cached.read_bytes() == mobilenet_file.read_bytes()
    assert capsys.readouterr().out == ""  # stdout may be a command's data
    monkeypatch.undo()  # an executor on this machine: loads from the cache, the server gone
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    point_weights_at(monkeypatch, f"http://127.0.0.1:{free_port()}/{cached.name}")
    model_handler.forget_handlers()
    loaded = model_handler.get_handler(settings)
    served_model = torchvision.models.mobilenet_v2(weights=None)
    served_model.load_state_dict(torch.load(mobilenet_file, weights_only=True))
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # the executor's network is the served file's
        torch.testing.assert_close(loaded.model(x), served_model.eval()(x))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("weights", ["", "IMAGENET1K_V1"])
def test_unreachable_torchvision_weights_are_refused_in_loadings_sentence(
        weights, tmp_path, no_loading, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url = f"http://127.0.0.1:{free_port()}/mobilenet_v2-7ebf99e0.pth"  # nothing listens
    point_weights_at(monkeypatch, url)
    settings = Settings(model="mobilenet_v2", weights=weights)
    no_loading()
    with pytest.raises(specs.ModelUnavailableError) as checked:
        model_handler.check_model(settings)
    said = str(checked.value)
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    point_weights_at(monkeypatch, url)
    model_handler.forget_handlers()
    with pytest.raises(specs.ModelUnavailableError) as loading:
        model_handler.get_handler(settings)
    assert said == str(loading.value)  # word for word
    assert said.startswith("Cannot load the MobileNet_V2_Weights.IMAGENET1K_V") and \
        "--model efficientnet_lite0" in said and "\n" not in said
    assert not list((tmp_path / "torch_home").rglob("*.pth*"))  # no partial file left


# --------------------------------------------------------------------------- the driver


def test_model_choice_and_its_watcher_never_load_a_network(tmp_path, no_loading) -> None:
    location = tmp_path / "pets"
    first = make_bundle(location)
    second = make_bundle(location, bias=1.0)
    broken = make_bundle(location, bias=2.0)
    (Path(broken) / "head.safetensors").write_bytes(b"\0" * 64)
    misfit = make_bundle(location, features=4)  # loads, but fits no efficientnet_lite0
    no_loading()
    plain = job.ModelChoice(Settings(model=specs.EFFICIENTNET_LITE0))
    assert plain.for_batch() == (plain.settings, model_handler.model_info(plain.settings))

    choice = job.ModelChoice(Settings(model=str(location), model_refresh_seconds=0))
    pinned, info = choice.for_batch()
    assert (pinned.model, info.version) == (first, Path(first).name)
    bundles.promote(str(location), Path(second).name, Settings())
    pinned, info = choice.for_batch()  # the watcher checks the new version: no network either
    assert (pinned.model, info.version, info.name) == (second, Path(second).name, "pets")
    bundles.write_bytes(bundles.join(str(location), bundles.POINTER),  # promote would refuse it
                        f"{Path(broken).name}\n".encode(), Settings())
    assert choice.for_batch()[0].model == second  # a broken version is refused, as before
    bundles.promote(str(location), Path(misfit).name, Settings())
    assert choice.for_batch()[0].model == second  # so is a head that does not fit the base
    assert {broken, misfit} <= choice.watcher.refused


def test_a_model_choice_refuses_missing_weights_at_once(tmp_path, no_loading) -> None:
    no_loading()
    with pytest.raises(specs.ModelUnavailableError, match="missing.pth"):
        job.ModelChoice(Settings(model="mobilenet_v2", weights=str(tmp_path / "missing.pth")))


def test_run_checks_the_model_without_loading_it(tmp_path, no_loading, monkeypatch, capsys):
    started: list[Settings] = []

    def start(settings: Settings) -> NoReturn:
        started.append(settings)
        raise UserError("stop here")  # the stream itself is another test's business

    monkeypatch.setattr(job, "start", start)
    no_loading()
    assert cli.main(["run", "--model", specs.EFFICIENTNET_LITE0]) == 2
    assert capsys.readouterr().err.strip() == "bucketlens: stop here"
    assert [s.model for s in started] == [specs.EFFICIENTNET_LITE0]
    # (a missing --weights file the command line refuses itself; a bundle's base it cannot see)
    missing = str(tmp_path / "missing.pth")
    bundle = make_bundle(tmp_path / "pets", base="mobilenet_v2", base_weights=missing)
    assert cli.main(["run", "--model", bundle]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bucketlens: Cannot load weights {missing} (FileNotFoundError")
    assert err.count("\n") == 1 and len(started) == 1  # refused before the stream started


def test_backfill_checks_the_model_without_loading_it(tmp_path, no_loading, monkeypatch) -> None:
    import argparse

    from pipeline.commands import backfill as bf

    def backfill(settings: Settings, spark, **kwargs) -> NoReturn:
        raise UserError(f"backfill ran with {settings.model}")

    monkeypatch.setattr(bf, "backfill", backfill)
    args = argparse.Namespace(bucket="photos", dry_run=False, prefix="", since=None, batch=10)
    good = make_bundle(tmp_path / "pets")
    missing = str(tmp_path / "missing.pth")
    bad = make_bundle(tmp_path / "other", base="mobilenet_v2", base_weights=missing)
    no_loading()
    monkeypatch.setenv("BUCKETLENS_MODEL", good)
    with pytest.raises(UserError, match=f"backfill ran with {good}"):
        bf.run_backfill(args)
    monkeypatch.setenv("BUCKETLENS_MODEL", bad)
    with pytest.raises(specs.ModelUnavailableError, match=f"Cannot load weights {missing} "):
        bf.run_backfill(args)
