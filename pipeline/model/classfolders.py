"""Class-folder datasets: ``<root>/<class>/<file>``, the layout the producer uploads and
``bucketlens train`` reads, on local disk or under a ``gs://`` prefix.

    from pipeline.model.classfolders import discover
    items = discover("flower_photos")        # [Item("daisy", Path(...), "5547758_eea9edfd54_n.jpg"), ...]
"""

from __future__ import annotations

import mimetypes
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.names import printable, split_gs

if TYPE_CHECKING:
    from pipeline.config import Settings


class DatasetError(RuntimeError):
    """A dataset problem the user can fix; the message is one sentence that says how."""


@dataclass(frozen=True)
class Item:
    """One image to replay: its true label (the class folder) and where it lies."""

    class_name: str
    path: Path
    relative: str = ""  # path below the class folder, '/'-separated; defaults to the file name

    def __post_init__(self) -> None:
        if not self.relative:
            object.__setattr__(self, "relative", self.path.name)


def is_image(path: Path) -> bool:
    """Image files by extension (any ``image/*`` type), so new formats need no code change."""
    kind, _ = mimetypes.guess_type(path.name)
    return kind is not None and kind.startswith("image/")


def _hidden(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def discover(root: Path | str) -> list[Item]:
    """Every image under ``root/<class>/``, sorted so that a seed alone fixes the replay order.

    Hidden files and folders and non-images (a LICENSE.txt, a .DS_Store) are skipped; files
    directly in ``root`` have no class and are skipped too.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Dataset directory {root} does not exist.")
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden([p.name])):
        for path in sorted(class_dir.rglob("*")):
            rel = path.relative_to(class_dir)
            if path.is_file() and _member(class_dir.name, rel.as_posix()):
                items.append(Item(class_dir.name, path, rel.as_posix()))
    return items


def check_classes(labels: Iterable[str], min_per_class: int = 2) -> list[str]:
    """The labels, sorted; a dataset that cannot train a classifier is one sentence (checked
    by ``bucketlens train`` before it loads torch, and again by training itself)."""
    counts = Counter(labels)
    if len(counts) < 2:
        found = f"only class {next(iter(counts))!r}" if counts else "no images"
        raise DatasetError(f"Training needs at least two classes; the dataset has {found}.")
    small = sorted(label for label, n in counts.items() if n < min_per_class)
    if small:
        raise DatasetError(
            f"Class folder(s) {', '.join(repr(s) for s in small)} have fewer than "
            f"{min_per_class} images: each class needs one to train on and one to validate.")
    return sorted(counts)


def _member(class_name: str, relative: str) -> bool:
    """Whether ``<class>/<relative>`` is one of the dataset's images."""
    return (not _hidden([class_name, *relative.split("/")]) and is_image(Path(relative))
            and _nameable(f"{class_name}/{relative}"))


def list_images(root: str, settings: Settings) -> list[tuple[str, str, int | None]]:
    """(path or gs:// URI, class, generation) of every image under ``root`` (a directory or
    gs://B/PREFIX), by the same rules as :func:`discover`, sorted."""
    if not root.startswith("gs://"):
        return [(str(item.path), item.class_name, None) for item in discover(root)]
    from pipeline.clients import storage_client

    bucket, prefix = split_gs(root)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    found = []
    for blob in storage_client(settings).list_blobs(bucket, prefix=prefix):
        class_name, _, relative = blob.name[len(prefix):].partition("/")
        if class_name and relative and not blob.name.endswith("/") and _member(class_name, relative):
            found.append((f"gs://{bucket}/{blob.name}", class_name, blob.generation))
    if not found:
        raise DatasetError(f"No images under {root}: expected {root.rstrip('/')}/<class>/<file>.")
    return sorted(found)


def _nameable(name: str) -> bool:
    """Whether ``name`` can become an object name that logs and terminals show as it is.

    GCS refuses carriage returns and line feeds in object names
    (https://cloud.google.com/storage/docs/objects#naming); other control and format
    characters (escape sequences, bidi overrides) would garble every log line naming the file.
    """
    return printable(name, limit=len(name)) == name
