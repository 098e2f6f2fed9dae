"""The README's quick commands work offline as written, and ``--json`` output is only JSON lines.

The commands are read from README.md itself, so the test breaks when the README drifts from
the CLI; the ones that need no running stack are run for real, in a fresh process with no
BUCKETLENS_* variables, as a new user's shell would run them.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import cli as app_cli
from tests.helpers.checkpoints import serve_checkpoint
from tests.test_cli_usage import ROOT, clean_env

# every test here starts a fresh interpreter or shell, as a user would: `make test`, not `make check`
pytestmark = pytest.mark.process

README = ROOT / "README.md"
QUICK_SECTIONS = ("Trying it locally, step by step", "Commands")
NO_STACK = {"classify"}  # quick commands that need no running stack: these run for real here
TEMPLATE = re.compile(r"[|\[\]…]")  # `a|b`, `[--flag]`, `SELECT …`: a pattern, not a command
MAIN = "import sys\nfrom deploy.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end == -1 else text[start:end]


def quick_commands() -> list[list[str]]:
    """The argv of each ``bucketlens …`` line in the quick sections' bash blocks (comments and a
    trailing ``&`` dropped)."""
    found = []
    for title in QUICK_SECTIONS:
        for block in re.findall(r"```bash\n(.*?)```", readme_section(title), re.S):
            for line in block.splitlines():
                argv = shlex.split(line, comments=True)
                if argv[-1:] == ["&"]:
                    argv.pop()
                if argv[:1] == ["bucketlens"]:
                    found.append(argv[1:])
    return found


def is_template(argv: list[str]) -> bool:
    return any(TEMPLATE.search(arg) for arg in argv)


def run_bucketlens(argv: list[str], cwd: Path, script: str = MAIN,
                   **env: str) -> subprocess.CompletedProcess:
    """``bucketlens ARGV`` in a fresh process (``script`` may wrap the entry point)."""
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=clean_env(**env))


def json_lines(stdout: str) -> list[dict]:
    """Every stdout line parsed as JSON: fails on the first line that is not."""
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """A directory with one real photo (scikit-image's cat) under each name the README uses."""
    import skimage.data
    from PIL import Image

    d = tmp_path_factory.mktemp("readme")
    for argv in quick_commands():
        if argv[0] in NO_STACK and not is_template(argv):
            for path in app_cli.build_parser().parse_args(argv).paths:
                Image.fromarray(skimage.data.chelsea()).save(d / path, "JPEG")
    return d


def test_the_quick_commands_parse_and_name_only_real_flags() -> None:
    commands = quick_commands()
    assert len(commands) >= 10, commands  # the sections are still there
    parser = app_cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for argv in commands:
        assert argv[0] in subcommands, argv
        if is_template(argv):  # a pattern: its flags must still exist
            known = subcommands[argv[0]]._option_string_actions
            for flag in re.findall(r"--[a-z][a-z-]*", " ".join(argv)):
                assert flag in known, f"{flag} in README's `bucketlens {' '.join(argv)}`"
        else:
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"README's `bucketlens {' '.join(argv)}` does not parse ({exc.code})")


def test_the_quick_commands_that_need_no_stack_work_offline(photo_dir, tmp_path) -> None:
    runnable = [a for a in quick_commands() if a[0] in NO_STACK and not is_template(a)]
    assert runnable, "README lost its quick classify command"
    for argv in runnable:
        # an empty torch cache: nothing downloaded before can help
        done = run_bucketlens(argv, photo_dir, TORCH_HOME=str(tmp_path))
        assert done.returncode == 0, f"`bucketlens {' '.join(argv)}`: {done.stderr}"
        assert "Traceback" not in done.stderr
        if "--json" in argv:
            rows = json_lines(done.stdout)
            assert [r["status"] for r in rows] == ["ok"] * len(rows) and rows, done.stdout
        else:
            assert done.stdout.strip()


# --------------------------------------------------------------------------- --json is JSON only

# The real command, with torchvision's weight URLs pointed at a loopback server (no internet):
# torch.hub prints its "Downloading: …" line with sys.stdout.write while it fetches.
REDIRECTED = """
import sys
from torchvision.models import _api
real = _api.load_state_dict_from_url
_api.load_state_dict_from_url = lambda url, *args, **kwargs: real(sys.argv[1], *args, **kwargs)
from deploy.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def weights_server(tmp_path) -> Iterator[str]:
    """The URL of a random-init MobileNetV2 state dict, served on loopback under the name
    torch.hub checks its hash against."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "mnv2.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    with serve_checkpoint(path, tmp_path / "served") as url:
        yield url


def test_classify_json_stdout_is_only_json_while_weights_download(photo_dir, weights_server,
                                                                   tmp_path) -> None:
    done = run_bucketlens([weights_server, "classify", "photo.jpg", "--json"], photo_dir,
                          script=REDIRECTED, TORCH_HOME=str(tmp_path / "torch"))
    assert done.returncode == 0, done.stderr
    assert f'Downloading: "{weights_server}"' in done.stderr  # it did download, and said so there
    (row,) = json_lines(done.stdout)
    assert row["path"] == "photo.jpg" and row["status"] == "ok" and len(row["top5"]) == 5


def test_classify_json_offline_with_the_default_model_prints_no_stdout(photo_dir, tmp_path) -> None:
    """Offline, mobilenet_v2's download fails: stdout stays JSON-only (here: empty) and the one
    sentence on stderr names the offline model."""
    done = run_bucketlens(["classify", "photo.jpg", "--json"], photo_dir, TORCH_HOME=str(tmp_path))
    rows = json_lines(done.stdout)
    if done.returncode == 2:  # no internet (as on these machines)
        assert rows == []
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("bucketlens: ") and "--model efficientnet_lite0" in last, done.stderr
    else:  # the real weights came down
        assert done.returncode == 0 and [r["status"] for r in rows] == ["ok"]
