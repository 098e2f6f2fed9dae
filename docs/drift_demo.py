"""Makes docs/drift.png and the README's drift view examples: the demo's 60 sample photos, then
60 more with one class gone and half of them darkened, streamed on a fresh local stack.

    python docs/drift_demo.py [RUN_DIR]      # about 2 minutes; the stack is stopped at the end
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy import localstack  # noqa: E402
from pipeline import clients  # noqa: E402
from pipeline.bigquery.views import create_views  # noqa: E402
from pipeline.commands import report  # noqa: E402
from pipeline.config import Settings  # noqa: E402
from pipeline.model.classfolders import discover  # noqa: E402
from pipeline.stream import job  # noqa: E402
from producer.datasets import sample_dataset  # noqa: E402
from producer.replay import replay  # noqa: E402
from tests.helpers.drift import drifted_dataset  # noqa: E402

WINDOW = "2"  # seconds: the demo uploads 10 photos a second, so 20 a window
EXAMPLES = [
    "SELECT window_start, images, ROUND(class_mix, 3) AS class_mix, "
    "ROUND(confidence_p50, 3) AS confidence_p50, ROUND(low_margin_share, 3) AS low_margin_share "
    "FROM drift_windows ORDER BY window_start",
    "SELECT window_start, ROUND(embedding_shift, 3) AS embedding_shift FROM embedding_drift "
    "ORDER BY window_start",
]


def main(run_dir: Path) -> None:
    state = localstack.up(run_dir)
    try:
        with localstack.environment(state.env()):
            settings = Settings.from_env(drift_window=WINDOW, embeddings=True)
            query, _ = job.start(settings)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    replay(discover(sample_dataset()), settings, rate=10, limit=60, loop=True,
                           seed=0, progress=False)
                    replay(discover(drifted_dataset(Path(tmp))), settings.replace(prefix="later"),
                           rate=10, limit=60, loop=True, seed=0, progress=False)
                bq = clients.bigquery_client(settings)
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    (n,) = bq.query(f"SELECT COUNT(*) FROM `{settings.table_id}`").result()
                    if n[0] >= 120:
                        break
                    time.sleep(2)
            finally:
                query.stop()
            create_views(settings, bq)
            results = report.fetch(bq, settings)
            windows, series = report.drift_series(results["drift_windows"],
                                                  results["embedding_drift"])
            report.plot_drift(windows, series, ROOT / "docs" / "drift.png")
            print(report.drift_note(results["drift_windows"]))
            env = {**os.environ, **state.env(), "PYTHONPATH": str(ROOT)}
            for sql in EXAMPLES:  # what `bucketlens sql` prints
                print(f'$ bucketlens sql "{sql}"', flush=True)
                subprocess.run([sys.executable, "-m", "deploy.cli", "sql", sql], env=env,
                               cwd=ROOT, check=True)
    finally:
        localstack.down(run_dir)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    try:
        main(target)
    finally:
        if len(sys.argv) == 1:
            shutil.rmtree(target, ignore_errors=True)
