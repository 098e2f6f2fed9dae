"""A drifting upload stream for the drift tests: the sample photos, then the same photos with
one class gone and half of them darkened (a camera fault, a night shift)."""

from __future__ import annotations

from pathlib import Path

from pipeline.model.classfolders import discover
from producer.datasets import sample_dataset

DROPPED = "coffee"
DARKNESS = 0.15  # brightness factor: changes 7 of the 10 sample photos' top-1 (efficientnet_lite0)
# what the drift tests publish on: the class mix moves about 0.28 (Jensen–Shannon) once the
# change is in a whole window, while clean windows of the sample replay stay under 0.06
RULES = {"rules": [
    {"name": "cats", "labels": ["tabby", "tiger cat", "Egyptian cat"]},
    {"name": "mix-shift", "drift": "class_mix", "threshold": 0.15, "min_images": 10},
]}


def drifted_dataset(root: Path) -> Path:
    """``root/<class>/<photo>`` and ``<photo>-dark.jpg`` for every sample class but DROPPED."""
    from PIL import Image, ImageEnhance

    for item in discover(sample_dataset()):
        if item.class_name == DROPPED:
            continue
        folder = root / item.class_name
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.open(item.path).convert("RGB")
        image.save(folder / f"{Path(item.relative).stem}.jpg", "JPEG", quality=90)
        ImageEnhance.Brightness(image).enhance(DARKNESS).save(
            folder / f"{Path(item.relative).stem}-dark.jpg", "JPEG", quality=90)
    return root
