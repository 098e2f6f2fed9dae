"""`bucketlens report`: row shaping (pure), and plots/tables/page from the real views, with the
plotted values read back from the matplotlib artists and compared with the query results."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline import clients, display
from pipeline.commands import cli, report
from pipeline.config import Settings
from tests.helpers.views import T0, load, model_rows, quality_rows, select, timing_rows

# the isolated dataset gets the analytics views (conftest)
pytestmark = pytest.mark.views

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


def acc_row(label: str, mapping: str, classified: int, top1: int | None,
            top5: int | None) -> dict:
    return {"true_label": label, "mapping": mapping, "classified": classified,
            "top1_correct": top1, "top5_correct": top5}


def test_accuracy_bars_draw_scored_labels_only() -> None:
    rows = [acc_row("roses", "no_imagenet_class", 2, None, None),
            acc_row("w", "not_a_model_label", 1, None, None),
            acc_row("tulip", "own_label", 0, 0, 0),  # nothing classified: no accuracy
            acc_row("daisy", "mapped", 2, 1, 2),
            acc_row("acoustic_guitar", "own_label", 4, 3, 4),
            acc_row("daisy", "own_label", 2, 2, 2)]  # scored by two kinds of model: one bar
    assert report.accuracy_bars(rows) == (["acoustic_guitar", "daisy"], [0.75, 0.75], [1.0, 1.0])


def test_version_steps_in_order_of_first_use() -> None:
    rows = [{"model": "digits", "model_version": "0a1b2c3d4e5f", "first_processed_at": minute(5),
             "top1_accuracy": 0.9},
            {"model": "mobilenet_v2", "model_version": "gs://b/weights/v2-finetuned-2024.pt",
             "first_processed_at": minute(0), "top1_accuracy": 0.5},
            {"model": "wide", "model_version": "x", "first_processed_at": minute(1),
             "top1_accuracy": None}]
    assert report.version_steps(rows) == (
        ["mobilenet_v2 v2-finetuned-20…", "digits 0a1b2c3d4e5f"], [0.5, 0.9])
    assert report.version_label(None, None) == "? unversioned"


def test_confusion_matrix_orders_by_frequency_and_folds_the_tail() -> None:
    rows = [{"true_label": "b", "predicted_label": "x", "images": 1},
            {"true_label": "a", "predicted_label": "y", "images": 5},
            {"true_label": "a", "predicted_label": "z", "images": 2},
            {"true_label": "b", "predicted_label": "w", "images": 1}]
    assert report.confusion_matrix(rows) == (["a", "b"], ["y", "z", "w", "x"],
                                             [[5, 2, 0, 0], [0, 0, 1, 1]])
    assert report.confusion_matrix(rows, max_columns=2) == (
        ["a", "b"], ["y", "z", report.OTHER], [[5, 2, 0], [0, 0, 2]])


def test_confusion_matrix_puts_correct_predictions_on_the_diagonal() -> None:
    """More true labels than MAX_CONFUSION_COLUMNS: every true label's own class keeps its
    column, in row order, so each correct prediction is on the diagonal and the most frequent
    mistakes still fit the cap before "(other)"."""
    n = report.MAX_CONFUSION_COLUMNS + 5
    rows = []
    for i in range(n):
        folder = f"class_{i:02d}"  # the model's label is "class 02" etc.
        rows.append({"true_label": folder, "true_model_label": f"class {i:02d}",
                     "predicted_label": f"class {i:02d}", "images": 1 + i % 3})
        rows.append({"true_label": folder, "true_model_label": f"class {i:02d}",
                     "predicted_label": "lynx" if i % 2 else f"class {(i + 1) % n:02d}",
                     "images": 5})
    # an old row (no true_model_label) whose folder equals a predicted label; one not named
    rows.append({"true_label": "Daisy", "true_model_label": None, "predicted_label": "daisy",
                 "images": 2})
    rows.append({"true_label": "cat", "true_model_label": None, "predicted_label": "tabby",
                 "images": 3})
    true_labels, columns, matrix = report.confusion_matrix(rows)
    assert true_labels == ["Daisy"] + [f"class_{i:02d}" for i in range(n)] + ["cat"]
    assert columns == ["daisy"] + [f"class {i:02d}" for i in range(n)] + [report.OTHER]
    for r in rows[:-1]:  # on the diagonal exactly when correct (cat has no class to be right in)
        i = true_labels.index(r["true_label"])
        j = columns.index(r["predicted_label"] if r["predicted_label"] in columns else report.OTHER)
        assert (i == j) == (r["true_model_label"] == r["predicted_label"]
                            or r["true_label"] == "Daisy")
    assert [matrix[i][i] for i in range(n + 1)] == [2] + [1 + i % 3 for i in range(n)]
    assert sum(map(sum, matrix)) == sum(r["images"] for r in rows)
    assert matrix[-1] == [0] * (n + 1) + [3]  # cat → tabby: no own column, in "(other)"
    assert sum(row[-1] for row in matrix) == 3 + 5 * (n // 2)  # lynx (odd i) and tabby

    # room left under the cap: the most frequent mistakes get columns before "(other)"
    few = [r for r in rows if r["true_label"] in ("class_01", "class_02", "cat")]
    assert report.confusion_matrix(few, max_columns=4) == (
        ["class_01", "class_02", "cat"], ["class 01", "class 02", "class 03", "lynx",
                                          report.OTHER],  # 5 each, then tabby's 3 folded
        [[2, 0, 0, 5, 0], [0, 3, 5, 0, 0], [0, 0, 0, 0, 3]])


def test_tables_format_and_escape() -> None:
    rows = [{"a": 0.12345, "b": None, "c": "x|y", "d": datetime(2024, 1, 2, 3, 4, tzinfo=UTC)}]
    assert report.markdown_table(rows).splitlines() == [
        "| a | b | c | d |", "|---|---|---|---|", "| 0.123 | n/a | x\\|y | 2024-01-02 03:04 |"]
    assert report.markdown_table([]) == "_no rows_"
    dist = [{"percentile": p, "latency_s": float(p)} for p in range(101)]
    assert [r["percentile"] for r in report.shown_rows("latency_distribution", dist)] == [
        0, 50, 90, 95, 99, 100]


def test_a_naive_time_is_shown_as_utc_in_any_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert report.format_value(datetime(2024, 1, 2, 3, 4)) == "2024-01-02 03:04"
        assert report.format_value(datetime(2024, 1, 2, 3, 4, tzinfo=UTC)) == "2024-01-02 03:04"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_markdown_cells_escape_what_a_renderer_would_act_on() -> None:
    assert display.markdown("no_imagenet_class") == "no_imagenet_class"  # inside a word: literal
    assert display.markdown("_it_ *b* `c` a|b") == "\\_it\\_ \\*b\\* \\`c\\` a\\|b"
    assert display.markdown("[x](y) <i> &amp; :skull: $x$ ~~s~~") == (
        "\\[x\\](y) \\<i\\> \\&amp; \\:skull\\: \\$x\\$ \\~\\~s\\~\\~")
    assert display.markdown("a\\b\x1b[2J\n") == "a\\\\b\\\\x1b\\[2J\\\\n"
    # numbers and times are ours: not escaped; strings from a view are
    row = {"label": "*x*", "n": 0.5, "t": datetime(2024, 1, 2, 3, 4, tzinfo=UTC), "v": None}
    assert report.markdown_table([row]).splitlines()[-1] == "| \\*x\\* | 0.500 | 2024-01-02 03:04 | n/a |"


def test_confusion_rows_past_the_cap_fold_into_other_by_position() -> None:
    """The most frequent true labels get rows; the rest one "(other)" row. A label that is
    itself "(other)" keeps its own counts (cells are found by position, not by name)."""
    rows = [{"true_label": "a", "predicted_label": "x", "images": 5},
            {"true_label": "b", "predicted_label": "(other)", "images": 3},
            {"true_label": "(other)", "predicted_label": "y", "images": 1},
            {"true_label": "c", "predicted_label": "z", "images": 1}]
    assert report.confusion_matrix(rows, max_columns=2, max_rows=3) == (
        ["(other)", "a", "b", report.OTHER], ["x", "(other)", report.OTHER],
        [[0, 0, 1], [5, 0, 0], [0, 3, 0], [0, 0, 1]])
    assert report.confusion_note(rows, max_columns=2, max_rows=3) == (
        'Shows 3 of 4 true labels (those with the most images); the other 1 are summed in the '
        '"(other)" row. Shows 2 of 4 predicted classes (the shown labels\' own, then the most '
        'frequent); the other 2 are summed in the "(other)" column.')
    assert report.confusion_note(rows) == ""  # all shown: nothing to say


def test_accuracy_bars_and_version_steps_are_bounded() -> None:
    rows = [acc_row(f"l{i}", "own_label", 1 + i, 1, 1) for i in range(5)]
    assert report.accuracy_bars(rows, max_labels=2)[0] == ["l3", "l4"]  # most classified
    assert report.accuracy_note(rows, max_labels=2).startswith("Shows 2 of 5 scored labels")
    versions = [{"model": "m", "model_version": f"v{i}", "first_processed_at": minute(i),
                 "top1_accuracy": 0.5} for i in range(5)]
    assert report.version_steps(versions, max_versions=2)[0] == ["m v3", "m v4"]  # newest
    assert report.versions_note(versions, max_versions=2).startswith("Shows 2 of 5 model versions")


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
    for name in ("throughput", "latency_cdf", "accuracy", "accuracy_by_version", "confusion"):
        assert f"({name}.png)" in page
        assert (out / f"{name}.png").stat().st_size > 0
    assert "| roses | no_imagenet_class | 2 | 2 | n/a | n/a | n/a | n/a |" in page
    top = page.split("## Most frequent top-1 classes")[1].split("##")[0]
    assert top.count("\n| ") == 4  # header + 3 rows (--top 3)


def check_plots_show_exactly_the_query_results(settings: Settings, out: Path) -> None:
    results = report.fetch(clients.bigquery_client(settings), settings)
    assert set(results) == {q.view for q in report.QUERIES} | {"embedding_drift"}
    plots = {p.name: p for p in report.render_plots(results, out)}
    assert set(plots) == {"throughput", "latency_cdf", "accuracy", "accuracy_by_version",
                          "confusion", "drift"}
    for p in plots.values():
        data = p.path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p.path

    # drift: each metric of each drift_windows row, in window order
    drift = plots["drift"].plotted
    windows = select(settings, "drift_windows", "window_start")
    assert windows and drift["x"] == [w["window_start"] for w in windows]
    for metric in ("class_mix", "confidence_drop", "low_margin_rise"):
        assert drift[metric] == pytest.approx([w[metric] for w in windows]), metric

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
    # daisy names a predicted label: first row and column, so its hits are on the diagonal
    assert conf["rows"] == ["daisy", "cat", "mystery", "roses"] and conf["columns"][0] == "daisy"

    steps = plots["accuracy_by_version"].plotted  # rows written without a ModelInfo
    assert steps == {"versions": ["test unversioned"], "top1": [pytest.approx(0.6)]}


@pytest.mark.integration
def test_report_with_own_labels_and_model_versions(isolated: Settings, tmp_path: Path) -> None:
    """Rows carrying a ModelInfo: own labels are drawn as scored, their hits on the confusion
    diagonal, and one step per model version, exactly as accuracy_by_model_version says."""
    load(isolated, model_rows(isolated))
    results = report.fetch(clients.bigquery_client(isolated), isolated)
    plots = {p.name: p.plotted for p in report.render_plots(results, tmp_path)}

    versions = select(isolated, "accuracy_by_model_version", "first_processed_at")
    assert results["accuracy_by_model_version"] == versions
    scored = [r for r in versions if r["top1_accuracy"] is not None]  # wide scored nothing
    assert plots["accuracy_by_version"] == {
        "versions": [report.version_label(r["model"], r["model_version"]) for r in scored],
        "top1": [r["top1_accuracy"] for r in scored]}
    assert plots["accuracy_by_version"]["versions"] == [
        "test unversioned", "efficientnet_lite0 bundled", "digits sha256-1111", "digits sha256-2222"]
    assert plots["accuracy_by_version"]["top1"] == [1.0, 0.5, 0.5, 0.75]

    acc = plots["accuracy"]
    assert acc["labels"] == ["0", "1", "2", "3", "acoustic_guitar", "daisy"]
    assert acc["top1"] == [1.0, 0.5, 1.0, 0.0, 0.5, 1.0]

    conf = plots["confusion"]
    counts = {(r["true_label"], r["predicted_label"]): r["images"]
              for r in select(isolated, "confusion_counts")}
    drawn = {(t, p): n for t, row in zip(conf["rows"], conf["matrix"], strict=True)
             for p, n in zip(conf["columns"], row, strict=True) if n}
    assert drawn == counts
    assert conf["rows"][:6] == ["0", "1", "2", "3", "acoustic_guitar", "daisy"]
    assert conf["columns"][:6] == ["0", "1", "2", "3", "acoustic guitar", "daisy"]
    correct = sum(n for (t, p), n in counts.items()
                  if p == {"acoustic_guitar": "acoustic guitar"}.get(t, t))
    assert sum(conf["matrix"][i][i] for i in range(6)) == correct == 7
    page = report.markdown_report(results, [], isolated, T0)
    assert "## Accuracy by model version" in page and "| digits | sha256-2222 |" in page


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
