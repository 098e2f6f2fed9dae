"""`bucketlens report`: row shaping (pure), and plots/tables/page from the real views, with the
plotted values read back from the matplotlib artists and compared with the query results."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline import cli, clients, report
from pipeline.config import Settings
from tests.helpers.views import T0, load, quality_rows, select, timing_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def minute(n: int) -> datetime:
    return T0 + timedelta(minutes=n)


# --- pure -------------------------------------------------------------------------------------

def test_throughput_series_fills_empty_minutes_with_zero() -> None:
    rows = [{"minute": minute(3), "images": 4}, {"minute": minute(0), "images": 2}]
    assert report.throughput_series(rows) == ([minute(i) for i in range(4)], [2, 0, 0, 4])
    assert report.throughput_series([]) == ([], [])


def test_latency_cdf_from_percentiles_skips_nulls() -> None:
    rows = [{"percentile": 100, "latency_s": 9.0}, {"percentile": 0, "latency_s": 1.0},
            {"percentile": 50, "latency_s": None}]
    assert report.latency_cdf(rows) == ([1.0, 9.0], [0.0, 1.0])


def test_accuracy_bars_leave_out_unmappable_labels() -> None:
    rows = [{"true_label": "roses", "mapping": "no_imagenet_class", "top1_accuracy": None,
             "top5_accuracy": None},
            {"true_label": "daisy", "mapping": "mapped", "top1_accuracy": 0.5, "top5_accuracy": 1.0}]
    assert report.accuracy_bars(rows) == (["daisy"], [0.5], [1.0])


def test_confusion_matrix_orders_by_frequency_and_folds_the_tail() -> None:
    rows = [{"true_label": "b", "predicted_label": "x", "images": 1},
            {"true_label": "a", "predicted_label": "y", "images": 5},
            {"true_label": "a", "predicted_label": "z", "images": 2},
            {"true_label": "b", "predicted_label": "w", "images": 1}]
    assert report.confusion_matrix(rows) == (["a", "b"], ["y", "z", "w", "x"],
                                             [[5, 2, 0, 0], [0, 0, 1, 1]])
    assert report.confusion_matrix(rows, max_columns=2) == (
        ["a", "b"], ["y", "z", report.OTHER], [[5, 2, 0], [0, 0, 2]])


def test_tables_format_and_escape() -> None:
    rows = [{"a": 0.12345, "b": None, "c": "x|y", "d": datetime(2024, 1, 2, 3, 4, tzinfo=UTC)}]
    assert report.markdown_table(rows).splitlines() == [
        "| a | b | c | d |", "|---|---|---|---|", "| 0.123 | n/a | x\\|y | 2024-01-02 03:04 |"]
    assert report.markdown_table([]) == "_no rows_"
    dist = [{"percentile": p, "latency_s": float(p)} for p in range(101)]
    assert [r["percentile"] for r in report.shown_rows("latency_distribution", dist)] == [
        0, 50, 90, 95, 99, 100]


def test_select_sql_names_the_view_and_limits() -> None:
    q = report.ViewQuery("v", "t", "a DESC", limit=5)
    assert report.select_sql(Settings(project="p", dataset="d"), q) == \
        "SELECT * FROM `p.d.v` ORDER BY a DESC LIMIT 5"
    assert report.select_sql(Settings(project="p", dataset="d"), q, limit=2).endswith("LIMIT 2")


# --- against bqemulator -----------------------------------------------------------------------

@pytest.mark.integration
def test_report_from_the_views(isolated: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """One loaded dataset (loading costs seconds): the command's output, then the plots' values."""
    load(isolated, quality_rows(isolated) + timing_rows(isolated))
    check_command_writes_tables_and_page(isolated, tmp_path / "cli", monkeypatch, capsys)
    check_plots_show_exactly_the_query_results(isolated, tmp_path / "plots")


def check_command_writes_tables_and_page(settings: Settings, out: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in settings.as_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLUMNS", "200")
    args = cli.build_parser().parse_args(["report", "--out", str(out), "--top", "3"])
    assert args.func(args) == 0

    printed = capsys.readouterr().out
    assert "Accuracy by true label" in printed and "no_imagenet_class" in printed
    page = (out / "report.md").read_text()
    for name in ("throughput", "latency_cdf", "accuracy", "confusion"):
        assert f"({name}.png)" in page
        assert (out / f"{name}.png").stat().st_size > 0
    assert "| roses | no_imagenet_class | 2 | 2 | n/a | n/a | n/a | n/a |" in page
    top = page.split("## Most frequent top-1 classes")[1].split("##")[0]
    assert top.count("\n| ") == 4  # header + 3 rows (--top 3)


def check_plots_show_exactly_the_query_results(settings: Settings, out: Path) -> None:
    results = report.fetch(clients.bigquery_client(settings), settings)
    assert set(results) == {q.view for q in report.QUERIES}
    plots = {p.name: p for p in report.render_plots(results, out)}
    assert set(plots) == {"throughput", "latency_cdf", "accuracy", "confusion"}
    for p in plots.values():
        data = p.path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p.path

    # throughput: quality rows at 07:00 (11) + timing rows (3 at 07:00, 21 at 07:02); 07:01 is 0
    thr = plots["throughput"].plotted
    assert thr["x"] == [minute(0), minute(1), minute(2)] and thr["y"] == [14, 0, 21]
    queried = {r["minute"]: r["images"] for r in select(settings, "throughput_per_minute")}
    assert {x: y for x, y in zip(thr["x"], thr["y"], strict=True) if y} == queried

    cdf = plots["latency_cdf"].plotted
    dist = select(settings, "latency_distribution", "percentile")
    assert cdf["x"] == [r["latency_s"] for r in dist]
    assert cdf["y"] == [r["percentile"] / 100 for r in dist]
    assert len(cdf["x"]) == 101 and cdf["y"][-1] == 1.0

    acc = plots["accuracy"].plotted
    assert acc["labels"] == ["cat", "daisy"]  # roses and mystery have no accuracy to draw
    assert acc["top1"] == pytest.approx([0.5, 2 / 3]) and acc["top5"] == pytest.approx([0.5, 1.0])

    conf = plots["confusion"].plotted
    counts = {(r["true_label"], r["predicted_label"]): r["images"]
              for r in select(settings, "confusion_counts")}
    drawn = {(t, p): n for t, row in zip(conf["rows"], conf["matrix"], strict=True)
             for p, n in zip(conf["columns"], row, strict=True) if n}
    assert drawn == counts
    assert conf["rows"] == ["cat", "daisy", "mystery", "roses"] and conf["columns"][0] == "daisy"


@pytest.mark.integration
def test_run_report_without_views_says_how_to_fix(stack, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in stack.env().items():
        monkeypatch.setenv(k, v)
    args = argparse.Namespace(out=str(tmp_path), dataset="no_such_dataset", table=None, top=None,
                              max_rows=30, create_views=False)
    assert report.run_report(args) == 2
    assert "--create-views" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
