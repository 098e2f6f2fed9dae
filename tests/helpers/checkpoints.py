"""A state dict served on loopback under the name torch.hub checks, for the weights download
path (real HTTP, no internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def serve_checkpoint(state_dict: Path, root: Path, stem: str = "mobilenet_v2") -> Iterator[str]:
    """Serve ``state_dict`` from ``root`` as ``<stem>-<sha256[:8]>.pth`` (torch.hub checks the
    hash prefix in the name); yields its URL and stops the server after."""
    data = state_dict.read_bytes()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (root / name).write_bytes(data)
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *_: None})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/{name}"
    finally:
        server.shutdown()
        server.server_close()
