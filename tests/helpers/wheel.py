"""The wheel as a user builds it, once per test run: ``uv build`` on a copy of the checkout.

test_deploy (the Serverless image's contents) and test_rehearsal (the job's virtualenv) both
need it, usually on different xdist workers. The first to ask builds it in the run's shared
temporary directory (each build is ~13 CPU-s: uv makes a fresh setuptools environment); the
other waits on the lock and takes the same file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        pytest.fail("uv is missing: `make venv` installs it")
    return found


def checkout_files() -> list[str]:
    """Tracked and new (not ignored) files: what a clean clone of this work would hold."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's wheel, built from a copy of :func:`checkout_files` on first use."""
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp sits in the run's own directory; alone, basetemp is it
    run_dir = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = run_dir / "bucketlens-wheel"
    out.mkdir(exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheels = sorted((out / "dist").glob("bucketlens-*.whl"))
        if not wheels:
            src = out / "src"
            shutil.rmtree(src, ignore_errors=True)  # a build that failed before
            for f in checkout_files():
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, src / f)
            subprocess.run([uv(), "build", "--wheel", "--quiet", "--out-dir", str(out / "dist"),
                            str(src)], check=True, timeout=600)
            wheels = sorted((out / "dist").glob("bucketlens-*.whl"))
    (wheel,) = wheels
    return wheel
