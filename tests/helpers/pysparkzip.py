"""Bytecode inside this virtualenv's ``pyspark/python/lib/pyspark.zip``, once.

    .venv/bin/python -m tests.helpers.pysparkzip      # the Makefile runs it after each install

Spark puts ``$SPARK_HOME/python/lib/pyspark.zip`` first on the PYTHONPATH of every Python
process it starts (PythonUtils.sparkPythonPath): the daemons, their workers, the data-source
planners and the streaming source's runner. Python never writes bytecode into a zip, so each of
those processes compiled the pyspark modules it imports from source: 0.5-0.6 CPU-s per process
(``pyspark.worker`` 0.81 CPU-s from the zip, 0.16 from site-packages), a few hundred processes
per ``make test``. zipimport uses a ``.pyc`` stored beside the ``.py`` in the archive; stored
as unchecked hash-based pycs (PEP 552) they need no timestamps to match. The archive is
rewritten next to itself and renamed over it, so a hard link into uv's cache stays untouched.
Test machinery only: a cluster's Spark ships its own zip.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
import zipfile
from importlib._bootstrap_external import _code_to_hash_pyc  # the one public-ish writer
from pathlib import Path


def archive() -> Path:
    spec = importlib.util.find_spec("pyspark")
    assert spec is not None and spec.origin, "pyspark is not installed"
    return Path(spec.origin).parent / "python" / "lib" / "pyspark.zip"


def compiled(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return "pyspark/__init__.pyc" in z.namelist()


def add_bytecode(path: Path) -> int:
    """Rewrite ``path`` with a pyc for every module in it; the number of modules compiled."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    count = 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            data = src.read(info)
            out.writestr(info, data)
            if info.filename.endswith(".py") and "/tests/" not in info.filename:
                with warnings.catch_warnings():  # pyspark's own SyntaxWarnings, said once
                    warnings.simplefilter("ignore")
                    code = compile(data, f"{path}/{info.filename}", "exec", dont_inherit=True)
                pyc = _code_to_hash_pyc(code, importlib.util.source_hash(data), checked=False)
                out.writestr(zipfile.ZipInfo(info.filename + "c", info.date_time), bytes(pyc))
                count += 1
    os.replace(partial, path)
    return count


def main() -> int:
    path = archive()
    if not path.is_file() or compiled(path):
        return 0
    n = add_bytecode(path)
    print(f"{path}: bytecode for {n} modules", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
