"""What a Dataproc node or the Serverless container installs besides the bucketlens wheel.

    python -m deploy.requirements torch            # torch, torchvision (from PyTorch's own index)
    python -m deploy.requirements rest [EXTRA...]  # everything else, plus the extras named

Read from the installed wheel's own metadata (``Requires-Dist``), so the init action and the
Dockerfile install exactly what pyproject.toml declares. ``pyspark`` is never listed: the
cluster's image provides Spark, and Serverless mounts its Spark into the container (custom
containers doc: do not include Spark), so a second copy from PyPI could disagree with the JVM.
Only the standard library is imported: it runs before the dependencies exist.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from importlib.metadata import requires

GROUPS = ("torch", "rest")
TORCH = frozenset({"torch", "torchvision"})  # installed from --index-url (CPU-only wheels)
PROVIDED = frozenset({"pyspark"})  # the platform's Spark


def name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()


def extra_of(requirement: str) -> str | None:
    found = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
    return found.group(1) if found else None


def job_requirements(declared: Iterable[str], group: str, extras: Sequence[str] = ()) -> list[str]:
    """The requirements of ``group`` (``torch`` or ``rest``), markers dropped, pyspark never (pure)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, not {group!r}")
    out = []
    for req in declared:
        name, extra = name_of(req), extra_of(req)
        if name in PROVIDED or (extra is not None and extra not in extras):
            continue
        if (name in TORCH) == (group == "torch"):
            out.append(req.split(";")[0].replace(" ", ""))
    return out


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in GROUPS:
        print(f"usage: python -m deploy.requirements {{{'|'.join(GROUPS)}}} [EXTRA...]", file=sys.stderr)
        return 2
    print("\n".join(job_requirements(requires("bucketlens") or [], argv[0], argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
