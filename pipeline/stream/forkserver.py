"""A warm process that forks Spark's Python daemons with torch already imported.

    python -m pipeline.stream.forkserver /tmp/bl/daemons.sock &   # imports once, then serves
    export BUCKETLENS_DAEMON_FORKSERVER=/tmp/bl/daemons.sock       # for the Spark drivers

Each Spark application starts its own Python daemon (``pipeline.stream.daemon``), which imports
torch, torchvision, pandas and the storage client before it forks any worker: ~4 CPU-s on a
2-core machine (15 without bytecode). A cluster pays that once per executor; a machine that starts many short
applications pays it every time (this project's test suite starts dozens). With the variable
set, the daemon Spark started sends its stdin, stdout and stderr (SCM_RIGHTS), environment,
working directory and argv to this server, which forks a child that takes them over and runs
pyspark's daemon loop with the libraries already in memory. The process Spark started stays as
the child's stand-in: it forwards Spark's SIGTERM and exits with the child's exit code.

A daemon imports for itself, as without the variable, when no server answers (not started,
still importing) or the server runs another interpreter, checkout or hash seed
(:func:`fingerprint`): a wheel installed elsewhere is never served this checkout's code.
Linux only (``os.pidfd_open``, Linux 5.3+).
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pipeline

ENV = "BUCKETLENS_DAEMON_FORKSERVER"
STDIO = (0, 1, 2)
MAX_REQUEST = 1 << 20  # argv, environment and sys.path as JSON: a few KB
REPLY_TIMEOUT_S = 30.0  # a fork of a warm process answers in milliseconds
FORWARDED = (signal.SIGTERM, signal.SIGINT)  # what Spark (or a user) sends its daemon
# What Spark gives its Python workers (PythonWorkerFactory): the server starts the same way.
WORKER_ENV = {"PYTHONHASHSEED": "0"}


def supported() -> bool:
    return hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


def fingerprint() -> list[str]:
    """What a served daemon must share with the server: interpreter, flags, hash seed and the
    files ``pipeline`` and torch come from (found without importing torch)."""
    torch = importlib.util.find_spec("torch")
    return [sys.executable, repr(sys.flags), os.environ.get("PYTHONHASHSEED", ""),
            os.path.realpath(pipeline.__file__), os.path.realpath(torch.origin or "") if torch else ""]


def preload() -> None:
    """What a classifying daemon imports before it forks (here, or once in the server)."""
    import pipeline.stream.executor  # noqa: F401 — torch, torchvision, pandas, the storage client


def _send(conn: socket.socket, message: dict) -> None:
    conn.send(json.dumps(message).encode())


def _receive(conn: socket.socket) -> dict:
    return json.loads(conn.recv(MAX_REQUEST) or b"{}")


# ---- the daemon Spark started -------------------------------------------------------------

def handoff(path: str, argv: list[str]) -> int | None:
    """Have the server at ``path`` fork this daemon and wait for it: its exit code, or None when
    no server serves this interpreter (then the caller imports and runs the daemon itself)."""
    if not supported():
        return None
    served: list[int] = []  # the daemon's pid, once the server's child took over
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not served:
            pending.append(signum)
            return
        try:
            os.kill(served[0], signum)
        except ProcessLookupError:  # gone already: _wait returns
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.settimeout(REPLY_TIMEOUT_S)
        conn.connect(path)
        request = {"fingerprint": fingerprint(), "argv": argv, "env": dict(os.environ),
                   "cwd": os.getcwd(), "path": sys.path}
        socket.send_fds(conn, [json.dumps(request).encode()], list(STDIO))
        pid = _receive(conn).get("pid")
        if pid is None:
            raise ConnectionRefusedError("the server runs another interpreter or checkout")
        _send(conn, {"go": True})  # from here the child owns stdin/stdout: no way back
    except OSError:
        conn.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in pending:  # received while asking: as if it had come to the daemon
            os.kill(os.getpid(), signum)
        return None
    with conn:
        served.append(pid)
        for signum in pending:
            os.kill(pid, signum)
        return _wait(pid, conn)


def _wait(pid: int, conn: socket.socket) -> int:
    """The served daemon's exit code (1 when it died without saying, as from SIGKILL)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        pidfd = None
    if pidfd is not None:
        try:
            select.select([pidfd], [], [])  # readable once the process exits
        finally:
            os.close(pidfd)
    conn.setblocking(False)
    try:
        return int(_receive(conn).get("exit", 1))
    except (OSError, ValueError):
        return 1


# ---- the server ---------------------------------------------------------------------------

def serve(path: str) -> None:
    """Import what the daemon preloads, then fork a daemon per connection until the process
    that started this one exits (or SIGTERM)."""
    from pyspark import daemon as spark_daemon

    preload()
    mine = fingerprint()
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the daemons
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(path)
        listener.listen(64)
        while os.getppid() == parent:
            if not select.select([listener], [], [], 1.0)[0]:
                continue
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                os._exit(_become_daemon(conn, mine, spark_daemon.manager))
            conn.close()
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)


def _become_daemon(conn: socket.socket, mine: list[str], manager: Callable[[], None]) -> int:
    """In the forked child: take over the requesting daemon's stdio, environment and directory,
    then run pyspark's daemon loop; its exit code goes back to the stand-in."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    conn.settimeout(REPLY_TIMEOUT_S)
    try:
        data, fds, flags, _ = socket.recv_fds(conn, MAX_REQUEST, len(STDIO))
        request = json.loads(data)
        if request["fingerprint"] != mine or len(fds) != len(STDIO) or flags & socket.MSG_TRUNC:
            _send(conn, {})
            return 0
        _send(conn, {"pid": os.getpid()})
        if not _receive(conn).get("go"):
            return 0
    except (OSError, ValueError, KeyError):
        return 1
    conn.settimeout(None)
    for fd, target in zip(fds, STDIO, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()  # TZ is the requester's (a test runs the stream in another zone)
    sys.argv[:] = request["argv"]
    sys.path[:] = request["path"]
    code = 1
    try:
        manager()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    try:
        _send(conn, {"exit": code})
    except OSError:
        pass
    return code


def start(path: Path) -> subprocess.Popen:
    """A server for this interpreter at ``path``, started the way Spark starts its workers; it
    answers once it has imported (~10 s) and exits with the process that started it."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.stream.forkserver", str(path)],
                            env={**os.environ, **WORKER_ENV}, stdin=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not supported():
        sys.exit("usage: python -m pipeline.stream.forkserver SOCKET  (Linux 5.3+)")
    serve(sys.argv[1])
