"""The bytecode added to pyspark.zip is what zipimport loads, and the archive keeps its sources."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.helpers import pysparkzip

pytestmark = pytest.mark.process


def test_modules_import_from_the_added_bytecode_and_the_sources_stay(tmp_path) -> None:
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/mod.py", "def answer():\n    return 42\n")
        z.writestr("pkg/tests/test_x.py", "def broken(:\n")  # tests are left as they are
    assert pysparkzip.add_bytecode(archive) == 2
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"pkg/__init__.pyc", "pkg/mod.pyc", "pkg/mod.py", "pkg/tests/test_x.py"} <= names
    assert "pkg/tests/test_x.pyc" not in names
    probe = "import pkg.mod, inspect; print(pkg.mod.__file__, pkg.mod.answer(), " \
            "inspect.getsource(pkg.mod.answer).split()[1])"
    out = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(archive)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [f"{archive}/pkg/mod.pyc", "42", "answer():"]
