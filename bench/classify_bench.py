"""Figures behind the classify stage's defaults: batch size, memory format, JPEG decoder, malloc.

Prints model-only throughput by batch size (random-init torchvision weights time the same as
trained ones, so nothing is downloaded) and decode + preprocess cost per image for each
decoder, on package-shipped photos and on a camera-sized (12 MP) JPEG, and the handler's CPU per
image with glibc's malloc defaults against ``malloc_keep_mb`` (one process each). Not a test.

    .venv/bin/python bench/classify_bench.py [--seconds 2] [--models mobilenet_v2,...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from PIL import Image

from pipeline.config import Settings
from pipeline.model import handler as model_handler
from pipeline.model import images, specs
from pipeline.model import weights as model_weights

BATCH_SIZES = (1, 4, 8, 16, 32, 64)


def per_call(fn: Callable[[], object], seconds: float, rounds: int = 3) -> float:
    """Seconds per call: the best of ``rounds`` round means (each >= 2 calls), after a warm-up.

    The best round, as in ``timeit``, because on a shared 2-core machine other processes only
    ever make a round slower.
    """
    fn()
    best = float("inf")
    for _ in range(rounds):
        calls, started = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - started < seconds / rounds:
            fn()
            calls += 1
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def build(name: str) -> torch.nn.Module:
    """Trained weights where bundled; otherwise random ones with calibrated batch norm."""
    if name == specs.EFFICIENTNET_LITE0:
        return model_weights.build_model(name, specs.WeightsSource("default"), Settings())
    model = torchvision.models.get_model(name, weights=None)
    # Fresh batch-norm statistics shrink activations to ~1e-9 by the logits: denormal floats,
    # which run far slower than a trained model's. A few train-mode passes fix the statistics.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        for _ in range(2):
            model.train()(torch.randn(8, 3, 224, 224))
    return model.eval()


def bench_models(names: list[str], seconds: float) -> None:
    print(f"\nmodel-only images/s (threads={torch.get_num_threads()}, 224x224, inference_mode)")
    print(f"{'model':<22}{'format':<15}" + "".join(f"{'b=' + str(b):>9}" for b in BATCH_SIZES))
    for name in names:
        model = build(name).eval()
        for memory_format in (torch.channels_last, torch.contiguous_format):
            model = model.to(memory_format=memory_format)
            rates = []
            for batch_size in BATCH_SIZES:
                batch = torch.randn(batch_size, 3, 224, 224).to(memory_format=memory_format)
                with torch.inference_mode():
                    rates.append(batch_size / per_call(lambda m=model, b=batch: m(b), seconds))
            label = str(memory_format).removeprefix("torch.")
            print(f"{name:<22}{label:<15}" + "".join(f"{r:>9.1f}" for r in rates))


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def sample_jpegs() -> dict[str, bytes]:
    import skimage.data

    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in ("chelsea", "coffee", "rocket")]
    camera = photos[0].resize((4032, 3024), Image.Resampling.BICUBIC)
    return {"photos (~450x300)": photos, "camera 4032x3024": [camera]}


def bench_decoders(seconds: float) -> None:
    spec = specs.model_spec(specs.DEFAULT_MODEL, specs.WeightsSource("default"))
    limits = {"max_bytes": Settings().max_bytes, "max_pixels": Settings().max_pixels}
    sets = sample_jpegs()
    print(f"\ndecode + resize {spec.preprocess.resize} + crop + normalise, ms/image")
    print(f"{'decoder':<14}" + "".join(f"{name:>20}" for name in sets))
    encoded = {name: [jpeg(img) for img in imgs] for name, imgs in sets.items()}
    for decoder in images.DECODERS:
        cells = []
        for blobs in encoded.values():

            def run(blobs: list[bytes] = blobs, decoder: str = decoder) -> None:
                for data in blobs:
                    images.load(data, spec.preprocess, decoder=decoder, **limits)

            cells.append(1000 * per_call(run, seconds) / len(blobs))
        print(f"{decoder:<14}" + "".join(f"{ms:>20.2f}" for ms in cells))


def bench_end_to_end(seconds: float) -> None:
    """run_inference on real JPEG bytes: what one Spark task sees per image."""
    handler = model_handler.TorchModelHandler(Settings(model=specs.EFFICIENTNET_LITE0))
    blobs = [jpeg(img) for img in sample_jpegs()["photos (~450x300)"]] * 16  # 3 batches
    rate = len(blobs) / per_call(lambda: handler.run_inference(blobs), seconds)
    print(f"\nend to end (decode + {handler.name}, batch {handler.settings.batch_size}): "
          f"{rate:.1f} images/s")  # fmt: skip


def allocator_child(mb: int, seconds: float) -> None:
    """One process: the handler on one thread with ``malloc_keep_mb=mb``; CPU and faults per image."""
    handler = model_handler.TorchModelHandler(
        Settings(model=specs.EFFICIENTNET_LITE0, torch_threads=1, malloc_keep_mb=mb))
    blobs = [jpeg(img) for img in sample_jpegs()["photos (~450x300)"]] * 16  # 3 batches
    for _ in range(2):
        handler.run_inference(blobs)  # the model loads, the heap grows to a batch's peak
    before, started, images = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        handler.run_inference(blobs)
        images += len(blobs)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    with open("/proc/self/status") as status:  # resident between batches, and at the peak
        kb = dict(line.split()[:2] for line in status if line.startswith(("VmRSS", "VmHWM")))
    print(json.dumps({"cpu_ms": 1000 * cpu / images, "faults": (after.ru_minflt - before.ru_minflt) / images,
                      "sys_ms": 1000 * (after.ru_stime - before.ru_stime) / images,
                      "rss_mb": int(kb["VmRSS:"]) / 1024, "peak_mb": int(kb["VmHWM:"]) / 1024}))


def bench_allocator(seconds: float) -> None:
    """glibc's defaults against the handler's kept memory (pipeline/model/allocator.py)."""
    figures = {}
    for mb in (0, Settings().malloc_keep_mb):
        done = subprocess.run([sys.executable, __file__, "--allocator-child", str(mb),
                               "--seconds", str(max(seconds, 3.0))],
                              capture_output=True, text=True, check=True)
        figures[mb] = json.loads(done.stdout.strip().splitlines()[-1])
    print("\nhandler on 1 thread, per image: CPU ms, of it in the kernel, minor page faults; "
          "resident MB between batches and at the peak")
    for mb, f in figures.items():
        label = "glibc defaults" if mb == 0 else f"malloc_keep_mb={mb}"
        print(f"{label:<22}{f['cpu_ms']:>8.1f}{f['sys_ms']:>8.1f}{f['faults']:>10.0f}"
              f"{f['rss_mb']:>8.0f}{f['peak_mb']:>8.0f}")
    default, kept = figures[0]["cpu_ms"], figures[Settings().malloc_keep_mb]["cpu_ms"]
    print(f"images per CPU-second, kept / defaults: {default / kept:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--models", default=f"mobilenet_v2,{specs.EFFICIENTNET_LITE0}")
    parser.add_argument("--threads", type=int, help="torch threads (default: as the pipeline)")
    parser.add_argument("--allocator-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allocator_child is not None:
        return allocator_child(args.allocator_child, args.seconds)
    if args.threads:
        os.environ[model_handler.THREADS_ENV] = str(args.threads)  # the handler honours it too
    torch.set_num_threads(model_handler.torch_threads(os.environ, os.cpu_count()))
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")  # fmt: skip
    bench_models(args.models.split(","), args.seconds)
    bench_decoders(args.seconds)
    bench_end_to_end(args.seconds)
    bench_allocator(args.seconds)


if __name__ == "__main__":
    main()
