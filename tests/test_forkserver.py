"""The daemon fork server against pyspark's real daemon loop: the process Spark would start hands
its pipes, environment and directory over, and the daemon forked from the server speaks Spark's
protocol (port on stdout, a forked worker per connection, the auth secret from the environment).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.stream import forkserver

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(not forkserver.supported(), reason="Linux 5.3+ only")]
SECRET = "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    path = tmp_path_factory.mktemp("fs") / "daemons.sock"
    proc = forkserver.start(path)
    deadline = time.monotonic() + 120
    while not _answers(path):
        assert proc.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server never listened"
        time.sleep(0.2)
    yield proc, path
    proc.terminate()
    assert proc.wait(30) == 0
    assert not path.exists()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        s.send(b"{}")  # a malformed request: the child it forks says nothing and exits
    return True


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _has_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _daemon(path: Path, cwd: Path) -> tuple[subprocess.Popen, int]:
    """``python -m pipeline.stream.daemon pyspark.worker`` as Spark starts it; its port."""
    env = {**os.environ, forkserver.ENV: str(path), "PYTHON_WORKER_FACTORY_SECRET": SECRET,
           "SPARK_REUSE_WORKER": "1", **forkserver.WORKER_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.stream.daemon", "pyspark.worker"],
                            cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    (port,) = struct.unpack("!i", proc.stdout.read(4))
    return proc, port


def test_the_daemon_is_forked_from_the_server_and_speaks_sparks_protocol(server, tmp_path) -> None:
    srv, path = server
    proc, port = _daemon(path, tmp_path)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        f = conn.makefile("rwb")
        (worker,) = struct.unpack("!i", f.read(4))  # the worker it forked says its pid
        f.write(struct.pack("!i", len(SECRET)) + SECRET.encode())  # the secret: from its env
        f.flush()
        (n,) = struct.unpack("!i", f.read(4))
        assert f.read(n) == b"ok"
        served = _parent(worker)
        assert served != proc.pid and _parent(served) == srv.pid
        assert os.readlink(f"/proc/{served}/cwd") == str(tmp_path)
        assert _has_torch(served) and not _has_torch(proc.pid)
    proc.stdin.close()  # as a JVM that exits: the daemon shuts down, its stand-in follows
    # pyspark's daemon exits 1 even then (its `finally` calls shutdown(1)): passed on as it is
    assert proc.wait(30) == 1
    assert not Path(f"/proc/{served}").exists()


def test_sigterm_to_the_process_spark_started_stops_the_served_daemon(server, tmp_path) -> None:
    proc, port = _daemon(server[1], tmp_path)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        (worker,) = struct.unpack("!i", conn.makefile("rb").read(4))
        served = _parent(worker)
    proc.send_signal(signal.SIGTERM)  # PythonWorkerFactory.stopDaemon: Process.destroy()
    assert proc.wait(30) == 1
    deadline = time.monotonic() + 30
    while Path(f"/proc/{served}").exists() or Path(f"/proc/{worker}").exists():
        assert time.monotonic() < deadline, "the served daemon or its worker outlived SIGTERM"
        time.sleep(0.1)


def test_without_a_server_the_daemon_imports_and_forks_its_workers_itself(tmp_path) -> None:
    """What runs on a cluster: no server at the path, so the daemon Spark started is the one."""
    proc, port = _daemon(tmp_path / "nobody.sock", tmp_path)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        (worker,) = struct.unpack("!i", conn.makefile("rb").read(4))
        assert _parent(worker) == proc.pid and _has_torch(proc.pid)
    proc.stdin.close()
    assert proc.wait(30) == 1


def test_a_server_that_cannot_serve_this_interpreter_is_not_used(server, tmp_path,
                                                                 monkeypatch) -> None:
    before = {s: signal.getsignal(s) for s in forkserver.FORWARDED}
    assert forkserver.handoff(str(tmp_path / "nobody.sock"), ["daemon"]) is None
    monkeypatch.setattr(forkserver, "fingerprint", lambda: ["another", "interpreter"])
    assert forkserver.handoff(str(server[1]), ["daemon"]) is None
    # then the daemon imports for itself, with its own signal handlers as they were
    assert {s: signal.getsignal(s) for s in forkserver.FORWARDED} == before
