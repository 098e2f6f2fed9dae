"""Configuration reaches code through ``Settings`` only (issue 17).

No module of ``pipeline``, ``producer`` or ``deploy`` reads a ``BUCKETLENS_*`` or
``*_EMULATOR_HOST`` variable from the process environment behind ``Settings``' back, and none
changes the environment. An AST walk checks every module; the few places that may are listed
below, each with its reason. Then the clients and the Pub/Sub source are shown to take their
emulators from Settings and reader options, whatever the environment says.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import clients
from pipeline.config import Settings
from pipeline.stream.source import PubSubOptions

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "producer", "deploy")

# Modules not walked at all.
NOT_WALKED = {
    "pipeline/config.py": "Settings.from_env: the one place that reads configuration variables",
}
# (module, enclosing function) → why it may read or write the environment there. A listed place
# that no longer does so fails the test below, so this list only shrinks.
ALLOWED = {
    ("pipeline/__init__.py", "<module>"):
        "GRPC_ENABLE_FORK_SUPPORT: grpc reads it once, when it is first imported, before any "
        "Settings exist (Spark forks Python workers from a process that imported grpc)",
    ("pipeline/stream/forkserver.py", "_become_daemon"):
        "a daemon forked from the fork server takes the environment Spark gave the daemon it "
        "stands in for (worker secret, PYTHONPATH, the stack's variables), as its own",
    ("deploy/localstack.py", "find_pubsub_emulator"):
        "BUCKETLENS_PUBSUB_EMULATOR: where the emulator's start script lives, for spawning it",
    ("deploy/localstack.py", "environment"):
        "sets the stack's variables around a block and restores them: the demo's Spark workers "
        "and child commands inherit them (deploy/demo.py, tests)",
    ("deploy/bq_emulator.py", "main"):
        "BUCKETLENS_BQ_EMULATOR_NO_SNAPSHOTS: a switch for the bqemulator launcher process, "
        "which has no Settings; the environment is how its parent reaches it",
    ("deploy/cli.py", "build_parser"):
        "BUCKETLENS_RUN_DIR: the default of `bucketlens local --run-dir`, the local stack's "
        "directory, which is not a Settings field",
    ("producer/datasets.py", "cache_dir"):
        "BUCKETLENS_CACHE: the producer's dataset cache, documented there; not a Settings field",
    ("producer/datasets.py", "download_flowers"):
        "BUCKETLENS_FLOWERS_URL: a mirror for the flowers download; not a Settings field",
}

WRITERS = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def configuration_key(key: str) -> bool:
    return key.startswith("BUCKETLENS_") or key.endswith("_EMULATOR_HOST")


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    function: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.function}): {self.what}"


class _Walker(ast.NodeVisitor):
    """Finds environment reads of configuration keys and every environment write."""

    def __init__(self, path: str, tree: ast.Module) -> None:
        self.path = path
        self.found: list[Violation] = []
        self._function = ["<module>"]
        self._environ = {"environ"} if self._imports_from_os(tree, "environ") else set()
        self._getenv = {"getenv"} if self._imports_from_os(tree, "getenv") else set()
        # NAME = "BUCKETLENS_..." at module level: keys are often named constants
        self._constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                           and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                           for t in n.targets if isinstance(t, ast.Name)}

    @staticmethod
    def _imports_from_os(tree: ast.Module, name: str) -> bool:
        return any(isinstance(n, ast.ImportFrom) and n.module == "os"
                   and any(a.name == name and a.asname is None for a in n.names)
                   for n in ast.walk(tree))

    def _is_os(self, node: ast.AST, attr: str, imported: set[str]) -> bool:
        return ((isinstance(node, ast.Attribute) and node.attr == attr
                 and isinstance(node.value, ast.Name) and node.value.id == "os")
                or (isinstance(node, ast.Name) and node.id in imported))

    def _key(self, node: ast.AST | None) -> str | None:
        """The variable name a key expression spells, as far as it can be known statically;
        an f-string keeps its literal head and tail (``f"BUCKETLENS_{x}"``)."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return self._constants.get(node.id)
        if isinstance(node, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
            return "".join(parts)
        return None

    def _add(self, node: ast.AST, what: str) -> None:
        self.found.append(Violation(self.path, node.lineno, self._function[-1], what))

    def _read(self, node: ast.AST, key_node: ast.AST | None) -> None:
        key = self._key(key_node)
        if key is not None and configuration_key(key):
            self._add(node, f"reads {key} from the environment")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:  # noqa: N802
        self._function.append(node.name)
        self.generic_visit(node)
        self._function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_Subscript(self, node: ast.Subscript) -> None:  # noqa: N802
        if self._is_os(node.value, "environ", self._environ):
            if isinstance(node.ctx, ast.Load):
                self._read(node, node.slice)
            else:
                self._add(node, "writes os.environ")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        f = node.func
        first = node.args[0] if node.args else None
        if isinstance(f, ast.Attribute) and self._is_os(f.value, "environ", self._environ):
            if f.attr in WRITERS:
                self._add(node, f"writes os.environ ({f.attr})")
            elif f.attr == "get":
                self._read(node, first)
        elif self._is_os(f, "getenv", self._getenv):
            self._read(node, first)
        elif self._is_os(f, "putenv", set()) or self._is_os(f, "unsetenv", set()):
            self._add(node, "writes the environment (putenv/unsetenv)")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:  # noqa: N802
        for op, right in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn) and self._is_os(right, "environ", self._environ):
                self._read(node, node.left)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:  # noqa: N802
        if any(self._is_os(t, "environ", self._environ) for t in node.targets):
            self._add(node, "replaces os.environ")
        self.generic_visit(node)


def violations(source: str, path: str = "<string>") -> list[Violation]:
    tree = ast.parse(source, filename=path)
    walker = _Walker(path, tree)
    walker.visit(tree)
    return walker.found


def modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_checker_catches_each_way_of_reading_or_writing() -> None:
    bad = '''
import os
from os import environ, getenv
KEY = "BUCKETLENS_PROJECT"

def reads(name):
    a = os.environ["BUCKETLENS_BUCKET"]
    b = os.environ.get("PUBSUB_EMULATOR_HOST", "")
    c = os.getenv("STORAGE_EMULATOR_HOST")
    d = environ.get(KEY)
    e = getenv(f"BUCKETLENS_{name.upper()}")
    f = "BUCKETLENS_TOPIC" in os.environ

def writes():
    os.environ["PUBSUB_EMULATOR_HOST"] = "127.0.0.1:1"
    os.environ.setdefault("ANYTHING", "1")
    environ.update({"X": "1"})
    del os.environ["HOME"]
    os.putenv("Y", "2")
'''
    found = violations(bad)
    assert [(v.line, v.function) for v in found] == [
        (7, "reads"), (8, "reads"), (9, "reads"), (10, "reads"), (11, "reads"), (12, "reads"),
        (15, "writes"), (16, "writes"), (17, "writes"), (18, "writes"), (19, "writes")]
    assert "reads BUCKETLENS_PROJECT" in str(found[3])


def test_the_checker_leaves_other_variables_and_settings_alone() -> None:
    fine = '''
import os
from pipeline.config import Settings
home = os.environ.get("HOME")
gateway = os.environ["PYSPARK_GATEWAY_PORT"]
child = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
settings = Settings.from_env()
host = settings.pubsub_emulator_host
'''
    assert violations(fine) == []


def test_no_module_reads_configuration_or_writes_the_environment_behind_settings() -> None:
    found = [v for path in modules() if path not in NOT_WALKED
             for v in violations((ROOT / path).read_text(), path)]
    unexplained = [str(v) for v in found if (v.path, v.function) not in ALLOWED]
    assert not unexplained, ("configuration must come from Settings (pipeline/config.py), and "
                             "only the places in ALLOWED may touch the environment:\n"
                             + "\n".join(unexplained))
    stale = set(ALLOWED) - {(v.path, v.function) for v in found}
    assert not stale, f"no longer touch the environment, drop them from ALLOWED: {sorted(stale)}"
    assert set(NOT_WALKED) <= set(modules())


# -- the places that used to read the environment ------------------------------------------

def test_storage_client_uses_the_settings_emulator_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    client = clients.storage_client(Settings(storage_emulator_host="http://127.0.0.1:2"))
    assert client.api_endpoint == "http://127.0.0.1:2"
    assert type(client._credentials).__name__ == "AnonymousCredentials"


@pytest.mark.parametrize("factory", [clients.subscriber_client, clients.publisher_client])
def test_pubsub_clients_use_the_settings_emulator_over_the_environment(monkeypatch, factory) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    client = factory(Settings(pubsub_emulator_host="127.0.0.1:2"))
    try:
        assert client.transport._host == "127.0.0.1:2"
    finally:
        client.transport.close()


def test_a_short_subscription_needs_the_project_option(monkeypatch) -> None:
    monkeypatch.setenv("BUCKETLENS_PROJECT", "from-the-environment")
    with pytest.raises(ValueError, match='not a full path.*option\\("project"'):
        PubSubOptions.parse({"subscription": "uploads"})
    opts = PubSubOptions.parse({"subscription": "uploads", "project": "p"})
    assert opts.subscription == "projects/p/subscriptions/uploads"


@pytest.mark.spark
@pytest.mark.timeout(300)
@pytest.mark.process
def test_python_workers_run_this_interpreter_without_pyspark_python(tmp_path) -> None:
    """``session`` points Spark's Python workers at this interpreter without setting
    ``PYSPARK_PYTHON`` (``spark.pyspark.python`` alone does not reach them when the driver is
    this process, so the session's context is told directly)."""
    names = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")
    code = ("import os\n"
            "from pyspark.sql.functions import udf\n"
            "from pipeline.stream.spark import session\n"
            f"s = session('local[1]', app='python-workers', log_file={str(tmp_path / 'spark.log')!r})\n"
            "exe = udf(lambda _: __import__('sys').executable)\n"
            "print(s.range(1).select(exe('id')).first()[0])\n"
            f"print(len([k for k in {names!r} if k in os.environ]))\n"
            "s.stop()\n")
    env = {k: v for k, v in os.environ.items() if k not in names}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=280, cwd=ROOT, env={**env, "SPARK_LOCAL_IP": "127.0.0.1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == [sys.executable, "0"]


# --------------------------------------------------------------------------- README's table


def readme_configuration_rows() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of each row of README's "Configuration" table; the table
    ends at its first line that is not a table row (a blank line cuts it there)."""
    text = (ROOT / "README.md").read_text()
    lines = text[text.index("\n## Configuration\n"):].splitlines()
    start = lines.index("| variable | default | meaning |") + 2  # past the header's rule
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        variable, default, meaning = (cell.strip() for cell in line.strip(" |").split(" | "))
        rows.append((variable.strip("`"), default, meaning))
    return rows


def shown(value: object) -> str:
    """A default as the README writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_readme_configuration_table_has_each_settings_field_once_with_its_default() -> None:
    """One row per Settings field (the list comes from the class, so a new field without a row
    fails here), named by its variable, with the field's default first in the default cell."""
    from dataclasses import fields

    from pipeline.config import ENV_PREFIX

    rows = readme_configuration_rows()
    defaults = {ENV_PREFIX + f.name.upper(): f.default for f in fields(Settings)}
    variables = [variable for variable, _, _ in rows]
    assert sorted(set(defaults) - set(variables)) == [], "Settings fields with no README row"
    assert sorted(set(variables) - set(defaults)) == [], "README rows that are no Settings field"
    assert len(variables) == len(set(variables)), "a variable has two rows"
    for variable, default, meaning in rows:
        assert meaning, variable
        if defaults[variable] == "":
            assert default.startswith("*(empty"), (variable, default)
        else:
            first = default.split("`")[1] if default.startswith("`") else default
            assert first == shown(defaults[variable]), (variable, default)
